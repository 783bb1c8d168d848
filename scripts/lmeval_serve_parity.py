#!/usr/bin/env python3
"""lm-evaluation-harness's `local-completions` against `moeval serve`, checked against `moeval eval`.

Writes four small tasks (loglikelihood, multiple choice with two few-shot examples,
loglikelihood_rolling, generate_until) over sentences in the shipped model's vocabulary, runs them
through `moeval eval` and through lm-eval's `local-completions` model pointed at `moeval serve`, and
compares every request: log-likelihoods within --tol, generated text exactly. Needs lm-eval 0.4.13 (with
its `api` extra), transformers (for the local tokenizer) and pyarrow; nothing is downloaded.

  python scripts/lmeval_serve_parity.py --moeval target/debug/moeval --model assets/default-model

Prints a JSON summary; exit status 1 on any difference.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

TASKS = {
    "srv_ll": """output_type: loglikelihood
doc_to_text: "{{question}}"
doc_to_target: " {{choices[label]}}"
metric_list:
  - metric: acc
""",
    "srv_mc": """output_type: multiple_choice
fewshot_split: train
num_fewshot: 2
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "srv_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}} {{choices[label]}}"
metric_list:
  - metric: word_perplexity
""",
    "srv_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
""",
}


# Sentences in the shipped model's closed vocabulary, in the shape of its training text, so that the
# model often predicts end-of-text right after them: a response that dropped a generated EOS would
# shift the harness's scores.
TEST = [
    ("the library is good news in", ["elmstead .", "bellport .", "fairhaven ."], 0),
    ("alex and patricia met , and patricia thanked", ["alex .", "david .", "jamie ."], 0),
    ("alex and patricia went to the museum on", ["tuesday .", "friday .", "monday ."], 1),
    ("i really enjoyed the meal , said", ["jamie .", "david .", "alex ."], 2),
    ("the concert is good news in", ["bellport .", "elmstead .", "glenrock ."], 1),
    ("david and jamie went to the library on", ["friday .", "monday .", "tuesday ."], 0),
    ("the festival is good news in", ["glenrock .", "harbour .", "fairhaven ."], 2),
    ("i really enjoyed the film , said", ["alex .", "jamie .", "david ."], 1),
]
TRAIN = [
    ("the garden is good news in", ["fairhaven .", "elmstead .", "bellport ."], 0),
    ("jamie and alex met , and alex thanked", ["jamie .", "david .", "patricia ."], 0),
    ("i really enjoyed the game , said", ["david .", "alex .", "jamie ."], 2),
    ("patricia and david went to the garden on", ["monday .", "friday .", "tuesday ."], 1),
]


def write_tasks(model, out):
    vocab = json.load(open(os.path.join(model, "tokenizer.json")))["model"]["vocab"]
    for split, docs in (("test", TEST), ("train", TRAIN)):
        with open(os.path.join(out, f"srv_{split}.jsonl"), "w") as f:
            for q, choices, label in docs:
                unknown = [w for w in " ".join([q] + choices).split() if w not in vocab]
                if unknown:
                    sys.exit(f"words outside the model's vocabulary: {unknown}")
                f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    for name, body in TASKS.items():
        with open(os.path.join(out, name + ".yaml"), "w") as f:
            # Absolute data files: lm-eval resolves relative ones against its working directory.
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {out}/srv_test.jsonl\n    train: {out}/srv_train.jsonl\n"
                    f"test_split: test\n{body}")


def tokenizer_dir(model, out):
    """The model's tokenizer.json as a Hugging Face fast tokenizer directory."""
    d = os.path.join(out, "tokenizer")
    os.makedirs(d)
    shutil.copy(os.path.join(model, "tokenizer.json"), d)
    tok = json.load(open(os.path.join(model, "tokenizer.json")))
    cfg = json.load(open(os.path.join(model, "config.json")))
    eos = cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    names = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": names[eos],
            "model_max_length": cfg["max_position_embeddings"]}
    json.dump(conf, open(os.path.join(d, "tokenizer_config.json"), "w"))
    return d


def run_moeval(binary, model, out, threads):
    runs = os.path.join(out, "runs")
    subprocess.run([binary, "--threads", str(threads), "eval", "--model", model, "--tasks",
                    ",".join(TASKS), "--include-path", out, "--output", runs, "--run-id", "cmp"],
                   check=True, stdout=sys.stderr)
    import pyarrow.parquet as pq
    per = {}
    for r in pq.read_table(os.path.join(runs, "cmp", "samples.parquet")).to_pylist():
        key = (r["task"], int(r["doc_id"]))
        if r["task"] == "srv_gen":
            per[key] = [r["prediction"]]
        elif r["choice_loglikelihoods"] is not None:
            per[key] = [float(v) for v in r["choice_loglikelihoods"]]
        else:
            per[key] = [float(r["loglikelihood"])]
    return per


def run_lmeval(python, binary, model, out, threads):
    server = subprocess.Popen([binary, "--threads", str(threads), "serve", "--model", model, "--port", "0",
                               "--served-model-name", "moeval"], stdout=subprocess.PIPE)
    try:
        line = server.stdout.readline().decode()
        if not line.startswith("listening on http://"):
            sys.exit(f"moeval serve did not start: {line!r}")
        base = line.strip().removeprefix("listening on ")
        tok = tokenizer_dir(model, out)
        logs = os.path.join(out, "lmeval")
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HOME=os.path.join(out, "hf"), TOKENIZERS_PARALLELISM="false")
        args = (f"model=moeval,base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tok},num_concurrent=1,max_retries=1,tokenized_requests=True")
        subprocess.run([python, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                        "--tasks", ",".join(TASKS), "--include_path", out, "--log_samples",
                        "--output_path", logs, "--batch_size", "1"],
                       check=True, env=env, cwd=out, stdout=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    per = {}
    for path in glob.glob(os.path.join(logs, "**", "samples_*.jsonl"), recursive=True):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        for line in open(path):
            s = json.loads(line)
            vals = []
            # resps: one list per request; loglikelihood -> (ll, greedy), rolling -> ll (logged as a
            # string), generate_until -> the text.
            for r in s["resps"]:
                v = r[0]
                if task == "srv_gen":
                    vals.append(v)
                else:
                    vals.append(float(v[0]) if isinstance(v, (list, tuple)) else float(v))
            per[(task, int(s["doc_id"]))] = vals
    return per


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moeval", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    model, binary = os.path.abspath(a.model), os.path.abspath(a.moeval)
    out = tempfile.mkdtemp(prefix="lmeval-serve-")
    write_tasks(model, out)
    mo = run_moeval(binary, model, out, a.threads)
    lm = run_lmeval(sys.executable, binary, model, out, a.threads)
    worst, where, compared, mismatched = 0.0, None, {}, []
    for key in sorted(set(mo) | set(lm)):
        x, y = mo.get(key), lm.get(key)
        if x is None or y is None or len(x) != len(y):
            mismatched.append({"request": list(key), "moeval": x, "lm_eval": y})
            continue
        for u, v in zip(x, y):
            compared[key[0]] = compared.get(key[0], 0) + 1
            if isinstance(u, str) or isinstance(v, str):
                if u != v:
                    mismatched.append({"request": list(key), "moeval": u, "lm_eval": v})
            elif abs(u - v) > worst:
                worst, where = abs(u - v), key
    ok = worst <= a.tol and not mismatched and set(compared) == set(TASKS)
    print(json.dumps({"ok": ok, "requests_compared": compared, "max_abs_diff": worst,
                      "worst": list(where) if where else None, "mismatched": mismatched[:5]}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
