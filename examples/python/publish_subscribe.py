"""Tutorial 3, "Publish/Subscribe": a fanout exchange delivers every log to every subscriber.

Each subscriber has its own exclusive, server-named queue bound to the ``logs`` exchange.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
LOGS = ["info: Hello World!", "warning: disk 80% full", "error: disk full"]


def main() -> None:
    """Two subscribers, three logs: each subscriber receives all three."""
    with wharf.connect(URL) as conn:
        conn.declare_exchange("logs", "fanout")
        subscribers = []
        for _ in range(2):
            queue = conn.declare_queue("", exclusive=True).name  # the server picks a name
            conn.bind(queue, "logs")
            subscribers.append(queue)

        for log in LOGS:
            conn.publish("", log.encode(), exchange="logs")
            print(f" [x] Sent {log!r}")

        for idx, queue in enumerate(subscribers):
            received = [message.body.decode() for message in conn.consume(queue, auto_ack=True, timeout=0.5)]
            print(f" [subscriber {idx}] Received {received}")
            assert received == LOGS, received


if __name__ == "__main__":
    main()
