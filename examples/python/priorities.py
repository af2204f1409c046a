"""Queue features 1, "Priorities": urgent jobs overtake routine ones in the same queue.

A queue declared with ``max_priority`` delivers messages with a higher ``priority`` first, and
in arrival order within a priority (a priority above the maximum counts as the maximum).
Priorities order the messages still waiting in the queue, not those already sent to a
consumer, so the worker uses a small prefetch.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "jobs_by_priority"
JOBS = [
    ("weekly report", 1),
    ("password reset", 9),
    ("thumbnail", 5),
    ("account locked", 9),
    ("newsletter", 0),
]


def main() -> None:
    """Publishes jobs of mixed priorities, then processes them in priority order."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(QUEUE, max_priority=10)
        for job, priority in JOBS:
            conn.publish(QUEUE, job, priority=priority)
            print(f" [x] Sent {job!r} with priority {priority}")

        done: list[str] = []
        with conn.consume(QUEUE, prefetch=1, timeout=5.0) as consumer:
            for message in consumer:
                with message.process():
                    print(f" [x] Processing {message.body.decode()!r} (priority {message.priority})")
                    done.append(message.body.decode())
                if len(done) == len(JOBS):
                    break
        assert done == ["password reset", "account locked", "thumbnail", "weekly report", "newsletter"]
        print(f" [x] Processed in order: {done}")
        conn.delete_queue(QUEUE)  # so that the example can run again


if __name__ == "__main__":
    main()
