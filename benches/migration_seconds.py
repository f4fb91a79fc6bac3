"""Seconds between a server log's "migration started" and "migration
completed" lines (copy, final flush, cutover): the server-side time of a
migration, used by benches/migrate.sh and benches/cluster_migrate.sh."""
import datetime
import re
import sys

t = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+Z)\s+\w+\s+nbdvirt::migrate: migration (started|completed)", line)
    if m:
        t[m.group(2)] = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
print(f"{(t['completed'] - t['started']).total_seconds():.3f}")
