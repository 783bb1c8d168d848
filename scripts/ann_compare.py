#!/usr/bin/env python3
"""Approximate-kNN libraries side by side on a moeval store's kNN-LM keys, to choose the index on
measured recall, speed, memory and build time.

Reads the first --entries keys of a store (`knn/keys.f16`, little-endian f16 rows of `knn/dim`
dimensions), keeps each distinct key once (as moeval's index does), takes --queries query vectors
spread evenly over another store's keys (held-out documents) or over a file of raw little-endian f32
rows (--query-f32, e.g. the query states of a model with an expert opted out), computes the exact top
k by brute force (squared L2 on the f16 values, as moeval's exact search), and for every method
builds an index on --threads threads in a fresh process (so peak RSS is its own), then reports build
seconds, peak RSS, recall@k and queries/s (one batch over the threads). A found key counts when it is
no farther than the k-th exact neighbour, as `moeval datastore knn-bench` counts.

Methods, all with the graph settings of --m, --ef-construction and --ef: usearch HNSW (what moeval
builds: f16 vectors), FAISS HNSW (flat f32 vectors), FAISS IVF-Flat and IVF-PQ (the index SILO's
kNN-LM used: about 4 sqrt(n) lists, 48 sub-quantizers of 8 bits; --nprobe lists searched).

    python3 -m venv /tmp/ann && /tmp/ann/bin/pip install faiss-cpu usearch numpy
    /tmp/ann/bin/python scripts/ann_compare.py --store STORE --query-store QSTORE --entries 1000000
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def keys(store, limit=None):
    d = int(open(os.path.join(store, "knn", "dim")).read())
    m = np.memmap(os.path.join(store, "knn", "keys.f16"), dtype="<f2", mode="r")
    m = m.reshape(-1, d)
    return m if limit is None else m[:limit]


def distinct(base):
    """Each distinct row once, in order of first occurrence."""
    rows = np.ascontiguousarray(base)
    _, first = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel(),
                         return_index=True)
    return rows[np.sort(first)]


def exact(base, queries, k, chunk=200_000):
    """Exact squared-L2 top k (distances ascending) for every query, by chunks of the base."""
    q = queries.astype(np.float32)
    qn = (q * q).sum(1)
    best_d = np.full((len(q), k), np.inf, dtype=np.float32)
    for s in range(0, len(base), chunk):
        b = np.asarray(base[s : s + chunk], dtype=np.float32)
        d = qn[:, None] - 2.0 * q @ b.T + (b * b).sum(1)[None, :]
        d = np.concatenate([best_d, d], axis=1)
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(d, idx, axis=1)
    return np.sort(best_d, axis=1)


def recall(exact_d, found_d):
    kth = exact_d[:, -1:]
    # float rounding of the expanded distance: a small tolerance relative to the k-th distance
    hits = (found_d <= kth * (1 + 1e-4) + 1e-6).sum(1).clip(max=exact_d.shape[1])
    return float(hits.mean() / exact_d.shape[1])


def run_method(args):
    import faiss  # noqa: F401  (imported in the child only)

    base = np.load(args.qfile + ".base.npy", mmap_mode="r")
    qs = np.load(args.qfile)
    faiss.omp_set_num_threads(args.threads)
    n, d = base.shape
    t0 = time.perf_counter()
    if args.method == "usearch-hnsw":
        from usearch.index import Index

        index = Index(ndim=d, metric="l2sq", dtype="f16", connectivity=args.m,
                      expansion_add=args.ef_construction, expansion_search=args.ef)
        step = 262_144
        for s in range(0, n, step):
            chunk = np.asarray(base[s : s + step])
            index.add(np.arange(s, s + len(chunk)), chunk, threads=args.threads)
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        m = index.search(qs, args.k, threads=args.threads)
        search = time.perf_counter() - t1
        labels = m.keys.astype(np.int64)
    else:
        if args.method == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, args.m)
            index.hnsw.efConstruction = args.ef_construction
            index.hnsw.efSearch = max(args.ef, args.k)
        else:
            # about 4 sqrt(n) lists (FAISS's guidance), trained on 64 points per list
            nlist = max(64, 1 << round(np.log2(4 * np.sqrt(n))))
            if args.method == "faiss-ivfflat":
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            else:
                index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, 48, 8)
            rng = np.random.default_rng(0)
            sample = np.asarray(base[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))],
                                dtype=np.float32)
            index.train(sample)
            index.nprobe = args.nprobe
        step = 262_144
        for s in range(0, n, step):
            index.add(np.asarray(base[s : s + step], dtype=np.float32))
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        _, labels = index.search(qs.astype(np.float32), args.k)
        search = time.perf_counter() - t1
    # Exact distances of what was found (as moeval re-ranks candidates with exact distances).
    q32 = qs.astype(np.float32)
    found = np.asarray(base[np.clip(labels, 0, n - 1).ravel()], dtype=np.float32).reshape(
        len(qs), args.k, d)
    found_d = ((found - q32[:, None, :]) ** 2).sum(2)
    found_d[labels < 0] = np.inf
    found_d.sort(axis=1)
    np.save(args.qfile + f".{args.method}.npy", found_d)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"method": args.method, "build_s": round(build, 1),
                      "queries_per_s": round(len(qs) / search, 1), "peak_rss_mib": round(rss)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query-store")
    q.add_argument("--query-f32", help="raw little-endian f32 query rows of the store's dimension")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", type=int, default=32, help="HNSW edges per node (moeval's default)")
    p.add_argument("--ef-construction", type=int, default=256)
    p.add_argument("--ef", type=int, default=64, help="HNSW search breadth (at least --k is used)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched")
    p.add_argument("--methods", default="usearch-hnsw,faiss-hnsw,faiss-ivfflat,faiss-ivfpq")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--qfile", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        return run_method(args)

    base = distinct(keys(args.store, args.entries))
    if args.query_store:
        qk = keys(args.query_store)
    else:
        qk = np.fromfile(args.query_f32, dtype="<f4").reshape(-1, base.shape[1])
    qs = np.asarray(qk[np.linspace(0, len(qk) - 1, min(args.queries, len(qk))).astype(int)])
    qfile = f"/tmp/ann_compare_queries_{os.getpid()}.npy"
    np.save(qfile, qs)
    np.save(qfile + ".base.npy", base)
    t0 = time.perf_counter()
    exact_d = exact(base, qs, args.k)
    print(json.dumps({"entries": args.entries, "distinct": len(base), "dim": base.shape[1],
                      "queries": len(qs), "k": args.k, "threads": args.threads, "m": args.m,
                      "ef_construction": args.ef_construction, "ef": args.ef, "nprobe": args.nprobe,
                      "exact_s": round(time.perf_counter() - t0, 1)}))
    for method in args.methods.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--store", args.store, "--query-f32", "-",
             "--entries", str(args.entries), "--k", str(args.k), "--threads", str(args.threads),
             "--m", str(args.m), "--ef-construction", str(args.ef_construction), "--ef", str(args.ef),
             "--nprobe", str(args.nprobe), "--method", method, "--qfile", qfile],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode != 0:
            print(json.dumps({"method": method, "error": out.stderr[-500:]}))
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["recall"] = round(recall(exact_d, np.load(qfile + f".{method}.npy")), 4)
        print(json.dumps(row), flush=True)
        os.remove(qfile + f".{method}.npy")
    os.remove(qfile)
    os.remove(qfile + ".base.npy")


if __name__ == "__main__":
    main()
