#!/usr/bin/env python3
"""Summarises a scripts/device-check.sh output folder as one JSON report: test results, moeval vs
transformers throughput ratios per shape, and batch-1 decode as a fraction of the memory-bandwidth
limit (bytes of weights read per token / measured copy bandwidth)."""
import json
import os
import re
import sys

OLMOE = dict(vocab=50304, hidden=2048, inter=1024, layers=16, heads=16, kv=16, experts=64, top_k=8)
SMALL = dict(vocab=50304, hidden=512, inter=1024, layers=8, heads=8, kv=8, experts=4, top_k=2)


def active_weight_bytes(c):
    """bf16 bytes one decoded token reads: attention, router, its top-k experts, the LM head."""
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    attn = h * (c["heads"] * hd) * 2 + h * (c["kv"] * hd) * 2
    per_layer = attn + c["experts"] * h + c["top_k"] * 3 * h * c["inter"]
    return 2 * (c["layers"] * per_layer + c["vocab"] * h)


def load(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def tests(path):
    try:
        text = open(path).read()
    except OSError:
        return None
    m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    failed = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    return {"passed": sum(int(x[1]) for x in m), "failed": sum(int(x[2]) for x in m), "failures": failed}


def main():
    out = sys.argv[1]
    rep = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None,
           "kernel_tests": tests(os.path.join(out, "kernel-tests.log")),
           "model_tests": tests(os.path.join(out, "model-tests.log")), "bench": {}}
    bw = load(os.path.join(out, "bandwidth.json"))
    for preset, shape in [("small", SMALL), ("olmoe-1b-7b", OLMOE)]:
        ours, theirs = load(os.path.join(out, f"moeval-{preset}.json")), load(os.path.join(out, f"hf-{preset}.json"))
        r = {"moeval": ours, "transformers": theirs}
        if ours and theirs:
            r["prefill_ratio"] = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
            hd = {d["batch"]: d["tok_s"] for d in theirs["decode"]}
            r["decode_ratio"] = {d["batch"]: d["tok_s"] / hd[d["batch"]] for d in ours["decode"] if d["batch"] in hd}
        if ours and bw:
            b1 = [d["tok_s"] for d in ours["decode"] if d["batch"] == 1]
            limit = bw["copy_bytes_read_plus_written_per_s"] / active_weight_bytes(shape)
            r["batch1_bandwidth_limit_tok_s"] = limit
            if b1:
                r["batch1_fraction_of_bandwidth_limit"] = b1[0] / limit
        rep["bench"][preset] = r
    print(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
