"""Queue features through the asyncio API (``wharf.aio``) against a real server: the same
features as test_queue_features.py, with ``await``; time checked as lower bounds only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import unique

import wharf
import wharf.aio

CLOCK_SLACK_S = 0.005


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Polls `condition` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def take(consumer: wharf.aio.Consumer, timeout: float = 5.0) -> wharf.Message:
    message = await consumer.get(timeout=timeout)
    assert message is not None, f"no message on {consumer.queue} within {timeout}s"
    return message


async def dead_letter_pair(conn: wharf.aio.Connection, prefix: str, **features: Any) -> tuple[str, str]:
    dlq = (await conn.declare_queue(unique(f"{prefix}-dlq"))).name
    queue = (
        await conn.declare_queue(unique(prefix), dead_letter_exchange="", dead_letter_routing_key=dlq, **features)
    ).name
    return queue, dlq


def reason(message: wharf.Message) -> Any:
    records = message.headers["x-death"]
    assert isinstance(records, list) and isinstance(records[0], dict)
    return records[0]["reason"]


def test_async_priorities(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("aio-prio"), max_priority=10)).name
            for body, priority in [("low", 0), ("high", 10), ("mid", 5)]:
                await conn.publish(queue, body, priority=priority)
            async with conn.consume(queue, auto_ack=True, timeout=0.3) as consumer:
                bodies = [message.body async for message in consumer]
            assert bodies == [b"high", b"mid", b"low"]

    run(main())


def test_async_delayed_publish_and_defer(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("aio-delay"))).name
            started = time.monotonic()
            await conn.publish(queue, b"later", delay=timedelta(milliseconds=200))
            assert (await conn.queue_stats(queue)).delayed == 1
            async with conn.consume(queue, prefetch=1) as consumer:
                message = await take(consumer)
                assert time.monotonic() - started >= 0.2 - CLOCK_SLACK_S
                deferred_at = time.monotonic()
                message.defer(0.15)
                again = await take(consumer)
                assert time.monotonic() - deferred_at >= 0.15 - CLOCK_SLACK_S
                assert again.redelivered and again.delivery_count == 2
                again.ack()
            publisher = conn.publisher(window=4)
            await publisher.publish(queue, b"pipelined", delay=0.1)
            assert await publisher.wait_confirms(timeout=10.0) == []
            await eventually(lambda: _ready(conn, queue, 1), "the pipelined delayed message")

    run(main())


async def _ready(conn: wharf.aio.Connection, queue: str, n_ready: int) -> bool:
    return (await conn.queue_stats(queue)).ready == n_ready


def test_async_ttl_dead_letters_with_reason_expired(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue, dlq = await dead_letter_pair(conn, "aio-ttl", message_ttl=timedelta(milliseconds=100))
            await conn.publish(queue, b"stale")
            await conn.publish(queue, b"staler", expiration=0.02)
            async with conn.consume(dlq) as consumer:
                dead = [await take(consumer), await take(consumer)]
                for message in dead:
                    message.ack()
            assert sorted(message.body for message in dead) == [b"stale", b"staler"]
            assert {reason(message) for message in dead} == {"expired"}
            assert (await conn.queue_stats(queue)).expired == 2

    run(main())


def test_async_retry_schedule_then_dead_letter_and_redrive(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue, dlq = await dead_letter_pair(conn, "aio-retry", retry=[0.05, 0.1])
            await conn.publish(queue, b"flaky")
            attempts = []
            async with conn.consume(queue, prefetch=1) as consumer:
                for _ in range(3):
                    message = await take(consumer)
                    attempts.append(time.monotonic())
                    with pytest.raises(ConnectionError):
                        with message.process(requeue=True):
                            raise ConnectionError("downstream unavailable")
            assert attempts[1] - attempts[0] >= 0.05 - CLOCK_SLACK_S
            assert attempts[2] - attempts[1] >= 0.1 - CLOCK_SLACK_S
            await eventually(lambda: _ready(conn, dlq, 1), "the dead letter")
            assert await conn.redrive(dlq) == 1
            async with conn.consume(queue) as consumer:
                back = await take(consumer)
                assert back.body == b"flaky" and "x-death" not in back.headers
                back.ack()
            with pytest.raises(wharf.NotFound):
                await conn.redrive(unique("missing"))
            with pytest.raises(wharf.InvalidArgument):
                await conn.redrive(dlq, max_messages=0)

    run(main())


def test_async_dedup_raises_duplicate(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("aio-dedup"), dedup_window=60)).name
            await conn.publish(queue, b"once", message_id="id-1")
            with pytest.raises(wharf.Duplicate):
                await conn.publish(queue, b"twice", message_id="id-1")
            results = await conn.publish_many(
                [wharf.OutgoingMessage(b"thrice", message_id="id-1"), wharf.OutgoingMessage(b"new", message_id="id-2")],
                routing_key=queue,
            )
            assert isinstance(results[0], wharf.Duplicate) and results[1] is None
            stats = await conn.queue_stats(queue)
            assert (stats.ready, stats.duplicates) == (2, 2)

    run(main())


def test_async_lapsed_lease_goes_to_another_consumer(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as holder, wharf.aio.connect(url) as other:
            queue = (await holder.declare_queue(unique("aio-lease"))).name
            holding = await holder.consume(queue, prefetch=1, ack_timeout=0.2)  # never takes it
            assert holding.ack_timeout == pytest.approx(0.2)
            published_at = time.monotonic()
            await holder.publish(queue, b"task")
            async with other.consume(queue, prefetch=1) as taking:
                redelivered = await take(taking)
                assert time.monotonic() - published_at >= 0.2 - CLOCK_SLACK_S
                assert redelivered.redelivered
                late = await take(holding)
                late.ack()  # accepted and ignored
                redelivered.ack()
            assert not holder.closed
            await eventually(lambda: _acked(holder, queue, 1), "the ack of the redelivery")
            await holding.cancel()

    run(main())


async def _unacked(conn: wharf.aio.Connection, queue: str, n_unacked: int) -> bool:
    return (await conn.queue_stats(queue)).unacked == n_unacked


async def _acked(conn: wharf.aio.Connection, queue: str, n_acked: int) -> bool:
    return (await conn.queue_stats(queue)).acked == n_acked


def test_async_lease_is_extended_while_the_handler_awaits(url: str) -> None:
    ack_timeout = 0.4

    async def main() -> None:
        async with wharf.aio.connect(url) as worker, wharf.aio.connect(url) as other:
            queue = (await worker.declare_queue(unique("aio-lease-process"))).name
            await worker.publish_many([b"long job", b"next job"], routing_key=queue)
            async with worker.consume(queue, prefetch=2, ack_timeout=timedelta(seconds=ack_timeout)) as consumer:
                async with other.consume(queue, prefetch=1) as competitor:
                    await eventually(lambda: _unacked(worker, queue, 2), "both jobs sent to the worker")
                    async for message in consumer:  # takes one message at a time
                        with message.process():
                            message.in_progress()
                            # The next job is prefetched but not taken: its lease lapses and
                            # the competitor gets it, while the held one is extended throughout.
                            stolen = await take(competitor)
                            assert stolen.body == b"next job" and stolen.redelivered
                            stolen.ack()
                            assert await competitor.get(timeout=2.5 * ack_timeout) is None
                        assert message.body == b"long job" and message.settled
                        break
            stats = await worker.queue_stats(queue)
            assert (stats.acked, stats.redelivered) == (2, 1)

    run(main())


def test_async_queue_expiry(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            name = unique("aio-expires")
            await conn.declare_queue(name, expires=0.1)

            async def gone() -> bool:
                return all(info.name != name for info in await conn.list_queues())

            await eventually(gone, "the queue to expire")
            with pytest.raises(wharf.NotFound):
                await conn.declare_queue(name, passive=True)

    run(main())


def test_async_bad_arguments_raise_invalid_argument(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            with pytest.raises(wharf.InvalidArgument):
                await conn.declare_queue(unique("bad"), max_priority=0)
            with pytest.raises(wharf.InvalidArgument):
                await conn.declare_queue(unique("bad"), retry=[])
            with pytest.raises(wharf.InvalidArgument):
                await conn.declare_queue(unique("bad"), overflow="drop-tail")  # type: ignore[arg-type]
            with pytest.raises(wharf.InvalidArgument):
                await conn.publish("any", b"x", delay=-1)
            queue = (await conn.declare_queue(unique("aio-bad"), max_length=1, overflow="reject-publish")).name
            await conn.publish(queue, b"1")
            with pytest.raises(wharf.Backpressure):
                await conn.publish(queue, b"2")
            with pytest.raises(wharf.InvalidArgument):
                await conn.consume(queue, auto_ack=True, ack_timeout=1)
            assert not conn.closed

    run(main())
