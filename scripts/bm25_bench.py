#!/usr/bin/env python3
"""BM25 retrieval benchmark: moeval's tantivy datastore against the Python `bm25s` package.

Generates a seeded corpus (~100 MB of JSON Lines by default), then measures
  1. `moeval datastore build` indexing throughput (MB/s of input),
  2. queries/s for RIC-LM queries (the last 512 model tokens of held-out text, top-1) at --threads,
and runs `bm25s` on exactly the same blocks and the same analyzed terms (moeval exports them), with
the same BM25 variant (Lucene idf, k1 = 1.2, b = 0.75, distinct query terms), reporting the ratio and
the share of queries whose top-1 block agrees. moeval re-scores tantivy's candidates with exact block
lengths, so both rank by the same exact BM25 (up to bm25s' float32 arithmetic and its tie order).

    python3 -m venv .venv && .venv/bin/pip install bm25s
    .venv/bin/python scripts/bm25_bench.py --moeval $CARGO_TARGET_DIR/release/moeval --threads 2
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

STOP = "the of and a to in is was it for on with as by at that this be are from or".split()


def make_vocab(rng, n):
    sy = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["ar", "en", "or", "is", "um"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(sy) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def make_doc(rng, vocab, topic, n_words):
    # Zipf-like background vocabulary plus a per-document topic, so BM25 has something to find.
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(STOP))
        elif r < 0.55:
            out.append(rng.choice(topic))
        else:
            out.append(vocab[min(int(rng.paretovariate(1.1)) - 1, len(vocab) - 1)])
    words = []
    for i, w in enumerate(out):
        words.append(w.capitalize() if i % 14 == 0 else w)
        if i % 14 == 13:
            words[-1] += "."
    return " ".join(words)


def generate(path, queries_path, mb, seed, n_queries):
    rng = random.Random(seed)
    vocab = make_vocab(rng, 60000)
    rng.shuffle(vocab)
    target = mb * 1_000_000
    size = 0
    i = 0
    topics = []
    with open(path, "w") as f:
        while size < target:
            topic = rng.sample(vocab[2000:], 12)
            topics.append(topic)
            text = make_doc(rng, vocab, topic, rng.randint(400, 1500))
            line = json.dumps({"id": f"doc{i}", "owner": f"owner{i % 7}", "license": "cc-by", "text": text})
            f.write(line + "\n")
            size += len(line) + 1
            i += 1
    # Held-out queries on the corpus's topics (RIC-LM queries are text the model is scoring).
    with open(queries_path, "w") as f:
        for _ in range(n_queries):
            topic = rng.choice(topics)
            f.write(json.dumps({"text": make_doc(rng, vocab, topic, 500)}) + "\n")
    return size


def run(cmd):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moeval", required=True)
    ap.add_argument("--tokenizer", default="../shared/fixtures/tiny-flexolmo")
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    work = a.workdir or tempfile.mkdtemp(prefix="bm25bench-")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    queries = os.path.join(work, "queries.jsonl")
    if not os.path.exists(corpus):
        print(f"generating {a.mb} MB corpus in {work}", file=sys.stderr)
        generate(corpus, queries, a.mb, 1234, a.queries)
    size = os.path.getsize(corpus)
    store = os.path.join(work, "store")
    if os.path.exists(store):
        subprocess.run(["rm", "-rf", store], check=True)
    t = str(a.threads)
    p, build_s = run([a.moeval, "--threads", t, "datastore", "build", "--input", corpus,
                      "--tokenizer", a.tokenizer, "--out", store,
                      "--block", str(a.block), "--stride", str(a.stride)])
    print(p.stderr.strip().splitlines()[-1], file=sys.stderr)
    blocks_terms = os.path.join(work, "blocks_terms.jsonl")
    query_terms = os.path.join(work, "query_terms.jsonl")
    top1 = os.path.join(work, "top1.jsonl")
    p, _ = run([a.moeval, "--threads", t, "datastore", "bench", store, "--queries", queries,
                "--tokenizer", a.tokenizer, "--query-tokens", "512",
                "--export-blocks", blocks_terms, "--export-queries", query_terms, "--top1", top1])
    ours = json.loads(p.stdout.strip().splitlines()[-1])

    import bm25s  # noqa: E402  (optional dependency of this script only)
    import numpy as np

    ids, corpus_tokens, doc_of = [], [], {}
    with open(blocks_terms) as f:
        for line in f:
            r = json.loads(line)
            ids.append(r["block_id"])
            doc_of[r["block_id"]] = r["doc_id"]
            corpus_tokens.append(r["terms"])
    qtok = []
    with open(query_terms) as f:
        for line in f:
            seen = dict.fromkeys(json.loads(line)["terms"])  # distinct terms, in order, like moeval
            qtok.append(list(seen))
    t0 = time.perf_counter()
    # Same variant as moeval: Lucene idf ln(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.2, b = 0.75.
    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    retriever.index(corpus_tokens, show_progress=False)
    bm25s_index_s = time.perf_counter() - t0
    # bm25s drops query terms missing from its vocabulary; so does BM25 (they match nothing).
    vocab = retriever.vocab_dict
    qtok = [[w for w in q if w in vocab] or [next(iter(vocab))] for q in qtok]
    retriever.retrieve(qtok[:8], k=1, n_threads=a.threads, show_progress=False)
    t0 = time.perf_counter()
    docs, scores = retriever.retrieve(qtok, k=1, n_threads=a.threads, show_progress=False)
    bm25s_s = time.perf_counter() - t0
    theirs = [ids[int(d)] for d in np.asarray(docs)[:, 0]]
    their_scores = np.asarray(scores)[:, 0]
    with open(top1) as f:
        mine = [json.loads(l) for l in f]
    agree = sum(1 for m, t_ in zip(mine, theirs) if m["block_id"] == t_)
    # Ties: a different block with (nearly) the same score is not a disagreement about relevance.
    # tantivy's (and so moeval's) scores carry an extra constant factor 1 + k1 that bm25s omits.
    near = sum(1 for m, t_, s in zip(mine, theirs, their_scores)
               if m["block_id"] == t_
               or (m["score"] is not None and abs(m["score"] / 2.2 - s) <= 1e-4 * abs(s)))
    # Blocks overlap by half: a neighbouring block of the same document holds much of the same text.
    same_doc = sum(1 for m, t_ in zip(mine, theirs) if doc_of.get(m["block_id"]) == doc_of[t_])
    n = len(mine)
    res = {
        "corpus_mb": size / 1e6,
        "blocks": ours["blocks"],
        "threads": a.threads,
        "moeval_index_seconds": build_s,
        "moeval_index_mb_per_s": size / 1e6 / build_s,
        "bm25s_index_seconds_pretokenized": bm25s_index_s,
        "queries": n,
        "moeval_queries_per_s": ours["queries_per_second"],
        "bm25s_queries_per_s": n / bm25s_s,
        "speedup": ours["queries_per_second"] / (n / bm25s_s),
        "top1_agreement": agree / n,
        "top1_agreement_up_to_score_ties": near / n,
        "top1_same_document": same_doc / n,
    }
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
