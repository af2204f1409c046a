"""Exceptions raised by :mod:`wharf`, and the broker's error codes.

Every error is a :class:`WharfError`. Errors the broker reported carry its wire code in
``err.code`` (an :class:`ErrorCode`, or a plain ``int`` for a code this version does not know);
errors detected by the client have ``code = None``.

Three classes of failure, as in the rest of Wharf:

* the operation failed, the connection lives: :class:`NotFound`, :class:`PreconditionFailed`,
  :class:`AccessRefused`, :class:`Backpressure`, :class:`PublishRefused`, :class:`Duplicate`,
  :class:`Timeout`, :class:`InvalidArgument`, ...;
* the connection is over: :class:`ConnectionLost` (and :class:`ConnectionClosed` after
  :meth:`wharf.Connection.close`); every later operation fails the same way;
* the connection never opened: :class:`ConnectError` (or :class:`AccessRefused`).
"""

from __future__ import annotations

import enum
from typing import Optional, Union

__all__ = [
    "ErrorCode",
    "WharfError",
    "ConnectError",
    "ConnectionLost",
    "ConnectionClosed",
    "Timeout",
    "NotFound",
    "PreconditionFailed",
    "AccessRefused",
    "ResourceLimit",
    "ResourceLocked",
    "InvalidName",
    "InvalidArgument",
    "Backpressure",
    "PublishRefused",
    "Duplicate",
    "ConsumerCancelled",
    "NotSettleable",
    "NotSupported",
]


class ErrorCode(enum.IntEnum):
    """The broker's wire error codes (docs/protocol.md); the numbers never change."""

    NORMAL = 0
    NOT_FOUND = 1
    PRECONDITION_FAILED = 2
    ACCESS_REFUSED = 3
    FRAME_TOO_LARGE = 4
    PROTOCOL_VIOLATION = 5
    RESOURCE_LIMIT = 6
    INTERNAL = 7
    UNSUPPORTED_VERSION = 8
    INVALID_NAME = 9
    RESOURCE_LOCKED = 10
    BACKPRESSURE = 11
    UNKNOWN_DELIVERY_TAG = 12
    PUBLISH_REFUSED = 13
    HEARTBEAT_TIMEOUT = 14
    CONNECTION_FORCED = 15
    NOT_IMPLEMENTED = 16
    INVALID_ARGUMENT = 17


def _to_code(code: Optional[int]) -> Union[ErrorCode, int, None]:
    if code is None:
        return None
    try:
        return ErrorCode(code)
    except ValueError:
        return code


class WharfError(Exception):
    """Base class of every Wharf error. ``code`` is the broker's error code, if it sent one."""

    code: Union[ErrorCode, int, None]

    def __init__(self, message: str, *, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = _to_code(code)

    def __reduce__(self) -> tuple[object, ...]:
        code = None if self.code is None else int(self.code)
        return (_rebuild, (type(self), str(self), code))


def _rebuild(cls: type[WharfError], message: str, code: Optional[int]) -> WharfError:
    return cls(message, code=code)


class ConnectError(WharfError, ConnectionError):
    """The connection could not be opened (refused, unreachable, handshake failed)."""


class ConnectionLost(WharfError, ConnectionError):
    """The connection broke (I/O error, heartbeat timeout, server closed it): every later
    operation on it fails. Unconfirmed publishes may or may not have been stored."""


class ConnectionClosed(WharfError):
    """The connection was closed by this client; no operation is possible any more."""


class Timeout(WharfError, TimeoutError):
    """The operation got no answer in time. (An empty queue is never a timeout: consuming
    returns nothing instead.)"""


class NotFound(WharfError):
    """The queue, exchange, binding or consumer does not exist."""


class PreconditionFailed(WharfError):
    """Existing state does not match the request (redeclared with other flags, ``if_unused`` /
    ``if_empty`` not met)."""


class AccessRefused(WharfError):
    """The credentials were rejected, or the operation is not permitted."""


class ResourceLimit(WharfError):
    """A broker limit was reached (queues, consumers, connections, bindings)."""


class ResourceLocked(WharfError):
    """The queue is exclusive to another connection, or has an exclusive consumer."""


class InvalidName(WharfError, ValueError):
    """A name is empty, too long, or uses the reserved prefix ``wharf.``."""


class InvalidArgument(WharfError, ValueError):
    """An argument is invalid (bad address, bad queue argument, name too long to encode, ...);
    nothing was sent, or the broker refused it."""


class Backpressure(WharfError):
    """The target queue is full and refuses publishes: not stored; retry later."""


class PublishRefused(WharfError):
    """The broker refused a publish (unroutable, too large, ...): not stored."""


class Duplicate(WharfError):
    """The publish was dropped as a duplicate: no queue stored it, because the queues it
    reached had already taken a message with this ``message_id`` within their
    ``dedup_window``. For a publish retried after a lost confirm this means the first attempt
    was stored: treat it as success. (If the publish also reached a queue without a window,
    that queue stores it and the publish is confirmed normally.)"""


class ConsumerCancelled(WharfError):
    """The broker cancelled the consumer (e.g. its queue was deleted)."""


class NotSettleable(WharfError):
    """The delivery cannot be acked / nacked / rejected: it was settled already, came from an
    auto-ack consumer, or its consumer was cancelled (the broker then requeued it)."""


class NotSupported(WharfError):
    """The broker understands the request but does not implement it."""
