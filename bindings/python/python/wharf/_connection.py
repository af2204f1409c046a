"""The blocking API: :func:`connect` and :class:`Connection`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Optional, Union, cast

from wharf import _wharf
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
from wharf._wharf import Consumer, OutgoingMessage, Publisher
from wharf.errors import WharfError

__all__ = ["connect", "Connection", "DEFAULT_URL"]

#: Where :func:`connect` connects by default.
DEFAULT_URL = "wharf://127.0.0.1:5800"


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
) -> Connection:
    """Connects to a Wharf broker and returns a :class:`Connection`.

    ``url`` is ``wharf://[user:password@]host[:port][/vhost]`` (or ``host[:port]``; port 5800
    by default). The path names the virtual host, percent-decoded as in RabbitMQ's URIs (none
    or ``/``: the default virtual host ``/``; ``/%2Fstaging``: ``/staging``); ``vhost``
    overrides it. A virtual host that does not exist, or where the user has no permissions,
    raises :class:`AccessRefused`. ``heartbeat`` (seconds) asks for a heartbeat interval (``None``: the broker's);
    heartbeats are sent by a background thread, so a slow handler never loses the connection.
    ``request_timeout`` bounds every request and confirm wait.

    TLS: ``wharfs://host[:port]`` (port 5801 by default) connects over TLS, verifying the
    broker's certificate against ``ca`` (a PEM file; default: the system's trusted roots)
    and the URL's host (or ``server_name``). ``cert`` and ``key`` (PEM files) present a
    client certificate; with ``external=True`` the login is the certificate's subject (SASL
    EXTERNAL) instead of a password. Raises :class:`ConnectError` (an untrusted or expired
    certificate among others), :class:`AccessRefused` or :class:`Timeout`.
    """
    core = _wharf.Core.connect(
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
    )
    return Connection(cast(_wharf.Core, core))


class Connection:
    """A connection to a Wharf broker, from :func:`connect`.

    Safe to share between threads: every method may be called from any thread at any time,
    and every blocking call releases the GIL. Use it as a context manager to close it.
    """

    __slots__ = ("_core", "__weakref__")

    def __init__(self, core: _wharf.Core) -> None:
        """Wraps a connected native core (use :func:`connect` instead)."""
        self._core = core

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<wharf.Connection server_version={self.server_version!r} closed={self.closed}>"

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
        """Limits the broker announced: ``frame_bytes_max``, ``publishes_in_flight_max``,
        ``batch_messages_max``, ``heartbeat_ms``."""
        return self._core.server_limits

    def close(self) -> None:
        """Closes the connection, waiting for the broker's answer. Closing twice is a no-op;
        unsettled deliveries are requeued by the broker."""
        self._core.close()

    # -- topology -------------------------------------------------------------------------

    def declare_queue(
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
        """Declares a queue (creating it unless it exists) and returns its name and counts.

        An empty ``name`` asks the broker for a unique one. ``exclusive`` queues belong to this
        connection and vanish with it; ``passive`` only checks the queue exists
        (:class:`NotFound` otherwise).

        Queue features (docs/user-guide.md), each sent as its queue argument; ``None`` leaves
        it out. Durations (:data:`Seconds`) are seconds or a ``timedelta``:

        * ``max_priority`` (1..255, ``x-max-priority``): deliver higher message priorities
          first;
        * ``max_length`` / ``max_length_bytes`` (``x-max-length`` / ``x-max-length-bytes``):
          most ready messages / body bytes; ``overflow`` (``"drop-head"``, the default,
          ``"reject-publish"``: publishes then raise :class:`Backpressure`, or
          ``"reject-publish-dlx"``: the same, and the refused message is dead-lettered);
        * ``dead_letter_exchange`` / ``dead_letter_routing_key``: where rejected, expired,
          dropped and exhausted messages go (``""`` is the default exchange, which routes by
          queue name), with an ``x-death`` header;
        * ``delivery_limit`` (``x-delivery-limit``): dead-letter a message instead of
          requeueing it after this many deliveries;
        * ``message_ttl`` (``x-message-ttl``): how long a message may stay ready;
        * ``expires`` (``x-expires``): delete the queue once unused this long;
        * ``retry`` (``x-retry``, 1 to 64 delays): a nacked-with-requeue message comes back
          after the next delay of the schedule, and is dead-lettered after the last;
        * ``dedup_window`` (``x-dedup-window``): drop a message whose ``message_id`` the queue
          took this recently (the publish raises :class:`Duplicate`);
        * ``single_active_consumer``: deliver to one consumer at a time;
        * ``sync`` (``x-sync``, durable queues): this queue's fsync policy, overriding the
          broker's: ``"always"`` (confirm after the fsync), ``"interval=MS"`` (fsync within MS
          after the confirm) or ``"never"`` (unsafe); a persistent message is fsynced as the
          strictest of its queues asks, and its confirm's :class:`Durability` says what
          happened.

        Other arguments go in ``arguments`` (typed values, e.g. ``{"x-max-length": 1000}``); a
        feature given both ways raises :class:`InvalidArgument`, as does a value the broker
        refuses (nothing is declared then). A redeclare must repeat the arguments exactly
        (:class:`PreconditionFailed` otherwise).
        """
        name, ready, consumers = self._core.declare_queue(
            name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            passive=passive,
            arguments=_arguments(arguments),
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
        )
        return QueueDeclared(name, ready, consumers)

    def delete_queue(self, name: str, *, if_unused: bool = False, if_empty: bool = False) -> int:
        """Deletes a queue and its messages; returns how many messages were dropped.
        ``if_unused`` / ``if_empty`` make it fail with :class:`PreconditionFailed` instead."""
        return cast(int, self._core.delete_queue(name, if_unused=if_unused, if_empty=if_empty))

    def purge_queue(self, name: str) -> int:
        """Drops a queue's ready messages (unacked ones stay); returns how many."""
        return cast(int, self._core.purge_queue(name))

    def queue_stats(self, name: str) -> QueueStats:
        """A queue's counters (``ready``, ``unacked``, ``consumers``, ``delayed``,
        ``expired``, ``duplicates``, ...) and flags."""
        return QueueStats._from_dict(self._core.queue_stats(name))

    def list_queues(self) -> list[QueueStats]:
        """Every queue visible to this connection."""
        return [QueueStats._from_dict(stats) for stats in self._core.list_queues()]

    # Administration (administrators only; protocol 1.2): users and permissions.

    def add_user(self, name: str, password: str, *, tags: Sequence[str] = ()) -> None:
        """Adds a user with ``tags`` (``administrator``, ``monitoring``, ``management``,
        ``policymaker``), without permissions: give it some with :meth:`set_permissions`.
        Needs the ``administrator`` tag (:class:`AccessRefused` otherwise); raises
        :class:`PreconditionFailed` if the user exists."""
        self._core.add_user(name, password, tags=list(tags))

    def delete_user(self, name: str) -> None:
        """Deletes a user and its permissions (:class:`NotFound` if there is none)."""
        self._core.delete_user(name)

    def change_password(self, name: str, password: str) -> None:
        """Sets a user's password."""
        self._core.change_password(name, password)

    def set_user_tags(self, name: str, tags: Sequence[str]) -> None:
        """Sets a user's tags, replacing them."""
        self._core.set_user_tags(name, list(tags))

    def list_users(self) -> list[UserInfo]:
        """Every user and its tags."""
        return cast("list[UserInfo]", self._core.list_users())

    def set_permissions(self, user: str, configure: str, write: str, read: str, *, vhost: str = "/") -> None:
        """Sets a user's permissions in ``vhost``: RabbitMQ's regular expressions over resource
        names (``".*"`` everything, ``""`` nothing). :class:`InvalidArgument` for a pattern that
        does not compile."""
        self._core.set_permissions(user, configure, write, read, vhost=vhost)

    def clear_permissions(self, user: str, *, vhost: str = "/") -> None:
        """Removes a user's permissions (and topic permissions) in ``vhost``."""
        self._core.clear_permissions(user, vhost=vhost)

    def list_permissions(self, *, vhost: str = "/") -> list[PermissionInfo]:
        """The permissions in ``vhost``."""
        return cast("list[PermissionInfo]", self._core.list_permissions(vhost=vhost))

    def set_topic_permissions(self, user: str, exchange: str, write: str, read: str, *, vhost: str = "/") -> None:
        """Sets a user's topic permissions on the topic exchange ``exchange``: regular
        expressions over the routing keys it may publish with (``write``) and bind with
        (``read``); ``{username}`` and ``{vhost}`` expand."""
        self._core.set_topic_permissions(user, exchange, write, read, vhost=vhost)

    def clear_topic_permissions(self, user: str, *, exchange: Optional[str] = None, vhost: str = "/") -> None:
        """Removes a user's topic permissions on ``exchange`` (``None``: on every exchange)."""
        self._core.clear_topic_permissions(user, exchange=exchange, vhost=vhost)

    def list_topic_permissions(self, *, vhost: str = "/") -> list[TopicPermissionInfo]:
        """The topic permissions in ``vhost``."""
        return cast("list[TopicPermissionInfo]", self._core.list_topic_permissions(vhost=vhost))

    # Virtual hosts (administrators only; protocol 1.3).

    def add_vhost(self, name: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None) -> None:
        """Adds a virtual host with its own limits (``None``: no limit of its own). Users need
        permissions in it (:meth:`set_permissions` with ``vhost=name``) to connect to it.
        Raises :class:`PreconditionFailed` if it exists."""
        self._core.add_vhost(name, max_connections=max_connections, max_queues=max_queues)

    def delete_vhost(self, name: str) -> None:
        """Deletes a virtual host with its queues, exchanges and permissions (:class:`NotFound`
        if there is none)."""
        self._core.delete_vhost(name)

    def list_vhosts(self) -> list[VhostInfo]:
        """Every virtual host, its limits and its current connections and queues."""
        return cast("list[VhostInfo]", self._core.list_vhosts())

    def set_vhost_limits(
        self, name: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None
    ) -> None:
        """Sets a virtual host's limits, replacing them (``None``: no limit). A connection
        beyond ``max_connections`` is refused at connect and a queue beyond ``max_queues`` is
        refused at declare, both with :class:`ResourceLimit`."""
        self._core.set_vhost_limits(name, max_connections=max_connections, max_queues=max_queues)

    # Users' own limits (administrators only; protocol 1.3).

    def set_user_limits(
        self, user: str, max_connections: Optional[int] = None, max_queues: Optional[int] = None
    ) -> None:
        """Sets a user's own limits, replacing both (``None``: no limit of its own; the broker's
        ``connections_per_user_max`` still applies). A connection of the user beyond
        ``max_connections`` is refused at connect, and a new queue beyond the ``max_queues``
        it has declared (that still exist) is refused at declare, both with
        :class:`ResourceLimit`. Raises :class:`NotFound` for an unknown user."""
        self._core.set_user_limits(user, max_connections=max_connections, max_queues=max_queues)

    def list_user_limits(self) -> list[UserLimitsInfo]:
        """Every user and its own limits, sorted by user name."""
        return cast("list[UserLimitsInfo]", self._core.list_user_limits())

    def redrive(self, queue: str, *, max_messages: Optional[int] = None) -> int:
        """Moves dead-lettered messages of the dead-letter queue ``queue`` back to the queue
        each last died in (with its original exchange and routing key, without its death
        records); returns how many moved. ``max_messages`` (>= 1) bounds how many; ``None``
        moves all. Messages without a death record, or whose queue is gone or full, stay.
        Raises :class:`NotFound` if ``queue`` does not exist."""
        return cast(int, self._core.redrive(queue, max_messages=max_messages))

    def declare_exchange(
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
        """Declares an exchange of ``kind`` (``direct``, ``fanout``, ``topic``, ``headers``).
        Redeclaring with other settings raises :class:`PreconditionFailed`."""
        self._core.declare_exchange(
            name,
            kind,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            passive=passive,
            arguments=_arguments(arguments),
        )

    def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        """Deletes an exchange (``if_unused``: only if it has no bindings)."""
        self._core.delete_exchange(name, if_unused=if_unused)

    def bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Binds ``queue`` to ``exchange``: messages routed by ``routing_key`` (a pattern for
        topic exchanges) reach the queue. For headers exchanges, ``arguments`` holds the
        headers to match and ``"x-match": "all" | "any"``."""
        self._core.bind(queue, exchange, routing_key, arguments=_arguments(arguments))

    def unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Removes a binding made with :meth:`bind` (same arguments)."""
        self._core.bind(queue, exchange, routing_key, unbind=True, arguments=_arguments(arguments))

    def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Binds exchange ``destination`` to exchange ``source`` (exchange-to-exchange)."""
        self._core.bind(
            destination, source, routing_key, to_exchange=True, arguments=_arguments(arguments)
        )

    def unbind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        *,
        arguments: Optional[Headers] = None,
    ) -> None:
        """Removes an exchange-to-exchange binding."""
        self._core.bind(
            destination,
            source,
            routing_key,
            to_exchange=True,
            unbind=True,
            arguments=_arguments(arguments),
        )

    # -- publishing -----------------------------------------------------------------------

    def publish(
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
        """Publishes one message and waits for the broker's confirm.

        ``exchange=""`` (the default exchange) routes to the queue named ``routing_key``.
        Returns what the confirm promises (``"in_memory"``, ``"fsynced"``, ...); raises
        :class:`PublishRefused`, :class:`NotFound` (no such exchange), :class:`Backpressure`
        (queue full), :class:`Duplicate` or :class:`Timeout`.

        ``expiration`` is the message's time to live (seconds or ``timedelta``) once in a
        queue; ``delay`` makes each queue hold the message that long before a consumer can
        get it (confirmed at once; counted in ``QueueStats.delayed`` meanwhile).
        ``message_id`` is the deduplication key: if every queue the message reached already
        took that id within its ``dedup_window``, it is not stored again and
        :class:`Duplicate` is raised; a producer retrying after a lost confirm can treat that
        as success. For throughput use :meth:`publisher` or :meth:`publish_many`.
        """
        return cast(
            Durability,
            self._core.publish(
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
            ),
        )

    def publish_many(
        self,
        messages: Iterable[Body | OutgoingMessage],
        *,
        routing_key: str = "",
        exchange: str = "",
    ) -> list[Optional[WharfError]]:
        """Publishes many messages in batches and waits for every confirm.

        Each item is a body (routed with ``routing_key``) or an :class:`OutgoingMessage`
        (its own routing key and properties, ``delay`` included). Returns one entry per
        message, in order: ``None`` if the broker stored it, else the error that
        :meth:`publish` would have raised for it (:class:`Backpressure`, :class:`Duplicate`,
        ...). Nothing is raised for a refused message; an error is raised only if nothing
        could be sent.
        """
        return cast(
            "list[Optional[WharfError]]",
            self._core.publish_many(messages, routing_key=routing_key, exchange=exchange),
        )

    def publisher(self, window: Optional[int] = None) -> Publisher:
        """A pipelining :class:`Publisher`: ``publish`` returns as soon as the message is
        queued, with at most ``window`` unconfirmed (``None``: the broker's limit);
        ``wait_confirms()`` reports refusals."""
        return self._core.publisher(window)

    # -- consuming ------------------------------------------------------------------------

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
        """Subscribes to ``queue`` and returns a :class:`Consumer` to iterate.

        At most ``prefetch`` deliveries are unsettled at once (``auto_ack``: the broker
        settles on sending; no ack possible). With ``timeout`` (seconds), iteration ends
        quietly, cancelling the consumer, once no message arrived for that long; without,
        it waits forever (Ctrl-C interrupts it). ``exclusive`` refuses other consumers;
        higher ``priority`` consumers are served first.

        ``ack_timeout`` (seconds or ``timedelta``, at least 1 ms; manual acks only) puts each
        delivery on a lease: one not settled in time goes back to the queue and to another
        consumer, and no connection is closed. While the application holds a message (took
        it, has neither settled it nor dropped every reference to it), the client extends
        its lease in the background, GIL or not, so a long ``with message.process():`` block
        keeps its message; the lease guards against a consumer that is stuck or gone. Keep
        ``prefetch`` small for long work: messages still buffered in the consumer are not
        extended.
        """
        return cast(
            Consumer,
            self._core.consume(
                queue,
                prefetch=prefetch,
                auto_ack=auto_ack,
                exclusive=exclusive,
                priority=priority,
                timeout=timeout,
                ack_timeout=ack_timeout,
            ),
        )
