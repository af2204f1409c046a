"""Tutorial 4, "Routing": a direct exchange routes by exact routing key (the severity).

One queue only receives errors (to write to disk); the other receives every severity.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
MESSAGES = [("info", "Started"), ("warning", "Slow request"), ("error", "Crashed")]


def main() -> None:
    """Binds the error queue to ``error`` and the console queue to every severity."""
    with wharf.connect(URL) as conn:
        conn.declare_exchange("direct_logs", "direct")
        errors_only = conn.declare_queue("", exclusive=True).name
        conn.bind(errors_only, "direct_logs", "error")
        console = conn.declare_queue("", exclusive=True).name
        for severity in ("info", "warning", "error"):
            conn.bind(console, "direct_logs", severity)

        for severity, text in MESSAGES:
            conn.publish(severity, text.encode(), exchange="direct_logs")
            print(f" [x] Sent {severity}:{text!r}")

        for name, queue in (("errors to disk", errors_only), ("console", console)):
            received = [
                f"{message.routing_key}:{message.body.decode()}"
                for message in conn.consume(queue, auto_ack=True, timeout=0.5)
            ]
            print(f" [{name}] Received {received}")
        assert received == [f"{severity}:{text}" for severity, text in MESSAGES]


if __name__ == "__main__":
    main()
