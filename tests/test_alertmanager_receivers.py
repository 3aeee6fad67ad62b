"""The Alertmanager receiver examples (deploy/alertmanager/receivers/: Slack, PagerDuty, a generic webhook) and
their templates (deploy/alertmanager/templates/gfservice.tmpl).

``amtool check-config`` accepts each one; ``amtool config routes test`` sends pages and tickets where the base
configuration does; and a real Alertmanager run on each, with the service's URL pointed at a local receiver,
delivers a gfservice alert whose message names the run, the layers, the ranks and the value and links the
runbook. Needs prometheus-alertmanager (amtool); a missing one fails the test with the way to install it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gfservice.observability.alerts import ALERTS
from tests.promtools import HOST, WebhookReceiver, _start, alertmanager_bin, amtool_bin, free_port, run_tool

ROOT = Path(__file__).resolve().parents[1]
AM = ROOT / "deploy/alertmanager"
RECEIVERS = {"slack": AM / "receivers/slack.yml", "pagerduty": AM / "receivers/pagerduty.yml",
             "webhook": AM / "receivers/webhook.yml"}
#: Per example: the receiver a page and a ticket go to.
ROUTES = {"slack": ("slack-pages", "slack-tickets"), "pagerduty": ("pagerduty-page", "pagerduty-low"),
          "webhook": ("webhook-pages", "webhook-tickets")}
ALERT = next(a for a in ALERTS if a.name == "GradflowNonFiniteGradients")
LABELS = {"alertname": ALERT.name, "run": "exp-42", "severity": "critical", "detector": "nonfinite",
          "key": "grad", "layers": "layers 2.weight to 10.bias (10 layers)", "ranks": "1", "job": "gfservice"}
ANNOTATIONS = {"summary": "Run exp-42: NaN/Inf gradients in layers 2.weight to 10.bias (ranks 1)",
               "description": "The nonfinite detector found NaN or Inf values (grad) in run exp-42, first at step 63.",
               "runbook_url": ALERT.runbook_url(), "value": "63"}


@pytest.mark.parametrize("name", sorted(RECEIVERS))
def test_amtool_checks_the_receiver_example(name):
    res = run_tool([amtool_bin(), "check-config", str(RECEIVERS[name])])
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr
    if name != "webhook":  # the webhook's payload is Alertmanager's JSON: no template
        assert " - 1 templates" in res.stdout, "the gfservice templates are found and parse"


@pytest.mark.parametrize("name", sorted(RECEIVERS))
def test_pages_and_tickets_route_like_the_base_configuration(name):
    page, ticket = ROUTES[name]
    for severity, expected in (("critical", page), ("warning", ticket)):
        res = run_tool([amtool_bin(), "config", "routes", "test", f"--config.file={RECEIVERS[name]}",
                        "--verify.receivers=" + expected, "alertname=GradflowStalledRank", "run=r",
                        f"severity={severity}"])
        assert res.returncode == 0, f"{name}: severity={severity} should go to {expected}: {res.stdout}{res.stderr}"


def test_the_receivers_inhibit_like_the_base_configuration():
    base = yaml.safe_load((AM / "alertmanager.yml").read_text())
    for path in RECEIVERS.values():
        assert yaml.safe_load(path.read_text())["inhibit_rules"] == base["inhibit_rules"], path.name


def _local_config(name: str, url: str, workdir: Path) -> Path:
    """The example with its service's URL pointed at ``url``, secrets inline, no waiting: what a test can run."""
    config: dict[str, Any] = yaml.safe_load(RECEIVERS[name].read_text())
    config["templates"] = [str(AM / "templates/*.tmpl")]
    config["route"]["group_wait"] = "0s"
    for route in config["route"]["routes"]:
        route["group_wait"] = "0s"
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            del slack["api_url_file"]
            slack["api_url"] = f"{url}/slack/{receiver['name']}"
        for pd in receiver.get("pagerduty_configs", []):
            del pd["routing_key_file"]
            pd["routing_key"] = "test-routing-key"
            pd["url"] = f"{url}/pagerduty/{receiver['name']}"
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{url}/webhook/{receiver['name']}"
            hook["http_config"]["authorization"] = {"type": "Bearer", "credentials": "test-token"}
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECEIVERS))
def test_a_real_alertmanager_delivers_run_layers_ranks_value_and_runbook(name, tmp_path):
    with WebhookReceiver() as hook:
        config = _local_config(name, f"http://{HOST}:{hook.port}", tmp_path)
        port = free_port()
        argv = [alertmanager_bin(), f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
                f"--web.listen-address={HOST}:{port}", "--cluster.listen-address=", "--log.level=warn"]
        with _start("alertmanager", argv, tmp_path, port, config, "/-/ready", 30.0) as am:
            alert = [{"labels": LABELS, "annotations": ANNOTATIONS, "startsAt": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
            request = urllib.request.Request(f"{am.url}/api/v2/alerts", data=json.dumps(alert).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request, timeout=5).close()
            delivery = hook.wait_for(lambda payload: True, timeout=30)
    page_receiver = ROUTES[name][0]
    assert delivery.path.endswith(f"/{page_receiver}"), f"a critical alert pages: {delivery.path}"
    text = json.dumps(delivery.payload)
    for expected in ("exp-42", "layers 2.weight to 10.bias", ALERT.runbook_url()):
        assert expected in text, f"{name}: {expected!r} missing from {delivery.payload}"
    if name == "slack":
        (attachment,) = delivery.payload["attachments"]
        assert "ranks 1" in attachment["text"] and "value 63" in attachment["text"], attachment["text"]
        assert attachment["title"].startswith("[FIRING:1] GradflowNonFiniteGradients run exp-42")
    elif name == "pagerduty":
        details = delivery.payload["payload"]["custom_details"]
        assert "ranks 1" in details["alerts"] and "value 63" in details["alerts"], details
        assert delivery.payload["payload"]["severity"] == "critical"
        assert delivery.payload["links"][0]["href"] == ALERT.runbook_url()
    else:
        (sent,) = delivery.payload["alerts"]
        assert sent["labels"]["ranks"] == "1" and sent["annotations"]["value"] == "63"
