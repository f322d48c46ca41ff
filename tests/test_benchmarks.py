"""The benchmark scripts run end to end on the tiny model (``--quick``) so they cannot rot between releases.

Their figures are meaningless here; what is checked is that each script runs, measures every system it
names, and writes the JSON report the README and benchmarks/README.md are built from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True,
                         text=True, env=env, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [line for line in out.stderr.splitlines() if line.startswith("written: ")]
    assert written, out.stderr[-2000:]
    path = Path(written[-1].removeprefix("written: "))
    report = json.loads(path.read_text())
    path.unlink()  # a smoke run's figures are not results
    return report


def test_export_bench_quick(tiny_models):
    report = run_script("export_bench.py", "--quick")
    systems = {r["system"]: r for r in report["results"]}
    assert set(systems) == {"edgeqwen int4 (default)", "edgeqwen int8", "genai builder int4 (default)"}
    for r in systems.values():
        assert r["exit"] == 0 and r["wall_s"] > 0 and r["size_mb"] > 0
    # int8 holds twice the bits of int4 in the body: its bundle must be the larger one
    assert systems["edgeqwen int8"]["size_mb"] > systems["edgeqwen int4 (default)"]["size_mb"]
