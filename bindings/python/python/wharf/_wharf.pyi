"""Type stubs of the native core ``wharf._wharf`` (must match ``bindings/python/src``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Optional, final

import os
from collections.abc import Sequence

from wharf._types import Body, Durability, Headers, HeaderValue, Seconds

__version__: str

_Done = Callable[[Any, Optional[BaseException]], None]

def _shutdown() -> None: ...
@final
class Task:
    """A background operation started by :mod:`wharf.aio`."""

    def abort(self) -> None: ...
    @property
    def finished(self) -> bool: ...

@final
class Message:
    """A message delivered to a consumer; settle it once with ack / nack / reject / defer."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, HeaderValue]: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def delivery_count(self) -> int: ...
    @property
    def delivery_tag(self) -> int: ...
    @property
    def consumer_tag(self) -> int: ...
    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def persistent(self) -> bool: ...
    @property
    def timestamp(self) -> float | None: ...
    @property
    def expiration(self) -> float | None: ...
    @property
    def settled(self) -> bool: ...
    def ack(self) -> None: ...
    def nack(self, requeue: bool = True) -> None: ...
    def reject(self) -> None: ...
    def defer(self, delay: Seconds) -> None: ...
    def in_progress(self) -> None: ...
    def process(self, requeue: bool = False) -> ProcessGuard: ...

@final
class ProcessGuard:
    """Context manager from :meth:`Message.process`: ack on success, nack on exception."""

    def __enter__(self) -> Message: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        _exc: BaseException | None = None,
        _traceback: TracebackType | None = None,
    ) -> bool: ...

@final
class OutgoingMessage:
    """One message for ``publish_many``, with its own routing key and properties."""

    def __new__(
        cls,
        body: Body,
        *,
        routing_key: str | None = None,
        headers: Headers | None = None,
        persistent: bool = False,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        priority: int = 0,
        expiration: Seconds | None = None,
        delay: Seconds | None = None,
    ) -> OutgoingMessage: ...
    @property
    def body(self) -> bytes: ...
    @property
    def routing_key(self) -> str | None: ...

@final
class Consumer:
    """A subscription to a queue; iterate it for messages."""

    @property
    def queue(self) -> str: ...
    @property
    def consumer_tag(self) -> int: ...
    @property
    def auto_ack(self) -> bool: ...
    @property
    def prefetch(self) -> int: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def ack_timeout(self) -> float | None: ...
    def __iter__(self) -> Iterator[Message]: ...
    def __next__(self) -> Message: ...
    def get(self, timeout: float | None = None) -> Message | None: ...
    def next_batch(
        self, max_messages: int = 100, max_wait: float = 0.0, timeout: float | None = None
    ) -> list[Message]: ...
    def batches(self, max_messages: int = 100, max_wait: float = 0.05) -> Batches: ...
    def cancel(self) -> None: ...
    def __enter__(self) -> Consumer: ...
    def __exit__(
        self,
        _exc_type: type[BaseException] | None = None,
        _exc: BaseException | None = None,
        _traceback: TracebackType | None = None,
    ) -> bool: ...
    def _next_batch_async(
        self, done: _Done, max_messages: int, max_wait: float, timeout: float | None
    ) -> Task: ...
    def _cancel_async(self, done: _Done) -> Task: ...

@final
class Batches:
    """Iterator of message lists, from :meth:`Consumer.batches`."""

    def __iter__(self) -> Iterator[list[Message]]: ...
    def __next__(self) -> list[Message]: ...

@final
class Publisher:
    """A pipelining publisher: ``publish`` returns once queued, ``wait_confirms`` collects."""

    @property
    def window(self) -> int: ...
    @property
    def n_pending(self) -> int: ...
    def publish(
        self,
        routing_key: str,
        body: Body,
        *,
        exchange: str = "",
        headers: Headers | None = None,
        persistent: bool = False,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        priority: int = 0,
        expiration: Seconds | None = None,
        delay: Seconds | None = None,
        done: _Done | None = None,
    ) -> int | None: ...
    def wait_confirms(
        self, timeout: float | None = None, *, done: _Done | None = None
    ) -> Any: ...
    def __enter__(self) -> Publisher: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        _exc: BaseException | None = None,
        _traceback: TracebackType | None = None,
    ) -> bool: ...

@final
class Core:
    """One connection (native core of :class:`wharf.Connection` and
    :class:`wharf.aio.Connection`). Every method blocks unless given ``done``, then it returns a
    :class:`Task` and calls ``done(value, error)`` later."""

    @staticmethod
    def connect(
        url: str,
        *,
        client_name: str | None = None,
        heartbeat: float | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        server_name: str | None = None,
        external: bool = False,
        vhost: str | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    @property
    def server_version(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def server_limits(self) -> dict[str, int]: ...
    def close(self, *, done: _Done | None = None) -> Any: ...
    def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: Headers | None = None,
        max_priority: int | None = None,
        max_length: int | None = None,
        max_length_bytes: int | None = None,
        overflow: str | None = None,
        dead_letter_exchange: str | None = None,
        dead_letter_routing_key: str | None = None,
        delivery_limit: int | None = None,
        message_ttl: Seconds | None = None,
        expires: Seconds | None = None,
        retry: Sequence[Seconds] | None = None,
        dedup_window: Seconds | None = None,
        single_active_consumer: bool | None = None,
        sync: str | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False, done: _Done | None = None
    ) -> Any: ...
    def purge_queue(self, name: str, *, done: _Done | None = None) -> Any: ...
    def queue_stats(self, name: str, *, done: _Done | None = None) -> Any: ...
    def list_queues(self, *, done: _Done | None = None) -> Any: ...
    def add_user(
        self, name: str, password: str, *, tags: list[str] = ..., done: _Done | None = None
    ) -> Any: ...
    def delete_user(self, name: str, *, done: _Done | None = None) -> Any: ...
    def change_password(self, name: str, password: str, *, done: _Done | None = None) -> Any: ...
    def set_user_tags(self, name: str, tags: list[str], *, done: _Done | None = None) -> Any: ...
    def list_users(self, *, done: _Done | None = None) -> Any: ...
    def set_permissions(
        self, user: str, configure: str, write: str, read: str, *, vhost: str = ..., done: _Done | None = None
    ) -> Any: ...
    def clear_permissions(self, user: str, *, vhost: str = ..., done: _Done | None = None) -> Any: ...
    def list_permissions(self, *, vhost: str = ..., done: _Done | None = None) -> Any: ...
    def set_topic_permissions(
        self,
        user: str,
        exchange: str,
        write: str,
        read: str,
        *,
        vhost: str = ...,
        done: _Done | None = None,
    ) -> Any: ...
    def clear_topic_permissions(
        self, user: str, *, exchange: str | None = None, vhost: str = ..., done: _Done | None = None
    ) -> Any: ...
    def list_topic_permissions(self, *, vhost: str = ..., done: _Done | None = None) -> Any: ...
    def add_vhost(
        self,
        name: str,
        *,
        max_connections: int | None = None,
        max_queues: int | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def delete_vhost(self, name: str, *, done: _Done | None = None) -> Any: ...
    def list_vhosts(self, *, done: _Done | None = None) -> Any: ...
    def set_vhost_limits(
        self,
        name: str,
        *,
        max_connections: int | None = None,
        max_queues: int | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def set_user_limits(
        self,
        user: str,
        *,
        max_connections: int | None = None,
        max_queues: int | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def list_user_limits(self, *, done: _Done | None = None) -> Any: ...
    def redrive(
        self, queue: str, *, max_messages: int | None = None, done: _Done | None = None
    ) -> Any: ...
    def declare_exchange(
        self,
        name: str,
        kind: str,
        *,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        passive: bool = False,
        arguments: Headers | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def delete_exchange(
        self, name: str, *, if_unused: bool = False, done: _Done | None = None
    ) -> Any: ...
    def bind(
        self,
        destination: str,
        source: str,
        routing_key: str,
        *,
        to_exchange: bool = False,
        unbind: bool = False,
        arguments: Headers | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def publish(
        self,
        routing_key: str,
        body: Body,
        *,
        exchange: str = "",
        headers: Headers | None = None,
        persistent: bool = False,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        priority: int = 0,
        expiration: Seconds | None = None,
        delay: Seconds | None = None,
        done: _Done | None = None,
    ) -> Any: ...
    def publish_many(
        self,
        messages: Iterable[Body | OutgoingMessage],
        *,
        routing_key: str = "",
        exchange: str = "",
        done: _Done | None = None,
    ) -> Any: ...
    def publisher(self, window: int | None = None) -> Publisher: ...
    def consume(
        self,
        queue: str,
        *,
        prefetch: int = 100,
        auto_ack: bool = False,
        exclusive: bool = False,
        priority: int = 0,
        timeout: float | None = None,
        ack_timeout: Seconds | None = None,
        done: _Done | None = None,
    ) -> Any: ...

__all__ = [
    "Core",
    "Consumer",
    "Batches",
    "Message",
    "ProcessGuard",
    "OutgoingMessage",
    "Publisher",
    "Task",
    "_shutdown",
    "__version__",
]
