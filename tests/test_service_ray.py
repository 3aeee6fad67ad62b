"""The Ray service with real Ray Train jobs: DDP and FSDP2 merges against a single-process reference, rank
attribution of NaN, a service killed mid-run, hostile messages. One local Ray cluster for the session
(see conftest.py), few and short trainer runs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from gfservice.cli.workload import WorkloadConfig, batch, build_model, dataset, fit
from gfservice.hosting import actor as svc
from gfservice.service.client import Client
from gfservice.stats import GradStats

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def reference_grads(cfg: WorkloadConfig, step: int, world: int) -> GradStats:
    """Single-process gradients of step 0 on the union of the ranks' batches (what DDP/FSDP average to)."""
    assert step == 0, "the reference replays the first step only"
    model = build_model(cfg)
    X, y = dataset()
    xs, ys = zip(*(batch(X, y, step, r, world, cfg.batch_size) for r in range(world)), strict=True)
    loss = torch.nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys))
    loss.backward()
    return GradStats.from_arrays({n: p.grad.double().numpy() for n, p in model.named_parameters()}, deep=True)


def test_ddp_merge_equals_reference_and_nan_names_rank_1(service: Client, tmp_path):
    cfg = WorkloadConfig(run="t-ddp", steps=4, depth=3, width=32, fault="nan@2", deep_every=1)
    fit(cfg, workers=2, storage_path=tmp_path)
    history = {s.step: s for s in service.history("t-ddp")}
    ref = reference_grads(cfg, 0, 2)
    got = history[0].grads
    assert got.layers == ref.layers
    np.testing.assert_array_equal(got.count, ref.count)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=1e-5)
    np.testing.assert_allclose(got.max_abs, ref.max_abs, rtol=1e-5)
    np.testing.assert_allclose(got.sum_abs, ref.sum_abs, rtol=1e-5)
    assert history[0].rank_norm is not None and np.all(np.isfinite(history[0].rank_norm))  # heartbeats from both
    nonfinite = [f for f in service.findings("t-ddp") if f.detector == "nonfinite" and f.key == "grad"]
    assert len(nonfinite) == 1, nonfinite
    assert nonfinite[0].first_step == 2
    assert nonfinite[0].ranks == [1], "the NaN came from rank 1's batch only"


def test_fsdp2_merged_norms_equal_unsharded_reference(service: Client, tmp_path):
    cfg = WorkloadConfig(run="t-fsdp", steps=2, depth=3, width=33, parallel="fsdp", deep_every=1)
    fit(cfg, workers=2, storage_path=tmp_path)
    first = next(s for s in service.history("t-fsdp") if s.step == 0)
    ref = reference_grads(cfg, 0, 2)
    assert first.grads.layers == ref.layers
    np.testing.assert_array_equal(first.grads.count, ref.count)  # shards add up, odd sizes included
    rel = np.abs(first.grads.norm - ref.norm) / ref.norm
    assert rel.max() < 1e-5, rel
    np.testing.assert_allclose(first.grads.max_abs, ref.max_abs, rtol=1e-5)
    np.testing.assert_array_equal(first.grads.exp_hist.sum(axis=1), ref.count)


def _alerts(payload: dict, status: str, run: str) -> list[dict]:
    return [a for a in payload.get("alerts", []) if a["status"] == status
            and a["labels"].get("alertname") == "GradflowNonFiniteGradients" and a["labels"].get("run") == run]


def test_ray_run_pages_through_prometheus_and_every_panel_has_data(service: Client, service_settings, tmp_path):
    """The real service scraped by the real Prometheus (found through the file the service writes) during a
    real Ray Train run with a NaN injected into rank 1's batch: Alertmanager's webhook gets the page naming the
    run, layers and rank, then the resolution; afterwards every dashboard panel's query returns data."""
    from gfservice.observability import alerts
    from tests.dashboards_check import expected_empty, panel_queries
    from tests.promtools import WebhookReceiver, http_get, query, start_alertmanager, start_prometheus, wait_until

    run, fault_step = "t-e2e", 25
    sd_file = service_settings.service.sd_file
    with WebhookReceiver() as hook, start_alertmanager(tmp_path / "am", hook.url) as am, \
            start_prometheus(tmp_path / "prom", sd_file=sd_file, rule_files=[ROOT / alerts.PROMETHEUS_RULES],
                             alertmanager_url=am.url) as prom:
        wait_until(lambda: query(prom.url, 'up{job="gfservice"} == 1'), 30, what="Prometheus to scrape the service")
        wait_until(lambda: b'"activeAlertmanagers":[{' in http_get(prom.url + "/api/v1/alertmanagers"), 30,
                   what="Prometheus to find the Alertmanager")
        cfg = WorkloadConfig(run=run, steps=70, depth=3, width=32, fault=f"nan@{fault_step}", skip_nonfinite=True,
                             step_delay_s=0.15, deep_every=10)
        trainer = threading.Thread(target=fit, args=(cfg, 2, tmp_path / "ray"), daemon=True)
        trainer.start()
        firing = hook.wait_for(lambda p: bool(_alerts(p, "firing", run)), timeout=120)
        (alert,) = _alerts(firing.payload, "firing", run)
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["ranks"] == "1", alert["labels"]
        assert alert["labels"]["layers"] == "layers 0.weight to 4.bias (6 layers)"
        assert alert["annotations"]["runbook_url"].endswith("GradflowNonFiniteGradients.md")
        assert f"first at step {fault_step}" in alert["annotations"]["description"]
        faulty = next(s for s in service.history(run) if s.step == fault_step)
        latency = firing.received - faulty.time
        # While the alert fires: every panel of every dashboard has data (template variables filled in).
        allowed_empty = {"Loss scale", "Stale runs", "Steps skipped by the guard"}  # no scaler, no guard
        for board in ("run-health", "fleet", "service"):
            path = ROOT / "dashboards" / f"{board}.json"
            may_be_empty = set(expected_empty(path))
            has_data: dict[str, bool] = {}
            for title, expr in panel_queries(path, {"run": run, "__rate_interval": "1m"}, annotations=True):
                # as Grafana draws it: data now (instant panels) or within the panel's time range (graphs)
                has_data[title] = (has_data.get(title, False) or bool(query(prom.url, expr))
                                   or bool(query(prom.url, f"count_over_time(({expr})[5m:1s])")))
            empty = {t for t, ok in has_data.items() if not ok}
            assert empty <= (allowed_empty & may_be_empty), f"{board}: panels without data: {sorted(empty)}"
        resolved = hook.wait_for(lambda p: bool(_alerts(p, "resolved", run)), timeout=60)
        trainer.join(120)
        print(f"\nRay run: fault-to-webhook {latency:.2f} s, resolved {resolved.received - firing.received:.1f} s "
              "after firing")
        assert latency < 10, f"fault to webhook took {latency:.1f} s (target under 5 s)"



def test_service_killed_mid_run_loses_and_repeats_no_findings(service: Client, tmp_path):
    cfg = WorkloadConfig(run="t-kill", steps=40, depth=3, width=32, fault="nan@3", step_delay_s=0.25)
    done: dict = {}
    trainer = threading.Thread(target=lambda: done.setdefault("result", fit(cfg, 2, tmp_path)), daemon=True)
    trainer.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the finding exists and the run is well under way
        rows = {r["run"]: r for r in service.runs()}
        if rows.get("t-kill", {}).get("last_step", -1) >= 12:
            break
        time.sleep(0.3)
    before = [f for f in service.findings("t-kill")]
    assert any(f.detector == "nonfinite" for f in before)
    pid_before = service.status()["pid"]
    ray.kill(service.handle, no_restart=False)  # Ray restarts it; it restores its snapshot
    trainer.join(180)
    assert not trainer.is_alive() and "result" in done, "the training job must finish despite the restart"
    status = service.status()
    assert status["pid"] != pid_before and status["restored_runs"] >= 1
    after = service.findings("t-kill")
    idents = [(f.detector, f.key, f.first_step) for f in after]
    assert len(idents) == len(set(idents)), f"a finding was repeated: {idents}"
    assert {(f.detector, f.key, f.first_step) for f in before} <= set(idents), "a finding was lost"
    grad = next(f for f in after if f.detector == "nonfinite" and f.key == "grad")
    assert grad.first_step == 3
    latest = service.latest("t-kill")
    assert latest is not None and latest.step >= 30, "reports kept arriving after the restart"
    assert next(r for r in service.runs() if r["run"] == "t-kill")["finished"]


HOSTILE = [
    "not a message",
    12345,
    None,
    {"kind": "layout",
     "run": "h", "rank": 0, "world_size": 1, "layers": ["a"] * 3, "numel": [1, 1, 1], "sharded": [False] * 3},
    {"kind": "layout", "run": "h", "rank": 5, "world_size": 2, "layers": ["a"], "numel": [1], "sharded": [False]},
    {"kind": "step", "run": "h" * 10_000, "rank": 0, "step": 0},
    {"kind": "step", "run": "../etc/passwd", "rank": 0, "step": 0},
    {"kind": "step", "run": "h", "rank": -1, "step": 0},
    {"kind": "step", "run": "h", "rank": 0, "step": 0, "time": float("nan")},
    {"kind": "step", "run": "h", "rank": 0, "step": 0, "count": "abc"},
    {"kind": "step", "run": "h", "rank": 0, "step": 0, "count": [[1, 2], [3, 4]]},
    {"kind": "step",
     "run": "h", "rank": 0, "step": 0, "count": [-1], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]},
    {"kind": "step",
     "run": "h", "rank": 0, "step": 0, "count": [1], "sum_sq": [1.0, 2.0], "max_abs": [1.0], "nonfinite": [0]},
    {"kind": "layout", "run": "h", "rank": 0, "world_size": 1, "layers": [f"l{i}" for i in range(200_001)],
     "numel": [1] * 200_001, "sharded": [False] * 200_001},
    {"kind": "step", "run": "h", "rank": 0, "step": 0, "evil": "extra field"},
    {"__class__": "os.system", "args": ["true"]},
]


def test_hostile_messages_are_rejected_counted_and_survived(service: Client):
    before = service.status()["counters"]
    answer = service.submit(HOSTILE)
    reasons = dict(answer["rejected"])
    assert sorted(reasons) == list(range(len(HOSTILE))), f"every hostile message is rejected: {answer}"
    assert reasons[13] == "oversized"
    assert reasons[0] == "invalid" and reasons[6] == "invalid"
    after = service.status()["counters"]
    assert sum(after["rejected"].values()) - sum(before["rejected"].values()) == len(HOSTILE)
    # the service still answers and still takes good messages
    good = [{"kind": "layout",
             "run": "h-ok", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2], "sharded": [False]},
            {"kind": "step",
             "run": "h-ok", "rank": 0, "step": 0, "count": [2], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}]
    assert service.submit(good)["rejected"] == []
    assert service.latest("h-ok").step == 0


def test_unreachable_names_give_a_clear_error():
    with pytest.raises(ConnectionError, match="gfservice serve"):
        from gfservice.service.client import connect

        connect(name="no-such-service")


def test_stop_and_start_again_reports_the_running_one(service_settings):
    _handle, created = svc.start(service_settings)
    assert not created, "start() finds the running service instead of making a second one"
