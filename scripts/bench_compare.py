#!/usr/bin/env python3
"""Runs `moeval bench` and, when a virtualenv with torch and transformers exists at .venv, the Hugging Face
baseline (scripts/hf_bench.py) on the same preset and thread count, one after the other, and prints both
with their ratios. Results are also written to target/bench.json.

Set up the baseline once:  python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
"""
import argparse
import json
import os
import subprocess
import sys


def run_json(cmd):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moeval", required=True, help="path of the release moeval binary")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="small")
    a = p.parse_args()
    ours = run_json([a.moeval, "--threads", str(a.threads), "bench", "--preset", a.preset, "--json"])
    py = os.path.join(".venv", "bin", "python")
    theirs = None
    if os.path.exists(py):
        theirs = run_json([py, "scripts/hf_bench.py", "--threads", str(a.threads)])
    else:
        print("no .venv: skipping the transformers baseline (see --help)", file=sys.stderr)
    rows = [("prefill tok/s", "prefill_tok_s", True), ("decode tok/s", "decode_tok_s", True),
            ("peak RSS MiB", "peak_rss_mb", False)]
    print(f"| metric | moeval | transformers | ratio |\n|---|---|---|---|")
    for label, key, higher_better in rows:
        o = ours[key]
        t = theirs[key] if theirs else None
        ratio = "" if t is None else f"{(o / t if higher_better else o / t):.2f}x"
        print(f"| {label} | {o:.0f} | {'' if t is None else f'{t:.0f}'} | {ratio} |")
    print(f"| peak RSS / f32 weights | {ours['peak_rss_mb'] / ours['weights_mb_f32']:.2f}x | | |")
    os.makedirs("target", exist_ok=True)
    with open("target/bench.json", "w") as f:
        json.dump({"moeval": ours, "transformers": theirs}, f, indent=1)


if __name__ == "__main__":
    main()
