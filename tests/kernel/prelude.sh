# Sourced at the top of every guest script (/test.sh = this file + the
# test's script). Busybox ash; `set -eu` is on, so any failing command ends
# the script with its status. On a non-zero exit the nbdvirt log and the
# end of dmesg are printed to the console.
set -eu

NBDVIRT_LOG=/tmp/nbdvirt.log
NBDVIRT_PID=

# step TEXT: a visible landmark in the console.
step() { echo "=== $*"; }

# fail TEXT: end the script with status 1.
fail() {
	echo "FAIL: $*"
	exit 1
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
	_limit=$(($1 * 10))
	shift
	_i=0
	until "$@" >/dev/null 2>&1; do
		_i=$((_i + 1))
		[ "$_i" -lt "$_limit" ] || return 1
		usleep 100000
	done
}

# start_nbdvirt CONFIG SOCKET: serve CONFIG in the background (log in
# $NBDVIRT_LOG, pid in $NBDVIRT_PID) and wait until SOCKET accepts.
start_nbdvirt() {
	nbdvirt serve --config "$1" >>"$NBDVIRT_LOG" 2>&1 &
	NBDVIRT_PID=$!
	wait_for 30 test -S "$2" || fail "nbdvirt did not create $2 within 30 s"
}

# stop_nbdvirt: SIGTERM and wait for a clean exit (status 0).
stop_nbdvirt() {
	[ -n "$NBDVIRT_PID" ] || return 0
	kill -TERM "$NBDVIRT_PID"
	_rc=0
	wait "$NBDVIRT_PID" || _rc=$?
	NBDVIRT_PID=
	[ "$_rc" -eq 0 ] || fail "nbdvirt exited with status $_rc after SIGTERM"
}

# nbd_has_size DEV / nbd_is_free DEV: the device's size is non-zero / zero.
nbd_has_size() { [ "$(cat "/sys/block/${1#/dev/}/size")" -gt 0 ]; }
nbd_is_free() { [ "$(cat "/sys/block/${1#/dev/}/size")" -eq 0 ]; }

# nbd_attach SOCKET EXPORT DEV [nbd-client options]: attach and wait for the size.
nbd_attach() {
	_sock=$1 _export=$2 _dev=$3
	shift 3
	nbd-client -unix "$_sock" -N "$_export" "$_dev" "$@" || fail "nbd-client $_export $_dev failed"
	wait_for 10 nbd_has_size "$_dev" || fail "$_dev has size 0 after nbd-client"
}

# nbd_detach DEV: disconnect and wait until the kernel has let go.
nbd_detach() {
	nbd-client -d "$1" || fail "nbd-client -d $1 failed"
	wait_for 10 nbd_is_free "$1" || fail "$1 still has a size after nbd-client -d"
}

# check_dmesg [EXTRA_ERE]: fail on block-layer, nbd or ext4 errors (or
# EXTRA_ERE) in the kernel log. Deliberately specific: under a loaded host
# TCG guests can print RCU-stall or soft-lockup traces that are not ours.
DMESG_ERRORS='I/O error|blk_update_request|critical (medium|target) error|Buffer I/O|EXT4-fs (error|warning)|Remounting filesystem read-only|nbd.*(error|failed|timed out|Suspicious|Unexpected reply|Double reply|Dead connection|requeueing|closed socket|invalid socket)|WARNING: .* at (drivers/block|block/|fs/ext4|fs/jbd2)|BUG: kernel|general protection'
check_dmesg() {
	_re=$DMESG_ERRORS
	[ $# -eq 0 ] || _re="$_re|$1"
	if dmesg | grep -E "$_re"; then
		fail "errors in dmesg (above)"
	fi
	return 0
}

# check_dmesg_allowing ALLOWED_ERE: like check_dmesg, but kernel lines that
# match ALLOWED_ERE are expected (e.g. the nbd dead-link messages of a
# server restart): they are printed, not failed on.
check_dmesg_allowing() {
	if dmesg | grep -E "$DMESG_ERRORS" | grep -vE "$1" >/tmp/dmesg.unexpected; then
		cat /tmp/dmesg.unexpected
		fail "errors in dmesg (above)"
	fi
	echo "expected kernel messages: $(dmesg | grep -cE "$1") line(s)"
	dmesg | grep -E "$1" | tail -n 8
	return 0
}

# jq_true FILTER: `jq -e FILTER` on standard input, but false when the
# input is empty (jq 1.6 exits 0 on empty input: a command that failed
# and printed nothing would pass). Prints what jq prints. Needs
# `.tool("jq")` in the guest.
jq_true() {
	_jq_in=$(cat)
	[ -n "$_jq_in" ] && printf '%s' "$_jq_in" | jq -e "$1"
}

# jq_assert FILE FILTER MESSAGE: fail with MESSAGE (and print FILE) unless
# `jq -e FILTER FILE` is true (an empty FILE is not).
jq_assert() {
	jq_true "$2" <"$1" >/dev/null || { cat "$1"; fail "$3"; }
}

# count_lines FILE: the number of lines in FILE (0 if it does not exist).
count_lines() { if [ -e "$1" ]; then wc -l <"$1" | tr -d ' '; else echo 0; fi; }

# fsync_writer: files /mnt/v/w<i> of random data with fsync, until
# /tmp/stop; each checksum goes to /tmp/sums, each completed write is a
# line in /tmp/written (a failed write touches /tmp/writer.failed).
fsync_writer() {
	i=0
	while [ ! -e /tmp/stop ]; do
		i=$((i + 1))
		dd if=/dev/urandom of=/tmp/src bs=16k count=$((1 + i % 16)) 2>/dev/null
		dd if=/tmp/src of=/mnt/v/w$i bs=16k conv=fsync 2>/dev/null || { echo "writer: write w$i failed"; touch /tmp/writer.failed; return 1; }
		echo "$(sha256sum </tmp/src | cut -d' ' -f1)  w$i" >>/tmp/sums
		echo $i >>/tmp/written
	done
}
# written_at_least N: fsync_writer has completed N writes.
written_at_least() { [ "$(count_lines /tmp/written)" -ge "$1" ]; }

__on_exit() {
	_rc=$?
	if [ "$_rc" -ne 0 ]; then
		echo "--- guest script failed with status $_rc"
		if [ -s "$NBDVIRT_LOG" ]; then
			echo "--- $NBDVIRT_LOG (last 80 lines)"
			tail -n 80 "$NBDVIRT_LOG"
		fi
		echo "--- dmesg (last 40 lines)"
		dmesg | tail -n 40
	fi
}
trap __on_exit EXIT

# ---- test script follows ----
