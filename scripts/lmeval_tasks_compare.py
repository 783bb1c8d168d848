#!/usr/bin/env python3
"""Compare `moeval eval` with lm-evaluation-harness 0.4.13 on eight of the harness's real task files.

Runs moeval (release build) on the tiny-flexolmo fixture with the harness's bundled task folder as
--include-path and the Hub cache tests/data/hub-cache (HF_HUB_OFFLINE=1), then compares its run
folder with tests/data/lmeval_tasks/reference.json (scripts/make_lmeval_task_references.py):

  - request arguments: equal to the harness's --log_samples `arguments` (parsed JSON; byte equality too)
  - per-request log-likelihoods: within --tol (1e-4), in request order
  - generations: every filter's filtered response equal (and the raw generation when available)
  - every metric of lm-eval's results dict, with its stderr: equal; perplexities within 1e-4 relative;
    metrics whose per-document values are not 0/1 (truthfulqa_mc2's acc) within 1e-4 * max(1, |x|)
  - wall time end to end (start-up and Python hooks included) against lm-eval's, recorded in the
    reference on the same machine, or measured now with --time-lmeval

Prints a table per task and the differences; exit status 1 on any mismatch (or a missing
document, request or metric), 2 when moeval fails.

  cargo build --release
  python3 scripts/lmeval_tasks_compare.py                      # needs pyarrow (e.g. /tmp/moeval-ci-venv)
  python3 scripts/lmeval_tasks_compare.py --time-lmeval        # also re-time lm-eval side by side
  python3 scripts/lmeval_tasks_compare.py --time-lmeval --repeat 5   # medians of 5 runs each
  python3 scripts/lmeval_tasks_compare.py --run-dir OUT/parity # compare an existing moeval run
  python3 scripts/lmeval_tasks_compare.py --self-test          # check this script (no moeval needed)

Reading moeval's run folder (docs/results.md): samples.parquet rows of mask `full`, keyed by (task,
doc_id); `arguments` (JSON as the harness logs it), `choice_loglikelihoods` (multiple choice, in request
order) or `loglikelihood` (one request), `prediction` (the generation). Filtered responses come from a
`filtered_resps` column (JSON object: filter name -> value, as the harness logs it) when present, or
from one row per filter when samples.parquet has a `filter` column (then `prediction` is that filter's
response). metrics.parquet rows (task, metric, value, stderr): `acc` or `acc,none` both match the
harness's `acc,none`; other filters as `exact_match,strict-match`.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PERPLEXITIES = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


# ---------------------------------------------------------------------------------------------
# Reading moeval's run folder
# ---------------------------------------------------------------------------------------------


def read_moeval_run(run_dir):
    """{(task, doc_id): {arguments, lls, prediction, filtered}} and {(task, metric): (value, stderr)}."""
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(run_dir, "samples.parquet")).to_pylist()
    if rows and "mask" in rows[0]:
        rows = [r for r in rows if r["mask"] == "full"]
    samples = {}
    for r in rows:
        key = (r["task"], int(r["doc_id"]))
        s = samples.setdefault(key, {"arguments": r.get("arguments"), "lls": None, "prediction": None,
                                     "filtered": None})
        if r.get("choice_loglikelihoods") is not None:
            s["lls"] = [float(v) for v in r["choice_loglikelihoods"]]
        elif r.get("loglikelihood") is not None:
            s["lls"] = [float(r["loglikelihood"])]
        if r.get("filtered_resps"):
            s["filtered"] = json.loads(r["filtered_resps"])
        if "filter" in r and r["filter"] is not None:
            s["filtered"] = s["filtered"] or {}
            s["filtered"][r["filter"]] = r.get("prediction")
        else:
            s["prediction"] = r.get("prediction")
    metrics = {}
    for r in pq.read_table(os.path.join(run_dir, "metrics.parquet")).to_pylist():
        if r.get("mask", "full") != "full":
            continue
        name = r["metric"] if "," in r["metric"] else r["metric"] + ",none"
        metrics[(r["task"], name)] = (r["value"], r["stderr"])
    return samples, metrics


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def first(values):
    """lm-eval logs a filtered response as a list (one per repeat) or a plain value."""
    return values[0] if isinstance(values, list) and len(values) == 1 else values


def metric_close(name, ref, got, continuous):
    if ref is None or got is None or (isinstance(ref, float) and math.isnan(ref)):
        return (ref is None or (isinstance(ref, float) and math.isnan(ref))) == \
            (got is None or (isinstance(got, float) and math.isnan(got)))
    base = name.split(",")[0].replace("_stderr", "")
    if base in PERPLEXITIES:
        return abs(ref - got) <= 1e-4 * max(abs(ref), 1e-12)
    if continuous:
        return abs(ref - got) <= 1e-4 * max(1.0, abs(ref))
    return abs(ref - got) <= 1e-9


def compare(reference, samples, metrics, tol):
    """Rows of the summary table and the list of differences (strings)."""
    table, diffs = [], []
    for task, ref in reference["tasks"].items():
        n_req, worst, arg_mismatch, byte_mismatch, gen_mismatch, met_mismatch, missing = 0, 0.0, 0, 0, 0, 0, 0
        continuous = set()
        for d in ref["documents"]:
            for m, v in d["metrics"].items():
                if v not in (0, 1, 0.0, 1.0, True, False):
                    continuous.add(m.split(",")[0])
        for d in ref["documents"]:
            key = (task, d["doc_id"])
            got = samples.get(key)
            if got is None:
                missing += 1
                diffs.append(f"{task} doc {d['doc_id']}: missing in moeval's samples.parquet")
                continue
            want_args = json.dumps(d["arguments"], ensure_ascii=False)
            if not got["arguments"]:
                arg_mismatch += 1
                diffs.append(f"{task} doc {d['doc_id']}: no `arguments` in moeval's row")
            elif json.loads(got["arguments"]) != d["arguments"]:
                arg_mismatch += 1
                diffs.append(f"{task} doc {d['doc_id']}: arguments differ:\n  lm-eval {want_args[:400]}\n"
                             f"  moeval  {got['arguments'][:400]}")
            elif got["arguments"] != want_args:
                byte_mismatch += 1
            if "loglikelihoods" in d:
                lls = got["lls"]
                if lls is None or len(lls) != len(d["loglikelihoods"]):
                    diffs.append(f"{task} doc {d['doc_id']}: {len(d['loglikelihoods'])} log-likelihoods in "
                                 f"lm-eval, {None if lls is None else len(lls)} in moeval")
                    missing += 1
                    continue
                for i, (u, v) in enumerate(zip(d["loglikelihoods"], lls)):
                    n_req += 1
                    worst = max(worst, abs(u - v))
                    if not abs(u - v) <= tol:
                        diffs.append(f"{task} doc {d['doc_id']} request {i}: log-likelihood {u!r} (lm-eval) vs "
                                     f"{v!r} (moeval), |diff| {abs(u - v):.3g}")
            if "filtered_resps" in d:
                n_req += len(d["resps"])
                if got["filtered"] is None:
                    gen_mismatch += 1
                    raw = first(first(d["resps"]))
                    diffs.append(f"{task} doc {d['doc_id']}: moeval's samples.parquet has no filtered responses "
                                 f"(a `filtered_resps` column or a `filter` column); raw generation "
                                 f"{'equal' if got['prediction'] == raw else 'differs'}")
                    continue
                for f, want in d["filtered_resps"].items():
                    have = got["filtered"].get(f)
                    if first(have) != first(want):
                        gen_mismatch += 1
                        diffs.append(f"{task} doc {d['doc_id']} filter {f}: {first(want)!r} (lm-eval) vs "
                                     f"{first(have)!r} (moeval)")
        for name, want in ref["metrics"].items():
            if name in ("name", "sample_len") or "_stderr," in name:
                continue
            base, filt = name.split(",", 1)
            stderr_name = f"{base}_stderr,{filt}"
            have = metrics.get((task, name))
            if have is None:
                met_mismatch += 1
                diffs.append(f"{task} metric {name}: missing in moeval's metrics.parquet")
                continue
            cont = base in continuous
            if not metric_close(name, want, have[0], cont):
                met_mismatch += 1
                diffs.append(f"{task} metric {name}: {want!r} (lm-eval) vs {have[0]!r} (moeval)")
            want_se = ref["metrics"].get(stderr_name)
            if want_se == "N/A":
                want_se = None
            if stderr_name in ref["metrics"] and not metric_close(stderr_name, want_se, have[1], True):
                met_mismatch += 1
                diffs.append(f"{task} metric {stderr_name}: {want_se!r} (lm-eval) vs {have[1]!r} (moeval)")
        table.append({"task": task, "docs": len(ref["documents"]), "missing": missing, "requests": n_req,
                      "max_abs_ll_diff": worst, "arguments_differ": arg_mismatch, "arguments_bytes_differ": byte_mismatch,
                      "generations_differ": gen_mismatch, "metrics_differ": met_mismatch})
    return table, diffs


def print_table(table):
    cols = ["task", "docs", "missing", "requests", "max_abs_ll_diff", "arguments_differ", "arguments_bytes_differ",
            "generations_differ", "metrics_differ"]
    fmt = lambda v: f"{v:.2e}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in table)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in table:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def lmeval_tasks_folder(python):
    code = "import os, lm_eval; print(os.path.join(os.path.dirname(lm_eval.__file__), 'tasks'))"
    return subprocess.run([python, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()


def gen_kwargs_arg(reference):
    kw = (reference.get("config") or {}).get("gen_kwargs") or {}
    return ",".join(f"{k}={v}" for k, v in kw.items())


def run_moeval(a, reference, out):
    tasks = list(reference["tasks"])
    cmd = [a.moeval, "--threads", str(a.threads), "eval", "--model", a.model, "--tasks", ",".join(tasks),
           "--include-path", a.include_path, "--output", out, "--run-id", "parity", "--batch-size", str(a.batch_size)]
    gk = gen_kwargs_arg(reference)
    if gk and not a.no_gen_kwargs:
        # The reference ran with lm-eval's --gen_kwargs (the fixture's context is too short for gsm8k's
        # 256 new tokens); moeval must apply the same override.
        cmd += ["--gen-kwargs", gk]
    cmd += a.moeval_arg
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=a.hub_cache, MOEVAL_PYTHON=a.hooks_python,
               RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    env.pop("HF_HOME", None)
    print("+ " + " ".join(cmd), file=sys.stderr)
    c0, t0 = children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=sys.stderr)
    dt, cpu = time.perf_counter() - t0, children_cpu_s() - c0
    if p.returncode != 0:
        print(f"moeval failed (exit {p.returncode})", file=sys.stderr)
        sys.exit(2)
    return os.path.join(out, "parity"), dt, cpu


def children_cpu_s():
    """User + system CPU seconds of finished child processes (their Python hook workers included)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_lmeval(a, reference):
    """lm-eval end to end now, on this machine, the way the reference was made."""
    sys.path.insert(0, HERE)
    import make_lmeval_task_references as mk

    work = tempfile.mkdtemp(prefix="lmeval-timing-")
    farm = os.path.join(work, "farm")
    mk.make_farm(a.hub_cache, farm)
    kw = (reference.get("config") or {}).get("gen_kwargs") or {}
    cmd = mk.lmeval_command(a.lmeval_python, a.model, list(reference["tasks"]),
                            reference["timing"].get("batch_size", 1), kw.get("max_gen_toks", 64),
                            os.path.join(work, "out"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_CACHE=a.hub_cache, HF_HOME=os.path.join(work, "hf-home"),
               HF_DATASETS_CACHE=os.path.join(work, "datasets-cache"), OMP_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false")
    mk.run_lmeval(cmd, farm, env)  # fills the datasets cache, as the reference's timing runs had it
    runs = [mk.run_lmeval(cmd[:-1] + [os.path.join(work, f"out{i + 2}")], farm, env)[:2] for i in range(a.repeat)]
    return median_run(runs)


def median_run(runs):
    """The (wall, cpu) pair of the run with the median wall time."""
    return sorted(runs)[len(runs) // 2]


# ---------------------------------------------------------------------------------------------
# Self-test: a synthetic moeval run folder made from the reference
# ---------------------------------------------------------------------------------------------


def write_fake_run(reference, run_dir, perturb=0.0, drop_filter=None):
    """samples.parquet / metrics.parquet in moeval's documented layout, holding the reference's numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, mrows = [], []
    for task, ref in reference["tasks"].items():
        for d in ref["documents"]:
            lls = d.get("loglikelihoods")
            if lls is not None and perturb:
                lls = [lls[0] + perturb] + lls[1:]
            filtered = d.get("filtered_resps")
            if filtered is not None and drop_filter:
                filtered = {k: (["?"] if k == drop_filter else v) for k, v in filtered.items()}
            rows.append({"mask": "full", "task": task, "doc_id": d["doc_id"],
                         "arguments": json.dumps(d["arguments"], ensure_ascii=False),
                         "choice_loglikelihoods": lls if ref["output_type"] == "multiple_choice" else None,
                         "loglikelihood": lls[0] if lls is not None and ref["output_type"] != "multiple_choice" else None,
                         "prediction": first(first(d["resps"])) if "resps" in d else None,
                         "filtered_resps": json.dumps(filtered, ensure_ascii=False) if filtered else None})
        for name, v in ref["metrics"].items():
            if name in ("name", "sample_len") or "_stderr," in name:
                continue
            base, filt = name.split(",", 1)
            se = ref["metrics"].get(f"{base}_stderr,{filt}")
            mrows.append({"mask": "full", "task": task, "metric": base if filt == "none" else name,
                          "value": float(v), "stderr": None if se in (None, "N/A") else float(se)})
    os.makedirs(run_dir, exist_ok=True)
    schema = pa.schema([("mask", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()), ("arguments", pa.string()),
                        ("choice_loglikelihoods", pa.list_(pa.float64())), ("loglikelihood", pa.float64()),
                        ("prediction", pa.string()), ("filtered_resps", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(run_dir, "samples.parquet"))
    pq.write_table(pa.Table.from_pylist(mrows), os.path.join(run_dir, "metrics.parquet"))


def self_test(reference, tol):
    ok = True
    with tempfile.TemporaryDirectory() as d:
        cases = [("identical", {}, 0), ("log-likelihood off by 2e-4", {"perturb": 2e-4}, None),
                 ("a filtered response differs", {"drop_filter": "strict-match"}, None)]
        for name, kw, want_diffs in cases:
            run = os.path.join(d, name.replace(" ", "_"))
            write_fake_run(reference, run, **kw)
            _, diffs = compare(reference, *read_moeval_run(run), tol)
            good = (len(diffs) == 0) if want_diffs == 0 else (len(diffs) > 0)
            print(f"self-test {name}: {len(diffs)} differences -> {'ok' if good else 'FAILED'}")
            ok &= good
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    ap.add_argument("--moeval", default=os.environ.get("MOEVAL", os.path.join(target, "release", "moeval")),
                    help="the moeval binary (env MOEVAL; default $CARGO_TARGET_DIR/release/moeval)")
    ap.add_argument("--model", default="../shared/fixtures/tiny-flexolmo")
    ap.add_argument("--reference", default="tests/data/lmeval_tasks/reference.json")
    ap.add_argument("--hub-cache", default="tests/data/hub-cache")
    ap.add_argument("--include-path", help="lm-eval's bundled task folder (default: found from --lmeval-python, "
                                           "else --hooks-python)")
    ap.add_argument("--hooks-python", default=os.environ.get("MOEVAL_PYTHON", "/tmp/moeval-ci-venv/bin/python"),
                    help="interpreter for the task files' Python hooks (MOEVAL_PYTHON); needs lm_eval's deps")
    ap.add_argument("--lmeval-python", default="/tmp/parity-venv/bin/python",
                    help="a Python with lm_eval[hf]==0.4.13 (for --time-lmeval)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--run-dir", help="compare this existing moeval run folder instead of running moeval")
    ap.add_argument("--no-gen-kwargs", action="store_true", help="do not pass the reference's gen_kwargs to moeval")
    ap.add_argument("--moeval-arg", action="append", default=[], help="extra argument for `moeval eval` (repeatable)")
    ap.add_argument("--time-lmeval", action="store_true", help="re-time lm-eval now instead of the recorded time")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each side this many times and take the median (lm-eval after one warm-up run)")
    ap.add_argument("--min-speedup", type=float, default=0.0, help="also fail when lm-eval time / moeval time is below")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--max-diffs", type=int, default=40)
    a = ap.parse_args()
    with open(a.reference) as f:
        reference = json.load(f)
    if a.self_test:
        self_test(reference, a.tol)
    a.model, a.hub_cache = os.path.abspath(a.model), os.path.abspath(a.hub_cache)
    moeval_s = moeval_cpu = None
    if a.run_dir:
        run_dir = a.run_dir
    else:
        if not a.include_path:
            py = a.lmeval_python if os.path.exists(a.lmeval_python) else a.hooks_python
            a.include_path = lmeval_tasks_folder(py)
        a.moeval = os.path.abspath(a.moeval)
        run_dir, moeval_s, moeval_cpu = run_moeval(a, reference, tempfile.mkdtemp(prefix="moeval-parity-"))
        if a.repeat > 1:
            runs = [(moeval_s, moeval_cpu)]
            runs += [run_moeval(a, reference, tempfile.mkdtemp(prefix="moeval-parity-"))[1:] for _ in range(a.repeat - 1)]
            print("moeval wall times: " + ", ".join(f"{w:.2f}s" for w, _ in runs), file=sys.stderr)
            moeval_s, moeval_cpu = median_run(runs)
    samples, metrics = read_moeval_run(run_dir)
    table, diffs = compare(reference, samples, metrics, a.tol)
    print_table(table)
    for d in diffs[: a.max_diffs]:
        print("DIFF " + d)
    if len(diffs) > a.max_diffs:
        print(f"... {len(diffs) - a.max_diffs} more differences")
    if a.time_lmeval:
        lmeval_s, lmeval_cpu = time_lmeval(a, reference)
    else:
        lmeval_s, lmeval_cpu = reference["timing"]["lmeval_wall_s"], reference["timing"].get("lmeval_cpu_s")
    timing = {"lmeval_s": round(lmeval_s, 2), "lmeval_cpu_s": lmeval_cpu and round(lmeval_cpu, 2),
              "lmeval_measured": "now" if a.time_lmeval else "recorded in reference",
              "moeval_s": None if moeval_s is None else round(moeval_s, 2),
              "moeval_cpu_s": None if moeval_cpu is None else round(moeval_cpu, 2),
              "speedup": None if not moeval_s else round(lmeval_s / moeval_s, 1),
              "cpu_speedup": None if not (moeval_cpu and lmeval_cpu) else round(lmeval_cpu / moeval_cpu, 1),
              "threads": a.threads, "repeat": a.repeat}
    print(json.dumps({"differences": len(diffs), **timing}))
    slow = a.min_speedup and timing["speedup"] is not None and timing["speedup"] < a.min_speedup
    sys.exit(1 if diffs or slow else 0)


if __name__ == "__main__":
    main()
