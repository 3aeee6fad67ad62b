"""Put gfservice's folder, dashboards and alert rules into a running Grafana.

Idempotent: the folder is looked up (by uid, then by title) before it is created, dashboards are saved with
``overwrite``, and each alert rule is updated (``PUT``) when its uid exists and created (``POST``) otherwise,
so a second push changes nothing but versions. The command is ``gfservice grafana push``
(:mod:`gfservice.cli.grafana`). Uses grafana-client (``pip install 'gfservice[grafana]'``) and
Grafana's documented HTTP API: ``/api/folders``, ``/api/dashboards/db``, ``/api/datasources/uid/:uid`` and the
alerting provisioning API ``/api/v1/provisioning/alert-rules`` and ``.../folder/:uid/rule-groups/:group``.

By default the dashboards and the alert rules are the ones this gfservice ships (package data, read through
:mod:`gfservice.observability.assets`, so the push works from an installed wheel in any directory); ``--dashboards
DIR`` and ``--alerts FILE`` point at others. The alert rules are Grafana file-provisioning YAML (what ``gfservice
alerts render`` writes to ``grafana/provisioning/alerting/gfservice-alerts.yml``); :func:`rules_from_provisioning`
turns its groups into the API's rule objects:

>>> doc = {"apiVersion": 1, "groups": [{"orgId": 1, "name": "gfservice", "folder": "gfservice",
...        "interval": "1m", "rules": [{"uid": "gfs-nan", "title": "NaN gradients", "condition": "B",
...        "data": [{"refId": "A", "datasourceUid": "gfservice-prometheus", "model": {"expr": "up"}}],
...        "for": "0s", "dashboardUid": "gfservice-run-health", "panelId": 16}]}]}
>>> groups, rules = rules_from_provisioning(doc, folder_uid="gfservice")
>>> groups, rules[0]["ruleGroup"], rules[0]["folderUID"], rules[0]["annotations"]["__dashboardUid__"]
({'gfservice': 60}, 'gfservice', 'gfservice', 'gfservice-run-health')
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union
from urllib.parse import urlsplit

import yaml

from gfservice.observability import assets

if TYPE_CHECKING:
    from gfservice.observability.assets import Traversable

DEFAULT_URL = "http://127.0.0.1:3000"
FOLDER_UID = "gfservice"
#: Data source uids that are Grafana expressions, not data sources.
EXPRESSION_UIDS = {"__expr__", "-100"}

T = TypeVar("T")
#: A local file or directory: a path, or a :class:`~importlib.resources.abc.Traversable` of the package data.
Source = Union[str, "os.PathLike[str]", "Traversable"]


class GrafanaError(RuntimeError):
    """gfservice could not push to Grafana; the message says why and what to do."""


class GrafanaUnreachable(GrafanaError):
    """No answer from Grafana: wrong URL, Grafana down, or a network in between."""


class GrafanaAuthError(GrafanaError):
    """Grafana refused the token (401) or the token may not do this (403)."""


class GrafanaRequestError(GrafanaError):
    """Grafana answered a request with an error other than 401/403."""


@dataclass
class PushSummary:
    """What a push did: ``created``, ``updated``, ``unchanged`` (or ``found by title``) per object."""

    url: str
    folder_uid: str = ""
    folder: str = ""
    dashboards: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"Grafana {self.url}: folder {self.folder_uid} {self.folder}"]
        lines += [f"  dashboard {uid}: {action}" for uid, action in self.dashboards.items()]
        lines += [f"  alert rule {uid}: {action}" for uid, action in self.rules.items()]
        lines += [f"  rule group {name}: {action}" for name, action in self.groups.items()]
        return "\n".join(lines)


# ---- local inputs --------------------------------------------------------------------------------------------
def _local(source: Source) -> Path | Traversable:
    return Path(source) if isinstance(source, str | os.PathLike) else source


def load_dashboards(directory: Source | None = None) -> list[dict[str, Any]]:
    """Every ``*.json`` dashboard in ``directory`` (sorted by file name); each needs a ``uid`` and a ``title``.

    ``None`` reads the dashboards this gfservice ships.
    """
    if directory is None:
        where, paths = "gfservice's package data", list(assets.dashboards().values())
    else:
        d = _local(directory)
        if not d.is_dir():
            raise GrafanaError(f"dashboards directory {d} does not exist: pass --dashboards DIR, or leave it out "
                               "to push the dashboards gfservice ships")
        where, paths = str(d), [p for p in d.iterdir() if p.name.endswith(".json") and p.is_file()]
    out = []
    for path in sorted(paths, key=lambda p: p.name):
        try:
            board = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GrafanaError(f"{path} is not valid JSON: {exc}") from None
        if not board.get("uid") or not board.get("title"):
            raise GrafanaError(f"{path} has no uid or title: a dashboard needs a stable uid to be updated in place")
        out.append(board)
    if not out:
        raise GrafanaError(f"no *.json dashboards in {where}")
    return out


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(text: str | int | float) -> int:
    """A Prometheus/Grafana duration (``"1m30s"``, ``"60s"``, ``60``) in whole seconds.

    >>> seconds("1m30s"), seconds("2h"), seconds(45)
    (90, 7200, 45)
    """
    if isinstance(text, int | float):
        return int(text)
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise GrafanaError(f"cannot read the duration {text!r} (use e.g. 30s, 1m, 1h30m)")
    return int(sum(float(n) * _UNIT_S[u] for n, u in parts))


def rules_from_provisioning(
    doc: Mapping[str, Any], folder_uid: str, source: str = "the alert rules file"
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """``(group name -> evaluation interval in seconds, API rule objects)`` from a file-provisioning document.

    Every rule goes into ``folder_uid`` (the folder the push manages). File-only fields are translated:
    ``dashboardUid``/``panelId`` become the ``__dashboardUid__``/``__panelId__`` annotations the API uses.
    """
    groups: dict[str, int] = {}
    rules: list[dict[str, Any]] = []
    for group in doc.get("groups") or []:
        name = group.get("name")
        if not name:
            raise GrafanaError(f"a rule group in {source} has no name")
        groups[name] = seconds(group.get("interval", "1m"))
        for raw in group.get("rules") or []:
            rule = dict(raw)
            if not rule.get("uid"):
                raise GrafanaError(f"rule {rule.get('title', '?')!r} in {source} has no uid: every rule needs a "
                                   "stable uid so that a second push updates it instead of adding a copy")
            annotations = dict(rule.get("annotations") or {})
            if "dashboardUid" in rule:
                annotations["__dashboardUid__"] = str(rule.pop("dashboardUid"))
            if "panelId" in rule:
                annotations["__panelId__"] = str(rule.pop("panelId"))
            rule.update(
                annotations=annotations,
                labels=dict(rule.get("labels") or {}),
                folderUID=folder_uid,
                ruleGroup=name,
                orgID=int(group.get("orgId", 1)),
            )
            rule.setdefault("noDataState", "NoData")
            rule.setdefault("execErrState", "Error")
            rule.setdefault("for", "0s")
            rule.setdefault("isPaused", False)
            rules.append(rule)
    return groups, rules


def load_alert_rules(path: Source | None, folder_uid: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Read a Grafana alert-rule provisioning YAML file (see :func:`rules_from_provisioning`).

    ``None`` reads the rules this gfservice ships.
    """
    p = assets.grafana_alert_rules() if path is None else _local(path)
    if not p.is_file():
        raise GrafanaError(f"alert rules file {p} does not exist: write it with gfservice alerts render --out DIR "
                           "(then pass --alerts DIR/grafana/provisioning/alerting/gfservice-alerts.yml), or leave "
                           "--alerts out to push the rules gfservice ships")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise GrafanaError(f"{p} is not valid YAML: {exc}") from None
    return rules_from_provisioning(doc, folder_uid, str(p))


# ---- credentials: never shown, never sent in the clear without a word -----------------------------------------
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_url(url: str) -> str:
    """``url`` without its ``user:password@`` part: what gfservice shows of a URL.

    >>> redact_url("http://admin:s3cret@grafana.example:3000/g/")
    'http://grafana.example:3000/g/'
    >>> redact_url("https://grafana.example")
    'https://grafana.example'
    """
    return _USERINFO.sub(r"\1", url)


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` with every URL's credentials stripped and each of ``secrets`` replaced by ``***``.

    >>> redact("GET http://u:pw@h/x failed: token glsa_123 refused", ("glsa_123",))
    'GET http://h/x failed: token *** refused'
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_url(text)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine by its very name: ``localhost`` (and ``*.localhost``) or a loopback
    address (127.0.0.0/8, ::1). Names are not resolved: a name that resolves to 127.0.0.1 still counts as remote.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("grafana.internal")
    (True, True, True, False)
    """
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_warning(url: str, token: str | None) -> str | None:
    """The warning to print before a token or password goes to ``url`` over plain http to another machine, else
    ``None`` (https, or a loopback host: the secret never leaves this machine).

    >>> plain_http_warning("http://grafana.example:3000", "t")[:60]
    'warning: sending the Grafana token over plain http to grafan'
    >>> plain_http_warning("https://grafana.example", "t"), plain_http_warning("http://127.0.0.1:3000", "t")
    (None, None)
    """
    parsed = urlsplit(url)
    what = "token" if token else "password" if parsed.password else None
    if what is None or parsed.scheme.lower() != "http" or is_loopback(parsed.hostname):
        return None
    return (f"warning: sending the Grafana {what} over plain http to {parsed.hostname}: anyone on the network path "
            "can read it; use an https:// URL")


# ---- talking to Grafana --------------------------------------------------------------------------------------
class _Grafana:
    """grafana-client with gfservice's error messages (which never show the token or a URL's password)."""

    def __init__(self, url: str, token: str, timeout: float):
        try:
            from grafana_client import GrafanaApi
            from grafana_client.client import TokenAuth
        except ImportError as exc:
            raise GrafanaError("gfservice grafana push needs grafana-client: pip install 'gfservice[grafana]'") from exc
        parsed = urlsplit(url)
        if token:
            credential: Any = TokenAuth(token)
        elif parsed.username and parsed.password:  # basic auth from the URL (grafana-client's own convention)
            credential = (parsed.username, parsed.password)
        else:
            raise GrafanaAuthError("no Grafana token: pass --token or set GRAFANA_TOKEN (a service account token "
                                   "with the Editor role)")
        self.url = redact_url(url.rstrip("/"))  # what messages show
        self.api = GrafanaApi.from_url(url.rstrip("/"), credential=credential, timeout=timeout)
        self.timeout = timeout

    def close(self) -> None:
        """Close the HTTP session (its sockets would otherwise linger until garbage collection)."""
        session = getattr(getattr(self.api, "client", None), "s", None)
        if session is not None:
            session.close()

    def call(self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any) -> T | None:
        """Run one grafana-client call; ``None`` for 404 when ``missing_ok``; errors become :class:`GrafanaError`."""
        from grafana_client.client import GrafanaException, GrafanaTimeoutError
        from niquests.exceptions import ConnectionError as NiquestsConnectionError
        from niquests.exceptions import RequestException

        try:
            return fn(*args, **kwargs)
        except GrafanaTimeoutError:
            raise GrafanaUnreachable(f"Grafana at {self.url} did not answer within {self.timeout:g} s while "
                                     f"{what}: is it overloaded, or is the URL right?") from None
        except NiquestsConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
            raise GrafanaUnreachable(f"cannot reach Grafana at {self.url} ({reason}) while {what}: is Grafana "
                                     "running, and are the URL and port right (--url)?") from None
        except RequestException as exc:
            raise GrafanaUnreachable(f"cannot talk to Grafana at {self.url} while {what}: {exc}") from None
        except GrafanaException as exc:
            status = exc.status_code
            if status == 404 and missing_ok:
                return None
            if status == 401:
                raise GrafanaAuthError(f"Grafana at {self.url} refused the token (401 Unauthorized) while {what}: "
                                       "check --token/GRAFANA_TOKEN; it must be a service account token of this "
                                       "Grafana that has not expired") from None
            if status == 403:
                raise GrafanaAuthError(f"the token is valid but may not do this (403 Forbidden) while {what}: give "
                                       "its service account the Editor role (Admin where alert rules need it)"
                                       ) from None
            detail = exc.message if not isinstance(exc.response, Mapping) else exc.response.get("message", exc.message)
            raise GrafanaRequestError(f"Grafana at {self.url} answered {status} while {what}: {detail}") from None


def _ensure_folder(g: _Grafana, uid: str, title: str, summary: PushSummary) -> str:
    folder = g.call(f"looking up folder {uid}", g.api.folder.get_folder, uid, missing_ok=True)
    if folder is None:
        folders = g.call("listing folders", g.api.folder.get_all_folders) or []
        same = next((f for f in folders if f.get("title") == title), None)
        if same is not None:
            summary.folder_uid, summary.folder = same["uid"], "found by title"
            return same["uid"]
        g.call(f"creating folder {title!r}", g.api.folder.create_folder, title, uid=uid)
        summary.folder_uid, summary.folder = uid, "created"
        return uid
    if folder.get("title") != title:
        g.call(f"renaming folder {uid}", g.api.folder.update_folder, uid, title=title, overwrite=True)
        summary.folder_uid, summary.folder = uid, "updated"
    else:
        summary.folder_uid, summary.folder = uid, "unchanged"
    return uid


def push(
    url: str,
    token: str,
    dashboards_dir: Source | None = None,
    alerts_file: Source | None = None,
    folder_title: str = "gfservice",
    *,
    alerts: bool = True,
    folder_uid: str = FOLDER_UID,
    timeout: float = 10.0,
) -> PushSummary:
    """Create or update the folder, the dashboards of ``dashboards_dir`` and the alert rules of ``alerts_file``.

    ``None`` (the default) for either means the files this gfservice ships; ``alerts=False`` pushes no rules.
    Local files are read and checked before Grafana is contacted.
    Raises :class:`GrafanaUnreachable`, :class:`GrafanaAuthError` or :class:`GrafanaRequestError`.
    """
    boards = load_dashboards(dashboards_dir)
    groups, rules = load_alert_rules(alerts_file, folder_uid) if alerts else ({}, [])
    g = _Grafana(url, token, timeout)
    warning = plain_http_warning(url, token)
    if warning:
        print(f"gfservice grafana push: {warning}", file=sys.stderr, flush=True)
    try:
        summary = PushSummary(url=g.url)
        uid = _ensure_folder(g, folder_uid, folder_title, summary)
        for board in boards:
            payload = {"dashboard": {**board, "id": None}, "folderUid": uid, "overwrite": True,
                       "message": "gfservice grafana push"}
            saved = g.call(f"saving dashboard {board['uid']}", g.api.dashboard.update_dashboard, payload) or {}
            summary.dashboards[board["uid"]] = "created" if saved.get("version") == 1 else "updated"
        sources = {q.get("datasourceUid") for r in rules for q in r.get("data") or []} - EXPRESSION_UIDS - {None}
        for ds in sorted(sources):
            found = g.call(f"looking up data source {ds}", g.api.datasource.get_datasource_by_uid, ds, missing_ok=True)
            if found is None:
                raise GrafanaRequestError(
                    f"the alert rules query the data source with uid {ds!r}, which Grafana at {g.url} does not have: "
                    "provision deploy/grafana/provisioning/datasources/gfservice.yml, or add a Prometheus data "
                    f"source with uid {ds!r}")
        for rule in rules:
            ruid = rule["uid"]
            rule = {**rule, "folderUID": uid}
            ap = g.api.alertingprovisioning
            if g.call(f"looking up alert rule {ruid}", ap.get_alertrule, ruid, missing_ok=True) is None:
                g.call(f"creating alert rule {ruid}", ap.create_alertrule, rule)
                summary.rules[ruid] = "created"
            else:
                g.call(f"updating alert rule {ruid}", ap.update_alertrule, ruid, rule)
                summary.rules[ruid] = "updated"
        for name, interval in groups.items():
            if not any(r["ruleGroup"] == name for r in rules):
                continue
            ap = g.api.alertingprovisioning
            group = g.call(f"reading rule group {name}", ap.get_rule_group, uid, name) or {}
            if group.get("interval") != interval:
                g.call(f"setting the interval of rule group {name}", ap.update_rule_group, uid, name,
                       {**group, "interval": interval})
                summary.groups[name] = f"interval set to {interval}s"
            else:
                summary.groups[name] = "unchanged"
        return summary
    finally:
        g.close()
