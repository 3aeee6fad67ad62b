"""The multi-rank detectors (``rank_divergence``, ``straggler``, ``noise_scale``), the noise-scale estimator of
:mod:`gfservice.stats` and its ``gradflow_noise_scale`` gauge; synthetic per-rank steps, plus one real 3-rank DDP
run (gloo, CPU processes) in which a rank straggles."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from gfservice.api import StepStats
from gfservice.observability.exporter import GradflowCollector
from gfservice.service.aggregator import Aggregator
from gfservice.stats import noise_scale
from gfservice.testing import check_detector, make_step, replay
from gfservice.wire import Layout
from gfservice_detectors.noise_scale import NoiseScale
from gfservice_detectors.rank_divergence import RankDivergence, nanmedian_columns
from gfservice_detectors.straggler import Straggler

REPO = Path(__file__).resolve().parents[1]


def norm_steps(n: int = 120, world: int = 4, noise: float = 0.3, seed: int = 0, rank: int = 2, onset: int | None = 60,
               factor: float = 3.0, until: int | None = None, compute_time: bool = True) -> list[StepStats]:
    """Steps whose ranks' local norms are exchangeable log-normal noise; ``rank`` x ``factor`` from ``onset``."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, noise, (n, world)))
    if onset is not None:
        norms[onset:until, rank] *= factor
    return [make_step(step=i, sum_sq=[1.0], rank_norm=v, compute_time=[0.1] * world if compute_time else None)
            for i, v in enumerate(norms)]


def time_steps(times: np.ndarray, step_time: Sequence[float] | None = None, ddp: bool = True) -> list[StepStats]:
    """Steps with per-rank compute times ``times`` (DDP: equal step times), or, without DDP, step times only."""
    world = times.shape[1]
    out = []
    for i, t in enumerate(times):
        if ddp:
            out.append(make_step(step=i, sum_sq=[1.0], compute_time=t, step_time=step_time or [t.max() + 0.01] * world))
        else:
            out.append(make_step(step=i, sum_sq=[1.0], step_time=t))
    return out


def firsts(findings) -> dict[str, tuple[int, list[int]]]:
    out: dict[str, tuple[int, list[int]]] = {}
    for f in findings:
        out.setdefault(f.key, (f.step, f.ranks))
    return out


# ---- rank_divergence ---------------------------------------------------------------------------------------------
def test_rank_divergence_contract():
    check_detector(RankDivergence, norm_steps(until=100))
    check_detector(RankDivergence, norm_steps(world=2, rank=1, factor=6.0))
    check_detector(RankDivergence, norm_steps(onset=None))


def test_rank_divergence_names_the_rank_within_the_window():
    found = replay(RankDivergence(), norm_steps())
    assert firsts(found) == {"rank2": (75, [2])}
    assert {f.severity.value for f in found} == {"warning"}
    assert found[0].value >= found[0].threshold >= 1.5 and found[-1].value == pytest.approx(3.0, rel=0.3)
    assert "rank 2" in found[0].message and "median of the 4 ranks" in found[0].message
    assert len(found) == 120 - 75  # raised at every step while it persists (one key: one active finding)


def test_rank_divergence_lower_norm_and_clearing():
    det = RankDivergence()
    steps = norm_steps(factor=0.25, until=100, n=160)
    by_step = {s.step: det.update(s) for s in steps}
    fired = [i for i, f in by_step.items() if f]
    assert fired[0] <= 60 + 20 and all(f.ranks == [2] for i in fired for f in by_step[i])
    assert "has been 1/" in by_step[fired[0]][0].message and min(f.value for i in fired for f in by_step[i]) < 0.4
    assert by_step[159] == []  # rank 2 back among the others: cleared


@pytest.mark.parametrize("world", [3, 4, 8])
def test_rank_divergence_quiet_on_noisy_healthy_ranks(world):
    # Per-rank norms that differ 2-5x from step to step (small per-rank batches), 20 runs of 300 steps.
    for seed in range(20):
        assert replay(RankDivergence(), norm_steps(n=300, world=world, noise=0.8, seed=seed, onset=None)) == []


def test_rank_divergence_a_heavy_tailed_rank_is_not_an_outlier():
    # Every rank now and then draws a batch with a 30x norm: the median over the window ignores it.
    rng = np.random.default_rng(3)
    norms = np.exp(rng.normal(0.0, 0.2, (300, 4)))
    norms[rng.random((300, 4)) < 0.3] *= 30.0
    steps = [make_step(step=i, sum_sq=[1.0], rank_norm=v, compute_time=[0.1] * 4) for i, v in enumerate(norms)]
    assert replay(RankDivergence(), steps) == []


def test_rank_divergence_judges_only_ddp_local_norms():
    steps = norm_steps(compute_time=False)
    det = RankDivergence()
    assert all(det.update(s) is None for s in steps)  # FSDP shard norms: not judged
    assert firsts(replay(RankDivergence(ddp_only=False), steps)) == {"rank2": (75, [2])}
    assert RankDivergence().update(make_step(sum_sq=[1.0])) is None  # one rank: rank_norm is None


def test_rank_divergence_two_ranks():
    # With 2 ranks the median is their geometric mean: min_ratio 2 means 4x between them.
    assert replay(RankDivergence(), norm_steps(world=2, rank=1, factor=3.0)) == []
    found = replay(RankDivergence(), norm_steps(world=2, rank=1, factor=6.0))
    assert found and {f.key for f in found} == {"pair"}
    assert found[0].ranks == [1]  # rank 1's own norms moved; rank 0's did not
    assert "likelier culprit" in found[0].message
    # Under 2 windows of history: no way to tell.
    early = replay(RankDivergence(), norm_steps(world=2, rank=1, factor=6.0, onset=2, n=30))
    assert early and early[0].ranks == [0, 1] and "either could be" in early[0].message


def test_rank_divergence_missing_ranks_and_restarts():
    steps = norm_steps(n=100)
    for s in steps[:50]:
        s.rank_norm = s.rank_norm.copy()
        s.rank_norm[0] = np.nan  # rank 0's local norm unknown (non-finite local gradients, or no report)
    det = RankDivergence()
    assert all(not det.update(s) for s in steps[:60])
    assert det.update(make_step(step=200, sum_sq=[1.0], rank_norm=[1.0] * 3, compute_time=[0.1] * 3)) == []
    assert len(det.state_dict()["dev"]) == 1  # another world size: the window restarted
    assert det.update(make_step(step=201, sum_sq=[1.0], rank_norm=[np.nan, np.nan, 1.0],
                                compute_time=[0.1] * 3)) is None


def test_rank_divergence_config_is_checked():
    with pytest.raises(ValidationError):
        RankDivergence(window=1)
    with pytest.raises(ValidationError):
        RankDivergence(min_ratio=1.0)
    with pytest.raises(ValidationError):
        RankDivergence(z_threshold=0)


def test_nanmedian_columns():
    a = np.array([[1.0, np.nan, 5.0], [2.0, np.inf, 3.0], [9.0, np.nan, np.nan], [4.0, 1.0, np.nan]])
    assert nanmedian_columns(a).tolist() == [3.0, 1.0, 4.0]


# ---- straggler -------------------------------------------------------------------------------------------------------
def slow_times(n: int = 100, world: int = 4, rank: int = 1, onset: int | None = 40, extra: float = 0.15,
               seed: int = 0, base: float = 0.2, until: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = base * rng.uniform(1.0, 1.25, (n, world))
    if onset is not None:
        t[onset:until, rank] += extra
    return t


def test_straggler_contract():
    check_detector(Straggler, time_steps(slow_times(until=80)))
    check_detector(Straggler, time_steps(slow_times(), ddp=False))


def test_straggler_uses_compute_time_not_the_equal_ddp_step_times():
    found = replay(Straggler(), time_steps(slow_times(), step_time=[0.4] * 4))
    assert firsts(found) == {"rank1": (60, [1])}
    f = found[0]
    assert f.severity.value == "warning" and f.value < 0.7 and f.threshold == 0.7
    assert "rank 1" in f.message and "before the all-reduce" in f.message
    # The step times alone, equal under DDP, say nothing.
    steps = time_steps(slow_times(), step_time=[0.4] * 4)
    for s in steps:
        s.compute_time = None
    assert replay(Straggler(), steps) == []


def test_straggler_falls_back_to_step_times_without_ddp():
    found = replay(Straggler(), time_steps(slow_times(), ddp=False))
    assert firsts(found) == {"rank1": (60, [1])} and "its steps" in found[0].message


def test_straggler_quiet_on_jittery_healthy_ranks():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        t = slow_times(n=300, onset=None, seed=seed)
        t[rng.random(t.shape) < 0.1] += 0.5  # stalls of 0.5 s on 10% of the steps, on every rank alike
        assert replay(Straggler(), time_steps(t)) == []


def test_straggler_ignores_tiny_absolute_differences():
    t = slow_times(base=0.002, extra=0.004)  # 2 ms against 6 ms: a score of 0.35, but 4 ms
    assert replay(Straggler(), time_steps(t)) == []
    found = replay(Straggler(min_excess_s=0.0), time_steps(t))
    assert found and 40 <= found[0].step <= 60 and found[0].ranks == [1]


def test_straggler_clears_and_restarts():
    det = Straggler()
    results = [det.update(s) for s in time_steps(slow_times(n=140, until=80))]
    fired = [i for i, r in enumerate(results) if r]
    assert fired[0] == 60 and fired[-1] < 140 and results[-1] == []
    assert Straggler().update(make_step(sum_sq=[1.0], step_time=[0.1])) is None  # one rank
    assert Straggler().update(make_step(sum_sq=[1.0])) is None  # no timings
    det = Straggler()
    for s in time_steps(slow_times(n=20)):
        det.update(s)
    det.update(make_step(step=20, sum_sq=[1.0], step_time=[0.1, 0.1, 0.1, 0.1]))  # the source changed
    assert len(det.state_dict()["times"]) == 1 and det.state_dict()["source"] == "step"


def test_straggler_config_is_checked():
    with pytest.raises(ValidationError):
        Straggler(threshold=1.0)
    with pytest.raises(ValidationError):
        Straggler(window=0)
    with pytest.raises(ValidationError):
        Straggler(min_excess_s=-1)


# ---- noise_scale -----------------------------------------------------------------------------------------------------
def ddp_gradients(rng: np.random.Generator, world: int, batch: int, g: float = 1.0, trace: float = 8.0,
                  dim: int = 64) -> tuple[np.ndarray, float]:
    """Each rank's local gradient (the mean of ``batch`` samples) and the squared norm of their mean, for a true
    |G|^2 = g**2 and a per-sample tr(Sigma) = ``trace``."""
    mean = np.full(dim, g / math.sqrt(dim))
    local = mean + rng.normal(0.0, math.sqrt(trace / dim / batch), (world, dim))
    return (local**2).sum(1), float((local.mean(0) ** 2).sum())


def test_noise_scale_estimates_are_unbiased():
    rng = np.random.default_rng(0)
    est = np.array([noise_scale(*ddp_gradients(rng, 4, 16), per_rank_batch=16)[1:] for _ in range(4000)])
    grad_sq, trace = est.mean(0)
    assert grad_sq == pytest.approx(1.0, rel=0.05) and trace == pytest.approx(8.0, rel=0.05)
    rng = np.random.default_rng(1)
    noisy = [noise_scale(*ddp_gradients(rng, 4, 1, trace=400.0))[1] for _ in range(100)]
    assert min(noisy) < 0  # single steps are noisy: |G|^2 comes out negative at times


def test_noise_scale_edge_cases():
    assert all(math.isnan(v) for v in noise_scale([1.0, np.nan], 0.5))  # one rank
    assert math.isnan(noise_scale([1.0, 1.0], np.inf)[0])
    b, _, tr = noise_scale([0.5, 0.5], 1.0)  # the merged norm above the local ones: FSDP shards, clipping
    assert math.isnan(b) and tr < 0
    assert noise_scale([1.0, 1.0], 1.0) == (0.0, 1.0, 0.0)  # identical ranks: no noise


def noise_steps(n: int = 300, world: int = 4, batch: int = 16, trace: float = 8.0, seed: int = 0,
                loss_scale: float | None = None) -> list[StepStats]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        local_sq, global_sq = ddp_gradients(rng, world, batch, trace=trace)
        scale = 1.0 if loss_scale is None else loss_scale
        out.append(make_step(step=i, sum_sq=[global_sq], rank_norm=np.sqrt(local_sq) * scale, loss_scale=loss_scale))
    return out


def test_noise_scale_contract():
    check_detector(NoiseScale, noise_steps(n=150))


def test_noise_scale_estimate_and_units():
    det = NoiseScale()
    assert replay(det, noise_steps()) == []  # no global batch: estimate only
    assert det.estimate == pytest.approx(8.0 / 16, rel=0.35)  # in per-rank batches of 16: 8 samples
    det = NoiseScale(per_rank_batch=16)
    replay(det, noise_steps())
    assert det.estimate == pytest.approx(8.0, rel=0.35)
    det = NoiseScale(global_batch=64)  # 4 ranks: 16 samples per rank
    replay(det, noise_steps())
    assert det.estimate == pytest.approx(8.0, rel=0.35)


def test_noise_scale_info_when_the_global_batch_is_far_above_it():
    found = replay(NoiseScale(global_batch=256), noise_steps(batch=64))  # 4 ranks x 64: 32x the noise scale of 8
    assert found and {f.severity.value for f in found} == {"info"} and {f.key for f in found} == {"batch"}
    assert found[0].step == 99  # after the warm-up
    assert "the global batch of 256 samples" in found[0].message
    assert replay(NoiseScale(global_batch=64), noise_steps(batch=16)) == []  # 8x: fine
    assert replay(NoiseScale(global_batch=256), noise_steps(batch=64, trace=200.0)) == []  # a noisy problem: fine
    assert replay(NoiseScale(per_rank_batch=64), noise_steps(batch=64)) == []  # no global batch: never judged


def test_noise_scale_divides_the_loss_scale_out():
    plain, scaled = NoiseScale(per_rank_batch=16), NoiseScale(per_rank_batch=16)
    replay(plain, noise_steps())
    replay(scaled, noise_steps(loss_scale=1024.0))
    assert scaled.estimate == pytest.approx(plain.estimate, rel=0.02)
    det = NoiseScale()
    steps = noise_steps(n=3, loss_scale=1024.0)
    steps[2].loss_scale = 2048.0  # the scaler grew the scale: which one the local norms carry is unclear
    assert [det.update(s) is None for s in steps] == [True, False, True]
    assert det.update(make_step(sum_sq=[1.0], rank_norm=[1.0, 1.0], skipped=True)) is None


def test_noise_scale_needs_two_ranks_and_config_is_checked():
    det = NoiseScale()
    assert det.update(make_step(sum_sq=[1.0])) is None
    assert det.update(make_step(sum_sq=[1.0], rank_norm=[1.0, np.nan])) is None
    assert math.isnan(det.estimate)
    with pytest.raises(ValidationError):
        NoiseScale(ratio=1.0)
    with pytest.raises(ValidationError):
        NoiseScale(ema=0)
    with pytest.raises(ValidationError):
        NoiseScale(global_batch=0)


def _gauge(agg: Aggregator, run: str) -> list[float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GradflowCollector(agg))
    text = generate_latest(reg).decode()
    return [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith(f'gradflow_noise_scale{{run="{run}"}}')]


def test_noise_scale_gauge():
    agg = Aggregator()
    stats = {"count": [4], "sum_sq": [1.2], "max_abs": [1.0], "nonfinite": [0]}
    for rank in range(3):
        agg.submit(Layout(run="ddp", rank=rank, world_size=3, layers=["w"] if rank == 0 else [],
                          numel=[4] if rank == 0 else [], sharded=[False] if rank == 0 else [],
                          reports_layers=rank == 0))
    for rank, sq in enumerate([2.0, 2.2, 1.8]):
        agg.submit({"kind": "step", "run": "ddp", "rank": rank, "step": 0, "local_norm": math.sqrt(sq),
                    **(stats if rank == 0 else {})})
    assert _gauge(agg, "ddp") == [pytest.approx(1.5)]  # noise_scale([2.0, 2.2, 1.8], 1.2)
    agg.submit(Layout(run="single", rank=0, world_size=1, layers=["w"], numel=[4], sharded=[False]))
    agg.submit({"kind": "step", "run": "single", "rank": 0, "step": 0, **stats})
    assert _gauge(agg, "single") == []  # one rank: no estimate


# ---- a real DDP run ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_real_ddp_straggler_is_named():
    """3 ranks (gloo, CPU processes), each with a real monitor feeding one aggregator; rank 1 sleeps 0.1 s per step
    before its forward from step 10: every rank's step time is the same, its compute time is not. The window of 40
    steps is full at step 40, when rank 1 has been slow for 30 of them."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    import zoo_ranks

    sc = zoo_ranks.RankScenario("t", "pathological", 3, 60, "test", fault="sleep", fault_rank=1, onset=10,
                                expected="straggler", sleep_s=0.1)
    agg = zoo_ranks.run_ranks(sc, 0, "ddp-straggler", deep_every=10, timeout_s=240)
    history = agg.history("ddp-straggler")
    assert len(history) == 60 and history[-1].compute_time is not None
    late = np.array([s.step_time for s in history[20:]])
    assert np.nanmedian(late[:, 1]) / np.nanmedian(late[:, 0]) == pytest.approx(1.0, abs=0.3)  # DDP: equal
    alarms = [f for f in agg.findings("ddp-straggler") if f.severity.value != "info"]
    mine = [f for f in alarms if f.detector == "straggler"]
    assert mine and mine[0].ranks == [1] and 10 <= mine[0].since <= 60, alarms
    assert not [f for f in alarms if f.detector == "rank_divergence"]
