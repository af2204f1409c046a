"""Tutorial 7, "RPC": a request queue, an exclusive reply queue, and correlation ids.

The server thread computes Fibonacci numbers from ``rpc_queue``; the client sends each request
with ``reply_to`` (its own exclusive queue) and a fresh ``correlation_id``, and matches the
reply by that id.
"""

from __future__ import annotations

import os
import threading
import uuid

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)


def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def serve(conn: wharf.Connection, ready: threading.Event, n_requests: int) -> None:
    """Answers ``n_requests`` requests from ``rpc_queue``, one at a time."""
    with conn.consume("rpc_queue", prefetch=1, timeout=10.0) as requests:
        ready.set()
        for _ in range(n_requests):
            request = requests.get(timeout=10.0)
            if request is None:
                return
            with request.process():
                n = int(request.body)
                print(f" [.] fib({n})")
                assert request.reply_to is not None
                conn.publish(request.reply_to, str(fib(n)).encode(), correlation_id=request.correlation_id)


class FibonacciClient:
    """Calls the server: one request, then waits for the reply with the same correlation id."""

    def __init__(self, conn: wharf.Connection) -> None:
        """Declares the exclusive reply queue and subscribes to it."""
        self.conn = conn
        self.reply_queue = conn.declare_queue("", exclusive=True).name
        self.replies = conn.consume(self.reply_queue, auto_ack=True)

    def call(self, n: int) -> int:
        """Sends ``n``, returns ``fib(n)`` computed by the server."""
        correlation_id = uuid.uuid4().hex
        self.conn.publish("rpc_queue", str(n).encode(), reply_to=self.reply_queue, correlation_id=correlation_id)
        while True:
            reply = self.replies.get(timeout=10.0)
            if reply is None:
                raise TimeoutError(f"no reply to fib({n})")
            if reply.correlation_id == correlation_id:
                return int(reply.body)


def main() -> None:
    """Starts the server thread and makes three calls."""
    calls = [10, 20, 30]
    with wharf.connect(URL) as conn:
        conn.declare_queue("rpc_queue")
        ready = threading.Event()
        server = threading.Thread(target=serve, args=(conn, ready, len(calls)))
        server.start()
        ready.wait(timeout=10.0)
        client = FibonacciClient(conn)
        for n in calls:
            print(f" [x] Requesting fib({n})")
            result = client.call(n)
            print(f" [.] Got {result}")
            assert result == fib(n)
        server.join()
        client.replies.cancel()


if __name__ == "__main__":
    main()
