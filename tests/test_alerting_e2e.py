"""End to end without Ray: real torch training -> aggregator -> exporter -> real Prometheus (file-based
discovery, the committed rule file, 1 s scrape and evaluation) -> real Alertmanager -> webhook.

A NaN injected into one layer's gradient at one step must reach the webhook as a firing
GradflowNonFiniteGradients alert naming the run and the layer, then as a resolved one once the finding
has cleared and its linger (3 s here) has passed.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from gfservice.observability import alerts
from gfservice.observability.discovery import write_sd_file
from gfservice.observability.exporter import ExporterConfig, serve_metrics
from gfservice.service.aggregator import Aggregator
from gfservice.training.monitoring import Monitor, MonitorOptions
from gfservice.training.transport import InProcessTransport
from tests.models import at_end_of_backward
from tests.promtools import WebhookReceiver, http_get, query, start_alertmanager, start_prometheus, wait_until

ROOT = Path(__file__).resolve().parents[1]
RUN = "e2e-nan"
ALERT = "GradflowNonFiniteGradients"

pytestmark = pytest.mark.slow  # about 12 s: two real servers and a training thread


class Trainer(threading.Thread):
    """A small MLP regression trained step after step (about 20 steps a second) until stopped; the step
    numbered ``fault_step`` gets one NaN in ``2.weight``'s gradient (the optimizer skips that step)."""

    def __init__(self, agg: Aggregator):
        super().__init__(name="trainer", daemon=True)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        # lr 0.02: at 0.05 this regression on one batch goes through a catapult (loss x8, gradient x20 between
        # steps 45 and 61, then back), which gfservice rightly reports as a growing gradient norm
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.02)
        self.monitor = Monitor(self.model, self.opt, InProcessTransport(agg), MonitorOptions(run=RUN))
        self.x = torch.randn(64, 8)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.stop = threading.Event()
        self.fault_step: int | None = None
        self.fault_time: float | None = None
        self.steps = 0
        self.error: BaseException | None = None

    def inject_fault(self) -> None:
        self.fault_step = self.steps + 2  # a step that has surely not started yet

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t0 = time.time()
                faulty = self.steps == self.fault_step
                if faulty:  # the NaN strikes in backward, where a bad kernel or batch would
                    self.fault_time = t0  # the faulty step starts: measure from here
                    at_end_of_backward(self.model, lambda: self.model[2].weight.grad.__setitem__((3, 5), math.nan))
                loss = nn.functional.mse_loss(self.model(self.x), self.y)
                loss.backward()
                if not faulty:
                    self.opt.step()
                self.monitor.step(loss=loss)
                self.opt.zero_grad()
                self.steps += 1
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.monitor.close()


def _ours(payload: dict, status: str) -> list[dict]:
    return [a for a in payload.get("alerts", []) if a["status"] == status and a["labels"].get("alertname") == ALERT
            and a["labels"].get("run") == RUN]


def test_a_nan_step_pages_through_prometheus_and_alertmanager_then_resolves(tmp_path):
    t_start = time.monotonic()
    agg = Aggregator()
    server, _thread, port = serve_metrics(agg, ExporterConfig(finding_linger_s=3))
    sd_file = write_sd_file(tmp_path / "sd" / "prometheus-sd.json", f"127.0.0.1:{port}")
    trainer = Trainer(agg)
    try:
        with WebhookReceiver() as hook, \
                start_alertmanager(tmp_path / "alertmanager", hook.url) as am, \
                start_prometheus(tmp_path / "prometheus", sd_file=sd_file, rule_files=[ROOT / alerts.PROMETHEUS_RULES],
                                 alertmanager_url=am.url) as prom:
            trainer.start()
            # Prometheus has found the service through the discovery file, scraped the run and knows the rules
            # and the Alertmanager.
            wait_until(lambda: query(prom.url, f'gradflow_last_step{{run="{RUN}"}}'), 30,
                       what="first scrape of the run")
            wait_until(lambda: b'"activeAlertmanagers":[{' in http_get(prom.url + "/api/v1/alertmanagers"), 30,
                       what="Prometheus to find the Alertmanager")
            wait_until(lambda: ALERT.encode() in http_get(prom.url + "/api/v1/rules"), 30, what="rules loaded")
            trainer.inject_fault()

            firing = hook.wait_for(lambda p: bool(_ours(p, "firing")), timeout=30)
            assert trainer.fault_time is not None and trainer.error is None
            latency = firing.received - trainer.fault_time
            (alert,) = _ours(firing.payload, "firing")
            labels, ann = alert["labels"], alert["annotations"]
            assert labels["severity"] == "critical" and labels["detector"] == "nonfinite" and labels["key"] == "grad"
            assert labels["layers"] == "layer 2.weight"
            assert labels["job"] == "gfservice" and labels["instance"] == f"127.0.0.1:{port}"
            assert ann["summary"] == f"Run {RUN}: NaN/Inf gradients in layer 2.weight"
            assert f"in run {RUN}, first at step {trainer.fault_step} in layer 2.weight." in ann["description"]
            assert ann["runbook_url"] == alerts.RUNBOOK_BASE + f"{ALERT}.md"
            assert firing.path == "/hook" and firing.payload["receiver"] == "hook"
            assert firing.payload["groupLabels"] == {"alertname": ALERT, "run": RUN}

            resolved = hook.wait_for(lambda p: bool(_ours(p, "resolved")), timeout=30)
            trainer.stop.set()
            cleared = [f for f in agg.findings(RUN) if f.detector == "nonfinite"]
            assert len(cleared) == 1 and not agg.active_findings(RUN)
            print(f"\nfault-to-webhook: {latency:.2f} s (NaN at step {trainer.fault_step}; scrape and evaluation "
                  f"every 1 s, group_wait 0 s); resolved {resolved.received - firing.received:.2f} s after firing "
                  f"(linger 3 s); whole test {time.monotonic() - t_start:.1f} s")
            assert latency < 10, f"fault to webhook took {latency:.1f} s (target: under 5 s)"
            assert not [p for d in hook.deliveries for p in d.payload["alerts"]
                        if p["labels"]["alertname"] not in (ALERT,)], "an unrelated alert fired"
    finally:
        trainer.stop.set()
        if trainer.is_alive():
            trainer.join(10)
        server.shutdown()
        server.server_close()
    assert trainer.error is None
