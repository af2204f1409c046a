"""Fixtures: a real `wharf serve` on 127.0.0.1 with an ephemeral port and a temp data dir.

The server binary comes from `WHARF_BIN` (`cargo xtask test` builds it and sets it); by hand:
`WHARF_BIN=target/debug/wharf pytest bindings/python/tests`.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TypeVar

import pytest

import wharf

REPO_ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 30.0

T = TypeVar("T")


def wait_for(condition: Callable[[], Optional[T]], timeout: float = 10.0, what: str = "condition") -> T:
    """Polls `condition` until it returns a truthy value, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def server_binary() -> str:
    path = os.environ.get("WHARF_BIN")
    if path:
        return path
    fallback = REPO_ROOT / "target" / "debug" / "wharf"
    if fallback.exists():
        return str(fallback)
    raise RuntimeError("set WHARF_BIN to the `wharf` server binary (cargo build --bin wharf)")


@dataclass
class Server:
    """A running `wharf serve`."""

    process: subprocess.Popen[str]
    addr: str
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"wharf://{self.addr}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(data_dir: Path, config: Optional[str] = None) -> Server:
    """Starts the server on port 0 and reads its address from the "wharf is listening" log."""
    args = [server_binary(), "serve", "--bind", "127.0.0.1:0", "--data-dir", str(data_dir), "--log-format", "json"]
    if config is not None:
        config_path = data_dir.parent / f"{data_dir.name}.toml"
        config_path.write_text(config)
        args += ["--config", str(config_path)]
    env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    logs: list[str] = []
    found: list[str] = []
    listening = threading.Event()

    def read_logs() -> None:
        assert process.stderr is not None
        for line in process.stderr:  # keeps draining, so the server never blocks on its log
            logs.append(line)
            if not listening.is_set() and "wharf is listening" in line:
                try:
                    found.append(json.loads(line)["fields"]["addr"])
                except (ValueError, KeyError):
                    found.append(line.split("addr=")[1].split()[0])
                listening.set()
        listening.set()

    threading.Thread(target=read_logs, daemon=True).start()
    if not listening.wait(STARTUP_TIMEOUT_S) or not found:
        process.kill()
        raise RuntimeError("wharf serve did not start:\n" + "".join(logs))
    return Server(process, found[0], logs)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("wharf-data"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def url(server: Server) -> str:
    return server.url


@pytest.fixture
def conn(url: str) -> Iterator[wharf.Connection]:
    with wharf.connect(url) as connection:
        yield connection


@pytest.fixture
def queue(conn: wharf.Connection) -> str:
    """A fresh queue name, declared."""
    name = f"q-{uuid.uuid4().hex[:12]}"
    conn.declare_queue(name)
    return name


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
