#!/usr/bin/env bash
# What thin provisioning costs (issue 11, "Speed"): thin pool volumes vs a
# linear (thick) pool volume on the same tmpfs store, fio's nbd engine over
# a Unix socket, every variant alternated in each round; medians and spread.
#
#   benches/pool.sh                     # 5 rounds, 8 s per fio run
#   ROUNDS=3 RUNTIME=5 SIZE_MB=512 benches/pool.sh
#
# Rows:
#   rw16     4k randwrite QD16 to chunks mapped already: `lin` (thick, pool
#            p1m), `thin` (pool p1m, 1 MiB chunks) and `thin64` (pool p64k,
#            64 KiB chunks), each filled end to end first
#   rr16     4k randread QD16 on the same three volumes
#   fresh    4k randwrite QD16 to fresh chunks: a new thin volume of
#            FRESH_SIZE in each pool every round (`fresh1m`, `fresh64k`),
#            FRESH_RUNTIME seconds with no ramp, then deleted. The volume
#            has far more chunks than fio writes blocks, so nearly every
#            write maps a chunk; "fresh" = chunks mapped / writes says how
#            nearly (from `pool status --json`).
#   cpu      server CPU time (user+sys, all threads) per I/O of each row
#            above: less noisy than IOPS on a shared machine
#   commit   the pool thread's CPU time per chunk the fresh rows mapped
#            (commits of the chunk maps, meters)
#   create   `volume create` of a CREATE_SIZE thin volume, wall time of the
#            CLI (date +%s%N around it), CREATES per round, each deleted
#            after; `rtt` = the same CLI doing `pool status` (start-up and
#            socket round trip: the floor under `create`).
#
# Ratios are taken per round (variants run back to back), then the median
# and range over rounds: a noisy minute moves both sides of a ratio.
#
# Environment: ROUNDS=5 RUNTIME=8 SIZE_MB=1024 FRESH_SIZE=1TiB (bytes or
# NNN[KMGT]iB) FRESH_RUNTIME=2 FRESH_POOL_GB=256 (sparse room for fresh
# chunks in each pool store) CREATE_SIZE=1TiB CREATES=5 NO_BUILD=1
# NBDVIRT_BIN=PATH ROWS="rw16 rr16" PARTS="fresh create" WAIT_LOAD=1.5 (wait,
# at most 300 s, for the 1-minute load average to drop below it before each
# round). Stores and state_dir are on /dev/shm (redb commits cost no disk
# flush here: this measures the target and the map, not the disk).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
RUNTIME=${RUNTIME:-8}
SIZE_MB=${SIZE_MB:-1024}
FRESH_SIZE=${FRESH_SIZE:-1TiB}
FRESH_RUNTIME=${FRESH_RUNTIME:-2}
FRESH_POOL_GB=${FRESH_POOL_GB:-256}
CREATE_SIZE=${CREATE_SIZE:-1TiB}
CREATES=${CREATES:-5}
ROWS=${ROWS:-"rw16 rr16"}
PARTS=${PARTS:-"fresh create"}
WAIT_LOAD=${WAIT_LOAD:-1.5}
if [[ -n ${NBDVIRT_BIN:-} ]]; then NO_BUILD=1; fi

die() { echo "pool.sh: $*" >&2; exit 1; }
log() { echo "pool.sh: $*" >&2; }
for v in ROUNDS RUNTIME SIZE_MB FRESH_RUNTIME FRESH_POOL_GB CREATES; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for r in $ROWS; do [[ $r == rw16 || $r == rr16 ]] || die "unknown row '$r' in ROWS (known: rw16 rr16)"; done
for p in $PARTS; do [[ $p == fresh || $p == create ]] || die "unknown part '$p' in PARTS (known: fresh create)"; done
bytes() { # 1TiB | 64KiB | 4096 -> bytes
  local n=${1%[KMGT]iB} unit=${1##*[0-9]}
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$1' is not a size (bytes or NNN[KMGT]iB)"
  case $unit in
    "") echo "$n" ;;
    KiB) echo $((n << 10)) ;;
    MiB) echo $((n << 20)) ;;
    GiB) echo $((n << 30)) ;;
    TiB) echo $((n << 40)) ;;
    *) die "'$1': unit must be KiB, MiB, GiB or TiB" ;;
  esac
}
FRESH_BYTES=$(bytes "$FRESH_SIZE")
CREATE_BYTES=$(bytes "$CREATE_SIZE")
BYTES=$((SIZE_MB << 20))
((BYTES % (1 << 20) == 0)) || die "SIZE_MB must give whole 1 MiB chunks"

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2'"; }
need fio fio
need python3 python3
need truncate coreutils
need timeout coreutils
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine: install the Debian package 'fio'"

cd "$(dirname "$0")/.."
REPO=$(pwd)
NBDVIRT=${NBDVIRT_BIN:-"$REPO/target/release/nbdvirt"}
if [[ -z ${NO_BUILD:-} ]]; then
  need cargo "cargo (or a rustup toolchain)"
  log "cargo build --release"
  timeout 1800 cargo build --release --quiet || die "cargo build --release failed"
fi
[[ -x $NBDVIRT ]] || die "$NBDVIRT missing"

W=$(mktemp -d /dev/shm/nbdvirt-pool.XXXXXX)
SERVER=
cleanup() {
  if [[ -n $SERVER ]]; then
    kill -TERM "$SERVER" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER" 2>/dev/null || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM
# Written pages: the three filled volumes, plus 4 KiB per fresh write.
avail_kb=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
((avail_kb > 4 * SIZE_MB * 1024)) || die "/dev/shm has ${avail_kb} KiB free; need $((4 * SIZE_MB)) MiB"

# Two sparse pool stores on tmpfs: p1m holds lin, thin and the fresh 1 MiB
# volumes; p64k holds thin64 and the fresh 64 KiB volumes.
truncate -s $((2 * BYTES + (FRESH_POOL_GB << 30))) "$W/s1m.img"
truncate -s $((BYTES + (FRESH_POOL_GB << 30))) "$W/s64k.img"
cat >"$W/pool.toml" <<EOF
[server]
listen = ["unix:$W/nbd.sock"]
control = "$W/control.sock"
state_dir = "$W/state"

[[backend]]
name = "s1m"
path = "$W/s1m.img"

[[backend]]
name = "s64k"
path = "$W/s64k.img"

[[pool]]
name = "p1m"
backends = ["s1m"]
chunk = "1MiB"

[[pool]]
name = "p64k"
backends = ["s64k"]
chunk = "64KiB"
EOF
RUST_LOG=nbdvirt=warn "$NBDVIRT" serve --config "$W/pool.toml" >"$W/server.log" 2>&1 &
SERVER=$!
for s in nbd.sock control.sock; do
  for ((i = 0; i < 100; i++)); do
    [[ -S $W/$s ]] && break
    kill -0 "$SERVER" 2>/dev/null || die "the server exited during start-up: $(cat "$W/server.log")"
    sleep 0.1
  done
  [[ -S $W/$s ]] || die "$s did not appear within 10 s: $(cat "$W/server.log")"
done

ctl() { timeout 60 "$NBDVIRT" "$@" --control "$W/control.sock"; }
create() { # name pool bytes [--thin]
  ctl volume create "$1" --size "$3" --pool "$2" "${@:4}" --json >"$W/create.json" ||
    die "volume create $1 failed: $(cat "$W/create.json") $(tail -5 "$W/server.log")"
}
uri() { echo "nbd+unix:///$1?socket=$W/nbd.sock"; }
# fio on volume $1 with the remaining arguments; prints "IOPS TOTAL_IOS".
fio_run() {
  local v=$1 out="$W/fio.json"; shift
  if ! timeout --kill-after=10 $((RUNTIME + FRESH_RUNTIME + 120)) fio --name=b --ioengine=nbd --uri="$(uri "$v")" \
    --norandommap --randrepeat=0 --output-format=json "$@" >"$out" 2>"$out.err"; then
    cat "$out.err" "$out" >&2
    tail -20 "$W/server.log" >&2
    die "fio failed on $v ($*)"
  fi
  python3 - "$out" "$v" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
# The nbd engine prints "fio: connected to NBD server" before the JSON.
job = json.loads(text[text.index("{"):])["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']} on {sys.argv[2]}")
d = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
if d["io_bytes"] == 0:
    sys.exit(f"fio did no I/O on {sys.argv[2]}")
print(f"{d['iops']:.0f} {d['total_ios']}")
EOF
}
# Bytes of chunks volume $2 of pool $1 holds (`pool status P --json`).
allocated() {
  ctl pool status "$1" --json | python3 -c '
import json, sys
doc = json.load(sys.stdin)
pools = doc["pools"] if isinstance(doc, dict) and "pools" in doc else doc if isinstance(doc, list) else [doc]
print(next(v["allocated"] for p in pools for v in p["volumes"] if v["name"] == sys.argv[1]))' "$2"
}
us_since() { echo $((($(date +%s%N) - $1) / 1000)); }
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$1"; } # utime+stime of a stat file
server_ticks() { ticks "/proc/$SERVER/stat"; }
pool_thread_ticks() {
  local t
  for t in /proc/"$SERVER"/task/*; do
    [[ $(cat "$t/comm" 2>/dev/null) == pools ]] && { ticks "$t/stat"; return; }
  done
  die "the server has no 'pools' thread"
}
TCK=$(getconf CLK_TCK)
# CPU microseconds per I/O: ticks spent, IOPS, seconds the run lasted.
per_io() { python3 -c "print(f'{$1 / $TCK * 1e6 / max($2 * $3, 1):.2f}')"; }
wait_load() {
  local i
  for ((i = 0; i < 300; i++)); do
    awk -v max="$WAIT_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return
    sleep 1
  done
  log "loadavg still $(cut -d' ' -f1 /proc/loadavg) >= $WAIT_LOAD after 300 s; running anyway"
}

log "creating lin (thick), thin and thin64 ($SIZE_MB MiB each) and filling them"
create lin p1m "$BYTES"
create thin p1m "$BYTES" --thin
create thin64 p64k "$BYTES" --thin
for v in lin thin thin64; do
  fio_run "$v" --rw=write --bs=1M --iodepth=4 --size="$BYTES" --end_fsync=1 >/dev/null
done
for v in thin:p1m thin64:p64k; do
  a=$(allocated "${v#*:}" "${v%:*}")
  ((a == BYTES)) || die "${v%:*} holds $a bytes of chunks after the fill, not $BYTES"
done

RES="$W/results.tsv"
: >"$RES"
echo "## Environment"
echo
echo '```'
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "kernel:  $(uname -srm)"
echo "cpu:     $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
echo "loadavg: $(cut -d' ' -f1-3 /proc/loadavg) (before the rounds)"
echo "fio:     $(fio --version)"
echo "nbdvirt: $("$NBDVIRT" --version) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "rounds:  $ROUNDS x ${RUNTIME}s (+1 s ramp) per fio run, volumes of ${SIZE_MB} MiB; fresh: $FRESH_SIZE volumes, ${FRESH_RUNTIME}s;"
echo "         create: $CREATES x $CREATE_SIZE per round; stores and state_dir on tmpfs"
echo '```'
for ((round = 1; round <= ROUNDS; round++)); do
  wait_load
  log "round $round/$ROUNDS (load $(cut -d' ' -f1 /proc/loadavg))"
  targets=(lin thin thin64)
  rot=$(((round - 1) % ${#targets[@]}))
  order=("${targets[@]:rot}" "${targets[@]:0:rot}")
  for row in $ROWS; do
    rw=randwrite; [[ $row == rr16 ]] && rw=randread
    for v in "${order[@]}"; do
      c0=$(server_ticks)
      out=$(fio_run "$v" --rw=$rw --bs=4k --iodepth=16 --size="$BYTES" --time_based --runtime="$RUNTIME" --ramp_time=1)
      c1=$(server_ticks)
      echo -e "$row\t$v\t${out% *}\t$round" >>"$RES"
      echo -e "cpu-$row\t$v\t$(per_io $((c1 - c0)) "${out% *}" $((RUNTIME + 1)))\t$round" >>"$RES"
    done
  done
  if [[ " $PARTS " == *" fresh "* ]]; then
    fresh=(p1m:fresh1m p64k:fresh64k)
    ((round % 2 == 0)) && fresh=(p64k:fresh64k p1m:fresh1m)
    for pv in "${fresh[@]}"; do
      p=${pv%:*} v=${pv#*:}
      create "$v" "$p" "$FRESH_BYTES" --thin
      c0=$(server_ticks) p0=$(pool_thread_ticks)
      out=$(fio_run "$v" --rw=randwrite --bs=4k --iodepth=16 --size="$FRESH_BYTES" --time_based --runtime="$FRESH_RUNTIME")
      read -r iops ios <<<"$out"
      c1=$(server_ticks)
      # The last second's maps are committed by the pool thread's next pass.
      sleep 1.2
      p1=$(pool_thread_ticks)
      chunk=$((1 << 20)); [[ $p == p64k ]] && chunk=65536
      a=$(allocated "$p" "$v")
      echo -e "fresh\t$v\t$iops\t$round" >>"$RES"
      echo -e "cpu-fresh\t$v\t$(per_io $((c1 - c0)) "$iops" "$FRESH_RUNTIME")\t$round" >>"$RES"
      echo -e "commit\t$v\t$(python3 -c "print(f'{($p1 - $p0) / $TCK * 1e6 / max($a // $chunk, 1):.2f}')")\t$round" >>"$RES"
      echo -e "fresh-share\t$v\t$(python3 -c "print(f'{$a / $chunk / max($ios, 1):.3f}')")\t$round" >>"$RES"
      ctl volume delete "$v" --force >/dev/null || die "volume delete $v failed: $(tail -5 "$W/server.log")"
    done
  fi
  if [[ " $PARTS " == *" create "* ]]; then
    for ((i = 0; i < CREATES; i++)); do
      t0=$(date +%s%N)
      create "ct$i" p1m "$CREATE_BYTES" --thin
      echo -e "create\tthin\t$(us_since "$t0")\t$round" >>"$RES"
      ctl volume delete "ct$i" --force >/dev/null || die "volume delete ct$i failed: $(tail -5 "$W/server.log")"
      t0=$(date +%s%N)
      ctl pool status p1m --json >/dev/null
      echo -e "create\trtt\t$(us_since "$t0")\t$round" >>"$RES"
    done
  fi
done
kill -0 "$SERVER" 2>/dev/null || die "the server died: $(tail -20 "$W/server.log")"

python3 - "$RES" <<'EOF'
import statistics, sys
rows, by_round = {}, {}
for line in open(sys.argv[1]):
    row, who, v, rnd = line.split()
    rows.setdefault(row, {}).setdefault(who, []).append(float(v))
    by_round[(row, who, rnd)] = float(v)
names = {"rw16": "4k randwrite QD16, mapped chunks", "rr16": "4k randread QD16", "fresh": "4k randwrite QD16, fresh chunks",
         "cpu-rw16": "  server CPU µs per I/O", "cpu-rr16": "  server CPU µs per I/O", "cpu-fresh": "  server CPU µs per I/O",
         "commit": "  pool thread CPU µs per mapped chunk", "fresh-share": "  writes that mapped a chunk",
         "create": "volume create (CLI wall time)"}
def fmt(row, vs):
    m = statistics.median(vs)
    if row == "create":
        return f"{m / 1000:.1f} ms ({min(vs) / 1000:.1f}–{max(vs) / 1000:.1f})"
    if row == "fresh-share":
        return f"{m:.3f} ({min(vs):.3f}–{max(vs):.3f})"
    if row.startswith("cpu-") or row == "commit":
        return f"{m:.2f} ({min(vs):.2f}–{max(vs):.2f})"
    return f"{m:,.0f} IOPS ({min(vs):,.0f}–{max(vs):,.0f})"
print("\n## Results (median, min–max over rounds)\n")
print("| row | volume | result |\n|---|---|---|")
for row in ["rw16", "cpu-rw16", "rr16", "cpu-rr16", "fresh", "cpu-fresh", "commit", "fresh-share", "create"]:
    for who, vs in rows.get(row, {}).items():
        print(f"| {names[row]} | {who} | {fmt(row, vs)} |")
print("\n## Ratios (per round, then median and min–max over rounds)\n")
def ratio(label, a, b, target):
    rs = [v / by_round[(b[0], b[1], r)] for (row, who, r), v in by_round.items() if (row, who) == a and (b[0], b[1], r) in by_round]
    if rs:
        print(f"- {label}: {statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f}; {target})")
for v, chunk in (("thin", "1 MiB"), ("thin64", "64 KiB")):
    ratio(f"{v} / linear, 4k randwrite to mapped chunks ({chunk})", ("rw16", v), ("rw16", "lin"), "target >= 0.95")
    ratio(f"{v} / linear, 4k randread ({chunk})", ("rr16", v), ("rr16", "lin"), "target >= 0.95")
for v, chunk in (("fresh1m", "1 MiB"), ("fresh64k", "64 KiB")):
    ratio(f"{v} / linear, 4k randwrite to fresh chunks ({chunk})", ("fresh", v), ("rw16", "lin"), "target >= 0.5")
if "create" in rows:
    med = lambda r, w: statistics.median(rows[r][w])
    print(f"- volume create of a thin volume: {med('create', 'thin') / 1000:.1f} ms median (target < 50 ms),"
          f" of which CLI start-up and round trip ≈ {med('create', 'rtt') / 1000:.1f} ms")
EOF
