"""Queue features 2, "Delayed delivery": publish now, deliver later; defer what cannot wait.

A message published with ``delay`` (seconds, or a ``timedelta``) is confirmed at once; the
broker holds it and enqueues it when due, counting it in the queue's ``delayed`` statistic
meanwhile. A consumer that cannot handle a message yet calls ``message.defer(delay)``: a nack
whose requeue waits (the message comes back flagged ``redelivered``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "reminders"


def main() -> None:
    """Schedules two reminders, defers one of them once, and receives both when due."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(QUEUE)
        sent_at = time.monotonic()
        conn.publish(QUEUE, b"send the invoice", delay=0.2)
        conn.publish(QUEUE, b"call the customer back", delay=timedelta(milliseconds=400))
        stats = conn.queue_stats(QUEUE)
        print(f" [x] Scheduled 2 reminders: {stats.delayed} delayed, {stats.ready} ready")

        received: list[str] = []
        with conn.consume(QUEUE, prefetch=10, timeout=5.0) as consumer:
            for message in consumer:
                waited = time.monotonic() - sent_at
                if message.body == b"send the invoice" and not message.redelivered:
                    print(f" [x] {message.body.decode()!r} due after {waited:.1f}s: not now, in 0.5s")
                    message.defer(0.5)
                    continue
                message.ack()
                print(f" [x] Received {message.body.decode()!r} after {waited:.1f}s")
                received.append(message.body.decode())
                if len(received) == 2:
                    break
        assert received == ["call the customer back", "send the invoice"], received
        print(f" [x] Reminders delivered in order: {received}")
        conn.delete_queue(QUEUE)  # so that the example can run again


if __name__ == "__main__":
    main()
