"""The Kubernetes bundle (deploy/kubernetes/) and the image, validated offline.

`kubectl kustomize` renders every kustomization (the base, both overlays, the RayJob sample); every core object,
and every pod template inside the custom resources, passes the Kubernetes OpenAPI schemas of kubernetes-validate
(strict: unknown fields are errors) for :data:`K8S_VERSION`; the custom resources are checked against the fields
their operators document (the tables below, with the reference they come from); the generated files are what the
code renders now; the PrometheusRule holds exactly the alerts of deploy/prometheus/rules/, the AlertmanagerConfig
the routes of deploy/alertmanager/alertmanager.yml; no container installs packages when it starts, no state lives
on an emptyDir, the Ray dashboard listens on 127.0.0.1 and /metrics is served and scraped over TLS only.

Needs kubectl (it bundles kustomize): the system's, else the test extra's (tests/kubetools.py); a missing one fails
the test with the way to install it, never a skip.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gfservice.cli import generated
from gfservice.cli.main import main as gfservice_main
from gfservice.config import load_settings
from gfservice.observability import alerts, kubernetes
from tests.kubetools import KUBECTL_HINT, kubectl_bin
from tests.promtools import promtool_bin, run_tool

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "deploy/kubernetes"
KUSTOMIZATIONS = ["base", "overlays/kube-prometheus-stack", "overlays/plain-prometheus", "samples/rayjob"]
#: The Kubernetes release whose schemas the core objects are validated against (the oldest we support).
K8S_VERSION = "1.32"
IMAGE = "ghcr.io/gfservice/gfservice"
METRICS_PORT = 9464


class _Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: kubectl writes ``matchType: =`` unquoted, a string, not YAML 1.1's value tag."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = kubectl_bin()
    res = subprocess.run([kubectl, "kustomize", str(BUNDLE / kustomization)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{res.stderr}\n({KUBECTL_HINT})"
    return tuple(d for d in yaml.load_all(res.stdout, Loader=_Loader) if d)


def objects(kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(kustomization, object) for every rendered object (of ``kind``)."""
    return [(k, o) for k in KUSTOMIZATIONS for o in render(k) if kind is None or o["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec, the RayJobs' included."""
    return ([(f"{k}: RayCluster {o['metadata']['name']}", o["spec"]) for k, o in objects("RayCluster")]
            + [(f"{k}: RayJob {o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for k, o in objects("RayJob")])


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """Every pod template in the custom resources."""
    out = []
    for where, spec in ray_cluster_specs():
        out.append((f"{where} head", spec["headGroupSpec"]["template"]))
        out += [(f"{where} worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) for every container of every pod template."""
    return [(f"{where} container {c['name']}", c, t["spec"]) for where, t in pod_templates()
            for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]


# ---- rendering and schemas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubectl_kustomize_renders(kustomization):
    kinds = {o["kind"] for o in render(kustomization)}
    expected = {
        "base": {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "RayCluster"},
        "overlays/kube-prometheus-stack": {"RayCluster", "PodMonitor", "PrometheusRule", "AlertmanagerConfig"},
        "overlays/plain-prometheus": {"RayCluster", "ConfigMap"},
        "samples/rayjob": {"RayJob", "ConfigMap", "PersistentVolumeClaim"},
    }[kustomization]
    assert expected <= kinds, f"{kustomization} renders {sorted(kinds)}, missing {sorted(expected - kinds)}"


def test_core_objects_and_pod_templates_pass_the_kubernetes_schemas():
    checked = set()
    for where, obj in objects():
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue  # checked against its operator's fields below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: {obj['apiVersion']} {obj['kind']} is neither core Kubernetes {K8S_VERSION} nor a "
                        "custom resource this test knows")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked.add(obj["kind"])
    assert {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"} <= checked
    for where, template in pod_templates():  # the PodTemplateSpecs KubeRay turns into pods
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template.get("metadata", {}), "name": "x"},
               "spec": template["spec"]}
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_schema_validation_can_fail():
    """The validation above is strict: a misspelt field is an error."""
    pvc = next(o for _, o in objects("PersistentVolumeClaim"))
    bad = {**pvc, "spec": {**pvc["spec"], "acessModes": ["ReadWriteOnce"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ---- custom resources: the fields their operators document ----------------------------------------------------
# A field table: {"fields": {name: sub-table or None}, "required": [...], "items": table for a list}. Names not in
# "fields" are errors (what the CRDs' structural schemas prune or reject).
_STR_MAP = None  # a map of strings (labels, rayStartParams): its keys are free

# KubeRay ray.io/v1, https://ray-project.github.io/kuberay/reference/api/ (docs/reference/api.md of
# ray-project/kuberay): RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec.
_POD_TEMPLATE = {"fields": {"metadata": None, "spec": None}, "required": ["spec"]}
RAY_CLUSTER_SPEC = {
    "fields": {
        "suspend": None, "managedBy": None, "autoscalerOptions": None, "headServiceAnnotations": _STR_MAP,
        "enableInTreeAutoscaling": None, "gcsFaultToleranceOptions": None, "rayVersion": None, "authOptions": None,
        "headGroupSpec": {"fields": {"template": _POD_TEMPLATE, "headService": None, "enableIngress": None,
                                     "rayStartParams": _STR_MAP, "serviceType": None},
                          "required": ["template"]},
        "workerGroupSpecs": {"items": {
            "fields": {"suspend": None, "groupName": None, "replicas": None, "minReplicas": None,
                       "maxReplicas": None, "idleTimeoutSeconds": None, "rayStartParams": _STR_MAP,
                       "template": _POD_TEMPLATE, "scaleStrategy": None, "numOfHosts": None},
            "required": ["groupName", "template"]}},
    },
    "required": ["headGroupSpec"],
}
RAY_JOB_SPEC = {
    "fields": {
        "activeDeadlineSeconds": None, "backoffLimit": None, "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
        "submitterConfig": None, "managedBy": None, "deletionStrategy": None, "entrypoint": None,
        "runtimeEnvYAML": None, "jobId": None, "submissionMode": None, "entrypointResources": None,
        "entrypointNumCpus": None, "entrypointNumGpus": None, "ttlSecondsAfterFinished": None,
        "shutdownAfterJobFinishes": None, "suspend": None, "schedule": None,
    },
    "required": [],
}
RAY_JOB_SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

# Prometheus operator monitoring.coreos.com, https://prometheus-operator.dev/docs/api-reference/api/ (CRDs in
# example/prometheus-operator-crd/ of prometheus-operator/prometheus-operator): PodMonitor (v1), PrometheusRule
# (v1), AlertmanagerConfig (v1alpha1).
_SECRET_KEY = {"fields": {"name": None, "key": None, "optional": None}, "required": ["key"]}
_SECRET_OR_CONFIGMAP = {"fields": {"secret": _SECRET_KEY, "configMap": _SECRET_KEY}}
_RELABEL = {"items": {"fields": {"sourceLabels": None, "separator": None, "targetLabel": None, "regex": None,
                                 "modulus": None, "replacement": None, "action": None}}}
POD_MONITOR_SPEC = {
    "fields": {
        "selector": {"fields": {"matchLabels": _STR_MAP, "matchExpressions": None}},
        "namespaceSelector": None, "jobLabel": None, "podTargetLabels": None, "sampleLimit": None,
        "targetLimit": None, "labelLimit": None, "labelNameLengthLimit": None, "labelValueLengthLimit": None,
        "keepDroppedTargets": None, "attachMetadata": None, "scrapeProtocols": None, "scrapeClass": None,
        "bodySizeLimit": None, "selectorMechanism": None, "fallbackScrapeProtocol": None,
        "podMetricsEndpoints": {"items": {"fields": {
            "port": None, "portNumber": None, "targetPort": None, "path": None, "scheme": None, "params": None,
            "interval": None, "scrapeTimeout": None, "honorLabels": None, "honorTimestamps": None,
            "trackTimestampsStaleness": None, "basicAuth": None, "oauth2": None, "authorization": None,
            "bearerTokenSecret": None, "metricRelabelings": _RELABEL, "relabelings": _RELABEL, "proxyUrl": None,
            "noProxy": None, "proxyFromEnvironment": None, "proxyConnectHeader": None, "followRedirects": None,
            "enableHttp2": None, "filterRunning": None,
            "tlsConfig": {"fields": {"ca": _SECRET_OR_CONFIGMAP, "cert": _SECRET_OR_CONFIGMAP, "keySecret": _SECRET_KEY,
                                     "serverName": None, "insecureSkipVerify": None, "minVersion": None,
                                     "maxVersion": None}},
        }}},
    },
    "required": ["selector"],
}
_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
PROMETHEUS_RULE_SPEC = {
    "fields": {"groups": {"items": {
        "fields": {"name": None, "interval": None, "limit": None, "partial_response_strategy": None,
                   "query_offset": None, "labels": _STR_MAP,
                   "rules": {"items": {"fields": {"alert": None, "record": None, "expr": None, "for": None,
                                                  "keep_firing_for": None, "labels": _STR_MAP,
                                                  "annotations": _STR_MAP},
                                       "required": ["expr"]}}},
        "required": ["name"]}}},
    "required": [],
}
_MATCHERS = {"items": {"fields": {"name": None, "value": None, "matchType": None, "regex": None},
                       "required": ["name"]}}
_ROUTE: dict[str, Any] = {"fields": {"receiver": None, "groupBy": None, "groupWait": None, "groupInterval": None,
                                     "repeatInterval": None, "matchers": _MATCHERS, "continue": None,
                                     "muteTimeIntervals": None, "activeTimeIntervals": None}}
_ROUTE["fields"]["routes"] = {"items": _ROUTE}
ALERTMANAGER_CONFIG_SPEC = {
    "fields": {
        "route": _ROUTE,
        "inhibitRules": {"items": {"fields": {"sourceMatch": _MATCHERS, "targetMatch": _MATCHERS, "equal": None}}},
        "receivers": {"items": {"fields": {
            "name": None, "webhookConfigs": {"items": {"fields": {"url": None, "urlSecret": _SECRET_KEY,
                                                                  "sendResolved": None, "httpConfig": None,
                                                                  "maxAlerts": None, "timeout": None}}},
            "emailConfigs": None, "pagerdutyConfigs": None, "opsgenieConfigs": None, "slackConfigs": None,
            "wechatConfigs": None, "victoropsConfigs": None, "pushoverConfigs": None, "snsConfigs": None,
            "telegramConfigs": None, "webexConfigs": None, "msteamsConfigs": None, "discordConfigs": None},
            "required": ["name"]}},
        "muteTimeIntervals": None, "timeIntervals": None,
    },
    "required": [],
}
CUSTOM_RESOURCES = {
    ("ray.io/v1", "RayCluster"): RAY_CLUSTER_SPEC,
    ("ray.io/v1", "RayJob"): RAY_JOB_SPEC,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR_SPEC,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SPEC,
    ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"): ALERTMANAGER_CONFIG_SPEC,
}


def _check_fields(value: Any, table: dict[str, Any] | None, path: str) -> list[str]:
    """Where ``value`` leaves the documented fields of ``table``: unknown or missing names."""
    if table is None:
        return []
    if "items" in table:
        if not isinstance(value, list):
            return [f"{path}: a list expected"]
        return [e for i, v in enumerate(value) for e in _check_fields(v, table["items"], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return [f"{path}: an object expected"]
    errors = [f"{path}.{k}: not a documented field" for k in value if k not in table["fields"]]
    errors += [f"{path}.{k}: required" for k in table.get("required", []) if k not in value]
    return errors + [e for k, v in value.items() if k in table["fields"]
                     for e in _check_fields(v, table["fields"][k], f"{path}.{k}")]


def test_check_fields_catches_unknown_and_missing_fields():
    assert _check_fields({"headGroupSpec": {"template": {"spec": {}}}}, RAY_CLUSTER_SPEC, "spec") == []
    assert _check_fields({"headGroupSpecs": {}}, RAY_CLUSTER_SPEC, "spec") == [
        "spec.headGroupSpecs: not a documented field", "spec.headGroupSpec: required"]


def test_custom_resources_use_the_fields_their_operators_document():
    seen = set()
    for where, obj in objects():
        key = (obj["apiVersion"], obj["kind"])
        if key not in CUSTOM_RESOURCES:
            continue  # core Kubernetes: schema-checked above
        seen.add(key)
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{where}: {obj['kind']}: {sorted(obj)}"
        errors = _check_fields(obj["spec"], CUSTOM_RESOURCES[key], f"{obj['kind']}.spec")
        assert not errors, f"{where}:\n" + "\n".join(errors)
        for name, val in obj["metadata"].get("labels", {}).items():
            assert isinstance(val, str), f"{where}: label {name} must be a string"
    assert seen == set(CUSTOM_RESOURCES)
    for where, spec in ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            bad = {k: v for k, v in group.get("rayStartParams", {}).items() if not isinstance(v, str)}
            assert not bad, f"{where}: rayStartParams values are strings in the CRD: {bad}"
    for where, job in objects("RayJob"):
        spec = job["spec"]
        assert spec.get("submissionMode", "K8sJobMode") in RAY_JOB_SUBMISSION_MODES
        if spec.get("submissionMode") == "SidecarMode":  # KubeRay rejects these with SidecarMode
            assert not {"clusterSelector", "submitterPodTemplate", "submitterConfig"} & set(spec), where
            assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy") == "Never"
    for where, rule in objects("PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                assert _DURATION.match(r.get("for", "0")), f"{where}: {r['alert']}: for {r['for']!r}"
                assert ("alert" in r) != ("record" in r), f"{where}: one of alert and record"
    for where, amc in objects("AlertmanagerConfig"):
        names = {r["name"] for r in amc["spec"]["receivers"]}
        for route in _walk_routes(amc["spec"]["route"]):
            assert route.get("receiver", "ticket") in names, f"{where}: route to an unknown receiver {route}"
            for m in route.get("matchers", []):
                assert m.get("matchType", "=") in {"=", "!=", "=~", "!~"}, f"{where}: {m}"


def _walk_routes(route: dict[str, Any]) -> list[dict[str, Any]]:
    return [route] + [r for child in route.get("routes", []) for r in _walk_routes(child)]


# ---- generated files -----------------------------------------------------------------------------------------
def test_generated_manifests_match_the_code():
    stale = generated.drifted(BUNDLE, kubernetes.rendered_files())
    assert not stale, (f"{', '.join(map(str, stale))} drifted from the code: run `gfservice kubernetes render` in "
                       "the repository root")
    assert gfservice_main(["alerts", "render", "--format", "prometheusrule", "--check",
                           "--out", str(ROOT / alerts.PROMETHEUS_RULE_MANIFEST)]) == 0


def test_render_commands_write_check_and_print(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert gfservice_main(["kubernetes", "render", "--out", str(out)]) == 0
    assert gfservice_main(["kubernetes", "render", "--out", str(out), "--check"]) == 0
    (out / kubernetes.DASHBOARDS_FILE).write_text("edited by hand\n")
    capsys.readouterr()
    assert gfservice_main(["kubernetes", "render", "--out", str(out), "--check"]) == 1
    assert str(out / kubernetes.DASHBOARDS_FILE) in capsys.readouterr().err
    rule = tmp_path / "rule.yaml"
    assert gfservice_main(["alerts", "render", "--format", "prometheusrule", "--out", str(rule)]) == 0
    assert rule.read_text() == (out / kubernetes.PROMETHEUS_RULE_FILE).read_text()
    rule.write_text(rule.read_text().replace("for: 10m", "for: 5m", 1))
    assert gfservice_main(["alerts", "render", "--format", "prometheusrule", "--out", str(rule), "--check"]) == 1
    capsys.readouterr()
    assert gfservice_main(["alerts", "render", "--format", "prometheusrule", "--out", "-"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == alerts.prometheus_rule()


def test_prometheus_rule_holds_exactly_the_alerts_of_the_rule_file():
    rule_file = yaml.safe_load((ROOT / alerts.PROMETHEUS_RULES).read_text())
    expected = [r for g in rule_file["groups"] for r in g["rules"]]
    (_, rule), = objects("PrometheusRule")
    assert rule["metadata"]["labels"].get("release"), "kube-prometheus-stack selects PrometheusRules by release"
    got = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    fields = ("alert", "expr", "for", "labels", "annotations")
    assert [{k: r.get(k) for k in fields} for r in got] == [{k: r.get(k) for k in fields} for r in expected]
    assert {r["alert"] for r in got} == {a.name for a in alerts.ALERTS}
    # The plain-Prometheus overlay ships the rule file itself.
    (_, cm), = [(k, o) for k, o in objects("ConfigMap") if o["metadata"]["name"] == "gfservice-rules"]
    assert cm["data"]["gfservice.rules.yml"] == (ROOT / alerts.PROMETHEUS_RULES).read_text()


def test_dashboards_are_configmaps_for_the_grafana_sidecar():
    cms = {o["metadata"]["name"]: o for o in render("base") if o["kind"] == "ConfigMap"
           and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    assert sorted(cms) == ["gfservice-dashboard-fleet", "gfservice-dashboard-run-health", "gfservice-dashboard-service"]
    for name, cm in cms.items():
        assert cm["metadata"]["annotations"]["grafana_folder"] == "gfservice"
        (file, text), = cm["data"].items()
        assert text == (ROOT / "dashboards" / file).read_text(), f"{name} differs from dashboards/{file}"
        assert len(text.encode()) < 256 * 1024, "kubectl apply keeps a copy in a 256 KiB annotation"


def test_alertmanager_config_has_the_routes_of_alertmanager_yml():
    plain = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    (_, amc), = objects("AlertmanagerConfig")

    def parse(matcher: str) -> tuple[str, str, str]:
        m = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher)
        assert m, matcher
        return m.group(1), m.group(2), m.group(3)

    def crd(m: dict[str, Any]) -> tuple[str, str, str]:
        return m["name"], m.get("matchType", "="), m["value"]

    def route_plain(r: dict[str, Any]) -> tuple:
        return (r.get("receiver"), tuple(r.get("group_by", ())), r.get("group_wait"), r.get("group_interval"),
                r.get("repeat_interval"), tuple(sorted(parse(m) for m in r.get("matchers", ()))),
                tuple(route_plain(c) for c in r.get("routes", ())))

    def route_crd(r: dict[str, Any]) -> tuple:
        return (r.get("receiver"), tuple(r.get("groupBy", ())), r.get("groupWait"), r.get("groupInterval"),
                r.get("repeatInterval"), tuple(sorted(crd(m) for m in r.get("matchers", ()))),
                tuple(route_crd(c) for c in r.get("routes", ())))

    assert route_crd(amc["spec"]["route"]) == route_plain(plain["route"])
    assert [(sorted(parse(m) for m in i["source_matchers"]), sorted(parse(m) for m in i["target_matchers"]),
             i["equal"]) for i in plain["inhibit_rules"]] == [
        (sorted(map(crd, i["sourceMatch"])), sorted(map(crd, i["targetMatch"])), i["equal"])
        for i in amc["spec"]["inhibitRules"]]
    assert ({r["name"]: [w.get("send_resolved") for w in r["webhook_configs"]] for r in plain["receivers"]}
            == {r["name"]: [w.get("sendResolved") for w in r["webhookConfigs"]] for r in amc["spec"]["receivers"]})


# ---- what the pods do at start ----------------------------------------------------------------------------------
_INSTALL = re.compile(r"\b(pip3?|uv pip|conda|mamba|apt-get|apt|apk|yum|dnf)\s+(-\S+\s+)*install\b")


def _start_commands() -> list[tuple[str, str]]:
    out = []
    for where, c, _ in containers():
        hooks = c.get("lifecycle", {})
        text = " ".join(c.get("command", []) + c.get("args", [])
                        + [x for h in hooks.values() for x in h.get("exec", {}).get("command", [])])
        out.append((where, text))
    for where, job in objects("RayJob"):
        out.append((f"{where}: RayJob entrypoint", job["spec"].get("entrypoint", "")))
    return out


def test_nothing_installs_packages_at_pod_start():
    assert _INSTALL.search("sleep 10 && pip install --no-cache-dir 'gfservice[ray]'")  # what it catches
    for where, text in _start_commands():
        assert not _INSTALL.search(text), f"{where} installs packages when it starts: {text}"
    for where, job in objects("RayJob"):
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
        assert not {"pip", "uv", "conda", "py_executable"} & set(runtime_env), f"{where}: runtimeEnvYAML installs"


def _volume_kinds(pod_spec: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: next(k for k in v if k != "name") for v in pod_spec.get("volumes", [])}


def _service_settings():
    """The service's settings, from the configuration file in the ConfigMap gfservice-config."""
    (cm,) = {o["metadata"]["name"]: o for _, o in objects("ConfigMap")}["gfservice-config"]["data"].values()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gfservice.toml"
        path.write_text(cm)
        return load_settings(path, env=False)


def _serving_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The containers that run ``gfservice serve``: in their own command, or as the head of a RayJob whose
    entrypoint does (the job's driver runs on the head)."""
    jobs = [f"{k}: RayJob {o['metadata']['name']} head " for k, o in objects("RayJob")
            if "gfservice serve" in o["spec"].get("entrypoint", "")]
    return [(where, c, spec) for where, c, spec in containers()
            if "gfservice serve" in " ".join(c.get("command", []) + c.get("args", []))
            or (any(where.startswith(j) for j in jobs) and c is spec["containers"][0])]


def test_no_state_on_an_empty_dir_and_the_service_state_on_a_volume_claim():
    for where, c, pod_spec in containers():
        kinds = _volume_kinds(pod_spec)
        for m in c.get("volumeMounts", []):
            if kinds[m["name"]] == "emptyDir":
                assert m["mountPath"] == "/dev/shm", f"{where}: emptyDir {m['name']} at {m['mountPath']}: scratch only"
    settings = _service_settings().service
    serving = _serving_containers()
    # The RayCluster's head (in the base and both overlays) and the RayJob's.
    assert {w.split(": ", 1)[1] for w, _, _ in serving} == {"RayCluster gfservice head container ray-head",
                                                            "RayJob gfservice-rayjob-sample head container ray-head"}
    for where, c, pod_spec in serving:
        kinds = _volume_kinds(pod_spec)
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        for state in (settings.state_dir, settings.snapshot_path):
            owner = [p for p in mounts if state.startswith(p + "/")]
            assert owner, f"{where}: {state} is on no volume (the container's own filesystem)"
            assert kinds[mounts[max(owner, key=len)]] == "persistentVolumeClaim", \
                f"{where}: {state} must live on a PersistentVolumeClaim"


def test_ray_dashboard_listens_on_localhost_only():
    specs = ray_cluster_specs()
    assert len(specs) >= 2
    for where, spec in specs:
        assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "127.0.0.1", where
    for where, c, _ in containers():
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        assert 8265 not in ports.values() and "dashboard" not in ports, f"{where} exposes the Ray dashboard"
        assert "dashboard-host" not in " ".join(c.get("args", [])), f"{where} sets the dashboard host itself"


def test_metrics_are_served_and_scraped_over_tls_only():
    service = _service_settings().service
    assert service.metrics_port == METRICS_PORT and service.exporter.certfile and service.exporter.keyfile
    for where, c, pod_spec in _serving_containers():
        secret_mounts = [m["mountPath"] for m in c["volumeMounts"]
                         if _volume_kinds(pod_spec)[m["name"]] == "secret"]
        for f in (service.exporter.certfile, service.exporter.keyfile):
            assert any(f.startswith(p + "/") for p in secret_mounts), f"{where}: {f} is not in the TLS Secret"
    (_, pm), = objects("PodMonitor")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "gfservice-metrics-tls"
    assert not endpoint["tlsConfig"].get("insecureSkipVerify")
    assert {"targetLabel": "job", "replacement": "gfservice"} in endpoint["relabelings"]  # up{job="gfservice"}
    assert pm["metadata"]["labels"].get("release"), "kube-prometheus-stack selects PodMonitors by release"
    # It selects every head that serves /metrics (the RayCluster's and the RayJob's), by labels and port name.
    heads = [t for w, t in pod_templates() if w.endswith(" head")]
    for t in heads:
        labels = t["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert endpoint["port"] in {p.get("name") for p in t["spec"]["containers"][0]["ports"]}


def test_plain_prometheus_scrape_job(tmp_path):
    snippet = yaml.safe_load((BUNDLE / "overlays/plain-prometheus/prometheus-scrape.yml").read_text())
    (job,) = snippet["scrape_configs"]
    assert job["job_name"] == "gfservice" and job["scheme"] == "https" and job["tls_config"]["ca_file"]
    # The relabelling keeps the head pods' metrics port, as Prometheus' pod discovery labels them.
    heads = [t for w, t in pod_templates() if w.endswith(" head")]
    workers = [t for w, t in pod_templates() if "worker" in w]

    def kept(template: dict[str, Any], port_name: str) -> bool:
        meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                for k, v in template["metadata"]["labels"].items()}
        meta["__meta_kubernetes_pod_container_port_name"] = port_name
        for rule in job["relabel_configs"]:
            if rule.get("action") == "keep":
                value = ";".join(meta.get(s, "") for s in rule["source_labels"])
                if not re.fullmatch(rule["regex"], value):
                    return False
        return True

    assert all(kept(t, "gradflow-metrics") for t in heads)
    assert not any(kept(t, "gcs") for t in heads) and not any(kept(t, "gradflow-metrics") for t in workers)
    # promtool (whose Debian build has no Kubernetes discovery) checks the rest with a static target.
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder\n")
    job["tls_config"]["ca_file"] = str(ca)
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": [f"gfservice-head:{METRICS_PORT}"]}]
    snippet["rule_files"] = [str(ROOT / alerts.PROMETHEUS_RULES)]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(snippet))
    res = run_tool([promtool_bin(), "check", "config", str(config)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_rayjob_sample_script_uses_the_monitor_and_the_service():
    from gfservice.cli import workload

    script = BUNDLE / "samples/rayjob/train.py"
    tree = ast.parse(script.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "gfservice.cli.workload"
                for a in n.names}
    assert imported == {"WorkloadConfig", "fit"} and all(hasattr(workload, n) for n in imported)
    assert 'service="auto"' in script.read_text()  # gfservice.monitor(..., service="auto") in each worker
    (_, job), = objects("RayJob")
    assert "gfservice serve" in job["spec"]["entrypoint"] and "/etc/gfservice/job/train.py" in job["spec"]["entrypoint"]


# ---- the image -----------------------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(m.group(1).upper(), m.group(2)) for line in text.splitlines()
            if (m := re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)) and not line.lstrip().startswith("#")]


def test_dockerfile_is_multi_stage_non_root_and_installs_what_setup_installs():
    instructions = _dockerfile()
    froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build, then a runtime stage without compilers or caches"
    for i in froms:
        assert re.match(r"(python:\$\{PYTHON_VERSION\}-slim|rayproject/ray:)", instructions[i][1]), instructions[i]
    runtime = instructions[froms[-1]:]
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the runtime stage runs as a non-root user"
    assert not any(op == "RUN" and "pip install" in arg for op, arg in runtime), "no pip in the runtime stage"
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in setup, "the image's torch is the one scripts/setup.sh installs"
    build = " ".join(arg for op, arg in instructions[:froms[-1]] if op == "RUN")
    assert build.index("torch==") < build.index('pip install ".[${EXTRAS}]"'), "torch first, then gfservice"
    assert "download.pytorch.org/whl/cpu" in build and "download.pytorch.org/whl/${TORCH_CUDA}" in build
    # The manifests' Ray is the image's, and their image tag is this version of gfservice.
    from gfservice._version import __version__ as version  # the one place the version is written
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == args["RAY_VERSION"], where
    for where, c, _ in containers():
        assert re.fullmatch(rf"{re.escape(IMAGE)}:{re.escape(version)}-(cpu|cuda)", c["image"]), (where, c["image"])
        if "head" in where:
            assert c["image"].endswith("-cpu"), f"{where}: the head runs the CPU image"


def test_dockerignore_lets_in_everything_the_wheel_is_built_from():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    needed = set(re.findall(r'= "([^"]+)"', block)) | {"pyproject.toml", "README.md"}
    assert needed <= set(allowed), f".dockerignore keeps out {sorted(needed - set(allowed))}"
    assert (ROOT / ".dockerignore").read_text().splitlines()[
        next(i for i, line in enumerate((ROOT / ".dockerignore").read_text().splitlines()) if not line.startswith("#"))
    ] == "*", ".dockerignore is an allow-list"
