"""Tutorial 2, "Work queues": tasks shared by two workers, manual acks, prefetch 1.

Each worker takes one task at a time (``prefetch=1``) and acks it only when done, so a slow
worker never hoards tasks and a crashed worker's task is redelivered to the other.
"""

from __future__ import annotations

import os
import threading
import time

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "task_queue"
TASKS = ["First task.", "Second task..", "Third task...", "Fourth task....", "Fifth task....."]


def worker(name: str, conn: wharf.Connection, done: list[str], lock: threading.Lock) -> None:
    """Processes tasks until the queue has been idle for a second; each dot is 20 ms of work."""
    for message in conn.consume(QUEUE, prefetch=1, timeout=1.0):
        task = message.body.decode()
        print(f" [{name}] Received {task!r}")
        time.sleep(task.count(".") * 0.02)  # the "work"
        message.ack()
        with lock:
            done.append(task)
        print(f" [{name}] Done")


def main() -> None:
    """Publishes the tasks persistently, then runs two workers until every task is acked."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(QUEUE, durable=True)
        for task in TASKS:
            conn.publish(QUEUE, task.encode(), persistent=True)
            print(f" [x] Sent {task!r}")

        done: list[str] = []
        lock = threading.Lock()
        workers = [
            threading.Thread(target=worker, args=(f"worker {idx}", conn, done, lock))
            for idx in (1, 2)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert sorted(done) == sorted(TASKS), done
        print(f" [x] All {len(done)} tasks done")


if __name__ == "__main__":
    main()
