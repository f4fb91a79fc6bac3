#!/usr/bin/env bash
# Before/after of the mirror target's data path: two nbdvirt binaries,
# each serving a volume mirrored on two files on tmpfs (Unix socket),
# measured with fio's nbd engine, runs alternated between the two.
#
#   NBDVIRT_BASE_BIN=/tmp/nbdvirt-before benches/mirror_ab.sh
#   ROUNDS=5 RUNTIME=10 NBDVIRT_BASE_BIN=... benches/mirror_ab.sh
#
# Environment: ROUNDS=3, RUNTIME=10 (seconds per run), SIZE_MB=256 (per
# leg), NBDVIRT_BIN (default target/release/nbdvirt), NBDVIRT_BASE_BIN
# (required). Prints one line per run and the medians (IOPS) per row.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH
command -v fio >/dev/null || { echo "mirror_ab.sh: install the Debian package 'fio'" >&2; exit 1; }
NEW=${NBDVIRT_BIN:-target/release/nbdvirt}
BASE=${NBDVIRT_BASE_BIN:?set NBDVIRT_BASE_BIN to the binary to compare with}
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-10} SIZE_MB=${SIZE_MB:-256}
dir=$(mktemp -d /dev/shm/mirror_ab.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

serve() { # name binary
  local d=$dir/$1; mkdir -p "$d"
  cat >"$d/config.toml" <<EOF
[server]
listen = ["unix:$d/nbd.sock"]
control = "$d/control.sock"
state_dir = "$d/state"
[[backend]]
name = "a"
path = "$d/a.img"
size = "${SIZE_MB}MiB"
[[backend]]
name = "b"
path = "$d/b.img"
size = "${SIZE_MB}MiB"
[[volume]]
name = "v"
[[volume.extent]]
length = "${SIZE_MB}MiB"
mirror = [ { backend = "a" }, { backend = "b" } ]
EOF
  "$2" serve --config "$d/config.toml" >"$d/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [[ -S $d/nbd.sock ]] && break; sleep 0.1; done
  # Data on both legs, so reads are not of holes.
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///v?socket=$d/nbd.sock" --rw=write --bs=1M --iodepth=8 --size=${SIZE_MB}M >/dev/null
}

run() { # name row
  local rw=randread; [[ $2 == rw16 ]] && rw=randwrite
  fio --name=r --ioengine=nbd --uri="nbd+unix:///v?socket=$dir/$1/nbd.sock" --rw=$rw --bs=4k --iodepth=16 \
    --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))"
}

serve base "$BASE"
serve new "$NEW"
declare -A got
for r in $(seq "$ROUNDS"); do
  order="base new"; ((r % 2)) || order="new base"
  for row in rr16 rw16; do
    for s in $order; do
      iops=$(run $s $row)
      echo "round $r $row $s $iops"
      got[$row.$s]+="$iops "
    done
  done
done
for row in rr16 rw16; do
  for s in base new; do
    echo "$row $s median $(tr ' ' '\n' <<<"${got[$row.$s]}" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') of: ${got[$row.$s]}"
  done
done
