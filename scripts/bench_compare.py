#!/usr/bin/env python3
"""Runs `moeval bench` and, when a virtualenv with torch and transformers exists at .venv, the Hugging Face
baseline (scripts/hf_bench.py) on the same preset and thread count, one after the other, and prints both
with their ratios. Results are also written to target/bench.json.

With --bf16 both sides run on the same bf16 checkpoint (`moeval init-model --preset small --dtype
bf16`, written to a temporary folder): moeval holding its weights in bf16 (`--dtype checkpoint`),
transformers computing in f32 on it (the same numbers), and moeval upcasting at load (`--dtype f32`)
for the memory ratio.

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
    p.add_argument("--bf16", action="store_true", help="compare on a bf16 checkpoint (see above)")
    p.add_argument("--python", default=os.path.join(".venv", "bin", "python"),
                   help="the Python with torch and transformers (default .venv/bin/python)")
    a = p.parse_args()
    model_args, hf_args, upcast = ["--preset", a.preset], [], None
    if a.bf16:
        import tempfile
        ckpt = os.path.join(tempfile.mkdtemp(prefix="moeval-bf16-"), a.preset)
        subprocess.run([a.moeval, "init-model", "--preset", a.preset, "--dtype", "bf16", "--out", ckpt],
                       check=True)
        model_args, hf_args = ["--model", ckpt], ["--model", ckpt]
        upcast = run_json([a.moeval, "--threads", str(a.threads), "--dtype", "f32", "bench", *model_args, "--json"])
    ours = run_json([a.moeval, "--threads", str(a.threads), "bench", *model_args, "--json"])
    py = a.python
    theirs = None
    if os.path.exists(py):
        theirs = run_json([py, "scripts/hf_bench.py", "--threads", str(a.threads), *hf_args])
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
    if upcast:
        print(f"| weights held as | {ours.get('weights_dtype')} | f32 compute | |")
        print(f"| decode tok/s, bf16 held / f32 upcast | {ours['decode_tok_s'] / upcast['decode_tok_s']:.2f}x | | |")
        print(f"| peak RSS, bf16 held / f32 upcast | {ours['peak_rss_mb'] / upcast['peak_rss_mb']:.2f}x | | |")
    os.makedirs("target", exist_ok=True)
    with open("target/bench.json", "w") as f:
        json.dump({"moeval": ours, "transformers": theirs, "moeval_f32_upcast": upcast}, f, indent=1)


if __name__ == "__main__":
    main()
