#!/usr/bin/env bash
# Captures the fuzz seed corpus from real NBD clients: runs nbdvirt with
# volumes named like the fuzz fixture's ("open", the default, and "ro"),
# records what each client sends through a recording Unix-socket proxy,
# and writes fuzz/corpus/handshake/seed-* (each with the two setup bytes
# of src/fuzzing/setup.rs in front: TLS off, and TLS required with
# STARTTLS put in front of the session, as the fuzzer's transport keeps
# going in the clear after it) and fuzz/corpus/decode/seed-* (the option
# payloads and request streams of those sessions). See docs/FUZZING.md.
#
# Needs libnbd-bin, python3-libnbd, qemu-utils, nbd-client and a built
# target/debug/nbdvirt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH
for tool in nbdinfo:libnbd-bin nbdsh:python3-libnbd qemu-img:qemu-utils qemu-io:qemu-utils nbd-client:nbd-client python3:python3; do
  command -v "${tool%%:*}" >/dev/null || { echo "fuzz-capture: ${tool%%:*} missing: install the Debian package ${tool#*:}" >&2; exit 1; }
done
[[ -x target/debug/nbdvirt ]] || { echo "fuzz-capture: build target/debug/nbdvirt first (cargo build)" >&2; exit 1; }

dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
mkdir "$dir/raw" "$dir/state"
cat > "$dir/nbdvirt.toml" <<EOF
[server]
listen = ["unix:$dir/nbd.sock"]
control = "$dir/control.sock"
state_dir = "$dir/state"
default_export = "open"
[[backend]]
name = "m"
memory = true
size = "4MiB"
[[volume]]
name = "open"
description = "the open volume"
[[volume.extent]]
length = "1MiB"
backend = "m"
[[volume]]
name = "ro"
read_only = true
[[volume.extent]]
length = "1MiB"
backend = "m"
backend_offset = "1MiB"
EOF
target/debug/nbdvirt serve --config "$dir/nbdvirt.toml" >"$dir/server.log" 2>&1 &
# The proxy writes each connection's client bytes to raw/N.
python3 - "$dir" <<'EOF' &
import itertools, os, socket, sys, threading
d = sys.argv[1]; n = itertools.count()
def pump(src, dst, log):
    try:
        while (b := src.recv(65536)):
            if log: log.write(b); log.flush()
            dst.sendall(b)
    except OSError: pass
    try: dst.shutdown(socket.SHUT_WR)
    except OSError: pass
def handle(c):
    s = socket.socket(socket.AF_UNIX); s.connect(f"{d}/nbd.sock")
    with open(f"{d}/raw/{next(n)}", "wb") as log:
        t = threading.Thread(target=pump, args=(s, c, None)); t.start(); pump(c, s, log); t.join()
l = socket.socket(socket.AF_UNIX); l.bind(f"{d}/proxy.sock"); l.listen(8)
while True: threading.Thread(target=handle, args=(l.accept()[0],), daemon=True).start()
EOF
for _ in $(seq 100); do [[ -S $dir/proxy.sock && -S $dir/nbd.sock ]] && break; sleep 0.1; done

P=$dir/proxy.sock
U="nbd+unix:///open?socket=$P"
capture() { # NAME COMMAND...: runs a client, names the connection(s) it made
  local name=$1; shift
  timeout 30 "$@" >/dev/null 2>&1 || echo "fuzz-capture: $name exited $? (its bytes up to there are kept)" >&2
  sleep 0.3
  local i=0 f
  for f in $(ls -tr "$dir/raw" | grep -E '^[0-9]+$' || true); do mv "$dir/raw/$f" "$dir/raw/$name-$i"; i=$((i+1)); done
}
capture nbdinfo nbdinfo "$U"
capture nbdinfo-default nbdinfo "nbd+unix:///?socket=$P"
capture nbdinfo-list nbdinfo --list "nbd+unix:///?socket=$P"
capture nbdinfo-map nbdinfo --map "$U"
capture nbdsh-io nbdsh -u "$U" -c 'h.pread(512, 0); h.pwrite(b"x"*512, 4096); h.flush(); h.trim(4096, 0); h.zero(4096, 8192); h.cache(4096, 0)'
capture nbdsh-opt nbdsh -c "h.set_opt_mode(True); h.set_full_info(True); h.connect_uri('$U'); h.opt_list(lambda n, d: 0); h.opt_info(); h.opt_list_meta_context(lambda c: 0); h.set_export_name('ro'); h.opt_info(); h.add_meta_context('qemu:dirty-bitmap:split-0'); h.add_meta_context('base:allocation'); h.set_export_name('open'); h.opt_go(); h.block_status(65536, 0, lambda *a: 0)"
capture nbdsh-go-ro nbdsh -c "h.set_full_info(True); h.add_meta_context('base:allocation'); h.connect_uri('nbd+unix:///ro?socket=$P'); h.pread(4096, 0); h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)"
capture nbdsh-abort nbdsh -c "h.set_opt_mode(True); h.connect_uri('$U'); h.opt_abort()"
capture nbdsh-oldstyle nbdsh -c "h.set_request_structured_replies(False); h.set_handshake_flags(0); h.connect_uri('$U'); h.pread(512, 0)"
capture nbdsh-nozeroes nbdsh -c "h.set_request_structured_replies(False); h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE); h.connect_uri('$U'); h.pread(512, 0); h.pwrite(b'y'*1024, 0, nbd.CMD_FLAG_FUA)"
capture qemu-img-info qemu-img info "$U"
capture qemu-img-map qemu-img map --output=json "$U"
capture qemu-io qemu-io -f raw -c 'read 0 4k' -c 'write -P 0xab 8k 4k' -c 'flush' -c 'discard 0 4k' -c 'write -z 16k 4k' "$U"
capture qemu-img-bitmap qemu-img map --output=json --image-opts "driver=nbd,server.type=unix,server.path=$P,export=open,x-dirty-bitmap=qemu:dirty-bitmap:split-0"
capture nbd-client-list nbd-client -l -unix "$P"

# Seeds: setup bytes + session; decode seeds: each option payload, and the
# request stream after the handshake.
python3 - "$dir/raw" fuzz/corpus <<'EOF'
import os, struct, sys
raw, corpus = sys.argv[1], sys.argv[2]
IHAVEOPT = b"IHAVEOPT"
STARTTLS = IHAVEOPT + struct.pack(">II", 5, 0)
for d in ("handshake", "decode"): os.makedirs(f"{corpus}/{d}", exist_ok=True)
for name in sorted(os.listdir(raw)):
    data = open(f"{raw}/{name}", "rb").read()
    if len(data) < 4: continue
    # Setup: TLS off, whole reads; TLS required, byte-by-byte reads, psk:alice.
    open(f"{corpus}/handshake/seed-{name}", "wb").write(b"\x00\x03" + data)
    open(f"{corpus}/handshake/seed-{name}-tls", "wb").write(b"\x02\x00" + data[:4] + STARTTLS + data[4:])
    pos, k = 4, 0
    while data[pos:pos + 8] == IHAVEOPT and pos + 16 <= len(data):
        option, length = struct.unpack(">II", data[pos + 8:pos + 16])
        payload = data[pos + 16:pos + 16 + length]
        if payload:
            open(f"{corpus}/decode/seed-{name}-opt{k}", "wb").write(payload)
        pos, k = pos + 16 + length, k + 1
        if option == 1: break  # EXPORT_NAME ends the haggling
    if pos < len(data):
        open(f"{corpus}/decode/seed-{name}-requests", "wb").write(data[pos:])
EOF
echo "fuzz-capture: $(ls fuzz/corpus/handshake | grep -c '^seed-') handshake and $(ls fuzz/corpus/decode | grep -c '^seed-') decode seeds in fuzz/corpus"
