"""Guard mode: a poisoned step kept off the weights (gfservice/training/guard.py, the monitor's ``guard=``)."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gfservice
from gfservice.training.guard import Guard, GuardConfig, judge, limit, replay
from gfservice.training.step_guard import guard_input, judge_on_device, wrap_step
from tests.models import at_end_of_backward, batches, mlp
from tests.promtools import free_port

WARMUP = 10  # a short warm-up keeps the runs short


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, st_ in enumerate(opt.state.values()):
        for k, v in st_.items():
            out[f"s.{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(steps: int, guard=None, poison=None, observe: bool = False, scheduler: str | None = None,
         seed: int = 0, check=None, fused: bool = False):
    """Train a small MLP on digits with Adam (``fused``: ``AdamW(fused=True)``); ``poison(step, x, y)`` may
    replace a batch; ``check(step, before, after, monitor)`` sees the state around each optimizer step."""
    model = mlp(3, width=32, seed=seed)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if fused
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    sched = torch.optim.lr_scheduler.StepLR(opt, 5) if scheduler == "before" else None
    mon = gfservice.monitor(model, opt, run="guard-test", service=None, guard=guard, deep_every=0)
    if scheduler == "after":
        sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    data = batches(32, seed)
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps):
        x, y = next(data)
        if poison is not None:
            x, y = poison(i, x, y)
        loss = loss_fn(model(x), y)
        loss.backward()
        if observe:
            mon.observe(loss)
        before = _state(model, opt)
        opt.step()
        if check is not None:
            check(i, before, _state(model, opt), mon)
        mon.step(loss=loss)
        opt.zero_grad()
        if sched is not None:
            sched.step()
    mon.close()
    return model, opt, mon, sched


def _nan_at(k):
    def poison(i, x, y):
        if i == k:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y
    return poison


def test_a_nan_batch_is_skipped_with_parameters_and_adam_state_untouched(one_thread):
    seen = {}

    def check(i, before, after, mon):
        seen[i] = _equal(before, after)

    model, opt, mon, _ = _run(8, guard=True, poison=_nan_at(3), check=check)
    assert mon.skipped_steps == [(3, "nonfinite_gradient")]
    assert seen[3] and not any(seen[i] for i in seen if i != 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(int(s["step"]) == 7 for s in opt.state.values())  # Adam's step count did not advance at step 3
    rows = mon.history()
    assert [r["step"] for r in rows if r["guard_skip"]] == [3]
    assert rows[-1]["step"] == 7


def test_a_batch_corrupted_1000x_is_skipped_after_the_warm_up(one_thread):
    def poison(i, x, y):
        return (x * 1000, y) if i == 30 else (x, y)

    _, _, mon, _ = _run(36, guard=GuardConfig(warmup=WARMUP), poison=poison)
    assert mon.skipped_steps == [(30, "gradient_norm")]
    assert mon.guard is not None and mon.guard.consecutive == 0


def test_a_non_finite_loss_given_to_observe_is_skipped(one_thread):
    def poison(i, x, y):
        return (x, y) if i != 4 else (torch.full_like(x, float("inf")), y)

    _, _, mon, _ = _run(6, guard="skip", poison=poison, observe=True)
    assert [s for s, _ in mon.skipped_steps] == [4]


def test_a_healthy_run_guarded_ends_bitwise_equal_to_an_unguarded_one(one_thread):
    a, _, mon, _ = _run(60, guard=GuardConfig(warmup=WARMUP))
    b, _, _, _ = _run(60, guard=None)
    assert mon.skipped_steps == [] and mon.errors == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("fused", [False, True])
def test_after_max_consecutive_skips_it_lets_steps_through_raises_critical_and_stops(one_thread, fused):
    cfg = GuardConfig(warmup=WARMUP, max_consecutive=3, stop_run=True)
    _, _, mon, _ = _run(20, guard=cfg, poison=lambda i, x, y: (x * 1000, y) if i >= 12 else (x, y), fused=fused)
    assert [s for s, _ in mon.skipped_steps] == [12, 13, 14]
    (found,) = [f for f in mon.findings if f.detector == "guard"]
    assert found.severity.value == "critical" and found.step == 15
    assert mon.should_stop and "guard" in (mon.stop_reason or "")
    assert mon.guard is not None and [s for s, _ in mon.guard.let_through][:1] == [15]


# ---- fused optimizers: the verdict on the device, found_inf -------------------------------------------------
def _nan_at_3_and_1000x_at_30(i, x, y):
    x, y = _nan_at(3)(i, x, y)
    return (x * 1000, y) if i == 30 else (x, y)


def test_fused_adamw_skips_on_the_device_with_parameters_and_state_bitwise_untouched(one_thread, monkeypatch):
    from gfservice.training import monitoring

    on_device, host = [], []
    monkeypatch.setattr(monitoring, "judge_on_device",
                        lambda *a, **k: on_device.append(a[0]) or judge_on_device(*a, **k))
    monkeypatch.setattr(monitoring, "guard_input", lambda *a, **k: host.append(1) or guard_input(*a, **k))
    seen, skips_seen = {}, {}

    def check(i, before, after, mon):
        seen[i] = _equal(before, after)
        skips_seen[i] = list(mon.skipped_steps)

    _, opt, mon, _ = _run(36, guard=GuardConfig(warmup=WARMUP, device_verdict=True), poison=_nan_at_3_and_1000x_at_30,
                          check=check, fused=True)
    assert on_device == list(range(36)) and not host  # every step judged on the device, none copied first
    assert mon.skipped_steps == [(3, "nonfinite_gradient"), (30, "gradient_norm")]
    assert seen[3] and seen[30] and not any(seen[i] for i in seen if i not in (3, 30))
    assert skips_seen[4] == [(3, "nonfinite_gradient")]  # known by the next step (on CPU at once)
    assert all(int(s["step"]) == 34 for s in opt.state.values())  # exp_avg, exp_avg_sq, step: in _state
    assert "found_inf" not in opt.__dict__
    assert [r["step"] for r in mon.history() if r["guard_skip"]] == [3, 30]
    assert mon.guard is not None and mon.guard.consecutive == 0 and mon.errors == 0


def test_fused_host_path_skips_the_same_steps_and_ends_bitwise_equal(one_thread):
    a, _, dev, _ = _run(36, guard=GuardConfig(warmup=WARMUP, device_verdict=True), poison=_nan_at_3_and_1000x_at_30,
                        fused=True)
    b, _, hst, _ = _run(36, guard=GuardConfig(warmup=WARMUP, device_verdict=False), poison=_nan_at_3_and_1000x_at_30,
                        fused=True)
    assert dev.skipped_steps == hst.skipped_steps == [(3, "nonfinite_gradient"), (30, "gradient_norm")]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_healthy_fused_run_guarded_on_the_device_ends_bitwise_equal_to_an_unguarded_one(one_thread):
    a, opt, mon, _ = _run(60, guard=GuardConfig(warmup=WARMUP, device_verdict=True), fused=True)
    b, _, _, _ = _run(60, guard=None, fused=True)
    assert mon.skipped_steps == [] and mon.errors == 0 and "found_inf" not in opt.__dict__
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_found_inf_set_by_someone_else_counts_too_and_is_put_back():
    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, fused=True)
    theirs = torch.tensor(1.0)  # a GradScaler the monitor was not given: an overflow
    opt.found_inf = theirs
    handle = wrap_step(opt, lambda: torch.tensor(0.0))
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert torch.equal(model.weight, before) and opt.found_inf is theirs
    del opt.found_inf
    opt.step()
    assert not torch.equal(model.weight, before) and "found_inf" not in opt.__dict__
    handle.remove()


def test_clip_rescales_the_gradients_to_the_guard_threshold(one_thread):
    norms = {}

    def check(i, before, after, mon):
        if i == 20:
            norms["moved"] = not _equal(before, after)

    model = mlp(3, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = gfservice.monitor(model, opt, run="guard-clip", service=None, guard=GuardConfig(policy="clip", warmup=WARMUP),
                            deep_every=0)
    data = batches(32, 0)
    for i in range(22):
        x, y = next(data)
        nn.CrossEntropyLoss()(model(x * (1000 if i == 20 else 1)), y).backward()
        pre = float(nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        if i == 20:
            bound = math.exp(limit(list(mon.guard._history), mon.guard.config))
            opt.step()
            after = float(nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            norms.update(pre=pre, after=after, bound=bound)
        else:
            opt.step()
        mon.step()
        opt.zero_grad()
    mon.close()
    assert mon.clipped_steps == [(20, "gradient_norm")] and mon.skipped_steps == []
    assert norms["pre"] > 10 * norms["bound"]
    assert norms["after"] == pytest.approx(norms["bound"], rel=1e-4)


@pytest.mark.parametrize("made", ["before", "after"])
def test_a_learning_rate_scheduler_stays_in_step_without_a_warning(one_thread, made):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler's "optimizer.step() overridden / called after" warnings
        _, opt, mon, sched = _run(12, guard=True, poison=_nan_at(0), scheduler=made)
    assert mon.skipped_steps == [(0, "nonfinite_gradient")]
    assert sched is not None and sched.last_epoch == 12
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1**2)
    for group in opt.param_groups:  # close() took the guard off: a NaN step goes through again
        for p in group["params"]:
            p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.isnan(p).all() for g in opt.param_groups for p in g["params"])


def test_guard_errors_never_reach_the_training_loop(one_thread, monkeypatch):
    from gfservice.training import monitoring

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(monitoring, "guard_input", broken)
    _, _, mon, _ = _run(4, guard=True, poison=_nan_at(2))
    assert mon.skipped_steps == [] and mon.errors >= 4


def test_bad_guard_values_are_refused():
    with pytest.raises(ValueError, match="guard="):
        gfservice.monitor(nn.Linear(2, 1), None, service=None, guard="sometimes")


# ---- the rule, alone ---------------------------------------------------------------------------------------
finite_logs = st.lists(st.floats(-20, 20), min_size=0, max_size=60)


@settings(max_examples=60, deadline=None)
@given(finite_logs, st.floats(1e-30, 1e30))
def test_a_step_within_the_ratio_of_the_median_is_never_poisoned(history, norm):
    cfg = GuardConfig(warmup=5)
    v = judge(cfg, norm, history)
    if len(history) >= cfg.warmup and math.log(norm) <= float(np.median(history)) + math.log(cfg.ratio):
        assert not v.poisoned
    if len(history) < cfg.warmup:
        assert not v.poisoned


@settings(max_examples=60, deadline=None)
@given(finite_logs, st.floats(0, 1e30))
def test_non_finite_values_are_always_poisoned_and_the_verdict_is_pure(history, norm):
    guard = Guard(GuardConfig(warmup=5))
    for i, h in enumerate(history):
        guard.settle(i, guard.verdict(math.exp(h)))
    kept = list(guard._history)
    assert guard.verdict(float("nan")).reason == "nonfinite_gradient"
    assert guard.verdict(norm, loss=float("-inf")).reason == "nonfinite_loss"
    assert guard.verdict(norm) == guard.verdict(norm)
    assert list(guard._history) == kept


@settings(max_examples=40, deadline=None)
@given(st.floats(2.0, 1e6))
def test_a_jump_far_above_a_steady_history_is_poisoned(factor):
    rng = np.random.default_rng(0)
    history = list(rng.normal(0.0, 0.05, 50))
    v = judge(GuardConfig(), math.exp(max(history)) * factor, history)
    assert v.poisoned == (math.log(factor) + max(history) > limit(history, GuardConfig()))


def test_replay_counts_what_a_configuration_would_have_skipped():
    rows = [(i, 1.0 + 0.1 * (i % 2), False, 0.3) for i in range(40)] + [(40, 1e4, False, 0.3)]
    assert replay(GuardConfig(), rows).skipped == [(40, "gradient_norm")]
    assert replay(GuardConfig(ratio=1e5), rows).skipped == []


# ---- DDP: every rank skips the same steps ---------------------------------------------------------------------
def _join(rank: int, port: int) -> None:
    """Join a 2-rank gloo process group on CPU (one thread)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)


def _leave() -> None:
    torch.distributed.barrier()
    os._exit(0)  # no destroy_process_group(): gloo's can deadlock in its destructor


def _two_ranks(worker, out: str) -> None:
    torch.multiprocessing.spawn(worker, args=(free_port(), out), nprocs=2, join=True)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    model = nn.parallel.DistributedDataParallel(mlp(3, width=16, seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = gfservice.monitor(model, opt, run="guard-ddp", service=None, deep_every=0,
                            guard=GuardConfig(warmup=WARMUP))
    data = batches(16, seed=rank)  # each rank its own shard
    for i in range(24):
        x, y = next(data)
        if rank == 1 and i == 15:
            x = x * 1000  # one rank's garbage batch: the all-reduced gradient explodes on both
        if rank == 0 and i == 19:
            x = x.clone()
            x[0, 0] = float("nan")  # one rank's NaN: NaN on both after the all-reduce
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()] +
                     [v.reshape(-1) for s in opt.state.values() for v in s.values()])
    np.save(f"{out}.{rank}.npy", flat.numpy())
    with open(f"{out}.{rank}.txt", "w") as f:
        f.write(repr(mon.skipped_steps))
    torch.distributed.barrier()
    mon.close()
    _leave()


@pytest.mark.slow
def test_two_ddp_ranks_skip_the_same_steps_and_stay_bitwise_equal(tmp_path):
    out = str(tmp_path / "ddp")
    _two_ranks(_ddp_worker, out)
    skips = [Path(f"{out}.{r}.txt").read_text() for r in (0, 1)]
    assert skips[0] == skips[1] == "[(15, 'gradient_norm'), (19, 'nonfinite_gradient')]"
    a, b = (np.load(f"{out}.{r}.npy") for r in (0, 1))
    assert np.array_equal(a, b) and np.isfinite(a).all()


# ---- FSDP2: every rank judges the same global numbers ----------------------------------------------------------
FSDP_POISONED = (15, 19, 22)


def _fsdp_train(rank: int, guarded: bool, policy: str = "skip") -> tuple[list, dict[str, torch.Tensor]]:
    """A 2-rank fully_shard MLP trained 26 steps: rank 1 gets a batch whose loss is x1000 at step 15, rank 0 a NaN
    batch at step 19 and, at step 22, a gradient corrupted x1e4 in its own shard of the first layer only (its
    local norm jumps, the other rank's does not). Guarded, or unguarded with the poisoned steps skipped by hand
    (the expectation). Returns the steps acted on (skipped, then clipped) and the full parameters and this rank's
    optimizer state."""
    from torch.distributed.fsdp import fully_shard

    model = mlp(3, width=16, seed=0)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = gfservice.monitor(model, opt, run=f"guard-fsdp-{guarded}", service=None, deep_every=0,
                            guard=GuardConfig(warmup=WARMUP, policy=policy)) if guarded else None
    data = batches(16, seed=rank)  # each rank its own shard of the data
    for i in range(26):
        x, y = next(data)
        if rank == 0 and i == 19:
            x = x.clone()
            x[0, 0] = float("nan")
        if rank == 0 and i == 22:
            first = next(model.parameters())
            at_end_of_backward(model, lambda p=first: p.grad.to_local().mul_(1e4))
        loss = nn.functional.cross_entropy(model(x), y) * (1000.0 if rank == 1 and i == 15 else 1.0)
        loss.backward()
        if mon is not None:
            mon.observe(loss)
            opt.step()
            mon.step(loss=loss)
        elif i not in FSDP_POISONED:
            opt.step()
        opt.zero_grad()
    out = {f"p.{n}": p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    for j, state in enumerate(opt.state.values()):
        out.update({f"s.{j}.{k}": (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                    for k, v in state.items()})
    acted = [list(mon.skipped_steps), list(mon.clipped_steps), mon.errors] if mon is not None else []
    if mon is not None:
        mon.close()
    return acted, out


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    acted, guarded = _fsdp_train(rank, guarded=True)
    _, expected = _fsdp_train(rank, guarded=False)
    clip, clipped = _fsdp_train(rank, guarded=True, policy="clip")
    same = guarded.keys() == expected.keys() and all(torch.equal(guarded[k], expected[k]) for k in guarded)
    finite = all(bool(torch.isfinite(v).all()) for v in guarded.values())
    full = torch.cat([v.reshape(-1) for k, v in sorted(guarded.items()) if k.startswith("p.")])
    np.save(f"{out}.{rank}.npy", full.numpy())
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"acted": acted, "clip": clip, "same": same, "finite": finite,
                   "clip_finite": all(bool(torch.isfinite(v).all()) for v in clipped.values())}, f)
    _leave()


@pytest.mark.slow
def test_two_fsdp_ranks_agree_on_every_verdict_and_end_as_if_the_poisoned_steps_were_skipped(tmp_path):
    out = str(tmp_path / "fsdp")
    _two_ranks(_fsdp_worker, out)
    got = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["acted"] == got[1]["acted"]
    skipped, clipped, errors = got[0]["acted"]
    assert [s for s, _ in skipped] == list(FSDP_POISONED) and clipped == [] and errors == 0
    # policy="clip": the same verdicts; the norm explosions rescaled by the global norm, the NaN step skipped
    assert got[0]["clip"] == got[1]["clip"] == [[[19, "nonfinite_gradient"]], [[15, "gradient_norm"],
                                                                               [22, "gradient_norm"]], 0]
    assert got[0]["clip_finite"]
    assert got[0]["same"] and got[1]["same"]  # bitwise the run whose poisoned steps were skipped by hand
    assert got[0]["finite"] and got[1]["finite"]
    assert np.array_equal(np.load(f"{out}.0.npy"), np.load(f"{out}.1.npy"))


def test_copy_of_config_is_frozen():
    cfg = GuardConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.z = 1.0  # type: ignore[misc]
    assert copy.deepcopy(cfg) == cfg


# ---- backtest: what a guard would have skipped on a saved history ------------------------------------------------
def test_cli_backtest_replays_a_guard_over_a_saved_history(one_thread, tmp_path, capsys):
    from gfservice.cli.main import main
    from gfservice.observability import history

    def poison(i, x, y):
        if i == 30:
            return x * 1000, y
        return _nan_at(35)(i, x, y)  # the last step: unguarded, a NaN update makes every later step NaN

    _, _, mon, _ = _run(36, guard=None, poison=poison)
    path = tmp_path / "run.npz"
    history.save(path, mon.transport.aggregator.history(mon.run), [])
    assert main(["backtest", str(path), "--guard", "--guard-set", "warmup=10"]) == 0
    out = capsys.readouterr().out
    assert "the guard would have skipped 2 steps of 36" in out
    assert main(["backtest", str(path), "--guard", "--guard-set", "warmup=10", "--guard-set", "ratio=1e9",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [[35, "nonfinite_gradient"]]
    assert main(["backtest", str(path), "--guard", "--guard-set", "policy=sometimes"]) == 1
    assert "policy" in capsys.readouterr().err


def test_a_learning_rate_spike_is_skipped_and_schedules_that_rise_are_not(one_thread):
    """A one-step LR x100 (a scheduler bug): its gradients look normal, the update is the damage; it is skipped.
    Warm-up and warm restarts (an LR the run used before) are never skipped."""
    model = mlp(3, width=32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=30)
    restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=20)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, restarts], milestones=[30])
    mon = gfservice.monitor(model, opt, run="lr-guard", service=None, guard=GuardConfig(warmup=WARMUP),
                            deep_every=0)
    data, loss_fn = batches(32, 0), nn.CrossEntropyLoss()
    for i in range(100):
        x, y = next(data)
        loss_fn(model(x), y).backward()
        spike = i == 70
        if spike:
            for g in opt.param_groups:
                g["lr"] *= 100
        before = _state(model, opt)
        opt.step()
        assert _equal(before, _state(model, opt)) == spike, f"step {i}"
        if spike:
            for g in opt.param_groups:
                g["lr"] /= 100
        mon.step()
        opt.zero_grad()
        sched.step()
    mon.close()
    assert mon.skipped_steps == [(70, "learning_rate")]
