"""``gfservice grafana push`` against a local server that plays Grafana's documented HTTP API.

No Grafana server can be installed on these machines, so this test runs a small HTTP server on 127.0.0.1 (a free
port from the OS) that implements the parts of Grafana's documented HTTP API the push uses, and checks every
request's method, path, headers and payload against that documentation:

- folders (https://grafana.com/docs/grafana/latest/developers/http_api/folder/): ``GET /api/folders/:uid``
  (404 when absent), ``GET /api/folders``, ``POST /api/folders`` with ``{"uid", "title"}`` (409 when it exists),
  ``PUT /api/folders/:uid``;
- dashboards (.../http_api/dashboard/): ``POST /api/dashboards/db`` with ``{"dashboard", "folderUid", "overwrite",
  "message"}``, answering ``{"id", "uid", "url", "status", "version"}`` (412 when the uid exists without overwrite);
- data sources (.../http_api/data_source/): ``GET /api/datasources/uid/:uid``;
- alerting provisioning (.../http_api/alerting_provisioning/): ``GET/PUT /api/v1/provisioning/alert-rules/:uid``,
  ``POST /api/v1/provisioning/alert-rules`` (201), ``GET/PUT /api/v1/provisioning/folder/:uid/rule-groups/:group``
  (interval in seconds, a multiple of the 10 s base interval);
- every request carries ``Authorization: Bearer <token>`` (401 otherwise, 403 for a token without the right role);
  bodies are ``Content-Type: application/json``.

The server keeps state, so a second push is seen to update in place instead of duplicating.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from gfservice.cli.grafana import push_main
from gfservice.observability import grafana
from gfservice.observability.grafana import GrafanaAuthError, GrafanaRequestError, GrafanaUnreachable, push

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
GENERATED_ALERTS = REPO / "deploy/grafana/provisioning/alerting/gfservice-alerts.yml"
TOKEN = "glsa_editor_token_0123456789"
VIEWER = "glsa_viewer_token_0123456789"
UID = re.compile(r"^[a-zA-Z0-9_-]{1,40}$")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w))+$")

# A small copy of the Grafana alert-rule provisioning file gfservice generates (same shape, two rules).
ALERTS_FIXTURE = {
    "apiVersion": 1,
    "groups": [{
        "orgId": 1,
        "name": "gfservice-runs",
        "folder": "gfservice",
        "interval": "30s",
        "rules": [
            {
                "uid": "gfs-nonfinite",
                "title": "GradflowNonFiniteGradients",
                "condition": "B",
                "data": [
                    {"refId": "A", "relativeTimeRange": {"from": 300, "to": 0}, "datasourceUid": "gfservice-prometheus",
                     "model": {"refId": "A", "expr": "max by (run) (gradflow_nonfinite_layers) > 0", "instant": True}},
                    {"refId": "B", "datasourceUid": "__expr__",
                     "model": {"refId": "B", "type": "threshold", "expression": "A",
                               "conditions": [{"evaluator": {"type": "gt", "params": [0]}}]}},
                ],
                "noDataState": "OK",
                "execErrState": "Error",
                "for": "0s",
                "dashboardUid": "gfservice-run-health",
                "panelId": 7,
                "labels": {"severity": "critical"},
                "annotations": {"summary": "NaN/Inf gradients in run {{ $labels.run }}",
                                "runbook_url": "docs/runbooks/nonfinite.md"},
            },
            {
                "uid": "gfs-stalled",
                "title": "GradflowTrainingStalled",
                "condition": "B",
                "data": [
                    {"refId": "A", "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": "gfservice-prometheus",
                     "model": {"refId": "A", "expr": "time() - gradflow_last_step_timestamp_seconds", "instant": True}},
                    {"refId": "B", "datasourceUid": "__expr__",
                     "model": {"refId": "B", "type": "threshold", "expression": "A",
                               "conditions": [{"evaluator": {"type": "gt", "params": [300]}}]}},
                ],
                "for": "2m",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "run {{ $labels.run }} merged no step for 5 minutes",
                                "runbook_url": "docs/runbooks/stalled.md"},
            },
        ],
    }],
}


# ---- the Grafana stand-in ------------------------------------------------------------------------------------
class FakeGrafana:
    """State and request log of the stand-in; ``problems`` lists every departure from the documented API."""

    def __init__(self, datasources: tuple[str, ...] = ("gfservice-prometheus",)):
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, dict[str, Any]] = {}
        self.groups: dict[tuple[str, str], int] = {}
        self.datasources = {uid: {"uid": uid, "type": "prometheus", "name": uid} for uid in datasources}
        self.requests: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()

    # Each handler returns (status, body); a 4xx body has Grafana's {"message": ...} shape.
    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        auth = headers.get("authorization", "")
        if auth not in (f"Bearer {TOKEN}", f"Bearer {VIEWER}"):
            return 401, {"message": "Invalid API key", "messageId": "api-keys.invalid"}
        if method in ("POST", "PUT", "DELETE") and auth == f"Bearer {VIEWER}":
            return 403, {"message": "You'll need additional permissions to perform this action."}
        if method in ("POST", "PUT"):
            if not headers.get("content-type", "").startswith("application/json"):
                self.problems.append(f"{method} {path} without Content-Type: application/json")
                return 415, {"message": "Content-Type must be application/json"}
            if not isinstance(body, dict):
                return 400, {"message": "bad request data"}
        for pattern, name in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and name.startswith(method + " "):
                return getattr(self, name.split()[1])(body, *m.groups())
        self.problems.append(f"undocumented request {method} {path}")
        return 404, {"message": "Not found"}

    def get_folder(self, _body: Any, uid: str) -> tuple[int, Any]:
        f = self.folders.get(uid)
        return (200, f) if f else (404, {"message": "folder not found", "status": "not-found"})

    def list_folders(self, _body: Any) -> tuple[int, Any]:
        return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]

    def create_folder(self, body: dict[str, Any]) -> tuple[int, Any]:
        unknown = set(body) - {"uid", "title", "parentUid", "description"}
        if unknown or not body.get("title") or ("uid" in body and not UID.match(body["uid"])):
            self.problems.append(f"bad folder payload {body}")
            return 400, {"message": "invalid folder payload"}
        if body.get("uid") in self.folders or any(f["title"] == body["title"] for f in self.folders.values()):
            return 409, {"message": "a folder with the same name already exists"}
        uid = body.get("uid") or f"f{len(self.folders)}"
        folder = {"id": len(self.folders) + 1, "uid": uid, "title": body["title"], "url": f"/dashboards/f/{uid}/",
                  "version": 1}
        self.folders[uid] = folder
        return 200, folder

    def update_folder(self, body: dict[str, Any], uid: str) -> tuple[int, Any]:
        if uid not in self.folders:
            return 404, {"message": "folder not found"}
        if not body.get("title") or not (body.get("overwrite") or "version" in body):
            self.problems.append(f"folder update without title and version/overwrite: {body}")
            return 400, {"message": "invalid folder update"}
        self.folders[uid].update(title=body["title"], version=self.folders[uid]["version"] + 1)
        return 200, self.folders[uid]

    def save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        board, folder = body.get("dashboard"), body.get("folderUid")
        unknown = set(body) - {"dashboard", "folderUid", "folderId", "overwrite", "message"}
        if unknown or not isinstance(board, dict) or not board.get("title") or not isinstance(body.get("overwrite"),
                                                                                            bool):
            self.problems.append(f"bad dashboard payload keys {sorted(body)}")
            return 400, {"message": "bad request data"}
        if folder not in self.folders:
            return 400, {"message": "folder not found"}
        uid = board.get("uid")
        if not uid or not UID.match(uid):
            self.problems.append(f"dashboard without a valid uid: {uid!r}")
            return 400, {"message": "invalid uid"}
        if board.get("id") is not None:
            return 404, {"message": "Dashboard not found"}
        old = self.dashboards.get(uid)
        if old and not body["overwrite"]:
            return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
        version = old["version"] + 1 if old else 1
        self.dashboards[uid] = {"dashboard": board, "folderUid": folder, "version": version}
        return 200, {"id": len(self.dashboards), "uid": uid, "url": f"/d/{uid}/x", "status": "success",
                     "version": version, "slug": "x"}

    def get_datasource(self, _body: Any, uid: str) -> tuple[int, Any]:
        ds = self.datasources.get(uid)
        return (200, ds) if ds else (404, {"message": "Data source not found"})

    def _check_rule(self, rule: dict[str, Any]) -> str:
        required = ("title", "ruleGroup", "folderUID", "condition", "data", "noDataState", "execErrState", "for",
                    "orgID")
        missing = [k for k in required if k not in rule]
        if missing:
            return f"missing {missing}"
        allowed = {*required, "uid", "annotations", "labels", "isPaused", "notification_settings", "record",
                   "keep_firing_for", "missing_series_evals_to_resolve", "id", "updated", "provenance"}
        if set(rule) - allowed:
            return f"unknown fields {sorted(set(rule) - allowed)}"
        if rule["folderUID"] not in self.folders:
            return "folder not found"
        if rule["noDataState"] not in ("Alerting", "NoData", "OK", "KeepLast"):
            return f"bad noDataState {rule['noDataState']}"
        if rule["execErrState"] not in ("Alerting", "Error", "OK", "KeepLast"):
            return f"bad execErrState {rule['execErrState']}"
        if not DURATION.match(str(rule["for"])) or not isinstance(rule["orgID"], int):
            return "bad for or orgID"
        refs = [q.get("refId") for q in rule["data"]]
        if not rule["data"] or rule["condition"] not in refs:
            return "condition is not a refId of data"
        for q in rule["data"]:
            if not isinstance(q.get("model"), dict) or not q.get("datasourceUid"):
                return "query without model or datasourceUid"
            if q["datasourceUid"] not in (*self.datasources, "__expr__", "-100"):
                return f"data source {q['datasourceUid']} not found"
        if any(k.startswith("__") and not isinstance(v, str) for k, v in (rule.get("annotations") or {}).items()):
            return "annotation values must be strings"
        return ""

    def get_rule(self, _body: Any, uid: str) -> tuple[int, Any]:
        r = self.rules.get(uid)
        return (200, r) if r else (404, {"message": "rule not found"})

    def create_rule(self, body: dict[str, Any]) -> tuple[int, Any]:
        problem = self._check_rule(body)
        if problem:
            self.problems.append(f"POST alert rule {body.get('uid')}: {problem}")
            return 400, {"message": f"invalid alert rule: {problem}"}
        if body.get("uid") in self.rules:
            return 409, {"message": "conflict: a rule with this uid exists"}
        rule = {**body, "id": len(self.rules) + 1, "provenance": "api"}
        self.rules[body["uid"]] = rule
        self.groups.setdefault((body["folderUID"], body["ruleGroup"]), 60)  # Grafana's default evaluation interval
        return 201, rule

    def update_rule(self, body: dict[str, Any], uid: str) -> tuple[int, Any]:
        if uid not in self.rules:
            return 404, {"message": "rule not found"}
        problem = self._check_rule(body) or ("uid in body differs from the path" if body.get("uid", uid) != uid
                                             else "")
        if problem:
            self.problems.append(f"PUT alert rule {uid}: {problem}")
            return 400, {"message": f"invalid alert rule: {problem}"}
        self.rules[uid] = {**body, "id": self.rules[uid]["id"], "provenance": "api"}
        self.groups.setdefault((body["folderUID"], body["ruleGroup"]), 60)
        return 200, self.rules[uid]

    def get_group(self, _body: Any, folder: str, group: str) -> tuple[int, Any]:
        if (folder, group) not in self.groups:
            return 404, {"message": "rule group not found"}
        rules = [r for r in self.rules.values() if r["folderUID"] == folder and r["ruleGroup"] == group]
        return 200, {"title": group, "folderUid": folder, "interval": self.groups[(folder, group)], "rules": rules}

    def put_group(self, body: dict[str, Any], folder: str, group: str) -> tuple[int, Any]:
        interval = body.get("interval")
        if not isinstance(interval, int) or interval <= 0 or interval % 10:
            self.problems.append(f"rule group interval {interval!r} is not a positive multiple of 10 s")
            return 400, {"message": "invalid interval"}
        if body.get("title") != group or body.get("folderUid") != folder:
            self.problems.append(f"rule group body names {body.get('title')}/{body.get('folderUid')}")
            return 400, {"message": "title and folderUid must match the path"}
        mine = {r["uid"] for r in self.rules.values() if r["folderUID"] == folder and r["ruleGroup"] == group}
        if {r.get("uid") for r in body.get("rules", [])} != mine:
            self.problems.append("rule group PUT would add or delete rules")
            return 400, {"message": "rules differ"}
        self.groups[(folder, group)] = interval
        return 200, self.get_group(None, folder, group)[1]


ROUTES = [
    (r"/api/folders/([^/]+)", "GET get_folder"),
    (r"/api/folders/([^/]+)", "PUT update_folder"),
    (r"/api/folders", "GET list_folders"),
    (r"/api/folders", "POST create_folder"),
    (r"/api/dashboards/db", "POST save_dashboard"),
    (r"/api/datasources/uid/([^/]+)", "GET get_datasource"),
    (r"/api/v1/provisioning/alert-rules/([^/]+)", "GET get_rule"),
    (r"/api/v1/provisioning/alert-rules/([^/]+)", "PUT update_rule"),
    (r"/api/v1/provisioning/alert-rules", "POST create_rule"),
    (r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", "GET get_group"),
    (r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", "PUT put_group"),
]


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = "<not json>"
            path = self.path.split("?")[0]
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                state.requests.append({"method": self.command, "path": path, "headers": headers, "body": body})
                status, answer = state.handle(self.command, path, headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def fake() -> Iterator[tuple[FakeGrafana, str]]:
    state = FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def alerts_file(tmp_path: Path) -> Path:
    path = tmp_path / "gfservice-alerts.yml"
    path.write_text(yaml.safe_dump(ALERTS_FIXTURE, sort_keys=False))
    return path


def _calls(state: FakeGrafana, start: int = 0) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in state.requests[start:]]


# ---- tests ---------------------------------------------------------------------------------------------------
def test_first_push_creates_and_second_push_updates_in_place(fake, alerts_file):
    state, url = fake
    boards = {json.loads(p.read_text())["uid"]: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
    assert len(boards) == 3

    first = push(url, TOKEN, DASHBOARDS, alerts_file)

    assert state.problems == []
    rule_paths = [("GET", "/api/v1/provisioning/alert-rules/gfs-nonfinite"),
                  ("POST", "/api/v1/provisioning/alert-rules"),
                  ("GET", "/api/v1/provisioning/alert-rules/gfs-stalled"),
                  ("POST", "/api/v1/provisioning/alert-rules")]
    group = "/api/v1/provisioning/folder/gfservice/rule-groups/gfservice-runs"
    assert _calls(state) == [
        ("GET", "/api/folders/gfservice"),
        ("GET", "/api/folders"),
        ("POST", "/api/folders"),
        *[("POST", "/api/dashboards/db")] * 3,
        ("GET", "/api/datasources/uid/gfservice-prometheus"),
        *rule_paths,
        ("GET", group),
        ("PUT", group),
    ]
    for r in state.requests:
        assert r["headers"]["authorization"] == f"Bearer {TOKEN}"
        if r["method"] in ("POST", "PUT"):
            assert r["headers"]["content-type"].startswith("application/json")
    assert state.requests[2]["body"] == {"title": "gfservice", "uid": "gfservice"}
    for r in state.requests[3:6]:
        body = r["body"]
        assert body["folderUid"] == "gfservice" and body["overwrite"] is True
        assert body["dashboard"] == {**boards[body["dashboard"]["uid"]], "id": None}
    nan_rule = state.requests[8]["body"]
    assert nan_rule["uid"] == "gfs-nonfinite" and nan_rule["folderUID"] == "gfservice"
    assert nan_rule["ruleGroup"] == "gfservice-runs" and nan_rule["orgID"] == 1
    assert nan_rule["data"] == ALERTS_FIXTURE["groups"][0]["rules"][0]["data"]
    assert nan_rule["annotations"]["__dashboardUid__"] == "gfservice-run-health"
    assert nan_rule["annotations"]["__panelId__"] == "7"
    assert nan_rule["annotations"]["runbook_url"] == "docs/runbooks/nonfinite.md"
    assert "dashboardUid" not in nan_rule and "panelId" not in nan_rule
    assert state.requests[-1]["body"]["interval"] == 30
    assert first.folder == "created"
    assert first.dashboards == dict.fromkeys(["gfservice-fleet", "gfservice-run-health", "gfservice-service"],
                                             "created")
    assert first.rules == {"gfs-nonfinite": "created", "gfs-stalled": "created"}
    assert first.groups == {"gfservice-runs": "interval set to 30s"}

    mark = len(state.requests)
    second = push(url, TOKEN, DASHBOARDS, alerts_file)

    assert state.problems == []
    assert _calls(state, mark) == [
        ("GET", "/api/folders/gfservice"),
        *[("POST", "/api/dashboards/db")] * 3,
        ("GET", "/api/datasources/uid/gfservice-prometheus"),
        ("GET", "/api/v1/provisioning/alert-rules/gfs-nonfinite"),
        ("PUT", "/api/v1/provisioning/alert-rules/gfs-nonfinite"),
        ("GET", "/api/v1/provisioning/alert-rules/gfs-stalled"),
        ("PUT", "/api/v1/provisioning/alert-rules/gfs-stalled"),
        ("GET", group),
    ]
    assert second.folder == "unchanged"
    assert set(second.dashboards.values()) == {"updated"}
    assert second.rules == {"gfs-nonfinite": "updated", "gfs-stalled": "updated"}
    assert second.groups == {"gfservice-runs": "unchanged"}
    # Nothing duplicated: one folder, three dashboards (now at version 2), two rules.
    assert list(state.folders) == ["gfservice"]
    assert {uid: d["version"] for uid, d in state.dashboards.items()} == dict.fromkeys(boards, 2)
    assert sorted(state.rules) == ["gfs-nonfinite", "gfs-stalled"]
    assert "dashboard gfservice-run-health: updated" in str(second)


def test_existing_folder_with_the_title_is_reused(fake, alerts_file):
    state, url = fake
    state.folders["legacy42"] = {"id": 1, "uid": "legacy42", "title": "gfservice", "version": 3}
    summary = push(url, TOKEN, DASHBOARDS, alerts_file)
    assert state.problems == []
    assert summary.folder_uid == "legacy42" and summary.folder == "found by title"
    assert ("POST", "/api/folders") not in _calls(state)
    assert {d["folderUid"] for d in state.dashboards.values()} == {"legacy42"}
    assert {r["folderUID"] for r in state.rules.values()} == {"legacy42"}


def test_refused_token_is_a_clear_error(fake, alerts_file):
    state, url = fake
    with pytest.raises(GrafanaAuthError, match=r"refused the token \(401 Unauthorized\).*GRAFANA_TOKEN"):
        push(url, "glsa_wrong", DASHBOARDS, alerts_file)
    assert state.requests[0]["headers"]["authorization"] == "Bearer glsa_wrong"
    assert len(state.requests) == 1 and not state.folders


def test_token_without_permission_is_a_clear_error(fake, alerts_file):
    state, url = fake
    with pytest.raises(GrafanaAuthError, match=r"403 Forbidden.*Editor role"):
        push(url, VIEWER, DASHBOARDS, alerts_file)
    assert _calls(state)[-1] == ("POST", "/api/folders") and not state.folders


def test_unreachable_grafana_is_a_clear_error(alerts_file):
    with socket.socket() as s:  # a port the OS just handed out and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GrafanaUnreachable, match=rf"cannot reach Grafana at http://127.0.0.1:{port} "
                                                 r"\(connection refused\).*--url"):
        push(f"http://127.0.0.1:{port}", TOKEN, DASHBOARDS, alerts_file, timeout=5)


def test_missing_data_source_is_named(fake, alerts_file):
    state, url = fake
    state.datasources.clear()
    with pytest.raises(GrafanaRequestError, match=r"'gfservice-prometheus'.*provisioning/datasources/gfservice.yml"):
        push(url, TOKEN, DASHBOARDS, alerts_file)
    assert not state.rules


def test_local_problems_are_reported_before_contacting_grafana(fake, tmp_path):
    state, url = fake
    no_uid = tmp_path / "rules.yml"
    no_uid.write_text(yaml.safe_dump({"apiVersion": 1, "groups": [{"name": "g", "rules": [{"title": "x"}]}]}))
    with pytest.raises(grafana.GrafanaError, match="has no uid"):
        push(url, TOKEN, DASHBOARDS, no_uid)
    with pytest.raises(grafana.GrafanaError, match="does not exist"):
        push(url, TOKEN, DASHBOARDS, tmp_path / "absent.yml")
    assert state.requests == []


def test_command_line(fake, alerts_file, capsys):
    state, url = fake
    assert push_main(["push", "--url", url, "--token", TOKEN, "--dashboards", str(DASHBOARDS),
                      "--alerts", str(alerts_file)]) == 0
    out = capsys.readouterr().out
    assert "folder gfservice created" in out and "alert rule gfs-stalled: created" in out
    assert push_main(["push", "--url", url, "--token", "nope", "--dashboards", str(DASHBOARDS), "--no-alerts"]) == 1
    assert "refused the token" in capsys.readouterr().err
    assert state.problems == []


def test_generated_alert_rules_file_is_accepted(fake):
    """The alert rules that gfservice generates pass the stand-in's checks."""
    state, url = fake
    summary = push(url, TOKEN, DASHBOARDS, GENERATED_ALERTS)
    assert state.problems == []
    assert summary.rules and set(summary.rules.values()) == {"created"}


def test_push_defaults_to_the_shipped_files_from_any_directory(fake, tmp_path, monkeypatch, capsys):
    """Without --dashboards/--alerts the push reads gfservice's package data, not the working directory."""
    from gfservice.observability import alerts, assets

    state, url = fake
    monkeypatch.chdir(tmp_path)  # no dashboards/ or deploy/ here
    assert grafana.load_dashboards() == [assets.dashboard(key) for key in sorted(assets.dashboards())]
    assert push_main(["push", "--url", url, "--token", TOKEN]) == 0
    assert state.problems == []
    committed = {json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json")}
    assert set(state.dashboards) == committed
    generated = yaml.safe_load(GENERATED_ALERTS.read_text())["groups"][0]["rules"]
    assert sorted(state.rules) == sorted(r["uid"] for r in generated) and len(state.rules) == len(alerts.ALERTS)
    assert "alert rule gfservice-service-down: created" in capsys.readouterr().out

    mark = len(state.requests)
    summary = push(url, TOKEN, alerts=False)
    assert summary.rules == {} and not any("alert-rules" in path for _, path in _calls(state, mark))
    with pytest.raises(grafana.GrafanaError, match="does not exist: pass --dashboards DIR"):
        push(url, TOKEN, tmp_path / "absent")
