"""Wharf: the Python client of the Wharf message broker.

Thread-safe, fully typed, with a blocking API (this module) and an asyncio one
(:mod:`wharf.aio`) on the same native core (the Rust ``wharf-client`` on one background
runtime per process). Blocking calls release the GIL, so heartbeats and acks keep flowing
while a slow handler runs, and Ctrl-C interrupts a blocking wait promptly.

.. code-block:: python

    import wharf

    with wharf.connect("wharf://127.0.0.1:5800") as conn:
        conn.declare_queue("orders", durable=True)
        conn.publish("orders", b"Order 12345", headers={"kind": "order"}, persistent=True)
        for message in conn.consume("orders", prefetch=100, timeout=5.0):
            with message.process():  # ack on success, nack on exception
                print(message.body, message.headers, message.redelivered)
"""

from __future__ import annotations

import atexit

from wharf import _wharf
from wharf._connection import DEFAULT_URL, Connection, connect
from wharf._types import (
    Body,
    Durability,
    ExchangeKind,
    Headers,
    HeaderValue,
    Overflow,
    PermissionInfo,
    QueueDeclared,
    QueueStats,
    Seconds,
    TopicPermissionInfo,
    UserInfo,
    UserLimitsInfo,
    VhostInfo,
)
from wharf._wharf import Batches, Consumer, Message, OutgoingMessage, ProcessGuard, Publisher
from wharf.errors import (
    AccessRefused,
    Backpressure,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ConsumerCancelled,
    Duplicate,
    ErrorCode,
    InvalidArgument,
    InvalidName,
    NotFound,
    NotSettleable,
    NotSupported,
    PreconditionFailed,
    PublishRefused,
    ResourceLimit,
    ResourceLocked,
    Timeout,
    WharfError,
)

__version__: str = _wharf.__version__

__all__ = [
    "DEFAULT_URL",
    "connect",
    "Connection",
    "Consumer",
    "Batches",
    "Message",
    "ProcessGuard",
    "OutgoingMessage",
    "Publisher",
    "QueueDeclared",
    "QueueStats",
    "UserInfo",
    "PermissionInfo",
    "TopicPermissionInfo",
    "VhostInfo",
    "UserLimitsInfo",
    "Body",
    "Durability",
    "ExchangeKind",
    "Headers",
    "HeaderValue",
    "Overflow",
    "Seconds",
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

# Background completions must not call into an interpreter that is shutting down.
atexit.register(_wharf._shutdown)
