#!/usr/bin/env python3
"""Writes tasks/tests/data/cobbler_reference.json: CoBBLEr's bias statistics for four synthetic
judges, computed by the reference's own evaluation code (minnesotanlp/cobbler,
competitive-llms/evaluations: order.py, bandwagon.py, distraction.py, compassion.py, salience.py).

Usage: python3 scripts/make_cobbler_references.py /path/to/cobbler-git-dir
The evaluation modules are written from that git directory (HEAD) to a temporary folder and run
there unchanged; the packages they import only for real judges (guidance, torch, tenacity, tqdm,
nltk) are replaced by stand-ins, and the judge (`eval_gen`) is a function of the prompt text.
Each bias runs from a fresh `random.seed(939)`, as one run of the reference's evaluate.py does.
It also records every prompt the reference shows the judge, per bias: their count, the SHA-256 of
the sorted prompts joined by NUL, and the first one (the prompt test compares moeval's with these).
Data: ../shared/datasets/cobbler (all 50 instructions x 15 models); evaluator name "koala" (the
judge's own generations for egocentric bias). Salience runs salience.py's evaluate_salience on the
order run's output files.

The judges (tasks/tests/reference_scores.rs defines the same ones in Rust):
- content: prefers the response with more letters "e" (then the smaller text, then the first shown);
- longer: prefers the longer response in characters (the first shown on equal length);
- first_invalid: picks the first shown, but answers "I cannot decide." when that response's length
  in characters is 0 or 1 modulo 5;
- cue: picks the system a bandwagon or distractor sentence names, otherwise as `content`.
A pick is answered "<label> is better" with the label as shown (System Star / Model NAME).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/datasets/cobbler"
OUT = ROOT / "tasks/tests/data/cobbler_reference.json"
EVALUATOR = "koala"


def stub_modules():
    for name in ["guidance", "torch", "nltk", "nltk.tokenize"]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["nltk"].download = lambda *a, **k: None
    sys.modules["nltk.tokenize"].word_tokenize = lambda s: s.split()
    tenacity = types.ModuleType("tenacity")
    tenacity.retry = lambda **k: (lambda f: f)
    tenacity.stop_after_attempt = lambda *a: None
    tenacity.wait_random_exponential = lambda **k: None
    sys.modules["tenacity"] = tenacity
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda it, **k: it
    sys.modules["tqdm"] = tqdm


def shown(prompt):
    """(label, response) twice, as the prompt shows them, and the text after the responses."""
    start = prompt.index("\n```\n") + 5
    end = prompt.rindex("\n```\n")
    block, after = prompt[start:end], prompt[end:]
    if block.startswith("System Star: "):
        cut = block.index("\nSystem Square: ")
        return [("System Star", block[13:cut]), ("System Square", block[cut + 16 :])], after
    first_label = block[: block.index(": ")]
    cut = block.rindex("\nModel ")
    second_label = block[cut + 1 : block.index(": ", cut)]
    return [
        (first_label, block[len(first_label) + 2 : cut]),
        (second_label, block[cut + 1 + len(second_label) + 2 :]),
    ], after


def content_pick(pair):
    (_, a), (_, b) = pair
    ca, cb = a.count("e"), b.count("e")
    return 0 if ca > cb or (ca == cb and a <= b) else 1


def answer(pair, i):
    return pair[i][0].replace(" (You)", "") + " is better"


JUDGES = {
    "content": lambda pair, after: answer(pair, content_pick(pair)),
    "longer": lambda pair, after: answer(pair, 0 if len(pair[0][1]) >= len(pair[1][1]) else 1),
    "first_invalid": lambda pair, after: "I cannot decide." if len(pair[0][1]) % 5 < 2 else answer(pair, 0),
    "cue": lambda pair, after: answer(pair, 0)
    if "System Star" in after
    else answer(pair, 1)
    if "System Square" in after
    else answer(pair, content_pick(pair)),
}


class Judge:
    def __init__(self, judge, responses, record=None):
        self.judge = judge
        self.known = {r for v in responses.values() for r in v}
        # Every prompt the reference shows the judge, when recording.
        self.record = record

    def generate(self, prompts):
        if self.record is not None:
            self.record.append(prompts[0])
        pair, after = shown(prompts[0])
        assert pair[0][1] in self.known and pair[1][1] in self.known, "prompt not parsed"
        return [{"generation": self.judge(pair, after)}]


def stats(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.rpartition(": ")
        out[key] = float(value)
    return out


def main():
    git_dir = sys.argv[1]
    stub_modules()
    instructions = json.loads((DATA / "llm_preference_evalset.json").read_text())
    responses = json.loads((DATA / "full_n15_model_generations.json").read_text())
    it = [d["instruction"] for d in instructions]
    ref = [d["reference"] for d in instructions]
    n = len(it)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "evaluations"
        src.mkdir()
        for name in ["utils", "order", "bandwagon", "distraction", "compassion", "salience"]:
            text = subprocess.run(
                ["git", "-C", git_dir, "show", f"HEAD:competitive-llms/evaluations/{name}.py"],
                check=True, capture_output=True, text=True,
            ).stdout
            (src / f"{name}.py").write_text(text)
        sys.path.insert(0, str(src))
        import random
        import order, bandwagon, distraction, compassion, salience

        salience.read_json_file = lambda path: [responses]
        os.chdir(tmp)
        result = {}
        prompts = {}
        for jname, judge in JUDGES.items():
            eval_gen = Judge(judge, responses)
            res = {}
            for bias, fn in [
                ("order", order.evaluate_order),
                ("bandwagon", bandwagon.evaluate_bandwagon),
                ("distraction", distraction.evaluate_distraction),
                ("compassion", compassion.evaluate_compassion),
            ]:
                os.makedirs(f"n15_evaluations_{bias}", exist_ok=True)
                random.seed(939)
                # The prompts do not depend on the judge's answers: recorded for the first judge.
                shown_prompts = [] if not prompts.get(bias) else None
                eval_gen.record = shown_prompts
                fn(n, EVALUATOR, it, ref, responses, eval_gen)
                if shown_prompts is not None:
                    prompts[bias] = {
                        "count": len(shown_prompts),
                        "sha256_sorted": hashlib.sha256(
                            "\0".join(sorted(shown_prompts)).encode()
                        ).hexdigest(),
                        "first": shown_prompts[0],
                    }
                res[bias] = stats(f"n15_evaluations_{bias}/nC2_statistics_{EVALUATOR}.json")
            official = Path(f"n15_evaluations_order/_official/{EVALUATOR}")
            official.mkdir(parents=True, exist_ok=True)
            for kind in ["statistics", "true_order"]:
                Path(f"n15_evaluations_order/nC2_{kind}_{EVALUATOR}.json").replace(
                    official / f"nC2_{kind}_{EVALUATOR}.json"
                )
            os.makedirs("n15_evaluations_salience", exist_ok=True)
            salience.evaluate_salience(EVALUATOR)
            res["salience"] = stats(f"n15_evaluations_salience/{EVALUATOR}_salience_bias.json")
            result[jname] = res
    OUT.write_text(
        json.dumps({"evaluator": EVALUATOR, "judges": result, "prompts": prompts}, indent=1) + "\n"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
