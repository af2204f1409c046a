"""Queue features through the blocking API against a real server: priorities, delayed
delivery, defer, TTL and dead-lettering, retry schedules, dedup, leases, queue expiry, redrive,
length and delivery limits, and the errors a user can reach.

Durations are tens to hundreds of milliseconds; time is only ever checked as a lower bound
(the broker must not be early), and every wait is a poll with a deadline.
"""

from __future__ import annotations

import gc
import time
from datetime import timedelta
from typing import Any, Optional

import pytest
from conftest import unique, wait_for

import wharf

#: A timed feature must not fire early; the clocks of the test and of the broker differ by
#: less than this (both read the same monotonic-ish system clock, in whole milliseconds).
CLOCK_SLACK_S = 0.005


def death(message: wharf.Message) -> dict[str, Any]:
    """The most recent `x-death` record of a dead-lettered message."""
    records = message.headers["x-death"]
    assert isinstance(records, list) and records, message.headers
    record = records[0]
    assert isinstance(record, dict)
    return record


def get(consumer: wharf.Consumer, timeout: float = 5.0) -> wharf.Message:
    message = consumer.get(timeout=timeout)
    assert message is not None, f"no message on {consumer.queue} within {timeout}s"
    return message


def dead_letter_pair(conn: wharf.Connection, prefix: str, **features: Any) -> tuple[str, str]:
    """A queue with `features` that dead-letters into a fresh queue; returns (queue, dlq)."""
    dlq = conn.declare_queue(unique(f"{prefix}-dlq")).name
    queue = conn.declare_queue(
        unique(prefix), dead_letter_exchange="", dead_letter_routing_key=dlq, **features
    ).name
    return queue, dlq


# -- priorities ---------------------------------------------------------------------------


def test_higher_priorities_are_delivered_first_and_fifo_within_a_priority(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("prio"), max_priority=9).name
    for body, priority in [("low", 1), ("urgent-1", 9), ("normal", 5), ("urgent-2", 9), ("capped", 200)]:
        conn.publish(queue, body, priority=priority)
    with conn.consume(queue, auto_ack=True) as consumer:
        bodies = [message.body for message in consumer.next_batch(5, max_wait=2.0, timeout=5.0)]
    # 200 counts as the queue's maximum, 9, and arrived after the other two nines.
    assert bodies == [b"urgent-1", b"urgent-2", b"capped", b"normal", b"low"]


def test_a_queue_without_max_priority_ignores_priorities(conn: wharf.Connection, queue: str) -> None:
    conn.publish(queue, "first", priority=1)
    conn.publish(queue, "second", priority=9)
    with conn.consume(queue, auto_ack=True) as consumer:
        assert [m.body for m in consumer.next_batch(2, max_wait=2.0, timeout=5.0)] == [b"first", b"second"]


# -- delayed delivery and defer -----------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, timedelta(milliseconds=300)], ids=["seconds", "timedelta"])
def test_a_delayed_publish_is_held_for_at_least_its_delay(
    conn: wharf.Connection, queue: str, delay: wharf.Seconds
) -> None:
    started = time.monotonic()
    conn.publish(queue, b"later", delay=delay)
    conn.publish(queue, b"now")
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.delayed) == (1, 1)
    with conn.consume(queue) as consumer:
        first = get(consumer)
        assert first.body == b"now"
        first.ack()
        later = get(consumer)
        elapsed = time.monotonic() - started
        assert later.body == b"later" and not later.redelivered
        later.ack()
    assert elapsed >= 0.3 - CLOCK_SLACK_S, elapsed
    assert conn.queue_stats(queue).delayed == 0


def test_publish_many_items_carry_their_own_delay(conn: wharf.Connection, queue: str) -> None:
    results = conn.publish_many(
        [wharf.OutgoingMessage(b"held", delay=0.2), b"plain"], routing_key=queue
    )
    assert results == [None, None]
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.delayed) == (1, 1)
    wait_for(lambda: conn.queue_stats(queue).ready == 2, what="the delayed message to be due")


def test_the_pipelined_publisher_takes_a_delay(conn: wharf.Connection, queue: str) -> None:
    with conn.publisher(window=8) as publisher:
        publisher.publish(queue, b"held", delay=timedelta(milliseconds=150))
    assert conn.queue_stats(queue).delayed == 1
    wait_for(lambda: conn.queue_stats(queue).ready == 1, what="the delayed message to be due")


def test_defer_requeues_the_message_after_the_delay_flagged_redelivered(
    conn: wharf.Connection, queue: str
) -> None:
    conn.publish(queue, b"not now")
    with conn.consume(queue, prefetch=1) as consumer:
        message = get(consumer)
        deferred_at = time.monotonic()
        message.defer(0.25)
        assert message.settled
        with pytest.raises(wharf.NotSettleable):
            message.ack()
        wait_for(lambda: conn.queue_stats(queue).delayed == 1, what="the deferred message to be delayed")
        again = get(consumer)
        assert time.monotonic() - deferred_at >= 0.25 - CLOCK_SLACK_S
        assert again.body == b"not now" and again.redelivered and again.delivery_count == 2
        again.ack()


# -- TTL and dead-lettering ---------------------------------------------------------------


def test_a_message_past_the_queue_ttl_is_dead_lettered_with_reason_expired(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "ttl", message_ttl=0.1)
    conn.publish(queue, b"stale quote", headers={"symbol": "EURUSD"})
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert dead.body == b"stale quote" and dead.headers["symbol"] == "EURUSD"
    record = death(dead)
    assert (record["reason"], record["queue"], record["count"]) == ("expired", queue, 1)
    assert dead.headers["x-first-death-reason"] == "expired"
    assert dead.expiration is None  # the dead-lettered copy does not expire again
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.expired) == (0, 1)


def test_a_per_message_expiration_expires_it_and_the_smaller_ttl_wins(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "expiration", message_ttl=60)
    conn.publish(queue, b"short", expiration=timedelta(milliseconds=50))
    conn.publish(queue, b"long", expiration=60.0)
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert dead.body == b"short" and death(dead)["reason"] == "expired"
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.expired) == (1, 1)


def test_a_rejected_message_is_dead_lettered_with_reason_rejected(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "rejected")
    conn.publish(queue, b"unprocessable")
    with conn.consume(queue) as consumer:
        get(consumer).reject()
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert death(dead)["reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == queue


# -- retry schedules ----------------------------------------------------------------------


def test_a_retry_schedule_redelivers_after_each_delay_then_dead_letters(conn: wharf.Connection) -> None:
    schedule = [0.05, 0.15]
    queue, dlq = dead_letter_pair(conn, "retry", retry=schedule)
    conn.publish(queue, b"flaky")
    attempts: list[float] = []
    with conn.consume(queue, prefetch=1) as consumer:
        for _ in range(len(schedule) + 1):
            message = get(consumer)
            attempts.append(time.monotonic())
            assert message.delivery_count == len(attempts)
            with pytest.raises(RuntimeError):
                with message.process(requeue=True):  # a failure walks the schedule
                    raise RuntimeError("downstream unavailable")
            if len(attempts) <= len(schedule):
                wait_for(lambda: conn.queue_stats(queue).delayed == 1, what="the retry to be delayed")
        assert consumer.get(timeout=0.1) is None
    for step, delay in enumerate(schedule):
        assert attempts[step + 1] - attempts[step] >= delay - CLOCK_SLACK_S, (step, attempts)
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert dead.body == b"flaky" and death(dead)["reason"] == "rejected"


# -- deduplication ------------------------------------------------------------------------


def test_a_duplicate_message_id_raises_duplicate_and_is_not_stored_again(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("dedup"), dedup_window=60).name
    conn.publish(queue, b"charge 42", message_id="charge-42")
    with pytest.raises(wharf.Duplicate) as raised:
        conn.publish(queue, b"charge 42", message_id="charge-42")
    assert isinstance(raised.value, wharf.WharfError) and raised.value.code is None
    conn.publish(queue, b"charge 43", message_id="charge-43")
    conn.publish(queue, b"no id")
    conn.publish(queue, b"no id")  # messages without an id are never duplicates
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.duplicates) == (4, 1)


def test_publish_many_and_the_publisher_report_duplicates_per_message(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("dedup-many"), dedup_window=timedelta(minutes=10)).name
    results = conn.publish_many(
        [
            wharf.OutgoingMessage(b"a", message_id="a"),
            wharf.OutgoingMessage(b"a again", message_id="a"),
            wharf.OutgoingMessage(b"b", message_id="b"),
        ],
        routing_key=queue,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], wharf.Duplicate)
    publisher = conn.publisher(window=4)
    publisher.publish(queue, b"b again", message_id="b")
    publisher.publish(queue, b"c", message_id="c")
    failures = publisher.wait_confirms(timeout=10.0)
    assert [(seq, type(err)) for seq, err in failures] == [(0, wharf.Duplicate)]
    assert conn.queue_stats(queue).ready == 3


def test_the_dedup_window_forgets_an_id_once_it_has_passed(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("dedup-window"), dedup_window=0.1).name
    conn.publish(queue, b"first", message_id="same")
    started = time.monotonic()

    def stored_again() -> bool:
        try:
            conn.publish(queue, b"again", message_id="same")
        except wharf.Duplicate:
            return False
        return True

    wait_for(stored_again, what="the window to pass")
    assert time.monotonic() - started >= 0.1 - CLOCK_SLACK_S
    assert conn.queue_stats(queue).ready == 2


# -- sync policy per queue ------------------------------------------------------------------


def test_a_queue_s_sync_policy_overrides_the_broker_s_and_the_confirm_says_so(
    conn: wharf.Connection,
) -> None:
    relaxed = conn.declare_queue(unique("sync-never"), durable=True, sync="never").name
    strict = conn.declare_queue(unique("sync-default"), durable=True).name
    assert conn.publish(relaxed, b"a", persistent=True) == "unsafe_not_synced"
    assert conn.publish(strict, b"b", persistent=True) == "fsynced"
    soon = conn.declare_queue(unique("sync-interval"), durable=True, sync="interval=50").name
    assert conn.publish(soon, b"c", persistent=True) == "unsafe_not_synced"


def test_a_bad_sync_policy_or_one_given_twice_is_refused(conn: wharf.Connection) -> None:
    with pytest.raises(wharf.InvalidArgument, match="x-sync"):
        conn.declare_queue(unique("sync-bad"), durable=True, sync="sometimes")
    with pytest.raises(wharf.InvalidArgument, match="given twice"):
        conn.declare_queue(
            unique("sync-twice"), durable=True, sync="never", arguments={"x-sync": "never"}
        )


# -- leases -------------------------------------------------------------------------------


def test_a_lapsed_lease_redelivers_to_another_consumer_and_the_connection_lives(url: str) -> None:
    with wharf.connect(url) as holder, wharf.connect(url) as other:
        queue = holder.declare_queue(unique("lease")).name
        # The holder receives the message but never takes it: nothing extends its lease.
        holding = holder.consume(queue, prefetch=1, ack_timeout=0.2)
        assert holding.ack_timeout == pytest.approx(0.2)
        published_at = time.monotonic()
        holder.publish(queue, b"task")
        wait_for(lambda: holder.queue_stats(queue).unacked == 1, what="the delivery to the holder")
        with other.consume(queue, prefetch=1) as taking:
            redelivered = get(taking)
            assert time.monotonic() - published_at >= 0.2 - CLOCK_SLACK_S
            assert redelivered.body == b"task" and redelivered.redelivered
            assert redelivered.delivery_count == 2
            # The holder's copy, settled late: accepted and ignored; nobody is disconnected.
            late = get(holding)
            late.ack()
            stats = holder.queue_stats(queue)
            assert (stats.unacked, stats.acked) == (1, 0)
            assert not holder.closed and not other.closed
            redelivered.ack()
            wait_for(lambda: holder.queue_stats(queue).acked == 1, what="the ack of the redelivery")
        holding.cancel()


def test_a_message_dropped_unsettled_comes_back_after_its_lease(url: str) -> None:
    with wharf.connect(url) as holder, wharf.connect(url) as other:
        queue = holder.declare_queue(unique("lease-drop")).name
        holding = holder.consume(queue, prefetch=1, ack_timeout=timedelta(milliseconds=200))
        holder.publish(queue, b"abandoned")
        message: Optional[wharf.Message] = get(holding)
        with other.consume(queue, prefetch=1) as taking:
            message = None  # the last reference: its lease is no longer extended
            gc.collect()
            again = get(taking)
            assert again.body == b"abandoned" and again.redelivered
            again.ack()
        assert not holder.closed
        holding.cancel()


def test_the_lease_of_a_message_held_inside_process_is_extended_automatically(url: str) -> None:
    ack_timeout = 0.4
    with wharf.connect(url) as worker, wharf.connect(url) as other:
        queue = worker.declare_queue(unique("lease-process")).name
        worker.publish(queue, b"render video")
        with worker.consume(queue, prefetch=1, ack_timeout=ack_timeout) as consumer, other.consume(
            queue, prefetch=1
        ) as competitor:
            message = get(consumer)
            with message.process():
                # "Work" for 2.5 lease periods without touching anything; a lapsed lease would
                # hand the message to the competitor, which is waiting for it meanwhile.
                stolen = competitor.get(timeout=2.5 * ack_timeout)
                assert stolen is None, "the lease lapsed while the handler ran"
            assert message.settled
        stats = worker.queue_stats(queue)
        assert (stats.delivered, stats.redelivered, stats.acked) == (1, 0, 1)


def test_in_progress_extends_without_settling(conn: wharf.Connection, queue: str) -> None:
    conn.publish_many([b"leased", b"plain"], routing_key=queue)
    with conn.consume(queue, prefetch=1, ack_timeout=5) as consumer:
        message = get(consumer)
        message.in_progress()
        assert not message.settled
        message.ack()
        with pytest.raises(wharf.NotSettleable):
            message.in_progress()
    with conn.consume(queue) as consumer:  # without an ack timeout it does nothing
        plain = get(consumer)
        plain.in_progress()
        plain.ack()


# -- queue expiry -------------------------------------------------------------------------


def test_an_unused_queue_with_expires_is_deleted(conn: wharf.Connection) -> None:
    name = unique("expires")
    conn.declare_queue(name, expires=0.15)
    conn.publish(name, b"goes with the queue")
    declared_at = time.monotonic()
    # Listing does not count as use (a declare would).
    wait_for(lambda: all(info.name != name for info in conn.list_queues()), what="the queue to expire")
    assert time.monotonic() - declared_at >= 0.15 - CLOCK_SLACK_S
    with pytest.raises(wharf.NotFound):
        conn.queue_stats(name)


def test_a_consumer_keeps_an_expiring_queue_alive(conn: wharf.Connection) -> None:
    name = unique("expires-used")
    conn.declare_queue(name, expires=0.1)
    with conn.consume(name) as consumer:
        assert consumer.get(timeout=0.3) is None
        assert conn.queue_stats(name).consumers == 1


# -- redrive ------------------------------------------------------------------------------


def test_redrive_moves_dead_letters_back_without_their_death_records(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "redrive")
    conn.publish_many([b"one", b"two", b"three"], routing_key=queue)
    with conn.consume(queue, prefetch=10) as consumer:
        for message in consumer.next_batch(3, max_wait=2.0, timeout=5.0):
            message.reject()
    wait_for(lambda: conn.queue_stats(dlq).ready == 3, what="three dead letters")
    assert conn.redrive(dlq, max_messages=1) == 1
    assert conn.redrive(dlq) == 2
    assert conn.queue_stats(dlq).ready == 0
    with conn.consume(queue, auto_ack=True) as consumer:
        back = consumer.next_batch(3, max_wait=2.0, timeout=5.0)
    assert sorted(message.body for message in back) == [b"one", b"three", b"two"]
    assert all("x-death" not in message.headers for message in back)
    assert conn.redrive(dlq) == 0


def test_redrive_errors(conn: wharf.Connection, queue: str) -> None:
    with pytest.raises(wharf.NotFound):
        conn.redrive(unique("missing"))
    for bad in (0, -1):
        with pytest.raises(wharf.InvalidArgument):
            conn.redrive(queue, max_messages=bad)


# -- length and delivery limits -----------------------------------------------------------


def test_a_full_reject_publish_queue_raises_backpressure(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("full"), max_length=2, overflow="reject-publish").name
    conn.publish(queue, b"1")
    conn.publish(queue, b"2")
    with pytest.raises(wharf.Backpressure) as raised:
        conn.publish(queue, b"3")
    assert raised.value.code == wharf.ErrorCode.BACKPRESSURE
    results = conn.publish_many([b"4"], routing_key=queue)
    assert isinstance(results[0], wharf.Backpressure)
    assert conn.queue_stats(queue).ready == 2


def test_reject_publish_dlx_raises_backpressure_and_dead_letters(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "refused", max_length=1, overflow="reject-publish-dlx")
    conn.publish(queue, b"kept")
    with pytest.raises(wharf.Backpressure):
        conn.publish(queue, b"refused")
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        assert dead.body == b"refused"
        dead.ack()
    assert conn.queue_stats(queue).ready == 1


def test_drop_head_dead_letters_the_oldest_with_reason_maxlen(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "maxlen", max_length_bytes=4, overflow="drop-head")
    conn.publish(queue, b"old.")
    conn.publish(queue, b"new.")
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert dead.body == b"old." and death(dead)["reason"] == "maxlen"
    stats = conn.queue_stats(queue)
    assert (stats.ready, stats.ready_bytes, stats.dropped) == (1, 4, 1)


def test_the_delivery_limit_dead_letters_a_poison_message(conn: wharf.Connection) -> None:
    queue, dlq = dead_letter_pair(conn, "poison", delivery_limit=2)
    conn.publish(queue, b"poison")
    with conn.consume(queue, prefetch=1) as consumer:
        for _ in range(2):
            get(consumer).nack(requeue=True)
        assert consumer.get(timeout=0.1) is None
    with conn.consume(dlq) as consumer:
        dead = get(consumer)
        dead.ack()
    assert death(dead)["reason"] == "delivery_limit"


def test_single_active_consumer_serves_one_consumer_at_a_time(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("sac"), single_active_consumer=True).name
    conn.publish_many([b"1", b"2"], routing_key=queue)
    with conn.consume(queue, prefetch=10) as active, conn.consume(queue, prefetch=10) as standby:
        first = active.next_batch(2, max_wait=1.0, timeout=5.0)
        assert [message.body for message in first] == [b"1", b"2"]
        assert standby.get(timeout=0.1) is None
        for message in first:
            message.ack()


# -- arguments and their errors -----------------------------------------------------------


def test_feature_keywords_are_queue_arguments_a_redeclare_must_repeat(conn: wharf.Connection) -> None:
    name = unique("args")
    features: dict[str, Any] = {
        "max_priority": 5,
        "max_length": 10,
        "message_ttl": 60,
        "retry": [1, timedelta(seconds=2)],
        "dedup_window": timedelta(minutes=1),
    }
    conn.declare_queue(name, **features)
    conn.declare_queue(name, **features)  # the same again: fine
    # The keywords are plain queue arguments, in milliseconds.
    conn.declare_queue(
        name,
        arguments={
            "x-max-priority": 5,
            "x-max-length": 10,
            "x-message-ttl": 60_000,
            "x-retry": [1000, 2000],
            "x-dedup-window": 60_000,
        },
    )
    with pytest.raises(wharf.PreconditionFailed):
        conn.declare_queue(name, **{**features, "max_length": 11})


@pytest.mark.parametrize(
    "features",
    [
        {"max_priority": 0},
        {"max_priority": 256},
        {"max_length": -1},
        {"max_length_bytes": -1},
        {"delivery_limit": -1},
        {"overflow": "drop-tail"},
        {"overflow": "reject-publish-dlq"},
        {"message_ttl": -1},
        {"expires": 0},
        {"expires": float("nan")},
        {"retry": []},
        {"retry": [0.1] * 65},
        {"retry": [-0.1]},
        {"dedup_window": 0},
        {"max_length": 5, "arguments": {"x-max-length": 5}},
        {"arguments": {"x-max-length": "five"}},
    ],
    ids=repr,
)
def test_bad_feature_values_raise_invalid_argument_and_declare_nothing(
    conn: wharf.Connection, features: dict[str, Any]
) -> None:
    name = unique("bad")
    with pytest.raises(wharf.InvalidArgument) as raised:
        conn.declare_queue(name, **features)
    assert isinstance(raised.value, ValueError)
    assert all(info.name != name for info in conn.list_queues())
    assert not conn.closed


def test_durations_of_the_wrong_type_are_type_errors(conn: wharf.Connection, queue: str) -> None:
    with pytest.raises(TypeError):
        conn.declare_queue(unique("bad"), retry="1s")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        conn.declare_queue(unique("bad"), message_ttl="60")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        conn.publish(queue, b"x", delay=True)
    assert conn.queue_stats(queue).ready + conn.queue_stats(queue).delayed == 0


def test_bad_delays_and_leases_raise_invalid_argument(conn: wharf.Connection, queue: str) -> None:
    with pytest.raises(wharf.InvalidArgument):
        conn.publish(queue, b"x", delay=-0.5)
    with pytest.raises(wharf.InvalidArgument):
        conn.publish(queue, b"x", expiration=timedelta(seconds=-1))
    with pytest.raises(wharf.InvalidArgument):
        wharf.OutgoingMessage(b"x", delay=float("inf"))
    with pytest.raises(wharf.InvalidArgument):
        conn.consume(queue, auto_ack=True, ack_timeout=1)  # a lease needs manual acks
    with pytest.raises(wharf.InvalidArgument):
        conn.consume(queue, ack_timeout=0.0001)  # under 1 ms
    conn.publish(queue, b"x")
    with conn.consume(queue) as consumer:
        message = get(consumer)
        with pytest.raises(wharf.InvalidArgument):
            message.defer(-1)
        with pytest.raises(wharf.InvalidArgument):
            message.defer(timedelta(days=366 * 11))  # over the ten-year maximum
        with pytest.raises(TypeError):
            message.defer("soon")  # type: ignore[arg-type]
        assert not message.settled  # nothing was sent
        message.ack()
    with conn.consume(queue, auto_ack=True) as consumer:
        conn.publish(queue, b"y")
        auto = get(consumer)
        with pytest.raises(wharf.NotSettleable):
            auto.defer(0.1)
    assert not conn.closed
