"""DeepSpeed ZeRO 2 and 3 on CPU, 2 gloo ranks in real processes: each rank reports its own gradient partition,
the merged statistics equal those of the full gradients, and an exploding learning rate stops both ranks after
the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.deepspeed  # run with `pytest -m deepspeed` after `pip install deepspeed`

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from gfservice.integrations.deepspeed import monitor

    out, rank = sys.argv[1], int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 8 else 1e4)
        cfg = {"train_micro_batch_size_per_gpu": 8, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
        mon = monitor(engine, run=f"zero{stage}", service=None, deep_every=4,
                      detectors={"exploding": {"stop_run": True}, "nonfinite": {"stop_run": True}})
        g = torch.Generator().manual_seed(rank)
        reference, steps = {}, 0
        for step in range(30):
            x = torch.randn(8, 8, generator=g)
            loss = engine(x).sub(x[:, :3].sin()).pow(2).mean()
            engine.backward(loss)
            if step == 2:  # the full gradients, assembled by DeepSpeed (a collective: every rank calls it)
                for name, p in engine.module.named_parameters():
                    full = safe_get_full_grad(p)
                    reference[name] = [float(full.double().square().sum()), int(full.numel())]
            mon.step(loss)
            engine.step()
            steps += 1
            if mon.should_stop:
                break
        m = mon.monitor
        rows = m.history(per_layer=True) if rank == 0 else []
        result[stage] = {"steps": steps, "stopped_at": mon.watch.stopped_at, "reference": reference,
                         "errors": m.errors,
                         "deep": [s.step for s in m._merged_steps() if s.grads.update_sq is not None] if rank == 0
                         else [],
                         "merged": {r["layer"]: [r["norm"] ** 2, r["count"]] for r in rows if r["step"] == 2},
                         "findings": [[f.detector, f.first_step] for f in m.findings] if rank == 0 else []}
        mon.close()
    # guard mode under ZeRO-2: a NaN loss on rank 1 at step 5 and a x1000 loss on rank 0 at step 25 poison the
    # reduced gradient partitions of both ranks; both skip those steps (judged at mon.step(), before ZeRO frees
    # its partitions; one all-reduce agrees the shards' verdict) and their weights stay equal
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    mon = monitor(engine, run="zero2-guard", service=None, guard=True)
    g = torch.Generator().manual_seed(rank)
    for step in range(30):
        x = torch.randn(8, 8, generator=g)
        loss = engine(x).sub(x[:, :3].sin()).pow(2).mean()
        if step == 5 and rank == 1:
            loss = loss * float("nan")
        if step == 25 and rank == 0:
            loss = loss * 1000.0
        engine.backward(loss)
        mon.step(loss)
        engine.step()
    weights = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    result["guard"] = {"skipped": [s for s, _ in mon.monitor.skipped_steps], "errors": mon.monitor.errors,
                       "finite": bool(torch.isfinite(weights).all()), "sum": float(weights.double().sum())}
    mon.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
''')


@pytest.mark.slow
def test_deepspeed_zero_partitions_merge_exactly_and_ranks_stop_together(tmp_path):
    script = tmp_path / "zero.py"
    script.write_text(SCRIPT)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for stage in ("2", "3"):
        a, b = r0[stage], r1[stage]
        ref = a["reference"]
        assert set(a["merged"]) == set(ref) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for layer, (sum_sq, count) in a["merged"].items():  # the shards, merged: the full gradient's statistics
            assert count == ref[layer][1]
            assert np.isclose(sum_sq, ref[layer][0], rtol=1e-5), (stage, layer)
        assert a["stopped_at"] == b["stopped_at"] is not None and a["steps"] == b["steps"] == a["stopped_at"] + 1
        assert a["errors"] == b["errors"] == 0 and 4 in a["deep"]  # weight and update norms from the fp32 partitions
        first = min(step for detector, step in a["findings"] if detector in ("exploding", "nonfinite"))
        assert 8 <= first <= 10 and first <= a["stopped_at"] < 29
        # no rank reads as stalled: rank 0's history waits for its own reports (they travel over its socket)
        assert "stalled_rank" not in {detector for detector, _ in a["findings"]}
    a, b = r0["guard"], r1["guard"]
    assert a["skipped"] == b["skipped"] == [5, 25] and a["errors"] == b["errors"] == 0
    assert a["finite"] and b["finite"] and a["sum"] == b["sum"]
