#!/usr/bin/env bash
# What adding and removing a volume on every node costs (issue 12: the
# catalog barrier), beside a table change of the same cluster as the
# baseline. Three idle nodes and etcd on /dev/shm, one shared file per
# volume. Each round applies, alternated in order, through n1:
#
#   table   a re-cut of volume v (a table barrier: hold, drain, swap)
#   add     a file with volume w on a new backend (created on first use)
#   remove  the file without w and its backend again
#
# Reported per kind: the coordinator's barrier time (first Hold sent to
# last Decide answered), the etcd commit inside it, and the whole
# `cluster apply` as the CLI saw it; p50 and max.
#
#   benches/cluster_catalog.sh               # 20 rounds
#   ROUNDS=40 benches/cluster_catalog.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NBDVIRT_BIN:-target/release/nbdvirt}
ROUNDS=${ROUNDS:-20}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "cluster_catalog.sh: ROUNDS must be a positive integer, got '$ROUNDS'" >&2; exit 2; }
export PATH=/usr/bin:$PATH
for tool in etcd python3; do command -v $tool >/dev/null || { echo "cluster_catalog.sh: missing $tool (apt-get install etcd-server python3)" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }

W=$(mktemp -d /dev/shm/nbdvirt-catalog-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
source benches/cluster_etcd.sh
start_etcd "$W"

# config NODE CUT WITH_W: v on d.img through "a" up to CUT MiB, "b" after
# (the same file under two names); with WITH_W, backend c and volume w.
config() {
  node_sections "$W" "$1" "$EP" 5s
  printf '[[backend]]\nname = "a"\npath = "%s/d.img"\nsize = "64MiB"\nshared = true\n\n' "$W"
  printf '[[backend]]\nname = "b"\npath = "%s/d.img"\nsize = "64MiB"\nshared = true\n\n' "$W"
  [[ $3 == 1 ]] && printf '[[backend]]\nname = "c"\npath = "%s/e.img"\nsize = "64MiB"\nshared = true\n\n' "$W"
  printf '[[volume]]\nname = "v"\n[[volume.extent]]\nlength = "%sMiB"\nbackend = "a"\nbackend_offset = 0\n' "$2"
  printf '[[volume.extent]]\nlength = "%sMiB"\nbackend = "b"\nbackend_offset = "%sMiB"\n\n' $((64 - $2)) "$2"
  [[ $3 == 1 ]] && printf '[[volume]]\nname = "w"\n[[volume.extent]]\nlength = "64MiB"\nbackend = "c"\nbackend_offset = 0\n'
  return 0
}
for n in n1 n2 n3; do
  config $n 32 0 >"$W/$n.toml"
  RUST_LOG=nbdvirt=warn "$BIN" serve --config "$W/$n.toml" >"$W/$n.log" 2>&1 &
  PIDS+=($!)
done
for n in n1 n2 n3; do
  for _ in $(seq 200); do [[ -S $W/$n-control.sock ]] && break; sleep 0.05; done
done
sleep 3 # every node joined and one coordinates

cut=32 with=0
apply() { # KIND -> appends "kind hold_us commit_us wall_us" to $W/results
  local kind=$1 t0 t1 out
  config n1 "$cut" "$with" >"$W/n1.toml"
  t0=$(date +%s%N)
  out=$("$BIN" cluster apply --json --config "$W/n1.toml")
  t1=$(date +%s%N)
  python3 -c '
import json, sys
r = json.loads(sys.argv[2])["volumes"]
assert len(r) == 1, r
print(sys.argv[1], r[0]["hold_us"], r[0]["commit_us"], sys.argv[3])' "$kind" "$out" $(((t1 - t0) / 1000)) >>"$W/results"
}
for round in $(seq "$ROUNDS"); do
  order="table add remove"; ((round % 2 == 0)) && order="add remove table"
  for kind in $order; do
    case $kind in
      table) cut=$((cut == 32 ? 16 : 32)) ;;
      add) with=1 ;;
      remove) with=0 ;;
    esac
    apply "$kind"
  done
  echo "cluster_catalog.sh: round $round done, load $(cut -d' ' -f1 /proc/loadavg)" >&2
done
python3 - "$W/results" "$ROUNDS" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
print(f"| change ({sys.argv[2]} each) | barrier p50 ms | barrier max ms | etcd commit p50 ms | cluster apply p50 ms | cluster apply max ms |")
print("|---|---:|---:|---:|---:|---:|")
for kind in ("table", "add", "remove"):
    r = [list(map(int, x[1:])) for x in rows if x[0] == kind]
    col = lambda i: [x[i] / 1000 for x in r]
    print(f"| {kind} | {statistics.median(col(0)):.1f} | {max(col(0)):.1f} | {statistics.median(col(1)):.1f} | {statistics.median(col(2)):.1f} | {max(col(2)):.1f} |")
EOF
