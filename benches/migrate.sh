#!/usr/bin/env bash
# Benchmarks `nbdvirt migrate` on this machine and its storage:
#
#  0. seek: a diagnostic, no nbdvirt involved: the cost of one SEEK_DATA +
#     SEEK_HOLE pair per 1 MiB chunk over a fully written file, which is
#     what the copier's per-chunk block_status does, on each filesystem.
#  1. copy: bulk copy throughput of an idle 1 GiB volume (random data, fully
#     written) with `migrate start --rate 0 --wait`, against `dd bs=1M
#     conv=fsync` and `cp` + `sync FILE` of the same file to the same
#     filesystem; once on a disk directory and once on tmpfs. Also
#     "dd-nice": the same dd at the copier's priority (nice 10, ionice
#     best-effort 7), to tell priority effects from implementation effects
#     on a loaded machine. Page cache dropped before every copy.
#  2. fg: foreground fio 4k random IOPS (QD16, fio's nbd engine, Unix
#     socket) while a migration runs at the DEFAULT rate, against the same
#     fio run with no migration; the two alternate, median of the rounds.
#     Each migrating run starts a migration, waits SETTLE s, runs fio,
#     checks the job is still running (else the run is flagged "not
#     covered"), then aborts it, so every run starts from chunk 0.
#
#   benches/migrate.sh                       # everything, 3 rounds (~20 min)
#   PARTS=copy DIRS=/dev/shm benches/migrate.sh
#
# Environment:
#   PARTS="seek copy fg"     which parts to run
#   METHODS="dd cp nbdvirt dd-nice"   copy part: methods (dd is the reference)
#   DIRS="/var/tmp /dev/shm" directories (filesystems) to test in; a scratch
#                            subdirectory is created in each and removed
#   ROUNDS=3                 rounds; each round runs every method/condition
#   SIZE_MB=1024             copy part: size of the copied file/volume, MiB
#   FG_SIZE_MB=2048          fg part: size of the volume, MiB (fully written)
#   RUNTIME=20 RAMP=2        fg part: fio seconds measured / ramp seconds
#   SETTLE=1                 fg part: seconds between `migrate start` and fio
#   WORKLOADS="randrw randread"   fg part: randrw = 70/30 read/write
#   FG_RATE=                 fg part: pass --rate FG_RATE (e.g. 16MiB) instead
#                            of using the server's default rate
#   DROP_CACHES=1            copy part: `sync; echo 3 > drop_caches` before
#                            every copy (needs root; 0 = never)
#   RESULTS=DIR              also keep the raw TSVs and logs in DIR
#   NO_BUILD=1               skip `cargo build --release`
#   NBDVIRT_BIN=PATH         benchmark this nbdvirt binary instead (implies NO_BUILD)
#
# Copy timing: "wall" is the wall time of the whole command (for nbdvirt:
# the `migrate start ... --wait` client, which polls every 250 ms, so it
# overstates by up to ~0.25 s); "server" is the time between the server's
# own log lines "migration started" and "migration completed" (copy +
# final fdatasync + cutover). dd/cp include their final fsync, so both are
# "data durable on the destination" times. Only Unix sockets are used.
set -euo pipefail

PARTS=${PARTS:-"seek copy fg"}
METHODS=${METHODS:-"dd cp nbdvirt dd-nice"}
DIRS=${DIRS:-"/var/tmp /dev/shm"}
ROUNDS=${ROUNDS:-3}
SIZE_MB=${SIZE_MB:-1024}
FG_SIZE_MB=${FG_SIZE_MB:-2048}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
SETTLE=${SETTLE:-1}
WORKLOADS=${WORKLOADS:-"randrw randread"}
FG_RATE=${FG_RATE:-}
DROP_CACHES=${DROP_CACHES:-1}
RESULTS=${RESULTS:-}

die() { echo "migrate.sh: $*" >&2; exit 1; }
log() { echo "migrate.sh: $*" >&2; }

for v in ROUNDS SIZE_MB FG_SIZE_MB RUNTIME; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for v in RAMP SETTLE; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
for p in $PARTS; do [[ $p == seek || $p == copy || $p == fg ]] || die "unknown part '$p' in PARTS (known: seek copy fg)"; done
for m in $METHODS; do [[ $m == dd || $m == cp || $m == nbdvirt || $m == dd-nice ]] || die "unknown method '$m' (known: dd cp nbdvirt dd-nice)"; done
[[ " $METHODS " == *" dd "* ]] || die "METHODS must include dd (the reference)"
for w in $WORKLOADS; do [[ $w == randrw || $w == randread ]] || die "unknown workload '$w' (known: randrw randread)"; done

cd "$(dirname "$0")/.."
REPO=$(pwd)

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2'"; }
need fio fio
need python3 python3
need timeout coreutils
need dd coreutils
need ionice util-linux
need fincore util-linux
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found: install the Debian package 'time'"
[[ -n ${NO_BUILD:-}${NBDVIRT_BIN:-} ]] || need cargo "cargo (or a rustup toolchain)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine (Debian package 'fio' >= 3.17, built with libnbd)"

if [[ $DROP_CACHES == 1 ]]; then
  if [[ $(id -u) != 0 || ! -w /proc/sys/vm/drop_caches ]]; then
    log "not root (or drop_caches not writable): page cache will NOT be dropped"
    DROP_CACHES=0
  fi
fi

# The default rate, for the fg part's length check and the report.
DEFAULT_RATE=$((64 << 20))
# The migration must outlive SETTLE + fio (ramp + runtime + ~1 s of setup).
need_mb=$(((SETTLE + RAMP + RUNTIME + 2) * 64))
if [[ " $PARTS " == *" fg "* ]] && ((FG_SIZE_MB < need_mb)); then
  die "FG_SIZE_MB=$FG_SIZE_MB is too small: at the default 64 MiB/s the migration would end before fio does (need >= $need_mb)"
fi

# ---- scratch and cleanup -----------------------------------------------------
WORK=$(mktemp -d /tmp/nbdvirt-migbench.XXXXXX)
SCRATCH=()
SERVER_PID=
stop_server() {
  local pid=$SERVER_PID i
  SERVER_PID=
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local d
  trap - EXIT INT TERM
  stop_server
  if [[ -n $RESULTS ]]; then
    mkdir -p "$RESULTS" && cp -r "$WORK"/. "$RESULTS"/ 2>/dev/null || true
  fi
  for d in "${SCRATCH[@]}"; do rm -rf "$d"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

for d in $DIRS; do
  [[ -d $d && -w $d ]] || die "$d is not a writable directory"
  want=0
  [[ " $PARTS " == *" copy "* ]] && want=$((SIZE_MB * 2))
  [[ " $PARTS " == *" fg "* ]] && ((FG_SIZE_MB * 2 > want)) && want=$((FG_SIZE_MB * 2))
  avail_kb=$(df -Pk "$d" | awk 'NR == 2 { print $4 }')
  ((avail_kb > want * 1024 + 262144)) || die "$d has ${avail_kb} KiB free; need $((want * 1024 + 262144)) KiB"
done

# ---- build -------------------------------------------------------------------
NBDVIRT=${NBDVIRT_BIN:-$REPO/target/release/nbdvirt}
[[ -n ${NBDVIRT_BIN:-} ]] && NO_BUILD=1
if [[ -z ${NO_BUILD:-} ]]; then
  log "cargo build --release"
  timeout 1800 cargo build --release --quiet || die "cargo build --release failed"
fi
[[ -x $NBDVIRT ]] || die "$NBDVIRT missing (run cargo build --release)"

# ---- environment -------------------------------------------------------------
fs_desc() { # dir
  local dev fstype
  read -r dev fstype < <(df -PT "$1" | awk 'NR == 2 { print $1, $2 }')
  local blk=${dev#/dev/} extra=""
  if [[ -e /sys/block/$blk/queue/scheduler ]]; then
    extra=", scheduler $(sed 's/.*\[\(.*\)\].*/\1/' "/sys/block/$blk/queue/scheduler"), rotational=$(cat "/sys/block/$blk/queue/rotational")"
  fi
  echo "$1: $fstype on $dev$extra"
}
echo "## Environment"
echo
echo '```'
echo "date:        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "kernel:      $(uname -srm)"
echo "cpu:         $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
echo "memory:      $(free -m | awk '/^Mem:/ { print $2 " MiB" }')"
for d in $DIRS; do echo "storage:     $(fs_desc "$d")"; done
echo "dirty:       vm.dirty_ratio=$(cat /proc/sys/vm/dirty_ratio) vm.dirty_background_ratio=$(cat /proc/sys/vm/dirty_background_ratio)"
echo "loadavg:     $(cut -d' ' -f1-3 /proc/loadavg) (before the run)"
echo "fio:         $(fio --version)"
echo "coreutils:   $(dd --version | head -1)"
if [[ -n ${NBDVIRT_BIN:-} ]]; then
  echo "nbdvirt:     $("$NBDVIRT" --version) ($NBDVIRT)"
else
  echo "nbdvirt:     $("$NBDVIRT" --version) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty src'))"
fi
env | grep '^NBDVIRT_EXP_' | sed 's/^/server env:  /' || true
echo "parts:       $PARTS; rounds: $ROUNDS; drop caches before copies: $([[ $DROP_CACHES == 1 ]] && echo yes || echo no)"
echo '```'
echo

# ---- helpers -----------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
now() { date +%s.%N; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
drop_caches() {
  sync
  if [[ $DROP_CACHES == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}
fill() { # file MiB
  log "filling $1 with $2 MiB from /dev/urandom"
  timeout 900 dd if=/dev/urandom of="$1" bs=1M count="$2" status=none conv=fsync || die "cannot fill $1"
}

# write_config DIR SIZE_BYTES: volume v on DIR/src.img, destination DIR/dst.img
write_config() {
  local d=$1 size=$2
  cat >"$d/nbdvirt.toml" <<EOF
[server]
listen = ["unix:$d/nbd.sock"]
control = "$d/control.sock"
state_dir = "$d/state"

[[backend]]
name = "src"
path = "$d/src.img"

[[backend]]
name = "dst"
path = "$d/dst.img"
size = $size

[[volume]]
name = "v"

[[volume.extent]]
start = 0
length = $size
backend = "src"
backend_offset = 0
EOF
}

start_server() { # dir log
  local d=$1 logf=$2 i
  mkdir -p "$d/state"
  RUST_LOG=nbdvirt=info "$NBDVIRT" serve --config "$d/nbdvirt.toml" >"$logf" 2>&1 &
  SERVER_PID=$!
  for ((i = 0; i < 200; i++)); do
    grep -q '^nbdvirt: ready' "$logf" 2>/dev/null && [[ -S $d/control.sock ]] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$logf" >&2; die "nbdvirt exited during startup (log above)"; }
    sleep 0.05
  done
  cat "$logf" >&2
  die "nbdvirt not ready within 10 s"
}

ctl() { "$NBDVIRT" "$@" --control "$CTL"; }
mig_field() { # field -> value from `migrate status v --json`
  ctl migrate status v --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["migrations"][0]; print(m[sys.argv[1]])' "$1"
}

# ---- part 0: per-chunk SEEK_DATA/SEEK_HOLE cost (diagnostic) --------------------
SEEK_TSV="$WORK/seek.tsv"
printf 'dir\tsize_mb\tseek_hole_at_0_ms\tper_chunk_total_s\n' >"$SEEK_TSV"
if [[ " $PARTS " == *" seek "* ]]; then
  for dir in $DIRS; do
    D=$(mktemp -d "$dir/nbdvirt-migbench.XXXXXX")
    SCRATCH+=("$D")
    log "seek: writing $SIZE_MB MiB in $dir"
    dd if=/dev/zero of="$D/f.img" bs=1M count="$SIZE_MB" status=none conv=fsync
    # What FdBackend::block_status does for each 1 MiB chunk of a fully
    # written file: lseek(SEEK_DATA) then lseek(SEEK_HOLE) from the chunk start.
    python3 - "$D/f.img" "$dir" "$SIZE_MB" >>"$SEEK_TSV" <<'EOF'
import os, sys, time
path, d, mb = sys.argv[1:]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
t = time.perf_counter()
for _ in range(5):
    os.lseek(fd, 0, os.SEEK_HOLE)
first = (time.perf_counter() - t) / 5
t = time.perf_counter()
for off in range(0, size, 1 << 20):
    os.lseek(fd, off, os.SEEK_DATA)
    os.lseek(fd, off, os.SEEK_HOLE)
total = time.perf_counter() - t
print(f"{d}\t{mb}\t{first * 1e3:.3f}\t{total:.3f}")
EOF
    tail -1 "$SEEK_TSV" | awk -F'\t' '{ printf "migrate.sh: seek %-9s SEEK_HOLE from 0: %s ms; one pair per 1 MiB chunk over %s MiB: %s s\n", $1, $3, $2, $4 }' >&2
    rm -rf "$D"
  done
fi

# ---- part 1: copy throughput ---------------------------------------------------
COPY_TSV="$WORK/copy.tsv"
printf 'dir\tround\tmethod\tbytes\twall_s\tserver_s\tserver_tput\tcpu_s\tloadavg\n' >"$COPY_TSV"

copy_run() { # dir round method
  local dir=$1 round=$2 m=$3 D=$4 t0 t1 c0 c1 tf="$WORK/time.txt" real user sys server_s="" tput="" logf
  local bytes=$((SIZE_MB << 20)) load
  rm -f "$D/dst.img"
  load=$(cut -d' ' -f1 /proc/loadavg)
  case $m in
    dd | cp | dd-nice)
      drop_caches
      t0=$(now)
      if [[ $m == dd ]]; then
        /usr/bin/time -f '%e %U %S' -o "$tf" dd if="$D/src.img" of="$D/dst.img" bs=1M conv=fsync status=none
      elif [[ $m == dd-nice ]]; then
        /usr/bin/time -f '%e %U %S' -o "$tf" nice -n 10 ionice -c2 -n7 dd if="$D/src.img" of="$D/dst.img" bs=1M conv=fsync status=none
      else
        # cp (coreutils 9: copy_file_range where possible), then fsync the copy.
        /usr/bin/time -f '%e %U %S' -o "$tf" sh -c 'cp "$1" "$2" && sync "$2"' sh "$D/src.img" "$D/dst.img"
      fi
      t1=$(now)
      read -r real user sys <"$tf"
      c0=0
      c1=$(python3 -c "print(round(($user + $sys) * $CLK_TCK))")
      ;;
    nbdvirt)
      rm -rf "$D/state"
      logf="$WORK/copy-$(basename "$dir")-$round.log"
      start_server "$D" "$logf"
      CTL="$D/control.sock"
      drop_caches
      c0=$(cpu_ticks "$SERVER_PID")
      t0=$(now)
      ctl migrate start v --to dst --rate 0 --wait >"$WORK/wait.out" 2>"$WORK/wait.err" ||
        { cat "$WORK/wait.out" "$WORK/wait.err" "$logf" >&2; die "migration failed"; }
      t1=$(now)
      tput=$(mig_field throughput)
      c1=$(cpu_ticks "$SERVER_PID")
      stop_server
      server_s=$(python3 "$REPO/benches/migration_seconds.py" "$logf")
      ;;
  esac
  if [[ $round == 1 ]]; then
    cmp -s "$D/src.img" "$D/dst.img" || die "$m: destination differs from the source in $dir"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$dir" "$round" "$m" "$bytes" \
    "$(python3 -c "print(f'{$t1 - $t0:.3f}')")" "$server_s" "$tput" \
    "$(python3 -c "print(f'{($c1 - $c0) / $CLK_TCK:.2f}')")" "$load" >>"$COPY_TSV"
  tail -1 "$COPY_TSV" | awk -F'\t' '{ printf "migrate.sh: copy %-9s round %s %-8s wall %6.2f s  %7.1f MB/s  server %s s  cpu %s s  load %s\n", $1, $2, $3, $5, $4 / $5 / 1e6, $6, $8, $9 }' >&2
}

if [[ " $PARTS " == *" copy "* ]]; then
  for dir in $DIRS; do
    D=$(mktemp -d "$dir/nbdvirt-migbench.XXXXXX")
    SCRATCH+=("$D")
    fill "$D/src.img" "$SIZE_MB"
    write_config "$D" $((SIZE_MB << 20))
    read -r -a methods <<<"$METHODS"
    nm=${#methods[@]}
    for ((round = 1; round <= ROUNDS; round++)); do
      # Rotate the order every round so no method always goes first.
      for ((k = 0; k < nm; k++)); do
        copy_run "$dir" "$round" "${methods[$(((round - 1 + k) % nm))]}" "$D"
      done
    done
    rm -rf "$D"
  done
fi

# ---- part 2: foreground IOPS during a migration at the default rate -------------
FG_TSV="$WORK/fg.tsv"
printf 'dir\tround\tworkload\tcond\tiops\tread_iops\twrite_iops\tread_lat_us\tread_p99_us\tcopy_rate\tcovered\tsrv_cpu_pct\tcopier_cpu_pct\tcached_pct\tloadavg\n' >"$FG_TSV"
declare -A WL_FIO=(
  [randrw]="--rw=randrw --rwmixread=70"
  [randread]="--rw=randread"
)

copier_ticks() { # -> utime+stime of the server's copier thread, or empty
  local t
  for t in /proc/"$SERVER_PID"/task/*; do
    if [[ $(cat "$t/comm" 2>/dev/null) == @(nbdvirt-migrat*|resync-*) ]]; then
      awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$t/stat"
      return 0
    fi
  done
}

fg_run() { # dir round workload cond D
  local dir=$1 round=$2 wl=$3 cond=$4 D=$5 out="$WORK/fio-$(basename "$1")-$2-$3-$4.json"
  local b0="" b1="" s0="" s1="" k0="" k1="" state="" c0 c1 t0 t1 covered="" cached load
  kill -0 "$SERVER_PID" 2>/dev/null || die "nbdvirt died (log in $WORK)"
  # Same starting point for both conditions: no dirty pages left by the
  # previous run, and the source volume in the page cache (a server with
  # RAM to spare; other processes dropping caches would otherwise make the
  # two conditions start differently). The cached share is recorded.
  sync
  cat "$D/src.img" >/dev/null
  cached=$(fincore -b -n -o RES,SIZE "$D/src.img" | awk '{ printf "%.0f", $2 ? $1 * 100 / $2 : 0 }')
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [[ $cond == migrating ]]; then
    ctl migrate start v --to dst ${FG_RATE:+--rate "$FG_RATE"} >/dev/null || die "migrate start failed"
    sleep "$SETTLE"
    b0=$(mig_field copied_bytes)
    k0=$(copier_ticks)
    s0=$(now)
  fi
  c0=$(cpu_ticks "$SERVER_PID")
  t0=$(now)
  # shellcheck disable=SC2086
  timeout --kill-after=10 $((RUNTIME + RAMP + 60)) \
    fio --name="$wl" --ioengine=nbd --uri="nbd+unix:///v?socket=$D/nbd.sock" \
    ${WL_FIO[$wl]} --bs=4k --iodepth=16 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
    --norandommap --randrepeat=0 --output-format=json >"$out" 2>"$out.err" ||
    { cat "$out.err" "$out" >&2; die "fio failed ($wl, $cond)"; }
  t1=$(now)
  c1=$(cpu_ticks "$SERVER_PID")
  if [[ $cond == migrating ]]; then
    k1=$(copier_ticks)
    b1=$(mig_field copied_bytes)
    s1=$(now)
    state=$(mig_field state)
    if [[ $state == running ]]; then
      covered=1
      ctl migrate abort v >/dev/null || die "migrate abort failed"
    else
      covered=0
      log "WARNING: the migration ended ($state) before fio did; this run is not fully covered"
    fi
  fi
  python3 - "$out" "$dir" "$round" "$wl" "$cond" "$b0" "$b1" "$s0" "$s1" "$covered" "$c0" "$c1" "$t0" "$t1" "$CLK_TCK" "$k0" "$k1" "$cached" "$load" >>"$FG_TSV" <<'EOF'
import json, sys
out, d, rnd, wl, cond, b0, b1, s0, s1, covered, c0, c1, t0, t1, tck, k0, k1, cached, load = sys.argv[1:]
text = open(out).read()
doc = json.loads(text[text.index("{"):])  # the nbd engine prints a line first
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']} in {out}")
r, w = job["read"], job["write"]
p99 = r["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
rate = f"{(int(b1) - int(b0)) / (float(s1) - float(s0)):.0f}" if b0 else ""
copier = f"{(float(k1) - float(k0)) / float(tck) / (float(s1) - float(s0)) * 100:.0f}" if k0 and k1 else ""
cpu = (float(c1) - float(c0)) / float(tck) / (float(t1) - float(t0)) * 100
print(f"{d}\t{rnd}\t{wl}\t{cond}\t{r['iops'] + w['iops']:.0f}\t{r['iops']:.0f}\t{w['iops']:.0f}\t"
      f"{r['lat_ns']['mean'] / 1000:.1f}\t{p99:.0f}\t{rate}\t{covered}\t{cpu:.0f}\t{copier}\t{cached}\t{load}")
EOF
  tail -1 "$FG_TSV" | awk -F'\t' '{ printf "migrate.sh: fg %-9s round %s %-8s %-9s %7d IOPS  read lat %7.1f us p99 %6d us  copy %s B/s  server CPU %s%% copier %s%%  cached %s%%  load %s\n", $1, $2, $3, $4, $5, $8, $9, $10, $12, $13, $14, $15 }' >&2
}

if [[ " $PARTS " == *" fg "* ]]; then
  for dir in $DIRS; do
    D=$(mktemp -d "$dir/nbdvirt-migbench.XXXXXX")
    SCRATCH+=("$D")
    fill "$D/src.img" "$FG_SIZE_MB"
    write_config "$D" $((FG_SIZE_MB << 20))
    start_server "$D" "$WORK/fg-server-$(basename "$dir").log"
    CTL="$D/control.sock"
    # Warm-up, not recorded: server threads, page cache of the source.
    timeout 120 fio --name=warm --ioengine=nbd --uri="nbd+unix:///v?socket=$D/nbd.sock" --rw=randread --bs=4k \
      --iodepth=16 --time_based --runtime=3 --norandommap --output-format=terse >/dev/null 2>&1 || die "warm-up fio failed"
    k=0
    for ((round = 1; round <= ROUNDS; round++)); do
      for wl in $WORKLOADS; do
        # Alternate which condition goes first.
        if ((k % 2 == 0)); then order="baseline migrating"; else order="migrating baseline"; fi
        for cond in $order; do fg_run "$dir" "$round" "$wl" "$cond" "$D"; done
        k=$((k + 1))
      done
    done
    stop_server
    rm -rf "$D"
  done
fi

# ---- report ------------------------------------------------------------------
if [[ " $PARTS " == *" seek "* ]]; then
  echo "## 0. Cost of the copier's per-chunk allocation query (no nbdvirt involved)"
  echo
  echo "| storage | file | one SEEK_HOLE from offset 0 | SEEK_DATA+SEEK_HOLE per 1 MiB chunk, whole file |"
  echo "|---|---:|---:|---:|"
  tail -n +2 "$SEEK_TSV" | awk -F'\t' '{ printf "| %s | %s MiB | %s ms | %s s |\n", $1, $2, $3, $4 }'
  echo
fi
if [[ " $PARTS " == *" copy "* ]]; then
  echo "## 1. Copy throughput, idle volume ($SIZE_MB MiB of random data; median of $ROUNDS rounds)"
  echo
  python3 - "$COPY_TSV" "$DIRS" "$METHODS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = statistics.median
print("| storage | method | wall s | MB/s (wall) | MB/s per round (min–max) | server-side s | MB/s (server-side) | `throughput` field MB/s | CPU s | vs dd (wall) | vs dd (server-side) | loadavg |")
print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for d in sys.argv[2].split():
    rs = [r for r in rows if r["dir"] == d]
    if not rs:
        continue
    dd = med(float(r["wall_s"]) for r in rs if r["method"] == "dd")
    for m in sys.argv[3].split():
        mr = [r for r in rs if r["method"] == m]
        if not mr:
            continue
        b = int(mr[0]["bytes"])
        wall = med(float(r["wall_s"]) for r in mr)
        speeds = [b / float(r["wall_s"]) / 1e6 for r in mr]
        cpu = med(float(r["cpu_s"]) for r in mr)
        load = med(float(r["loadavg"]) for r in mr)
        if m == "nbdvirt":
            srv = med(float(r["server_s"]) for r in mr)
            tput = med(float(r["server_tput"]) for r in mr) / 1e6
            s_cols = f"{srv:.2f} | {b / srv / 1e6:.0f} | {tput:.0f}"
            ratio_srv = f"**{dd / srv:.2f}**"
        else:
            s_cols, ratio_srv = "– | – | –", "–"
        print(f"| {d} | {m} | {wall:.2f} | {b / wall / 1e6:.0f} | {min(speeds):.0f}–{max(speeds):.0f} | {s_cols} | {cpu:.2f} | {dd / wall:.2f} | {ratio_srv} | {load:.1f} |")
EOF
  echo
  echo "MB/s = 10^6 bytes/s. Ratio = dd time / method time (higher is better; target for nbdvirt ≥ 0.80)."
  echo "dd-nice = dd under \`nice -n 10 ionice -c2 -n7\`, the copier thread's priority."
  echo "CPU s: dd/cp user+sys of the command; nbdvirt: user+sys of the whole server process during the migration."
  echo "loadavg: 1-minute load average when the run started (the machine may be shared)."
  echo
fi
if [[ " $PARTS " == *" fg "* ]]; then
  echo "## 2. Foreground 4k QD16 IOPS during a migration at ${FG_RATE:-the default rate ($((DEFAULT_RATE >> 20)) MiB/s)}, $FG_SIZE_MB MiB volume (median of $ROUNDS rounds, ${RUNTIME}s each)"
  echo
  python3 - "$FG_TSV" "$DIRS" "$WORKLOADS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = statistics.median
names = {"randrw": "4k randrw 70/30 QD16", "randread": "4k randread QD16"}
print("| storage | workload | IOPS no migration | IOPS migrating | ratio | median of per-round ratios | per-round ratios | read lat µs (no mig / mig) | read p99 µs (no mig / mig) | copy rate during fio MiB/s | copier thread CPU % | server CPU % (no mig / mig) | runs covered | loadavg |")
print("|---|---|---:|---:|---:|---:|---|---|---|---:|---:|---|---:|---:|")
for d in sys.argv[2].split():
    for wl in sys.argv[3].split():
        b = [r for r in rows if r["dir"] == d and r["workload"] == wl and r["cond"] == "baseline"]
        m = [r for r in rows if r["dir"] == d and r["workload"] == wl and r["cond"] == "migrating"]
        if not b or not m:
            continue
        f = lambda rs, k: med(float(r[k]) for r in rs if r[k] != "")
        per = [float(mm["iops"]) / float(bb["iops"]) for bb, mm in zip(sorted(b, key=lambda r: r["round"]), sorted(m, key=lambda r: r["round"]))]
        cov = sum(int(r["covered"]) for r in m)
        copier = f"{f(m, 'copier_cpu_pct'):.0f}" if any(r["copier_cpu_pct"] for r in m) else "–"
        print(f"| {d} | {names[wl]} | {f(b, 'iops'):.0f} | {f(m, 'iops'):.0f} | **{f(m, 'iops') / f(b, 'iops'):.2f}** | {med(per):.2f} | "
              f"{', '.join(f'{p:.2f}' for p in per)} | {f(b, 'read_lat_us'):.0f} / {f(m, 'read_lat_us'):.0f} | "
              f"{f(b, 'read_p99_us'):.0f} / {f(m, 'read_p99_us'):.0f} | {f(m, 'copy_rate') / 2**20:.1f} | {copier} | "
              f"{f(b, 'srv_cpu_pct'):.0f} / {f(m, 'srv_cpu_pct'):.0f} | {cov}/{len(m)} | {f(b + m, 'loadavg'):.1f} |")
EOF
  echo
  echo "ratio = median IOPS migrating / median IOPS without (target ≥ 0.70). IOPS = read + write."
  echo "Per-round ratio = the two adjacent runs of one round (less sensitive to load drifting over the benchmark)."
  echo "Each 'migrating' run: \`migrate start v --to dst${FG_RATE:+ --rate $FG_RATE}\` (${FG_RATE:-default} rate), ${SETTLE}s, fio (${RAMP}s ramp + ${RUNTIME}s), then \`migrate abort v\`;"
  echo "before every run (both conditions): \`sync\` and the source file read into the page cache."
  echo "'copy rate' = copied_bytes delta over the fio run. CPU in % of one core; copier = the resync thread that copies for the migration (resync-DEST)."
  echo
fi
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"
