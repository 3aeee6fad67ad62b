"""What a process really loads: the runtime side of the import-linter contracts in pyproject.toml.

lint-imports checks the static graph; these tests check the modules actually imported, each in a fresh
interpreter so that nothing this pytest process has already loaded (torch, ray) hides a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def _loaded_after(code: str, timeout: float = 120) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_gfservice_loads_neither_torch_ray_nor_the_aggregator():
    loaded = _loaded_after("""
        import json, sys
        import gfservice
        print(json.dumps({m: m in sys.modules for m in ("torch", "ray", "gfservice.service.aggregator")}))
    """)
    assert loaded == {"torch": False, "ray": False, "gfservice.service.aggregator": False}


@pytest.mark.slow
def test_in_process_monitor_never_imports_ray():
    loaded = _loaded_after("""
        import json, sys
        import torch
        import gfservice

        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = gfservice.monitor(model, opt, run="x", service=None)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            opt.zero_grad()
        mon.close()
        assert mon.errors == 0, mon.errors
        print(json.dumps({"ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
    """)
    assert loaded == {"ray": False, "torch": True}
