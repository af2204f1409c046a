"""Python clients side by side: the `wharf` package against nats-py, same loops, interleaved.

    python benches/scripts/python_peers.py --wharf wharf://127.0.0.1:5800 \
        --nats nats://127.0.0.1:4222 --rounds 3 --messages 200000

Needs the `wharf` package (release build: `maturin develop --release`) and `nats-py` in the
same environment, a Wharf broker and a NATS server with JetStream (`nats-server -js`), both on
127.0.0.1. Phases, 100-byte bodies, each on a fresh queue / stream:

* publish loop: one call per message, as programs publish. Wharf: `Publisher.publish` (confirms
  pipelined, all awaited at the end); NATS: core `await nc.publish` (no confirm), then a flush.
* consume + ack: a backlog of N transient messages drained with one ack call per message.
  Wharf: `for m in consumer: m.ack()` (prefetch 1000); NATS: a JetStream memory stream, pull
  consumer, `fetch(1000)` and `await m.ack()` per message.

Prints one line per phase and round, then the medians and the Wharf / NATS ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import nats
from nats.js.api import StorageType

import wharf

BODY = b"x" * 100


def wharf_publish(url: str, n: int) -> float:
    with wharf.connect(url) as conn:
        queue = conn.declare_queue(f"peers-{uuid.uuid4().hex[:8]}").name
        publisher = conn.publisher()
        started = time.perf_counter()
        for _ in range(n):
            publisher.publish(queue, BODY)
        refused = publisher.wait_confirms()
        seconds = time.perf_counter() - started
        assert not refused, refused[:3]
        conn.delete_queue(queue)
    return n / seconds


def wharf_consume_ack(url: str, n: int) -> float:
    with wharf.connect(url) as conn:
        queue = conn.declare_queue(f"peers-{uuid.uuid4().hex[:8]}").name
        for _ in range(n // 10_000):
            assert all(r is None for r in conn.publish_many([BODY] * 10_000, routing_key=queue))
        n = n // 10_000 * 10_000
        consumer = conn.consume(queue, prefetch=1000)
        got = 0
        started = time.perf_counter()
        for message in consumer:
            message.ack()
            got += 1
            if got == n:
                break
        seconds = time.perf_counter() - started
        consumer.cancel()
        conn.delete_queue(queue)
    return n / seconds


async def nats_publish(url: str, n: int) -> float:
    nc = await nats.connect(url)
    subject = f"peers.{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    for _ in range(n):
        await nc.publish(subject, BODY)
    await nc.flush()
    seconds = time.perf_counter() - started
    await nc.close()
    return n / seconds


async def nats_consume_ack(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"PEERS{uuid.uuid4().hex[:8]}"
    subject = f"peers.{name}"
    await js.add_stream(name=name, subjects=[subject], storage=StorageType.MEMORY)
    # Filled with acknowledged JetStream publishes (core publishes may be dropped on the way
    # into the stream), 1,000 in flight at a time; not timed.
    for start in range(0, n, 1000):
        await asyncio.gather(*(js.publish(subject, BODY) for _ in range(min(1000, n - start))))
    info = await js.stream_info(name)
    assert info.state.messages == n, info.state.messages
    sub = await js.pull_subscribe(subject, durable="c")
    got = 0
    started = time.perf_counter()
    while got < n:
        for message in await sub.fetch(min(1000, n - got), timeout=10):
            await message.ack()
            got += 1
    seconds = time.perf_counter() - started
    await js.delete_stream(name)
    await nc.close()
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wharf", default="wharf://127.0.0.1:5800")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    rates: dict[tuple[str, str], list[float]] = {}
    for round_idx in range(1, args.rounds + 1):
        for phase, run_wharf, run_nats in [
            ("publish loop", wharf_publish, nats_publish),
            ("consume + ack", wharf_consume_ack, nats_consume_ack),
        ]:
            for client, rate in [
                ("wharf", run_wharf(args.wharf, args.messages)),
                ("nats-py", asyncio.run(run_nats(args.nats, args.messages))),
            ]:
                rates.setdefault((phase, client), []).append(rate)
                print(f"round {round_idx}: {phase:14} {client:8} {rate:>12,.0f} msgs/s", flush=True)
    for phase in ["publish loop", "consume + ack"]:
        wharf_median = statistics.median(rates[(phase, "wharf")])
        nats_median = statistics.median(rates[(phase, "nats-py")])
        print(
            f"median {phase:14} wharf {wharf_median:>10,.0f}  nats-py {nats_median:>10,.0f}"
            f"  ratio {wharf_median / nats_median:.2f}x"
        )


if __name__ == "__main__":
    main()
