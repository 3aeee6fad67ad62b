"""Smoke runs of the benchmark programs (the full runs are scripts: see benchmarks/README.md).

The detection zoo's quick run trains a few real healthy and pathological runs and must find every fault with no
false alarm: a regression in any built-in detector shows here first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_detection_zoo_quick_run_finds_every_fault_with_no_false_alarm():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rate = re.search(r"detection rate on pathological runs: (\d+)/(\d+)", out.stdout)
    assert rate and int(rate[2]) >= 4 and rate[1] == rate[2], out.stdout[-3000:]
    assert re.search(r"false alarms: 0 in \d+ healthy steps", out.stdout), out.stdout[-3000:]
    assert "monitor errors: 0" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["peers.py", "--quick", "--workload", "mlp", "--threads", "1"],
                                  ["gpu.py", "--cpu", "--tiny"],
                                  ["scale.py", "--quick", "--tensors", "500"]], ids=lambda a: a[0])
def test_the_performance_benchmarks_quick_runs(args, tmp_path):
    """peers.py (every tool side by side), gpu.py on the CPU and scale.py run to the end and print their tables."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path),
                                                                  "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|---|" in out.stdout and re.search(r"monitor errors: 0\b", out.stdout), out.stdout[-3000:]
    assert not re.search(r"monitor errors: [1-9]", out.stdout), out.stdout[-3000:]
