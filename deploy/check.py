"""The offline checks of deploy/ that need no external tool; deploy/check.sh runs them.

    check.py static WORK     Kubernetes manifests (schemas, references, the deployment rules
                             of docs/deploy.md), the Dockerfile, the dashboard's structure.
                             Writes what the shell part checks with other tools into WORK:
                               configs/N.toml, N.env, N.src   keygate configurations (with the
                                                              KEYGATE* environment of the
                                                              container that reads them)
                               dashboard-rules.yaml           the dashboard's queries as
                                                              recording rules (promtool syntax)
                               probe-paths                    HTTP probe paths, one a line
                               context/                       the image's build stage /src
                                                              (for cargo fetch --locked)
    check.py metrics SCRAPE  every metric name (and label) that the dashboard and the alert
                             rules use exists in SCRAPE, a live keygate's /metrics.

Every problem is printed (one a line, prefixed with the file) and the exit status is 1 if
there was any. Needs PyYAML and kubernetes-validate (deploy/check.sh installs both in a venv).
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "keygate.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"
# The Secret the kustomizations reference but never create (a Secret in them would be applied
# with values everyone knows, over the one the user made): docs/deploy.md has it created first.
SECRET_EXAMPLE = K8S / "secret.example.yaml"

# The oldest Kubernetes the manifests support (native sidecars: 1.29; the preStop sleep action
# they use: 1.30) and the newest one kubernetes-validate ships schemas for.
K8S_VERSIONS = ["1.30.0", None]  # None: the newest bundled

# Labels Prometheus adds when scraping (target labels), never exported by keygate itself.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}

problems: list[str] = []


def problem(where: object, msg: str) -> None:
    problems.append(f"{where}: {msg}")


def guarded(where: str, fn, *args) -> None:
    """Runs one check; a manifest too broken for it (the schemas say how) is a problem, not a
    crash that would hide the other checks."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        problem(where, f"could not be checked ({type(e).__name__}: {e})")


def rel(p: Path | str) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def finish(ok_message: str) -> None:
    if problems:
        for p in dict.fromkeys(problems):  # once each, in order
            print(f"FAIL {p}")
        print(f"{len(problems)} problem(s)")
        sys.exit(1)
    print(ok_message)


def duration_seconds(text: str) -> float:
    """humantime-style durations as keygate reads them ("20s", "500ms", "1m 30s")."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text):
        raise ValueError(f"not a duration: {text!r}")
    for n, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit in {text!r}")
        total += float(n) * units[unit]
    return total


# ---------------------------------------------------------------------------------------------
# Kubernetes


def load_docs(path: Path) -> list[dict]:
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        problem(rel(path), f"not YAML: {e}")
        return []


def validate_schemas(docs: list[tuple[str, dict]]) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    newest = kv.latest_version()
    for version in K8S_VERSIONS:
        version = version or newest
        for where, doc in docs:
            if doc.get("kind") == "ServiceMonitor":
                continue  # a custom resource: no bundled schema, see check_servicemonitor
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problem(where, f"Kubernetes {version} (strict): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problem(where, e.message)
    print(f"  schemas: {len(docs)} objects against Kubernetes "
          f"{', '.join(v or newest for v in K8S_VERSIONS)} (strict)")


# The part of monitoring.coreos.com/v1 ServiceMonitor these manifests use, written for this
# check (kubernetes-validate has no schemas for custom resources). Unknown fields are refused,
# so a misspelt field cannot pass unnoticed.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": _STRMAP, "annotations": _STRMAP},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRMAP,
                                   "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def check_servicemonitor(where: str, doc: dict) -> None:
    import jsonschema

    v = jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA)
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in e.path)
        problem(where, f"ServiceMonitor: {path}: {e.message}")
    for ep in doc.get("spec", {}).get("endpoints", []):
        if ep.get("path") != "/metrics":
            problem(where, "ServiceMonitor endpoint must scrape path /metrics")
        if "interval" in ep and "scrapeTimeout" in ep:
            if duration_seconds(ep["scrapeTimeout"]) > duration_seconds(ep["interval"]):
                problem(where, "ServiceMonitor scrapeTimeout is longer than its interval")


def selects(selector: dict | None, labels: dict) -> bool:
    """matchLabels (and simple matchExpressions) against a label set; empty selects all."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_containers(spec: dict) -> list[tuple[dict, bool]]:
    """(container, is_native_sidecar) for every long-running container of a Pod spec."""
    out = [(c, False) for c in spec.get("containers") or []]
    out += [(c, True) for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    return out


def is_keygate(c: dict) -> bool:
    """The keygate container: its image is keygate (any registry, any tag)."""
    return re.split(r"[:@]", c.get("image", "").split("/")[-1])[0] == "keygate"


def resolve_port(spec: dict, port: object, where: str, what: str) -> int | None:
    """A Service targetPort / NetworkPolicy port / probe port in a Pod spec. Names resolve only
    in regular containers: a named port of a native sidecar is not resolved by Services before
    Kubernetes 1.32, nor by some network plugins, so the manifests must use its number."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for c, sidecar in pod_containers(spec):
        for p in c.get("ports") or []:
            if p.get("name") == port:
                if sidecar:
                    problem(where, f"{what}: named port {port!r} is on native sidecar "
                                   f"{c['name']!r}; use its number ({p['containerPort']})")
                return p["containerPort"]
    problem(where, f"{what}: no container port named {port!r}")
    return None


def effective_security(pod: dict, c: dict) -> dict:
    merged = dict(pod.get("securityContext") or {})
    merged.update(c.get("securityContext") or {})
    return merged


def expand_env(container: dict, objects: dict, where: str) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: literal values with $(VAR)
    references to earlier variables expanded, Secret and ConfigMap keys looked up."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                               lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
            if ref is None:
                continue  # fieldRef / resourceFieldRef: nothing keygate reads
            kind = "Secret" if "secretKeyRef" in vf else "ConfigMap"
            obj = objects.get((kind, ref["name"]))
            if obj is None:
                if not ref.get("optional"):
                    problem(where, f"env {name}: {kind} {ref['name']!r} is not in the manifests"
                                   + (f" nor in {rel(SECRET_EXAMPLE)}" if kind == "Secret" else ""))
                continue
            values = dict(obj.get("data") or {})
            if kind == "Secret":
                import base64
                values = {k: base64.b64decode(v).decode() for k, v in values.items()}
            values.update(obj.get("stringData") or {})
            if ref["key"] not in values:
                if not ref.get("optional"):
                    problem(where, f"env {name}: {kind} {ref['name']!r} has no key {ref['key']!r}")
                continue
            env[name] = values[ref["key"]]
    return env


def env_override(cfg: dict, env: dict[str, str]) -> dict:
    """KEYGATE__SECTION__FIELD overrides applied to a parsed TOML (scalar fields only)."""
    for k, v in env.items():
        if not k.startswith("KEYGATE__"):
            continue
        path = k[len("KEYGATE__"):].lower().split("__")
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return cfg


def addr_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def autoscalers(wl: dict, objects: dict) -> list[dict]:
    """The HorizontalPodAutoscalers that scale this workload."""
    return [h for (kind, _), h in objects.items() if kind == "HorizontalPodAutoscaler"
            and h["spec"]["scaleTargetRef"].get("kind") == wl["kind"]
            and h["spec"]["scaleTargetRef"].get("name") == wl["metadata"]["name"]]


def check_keygate_pod(where: str, wl: dict, objects: dict, shape: str, out: Path,
                      counter: list[int]) -> None:
    """The rules of docs/deploy.md for a workload running keygate (standalone or sidecar)."""
    spec = wl["spec"]["template"]["spec"]
    containers = pod_containers(spec)
    kg = [(c, sc) for c, sc in containers if is_keygate(c)]
    if len(kg) != 1:
        problem(where, f"expected one keygate container, found {len(kg)}")
        return
    c, is_sidecar = kg[0]
    if shape == "sidecar":
        if not is_sidecar:
            problem(where, "keygate must be a native sidecar: an initContainer with restartPolicy: Always")
        if not [x for x, sc in containers if not sc]:
            problem(where, "a sidecar example needs the app as a regular container")
    elif shape == "standalone":
        # With an HPA, its minReplicas is the floor (check_references); without, replicas.
        if not autoscalers(wl, objects) and (wl["spec"].get("replicas") or 1) < 2:
            problem(where, "at least 2 replicas")

    # The configuration it reads: a ConfigMap mounted at /etc/keygate, file from --config.
    args = c.get("args") or []
    cfg_path = args[args.index("--config") + 1] if "--config" in args else "/etc/keygate/keygate.toml"
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    cm_name = key = None
    for m in c.get("volumeMounts") or []:
        if cfg_path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = vols.get(m["name"], {})
            if "configMap" in vol:
                cm_name = vol["configMap"]["name"]
                key = cfg_path[len(m["mountPath"].rstrip("/")) + 1:]
            if not m.get("readOnly"):
                problem(where, f"volume {m['name']} with the configuration should be mounted readOnly")
    cm = objects.get(("ConfigMap", cm_name))
    if cm is None or key not in (cm.get("data") or {}):
        problem(where, f"{cfg_path} does not come from a ConfigMap in the manifests")
        return
    text = cm["data"][key]
    env = expand_env(c, objects, where)
    counter[0] += 1
    n = counter[0]
    (out / f"{n}.toml").write_text(text)
    (out / f"{n}.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()
                                          if k.startswith("KEYGATE")))
    (out / f"{n}.src").write_text(f"{where}: ConfigMap {cm_name}/{key} with the container's KEYGATE* environment")
    try:
        cfg = env_override(tomllib.loads(text), env)
    except tomllib.TOMLDecodeError as e:
        problem(where, f"ConfigMap {cm_name}/{key}: not TOML: {e}")
        return

    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    proxy_listen = cfg.get("proxy", {}).get("listen", "127.0.0.1:8080")
    admin_listen = cfg.get("admin", {}).get("listen", "127.0.0.1:9090")
    for name, listen in (("proxy", proxy_listen), ("admin", admin_listen)):
        host = listen.rsplit(":", 1)[0]
        if host not in ("0.0.0.0", "[::]"):
            problem(where, f"{name}.listen = {listen!r}: the kubelet's probes and Prometheus "
                           f"reach the Pod's address; listen on 0.0.0.0")
        if ports.get(name) != addr_port(listen):
            problem(where, f"container port {name!r} ({ports.get(name)}) is not "
                           f"{name}.listen's port ({addr_port(listen)})")
    if "KEYGATE_ADMIN_TOKEN" in env and len(env["KEYGATE_ADMIN_TOKEN"]) < 16:
        problem(where, "KEYGATE_ADMIN_TOKEN must be at least 16 characters")
    store = cfg.get("store", {})
    if store.get("kind", "embedded") == "embedded":
        path = store.get("path", "keygate.db")
        mounts = [m["mountPath"] for m in c.get("volumeMounts") or [] if not m.get("readOnly")]
        if not any(str(path).startswith(m.rstrip("/") + "/") for m in mounts):
            problem(where, f"embedded store at {path!r} is not on a writable volume "
                           f"(the root filesystem is read-only): use Redis or an emptyDir")
    if shape == "sidecar":
        for name, up in (cfg.get("upstreams") or {}).items():
            host = re.sub(r"^[a-z]+://", "", up.get("url", "")).split("/")[0].rsplit(":", 1)[0]
            if host not in ("127.0.0.1", "localhost", "[::1]"):
                problem(where, f"upstreams.{name}: the app of a sidecar is reached on loopback, "
                               f"not {host!r}")

    # Probes on the admin listener.
    admin_port = addr_port(admin_listen)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe)
        if not p or "httpGet" not in p:
            problem(where, f"keygate needs an HTTP {probe}")
            continue
        if p["httpGet"].get("path") != path:
            problem(where, f"{probe} should GET {path}, not {p['httpGet'].get('path')}")
        if ports.get(p["httpGet"]["port"], p["httpGet"]["port"]) != admin_port:
            problem(where, f"{probe} must use the admin port {admin_port}")
    if is_sidecar and "startupProbe" not in c:
        problem(where, "a native sidecar needs a startupProbe: the app starts once it passes")

    # Graceful drain: the grace period covers the preStop pauses and keygate's drain.
    drain = duration_seconds(cfg.get("proxy", {}).get("drain_timeout", "20s"))
    pauses = [x.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
              for x, _ in containers]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not grace > max(pauses, default=0) + drain:
        problem(where, f"terminationGracePeriodSeconds {grace} must exceed the preStop pause "
                       f"({max(pauses, default=0)}s) plus proxy.drain_timeout ({drain:g}s)")


def check_workload_common(where: str, wl: dict) -> None:
    """Every workload: non-root, no privilege escalation, read-only root, no capabilities,
    requests and limits."""
    pod = wl["spec"]["template"]["spec"]
    for c, _ in pod_containers(pod):
        cw = f"{where} container {c['name']}"
        sec = effective_security(pod, c)
        if sec.get("runAsNonRoot") is not True:
            problem(cw, "runAsNonRoot: true")
        if sec.get("runAsUser") == 0:
            problem(cw, "runs as uid 0")
        if sec.get("allowPrivilegeEscalation") is not False:
            problem(cw, "allowPrivilegeEscalation: false")
        if sec.get("privileged"):
            problem(cw, "privileged")
        if sec.get("readOnlyRootFilesystem") is not True:
            problem(cw, "readOnlyRootFilesystem: true")
        if "ALL" not in ((sec.get("capabilities") or {}).get("drop") or []):
            problem(cw, "capabilities: drop: [ALL]")
        if (sec.get("capabilities") or {}).get("add"):
            problem(cw, "adds capabilities")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory") if part == "requests" else ("memory",):
                if r not in (res.get(part) or {}):
                    problem(cw, f"resources.{part}.{r}")
        if ":" not in c.get("image", "").split("/")[-1] and "@" not in c.get("image", ""):
            problem(cw, f"image {c.get('image')!r} has no tag")
        if c.get("image", "").endswith(":latest"):
            problem(cw, f"image {c.get('image')!r}: pin a version, not latest")
    if (pod.get("securityContext") or {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(where, "Pod securityContext.seccompProfile.type: RuntimeDefault")


def check_references(name: str, docs: list[tuple[str, dict]], external: dict) -> None:
    """Within one kustomization's output (plus `external`, the objects the user creates
    first): Services, NetworkPolicies, PDBs, HPAs and ServiceMonitors point at something that
    exists; ConfigMaps and Secrets referenced by volumes and env exist."""
    objects = dict(external)
    objects.update({(d["kind"], d["metadata"]["name"]): d for _, d in docs})
    workloads = [(w, d) for w, d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]

    def pods_selected(selector: dict | None) -> list[tuple[str, dict]]:
        return [(w, d) for w, d in workloads
                if selects(selector, d["spec"]["template"]["metadata"].get("labels") or {})]

    for where, d in docs:
        kind = d["kind"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            tmpl = d["spec"]["template"]
            if not selects(d["spec"]["selector"], tmpl["metadata"].get("labels") or {}):
                problem(where, "spec.selector does not match the Pod template's labels")
            for v in tmpl["spec"].get("volumes") or []:
                for k, ref in (("ConfigMap", (v.get("configMap") or {}).get("name")),
                               ("Secret", (v.get("secret") or {}).get("secretName"))):
                    if ref and (k, ref) not in objects:
                        problem(where, f"volume {v['name']}: {k} {ref!r} is not in {name}")
            for c, _ in pod_containers(tmpl["spec"]):
                expand_env(c, objects, f"{where} container {c['name']}")
        elif kind == "Service":
            sel = d["spec"].get("selector")
            targets = pods_selected({"matchLabels": sel}) if sel else []
            if not targets:
                problem(where, f"Service {d['metadata']['name']} selects no Pod of {name}")
            for w, wl in targets:
                for p in d["spec"]["ports"]:
                    resolve_port(wl["spec"]["template"]["spec"], p.get("targetPort", p["port"]),
                                 where, f"Service {d['metadata']['name']} port {p.get('name')}")
        elif kind == "NetworkPolicy":
            targets = pods_selected(d["spec"]["podSelector"])
            if not targets:
                problem(where, f"NetworkPolicy {d['metadata']['name']} selects no Pod of {name}")
            for w, wl in targets:
                for rule in d["spec"].get("ingress") or []:
                    for p in rule.get("ports") or []:
                        resolve_port(wl["spec"]["template"]["spec"], p.get("port"), where,
                                     f"NetworkPolicy {d['metadata']['name']}")
        elif kind == "PodDisruptionBudget":
            if not pods_selected(d["spec"]["selector"]):
                problem(where, f"PodDisruptionBudget {d['metadata']['name']} selects no Pod")
        elif kind == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            target = objects.get((ref["kind"], ref["name"]))
            if target is None:
                problem(where, f"scaleTargetRef {ref['kind']}/{ref['name']} is not in {name}")
            else:
                if d["spec"].get("minReplicas", 1) < 2:
                    problem(where, "minReplicas at least 2")
                if "replicas" in target["spec"]:
                    problem(where, f"{ref['kind']} {ref['name']} sets spec.replicas: every "
                                   f"kubectl apply would reset the count this HPA chose; leave "
                                   f"it out (minReplicas is the floor)")
                for m in d["spec"].get("metrics") or []:
                    r = (m.get("resource") or {}).get("name")
                    if m.get("type") == "Resource" and r:
                        for c, _ in pod_containers(target["spec"]["template"]["spec"]):
                            if r not in ((c.get("resources") or {}).get("requests") or {}):
                                problem(where, f"scales on {r} but container {c['name']} "
                                               f"requests no {r}")
        elif kind == "ServiceMonitor":
            check_servicemonitor(where, d)
            svcs = [s for s in objects.values() if s["kind"] == "Service"
                    and selects(d["spec"]["selector"], s["metadata"].get("labels") or {})]
            if not svcs:
                problem(where, f"ServiceMonitor {d['metadata']['name']} selects no Service")
            for ep in d["spec"].get("endpoints") or []:
                for s in svcs:
                    if ep.get("port") not in [p.get("name") for p in s["spec"]["ports"]]:
                        problem(where, f"Service {s['metadata']['name']} has no port named "
                                       f"{ep.get('port')!r}")


def check_admin_port_is_internal(name: str, docs: list[tuple[str, dict]]) -> None:
    """keygate's admin port: every Pod running keygate has a NetworkPolicy whose rules admit
    the admin port only from listed peers, and no Service exposes it outside the cluster."""
    nps = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    for where, d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"].get("labels") or {}
        kg = [c for c, _ in pod_containers(spec) if is_keygate(c)]
        if not kg:
            continue
        admin = {p.get("name"): p["containerPort"] for p in kg[0].get("ports") or []}.get("admin")
        mine = [np for np in nps if selects(np["spec"]["podSelector"], labels)
                and "Ingress" in (np["spec"].get("policyTypes") or ["Ingress"])]
        if not mine:
            problem(where, "no NetworkPolicy restricts ingress to the keygate Pods")
        for np in mine:
            for rule in np["spec"].get("ingress") or []:
                ports = rule.get("ports") or []
                covers = not ports or any(
                    p.get("port") is None
                    or resolve_port(spec, p["port"], where, "NetworkPolicy") == admin
                    for p in ports)
                if not covers:
                    continue
                if not rule.get("from"):
                    problem(where, f"NetworkPolicy {np['metadata']['name']} admits the admin "
                                   f"port {admin} from anywhere")
                for peer in rule.get("from") or []:
                    if (peer.get("ipBlock") or {}).get("cidr") in ("0.0.0.0/0", "::/0"):
                        problem(where, f"NetworkPolicy {np['metadata']['name']} admits the "
                                       f"admin port from {peer['ipBlock']['cidr']}")
    for where, d in docs:
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") not in ("ClusterIP",):
            for p in d["spec"]["ports"]:
                if p.get("targetPort") in ("admin", 9090) or p["port"] == 9090:
                    problem(where, f"Service {d['metadata']['name']} exposes the admin port "
                                   f"as {d['spec']['type']}")


def mini_kustomize(directory: Path) -> list[dict]:
    """What `kubectl kustomize` makes of these kustomizations, for machines without kubectl:
    their resources (files and included directories) with the images transformer applied.
    Nothing else of kustomize is used here (check_kubernetes refuses other fields)."""
    k = load_docs(directory / "kustomization.yaml")[0]
    unknown = set(k) - {"apiVersion", "kind", "resources", "images"}
    if unknown:
        problem(rel(directory / "kustomization.yaml"),
                f"uses {sorted(unknown)}: render it with kubectl kustomize (install kubectl)")
    docs: list[dict] = []
    for r in k.get("resources") or []:
        target = directory / r
        docs += mini_kustomize(target) if target.is_dir() else load_docs(target)
    for img in k.get("images") or []:
        for d in docs:
            spec = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                name, _, tag = c.get("image", "").partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return docs


def secret_stand_ins() -> tuple[dict, list[tuple[str, dict]]]:
    """The Secret of secret.example.yaml as the user creates it (docs/deploy.md: kubectl create
    secret with `openssl rand -hex` values), for the checks that read its keys: (objects by
    (kind, name), the example's documents for the schema check). The example's own values must
    be empty: a value there would be one more token everyone knows."""
    import copy
    import secrets

    where = rel(SECRET_EXAMPLE)
    docs = load_docs(SECRET_EXAMPLE) if SECRET_EXAMPLE.exists() else []
    if not docs:
        problem(where, "missing: it shows the Secret the kustomizations expect")
    objects, out = {}, []
    for d in docs:
        w = f"{where}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        out.append((w, d))
        if d.get("kind") != "Secret":
            problem(w, "only Secrets belong in it")
            continue
        if d.get("data") or any(v for v in (d.get("stringData") or {}).values()):
            problem(w, "its values must be left empty (the user makes random ones)")
        if not d.get("stringData"):
            problem(w, "list its keys under stringData")
        stand_in = copy.deepcopy(d)
        stand_in["stringData"] = {k: secrets.token_hex(32) for k in d.get("stringData") or {}}
        objects[("Secret", d["metadata"]["name"])] = stand_in
    check_docs_create_secrets(objects)
    return objects, out


def check_docs_create_secrets(secrets_: dict) -> None:
    """docs/deploy.md: each section that runs `kubectl -n NS apply -k deploy/kubernetes/X`
    creates the Secrets first, in that namespace, with every key of the example (the
    kustomizations do not create them)."""
    where = rel(DOCS)
    text = re.sub(r"\\\n\s*", " ", DOCS.read_text())  # join continued command lines
    applies = 0
    for section in re.split(r"^## ", text, flags=re.M):
        for m in re.finditer(r"kubectl\s+(?:-n\s+(\S+)\s+)?apply\s+-k\s+deploy/kubernetes/(\w+)",
                             section):
            ns, target = m.group(1), m.group(2)
            if target == "redis":
                continue
            applies += 1
            before = section[:m.start()]
            for (_, name), secret in secrets_.items():
                made = [c for c in re.finditer(
                    rf"kubectl\s+(?:-n\s+(\S+)\s+)?create\s+secret\s+generic\s+{re.escape(name)}\b([^\n]*)",
                    before) if c.group(1) == ns]
                if not made:
                    problem(where, f"`{m.group(0)}` is not preceded by a `kubectl -n {ns} create "
                                   f"secret generic {name}` in its section")
                    continue
                keys = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", made[-1].group(2)))
                if keys != set(secret.get("stringData") or {}):
                    problem(where, f"`kubectl -n {ns} create secret generic {name}` creates "
                                   f"{sorted(keys)}, the manifests read "
                                   f"{sorted(secret.get('stringData') or {})}")
    if not applies:
        problem(where, "no `kubectl -n NS apply -k deploy/kubernetes/...` found")


def check_kubernetes(work: Path) -> None:
    out = work / "configs"
    out.mkdir(parents=True, exist_ok=True)
    counter = [0]
    probe_paths: set[str] = set()
    files = sorted(p for p in K8S.rglob("*.yaml")
                   if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml"))
    rendered = sorted(work.glob("rendered-*.yaml"))
    # Each kustomization's output (rendered by `kubectl kustomize` in check.sh) is what
    # `kubectl apply -k` sends; every file must be part of one.
    included: set[Path] = set()
    parts: set[Path] = set()  # kustomizations that others include (../redis)
    for k in sorted(K8S.rglob("kustomization.yaml")):
        for r in (load_docs(k) or [{}])[0].get("resources") or []:
            target = (k.parent / r).resolve()
            if not target.exists():
                problem(rel(k), f"resource {r} does not exist")
            elif target.is_file():
                included.add(target)
            else:
                parts.add(target)
    for f in files:
        if f.resolve() not in included:
            problem(rel(f), "is in no kustomization.yaml")
    for f in sorted(K8S.rglob("*.example.yaml")):
        if f.resolve() in included:
            problem(rel(f), "an example, for reference only: it must be in no kustomization.yaml")
    external, example_docs = secret_stand_ins()

    sets: list[tuple[str, list[tuple[str, dict]]]] = []
    if rendered:
        for r in rendered:
            name = r.stem[len("rendered-"):]
            if (K8S / name).resolve() in parts:
                continue  # checked as part of the kustomizations that include it
            docs = [(f"kustomize {name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}", d)
                    for d in load_docs(r)]
            sets.append((name, docs))
    else:
        print("  (no kustomize output: resources and images of each kustomization.yaml "
              "gathered here instead)")
        for k in sorted(K8S.rglob("kustomization.yaml")):
            if k.parent.resolve() in parts:
                continue
            name = k.parent.name
            sets.append((name, [(f"{name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}", d)
                                for d in mini_kustomize(k.parent)]))

    all_docs = [x for _, docs in sets for x in docs] + example_docs
    guarded("schemas", validate_schemas, all_docs)
    for name, docs in sets:
        for where, d in docs:
            if d.get("kind") == "Secret":
                problem(where, "a Secret in a kustomization is applied with values everyone "
                               "knows, over the one the user created: leave it out (docs/deploy.md "
                               f"has it created first; {rel(SECRET_EXAMPLE)} shows it)")
        guarded(f"kustomize {name}", check_references, name, docs, external)
        guarded(f"kustomize {name}", check_admin_port_is_internal, name, docs)
        objects = dict(external)
        objects.update({(d.get("kind"), d.get("metadata", {}).get("name")): d for _, d in docs})
        running_keygate = 0
        for where, d in docs:
            if d.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
                continue
            guarded(where, check_workload_common, where, d)
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers") or []:
                if is_keygate(c) and c.get("restartPolicy") != "Always":
                    problem(where, "keygate is an init container without restartPolicy: Always: "
                                   "it would have to exit before the app starts")
            for c, _ in pod_containers(spec):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    path = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
                    if path and is_keygate(c):
                        probe_paths.add(path)
            if any(is_keygate(c) for c, _ in pod_containers(spec)):
                shape = "sidecar" if "sidecar" in name else "standalone"
                guarded(where, check_keygate_pod, where, d, objects, shape, out, counter)
                running_keygate += 1
        if not running_keygate:
            problem(f"kustomize {name}", "no workload runs keygate")
        kinds = {d["kind"] for _, d in docs}
        if name == "standalone":
            for k in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                      "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"):
                if k not in kinds:
                    problem(f"kustomize {name}", f"has no {k}")
    (work / "probe-paths").write_text("".join(f"{p}\n" for p in sorted(probe_paths)))
    print(f"  {sum(len(d) for _, d in sets)} objects in {len(sets)} set(s), "
          f"{counter[0]} keygate configuration(s), probe paths {sorted(probe_paths)}")


# ---------------------------------------------------------------------------------------------
# Dockerfile (hadolint lints it in check.sh; these are the rules of docs/deploy.md)


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match, plus **) as a regex over a relative path;
    a pattern that names a directory covers what is inside."""
    out, i = "", 0
    pattern = pattern.strip().strip("/")
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(f"{out}(/.*)?")


def build_context(work: Path) -> None:
    """What `docker build -f deploy/Dockerfile .` copies into the build stage's /src, laid out
    in work/context, so check.sh can run `cargo fetch --locked` there: it fails, as the image
    build would, when Cargo.lock is stale or a target Cargo.toml declares is not in the context
    (Dockerfile.dockerignore and the COPY lines)."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    files = [f for f in files if f and (ROOT / f).is_file()]
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    rules = [(l.startswith("!"), dockerignore_regex(l.lstrip("!")))
             for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]

    def in_context(f: str) -> bool:
        keep = True
        for negated, rx in rules:
            if rx.fullmatch(f):
                keep = negated
        return keep

    context = [f for f in files if in_context(f)]
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = re.split(r"^FROM\s", text, flags=re.M)
    build = stages[1] if len(stages) > 1 else ""
    workdir = "/"
    dest_root = work / "context"
    copied = 0
    for line in build.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("WORKDIR", "COPY"):
            continue
        if words[0].upper() == "WORKDIR":
            workdir = words[1]
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words):
            continue
        *srcs, dest = args
        dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
        if dest.rstrip("/") != "/src" and not dest.startswith("/src/"):
            continue
        dest_dir = dest_root / dest[len("/src"):].strip("/")
        for src in srcs:
            src = src.rstrip("/")
            for f in context:
                if f == src:
                    target = dest_dir / Path(f).name if dest.endswith("/") or len(srcs) > 1 else dest_dir
                elif f.startswith(src + "/"):
                    target = dest_dir / f[len(src) + 1:]
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / f, target)
                copied += 1
    print(f"  build context: {len(context)} files pass {ignore.name}, {copied} copied to /src")


def check_dockerfile(work: Path) -> None:
    text = DOCKERFILE.read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "")
             for l in lines if l.strip() and not l.lstrip().startswith("#")]
    froms = [a for i, a in instr if i == "FROM"]
    if len(froms) < 2:
        problem(rel(DOCKERFILE), "multi-stage: a build stage and a runtime stage")
    if not any(i == "RUN" and "cargo build" in a and "--release" in a and "--locked" in a
               for i, a in instr):
        problem(rel(DOCKERFILE), "the build stage runs cargo build --release --locked")
    if any(i == "HEALTHCHECK" for i, _ in instr):
        problem(rel(DOCKERFILE), "no HEALTHCHECK: the orchestrator probes /healthz and /readyz")
    last = len(instr) - 1 - [i for i, _ in instr][::-1].index("FROM")
    users = [a.strip() for i, a in instr[last:] if i == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        problem(rel(DOCKERFILE), "the runtime stage ends with a numeric non-root USER")
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    allowed = [l[1:] for l in ignore.read_text().splitlines() if l.startswith("!")] \
        if ignore.exists() else None
    for i, a in instr:
        if i not in ("COPY", "ADD") or "--from=" in a:
            continue
        srcs = [s for s in a.split() if not s.startswith("--")][:-1]
        for s in srcs:
            if not list(ROOT.glob(s)):
                problem(rel(DOCKERFILE), f"{i} {s}: no such path in the build context")
            elif allowed is not None and not any(
                    s == p or s.startswith(p.rstrip("/") + "/") or p.startswith(s.rstrip("/") + "/")
                    for p in allowed):
                problem(rel(DOCKERFILE), f"{i} {s}: excluded by {ignore.name}")
    m = re.search(r"^COPY\s+(\S+)\s+/etc/keygate/keygate\.toml", text, re.M)
    if not m:
        problem(rel(DOCKERFILE), "the example configuration is baked in at /etc/keygate/keygate.toml")
    else:
        cfg = ROOT / m.group(1)
        out = work / "configs"
        out.mkdir(parents=True, exist_ok=True)
        (out / "image.toml").write_text(cfg.read_text())
        (out / "image.env").write_text("")
        (out / "image.src").write_text(f"{rel(DOCKERFILE)}: {m.group(1)} (the image's configuration)")
    print(f"  Dockerfile: {len(froms)} stages")


# ---------------------------------------------------------------------------------------------
# PromQL: just enough of a lexer to find metric names, label matchers and grouping labels.

AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
               "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "atan2", "inf", "nan", "start", "end"}
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<num>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<lbrace>\{) | (?P<rbrace>\}) | (?P<lbrack>\[) | (?P<rbrack>\])
  | (?P<lparen>\() | (?P<rparen>\)) | (?P<comma>,)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
""", re.X)


def lex(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def unquote(s: str) -> str:
    return json.loads(s) if s.startswith('"') else s[1:-1]


def parse_promql(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """(selectors as (metric name, [(label, op, value)]), grouping/matching labels)."""
    toks = lex(expr)
    selectors, grouping = [], set()
    i = 0

    def matchers(j: int) -> tuple[list[tuple[str, str, str]], int]:
        ms = []
        j += 1  # past {
        while toks[j][0] != "rbrace":
            if toks[j][0] == "comma":
                j += 1
                continue
            label = toks[j][1] if toks[j][0] == "ident" else unquote(toks[j][1])
            op, value = toks[j + 1][1], unquote(toks[j + 2][1])
            ms.append((label, op, value))
            j += 3
        return ms, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][0] if i + 1 < len(toks) else None
        if kind == "ident" and text in ("by", "without", "on", "ignoring", "group_left", "group_right") \
                and nxt == "lparen":
            j = i + 2
            while toks[j][0] != "rparen":
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
        elif kind == "ident" and (nxt == "lparen" or text in AGGREGATORS or text in KEYWORDS):
            i += 1
        elif kind == "ident":
            ms: list[tuple[str, str, str]] = []
            i += 1
            if i < len(toks) and toks[i][0] == "lbrace":
                ms, i = matchers(i)
            selectors.append((text, ms))
        elif kind == "lbrace":
            ms, i = matchers(i)
            names = [v for l, op, v in ms if l == "__name__" and op == "="]
            selectors.append((names[0] if names else "", [m for m in ms if m[0] != "__name__"]))
        elif kind == "lbrack":
            while toks[i][0] != "rbrack":
                i += 1
            i += 1
        else:
            i += 1
    return selectors, grouping


GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
                    "__range_s": "3600", "__interval_ms": "60000"}


def grafana_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)(?::\w+)?\}?", text))


def substitute(expr: str) -> str:
    """Grafana variables to something PromQL accepts: builtins to durations, dashboard
    variables (used only inside =~ matchers, see check_dashboard) to '.*'."""
    def rep(m: re.Match) -> str:
        return GRAFANA_BUILTINS.get(m.group(1), ".*")
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", rep, expr)


def dashboard_queries(dash: dict) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(panel queries as (where, expr, legend), variable queries as (where, query))."""
    queries = []
    panels = list(dash.get("panels") or [])
    for p in list(panels):
        panels += p.get("panels") or []  # collapsed rows keep theirs inside
    for p in panels:
        for t in p.get("targets") or []:
            if t.get("expr"):
                queries.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}",
                                t["expr"], t.get("legendFormat", "")))
    variables = []
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            variables.append((f"variable {v.get('name')}", q or ""))
    return queries, variables


def check_dashboard(work: Path) -> None:
    where = rel(DASHBOARD)
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        problem(where, f"not JSON: {e}")
        return
    for k in ("title", "uid", "schemaVersion", "panels", "templating"):
        if k not in dash:
            problem(where, f"no {k!r}")
    panels = list(dash.get("panels") or [])
    for p in list(panels):
        panels += p.get("panels") or []
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        problem(where, "panel ids are not unique")
    boxes = []
    for p in panels:
        g = p.get("gridPos") or {}
        pw = f"{where} panel {p.get('id')} {p.get('title')!r}"
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24:
            problem(pw, f"gridPos {g} is not within the 24-column grid")
            continue
        for q, (other, og) in enumerate(boxes):
            if g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] \
                    and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]:
                problem(pw, f"overlaps panel {other}")
        boxes.append((p.get("id"), g))
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            problem(pw, "has no query")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problem(pw, "refIds are not unique")
        ds = (p.get("datasource") or {}).get("uid")
        if ds != "${datasource}":
            problem(pw, "datasource must be the ${datasource} variable (any Prometheus can be picked)")
    defined = {v.get("name") for v in (dash.get("templating") or {}).get("list") or []}
    if "datasource" not in defined:
        problem(where, "no datasource variable")
    queries, variables = dashboard_queries(dash)
    rules = []
    for n, (qw, expr, legend) in enumerate(queries + [(w, q, "") for w, q in variables]):
        for var in grafana_vars(expr) - set(GRAFANA_BUILTINS):
            if var not in defined:
                problem(f"{where} {qw}", f"${var} is not a dashboard variable")
        for m in re.finditer(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*\$[^\"]*)\"", expr):
            if m.group(2) not in ("=~", "!~"):
                problem(f"{where} {qw}", f"{m.group(1)}{m.group(2)}\"{m.group(3)}\": a "
                                          f"multi-value variable needs =~")
        if qw.startswith("variable"):
            continue
        rules.append({"record": f"dashboard:query_{n}", "expr": substitute(expr)})
    # The panels this dashboard promises (docs/deploy.md), each found by what it queries.
    exprs = " \n".join(e for _, e, _ in queries)
    for what, pattern in (
        ("request rate by outcome", r"by \(outcome\) \(rate\(keygate_requests_total"),
        ("latency percentiles", r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(keygate_request_duration_seconds_bucket"),
        ("cache hit ratio", r"keygate_auth_cache_hits_total.*keygate_auth_cache_misses_total"),
        ("store latency", r"keygate_store_operation_duration_seconds_bucket"),
        ("store errors", r"keygate_store_errors_total"),
        ("upstream errors", r'outcome="upstream_error"'),
        ("upstream latency", r"keygate_upstream_duration_seconds_bucket"),
    ):
        if not re.search(pattern, exprs):
            problem(where, f"no panel shows {what}")
    (work / "dashboard-rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False))
    print(f"  dashboard: {len(panels)} panels, {len(queries)} queries, {len(variables)} variables")


# ---------------------------------------------------------------------------------------------
# Metric names against a live /metrics


def read_exposition(path: Path) -> dict[str, list[dict[str, str]]]:
    """Prometheus text format: series name -> label sets, names exactly as exposed
    (a histogram is its _bucket, _sum and _count series)."""
    series: dict[str, list[dict[str, str]]] = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            problem(rel(path), f"unreadable exposition line {line!r}")
            continue
        series.setdefault(m.group(1), []).append(dict(label_re.findall(m.group(2) or "")))
    return series


def check_metrics(scrape: Path) -> None:
    series = read_exposition(scrape)
    if not series:
        problem(rel(scrape), "no series in the scrape")
        return
    uses: list[tuple[str, str, str]] = []  # (where, expr, legend)
    dash = json.loads(DASHBOARD.read_text())
    queries, variables = dashboard_queries(dash)
    uses += [(f"{rel(DASHBOARD)} {w}", substitute(e), l) for w, e, l in queries]
    for w, q in variables:
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q)
        if m:
            uses.append((f"{rel(DASHBOARD)} {w}", substitute(m.group(1)), "{{" + m.group(2) + "}}"))
        elif q.strip():
            uses.append((f"{rel(DASHBOARD)} {w}", substitute(q), ""))
    for g in yaml.safe_load(ALERTS.read_text())["groups"]:
        for r in g["rules"]:
            uses.append((f"{rel(ALERTS)} {r.get('alert') or r.get('record')}", r["expr"], ""))

    names_used: set[str] = set()
    for where, expr, legend in uses:
        try:
            selectors, grouping = parse_promql(expr)
        except (ValueError, IndexError) as e:
            problem(where, f"cannot read the query: {e}")
            continue
        if not selectors:
            problem(where, "uses no metric")
        labels_here: set[str] = set(TARGET_LABELS)
        for name, matchers in selectors:
            names_used.add(name)
            if name not in series:
                problem(where, f"metric {name!r} is not exported (not in the live /metrics)")
                continue
            have = {k for s in series[name] for k in s}
            labels_here |= have
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in have:
                    problem(where, f"{name} has no label {label!r} (it has {sorted(have)})")
                    continue
                values = {s.get(label) for s in series[name]}
                wanted = [value] if op == "=" else (
                    value.split("|") if op == "=~" and re.fullmatch(r"[\w.:-]+(\|[\w.:-]+)*", value)
                    else [])
                for v in wanted:
                    if v not in values:
                        problem(where, f"{name}{{{label}{op}\"{value}\"}}: no series has "
                                       f"{label}=\"{v}\" (values: {sorted(x for x in values if x)})")
        for label in grouping - labels_here:
            problem(where, f"groups by {label!r}, a label none of its metrics has")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in labels_here | grouping:
                problem(where, f"legend {{{{{label}}}}}: no such label")
    print(f"  {len(uses)} queries use {len(names_used)} metric names: "
          f"{', '.join(sorted(names_used))}")
    print(f"  the live /metrics exports {len(series)} series names")


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("static", "metrics"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "static":
        work = Path(sys.argv[2])
        guarded("deploy/kubernetes", check_kubernetes, work)
        guarded(rel(DOCKERFILE), check_dockerfile, work)
        guarded(rel(DOCKERFILE), build_context, work)
        guarded(rel(DASHBOARD), check_dashboard, work)
        finish("static checks: ok")
    else:
        guarded("metrics", check_metrics, Path(sys.argv[2]))
        finish("metric names: ok")


if __name__ == "__main__":
    main()
