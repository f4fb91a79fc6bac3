#!/usr/bin/env bash
# Runs every nbdvirt test: unit, property, and integration tests against the
# real binary with real NBD clients. Run as root on Debian/Ubuntu, it first
# installs any missing package the tests need; as another user it names them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package -> a command it provides (checked with `command -v`).
declare -A PACKAGES=(
  [qemu-utils]=qemu-io
  [qemu-system-x86]=qemu-system-x86_64
  [libnbd-bin]=nbdinfo
  [fuse3]=fusermount3
  [python3-libnbd]=nbdsh
  [fio]=fio
  [jq]=jq
  [nbdkit]=nbdkit
  [nbd-client]=nbd-client
  [busybox-static]=busybox
  [e2fsprogs]=mkfs.ext4
  [mount]=losetup
  [systemd]=systemd-analyze
  [prometheus]=promtool
  [util-linux]=setpriv
  [passwd]=useradd
  [openssl]=openssl
  [gnutls-bin]=psktool
  [etcd-server]=etcd
  [etcd-client]=etcdctl
)

missing=()
for pkg in "${!PACKAGES[@]}"; do
  if ! PATH="/usr/sbin:/sbin:$PATH" command -v "${PACKAGES[$pkg]}" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done
# nbdsh needs the libnbd Python module in Debian's python3.
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
  missing+=(python3-libnbd)
fi

if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "test.sh: installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    args=()
    for pkg in "${missing[@]}"; do
      case $pkg in
        # Debian 12's qemu-system-x86 cannot sit beside a newer (backports)
        # qemu-utils: install both at the system emulator's version.
        qemu-system-x86|qemu-utils)
          v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
          args+=("qemu-system-x86=$v" "qemu-utils=$v") ;;
        *) args+=("$pkg") ;;
      esac
    done
    apt-get install -y -qq --no-install-recommends --allow-downgrades "${args[@]}" >/dev/null
  else
    echo "test.sh: missing packages: ${missing[*]} (run as root to install them, or: sudo apt-get install ${missing[*]})" >&2
    echo "test.sh: the tests that need them will fail, naming the package." >&2
  fi
fi

if ! command -v cargo >/dev/null; then
  echo "test.sh: cargo not found: install a Rust toolchain (rustup, Rust >= 1.88)" >&2
  exit 1
fi

# The tests use loop devices (block-device backend); make sure the module is there.
if [[ $(id -u) -eq 0 ]]; then modprobe loop 2>/dev/null || true; fi

# Includes the fuzz targets' bounded run (tests/fuzz: corpus replay, then
# NBDVIRT_FUZZ_SECONDS, default 60, per target): not run separately here.
cargo test --locked "$@"
