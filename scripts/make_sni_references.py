#!/usr/bin/env python3
"""Writes tasks/tests/data/sni/tk_instruct_references.json: Tk-Instruct's prompt encodings of
the test task file (tasks/tests/data/sni/task9100_unit_conversion.json) in the three evaluation
modes, and Tk-Instruct's scores (exact match, ROUGE-1, ROUGE-L) for a fixed set of predictions.
tasks/tests/sni_reference.rs compares moeval's prompts (byte for byte) and scores with them.

The reference code is run as it is, from a checkout of yizhongw/Tk-Instruct:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install rouge-score nltk
    /tmp/venv/bin/python scripts/make_sni_references.py /path/to/Tk-Instruct/src

Only what needs the network or a GPU is replaced: `transformers` (the collator's base imports, a
tokenizer used only to count tokens against `max_source_length`, here never reached, and the
GPT-2 tokenizer of the cross-lingual track) by stand-ins, and Tk-Instruct's vendored copy of
Google's rouge package by the identical `rouge_score` package.
"""

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

import rouge_score.rouge_scorer

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tasks/tests/data/sni/task9100_unit_conversion.json"
OUT = ROOT / "tasks/tests/data/sni/tk_instruct_references.json"

# Tk-Instruct's evaluation settings (scripts/eval_tk_instruct.sh and the paper's ablations).
MODES = {
    "zero_shot": dict(add_task_definition=True, num_pos_examples=0, add_explanation=False),
    "few_shot": dict(add_task_definition=True, num_pos_examples=2, add_explanation=False),
    "few_shot_explained": dict(add_task_definition=True, num_pos_examples=2, add_explanation=True),
}

# Predictions scored against the instances' references, plus pairs that exercise the
# normalisation and the stemmer.
EXTRA = [
    ("dogs are running", ["dog runs"]),
    ("The answer: 5,000 M.", ["5000 m"]),
    ("", ["something"]),
    ("Generously organized studies", ["generous organization study", "other"]),
    ("  120   SECONDS!! ", ["120 s", "120 seconds"]),
]
PREDICTIONS = ["5000 m", "120 Seconds.", "500ml", "293 K", "about 4.83 km"]


class CountingTokenizer:
    """Stands in for the T5 tokenizer: the collator only counts tokens with it."""

    def __call__(self, text):
        return {"input_ids": text.split()}


def install_stand_ins():
    transformers = types.ModuleType("transformers")
    data = types.ModuleType("transformers.data")
    collator = types.ModuleType("transformers.data.data_collator")
    collator.dataclass = dataclasses.dataclass
    for name in ("Optional", "Any", "Union"):
        setattr(collator, name, getattr(typing, name))
    collator.PreTrainedTokenizerBase = object
    collator.PaddingStrategy = str
    collator.__all__ = [
        "dataclass",
        "Optional",
        "Any",
        "Union",
        "PreTrainedTokenizerBase",
        "PaddingStrategy",
    ]

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return None

    transformers.AutoTokenizer = AutoTokenizer
    transformers.data = data
    data.data_collator = collator
    sys.modules.update(
        {
            "transformers": transformers,
            "transformers.data": data,
            "transformers.data.data_collator": collator,
        }
    )
    rouge = types.ModuleType("rouge")
    rouge.rouge_scorer = rouge_score.rouge_scorer
    sys.modules["rouge"] = rouge
    sys.modules["rouge.rouge_scorer"] = rouge_score.rouge_scorer


def main():
    src = Path(sys.argv[1])
    install_stand_ins()
    sys.path.insert(0, str(src))
    import compute_metrics
    import ni_collator

    task = json.loads(TASK.read_text())
    # What ni_dataset.py yields per instance: the task's fields, its name, and the instance.
    base = {k: v for k, v in task.items() if k not in ("Instances", "Instruction Source")}
    base["Task"] = TASK.stem
    examples = [dict(base, id=i["id"], Instance=i) for i in task["Instances"][:100]]

    encodings = {}
    for mode, flags in MODES.items():
        collator = ni_collator.DataCollatorForNI(
            tokenizer=CountingTokenizer(),
            max_source_length=10**9,
            text_only=True,
            add_task_name=False,
            num_neg_examples=0,
            **flags,
        )
        encodings[mode] = collator(examples)["inputs"]

    pairs = [(p, e["Instance"]["output"]) for p, e in zip(PREDICTIONS, examples)] + EXTRA
    per_pair = []
    for pred, refs in pairs:
        per_pair.append(
            {
                "prediction": pred,
                "references": refs,
                "exact_match": float(
                    compute_metrics.metric_max_over_ground_truths(
                        compute_metrics.exact_match_score, pred, refs
                    )
                ),
                "rouge1": compute_metrics.metric_max_over_ground_truths(
                    compute_metrics.rouge1_score, pred, refs
                ),
                "rougeL": compute_metrics.metric_max_over_ground_truths(
                    compute_metrics.rougeL_score, pred, refs
                ),
            }
        )
    totals = compute_metrics.compute_metrics([p for p, _ in pairs], [r for _, r in pairs])
    out = {
        "made_by": "scripts/make_sni_references.py with Tk-Instruct src/ni_collator.py and "
        "src/compute_metrics.py",
        "task_file": TASK.name,
        "encodings": encodings,
        "scores": per_pair,
        "compute_metrics": totals,
    }
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
