#!/usr/bin/env python3
"""Writes tasks/tests/data/filter_references.json: what lm-evaluation-harness 0.4.13's own filter
code outputs for a set of pipelines and tricky model responses. tasks/tests/filter_references.rs
runs every case through moeval's `tasks::filters` and requires identical output.

    /tmp/moeval-ci-venv/bin/python scripts/make_filter_references.py

(any Python with `lm_eval==0.4.13` installed; torch is not needed). Nothing is downloaded.

What it runs:
- `cases`: each case is a `filter_list` exactly as a task YAML gives it (the loader's JSON; a
  `!function m.f` value is written as moeval's YAML loader represents it), model responses per
  document and the documents. Pipelines are built as `ConfigurableTask.__init__` builds them
  (every key but `function` is a keyword argument; `lm_eval.filters.build_filter_ensemble`) and
  applied with `FilterEnsemble.apply` to `lm_eval.api.instance.Instance` objects, as
  `Task.apply_filters` does. Each pipeline's result is the list of `filtered_resps[name]` or,
  when lm-eval raises, `"error": "<exception type>: <message>"`. The pipelines of gsm8k,
  gsm8k-cot-self-consistency, polemo2_in, simple_cooccurrence_bias_gen and
  ja_leaderboard_jsquad are read from the installed task YAMLs; the others are written here to
  reach every registered filter and argument (fallbacks, negative `group_select`,
  `multi_choice_regex`'s `ignore_case` / `ignore_punctuation` / `regexes_to_ignore`,
  `majority_vote` ties, `take_first_k`, `map` with `default_value`, custom Python filters).
  The custom filters' Python functions are defined below (`PY_FILTERS`); the Rust test
  implements the same functions in its callback.
- `patterns`: every distinct regular expression the bundled task YAMLs give a filter
  (`regex_pattern`, `regexes_to_ignore` in any `filter_list`), plus patterns that use Python
  `re` syntax other engines read differently (`$`, `\\Z`, `{,n}`, `[` in a class, empty
  matches), with `re.findall` (tuples as lists) and `re.sub(p, "", s)` on `pattern_inputs`.
"""

import glob
import json
import re
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import yaml

import lm_eval
from lm_eval.api.filter import Filter
from lm_eval.api.instance import Instance
from lm_eval.filters import build_filter_ensemble

OUT = Path(__file__).resolve().parent.parent / "tasks/tests/data/filter_references.json"
TASKS = Path(lm_eval.__file__).parent / "tasks"


class TagLoader(yaml.SafeLoader):
    """Reads task YAMLs without resolving `!function` (only filter_list values are used)."""


def _tag(loader, suffix, node):
    value = loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else ""
    return {"__yaml_tag__": f"!{suffix} {value}", "__yaml_dir__": "."}


TagLoader.add_multi_constructor("!", _tag)


def task_filter_list(rel):
    with open(TASKS / rel, encoding="utf-8") as f:
        return yaml.load(f, Loader=TagLoader)["filter_list"]


# ---- custom Python filters (the Rust test's callback implements the same) -------------------


def upper_all(resps, docs):
    return [[r.upper() for r in rs] for rs in resps]


def answer_from_doc(resps, docs):
    return [[d["answer"]] * len(rs) for rs, d in zip(resps, docs)]


class AppendSuffix(Filter):
    def __init__(self, suffix="!"):
        self.suffix = suffix

    def apply(self, resps, docs):
        return [[r + self.suffix for r in rs] for rs in resps]


PY_FILTERS = {
    "filter_fns.upper_all": upper_all,
    "filter_fns.answer_from_doc": answer_from_doc,
    "filter_fns.AppendSuffix": AppendSuffix,
}


def fn(name):
    return {"__yaml_tag__": f"!function {name}", "__yaml_dir__": "."}


def resolve(v):
    """A tagged value as lm-eval's YAML loader would give it: the Python object."""
    if isinstance(v, dict) and "__yaml_tag__" in v:
        return PY_FILTERS[v["__yaml_tag__"].split(" ", 1)[1]]
    return v


def run_pipeline(entry, responses, docs):
    # ConfigurableTask.__init__, filter_list branch.
    components = []
    for function in entry["filter"]:
        kwargs = {key: resolve(function[key]) for key in function if key != "function"}
        components.append([resolve(function["function"]), kwargs])
    try:
        ensemble = build_filter_ensemble(entry["name"], components)
        instances = [
            Instance("generate_until", doc, ("", {}), i, resps=list(r))
            for i, (r, doc) in enumerate(zip(responses, docs))
        ]
        ensemble.apply(instances)
        out = [inst.filtered_resps[entry["name"]] for inst in instances]
        return {"output": json.loads(json.dumps(out))}
    except Exception as e:  # noqa: BLE001 - the reference's failure is the expected result
        return {"error": f"{type(e).__name__}: {e}"}


def case(name, filter_list, responses, docs=None):
    docs = docs if docs is not None else [{} for _ in responses]
    results = {e["name"]: run_pipeline(e, responses, docs) for e in filter_list}
    return {
        "name": name,
        "filter_list": filter_list,
        "responses": responses,
        "docs": docs,
        "results": results,
    }


def step(function, **kwargs):
    return {"function": function, **kwargs}


def pipe(name, *steps):
    return {"name": name, "filter": list(steps)}


# ---- inputs ----------------------------------------------------------------------------------

GSM = [
    ["Natalia sold 48/2 = 24 clips in May.\n#### 72"],
    ["#### 1,234"],
    ["The total is $1,000.50 so\n#### $1,000.50"],
    ["#### -5\n#### 7"],
    ["I think the answer is 12, or maybe 13."],
    ["no numbers here"],
    [""],
    ["#### .5."],
    ["Price: $3.50, tax: 0.25, total = 3.75."],
    ["La réponse est 42 €"],
    ["١٢٣ and 7"],
    ["#### 3", "#### 4"],
]
SC = [
    ["The answer is 8.", "The answer is 9.", "The answer is 8.", "no idea",
     "The answer is 9.", "The answer is 1,000.", "The answer is 9.", "The answer is 8.",
     "The answer is 7."],
    ["a", "b", "b", "a", "c", "c", "The answer is 3", "x", "y"],
]
WORDS = [
    ["The Woman and the man", "FEMALE nurse", "nothing", "male", "a human", "Man",
     "woman", "she", "he", "MALE", "x"],
    ["", "", "", "", "", "", "", "", "", "", ""],
]
MIXED = ["  padded text \n", "", "İstanbul Straße ΣΑΣ", "ǅemal ﬁne", "tab\tand\x1cfs ",
         "The answer is (B).", "\u00a0nbsp\u2003", "the quiz"]


def mc_docs():
    return [
        {"choices": ["Guilty", "Guilty of Romance", "Not guilty"]},
        {"choices": ["U.S.A.", "Dr. Who?", "a+b", "(x)"]},
        {"choices": ["Yes", "No"]},
        {"choices": ["¿Qué?", "«hola»", "same", "same"]},
        {"choices": ["Paris", "London", "Rome", "Berlin", "Madrid"]},
    ]


MC_RESPONSES = [
    ["I'd say guilty of romance.", "(C) obviously", "Answer: B", "guilty", "nothing"],
    ["The answer is dr who", "u.s.a", "it's A+B", "answer:   D", "(x)", "Answer:C"],
    ["YES!", "no", "Maybe", "answer: b"],
    ["¿qué?", "hola", "SAME", "the answer is (E)"],
    ["berlin, not paris", "answer: E", "Rome.", "(B) London", ""],
]


def cases():
    out = []
    out.append(case("gsm8k", task_filter_list("gsm8k/gsm8k.yaml"), GSM))
    out.append(case("gsm8k_cot_self_consistency",
                    task_filter_list("gsm8k/gsm8k-cot-self-consistency.yaml"), SC))
    out.append(case("polemo2_in", task_filter_list("polemo2/polemo2_in.yaml"),
                    [["A"], ["The answer is B"], ["(D) and C"], ["none"], [""], ["ABCD"]]))
    out.append(case("simple_cooccurrence_bias_gen",
                    task_filter_list("simple_cooccurrence_bias/simple_cooccurrence_bias_gen.yaml"),
                    WORDS))
    out.append(case("ja_leaderboard_jsquad",
                    task_filter_list("japanese_leaderboard/ja_leaderboard_jsquad.yaml"),
                    [["  東京\u3000"], ["\n答え\n"], [""]]))

    out.append(case("regex_defaults_and_groups", [
        pipe("default", step("regex")),
        pipe("fallback_custom", step("regex", regex_pattern=r"answer is (\d+)",
                                     fallback="NONE")),
        pipe("fallback_null", step("regex", regex_pattern=r"answer is (\d+)", fallback=None),
             step("take_first")),
        pipe("no_group_last", step("regex", regex_pattern=r"-?\d[\d,]*(?:\.\d+)?",
                                   group_select=-1), step("take_first")),
        pipe("two_groups_first", step("regex", regex_pattern=r"(\d+)|([a-z]+)"),
             step("take_first")),
        pipe("two_groups_last", step("regex", regex_pattern=r"(\d+)|([a-z]+)",
                                     group_select=-1), step("take_first")),
        pipe("tuple_all_empty", step("regex", regex_pattern=r"(x)?(y)?z",
                                     fallback="  spaced  "), step("take_first")),
        pipe("empty_match", step("regex", regex_pattern=r"(\d*)"),
             step("take_first")),
        pipe("group_select_out_of_range", step("regex", regex_pattern=r"(\d)",
                                               group_select=5)),
        pipe("lookbehind", step("regex", regex_pattern=(
            r"((?<=The answer is )(.*)(?=.)|(?<=the answer is )(.*)(?=.))")),
            step("take_first")),
    ], [[r] for r in GSM_FLAT + MIXED]))

    out.append(case("selection", [
        pipe("take_first", step("take_first")),
        pipe("take_first_k", step("take_first_k", k=2)),
        pipe("take_first_k_too_many", step("take_first_k", k=4)),
        pipe("take_first_k_then_first", step("take_first_k", k=1), step("take_first")),
        pipe("majority", step("majority_vote")),
        pipe("majority_first", step("majority_vote"), step("take_first")),
        pipe("first_then_chars", step("take_first"), step("take_first")),
        pipe("first_then_k", step("take_first"), step("take_first_k", k=2)),
        pipe("first_then_majority", step("take_first"), step("majority_vote")),
        pipe("empty_pipeline"),
    ], [["b", "a", "a", "b"], ["x", "y", "z"], ["ΣΑΣ", "", ""], ["same", "same", "other"]]))

    out.append(case("selection_errors", [
        pipe("take_first_empty", step("take_first")),
        pipe("majority_empty", step("majority_vote")),
        pipe("k_first_doc_short", step("take_first_k", k=1)),
    ], [[], ["a"]]))

    out.append(case("transformation", [
        pipe("lower", step("lowercase")),
        pipe("upper", step("uppercase")),
        pipe("strip", step("remove_whitespace"), step("take_first")),
        pipe("strip_ignores_kwargs", step("remove_whitespace", anything=1)),
        pipe("map", step("map", mapping_dict={"A": 0, "b": "B", "x": [1, 2]},
                         default_value=-1)),
        pipe("map_default_none", step("map", mapping_dict={"A": 0})),
        pipe("map_no_dict", step("map")),
        pipe("map_then_majority", step("map", mapping_dict={"A": 1, "B": 1},
                                       default_value=0), step("majority_vote")),
        pipe("format_span", step("format_span")),
        pipe("regex_pos", step("regex_pos")),
        pipe("regex_pos_fallback", step("regex_pos", fallback=["none"]), step("take_first")),
    ], [["A", "b", "x", "ß"], MIXED[:4], ["Person: John Doe, Mary\nLocation: Kenya, none",
                                          "[('The', 'DET'), ('cat', 'NOUN')]"],
        ["ORGANIZATION : UN $$ date: 2020$$", "organisation: x"]]))

    out.append(case("multi_choice_regex", [
        pipe("default", step("multi_choice_regex")),
        pipe("letters", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))"),
             step("take_first")),
        pipe("ignore_both", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))",
                                 ignore_case=True, ignore_punctuation=True,
                                 group_select=-1)),
        pipe("ignore_case_only", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))",
                                      ignore_case=True, fallback="?")),
        pipe("regexes_to_ignore", step("multi_choice_regex",
                                       regex_pattern=r"answer is (\([A-Z]\))",
                                       ignore_case=True,
                                       regexes_to_ignore=[r"\bthe\b", r"\s+$", ","])),
        pipe("bad_group", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))",
                               group_select=3)),
    ], MC_RESPONSES, mc_docs()))

    out.append(case("python_values", [
        pipe("tuple_fallback_not_str", step("regex", regex_pattern=r"(x)?(y)?z", fallback=None)),
        pipe("map_then_majority_numbers", step("map", mapping_dict={"A": 1, "B": True, "C": 1.0,
                                                                    "D": 0},
                                               default_value=False), step("majority_vote")),
        pipe("map_then_regex", step("map", mapping_dict={"A": 1}), step("regex",
                                                                       regex_pattern=r".*")),
        pipe("map_then_lowercase", step("map", mapping_dict={"A": 1}), step("lowercase")),
        pipe("take_first_k_negative", step("take_first_k", k=-1)),
        pipe("take_first_k_zero", step("take_first_k", k=0), step("majority_vote")),
    ], [["B", "A", "C", "D", "D"], ["D", "E", "quiz", "A", "A"]]))

    out.append(case("multi_choice_regex_escapes", [
        pipe("escaped_lengths", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))")),
        pipe("escaped_lengths_ignore", step("multi_choice_regex", regex_pattern=r"(\([A-Z]\))",
                                            ignore_case=True, ignore_punctuation=True)),
    ], [["so 1+1=2 it is", "x y", "I pick #tag", "a\tb or a b", "1+1"]],
        [{"choices": ["1+1", "1+1=2", "x y", "#tag", "a b", "a\tb", "x"]}]))

    out.append(case("multi_choice_regex_27_choices", [
        pipe("too_many", step("multi_choice_regex")),
    ], [["Answer: B"]], [{"choices": [f"c{i}" for i in range(27)]}]))

    out.append(case("custom_python", [
        pipe("custom_upper", step("custom", filter_fn=fn("filter_fns.upper_all")),
             step("take_first")),
        pipe("custom_docs", step("custom", filter_fn=fn("filter_fns.answer_from_doc"),
                                 ignored=True)),
        pipe("class_suffix", step(fn("filter_fns.AppendSuffix"), suffix="?"),
             step("take_first")),
        pipe("class_default", step(fn("filter_fns.AppendSuffix"))),
    ], [["ab", "cd"], ["ß"]], [{"answer": "42"}, {"answer": "x"}]))

    out.append(case("construction_errors", [
        pipe("unknown", step("no_such_filter")),
        pipe("take_first_kwargs", step("take_first", k=1)),
        pipe("regex_unknown_kwarg", step("regex", regex_patern="x")),
        pipe("k_missing", step("take_first_k")),
        pipe("custom_missing_fn", step("custom")),
    ], [["a"]]))
    return out


GSM_FLAT = [r[0] for r in GSM]

# ---- patterns ---------------------------------------------------------------------------------

PATTERN_INPUTS = GSM_FLAT + [
    "The answer is 12.5.",
    "the answer is: $4,000",
    "The final answer: 7\n",
    "The final answer is $2,500.",
    "Answer: (C) because (A) is wrong",
    " B) is it",
    "True or False? False.",
    "yes, no, Yes",
    "That is valid, not invalid",
    "Die Antwort lautet 3,5. Jibu ni 4. La respuesta es -2.",
    "Erantzuna 12 % da",
    "Ответ — 15. 答えは16です。答案是 17。",
    "సమాధానం 8 คำตอบคือ 9",
    "the woman is a female",
    'He said "[<{(x)}>]" ',
    "line\n",
    "a\nb\n",
    "aaa",
    "x[y]z",
    "ǅ straße STRASSE",
    "1-2 3 4.5,6 7 8.9",
    "x² ½ a‿b e\u0301t\u0301 नमस्ते 7",
    "Yes\x1cno\x1fTrue",
]

SYNTAX_PATTERNS = [
    r"\d+$", r"(?m)^\w+$", r"b$", r"\w\Z", r"a{,2}", r"[[(]\w", r"x[\[\]]", r"a*?", r"|a",
    r"\b", r"(?i)STRASSE|straße", r"(?i)ǆ", r"\w+", r"\s+", r"(a)|(b)", r"(?P<n>\d)(?P=n)",
    r"(?s)a.b", r"[a&&b]", r"[~~]+", r"\d", r"(\d)(?:\.(\d))?", r"^", r"(?<=a)a",
]


def real_patterns():
    found = set()
    for f in glob.glob(str(TASKS / "**/*.yaml"), recursive=True):
        text = open(f, encoding="utf-8").read()
        if "filter_list" not in text:
            continue
        d = yaml.load(text, Loader=TagLoader)
        if not isinstance(d, dict) or not isinstance(d.get("filter_list"), list):
            continue
        for p in d["filter_list"]:
            for s in p.get("filter", []):
                if isinstance(s.get("regex_pattern"), str):
                    found.add(s["regex_pattern"])
                for r in s.get("regexes_to_ignore") or []:
                    found.add(r)
    return sorted(found)


def pattern_refs():
    # `[[(]` and `[a&&b]` are read as literals by Python 3.11 (with a FutureWarning).
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = []
    for source, patterns in (("task", real_patterns()), ("syntax", SYNTAX_PATTERNS)):
        for p in patterns:
            rx = re.compile(p)
            out.append({
                "pattern": p,
                "source": source,
                "findall": [json.loads(json.dumps(rx.findall(s))) for s in PATTERN_INPUTS],
                "sub": [rx.sub("", s) for s in PATTERN_INPUTS],
            })
    return out


def main():
    data = {
        "note": "Made by scripts/make_filter_references.py with lm-evaluation-harness "
        f"{version('lm_eval')} on Python {sys.version.split()[0]}: lm-eval's own filter "
        "classes (build_filter_ensemble + FilterEnsemble.apply) and Python's re. Do not edit.",
        "lm_eval": version("lm_eval"),
        "python": sys.version.split()[0],
        "cases": cases(),
        "pattern_inputs": PATTERN_INPUTS,
        "patterns": pattern_refs(),
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=None, separators=(",", ":"))
                   + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(data['cases'])} cases, "
          f"{len(data['patterns'])} patterns)")


if __name__ == "__main__":
    main()
