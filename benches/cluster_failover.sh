#!/usr/bin/env bash
# Failover (issue 12 speed goal: node killed -> I/O resumes through another
# node within lease TTL + 2 s). Three nodes and etcd on loopback, the file on
# /dev/shm; n1 and n2 reach it (`nodes = ["n1", "n2"]`), n3 forwards every
# piece to the first of them alive (n1). A client on n3 runs 4 KiB writes
# and reads back-to-back (QD1, libnbd); after 3 s n1 gets SIGKILL, and the
# client goes on for 7 s more. Each round starts a fresh cluster.
# MODE=host: the client is connected to n1 itself and, when a request
# fails, connects to n2 and sends it again (what `attach --connect A,B
# --persist` does for the kernel).
#
#   benches/cluster_failover.sh
#   ROUNDS=5 TTL=5s benches/cluster_failover.sh
#   MODE=host benches/cluster_failover.sh
#
# Reported per round: the longest stall between two completed requests
# around the kill (the failover time as the client sees it), the requests
# that failed, and whether every read returned the data last written there.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NBDVIRT_BIN:-target/release/nbdvirt}
ROUNDS=${ROUNDS:-3} TTL=${TTL:-5s} MODE=${MODE:-forward}
case $MODE in forward|host) ;; *) echo "MODE must be forward or host, not '$MODE'" >&2; exit 2;; esac
export PATH=/usr/bin:$PATH
for tool in etcd python3; do command -v $tool >/dev/null || { echo "missing $tool (apt-get install etcd-server python3)" >&2; exit 1; }; done
python3 -c 'import nbd' 2>/dev/null || { echo "missing the libnbd Python module (apt-get install python3-libnbd)" >&2; exit 1; }
[[ -x $BIN ]] || { echo "build first: cargo build --release" >&2; exit 1; }

W=$(mktemp -d /dev/shm/nbdvirt-failover-bench.XXXXXX)
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap 'stop_all; rm -rf "$W"' EXIT
source benches/cluster_etcd.sh

node_config() { # NODE ETCD_PORT DIR
  node_sections "$3" "$1" "$2" "$TTL" "tcp:127.0.0.1:$(port)"
  cat <<CFG
[[backend]]
name = "a"
path = "$3/d.img"
size = "64MiB"
nodes = ["n1", "n2"]

[[volume]]
name = "v"
[[volume.extent]]
length = "64MiB"
backend = "a"
backend_offset = 0
CFG
}

round() { # N
  local d="$W/r$1"; mkdir -p "$d"
  start_etcd "$d"; local ep=$EP
  truncate -s 64M "$d/d.img"
  local n1pid=
  for n in n1 n2 n3; do
    node_config $n "$ep" "$d" >"$d/$n.toml"
    "$BIN" serve --config "$d/$n.toml" >/dev/null 2>"$d/$n.log" &
    PIDS+=($!); [[ $n == n1 ]] && n1pid=$!
    for _ in $(seq 200); do [[ -S $d/$n-control.sock ]] && break; sleep 0.05; done
  done
  sleep 1
  local socks="$d/n3.sock"
  [[ $MODE == host ]] && socks="$d/n1.sock $d/n2.sock"
  python3 - "$n1pid" $socks <<'PY'
import nbd, os, random, signal, sys, time
victim, socks = int(sys.argv[1]), sys.argv[2:]
def connect(sock):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///v?socket={sock}")
    return h
h = connect(socks[0])
size, bs = h.get_size(), 4096
blocks = size // bs
written = {}          # block -> the byte pattern last acknowledged there
done, failed, wrong = [], 0, 0
start = time.monotonic(); killed = None; n = 0
while time.monotonic() - start < 10:
    if killed is None and time.monotonic() - start >= 3:
        os.kill(victim, signal.SIGKILL); killed = time.monotonic()
    b = random.randrange(blocks); n += 1
    try:
        if n % 2:
            data = bytes([n % 251]) * bs
            h.pwrite(data, b * bs)
            written[b] = data
        else:
            got = h.pread(bs, b * bs)
            if got != written.get(b, bytes(bs)):
                wrong += 1
        done.append(time.monotonic())
    except nbd.Error:
        if len(socks) == 1:
            failed += 1
            continue
        # The host's failover: the next node; the request is sent again.
        socks = socks[1:]
        while True:
            try:
                h = connect(socks[0]); break
            except nbd.Error:
                time.sleep(0.01)
        n -= 1
after = [t for t in done if t >= killed]
gaps = [b - a for a, b in zip(done, done[1:]) if b >= killed - 0.5]
stall = max(gaps) * 1000 if gaps else float("inf")
first = (after[0] - killed) * 1000 if after else float("inf")
print(f"ROUND requests {len(done)} failed {failed} wrong {wrong} longest_stall_ms {stall:.1f} first_after_kill_ms {first:.1f} after_kill {len(after)}")
PY
  [[ $MODE == forward ]] && { "$BIN" status --control "$d/n3-control.sock" | grep -o 'forwarded to .*' | sed 's/^/after: /' || true; }
  stop_all
}

echo "date: $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)  rounds $ROUNDS, lease_ttl $TTL, mode $MODE"
for r in $(seq "$ROUNDS"); do round "$r"; done
