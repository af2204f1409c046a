"""Throughput benchmark of the Python client, from one Python process.

``python -m wharf.bench --url wharf://127.0.0.1:5800`` measures, with 100-byte bodies:

* ``publish_many``: batches of confirmed transient publishes;
* ``publisher``: single ``publish`` calls pipelined under a confirm window;
* ``persistent publish``: ``Connection.publish(..., persistent=True)`` to a durable queue,
  each call awaiting its confirm;
* ``persistent publisher``: the same, pipelined under a window (not a target; shows what
  group commit does when publishes overlap);
* ``consume + ack``: iterating a consumer and acking every message (``for m in c: m.ack()``);
* ``consume batches + ack``: the same through ``Consumer.batches()``.

Each phase uses its own fresh queue, deleted afterwards. Figures are messages per second.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import wharf

__all__ = ["Result", "main", "run"]


@dataclass(frozen=True)
class Result:
    """One measured phase."""

    #: What was measured.
    name: str
    #: Messages moved.
    n_messages: int
    #: Wall-clock seconds.
    seconds: float
    #: The issue's target in messages per second (0: none).
    target: int

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.n_messages / self.seconds if self.seconds > 0 else float("inf")


def _queue(conn: wharf.Connection, durable: bool = False) -> str:
    return conn.declare_queue(f"bench-{uuid.uuid4().hex[:10]}", durable=durable).name


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_publish_many(conn: wharf.Connection, n_messages: int, body: bytes, batch: int) -> Result:
    """Confirmed transient publishes, ``batch`` messages per ``publish_many`` call."""
    queue = _queue(conn)
    bodies = [body] * batch

    def publish() -> None:
        for _ in range(n_messages // batch):
            results = conn.publish_many(bodies, routing_key=queue)
            assert results[-1] is None, results[-1]

    seconds = _timed(publish)
    conn.delete_queue(queue)
    return Result("publish_many (confirmed, transient)", n_messages // batch * batch, seconds, 500_000)


def bench_publisher(conn: wharf.Connection, n_messages: int, body: bytes, window: int) -> Result:
    """Single ``publish`` calls, pipelined under a window of ``window`` unconfirmed."""
    queue = _queue(conn)
    publisher = conn.publisher(window=window)

    def publish() -> None:
        for _ in range(n_messages):
            publisher.publish(queue, body)
        failures = publisher.wait_confirms()
        assert failures == [], failures[:3]

    seconds = _timed(publish)
    conn.delete_queue(queue)
    return Result(f"publisher.publish (pipelined, window {window})", n_messages, seconds, 100_000)


def bench_persistent(conn: wharf.Connection, n_messages: int, body: bytes) -> Result:
    """Persistent publishes to a durable queue, each awaiting its confirm."""
    queue = _queue(conn, durable=True)
    durabilities: set[str] = set()

    def publish() -> None:
        for _ in range(n_messages):
            durabilities.add(conn.publish(queue, body, persistent=True))

    seconds = _timed(publish)
    conn.delete_queue(queue)
    return Result(f"publish persistent, awaited one by one ({'/'.join(sorted(durabilities))})",
                  n_messages, seconds, 4_000)


def bench_persistent_pipelined(conn: wharf.Connection, n_messages: int, body: bytes, window: int) -> Result:
    """Persistent publishes to a durable queue, pipelined (group commit shares each fsync)."""
    queue = _queue(conn, durable=True)
    publisher = conn.publisher(window=window)

    def publish() -> None:
        for _ in range(n_messages):
            publisher.publish(queue, body, persistent=True)
        failures = publisher.wait_confirms()
        assert failures == [], failures[:3]

    seconds = _timed(publish)
    conn.delete_queue(queue)
    return Result(f"publisher.publish persistent (pipelined, window {window})", n_messages, seconds, 0)


def _fill(conn: wharf.Connection, queue: str, n_messages: int, body: bytes) -> None:
    batch = [body] * 10_000
    n_left = n_messages
    while n_left > 0:
        results = conn.publish_many(batch[: min(n_left, len(batch))], routing_key=queue)
        assert results[-1] is None, results[-1]
        n_left -= len(results)


def bench_consume(conn: wharf.Connection, n_messages: int, body: bytes, prefetch: int) -> Result:
    """Iterating a consumer, acking every message."""
    queue = _queue(conn)
    _fill(conn, queue, n_messages, body)

    def consume() -> None:
        n_received = 0
        with conn.consume(queue, prefetch=prefetch, timeout=10.0) as consumer:
            for message in consumer:
                message.ack()
                n_received += 1
                if n_received == n_messages:
                    break
        assert n_received == n_messages, n_received

    seconds = _timed(consume)
    conn.delete_queue(queue)
    return Result(f"consume + ack each (prefetch {prefetch})", n_messages, seconds, 200_000)


def bench_consume_batches(conn: wharf.Connection, n_messages: int, body: bytes, prefetch: int) -> Result:
    """``Consumer.batches()``, acking every message."""
    queue = _queue(conn)
    _fill(conn, queue, n_messages, body)

    def consume() -> None:
        n_received = 0
        with conn.consume(queue, prefetch=prefetch, timeout=10.0) as consumer:
            for batch in consumer.batches(max_messages=prefetch, max_wait=0.0):
                for message in batch:
                    message.ack()
                n_received += len(batch)
                if n_received >= n_messages:
                    break
        assert n_received == n_messages, n_received

    seconds = _timed(consume)
    conn.delete_queue(queue)
    return Result(f"consume batches + ack each (prefetch {prefetch})", n_messages, seconds, 200_000)


def run(url: str, scale: float = 1.0, body_bytes: int = 100) -> list[Result]:
    """Runs every phase against ``url``; ``scale`` multiplies the message counts."""
    body = os.urandom(body_bytes)

    def count(n_messages: int) -> int:
        return max(1, int(n_messages * scale))

    with wharf.connect(url) as conn:
        return [
            bench_publish_many(conn, count(1_000_000), body, batch=10_000),
            bench_publisher(conn, count(300_000), body, window=4096),
            bench_persistent(conn, count(10_000), body),
            bench_persistent_pipelined(conn, count(100_000), body, window=1024),
            bench_consume(conn, count(500_000), body, prefetch=1000),
            bench_consume_batches(conn, count(500_000), body, prefetch=1000),
        ]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m wharf.bench [--url URL] [--scale X] [--body-bytes N]``."""
    parser = argparse.ArgumentParser(prog="python -m wharf.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("WHARF_URL", wharf.DEFAULT_URL))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every message count")
    parser.add_argument("--body-bytes", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"wharf {wharf.__version__} bench against {args.url}, {args.body_bytes}-byte bodies")
    print(f"{'phase':<62} {'messages':>10} {'seconds':>8} {'msgs/s':>11} {'target':>9}")
    for result in run(args.url, args.scale, args.body_bytes):
        print(f"{result.name:<62} {result.n_messages:>10} {result.seconds:>8.2f} "
              f"{result.rate:>11,.0f} {f'{result.target:,}' if result.target else '-':>9}")


if __name__ == "__main__":
    main()
