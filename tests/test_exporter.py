"""The Prometheus exporter against a real aggregator fed by real torch training (and, for scale, by
synthesized messages): promtool accepts the scrape, values match the aggregator, cardinality stays
bounded, health counters count, findings linger, TLS works."""

from __future__ import annotations

import math
import ssl
import statistics
import subprocess
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gfservice
from gfservice.api import Detector, describe_layers
from gfservice.observability.exporter import ExporterConfig, GradflowCollector, serve_metrics
from gfservice.service.aggregator import Aggregator
from gfservice.training.monitoring import Monitor, MonitorOptions
from gfservice.training.transport import InProcessTransport
from gfservice.wire import Layout, StepReport
from tests.models import at_end_of_backward
from tests.promtools import promtool_bin, run_tool

RUN = "exp-1"


def train(agg: Aggregator, run: str = RUN, steps: int = 30, nan_at: int | None = None, close: bool = False) -> Monitor:
    """A real small MLP regression on CPU, monitored into ``agg``; at ``nan_at`` one gradient entry of the
    second Linear turns NaN and the optimizer skips the step (as a guard would), so training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = Monitor(model, opt, InProcessTransport(agg), MonitorOptions(run=run, deep_every=10))
    x = torch.randn(128, 8)
    y = x.sum(dim=1, keepdim=True)
    for step in range(steps):
        if step == nan_at:  # the NaN strikes in backward, where the monitor reads the gradients
            at_end_of_backward(model, lambda: model[2].weight.grad.__setitem__((0, 0), float("nan")))
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step != nan_at:
            opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    mon.transport.flush()  # every step merged and judged (a scrape never waits for a step being judged)
    if close:
        mon.close()
    return mon


def scrape(port: int, scheme: str = "http", context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=10, context=context) as resp:
        return resp.read().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def served():
    """Start an exporter for an aggregator; yields a function (aggregator, **config) -> port."""
    servers = []

    def start(agg: Aggregator, **config) -> int:
        server, _thread, port = serve_metrics(agg, ExporterConfig(**config))
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_promtool_check_metrics_on_a_real_scrape(served):
    agg = Aggregator()
    train(agg, nan_at=20, close=True)
    train(agg, run="exp-2", steps=5)
    text = scrape(served(agg))
    res = run_tool([promtool_bin(), "check", "metrics"], stdin=text)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
    assert "gradflow_finding{" in text and "gradflow_depth_grad_rms{" in text


def test_values_match_the_aggregator(served):
    agg = Aggregator()
    train(agg, nan_at=25)
    text = scrape(served(agg))
    st = agg.latest(RUN)
    state = agg.run_view(RUN)
    assert value(text, "gradflow_grad_norm", run=RUN) == st.global_norm
    assert value(text, "gradflow_loss", run=RUN) == st.loss
    assert value(text, "gradflow_learning_rate", run=RUN) == pytest.approx(0.05)
    assert value(text, "gradflow_last_step", run=RUN) == 29 == state.last_step
    assert value(text, "gradflow_last_step_timestamp_seconds", run=RUN) == state.last_time
    assert value(text, "gradflow_run_finished", run=RUN) == 0
    assert value(text, "gradflow_run_world_size", run=RUN) == 1
    assert value(text, "gradflow_nonfinite_layers", run=RUN) == 0  # the last step is healthy again
    assert value(text, "gradflow_stalled_ranks", run=RUN) == 0
    assert value(text, "gradflow_reports_dropped_total", run=RUN) == 0
    assert not [s for s in samples(text) if s[0] == "gradflow_loss_scale"]  # unknown: absent

    # Depth buckets, recomputed the plain way: 6 layers into 16 buckets, each bucket the layer at its depth.
    g = st.grads
    for b in range(16):
        lo, hi = b * len(g) // 16, max((b + 1) * len(g) // 16, b * len(g) // 16 + 1)
        want = math.sqrt(sum(g.sum_sq[lo:hi]) / sum(g.count[lo:hi]))
        assert value(text, "gradflow_depth_grad_rms", run=RUN, bucket=f"{b:02d}") == pytest.approx(want, rel=1e-12)
    # 6 layers < the cap of 32: every layer has its series.
    for i, name in enumerate(g.layers):
        assert value(text, "gradflow_layer_grad_norm", run=RUN, layer=name) == pytest.approx(float(g.norm[i]))

    # The NaN at step 25 made a finding that cleared at step 26 and still lingers on /metrics.
    (f,) = agg.findings(RUN)
    assert (f.detector, f.first_step, f.layers) == ("nonfinite", 25, ["2.weight"])
    assert value(text, "gradflow_findings_total", run=RUN, detector="nonfinite", severity="critical") == 1
    assert value(text, "gradflow_active_findings", run=RUN, detector="nonfinite", severity="critical") == 0
    assert value(text, "gradflow_finding", run=RUN, detector="nonfinite", severity="critical", key="grad",
                 layers=describe_layers(["2.weight"]), ranks="") == 25


def _synthetic_run(agg: Aggregator, run: str, n_layers: int, world: int, steps: int = 3) -> None:
    """A DDP-shaped run: rank 0 reports ``n_layers`` layers, the other ranks heartbeats; at the last steps
    half the layers go non-finite on many ranks and a tenth of the ranks stop reporting."""
    layers = [f"blocks.{i // 4}.p{i % 4}" for i in range(n_layers)]
    agg.submit(Layout(run=run, rank=0, world_size=world, layers=layers, numel=[64] * n_layers,
                      sharded=[False] * n_layers))
    for r in range(1, world):
        agg.submit(Layout(run=run, rank=r, world_size=world, reports_layers=False))
    rng = np.random.default_rng(0)
    for step in range(steps):
        bad = step >= steps - 2
        sum_sq = rng.uniform(0.5, 2.0, n_layers)
        nonfinite = np.zeros(n_layers, np.int64)
        if bad:
            sum_sq[: n_layers // 2] = np.nan
            nonfinite[: n_layers // 2] = 3
        agg.submit(StepReport(run=run, rank=0, step=step, count=[64] * n_layers, sum_sq=sum_sq,
                              max_abs=np.sqrt(sum_sq), nonfinite=nonfinite, local_norm=1.0, local_nonfinite=bad))
        alive = world - world // 10 if bad else world
        for r in range(1, alive):
            agg.submit(StepReport(run=run, rank=r, step=step, local_norm=1.0, local_nonfinite=bad and r % 2 == 0))
        agg.flush(run)


def test_cardinality_is_bounded_for_10000_layers_and_1000_ranks(served):
    agg = Aggregator()
    _synthetic_run(agg, "small", n_layers=10, world=2)
    small = samples(scrape(served(agg)))
    _synthetic_run(agg, "huge", n_layers=10_000, world=1000)
    assert {f.detector for f in agg.active_findings("huge")} == {"nonfinite", "stalled_rank"}
    both = samples(scrape(served(agg)))
    huge = [s for s in both if s[1].get("run") == "huge"]
    per_small = [s for s in small if s[1].get("run") == "small"]
    print(f"\nseries for a 10,000-layer, 1,000-rank run: {len(huge)} (a 10-layer, 2-rank run: {len(per_small)}); "
          f"whole scrape: {len(both)}")
    by_name = Counter(n for n, _, _ in huge)
    assert by_name["gradflow_layer_grad_norm"] == 32
    assert by_name["gradflow_depth_grad_rms"] == 16
    assert by_name["gradflow_finding"] == 2  # one series per finding, ranks folded into a label
    assert len(huge) <= 80
    assert all(len(v) <= 200 for _, lab, v_ in huge for v in lab.values())
    assert not any("rank" in k and k != "ranks" for _, lab, _ in huge for k in lab)
    stalled = [lab for n, lab, _ in huge if n == "gradflow_finding" and lab["detector"] == "stalled_rank"]
    assert stalled[0]["ranks"] == "900-999"
    text = scrape(served(agg))
    assert value(text, "gradflow_nonfinite_layers", run="huge") == 5000
    assert value(text, "gradflow_stalled_ranks", run="huge") == 100


def test_rejections_are_counted_by_reason(served):
    agg = Aggregator()
    agg.submit(Layout(run="r", rank=0, world_size=1, layers=["w"], numel=[2], sharded=[False]))
    ok = {"kind": "step",
          "run": "r", "rank": 0, "step": 0, "count": [2], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}
    assert agg.submit(ok).accepted
    for bad in (
        "not a mapping",
        {"kind": "step", "run": "r", "rank": 0, "step": -1},
        {"kind": "step", "run": "nope", "rank": 0, "step": 1},
        {**ok, "rank": 5},
        {**ok, "step": 1, "count": [2, 2], "sum_sq": [1.0, 1.0], "max_abs": [1.0, 1.0], "nonfinite": [0, 0]},
        ok,
    ):
        assert not agg.submit(bad).accepted
    text = scrape(served(agg))
    assert agg.view().rejected == {"invalid": 2, "unknown_run": 1, "unknown_rank": 1, "shape_mismatch": 1,
                                   "stale_step": 1}
    for reason in ("invalid", "unknown_run", "unknown_rank", "shape_mismatch", "stale_step", "duplicate", "oversized"):
        assert value(text, "gradflow_messages_rejected_total", reason=reason) == agg.view().rejected.get(reason, 0)
    assert value(text, "gradflow_messages_accepted_total") == agg.accepted == 2


class Boom(Detector):
    """Raises on every step (a broken plugin)."""

    name = "boom"

    def update(self, step):
        raise RuntimeError("boom")


def test_service_health_metrics(served):
    from gfservice import registry

    agg = Aggregator(detector_factory=lambda: {**registry.build({}), "boom": Boom()})
    train(agg, steps=10)
    text = scrape(served(agg))
    assert value(text, "gradflow_messages_accepted_total") == agg.accepted == 11  # layout + 10 steps
    assert value(text, "gradflow_ingest_latency_seconds_count") == agg.view().ingest_count
    assert value(text, "gradflow_ingest_latency_seconds_sum") == pytest.approx(agg.view().ingest_seconds)
    for det in ("nonfinite", "exploding", "vanishing", "stalled_rank"):
        assert value(text, "gradflow_detector_seconds_total", detector=det) > 0
        assert value(text, "gradflow_detector_errors_total", detector=det) == 0
    assert value(text, "gradflow_detector_errors_total", detector="boom") == 5  # then disabled: its error budget
    assert value(text, "gradflow_runs") == 1
    assert value(text, "gradflow_build_info", version=gfservice.__version__) == 1


def _lingering(linger_s: float):
    """An aggregator with a two-layer run, a collector on a clock the test moves, and helpers."""
    now = [time.time()]  # one clock for both: the aggregator stamps clearings with it, the collector lingers on it
    agg = Aggregator(clock=lambda: now[0])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GradflowCollector(agg, ExporterConfig(finding_linger_s=linger_s), clock=lambda: now[0]))
    agg.submit(Layout(run="r", rank=0, world_size=1, layers=["a", "b"], numel=[2, 2], sharded=[False, False]))

    def step(i, bad=False):
        sq = [1.0, float("nan") if bad else 1.0]
        agg.submit({"kind": "step",
     "run": "r", "rank": 0, "step": i, "count": [2, 2], "sum_sq": sq, "max_abs": [1.0, 1.0],
                    "nonfinite": [0, 2 if bad else 0]})

    def findings():
        text = generate_latest(reg).decode()
        return [(lab["detector"], v) for n, lab, v in samples(text) if n == "gradflow_finding"]

    return now, step, findings


def test_monitor_errors_reach_the_metric():
    """An error the monitor keeps from the training loop (here a loss it cannot read) is counted on its rank and
    exported with the run's next report."""
    agg = Aggregator()
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, InProcessTransport(agg, background=False), MonitorOptions(run="errs"))
    for i in range(4):
        loss = model(torch.randn(4, 3)).sum()
        loss.backward()
        opt.step()
        mon.step(loss="not a number" if i == 1 else loss)
        opt.zero_grad()
    mon.close()
    registry = CollectorRegistry()
    registry.register(GradflowCollector(agg))
    text = generate_latest(registry).decode()
    assert mon.errors == 1 and value(text, "gradflow_monitor_errors_total", run="errs") == 1


def test_findings_linger_after_they_clear_and_then_go():
    now, step, findings = _lingering(60)
    step(0)
    assert findings() == []
    step(1, bad=True)
    assert findings() == [("nonfinite", 1.0)]  # active
    step(2)
    now[0] += 30
    assert findings() == [("nonfinite", 1.0)]  # cleared 30 s ago: still shown
    now[0] += 31
    assert findings() == []  # past the linger


def test_a_finding_raised_and_cleared_between_two_scrapes_is_seen():
    now, step, findings = _lingering(60)
    step(0)
    assert findings() == []
    step(1, bad=True)
    step(2)
    assert findings() == [("nonfinite", 1.0)]
    now[0] += 61
    assert findings() == []


def test_a_restarted_service_shows_active_findings_but_not_long_cleared_ones():
    agg = Aggregator()
    agg.submit(Layout(run="r", rank=0, world_size=1, layers=["a", "b"], numel=[2, 2], sharded=[False, False]))
    for i, bad in enumerate([True, False, True]):  # step 0 bad then cleared; step 2 bad and still active
        agg.submit({"kind": "step",
     "run": "r", "rank": 0, "step": i, "count": [2, 2], "sum_sq": [1.0, float("nan") if bad else 1.0],
                    "max_abs": [1.0, 1.0], "nonfinite": [0, 2 if bad else 0]})
    restored = Aggregator()
    restored.load_state_dict(agg.state_dict())
    reg = CollectorRegistry(auto_describe=False)
    later = time.time() + 3600  # the service comes back an hour later
    reg.register(GradflowCollector(restored, ExporterConfig(finding_linger_s=300), clock=lambda: later))
    shown = [v for n, _, v in samples(generate_latest(reg).decode()) if n == "gradflow_finding"]
    assert shown == [2.0]


def test_scrape_duration_and_series_for_1000_layers(served):
    agg = Aggregator()
    _synthetic_run(agg, "r1000", n_layers=1000, world=8, steps=20)
    port = served(agg)
    text = scrape(port)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        scrape(port)
        times.append(time.perf_counter() - t0)
    series = len(samples(text))
    run_series = len([s for s in samples(text) if s[1].get("run") == "r1000"])
    print(f"\n1,000-layer model: scrape median {statistics.median(times) * 1e3:.2f} ms, "
          f"max {max(times) * 1e3:.2f} ms over {len(times)} scrapes; {series} series in all, {run_series} for the run; "
          f"{len(text)} bytes")
    assert statistics.median(times) < 0.25
    assert run_series <= 80


def test_binds_loopback_by_default_and_validates_tls_options(served):
    server, _thread, port = serve_metrics(Aggregator())
    try:
        assert server.server_address[0] == "127.0.0.1" and port > 0
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="certfile and keyfile go together"):
        ExporterConfig(certfile="/x.pem")


def test_serves_https_with_a_certificate(served, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    agg = Aggregator()
    train(agg, steps=3)
    port = served(agg, certfile=str(cert), keyfile=str(key))
    text = scrape(port, "https", ssl.create_default_context(cafile=str(cert)))
    assert value(text, "gradflow_last_step", run=RUN) == 2
    with pytest.raises(urllib.error.URLError):
        scrape(port, "https")  # not trusted without the CA
