#!/usr/bin/env python3
"""Reads every Parquet file of `just eval` with pyarrow and DuckDB and checks they agree.
Usage: check_results.py RESULTS_DIR   (needs: pip install pyarrow duckdb)"""
import glob, json, os, sys

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq

root = sys.argv[1] if len(sys.argv) > 1 else "results"
files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
assert files, f"no Parquet files under {root}"
con = duckdb.connect()
for f in files:
    n_arrow = pq.read_table(f).num_rows
    n_duck = con.execute("SELECT count(*) FROM read_parquet(?)", [f]).fetchone()[0]
    assert n_arrow == n_duck, f"{f}: pyarrow {n_arrow} rows, duckdb {n_duck}"
print(f"{len(files)} Parquet files read by pyarrow and DuckDB")

# `just eval` writes the trained suite's runs under trained/ and the CALM runs under runs/.
manifests = sorted(
    glob.glob(os.path.join(root, "runs", "*", "manifest.json"))
    + glob.glob(os.path.join(root, "trained", "*", "manifest.json"))
)
for run in manifests:
    m = json.load(open(run))
    d = os.path.dirname(run)
    assert m["status"] == "complete", run
    s = pq.read_table(os.path.join(d, "samples.parquet"))
    docs = sum(t["documents"] for t in m["timings"])
    assert s.num_rows == docs, f"{d}: {s.num_rows} sample rows, manifest says {docs}"
    masks = set(s.column("mask").to_pylist())
    assert masks == {v["label"] for v in m["variants"]}, d
    # Every row says what ran: the retrieval column is the run's retrieval setting.
    retrieval = set(s.column("retrieval").to_pylist())
    assert retrieval == {m["settings"]["retrieval"]}, f"{d}: retrieval {retrieval}"
    mode = (m["settings"].get("scoring") or {}).get("retrieval_mode")
    assert mode is None or m["settings"]["retrieval"].startswith(mode + ":"), d
    # Every row carries its requests' arguments as lm-eval's --log_samples writes them.
    assert "arguments" in s.column_names, f"{d}: no arguments column"
    for prompt, args in zip(s.column("prompt").to_pylist(), s.column("arguments").to_pylist()):
        a = json.loads(args)
        assert list(a) == [f"gen_args_{i}" for i in range(len(a))], args[:200]
        for r in a.values():
            # A request continues the prompt, an empty context (acc_mutual_info), or is a rolling text.
            assert r["arg_0"] in (prompt, "") or list(r) == ["arg_0"], args[:200]
    print(f"{d}: {s.num_rows} samples, masks {sorted(masks)}, retrieval {sorted(retrieval)}")

report = os.path.join(root, "report")
samples = os.path.join(report, "dataset", "samples")
if os.path.isdir(samples):
    pattern = os.path.join(samples, "*", "*", "*", "*.parquet")
    n_duck = con.execute(
        "SELECT count(*) FROM read_parquet(?, hive_partitioning = true, union_by_name = true)", [pattern]
    ).fetchone()[0]
    per = con.execute(
        "SELECT run_id, mask, task, count(*) FROM read_parquet(?, hive_partitioning = true, union_by_name = true) "
        "GROUP BY ALL ORDER BY ALL", [pattern]
    ).fetchall()
    total = sum(
        pq.read_table(os.path.join(os.path.dirname(r), "samples.parquet")).num_rows
        for r in manifests
    )
    assert n_duck == total, f"Hive dataset has {n_duck} rows, runs have {total}"
    dset = ds.dataset(samples, format="parquet", partitioning="hive")
    assert {"run_id", "mask", "task"} <= set(dset.schema.names), dset.schema.names
    board = os.path.join(report, "leaderboard.parquet")
    assert {"opted_out", "retrieval"} <= set(pq.read_schema(board).names)
    lb = con.execute(f"SELECT count(*) FROM '{board}' WHERE \"primary\"").fetchone()[0]
    assert lb > 0
    # A leaderboard row is identified by run, model, mask, retrieval, task and metric.
    dup = con.execute(
        f"SELECT count(*) FROM (SELECT run_id, model_id, mask, retrieval, task, metric FROM '{board}' "
        "GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()[0]
    assert dup == 0, f"{dup} leaderboard rows share run, model, mask, retrieval, task and metric"
    print(f"Hive dataset: {n_duck} sample rows in {len(per)} (run, mask, task) partitions; leaderboard: {lb} primary rows")
print("ok")
