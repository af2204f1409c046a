"""Queue features 4, "Time to live": stale quotes are dead-lettered instead of delivered.

``message_ttl`` bounds how long any message may wait in ``quotes``; a message's own
``expiration`` can make it shorter. An expired message is never delivered: it goes to the
dead-letter queue ``quotes.expired`` with reason ``expired`` (or is dropped, without a
dead-letter exchange), and the queue counts it in ``expired``. A message a consumer already
holds does not expire.
"""

from __future__ import annotations

import os
from datetime import timedelta

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "quotes"
EXPIRED = "quotes.expired"


def main() -> None:
    """Publishes a short-lived and a longer-lived quote; the first expires before it is read."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(EXPIRED)
        conn.declare_queue(
            QUEUE,
            message_ttl=timedelta(seconds=30),
            dead_letter_exchange="",
            dead_letter_routing_key=EXPIRED,
        )
        conn.publish(QUEUE, b"EURUSD 1.0842", expiration=0.1)  # stale after 100 ms
        conn.publish(QUEUE, b"GBPUSD 1.2650")  # the queue's 30 s
        print(" [x] Sent 2 quotes")

        with conn.consume(EXPIRED, auto_ack=True) as expired:
            dead = expired.get(timeout=5.0)  # about 100 ms later
            assert dead is not None
            deaths = dead.headers["x-death"]
            assert isinstance(deaths, list) and isinstance(deaths[0], dict)
            print(f" [x] Expired {dead.body!r}: reason {deaths[0]['reason']!r} in {deaths[0]['queue']!r}")

        with conn.consume(QUEUE, prefetch=1) as consumer:
            fresh = consumer.get(timeout=5.0)
            assert fresh is not None
            with fresh.process():
                print(f" [x] Received fresh quote {fresh.body!r}")
        stats = conn.queue_stats(QUEUE)
        print(f" [x] {QUEUE}: {stats.expired} expired, {stats.acked} delivered and acked")
        conn.delete_queue(QUEUE)  # so that the example can run again
        conn.delete_queue(EXPIRED)


if __name__ == "__main__":
    main()
