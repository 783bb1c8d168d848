#!/usr/bin/env python3
"""Record lm-evaluation-harness 0.4.13's numbers on eight of its real task files, fully offline.

Runs `lm-eval run` (HF backend, transformers, torch on the CPU) on the tiny-flexolmo fixture and the
Hub cache of tests/data/hub-cache (scripts/make_hub_fixture.py), with the harness's bundled task files
unchanged, and writes tests/data/lmeval_tasks/reference.json: per task and document the request
arguments as `--log_samples` logs them, per-request log-likelihoods and is_greedy, the raw generations
and the filtered responses per filter, per-document metric values; the results dict's metrics as
lm-eval reports them (`acc,none`, `acc_stderr,none`, `exact_match,strict-match`, ...); the versions,
the command, and lm-eval's end-to-end wall time (Python start-up included) on this machine.

How the harness reads the cache offline. With HF_HUB_OFFLINE=1, `datasets` (5.2.0 here) never looks at
the Hub cache: `dataset_module_factory` raises before `hf_hub_download` and falls back to its own Arrow
cache (HF_DATASETS_CACHE/ORG___NAME/...), which only a previous online load can fill. A dataset path
that is an existing local folder is loaded as a local repository instead (README `configs:`, or the
automatic split patterns), so this script runs lm-eval from a scratch folder holding `ORG/NAME`
symlinks to the snapshot folders of the Hub cache: the same files and README, read by the same
builder code, with no network. Rowan/hellaswag's main revision has only a loading script (which
`datasets` >= 4 refuses), so its link goes to the `refs/convert/parquet` snapshot, as moeval resolves it.

The fixture's context is 256 tokens (max_position_embeddings) and gsm8k asks for up to 256 new tokens,
so the harness refuses gsm8k as is ("requested max tokens to generate (256) must be less than model's
maximum sequence length (256)"). The run passes `--gen_kwargs max_gen_toks=64` (lm-eval's own
override; the task file stays unchanged): gsm8k's contexts are then cut to their last 192 tokens.

Setup and run (from the repository root; about two minutes on 2 cores):
  python3.11 -m venv /tmp/parity-venv
  /tmp/parity-venv/bin/pip install "lm_eval[hf]==0.4.13" torch transformers datasets pyarrow
  /tmp/parity-venv/bin/python scripts/make_lmeval_task_references.py
"""
import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

TASKS = ["arc_easy", "hellaswag", "winogrande", "gsm8k", "mmlu_abstract_algebra", "lambada_openai", "piqa",
         "truthfulqa_mc2"]
# The dataset repositories those task files name (dataset_path), checked against the files below.
REPOS = ["allenai/ai2_arc", "Rowan/hellaswag", "allenai/winogrande", "openai/gsm8k", "cais/mmlu",
         "EleutherAI/lambada_openai", "baber/piqa", "truthfulqa/truthful_qa"]


def snapshot(hub_cache, repo):
    """The snapshot folder a script-less load reads: main, else the Hub's Parquet export."""
    repo_dir = os.path.join(hub_cache, "datasets--" + repo.replace("/", "--"))
    for ref in ("main", "refs/convert/parquet"):
        ref_file = os.path.join(repo_dir, "refs", ref)
        if not os.path.exists(ref_file):
            continue
        with open(ref_file) as f:
            snap = os.path.join(repo_dir, "snapshots", f.read().strip())
        if glob.glob(os.path.join(snap, "**", "*.parquet"), recursive=True):
            return snap, ref
    sys.exit(f"{repo}: no snapshot with Parquet files in {repo_dir} (run scripts/make_hub_fixture.py)")


def make_farm(hub_cache, farm):
    revisions = {}
    for repo in REPOS:
        snap, ref = snapshot(hub_cache, repo)
        os.makedirs(os.path.join(farm, os.path.dirname(repo)), exist_ok=True)
        os.symlink(snap, os.path.join(farm, repo))
        revisions[repo] = {"revision": ref, "commit": os.path.basename(snap)}
    return revisions


def lmeval_command(python, model, tasks, batch_size, max_gen_toks, out):
    return [python, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model},dtype=float32",
            "--device", "cpu", "--tasks", ",".join(tasks), "--batch_size", str(batch_size),
            "--gen_kwargs", f"max_gen_toks={max_gen_toks}", "--log_samples", "--output_path", out]


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_lmeval(cmd, farm, env):
    """Run lm-eval; return (wall seconds, CPU seconds of the process tree, log)."""
    c0, t0 = children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, cwd=farm, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt, cpu = time.perf_counter() - t0, children_cpu_s() - c0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-6000:])
        sys.exit(f"lm-eval failed (exit {p.returncode})")
    return dt, cpu, p.stdout


def num(v):
    """A log-likelihood or flag as lm-eval logs it (floats, or their string forms in some versions)."""
    if isinstance(v, str):
        return v == "True" if v in ("True", "False") else float(v)
    return v


def read_samples(out, task):
    files = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
    if len(files) != 1:
        sys.exit(f"expected one samples file for {task} under {out}, found {files}")
    with open(files[0]) as f:
        return [json.loads(line) for line in f if line.strip()]


def task_reference(samples, output_type):
    """Per document: arguments, per-request results, filtered responses per filter, metric values."""
    docs = {}
    for s in sorted(samples, key=lambda s: (s["doc_id"], s["filter"])):
        d = docs.setdefault(s["doc_id"], {"doc_id": s["doc_id"], "target": s["target"],
                                          "arguments": s["arguments"], "metrics": {}})
        if d["arguments"] != s["arguments"]:
            sys.exit(f"doc {s['doc_id']}: arguments differ between filters")
        if output_type in ("loglikelihood", "multiple_choice"):
            # resps: one list per request, holding one (log-likelihood, is_greedy) pair.
            d["loglikelihoods"] = [num(r[0][0]) for r in s["resps"]]
            d["is_greedy"] = [num(r[0][1]) for r in s["resps"]]
        elif output_type == "loglikelihood_rolling":
            d["loglikelihoods"] = [num(r[0]) for r in s["resps"]]
        else:
            # Generations: the raw texts (one per repeat) and what each filter pipeline made of them.
            d["resps"] = s["resps"]
            d.setdefault("filtered_resps", {})[s["filter"]] = s["filtered_resps"]
        for m in s["metrics"]:
            d["metrics"][f"{m},{s['filter']}"] = s[m]
    return [docs[k] for k in sorted(docs)]


def versions(python):
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "['lm_eval', 'torch', 'transformers', 'datasets', 'huggingface_hub', 'pyarrow', 'numpy', 'tokenizers']}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default="/tmp/parity-venv/bin/python", help="a Python with lm_eval[hf]==0.4.13")
    ap.add_argument("--model", default="../shared/fixtures/tiny-flexolmo")
    ap.add_argument("--hub-cache", default="tests/data/hub-cache")
    ap.add_argument("--out", default="tests/data/lmeval_tasks/reference.json")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-gen-toks", type=int, default=64)
    ap.add_argument("--timing-runs", type=int, default=2, help="extra runs for the wall time (the fastest counts)")
    ap.add_argument("--keep", help="also copy lm-eval's output folder here")
    a = ap.parse_args()
    tasks = a.tasks.split(",")
    model = os.path.abspath(a.model)
    hub_cache = os.path.abspath(a.hub_cache)
    work = tempfile.mkdtemp(prefix="lmeval-tasks-")
    farm = os.path.join(work, "farm")
    revisions = make_farm(hub_cache, farm)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_CACHE=hub_cache, HF_HOME=os.path.join(work, "hf-home"),
               HF_DATASETS_CACHE=os.path.join(work, "datasets-cache"), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    # First run: the reference (it also fills the datasets Arrow cache). Then timing runs with a warm
    # cache, as a user's repeated runs see it; the fastest counts (the machine is shared, so the
    # slower ones measure other load).
    out = os.path.join(work, "out")
    cmd = lmeval_command(a.python, model, tasks, a.batch_size, a.max_gen_toks, out)
    cold_s, cold_cpu, log = run_lmeval(cmd, farm, env)
    warm = []
    for i in range(a.timing_runs):
        load = os.getloadavg()[0]
        dt, cpu, _ = run_lmeval(lmeval_command(a.python, model, tasks, a.batch_size, a.max_gen_toks,
                                               os.path.join(work, f"out-timing-{i}")), farm, env)
        warm.append({"wall_s": round(dt, 2), "cpu_s": round(cpu, 2), "load_average_before": round(load, 2)})
    warm_s = min([cold_s] + [w["wall_s"] for w in warm])
    warm_cpu = min([cold_cpu] + [w["cpu_s"] for w in warm])
    results_files = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    if len(results_files) != 1:
        sys.exit(f"expected one results file under {out}, found {results_files}")
    with open(results_files[0]) as f:
        results = json.load(f)
    # Every timing run must have logged the same documents (a check that the reference is reproducible).
    for i in range(a.timing_runs):
        for task in tasks:
            cfg_type = results["configs"][task]["output_type"]
            again = task_reference(read_samples(os.path.join(work, f"out-timing-{i}"), task), cfg_type)
            if again != task_reference(read_samples(out, task), cfg_type):
                sys.exit(f"{task}: run {i + 2} logged different samples than the first run")
    ref_tasks = {}
    for task in tasks:
        cfg = results["configs"][task]
        metrics = {k: v for k, v in results["results"][task].items() if k != "alias"}
        ref_tasks[task] = {
            "output_type": cfg["output_type"],
            "dataset_path": cfg["dataset_path"],
            "dataset_name": cfg.get("dataset_name"),
            "num_fewshot": results["n-shot"][task],
            "n_samples": results["n-samples"][task],
            "higher_is_better": results["higher_is_better"][task],
            "version": results["versions"][task],
            "metrics": metrics,
            "documents": task_reference(read_samples(out, task), cfg["output_type"]),
        }
    shown = [os.path.basename(cmd[0])] + cmd[1:]
    shown[shown.index("--output_path") + 1] = "OUT"
    shown[shown.index("--model_args") + 1] = "pretrained=../shared/fixtures/tiny-flexolmo,dtype=float32"
    reference = {
        "note": ("lm-evaluation-harness 0.4.13 (HF backend, CPU, float32) on its bundled task files, unchanged, "
                 "with the tiny-flexolmo fixture and the Hub cache tests/data/hub-cache, fully offline; made by "
                 "scripts/make_lmeval_task_references.py (read its docstring for how the cache is read and why "
                 "--gen_kwargs max_gen_toks is set). Documents: lm-eval's --log_samples entries merged per "
                 "doc_id; 'metrics' per task: the results dict as lm-eval reports it."),
        "command": " ".join(shown),
        "environment": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": "tests/data/hub-cache",
                        "OMP_NUM_THREADS": str(a.threads), "cwd": "a folder of ORG/NAME links to the cache's snapshots"},
        "datasets": revisions,
        "versions": dict(versions(a.python), python=platform.python_version()),
        "config": {k: results["config"].get(k) for k in ("model", "batch_size", "device", "gen_kwargs", "bootstrap_iters",
                                                          "random_seed", "numpy_seed", "torch_seed",
                                                          "fewshot_seed")},
        "timing": {"lmeval_wall_s": round(warm_s, 2), "lmeval_cpu_s": round(warm_cpu, 2),
                   "first_run": {"wall_s": round(cold_s, 2), "cpu_s": round(cold_cpu, 2)},
                   "warm_runs": warm, "runs_identical": True,
                   "what": ("end to end: python -m lm_eval run ... as a subprocess (interpreter start-up, imports, "
                            "task indexing, dataset loading, model, scoring, writing results); lmeval_wall_s = the "
                            "fastest run (the first fills the datasets Arrow cache); cpu_s = user + system CPU "
                            "seconds of its process tree (less sensitive to other load); the machine was shared "
                            "with other work (load average before each warm run)"),
                   "threads": a.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                   "batch_size": a.batch_size},
        "tasks": ref_tasks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    if a.keep:
        shutil.copytree(out, a.keep, dirs_exist_ok=True)
    shutil.rmtree(work)
    print(json.dumps({"out": a.out, "first_run_s": round(cold_s, 2), "warm_runs": warm,
                      "documents": {t: len(v["documents"]) for t, v in ref_tasks.items()}}))


if __name__ == "__main__":
    main()
