#!/usr/bin/env python3
"""Checks that two `just eval` results folders hold the same numbers: every Parquet table of every run
(samples, metrics, routing, attribution) and the report's leaderboard, compared cell by cell (floats
bit for bit), ignoring only columns of wall time. Used to prove a restructuring changed nothing:

    just results=/tmp/before eval   # on the old commit
    just results=/tmp/after eval    # on the new one
    python3 scripts/same_results.py /tmp/before /tmp/after

Needs pyarrow. Exit status 1 and a list of differences when anything differs."""
import sys
from pathlib import Path

import pyarrow.parquet as pq

# Columns that measure time, not results.
IGNORED = {"seconds", "documents_per_second", "start_time", "end_time", "time"}


def tables(root: Path):
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*.parquet")
        # The request cache's journals and the Hive export repeat the run tables.
        if "cache" not in p.relative_to(root).parts and "dataset" not in p.relative_to(root).parts
    }


def rows(path: Path):
    t = pq.read_table(path)
    keep = [c for c in t.column_names if c not in IGNORED]
    return keep, t.select(keep).to_pylist()


def main() -> int:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    ta, tb = tables(a), tables(b)
    problems = []
    notes = set()
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            problems.append(f"{name}: only in {'after' if name in tb else 'before'}")
            continue
        (ca, ra), (cb, rb) = rows(ta[name]), rows(tb[name])
        # Columns are only ever added: compare the ones both sides have, and name the new ones.
        added = [c for c in cb if c not in ca]
        if added:
            notes.add(f"{name.split('/')[-1]}: new columns {added}")
        common = [c for c in ca if c in cb]
        ra = [{c: r[c] for c in common} for r in ra]
        rb = [{c: r[c] for c in common} for r in rb]
        if [c for c in ca if c not in cb]:
            problems.append(f"{name}: columns removed: {[c for c in ca if c not in cb]}")
        elif ra != rb:
            n = sum(x != y for x, y in zip(ra, rb)) + abs(len(ra) - len(rb))
            problems.append(f"{name}: {n} of {max(len(ra), len(rb))} rows differ")
    for n in sorted(notes):
        print(n)
    for p in problems:
        print(p)
    print(f"{len(ta)} tables compared, {len(problems)} differ")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
