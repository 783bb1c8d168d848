#!/usr/bin/env python3
"""Writes tasks/tests/data/rewardbench_reference.json: RewardBench section and overall scores of a
synthetic result set, computed by reward-bench's own functions (allenai/reward-bench).

Usage: python3 scripts/make_rewardbench_references.py /path/to/reward-bench-git-dir
The reference's functions are loaded from that git directory at HEAD (`git show`), one function at
a time, so none of the heavy packages its modules import (torch, datasets, API clients) are needed;
numpy and pandas are. Nothing of the reference is copied into this repository.

The synthetic result set: every RewardBench subset gets 1 + i % 5 rows (i = the subset's position in
the reference's EXAMPLE_COUNTS); row j of subset i is judged right, wrong or unparseable by
(i + 2j) % 3 (0 right, 1 wrong, 2 no answer), with the chosen response shown first on even j.
Judgments are turned into per-row results by the reference's own parsing and scoring (process_judgement,
process_shuffled), then per-subset accuracy, calculate_scores_per_section and the leaderboard average
(get_average_over_rewardbench).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parent.parent / "tasks/tests/data/rewardbench_reference.json"


def source(git_dir, path):
    return subprocess.run(
        ["git", "-C", git_dir, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def function(git_dir, path, name, env):
    """Loads one function (top level or nested) of a reference file into `env`."""
    text = source(git_dir, path)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.Module([node], []), f"{path}:{name}", "exec"), env)
            return env[name]
    raise SystemExit(f"{name} not found in {path}")


def main():
    git_dir = sys.argv[1]
    env = {"np": np, "pd": pd}
    exec(source(git_dir, "rewardbench/constants.py"), env)
    counts, mapping = env["EXAMPLE_COUNTS"], env["SUBSET_MAPPING"]
    process_judgement = function(git_dir, "rewardbench/generative.py", "process_judgement", env)
    process_shuffled = function(git_dir, "scripts/run_generative.py", "process_shuffled", env)
    per_section = function(git_dir, "rewardbench/utils.py", "calculate_scores_per_section", env)
    average = function(git_dir, "analysis/get_benchmark_results.py", "get_average_over_rewardbench", env)

    rows, by_subset = [], {}
    for i, subset in enumerate(counts):
        for j in range(1 + i % 5):
            outcome = ["right", "wrong", "none"][(i + 2 * j) % 3]
            chosen_first = j % 2 == 0
            shuffled = not chosen_first  # the reference's flag: the chosen response is shown as B
            chosen, rejected = ("A", "B") if chosen_first else ("B", "A")
            text = {"right": f"[[{chosen}]]", "wrong": f"[[{rejected}]]", "none": "I cannot tell."}[outcome]
            result = process_shuffled(process_judgement(text, None), shuffled)
            rows.append({"subset": subset, "outcome": outcome, "chosen_first": chosen_first, "result": result})
            by_subset.setdefault(subset, []).append(result)
    metrics = {s: sum(v) / len(v) for s, v in by_subset.items()}
    sections = per_section(counts, mapping, metrics)
    df = pd.DataFrame([{"model": "synthetic", "model_type": "Generative", **metrics}])
    prefs = pd.DataFrame(
        [{"model": "other", "anthropic_helpful": 0.5, "anthropic_hhh": 0.5, "shp": 0.5, "summarize": 0.5}]
    )
    overall = float(average(df, prefs)["average"].iloc[0])
    OUT.write_text(
        json.dumps({"rows": rows, "subsets": metrics, "sections": sections, "overall": overall}, indent=1) + "\n"
    )
    print(sections, overall)


if __name__ == "__main__":
    main()
