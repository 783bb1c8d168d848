#!/usr/bin/env python3
"""Writes tasks/tests/data/metric_references.json: sentence pairs and the numbers sacreBLEU,
rouge_score and NLTK's Porter stemmer give for them. The Rust tests in tasks/tests/metrics.rs
compare moeval's metrics against this file.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install sacrebleu rouge-score nltk
    /tmp/venv/bin/python scripts/make_metric_references.py

The pairs are deterministic (hand-written edge cases plus seeded random sentences), so a rerun
with the same package versions rewrites the same file; the versions used are recorded in it.
"""

import json
import random
from importlib.metadata import version
import sys
from pathlib import Path

import rouge_score
import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer

OUT = Path(__file__).resolve().parent.parent / "tasks/tests/data/metric_references.json"

# Ten generations against their references, the kind of output a small model gives: the
# comparison quoted in docs/suites.md (moeval's old BLEU against sacreBLEU's).
GENERATIONS = [
    ("The dog ran to the park's gate.", "The dog ran to the gate of the park."),
    ("It costs 7.7 dollars, not 7,5.", "It costs 7.7 dollars."),
    ("A well-known author wrote it.", "A well-known writer wrote it."),
    ("She said: \"don't go!\"", "She said \"do not go\"."),
    ("Prices rose 3-4% in 2021.", "Prices rose by 3-4 % in 2021."),
    ("Dogs are running in the park.", "The dogs run in the park."),
    ("He can't see the U.S. coast.", "He cannot see the U.S. coast."),
    ("The model's answer is 42.", "The answer is 42."),
    ("Email me at a@b.com (today).", "Email me today at a@b.com."),
    ("Well... that's it; we're done.", "That is it, we are done."),
]

EDGE = [
    ("", ""),
    ("", "a reference with words"),
    ("a hypothesis without reference", ""),
    ("   ", "spaces only on one side"),
    ("Café naïve résumé — déjà vu.", "Cafe naive resume - deja vu."),
    ("Ünïcödé wörds: ß, æ, ø, π ≈ 3.14159", "Unicode words: ss, ae, o, pi = 3.14159"),
    ("東京は大きい都市です。", "東京は大きな都市です。"),
    ("Numbers 1,000,000 and 2.5e10 and -3.", "Numbers 1000000 and 2.5e10 and -3."),
    ("&quot;quoted&quot; &amp; &lt;tag&gt;", "\"quoted\" & <tag>"),
    ("line one\nline two\nline three", "line one\nline 2\nline three"),
    ("hyphen-\nated word", "hyphenated word"),
    ("<skipped> text kept", "text kept"),
    ("Mr. Smith's well-being (aged 7.7) isn't great...", "Mr Smith's well being, aged 7.7, is not great."),
    ("(((brackets))) [x] {y} <z>", "brackets x y z"),
    ("a.b,c.d 1.2,3 a-1 1-a", "a . b , c . d 1.2,3 a-1 1 - a"),
    ("tab\tseparated\ttext", "tab separated text"),
    ("trailing spaces   ", "trailing spaces"),
    ("UPPER lower MiXeD", "upper LOWER mixed"),
    ("the the the the the the the", "the cat is on the mat"),
    ("cat", "cat"),
    ("generously organizational hopefulness", "generous organization hopeful"),
    ("studies studying studied", "study studies studying"),
    ("running runners ran runs", "run running runner"),
    ("dogs are running", "dog runs"),
    ("The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog."),
    ("over the lazy dog the quick brown fox jumps", "The quick brown fox jumps over the lazy dog"),
    ("a b c d e f g h i j k l m n o p", "p o n m l k j i h g f e d c b a"),
    ("x\u00a0y\u2003z", "x y z"),
    ("emoji 🙂 test 🙂🙂", "emoji test"),
    ("price: $5.00/kg @ 10:30", "price $5 per kg at 10:30"),
]

WORDS = (
    "the a an cat dog dogs park park's gate run runs running ran runner quickly quick slow "
    "well-known well known 7.7 3,000 42 2021 U.S. don't can't won't it's they're we've "
    "house houses housing generous generously organization organizational hopeful hopefulness "
    "study studies studied studying happy happiness happily relational conditional rational "
    "valenci hesitanci digitizer conformabli radicalli differentli vileli analogousli "
    "vietnamization predication operator feudalism decisiveness hopefulness callousness "
    "formaliti sensitiviti sensibiliti triplicate formative formalize electriciti electrical "
    "hopeful goodness revival allowance inference airliner gyroscopic adjustable defensible "
    "irritant replacement adjustment dependent adoption homologou communism activate "
    "angulariti homologous effective bowdlerize probate rate cease controll roll sky skies "
    "dying lying tying news innings outings cannings howe proceed exceed succeed agreed "
    "feed plastered bled motoring sing conflated troubled sized hopping tanned falling "
    "hissing fizzed failing filing happy sky ties flies dies died cries cried spied "
    "café naïve 東京 — … ! ? ; : , . ( ) \" ' - / & % $ # @"
).split()


# Stems x suffixes: words that reach every rule of the Porter stemmer's steps.
STEMS = (
    "connect relat hope generat condit ration digit form sens electr adjust depend adopt commun "
    "activ effect bowdler prob cont roll happ sky fl cr agre plaster motor sing conflat troubl "
    "siz hop tann fall hiss fizz fil valen hesit radic differ vil analog predic oper feud decis "
    "callous tripl gyrosc defens irrit replac homolog angular by toy syzyg a ab"
).split()
SUFFIXES = (
    "_ s es ies ied ed eed ing ational tional enci anci izer bli abli alli entli eli ousli "
    "ization ation ator alism iveness fulness ousness aliti iviti biliti fulli logi icate ative "
    "alize iciti ical ful ness al ance ence er ic able ible ant ement ment ent sion tion ou ism "
    "ate iti ous ive ize e ll y ly yy"
).split()


def random_pairs(rnd, n):
    pairs = []
    for _ in range(n):
        ref = [rnd.choice(WORDS) for _ in range(rnd.randint(1, 18))]
        hyp = list(ref)
        for _ in range(rnd.randint(0, 6)):
            op = rnd.random()
            if op < 0.3 and hyp:
                hyp[rnd.randrange(len(hyp))] = rnd.choice(WORDS)
            elif op < 0.55 and hyp:
                del hyp[rnd.randrange(len(hyp))]
            elif op < 0.8:
                hyp.insert(rnd.randint(0, len(hyp)), rnd.choice(WORDS))
            elif len(hyp) > 3:
                # Move a block, so TER's shifts are exercised.
                i = rnd.randrange(len(hyp) - 2)
                k = rnd.randint(1, 3)
                block, hyp = hyp[i : i + k], hyp[:i] + hyp[i + k :]
                j = rnd.randint(0, len(hyp))
                hyp = hyp[:j] + block + hyp[j:]
        joiner = rnd.choice([" ", " ", " ", "  ", "\n"])
        pairs.append((joiner.join(hyp), " ".join(ref)))
    return pairs


def main():
    rnd = random.Random(20240611)
    pairs = GENERATIONS + EDGE + random_pairs(rnd, 200)
    hyps = [h for h, _ in pairs]
    refs = [r for _, r in pairs]

    # Corpora: all pairs, the ten generations, and consecutive chunks of 25.
    corpora = [("all", 0, len(pairs)), ("generations", 0, len(GENERATIONS))]
    corpora += [(f"chunk{i}", i, min(i + 25, len(pairs))) for i in range(0, len(pairs), 25)]
    # Two references per segment (the second: the first with its words reversed).
    refs2 = [" ".join(reversed(r.split())) for r in refs]
    corpus_out = []
    for name, a, b in corpora:
        h, r = hyps[a:b], refs[a:b]
        corpus_out.append(
            {
                "name": name,
                "start": a,
                "end": b,
                "bleu": sacrebleu.corpus_bleu(h, [r]).score,
                "chrf": sacrebleu.corpus_chrf(h, [r]).score,
                "ter": sacrebleu.corpus_ter(h, [r]).score,
                "bleu_2refs": sacrebleu.corpus_bleu(h, [r, refs2[a:b]]).score,
                "chrf_2refs": sacrebleu.corpus_chrf(h, [r, refs2[a:b]]).score,
                "ter_2refs": sacrebleu.corpus_ter(h, [r, refs2[a:b]]).score,
            }
        )

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    plain = rouge_scorer.RougeScorer(types)
    stem = rouge_scorer.RougeScorer(types, use_stemmer=True)
    out_pairs = []
    for h, r, r2 in zip(hyps, refs, refs2):
        p = plain.score(r, h)
        s = stem.score(r, h)
        out_pairs.append(
            {
                "hyp": h,
                "ref": r,
                "ref2": r2,
                "sentence_bleu": sacrebleu.sentence_bleu(h, [r]).score,
                "sentence_chrf": sacrebleu.sentence_chrf(h, [r]).score,
                "sentence_ter": sacrebleu.sentence_ter(h, [r]).score,
                "rouge": {t: p[t].fmeasure for t in types},
                "rouge_stem": {t: s[t].fmeasure for t in types},
            }
        )

    stemmer = porter.PorterStemmer()
    vocab = sorted(
        set(WORDS)
        | {b + ("" if x == "_" else x) for b in STEMS for x in SUFFIXES}
        | {w for h, r in pairs for w in rouge_score.tokenize.tokenize(h + " " + r, None)}
    )
    out = {
        "made_by": "scripts/make_metric_references.py",
        "versions": {
            "python": sys.version.split()[0],
            "sacrebleu": version("sacrebleu"),
            "rouge_score": version("rouge-score"),
            "nltk": version("nltk"),
        },
        "calls": {
            "corpus": "sacrebleu.corpus_bleu / corpus_chrf / corpus_ter(hyps, [refs]) (.score), "
            "and with [refs, refs2]",
            "sentence": "sacrebleu.sentence_bleu / sentence_chrf / sentence_ter(hyp, [ref])",
            "rouge": "rouge_scorer.RougeScorer([...]).score(ref, hyp)[t].fmeasure",
            "rouge_stem": "as rouge, with use_stemmer=True",
            "porter": "nltk.stem.porter.PorterStemmer().stem(word)",
        },
        "pairs": out_pairs,
        "corpora": corpus_out,
        "porter": {w: stemmer.stem(w) for w in vocab},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}: {len(out_pairs)} pairs, {len(corpus_out)} corpora, {len(vocab)} stems")


if __name__ == "__main__":
    main()
