#!/usr/bin/env python3
"""Offline checks of charts/ballast (run by scripts/check-chart, inside its venv).

For every value set in charts/ballast/ci/*.yaml: helm lint and the values schema, a
render with Helm's own engine (helm-python-sdk), strict schema validation of every
object for Kubernetes 1.31 (kubernetes-validate), structural checks of the Prometheus
Operator objects, the chart's promises asserted on the rendered objects, `ballast
check-config` on the rendered ballast.toml with the environment the pod would get, and
checkov on the rendered manifests (a finding fails unless the chart skips it with a
reason). Then: value sets that must not render, the metric names of the alert rules and
of the Grafana dashboard (docs/grafana/ballast.json, the same file as the chart's
dashboards/ballast.json) against a real server's /metrics, and hadolint on the
Dockerfile.

Usage: check_chart.py --ballast PATH_TO_BINARY --out DIR
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "ballast"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "ballast", "ballast"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
DATA_DIR = "/var/lib/ballast"
CONFIG_PATH = "/etc/ballast/ballast.toml"
DASHBOARD = ROOT / "docs" / "grafana" / "ballast.json"
CHART_DASHBOARD = CHART / "dashboards" / "ballast.json"


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, cond: object, what: str) -> bool:
        if not cond:
            self.items.append(what)
        return bool(cond)


def render(values: dict, name: str = RELEASE) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=name, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__file"] = path
                out.append(doc)
    return out


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str, f: Failures, label: str) -> dict:
    found = by_kind(objs, kind)
    f.check(len(found) == 1, f"{label}: expected one {kind}, found {len(found)}")
    return found[0] if found else {}


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__file"}


# --------------------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------------------


def validate_schemas(objs: list[dict], f: Failures, label: str) -> None:
    for o in objs:
        name = f"{label}: {o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if o.get("kind") in CRD_KINDS:
            check_crd_structure(o, f, name)
            continue
        try:
            kubernetes_validate.validate(clean(o), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            f.check(False, f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
        except Exception as e:  # schema not found and the like
            f.check(False, f"{name}: cannot validate: {e}")


def check_crd_structure(o: dict, f: Failures, name: str) -> None:
    """Prometheus Operator objects: no schema offline, so the fields that matter."""
    f.check(o.get("apiVersion") == "monitoring.coreos.com/v1", f"{name}: apiVersion")
    meta = o.get("metadata", {})
    f.check(meta.get("name") and meta.get("namespace"), f"{name}: name and namespace")
    spec = o.get("spec", {})
    if o["kind"] == "ServiceMonitor":
        f.check(set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}, f"{name}: spec keys {set(spec)}")
        f.check(spec.get("selector", {}).get("matchLabels"), f"{name}: selector.matchLabels")
        eps = spec.get("endpoints", [])
        f.check(len(eps) == 1, f"{name}: one endpoint")
        for ep in eps:
            f.check(set(ep) <= {"port", "path", "interval", "authorization", "scheme"}, f"{name}: endpoint keys {set(ep)}")
            f.check(ep.get("port") == "admin" and ep.get("path") == "/metrics", f"{name}: scrapes admin /metrics")
            f.check(re.fullmatch(r"[0-9]+[smh]", str(ep.get("interval", ""))), f"{name}: interval")
            auth = ep.get("authorization")
            if auth is not None:
                cred = auth.get("credentials", {})
                f.check(auth.get("type") == "Bearer" and cred.get("name") and cred.get("key"), f"{name}: authorization from a Secret")
    else:
        groups = spec.get("groups", [])
        f.check(groups and all(g.get("name") and g.get("rules") for g in groups), f"{name}: groups")
        for g in groups:
            for r in g["rules"]:
                f.check(set(r) <= {"alert", "expr", "for", "labels", "annotations"}, f"{name}: rule keys {set(r)}")
                f.check(r.get("alert") and r.get("expr"), f"{name}: alert and expr")
                f.check(r.get("labels", {}).get("severity") in {"warning", "critical"}, f"{name}: {r.get('alert')}: severity")
                f.check("summary" in r.get("annotations", {}), f"{name}: {r.get('alert')}: summary")
                if "for" in r:
                    f.check(re.fullmatch(r"[0-9]+[smh]", str(r["for"])), f"{name}: {r.get('alert')}: for")
                expr = str(r.get("expr", ""))
                f.check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{name}: {r.get('alert')}: unbalanced expr")


# --------------------------------------------------------------------------------------
# The chart's promises
# --------------------------------------------------------------------------------------


def container_of(workload: dict) -> dict:
    cs = workload.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    return cs[0] if cs else {}


def assert_properties(objs: list[dict], values: dict, f: Failures, label: str) -> dict:
    """Returns the rendered ballast.toml (parsed) and the container env for check-config."""
    merged = helm_merge(values)
    postgres = merged["storage"]["backend"] == "postgres"
    for o in objs:
        meta = o.get("metadata", {})
        f.check(meta.get("namespace") == NAMESPACE, f"{label}: {o['kind']}/{meta.get('name')}: namespace set")
        f.check(meta.get("labels", {}).get("app.kubernetes.io/name") == "ballast", f"{label}: {o['kind']}/{meta.get('name')}: labels")

    if postgres:
        f.check(not by_kind(objs, "StatefulSet"), f"{label}: no StatefulSet with postgres")
        w = one(objs, "Deployment", f, label)
        hpa = by_kind(objs, "HorizontalPodAutoscaler")
        if merged["autoscaling"]["enabled"]:
            f.check(len(hpa) == 1, f"{label}: one HPA")
            if hpa:
                h = hpa[0]
                f.check(h["apiVersion"] == "autoscaling/v2", f"{label}: HPA autoscaling/v2")
                f.check(h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": w["metadata"]["name"]}, f"{label}: HPA targets the Deployment")
                f.check(h["spec"]["minReplicas"] == merged["autoscaling"]["minReplicas"], f"{label}: HPA minReplicas")
                f.check(h["spec"]["maxReplicas"] == merged["autoscaling"]["maxReplicas"], f"{label}: HPA maxReplicas")
            f.check("replicas" not in w["spec"], f"{label}: Deployment leaves replicas to the HPA")
        else:
            f.check(not hpa, f"{label}: no HPA")
            f.check(w["spec"].get("replicas") == merged["replicaCount"], f"{label}: replicas = replicaCount")
        f.check(w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, f"{label}: rolling update keeps every replica")
        pdbs = by_kind(objs, "PodDisruptionBudget")
        if merged["podDisruptionBudget"]["enabled"]:
            f.check(len(pdbs) == 1, f"{label}: one PDB")
            if pdbs:
                p = pdbs[0]["spec"]
                f.check(p.get("maxUnavailable") == merged["podDisruptionBudget"]["maxUnavailable"] and "minAvailable" not in p, f"{label}: PDB maxUnavailable")
                f.check(p["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"], f"{label}: PDB selects the pods")
        pod = w["spec"]["template"]["spec"]
        if merged["topologySpread"]["enabled"]:
            tsc = pod.get("topologySpreadConstraints", [])
            keys = {t["topologyKey"] for t in tsc}
            f.check(keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, f"{label}: spread over zone and hostname, got {keys}")
            for t in tsc:
                f.check(t["labelSelector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"], f"{label}: spread selects the pods")
        data = [v for v in pod["volumes"] if v["name"] == "data"]
        f.check(len(data) == 1 and "emptyDir" in data[0], f"{label}: data dir is an emptyDir with postgres")
        env = {e["name"]: e for e in container_of(w).get("env", [])}
        url = env.get("BALLAST_STORAGE__POSTGRES_URL", {})
        ref = url.get("valueFrom", {}).get("secretKeyRef", {})
        f.check("value" not in url and ref.get("key") == merged["storage"]["postgres"]["secretKey"], f"{label}: database URL by secretKeyRef")
        if merged["storage"]["postgres"]["existingSecret"]:
            f.check(ref.get("name") == merged["storage"]["postgres"]["existingSecret"], f"{label}: database URL from the existing Secret")
        else:
            secret = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == ref.get("name")]
            f.check(len(secret) == 1, f"{label}: storage.postgres.url goes into a chart-created Secret")
        url_value = merged["storage"]["postgres"]["url"]
        if url_value:
            for o in objs:
                if o["kind"] != "Secret":
                    f.check(url_value not in json.dumps(clean(o)), f"{label}: the database URL appears in {o['kind']}/{o['metadata']['name']}")
    else:
        f.check(not by_kind(objs, "Deployment"), f"{label}: no Deployment with the embedded store")
        f.check(not by_kind(objs, "HorizontalPodAutoscaler"), f"{label}: no HPA with the embedded store")
        f.check(not by_kind(objs, "PodDisruptionBudget"), f"{label}: no PDB that would block drains")
        w = one(objs, "StatefulSet", f, label)
        f.check(w["spec"]["replicas"] == 1, f"{label}: one replica")
        vct = w["spec"].get("volumeClaimTemplates", [])
        f.check(len(vct) == 1 and vct[0]["metadata"]["name"] == "data", f"{label}: volumeClaimTemplates for data")
        if vct:
            f.check(vct[0]["spec"]["resources"]["requests"]["storage"] == merged["persistence"]["size"], f"{label}: volume size")
        svc_names = {s["metadata"]["name"] for s in by_kind(objs, "Service")}
        f.check(w["spec"]["serviceName"] in svc_names, f"{label}: governing Service exists")
        pod = w["spec"]["template"]["spec"]

    # Both stores.
    c = container_of(w)
    f.check(len(pod["containers"]) == 1, f"{label}: one container")
    f.check(c["args"] == ["serve", "--config", CONFIG_PATH], f"{label}: serve with the mounted config")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    f.check(ports == {"http": 8080, "admin": 8081}, f"{label}: container ports {ports}")
    probes = {k: c.get(k, {}).get("httpGet", {}) for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    f.check(probes["livenessProbe"] == {"path": "/livez", "port": "http"}, f"{label}: liveness /livez")
    f.check(probes["readinessProbe"] == {"path": "/readyz", "port": "http"}, f"{label}: readiness /readyz")
    f.check(probes["startupProbe"].get("path") == "/livez", f"{label}: startupProbe")
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    f.check(sleep >= 1, f"{label}: preStop sleep")
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    f.check(psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
    f.check(psc.get("runAsUser", 0) > 0 and sc.get("runAsUser", 0) > 0, f"{label}: numeric non-root uid")
    f.check(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    f.check(sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation false")
    f.check(sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add"), f"{label}: drop ALL")
    f.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccomp RuntimeDefault")
    f.check(pod.get("automountServiceAccountToken") is False, f"{label}: no service account token")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    f.check(writable == {DATA_DIR, "/tmp"}, f"{label}: writable mounts only data and /tmp, got {writable}")
    vols = {v["name"]: v for v in pod["volumes"]}
    tmp = vols.get(mounts.get("/tmp", {}).get("name"), {})
    f.check("emptyDir" in tmp, f"{label}: /tmp is an emptyDir")
    res = c.get("resources", {})
    f.check(res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory") and res.get("requests", {}).get("cpu"), f"{label}: requests and memory limit")

    # The config, its checksum, the environment.
    cm_name = vols.get(mounts.get("/etc/ballast", {}).get("name"), {}).get("configMap", {}).get("name")
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == cm_name]
    f.check(len(cms) == 1, f"{label}: the config volume is the chart's ConfigMap")
    text = cms[0]["data"]["ballast.toml"] if cms else ""
    toml = tomllib.loads(text)
    server = toml.get("server", {})
    f.check(server.get("listen") == "0.0.0.0:8080" and server.get("admin_listen") == "0.0.0.0:8081", f"{label}: listens on 0.0.0.0 (both ports)")
    f.check(server.get("data_dir") == DATA_DIR and DATA_DIR in mounts, f"{label}: data_dir is the data volume")
    f.check("admin_token" not in server and "postgres_url" not in toml.get("storage", {}), f"{label}: no secret in the ConfigMap")
    shutdown = int(str(server.get("shutdown_timeout", "30s")).rstrip("s"))
    delay = int(str(server.get("shutdown_delay", "0s")).rstrip("s"))
    grace = pod["terminationGracePeriodSeconds"]
    f.check(grace >= shutdown + delay + sleep + 6, f"{label}: terminationGracePeriodSeconds {grace} >= preStop {sleep} + shutdown_delay {delay} + shutdown_timeout {shutdown} + 6 (ballast's shutdown margin)")
    checksum = w["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config", "")
    f.check(checksum in {hashlib.sha256(t.encode()).hexdigest() for t in (text, text.rstrip("\n"))}, f"{label}: checksum/config is the ConfigMap's sha256")
    env = c.get("env", [])
    f.check(all("value" not in e and "secretKeyRef" in e.get("valueFrom", {}) for e in env), f"{label}: every env value comes from a Secret")
    names = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    f.check("BALLAST_SERVER__ADMIN_TOKEN" in names, f"{label}: admin token from a Secret")
    for i, s in enumerate(toml.get("sources", [])):
        if "write_key" not in s:
            ref = names.get(f"BALLAST_SOURCES__{i}__WRITE_KEY", {})
            f.check(ref.get("key") == f"write-key-{s['id']}", f"{label}: write key of source {s['id']} from the Secret")
    for path, key in merged["secrets"]["config"].items():
        f.check(names.get("BALLAST_" + path.upper().replace(".", "__"), {}).get("key") == key, f"{label}: {path} from the Secret")
    secret_names = {s["metadata"]["name"] for s in by_kind(objs, "Secret")}
    if merged["secrets"]["existingSecret"]:
        f.check(not (secret_names - {f"{RELEASE}-postgres"}), f"{label}: no chart Secret besides the existing one: {secret_names}")
        f.check(names["BALLAST_SERVER__ADMIN_TOKEN"]["name"] == merged["secrets"]["existingSecret"], f"{label}: admin token from the existing Secret")
    else:
        f.check(names["BALLAST_SERVER__ADMIN_TOKEN"]["name"] in secret_names, f"{label}: the chart creates the Secret it refers to")

    # Services and network policy.
    svcs = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    public = svcs.get(RELEASE, {}).get("spec", {})
    f.check({(p["port"], p["targetPort"]) for p in public.get("ports", [])} == {(8080, "http")}, f"{label}: public Service 8080 -> http")
    admin = svcs.get(f"{RELEASE}-admin", {}).get("spec", {})
    f.check(admin.get("type") == "ClusterIP" and {(p["port"], p["targetPort"]) for p in admin.get("ports", [])} == {(8081, "admin")}, f"{label}: ClusterIP admin Service 8081 -> admin")
    if merged["networkPolicy"]["enabled"]:
        np = one(objs, "NetworkPolicy", f, label)
        rules = np.get("spec", {}).get("ingress", [])
        admin_rules = [r for r in rules if any(p.get("port") in ("admin", 8081) for p in r.get("ports", []))]
        f.check(admin_rules and all(r.get("from") for r in admin_rules), f"{label}: the admin port only from listed peers")
        f.check(np["spec"]["podSelector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"], f"{label}: NetworkPolicy selects the pods")

    # Metrics objects.
    sms, rules = by_kind(objs, "ServiceMonitor"), by_kind(objs, "PrometheusRule")
    f.check(bool(sms) == bool(merged["metrics"]["serviceMonitor"]), f"{label}: ServiceMonitor iff metrics.serviceMonitor")
    f.check(bool(rules) == bool(merged["metrics"]["prometheusRule"]), f"{label}: PrometheusRule iff metrics.prometheusRule")
    for sm in sms:
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [n for n, s in svcs.items() if sel.items() <= s["metadata"]["labels"].items()]
        f.check(matched == [f"{RELEASE}-admin"], f"{label}: ServiceMonitor selects the admin Service only, got {matched}")
        auth = sm["spec"]["endpoints"][0].get("authorization")
        f.check(bool(auth) == bool(server.get("metrics_require_token")), f"{label}: ServiceMonitor sends the token iff /metrics needs it")
    for r in rules:
        alerts = {x["alert"] for g in r["spec"]["groups"] for x in g["rules"]}
        want = {"BallastDegradedMode", "BallastBacklogGrowing", "BallastDeadLetters", "BallastStorageNearQuota",
                "BallastIngestionRefusing", "BallastFsyncSlow", "BallastStorageFailed"}
        f.check(want <= alerts, f"{label}: alerts {want - alerts} missing")
    # The Grafana dashboard: a ConfigMap for the sidecar iff metrics.grafanaDashboard,
    # holding the dashboard of docs/grafana/.
    dash_cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    f.check(len(dash_cms) == (1 if merged["metrics"]["grafanaDashboard"] else 0), f"{label}: a dashboard ConfigMap iff metrics.grafanaDashboard, got {len(dash_cms)}")
    for cm in dash_cms:
        try:
            shipped = json.loads(cm.get("data", {}).get("ballast.json", ""))
        except ValueError as e:
            f.check(False, f"{label}: the dashboard ConfigMap's ballast.json is not JSON: {e}")
            continue
        f.check(shipped == json.loads(DASHBOARD.read_text()), f"{label}: the dashboard ConfigMap differs from docs/grafana/ballast.json")
        f.check(cm["metadata"]["namespace"] == NAMESPACE, f"{label}: the dashboard ConfigMap's namespace")
    return {"toml": text, "env": env}


def check_dashboard(f: Failures) -> dict:
    """docs/grafana/ballast.json: the same as the chart's copy, and a well-formed
    dashboard (unique panel ids, on the 24-column grid, every panel on the datasource
    variable with at least one query)."""
    f.check(DASHBOARD.read_bytes() == CHART_DASHBOARD.read_bytes(), f"{CHART_DASHBOARD.relative_to(ROOT)} differs from {DASHBOARD.relative_to(ROOT)}")
    dash = json.loads(DASHBOARD.read_text())
    f.check(dash.get("uid") and dash.get("title"), "dashboard: uid and title")
    names = [v.get("name") for v in dash.get("templating", {}).get("list", [])]
    f.check("datasource" in names, "dashboard: a datasource variable")
    ids = [p.get("id") for p in dash.get("panels", [])]
    f.check(len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "dashboard: unique integer panel ids")
    n_queries = 0
    for p in dash.get("panels", []):
        g = p.get("gridPos", {})
        f.check(g.get("x", 0) + g.get("w", 0) <= 24 and g.get("h", 0) > 0, f"dashboard: {p.get('title')}: gridPos {g}")
        if p.get("type") == "row":
            continue
        f.check(p.get("datasource", {}).get("uid") == "${datasource}", f"dashboard: {p.get('title')}: datasource")
        targets = p.get("targets", [])
        f.check(targets and all(t.get("expr") for t in targets), f"dashboard: {p.get('title')}: queries")
        for t in targets:
            expr = t.get("expr", "")
            n_queries += 1
            f.check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"dashboard: {p.get('title')}: unbalanced {expr}")
    print(f"  {DASHBOARD.relative_to(ROOT)}: {len(ids)} panels, {n_queries} queries; the chart ships the same file")
    return dash


def metric_names(text: str) -> set[str]:
    """The ballast_* metric names in PromQL or in a dashboard: histogram series
    (_bucket, _sum, _count) as the histogram's name."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bballast_[a-z_]+\b", text)}


def helm_merge(values: dict) -> dict:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values)


# --------------------------------------------------------------------------------------
# The real binary
# --------------------------------------------------------------------------------------


def placeholder_env(env: list[dict]) -> dict[str, str]:
    """The pod's environment with each Secret value replaced by a stand-in."""
    out = {}
    for e in env:
        ref = e["valueFrom"]["secretKeyRef"]
        value = f"ci-{ref['name']}-{ref['key']}"
        if e["name"] == "BALLAST_STORAGE__POSTGRES_URL":
            value = "postgres://ballast:secret@db-1:5432,db-2:5432/ballast?target_session_attrs=read-write"
        out[e["name"]] = value
    return out


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BALLAST_")}


def check_config(ballast: str, out: Path, label: str, rendered: dict, f: Failures) -> None:
    path = out / f"{label}.ballast.toml"
    path.write_text(rendered["toml"])
    env = base_env() | placeholder_env(rendered["env"])
    r = subprocess.run([ballast, "check-config", str(path)], env=env, capture_output=True, text=True, timeout=60)
    print(f"  check-config: {(r.stdout + r.stderr).strip()}")
    f.check(r.returncode == 0, f"{label}: ballast check-config failed: {r.stderr.strip()}")
    # Without the admin token (a Secret missing it) ballast must refuse: admin on 0.0.0.0.
    env.pop("BALLAST_SERVER__ADMIN_TOKEN", None)
    r = subprocess.run([ballast, "check-config", str(path)], env=env, capture_output=True, text=True, timeout=60)
    f.check(r.returncode != 0 and "admin_token" in r.stderr, f"{label}: check-config accepted an admin API on 0.0.0.0 without a token")


def scrape_metrics(ballast: str, toml_text: str, env: list[dict]) -> str:
    """Runs the real server on the rendered embedded config (loopback ports, a temp data
    dir, one file destination so that per-destination series exist) and returns /metrics."""
    with tempfile.TemporaryDirectory(prefix="ballast-chart-") as tmp:
        cfg = Path(tmp) / "ballast.toml"
        cfg.write_text(toml_text)
        data = Path(tmp) / "data"
        run_env = base_env() | placeholder_env(env) | {
            "BALLAST_DESTINATIONS__0__ID": "probe",
            "BALLAST_DESTINATIONS__0__TYPE": "file",
            "BALLAST_DESTINATIONS__0__SOURCES": '["web"]',
            "BALLAST_DESTINATIONS__0__PATH": str(Path(tmp) / "out.jsonl"),
        }
        proc = subprocess.Popen(
            [ballast, "serve", "--config", str(cfg), "--data-dir", str(data), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.time() + 60
            while True:
                try:
                    addrs = json.loads((data / "server.json").read_text())
                    break
                except (OSError, ValueError):
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"ballast did not start: {proc.stderr.read() if proc.stderr else ''}")
                    time.sleep(0.05)
            admin = addrs["admin_listen"]
            # One ingest request (refused: no write key), so that the request counter has
            # a series (it is created on first use).
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://{addrs['listen']}/v1/track", data=b"{}", method="POST"), timeout=10)
            except urllib.error.HTTPError:
                pass
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as r:  # open: metrics_require_token = false
                return r.read().decode()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def check_rule_metrics(ballast: str, default_rendered: dict, rules_objs: list[dict], dashboard: dict, f: Failures) -> None:
    exported = scrape_metrics(ballast, default_rendered["toml"], default_rendered["env"])
    names = metric_names("\n".join(re.findall(r"^(ballast_[a-z_]+)[{ ]", exported, re.M)))
    used = set()
    for r in rules_objs:
        for g in r["spec"]["groups"]:
            for x in g["rules"]:
                used |= metric_names(x["expr"])
    print(f"  /metrics of the real server: {len(names)} ballast_* metrics: {sorted(names)}")
    print(f"  the alert rules use {len(used)}: {sorted(used)}")
    f.check(used, "no metric found in the alert rules")
    f.check(used <= names, f"alert rules use metrics the server does not export: {sorted(used - names)}")
    in_dash = set()
    for p in dashboard.get("panels", []):
        for t in p.get("targets", []):
            in_dash |= metric_names(t.get("expr", ""))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        in_dash |= metric_names(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    print(f"  the Grafana dashboard uses {len(in_dash)}: {sorted(in_dash)}")
    f.check(in_dash, "no metric found in the Grafana dashboard")
    f.check(in_dash <= names, f"the Grafana dashboard uses metrics the server does not export: {sorted(in_dash - names)}")
    f.check('ballast_mode{mode="DEGRADED"}' in exported, "ballast_mode{mode=\"DEGRADED\"} not exported")


# --------------------------------------------------------------------------------------
# checkov, hadolint
# --------------------------------------------------------------------------------------


def run_checkov(bin_dir: Path, manifest_dir: Path, label: str, f: Failures) -> None:
    r = subprocess.run(
        [str(bin_dir / "checkov"), "-d", str(manifest_dir), "--framework", "kubernetes", "--compact",
         "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=600,
        env=os.environ | {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    try:
        report = json.loads(r.stdout)
    except ValueError:
        f.check(False, f"{label}: checkov gave no JSON report (exit {r.returncode}): {r.stderr[-2000:]}")
        return
    results = report.get("results", {}) if isinstance(report, dict) else {}
    summary = report.get("summary", {}) if isinstance(report, dict) else {}
    print(f"  checkov: {summary.get('passed')} passed, {summary.get('failed')} failed, {summary.get('skipped')} skipped, {summary.get('parsing_errors')} parsing errors")
    for c in results.get("skipped_checks", []):
        reason = c.get("check_result", {}).get("suppress_comment") or ""
        print(f"    skipped {c['check_id']} on {c['resource']}: {reason}")
        f.check(len(reason) > 20, f"{label}: checkov skip {c['check_id']} without a written reason")
    for c in results.get("failed_checks", []):
        f.check(False, f"{label}: checkov {c['check_id']} ({c['check_name']}) on {c['resource']}")
    f.check(summary.get("parsing_errors", 1) == 0, f"{label}: checkov could not parse some manifests")
    skipped_ids = {c["check_id"] for c in results.get("skipped_checks", [])}
    f.check(len(skipped_ids) <= 5, f"{label}: more than a handful of checkov skips: {sorted(skipped_ids)}")


def run_hadolint(bin_dir: Path, f: Failures) -> None:
    r = subprocess.run([str(bin_dir / "hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip()
    print(f"  hadolint Dockerfile: {'clean' if r.returncode == 0 and not out else out}")
    f.check(r.returncode == 0 and not out, f"hadolint: {out}")


# --------------------------------------------------------------------------------------


# The values contract (DESIGN: "Scale-out and deployment"): these names are a public
# interface of the chart.
VALUES_CONTRACT = [
    "replicaCount", "image.repository", "image.tag", "image.pullPolicy",
    "storage.backend", "storage.partitions", "storage.postgres.existingSecret",
    "storage.postgres.secretKey", "storage.postgres.url", "persistence.size",
    "persistence.storageClass", "config", "secrets.existingSecret", "autoscaling.enabled",
    "autoscaling.minReplicas", "autoscaling.maxReplicas",
    "autoscaling.targetCPUUtilizationPercentage", "podDisruptionBudget.enabled",
    "podDisruptionBudget.maxUnavailable", "topologySpread.enabled", "resources.requests.cpu",
    "resources.requests.memory", "resources.limits.memory", "metrics.serviceMonitor",
    "metrics.prometheusRule", "metrics.grafanaDashboard",
]


def check_values_contract(f: Failures) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        defaults = chart.values
    for name in VALUES_CONTRACT:
        node = defaults
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        f.check(node is not None, f"values.yaml lacks {name} (values contract)")
    want = {"replicaCount": 1, "storage.backend": "embedded", "persistence.size": "20Gi",
            "autoscaling.enabled": False, "podDisruptionBudget.maxUnavailable": 1}
    for name, value in want.items():
        node = defaults
        for part in name.split("."):
            node = node[part]
        f.check(node == value, f"values.yaml: {name} is {node!r}, the contract says {value!r}")
    print(f"  {len(VALUES_CONTRACT)} contract values present")


def must_not_render(f: Failures) -> None:
    cases = {
        "postgres without a database Secret": ({"storage": {"backend": "postgres"}}, "existingSecret"),
        "autoscaling on the embedded store": ({"autoscaling": {"enabled": True}}, "postgres"),
        "several replicas on the embedded store": ({"replicaCount": 2}, "postgres"),
        "grace period not above preStop + shutdown": ({"terminationGracePeriodSeconds": 40}, "terminationGracePeriodSeconds"),
        "grace period not above preStop + delay + shutdown": ({"shutdownDelaySeconds": 20}, "terminationGracePeriodSeconds"),
        "grace period without ballast's 6 s shutdown margin": ({"terminationGracePeriodSeconds": 45}, "terminationGracePeriodSeconds"),
        "admin_listen set in config": ({"config": {"server": {"admin_listen": "127.0.0.1:8081"}}}, ""),
        "an unknown top-level value": ({"replicas": 3}, ""),
        "a source id unfit for a Secret key": ({"config": {"sources": [{"id": "a b"}]}}, ""),
        "a top-level setting in config": ({"config": {"log_format": "json"}}, "no top-level setting"),
    }
    for what, (values, says) in cases.items():
        try:
            render(values)
        except helm.HelmError as e:
            f.check(says in str(e), f"refused for another reason ({what}): {e}")
            continue
        f.check(False, f"rendered although it must not: {what}")
    print(f"  {len(cases)} wrong value sets refused")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ballast", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    f = Failures()

    print(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), kubernetes-validate for {KUBE_VERSION}")
    rendered_by_set: dict[str, dict] = {}
    all_objs: dict[str, list[dict]] = {}
    for values_file in sorted(glob.glob(str(CHART / "ci" / "*-values.yaml"))):
        label = Path(values_file).name.removesuffix("-values.yaml")
        values = yaml.safe_load(Path(values_file).read_text()) or {}
        print(f"== {label} ({Path(values_file).relative_to(ROOT)})")
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        print(f"  helm lint: {len(report.get('messages', []))} message(s), {len(report.get('errors') or [])} error(s)")
        for m in report.get("messages", []):
            if m.get("severity", 0) >= 2:
                f.check(False, f"{label}: helm lint: {m.get('path')}: {m.get('error')}")
        f.check(not report.get("errors"), f"{label}: helm lint errors: {report.get('errors')}")
        try:
            rendered = render(values)
        except helm.HelmError as e:
            f.check(False, f"{label}: render failed: {e}")
            continue
        objs = objects(rendered)
        all_objs[label] = objs
        set_dir = out / label
        set_dir.mkdir(exist_ok=True)
        for old in set_dir.glob("*.yaml"):
            old.unlink()
        for path, text in rendered.items():
            if path.endswith(".yaml") and text.strip():
                (set_dir / Path(path).name).write_text(text)
        print("  objects: " + ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs))
        notes = next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")
        f.check("/v1/track" in notes, f"{label}: NOTES.txt tells how to send an event")
        validate_schemas(objs, f, label)
        n_crd = sum(o["kind"] in CRD_KINDS for o in objs)
        print(f"  kubernetes-validate --strict {KUBE_VERSION}: {len(objs) - n_crd} object(s); {n_crd} Prometheus Operator object(s) checked structurally")
        rendered_by_set[label] = assert_properties(objs, values, f, label)
        check_config(args.ballast, out, label, rendered_by_set[label], f)
        run_checkov(bin_dir, set_dir, label, f)

    f.check({"default", "ha"} <= set(rendered_by_set), f"value sets default and ha expected, got {sorted(rendered_by_set)}")
    print("== the config changes, the checksum changes")
    a = by_kind(objects(render({})), "StatefulSet")
    b = by_kind(objects(render({"config": {"server": {"log_format": "text"}}})), "StatefulSet")
    if a and b:
        ca = a[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        cb = b[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        f.check(ca != cb, "checksum/config did not change with the config")
    print("== values contract")
    check_values_contract(f)
    print("== value sets that must not render")
    must_not_render(f)
    print("== the Grafana dashboard")
    dashboard = check_dashboard(f)
    print("== alert rules and dashboard against the real server's /metrics")
    rules = [o for objs in all_objs.values() for o in by_kind(objs, "PrometheusRule")]
    f.check(rules, "no value set renders a PrometheusRule")
    if "default" in rendered_by_set:
        try:
            check_rule_metrics(args.ballast, rendered_by_set["default"], rules, dashboard, f)
        except (RuntimeError, OSError) as e:
            f.check(False, f"scraping /metrics: {e}")
    print("== Dockerfile")
    run_hadolint(bin_dir, f)

    if f.items:
        print(f"\nchart check FAILED ({len(f.items)}):")
        for item in f.items:
            print(f"  - {item}")
        return 1
    print("\nchart check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
