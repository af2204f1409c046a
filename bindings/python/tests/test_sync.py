"""The blocking API against a real server: messaging, topology, settling, consuming."""

from __future__ import annotations

import time

import pytest
from conftest import unique, wait_for

import wharf


def test_publish_and_consume_round_trip_keeps_body_headers_and_properties(
    conn: wharf.Connection, queue: str
) -> None:
    durability = conn.publish(
        queue,
        b"Order 12345",
        headers={"kind": "order", "n": 7, "ratio": 0.5, "ok": True, "raw": b"\x00\x01",
                 "tags": ["a", 1], "nested": {"deep": [True]}},
        persistent=True,
        message_id="m-1",
        correlation_id="c-1",
        reply_to="replies",
        content_type="text/plain",
        content_encoding="identity",
        priority=3,
        expiration=60.0,
    )
    assert durability in ("in_memory", "fsynced", "unsafe_not_synced")
    messages = []
    for message in conn.consume(queue, prefetch=100, timeout=2.0):
        with message.process():
            messages.append(message)
        break
    [message] = messages
    assert message.body == b"Order 12345"
    assert message.headers == {"kind": "order", "n": 7, "ratio": 0.5, "ok": True, "raw": b"\x00\x01",
                               "tags": ["a", 1], "nested": {"deep": [True]}}
    assert not message.redelivered
    assert message.delivery_count == 1
    assert (message.exchange, message.routing_key) == ("", queue)
    assert (message.message_id, message.correlation_id, message.reply_to) == ("m-1", "c-1", "replies")
    assert (message.content_type, message.content_encoding) == ("text/plain", "identity")
    assert (message.priority, message.persistent, message.expiration) == (3, True, 60.0)
    assert message.settled
    wait_for(lambda: conn.queue_stats(queue).unacked == 0, what="the ack to be processed")


def test_str_bytearray_and_memoryview_bodies_are_accepted(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, "héllo")
    conn.publish(queue, bytearray(b"ba"))
    conn.publish(queue, memoryview(b"mv"))
    with conn.consume(queue, auto_ack=True) as consumer:
        bodies = [message.body for message in consumer.next_batch(3, max_wait=2.0, timeout=5.0)]
    assert bodies == ["héllo".encode(), b"ba", b"mv"]


def test_bad_header_value_is_a_type_error_and_sends_nothing(conn: wharf.Connection, queue: str) -> None:
    with pytest.raises(TypeError):
        conn.publish(queue, b"x", headers={"bad": object()})  # type: ignore[dict-item]
    assert conn.queue_stats(queue).ready == 0


def test_direct_fanout_topic_and_headers_exchanges_route_by_their_bindings(conn: wharf.Connection) -> None:
    direct, fanout, topic, headers = (unique(kind) for kind in ("direct", "fanout", "topic", "headers"))
    conn.declare_exchange(direct, "direct")
    conn.declare_exchange(fanout, kind="fanout")
    conn.declare_exchange(topic, kind="topic")
    conn.declare_exchange(headers, kind="headers")
    queues = {name: conn.declare_queue(unique(name)).name for name in ("red", "all1", "all2", "eu", "pdf")}
    conn.bind(queues["red"], direct, "red")
    conn.bind(queues["all1"], fanout)
    conn.bind(queues["all2"], fanout)
    conn.bind(queues["eu"], topic, "order.eu.*")
    conn.bind(queues["pdf"], headers, arguments={"x-match": "all", "format": "pdf", "type": "report"})

    conn.publish("red", b"r", exchange=direct)
    conn.publish("blue", b"b", exchange=direct)
    conn.publish("", b"f", exchange=fanout)
    conn.publish("order.eu.created", b"t1", exchange=topic)
    conn.publish("order.us.created", b"t2", exchange=topic)
    conn.publish("", b"h1", exchange=headers, headers={"format": "pdf", "type": "report"})
    conn.publish("", b"h2", exchange=headers, headers={"format": "pdf"})

    ready = {name: conn.queue_stats(queue).ready for name, queue in queues.items()}
    assert ready == {"red": 1, "all1": 1, "all2": 1, "eu": 1, "pdf": 1}

    conn.unbind(queues["red"], direct, "red")
    conn.publish("red", b"r2", exchange=direct)
    assert conn.queue_stats(queues["red"]).ready == 1


def test_exchange_to_exchange_binding_routes_through(conn: wharf.Connection) -> None:
    source, destination = unique("src"), unique("dst")
    conn.declare_exchange(source, "topic")
    conn.declare_exchange(destination, "fanout")
    target = conn.declare_queue(unique("e2e")).name
    conn.bind(target, destination)
    conn.bind_exchange(destination, source, "logs.#")
    conn.publish("logs.app.error", b"x", exchange=source)
    assert conn.queue_stats(target).ready == 1
    conn.unbind_exchange(destination, source, "logs.#")
    conn.publish("logs.app.error", b"y", exchange=source)
    assert conn.queue_stats(target).ready == 1


def test_publish_many_returns_one_result_per_message(conn: wharf.Connection, queue: str) -> None:
    other = conn.declare_queue(unique("other")).name
    results = conn.publish_many(
        [b"a", "b", wharf.OutgoingMessage(b"c", routing_key=other, headers={"k": "v"})], routing_key=queue
    )
    assert results == [None, None, None]
    assert conn.queue_stats(queue).ready == 2
    assert conn.queue_stats(other).ready == 1

    # (`Backpressure` and `Duplicate` entries: tests/test_queue_features.py.)
    results = conn.publish_many([b"x"] * 3, exchange=unique("missing"))
    assert len(results) == 3
    assert all(isinstance(err, wharf.WharfError) and err.code == wharf.ErrorCode.NOT_FOUND for err in results)


def test_publish_many_sends_a_large_batch_in_order(conn: wharf.Connection, queue: str) -> None:
    bodies = [str(idx).encode() for idx in range(20_000)]
    assert conn.publish_many(bodies, routing_key=queue) == [None] * len(bodies)
    received = []
    with conn.consume(queue, prefetch=5000, auto_ack=True, timeout=5.0) as consumer:
        for batch in consumer.batches(max_messages=1000, max_wait=0.01):
            received.extend(message.body for message in batch)
            if len(received) == len(bodies):
                break
    assert received == bodies


def test_pipelined_publisher_reports_confirms_and_refusals(conn: wharf.Connection, queue: str) -> None:
    with conn.publisher(window=64) as publisher:
        assert publisher.window == 64
        seqs = [publisher.publish(queue, f"m{idx}".encode()) for idx in range(2000)]
    assert seqs == list(range(2000))
    assert publisher.n_pending == 0
    assert conn.queue_stats(queue).ready == 2000

    publisher = conn.publisher(window=8)
    missing = unique("missing")
    publisher.publish(queue, b"ok")
    publisher.publish("x", b"refused", exchange=missing)
    publisher.publish(queue, b"ok")
    failures = publisher.wait_confirms(timeout=10.0)
    assert [seq for seq, _ in failures] == [1]
    assert isinstance(failures[0][1], wharf.WharfError)
    assert failures[0][1].code == wharf.ErrorCode.NOT_FOUND
    assert publisher.wait_confirms() == []

    with pytest.raises(wharf.WharfError):
        with conn.publisher() as failing:
            failing.publish("x", b"refused", exchange=missing)


def test_nack_requeues_with_redelivered_flag_and_reject_drops(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, b"again")
    with conn.consume(queue, prefetch=1, timeout=5.0) as consumer:
        first = consumer.get(timeout=5.0)
        assert first is not None and not first.redelivered
        first.nack(requeue=True)
        second = consumer.get(timeout=5.0)
        assert second is not None and second.body == b"again"
        assert second.redelivered and second.delivery_count == 2
        second.reject()
        with pytest.raises(wharf.NotSettleable):
            second.ack()
    assert conn.queue_stats(queue).ready == 0


def test_ack_twice_is_not_settleable(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, b"once")
    with conn.consume(queue) as consumer:
        message = consumer.get(timeout=5.0)
        assert message is not None
        message.ack()
        with pytest.raises(wharf.NotSettleable) as raised:
            message.ack()
        assert raised.value.code is None


def test_process_acks_on_success_and_nacks_on_exception(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, b"fails once")
    with conn.consume(queue, prefetch=1) as consumer:
        message = consumer.get(timeout=5.0)
        assert message is not None
        with pytest.raises(ValueError):
            with message.process(requeue=True):
                raise ValueError("handler failed")
        assert message.settled
        retry = consumer.get(timeout=5.0)
        assert retry is not None and retry.redelivered
        with retry.process():
            pass
        assert retry.settled

        conn.publish(queue, b"poison")
        poison = consumer.get(timeout=5.0)
        assert poison is not None
        with pytest.raises(RuntimeError):
            with poison.process():  # requeue=False by default: dropped
                raise RuntimeError("poison")
        assert consumer.get(timeout=0.2) is None

        conn.publish(queue, b"manual")
        manual = consumer.get(timeout=5.0)
        assert manual is not None
        with manual.process():
            manual.ack()  # settled inside the block: process() does nothing more
    assert conn.queue_stats(queue).ready == 0


def test_auto_ack_messages_are_settled_and_refuse_acks(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, b"auto")
    with conn.consume(queue, auto_ack=True) as consumer:
        message = consumer.get(timeout=5.0)
        assert message is not None and message.settled
        with pytest.raises(wharf.NotSettleable):
            message.ack()
        with message.process():
            pass


def test_idle_timeout_ends_iteration_quietly_and_cancels_the_consumer(
    conn: wharf.Connection, queue: str
) -> None:
    conn.publish_many([b"1", b"2"], routing_key=queue)
    consumer = conn.consume(queue, timeout=0.3)
    bodies = []
    started = time.monotonic()
    for message in consumer:
        bodies.append(message.body)
        message.ack()
    assert bodies == [b"1", b"2"]
    assert time.monotonic() - started < 5.0
    assert conn.queue_stats(queue).consumers == 0
    assert list(consumer) == []


def test_get_and_next_batch_return_empty_on_an_idle_queue(conn: wharf.Connection, queue: str) -> None:
    with conn.consume(queue) as consumer:
        assert consumer.get(timeout=0.05) is None
        assert consumer.get(timeout=0) is None
        assert consumer.next_batch(10, timeout=0.05) == []


def test_batches_yield_lists_and_end_after_the_idle_timeout(conn: wharf.Connection, queue: str) -> None:
    conn.publish_many([str(idx).encode() for idx in range(250)], routing_key=queue)
    sizes = []
    with conn.consume(queue, prefetch=1000, timeout=0.3) as consumer:
        for batch in consumer.batches(max_messages=100, max_wait=0.5):
            assert 1 <= len(batch) <= 100
            sizes.append(len(batch))
            for message in batch:
                message.ack()
    assert sum(sizes) == 250
    assert max(sizes) == 100


def test_unacked_messages_are_redelivered_after_the_connection_closes(url: str, queue: str) -> None:
    with wharf.connect(url) as first:
        first.publish(queue, b"unfinished")
        consumer = first.consume(queue)
        message = consumer.get(timeout=5.0)
        assert message is not None and not message.redelivered
    with wharf.connect(url) as second:
        with second.consume(queue) as consumer:
            again = consumer.get(timeout=5.0)
            assert again is not None and again.body == b"unfinished" and again.redelivered
            again.ack()


def test_deleting_the_queue_cancels_its_consumer_with_an_error(conn: wharf.Connection, queue: str) -> None:
    consumer = conn.consume(queue, timeout=10.0)
    conn.delete_queue(queue)
    with pytest.raises(wharf.ConsumerCancelled) as raised:
        for _ in consumer:
            pass
    assert raised.value.code == wharf.ErrorCode.NOT_FOUND
    assert list(consumer) == []


def test_queue_stats_purge_and_delete(conn: wharf.Connection) -> None:
    declared = conn.declare_queue(unique("stats"), durable=True)
    name = declared.name
    assert (declared.ready, declared.consumers) == (0, 0)
    conn.publish_many([b"a", b"b", b"c"], routing_key=name)
    with conn.consume(name, prefetch=1) as consumer:
        held = consumer.get(timeout=5.0)
        assert held is not None
        stats = wait_for(lambda: (s := conn.queue_stats(name)).unacked == 1 and s, what="one unacked")
        assert (stats.name, stats.durable, stats.ready, stats.unacked, stats.consumers) == (name, True, 2, 1, 1)
        assert any(info.name == name for info in conn.list_queues())
        assert conn.purge_queue(name) == 2
        held.ack()
    assert conn.queue_stats(name).ready == 0
    conn.publish(name, b"d")
    with pytest.raises(wharf.PreconditionFailed) as raised:
        conn.delete_queue(name, if_empty=True)
    assert raised.value.code == wharf.ErrorCode.PRECONDITION_FAILED
    assert conn.delete_queue(name) == 1
    with pytest.raises(wharf.NotFound):
        conn.queue_stats(name)


def test_server_named_exclusive_queue_vanishes_with_its_connection(url: str, conn: wharf.Connection) -> None:
    with wharf.connect(url) as owner:
        name = owner.declare_queue("", exclusive=True).name
        assert name
        with pytest.raises(wharf.ResourceLocked):
            conn.consume(name)
    wait_for(lambda: not any(info.name == name for info in conn.list_queues()), what="exclusive queue deleted")


def test_delete_exchange(conn: wharf.Connection) -> None:
    name = unique("gone")
    conn.declare_exchange(name, "fanout")
    conn.delete_exchange(name)
    with pytest.raises(wharf.NotFound):
        conn.declare_exchange(name, "fanout", passive=True)
