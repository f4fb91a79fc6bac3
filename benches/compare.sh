#!/usr/bin/env bash
# Compares nbdvirt with nbdkit (file plugin) and qemu-nbd serving the SAME
# file on tmpfs, over Unix sockets only, measured with fio's nbd engine.
#
#   benches/compare.sh                  # 3 rounds, 10 s per run
#   ROUNDS=5 RUNTIME=20 benches/compare.sh
#
# Environment:
#   ROUNDS=3        rounds; every round runs every row on every server
#   RUNTIME=10      seconds per fio run (plus RAMP seconds not measured)
#   RAMP=1          fio ramp_time, seconds
#   SIZE_MB=1024    size of the served file, MiB (filled from /dev/urandom)
#   SERVERS="nbdvirt nbdkit qemu-nbd"   subset/order of servers
#   ROWS="..."      subset of row ids (rr16 rw16 sr4 sw4 rr1; also sr4m:
#                   4M seq read QD4; rr1t: QD1 with 100 us of client think
#                   time between requests (a sparse client); rr16x4 rw16x4:
#                   fio numjobs=4, one connection per job; cpin1 cpin4 cpout1 cpout4: nbdcopy
#                   --requests=64 of the whole volume in from a tmpfs file
#                   or out to null:, with 1 or 4 connections; ceiling: dd
#                   of the served file to /dev/null, bs 1M and 4M, once a
#                   round, the bound the seq read rows are measured against)
#   RESULTS=FILE    also write the raw per-run results (TSV) to FILE
#   WAIT_LOAD=2.5   before each run wait (at most WAIT_LOAD_MAX=300 s) until
#                   the 1-minute load average is below this
#   NO_BUILD=1      skip `cargo build --release` (use the existing binary)
#   NBDVIRT_BIN=PATH  serve with this nbdvirt binary instead (implies NO_BUILD)
#   NBDVIRT_SERVER_TOML='io_threads = 2'  extra lines for nbdvirt's [server]
#   TLS=1           every server requires TLS (X.509, the same certificates
#                   made by tests/tls/make-pki.sh): nbdvirt tls = "require",
#                   nbdkit --tls=require, qemu-nbd --tls-creds. fio connects
#                   with nbds+unix; its libnbd refuses certificate paths in
#                   URIs, so it finds them at $HOME/.pki/libnbd, running as
#                   nobody when we are root (root's place is /etc/pki/libnbd)
#   NBDVIRT_BASE_BIN=PATH  the server "nbdvirt-base" (add it to SERVERS) is
#                   this other nbdvirt binary, e.g. a build of the commit
#                   before a change: before/after alternated in one run
#
# Servers run side by side for the whole benchmark (idle ones only sit in
# accept), each started once, so VmHWM read from /proc/PID/status at the end
# is the peak RSS over every run. Runs alternate between servers round-robin
# (the server order is rotated every run slot) and the median of the rounds
# is reported. Only Unix sockets in a private temporary directory are used.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
SIZE_MB=${SIZE_MB:-1024}
SERVERS=${SERVERS:-"nbdvirt nbdkit qemu-nbd"}
ROWS=${ROWS:-"rr16 rw16 sr4 sw4 rr1"}
RESULTS=${RESULTS:-}
if [[ -n ${NBDVIRT_BIN:-} ]]; then NO_BUILD=1; fi

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "compare.sh: $*" >&2; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer, got '$RUNTIME'"
[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer, got '$RAMP'"
[[ $SIZE_MB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive integer, got '$SIZE_MB'"

cd "$(dirname "$0")/.."
REPO=$(pwd)

# ---- tools -----------------------------------------------------------------
need() { # command debian-package
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2' (apt-get install $2)"
}
need fio fio
need python3 python3
need timeout coreutils
need dd coreutils
if [[ " $ROWS " =~ \ cp(in|out)[14]\  ]]; then need nbdcopy libnbd-bin; fi
if [[ -n ${TLS:-} ]]; then need openssl openssl; need psktool gnutls-bin; fi
for s in $SERVERS; do
  case $s in
    nbdvirt) [[ -n ${NO_BUILD:-} ]] || need cargo "cargo (or a rustup toolchain)" ;;
    nbdvirt-base) [[ -x ${NBDVIRT_BASE_BIN:-} ]] || die "server 'nbdvirt-base' needs NBDVIRT_BASE_BIN=PATH of an nbdvirt binary" ;;
    nbdkit) need nbdkit nbdkit ;;
    qemu-nbd) need qemu-nbd qemu-utils ;;
    *) die "unknown server '$s' in SERVERS (known: nbdvirt nbdvirt-base nbdkit qemu-nbd)" ;;
  esac
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine: install the Debian package 'fio' (built with libnbd), version >= 3.17"
if [[ " $SERVERS " == *" nbdkit "* ]]; then
  nbdkit file --version >/dev/null 2>&1 || die "nbdkit has no file plugin: install the Debian package 'nbdkit'"
fi

# ---- rows ------------------------------------------------------------------
# The x4 rows run fio numjobs=4: four jobs, each on its own NBD connection,
# reported together (group_reporting): multi-connection scaling.
declare -A ROW_NAME=(
  [rr16]="4k randread QD16" [rw16]="4k randwrite QD16"
  [sr4]="1M seq read QD4" [sw4]="1M seq write QD4" [rr1]="4k randread QD1"
  [rr16x4]="4k randread QD16 x4 conns" [rw16x4]="4k randwrite QD16 x4 conns"
  [sr4m]="4M seq read QD4" [rr1t]="4k randread QD1 100us think"
  [cpin1]="nbdcopy in, 1 conn" [cpin4]="nbdcopy in, 4 conns"
  [cpout1]="nbdcopy out, 1 conn" [cpout4]="nbdcopy out, 4 conns"
  [ceiling]="dd of the served file"
)
declare -A ROW_FIO=(
  [rr16]="--rw=randread --bs=4k --iodepth=16"
  [rw16]="--rw=randwrite --bs=4k --iodepth=16"
  [sr4]="--rw=read --bs=1M --iodepth=4"
  [sw4]="--rw=write --bs=1M --iodepth=4"
  [rr1]="--rw=randread --bs=4k --iodepth=1"
  [rr16x4]="--rw=randread --bs=4k --iodepth=16 --numjobs=4 --group_reporting"
  [rw16x4]="--rw=randwrite --bs=4k --iodepth=16 --numjobs=4 --group_reporting"
  [sr4m]="--rw=read --bs=4M --iodepth=4"
  [rr1t]="--rw=randread --bs=4k --iodepth=1 --thinktime=100"
)
# nbdcopy rows: arguments before SOURCE DESTINATION ("in": a tmpfs file
# into the volume; "out": the volume to null:, so only the server's side
# and nbdcopy's reads are measured). 64 requests of 256 KiB (nbdcopy's
# default size) in flight; with 4 connections nbdcopy needs the server to
# advertise multi-conn, or it silently uses one.
declare -A ROW_COPY=(
  [cpin1]="--connections=1 --requests=64" [cpin4]="--connections=4 --requests=64"
  [cpout1]="--connections=1 --requests=64" [cpout4]="--connections=4 --requests=64"
)
for r in $ROWS; do [[ -n ${ROW_NAME[$r]:-} ]] || die "unknown row '$r' in ROWS (known: ${!ROW_NAME[*]})"; done

# ---- scratch space and cleanup ---------------------------------------------
WORK=$(mktemp -d /tmp/nbdvirt-compare.XXXXXX)
IMG=$(mktemp /dev/shm/nbdvirt-compare.XXXXXX.img)
# nbdvirt locks its stores (flock): a second nbdvirt serves an identical copy.
IMG_BASE="$IMG.base"
# Source of the nbdcopy "in" rows, made only if one runs.
IMG_SRC="$IMG.src"
declare -A PID=()

stop_pid() { # pid
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local s
  trap - EXIT INT TERM
  for s in "${!PID[@]}"; do stop_pid "${PID[$s]}"; done
  rm -f "$IMG" "$IMG_BASE" "$IMG_SRC"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

avail_kb=$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')
copies=1; [[ " $SERVERS " == *" nbdvirt-base "* ]] && copies=2
[[ " $ROWS " =~ \ cpin[14]\  ]] && copies=$((copies + 1))
((avail_kb > copies * SIZE_MB * 1024 + 65536)) || die "/dev/shm has ${avail_kb} KiB free; need $((copies * SIZE_MB * 1024 + 65536)) KiB"

# ---- build -----------------------------------------------------------------
NBDVIRT=${NBDVIRT_BIN:-"$REPO/target/release/nbdvirt"}
if [[ " $SERVERS " == *" nbdvirt "* ]]; then
  if [[ -z ${NO_BUILD:-} ]]; then
    log "cargo build --release"
    timeout 1800 cargo build --release --quiet || die "cargo build --release failed"
  fi
  [[ -x $NBDVIRT ]] || die "$NBDVIRT missing (run cargo build --release)"
fi

# ---- versions and machine --------------------------------------------------
echo "## Environment"
echo
echo '```'
echo "date:      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "kernel:    $(uname -srm)"
echo "cpu:       $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
echo "memory:    $(free -m | awk '/^Mem:/ { print $2 " MiB" }')"
echo "loadavg:   $(cut -d' ' -f1-3 /proc/loadavg) (before the run)"
echo "fio:       $(fio --version)"
[[ " $SERVERS " == *" nbdkit "* ]] && echo "nbdkit:    $(nbdkit --version | head -1)"
[[ " $SERVERS " == *" qemu-nbd "* ]] && echo "qemu-nbd:  $(qemu-nbd --version | head -1)"
if [[ " $SERVERS " == *" nbdvirt "* ]]; then
  echo "nbdvirt:   $NBDVIRT: $("$NBDVIRT" --version) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty src'))"
  command -v rustc >/dev/null && echo "rustc:     $(rustc --version)"
  [[ " $SERVERS " == *" nbdvirt-base "* ]] && echo "nbdvirt-base: $NBDVIRT_BASE_BIN: $("$NBDVIRT_BASE_BIN" --version)"
  [[ -n ${NBDVIRT_SERVER_TOML:-} ]] && echo "nbdvirt [server] extra: ${NBDVIRT_SERVER_TOML//$'\n'/; }"
fi
[[ -n ${TLS:-} ]] && echo "tls:       every server requires TLS (X.509, tests/tls/make-pki.sh certificates)"
echo "rounds:    $ROUNDS x ${RUNTIME}s (+${RAMP}s ramp) per server per row"
echo '```'
echo

# ---- data ------------------------------------------------------------------
log "filling $IMG with ${SIZE_MB} MiB from /dev/urandom"
timeout 600 dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MB" status=none conv=fsync || die "cannot fill $IMG"
if [[ " $SERVERS " == *" nbdvirt-base "* ]]; then cp "$IMG" "$IMG_BASE" || die "cannot copy $IMG"; fi
if [[ " $ROWS " =~ \ cpin[14]\  ]]; then cp "$IMG" "$IMG_SRC" || die "cannot copy $IMG"; fi

# ---- TLS -------------------------------------------------------------------
NBDVIRT_TLS_TOML=""; NBDKIT_TLS=(); QEMU_TLS=(); FIO_AS=(); SCHEME="nbd+unix"
if [[ -n ${TLS:-} ]]; then
  bash "$REPO/tests/tls/make-pki.sh" "$WORK/pki" || die "cannot make test certificates"
  NBDVIRT_TLS_TOML=$'tls = "require"\ntls_certificates = "'"$WORK/pki/server"'"'
  NBDKIT_TLS=(--tls=require --tls-certificates="$WORK/pki/server")
  QEMU_TLS=(--object "tls-creds-x509,id=tls0,dir=$WORK/pki/server,endpoint=server" --tls-creds tls0)
  mkdir -p "$WORK/fiohome/.pki"
  cp -r "$WORK/pki/alice" "$WORK/fiohome/.pki/libnbd"
  FIO_AS=(env HOME="$WORK/fiohome")
  if [[ $(id -u) -eq 0 ]]; then
    need setpriv util-linux
    chmod -R a+rX "$WORK"
    FIO_AS=(setpriv --reuid=65534 --regid=65534 --clear-groups "${FIO_AS[@]}")
  fi
  SCHEME="nbds+unix"
fi

# ---- servers ---------------------------------------------------------------
wait_socket() { # server socket pid
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -S $2 ]] && return 0
    kill -0 "$3" 2>/dev/null || { cat "$WORK/$1.log" >&2; die "$1 exited during startup (log above)"; }
    sleep 0.1
  done
  cat "$WORK/$1.log" >&2
  die "$1 did not create $2 within 10 s"
}

start_server() { # name
  local s=$1 sock="$WORK/$1.sock"
  case $s in
    nbdvirt | nbdvirt-base)
      local bin=$NBDVIRT img=$IMG
      if [[ $s == nbdvirt-base ]]; then bin=$NBDVIRT_BASE_BIN img=$IMG_BASE; fi
      mkdir -p "$WORK/$s-state"
      cat >"$WORK/$s.toml" <<EOF
[server]
listen = ["unix:$sock"]
control = "$WORK/$s-control.sock"
state_dir = "$WORK/$s-state"
${NBDVIRT_SERVER_TOML:-}
$NBDVIRT_TLS_TOML

[[backend]]
name = "bench"
path = "$img"

[[volume]]
name = "bench"

[[volume.extent]]
start = 0
length = $((SIZE_MB * 1024 * 1024))
backend = "bench"
backend_offset = 0
EOF
      RUST_LOG=nbdvirt=warn "$bin" serve --config "$WORK/$s.toml" >"$WORK/$s.log" 2>&1 &
      ;;
    nbdkit)
      # Defaults: thread model parallel, 16 threads per connection
      # (nbdkit(1) --threads), file plugin cache=default fadvise=normal.
      nbdkit --foreground --exit-with-parent "${NBDKIT_TLS[@]}" --unix "$sock" file "$IMG" >"$WORK/$s.log" 2>&1 &
      ;;
    qemu-nbd)
      # --persistent: stay up between fio runs; --shared=4: the x4 rows
      # connect four times at once.
      qemu-nbd -f raw --cache=writeback --aio=threads --persistent --shared=4 "${QEMU_TLS[@]}" -k "$sock" "$IMG" >"$WORK/$s.log" 2>&1 &
      ;;
  esac
  PID[$s]=$!
  wait_socket "$s" "$sock" "${PID[$s]}"
  [[ -z ${TLS:-} ]] || chmod a+rw "$sock" # fio runs as nobody
}

cpu_ticks() { # pid -> utime+stime in clock ticks
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

for s in $SERVERS; do start_server "$s"; done
log "servers up: $(for s in $SERVERS; do printf '%s=%s ' "$s" "${PID[$s]}"; done)"
CLK_TCK=$(getconf CLK_TCK)

# ---- runs ------------------------------------------------------------------
RAW="$WORK/results.tsv"
printf 'round\trow\tserver\tiops\tbw_bytes\tlat_mean_us\tsrv_cpu_pct\tsrv_cpu_us_per_io\tloadavg\tcli_cpu_pct\n' >"$RAW"

wait_quiet() { # optional: wait (bounded) for the 1-minute load average to drop
  [[ -n ${WAIT_LOAD:-} ]] || return 0
  local i
  for ((i = 0; i < ${WAIT_LOAD_MAX:-300}; i += 5)); do
    awk -v max="$WAIT_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return 0
    sleep 5
  done
  log "loadavg still $(cut -d' ' -f1 /proc/loadavg) >= $WAIT_LOAD after ${WAIT_LOAD_MAX:-300}s; running anyway"
}

# The nbdcopy rows and the dd ceiling: run_copy, run_ceiling.
# shellcheck source=benches/compare_rows.sh
source "$REPO/benches/compare_rows.sh"

run_one() { # round row server
  if [[ -n ${ROW_COPY[$2]:-} ]]; then run_copy "$@"; return; fi
  local round=$1 row=$2 s=$3 sock="$WORK/$3.sock" out="$WORK/fio-$1-$2-$3.json" load sampler
  kill -0 "${PID[$s]}" 2>/dev/null || { cat "$WORK/$s.log" >&2; die "$s (pid ${PID[$s]}) died (log above)"; }
  wait_quiet
  load=$(cut -d' ' -f1 /proc/loadavg)
  # Server CPU (user+sys, all threads) over fio's measured window: after the
  # ramp, for RUNTIME seconds.
  (
    sleep "$RAMP"
    cpu_ticks "${PID[$s]}" >"$out.c0"
    sleep "$RUNTIME"
    cpu_ticks "${PID[$s]}" >"$out.c1"
  ) &
  sampler=$!
  # shellcheck disable=SC2086
  if ! timeout --kill-after=10 $((RUNTIME + RAMP + 60)) \
    "${FIO_AS[@]}" fio --name="$row" --ioengine=nbd --uri="$SCHEME:///?socket=$sock" \
      ${ROW_FIO[$row]} --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
      --norandommap --randrepeat=0 --output-format=json >"$out" 2>"$out.err"; then
    kill "$sampler" 2>/dev/null || true
    cat "$out.err" "$out" >&2
    die "fio failed on $s, row '${ROW_NAME[$row]}' (output above)"
  fi
  wait "$sampler" || die "CPU sampling of $s failed"
  python3 - "$out" "$round" "$row" "$s" "$(cat "$out.c0")" "$(cat "$out.c1")" "$CLK_TCK" "$RUNTIME" "$load" >>"$RAW" <<'EOF'
import json, sys
path, rnd, row, srv, c0, c1, tck, runtime, load = sys.argv[1:]
text = open(path).read()
# The nbd engine prints "fio: connected to NBD server" before the JSON.
doc = json.loads(text[text.index("{"):])
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']} in {path}")
d = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
if d["io_bytes"] == 0:
    sys.exit(f"fio did no I/O on {srv} ({path})")
cpu_s = (float(c1) - float(c0)) / float(tck)
cpu_pct = cpu_s / float(runtime) * 100
us_per_io = cpu_s * 1e6 / (d["iops"] * float(runtime))
# fio's own CPU (user+sys, % of one core): near 100 per job, the row
# measures the client. A group_reporting job's figure is the mean of its
# jobs (its runtime is theirs summed), so times the jobs: their total.
cli_pct = (job["usr_cpu"] + job["sys_cpu"]) * int(job["job options"].get("numjobs", 1))
print(f"{rnd}\t{row}\t{srv}\t{d['iops']:.0f}\t{d['bw_bytes']}\t{d['lat_ns']['mean'] / 1000:.1f}\t{cpu_pct:.0f}\t{us_per_io:.2f}\t{load}\t{cli_pct:.0f}")
EOF
  tail -1 "$RAW" | awk -F'\t' '{ printf "compare.sh: round %s %-5s %-9s %9d IOPS %8.1f MB/s  lat %8.1f us  server CPU %4d%% %7.2f us/IO  fio CPU %4d%%  load %s\n", $1, $2, $3, $4, $5 / 1e6, $6, $7, $8, $10, $9 }' >&2
}

read -r -a SERVER_LIST <<<"$SERVERS"
NS=${#SERVER_LIST[@]}
slot=0
for ((round = 1; round <= ROUNDS; round++)); do
  for row in $ROWS; do
    if [[ $row == ceiling ]]; then run_ceiling "$round"; continue; fi
    # Rotate the server order every slot so no server always goes first.
    for ((k = 0; k < NS; k++)); do
      run_one "$round" "$row" "${SERVER_LIST[$(((slot + k) % NS))]}"
    done
    slot=$((slot + 1))
  done
done

# Peak RSS over the whole benchmark, read while the processes still run.
declare -A HWM=()
for s in $SERVERS; do
  HWM[$s]=$(awk '/^VmHWM:/ { print $2 }' "/proc/${PID[$s]}/status")
done
[[ -n $RESULTS ]] && cp "$RAW" "$RESULTS"

# ---- report ----------------------------------------------------------------
echo "## Results (median of $ROUNDS rounds, ${RUNTIME}s each)"
echo
for r in "${!ROW_NAME[@]}"; do printf '%s\t%s\n' "$r" "${ROW_NAME[$r]}"; done >"$WORK/names.tsv"
python3 "$REPO/benches/compare_report.py" "$RAW" "${ROWS//ceiling/}" "$SERVERS" "$WORK/names.tsv" "$CEILING"
echo
echo "## Peak RSS (VmHWM at the end of the benchmark)"
echo
echo "| server | VmHWM |"
echo "|---|---:|"
for s in $SERVERS; do
  printf '| %s | %d KiB (%.1f MiB) |\n' "$s" "${HWM[$s]}" "$(echo "${HWM[$s]}" | awk '{ print $1 / 1024 }')"
done
echo
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"
