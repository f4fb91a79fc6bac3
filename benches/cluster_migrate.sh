#!/usr/bin/env bash
# What a migration's checked copy costs in cluster mode. In a cluster the
# copier re-reads every piece it copied from the source and compares it
# (other nodes' writes are not excluded by its copy: ARCHITECTURE.md,
# "Migration in a cluster"); alone it trusts what it read. Both copy an
# idle, fully written volume onto another file of the same tmpfs with
# `migrate start --rate 0 --wait`, alternated:
#
#   single   one node, no [cluster]
#   cluster  one node of a cluster on a private etcd (its barriers add a
#            few ms at the start and at the cutover)
#
# "copy s" is the server's own time from "migration started" to
# "migration completed" (copy, final flush, cutover). The destination is
# compared with the source after every run.
#
#   benches/cluster_migrate.sh              # 5 rounds of 1 GiB
#   ROUNDS=3 SIZE_MB=256 benches/cluster_migrate.sh
#
# Environment: ROUNDS=5, SIZE_MB=1024, DIR=/dev/shm, NO_BUILD=1 (skip
# `cargo build --release`), NBDVIRT_BIN=PATH.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
SIZE_MB=${SIZE_MB:-1024}
DIR=${DIR:-/dev/shm}
for v in ROUNDS SIZE_MB; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "cluster_migrate.sh: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
command -v etcd >/dev/null || { echo "cluster_migrate.sh: etcd missing (Debian package etcd-server)" >&2; exit 2; }

cd "$(dirname "$0")/.."
[[ -n ${NO_BUILD:-}${NBDVIRT_BIN:-} ]] || cargo build --release -q
BIN=${NBDVIRT_BIN:-$PWD/target/release/nbdvirt}
. benches/cluster_etcd.sh

W=$(mktemp -d "$DIR/nbdvirt-cmig.XXXXXX")
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
start_etcd "$W"
head -c "${SIZE_MB}M" /dev/urandom >"$W/data"

run() { # MODE ROUND -> prints the copy seconds
  local mode=$1 d="$W/$1-$2" pid
  mkdir -p "$d"
  cp "$W/data" "$d/src.img"
  {
    if [[ $mode == cluster ]]; then
      # A cluster of its own per run: etcd keeps the last run's tables.
      node_sections "$d" n1 "$EP" 5s | sed "s/^name = \"bench\"/name = \"bench-$2\"/"
    else
      printf '[server]\nlisten = ["unix:%s/n1.sock"]\ncontrol = "%s/n1-control.sock"\nstate_dir = "%s/n1-state"\nshutdown_grace = "1s"\n\n' "$d" "$d" "$d"
    fi
    printf '[[backend]]\nname = "src"\npath = "%s/src.img"\n\n' "$d"
    printf '[[backend]]\nname = "dst"\npath = "%s/dst.img"\nsize = "%sMiB"\n\n' "$d" "$SIZE_MB"
    printf '[[volume]]\nname = "v"\n[[volume.extent]]\nlength = "%sMiB"\nbackend = "src"\nbackend_offset = 0\n' "$SIZE_MB"
  } >"$d/c.toml"
  RUST_LOG=nbdvirt=info "$BIN" serve --config "$d/c.toml" >"$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do [[ -S $d/n1-control.sock ]] && break; sleep 0.05; done
  "$BIN" migrate start v --to dst --rate 0 --wait --control "$d/n1-control.sock" >/dev/null 2>"$d/wait.err" ||
    { echo "cluster_migrate.sh: $mode migration failed: $(cat "$d/wait.err")" >&2; kill "$pid"; exit 1; }
  kill "$pid"; wait "$pid" 2>/dev/null || true
  cmp -s "$d/src.img" "$d/dst.img" || { echo "cluster_migrate.sh: $mode: the destination differs from the source" >&2; exit 1; }
  python3 benches/migration_seconds.py "$d/log"
  rm -rf "$d"
}

declare -A times
for round in $(seq "$ROUNDS"); do
  order="single cluster"; ((round % 2 == 0)) && order="cluster single"
  for mode in $order; do
    s=$(run "$mode" "$round")
    times[$mode]+="$s "
    echo "cluster_migrate.sh: round $round $mode: $s s ($(python3 -c "print(f'{$SIZE_MB / $s:.0f}')") MiB/s)  load $(cut -d' ' -f1 /proc/loadavg)" >&2
  done
done
echo "| copy of ${SIZE_MB} MiB, tmpfs | median s | min–max s | MiB/s (median) |"
echo "|---|---:|---:|---:|"
for mode in single cluster; do
  python3 - "$mode" "$SIZE_MB" ${times[$mode]} <<'EOF'
import statistics, sys
mode, size, xs = sys.argv[1], float(sys.argv[2]), sorted(float(x) for x in sys.argv[3:])
m = statistics.median(xs)
print(f"| {mode} | {m:.2f} | {xs[0]:.2f}–{xs[-1]:.2f} | {size / m:.0f} |")
EOF
done
