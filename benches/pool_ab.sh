#!/usr/bin/env bash
# Thin writes to fresh chunks, several builds alternated (issue 11): each
# round starts each build's server anew on new sparse tmpfs stores, fills a
# 512 MiB thick volume (`lin`), creates two 1 TiB thin volumes (`fresh1m`
# in a pool of 1 MiB chunks, `fresh64k` in one of 64 KiB chunks) and runs
# fio's 4k randwrite QD16 on each (nearly every write maps a chunk).
#
#   benches/pool_ab.sh BIN_A BIN_B ...   # ROUNDS=4 RUNTIME=3
#
# Per build: IOPS, the server's CPU µs per I/O, and the pool thread's CPU
# µs per write (its commits; nearly every write maps a chunk), medians
# and min–max over rounds.
set -euo pipefail

ROUNDS=${ROUNDS:-4}
RUNTIME=${RUNTIME:-3}
die() { echo "pool_ab.sh: $*" >&2; exit 1; }
(($# >= 1)) || die "usage: benches/pool_ab.sh NBDVIRT_BINARY..."
for b in "$@"; do [[ -x $b ]] || die "$b is not an executable"; done
for v in ROUNDS RUNTIME; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done
command -v fio >/dev/null || die "'fio' not found: install the Debian package 'fio'"
command -v python3 >/dev/null || die "'python3' not found: install the Debian package 'python3'"

W=$(mktemp -d /dev/shm/nbdvirt-pool-ab.XXXXXX)
SERVER=
cleanup() {
  [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
TCK=$(getconf CLK_TCK)
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$1"; }
fio_iops() { # volume -> IOPS
  timeout $((RUNTIME + 60)) fio --name=b --ioengine=nbd --uri="nbd+unix:///$1?socket=$D/nbd.sock" --rw=randwrite --bs=4k \
    --iodepth=16 --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json, sys; t = sys.stdin.read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))'
}
RES="$W/results.tsv"
: >"$RES"
echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((round = 1; round <= ROUNDS; round++)); do
  for b in "$@"; do
    D="$W/run"
    rm -rf "$D" && mkdir -p "$D"
    truncate -s 300G "$D/s1m.img" "$D/s64k.img"
    cat >"$D/pool.toml" <<EOF
[server]
listen = ["unix:$D/nbd.sock"]
control = "$D/control.sock"
state_dir = "$D/state"
[[backend]]
name = "s1m"
path = "$D/s1m.img"
[[backend]]
name = "s64k"
path = "$D/s64k.img"
[[pool]]
name = "p1m"
backends = ["s1m"]
chunk = "1MiB"
[[pool]]
name = "p64k"
backends = ["s64k"]
chunk = "64KiB"
EOF
    RUST_LOG=nbdvirt=warn "$b" serve --config "$D/pool.toml" >"$D/server.log" 2>&1 &
    SERVER=$!
    for ((i = 0; i < 100; i++)); do [[ -S $D/control.sock ]] && break; sleep 0.1; done
    ctl() { "$b" "$@" --control "$D/control.sock" >/dev/null || die "$b $*: $(tail -3 "$D/server.log")"; }
    ctl volume create lin --size 512MiB --pool p1m
    fio --name=f --ioengine=nbd --uri="nbd+unix:///lin?socket=$D/nbd.sock" --rw=write --bs=1M --iodepth=4 --size=512M >/dev/null 2>&1
    ctl volume create fresh1m --size 1TiB --pool p1m --thin
    ctl volume create fresh64k --size 1TiB --pool p64k --thin
    pools=$(grep -l '^pools$' /proc/"$SERVER"/task/*/comm | cut -d/ -f5)
    echo -e "$b\tlin\t$(fio_iops lin)\t-\t-" >>"$RES"
    for v in fresh1m fresh64k; do
      c0=$(ticks "/proc/$SERVER/stat") p0=$(ticks "/proc/$SERVER/task/$pools/stat")
      iops=$(fio_iops "$v")
      c1=$(ticks "/proc/$SERVER/stat")
      sleep 1.2 # the pool thread commits the last second's maps
      p1=$(ticks "/proc/$SERVER/task/$pools/stat")
      chunks=$(python3 -c "print($iops * $RUNTIME)")
      echo -e "$b\t$v\t$iops\t$(python3 -c "print(f'{($c1 - $c0) / $TCK * 1e6 / $chunks:.2f}\t{($p1 - $p0) / $TCK * 1e6 / $chunks:.2f}')")" >>"$RES"
    done
    kill "$SERVER" && wait "$SERVER" 2>/dev/null || true
    SERVER=
  done
done
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RES" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    b, v, iops, cpu, commit = line.split("\t")
    rows.setdefault((b, v), []).append((float(iops), cpu, commit.strip()))
def stat(xs):
    return f"{statistics.median(xs):,.2f} ({min(xs):,.2f}–{max(xs):,.2f})" if xs else "–"
print("\n| build | volume | IOPS | server CPU µs/IO | pool thread CPU µs/write |\n|---|---|---:|---:|---:|")
for (b, v), rs in rows.items():
    iops = [r[0] for r in rs]
    cpu = [float(r[1]) for r in rs if r[1] != "-"]
    commit = [float(r[2]) for r in rs if r[2] != "-"]
    print(f"| {b} | {v} | {statistics.median(iops):,.0f} ({min(iops):,.0f}–{max(iops):,.0f}) | {stat(cpu)} | {stat(commit)} |")
EOF
