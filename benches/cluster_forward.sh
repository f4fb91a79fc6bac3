#!/usr/bin/env bash
# Forwarding (issue 12): 4k randread QD16 through the node that reaches the
# store (direct) and through a node that forwards every piece to it over
# NBD on loopback TCP (forwarded), etcd and the file on /dev/shm, alternated
# ROUNDS times in one run; nbdkit's file plugin on the same file as the
# usual yardstick. Results: docs/PERFORMANCE.md section 17.
#
#   benches/cluster_forward.sh
#   ROUNDS=5 RUNTIME=10 benches/cluster_forward.sh
#   PERF_DIR=/tmp/p ROUNDS=1 benches/cluster_forward.sh   # + perf of both nodes, forwarded round
#   N1_SERVER_TOML='busy_poll = 0' N2_SERVER_TOML=... # extra [server] lines per node (cluster_etcd.sh)
#
# Reported: IOPS per round and path, medians and spread, forwarded/direct,
# and each server's CPU time per I/O (both nbdvirt nodes count for a
# forwarded I/O: the forwarder and the node serving it).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NBDVIRT_BIN:-target/release/nbdvirt}
export ROUNDS=${ROUNDS:-5} RUNTIME=${RUNTIME:-10}
export PATH=/usr/bin:$PATH
for tool in etcd fio nbdkit python3; do command -v $tool >/dev/null || { echo "missing $tool (apt-get install etcd-server fio nbdkit python3)" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }

W=$(mktemp -d /dev/shm/nbdvirt-forward-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
source benches/cluster_etcd.sh

start_etcd "$W"

head -c 256M /dev/urandom >"$W/d.img"
node_config() { # NODE
  node_sections "$W" "$1" "$EP" 5s "tcp:127.0.0.1:$(port)"
  cat <<CFG
[[backend]]
name = "a"
path = "$W/d.img"
size = "256MiB"
nodes = ["n1"]

[[volume]]
name = "v"
[[volume.extent]]
length = "256MiB"
backend = "a"
backend_offset = 0
CFG
}
declare -A PID
for n in n1 n2; do
  node_config $n >"$W/$n.toml"
  "$BIN" serve --config "$W/$n.toml" >/dev/null 2>"$W/$n.log" &
  PID[$n]=$!; PIDS+=($!)
  for _ in $(seq 200); do [[ -S $W/$n-control.sock ]] && break; sleep 0.05; done
done
nbdkit -f -U "$W/kit.sock" file "$W/d.img" >/dev/null 2>&1 &
PID[kit]=$!; PIDS+=($!)
sleep 3

cpu() { # PID... -> summed utime+stime in clock ticks
  local t=0
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo $t
}
run() { # TAG SOCKET PID...
  local tag=$1 sock=$2; shift 2
  local before; before=$(cpu "$@")
  fio --name=b --ioengine=nbd --uri="nbd+unix:///v?socket=$sock" --rw=randread --bs=4k --iodepth=16 \
    --size=256M --time_based --runtime="$RUNTIME" --output-format=json >"$W/fio-$tag.json" 2>/dev/null
  echo $(( $(cpu "$@") - before )) >"$W/cpu-$tag"
}

echo "date: $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)  rounds $ROUNDS x ${RUNTIME}s"
for r in $(seq "$ROUNDS"); do
  run "direct-$r" "$W/n1.sock" "${PID[n1]}"
  if [[ -n ${PERF_DIR:-} && $r == 1 ]]; then
    mkdir -p "$PERF_DIR"
    for n in n1 n2; do perf record -q -g -p "${PID[$n]}" -o "$PERF_DIR/$n.data" -- sleep "$RUNTIME" 2>/dev/null & done
  fi
  run "forwarded-$r" "$W/n2.sock" "${PID[n1]}" "${PID[n2]}"
  if [[ -n ${PERF_DIR:-} && $r == 1 ]]; then sleep 2; fi  # perf writes its files
  run "nbdkit-$r" "$W/kit.sock" "${PID[kit]}"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" status --control "$W/n2-control.sock" | grep -o 'forwarded to .*' || true
python3 - "$W" "$ROUNDS" <<'PY'
import json, sys, statistics, os
w, rounds = sys.argv[1], int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
def one(tag):
    text = open(f"{w}/fio-{tag}.json").read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    ios = job["read"]["total_ios"]
    return job["read"]["iops"], int(open(f"{w}/cpu-{tag}").read()) / tick / max(ios, 1) * 1e6
rows = {k: [one(f"{k}-{r}") for r in range(1, rounds + 1)] for k in ("direct", "forwarded", "nbdkit")}
print("\n| path | IOPS per round | median | spread | server CPU µs/IO (median) |")
print("|---|---|---:|---:|---:|")
for k, xs in rows.items():
    iops = [x[0] for x in xs]
    m = statistics.median(iops)
    print(f"| {k} | {', '.join(f'{x:.0f}' for x in iops)} | {m:.0f} | {(max(iops) - min(iops)) / m * 100:.0f} % | {statistics.median(x[1] for x in xs):.1f} |")
ratios = [f[0] / d[0] for f, d in zip(rows["forwarded"], rows["direct"])]
print(f"\nforwarded / direct per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f} (goal >= 0.5)")
PY
