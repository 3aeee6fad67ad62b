"""Guard mode under Ray Train: a real ``TorchTrainer`` job (2 gloo workers, DDP, Adam) with a NaN in rank 1's batch
at one step. Each worker writes what its guard skipped and its final parameters and Adam state to a file the test
reads: both skipped that step, and both end with equal, finite parameters and Adam step counts one short."""

from __future__ import annotations

import json
import math
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, NAN_AT = 8, 4


def _guarded_loop(config: dict) -> None:  # nested imports: Ray pickles it by value
    from pathlib import Path

    import torch as _torch

    import gfservice as _gfservice

    _torch.set_num_threads(1)
    _torch.manual_seed(0)
    rank = _torch.distributed.get_rank()
    model = _torch.nn.parallel.DistributedDataParallel(
        _torch.nn.Sequential(_torch.nn.Linear(8, 16), _torch.nn.Tanh(), _torch.nn.Linear(16, 1)))
    opt = _torch.optim.Adam(model.parameters(), lr=0.01)
    mon = _gfservice.monitor(model, opt, run=config["run"], deep_every=0, guard=True)
    data = _torch.Generator().manual_seed(rank)  # each rank its own batches
    for step in range(config["steps"]):
        x, y = _torch.randn(16, 8, generator=data), _torch.randn(16, 1, generator=data)
        if rank == 1 and step == config["nan_at"]:
            x[0, 0] = float("nan")
        loss = _torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    out = {"rank": rank, "skipped": mon.skipped_steps, "errors": mon.errors,
           "params": [p.detach().double().flatten().tolist() for p in model.parameters()],
           "adam_steps": [float(opt.state[p]["step"]) for p in model.parameters()]}
    mon.close()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def test_ray_train_ranks_skip_the_same_nan_step_and_stay_equal(service, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = "t-guard-ray"
    trainer = TorchTrainer(
        _guarded_loop,
        train_loop_config={"run": run, "steps": STEPS, "nan_at": NAN_AT, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=run, storage_path=str(tmp_path / "ray")),
    )
    t0 = time.monotonic()
    trainer.fit()
    print(f"\nRay Train job with guard=True: {time.monotonic() - t0:.1f} s")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["skipped"] == [[NAN_AT, "nonfinite_gradient"]], r["skipped"]
        assert r["errors"] == 0
        assert r["adam_steps"] == [STEPS - 1] * len(r["adam_steps"]), "the skipped step left Adam's step alone"
    assert r0["params"] == r1["params"], "both ranks skipped the same step: the replicas stay equal"
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    latest = service.latest(run)
    assert latest is not None and latest.step == STEPS - 1 and math.isfinite(latest.global_norm)
