#!/usr/bin/env python3
"""Writes tasks/tests/data/sni/tk_instruct_references.json: Tk-Instruct's prompt encodings of
the test task file (tasks/tests/data/sni/task9100_unit_conversion.json) in the three evaluation
modes, and Tk-Instruct's scores (exact match, ROUGE-1, ROUGE-L) for a fixed set of predictions.
tasks/tests/sni_reference.rs compares moeval's prompts (byte for byte) and scores with them.

The reference code is run as it is, from a checkout of yizhongw/Tk-Instruct:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install rouge-score nltk
    /tmp/venv/bin/python scripts/make_sni_references.py /path/to/Tk-Instruct/src

Only what needs the network, a GPU or an old transformers is replaced: the collator's base imports
(`transformers.data.data_collator` of transformers 4.x) and the GPT-2 tokenizer of the cross-lingual
track by stand-ins, and Tk-Instruct's vendored copy of Google's rouge package by the identical
`rouge_score` package. The cross-lingual track's GPT-2 tokenizer is
tasks/tests/data/sni/gpt2-layout-tokenizer/tokenizer.json, a small byte-level BPE in GPT-2's layout
trained on the track's pairs by `--make-tokenizer`. The token budget (`max_source_length`) runs with transformers' own
`PreTrainedTokenizerFast` on tasks/tests/data/sni/t5-layout-tokenizer/tokenizer.json, a small
Unigram tokenizer in T5's layout (whitespace split + Metaspace, `</s>` appended, special tokens
`<pad> </s> <unk>`), trained on the task file by `--make-tokenizer` (written once, then committed),
with `clean_up_tokenization_spaces=True` as transformers 4.x (Tk-Instruct's) defaulted for T5.
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
T5_LAYOUT = ROOT / "tasks/tests/data/sni/t5-layout-tokenizer/tokenizer.json"
GPT2_LAYOUT = ROOT / "tasks/tests/data/sni/gpt2-layout-tokenizer/tokenizer.json"
# The cross-lingual track's pairs (compute_metrics(xlingual=True)): several scripts, accents,
# punctuation, stemmable English, repeated words.
XLINGUAL = [
    ("Le chat est sur la table.", ["Le chat est sur la table"]),
    ("le chat dort", ["Le chat est sur la table.", "un chat dort"]),
    ("Кошка сидит на столе", ["Кошка на столе."]),
    ("猫在桌子上", ["猫在桌子上。", "一只猫"]),
    ("Der Hund läuft schnell", ["Der Hund rennt schnell!"]),
    ("dogs are running", ["dog runs"]),
    ("", ["quelque chose"]),
    ("¿Dónde está la biblioteca?", ["¿Dónde está la biblioteca?"]),
    ("la la la", ["la"]),
    ("Οι γάτες κοιμούνται", ["Η γάτα κοιμάται"]),
]
# Budgets small enough for the test file's short prompts to lose examples, then be cut.
BUDGETS = [150, 165, 200, 250, 290, 330]

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
    """Stands in for the T5 tokenizer where the budget is never reached: the collator only counts
    tokens with it."""

    def __call__(self, text):
        return {"input_ids": text.split()}


def make_tokenizer():
    """Trains the small T5-layout tokenizer on the task file's text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    task = json.loads(TASK.read_text())
    texts = [task["Definition"][0]]
    texts += [e[k] for e in task["Positive Examples"] for k in ("input", "output", "explanation")]
    texts += [i["input"] for i in task["Instances"]]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    T5_LAYOUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(T5_LAYOUT))
    print(f"wrote {T5_LAYOUT}")

    # GPT-2's layout: byte-level pre-tokenizer without a prefix space, BPE, byte-level decoder.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t for p, refs in XLINGUAL for t in [p, *refs]] * 3, trainer)
    GPT2_LAYOUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(GPT2_LAYOUT))
    print(f"wrote {GPT2_LAYOUT}")


def t5_layout_tokenizer():
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(
        tokenizer_file=str(T5_LAYOUT),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=True,
    )
    t.decode(t("warm up")["input_ids"], skip_special_tokens=True)
    return t


def install_stand_ins():
    # transformers' own modules stay (the budget uses its tokenizer); only what Tk-Instruct took
    # from transformers 4.x, or from the network, is replaced.
    import transformers

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
        """`from_pretrained("gpt2")` (the cross-lingual scorer's tokenizer) gives the GPT-2-layout
        tokenizer file."""

        @staticmethod
        def from_pretrained(name, **kwargs):
            assert name == "gpt2", name
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(GPT2_LAYOUT), **kwargs)

    transformers.AutoTokenizer = AutoTokenizer
    sys.modules["transformers.data.data_collator"] = collator
    rouge = types.ModuleType("rouge")
    rouge.rouge_scorer = rouge_score.rouge_scorer
    sys.modules["rouge"] = rouge
    sys.modules["rouge.rouge_scorer"] = rouge_score.rouge_scorer


def main():
    if sys.argv[1] == "--make-tokenizer":
        return make_tokenizer()
    src = Path(sys.argv[1])
    t5 = t5_layout_tokenizer()
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

    # With a budget: examples dropped, then the prompt cut to `max_source_length` T5-layout tokens.
    budgeted = {}
    for mode, flags in MODES.items():
        for budget in BUDGETS:
            collator = ni_collator.DataCollatorForNI(
                tokenizer=t5,
                max_source_length=budget,
                text_only=True,
                add_task_name=False,
                num_neg_examples=0,
                **flags,
            )
            budgeted[f"{mode}/{budget}"] = collator(examples)["inputs"]

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

    xlingual = []
    for pred, refs in XLINGUAL:
        row = {"prediction": pred, "references": refs}
        for name, fn in [
            ("exact_match", compute_metrics.exact_match_score),
            ("rouge1", compute_metrics.rouge1_score),
            ("rougeL", compute_metrics.rougeL_score),
        ]:
            row[name] = float(
                compute_metrics.metric_max_over_ground_truths(fn, pred, refs, xlingual=True)
            )
        xlingual.append(row)
    xlingual_totals = compute_metrics.compute_metrics(
        [p for p, _ in XLINGUAL], [r for _, r in XLINGUAL], xlingual=True
    )
    out = {
        "made_by": "scripts/make_sni_references.py with Tk-Instruct src/ni_collator.py and "
        "src/compute_metrics.py",
        "task_file": TASK.name,
        "encodings": encodings,
        "budget_tokenizer": str(T5_LAYOUT.relative_to(ROOT)),
        "budgeted_encodings": budgeted,
        "scores": per_pair,
        "compute_metrics": totals,
        "xlingual_tokenizer": str(GPT2_LAYOUT.relative_to(ROOT)),
        "xlingual_scores": xlingual,
        "xlingual_compute_metrics": xlingual_totals,
    }
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
