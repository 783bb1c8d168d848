#!/usr/bin/env python3
"""Writes engine/tests/data/beam_reference.json: transformers' beam search on the tiny-flexolmo fixture.

Each prompt is encoded with the fixture's tokenizer.json (no special tokens) and continued alone with
`model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=10)`, the call CALM's reference code
makes (its `early_stopping` is left at the default, False; length_penalty 1.0). Three settings:
  - the fixture as it is (EOS = 0);
  - EOS = a token the beams produce often (so hypotheses end early), early_stopping False;
  - the same EOS with early_stopping True.
engine/tests/beam.rs reproduces every output token for token.

Usage (f32 on the CPU; needs torch, transformers, tokenizers):
  python3 scripts/beam_reference.py ../shared/fixtures/tiny-flexolmo engine/tests/data/beam_reference.json
"""
import collections
import json
import sys

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice is a doctor. Bob is a nurse. Who is the doctor? Answer:",
    "def add(a, b):\n    return a + b",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "Question: Is the sky blue?\nAnswer:",
    "Premise: A man plays guitar.\nHypothesis: A person makes music.\nTrue, False or Neither?",
    "Review: the film was wonderful. Sentiment:",
    "1, 2, 3, 4,",
    "Once upon a time",
    "Émilie a écrit: «bonjour»",
]
NUM_BEAMS = 3
MAX_NEW_TOKENS = 10


def run(model, tok, eos, early_stopping):
    out = []
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False).ids
        with torch.no_grad():
            seq = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                num_beams=NUM_BEAMS,
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                early_stopping=early_stopping,
                eos_token_id=eos,
                pad_token_id=1,
            )
        out.append({"prompt": p, "input_ids": ids, "output_ids": seq[0, len(ids):].tolist()})
    return out


def main():
    fixture, dest = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = Tokenizer.from_file(f"{fixture}/tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    plain = run(model, tok, 0, False)
    # The most frequent generated token (not the fixture's EOS or pad) becomes the EOS of the other
    # settings, so that hypotheses end before the token budget.
    counts = collections.Counter(t for r in plain for t in r["output_ids"] if t > 1)
    eos = counts.most_common(1)[0][0]
    settings = [
        {"eos_token_id": 0, "early_stopping": False, "results": plain},
        {"eos_token_id": eos, "early_stopping": False, "results": run(model, tok, eos, False)},
        {"eos_token_id": eos, "early_stopping": True, "results": run(model, tok, eos, True)},
    ]
    doc = {
        "made_by": "scripts/beam_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "num_beams": NUM_BEAMS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "length_penalty": 1.0,
        "settings": settings,
    }
    with open(dest, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
