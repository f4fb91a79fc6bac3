#!/usr/bin/env python3
"""The tables of benches/compare.sh, from its raw per-run TSV.

    compare_report.py RESULTS.tsv "ROWS" "SERVERS" NAMES.tsv [CEILING.tsv]

NAMES.tsv: row id, tab, the row's name (compare.sh's ROW_NAME).

Medians over the rounds, each column separately; the IOPS spread is min-max.
nbdcopy rows count requests of 256 KiB (nbdcopy's default) as I/Os. With a
ceiling file (dd of the served file to /dev/null, per block size), the seq
read rows are also shown as a fraction of that copy bandwidth.
"""
import csv
import statistics
import sys

# Which dd block size is the ceiling of a seq read row.
CEILING_OF = {"sr4": "1M", "sr4m": "4M"}


def median(rs, key):
    return statistics.median(float(r[key]) for r in rs)


def client(rs):
    """Median client CPU %, or – for results from before the column."""
    got = [float(r["cli_cpu_pct"]) for r in rs if r.get("cli_cpu_pct") not in (None, "")]
    return f"{statistics.median(got):.0f}" if got else "–"


def main():
    raw, rows, servers = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
    names = dict(line.rstrip("\n").split("\t", 1) for line in open(sys.argv[4]))
    data = {}
    for r in csv.DictReader(open(raw), delimiter="\t"):
        data.setdefault((r["row"], r["server"]), []).append(r)
    print("| row | server | IOPS | MB/s | ratio to nbdkit | mean lat (µs) | server CPU % | server CPU µs/IO | client CPU % | IOPS min–max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        base = median(data[(row, "nbdkit")], "iops") if (row, "nbdkit") in data else None
        for s in servers:
            rs = data[(row, s)]
            iops = median(rs, "iops")
            ratio = f"{iops / base:.2f}×" if base else "–"
            spread = f"{min(float(r['iops']) for r in rs):.0f}–{max(float(r['iops']) for r in rs):.0f}"
            lat = median(rs, "lat_mean_us")
            print(f"| {names[row]} | {s} | {iops:.0f} | {median(rs, 'bw_bytes') / 1e6:.1f} | {ratio} | "
                  f"{f'{lat:.1f}' if lat > 0 else '–'} | {median(rs, 'srv_cpu_pct'):.0f} | "
                  f"{median(rs, 'srv_cpu_us_per_io'):.2f} | {client(rs)} | {spread} |")
    print()
    print("Medians over the rounds, each column separately. MB/s = 10^6 bytes/s. Ratio = IOPS / nbdkit's IOPS.")
    print("Server CPU = user+sys time of all the server's threads during fio's measured window (% of one core),")
    print("and divided by the number of I/Os completed in it (µs/IO: lower is more efficient, and less")
    print("sensitive to other load on the machine than IOPS). nbdcopy rows: the whole copy is the window,")
    print("an I/O is one 256 KiB request, and there is no latency. Client CPU = fio's (or nbdcopy's) own")
    print("user+sys time, % of one core, all of fio's jobs together: near 100 per job (on a 2-core machine,")
    print("where the server has the other core), the client bounds the row, not the server.")
    scaling(data, rows, servers, names)
    if len(sys.argv) > 5:
        ceiling(data, rows, servers, names, sys.argv[5])


def scaling(data, rows, servers, names):
    pairs = [(one, four) for one, four in [("rr16", "rr16x4"), ("rw16", "rw16x4"), ("cpin1", "cpin4"), ("cpout1", "cpout4")]
             if one in rows and four in rows]
    if not pairs:
        return
    print()
    print("Scaling from 1 to 4 connections (median IOPS with 4 / with 1):")
    print()
    print("| rows | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for one, four in pairs:
        cells = [f"{median(data[(four, s)], 'iops') / median(data[(one, s)], 'iops'):.2f}×" for s in servers]
        print(f"| {names[one]} → {names[four]} | " + " | ".join(cells) + " |")


def ceiling(data, rows, servers, names, path):
    dd = {}
    for r in csv.DictReader(open(path), delimiter="\t"):
        dd.setdefault(r["bs"], []).append(float(r["bw_bytes"]))
    if not dd:
        return
    print()
    print("Ceiling: `dd` of the served tmpfs file to /dev/null (one memory copy), and the seq read rows")
    print("as a fraction of it (median MB/s over the rounds):")
    print()
    print("| block size | dd MB/s | dd min–max | " + " | ".join(servers) + " |")
    print("|---|---:|---|" + "---:|" * len(servers))
    for row, bs in CEILING_OF.items():
        if row not in rows or bs not in dd:
            continue
        top = statistics.median(dd[bs])
        cells = [f"{median(data[(row, s)], 'bw_bytes') / 1e6:.0f} ({median(data[(row, s)], 'bw_bytes') / top:.0%})" for s in servers]
        print(f"| {bs} ({names[row]}) | {top / 1e6:.0f} | {min(dd[bs]) / 1e6:.0f}–{max(dd[bs]) / 1e6:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
