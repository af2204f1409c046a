"""Queue features 3, "Retries": a retry schedule, a dead-letter queue, and redrive.

``payments`` retries a failed message after 0.1 s, then 0.2 s, then 0.4 s (``retry``, the
``x-retry`` argument); failing once more, the message is dead-lettered to ``payments.failed``
with an ``x-death`` record saying why and where it died. Once the cause is fixed, ``redrive``
moves it back to the queue it died in (``wharf dlq redrive payments.failed`` from a shell).

``with message.process(requeue=True):`` acks when the block succeeds and nacks with requeue when
it raises: the requeue is what walks the schedule.
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
QUEUE = "payments"
FAILED = "payments.failed"
SCHEDULE = [0.1, 0.2, 0.4]


def charge(order: bytes, gateway_up: bool) -> None:
    """Charges an order; raises while the payment gateway is down."""
    if not gateway_up:
        raise ConnectionError("payment gateway unavailable")
    print(f" [x] Charged {order!r}")


def main() -> None:
    """Fails every attempt until the message is dead-lettered, then redrives and charges it."""
    with wharf.connect(URL) as conn:
        conn.declare_queue(FAILED, durable=True)
        conn.declare_queue(
            QUEUE,
            durable=True,
            retry=SCHEDULE,
            dead_letter_exchange="",  # the default exchange routes by queue name ...
            dead_letter_routing_key=FAILED,  # ... so dead letters land in payments.failed
        )
        conn.publish(QUEUE, b"order 42: 12.50 EUR", persistent=True)

        with conn.consume(QUEUE, prefetch=1, timeout=5.0) as consumer:
            for message in consumer:
                print(f" [x] Attempt {message.delivery_count} for {message.body!r}")
                try:
                    with message.process(requeue=True):
                        charge(message.body, gateway_up=False)
                except ConnectionError as err:
                    print(f"     failed: {err}")
                if message.delivery_count == len(SCHEDULE) + 1:
                    break  # the schedule is exhausted: this failure dead-lettered it

        with conn.consume(FAILED, prefetch=1) as dead_letters:
            dead = dead_letters.get(timeout=5.0)
            assert dead is not None
            deaths = dead.headers["x-death"]
            assert isinstance(deaths, list) and isinstance(deaths[0], dict)
            print(f" [x] Dead-lettered: {dead.body!r}, reason {deaths[0]['reason']!r} in {deaths[0]['queue']!r}")
            dead.nack(requeue=True)  # leave it in the dead-letter queue for now

        # The gateway is back: move the dead letters back to where they failed.
        moved = conn.redrive(FAILED)
        print(f" [x] Redriven {moved} message(s) back to {QUEUE!r}")
        with conn.consume(QUEUE, prefetch=1) as consumer:
            redriven = consumer.get(timeout=5.0)
            assert redriven is not None and "x-death" not in redriven.headers
            with redriven.process():
                charge(redriven.body, gateway_up=True)
        conn.delete_queue(QUEUE)  # so that the example can run again
        conn.delete_queue(FAILED)


if __name__ == "__main__":
    main()
