"""``gfservice demo`` end to end, as a user runs it: its own embedded Ray, the service, a real 2-worker
Ray Train job with an injected fault, a summary table and exit code 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_reports_the_fault(tmp_path):
    report = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "gfservice", "demo", "--steps", "30", "--fault", "nan@15", "--run", "demo-test",
         "--report", str(report)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "last merged step 29, finished, 0 reports dropped" in out
    assert "detector" in out and "severity" in out  # the summary table
    table = out[out.index("detector  "):]
    assert "nonfinite" in table and "critical" in table and " 15 " in table
    assert report.exists() and report.stat().st_size > 10_000
    assert "<img" in report.read_text()
