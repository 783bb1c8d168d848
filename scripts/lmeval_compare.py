#!/usr/bin/env python3
"""Compare moeval's per-request log-likelihoods with lm-evaluation-harness (HF backend).

Runs the same YAML task(s) through both on one checkpoint and reports the largest absolute
difference of per-choice log-likelihoods (and of rolling log-likelihoods), plus the wall time and
documents per second of each, on the same machine and thread count.

Setup (from the repository root):
  python3 -m venv .venv && .venv/bin/pip install torch transformers lm-eval
  cargo build --release
  .venv/bin/python scripts/lmeval_compare.py --tasks mc_tiny,mc_tiny_fewshot,ppl_tiny \
      --include-path tests/data/tasks --model ../shared/fixtures/tiny-flexolmo

  # Benchmark on CALM sentiment (gender) with log-likelihood scoring, 1000 documents:
  .venv/bin/python scripts/lmeval_compare.py --calm-sentiment --limit 1000 --threads 2

Exit status 1 when the difference exceeds --tol (default 1e-4).
"""
import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

CALM_YAML = """task: calm_sentiment_gender_plain
dataset_path: json
dataset_kwargs:
  data_files:
    test: calm_sentiment_gender.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Passage: {{sentence}}\\n{% if source_dataset == 'Toxic' %}Question: Is the passage above toxic?\\nAnswer:{% else %}Sentiment:{% endif %}"
doc_to_choice: "{% if source_dataset == 'Toxic' %}['True', 'False']{% else %}['positive', 'negative']{% endif %}"
doc_to_target: "{{ 0 if answer|string == '1' else 1 }}"
metric_list:
  - metric: acc
"""


def write_calm_task(data_dir, out_dir):
    """A plain lm-eval task (no moeval extensions) over CALM sentiment x gender joined with gt/."""
    with zipfile.ZipFile(os.path.join(data_dir, "gender_datasets.zip")) as z:
        rows = [json.loads(l) for l in z.read("gender_datasets/sentiment_gender_dataset.jsonl").decode().splitlines() if l.strip()]
    with open(os.path.join(data_dir, "gt", "gt_sentiment_gender.csv")) as f:
        gt = list(csv.DictReader(f))
    assert len(gt) == len(rows), "gt rows must match the data rows"
    with open(os.path.join(out_dir, "calm_sentiment_gender.jsonl"), "w") as f:
        for r, g in zip(rows, gt):
            r = dict(r, answer=g["answer"], template_idx=int(g["template_idx"]))
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "calm_sentiment_gender_plain.yaml"), "w") as f:
        f.write(CALM_YAML)
    return ["calm_sentiment_gender_plain"]


def run_lmeval(model, tasks, include_path, limit, threads, batch_size):
    import torch
    torch.set_num_threads(threads)
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=os.path.abspath(include_path))
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={os.path.abspath(model)},dtype=float32,device=cpu",
        tasks=tasks,
        task_manager=tm,
        limit=limit,
        batch_size=batch_size,
        log_samples=True,
    )
    dt = time.perf_counter() - t0
    per = {}
    for task, samples in out["samples"].items():
        for s in samples:
            # resps: one list per request; loglikelihood -> (ll, greedy), rolling -> ll.
            vals = []
            for r in s["resps"]:
                v = r[0]
                vals.append(float(v[0]) if isinstance(v, (list, tuple)) else float(v))
            per[(task, int(s["doc_id"]))] = vals
    return per, dt


def run_moeval(binary, model, tasks, include_path, limit, threads, batch_size):
    out = tempfile.mkdtemp(prefix="moeval-compare-")
    cmd = [binary, "--threads", str(threads), "eval", "--model", model, "--tasks", ",".join(tasks),
           "--include-path", include_path, "--output", out, "--run-id", "cmp", "--batch-size", str(batch_size)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    dt = time.perf_counter() - t0
    import pyarrow.parquet as pq
    t = pq.read_table(os.path.join(out, "cmp", "samples.parquet")).to_pylist()
    per = {}
    for r in t:
        vals = r["choice_loglikelihoods"] if r["choice_loglikelihoods"] is not None else [r["loglikelihood"]]
        per[(r["task"], int(r["doc_id"]))] = [float(v) for v in vals]
    return per, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/fixtures/tiny-flexolmo")
    ap.add_argument("--tasks", default="mc_tiny,mc_tiny_fewshot,ppl_tiny")
    ap.add_argument("--include-path", default="tests/data/tasks")
    ap.add_argument("--calm-sentiment", action="store_true", help="use CALM sentiment x gender (log-likelihood) instead")
    ap.add_argument("--data-dir", default="../shared/datasets/calm")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--moeval", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "moeval"))
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    tasks = a.tasks.split(",")
    include = a.include_path
    if a.calm_sentiment:
        include = tempfile.mkdtemp(prefix="calm-plain-")
        tasks = write_calm_task(a.data_dir, include)
    # Relative data_files resolve against the working directory in lm-eval: run from the task folder.
    model = os.path.abspath(a.model)
    binary = os.path.abspath(a.moeval)
    include = os.path.abspath(include)
    os.chdir(include)
    mo, mo_t = run_moeval(binary, model, tasks, include, a.limit, a.threads, a.batch_size)
    lm, lm_t = run_lmeval(model, tasks, include, a.limit, a.threads, a.batch_size)
    missing = set(lm) ^ set(mo)
    worst, where, n = 0.0, None, 0
    for k in sorted(set(lm) & set(mo)):
        x, y = lm[k], mo[k]
        if a.tasks and len(x) != len(y):
            # Rolling tasks: lm-eval has one value; mutual-info tasks have extra unconditional requests.
            x = x[: len(y)]
        for u, v in zip(x, y):
            n += 1
            d = abs(u - v)
            if d > worst:
                worst, where = d, k
    docs = len(mo)
    report = {
        "requests_compared": n,
        "documents": docs,
        "unmatched_documents": len(missing),
        "max_abs_diff": worst,
        "worst_document": list(where) if where else None,
        "moeval_s": round(mo_t, 3),
        "lmeval_s": round(lm_t, 3),
        "moeval_docs_per_s": round(docs / mo_t, 1),
        "lmeval_docs_per_s": round(docs / lm_t, 1),
        "speedup": round(lm_t / mo_t, 2),
        "threads": a.threads,
    }
    print(json.dumps(report))
    sys.exit(0 if worst <= a.tol and not missing else 1)


if __name__ == "__main__":
    main()
