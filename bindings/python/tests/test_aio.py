"""The asyncio API against a real server."""

from __future__ import annotations

import asyncio

import pytest
from conftest import unique

import wharf
import wharf.aio


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_async_round_trip_with_async_with_and_async_for(url: str) -> None:
    async def main() -> list[tuple[bytes, dict[str, wharf.HeaderValue], bool]]:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("aio"), durable=True)).name
            durability = await conn.publish(queue, b"Order 12345", headers={"kind": "order"}, persistent=True)
            assert durability in ("in_memory", "fsynced", "unsafe_not_synced")
            await conn.publish(queue, b"second")
            seen = []
            async for message in conn.consume(queue, prefetch=100, timeout=0.5):
                with message.process():
                    seen.append((message.body, message.headers, message.redelivered))
            stats = await conn.queue_stats(queue)
            assert (stats.ready, stats.unacked, stats.consumers) == (0, 0, 0)
            assert await conn.delete_queue(queue) == 0
            return seen

    assert run(main()) == [(b"Order 12345", {"kind": "order"}, False), (b"second", {}, False)]


def test_await_connect_topology_and_exchanges(url: str) -> None:
    async def main() -> None:
        conn = await wharf.aio.connect(url)
        try:
            exchange = unique("topic")
            await conn.declare_exchange(exchange, "topic")
            eu = (await conn.declare_queue(unique("eu"))).name
            await conn.bind(eu, exchange, "order.eu.#")
            await conn.publish("order.eu.paid", b"1", exchange=exchange)
            await conn.publish("order.us.paid", b"2", exchange=exchange)
            assert (await conn.queue_stats(eu)).ready == 1
            await conn.unbind(eu, exchange, "order.eu.#")
            await conn.publish("order.eu.paid", b"3", exchange=exchange)
            assert (await conn.queue_stats(eu)).ready == 1
            fanout = unique("fan")
            await conn.declare_exchange(fanout, "fanout")
            await conn.bind_exchange(fanout, exchange, "#")
            await conn.unbind_exchange(fanout, exchange, "#")
            await conn.delete_exchange(fanout)
            assert await conn.purge_queue(eu) == 1
            assert any(info.name == eu for info in await conn.list_queues())
        finally:
            await conn.close()
        assert conn.closed

    run(main())


def test_async_publish_many_publisher_and_batches(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("many"))).name
            results = await conn.publish_many([str(idx).encode() for idx in range(500)], routing_key=queue)
            assert results == [None] * 500
            async with conn.publisher(window=16) as publisher:
                seqs = [await publisher.publish(queue, f"p{idx}".encode()) for idx in range(500)]
            assert seqs == list(range(500))
            assert publisher.n_pending == 0
            missing = await conn.publish_many([b"x"], exchange=unique("missing"))
            assert isinstance(missing[0], wharf.WharfError) and missing[0].code == wharf.ErrorCode.NOT_FOUND
            received = 0
            async with conn.consume(queue, prefetch=1000, timeout=0.5) as consumer:
                async for batch in consumer.batches(max_messages=128, max_wait=0.05):
                    assert 1 <= len(batch) <= 128
                    for message in batch:
                        message.ack()
                    received += len(batch)
            assert received == 1000

    run(main())


def test_async_publisher_reports_refusals(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("refusals"))).name
            publisher = conn.publisher(window=4)
            await publisher.publish(queue, b"ok")
            await publisher.publish("k", b"refused", exchange=unique("missing"))
            failures = await publisher.wait_confirms(timeout=10.0)
            assert [seq for seq, _ in failures] == [1]
            assert failures[0][1].code == wharf.ErrorCode.NOT_FOUND

    run(main())


def test_async_errors_have_their_classes(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            with pytest.raises(wharf.NotFound) as raised:
                await conn.declare_queue(unique("missing"), passive=True)
            assert raised.value.code == wharf.ErrorCode.NOT_FOUND
            with pytest.raises(wharf.NotFound):
                async for _ in conn.consume(unique("missing")):
                    pass
            with pytest.raises(wharf.NotFound):
                await conn.consume(unique("missing"))
        with pytest.raises(wharf.ConnectionClosed):
            await conn.declare_queue("late")
        with pytest.raises(wharf.InvalidArgument):
            await wharf.aio.connect("http://nope")

    run(main())


def test_cancelled_get_loses_no_message_and_empty_get_returns_none(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("cancel"))).name
            async with conn.consume(queue, prefetch=10) as consumer:
                assert await consumer.get(timeout=0.05) is None
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(consumer.get(), timeout=0.1)
                await conn.publish(queue, b"kept")
                message = await consumer.get(timeout=5.0)
                assert message is not None and message.body == b"kept"
                message.ack()
            assert (await conn.queue_stats(queue)).ready == 0

    run(main())


def test_concurrent_tasks_share_one_connection(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("gather"))).name
            await asyncio.gather(*(conn.publish(queue, f"{idx}".encode()) for idx in range(200)))
            consumer = await conn.consume(queue, auto_ack=True, timeout=0.5)
            bodies = {message.body async for message in consumer}
            assert bodies == {f"{idx}".encode() for idx in range(200)}

    run(main())


def test_redelivery_after_nack_in_asyncio(url: str) -> None:
    async def main() -> None:
        async with wharf.aio.connect(url) as conn:
            queue = (await conn.declare_queue(unique("nack"))).name
            await conn.publish(queue, b"retry")
            async with conn.consume(queue, prefetch=1) as consumer:
                first = await consumer.get(timeout=5.0)
                assert first is not None
                with pytest.raises(KeyError):
                    with first.process(requeue=True):
                        raise KeyError("failed")
                second = await consumer.get(timeout=5.0)
                assert second is not None and second.redelivered
                second.reject()

    run(main())
