//! Real-kernel tests: the Linux NBD client (`/dev/nbdX`), ext4 and fio
//! against nbdvirt, inside a VM (the host may have no nbd module).
//!
//! Each test boots Debian's current `linux-image-*-amd64` under
//! `qemu-system-x86_64 -accel tcg` (≈10 s per boot) with an initramfs that
//! holds busybox, the `nbdvirt` binary under test, nbd-client, e2fsprogs and
//! the nbd/ext4 modules, and runs one shell script in it. Server and kernel
//! client both run in the guest and talk over a Unix socket. As root the
//! first run installs what is missing (qemu-system-x86, busybox-static,
//! nbd-client, e2fsprogs, fio; openssl and gnutls-bin for TLS credentials)
//! and downloads the kernel into ~/.cache/nbdvirt-kernel/; anything that
//! cannot be had FAILS the test,
//! naming the package. Harness: tests/kernel/harness.rs (API, environment
//! knobs such as NBDVIRT_KERNEL_VERBOSE=1), guest /init:
//! tests/kernel/init.sh, script helpers: tests/kernel/prelude.sh.
//! `scripts/kernel-vm.sh [FILTER]` runs these tests with the console live.
//!
//! # Harness API
//!
//! ```ignore
//! let result = Guest::new()                        // busybox, nbdvirt, nbd-client, e2fsprogs, nbd+ext4 modules
//!     .name("my-scenario")                         // for log lines
//!     .tool("fio")                                 // any host command, with its shared libraries
//!     .write("/cfg/nbdvirt.toml", config_text)     // a file from a string
//!     .file("/data/x.img", "/host/path")           // a file from the host
//!     .module("dm_mod")                            // more kernel modules (dependencies resolved)
//!     .script(r#"start_nbdvirt /cfg/nbdvirt.toml /run/nbd.sock
//!                nbd_attach /run/nbd.sock vol0 /dev/nbd0"#)
//!     .run(Duration::from_secs(90));               // qemu is killed after this
//! result.assert_success();                         // else panics with the whole console
//! result.output();                                 // what the script printed
//! ```
//!
//! The script is busybox ash run with `set -eu` after tests/kernel/prelude.sh,
//! which provides `step`, `fail`, `wait_for SECS CMD…`, `start_nbdvirt CFG
//! SOCK` / `stop_nbdvirt` (log in /tmp/nbdvirt.log, pid in $NBDVIRT_PID),
//! `nbd_attach SOCK EXPORT DEV [opts]` / `nbd_detach DEV`, `check_dmesg`.
//! On failure the script's trap prints the nbdvirt log and dmesg.
//!
//! # Extension point: later scenarios
//!
//! Add a `#[test]` below that builds a `Guest` and calls `run(...)
//! .assert_success()`. Every boot costs ≈10 s of CPU under TCG and boots are
//! serialized, so prefer adding checks to an existing guest script when the
//! setup is the same, and keep data sizes small (tens of MiB). Covered so
//! far: nbd-client + ext4, fio verify, reload under ext4,
//! `nbdvirt attach` (netlink, 4 connections, `--ioctl`; detach by device and
//! by volume), live migration under a writer, and kill -9 + restart of the
//! server with `nbdvirt attach --persist` reconnecting (NBD_CMD_RECONFIGURE),
//! and a mirror leg failing (`nbdvirt fault`) under ext4, a spare taking over,
//! and `nbdvirt attach` over TLS through its relays (tests/kernel/tls.rs),
//! and `attach --connect A,B --persist` failing over from a killed cluster
//! node to another (tests/kernel/cluster.rs, with etcd in the guest).
//! Extra helpers for such scripts: `check_dmesg_allowing ERE` (expected
//! kernel messages, e.g. a dead link), `jq_assert FILE FILTER MSG`, `CMD | jq_true FILTER` (with
//! `.tool("jq")`), `count_lines FILE`.
mod common;
#[path = "kernel/harness.rs"]
mod harness;
/// `nbdvirt attach` over TLS (relays in the attach process).
#[path = "kernel/tls.rs"]
mod tls;
/// `nbdvirt attach --connect A,B` failing over between cluster nodes.
#[path = "kernel/cluster.rs"]
mod cluster;

use harness::Guest;
use std::time::Duration;

/// A 256 MiB volume over two sparse files on the guest's tmpfs (the second
/// extent at an offset inside its file), served on /run/nbd.sock.
const TWO_FILE_CONFIG: &str = r#"
[server]
listen = ["unix:/run/nbd.sock"]
control = "/run/nbdvirt-control.sock"
state_dir = "/tmp/state"
shutdown_grace = "1s"

[[backend]]
name = "d0"
path = "/tmp/d0.img"
size = "128MiB"

[[backend]]
name = "d1"
path = "/tmp/d1.img"
size = "160MiB"

[[volume]]
name = "vol0"

[[volume.extent]]
length = "128MiB"
backend = "d0"

[[volume.extent]]
length = "128MiB"
backend = "d1"
backend_offset = "32MiB"
"#;

/// nbd-client attaches vol0; ext4 made, filled, checked, re-read after a
/// reconnect (so that nothing comes from the page cache), detached.
#[test]
fn nbd_client_ext4_roundtrip() {
    Guest::new()
        .name("ext4-roundtrip")
        .write("/cfg/nbdvirt.toml", TWO_FILE_CONFIG)
        .script(
            r#"
step "serve and attach"
start_nbdvirt /cfg/nbdvirt.toml /run/nbd.sock
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
size=$(cat /sys/block/nbd0/size)
[ "$size" -eq 524288 ] || fail "/sys/block/nbd0/size is $size, expected 524288 (256 MiB)"
echo "nbd0 size: $size sectors"

step "mkfs.ext4 + mount + write"
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/v
mount -t ext4 /dev/nbd0 /mnt/v
mkdir -p /mnt/v/dir
i=0
for mib in 1 2 5 9 13; do
	i=$((i + 1))
	dd if=/dev/urandom of=/mnt/v/dir/f$i bs=1M count=$mib 2>/dev/null
done
# Many small files too (metadata-heavy).
for i in $(seq 1 200); do echo "small file $i $RANDOM" > /mnt/v/dir/s$i; done
(cd /mnt/v && find dir -type f | sort | xargs sha256sum) > /tmp/sums
wc -l < /tmp/sums
sync
umount /mnt/v

step "e2fsck + detach"
e2fsck -fn /dev/nbd0
nbd_detach /dev/nbd0
# Both backing files were written (ext4 spreads metadata over the device).
for f in /tmp/d0.img /tmp/d1.img; do
	used=$(du -k $f | cut -f1)
	echo "$f: $used KiB allocated"
	[ "$used" -gt 0 ] || fail "$f has no data"
done

step "reattach + fsck + verify"
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
e2fsck -fn /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after reattach"
umount /mnt/v
nbd_detach /dev/nbd0

check_dmesg
stop_nbdvirt
echo "ROUNDTRIP OK"
"#,
        )
        .run(Duration::from_secs(360))
        .assert_success()
        .assert_output_contains("ROUNDTRIP OK");
}

/// fio with verify through the kernel block device, psync and libaio, the
/// second range crossing the boundary between the two extents.
#[test]
fn fio_verify_on_nbd_device() {
    Guest::new()
        .name("fio")
        .tool("fio")
        .write("/cfg/nbdvirt.toml", TWO_FILE_CONFIG)
        .script(
            r#"
start_nbdvirt /cfg/nbdvirt.toml /run/nbd.sock
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
common="--filename=/dev/nbd0 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --error_dump=1 --group_reporting --eta=never"

step "fio psync randwrite+verify 4k"
fio --name=psync --ioengine=psync --rw=randwrite --bs=4k --offset=0 --size=4M $common

step "fio libaio qd16 randwrite+verify 4k-128k across the extent boundary"
fio --name=aio --ioengine=libaio --iodepth=16 --rw=randwrite --bsrange=4k-128k --offset=120M --size=16M $common

step "fio libaio qd8 write+verify, 2 jobs"
fio --name=seq --ioengine=libaio --iodepth=8 --rw=write --bs=64k --offset=200M --size=8M --numjobs=2 --offset_increment=16M $common

nbd_detach /dev/nbd0
check_dmesg
stop_nbdvirt
echo "FIO OK"
"#,
        )
        .run(Duration::from_secs(360))
        .assert_success()
        .assert_output_contains("FIO OK");
}

/// While files are written to a mounted ext4, the volume's first extent is
/// re-cut 20 times between two backend names (`a`/`b`, `shared = true`) for
/// the same file and the config is reloaded: every reload swaps the table
/// under live I/O (pause–drain–swap). Nothing may fail, every checksum must
/// hold, fsck must be clean.
#[test]
fn reload_swaps_tables_under_mounted_ext4() {
    let template = TWO_FILE_CONFIG
        .replace(
            "[[backend]]\nname = \"d0\"\npath = \"/tmp/d0.img\"\nsize = \"128MiB\"\n",
            "[[backend]]\nname = \"a\"\npath = \"/tmp/d0.img\"\nsize = \"128MiB\"\nshared = true\n\n\
             [[backend]]\nname = \"b\"\npath = \"/tmp/d0.img\"\nsize = \"128MiB\"\nshared = true\n",
        )
        .replace("backend = \"d0\"", "backend = \"@STORE@\"");
    assert!(template.contains("name = \"b\"") && template.contains("@STORE@"), "template:\n{template}");
    Guest::new()
        .name("reload")
        .tool("jq")
        .write("/cfg/template.toml", &template)
        .script(
            r#"
render() { sed "s/@STORE@/$1/" /cfg/template.toml > /cfg/nbdvirt.toml.new && mv /cfg/nbdvirt.toml.new /cfg/nbdvirt.toml; }
generation() { nbdvirt status --config /cfg/nbdvirt.toml --json | jq_true '.volumes[] | select(.name == "vol0") | .generation'; }

step "serve, attach, mkfs, mount"
render a
start_nbdvirt /cfg/nbdvirt.toml /run/nbd.sock
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/v
mount -t ext4 /dev/nbd0 /mnt/v
g0=$(generation)
echo "generation before: $g0"

# Writer: random data made on tmpfs (its checksum is the truth), copied into
# ext4 with fsync so that writes reach the device during the swaps.
writer() {
	i=0
	while [ ! -e /tmp/stop ]; do
		i=$((i + 1))
		dd if=/dev/urandom of=/tmp/src bs=16k count=$((1 + i % 16)) 2>/dev/null
		echo "$(sha256sum < /tmp/src | cut -d' ' -f1)  w$i" >> /tmp/sums
		dd if=/tmp/src of=/mnt/v/w$i bs=16k conv=fsync 2>/dev/null || { echo "writer: write w$i failed"; touch /tmp/writer.failed; return 1; }
	done
	echo $i > /tmp/writer.count
}
# Reader: O_DIRECT reads of the re-cut extent (the first 128 MiB), so reads
# are in flight during the swaps too.
reader() {
	n=0
	while [ ! -e /tmp/stop ]; do
		n=$((n + 1))
		dd if=/dev/nbd0 of=/dev/null bs=256k count=8 skip=$(( (n * 37) % 500 )) iflag=direct 2>/dev/null || { echo "reader: read failed"; touch /tmp/reader.failed; return 1; }
	done
	echo $n > /tmp/reader.count
}
writer &
wpid=$!
reader &
rpid=$!
usleep 500000

step "20 reloads alternating a/b"
for n in $(seq 1 20); do
	if [ $((n % 2)) -eq 1 ]; then store=b; else store=a; fi
	render $store
	out=$(nbdvirt reload --config /cfg/nbdvirt.toml 2>&1) || { echo "$out"; fail "reload $n (-> $store) failed"; }
	usleep 100000
done
touch /tmp/stop
wait $wpid || fail "writer failed"
wait $rpid || fail "reader failed"
[ ! -e /tmp/writer.failed ] || fail "writer saw an error"
[ ! -e /tmp/reader.failed ] || fail "reader saw an error"
echo "files written during the reloads: $(cat /tmp/writer.count), direct reads: $(cat /tmp/reader.count)"
[ "$(cat /tmp/writer.count)" -ge 5 ] || fail "too few writes overlapped the reloads"
g1=$(generation)
echo "generation after: $g1"
[ "$g1" -eq $((g0 + 20)) ] || fail "expected generation $((g0 + 20)) after 20 swaps, got $g1"
nbdvirt status --config /cfg/nbdvirt.toml

step "verify, fsck, reattach, verify again"
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ while mounted"
umount /mnt/v
e2fsck -fn /dev/nbd0
nbd_detach /dev/nbd0
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
mount -t ext4 /dev/nbd0 /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after reattach"
umount /mnt/v
nbd_detach /dev/nbd0
check_dmesg
stop_nbdvirt
echo "RELOAD OK"
"#,
        )
        .run(Duration::from_secs(360))
        .assert_success()
        .assert_output_contains("RELOAD OK");
}

/// `nbdvirt attach` through the kernel's generic-netlink `nbd` family: the
/// device it prints has the volume's size and backend identifier and is
/// listed by `nbdvirt attached`; ext4 made, filled, checked, detached by
/// device. Attached again with 4 connections (the server must see 4):
/// re-verified, fio with verify through ext4, detached by volume name.
/// Last, the `--ioctl` fallback (foreground, one connection): fsck, mount,
/// verify, detach. The config is the system one (/etc/nbdvirt/nbdvirt.toml),
/// so the commands run without `--config`/`--connect`.
#[test]
fn netlink_attach_ext4_multiconn_and_ioctl() {
    Guest::new()
        .name("attach")
        .tool("fio")
        .tool("jq")
        .write("/etc/nbdvirt/nbdvirt.toml", TWO_FILE_CONFIG)
        .script(
            r#"
IDENT=nbdvirt:vol0@unix:/run/nbd.sock
vol0_connections() { nbdvirt status --json | jq_true ".volumes[] | select(.name == \"vol0\") | .connections == $1" >/dev/null; }
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock

step "nbdvirt attach vol0 (netlink)"
dev=$(nbdvirt attach vol0) || fail "nbdvirt attach vol0 failed"
echo "attach printed: $dev"
case "$dev" in /dev/nbd[0-9]*) ;; *) fail "attach printed '$dev', expected /dev/nbdN" ;; esac
n=${dev#/dev/}
size=$(cat /sys/block/$n/size)
[ "$size" -eq 524288 ] || fail "/sys/block/$n/size is $size, expected 524288 (256 MiB)"
backend=$(cat /sys/block/$n/backend)
[ "$backend" = "$IDENT" ] || fail "/sys/block/$n/backend is '$backend', expected '$IDENT'"
nbdvirt attached
nbdvirt attached --json >/tmp/attached.json
jq_assert /tmp/attached.json ".devices[] | select(.device == \"$dev\") | .connected and .backend == \"$IDENT\" and .size == 268435456" "nbdvirt attached --json does not list $dev as connected to $IDENT"
nbdvirt status --json >/tmp/status.json
jq_assert /tmp/status.json '.volumes[] | select(.name == "vol0") | .connections == 1' "the server does not see 1 connection on vol0"

if nbdvirt attach vol0 $dev 2>/tmp/attach.err; then fail "a second attach to $dev succeeded"; fi
cat /tmp/attach.err
grep -q busy /tmp/attach.err || fail "attaching to a busy device: unexpected message"
if nbdvirt attach nosuchvol 2>/tmp/attach.err; then fail "attaching an unknown volume succeeded"; fi
cat /tmp/attach.err

step "mkfs.ext4 + mount + write"
mkfs.ext4 -q -F $dev
mkdir -p /mnt/v
mount -t ext4 $dev /mnt/v
mkdir -p /mnt/v/dir
i=0
for mib in 1 3 7 12; do
	i=$((i + 1))
	dd if=/dev/urandom of=/mnt/v/dir/f$i bs=1M count=$mib 2>/dev/null
done
for i in $(seq 1 100); do echo "small file $i $RANDOM" >/mnt/v/dir/s$i; done
(cd /mnt/v && find dir -type f | sort | xargs sha256sum) >/tmp/sums
sync
umount /mnt/v
e2fsck -fn $dev

step "nbdvirt detach $dev"
nbdvirt detach $dev
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after nbdvirt detach"
[ ! -e /sys/block/$n/pid ] || fail "/sys/block/$n/pid still exists after detach"
nbdvirt attached --json >/tmp/attached.json
jq_assert /tmp/attached.json "all(.devices[]; .connected | not)" "a device is still connected after detach"
nbdvirt attached

step "nbdvirt attach vol0 --connections 4"
nbdvirt attach vol0 --connections 4 --json >/tmp/attach.json || fail "nbdvirt attach vol0 --connections 4 failed"
cat /tmp/attach.json
jq_assert /tmp/attach.json '.connections == 4 and .interface == "netlink" and .size == 268435456' "unexpected attach --json output"
dev=$(jq -r .device /tmp/attach.json)
n=${dev#/dev/}
[ "$(cat /sys/block/$n/size)" -eq 524288 ] || fail "/sys/block/$n/size is not 256 MiB"
# blk-mq caps the hardware queues (one per connection) at the vCPU count.
echo "hardware queues: $(ls /sys/block/$n/mq | wc -l)"
nbdvirt status --json >/tmp/status.json
jq_assert /tmp/status.json '.volumes[] | select(.name == "vol0") | .connections == 4' "the server does not see 4 connections on vol0"
e2fsck -fn $dev
mount -t ext4 $dev /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after re-attach with 4 connections"
fio --name=mc --directory=/mnt/v --ioengine=libaio --direct=1 --iodepth=8 --numjobs=4 --size=6M --rw=randwrite --bsrange=4k-64k \
	--verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting --eta=never >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio failed"; }
grep -E "err=|READ:|WRITE:" /tmp/fio.out
rm -f /mnt/v/mc.*
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/v/dir/m$i bs=1M count=2 2>/dev/null; done
(cd /mnt/v && find dir -type f | sort | xargs sha256sum) >/tmp/sums
umount /mnt/v
e2fsck -fn $dev

step "nbdvirt detach vol0 (by volume name)"
nbdvirt detach vol0
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after nbdvirt detach vol0"
wait_for 10 vol0_connections 0 || fail "the server still sees connections on vol0 after detach"
nbdvirt detach vol0 2>/tmp/detach.err && fail "detaching vol0 twice succeeded"
cat /tmp/detach.err

step "nbdvirt attach vol0 /dev/nbd1 --ioctl (foreground, in the background)"
(nbdvirt attach vol0 /dev/nbd1 --ioctl --connect unix:/run/nbd.sock >/tmp/ioctl.out 2>/tmp/ioctl.err; echo $? >/tmp/ioctl.rc) &
wait_for 30 test -s /tmp/ioctl.out || { cat /tmp/ioctl.err; fail "attach --ioctl printed nothing"; }
# The device is printed once it is usable (has its size), not before.
[ "$(cat /sys/block/nbd1/size)" -eq 524288 ] || fail "/sys/block/nbd1/size is $(cat /sys/block/nbd1/size) once attach --ioctl printed the device, expected 524288"
[ "$(cat /tmp/ioctl.out)" = /dev/nbd1 ] || fail "attach --ioctl printed '$(cat /tmp/ioctl.out)'"
e2fsck -fn /dev/nbd1
mount -t ext4 /dev/nbd1 /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ through the ioctl attach"
dd if=/dev/urandom of=/mnt/v/dir/i1 bs=1M count=2 conv=fsync 2>/dev/null
umount /mnt/v
e2fsck -fn /dev/nbd1
nbdvirt detach /dev/nbd1
wait_for 15 test -e /tmp/ioctl.rc || fail "attach --ioctl did not return after detach"
[ "$(cat /tmp/ioctl.rc)" -eq 0 ] || { cat /tmp/ioctl.err; fail "attach --ioctl exited with status $(cat /tmp/ioctl.rc)"; }
wait_for 10 nbd_is_free /dev/nbd1 || fail "/dev/nbd1 still has a size after detach"
cat /tmp/ioctl.err

check_dmesg
stop_nbdvirt
echo "ATTACH OK"
"#,
        )
        .run(Duration::from_secs(360))
        .assert_success()
        .assert_output_contains("ATTACH OK");
}

/// Live migration, then a server crash, under a mounted ext4 that is being
/// written, with the device attached by `nbdvirt attach` (netlink).
///
/// 1. vol0 (over d0 and d1) is moved onto a third backend, d2, with
///    `migrate start --rate 8MiB --wait` while a writer loop fsyncs files:
///    the copy must overlap the writes; afterwards every extent is on d2,
///    `migrate status` says completed, checksums and fsck hold; d0 and d1
///    are then zeroed, so every later read must come from d2.
/// 2. Re-attached with `--persist` (the attach process stays, watching for
///    the kernel's link-dead notification), the writer runs again and the
///    server is killed with SIGKILL and restarted: the kernel holds I/O,
///    the attach process reconnects (NBD_CMD_RECONFIGURE), the writer
///    carries on, the restarted server still maps vol0 onto d2, checksums
///    and fsck hold, and the kernel reports no I/O error (its dead-link
///    messages are expected). Detaching ends the attach process.
#[test]
fn migrate_and_server_restart_under_mounted_ext4() {
    let config = TWO_FILE_CONFIG.replace(
        "[[volume]]\nname = \"vol0\"\n",
        "[[backend]]\nname = \"d2\"\npath = \"/tmp/d2.img\"\nsize = \"256MiB\"\n\n[[volume]]\nname = \"vol0\"\n",
    );
    assert!(config.contains("name = \"d2\""), "config:\n{config}");
    Guest::new()
        .name("migrate-restart")
        // /tmp (half the memory) holds d0, d1 and d2: up to 256 + 256 MiB
        // once the volume is full and copied.
        .memory_mib(1536)
        .tool("jq")
        .write("/etc/nbdvirt/nbdvirt.toml", &config)
        .script(
            r#"
# writer TAG: rewrites files /mnt/v/TAG0..TAG63 in turn with random data
# and fsync until /tmp/stop; the latest checksum of each file goes to
# /tmp/sum.d/, each completed write is a line in /tmp/written.TAG. The
# files are rewritten, not added, so that however fast the guest writes
# the data stays bounded (CI saw a fast writer fill the 256 MiB volume and
# the guest's /tmp, which holds the backing files and is half its memory).
writer() {
	i=0
	mkdir -p /tmp/sum.d
	while [ ! -e /tmp/stop ]; do
		i=$((i + 1))
		f=$1$((i % 64))
		dd if=/dev/urandom of=/tmp/src.$1 bs=16k count=$((1 + i % 16)) 2>/dev/null
		dd if=/tmp/src.$1 of=/mnt/v/$f bs=16k conv=fsync 2>/dev/null || { echo "writer: write $f ($i) failed"; touch /tmp/writer.failed; return 1; }
		echo "$(sha256sum </tmp/src.$1 | cut -d' ' -f1)  $f" >/tmp/sum.d/$f
		echo $i >>/tmp/written.$1
	done
}
# Checks /tmp/sums (the big files) and the latest checksum of every
# writer file.
sums_hold() { cat /tmp/sums /tmp/sum.d/* 2>/dev/null >/tmp/all.sums; (cd /mnt/v && sha256sum -c -s /tmp/all.sums); }
start_writer() { rm -f /tmp/stop; writer $1 & WPID=$!; }
stop_writer() {
	touch /tmp/stop
	wait $WPID || fail "the writer failed"
	[ ! -e /tmp/writer.failed ] || fail "the writer saw an error"
}
written_at_least() { [ "$(count_lines /tmp/written.$1)" -ge "$2" ]; }
vol0_backends() { nbdvirt status --json | jq -c '[.volumes[] | select(.name == "vol0") | .extents[].backend] | unique'; }

step "serve, attach, mkfs, fill"
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock
dev=$(nbdvirt attach vol0) || fail "nbdvirt attach vol0 failed"
echo "attached $dev; vol0 on $(vol0_backends)"
mkfs.ext4 -q -F $dev
mkdir -p /mnt/v
mount -t ext4 $dev /mnt/v
for i in 1 2 3 4; do
	dd if=/dev/urandom of=/mnt/v/big$i bs=1M count=4 2>/dev/null
done
(cd /mnt/v && sha256sum big*) >/tmp/sums
sync

step "migrate vol0 -> d2 at 8 MiB/s under a writer"
start_writer m
wait_for 30 written_at_least m 2 || fail "the writer does not get going"
before=$(count_lines /tmp/written.m)
t0=$(date +%s)
nbdvirt migrate start vol0 --to d2 --rate 8MiB --wait >/tmp/migrate.out 2>&1 || { cat /tmp/migrate.out; fail "migration failed"; }
t1=$(date +%s)
after=$(count_lines /tmp/written.m)
stop_writer
tail -n 3 /tmp/migrate.out
echo "migration took $((t1 - t0)) s; files written during it: $((after - before))"
[ $((after - before)) -ge 3 ] || fail "too few writes overlapped the migration"
nbdvirt migrate status --json >/tmp/mstatus.json
jq_assert /tmp/mstatus.json '.migrations[] | select(.volume == "vol0") | .state == "completed" and .dest == "d2"' "migrate status does not say completed"
nbdvirt status --json >/tmp/status.json
jq_assert /tmp/status.json '[.volumes[] | select(.name == "vol0") | .extents[].backend] | unique == ["d2"]' "vol0 is not entirely on d2 after the migration"
echo "vol0 on $(vol0_backends); d2.img: $(du -k /tmp/d2.img | cut -f1) KiB allocated"
sums_hold || fail "checksums differ after the migration"
umount /mnt/v
e2fsck -fn $dev
nbdvirt detach $dev
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after detach"
check_dmesg
# vol0 no longer uses d0 and d1: zero them (same size) so that what is
# read from now on can only come from d2.
for f in /tmp/d0.img /tmp/d1.img; do
	s=$(stat -c %s $f)
	truncate -s 0 $f
	truncate -s $s $f
done

step "attach --persist; verify after the migration (d0, d1 zeroed)"
(nbdvirt attach vol0 --persist --dead-conn-timeout 60 --timeout 10 >/tmp/persist.out 2>/tmp/persist.err; echo $? >/tmp/persist.rc) &
wait_for 20 grep -q /dev/nbd /tmp/persist.out || { cat /tmp/persist.out /tmp/persist.err; fail "attach --persist printed no device"; }
dev=$(head -n 1 /tmp/persist.out)
echo "attached $dev (persist)"
wait_for 10 nbd_has_size $dev || fail "$dev has no size"
mount -t ext4 $dev /mnt/v
sums_hold || fail "checksums differ after re-attach (from d2 only)"

step "kill -9 the server under writes, restart it"
start_writer k
wait_for 30 written_at_least k 3 || fail "the writer does not get going"
kill -9 $NBDVIRT_PID
wait $NBDVIRT_PID || true
NBDVIRT_PID=
at_kill=$(count_lines /tmp/written.k)
echo "server killed after $at_kill writes"
sleep 2
rm -f /run/nbd.sock
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock
wait_for 60 grep -q reconnected /tmp/persist.err || { cat /tmp/persist.err; fail "the attach process did not reconnect"; }
wait_for 60 written_at_least k $((at_kill + 5)) || fail "writes do not resume after the restart ($(count_lines /tmp/written.k) written)"
stop_writer
echo "files written: $(count_lines /tmp/written.k) ($at_kill before the kill)"
echo "vol0 on $(vol0_backends) after the restart"
[ "$(vol0_backends)" = '["d2"]' ] || fail "the restarted server does not map vol0 onto d2"

step "verify, fsck, detach"
sums_hold || fail "checksums differ after the restart"
umount /mnt/v
e2fsck -fn $dev
nbdvirt detach vol0
wait_for 10 nbd_is_free $dev || fail "$dev still has a size after detach"
wait_for 15 test -e /tmp/persist.rc || fail "attach --persist did not end after the detach"
echo "--- attach --persist output (exit status $(cat /tmp/persist.rc))"
cat /tmp/persist.out /tmp/persist.err
[ "$(cat /tmp/persist.rc)" -eq 0 ] || fail "attach --persist exited with status $(cat /tmp/persist.rc)"
dmesg | grep -q "reconnected socket" || fail "the kernel did not log 'reconnected socket'"
# A request in flight when the server died is requeued and sent again
# after the reconnect (the checksums above prove it landed).
check_dmesg_allowing 'Receive control failed|Dead connection, failed to find a fallback|Connection timed out|shutting down sockets|Attempted send on closed socket|Send control failed|Send data failed|Request send failed, requeueing'
stop_nbdvirt
echo "MIGRATE RESTART OK"
"#,
        )
        .run(Duration::from_secs(420))
        .assert_success()
        .assert_output_contains("MIGRATE RESTART OK");
}

/// vol0 (128 MiB) mirrored on `a` (offset 0) and `b` (offset 16 MiB), and a
/// spare `s` of `b`'s size: on a failure of `b` the spare joins at b's offset.
const MIRROR_CONFIG: &str = r#"
[server]
listen = ["unix:/run/nbd.sock"]
control = "/run/nbdvirt-control.sock"
state_dir = "/tmp/state"
shutdown_grace = "1s"

[[backend]]
name = "a"
path = "/tmp/a.img"
size = "128MiB"

[[backend]]
name = "b"
path = "/tmp/b.img"
size = "144MiB"

[[backend]]
name = "s"
path = "/tmp/s.img"
size = "144MiB"
spare = true

[[volume]]
name = "vol0"

[[volume.extent]]
length = "128MiB"
mirror = [ { backend = "a", backend_offset = 0 }, { backend = "b", backend_offset = "16MiB" } ]
"#;

/// A mirror leg fails under a mounted ext4 that is being written: ext4 on
/// a 2-leg mirror (nbd-client), a writer fsyncing files; `nbdvirt fault b
/// --error eio` fails the leg, the spare joins and resyncs, then `b` is
/// healed and re-added, all under the writer. The kernel must see no I/O
/// error, fsck must be clean, every checksum must hold (also after a
/// re-attach), and every leg must hold the same bytes (`cmp` of the legs'
/// ranges, offsets from `status --json`).
#[test]
fn mirror_leg_fault_and_spare_under_mounted_ext4() {
    Guest::new()
        .name("mirror-fault")
        .tool("jq")
        .write("/etc/nbdvirt/nbdvirt.toml", MIRROR_CONFIG)
        .script(
            r#"
leg_is() { nbdvirt mirror status vol0 --json | jq_true ".mirrors[0].legs[] | select(.backend == \"$1\") | .state == \"$2\"" >/dev/null; }
legs() { nbdvirt mirror status vol0 --json | jq -c '[.mirrors[0].legs[] | [.backend, .state]]'; }

step "serve (b resyncs from a), attach, mkfs, fill"
start_nbdvirt /etc/nbdvirt/nbdvirt.toml /run/nbd.sock
wait_for 60 leg_is b in_sync || { legs; fail "leg b of the configured mirror is not in sync"; }
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/v
mount -t ext4 /dev/nbd0 /mnt/v
for i in 1 2 3 4; do
	dd if=/dev/urandom of=/mnt/v/big$i bs=1M count=4 2>/dev/null
done
(cd /mnt/v && sha256sum big*) >/tmp/sums
sync
echo "legs: $(legs)"

step "fault b (EIO) under a writer: b fails, the spare s resyncs"
fsync_writer &
wpid=$!
wait_for 30 written_at_least 3 || fail "the writer does not get going"
nbdvirt fault b --error eio
wait_for 30 leg_is b failed || { legs; fail "leg b did not fail"; }
at_fail=$(count_lines /tmp/written)
wait_for 60 leg_is s in_sync || { legs; fail "the spare s did not get in sync"; }
echo "legs: $(legs)"
wait_for 30 written_at_least $((at_fail + 3)) || fail "writes do not go on after the failure"
grep -q "spare added in place of the failed leg" /tmp/nbdvirt.log || fail "no spare added in the log"

step "heal b and re-add it under the writer"
nbdvirt fault b --error off
nbdvirt mirror readd vol0 --leg b --wait >/tmp/readd.out 2>&1 || { cat /tmp/readd.out; fail "mirror readd failed"; }
tail -n 1 /tmp/readd.out
at_readd=$(count_lines /tmp/written)
wait_for 30 written_at_least $((at_readd + 3)) || fail "writes do not go on after the re-add"
touch /tmp/stop
wait $wpid || fail "the writer failed"
[ ! -e /tmp/writer.failed ] || fail "the writer saw an error"
echo "files written: $(count_lines /tmp/written) ($at_fail when b failed, $at_readd when b was back)"
echo "legs: $(legs)"
for l in a b s; do leg_is $l in_sync || { legs; fail "leg $l is not in sync"; }; done

step "verify, fsck, reattach, verify again"
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ while mounted"
umount /mnt/v
e2fsck -fn /dev/nbd0
nbd_detach /dev/nbd0
nbd_attach /run/nbd.sock vol0 /dev/nbd0 -b 4096
e2fsck -fn /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt/v
(cd /mnt/v && sha256sum -c -s /tmp/sums) || fail "checksums differ after reattach"
umount /mnt/v
nbd_detach /dev/nbd0

step "every leg holds the same bytes"
nbdvirt status --json | jq -r '.volumes[] | select(.name == "vol0") | .extents[0] | .length as $n | .legs[] | "\(.backend) \(.backend_offset) \($n)"' >/tmp/legs
cat /tmp/legs
[ "$(count_lines /tmp/legs)" -eq 3 ] || fail "expected 3 legs"
read -r first off0 len </tmp/legs
[ "$first" = a ] && [ "$off0" -eq 0 ] || fail "unexpected first leg"
grep -q "^s 16777216 " /tmp/legs || fail "the spare is not at the failed leg's offset"
while read -r name off n; do
	[ "$name" = a ] && continue
	cmp -n "$n" /tmp/a.img "/tmp/$name.img" 0 "$off" || fail "legs a and $name differ"
	echo "a@0 and $name@$off: $n bytes identical"
done </tmp/legs

check_dmesg
stop_nbdvirt
echo "MIRROR FAULT OK"
"#,
        )
        .run(Duration::from_secs(420))
        .assert_success()
        .assert_output_contains("MIRROR FAULT OK");
}
