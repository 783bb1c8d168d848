"""Records how the `datasets` library resolves the data files of each repository layout in
tasks/tests/data/hub/cases.json (written to resolution_reference.json beside it).

Each layout is built as a local folder of empty files plus its README.md, and resolved with
`datasets.load_dataset_builder(folder, name, data_dir=..., data_files=...)`: a local folder goes
through the same README `configs:` and automatic split patterns as a Hub repository. Run with the
venv that has lm-eval 0.4.13 (datasets 5.2.0):

    HF_HUB_OFFLINE=1 /tmp/moeval-ci-venv/bin/python scripts/hub_resolution_reference.py
"""

import json
import os
import sys
import tempfile

import datasets

HERE = os.path.join(os.path.dirname(__file__), "..", "tasks", "tests", "data", "hub")


def build(root, case):
    for f in case["files"]:
        p = os.path.join(root, f)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "w").close()
    if case["readme"] is not None:
        with open(os.path.join(root, "README.md"), "w") as fh:
            fh.write(case["readme"])


def resolve(root, query):
    kwargs = {k: query[k] for k in ("data_dir", "data_files") if k in query}
    try:
        b = datasets.load_dataset_builder(root, query["config"], **kwargs)
    except Exception as e:  # the error's kind is what is compared
        return {"error": type(e).__name__, "message": str(e).splitlines()[0]}
    out = {}
    for split in query["splits"]:
        files = b.config.data_files.get(split) if b.config.data_files else None
        out[split] = None if files is None else [os.path.relpath(f, root) for f in files]
    return {"config": b.config.name, "splits": out}


def main():
    cases = json.load(open(os.path.join(HERE, "cases.json")))["cases"]
    results = {}
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            root = os.path.join(d, case["name"])
            os.makedirs(root)
            build(root, case)
            results[case["name"]] = [resolve(root, q) for q in case["queries"]]
    ref = {
        "note": "Written by scripts/hub_resolution_reference.py from cases.json; do not edit.",
        "datasets_version": datasets.__version__,
        "results": results,
    }
    with open(os.path.join(HERE, "resolution_reference.json"), "w") as fh:
        json.dump(ref, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    sys.exit(main())
