"""Tutorial 1, "Hello World!": one producer, one consumer, one queue.

Run against a server: ``WHARF_URL=wharf://127.0.0.1:5800 python examples/python/hello_world.py``.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)


def main() -> None:
    """Sends "Hello World!" to the queue ``hello`` and receives it."""
    with wharf.connect(URL) as conn:
        conn.declare_queue("hello")
        conn.publish("hello", b"Hello World!")  # the default exchange routes to queue "hello"
        print(" [x] Sent 'Hello World!'")

        for message in conn.consume("hello", timeout=5.0):
            with message.process():
                print(f" [x] Received {message.body!r}")
            break


if __name__ == "__main__":
    main()
