#!/usr/bin/env python3
"""Broker memory with many idle connections (issue #8's "10 k idle connections" target).

Opens N raw TCP connections to a running broker, completes the handshake on each (the
preamble, then the golden `Hello` vector of crates/wharf-protocol/tests/vectors/hello.hex),
waits for every `HelloOk`, keeps them all open and idle, and prints the broker's VmRSS a
second later. Start the broker with a file limit above N (`ulimit -n 30000`).

    python3 benches/scripts/idle_connections.py PORT BROKER_PID [N]
"""

import pathlib
import resource
import socket
import sys
import time

PREAMBLE = b"WHRF\x00\x01\x00\x01"
VECTOR = pathlib.Path(__file__).resolve().parents[2] / "crates/wharf-protocol/tests/vectors/hello.hex"


def hello_frame() -> bytes:
    hex_digits = "".join(
        line for line in VECTOR.read_text().splitlines() if not line.startswith("#")
    )
    return bytes.fromhex(hex_digits)


def read_exactly(sock: socket.socket, n_bytes: int) -> bytes:
    data = b""
    while len(data) < n_bytes:
        chunk = sock.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("the broker closed a connection during the handshake")
        data += chunk
    return data


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    n_connections = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n_connections + 100)), hard))
    before = rss_kib(pid)
    hello = PREAMBLE + hello_frame()
    sockets = []
    for _ in range(n_connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(hello)
        sockets.append(sock)
    for sock in sockets:
        # Any minor of major 1: the broker answers with its own minor.
        if read_exactly(sock, 8)[:6] != PREAMBLE[:6]:
            raise ConnectionError("unexpected preamble from the broker")
        length = int.from_bytes(read_exactly(sock, 4), "big")
        frame = read_exactly(sock, length)
        if frame[0] != 1:  # HelloOk
            raise ConnectionError(f"handshake refused (frame kind {frame[0]})")
    time.sleep(1.0)
    after = rss_kib(pid)
    print(
        f"{n_connections} idle connections: broker VmRSS {after / 1024:.1f} MB "
        f"(before {before / 1024:.1f} MB)"
    )
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    main()
