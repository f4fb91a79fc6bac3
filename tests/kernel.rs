//! Real-kernel tests: the Linux NBD client (`/dev/nbdX`), ext4 and fio
//! against nbdvirt, inside a VM (the host may have no nbd module).
//!
//! Each test boots Debian's current `linux-image-*-amd64` under
//! `qemu-system-x86_64 -accel tcg` (≈10 s per boot) with an initramfs that
//! holds busybox, the `nbdvirt` binary under test, nbd-client, e2fsprogs and
//! the nbd/ext4 modules, and runs one shell script in it. Server and kernel
//! client both run in the guest and talk over a Unix socket. As root the
//! first run installs what is missing (qemu-system-x86, busybox-static,
//! nbd-client, e2fsprogs, fio) and downloads the kernel into
//! ~/.cache/nbdvirt-kernel/; anything that cannot be had FAILS the test,
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
//! setup is the same, and keep data sizes small (tens of MiB). Planned:
//! - `nbdvirt attach` via netlink: the guest already has the nbd module (its
//!   generic netlink family is registered on load); call `nbdvirt attach …`
//!   instead of `nbd_attach` and check /sys/block/nbd0/size the same way.
//! - live migration: two `nbdvirt serve` processes in one guest (two configs,
//!   two sockets), ext4 mounted on /dev/nbd0 with a writer loop (see
//!   `reload_swaps_tables_under_mounted_ext4`), then the checksum/fsck tail.
//! - kill -9 + reconnect: `kill -9 $NBDVIRT_PID`, restart with
//!   `start_nbdvirt`, re-attach (nbd-client `-persist`, or netlink
//!   reconfigure), then `check_dmesg` and verify checksums.
#[path = "kernel/harness.rs"]
mod harness;

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
        .write("/cfg/template.toml", &template)
        .script(
            r#"
render() { sed "s/@STORE@/$1/" /cfg/template.toml > /cfg/nbdvirt.toml.new && mv /cfg/nbdvirt.toml.new /cfg/nbdvirt.toml; }
generation() { nbdvirt status --config /cfg/nbdvirt.toml | sed -n 's/^volume vol0 .* generation \([0-9]*\) .*/\1/p'; }

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
