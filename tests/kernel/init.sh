#!/bin/sh
# /init of the nbdvirt kernel-test initramfs. Template: tests/kernel/init.sh;
# the harness (tests/kernel/harness.rs) fills in the NONCE and INSMOD
# placeholders (between @ signs).
# It mounts the pseudo file systems, loads the modules, runs /test.sh
# (tests/kernel/prelude.sh followed by the test's script), prints the exit
# marker the host waits for, and powers the VM off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /mnt /root
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname nbdvirt-guest

finish() {
	echo "@@NBDVIRT-GUEST-EXIT @NONCE@ $1@@"
	sync
	poweroff -f
	# poweroff should not return; if it does, make PID 1 exit: the kernel
	# panics, panic=-1 reboots and -no-reboot ends qemu.
	exit "$1"
}

load() {
	if ! insmod "$@"; then
		echo "init: insmod $* failed"
		dmesg | tail -n 20
		finish 125
	fi
}
@INSMOD@

echo "@@NBDVIRT-GUEST-START @NONCE@@@"
cd /tmp
/bin/sh /test.sh </dev/null
finish $?
