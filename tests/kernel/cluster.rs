//! Two cluster nodes and etcd in the guest, one backing file: ext4 mounted
//! through node A with `nbdvirt attach --connect A,B --persist`; node A is
//! killed with SIGKILL while a writer fsyncs files → the device reconnects
//! to node B, the writes go on, every checksum holds and `e2fsck -fn` is
//! clean. Both nodes take the file's shared lock (a cluster's stores are
//! shared), and B's FLUSHes sync what A wrote.

use super::harness::Guest;
use std::time::Duration;

fn node_config(node: &str) -> String {
    format!(
        r#"[server]
listen = ["unix:/run/{node}.sock"]
control = "/run/{node}-control.sock"
state_dir = "/tmp/state-{node}"
shutdown_grace = "1s"

[cluster]
etcd = ["http://127.0.0.1:2379"]
name = "guest"
node = "{node}"
peer = "tcp:127.0.0.1:1091{port}"
lease_ttl = "2s"

[[backend]]
name = "d0"
path = "/tmp/d0.img"
size = "128MiB"

[[volume]]
name = "vol0"
[[volume.extent]]
length = "128MiB"
backend = "d0"
backend_offset = 0
"#,
        port = if node == "a" { 0 } else { 1 }
    )
}

#[test]
fn attach_fails_over_to_another_cluster_node_under_mounted_ext4() {
    Guest::new()
        .name("cluster-failover")
        .tool("etcd")
        .tool("jq")
        .write("/etc/nbdvirt/a.toml", node_config("a"))
        .write("/etc/nbdvirt/b.toml", node_config("b"))
        .script(
            r#"
ip link set lo up
etcd_healthy() { wget -q -O - http://127.0.0.1:2379/health 2>/dev/null | grep -q '"health":"true"'; }
alive() { nbdvirt cluster status --json --control /run/b-control.sock | jq_true ".nodes[] | select(.node == \"$1\") | .alive == $2" >/dev/null; }

step "etcd and two nodes serving one file"
etcd --name g --data-dir /tmp/etcd --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
	--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
	--initial-cluster g=http://127.0.0.1:2380 --log-level warn >/tmp/etcd.log 2>&1 &
wait_for 60 etcd_healthy || { cat /tmp/etcd.log; fail "etcd is not healthy"; }
start_nbdvirt /etc/nbdvirt/a.toml /run/a.sock
A_PID=$NBDVIRT_PID
start_nbdvirt /etc/nbdvirt/b.toml /run/b.sock
B_PID=$NBDVIRT_PID
wait_for 20 alive a true || fail "node a is not alive in b's view"
nbdvirt cluster status --control /run/b-control.sock

step "attach through a (b listed second), mkfs, fill"
(nbdvirt attach vol0 --connect unix:/run/a.sock,unix:/run/b.sock --persist --dead-conn-timeout 60 --timeout 10 >/tmp/persist.out 2>/tmp/persist.err; echo $? >/tmp/persist.rc) &
wait_for 20 grep -q /dev/nbd /tmp/persist.out || { cat /tmp/persist.out /tmp/persist.err; fail "attach --persist printed no device"; }
dev=$(head -n 1 /tmp/persist.out)
wait_for 10 nbd_has_size $dev || fail "$dev has no size"
grep -q "server=unix:/run/a.sock" /tmp/persist.err || { cat /tmp/persist.err; fail "the first connection did not go to node a"; }
mkfs.ext4 -q -F $dev
mkdir -p /mnt/v
mount -t ext4 $dev /mnt/v
for i in 1 2 3; do
	dd if=/dev/urandom of=/mnt/v/big$i bs=1M count=4 2>/dev/null
done
(cd /mnt/v && sha256sum big*) >/tmp/sums
sync

step "kill -9 node a under an fsyncing writer"
rm -f /tmp/stop; fsync_writer & WPID=$!
wait_for 30 written_at_least 3 || fail "the writer does not get going"
kill -9 $A_PID
wait $A_PID || true
at_kill=$(count_lines /tmp/written)
echo "node a killed after $at_kill writes"
wait_for 60 grep -q "reconnected.*server=unix:/run/b.sock" /tmp/persist.err || { cat /tmp/persist.err; fail "the device did not reconnect to node b"; }
grep reconnected /tmp/persist.err
wait_for 60 written_at_least $((at_kill + 5)) || fail "writes do not resume through node b ($(count_lines /tmp/written) written)"
touch /tmp/stop
wait $WPID || fail "the writer failed"
[ ! -e /tmp/writer.failed ] || fail "the writer saw an error"
echo "files written: $(count_lines /tmp/written) ($at_kill before the kill)"
wait_for 10 alive a false || fail "node b still sees node a alive after its lease"

step "verify through node b, fsck, detach"
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after the failover"
umount /mnt/v
e2fsck -fn $dev
nbdvirt detach $dev
wait_for 15 test -e /tmp/persist.rc || fail "attach --persist did not end after the detach"
[ "$(cat /tmp/persist.rc)" -eq 0 ] || { cat /tmp/persist.err; fail "attach --persist exited with status $(cat /tmp/persist.rc)"; }
check_dmesg_allowing 'Receive control failed|Dead connection, failed to find a fallback|Connection timed out|shutting down sockets|Attempted send on closed socket|Send control failed|Send data failed|Request send failed, requeueing'
NBDVIRT_PID=$B_PID
stop_nbdvirt
echo "CLUSTER FAILOVER OK"
"#,
        )
        .run(Duration::from_secs(300))
        .assert_success()
        .assert_output_contains("CLUSTER FAILOVER OK");
}
