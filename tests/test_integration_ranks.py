"""A stop on one rank stops every rank at the same step: Lightning DDP, 2 gloo ranks on CPU, real processes.

Without a service, rank 0 aggregates the job (the peer transport) and the other ranks learn its verdict later,
asynchronously: without an agreement they would stop at different steps and the first to stop would leave the
others waiting in DDP's all-reduce. Each rank records the step it stopped after; they must be equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lightning")

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import lightning.pytorch as pl
    from gfservice.integrations.lightning import GradflowCallback

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", "0"))

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 12 else 1e4)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 8, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1].sin()), batch_size=8)
    callback = GradflowCallback("ddp-stop", service=None,
                                detectors={"exploding": {"stop_run": True}, "nonfinite": {"stop_run": True}})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=50, callbacks=[callback],
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(Regression(), loader)
    mon = callback.monitor
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"global_step": trainer.global_step, "stopped_at": callback.watch.stopped_at,
                   "run": mon.run, "findings": [[f.detector, f.first_step] for f in mon.findings]}, f)
''')


@pytest.mark.slow
def test_lightning_ddp_ranks_stop_together_after_the_same_step(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["stopped_at"] == r1["stopped_at"] is not None  # the same step on both ranks
    assert r0["global_step"] == r1["global_step"] == r0["stopped_at"] + 1 < 50
    first = min(step for detector, step in r0["findings"] if detector in ("exploding", "nonfinite"))
    # the finding at the step the gradients blow up; the verdict reaches the ranks when rank 0's aggregator has
    # merged both ranks' reports of that step (a few steps later on a loaded machine)
    assert 12 <= first <= 14 and first <= r0["stopped_at"]
    assert r0["run"] == r1["run"] == "ddp-stop"
