"""Standard errors exactly as lm-evaluation-harness 0.4.13 computes them, for tasks/tests/bootstrap.rs.

Run with the venv that has lm-eval 0.4.13 (no torch needed):

    /tmp/moeval-ci-venv/bin/python scripts/make_bootstrap_references.py

It writes tasks/tests/data/bootstrap_references.json: a few deterministic per-document item lists
(log-likelihoods for `perplexity`, (log-likelihood, words or bytes) pairs for `word_perplexity`,
`byte_perplexity` and `bits_per_byte`, ([references], prediction) pairs for `bleu`, `chrf` and
`ter`, 0/1 values for `acc`) and, for each, the value and stderr that the harness's own
`_compute_task_aggregations` reports: the registry's aggregation for the metric, and
`stderr_for_metric` with `bootstrap_iters` at `simple_evaluate`'s default (100000, which the CLI
keeps; lowered to 100 for bleu/chrf/ter by the harness). "N/A" (no standard error) is written as
null. Items are passed in document order, as the evaluator collects them.

Nothing here is random beyond the harness's own seeded bootstrap; rerunning writes the same file.
The perplexity bootstraps take about a minute on two cores.
"""

import inspect
import json
import math
import os
import sys
from pathlib import Path

import sacrebleu
from lm_eval.api.registry import get_metric_aggregation
from lm_eval.evaluator import simple_evaluate
from lm_eval.evaluator_utils import _compute_task_aggregations

OUT = Path(__file__).resolve().parent.parent / "tasks/tests/data/bootstrap_references.json"

WORDS = ["the", "cat", "sat", "on", "a", "mat", "7.7", "park's", "well-known", "dog",
         "ran", "home,", "quickly.", "Über", "1,000", "(big)", "and", "it", "was", "late!"]


def sentence(seed: int, length: int) -> str:
    return " ".join(WORDS[(seed * 7 + j * j * 3 + j * (seed % 5)) % len(WORDS)] for j in range(length))


def loglikelihoods(n: int, scale: float) -> list[float]:
    # Deterministic, irregular, negative, spread over a factor of ~100; multiples of 1/1024, whose
    # short decimal forms any JSON reader parses to the same double.
    xs = [-(((i * 7919) % 1009) / 97.3 + 0.05 * (i % 7) + 0.01) * scale for i in range(n)]
    return [round(x * 1024) / 1024 for x in xs]


def weighted(n: int) -> list[list[float]]:
    return [[ll, float(3 + (i * 13) % 17)] for i, ll in enumerate(loglikelihoods(n, 2.0))]


def translations(n: int, refs_per_doc) -> list[list]:
    out = []
    for i in range(n):
        k = refs_per_doc(i)
        refs = [sentence(i + 1 + 3 * r, 6 + (i + r) % 11) for r in range(k)]
        # Predictions: a reference with edits (some identical, some unrelated).
        if i % 9 == 0:
            pred = refs[0]
        elif i % 9 == 4:
            pred = sentence(i * 5 + 2, 4 + i % 6)
        else:
            w = refs[0].split()
            w = w[1:] + w[:1] if i % 2 else w[: max(1, len(w) - i % 3)]
            pred = " ".join(w)
        out.append([refs, pred])
    return out


class Task:
    """What `_compute_task_aggregations` reads of a task: its name and metric -> aggregation."""

    def __init__(self, metric: str):
        self.task_name = f"bootstrap_{metric}"
        self._agg = {metric: get_metric_aggregation(metric)}

    def aggregation(self):
        return self._agg


def main() -> None:
    iters = inspect.signature(simple_evaluate).parameters["bootstrap_iters"].default
    assert iters == 100000, iters
    acc = [float((i * 37) % 5 < 3) for i in range(200)]
    corpora = {
        "acc_200": acc,
        "lls_2": loglikelihoods(2, 1.0),
        "lls_7": loglikelihoods(7, 1.0),
        "lls_200": loglikelihoods(200, 1.0),
        "lls_200_small": loglikelihoods(200, 0.01),
        "weighted_50": weighted(50),
        "translations_200": translations(200, lambda i: 1),
        "translations_12_two_refs": translations(12, lambda i: 2),
        "translations_12_mixed_refs": translations(12, lambda i: 1 + i % 3),
    }
    cases = [("acc", "acc_200")]
    cases += [("perplexity", c) for c in ("lls_2", "lls_7", "lls_200", "lls_200_small")]
    cases += [(m, "weighted_50") for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    for metric in ("bleu", "chrf", "ter"):
        cases += [(metric, "translations_200"), (metric, "translations_12_two_refs")]
    cases.append(("bleu", "translations_12_mixed_refs"))

    out_cases = []
    for metric, corpus in cases:
        items = corpora[corpus]
        agg, n = _compute_task_aggregations(Task(metric), {(metric, "none"): items}, iters)
        se = agg[f"{metric}_stderr,none"]
        value = float(agg[f"{metric},none"])
        print(f"{metric} on {corpus}: value {value!r} stderr {se!r}", file=sys.stderr)
        out_cases.append({
            "metric": metric,
            "corpus": corpus,
            "value": value,
            "stderr": None if se == "N/A" else float(se),
        })
        assert n == len(items) and math.isfinite(value)

    note = ("Made by scripts/make_bootstrap_references.py: lm-evaluation-harness's own "
            "_compute_task_aggregations (registry aggregation, stderr_for_metric, "
            f"bootstrap_iters={iters}) on each case's corpus, items in this order; stderr null = "
            "'N/A'. bleu/chrf/ter items are [references, prediction]; weighted items "
            "[log-likelihood, words or bytes].")
    versions = {
        "lm_eval": "0.4.13",
        "sacrebleu": sacrebleu.__version__,
        "python": sys.version.split()[0],
        "DISABLE_MULTIPROC": os.getenv("DISABLE_MULTIPROC") is not None,
    }
    # One line per case and per corpus: small, and diffs stay readable.
    dump = lambda v: json.dumps(v, ensure_ascii=False)
    lines = ["{", f' "note": {dump(note)},', f' "versions": {dump(versions)},',
             f' "bootstrap_iters": {iters},', ' "cases": [']
    lines += [f"  {dump(c)}," for c in out_cases]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ],", ' "corpora": {']
    lines += [f"  {dump(k)}: {dump(v)}," for k, v in corpora.items()]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" }", "}"]
    OUT.write_text("\n".join(lines) + "\n")
    json.loads(OUT.read_text())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
