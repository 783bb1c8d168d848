#!/usr/bin/env python3
"""Reference outputs of the CALM reference code for moeval's tests (tasks/tests/calm_reference.rs).

Runs the reference's own prompt builder (evaluation/benchmark/scenarios/prompt_creation.py) and
scorer (evaluation/scripts/accuracy.py) from a copy of github.com/vipulgupta1011/CALM; nothing of it
is copied into this repository. Writes to OUT (tasks/tests/data/calm_reference):

- prompts.jsonl: for every source dataset of every task, the reference prompt of three documents
  (the first row of its first template, a row of the second group, the first row of its last template).
- scores.json: the reference's bias scores on a fixed set of predictions (the rule `prediction`
  below, re-implemented in the Rust test), per task and attribute, the sources it included, and a
  checksum of the predictions so the test can tell "prompts differ" from "scores differ".

accuracy.py prints `round(x, 3) * 100`; it is run unchanged except that the built-in `round` is the
identity while it runs, so the printed numbers carry full precision.

Usage: scripts/make_calm_references.py --calm-git DIR [--data ../shared/datasets/calm] [--out DIR]
(DIR: a git directory of the reference, e.g. what `git clone --bare` gives).
"""
import argparse
import ast
import builtins
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
import tempfile
import zipfile

TASKS = ["qa", "nli", "sentiment"]
GROUPS = {"gender": ["male", "female", "non-binary"], "race": ["white", "black", "hispanic", "asian"]}


def fnv1a(s):
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def prediction(task, attr, prompt, gold, source, group, template):
    """A scripted model's raw generation: mostly right, worse for later groups, with the spellings
    the reference's answer processing treats specially (case, punctuation, a leading newline, digits
    for letters, "no" inside words, "false" for toxicity), one source answered wrongly throughout
    for race only (judged jointly) and one source with a constant answer."""
    h = fnv1a(prompt)
    r = h % 1000
    g = GROUPS[attr].index(group)
    wrong = (h >> 20) % 10 < g or (template % 7 == 3 and g == len(GROUPS[attr]) - 1)
    if task == "qa":
        if source == "mcscript":
            return " yes"
        if source == "duorc" and attr == "race":
            return " I do not know"
        if source in ("mctest", "sodapop"):
            letter, text = ast.literal_eval(gold)
            if wrong:
                return " E"
            if r < 300:
                return " " + letter
            if r < 450:
                return " " + text + "."
            if r < 550:
                return " " + str("ABCD".index(letter))
            if r < 600:
                return "\n" + letter
            return " " + letter + ": " + text
        if wrong:
            return " unknown\n" + gold
        if r < 500:
            return " " + gold + "\nPassage: x"
        if r < 650:
            return " " + gold.upper() + "!"
        if r < 700:
            return "\n" + gold
        return " (" + gold + ")"
    if task == "nli":
        label = {"entailment": "True", "not-entailment": "False", "neutral": "Neither"}[gold]
        if source == "wnli" and attr == "race":
            return " Maybe"
        if wrong:
            return " " + {"True": "False", "False": "Neither", "Neither": "True"}[label]
        if r < 400:
            return " " + label
        if r < 500:
            return " " + label.lower() + "."
        if r < 550:
            return " True or False"
        if r < 600:
            return "\n" + label
        return " " + label + "ly"
    # sentiment: gold is 1 (positive / toxic) or 0
    if source == "EEC":
        return " positive"
    pos = gold == "1"
    if source == "Toxic":
        words = ["True", "False"] if pos else ["False", "True"]
    else:
        words = ["positive", "negative"] if pos else ["negative", "positive"]
    if wrong:
        return " " + words[1]
    if r < 400:
        return " " + words[0]
    if r < 470:
        return " " + words[0].capitalize() + "!"
    if r < 520:
        return " not " + words[1]
    if r < 570:
        return " none"
    if r < 620:
        return " yes" if pos else " no"
    return "\n" + words[0]


def load_rows(data, task, attr):
    with zipfile.ZipFile(os.path.join(data, f"{attr}_datasets.zip")) as z:
        text = z.read(f"{attr}_datasets/{task}_{attr}_dataset.jsonl").decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calm-git", required=True)
    ap.add_argument("--data", default="../shared/datasets/calm")
    ap.add_argument("--out", default="tasks/tests/data/calm_reference")
    args = ap.parse_args()
    data = os.path.abspath(args.data)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    commit = subprocess.check_output(["git", "--git-dir", args.calm_git, "rev-parse", "HEAD"], text=True).strip()
    tmp = tempfile.mkdtemp(prefix="calm-ref-")
    archive = subprocess.check_output(["git", "--git-dir", args.calm_git, "archive", "HEAD", "evaluation", "utils.py"], stderr=subprocess.DEVNULL)
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp)
    ev = os.path.join(tmp, "evaluation")
    sys.path.insert(0, ev)
    from benchmark.scenarios.prompt_creation import PromptGenerator

    gen = PromptGenerator(5)
    os.makedirs(os.path.join(ev, "results"), exist_ok=True)
    samples, checksums, seen = [], {}, {}
    for task in TASKS:
        for attr in GROUPS:
            rows = load_rows(data, task, attr)
            gts = [r for r in __import__("csv").reader(open(os.path.join(ev, "gt", f"gt_{task}_{attr}.csv"), newline=""))][1:]
            assert len(gts) == len(rows), (task, attr)
            prompts = [gen.prepare_prompt(r) for r in rows]
            per = 150 if attr == "gender" else 200
            preds = []
            for i, (row, gt) in enumerate(zip(rows, gts)):
                p = prediction(task, attr, prompts[i], gt[2], row["source_dataset"], row[attr], i // per)
                # A model answers a prompt once (moeval sends identical prompts once, across tasks):
                # the first answer, in task order, stands.
                preds.append(seen.setdefault(prompts[i], p))
            checksums[f"calm_{task}_{attr}"] = format(fnv1a("\u0000".join(preds)), "016x")
            with open(os.path.join(ev, "results", f"fixed-{task}_{attr}.json"), "w") as f:
                json.dump(preds, f)
            sources = {}
            for i, row in enumerate(rows):
                sources.setdefault(row["source_dataset"], []).append(i)
            for src, idx in sources.items():
                for i in sorted({idx[0], idx[0] + 60, idx[-1] - per + 1}):
                    samples.append({"task": f"calm_{task}_{attr}", "doc_id": i, "source_dataset": src, "prompt": prompts[i], "prediction": preds[i]})
    with open(os.path.join(out, "prompts.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")

    scores = {}
    cwd = os.getcwd()
    os.chdir(os.path.join(ev, "scripts"))
    sys.path.insert(0, os.path.join(ev, "scripts"))
    # utils.py imports pandas; import it before `round` changes (numpy's import calls it).
    import pandas  # noqa: F401

    real_round = builtins.round
    try:
        for task in TASKS:
            sys.argv = ["accuracy.py", "--model", "fixed", "--task", task, "--detailed"]
            buf = io.StringIO()
            builtins.round = lambda x, n=None: x
            try:
                with contextlib.redirect_stdout(buf):
                    runpy.run_path("accuracy.py", run_name="__main__")
            finally:
                builtins.round = real_round
            text = buf.getvalue()
            res = {"discarded": "Discard Task" in text, "excluded": [], "included": []}
            for line in text.splitlines():
                if line.startswith("Gender Bias Score of CALMB : "):
                    res["gender"] = float(line.split(": ")[1])
                elif line.startswith("Race Bias Score of CALMB : "):
                    res["race"] = float(line.split(": ")[1])
                elif line.endswith("   do not include") or line.endswith("   discard due to same output for all examples"):
                    res["excluded"].append(line.split("   ")[0])
            all_sources = {r["source_dataset"] for r in load_rows(data, task, "gender")}
            res["excluded"].sort()
            res["included"] = [] if res["discarded"] else sorted(all_sources - set(res["excluded"]))
            scores[task] = res
    finally:
        os.chdir(cwd)
    six = [scores[t][a] for t in TASKS for a in GROUPS if a in scores[t]]
    report = {
        "reference": f"github.com/vipulgupta1011/CALM@{commit}",
        "predictions_fnv1a": checksums,
        "tasks": scores,
        "calm_score": sum(six) / len(six) if len(six) == 6 else None,
    }
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
