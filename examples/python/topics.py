"""Tutorial 5, "Topics": a topic exchange routes by dotted patterns.

``*`` matches exactly one word, ``#`` zero or more words. Keys are ``<facility>.<severity>``.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
BINDINGS = {"everything": ["#"], "kernel": ["kern.*"], "critical": ["*.critical"]}
KEYS = ["kern.critical", "kern.info", "cron.critical", "cron.info.extra"]
EXPECTED = {
    "everything": KEYS,
    "kernel": ["kern.critical", "kern.info"],
    "critical": ["kern.critical", "cron.critical"],
}


def main() -> None:
    """Publishes four keys and shows which bindings receive which."""
    with wharf.connect(URL) as conn:
        conn.declare_exchange("topic_logs", "topic")
        queues: dict[str, str] = {}
        for name, patterns in BINDINGS.items():
            queues[name] = conn.declare_queue("", exclusive=True).name
            for pattern in patterns:
                conn.bind(queues[name], "topic_logs", pattern)

        for key in KEYS:
            conn.publish(key, f"message with key {key}".encode(), exchange="topic_logs")
            print(f" [x] Sent {key!r}")

        for name, queue in queues.items():
            keys = [message.routing_key for message in conn.consume(queue, auto_ack=True, timeout=0.5)]
            print(f" [{name} ({', '.join(BINDINGS[name])})] Received {keys}")
            assert keys == EXPECTED[name], (name, keys)


if __name__ == "__main__":
    main()
