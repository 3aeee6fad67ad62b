"""Runs that restart: each start of a job's monitors is a new attempt of its run (steps may start over), late
reports of an old attempt are refused, findings keep their attempt, detector state carries over for the same
layers; default run names are the same on every rank of one job; and one real Ray Train job that fails once and
is restarted by Ray Train is monitored through its second attempt."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

import gfservice
from gfservice.api import Detector, DetectorConfig, StepStats
from gfservice.observability.exporter import GradflowCollector
from gfservice.service.aggregator import Aggregator, AggregatorConfig
from gfservice.training import monitoring
from gfservice.training.monitoring import Monitor, MonitorOptions, attempt_id, default_run_name
from gfservice.training.transport import InProcessTransport
from gfservice.wire import RejectReason
from gfservice_detectors.nonfinite import NonFinite
from gfservice_detectors.stalled_rank import StalledRank

LAYERS = ["a.weight", "a.bias"]
NAN = float("nan")


class Counting(Detector):
    """Counts the steps it judged (state that should survive a restart with the same layers)."""

    name = "counting"

    class Config(DetectorConfig):
        pass

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.seen = 0

    def update(self, step: StepStats) -> list:
        self.seen += 1
        return []

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state) -> None:
        self.seen = int(state["seen"])


def detectors() -> dict[str, Detector]:
    return {"nonfinite": NonFinite(), "stalled_rank": StalledRank(), "counting": Counting()}


def layout(attempt: str, rank: int = 0, world: int = 2, run: str = "r", layers=LAYERS) -> dict:
    reports = rank == 0
    return {"kind": "layout", "run": run, "attempt": attempt, "rank": rank, "world_size": world,
            "layers": list(layers) if reports else [], "numel": [4] * len(layers) if reports else [],
            "sharded": [False] * len(layers) if reports else [], "reports_layers": reports}


def report(attempt: str, step: int, rank: int = 0, run: str = "r", bad: bool = False, n: int = 2) -> dict:
    msg = {"kind": "step", "run": run, "attempt": attempt, "rank": rank, "step": step, "local_norm": 1.0}
    if rank == 0:
        sq = [NAN if bad else 1.0] + [0.5] * (n - 1)
        msg.update(count=[4] * n, sum_sq=sq, max_abs=[1.0] * n, nonfinite=[4 if bad else 0] + [0] * (n - 1))
    return msg


def accept(agg: Aggregator, msg: dict) -> None:
    ack = agg.submit(msg)
    assert ack.accepted, f"rejected ({ack.reason}): {msg}"


def attempt_steps(agg: Aggregator, attempt: str, steps, bad_at: int = -1, ranks=(0, 1), **kw) -> None:
    for rank in ranks:
        accept(agg, layout(attempt, rank, **kw))
    for s in steps:
        for rank in ranks:
            accept(agg, report(attempt, s, rank, bad=s == bad_at))


def counting_seen(agg: Aggregator, run: str = "r") -> int:
    return agg.state_dict()["runs"][run]["detectors"]["counting"]["seen"]


# ---- the aggregator ----------------------------------------------------------------------------------------
def test_second_attempt_starting_at_step_0_is_monitored_and_old_findings_are_kept():
    agg = Aggregator(detector_factory=detectors)
    attempt_steps(agg, "a1", range(6), bad_at=5)  # the job dies with a finding active
    (nan,) = agg.findings("r")
    assert (nan.detector, nan.attempt, nan.since, nan.active) == ("nonfinite", "a1", 5, True)
    attempt_steps(agg, "a2", range(4))  # the restarted job counts from 0 again
    view = agg.view()
    assert view.rejected == {}, "no stale_step: the new attempt's steps are its own"
    (run,) = view.runs
    assert (run.attempt, run.attempts, run.last_step, run.latest.step) == ("a2", 2, 3, 3)
    assert not run.latest.missing_ranks
    (kept,) = agg.findings("r")
    assert (kept.attempt, kept.since, kept.active) == ("a1", 5, False), "kept, labelled, cleared at the restart"
    assert [s.step for s in agg.history("r")] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert agg.runs()[0]["attempts"] == 2
    # a finding of the new attempt carries it
    accept(agg, report("a2", 4, 0, bad=True))
    accept(agg, report("a2", 4, 1))
    assert [(f.attempt, f.since, f.active) for f in agg.findings("r")] == [("a1", 5, False), ("a2", 4, True)]


def test_late_messages_of_an_old_attempt_are_rejected_as_stale_attempt():
    agg = Aggregator(detector_factory=detectors)
    attempt_steps(agg, "a1", range(3))
    attempt_steps(agg, "a2", range(2))
    for late in (report("a1", 3), report("a1", 0, rank=1), layout("a1"),
                 {"kind": "end", "run": "r", "rank": 0, "attempt": "a1"}):
        assert agg.submit(late).reason is RejectReason.stale_attempt, late
    assert agg.view().rejected == {"stale_attempt": 4}
    run = agg.run_view("r")
    assert (run.attempt, run.last_step, run.finished) == ("a2", 1, False)
    # a report of an attempt the service never saw (it lost that layout): unknown_rank, so the sender re-sends it
    assert agg.submit(report("a3", 0)).reason is RejectReason.unknown_rank


def test_detector_state_carries_over_for_the_same_layers_and_starts_fresh_for_others():
    agg = Aggregator(detector_factory=detectors)
    attempt_steps(agg, "a1", range(3))
    attempt_steps(agg, "a2", range(2))
    assert counting_seen(agg) == 5, "same layers: the detectors went on"
    attempt_steps(agg, "a3", range(2), layers=["x.weight", "x.bias"])
    assert counting_seen(agg) == 2, "other layers: fresh detectors"
    assert agg.run_view("r").attempts == 3


def test_no_stalled_rank_finding_across_a_restart():
    """Rank 1 died in attempt 1 while rank 0 went on: its waiting steps are dropped, not merged without rank 1."""
    agg = Aggregator(AggregatorConfig(merge_timeout_s=3600), detector_factory=detectors)
    attempt_steps(agg, "a1", range(2))
    for s in range(2, 6):
        accept(agg, report("a1", s, 0))
    attempt_steps(agg, "a2", range(4))
    agg.flush()
    assert [f.detector for f in agg.findings("r")] == []
    assert all(not s.missing_ranks for s in agg.history("r"))


def test_new_attempt_may_change_the_world_size_and_snapshots_keep_attempts():
    agg = Aggregator(detector_factory=detectors)
    attempt_steps(agg, "a1", range(3), bad_at=1)
    attempt_steps(agg, "a2", range(2), ranks=(0,), world=1)
    assert agg.run_view("r").world_size == 1 and agg.view().rejected == {}
    restored = Aggregator(detector_factory=detectors)
    restored.load_state_dict(agg.state_dict())
    run = restored.run_view("r")
    assert (run.attempt, run.attempts, run.last_step) == ("a2", 2, 1)
    assert [f.attempt for f in restored.findings("r")] == ["a1"]
    assert restored.submit(report("a1", 5)).reason is RejectReason.stale_attempt
    accept(restored, report("a2", 2))


def test_exporter_shows_the_attempts_and_stale_attempt_rejections():
    agg = Aggregator(detector_factory=detectors)
    attempt_steps(agg, "a1", range(2))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GradflowCollector(agg))
    text = generate_latest(reg).decode()
    assert 'gradflow_run_attempt{run="r"} 1.0' in text
    assert 'gradflow_messages_rejected_total{reason="stale_attempt"} 0.0' in text
    attempt_steps(agg, "a2", range(2))
    agg.submit(report("a1", 9))
    text = generate_latest(reg).decode()
    assert 'gradflow_run_attempt{run="r"} 2.0' in text
    assert 'gradflow_messages_rejected_total{reason="stale_attempt"} 1.0' in text


# ---- the monitor -------------------------------------------------------------------------------------------
def _train(mon: Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()


def test_monitor_step_continues_the_numbering_of_a_resumed_run():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gfservice.monitor(model, opt, run="resumed", service=None, step=10)
    _train(mon, model, opt, 3)
    assert mon.latest().step == 12
    mon.close()
    with pytest.raises(ValueError, match="step"):
        gfservice.monitor(model, opt, run="resumed", service=None, step=-1)


def test_a_restarted_job_is_a_new_attempt_that_the_aggregator_takes():
    agg = Aggregator(detector_factory=detectors)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Monitor(model, opt, InProcessTransport(agg), MonitorOptions(run="job", attempt=attempt_id(), deep_every=0))
    _train(first, model, opt, 5)  # then the job dies without closing its monitor
    first.transport.flush()  # what it sent reached the service before it died (later ones are stale_attempt)
    second = Monitor(model, opt, InProcessTransport(agg), MonitorOptions(run="job", attempt=attempt_id(), deep_every=0))
    _train(second, model, opt, 3)
    second.close()
    assert first.attempt != second.attempt
    assert second.transport.rejected == 0 and agg.view().rejected == {}
    run = agg.run_view("job")
    assert (run.attempts, run.last_step, run.finished) == (2, 2, True)
    resumed = Monitor(model, opt, InProcessTransport(agg),
                      MonitorOptions(run="job", attempt=attempt_id(), deep_every=0, step=3))
    _train(resumed, model, opt, 2)
    resumed.close()
    assert agg.run_view("job").last_step == 4 and agg.view().rejected == {}


# ---- default run names and attempt ids ----------------------------------------------------------------------
ENV = ("GFSERVICE_RUN", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID")


@pytest.fixture
def bare_env(monkeypatch):
    """No job environment and no Ray Train worker around."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(monitoring, "_ray_train_context", lambda: None)
    return monkeypatch


def test_default_run_name_follows_the_job(bare_env):
    generated = [default_run_name() for _ in range(2)]
    assert all(re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{4}", n) for n in generated), generated
    assert generated[0] != generated[1], "two jobs started in the same second get different names"
    bare_env.setenv("SLURM_JOB_ID", "81234")
    assert default_run_name() == "slurm-81234"
    bare_env.setenv("SLURM_STEP_ID", "2")
    assert default_run_name() == "slurm-81234.2"
    bare_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default rendezvous id names no job
    assert default_run_name() == "slurm-81234.2"
    bare_env.setenv("TORCHELASTIC_RUN_ID", "elastic job/7")
    assert default_run_name() == "elastic-job-7", "cleaned into a valid run name"

    class RayContext:
        def get_experiment_name(self) -> str:
            return "ray-exp"

    bare_env.setattr(monitoring, "_ray_train_context", lambda: RayContext())
    assert default_run_name() == "ray-exp"
    bare_env.setenv("GFSERVICE_RUN", "mine")
    assert default_run_name() == "mine"


def test_attempt_ids(bare_env):
    assert attempt_id() != attempt_id(), "a fresh random id for each start"
    bare_env.setenv("TORCHELASTIC_RUN_ID", "job7")
    bare_env.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert attempt_id() == "job7.2" == attempt_id(), "the same on every rank of one torchrun restart"
    bare_env.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert attempt_id() == "job7.3"
    bare_env.setattr(monitoring, "_ray_train_attempt", lambda: "run1.group2")
    assert attempt_id() == "run1.group2"


# ---- a real Ray Train job that fails once -------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_restart_after_a_failure_is_monitored(service, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run, steps, crash_at = "t-restart", 8, 3

    def flaky_loop(config: dict) -> None:  # nested: Ray pickles it by value
        import time as _time
        from pathlib import Path

        import torch as _torch

        import gfservice as _gfservice

        _torch.set_num_threads(1)
        _torch.manual_seed(0)
        rank = _torch.distributed.get_rank()
        model = _torch.nn.parallel.DistributedDataParallel(_torch.nn.Linear(8, 2))
        opt = _torch.optim.SGD(model.parameters(), lr=0.05)
        mon = _gfservice.monitor(model, opt, run=config["run"], deep_every=0)
        marker = Path(config["marker"])
        for step in range(config["steps"]):
            loss = model(_torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            opt.zero_grad()
            if step == config["crash_at"] and rank == 1 and not marker.exists():
                marker.touch()
                mon.transport.flush(5.0)  # what came before the failure is in
                raise RuntimeError("injected failure (first attempt only)")
            _time.sleep(0.05)
        mon.close()

    before = service.status()["counters"]["rejected"]
    trainer = TorchTrainer(
        flaky_loop,
        train_loop_config={"run": run, "steps": steps, "crash_at": crash_at, "marker": str(tmp_path / "crashed")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=run, storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=1)),
    )
    t0 = time.monotonic()
    trainer.fit()
    assert (tmp_path / "crashed").exists(), "the first attempt failed"
    row = next(r for r in service.runs() if r["run"] == run)
    assert row["attempts"] == 2, row
    assert row["last_step"] == steps - 1 and row["finished"], row
    latest = service.latest(run)
    assert latest is not None and latest.step == steps - 1 and not latest.missing_ranks
    steps_seen = [s.step for s in service.history(run)]
    assert steps_seen[-steps:] == list(range(steps)), f"the second attempt is monitored from step 0: {steps_seen}"
    after = service.status()["counters"]["rejected"]
    assert after.get("stale_step", 0) == before.get("stale_step", 0), "no stale_step rejections"
    stalls = [f for f in service.findings(run) if f.detector in ("stalled_rank", "stall")]
    assert stalls == [], stalls
    print(f"\nRay Train job with one restart: {time.monotonic() - t0:.1f} s")
    assert np.isfinite(latest.global_norm)
