#!/usr/bin/env python3
"""Writes tests/data/hooks/lmeval_reference.json: what lm-evaluation-harness 0.4.13 makes of the
hook test tasks (tests/data/hooks: `process_docs`, `doc_to_text` / `doc_to_target` /
`doc_to_choice` as `!function` hooks). For each task and document, in doc_id order: the document
after `process_docs` and the request arguments its `--log_samples` wrote, re-serialised with
`json.dumps(..., ensure_ascii=False)`. tasks/tests/hooks.rs compares moeval with this file.

    /tmp/moeval-ci-venv/bin/python scripts/make_hooks_references.py

It runs `lm_eval --model dummy` (random scores; only the prompts matter) offline. The prompts do
not depend on the model, so a rerun with the same lm-eval version rewrites the same file.
"""

import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests/data/hooks"
OUT = TASKS / "lmeval_reference.json"
NAMES = ["hooks_tiny", "hooks_text"]


def main():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    lm_eval = Path(sys.executable).parent / "lm_eval"
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [str(lm_eval), "--model", "dummy", "--tasks", ",".join(NAMES), "--include_path", ".",
             "--log_samples", "--output_path", out],
            cwd=TASKS, env=env, check=True,
        )
        reference = {"lm_eval": version("lm_eval"), "datasets": version("datasets")}
        for name in NAMES:
            (path,) = Path(out).glob(f"*/samples_{name}_*.jsonl")
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows.sort(key=lambda r: r["doc_id"])
            reference[name] = [
                {"doc": r["doc"], "arguments": json.dumps(r["arguments"], ensure_ascii=False)}
                for r in rows
            ]
    OUT.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
