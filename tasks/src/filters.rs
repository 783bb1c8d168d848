//! lm-evaluation-harness 0.4.13's response filters (`filter_list`), natively.
//!
//! Data model, as the reference has it:
//! - A task has one or more named pipelines ([`FilterPipeline`]); with no `filter_list` it has
//!   exactly one, [`FilterPipeline::none`] (`take_first`), whatever its output type. Each
//!   pipeline runs on the task's original responses independently, and every metric is
//!   reported once per pipeline, named `METRIC,PIPELINE` ([`metric_key`]).
//! - A pipeline is a list of steps ([`Step`]), applied in order to the whole batch: the state is
//!   one value per request instance (a `generate_until` task has one instance per document),
//!   starting as the list of that instance's responses (several when `repeats` > 1). Most steps
//!   map each element of an instance's list; `take_first` replaces the list by its first element
//!   (usually a string), `take_first_k` keeps a prefix. The final state of an instance is its
//!   filtered response, a [`Value`] exactly as lm-eval's `filtered_resps[name]` (a string after
//!   `take_first`, a list without it, a number after `map`, `null` for a `null` fallback).
//! - Steps keep Python's semantics on whatever the state holds: an element that is a string is
//!   iterated by characters (lm-eval's `regex -> take_first -> map -> take_first` maps the
//!   characters of the extracted string), indexing an empty list is an error, and so on. Where
//!   the reference raises, [`FilterPipeline::apply`] returns an error naming the pipeline, the
//!   step and the problem; it never panics.
//! - Regular expressions are Python `re` patterns, run by [`PyRegex`].
//! - Filters written in Python (`function: custom` with `filter_fn: !function m.f`, or
//!   `function: !function m.Class`) are [`Step::Python`] steps; [`FilterPipeline::apply`] hands
//!   them to the caller's callback ([`PythonFilterFn`]), which runs them in a Python worker.
//!
//! Filters lm-eval registers itself are all here ([`KNOWN_FILTERS`]); a name registered only by
//! a task's Python module (acpbench's `ACP_grammar_filter`) is an unknown filter.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::config::Function;
use crate::dataset::Doc;
use crate::pytext;

/// Every filter name lm-eval 0.4.13 registers (`lm_eval.filters`), sorted.
pub const KNOWN_FILTERS: &[&str] = &[
    "custom",
    "format_span",
    "lowercase",
    "majority_vote",
    "map",
    "multi_choice_regex",
    "regex",
    "regex_pos",
    "remove_whitespace",
    "take_first",
    "take_first_k",
    "uppercase",
];

/// lm-eval's default `regex_pattern` of `regex` and `multi_choice_regex` (gsm8k's answer line).
pub const DEFAULT_REGEX: &str = r"#### (\-?[0-9\.\,]+)";
/// lm-eval's default `fallback` of `regex` and `multi_choice_regex`.
pub const DEFAULT_FALLBACK: &str = "[invalid]";

/// A metric's result key as lm-eval names it: `exact_match,strict-match`, `acc,none`
/// (its standard error is `metric_key("exact_match_stderr", pipeline)`).
pub fn metric_key(metric: &str, pipeline: &str) -> String {
    format!("{metric},{pipeline}")
}

/// A bad `filter_list` or a pipeline that failed on its input. Messages name the pipeline and the
/// step as `filter[INDEX]` (the YAML list index) and say what to change; the caller adds the
/// task file and name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// `filter_list` itself is malformed (not a list, an entry that is not a mapping, a name
    /// used twice).
    #[error("filter_list: {0}")]
    List(String),
    /// A pipeline entry is malformed (missing or non-string `name`, missing `filter`).
    #[error("filter_list pipeline `{pipeline}`: {problem}")]
    Pipeline { pipeline: String, problem: String },
    /// One step is malformed or failed on the responses.
    #[error("filter_list pipeline `{pipeline}`, filter[{step}] (`{function}`): {problem}")]
    Step {
        pipeline: String,
        step: usize,
        function: String,
        problem: String,
    },
}

/// One named pipeline of a task's `filter_list`.
///
/// Invariant: `steps` were validated by [`FilterPipeline::parse`] (or built by
/// [`FilterPipeline::none`]): every regex compiles and every argument has its type.
#[derive(Clone, Debug)]
pub struct FilterPipeline {
    /// The pipeline's name, the second half of its metrics' names.
    pub name: String,
    pub steps: Vec<Step>,
}

/// One filter of a pipeline, with its arguments and lm-eval's defaults filled in.
#[derive(Clone, Debug)]
pub enum Step {
    /// `regex`: per element, `findall` of the pattern; the `group_select`th match (Python
    /// index, negative from the end), its first non-empty group when the pattern has several,
    /// stripped; `fallback` when nothing matches. A non-string element is searched as `""`.
    Regex(RegexStep),
    /// `regex_pos`: the POS tags of `('token', 'TAG')` pairs in each element, or `fallback`
    /// (default `["invalid"]`). Its `regex_pattern` and `group_select` are accepted and unused,
    /// as in lm-eval.
    RegexPos { fallback: Value },
    /// `remove_whitespace`: Python `str.strip()` of each element.
    RemoveWhitespace,
    /// `multi_choice_regex`: `regex`, then the document's `choices` texts, then `: X` letters.
    MultiChoiceRegex(MultiChoiceStep),
    /// `take_first`: each instance's first element.
    TakeFirst,
    /// `take_first_k`: each instance's first `k` elements (a Python slice `[:k]`); lm-eval
    /// requires the first instance to have at least `k`.
    TakeFirstK { k: i64 },
    /// `majority_vote`: `[the most common element]`, ties going to the first seen.
    MajorityVote,
    /// `lowercase`: Python `str.lower()` of each element.
    Lowercase,
    /// `uppercase`: Python `str.upper()` of each element.
    Uppercase,
    /// `map`: `mapping_dict.get(element, default_value)`. Keys are strings (as a YAML mapping
    /// reaches the loader), so a non-string element gets the default.
    Map {
        mapping: Map<String, Value>,
        default: Value,
    },
    /// `format_span`: lm-eval's NER span normaliser (`label: entity $ label: entity`).
    FormatSpan,
    /// A filter written in Python, run by the caller's [`PythonFilterFn`].
    Python(PythonStep),
}

/// The arguments of `regex` (also the first stage of `multi_choice_regex`).
#[derive(Clone, Debug)]
pub struct RegexStep {
    pub regex: PyRegex,
    pub group_select: i64,
    /// Returned as is when nothing matches (any YAML value; a string normally).
    pub fallback: Value,
}

/// The arguments of `multi_choice_regex`.
#[derive(Clone, Debug)]
pub struct MultiChoiceStep {
    pub first: RegexStep,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub regexes_to_ignore: Vec<PyRegex>,
}

/// A filter lm-eval would run as Python code.
#[derive(Clone, Debug, PartialEq)]
pub enum PythonStep {
    /// `function: custom, filter_fn: !function m.f`: lm-eval calls `f(resps, docs)` and takes
    /// its result as the new state (other keys of the step are ignored, as by lm-eval).
    Custom { filter_fn: Function },
    /// `function: !function m.Class` plus keyword arguments: lm-eval calls
    /// `Class(**kwargs).apply(resps, docs)`.
    Class {
        class: Function,
        kwargs: Map<String, Value>,
    },
}

/// The caller's runner of [`Step::Python`] steps: given the step, the current state (one value
/// per instance) and the documents, it returns the new state (one value per instance) or the
/// Python error's text.
pub type PythonFilterFn<'a> =
    dyn FnMut(&PythonStep, Vec<Value>, &[Doc]) -> Result<Vec<Value>, String> + 'a;

/// A [`PythonFilterFn`] for callers without a Python worker: every Python step fails.
pub fn no_python(step: &PythonStep, _: Vec<Value>, _: &[Doc]) -> Result<Vec<Value>, String> {
    Err(format!(
        "{} is Python code and no Python worker was given to run it",
        step.function()
    ))
}

impl PythonStep {
    /// The Python callable: `filter_fn` or the class.
    pub fn function(&self) -> &Function {
        match self {
            PythonStep::Custom { filter_fn } => filter_fn,
            PythonStep::Class { class, .. } => class,
        }
    }
}

impl Step {
    /// The step's `function` as the YAML names it (for messages).
    pub fn function_name(&self) -> String {
        match self {
            Step::Regex(_) => "regex".into(),
            Step::RegexPos { .. } => "regex_pos".into(),
            Step::RemoveWhitespace => "remove_whitespace".into(),
            Step::MultiChoiceRegex(_) => "multi_choice_regex".into(),
            Step::TakeFirst => "take_first".into(),
            Step::TakeFirstK { .. } => "take_first_k".into(),
            Step::MajorityVote => "majority_vote".into(),
            Step::Lowercase => "lowercase".into(),
            Step::Uppercase => "uppercase".into(),
            Step::Map { .. } => "map".into(),
            Step::FormatSpan => "format_span".into(),
            Step::Python(PythonStep::Custom { .. }) => "custom".into(),
            Step::Python(PythonStep::Class { class, .. }) => {
                format!("!function {}.{}", class.module, class.name)
            }
        }
    }
}

/// The pipelines of a task: its `filter_list` parsed, or lm-eval's default
/// (`[FilterPipeline::none()]`) when it has none (absent or `null`).
pub fn parse_filter_list(filter_list: Option<&Value>) -> Result<Vec<FilterPipeline>, FilterError> {
    let list = match filter_list {
        None | Some(Value::Null) => return Ok(vec![FilterPipeline::none()]),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(FilterError::List(format!(
                "must be a list of pipelines (`- name: ...` with `filter: [...]`), not {}",
                py_type(other)
            )))
        }
    };
    let mut out: Vec<FilterPipeline> = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let p = FilterPipeline::parse(entry).map_err(|e| match e {
            FilterError::List(m) => FilterError::List(format!("entry {i}: {m}")),
            e => e,
        })?;
        if out.iter().any(|q| q.name == p.name) {
            // lm-eval would run both and keep only the last one's results under the name.
            return Err(FilterError::List(format!(
                "pipeline name `{}` is used twice; give each pipeline its own name",
                p.name
            )));
        }
        out.push(p);
    }
    Ok(out)
}

impl FilterPipeline {
    /// lm-eval's pipeline for tasks without `filter_list`: `none` = `[take_first]`.
    pub fn none() -> FilterPipeline {
        FilterPipeline {
            name: "none".into(),
            steps: vec![Step::TakeFirst],
        }
    }

    /// Parses one `filter_list` entry, `{name: NAME, filter: [{function: F, ARG: VALUE, ..}]}`,
    /// as the YAML loader gives it (a `!function` value is a tagged object, see
    /// [`Function::from_value`]). Every argument is checked here, where lm-eval would only fail
    /// when the filter first runs.
    pub fn parse(entry: &Value) -> Result<FilterPipeline, FilterError> {
        let Some(m) = entry.as_object() else {
            return Err(FilterError::List(format!(
                "a pipeline must be a mapping with `name` and `filter`, not {}",
                py_type(entry)
            )));
        };
        let name = match m.get("name") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err(FilterError::List(
                    "a pipeline has no `name` (metrics are named `METRIC,NAME`)".into(),
                ))
            }
            Some(other) => {
                return Err(FilterError::List(format!(
                    "a pipeline's `name` must be a string, not {}",
                    py_type(other)
                )))
            }
        };
        let perr = |problem: String| FilterError::Pipeline {
            pipeline: name.clone(),
            problem,
        };
        if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "name" | "filter")) {
            return Err(perr(format!(
                "unknown key `{k}` (a pipeline has `name` and `filter`)"
            )));
        }
        let steps = match m.get("filter") {
            Some(Value::Array(a)) => a,
            None | Some(Value::Null) => {
                return Err(perr(
                    "missing `filter` (the list of `- function: NAME` steps)".into(),
                ))
            }
            Some(other) => {
                return Err(perr(format!(
                    "`filter` must be a list of steps, not {}",
                    py_type(other)
                )))
            }
        };
        let steps = steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_step(s).map_err(|(function, problem)| step_err(&name, i, function, problem))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FilterPipeline { name, steps })
    }

    /// Whether some step is Python code (needs a real [`PythonFilterFn`]).
    pub fn needs_python(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Python(_)))
    }

    /// Runs the pipeline on a batch: `responses[i]` are instance `i`'s model outputs and
    /// `docs[i]` its document (`multi_choice_regex` reads its `choices`; Python filters get
    /// all). Returns one filtered value per instance (see the module doc). An empty batch gives
    /// an empty result.
    pub fn apply(
        &self,
        responses: &[Vec<String>],
        docs: &[Doc],
        python: &mut PythonFilterFn<'_>,
    ) -> Result<Vec<Value>, FilterError> {
        let state = responses
            .iter()
            .map(|r| Value::Array(r.iter().cloned().map(Value::String).collect()))
            .collect();
        self.apply_values(state, docs, python)
    }

    /// [`FilterPipeline::apply`] on any starting state (one value per instance, normally the
    /// list of its responses).
    pub fn apply_values(
        &self,
        mut state: Vec<Value>,
        docs: &[Doc],
        python: &mut PythonFilterFn<'_>,
    ) -> Result<Vec<Value>, FilterError> {
        if docs.len() != state.len() {
            return Err(FilterError::Pipeline {
                pipeline: self.name.clone(),
                problem: format!(
                    "{} instances but {} documents (each instance needs its document)",
                    state.len(),
                    docs.len()
                ),
            });
        }
        if state.is_empty() {
            return Ok(state);
        }
        for (i, step) in self.steps.iter().enumerate() {
            let n = state.len();
            state = apply_step(step, state, docs, python)
                .map_err(|p| step_err(&self.name, i, step.function_name(), p))?;
            if state.len() != n {
                return Err(step_err(
                    &self.name,
                    i,
                    step.function_name(),
                    format!("returned {} values for {n} instances", state.len()),
                ));
            }
        }
        Ok(state)
    }
}

fn step_err(pipeline: &str, step: usize, function: String, problem: String) -> FilterError {
    FilterError::Step {
        pipeline: pipeline.to_string(),
        step,
        function,
        problem,
    }
}

// ---- parsing ---------------------------------------------------------------------------------

/// Arguments each built-in filter's constructor accepts; `None`: any (lm-eval passes unknown
/// keyword arguments to `Filter.__init__(**kwargs)`, which ignores them).
fn accepted_args(function: &str) -> Option<&'static [&'static str]> {
    match function {
        "regex" | "regex_pos" => Some(&["regex_pattern", "group_select", "fallback"]),
        "multi_choice_regex" => Some(&[
            "regex_pattern",
            "group_select",
            "fallback",
            "ignore_case",
            "ignore_punctuation",
            "regexes_to_ignore",
        ]),
        "map" => Some(&["mapping_dict", "default_value"]),
        "take_first" | "majority_vote" | "lowercase" | "uppercase" | "format_span" => Some(&[]),
        _ => None,
    }
}

/// Parses one step; the error is (function name for the message, problem).
fn parse_step(v: &Value) -> Result<Step, (String, String)> {
    let Some(m) = v.as_object() else {
        return Err((
            "?".into(),
            format!(
                "a step must be a mapping `{{function: NAME, ...arguments}}`, not {}",
                py_type(v)
            ),
        ));
    };
    let func = match m.get("function") {
        Some(Value::String(s)) => s.clone(),
        Some(f @ Value::Object(_)) => match Function::from_value(f) {
            Some(class) => {
                let kwargs = m
                    .iter()
                    .filter(|(k, _)| *k != "function")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                return Ok(Step::Python(PythonStep::Class { class, kwargs }));
            }
            None => {
                return Err((
                    "?".into(),
                    "`function` must be a filter name or a `!function module.Class`".into(),
                ))
            }
        },
        None => {
            return Err((
                "?".into(),
                format!(
                    "missing `function` (one of {}, or `!function module.Class`)",
                    KNOWN_FILTERS.join(", ")
                ),
            ))
        }
        Some(other) => {
            return Err((
                "?".into(),
                format!("`function` must be a filter name, not {}", py_type(other)),
            ))
        }
    };
    let fail = |problem: String| (func.clone(), problem);
    if !KNOWN_FILTERS.contains(&func.as_str()) {
        return Err(fail(format!(
            "unknown filter; lm-eval 0.4.13 registers {} (a filter that only a task's Python \
             module registers is not available: name its class as `function: !function \
             module.Class` instead)",
            KNOWN_FILTERS.join(", ")
        )));
    }
    if let Some(ok) = accepted_args(&func) {
        if let Some(k) = m
            .keys()
            .find(|k| *k != "function" && !ok.contains(&k.as_str()))
        {
            return Err(fail(if ok.is_empty() {
                format!("takes no arguments, but `{k}` was given")
            } else {
                format!("unknown argument `{k}` (it takes {})", ok.join(", "))
            }));
        }
    }
    let arg = |k: &str| m.get(k).filter(|v| !v.is_null());
    let step = match func.as_str() {
        "regex" => Step::Regex(regex_step(m).map_err(fail)?),
        "regex_pos" => {
            regex_step(m).map_err(fail)?;
            Step::RegexPos {
                fallback: arg("fallback")
                    .cloned()
                    .unwrap_or_else(|| Value::Array(vec![Value::String("invalid".into())])),
            }
        }
        "remove_whitespace" => Step::RemoveWhitespace,
        "multi_choice_regex" => {
            let flag = |k: &str| match m.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!(
                    "`{k}` must be true or false, not {}",
                    py_type(other)
                )),
            };
            let regexes_to_ignore = match m.get("regexes_to_ignore") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => {
                    a.iter()
                        .map(|r| match r {
                            Value::String(s) => PyRegex::new(s)
                                .map_err(|e| format!("`regexes_to_ignore` entry: {e}")),
                            other => Err(format!(
                                "`regexes_to_ignore` entries must be strings, not {}",
                                py_type(other)
                            )),
                        })
                        .collect::<Result<_, _>>()
                        .map_err(fail)?
                }
                Some(other) => {
                    return Err(fail(format!(
                        "`regexes_to_ignore` must be a list of patterns, not {}",
                        py_type(other)
                    )))
                }
            };
            Step::MultiChoiceRegex(MultiChoiceStep {
                first: regex_step(m).map_err(fail)?,
                ignore_case: flag("ignore_case").map_err(fail)?,
                ignore_punctuation: flag("ignore_punctuation").map_err(fail)?,
                regexes_to_ignore,
            })
        }
        "take_first" => Step::TakeFirst,
        "take_first_k" => match m.get("k") {
            Some(Value::Number(n)) if n.as_i64().is_some() => Step::TakeFirstK {
                k: n.as_i64().unwrap_or_default(),
            },
            None => return Err(fail("missing `k` (how many responses to keep)".into())),
            Some(other) => {
                return Err(fail(format!(
                    "`k` must be an integer, not {}",
                    py_type(other)
                )))
            }
        },
        "majority_vote" => Step::MajorityVote,
        "lowercase" => Step::Lowercase,
        "uppercase" => Step::Uppercase,
        "map" => Step::Map {
            mapping: match m.get("mapping_dict") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(o)) => o.clone(),
                Some(other) => {
                    return Err(fail(format!(
                        "`mapping_dict` must be a mapping, not {}",
                        py_type(other)
                    )))
                }
            },
            default: m.get("default_value").cloned().unwrap_or(Value::Null),
        },
        "format_span" => Step::FormatSpan,
        "custom" => match m.get("filter_fn") {
            Some(v) => match Function::from_value(v) {
                Some(filter_fn) => Step::Python(PythonStep::Custom { filter_fn }),
                None => {
                    return Err(fail(
                        "`filter_fn` must be a `!function module.name` reference".into(),
                    ))
                }
            },
            None => {
                return Err(fail(
                    "missing `filter_fn` (`filter_fn: !function module.name`)".into(),
                ))
            }
        },
        other => return Err(fail(format!("unknown filter `{other}`"))),
    };
    Ok(step)
}

fn regex_step(m: &Map<String, Value>) -> Result<RegexStep, String> {
    let pattern = match m.get("regex_pattern") {
        None | Some(Value::Null) => DEFAULT_REGEX,
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(format!(
                "`regex_pattern` must be a string, not {}",
                py_type(other)
            ))
        }
    };
    let group_select = match m.get("group_select") {
        None => 0,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or_default(),
        Some(other) => {
            return Err(format!(
                "`group_select` must be an integer (negative counts from the last match), not {}",
                py_type(other)
            ))
        }
    };
    Ok(RegexStep {
        regex: PyRegex::new(pattern).map_err(|e| format!("`regex_pattern`: {e}"))?,
        group_select,
        fallback: m
            .get("fallback")
            .cloned()
            .unwrap_or_else(|| Value::String(DEFAULT_FALLBACK.into())),
    })
}

// ---- applying --------------------------------------------------------------------------------

fn apply_step(
    step: &Step,
    state: Vec<Value>,
    docs: &[Doc],
    python: &mut PythonFilterFn<'_>,
) -> Result<Vec<Value>, String> {
    let each = |state: Vec<Value>, f: &dyn Fn(&Value) -> Result<Value, String>| {
        state
            .iter()
            .map(|inst| {
                Ok(Value::Array(
                    py_iter(inst)?.iter().map(f).collect::<Result<_, _>>()?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    match step {
        Step::Regex(r) => each(state, &|v| r.extract(v)),
        Step::RegexPos { fallback } => each(state, &|v| regex_pos(v, fallback)),
        Step::RemoveWhitespace => each(state, &|v| {
            Ok(Value::String(
                pytext::strip(as_str(v, "strip")?).to_string(),
            ))
        }),
        Step::Lowercase => each(state, &|v| {
            Ok(Value::String(as_str(v, "lower")?.to_lowercase()))
        }),
        Step::Uppercase => each(state, &|v| {
            Ok(Value::String(as_str(v, "upper")?.to_uppercase()))
        }),
        Step::FormatSpan => each(state, &|v| {
            Ok(Value::String(format_span(as_str(v, "lower")?)?))
        }),
        Step::Map { mapping, default } => each(state, &|v| match v {
            Value::String(s) => Ok(mapping.get(s).unwrap_or(default).clone()),
            Value::Array(_) | Value::Object(_) => Err(unhashable(v)),
            _ => Ok(default.clone()),
        }),
        Step::TakeFirst => state.iter().map(py_first).collect(),
        Step::TakeFirstK { k } => {
            let have = py_len(&state[0])?;
            if (have as i128) < *k as i128 {
                return Err(format!(
                    "needs at least {k} responses per document, but the first has {have} \
                     (lm-eval's assertion; raise the task's `repeats`)"
                ));
            }
            state.iter().map(|v| py_prefix(v, *k)).collect()
        }
        Step::MajorityVote => state.iter().map(majority).collect(),
        Step::MultiChoiceRegex(mc) => state
            .iter()
            .zip(docs)
            .map(|(inst, doc)| mc.apply(inst, doc))
            .collect(),
        Step::Python(p) => python(p, state, docs),
    }
}

impl RegexStep {
    /// lm-eval's `RegexFilter` on one element.
    fn extract(&self, resp: &Value) -> Result<Value, String> {
        let text = resp.as_str().unwrap_or("");
        let matches = self.regex.findall(text)?;
        if matches.is_empty() {
            return Ok(self.fallback.clone());
        }
        let picked = match py_index(&matches, self.group_select)? {
            Value::Array(groups) => match groups.iter().find(|g| g.as_str() != Some("")) {
                Some(g) => g.clone(),
                None => self.fallback.clone(),
            },
            m => m.clone(),
        };
        match picked {
            Value::String(s) => Ok(Value::String(pytext::strip(&s).to_string())),
            other => Err(format!(
                "cannot strip the fallback {other} ('{}' object has no attribute 'strip')",
                py_type(&other)
            )),
        }
    }

    /// `MultiChoiceRegexFilter.apply`'s `find_match`: the selected match, stripped and
    /// converted, or `""` for none.
    fn find_match(
        regex: &PyRegex,
        group_select: i64,
        resp: &Value,
        convert: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        let matches = regex.findall(resp.as_str().unwrap_or(""))?;
        if matches.is_empty() {
            return Ok(String::new());
        }
        let m = match py_index(&matches, group_select)? {
            Value::Array(groups) => match groups
                .iter()
                .filter_map(Value::as_str)
                .find(|g| !g.is_empty())
            {
                Some(g) => g.to_string(),
                None => return Ok(String::new()),
            },
            m => m.as_str().unwrap_or_default().to_string(),
        };
        let m = pytext::strip(&m).to_string();
        Ok(convert.get(&m).cloned().unwrap_or(m))
    }
}

impl MultiChoiceStep {
    /// `filter_ignores`: regexes removed, then lowercase, then Unicode punctuation removed.
    fn ignores(&self, v: &Value) -> Result<Value, String> {
        if self.regexes_to_ignore.is_empty() && !self.ignore_case && !self.ignore_punctuation {
            return Ok(v.clone());
        }
        let mut s = as_str(v, "sub")?.to_string();
        for r in &self.regexes_to_ignore {
            s = r.sub(&s, "")?;
        }
        if self.ignore_case {
            s = s.to_lowercase();
        }
        if self.ignore_punctuation {
            s = punctuation().replace_all(&s, "").into_owned();
        }
        Ok(Value::String(s))
    }

    fn apply(&self, inst: &Value, doc: &Doc) -> Result<Value, String> {
        let choices = doc.get("choices").ok_or_else(|| {
            "the document has no `choices` (multi_choice_regex reads the answer options from \
             it)"
            .to_string()
        })?;
        let mut alternatives = Vec::new();
        let mut choice_to_alpha = BTreeMap::new();
        let mut letters = Vec::new();
        let mut letter_to_target = BTreeMap::new();
        let choices = py_iter(choices)?;
        if choices.len() > 26 {
            // lm-eval's letters run on past `Z` to `[`, and its letter pattern fails to compile.
            return Err(format!(
                "{} choices; lm-eval's multi_choice_regex fails beyond 26 (letters A-Z)",
                choices.len()
            ));
        }
        for (i, c) in choices.iter().enumerate() {
            let letter = char::from_u32('A' as u32 + i as u32).unwrap_or('?');
            let stripped = Value::String(pytext::strip(as_str(c, "strip")?).to_string());
            let m = self.ignores(&stripped)?;
            let m = m.as_str().unwrap_or_default().to_string();
            alternatives.push(py_re_escape(&m));
            choice_to_alpha.insert(m, format!("({letter})"));
            letters.push(letter.to_string());
            letter_to_target.insert(letter.to_string(), format!("({letter})"));
        }
        // Longest first (Python's stable `sorted(key=len, reverse=True)`), so a choice that is
        // a prefix of another cannot shadow it.
        alternatives.sort_by_key(|a| std::cmp::Reverse(a.chars().count()));
        let by_text = PyRegex::new(&alternatives.join("|"))?;
        let by_letter = PyRegex::new(&format!(r":[\s]*({})", letters.join("|")))?;
        let gs = self.first.group_select;
        let none = BTreeMap::new();
        py_iter(inst)?
            .iter()
            .map(|resp| {
                let mut m = RegexStep::find_match(&self.first.regex, gs, resp, &none)?;
                if m.is_empty() {
                    m = RegexStep::find_match(
                        &by_text,
                        gs,
                        &self.ignores(resp)?,
                        &choice_to_alpha,
                    )?;
                    if m.is_empty() {
                        m = RegexStep::find_match(&by_letter, gs, resp, &letter_to_target)?;
                    }
                }
                Ok(if m.is_empty() {
                    self.first.fallback.clone()
                } else {
                    Value::String(m)
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Value::Array)
    }
}

/// `POSFilter` on one element: tags of `('token', 'TAG')` pairs, or the fallback.
fn regex_pos(resp: &Value, fallback: &Value) -> Result<Value, String> {
    static PAIRS: OnceLock<PyRegex> = OnceLock::new();
    let pairs = PAIRS
        .get_or_init(|| PyRegex::new(r"\('([^']*)', '([^']*)'\)").expect("a fixed, valid pattern"));
    let tags: Vec<Value> = match resp {
        Value::String(s) => pairs
            .findall(s)?
            .into_iter()
            .map(|t| py_index(&py_iter(&t)?, 1).cloned())
            .collect::<Result<_, _>>()?,
        other => py_iter(other)?
            .iter()
            .map(|pair| {
                let p = py_iter(pair)?;
                if p.len() != 2 {
                    return Err(format!("expected (token, tag) pairs, got {pair}"));
                }
                Ok(p[1].clone())
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(if tags.is_empty() {
        fallback.clone()
    } else {
        Value::Array(tags)
    })
}

/// `SPANFilter`'s `format_named_entities(format_ner_text(resp.lower()))`.
fn format_span(resp: &str) -> Result<String, String> {
    const LABELS: [(&str, &str); 15] = [
        ("person", "PER"),
        ("location", "LOC"),
        ("organization", "ORG"),
        ("counties", "LOC"),
        ("places", "LOC"),
        ("people", "PER"),
        ("persons", "PER"),
        ("company", "ORG"),
        ("country", "LOC"),
        ("continent", "LOC"),
        ("time", "DATE"),
        ("date", "DATE"),
        ("per", "PER"),
        ("loc", "LOC"),
        ("org", "ORG"),
    ];
    static LABEL_RES: OnceLock<Vec<(PyRegex, String)>> = OnceLock::new();
    static ENTITY: OnceLock<PyRegex> = OnceLock::new();
    let label_res = LABEL_RES.get_or_init(|| {
        LABELS
            .iter()
            .map(|(k, v)| {
                let re = PyRegex::new(&format!(r"\b{}\s*:", py_re_escape(k)));
                (re.expect("a fixed, valid pattern"), format!("{v}:"))
            })
            .collect()
    });
    let entity = ENTITY.get_or_init(|| {
        PyRegex::new(r"\b(PER|LOC|ORG|DATE):\s*([^$]+)").expect("a fixed, valid pattern")
    });
    let mut text = resp.to_lowercase().to_lowercase();
    for (re, label) in label_res {
        text = re.sub(&text, label)?;
    }
    let text = text.replace("$$", "$");
    let text = text.trim_end_matches('$').replace('\n', "$");
    let text = pytext::strip(&text);
    let mut out = Vec::new();
    for m in entity.findall(text)? {
        let parts = py_iter(&m)?;
        let (label, values) = (
            parts[0].as_str().unwrap_or_default(),
            parts[1].as_str().unwrap_or_default(),
        );
        for e in values.split(',').map(pytext::strip) {
            if e.to_lowercase() != "none" {
                out.push(format!("{}: {e}", label.to_lowercase()));
            }
        }
    }
    Ok(out.join(" $ "))
}

/// `Counter(items).most_common(1)[0][0]`, as a one-element list.
fn majority(inst: &Value) -> Result<Value, String> {
    let items = py_iter(inst)?;
    let mut counts: Vec<(&Value, usize)> = Vec::new();
    for v in &items {
        if matches!(v, Value::Array(_) | Value::Object(_)) {
            return Err(unhashable(v));
        }
        match counts.iter_mut().find(|(k, _)| py_eq(k, v)) {
            Some(c) => c.1 += 1,
            None => counts.push((v, 1)),
        }
    }
    // `max` keeps the first of equal counts: Counter iterates in insertion order.
    let mut best: Option<(&Value, usize)> = None;
    for &(v, c) in &counts {
        if best.is_none_or(|(_, b)| c > b) {
            best = Some((v, c));
        }
    }
    match best {
        Some((v, _)) => Ok(Value::Array(vec![v.clone()])),
        None => Err("list index out of range (no responses to vote on)".into()),
    }
}

// ---- Python value semantics ------------------------------------------------------------------

/// Python's type name of a JSON value (for messages).
fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn unhashable(v: &Value) -> String {
    format!("unhashable type: '{}'", py_type(v))
}

fn as_str<'a>(v: &'a Value, method: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| {
        format!(
            "'{}' object has no attribute '{method}' (a filter that works on text got {v})",
            py_type(v)
        )
    })
}

/// Python equality of hashable values: numbers and booleans compare by value.
fn py_eq(a: &Value, b: &Value) -> bool {
    let num = |v: &Value| match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Number(n) => n.as_f64(),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `list(v)`: a list's items, a string's characters, a dict's keys.
fn py_iter(v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(a) => Ok(a.clone()),
        Value::String(s) => Ok(s.chars().map(|c| Value::String(c.to_string())).collect()),
        Value::Object(o) => Ok(o.keys().cloned().map(Value::String).collect()),
        other => Err(format!("'{}' object is not iterable", py_type(other))),
    }
}

fn py_len(v: &Value) -> Result<usize, String> {
    match v {
        Value::Array(a) => Ok(a.len()),
        Value::String(s) => Ok(s.chars().count()),
        Value::Object(o) => Ok(o.len()),
        other => Err(format!("object of type '{}' has no len()", py_type(other))),
    }
}

/// `v[0]`.
fn py_first(v: &Value) -> Result<Value, String> {
    match v {
        Value::Array(a) => a
            .first()
            .cloned()
            .ok_or_else(|| "list index out of range (an instance has no responses)".to_string()),
        Value::String(s) => s
            .chars()
            .next()
            .map(|c| Value::String(c.to_string()))
            .ok_or_else(|| "string index out of range".to_string()),
        other => Err(format!("'{}' object is not subscriptable", py_type(other))),
    }
}

/// `v[:k]`.
fn py_prefix(v: &Value, k: i64) -> Result<Value, String> {
    let end = |len: usize| -> usize {
        if k >= 0 {
            (k as usize).min(len)
        } else {
            len.saturating_sub(k.unsigned_abs() as usize)
        }
    };
    match v {
        Value::Array(a) => Ok(Value::Array(a[..end(a.len())].to_vec())),
        Value::String(s) => {
            let n = end(s.chars().count());
            Ok(Value::String(s.chars().take(n).collect()))
        }
        other => Err(format!("'{}' object is not subscriptable", py_type(other))),
    }
}

/// `items[i]` with Python's negative indices.
fn py_index(items: &[Value], i: i64) -> Result<&Value, String> {
    let n = items.len() as i64;
    let j = if i < 0 { n + i } else { i };
    if (0..n).contains(&j) {
        Ok(&items[j as usize])
    } else {
        Err(format!(
            "list index out of range (`group_select: {i}` but {n} match{})",
            if n == 1 { "" } else { "es" }
        ))
    }
}

/// Python 3.7+'s `re.escape`: a backslash before each of `()[]{}?*+-|^$\.&~#` and whitespace
/// `\t\n\r\v\f `. Its length decides `multi_choice_regex`'s branch order, so it must be exact.
fn py_re_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "()[]{}?*+-|^$\\.&~# \t\n\r\u{b}\u{c}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Unicode general category P* (what `unicodedata.category(c).startswith("P")` removes).
fn punctuation() -> &'static regex::Regex {
    static P: OnceLock<regex::Regex> = OnceLock::new();
    P.get_or_init(|| regex::Regex::new(r"\p{P}").expect("a fixed, valid pattern"))
}

// ---- Python regular expressions --------------------------------------------------------------

/// A Python `re` pattern (`str` patterns, no compile flags: inline flags such as `(?i)` work),
/// run by `fancy-regex`. The pattern is rewritten where the two syntaxes differ (see
/// [`PyRegex::translate`]); matches are iterated by CPython's rule for empty matches.
///
/// Why fancy-regex (measured by tests/filter_references.rs on the 28 distinct patterns that
/// lm-eval 0.4.13's 13,986 bundled task YAMLs give a filter): the `regex` crate compiles 25 (the
/// other 3 use look-behind / look-ahead, e.g. `(?<=The answer is )(.*)(?=.)`), fancy-regex all
/// 28, and both then match Python on every test input. On 23 patterns in Python-only syntax
/// (`$` before a final newline, `\Z`, `\w` without combining marks, `[` in a class, empty
/// matches) raw fancy-regex agrees with Python on 12, the `regex` crate on 10, and `PyRegex`
/// on all 23.
#[derive(Clone, Debug)]
pub struct PyRegex {
    source: String,
    regex: fancy_regex::Regex,
    /// The same pattern refusing empty matches: after an empty match at `p`, CPython accepts a
    /// non-empty match starting at `p` before moving on.
    non_empty: Option<fancy_regex::Regex>,
}

/// One match: each group's byte span (group 0: the whole match); `None` for a group that did
/// not take part.
type Spans = Vec<Option<(usize, usize)>>;

/// Python's `\w`: `str.isalnum()` characters (categories L*, N*) and `_`. (The Rust engines'
/// `\w` adds combining marks and all connector punctuation, which Python's does not have.)
const PY_WORD: &str = r"[\p{L}\p{N}_]";
const PY_NOT_WORD: &str = r"[^\p{L}\p{N}_]";
/// Python's `\s`: `str.isspace()`, Unicode `White_Space` plus U+001C..U+001F.
const PY_SPACE: &str = r"[\s\x1C-\x1F]";
const PY_NOT_SPACE: &str = r"[^\s\x1C-\x1F]";

impl PyRegex {
    /// Compiles a Python pattern; the error says what is wrong with it.
    pub fn new(pattern: &str) -> Result<PyRegex, String> {
        let translated = Self::translate(pattern);
        let regex = fancy_regex::Regex::new(&translated)
            .map_err(|e| format!("pattern {pattern:?} does not compile: {e}"))?;
        let non_empty = fancy_regex::RegexBuilder::new(&translated)
            .find_not_empty(true)
            .build()
            .ok();
        Ok(PyRegex {
            source: pattern.to_string(),
            regex,
            non_empty,
        })
    }

    /// The Python pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Rewrites Python syntax into fancy-regex syntax with the same meaning:
    /// `\w \W \s \S \b \B` get Python's character sets; `\Z` is `\z`; `$` (without `(?m)`)
    /// also matches before a final newline; in classes `[`, `&`, `~` and a second `-` are
    /// literal (Rust reads set operations) and `\b` is a backspace; `\<`, `\>` are literal.
    pub fn translate(pattern: &str) -> String {
        let flags = inline_flags(pattern);
        let (multiline, verbose) = (flags.contains('m'), flags.contains('x'));
        let chars: Vec<char> = pattern.chars().collect();
        let mut out = String::with_capacity(pattern.len() + 16);
        let mut i = 0;
        // Inside a class: the index of its first member (where `]` is literal).
        let mut class: Option<usize> = None;
        let mut prev_dash = false;
        while i < chars.len() {
            let c = chars[i];
            if c == '\\' && i + 1 < chars.len() {
                let e = chars[i + 1];
                i += 2;
                prev_dash = false;
                let boundary =
                    || format!(r"(?:(?<={PY_WORD})(?!{PY_WORD})|(?<!{PY_WORD})(?={PY_WORD}))");
                let not_boundary =
                    || format!(r"(?:(?<={PY_WORD})(?={PY_WORD})|(?<!{PY_WORD})(?!{PY_WORD}))");
                match (e, class.is_some()) {
                    ('w', _) => out.push_str(PY_WORD),
                    ('W', _) => out.push_str(PY_NOT_WORD),
                    ('s', _) => out.push_str(PY_SPACE),
                    ('S', _) => out.push_str(PY_NOT_SPACE),
                    ('b', false) => out.push_str(&boundary()),
                    ('B', false) => out.push_str(&not_boundary()),
                    ('b', true) => out.push_str(r"\x08"),
                    ('Z', false) => out.push_str(r"\z"),
                    (e, _) if e.is_ascii_alphanumeric() => {
                        out.push('\\');
                        out.push(e);
                    }
                    // Python reads `\X` for any other X as X itself.
                    (e, _) => out.push_str(&fancy_regex::escape(&e.to_string())),
                }
                continue;
            }
            i += 1;
            if let Some(first) = class {
                match c {
                    ']' if i - 1 != first => {
                        class = None;
                        out.push(']');
                    }
                    ']' | '[' | '&' | '~' => {
                        out.push('\\');
                        out.push(c);
                    }
                    '-' if prev_dash => out.push_str(r"\-"),
                    c if verbose && c.is_whitespace() => {
                        out.push_str(&fancy_regex::escape(&c.to_string()))
                    }
                    c => out.push(c),
                }
                prev_dash = c == '-';
                continue;
            }
            match c {
                '[' => {
                    out.push('[');
                    if chars.get(i) == Some(&'^') {
                        out.push('^');
                        i += 1;
                    }
                    class = Some(i);
                    prev_dash = false;
                }
                '$' if !multiline => out.push_str(r"(?:\z|(?=\n\z))"),
                '#' if verbose => {
                    // A comment: copied to the end of the line.
                    out.push('#');
                    while i < chars.len() && chars[i] != '\n' {
                        out.push(chars[i]);
                        i += 1;
                    }
                }
                c => out.push(c),
            }
        }
        out
    }

    /// The capture groups' spans of each match, in CPython's order: after an empty match at
    /// `p` the next match must not be empty at `p`; after a match ending at `e` the next may be
    /// empty at `e`.
    fn matches(&self, text: &str) -> Result<Vec<Spans>, String> {
        let groups = self.regex.captures_len();
        let run = |re: &fancy_regex::Regex, pos: usize| {
            re.captures_from_pos(text, pos)
                .map_err(|e| format!("pattern {:?} failed on the text: {e}", self.source))
                .map(|c| {
                    c.map(|c| {
                        (0..groups)
                            .map(|g| c.get(g).map(|m| (m.start(), m.end())))
                            .collect::<Vec<_>>()
                    })
                })
        };
        let mut out = Vec::new();
        let (mut pos, mut after_empty) = (0, false);
        while pos <= text.len() {
            let found = if after_empty {
                let at_pos = match &self.non_empty {
                    Some(ne) => run(ne, pos)?.filter(|m| m[0].is_some_and(|s| s.0 == pos)),
                    None => None,
                };
                match at_pos {
                    Some(m) => Some(m),
                    None => match text[pos..].chars().next() {
                        Some(ch) => run(&self.regex, pos + ch.len_utf8())?,
                        None => None,
                    },
                }
            } else {
                run(&self.regex, pos)?
            };
            let Some(m) = found else { break };
            let (start, end) = m[0].unwrap_or((pos, pos));
            after_empty = start == end;
            pos = end;
            out.push(m);
        }
        Ok(out)
    }

    /// `re.findall(pattern, text)`: strings (the match, or its one group), or lists of group
    /// strings (for tuples) when the pattern has several groups; a group that did not take part
    /// is `""`.
    pub fn findall(&self, text: &str) -> Result<Vec<Value>, String> {
        let s = |span: Option<(usize, usize)>| {
            Value::String(
                span.map(|(a, b)| text[a..b].to_string())
                    .unwrap_or_default(),
            )
        };
        Ok(self
            .matches(text)?
            .into_iter()
            .map(|m| match m.len() {
                1 => s(m[0]),
                2 => s(m[1]),
                _ => Value::Array(m[1..].iter().map(|g| s(*g)).collect()),
            })
            .collect())
    }

    /// `re.sub(pattern, replacement, text)` with a literal replacement (no group references).
    pub fn sub(&self, text: &str, replacement: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in self.matches(text)? {
            if let Some((a, b)) = m[0] {
                out.push_str(&text[last..a]);
                out.push_str(replacement);
                last = b;
            }
        }
        out.push_str(&text[last..]);
        Ok(out)
    }
}

/// The letters of every inline flag group `(?imsx)` / `(?i:...)` that turns flags on.
fn inline_flags(pattern: &str) -> String {
    let mut flags = String::new();
    let mut rest = pattern;
    while let Some(at) = rest.find("(?") {
        let after = &rest[at + 2..];
        let on: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        if after[on.len()..].starts_with([')', ':', '-']) {
            flags.push_str(&on);
        }
        rest = after;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_err(v: Value) -> String {
        parse_filter_list(Some(&v)).unwrap_err().to_string()
    }

    #[test]
    fn unknown_filter_names_pipeline_step_and_known_filters() {
        let e = parse_err(json!([{"name": "strict", "filter": [
            {"function": "take_first"}, {"function": "ACP_grammar_filter"}]}]));
        assert!(
            e.contains("pipeline `strict`, filter[1] (`ACP_grammar_filter`)"),
            "{e}"
        );
        assert!(e.contains("unknown filter"), "{e}");
        for known in KNOWN_FILTERS {
            assert!(e.contains(known), "{e} lacks {known}");
        }
    }

    #[test]
    fn malformed_pipelines_are_clear_errors() {
        let e = parse_err(json!([{"filter": [{"function": "take_first"}]}]));
        assert!(e.contains("entry 0") && e.contains("no `name`"), "{e}");
        let e = parse_err(json!([{"name": "x"}]));
        assert!(
            e.contains("pipeline `x`") && e.contains("missing `filter`"),
            "{e}"
        );
        let e = parse_err(json!([{"name": "x", "filter": [{"regex_pattern": "a"}]}]));
        assert!(
            e.contains("filter[0]") && e.contains("missing `function`"),
            "{e}"
        );
        let e = parse_err(json!({"name": "x"}));
        assert!(e.contains("must be a list"), "{e}");
        let p = json!({"name": "x", "filter": [{"function": "take_first"}]});
        let e = parse_err(json!([p.clone(), p]));
        assert!(e.contains("`x` is used twice"), "{e}");
    }

    #[test]
    fn bad_arguments_name_the_argument() {
        let step = |s: Value| parse_err(json!([{"name": "p", "filter": [s]}]));
        let e = step(json!({"function": "regex", "group_select": "-1"}));
        assert!(e.contains("`group_select` must be an integer"), "{e}");
        let e = step(json!({"function": "regex", "regex_pattern": "(unclosed"}));
        assert!(
            e.contains("`regex_pattern`") && e.contains("(unclosed"),
            "{e}"
        );
        let e = step(json!({"function": "regex", "regex_patern": "x"}));
        assert!(e.contains("unknown argument `regex_patern`"), "{e}");
        let e = step(json!({"function": "take_first", "k": 1}));
        assert!(e.contains("takes no arguments"), "{e}");
        let e = step(json!({"function": "take_first_k"}));
        assert!(e.contains("missing `k`"), "{e}");
        let e = step(json!({"function": "multi_choice_regex", "ignore_case": "yes"}));
        assert!(e.contains("`ignore_case` must be true or false"), "{e}");
        let e = step(json!({"function": "map", "mapping_dict": ["A"]}));
        assert!(e.contains("`mapping_dict` must be a mapping"), "{e}");
        let e = step(json!({"function": "custom", "filter_fn": "utils.f"}));
        assert!(e.contains("`filter_fn` must be a `!function"), "{e}");
        // Constructors that take **kwargs ignore unknown ones, as in lm-eval.
        parse_filter_list(Some(&json!([{"name": "p", "filter": [
            {"function": "remove_whitespace", "anything": 1}]}])))
        .unwrap();
    }

    #[test]
    fn default_pipeline_is_none_take_first() {
        for absent in [None, Some(&Value::Null)] {
            let p = parse_filter_list(absent).unwrap();
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].name, "none");
            let out = p[0]
                .apply(
                    &[vec!["a".into(), "b".into()]],
                    &[Doc::new()],
                    &mut no_python,
                )
                .unwrap();
            assert_eq!(out, vec![json!("a")]);
        }
        assert_eq!(
            metric_key("exact_match", "strict-match"),
            "exact_match,strict-match"
        );
    }

    #[test]
    fn python_steps_go_to_the_callback() {
        let tag = |f: &str| json!({"__yaml_tag__": format!("!function {f}"), "__yaml_dir__": "/t"});
        let p = FilterPipeline::parse(&json!({"name": "py", "filter": [
            {"function": "custom", "filter_fn": tag("utils.f")},
            {"function": tag("utils.Cls"), "k": 2},
            {"function": "take_first"}]}))
        .unwrap();
        assert!(p.needs_python());
        let e = p
            .apply(&[vec!["a".into()]], &[Doc::new()], &mut no_python)
            .unwrap_err();
        assert!(e.to_string().contains("filter[0] (`custom`)"), "{e}");
        let mut seen = Vec::new();
        let out = p
            .apply(
                &[vec!["a".into()]],
                &[Doc::new()],
                &mut |s: &PythonStep, st, _: &[Doc]| {
                    seen.push(s.function().name.clone());
                    Ok(st)
                },
            )
            .unwrap();
        assert_eq!(out, vec![json!("a")]);
        assert_eq!(seen, ["f", "Cls"]);
        let short = p.apply(
            &[vec!["a".into()]],
            &[Doc::new()],
            &mut |_: &PythonStep, _, _: &[Doc]| Ok(vec![]),
        );
        assert!(short
            .unwrap_err()
            .to_string()
            .contains("returned 0 values for 1"));
    }

    #[test]
    fn runtime_failures_are_errors_not_panics() {
        let p = FilterPipeline::parse(&json!({"name": "mc", "filter": [
            {"function": "multi_choice_regex"}]}))
        .unwrap();
        let e = p
            .apply(&[vec!["x".into()]], &[Doc::new()], &mut no_python)
            .unwrap_err();
        assert!(e.to_string().contains("no `choices`"), "{e}");
        let e = p
            .apply(&[vec!["x".into()]], &[], &mut no_python)
            .unwrap_err();
        assert!(e.to_string().contains("1 instances but 0 documents"), "{e}");
        assert_eq!(
            p.apply(&[], &[], &mut no_python).unwrap(),
            Vec::<Value>::new()
        );
    }

    /// The path the task loader takes: a YAML `filter_list` with `!function` values.
    #[test]
    fn parses_a_task_yaml_filter_list() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.yaml");
        std::fs::write(
            &file,
            r#####"filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\-?[0-9\\.\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: !function utils.MultiChoiceRegexFilter
        group_select: -1
        ignore_case: true
      - function: take_first
  - name: create_test
    filter:
      - function: custom
        filter_fn: !function utils.build_predictions
"#####,
        )
        .unwrap();
        let yaml = crate::config::read_yaml(&file).unwrap();
        let p = parse_filter_list(yaml.get("filter_list")).unwrap();
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["strict-match", "flexible-extract", "create_test"]);
        let Step::Regex(r) = &p[0].steps[0] else {
            panic!("{:?}", p[0].steps[0])
        };
        assert_eq!(r.regex.as_str(), DEFAULT_REGEX);
        let Step::Python(PythonStep::Class { class, kwargs }) = &p[1].steps[0] else {
            panic!("{:?}", p[1].steps[0])
        };
        assert_eq!(
            (class.module.as_str(), class.name.as_str()),
            ("utils", "MultiChoiceRegexFilter")
        );
        assert_eq!(class.dir, dir.path());
        assert_eq!(kwargs.get("group_select"), Some(&json!(-1)));
        assert_eq!(kwargs.get("ignore_case"), Some(&json!(true)));
        let Step::Python(PythonStep::Custom { filter_fn }) = &p[2].steps[0] else {
            panic!("{:?}", p[2].steps[0])
        };
        assert_eq!(filter_fn.name, "build_predictions");
        let out = p[0]
            .apply(
                &[vec!["x\n#### 1,234".into()]],
                &[Doc::new()],
                &mut no_python,
            )
            .unwrap();
        assert_eq!(out, vec![json!("1,234")]);
    }

    #[test]
    fn translation_of_python_syntax() {
        assert_eq!(PyRegex::translate(r"a\Z"), r"a\z");
        assert_eq!(PyRegex::translate(r"(?m)a$"), r"(?m)a$");
        assert_eq!(PyRegex::translate(r"[[&~]"), r"[\[\&\~]");
        assert_eq!(py_re_escape("a b.(c)#"), r"a\ b\.\(c\)\#");
    }
}
