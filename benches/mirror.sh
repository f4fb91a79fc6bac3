#!/usr/bin/env bash
# What a mirror costs, on tmpfs, measured with fio's nbd engine over Unix
# sockets, every variant alternated in each round; medians and spread.
#
#   benches/mirror.sh                   # 3 rounds, 8 s per fio run
#   ROUNDS=5 RUNTIME=10 SIZE_MB=512 benches/mirror.sh
#
# Rows:
#   rw16 / rr16   4k randwrite / randread QD16 on: a linear volume, a 2-leg
#                 mirror, the same mirror with the write-intent bitmap off
#                 (NBDVIRT_BENCH_NO_INTENT=1, a benchmark-only switch), and
#                 nbdkit's file plugin for reference
#   resync        `mirror add --rate 0` of SIZE_MB of data until in sync,
#                 vs `dd bs=1M` of the same bytes
#   merge         `merge` after every region of the split copy changed,
#                 until in sync, vs `dd` of the same bytes
#   rrw-resync    4k randrw QD16 while a leg resyncs at the default rate,
#                 vs the same run with no resync
#
# Environment: ROUNDS=3 RUNTIME=8 SIZE_MB=512 NO_BUILD=1 NBDVIRT_BIN=PATH
# ROWS="rw16 rr16" (fio rows) PARTS="copy rrw" (the other parts)
# WAIT_LOAD=2.5 (wait, at most 300 s, for the 1-minute load average to
# drop below it before each round).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
ROWS=${ROWS:-"rw16 rr16"}
PARTS=${PARTS:-"copy rrw"}
SIZE_MB=${SIZE_MB:-512}
WAIT_LOAD=${WAIT_LOAD:-2.5}
if [[ -n ${NBDVIRT_BIN:-} ]]; then NO_BUILD=1; fi

die() { echo "mirror.sh: $*" >&2; exit 1; }
log() { echo "mirror.sh: $*" >&2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer"
[[ $SIZE_MB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive integer"
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2'"; }
need fio fio
need nbdkit nbdkit
need python3 python3
need dd coreutils
need fallocate util-linux
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine: install the Debian package 'fio'"

cd "$(dirname "$0")/.."
REPO=$(pwd)
NBDVIRT=${NBDVIRT_BIN:-"$REPO/target/release/nbdvirt"}
if [[ -z ${NO_BUILD:-} ]]; then
  log "cargo build --release"
  timeout 1800 cargo build --release --quiet || die "cargo build --release failed"
fi
[[ -x $NBDVIRT ]] || die "$NBDVIRT missing"

W=$(mktemp -d /dev/shm/nbdvirt-mirror.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
avail_kb=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
((avail_kb > 10 * SIZE_MB * 1024)) || die "/dev/shm needs $((10 * SIZE_MB)) MiB free"

BYTES=$((SIZE_MB * 1024 * 1024))
log "filling the stores with ${SIZE_MB} MiB from /dev/urandom"
dd if=/dev/urandom of="$W/lin.img" bs=1M count="$SIZE_MB" status=none
for f in m1 m2 n1 n2 k r1; do cp "$W/lin.img" "$W/$f.img"; done
truncate -s "$BYTES" "$W/r2.img"

# Server A (intent log on): lin, mir, rs. Server B (intent log off): mirn.
# The mirrors' legs start identical; the first start still resyncs the
# second leg from the first (waited for below).
backend() { printf '[[backend]]\nname = "%s"\npath = "%s"\n' "$1" "$W/$1.img"; }
linear() { printf '[[volume]]\nname = "%s"\n[[volume.extent]]\nlength = %s\nbackend = "%s"\n' "$1" "$BYTES" "$2"; }
mirror() { printf '[[volume]]\nname = "%s"\n[[volume.extent]]\nlength = %s\nmirror = [ { backend = "%s", backend_offset = 0 }, { backend = "%s", backend_offset = 0 } ]\n' "$1" "$BYTES" "$2" "$3"; }
{
  printf '[server]\nlisten = ["unix:%s/a.sock"]\ncontrol = "%s/a-control.sock"\nstate_dir = "%s/a-state"\n' "$W" "$W" "$W"
  for b in lin m1 m2 r1 r2; do backend $b; done
  linear lin lin; mirror mir m1 m2; linear rs r1
} >"$W/a.toml"
{
  printf '[server]\nlisten = ["unix:%s/b.sock"]\ncontrol = "%s/b-control.sock"\nstate_dir = "%s/b-state"\n' "$W" "$W" "$W"
  backend n1; backend n2; mirror mirn n1 n2
} >"$W/b.toml"
RUST_LOG=nbdvirt=info "$NBDVIRT" serve --config "$W/a.toml" >"$W/a.log" 2>&1 &
PIDS+=($!)
NBDVIRT_BENCH_NO_INTENT=1 RUST_LOG=nbdvirt=warn "$NBDVIRT" serve --config "$W/b.toml" >"$W/b.log" 2>&1 &
PIDS+=($!)
nbdkit --exit-with-parent -U "$W/k.sock" file "$W/k.img" >"$W/k.log" 2>&1 &
PIDS+=($!)
for s in a.sock b.sock k.sock a-control.sock b-control.sock; do
  for ((i = 0; i < 100; i++)); do [[ -S $W/$s ]] && break; sleep 0.1; done
  [[ -S $W/$s ]] || die "$s did not appear: $(cat "$W"/*.log)"
done

ctl() { # a|b args...
  local c=$1; shift
  "$NBDVIRT" "$@" --control "$W/$c-control.sock"
}
# Seconds from running the command after `--` (if any) until leg $3 of
# volume $2 on server $1 is in sync.
wait_leg() {
  python3 - "$NBDVIRT" "$W/$1-control.sock" "$2" "$3" "${@:4}" <<'EOF'
import json, subprocess, sys, time
binary, control, volume, leg = sys.argv[1:5]
start = time.monotonic()
if sys.argv[5:6] == ["--"]:
    subprocess.run([binary, *sys.argv[6:], "--control", control], check=True, capture_output=True)
while time.monotonic() - start < 600:
    out = subprocess.run([binary, "mirror", "status", volume, "--json", "--control", control], capture_output=True, text=True, check=True).stdout
    state = [l["state"] for l in json.loads(out)["mirrors"][0]["legs"] if l["backend"] == leg]
    if state == ["in_sync"]:
        print(f"{time.monotonic() - start:.3f}")
        sys.exit(0)
    if state == ["failed"]:
        sys.exit(f"leg {leg} failed")
    time.sleep(0.02)
sys.exit("timed out")
EOF
}
wait_leg a mir m2 >/dev/null
wait_leg b mirn n2 >/dev/null

uri() { case $1 in lin | mir | rs) echo "nbd+unix:///$1?socket=$W/a.sock" ;; mirn) echo "nbd+unix:///mirn?socket=$W/b.sock" ;; nbdkit) echo "nbd+unix:///?socket=$W/k.sock" ;; esac; }
fio_iops() { # target fio-args...  -> total IOPS
  local t=$1; shift
  fio --name=b --ioengine=nbd --uri="$(uri "$t")" --size="${SIZE_MB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 \
    --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p' | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}
wait_load() {
  local i
  for ((i = 0; i < 300; i++)); do
    awk -v max="$WAIT_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return
    sleep 1
  done
}
# Server-side seconds of the last copy onto r2: from the log line of the
# operation ($1: "mirror leg added" or "split copy merged back") to the
# resync's "in sync" (no CLI start-up or status polling in it).
server_secs() {
  python3 - "$W/a.log" "$1" <<'EOF'
import datetime, re, sys
lines = open(sys.argv[1]).read().splitlines()
ts = lambda l: datetime.datetime.fromisoformat(l.split()[0].rstrip("Z"))
end = max(i for i, l in enumerate(lines) if "resynced: in sync" in l and 'leg="r2"' in l)
start = max(i for i, l in enumerate(lines[:end]) if sys.argv[2] in l)
print(f"{(ts(lines[end]) - ts(lines[start])).total_seconds():.3f}")
EOF
}

# dd of SIZE_MB from r1 into a fresh file (like a resync into a punched
# leg: tmpfs allocates pages) or over an allocated one (like a merge, whose
# leg was just written by the split side).
dd_secs() { # fresh|over
  local t0 t1
  [[ $1 == fresh ]] && rm -f "$W/dd.img"
  t0=$(date +%s.%N)
  dd if="$W/r1.img" of="$W/dd.img" bs=1M count="$SIZE_MB" conv=notrunc status=none
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}

RES="$W/results.tsv"
: >"$RES"
echo "## Environment"
echo
echo '```'
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpu:     $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
echo "fio:     $(fio --version); nbdkit: $(nbdkit --version | head -1)"
echo "nbdvirt: $("$NBDVIRT" --version) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "rounds:  $ROUNDS x ${RUNTIME}s per fio run, ${SIZE_MB} MiB stores on tmpfs (state_dir on tmpfs too)"
echo '```'
for ((round = 1; round <= ROUNDS; round++)); do
  wait_load
  log "round $round/$ROUNDS"
  targets=(lin mir mirn nbdkit)
  rot=$(((round - 1) % 4))
  order=("${targets[@]:rot}" "${targets[@]:0:rot}")
  for row in $ROWS; do
    rw=randwrite; [[ $row == rr16 ]] && rw=randread
    for t in "${order[@]}"; do
      echo -e "$row\t$t\t$(fio_iops "$t" --rw=$rw --bs=4k --iodepth=16)" >>"$RES"
    done
  done
  if [[ " $PARTS " == *" copy "* ]]; then
  # Resync of SIZE_MB of data into a punched leg vs dd into a new file.
  fallocate -p -o 0 -l "$BYTES" "$W/r2.img"
  echo -e "resync\tnbdvirt\t$(wait_leg a rs r2 -- mirror add rs --to r2 --rate 0)" >>"$RES"
  echo -e "resync-server\tnbdvirt\t$(server_secs "mirror leg added")" >>"$RES"
  echo -e "resync\tdd\t$(dd_secs fresh)" >>"$RES"
  # Merge: split, change every region of the copy, merge back (primary).
  ctl a split rs --leg r2 --as rs2 >/dev/null
  fio --name=m --ioengine=nbd --uri="nbd+unix:///rs2?socket=$W/a.sock" --rw=write --bs=1M --iodepth=4 --size="${SIZE_MB}M" >/dev/null 2>&1
  echo -e "merge\tnbdvirt\t$(wait_leg a rs r2 -- merge rs2 --into rs --rate 0)" >>"$RES"
  echo -e "merge-server\tnbdvirt\t$(server_secs "split copy merged back")" >>"$RES"
  echo -e "merge\tdd\t$(dd_secs over)" >>"$RES"
  ctl a mirror remove rs --leg r2 >/dev/null
  fi
  if [[ " $PARTS " == *" rrw "* ]]; then
  # Foreground randrw during a default-rate resync vs none.
  echo -e "rrw-resync\tidle\t$(fio_iops rs --rw=randrw --bs=4k --iodepth=16)" >>"$RES"
  ctl a mirror add rs --to r2 >/dev/null
  echo -e "rrw-resync\tresyncing\t$(fio_iops rs --rw=randrw --bs=4k --iodepth=16)" >>"$RES"
  wait_leg a rs r2 >/dev/null
  ctl a mirror remove rs --leg r2 >/dev/null
  fi
done

python3 - "$RES" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    row, who, v = line.split()
    rows.setdefault(row, {}).setdefault(who, []).append(float(v))
def fmt(vs, unit):
    m = statistics.median(vs)
    return f"{m:,.0f} {unit} ({min(vs):,.0f}–{max(vs):,.0f})" if unit == "IOPS" else f"{m:.2f} s ({min(vs):.2f}–{max(vs):.2f})"
med = lambda r, w: statistics.median(rows[r][w])
print("\n## Results (median, min–max over rounds)\n")
print("| row | variant | result |\n|---|---|---|")
names = {"rw16": "4k randwrite QD16", "rr16": "4k randread QD16", "resync": "resync copy (wall: CLI, swap, polling)", "merge": "merge copy (wall)",
         "resync-server": "resync copy (server log)", "merge-server": "merge copy (server log)", "rrw-resync": "4k randrw QD16"}
for row, d in rows.items():
    unit = "s" if row.startswith(("resync", "merge")) else "IOPS"
    for who, vs in d.items():
        print(f"| {names[row]} | {who} | {fmt(vs, unit)} |")
print("\n## Ratios (medians)\n")
def ratio(label, a, b, target, invert=False):
    try:
        v = med(*b) / med(*a) if invert else med(*a) / med(*b)
        print(f"- {label}: {v:.2f} ({target})")
    except KeyError:
        pass
ratio("mirror / linear, 4k randwrite QD16", ("rw16", "mir"), ("rw16", "lin"), "target >= 0.8")
ratio("mirror / linear, 4k randread QD16", ("rr16", "mir"), ("rr16", "lin"), "target >= 1.0")
ratio("mirror with / without the write-intent bitmap, 4k randwrite", ("rw16", "mir"), ("rw16", "mirn"), "target >= 0.95")
ratio("resync speed / dd, wall", ("resync", "nbdvirt"), ("resync", "dd"), "target >= 0.8", invert=True)
ratio("resync speed / dd, server side", ("resync-server", "nbdvirt"), ("resync", "dd"), "target >= 0.8", invert=True)
ratio("merge speed / dd, wall", ("merge", "nbdvirt"), ("merge", "dd"), "target >= 0.8", invert=True)
ratio("merge speed / dd, server side", ("merge-server", "nbdvirt"), ("merge", "dd"), "target >= 0.8", invert=True)
ratio("randrw during a default-rate resync / idle", ("rrw-resync", "resyncing"), ("rrw-resync", "idle"), "target >= 0.7")
ratio("linear / nbdkit, 4k randwrite QD16", ("rw16", "lin"), ("rw16", "nbdkit"), "reference")
ratio("linear / nbdkit, 4k randread QD16", ("rr16", "lin"), ("rr16", "nbdkit"), "reference")
EOF
