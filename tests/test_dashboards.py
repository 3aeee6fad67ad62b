"""The Grafana dashboards: the committed JSON is what :mod:`gfservice.observability.dashboards` builds (through
``dashboards/build.py`` or ``gfservice dashboards render``), what the package ships, and it is sound.

No Grafana server can be installed on these machines. The dashboards are checked by building them, validating
their JSON and their panels, checking every query's metric names against the exporter's contract, parsing every
query with the real ``promtool``, and evaluating the run-state expression with ``promtool test rules``. Running
every panel's query against a live Prometheus during a training run is the end-to-end test's job
(:func:`dashboards_check.panel_queries`, in this folder, lists the queries).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from gfservice.cli.main import main as gfservice_main
from gfservice.observability import assets
from gfservice.observability import dashboards as BUILD
from tests.dashboards_check import expected_empty, panel_queries, substitute

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"

#: The metric names of the shared contract (notes/HELPERS.md), as Prometheus stores them.
CONTRACT = {
    "gradflow_grad_norm", "gradflow_loss", "gradflow_learning_rate", "gradflow_loss_scale", "gradflow_last_step",
    "gradflow_last_step_timestamp_seconds", "gradflow_run_finished", "gradflow_run_world_size",
    "gradflow_findings_total", "gradflow_active_findings", "gradflow_finding", "gradflow_depth_grad_rms",
    "gradflow_layer_grad_norm", "gradflow_nonfinite_layers", "gradflow_stalled_ranks",
    "gradflow_reports_dropped_total", "gradflow_messages_accepted_total", "gradflow_messages_rejected_total",
    "gradflow_ingest_latency_seconds_sum", "gradflow_ingest_latency_seconds_count",
    "gradflow_detector_seconds_total", "gradflow_detector_errors_total", "gradflow_runs", "gradflow_build_info",
    "gradflow_noise_scale", "gradflow_memory_bytes", "gradflow_memory_limit_bytes", "gradflow_runs_evicted_total",
    "gradflow_export_errors_total", "gradflow_detector_disabled", "gradflow_steps_skipped_total",
}
PROMETHEUS_OWN = {"ALERTS", "up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan", "Inf", "NaN"}


def _build_script() -> ModuleType:
    """``dashboards/build.py``, the checkout's entry point (``python -m dashboards.build``)."""
    spec = importlib.util.spec_from_file_location("gfservice_dashboards_build", DASHBOARDS / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KEYS = list(BUILD.DASHBOARDS)


def _board(key: str) -> dict:
    return json.loads((DASHBOARDS / f"{key}.json").read_text(encoding="utf-8"))


def _panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords, labels or durations)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is not installed: apt-get install -y prometheus prometheus-alertmanager")
    return path


# ---- the JSON ------------------------------------------------------------------------------------------------
def test_metric_names_parser():
    assert metric_names('sum by (run) (rate(a_total{x="y"}[5m])) / on (run) b or vector(0) > bool 1e3') == {
        "a_total", "b"}


@pytest.mark.parametrize("key", KEYS)
def test_committed_json_is_what_the_code_builds(key):
    committed = (DASHBOARDS / f"{key}.json").read_text(encoding="utf-8")
    assert committed == BUILD.render(key), f"dashboards/{key}.json drifted from the code: python -m dashboards.build"


def test_the_package_ships_the_committed_json():
    shipped = assets.dashboards()
    assert list(shipped) == sorted(KEYS)
    for key in KEYS:
        assert shipped[key].read_text(encoding="utf-8") == (DASHBOARDS / f"{key}.json").read_text(encoding="utf-8")
        assert assets.dashboard(key)["uid"] == BUILD.UIDS[key]


def test_build_script_delegates_to_the_package(tmp_path, capsys):
    script = _build_script()
    assert script.render is BUILD.render and script.DASHBOARDS is BUILD.DASHBOARDS and script.HERE == DASHBOARDS
    assert script.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("wrote ") == len(KEYS)
    for key in KEYS:
        assert (tmp_path / f"{key}.json").read_bytes() == (DASHBOARDS / f"{key}.json").read_bytes()


def test_gfservice_dashboards_render_command(tmp_path, capsys):
    out = tmp_path / "boards"
    assert gfservice_main(["dashboards", "render", "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / f"{key}.json") for key in KEYS]
    for key in KEYS:
        assert (out / f"{key}.json").read_bytes() == (DASHBOARDS / f"{key}.json").read_bytes()
    assert gfservice_main(["dashboards", "render", "--out", str(out), "--check"]) == 0
    (out / "fleet.json").write_text("{}\n")
    (out / "service.json").unlink()
    assert gfservice_main(["dashboards", "render", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert str(out / "fleet.json") in err and str(out / "service.json") in err and "run-health" not in err
    assert (out / "fleet.json").read_text() == "{}\n"


def test_render_without_the_sdk_writes_the_shipped_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(BUILD, "sdk_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gfservice_main(["dashboards", "render"]) == 0  # default DIR: ./dashboards
    assert "grafana-foundation-sdk is not installed" in capsys.readouterr().err
    for key in KEYS:
        assert (tmp_path / "dashboards" / f"{key}.json").read_bytes() == (DASHBOARDS / f"{key}.json").read_bytes()


@pytest.mark.parametrize("key", KEYS)
def test_json_is_a_dashboard(key):
    board = _board(key)
    assert board["uid"] == BUILD.UIDS[key] and board["title"].startswith("gfservice / ")
    assert isinstance(board["schemaVersion"], int) and board["panels"]
    assert "gfservice" in board["tags"]


@pytest.mark.parametrize("key", KEYS)
def test_panel_ids_and_titles_are_unique(key):
    panels = _panels(_board(key))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids))
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "titles identify panels in checks and reports"


@pytest.mark.parametrize("key", KEYS)
def test_every_panel_queries_prometheus(key):
    for p in _panels(_board(key)):
        if p["type"] == "row":
            continue
        targets = p.get("targets") or []
        assert any(t.get("expr", "").strip() for t in targets), f"panel {p['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), f"panel {p['title']!r} repeats a refId"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)


@pytest.mark.parametrize("key", KEYS)
def test_template_variables(key):
    variables = {v["name"]: v for v in _board(key)["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == BUILD.DATASOURCE_UID
    if key == "run-health":
        run = variables["run"]
        assert run["type"] == "query" and run["definition"] == "label_values(gradflow_last_step, run)"
        assert run["datasource"]["uid"] == "${datasource}"


def test_run_health_shows_only_the_chosen_run():
    board = _board("run-health")
    for p in _panels(board):
        for t in p.get("targets", []):
            assert 'run="$run"' in t["expr"], f"{p['title']}: {t['expr']}"
    assert 'run="$run"' in board["annotations"]["list"][0]["expr"]


@pytest.mark.parametrize("key", KEYS)
def test_queries_use_only_contract_metrics(key):
    for title, expr in panel_queries(_board(key), {"run": "r"}, annotations=True):
        for name in metric_names(expr):
            assert name in CONTRACT or name in PROMETHEUS_OWN or name.startswith("scrape_"), (
                f"{key}: panel {title!r} reads {name}, which is not in the metric contract: {expr}")


@pytest.mark.parametrize("key", KEYS)
def test_panel_queries_fill_in_every_variable(key):
    board = _board(key)
    targets = sum(len(p.get("targets", [])) for p in _panels(board))
    queries = panel_queries(board, {"run": "exp-1"})
    assert len(queries) == targets
    assert all("$" not in expr and "[[" not in expr for _, expr in queries)
    assert panel_queries(DASHBOARDS / f"{key}.json", {"run": "exp-1"}) == queries  # a path works too
    if key == "run-health":
        assert ("Global gradient norm", 'gradflow_grad_norm{run="exp-1"}') in queries
        with pytest.raises(KeyError, match=r"\$run"):
            panel_queries(board, {})


def test_gradient_flow_heatmap_shows_every_cell():
    (heat,) = [p for p in _panels(_board("run-health")) if p["type"] == "heatmap"]
    assert heat["targets"][0]["expr"].startswith("log10(gradflow_depth_grad_rms")
    assert heat["options"]["calculate"] is False and heat["options"]["rowsFrame"]["layout"] == "unknown"
    assert heat["options"]["filterValues"]["le"] < -324, "log10 RMS is negative: no cell may be filtered out"


def test_expected_empty_panels_say_why():
    empty = expected_empty(_board("run-health"))
    assert empty["Loss scale"] == "no GradScaler in this run"
    assert set(empty) == {"Loss scale", "Active findings (details)", "Findings raised (cumulative)", "Alerts",
                          "Gradient noise scale", "Steps skipped by the guard"}
    assert "Active findings" not in expected_empty(_board("service"))
    assert substitute("x[$__rate_interval]", {"__rate_interval": "30s"}) == "x[30s]"


# ---- the queries, with the real promtool ---------------------------------------------------------------------
def test_every_query_parses(tmp_path):
    rules = [{"record": f"dashboard:{key.replace('-', '_')}:query{i}", "expr": expr}
             for key in KEYS for i, (_, expr) in enumerate(panel_queries(_board(key), {"run": "r"},
                                                                          annotations=True))]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_run_state_live_finished_stale(tmp_path):
    """Run a keeps merging steps (live), b finished, c went quiet without finishing (stale after 600 s)."""
    series = [
        {"series": 'gradflow_last_step_timestamp_seconds{run="a", job="gfservice"}', "values": "0+60x20"},
        {"series": 'gradflow_last_step_timestamp_seconds{run="b", job="gfservice"}', "values": "0+60x2 120x17"},
        {"series": 'gradflow_last_step_timestamp_seconds{run="c", job="gfservice"}', "values": "0+60x2 120x17"},
        {"series": 'gradflow_run_finished{run="a", job="gfservice"}', "values": "0x20"},
        {"series": 'gradflow_run_finished{run="b", job="gfservice"}', "values": "0x2 1x17"},
        {"series": 'gradflow_run_finished{run="c", job="gfservice"}', "values": "0x20"},
        {"series": 'gradflow_last_step{run="a", job="gfservice"}', "values": "0+10x20"},
    ]
    fleet = dict(panel_queries(_board("fleet")))
    state = [{"labels": f'{{run="{r}"}}', "value": v} for r, v in (("a", 0), ("b", 1), ("c", 2))]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{"interval": "1m", "input_series": series,
             "promql_expr_test": [
                 {"expr": BUILD.state_expr(), "eval_time": "20m", "exp_samples": state},
                 {"expr": BUILD.state_expr('run="c"'), "eval_time": "5m", "exp_samples": [state[0] | {"labels":
                                                                                         '{run="c"}'}]},
                 {"expr": fleet["Live"], "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
                 {"expr": fleet["Stale"], "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]},
                 {"expr": fleet["Stale runs"], "eval_time": "20m",
                  "exp_samples": [{"labels": '{run="c"}', "value": 20 * 60 - 120}]},
             ]}]}
    path = tmp_path / "state_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
