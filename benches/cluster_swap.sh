#!/usr/bin/env bash
# Cluster-wide pause–drain–swap (issue 12): three nodes and etcd on this
# machine, etcd and every state_dir on /dev/shm, one shared 256 MiB file.
# Results: docs/PERFORMANCE.md section 16.
#
#   benches/cluster_swap.sh
#   ROUNDS=3 RUNTIME=10 RATE=10 benches/cluster_swap.sh
#   LOOP=status benches/cluster_swap.sh   # the same loop of CLI processes,
#                                         # each only asking `cluster status`:
#                                         # what the client processes cost
#
# Each round runs fio (4k randrw QD32, nbd engine) on all three nodes at
# once for RUNTIME s, twice, alternated: once without swaps and once with
# `nbdvirt cluster apply` at RATE per second (each apply flips the backend
# name of half of the volume's 8 extents: "a" and "b" are the same file,
# so every apply holds and drains half the volume and translates to the
# very same bytes). Reported: the summed IOPS of both runs and the cost of
# the swaps; per apply the coordinator's barrier time (first Hold sent to
# last Decide answered), the etcd commit inside it, and each node's own
# I/O hold (pause to resume, from its log), as p50/p99/max.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NBDVIRT_BIN:-target/release/nbdvirt}
export ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-10} RATE=${RATE:-10} LOOP=${LOOP:-apply}
export PATH=/usr/bin:$PATH
for tool in etcd fio python3; do command -v $tool >/dev/null || { echo "missing $tool (apt-get install etcd-server fio python3)" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }

W=$(mktemp -d /dev/shm/nbdvirt-cluster-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
source benches/cluster_etcd.sh

start_etcd "$W"

# tables FLIP: 8 extents of 32 MiB mapped 1:1; with FLIP=1 the odd ones go
# through "b", else the even ones.
tables() {
  for i in $(seq 0 7); do
    name=a; if (( (i + $1) % 2 == 1 )); then name=b; fi
    printf '[[volume.extent]]\nlength = "32MiB"\nbackend = "%s"\nbackend_offset = "%dMiB"\n' "$name" $((i * 32))
  done
}
node_config() { # NODE FLIP
  node_sections "$W" "$1" "$EP" 5s
  cat <<CFG
[[backend]]
name = "a"
path = "$W/d.img"
size = "256MiB"
shared = true

[[backend]]
name = "b"
path = "$W/d.img"
size = "256MiB"
shared = true

[[volume]]
name = "v"
$(tables "$2")
CFG
}
for n in n1 n2 n3; do
  node_config $n 0 >"$W/$n.toml"
  RUST_LOG=nbdvirt=info "$BIN" serve --config "$W/$n.toml" >/dev/null 2>"$W/$n.log" &
  PIDS+=($!)
  for _ in $(seq 200); do [[ -S $W/$n-control.sock ]] && break; sleep 0.05; done
done
sleep 3

fio_all() { # TAG
  local pids=()
  for n in n1 n2 n3; do
    fio --name=b --ioengine=nbd --uri="nbd+unix:///v?socket=$W/$n.sock" --rw=randrw --bs=4k --iodepth=32 \
      --size=256M --time_based --runtime="$RUNTIME" --output-format=json >"$W/fio-$1-$n.json" 2>/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
}
node_config n1 1 >"$W/apply-1.toml"
node_config n1 0 >"$W/apply-0.toml"
# One CLI process per apply and nothing else (no interpreter started per
# iteration): the loop paces itself on the clock in whole microseconds.
apply_loop() { # until the file $W/stop exists
  local flip=1 period=$((1000000 / RATE)) next now
  next=$(( $(date +%s%6N) + period ))
  while [[ ! -e $W/stop ]]; do
    if [[ $LOOP == status ]]; then
      "$BIN" cluster status --json --control "$W/n1-control.sock" >/dev/null
    else
      "$BIN" cluster apply --json --config "$W/apply-$flip.toml" --control "$W/n1-control.sock" >>"$W/applies.json" 2>>"$W/apply.err" || echo '{"failed":true}' >>"$W/applies.json"
    fi
    flip=$((1 - flip))
    now=$(date +%s%6N)
    if (( next > now )); then sleep "0.$(printf '%06d' $((next - now)))"; fi
    next=$((next + period))
  done
}

echo "date: $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)  rounds $ROUNDS x ${RUNTIME}s, $RATE applies/s"
for r in $(seq "$ROUNDS"); do
  fio_all "off-$r"
  rm -f "$W/stop"; apply_loop & AL=$!
  fio_all "on-$r"
  touch "$W/stop"; wait $AL
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
cat "$W"/n?.log | grep -o 'swapped mapping table.*hold_us=[0-9]*' | sed 's/.*hold_us=//' >"$W/node-holds.txt" || true
python3 - "$W" "$ROUNDS" <<'PY'
import json, sys, glob, statistics
w, rounds = sys.argv[1], int(sys.argv[2])
def iops(tag):
    total = 0
    for f in glob.glob(f"{w}/fio-{tag}-n*.json"):
        text = open(f).read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        total += job["read"]["iops"] + job["write"]["iops"]
    return total
off = [iops(f"off-{r}") for r in range(1, rounds + 1)]
on = [iops(f"on-{r}") for r in range(1, rounds + 1)]
import os
path = f"{w}/applies.json"
applies, text, dec, i = [], open(path).read() if os.path.exists(path) else "", json.JSONDecoder(), 0
while True:
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        break
    obj, i = dec.raw_decode(text, i)
    applies.append(obj)
failed = sum(1 for a in applies if a.get("failed"))
vols = [v for a in applies if not a.get("failed") for v in a["volumes"]]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")
def row(name, xs):
    if not xs:
        return
    print(f"| {name} | {len(xs)} | {pct(xs,50)/1000:.2f} | {pct(xs,99)/1000:.2f} | {max(xs)/1000:.2f} |")
print()
print("| per apply | n | p50 ms | p99 ms | max ms |")
print("|---|---:|---:|---:|---:|")
row("barrier (coordinator: first Hold to last Decide)", [v["hold_us"] for v in vols])
row("etcd commit inside it", [v["commit_us"] for v in vols])
holds = [int(x) for x in open(f"{w}/node-holds.txt").read().split()]
row("I/O hold on a node (pause to resume)", holds)
share = statistics.median([v["commit_us"] / v["hold_us"] for v in vols]) if vols else float("nan")
print(f"\netcd commit share of the barrier (median): {share*100:.1f} %; failed applies: {failed}; attempts > 1: {sum(1 for v in vols if v['attempts'] > 1)}")
print()
print("| round | IOPS, no swaps | IOPS, swaps | cost |")
print("|---|---:|---:|---:|")
for r, (a, b) in enumerate(zip(off, on), 1):
    print(f"| {r} | {a:.0f} | {b:.0f} | {(1 - b / a) * 100:+.1f} % |")
ma, mb = statistics.median(off), statistics.median(on)
print(f"| median | {ma:.0f} | {mb:.0f} | {(1 - mb / ma) * 100:+.1f} % |")
print(f"\n{os.environ.get('LOOP')} loop: applies per second achieved: {len(vols) / (rounds * float(os.environ.get('RUNTIME', '10'))):.1f}")
PY
