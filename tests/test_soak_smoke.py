"""A short, small soak of the service (the full one is a script: see benchmarks/README.md, ``soak.py``).

About 35 s of 32 ranks x 1,000 layers into a plain-Python ``ServiceHost`` with snapshots and a scraped
``/metrics``: every accepted report must be merged, and the scrape must stay responsive. The memory target
is not checked here: a 35 s run on a loaded CI machine is too short to tell growth from noise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_keeps_scrapes_fast():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "35", "--ranks", "32",
           "--history", "10", "--warmup", "15", "--flap-every", "10", "--max-scrape-p99-ms", "1000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    assert re.search(r"^lost: 0 \(last step merged 34 of 34", out.stdout, re.M), out.stdout[-3000:]
    assert "rejected 0 {}" in out.stdout, out.stdout[-3000:]
    p99 = re.search(r"scrape /metrics .* p99 ([\d.]+) ms, .* errors 0 ", out.stdout)
    assert p99 and float(p99[1]) < 1000, out.stdout[-3000:]
    flaps = re.search(r"NaN flaps injected (\d+), nonfinite findings raised (\d+) \(active at the end 0\)", out.stdout)
    assert flaps and int(flaps[1]) >= 3 and flaps[1] == flaps[2], out.stdout[-3000:]
