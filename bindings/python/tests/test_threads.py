"""Threads, heartbeats and Ctrl-C: the GIL is released while waiting, signals interrupt waits."""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Server, start_server, unique, wait_for

import wharf

HEARTBEAT_MS = 300


@pytest.fixture(scope="module")
def fast_heartbeat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("heartbeat") / "data", config=f"heartbeat_ms = {HEARTBEAT_MS}\n")
    yield server
    server.stop()


def test_two_threads_publishing_on_one_connection(conn: wharf.Connection, queue: str) -> None:
    n_per_thread = 300
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def publish(tag: str) -> None:
        try:
            start.wait(timeout=10)
            publisher = conn.publisher(window=16)
            for idx in range(n_per_thread):
                if idx % 2:
                    conn.publish(queue, f"{tag}-{idx}".encode())
                else:
                    publisher.publish(queue, f"{tag}-{idx}".encode())
            assert publisher.wait_confirms(timeout=30) == []
        except BaseException as err:  # reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=publish, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    bodies = set()
    with conn.consume(queue, prefetch=1000, auto_ack=True, timeout=5.0) as consumer:
        for message in consumer:
            bodies.add(message.body)
            if len(bodies) == 2 * n_per_thread:
                break
    assert bodies == {f"{tag}-{idx}".encode() for tag in ("a", "b") for idx in range(n_per_thread)}


def test_threads_share_a_consumer_and_each_message_is_taken_once(conn: wharf.Connection, queue: str) -> None:
    n_messages = 1000
    conn.publish_many([str(idx).encode() for idx in range(n_messages)], routing_key=queue)
    taken: list[bytes] = []
    lock = threading.Lock()
    consumer = conn.consume(queue, prefetch=50, timeout=1.0)

    def work() -> None:
        while (message := consumer.get(timeout=1.0)) is not None:
            with lock:
                taken.append(message.body)
            message.ack()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    consumer.cancel()
    assert sorted(taken) == sorted(str(idx).encode() for idx in range(n_messages))


def test_blocking_wait_releases_the_gil_for_other_threads(conn: wharf.Connection, queue: str) -> None:
    counter = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        with conn.consume(queue) as consumer:
            before = counter
            assert consumer.get(timeout=0.5) is None
            progressed = counter - before
    finally:
        stop.set()
        thread.join()
    assert progressed > 10_000, "the other thread hardly ran while this one waited"


def test_handler_blocking_longer_than_the_heartbeat_keeps_the_connection(fast_heartbeat_server: Server) -> None:
    with wharf.connect(fast_heartbeat_server.url) as conn:
        assert conn.server_limits["heartbeat_ms"] == HEARTBEAT_MS
        queue = conn.declare_queue(unique("slow")).name
        conn.publish(queue, b"slow job")
        conn.publish(queue, b"next job")
        with conn.consume(queue, prefetch=1) as consumer:
            message = consumer.get(timeout=5.0)
            assert message is not None
            with message.process():
                # Holds the GIL (pure Python work) for 5 heartbeat intervals: the peer is declared
                # dead after 2 silent intervals, so only background heartbeats keep it alive.
                deadline = time.monotonic() + 5 * HEARTBEAT_MS / 1000
                while time.monotonic() < deadline:
                    pass
            assert not conn.closed
            following = consumer.get(timeout=5.0)
            assert following is not None and following.body == b"next job" and not following.redelivered
            following.ack()
        stats = wait_for(lambda: (s := conn.queue_stats(queue)).unacked == 0 and s, what="acks processed")
        assert stats.ready == 0


def test_idle_connection_survives_many_heartbeat_intervals(fast_heartbeat_server: Server) -> None:
    with wharf.connect(fast_heartbeat_server.url) as conn:
        queue = conn.declare_queue(unique("idle")).name
        with conn.consume(queue) as consumer:
            assert consumer.get(timeout=5 * HEARTBEAT_MS / 1000) is None
        assert not conn.closed
        conn.publish(queue, b"still here")


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt during the test, as in an interactive program.

    A process started in the background by a non-interactive shell inherits SIGINT ignored,
    and Python then installs no handler: `_thread.interrupt_main()` would do nothing and a
    test waiting to be interrupted would hang.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_interrupts_a_blocking_consume_and_leaves_the_connection_clean(
    url: str, conn: wharf.Connection, queue: str
) -> None:
    interrupted_at: list[float] = []
    observer_failed: list[BaseException] = []

    def interrupt_once_consuming() -> None:
        try:
            with wharf.connect(url) as observer:
                wait_for(lambda: observer.queue_stats(queue).consumers == 1, what="the consumer to subscribe")
        except BaseException as err:  # noqa: BLE001 - reported by the main thread below
            # Interrupted all the same, so the consume below ends and the test reports this
            # instead of hanging.
            observer_failed.append(err)
        time_before = time.monotonic()
        interrupted_at.append(time_before)
        _thread.interrupt_main()

    thread = threading.Thread(target=interrupt_once_consuming)
    with pytest.raises(KeyboardInterrupt):
        with conn.consume(queue) as consumer:  # no timeout: waits until interrupted
            thread.start()
            for _message in consumer:
                pass
    raised_at = time.monotonic()
    thread.join(timeout=30)
    assert not observer_failed, f"the observer failed: {observer_failed[0]!r}"
    assert interrupted_at and raised_at - interrupted_at[0] < 1.0
    # The connection is intact: the consumer was cancelled, and messaging works.
    assert not conn.closed
    wait_for(lambda: conn.queue_stats(queue).consumers == 0, what="the consumer to be cancelled")
    conn.publish(queue, b"after ctrl-c")
    with conn.consume(queue) as consumer:
        message = consumer.get(timeout=5.0)
        assert message is not None and message.body == b"after ctrl-c"
        message.ack()


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_interrupts_a_get_with_a_long_timeout(conn: wharf.Connection) -> None:
    queue = conn.declare_queue(unique("sig")).name
    with conn.consume(queue) as consumer:
        timer = threading.Timer(0.2, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            consumer.get(timeout=30.0)
        assert time.monotonic() - started < 5.0
        timer.join()
