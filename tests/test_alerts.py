"""The alert definitions: committed files match the code, the real promtool and amtool accept them, the
unit tests pin when each alert fires and resolves, and the Grafana rules say what the Prometheus rules say."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from gfservice.cli import generated
from gfservice.cli.main import main as gfservice_main
from gfservice.observability import alerts, assets
from tests.promtools import amtool_bin, promtool_bin, run_tool

ROOT = Path(__file__).resolve().parents[1]
PROM_RULES = ROOT / alerts.PROMETHEUS_RULES
GRAFANA_RULES = ROOT / alerts.GRAFANA_RULES
PROM_TESTS = ROOT / "deploy/prometheus/tests/gfservice.test.yml"
RECEIVER = {"critical": "page", "warning": "ticket"}
#: Alerts about the service itself, not about one run: they carry no run label (and GradflowServiceDown does not
#: hold them; their own series age out of their 10-minute windows).
SERVICE_ALERTS = {"GradflowServiceDown", "GradflowRunsEvicted", "GradflowExportErrors"}


def _unit_tests() -> list[dict]:
    return yaml.safe_load(PROM_TESTS.read_text())["tests"]


def test_committed_rule_files_match_the_code():
    stale = generated.drifted(ROOT / alerts.DEFAULT_OUT, alerts.rendered_files())
    assert not stale, (f"{', '.join(map(str, stale))} drifted from gfservice/observability/alerts.py: "
                       "run gfservice alerts render (in the repository root)")


def test_shipped_rule_files_are_the_committed_ones():
    """The package data (what a wheel carries, read through assets) is what the code renders."""
    rendered = alerts.rendered_files()
    assert assets.rules_file().read_text(encoding="utf-8") == rendered[alerts.PROMETHEUS_RULES_FILE]
    assert assets.grafana_alert_rules().read_text(encoding="utf-8") == rendered[alerts.GRAFANA_RULES_FILE]
    assert ROOT / alerts.PROMETHEUS_RULES == ROOT / "deploy" / alerts.PROMETHEUS_RULES_FILE


def test_render_writes_both_files(tmp_path):
    written = generated.write(tmp_path, alerts.rendered_files(runbook_base="https://runbooks.example/"))
    assert sorted(p.relative_to(tmp_path) for p in written) == sorted(
        [Path("prometheus/rules/gfservice.rules.yml"), Path("grafana/provisioning/alerting/gfservice-alerts.yml")])
    assert "https://runbooks.example/GradflowServiceDown.md" in (tmp_path / alerts.PROMETHEUS_RULES_FILE).read_text()
    assert generated.drifted(tmp_path, alerts.rendered_files(runbook_base="https://runbooks.example/")) == []
    assert generated.drifted(tmp_path, alerts.rendered_files()) == written


def test_gfservice_alerts_render_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert gfservice_main(["alerts", "render", "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / alerts.PROMETHEUS_RULES_FILE),
                                               str(out / alerts.GRAFANA_RULES_FILE)]
    for rel in (alerts.PROMETHEUS_RULES_FILE, alerts.GRAFANA_RULES_FILE):
        assert (out / rel).read_text() == (ROOT / "deploy" / rel).read_text()
    assert gfservice_main(["alerts", "render", "--out", str(out), "--check"]) == 0
    # --check names the drifted file, writes nothing and exits 1.
    (out / alerts.GRAFANA_RULES_FILE).write_text("edited by hand\n")
    assert gfservice_main(["alerts", "render", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert str(out / alerts.GRAFANA_RULES_FILE) in err and str(alerts.PROMETHEUS_RULES_FILE) not in err
    assert "gfservice alerts render" in err
    assert (out / alerts.GRAFANA_RULES_FILE).read_text() == "edited by hand\n"
    # --runbook-base relinks; the default DIR is ./deploy, relative to the working directory.
    monkeypatch.chdir(tmp_path)
    assert gfservice_main(["alerts", "render", "--runbook-base", "https://runbooks.example/"]) == 0
    assert "https://runbooks.example/GradflowStalledRank.md" in (tmp_path / alerts.PROMETHEUS_RULES).read_text()
    # python -m gfservice is the same command.
    assert gfservice_main(["alerts", "render", "--check", "--runbook-base", "https://runbooks.example/"]) == 0
    assert gfservice_main(["alerts", "render", "--check"]) == 1


def test_promtool_checks_the_rules():
    res = run_tool([promtool_bin(), "check", "rules", str(PROM_RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts.ALERTS)} rules found" in res.stdout


def test_promtool_unit_tests_pin_firing_and_resolution():
    res = run_tool([promtool_bin(), "test", "rules", str(PROM_TESTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    # Every alert is exercised, and each one both fires and resolves in the tests, with every severity it
    # can carry.
    checks = [c for t in _unit_tests() for c in t["alert_rule_test"]]
    for a in alerts.ALERTS:
        mine = [c for c in checks if c["alertname"] == a.name]
        assert any(c["exp_alerts"] for c in mine), f"no test sees {a.name} firing"
        assert any(not c["exp_alerts"] for c in mine), f"no test sees {a.name} quiet"
        seen = {e["exp_labels"]["severity"] for c in mine for e in c["exp_alerts"]}
        assert seen == set(a.severities()), f"{a.name} fires with severities {seen}, not {a.severities()}"


def test_alerts_read_only_series_the_exporter_writes():
    """Every gradflow_ name an alert reads is a family of the exporter (counters with _total), with the labels the
    alert's matchers name: an alert on a renamed or misspelt series would never fire."""
    from gfservice.observability.exporter import FAMILIES

    exported = {f"gradflow_{name}" + ("_total" if kind == "counter" else ""): labels
                for name, (kind, _doc, labels) in FAMILIES.items()}
    for a in alerts.ALERTS:
        for m in re.finditer(r"\b(gradflow_\w+)(?:\{([^}]*)\})?", a.expr):
            assert m.group(1) in exported, f"{a.name} reads {m.group(1)}, which the exporter does not write"
            matched = set(re.findall(r"(\w+)\s*[=!~]", m.group(2) or ""))
            assert matched <= set(exported[m.group(1)]), (a.name, m.group(1), matched)


def test_info_findings_never_alert():
    """noise_scale raises info findings only: no alert selects it, each finding alert names its detector, and a
    unit test keeps every finding alert quiet while only info findings are active."""
    finding_alerts = {a.name for a in alerts.ALERTS if "gradflow_finding" in a.expr}
    for a in alerts.ALERTS:
        assert "noise_scale" not in a.expr
        if a.name in finding_alerts:
            assert re.search(r'gradflow_finding\{detector="\w+"', a.expr), a.expr
    (quiet,) = [t for t in _unit_tests() if any('detector="noise_scale"' in s["series"] for s in t["input_series"])]
    assert all('severity="info"' in s["series"] for s in quiet["input_series"])
    assert all(not c["exp_alerts"] for c in quiet["alert_rule_test"])
    assert finding_alerts <= {c["alertname"] for c in quiet["alert_rule_test"]}


def test_promtool_checks_the_prometheus_config():
    res = run_tool([promtool_bin(), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "gfservice"]
    from gfservice.observability.discovery import DEFAULT_SD_FILE

    # the service's default (in the state directory of the user running it; the file names root's), and the
    # files of torchrun jobs' rank 0 beside it
    files = job["file_sd_configs"][0]["files"]
    assert files == ["/root/.local/state/gfservice/prometheus-sd*.json"]
    # in the state directory (the test session's own: conftest.py points XDG_STATE_HOME at a fresh one)
    from gfservice.config import default_state_dir

    assert str(default_state_dir() / "prometheus-sd.json") == DEFAULT_SD_FILE
    xdg = os.environ.pop("XDG_STATE_HOME")
    try:  # and without XDG_STATE_HOME, the user's ~/.local/state, which the shipped glob reads for root
        assert str(default_state_dir()) == os.path.expanduser("~/.local/state/gfservice")
    finally:
        os.environ["XDG_STATE_HOME"] = xdg
    assert cfg["rule_files"] == ["rules/gfservice.rules.yml"]


def test_amtool_checks_the_alertmanager_config():
    path = ROOT / "deploy/alertmanager/alertmanager.yml"
    res = run_tool([amtool_bin(), "check-config", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load(path.read_text())
    assert cfg["route"]["group_by"] == ["alertname", "run"]
    # Routing, alert by alert and for each severity it can carry: critical pages, warning tickets.
    for a in alerts.ALERTS:
        for severity in a.severities():
            args = [f"alertname={a.name}", "run=r", "job=gfservice", f"severity={severity}"]
            res = run_tool([amtool_bin(), "config", "routes", "test", f"--config.file={path}", *args])
            assert res.returncode == 0 and res.stdout.strip() == RECEIVER[severity], (a.name, res.stdout + res.stderr)
    down, escalated = cfg["inhibit_rules"]
    assert down["source_matchers"] == ['alertname="GradflowServiceDown"']
    assert down["target_matchers"] == ['run=~".+"'] and down["equal"] == ["job"]
    # An alert that can fire as a ticket and as a page for one run (its severity follows the finding's) pages only.
    assert escalated == {"source_matchers": ['severity="critical"'], "target_matchers": ['severity="warning"'],
                         "equal": ["alertname", "run"]}
    # ... and it holds every run alert: each fires (in the unit tests) with a run and the job label of the
    # scrape; the service's own alerts fire without a run.
    fired = [e["exp_labels"] for t in _unit_tests() for c in t["alert_rule_test"] for e in c["exp_alerts"]]
    for a in alerts.ALERTS:
        mine = [labels for labels in fired if labels["alertname"] == a.name]
        held = all(labels.get("run") and labels.get("job") == "gfservice" for labels in mine)
        assert held == (a.name not in SERVICE_ALERTS), a.name
        assert all("run" not in labels for labels in mine) == (a.name in SERVICE_ALERTS), a.name


def test_grafana_rules_say_what_the_prometheus_rules_say():
    prom = yaml.safe_load(PROM_RULES.read_text())["groups"][0]["rules"]
    graf = yaml.safe_load(GRAFANA_RULES.read_text())
    by_name = {a.name: a for a in alerts.ALERTS}
    assert graf["apiVersion"] == 1
    (group,) = graf["groups"]
    assert {"orgId", "name", "folder", "interval", "rules"} <= set(group)
    rules = {r["title"]: r for r in group["rules"]}
    assert list(rules) == [r["alert"] for r in prom] == [a.name for a in alerts.ALERTS]
    uids = [r["uid"] for r in group["rules"]]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids)
    for p in prom:
        g = rules[p["alert"]]
        assert {"uid", "title", "condition", "data", "for", "labels", "annotations", "noDataState",
                "execErrState"} <= set(g)
        assert g["labels"] == p["labels"] == {"severity": by_name[p["alert"]].severity_label()}
        assert g["for"] == p["for"]
        assert g["annotations"] == {k: alerts.grafana_template(v) for k, v in p["annotations"].items()}
        assert p["annotations"]["runbook_url"].endswith(f"docs/runbooks/{p['alert']}.md")
        refs = {d["refId"]: d for d in g["data"]}
        assert refs["A"]["model"]["expr"] == p["expr"]
        assert refs["A"]["datasourceUid"] == alerts.DATASOURCE_UID
        assert g["condition"] in refs and refs["B"]["model"]["type"] == "reduce"
        assert all(refs[r]["datasourceUid"] == "__expr__" for r in ("B", "C"))


def test_grafana_rules_use_grafana_s_field_names():
    """Field names and expression models as Grafana's own schema (grafana-foundation-sdk) has them."""
    from grafana_foundation_sdk.models import alerting, expr

    rule_keys = set(alerting.Rule(annotations={}, labels={}, is_paused=False, uid="x").to_json())
    query_keys = set(alerting.Query(datasource_uid="x", model={}, query_type="", ref_id="A",
                                    relative_time_range=alerting.RelativeTimeRange()).to_json())
    for rule in yaml.safe_load(GRAFANA_RULES.read_text())["groups"][0]["rules"]:
        assert set(rule) <= rule_keys, set(rule) - rule_keys
        for q in rule["data"]:
            assert set(q) <= query_keys, set(q) - query_keys
        refs = {q["refId"]: q["model"] for q in rule["data"]}
        reduce, math = expr.TypeReduce.from_json(refs["B"]), expr.TypeMath.from_json(refs["C"])
        assert (reduce.type_val, reduce.expression, reduce.reducer, reduce.ref_id) == ("reduce", "A", "last", "B")
        assert (math.type_val, math.ref_id) == (refs["C"]["type"], "C") and "$B" in math.expression


def test_every_alert_has_a_runbook_and_names_its_subject():
    assert set(assets.runbooks()) == {a.name for a in alerts.ALERTS}, "one shipped runbook per alert, no other"
    for a in alerts.ALERTS:
        book = ROOT / "docs/runbooks" / f"{a.name}.md"
        assert book.exists(), f"missing runbook {book}"
        text = book.read_text()
        assert assets.runbook(a.name) == text
        for section in ("## What it means", "## First checks", "## Likely causes", "## Fixes", "## Silence it"):
            assert section in text, f"{book.name} lacks {section!r}"
        if a.name in SERVICE_ALERTS:
            assert "$labels.instance" in a.summary, a.name
        else:
            assert "$labels.run" in a.summary, a.name
        if "finding" in a.expr:  # the layers, or the ranks for the per-rank detectors
            assert "$labels.layers" in a.summary or "$labels.ranks" in a.summary, a.name


# ---- the service's own alerts, on what the real exporter writes ---------------------------------------------
_OWN = ("gradflow_detector_disabled", "gradflow_runs_evicted_total", "gradflow_export_errors_total")


def _service_with_trouble() -> tuple[list[str], dict[str, int]]:
    """Three scrapes of a real aggregator and exporter: healthy; then a plugin past its error budget, runs evicted
    for memory and a run that cannot be formatted (twice: the failure counts at each scrape)."""
    import dataclasses
    import types

    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from gfservice.api import Detector, GradStats, StepStats
    from gfservice.config import ExporterConfig
    from gfservice.observability.exporter import GradflowCollector
    from gfservice.service.aggregator import Aggregator, AggregatorConfig

    class FailsFromStep1(Detector):
        name = "my_plugin"

        def update(self, step: StepStats):
            if step.step >= 1:
                raise RuntimeError("bug in a plugin")
            return []

    def layout(run: str, layers: int) -> dict:
        return {"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": [f"l{i}" for i in range(layers)],
                "numel": [4] * layers, "sharded": [False] * layers}

    def report(run: str, step: int, layers: int) -> dict:
        return {"kind": "step", "run": run, "rank": 0, "step": step, "count": [4] * layers,
                "sum_sq": [1.0] * layers, "max_abs": [1.0] * layers, "nonfinite": [0] * layers}

    def fill(agg: Aggregator, runs: int) -> None:
        for i in range(runs):
            assert agg.submit(layout(f"junk-{i}", 200)).accepted
            assert agg.submit(report(f"junk-{i}", 0, 200)).accepted

    probe = Aggregator(AggregatorConfig(max_memory_bytes=0), detector_factory=dict)
    fill(probe, 1)
    limit = int(probe.view().memory_bytes * 2.5)  # two junk runs fit, a third evicts one
    agg = Aggregator(AggregatorConfig(max_memory_bytes=limit, detector_error_budget=1),
                     detector_factory=lambda: {"my_plugin": FailsFromStep1()})
    assert agg.submit(layout("real", 2)).accepted and agg.submit(report("real", 0, 2)).accepted
    view = [agg.view()]
    collector = GradflowCollector(types.SimpleNamespace(view=lambda since=None: view[0]), ExporterConfig())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    texts = [generate_latest(registry).decode()]
    assert agg.submit(report("real", 1, 2)).accepted  # the plugin raises: disabled for the run
    fill(agg, 5)
    now = agg.view()
    run = now.runs[0]  # a copy of a run whose latest step has two layers but one entry per statistic
    one = np.ones(1)
    grads = GradStats(layers=("a", "b"), count=one.astype(np.int64), sum_sq=one, max_abs=one,
                      nonfinite=np.zeros(1, np.int64))
    broken = dataclasses.replace(run, name="broken", latest=StepStats(run="broken", step=1, grads=grads))
    view[0] = dataclasses.replace(now, runs=(broken, *now.runs))
    texts += [generate_latest(registry).decode() for _ in range(2)]
    return texts, dict(now.evicted)


def test_the_service_s_own_alerts_fire_on_what_the_exporter_writes(tmp_path):
    """GradflowDetectorDisabled, GradflowRunsEvicted and GradflowExportErrors, evaluated by promtool on the series
    of a real aggregator and exporter as Prometheus stores them (one scrape a minute): quiet while the service
    is healthy, each firing once its trouble is in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    texts, evicted = _service_with_trouble()
    assert evicted.get("memory", 0) >= 3
    history: dict[str, list[str]] = {}  # series -> value at each scrape ("_" where absent)
    for i, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in _OWN:
                    labels = {**s.labels, "job": "gfservice", "instance": "127.0.0.1:9464"}
                    key = s.name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                    history.setdefault(key, ["_"] * len(texts))[i] = f"{s.value:g}"
    # scrape 0 from 0m to 4m, scrape 1 at 5m, scrape 2 from 6m on
    series = [{"series": k, "values": " ".join([v[0]] * 5 + [v[1]] + [v[2]] * 5)} for k, v in history.items()]
    by_name = {a.name: a for a in alerts.ALERTS}

    def check(name: str, at: str, *labels: str) -> dict:
        return {"expr": f"sgn({by_name[name].expr})", "eval_time": at,
                "exp_samples": [{"labels": "{" + lab + ', instance="127.0.0.1:9464", job="gfservice"}', "value": 1}
                                for lab in labels]}

    tests = [{"interval": "1m", "input_series": series, "promql_expr_test": [
        *(check(name, "4m") for name in ("GradflowDetectorDisabled", "GradflowRunsEvicted", "GradflowExportErrors")),
        check("GradflowDetectorDisabled", "8m", 'detector="my_plugin", reason="errors", run="real"'),
        check("GradflowRunsEvicted", "8m", 'reason="memory"'),
        check("GradflowExportErrors", "8m", 'reason="run"'),
    ]}]
    path = tmp_path / "own_alerts.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    res = run_tool([promtool_bin(), "test", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr + path.read_text()[:3000]
