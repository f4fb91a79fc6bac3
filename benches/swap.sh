#!/usr/bin/env bash
# Pause–drain–swap benchmarks for nbdvirt (results: docs/PERFORMANCE.md).
#
#   benches/swap.sh                      # everything, ~15 min on 2 cores
#   PARTS="hold" benches/swap.sh         # only part 1 (also: throughput, gate)
#
# 1. hold:       hold (pause→resume) and drain time, p50/p99/max, over SWAPS
#                swaps (`nbdvirt reload --json`) under fio 4k randrw QD32;
#                once with server.state_dir on /dev/shm, once on the regular
#                disk (DISK_DIR) since the commit fsyncs.
# 2. throughput: fio 4k randrw QD32 for RUNTIME s with no swaps, with RATE
#                CLI reloads/s, and with RATE SIGHUPs/s (same reload inside
#                the server, no client process); alternated ROUNDS times.
#                Plus the CPU cost of each reload loop alone (no fio).
# 2b. windows:   the same comparison inside one long fio run (WIN_RUNTIME s):
#                the loop swaps at RATE/s during odd WIN_MS windows and rests
#                during even ones; fio's IOPS log (500 ms) is cut into the
#                windows and each "on" window is compared with its two "off"
#                neighbours. Neighbouring windows share the box's background
#                load, so this resolves a few % even on a busy shared box.
# 3. gate:       this tree built with the gate compiled out (feature
#                bench-gate-off) vs the normal build, 4k randread and
#                randwrite QD16, alternated GATE_ROUNDS times. The gate alone
#                is measured by `cargo bench --bench gate`.
#
# Each swap rewrites the config: backends "a" and "b" are the same tmpfs
# file (both `shared = true`); the volume has 16 extents of 64 MiB mapped
# 1:1 and every swap flips the backend name of every other extent (even
# ones, then odd ones), so each swap holds 8 ranges = half the volume while
# translating to the very same bytes.
#
# The box is shared: before each measured run the script waits for the rest
# of the box to be quiet (QUIET_PCT, QUIET_WAIT), measures how much CPU
# other processes used during the run ("others", from /proc/stat minus the
# server, fio and reload loop), and redoes runs where others used more than
# OTHERS_MAX_PCT of the box (MAX_TRIES). Every table shows "others".
#
# Results (raw data + summary.md) go to OUT. Only Unix sockets are used.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARTS=${PARTS:-"hold throughput windows gate"}
SWAPS=${SWAPS:-300}                 # part 1: swaps per state_dir location
SWAP_INTERVAL_MS=${SWAP_INTERVAL_MS:-50}
DISK_DIR=${DISK_DIR:-/var/tmp}      # part 1: state_dir on the regular disk
ROUNDS=${ROUNDS:-3}                 # part 2
RUNTIME=${RUNTIME:-20}              # part 2: seconds per fio run (plus RAMP)
RATE=${RATE:-10}                    # part 2: swaps per second
CPU_SECONDS=${CPU_SECONDS:-20}      # part 2: reload loop alone
WIN_RUNTIME=${WIN_RUNTIME:-160}     # part 2b: seconds per fio run
WIN_MS=${WIN_MS:-2000}              # part 2b: on/off window length
GATE_ROUNDS=${GATE_ROUNDS:-5}       # part 3
GATE_RUNTIME=${GATE_RUNTIME:-15}    # part 3: seconds per fio run (plus RAMP)
RAMP=${RAMP:-2}
QUIET_PCT=${QUIET_PCT:-15}          # before a run, wait until other load < this % of the box...
QUIET_WAIT=${QUIET_WAIT:-300}       # ...for at most this many seconds per run
QUIET_BUDGET=${QUIET_BUDGET:-2400}  # ...and this many seconds in all
OTHERS_MAX_PCT=${OTHERS_MAX_PCT:-10} # redo a run if others used more than this % of the box during it...
MAX_TRIES=${MAX_TRIES:-3}           # ...at most this many times in all (the last try is kept)
OLD_TARGET=${OLD_TARGET:-/tmp/nbdvirt-gate-off-target}  # part 3: gate-off build
OUT=${OUT:-$REPO/target/bench-swap}

NCPU=$(nproc)
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
WORK=$(mktemp -d /dev/shm/nbdvirt-swap.XXXXXX)
DISK_STATE=""
SERVER_PID=""
BG_PIDS=()

log() { printf '[swap.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local p
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -n $SERVER_PID ]] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
    [[ -n $DISK_STATE ]] && rm -rf "$DISK_STATE"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in fio jq cargo; do command -v $tool >/dev/null || die "needs $tool"; done

# ---------------------------------------------------------------- helpers

# "busy idle steal" jiffies of the whole box.
box_cpu() {
    local _c u n s i w q sq st _r
    read -r _c u n s i w q sq st _r </proc/stat
    echo "$((u + n + s + q + sq)) $((i + w)) $st"
}

# utime+stime jiffies of a process (0 if gone).
proc_cpu() {
    local f
    f=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    f=${f##*) }            # drop "pid (comm) "
    set -- $f              # now $12 = utime, $13 = stime
    echo $(( ${12} + ${13} ))
}

# Waits until the box is quiet: CPU used by anything (we are idle here)
# below QUIET_PCT % of the box over a 2 s sample; at most QUIET_WAIT s per
# call and QUIET_BUDGET s over the whole script. Sets QUIET to the last
# sample's busy % of the box.
QUIET_SPENT=0
wait_quiet() {
    local t0=$SECONDS b0 b1 pct
    while :; do
        read -r b0 _ _ < <(box_cpu)
        sleep 2
        read -r b1 _ _ < <(box_cpu)
        pct=$((100 * (b1 - b0) / (2 * HZ * NCPU)))
        ((pct < QUIET_PCT)) && break
        if ((SECONDS - t0 >= QUIET_WAIT || QUIET_SPENT + SECONDS - t0 >= QUIET_BUDGET)); then
            log "box still busy (${pct}% of ${NCPU} CPUs used by others); measuring anyway (waited $((SECONDS - t0))s, $((QUIET_SPENT + SECONDS - t0))s of QUIET_BUDGET=${QUIET_BUDGET}s in all)"
            break
        fi
    done
    QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0))
    QUIET=$pct
}

# Whether another try of a contaminated run is worth it.
retry_ok() { # try others
    ((${2} > OTHERS_MAX_PCT && ${1} < MAX_TRIES && QUIET_SPENT < QUIET_BUDGET))
}

us_now() { echo "${EPOCHREALTIME/./}"; }

# CPU seconds of this shell and its waited-for children (fio, CLI runs).
# `times` runs in this process; the parsing happens after the snapshot.
# Sets SHELL_CPU; call it directly, never in $(...) (a subshell's `times`
# would count its own, empty, children).
shell_cpu() {
    times >"$WORK/times.now"
    SHELL_CPU=$(sed 's/\([0-9]*\)m\([0-9.]*\)s/\1 \2/g' "$WORK/times.now" | awk '{t += $1*60 + $2 + $3*60 + $4} END {print t}')
}

# Percent of the box (NCPU x wall) used by others: box busy - ours.
others_pct() { # box_busy_s ours_s wall_s
    awk -v b="$1" -v o="$2" -v w="$3" -v n="$NCPU" 'BEGIN {x = 100 * (b - o) / (n * w); if (x < 0) x = 0; printf "%.0f", x}'
}

# A sleep without a child process (the reload loops must not spawn any).
SLEEP_FIFO=$WORK/sleep.fifo
mkfifo "$SLEEP_FIFO"
exec {SLEEP_FD}<>"$SLEEP_FIFO"
usleep() {
    local d=$1 ds
    ((d > 0)) || return 0
    printf -v ds '%d.%06d' $((d / 1000000)) $((d % 1000000))
    read -r -t "$ds" -u "$SLEEP_FD" _ || true
}

# Nearest-rank p50/p99/max/mean of a JSON array of numbers, as a TSV line.
stats_jq='def pct(q): sort | .[((length * q) | ceil) - 1];
          if length == 0 then "-\t-\t-\t-\t0" else
          [pct(0.5), pct(0.99), max, ((add / length) | floor), length] | @tsv end'

# ------------------------------------------------------------ config, server

IMG=$WORK/vol.img
SOCK=$WORK/nbd.sock
CTL=$WORK/control.sock
CFG=$WORK/nbdvirt.toml
URI="nbd+unix:///vol?socket=$SOCK"
NEXT=16

# Config text for swap state k (0..3): extent i is on "b" iff its bit is set
# in the state; states 0→1→2→3→0 flip the even, odd, even, odd extents.
config_text() { # state state_dir two_backends
    local k=$1 state_dir=$2 two=${3:-1} i name mask
    case $k in 0) mask=0 ;; 1) mask=1 ;; 2) mask=3 ;; 3) mask=2 ;; esac
    printf '[server]\nlisten = ["unix:%s"]\ncontrol = "%s"\nstate_dir = "%s"\n\n' "$SOCK" "$CTL" "$state_dir"
    printf '[[backend]]\nname = "a"\npath = "%s"\nsize = "1GiB"\nshared = true\n\n' "$IMG"
    ((two)) && printf '[[backend]]\nname = "b"\npath = "%s"\nsize = "1GiB"\nshared = true\n\n' "$IMG"
    printf '[[volume]]\nname = "vol"\n'
    for ((i = 0; i < NEXT; i++)); do
        name=a
        (((mask >> (i % 2)) & 1)) && name=b
        printf '\n[[volume.extent]]\nstart = "%dMiB"\nlength = "64MiB"\nbackend = "%s"\nbackend_offset = "%dMiB"\n' $((i * 64)) "$name" $((i * 64))
    done
}

declare -a CFG_TEXT
set_configs() { # state_dir
    local k
    for k in 0 1 2 3; do CFG_TEXT[k]=$(config_text "$k" "$1"); done
}
STATE_IDX=0

start_server() { # binary config log
    local bin=$1 cfg=$2 logf=$3 i
    rm -f "$SOCK" "$CTL"
    RUST_LOG=nbdvirt=info "$bin" serve --config "$cfg" >"$logf.out" 2>"$logf" &
    SERVER_PID=$!
    for ((i = 0; i < 200; i++)); do
        grep -q ready "$logf.out" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$logf" >&2; die "server exited"; }
        usleep 50000
    done
    die "server did not become ready"
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# Runs fio; prints "iops read_iops write_iops fio_cpu_s server_cpu_s box_busy_s box_steal_s wall_s".
run_fio() { # name rw iodepth runtime
    local name=$1 rw=$2 qd=$3 rt=$4 out=$OUT/raw/$1
    local s0 s1 b0 b1 st0 st1 t0 t1 fcpu
    s0=$(proc_cpu "$SERVER_PID"); read -r b0 _ st0 < <(box_cpu); t0=$(us_now)
    /usr/bin/time -f '%U %S' -o "$out.time" \
        fio --name="$name" --ioengine=nbd --uri="$URI" --rw="$rw" --bs=4k --iodepth="$qd" \
        --size=1G --time_based --runtime="$rt" --ramp_time="$RAMP" --output-format=json \
        >"$out.fio" 2>"$out.fio.err" || die "fio failed: $(cat "$out.fio.err")"
    t1=$(us_now); read -r b1 _ st1 < <(box_cpu); s1=$(proc_cpu "$SERVER_PID")
    fcpu=$(awk '{print $1 + $2}' "$out.time")
    sed -n '/^{/,$p' "$out.fio" | jq -r --arg f "$fcpu" --arg s "$(((s1 - s0)))" --arg b "$((b1 - b0))" \
        --arg st "$((st1 - st0))" --arg w "$((t1 - t0))" --argjson hz "$HZ" \
        '.jobs[0] | [(.read.iops + .write.iops | floor), (.read.iops | floor), (.write.iops | floor),
          ($f | tonumber), (($s | tonumber) / $hz), (($b | tonumber) / $hz), (($st | tonumber) / $hz),
          (($w | tonumber) / 1e6)] | @tsv'
}

# ------------------------------------------------------------ reload loops

# Applies the next swap state, via the CLI or SIGHUP. Sets RC.
swap_once() { # mode jsonlog   (mode none: do nothing, a placebo)
    RC=0
    [[ $1 == none ]] && return 0
    STATE_IDX=$(((STATE_IDX + 1) % 4))
    printf '%s\n' "${CFG_TEXT[STATE_IDX]}" >"$CFG"
    if [[ $1 == cli ]]; then
        RC=0
        "$BIN" reload --config "$CFG" --json >>"$2" 2>>"$2.err" || RC=$?
    else
        kill -HUP "$SERVER_PID"
        RC=0
    fi
}

# Runs swaps at RATE/s until $WORK/stop exists; writes "swaps failures
# self_cpu_s children_cpu_s" (the loop's own CPU, incl. every CLI process).
swap_loop() { # mode rate result jsonlog
    local mode=$1 period=$((1000000 / $2)) result=$3 jl=$4 k=0 fails=0 t0
    t0=${EPOCHREALTIME/./}
    while [[ ! -e $WORK/stop ]]; do
        k=$((k + 1))
        swap_once "$mode" "$jl"
        ((RC == 0)) || fails=$((fails + 1))
        usleep $((t0 + k * period - ${EPOCHREALTIME/./}))
    done
    echo "$STATE_IDX" >"$result.state"
    # `times` must run in this process (a pipe would fork a child whose
    # rusage starts at zero): "XmY.Zs XmY.Zs" for self, then children.
    times >"$result.times"
    local su ss cu cs
    read -r su ss cu cs <<<"$(sed 's/\([0-9]*\)m\([0-9.]*\)s/\1 \2/g' "$result.times" | awk '{printf "%s %s ", $1*60+$2, $3*60+$4}')"
    echo "$k $fails $su $ss $cu $cs" >"$result"
}

# Swaps at RATE/s during the odd WIN_MS windows counted from t0 (us), none
# during the even ones, until $WORK/stop exists; writes "swaps failures".
window_loop() { # mode t0 result jsonlog
    local mode=$1 t0=$2 result=$3 jl=$4 period=$((1000000 / RATE)) j=0 k=0 fails=0
    while [[ ! -e $WORK/stop ]]; do
        usleep $((t0 + j * period - ${EPOCHREALTIME/./}))
        [[ -e $WORK/stop ]] && break
        if (((j * period / (WIN_MS * 1000)) % 2 == 1)); then
            k=$((k + 1))
            swap_once "$mode" "$jl"
            ((RC == 0)) || fails=$((fails + 1))
        fi
        j=$((j + 1))
    done
    echo "$STATE_IDX" >"$result.state"
    echo "$k $fails" >"$result"
}

start_loop() { # mode result jsonlog
    rm -f "$WORK/stop"
    swap_loop "$1" "$RATE" "$2" "$3" &
    LOOP_PID=$!
    BG_PIDS+=("$LOOP_PID")
}

stop_loop() { # result
    touch "$WORK/stop"
    wait "$LOOP_PID" || true
    STATE_IDX=$(cat "$1.state")
}

# Hold/drain values (us) logged by the server after line $2 of log $1.
server_holds() { # log from_line -> JSON {hold:[..], drain:[..]}
    tail -n +"$(($2 + 1))" "$1" | { grep 'swapped mapping table' || true; } |
        sed -n 's/.*attempts=\([0-9]*\).*hold_us=\([0-9]*\) drain_us=\([0-9]*\).*/\1 \2 \3/p' |
        jq -Rs '[split("\n")[] | select(length > 0) | split(" ") | map(tonumber)] |
                {attempts: map(.[0]), hold: map(.[1]), drain: map(.[2])}'
}

# ------------------------------------------------------------ build

log "building (cargo build --release)"
(cd "$REPO" && cargo build --release --quiet) || die "build failed"
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/nbdvirt
[[ -x $BIN ]] || die "no binary at $BIN"
mkdir -p "$OUT/raw"
rm -f "$OUT"/raw/* "$OUT/summary.md"

# 1 GiB volume file on tmpfs, every page allocated (no first-touch costs).
dd if=/dev/zero of="$IMG" bs=1M count=1024 status=none

SUMMARY=$OUT/summary.md
{
    echo "# benches/swap.sh results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml || echo ' (+ uncommitted src changes)')"
    echo "- machine: $NCPU x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
    echo "- $(fio --version), $(rustc --version 2>/dev/null || echo rustc ?)"
    echo "- volume: 1 GiB file on $(stat -f -c %T "$WORK") ($WORK), 16 extents x 64 MiB; swaps flip 8 of them (half the volume)"
    echo
} >"$SUMMARY"

# ------------------------------------------------------------ part 1: hold

part_hold() { # label state_dir
    local label=$1 sd=$2 jl=$OUT/raw/hold-$1.reloads.json k t0 t1 fails fio_pid slog try quiet others
    local s0 s1 b0 b1 c0 c1 w0 w1 period=$((SWAP_INTERVAL_MS * 1000)) start
    for ((try = 1; try <= MAX_TRIES; try++)); do
        log "part 1 ($label, try $try): $SWAPS swaps under fio randrw QD32, state_dir $sd"
        rm -rf "$sd"
        mkdir -p "$sd"
        set_configs "$sd"
        STATE_IDX=0
        printf '%s\n' "${CFG_TEXT[0]}" >"$CFG"
        slog=$OUT/raw/hold-$label.server.log
        start_server "$BIN" "$CFG" "$slog"
        wait_quiet; quiet=$QUIET
        s0=$(proc_cpu "$SERVER_PID"); read -r b0 _ _ < <(box_cpu); w0=$(us_now); shell_cpu; c0=$SHELL_CPU
        fio --name=hold --ioengine=nbd --uri="$URI" --rw=randrw --bs=4k --iodepth=32 --size=1G \
            --time_based --runtime=3600 --output-format=json >"$OUT/raw/hold-$label.fio" 2>&1 &
        fio_pid=$!
        BG_PIDS+=("$fio_pid")
        usleep 2000000
        : >"$jl"
        : >"$OUT/raw/hold-$label.wall"
        fails=0
        start=$(us_now)
        for ((k = 1; k <= SWAPS; k++)); do
            t0=$(us_now)
            swap_once cli "$jl"
            t1=$(us_now)
            ((RC == 0)) || fails=$((fails + 1))
            echo $((t1 - t0)) >>"$OUT/raw/hold-$label.wall"
            usleep $((start + k * period - $(us_now)))
        done
        kill -INT "$fio_pid"
        wait "$fio_pid" || true
        shell_cpu; c1=$SHELL_CPU; w1=$(us_now); read -r b1 _ _ < <(box_cpu); s1=$(proc_cpu "$SERVER_PID")
        stop_server
        others=$(others_pct "$(awk -v a="$b0" -v b="$b1" -v hz="$HZ" 'BEGIN {print (b - a) / hz}')" \
            "$(awk -v s=$((s1 - s0)) -v hz="$HZ" -v c0="$c0" -v c1="$c1" 'BEGIN {print s / hz + c1 - c0}')" \
            "$(awk -v a="$w0" -v b="$w1" 'BEGIN {print (b - a) / 1e6}')")
        retry_ok "$try" "$others" || break
        log "  others used ${others}% of the box during the run; redoing"
    done
    local iops n h d w a fs
    iops=$(sed -n '/^{/,$p' "$OUT/raw/hold-$label.fio" | jq -r '.jobs[0] | (.read.iops + .write.iops) | floor')
    n=$(jq -s '[.[].swapped[]] | length' "$jl")
    h=$(jq -rs "[.[].swapped[].hold] | $stats_jq" "$jl")
    d=$(jq -rs "[.[].swapped[].drain] | $stats_jq" "$jl")
    w=$(jq -rs "map(. / 1000 | floor) | $stats_jq" "$OUT/raw/hold-$label.wall")
    a=$(jq -rs '[.[].swapped[].attempts] | "\(max) max, \(map(select(. > 1)) | length) retried"' "$jl")
    fs=$(stat -f -c %T "$sd")
    echo "| $label ($fs) | $n/$SWAPS | $fails | $(cut -f1-4 <<<"$h" | sed 's/\t/ | /g') | $(cut -f1-4 <<<"$d" | sed 's/\t/ | /g') | $(cut -f1-3 <<<"$w" | sed 's/\t/ | /g') | $a | $iops | $quiet% | $others% |" >>"$OUT/raw/hold.rows"
}

if [[ " $PARTS " == *" hold "* ]]; then
    : >"$OUT/raw/hold.rows"
    part_hold shm "$WORK/state-hold"
    DISK_STATE=$(mktemp -d "$DISK_DIR/nbdvirt-swap-state.XXXXXX")
    part_hold disk "$DISK_STATE/state"
    rm -rf "$DISK_STATE"; DISK_STATE=""
    {
        echo "## 1. Hold and drain under fio 4k randrw QD32 ($SWAPS swaps, one every ${SWAP_INTERVAL_MS} ms, \`nbdvirt reload --json\`)"
        echo
        echo "Times in microseconds (hold, drain) and milliseconds (CLI wall = whole \`nbdvirt reload\` process). Disk state_dir: $(findmnt -no SOURCE,FSTYPE -T "$DISK_DIR" | tr -s ' ') under $DISK_DIR."
        echo
        echo "| state_dir | swaps | CLI failures | hold p50 | hold p99 | hold max | hold mean | drain p50 | drain p99 | drain max | drain mean | CLI wall p50 ms | p99 ms | max ms | attempts | fio IOPS during | others before | others during |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        cat "$OUT/raw/hold.rows"
        echo
    } >>"$SUMMARY"
fi

# ------------------------------------------------------------ part 2: throughput

if [[ " $PARTS " == *" throughput "* ]]; then
    log "part 2: throughput with $RATE swaps/s vs none, $ROUNDS rounds of ${RUNTIME}s"
    sd=$WORK/state-tp
    mkdir -p "$sd"
    set_configs "$sd"
    STATE_IDX=0
    printf '%s\n' "${CFG_TEXT[0]}" >"$CFG"
    slog=$OUT/raw/tp.server.log
    start_server "$BIN" "$CFG" "$slog"
    : >"$OUT/raw/tp.tsv"
    variants=(none cli sighup)
    for ((r = 0; r < ROUNDS; r++)); do
        for ((j = 0; j < 3; j++)); do
            v=${variants[(r + j) % 3]}
            for ((try = 1; try <= MAX_TRIES; try++)); do
                wait_quiet; quiet=$QUIET
                l0=$(wc -l <"$slog")
                jl=$OUT/raw/tp-$r-$v.reloads.json
                : >"$jl"
                [[ $v != none ]] && start_loop "$v" "$OUT/raw/tp-$r-$v.loop" "$jl"
                line=$(run_fio "tp-$r-$v" randrw 32 "$RUNTIME")
                if [[ $v != none ]]; then
                    stop_loop "$OUT/raw/tp-$r-$v.loop"
                    read -r loops lfails su ss cu cs <"$OUT/raw/tp-$r-$v.loop"
                    loopcpu=$(awk -v a="$su" -v b="$ss" -v c="$cu" -v d="$cs" 'BEGIN {print a + b + c + d}')
                else
                    loops=0 lfails=0 loopcpu=0
                fi
                # fields of line: iops r w fio_cpu server_cpu box_busy steal wall
                others=$(read -r _ _ _ f sv bb _ wl <<<"$line"; others_pct "$bb" "$(awk -v a="$f" -v b="$sv" -v c="$loopcpu" 'BEGIN {print a + b + c}')" "$wl")
                retry_ok "$try" "$others" || break
                log "  round $r $v: others used ${others}% of the box during the run; redoing"
            done
            holds=$(server_holds "$slog" "$l0")
            nsw=$(jq '.hold | length' <<<"$holds")
            hs=$(jq -r ".hold | $stats_jq" <<<"$holds")
            hupfail=$(tail -n +"$((l0 + 1))" "$slog" | grep -c 'reload failed' || true)
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$v" "$line" "$loops" "$((lfails + hupfail))" "$loopcpu" "$nsw" "$hs" "$quiet" "$others" "$try" >>"$OUT/raw/tp.tsv"
            log "  round $r $v: $(cut -f1 <<<"$line") IOPS, $nsw swaps, others ${others}%"
        done
    done
    # The reload loops alone: their own CPU and the server's, no fio.
    : >"$OUT/raw/cpu.tsv"
    for v in none cli sighup; do
        wait_quiet; quiet=$QUIET
        l0=$(wc -l <"$slog")
        jl=$OUT/raw/cpu-$v.reloads.json
        : >"$jl"
        s0=$(proc_cpu "$SERVER_PID"); read -r b0 _ _ < <(box_cpu); t0=$(us_now)
        if [[ $v != none ]]; then
            start_loop "$v" "$OUT/raw/cpu-$v.loop" "$jl"
            usleep $((CPU_SECONDS * 1000000))
            stop_loop "$OUT/raw/cpu-$v.loop"
            read -r loops lfails su ss cu cs <"$OUT/raw/cpu-$v.loop"
        else
            usleep $((CPU_SECONDS * 1000000))
            loops=0 lfails=0 su=0 ss=0 cu=0 cs=0
        fi
        t1=$(us_now); read -r b1 _ _ < <(box_cpu); s1=$(proc_cpu "$SERVER_PID")
        nsw=$(server_holds "$slog" "$l0" | jq '.hold | length')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$loops" "$nsw" "$su" "$ss" "$cu" "$cs" \
            "$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" 'BEGIN {print (b-a)/hz}')" \
            "$(awk -v a="$b0" -v b="$b1" -v hz="$HZ" 'BEGIN {print (b-a)/hz}')" \
            "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b-a)/1e6}')" "$quiet" >>"$OUT/raw/cpu.tsv"
        log "  CPU alone, $v: $loops iterations"
    done
    stop_server
    {
        echo "## 2. Throughput: fio 4k randrw QD32, ${RUNTIME}s (+${RAMP}s ramp), $RATE swaps/s vs none ($ROUNDS rounds, alternated)"
        echo
        echo "Per run (cpu = seconds of CPU during the run; box busy = all CPU used on the box, of $((NCPU))x wall):"
        echo
        echo "| round | variant | IOPS | server cpu s | fio cpu s | reload loop cpu s | box busy s | steal s | wall s | swaps done | failures | hold p50 us | hold p99 | hold max | time held % | others before | others during | try |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' '{printf "| %d | %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %d | %d | %s | %s | %s | %.3f | %s%% | %s%% | %d |\n", $1, $2, $3, $7, $6, $13, $8, $9, $10, $14, $12, $15, $16, $17, ($14 > 0) ? 100 * $14 * $18 / ($10 * 1e6) : 0, $20, $21, $22}' "$OUT/raw/tp.tsv"
        echo
        echo "Medians:"
        echo
        echo "| variant | median IOPS | min | max | loss vs none (median) | median server cpu us/IO | median others during |"
        echo "|---|---|---|---|---|---|---|"
        base=$(awk -F'\t' '$2 == "none" {print $3}' "$OUT/raw/tp.tsv" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
        for v in none cli sighup; do
            awk -F'\t' -v v="$v" -v base="$base" -v rt="$RUNTIME" -v ramp="$RAMP" '
                $2 == v { n++; i[n] = $3; c[n] = $7 * 1e6 / ($3 * ($10)); o[n] = $21 }
                function med(a, n,   k, j, t) { for (k = 1; k <= n; k++) for (j = k + 1; j <= n; j++) if (a[j] < a[k]) { t = a[k]; a[k] = a[j]; a[j] = t }
                                                 return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
                END { m = med(i, n); lo = i[1]; hi = i[n]; cm = med(c, n); om = med(o, n)
                      printf "| %s | %d | %d | %d | %.2f%% | %.2f | %s%% |\n", v, m, lo, hi, 100 * (base - m) / base, cm, om }' "$OUT/raw/tp.tsv"
        done
        echo
        echo "Paired by round (each round runs the three variants back to back, so they share the box's background load): loss = 1 - variant/none of the same round."
        echo
        echo "| variant | median per-round loss | min | max | rounds |"
        echo "|---|---|---|---|---|"
        awk -F'\t' '
            { iops[$1, $2] = $3; rounds[$1] = 1 }
            function med(a, n,   k, j, t) { for (k = 1; k <= n; k++) for (j = k + 1; j <= n; j++) if (a[j] < a[k]) { t = a[k]; a[k] = a[j]; a[j] = t }
                                             return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
            END { split("cli sighup", vs, " ")
                  for (x = 1; x <= 2; x++) { v = vs[x]; n = 0; delete l
                      for (r in rounds) if (((r, "none") in iops) && ((r, v) in iops)) l[++n] = 100 * (1 - iops[r, v] / iops[r, "none"])
                      if (n) { m = med(l, n); printf "| %s | %.1f%% | %.1f%% | %.1f%% | %d |\n", v, m, l[1], l[n], n } } }' "$OUT/raw/tp.tsv"
        echo
        echo "(server cpu us/IO divides the server's CPU over the whole run, ramp included, by IOPS x wall; it is for comparing variants.)"
        echo
        echo "### The reload loops alone (${CPU_SECONDS}s each, no fio, server idle)"
        echo
        echo "| loop | iterations | swaps done | loop cpu s (shell + CLI processes) | server cpu s | box busy s | wall s | loop cpu per swap ms | server cpu per swap ms | loop + server, % of one CPU | others during |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' -v ncpu="$NCPU" '{ l = $4 + $5 + $6 + $7; n = ($3 > 0) ? $3 : 1; o = 100 * ($9 - l - $8) / (ncpu * $10); if (o < 0) o = 0
                      printf "| %s | %d | %d | %.2f | %.2f | %.2f | %.1f | %.2f | %.2f | %.1f%% | %.0f%% |\n", $1, $2, $3, l, $8, $9, $10,
                             ($3 > 0) ? 1000 * l / n : 0, ($3 > 0) ? 1000 * $8 / n : 0, 100 * (l + $8) / $10, o }' "$OUT/raw/cpu.tsv"
        echo
    } >>"$SUMMARY"
fi

# ------------------------------------------------------------ part 2b: windows

# Per-window IOPS from a fio IOPS log (500 ms averages; time = end of the
# interval): drops window 0 and each window's first sample (transition),
# then compares every "on" (odd) window with the mean of its two neighbours.
# Prints "pairs median_loss mean_loss se_loss mean_on mean_off".
window_stats() { # iops_log
    awk -F', *' -v W="$WIN_MS" '
        { iops[$1] += $2 }
        END {
            for (t in iops) { m = t - 250; w = int(m / W); p = m - w * W
                              if (w == 0 || p < 500) continue; sum[w] += iops[t]; cnt[w]++; if (w > maxw) maxw = w }
            n = 0
            for (w = 1; w < maxw; w += 2)
                if (cnt[w] && cnt[w - 1] && cnt[w + 1]) {
                    on = sum[w] / cnt[w]; off = (sum[w - 1] / cnt[w - 1] + sum[w + 1] / cnt[w + 1]) / 2
                    l[++n] = 100 * (1 - on / off); ton += on; toff += off }
            if (!n) { print "0 - - - - -"; exit }
            for (i = 1; i <= n; i++) s += l[i]
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (l[j] < l[i]) { x = l[i]; l[i] = l[j]; l[j] = x }
            mean = s / n; for (i = 1; i <= n; i++) ss += (l[i] - mean) ^ 2
            se = (n > 1) ? sqrt(ss / (n - 1) / n) : 0
            med = (n % 2) ? l[(n + 1) / 2] : (l[n / 2] + l[n / 2 + 1]) / 2
            printf "%d %.2f %.2f %.2f %.0f %.0f\n", n, med, mean, se, ton / n, toff / n }' "$1"
}

if [[ " $PARTS " == *" windows "* ]]; then
    log "part 2b: on/off windows of ${WIN_MS} ms inside one ${WIN_RUNTIME}s fio run per loop kind"
    sd=$WORK/state-win
    mkdir -p "$sd"
    set_configs "$sd"
    STATE_IDX=0
    printf '%s\n' "${CFG_TEXT[0]}" >"$CFG"
    slog=$OUT/raw/win.server.log
    start_server "$BIN" "$CFG" "$slog"
    : >"$OUT/raw/win.tsv"
    for v in none cli sighup; do
        wait_quiet; quiet=$QUIET
        l0=$(wc -l <"$slog")
        jl=$OUT/raw/win-$v.reloads.json
        : >"$jl"
        rm -f "$WORK/stop" "$OUT"/raw/win-"$v"_iops.*.log
        read -r b0 _ _ < <(box_cpu); s0=$(proc_cpu "$SERVER_PID"); shell_cpu; c0=$SHELL_CPU
        t0=$(us_now)
        fio --name="win-$v" --ioengine=nbd --uri="$URI" --rw=randrw --bs=4k --iodepth=32 --size=1G \
            --time_based --runtime="$WIN_RUNTIME" --write_iops_log="$OUT/raw/win-$v" --log_avg_msec=500 \
            --output-format=json >"$OUT/raw/win-$v.fio" 2>&1 &
        fio_pid=$!
        BG_PIDS+=("$fio_pid")
        window_loop "$v" "$t0" "$OUT/raw/win-$v.loop" "$jl" &
        LOOP_PID=$!
        BG_PIDS+=("$LOOP_PID")
        wait "$fio_pid" || die "fio failed: $(tail -3 "$OUT/raw/win-$v.fio")"
        stop_loop "$OUT/raw/win-$v.loop"
        t1=$(us_now); shell_cpu; c1=$SHELL_CPU; s1=$(proc_cpu "$SERVER_PID"); read -r b1 _ _ < <(box_cpu)
        read -r loops lfails <"$OUT/raw/win-$v.loop"
        others=$(others_pct "$(awk -v a="$b0" -v b="$b1" -v hz="$HZ" 'BEGIN {print (b - a) / hz}')" \
            "$(awk -v s=$((s1 - s0)) -v hz="$HZ" -v c0="$c0" -v c1="$c1" 'BEGIN {print s / hz + c1 - c0}')" \
            "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b - a) / 1e6}')")
        holds=$(server_holds "$slog" "$l0")
        hs=$(jq -r ".hold | $stats_jq" <<<"$holds")
        ws=$(window_stats "$(ls "$OUT"/raw/win-"$v"_iops.*.log | head -1)")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$(jq '.hold | length' <<<"$holds")" "$lfails" "$(tr ' ' '\t' <<<"$ws")" "$(cut -f1-4 <<<"$hs")" "$quiet" "$others" >>"$OUT/raw/win.tsv"
        log "  $v: $(jq '.hold | length' <<<"$holds") swaps; windows: $ws; others ${others}%"
    done
    stop_server
    {
        echo "## 2b. Throughput loss measured inside one run: ${WIN_MS} ms windows with $RATE swaps/s alternating with ${WIN_MS} ms without (fio 4k randrw QD32, ${WIN_RUNTIME}s per loop kind)"
        echo
        echo "Loss of each \"on\" window against the mean of its two \"off\" neighbours (fio IOPS log, 500 ms samples, first sample of each window dropped). SE = standard error of the mean loss. The \"none\" loop does nothing in its \"on\" windows: its loss shows the method's noise floor."
        echo
        echo "| loop | swaps | failures | window pairs | median loss | mean loss | SE | mean IOPS on | mean IOPS off | hold p50 us | hold p99 | hold max | hold mean | others before | others during |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' '{printf "| %s | %s | %s | %s | %s%% | %s%% | %s%% | %s | %s | %s | %s | %s | %s | %s%% | %s%% |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15}' "$OUT/raw/win.tsv"
        echo
    } >>"$SUMMARY"
fi

# ------------------------------------------------------------ part 3: gate

if [[ " $PARTS " == *" gate "* ]]; then
    # "old" = this very tree built with the gate compiled out (cargo feature
    # bench-gate-off: requests are admitted without registering), so the
    # difference is the gate and nothing else.
    log "part 3: gate overhead, this tree with vs without the gate; building the gate-off binary in $OLD_TARGET"
    (cd "$REPO" && CARGO_TARGET_DIR=$OLD_TARGET cargo build --release --quiet --features bench-gate-off) || die "gate-off build failed"
    OLD_BIN=$OLD_TARGET/release/nbdvirt
    gcfg=$WORK/gate.toml
    config_text 0 "$WORK/state-gate" 0 >"$gcfg"
    : >"$OUT/raw/gate.tsv"
    for ((r = 0; r < GATE_ROUNDS; r++)); do
        if ((r % 2 == 0)); then order=(old new); else order=(new old); fi
        for b in "${order[@]}"; do
            [[ $b == old ]] && bin=$OLD_BIN || bin=$BIN
            start_server "$bin" "$gcfg" "$OUT/raw/gate-$r-$b.server.log"
            for rw in randread randwrite; do
                for ((try = 1; try <= MAX_TRIES; try++)); do
                    wait_quiet; quiet=$QUIET
                    line=$(run_fio "gate-$r-$b-$rw" "$rw" 16 "$GATE_RUNTIME")
                    others=$(read -r _ _ _ f sv bb _ wl <<<"$line"; others_pct "$bb" "$(awk -v a="$f" -v b="$sv" 'BEGIN {print a + b}')" "$wl")
                    retry_ok "$try" "$others" || break
                    log "  round $r $b $rw: others used ${others}% of the box during the run; redoing"
                done
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$b" "$rw" "$line" "$quiet" "$others" "$try" >>"$OUT/raw/gate.tsv"
                log "  round $r $b $rw: $(cut -f1 <<<"$line") IOPS, others ${others}%"
            done
            stop_server
        done
    done
    {
        echo "## 3. Gate overhead with nothing paused: gate compiled out (old, --features bench-gate-off) vs normal build (new), same tree"
        echo
        echo "fio 4k QD16, ${GATE_RUNTIME}s (+${RAMP}s ramp) per run, same file, same 16-extent layout on one backend, binaries alternated ($GATE_ROUNDS rounds, order flipped every round). The gate alone: \`cargo bench --bench gate\`."
        echo
        echo "| round | binary | job | IOPS | server cpu s | fio cpu s | box busy s | wall s | server cpu us/IO | others before | others during | try |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' '{printf "| %d | %s | %s | %d | %.2f | %.2f | %.2f | %.1f | %.2f | %s%% | %s%% | %d |\n", $1, $2, $3, $4, $8, $7, $9, $11, $8 * 1e6 / ($4 * $11), $12, $13, $14}' "$OUT/raw/gate.tsv"
        echo
        echo "| job | binary | median IOPS | min | max | spread (max-min)/median | median server cpu us/IO | median vs old | median others during |"
        echo "|---|---|---|---|---|---|---|---|---|"
        for rw in randread randwrite; do
            oldm=$(awk -F'\t' -v rw="$rw" '$2 == "old" && $3 == rw {print $4}' "$OUT/raw/gate.tsv" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
            for b in old new; do
                awk -F'\t' -v rw="$rw" -v b="$b" -v oldm="$oldm" '
                    $2 == b && $3 == rw { n++; i[n] = $4; c[n] = $8 * 1e6 / ($4 * $11); o[n] = $13 }
                    function med(a, n,   k, j, t) { for (k = 1; k <= n; k++) for (j = k + 1; j <= n; j++) if (a[j] < a[k]) { t = a[k]; a[k] = a[j]; a[j] = t }
                                                     return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
                    END { m = med(i, n); cm = med(c, n); om = med(o, n)
                          printf "| %s | %s | %d | %d | %d | %.1f%% | %.2f | %+.1f%% | %s%% |\n", rw, b, m, i[1], i[n], 100 * (i[n] - i[1]) / m, cm, 100 * (m - oldm) / oldm, om }' "$OUT/raw/gate.tsv"
            done
        done
        echo "Paired by round (old and new run back to back in each round): new/old - 1 per round."
        echo
        echo "| job | median per-round diff (IOPS) | min | max | median per-round diff (server cpu us/IO) | rounds |"
        echo "|---|---|---|---|---|---|"
        for rw in randread randwrite; do
            awk -F'\t' -v rw="$rw" '
                $3 == rw { iops[$1, $2] = $4; cpu[$1, $2] = $8 * 1e6 / ($4 * $11); rounds[$1] = 1 }
                function med(a, n,   k, j, t) { for (k = 1; k <= n; k++) for (j = k + 1; j <= n; j++) if (a[j] < a[k]) { t = a[k]; a[k] = a[j]; a[j] = t }
                                                 return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
                END { for (r in rounds) if (((r, "old") in iops) && ((r, "new") in iops)) {
                          n++; d[n] = 100 * (iops[r, "new"] / iops[r, "old"] - 1); c[n] = 100 * (cpu[r, "new"] / cpu[r, "old"] - 1) }
                      if (n) { m = med(d, n); cm = med(c, n); printf "| %s | %+.1f%% | %+.1f%% | %+.1f%% | %+.1f%% | %d |\n", rw, m, d[1], d[n], cm, n } }' "$OUT/raw/gate.tsv"
        done
        echo
    } >>"$SUMMARY"
fi

{
    echo "Settings: SWAPS=$SWAPS SWAP_INTERVAL_MS=$SWAP_INTERVAL_MS ROUNDS=$ROUNDS RUNTIME=$RUNTIME RATE=$RATE CPU_SECONDS=$CPU_SECONDS GATE_ROUNDS=$GATE_ROUNDS GATE_RUNTIME=$GATE_RUNTIME RAMP=$RAMP QUIET_PCT=$QUIET_PCT OTHERS_MAX_PCT=$OTHERS_MAX_PCT MAX_TRIES=$MAX_TRIES; waited ${QUIET_SPENT}s in all for a quiet box."
    echo "\"others\" = CPU used by processes other than this benchmark's server, fio and reload loop, in % of the whole box ($NCPU CPUs x wall time); \"before\" is the box's load while we were idle, just before the run."
} >>"$SUMMARY"
log "done; summary in $SUMMARY"
cat "$SUMMARY"
