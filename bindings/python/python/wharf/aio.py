"""The asyncio API: the same surface as :mod:`wharf`, with ``await``, ``async with`` and
``async for``.

It runs on the same native core as the blocking API: operations run on Wharf's background
runtime and their results are handed to the event loop with ``loop.call_soon_threadsafe``;
nothing blocks the loop and no executor thread is used. Settling a message (``ack``,
``nack``, ``reject``, ``defer``, ``with message.process():``) and ``in_progress`` never block,
so they are the same calls as in the blocking API.

.. code-block:: python

    import wharf.aio

    async def main() -> None:
        async with wharf.aio.connect("wharf://127.0.0.1:5800") as conn:
            await conn.declare_queue("orders", durable=True)
            await conn.publish("orders", b"Order 12345", persistent=True)
            async for message in conn.consume("orders", prefetch=100, timeout=5.0):
                with message.process():
                    print(message.body)
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Optional, Union, cast

from wharf import _wharf
from wharf._connection import DEFAULT_URL
from wharf._types import (
    Body,
    Durability,
    ExchangeKind,
    Headers,
    Overflow,
    PermissionInfo,
    QueueDeclared,
    QueueStats,
    Seconds,
    TopicPermissionInfo,
    UserInfo,
    UserLimitsInfo,
    VhostInfo,
    _arguments,
)
from wharf._wharf import Message, OutgoingMessage
from wharf.errors import WharfError

__all__ = ["connect", "Connection", "Consumer", "Publisher"]

_Done = Callable[[Any, Optional[BaseException]], None]


def _discard(value: Any) -> None:
    """Requeues messages whose awaiting task was cancelled (none may be left unsettled)."""
    messages: Iterable[Any] = ()
    if isinstance(value, tuple) and value and isinstance(value[0], list):
        messages = value[0]
    for message in messages:
        if isinstance(message, Message) and not message.settled:
            try:
                message.nack(requeue=True)
            except WharfError:
                pass


def _resolve(future: asyncio.Future[Any], value: Any, error: Optional[BaseException]) -> None:
    if future.done():
        _discard(value)
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _bridge() -> tuple[asyncio.Future[Any], _Done]:
    """A future of the running loop, and the callback the native core completes it with (from
    a background thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def done(value: Any, error: Optional[BaseException]) -> None:
        try:
            loop.call_soon_threadsafe(_resolve, future, value, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            _discard(value)

    return future, done


async def _call(start: Callable[[_Done], Any]) -> Any:
    """Starts a native operation with a completion callback and awaits its result; cancelling
    the awaiting task aborts the operation."""
    future, done = _bridge()
    task = start(done)
    try:
        return await future
    except asyncio.CancelledError:
        if isinstance(task, _wharf.Task):
            task.abort()
        raise


class _Connecting:
    """What :func:`connect` returns: await it for a :class:`Connection`, or use it with
    ``async with`` to close the connection on exit."""

    __slots__ = ("_start", "_connection")

    def __init__(self, start: Callable[[_Done], Any]) -> None:
        self._start = start
        self._connection: Optional[Connection] = None

    async def _connect(self) -> Connection:
        core = await _call(self._start)
        return Connection(cast(_wharf.Core, core))

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._connect().__await__()

    async def __aenter__(self) -> Connection:
        self._connection = await self._connect()
        return self._connection

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        if self._connection is not None:
            await self._connection.close()


def connect(
    url: str = DEFAULT_URL,
    *,
    client_name: Optional[str] = None,
    heartbeat: Optional[float] = None,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    ca: Union[str, "os.PathLike[str]", None] = None,
    cert: Union[str, "os.PathLike[str]", None] = None,
    key: Union[str, "os.PathLike[str]", None] = None,
    server_name: Optional[str] = None,
    external: bool = False,
    vhost: Optional[str] = None,
) -> _Connecting:
    """Connects to a Wharf broker: ``conn = await connect(url)`` or
    ``async with connect(url) as conn:``. Arguments as in :func:`wharf.connect`."""

    def start(done: _Done) -> Any:
        return _wharf.Core.connect(
            url,
            client_name=client_name,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            ca=ca,
            cert=cert,
            key=key,
            server_name=server_name,
            external=external,
            vhost=vhost,
            done=done,
        )

    return _Connecting(start)


class Connection:
    """An asyncio connection to a Wharf broker, from :func:`connect`. Methods mirror
    :class:`wharf.Connection`; use it with ``async with`` to close it."""

    __slots__ = ("_core", "__weakref__")

    def __init__(self, core: _wharf.Core) -> None:
        """Wraps a connected native core (use :func:`connect` instead)."""
        self._core = core

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"<wharf.aio.Connection server_version={self.server_version!r} "
            f"closed={self.closed}>"
        )

    @property
    def server_version(self) -> str:
        """The broker's software version."""
        return self._core.server_version

    @property
    def closed(self) -> bool:
        """Whether the connection is over (closed by either side, or lost)."""
        return self._core.closed

    @property
    def server_limits(self) -> dict[str, int]:
        """Limits the broker announced (see :attr:`wharf.Connection.server_limits`)."""
        return self._core.server_limits

    async def close(self) -> None:
        """Closes the connection, waiting for the broker's answer; closing twice is a no-op."""
        await _call(lambda done: self._core.close(done=done))

    async def declare_queue(
        self,
        name: str = "",
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: Optional[Headers] = None,
        max_priority: Optional[int] = None,
        max_length: Optional[int] = None,
        max_length_bytes: Optional[int] = None,
        overflow: Optional[Overflow] = None,
        dead_letter_exchange: Optional[str] = None,
        dead_letter_routing_key: Optional[str] = None,
        delivery_limit: Optional[int] = None,
        message_ttl: Optional[Seconds] = None,
        expires: Optional[Seconds] = None,
        retry: Optional[Sequence[Seconds]] = None,
        dedup_window: Optional[Seconds] = None,
        single_active_consumer: Optional[bool] = None,
        sync: Optional[str] = None,
    ) -> QueueDeclared:
        """Declares a queue, with its queue features; see
        :meth:`wharf.Connection.declare_queue`."""
        args = _arguments(arguments)
        name, ready, consumers = await _call(
            lambda done: self._core.declare_queue(
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                passive=passive,
                arguments=args,
                max_priority=max_priority,
                max_length=max_length,
                max_length_bytes=max_length_bytes,
                overflow=overflow,
                dead_letter_exchange=dead_letter_exchange,
                dead_letter_routing_key=dead_letter_routing_key,
                delivery_limit=delivery_limit,
                message_ttl=message_ttl,
                expires=expires,
                retry=retry,
                dedup_window=dedup_window,
                single_active_consumer=single_active_consumer,
                sync=sync,
                done=done,
            )
        )
        return QueueDeclared(name, ready, consumers)

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Deletes a queue; returns how many messages were dropped."""
        return cast(
            int,
            await _call(
                lambda done: self._core.delete_queue(
                    name, if_unused=if_unused, if_empty=if_empty, done=done
                )
            ),
        )

    async def purge_queue(self, name: str) -> int:
        """Drops a queue's ready messages; returns how many."""
        return cast(int, await _call(lambda done: self._core.purge_queue(name, done=done)))

    async def queue_stats(self, name: str) -> QueueStats:
        """A queue's counters and flags."""
        stats = await _call(lambda done: self._core.queue_stats(name, done=done))
        return QueueStats._from_dict(stats)

    async def list_queues(self) -> list[QueueStats]:
        """Every queue visible to this connection."""
        queues = await _call(lambda done: self._core.list_queues(done=done))
        return [QueueStats._from_dict(stats) for stats in queues]

    # Administration (administrators only; protocol 1.2): see :class:`wharf.Connection`.

    async def add_user(self, name: str, password: str, *, tags: Sequence[str] = ()) -> None:
        """Adds a user. See :meth:`wharf.Connection.add_user`."""
        await _call(lambda done: self._core.add_user(name, password, tags=list(tags), done=done))

    async def delete_user(self, name: str) -> None:
        """Deletes a user and its permissions."""
        await _call(lambda done: self._core.delete_user(name, done=done))

    async def change_password(self, name: str, password: str) -> None:
        """Sets a user's password."""
        await _call(lambda done: self._core.change_password(name, password, done=done))

    async def set_user_tags(self, name: str, tags: Sequence[str]) -> None:
        """Sets a user's tags, replacing them."""
        await _call(lambda done: self._core.set_user_tags(name, list(tags), done=done))

    async def list_users(self) -> list[UserInfo]:
        """Every user and its tags."""
        return cast("list[UserInfo]", await _call(lambda done: self._core.list_users(done=done)))

    async def set_permissions(self, user: str, configure: str, write: str, read: str, *, vhost: str = "/") -> None:
        """Sets a user's permissions. See :meth:`wharf.Connection.set_permissions`."""
        await _call(lambda done: self._core.set_permissions(user, configure, write, read, vhost=vhost, done=done))

    async def clear_permissions(self, user: str, *, vhost: str = "/") -> None:
        """Removes a user's permissions in ``vhost``."""
        await _call(lambda done: self._core.clear_permissions(user, vhost=vhost, done=done))

    async def list_permissions(self, *, vhost: str = "/") -> list[PermissionInfo]:
        """The permissions in ``vhost``."""
        return cast(
            "list[PermissionInfo]", await _call(lambda done: self._core.list_permissions(vhost=vhost, done=done))
        )

    async def set_topic_permissions(
        self, user: str, exchange: str, write: str, read: str, *, vhost: str = "/"
    ) -> None:
        """Sets a user's topic permissions. See :meth:`wharf.Connection.set_topic_permissions`."""
        await _call(
            lambda done: self._core.set_topic_permissions(user, exchange, write, read, vhost=vhost, done=done)
        )

    async def clear_topic_permissions(
        self, user: str, *, exchange: Optional[str] = None, vhost: str = "/"
    ) -> None:
        """Removes a user's topic permissions on ``exchange`` (``None``: all)."""
        await _call(
            lambda done: self._core.clear_topic_permissions(user, exchange=exchange, vhost=vhost, done=done)
        )

    async def list_topic_permissions(self, *, vhost: str = "/") -> list[TopicPermissionInfo]:
        """The topic permissions in ``vhost``."""
        return cast(
            "list[TopicPermissionInfo]",
            await _call(lambda done: self._core.list_topic_permissions(vhost=vhost, done=done)),
        )

    # Virtual hosts (administrators only; protocol 1.3): see :class:`wharf.Connection`.

    async def add_vhost(
        self, name: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None
    ) -> None:
        """Adds a virtual host. See :meth:`wharf.Connection.add_vhost`."""
        await _call(
            lambda done: self._core.add_vhost(
                name, max_connections=max_connections, max_queues=max_queues, done=done
            )
        )

    async def delete_vhost(self, name: str) -> None:
        """Deletes a virtual host with everything in it."""
        await _call(lambda done: self._core.delete_vhost(name, done=done))

    async def list_vhosts(self) -> list[VhostInfo]:
        """Every virtual host, its limits and its usage."""
        return cast("list[VhostInfo]", await _call(lambda done: self._core.list_vhosts(done=done)))

    async def set_vhost_limits(
        self, name: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None
    ) -> None:
        """Sets a virtual host's limits. See :meth:`wharf.Connection.set_vhost_limits`."""
        await _call(
            lambda done: self._core.set_vhost_limits(
                name, max_connections=max_connections, max_queues=max_queues, done=done
            )
        )

    # Users' own limits (administrators only; protocol 1.3): see :class:`wharf.Connection`.

    async def set_user_limits(
        self, user: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None
    ) -> None:
        """Sets a user's own limits. See :meth:`wharf.Connection.set_user_limits`."""
        await _call(
            lambda done: self._core.set_user_limits(
                user, max_connections=max_connections, max_queues=max_queues, done=done
            )
        )

    async def list_user_limits(self) -> list[UserLimitsInfo]:
        """Every user and its own limits, sorted by user name."""
        return cast(
            "list[UserLimitsInfo]", await _call(lambda done: self._core.list_user_limits(done=done))
        )

    async def redrive(self, queue: str, *, max_messages: Optional[int] = None) -> int:
        """Moves dead-lettered messages back to the queues they died in; returns how many.
        See :meth:`wharf.Connection.redrive`."""
        return cast(
            int,
            await _call(
                lambda done: self._core.redrive(queue, max_messages=max_messages, done=done)
            ),
        )

    async def declare_exchange(
        self,
        name: str,
        kind: ExchangeKind = "direct",
        *,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        passive: bool = False,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Declares an exchange; see :meth:`wharf.Connection.declare_exchange`."""
        args = _arguments(arguments)
        await _call(
            lambda done: self._core.declare_exchange(
                name,
                kind,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                passive=passive,
                arguments=args,
                done=done,
            )
        )

    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        """Deletes an exchange."""
        await _call(lambda done: self._core.delete_exchange(name, if_unused=if_unused, done=done))

    async def bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Binds ``queue`` to ``exchange``; see :meth:`wharf.Connection.bind`."""
        args = _arguments(arguments)
        await _call(
            lambda done: self._core.bind(queue, exchange, routing_key, arguments=args, done=done)
        )

    async def unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Removes a binding made with :meth:`bind`."""
        args = _arguments(arguments)
        await _call(
            lambda done: self._core.bind(
                queue, exchange, routing_key, unbind=True, arguments=args, done=done
            )
        )

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Binds exchange ``destination`` to exchange ``source``."""
        args = _arguments(arguments)
        await _call(
            lambda done: self._core.bind(
                destination, source, routing_key, to_exchange=True, arguments=args, done=done
            )
        )

    async def unbind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Removes an exchange-to-exchange binding."""
        args = _arguments(arguments)
        await _call(
            lambda done: self._core.bind(
                destination,
                source,
                routing_key,
                to_exchange=True,
                unbind=True,
                arguments=args,
                done=done,
            )
        )

    async def publish(
        self,
        routing_key: str,
        body: Body,
        *,
        exchange: str = "",
        headers: Optional[Headers] = None,
        persistent: bool = False,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        reply_to: Optional[str] = None,
        content_type: Optional[str] = None,
        content_encoding: Optional[str] = None,
        priority: int = 0,
        expiration: Optional[Seconds] = None,
        delay: Optional[Seconds] = None,
    ) -> Durability:
        """Publishes one message and awaits its confirm; see :meth:`wharf.Connection.publish`
        (``delay``, ``expiration``, and :class:`~wharf.Duplicate` for a deduplicated
        ``message_id``)."""
        return cast(
            Durability,
            await _call(
                lambda done: self._core.publish(
                    routing_key,
                    body,
                    exchange=exchange,
                    headers=headers,
                    persistent=persistent,
                    message_id=message_id,
                    correlation_id=correlation_id,
                    reply_to=reply_to,
                    content_type=content_type,
                    content_encoding=content_encoding,
                    priority=priority,
                    expiration=expiration,
                    delay=delay,
                    done=done,
                )
            ),
        )

    async def publish_many(
        self,
        messages: Iterable[Body | OutgoingMessage],
        *,
        routing_key: str = "",
        exchange: str = "",
    ) -> list[Optional[WharfError]]:
        """Publishes many messages and awaits every confirm; one entry per message, ``None``
        if stored, else the error. See :meth:`wharf.Connection.publish_many`."""
        items = list(messages)
        return cast(
            "list[Optional[WharfError]]",
            await _call(
                lambda done: self._core.publish_many(
                    items, routing_key=routing_key, exchange=exchange, done=done
                )
            ),
        )

    def publisher(self, window: Optional[int] = None) -> Publisher:
        """A pipelining :class:`Publisher` with at most ``window`` unconfirmed publishes."""
        return Publisher(self._core.publisher(window))

    def consume(
        self,
        queue: str,
        *,
        prefetch: int = 100,
        auto_ack: bool = False,
        exclusive: bool = False,
        priority: int = 0,
        timeout: Optional[float] = None,
        ack_timeout: Optional[Seconds] = None,
    ) -> Consumer:
        """A :class:`Consumer` of ``queue`` (arguments as in :meth:`wharf.Connection.consume`,
        ``ack_timeout`` included: a held message's lease is extended in the background).

        It subscribes when first used: ``async with``, ``async for``, ``await``, ``get()`` or
        ``batches()``; subscription errors (e.g. :class:`NotFound`) are raised there.
        """
        return Consumer(
            self._core, queue, prefetch, auto_ack, exclusive, priority, timeout, ack_timeout
        )


class Consumer:
    """An asyncio subscription to a queue, from :meth:`Connection.consume`.

    ``async for message in consumer`` yields messages; with a ``timeout`` iteration ends
    quietly (cancelling the consumer) after that many idle seconds. ``async with`` cancels it
    on exit. Messages are fetched from the native core in chunks, so per-message overhead is a
    deque pop (one at a time with an ``ack_timeout``, so that only the messages handed to the
    application have their leases extended).
    """

    _CHUNK = 256

    def __init__(
        self,
        core: _wharf.Core,
        queue: str,
        prefetch: int,
        auto_ack: bool,
        exclusive: bool,
        priority: int,
        timeout: Optional[float],
        ack_timeout: Optional[Seconds] = None,
    ) -> None:
        """Prepares a subscription (use :meth:`Connection.consume` instead)."""
        self._core = core
        self._queue = queue
        self._prefetch = prefetch
        self._auto_ack = auto_ack
        self._exclusive = exclusive
        self._priority = priority
        self._timeout = timeout
        self._ack_timeout = ack_timeout
        self._native: Optional[_wharf.Consumer] = None
        self._subscribing: Optional[asyncio.Future[Any]] = None
        self._buffer: collections.deque[Message] = collections.deque()
        self._ended = False

    @property
    def queue(self) -> str:
        """The queue consumed from."""
        return self._queue

    @property
    def timeout(self) -> Optional[float]:
        """Idle seconds after which iteration ends (``None``: never)."""
        return self._timeout

    @property
    def ack_timeout(self) -> Optional[float]:
        """The lease of each delivery in seconds (``None``: no lease)."""
        if isinstance(self._ack_timeout, timedelta):
            return self._ack_timeout.total_seconds()
        return None if self._ack_timeout is None else float(self._ack_timeout)

    @property
    def consumer_tag(self) -> Optional[int]:
        """The consumer's tag once subscribed."""
        return None if self._native is None else self._native.consumer_tag

    async def _subscribed(self) -> _wharf.Consumer:
        if self._native is not None:
            return self._native
        if self._subscribing is None:
            self._subscribing = asyncio.ensure_future(
                _call(
                    lambda done: self._core.consume(
                        self._queue,
                        prefetch=self._prefetch,
                        auto_ack=self._auto_ack,
                        exclusive=self._exclusive,
                        priority=self._priority,
                        timeout=self._timeout,
                        ack_timeout=self._ack_timeout,
                        done=done,
                    )
                )
            )
        native = cast(_wharf.Consumer, await asyncio.shield(self._subscribing))
        self._native = native
        return native

    def __await__(self) -> Generator[Any, None, Consumer]:
        return self._subscribe_and_return().__await__()

    async def _subscribe_and_return(self) -> Consumer:
        await self._subscribed()
        return self

    async def __aenter__(self) -> Consumer:
        await self._subscribed()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.cancel()

    async def _fetch(self, max_messages: int, max_wait: float, timeout: Optional[float]) -> bool:
        """Fills the buffer; False if nothing came (idle timeout, or the consumer ended)."""
        if self._ended:
            return False
        native = await self._subscribed()
        messages, ended = await _call(
            lambda done: native._next_batch_async(done, max_messages, max_wait, timeout)
        )
        self._buffer.extend(messages)
        if ended:
            self._ended = True
        return bool(messages)

    def __aiter__(self) -> Consumer:
        return self

    def _chunk(self) -> int:
        # With a lease, take one message at a time: a message taken from the native consumer
        # is held (its lease extended) until settled, so one waiting in this buffer would be
        # kept from other consumers however long the application works on the one before.
        return 1 if self._ack_timeout is not None else min(self._prefetch, self._CHUNK)

    async def __anext__(self) -> Message:
        if not self._buffer:
            if not await self._fetch(self._chunk(), 0.0, self._timeout):
                await self.cancel()
                raise StopAsyncIteration
        return self._buffer.popleft()

    async def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, waiting at most ``timeout`` seconds (``None``: as long as it
        takes); ``None`` if none arrived in time or the consumer ended."""
        if not self._buffer and not await self._fetch(1, 0.0, timeout):
            return None
        return self._buffer.popleft()

    async def batches(
        self, max_messages: int = 100, max_wait: float = 0.05
    ) -> AsyncIterator[list[Message]]:
        """Non-empty lists of up to ``max_messages`` messages, each waiting at most
        ``max_wait`` seconds after its first message to fill up; ends like iteration does."""
        while True:
            if not self._buffer and not await self._fetch(max_messages, max_wait, self._timeout):
                await self.cancel()
                return
            n_taken = min(max_messages, len(self._buffer))
            yield [self._buffer.popleft() for _ in range(n_taken)]

    async def cancel(self) -> None:
        """Cancels the subscription; messages received and not yet taken are requeued.
        Cancelling twice is a no-op."""
        self._ended = True
        while self._buffer:
            message = self._buffer.popleft()
            if not message.settled:
                try:
                    message.nack(requeue=True)
                except WharfError:
                    pass
        if self._native is None and self._subscribing is not None:
            try:
                await self._subscribed()
            except WharfError:
                return
        native = self._native
        if native is not None:
            await _call(native._cancel_async)


class Publisher:
    """An asyncio pipelining publisher, from :meth:`Connection.publisher`: ``await
    publish(...)`` returns the sequence number as soon as the message is queued (waiting only
    while the window is full); ``await wait_confirms()`` reports refusals."""

    __slots__ = ("_native",)

    def __init__(self, native: _wharf.Publisher) -> None:
        """Wraps a native publisher (use :meth:`Connection.publisher` instead)."""
        self._native = native

    @property
    def window(self) -> int:
        """Most unconfirmed publishes."""
        return self._native.window

    @property
    def n_pending(self) -> int:
        """Publishes not yet known to be confirmed."""
        return self._native.n_pending

    async def publish(
        self,
        routing_key: str,
        body: Body,
        *,
        exchange: str = "",
        headers: Optional[Headers] = None,
        persistent: bool = False,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        reply_to: Optional[str] = None,
        content_type: Optional[str] = None,
        content_encoding: Optional[str] = None,
        priority: int = 0,
        expiration: Optional[Seconds] = None,
        delay: Optional[Seconds] = None,
    ) -> int:
        """Queues one publish; returns its sequence number."""
        future, done = _bridge()
        seq = self._native.publish(
            routing_key,
            body,
            exchange=exchange,
            headers=headers,
            persistent=persistent,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            content_type=content_type,
            content_encoding=content_encoding,
            priority=priority,
            expiration=expiration,
            delay=delay,
            done=done,
        )
        if seq is not None:
            return seq
        return cast(int, await future)

    async def wait_confirms(
        self, timeout: Optional[float] = None
    ) -> list[tuple[int, WharfError]]:
        """Awaits every confirm so far (at most ``timeout`` seconds, then :class:`Timeout`);
        returns the refused publishes as ``(seq, error)`` pairs."""
        return cast(
            "list[tuple[int, WharfError]]",
            await _call(lambda done: self._native.wait_confirms(timeout, done=done)),
        )

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        failures = await self.wait_confirms()
        if exc_type is None and failures:
            raise failures[0][1]
