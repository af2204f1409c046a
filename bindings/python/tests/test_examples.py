"""Runs every tutorial and queue-feature example in examples/python against the test server;
each must finish by itself and print its expected line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "python"
EXPECTED_OUTPUT = {
    "hello_world.py": "Received b'Hello World!'",
    "work_queue.py": "All 5 tasks done",
    "publish_subscribe.py": "[subscriber 1] Received",
    "routing.py": "[errors to disk] Received ['error:Crashed']",
    "topics.py": "[critical (*.critical)] Received ['kern.critical', 'cron.critical']",
    "headers.py": "[pdf reports (all)] Received ['monthly pdf report']",
    "rpc.py": "Got 832040",
    "asyncio_hello.py": "Received b'World!'",
    # The queue features (docs/user-guide.md), one example each.
    "priorities.py": "Processed in order: ['password reset', 'account locked', 'thumbnail', 'weekly report'",
    "delayed_delivery.py": "Reminders delivered in order: ['call the customer back', 'send the invoice']",
    "retries.py": "Redriven 1 message(s) back to 'payments'\n [x] Charged b'order 42: 12.50 EUR'",
    "ttl.py": "Expired b'EURUSD 1.0842': reason 'expired' in 'quotes'",
    "dedup.py": "Queue holds 2 charges; 3 duplicates dropped",
    "leases.py": "Took over b'render outro.mp4' (redelivered=True)",
}


def test_every_example_is_run_by_this_suite() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("script", sorted(EXPECTED_OUTPUT))
def test_example_runs_to_completion(script: str, url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env={**os.environ, "WHARF_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert EXPECTED_OUTPUT[script] in result.stdout, result.stdout
