# Sourced by the cluster benchmarks: a free loopback port, and a private
# etcd on loopback with its data under a directory (tmpfs in the
# benchmarks), started in the background and waited for.
#
#   port                 -> prints a free TCP port on 127.0.0.1
#   start_etcd DIR       -> sets EP (client port), adds the pid to PIDS
#   node_sections DIR NODE ETCD_PORT LEASE_TTL [LISTEN]
#                        -> prints a bench node's [server] (Unix socket
#                           DIR/NODE.sock, plus LISTEN) and [cluster];
#                           $N1_SERVER_TOML etc. add [server] lines per node

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_etcd() {
  local dir=$1 pp
  EP=$(port); pp=$(port)
  etcd --name b --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
    --initial-cluster "b=http://127.0.0.1:$pp" --log-level error >"$dir/etcd.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    python3 -c "import urllib.request,sys; sys.exit(0 if b'true' in urllib.request.urlopen('http://127.0.0.1:$EP/health', timeout=1).read() else 1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "etcd did not become healthy on port $EP: $dir/etcd.log" >&2
  return 1
}

node_sections() {
  local listen="\"unix:$1/$2.sock\"" extra="${2^^}_SERVER_TOML"
  [[ -n ${5:-} ]] && listen+=", \"$5\""
  cat <<CFG
[server]
listen = [$listen]
control = "$1/$2-control.sock"
state_dir = "$1/$2-state"
shutdown_grace = "1s"
${!extra:-}

[cluster]
etcd = ["http://127.0.0.1:$3"]
name = "bench"
node = "$2"
peer = "tcp:127.0.0.1:$(port)"
lease_ttl = "$4"

CFG
}
