# Sourced by benches/compare.sh: its rows that are not a fio run. Uses the
# caller's variables (WORK, IMG, IMG_SRC, SCHEME, SIZE_MB, PID, RAW,
# CLK_TCK, ROW_COPY, ROW_NAME, FIO_AS) and functions (die, wait_quiet,
# cpu_ticks).

# One nbdcopy of the whole volume; the server's CPU over the whole copy.
run_copy() { # round row server
  local round=$1 row=$2 s=$3 uri="$SCHEME:///?socket=$WORK/$3.sock" load c0 c1 t0 t1 src dst cli
  kill -0 "${PID[$s]}" 2>/dev/null || { cat "$WORK/$s.log" >&2; die "$s (pid ${PID[$s]}) died (log above)"; }
  wait_quiet
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [[ $row == cpin* ]]; then src=$IMG_SRC dst=$uri; else src=$uri dst=null:; fi
  c0=$(cpu_ticks "${PID[$s]}")
  t0=$(date +%s.%N)
  # `times` in the subshell: nbdcopy's user and sys time (its second line,
  # the children's), e.g. "0m1.250s 0m0.750s".
  # shellcheck disable=SC2086
  cli=$({ timeout --kill-after=10 600 "${FIO_AS[@]}" nbdcopy ${ROW_COPY[$row]} "$src" "$dst" >"$WORK/copy.err" 2>&1 || exit 1; times; } |
    awk 'END { split($1 " " $2, t, /[ ms]+/); print t[1] * 60 + t[2] + t[3] * 60 + t[4] }') && [[ -n $cli ]] ||
    { cat "$WORK/copy.err" >&2; die "nbdcopy failed on $s, row '${ROW_NAME[$row]}' (output above)"; }
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "${PID[$s]}")
  awk -v r="$round" -v row="$row" -v s="$s" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" \
    -v tck="$CLK_TCK" -v bytes=$((SIZE_MB * 1048576)) -v load="$load" -v cli="$cli" 'BEGIN {
      secs = t1 - t0; cpu = (c1 - c0) / tck; reqs = bytes / 262144
      printf "%s\t%s\t%s\t%.0f\t%.0f\t0\t%.0f\t%.2f\t%s\t%.0f\n", r, row, s, reqs / secs, bytes / secs, cpu / secs * 100, cpu * 1e6 / reqs, load, cli / secs * 100
    }' >>"$RAW"
  tail -1 "$RAW" | awk -F'\t' '{ printf "compare.sh: round %s %-6s %-9s %9d req/s %8.1f MB/s  server CPU %4d%% %7.2f us/req  nbdcopy CPU %4d%%  load %s\n", $1, $2, $3, $4, $5 / 1e6, $7, $8, $10, $9 }' >&2
}

# The ceiling: dd of the served file (in the page cache: tmpfs) to
# /dev/null, 1M and 4M blocks. No server involved.
CEILING="$WORK/ceiling.tsv"
printf 'round\tbs\tbw_bytes\n' >"$CEILING"
run_ceiling() { # round
  local bs out
  for bs in 1M 4M; do
    wait_quiet
    out=$(LC_ALL=C dd if="$IMG" of=/dev/null bs=$bs 2>&1) || die "dd of $IMG failed: $out"
    # "N bytes (...) copied, S s, ..."
    echo "$out" | awk -v r="$1" -v bs="$bs" '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") secs = $(i - 1); printf "%s\t%s\t%.0f\n", r, bs, $1 / secs }' >>"$CEILING"
    tail -1 "$CEILING" | awk -F'\t' '{ printf "compare.sh: round %s dd bs=%s %8.1f MB/s\n", $1, $2, $3 / 1e6 }' >&2
  done
}
