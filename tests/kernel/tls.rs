//! `nbdvirt attach` over TLS in the guest: the kernel's NBD client talks to
//! relays in the attach process (the kernel cannot do TLS), which speak
//! STARTTLS + TLS to a server with `tls = "require"`.
//!
//! 1. Refusals: no TLS flag, a wrong PSK (exit 1, the identity named).
//! 2. PSK over the Unix socket, 2 connections, no `--persist`: the command
//!    returns the device as without TLS; the relay process stays behind
//!    (it is the one that connected the device: /sys/block/nbdN/pid),
//!    locked in memory (VmLck), OOM-exempt, with no warning; ext4 made,
//!    filled, checked; `nbdvirt detach` ends the relay process. Then
//!    `--ioctl` (foreground, bob's key): the files read back, detach ends
//!    it.
//! 3. alice's certificate over TCP (127.0.0.1, the name checked), with
//!    `--persist`: the files are read back after a fresh attach; the
//!    server is killed with SIGKILL and restarted under a writer, the
//!    relays are rebuilt (new TLS sessions, NBD_CMD_RECONFIGURE), writes
//!    go on, checksums and fsck hold; SIGTERM to the attach process
//!    detaches the device (it cannot work without its relays). A second
//!    device attached without `--persist` meanwhile loses its server: its
//!    relay process says so in the kernel log and ends.

use super::common::pki::make_pki;
use super::harness::Guest;
use std::time::Duration;

/// TWO_FILE_CONFIG, also on loopback TCP, with TLS required (PSK and
/// certificates both accepted).
fn tls_config() -> String {
    let config = super::TWO_FILE_CONFIG
        .replace("listen = [\"unix:/run/nbd.sock\"]", "listen = [\"unix:/run/nbd.sock\", \"tcp:127.0.0.1:10809\"]")
        .replace(
            "shutdown_grace = \"1s\"\n",
            "shutdown_grace = \"1s\"\ntls = \"require\"\ntls_psk = \"/etc/nbdvirt/tls/keys.psk\"\ntls_certificates = \"/etc/nbdvirt/tls/server\"\n",
        );
    assert!(config.contains("tcp:127.0.0.1:10809") && config.contains("tls = \"require\""), "config:\n{config}");
    config
}

#[test]
fn tls_attach_through_the_relay_ext4_roundtrip() {
    let pki = make_pki();
    let mut guest = Guest::new().name("tls-attach").write("/etc/nbdvirt/nbdvirt.toml", tls_config());
    for file in ["keys.psk", "wrong.psk", "server/ca-cert.pem", "server/server-cert.pem", "server/server-key.pem", "alice/ca-cert.pem", "alice/client-cert.pem", "alice/client-key.pem"] {
        let bytes = std::fs::read(pki.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        guest = guest.write(&format!("/etc/nbdvirt/tls/{file}"), bytes);
    }
    guest
        .script(
            r#"
# gone PID: the process has exited (a zombie counts: nobody may reap it).
gone() { [ ! -e /proc/$1 ] || grep -q '^State:.*Z' /proc/$1/status; }
TLS=/etc/nbdvirt/tls

step "serve with tls = require (Unix socket and 127.0.0.1:10809)"
ip link set lo up
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock

step "refused: no TLS flag, a wrong key"
rc=0; nbdvirt attach vol0 2>/tmp/err || rc=$?
cat /tmp/err
[ $rc -eq 1 ] && grep -q "server requires TLS" /tmp/err || fail "attach without TLS: exit $rc, unexpected message"
rc=0; nbdvirt attach vol0 --tls-psk $TLS/wrong.psk 2>/tmp/err || rc=$?
cat /tmp/err
[ $rc -eq 1 ] && grep -q "TLS handshake failed (PSK identity 'alice' from $TLS/wrong.psk)" /tmp/err || fail "attach with a wrong PSK: exit $rc, unexpected message"
nbdvirt attached --json | grep -q '"connected": true' && fail "a refused attach left a device connected"

step "attach over TLS with a PSK, 2 connections: the command returns, its relay stays"
dev=$(nbdvirt attach vol0 --tls-psk $TLS/keys.psk --connections 2 2>/tmp/attach.err) || { cat /tmp/attach.err; fail "nbdvirt attach --tls-psk failed"; }
cat /tmp/attach.err
case "$dev" in /dev/nbd[0-9]*) ;; *) fail "attach printed '$dev', expected /dev/nbdN" ;; esac
! grep -qE "mlockall|PR_SET_IO_FLUSHER|oom_score_adj" /tmp/attach.err || fail "the relay could not pin itself"
relay=$(cat /sys/block/${dev#/dev/}/pid)
gone $relay && fail "the relay process $relay (that connected $dev) is not running"
grep -E '^(Name|State|VmLck|VmRSS)' /proc/$relay/status
[ "$(awk '/^VmLck/ {print $2}' /proc/$relay/status)" -gt 0 ] || fail "the relay's memory is not locked"
[ "$(cat /proc/$relay/oom_score_adj)" -eq -1000 ] || fail "the relay is not exempt from the OOM killer"
[ "$(grep -c 'TLS started.*psk=Some("alice")' $NBDVIRT_LOG)" -eq 2 ] || fail "the server did not see 2 TLS sessions of alice"

step "mkfs.ext4 + write over TLS"
mkfs.ext4 -q -F $dev
mkdir -p /mnt/v
mount -t ext4 $dev /mnt/v
for mib in 1 3 8; do dd if=/dev/urandom of=/mnt/v/big$mib bs=1M count=$mib 2>/dev/null; done
for i in $(seq 1 100); do echo "small file $i $RANDOM" > /mnt/v/s$i; done
(cd /mnt/v && sha256sum big* s*) >/tmp/sums
umount /mnt/v
e2fsck -fn $dev

step "detach: the relay process ends"
nbdvirt detach $dev
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after detach"
wait_for 10 gone $relay || fail "the relay process $relay still runs after detach"
check_dmesg

step "attach --ioctl over TLS (foreground, run in the background): verify, detach"
(nbdvirt attach vol0 /dev/nbd1 --ioctl --tls-psk $TLS/keys.psk --tls-username bob >/tmp/ioctl.out 2>/tmp/ioctl.err; echo $? >/tmp/ioctl.rc) &
wait_for 30 test -s /tmp/ioctl.out || { cat /tmp/ioctl.err; fail "attach --ioctl --tls-psk printed nothing"; }
[ "$(cat /tmp/ioctl.out)" = /dev/nbd1 ] || fail "attach --ioctl printed '$(cat /tmp/ioctl.out)'"
grep -q 'TLS started.*psk=Some("bob")' $NBDVIRT_LOG || fail "the server did not see PSK identity bob"
mount -t ext4 /dev/nbd1 /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ through the ioctl attach over TLS"
umount /mnt/v
nbdvirt detach /dev/nbd1
wait_for 15 test -e /tmp/ioctl.rc || fail "attach --ioctl over TLS did not return after detach"
[ "$(cat /tmp/ioctl.rc)" -eq 0 ] || { cat /tmp/ioctl.err; fail "attach --ioctl over TLS exited with status $(cat /tmp/ioctl.rc)"; }
wait_for 10 nbd_is_free /dev/nbd1 || fail "/dev/nbd1 still has a size after detach"
check_dmesg

step "attach over TCP with alice's certificate, --persist; verify"
(
	nbdvirt attach vol0 --connect tcp:127.0.0.1:10809 --tls-certificates $TLS/alice --persist --dead-conn-timeout 60 --timeout 10 >/tmp/persist.out 2>/tmp/persist.err &
	echo $! >/tmp/persist.pid
	rc=0
	wait $! || rc=$?
	echo $rc >/tmp/persist.rc
) &
wait_for 30 grep -q /dev/nbd /tmp/persist.out || { cat /tmp/persist.out /tmp/persist.err; fail "attach --persist printed no device"; }
dev=$(head -n 1 /tmp/persist.out)
wait_for 10 nbd_has_size $dev || fail "$dev has no size"
grep -q 'TLS started.*cn=\["alice"\]' $NBDVIRT_LOG || fail "the server did not see alice's certificate"
e2fsck -fn $dev
mount -t ext4 $dev /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after re-attaching over TCP"

step "kill -9 the server under writes, restart it: new TLS sessions"
# Also a device without --persist: its relay process must log the lost
# connection to the kernel log and end.
dev2=$(nbdvirt attach vol0 /dev/nbd2 --tls-psk $TLS/keys.psk) || fail "attach /dev/nbd2 failed"
relay2=$(cat /sys/block/nbd2/pid)
sessions=$(grep -c 'TLS started.*cn=\["alice"\]' $NBDVIRT_LOG)
rm -f /tmp/stop; fsync_writer & WPID=$!
wait_for 30 written_at_least 3 || fail "the writer does not get going"
kill -9 $NBDVIRT_PID
wait $NBDVIRT_PID || true
NBDVIRT_PID=
at_kill=$(count_lines /tmp/written)
echo "server killed after $at_kill writes"
wait_for 20 gone $relay2 || fail "the relay process of $dev2 outlived its server"
dmesg | grep "nbdvirt-attach\[$relay2\]" || fail "the relay process of $dev2 logged nothing to the kernel log"
sleep 2
rm -f /run/nbd.sock
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock
wait_for 60 grep -q reconnected /tmp/persist.err || { cat /tmp/persist.err; fail "the attach process did not reconnect"; }
wait_for 60 written_at_least $((at_kill + 5)) || fail "writes do not resume after the restart ($(count_lines /tmp/written) written)"
touch /tmp/stop
wait $WPID || fail "the writer failed"
[ ! -e /tmp/writer.failed ] || fail "the writer saw an error"
echo "files written: $(count_lines /tmp/written) ($at_kill before the kill)"
[ "$(grep -c 'TLS started.*cn=\["alice"\]' $NBDVIRT_LOG)" -gt "$sessions" ] || fail "the restarted server saw no new TLS session of alice"
nbdvirt detach $dev2
wait_for 10 nbd_is_free $dev2 || fail "$dev2 (its relay gone) still has a size after detach"

step "verify after dropping caches, fsck; SIGTERM detaches"
sync
echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after the restart"
umount /mnt/v
e2fsck -fn $dev
kill -TERM "$(cat /tmp/persist.pid)"
wait_for 15 test -e /tmp/persist.rc || { cat /tmp/persist.err; fail "attach --persist did not end after SIGTERM"; }
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after SIGTERM to its attach process"
echo "--- attach --persist (exit status $(cat /tmp/persist.rc))"
cat /tmp/persist.out /tmp/persist.err
[ "$(cat /tmp/persist.rc)" -eq 0 ] || fail "attach --persist exited with status $(cat /tmp/persist.rc)"
check_dmesg_allowing 'Receive control failed|Dead connection, failed to find a fallback|Connection timed out|shutting down sockets|Attempted send on closed socket|Send control failed|Send data failed|Request send failed, requeueing|Send disconnect failed|nbdvirt-attach'
stop_nbdvirt
echo "TLS ATTACH OK"
"#,
        )
        .run(Duration::from_secs(420))
        .assert_success()
        .assert_output_contains("TLS ATTACH OK");
}
