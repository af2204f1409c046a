"""Tutorial 1 with asyncio (``wharf.aio``): the same surface with ``await`` / ``async for``."""

from __future__ import annotations

import asyncio
import os

import wharf
import wharf.aio

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)


async def main() -> None:
    """Sends three messages to ``hello_async`` and receives them."""
    async with wharf.aio.connect(URL) as conn:
        await conn.declare_queue("hello_async")
        results = await conn.publish_many([b"Hello", b"asyncio", b"World!"], routing_key="hello_async")
        assert results == [None, None, None]
        print(" [x] Sent 3 messages")
        async for message in conn.consume("hello_async", prefetch=10, timeout=0.5):
            with message.process():
                print(f" [x] Received {message.body!r}")


if __name__ == "__main__":
    asyncio.run(main())
