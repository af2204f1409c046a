"""Queue features 5, "Deduplication": a producer that retries never charges twice.

A producer that lost a confirm (a timeout, a dropped connection) cannot know whether its
message was stored, so it publishes again. With ``dedup_window``, the queue remembers each
``message_id`` it took for that long: a second message with the same id is dropped and the
publish raises ``wharf.Duplicate``, which the producer treats as success. ``publish_many``
reports it per message instead of raising.
"""

from __future__ import annotations

import os
from datetime import timedelta

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "charges"


def publish_once(conn: wharf.Connection, body: bytes, message_id: str) -> str:
    """Publishes a charge; a duplicate means an earlier attempt was stored."""
    try:
        conn.publish(QUEUE, body, message_id=message_id, persistent=True)
    except wharf.Duplicate:
        return "duplicate: already stored, nothing to do"
    return "stored"


def main() -> None:
    """Publishes the same charge three times and a batch with a repeat; one copy of each stays."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(QUEUE, durable=True, dedup_window=timedelta(minutes=10))
        for attempt in (1, 2, 3):
            outcome = publish_once(conn, b"charge 12.50 EUR to card 4242", "charge-1001")
            print(f" [x] Attempt {attempt} for charge-1001: {outcome}")

        results = conn.publish_many(
            [
                wharf.OutgoingMessage(b"charge 8.00 EUR to card 1881", message_id="charge-1002"),
                wharf.OutgoingMessage(b"charge 12.50 EUR to card 4242", message_id="charge-1001"),
            ],
            routing_key=QUEUE,
        )
        print(f" [x] Batch: {['stored' if err is None else type(err).__name__ for err in results]}")

        stats = conn.queue_stats(QUEUE)
        print(f" [x] Queue holds {stats.ready} charges; {stats.duplicates} duplicates dropped")
        with conn.consume(QUEUE, auto_ack=True) as consumer:
            for message in consumer.next_batch(stats.ready, max_wait=1.0, timeout=5.0):
                print(f" [x] Received {message.message_id}: {message.body!r}")
        conn.delete_queue(QUEUE)  # so that the example can run again


if __name__ == "__main__":
    main()
