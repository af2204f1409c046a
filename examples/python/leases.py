"""Queue features 6, "Leases": long-running work keeps its message; a lost one comes back.

A consumer with ``ack_timeout`` holds each message on a lease: a message not settled in time
goes back to the queue and on to another consumer, and no connection is closed. While the
application holds a message (it took it and has neither settled nor dropped it, as inside
``with message.process():``), the client extends the lease in the background, so a task that
runs for many timeouts keeps its message without doing anything (``message.in_progress()``
extends it explicitly). The lease catches a consumer that is stuck or lost track of a message,
not a slow one.
"""

from __future__ import annotations

import os
import time

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "video_renders"
ACK_TIMEOUT = 0.3  # seconds; minutes in real life


def main() -> None:
    """Renders one video for three lease periods, then loses a message that worker 2 takes over."""
    with wharf.connect(URL) as conn1, wharf.connect(URL) as conn2:
        conn1.declare_queue(QUEUE)
        worker1 = conn1.consume(QUEUE, prefetch=1, ack_timeout=ACK_TIMEOUT)

        conn1.publish(QUEUE, b"render intro.mp4")
        intro = worker1.get(timeout=5.0)
        assert intro is not None
        with intro.process():
            print(f" [worker 1] Rendering {intro.body!r} for {3 * ACK_TIMEOUT:.1f}s, 3 lease periods")
            time.sleep(3 * ACK_TIMEOUT)  # the work; the client extends the lease meanwhile
        stats = conn1.queue_stats(QUEUE)
        assert stats.redelivered == 0
        print(f" [worker 1] Done; the lease held (redeliveries: {stats.redelivered})")

        conn1.publish(QUEUE, b"render outro.mp4")
        outro = worker1.get(timeout=5.0)
        assert outro is not None
        print(f" [worker 1] Took {outro.body!r} ... and lost track of it (no ack, no nack)")
        del outro  # nothing holds it any more, so nothing extends its lease

        worker2 = conn2.consume(QUEUE, prefetch=1, ack_timeout=ACK_TIMEOUT)
        taken_over = worker2.get(timeout=5.0)  # once the lease has lapsed
        assert taken_over is not None and taken_over.redelivered
        with taken_over.process():
            print(f" [worker 2] Took over {taken_over.body!r} (redelivered={taken_over.redelivered})")
        assert not conn1.closed
        print(" [x] Worker 1's connection is still open")
        worker1.cancel()
        worker2.cancel()
        conn1.delete_queue(QUEUE)  # so that the example can run again


if __name__ == "__main__":
    main()
