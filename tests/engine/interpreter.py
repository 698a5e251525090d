"""Triton kernels run by Triton's interpreter on the CPU, in a subprocess: TRITON_INTERPRET
is read when the kernels are defined, so it cannot be switched on inside the test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, cases: list, per_case: int = 1) -> list:
    """The script's JSON lines, `per_case` per case, run under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == per_case * len(cases)
    return results
