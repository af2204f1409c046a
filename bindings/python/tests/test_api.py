"""The package's surface: stubs match the native module, every public name is documented."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import wharf
import wharf.aio
import wharf.errors


def test_native_stubs_match_the_runtime(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "wharf._wharf"],
        cwd=tmp_path,  # not the source tree, so mypy sees the installed package only once
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def public_names() -> list[tuple[str, object]]:
    names: list[tuple[str, object]] = []
    for module in (wharf, wharf.aio, wharf.errors):
        for name in module.__all__:
            names.append((f"{module.__name__}.{name}", getattr(module, name)))
    return names


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for qualified, value in public_names():
        if not (inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)):
            continue  # constants and type aliases are documented in the module source
        if not inspect.getdoc(value):
            missing.append(qualified)
        if inspect.isclass(value) and not issubclass(value, BaseException):
            for attr, member in vars(value).items():
                if attr.startswith("_") or attr in {"name", "value"} and issubclass(value, int):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{qualified}.{attr}")
    assert missing == []


def test_sync_and_asyncio_connections_offer_the_same_operations() -> None:
    def operations(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert operations(wharf.Connection) == operations(wharf.aio.Connection)
