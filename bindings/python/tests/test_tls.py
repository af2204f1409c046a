"""TLS from Python (issue #18): a broker serving TLS only, with certificates made by
`wharf tls gen`; the blocking and asyncio APIs over ``wharfs://`` with ``ca=``, a client
certificate with ``external=True``, and an untrusted broker refused with ConnectError."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, server_binary, start_server, unique

import wharf
import wharf.aio


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "made"
    # A client certificate for guest: the broker's default user, with every permission on /.
    subprocess.run(
        [server_binary(), "tls", "gen", "--dir", str(directory), "--client", "guest"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return directory


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Server]:
    config = f"""
plaintext = false
tls_bind = "127.0.0.1:0"
tls_cert = "{certs / 'server.pem'}"
tls_key = "{certs / 'server.key'}"
tls_client_ca = "{certs / 'ca.pem'}"
"""
    srv = start_server(tmp_path_factory.mktemp("wharf-tls-data"), config)
    yield srv
    srv.stop()


def test_publish_and_consume_over_tls(tls_server: Server, certs: Path) -> None:
    with wharf.connect(f"wharfs://{tls_server.addr}", ca=certs / "ca.pem") as conn:
        queue = conn.declare_queue(unique("tls")).name
        for n in range(100):
            conn.publish(queue, f"m{n}".encode() * 1000)
        with conn.consume(queue, auto_ack=True) as consumer:
            bodies = [message.body for message in consumer.next_batch(100, max_wait=2.0, timeout=10.0)]
        assert bodies == [f"m{n}".encode() * 1000 for n in range(100)]


def test_asyncio_over_tls_with_a_client_certificate(tls_server: Server, certs: Path) -> None:
    async def main() -> bytes:
        async with wharf.aio.connect(
            f"wharfs://{tls_server.addr}",
            ca=str(certs / "ca.pem"),
            cert=str(certs / "guest.pem"),
            key=str(certs / "guest.key"),
            external=True,
        ) as conn:
            queue = (await conn.declare_queue(unique("tls-aio"))).name
            await conn.publish(queue, b"as guest, by certificate")
            async for message in conn.consume(queue, prefetch=10, timeout=5.0):
                with message.process():
                    return message.body
        raise AssertionError("no message")

    assert asyncio.run(main()) == b"as guest, by certificate"


def test_an_untrusted_broker_and_plaintext_to_tls_are_connect_errors(tls_server: Server, certs: Path) -> None:
    with pytest.raises(wharf.ConnectError, match="invalid peer certificate"):
        # Without ca=, the system's roots: they do not know this self-made CA.
        wharf.connect(f"wharfs://{tls_server.addr}")
    with pytest.raises(wharf.WharfError, match="wharfs://"):
        wharf.connect(f"wharf://{tls_server.addr}")
    with pytest.raises(wharf.ConnectError, match="use wharfs://"):
        wharf.connect(f"wharf://{tls_server.addr}", ca=certs / "ca.pem")
