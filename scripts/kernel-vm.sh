#!/usr/bin/env bash
# Runs the real-kernel tests (tests/kernel.rs) with the guest console shown
# live: each test boots Debian's kernel under qemu (TCG) with nbdvirt, the
# nbd module, ext4 and fio inside. Run as root the first time: it installs
# qemu-system-x86, busybox-static, nbd-client, e2fsprogs and fio and
# downloads the kernel into ~/.cache/nbdvirt-kernel/ (see tests/kernel/harness.rs).
#
#   scripts/kernel-vm.sh                  # every kernel test
#   scripts/kernel-vm.sh reload           # tests whose name contains "reload"
#   NBDVIRT_KERNEL_KEEP=1 scripts/kernel-vm.sh fio   # keep the initramfs, print the qemu command
#
# `scripts/test.sh` (plain `cargo test`) runs the same tests, quietly.
set -euo pipefail
cd "$(dirname "$0")/.."
export NBDVIRT_KERNEL_VERBOSE="${NBDVIRT_KERNEL_VERBOSE:-1}"
exec cargo test --locked --test kernel -- --test-threads=1 --nocapture "$@"
