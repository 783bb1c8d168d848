//! A loaded task: its documents, prompts (with the harness's few-shot sampler) and requests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use minijinja::Environment;
use serde_json::Value;

use crate::config::{Field, Function, OutputType, TaskConfig};
use crate::dataset::{as_text, Doc};
use crate::error::{Error, Result};
use crate::hooks::{Hooks, Items, Site};
use crate::lm::{GenerateRequest, LoglikelihoodRequest};
use crate::pyrandom::PyRandom;
use crate::template;

/// Settings that apply to every task of a run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Fills `{data_dir}` in data file paths.
    pub data_dir: PathBuf,
    /// Evaluate only the first N documents.
    pub limit: Option<usize>,
    /// Overrides each task's `num_fewshot`.
    pub num_fewshot: Option<usize>,
    /// Seed of the few-shot sampler (lm-evaluation-harness's default is 1234).
    pub fewshot_seed: u64,
    /// Overrides a CoBBLEr suite's `pairs` (comparisons drawn; 0 = all).
    pub pairs: Option<usize>,
    /// Runs `!function` hooks (one Python worker, started by the first hook; each task keeps a
    /// clone for scoring-time hooks). The default uses `MOEVAL_PYTHON`, else `python3`.
    pub hooks: Hooks,
    /// `--gen-kwargs`: updates every generation task's `generation_kwargs`.
    pub gen_kwargs: serde_json::Map<String, Value>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            data_dir: PathBuf::from("."),
            limit: None,
            num_fewshot: None,
            fewshot_seed: 1234,
            pairs: None,
            hooks: Hooks::default(),
            gen_kwargs: serde_json::Map::new(),
        }
    }
}

/// One request to the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Loglikelihood(LoglikelihoodRequest),
    Rolling(String),
    Generate(GenerateRequest),
}

/// The model's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Loglikelihood(crate::lm::Loglikelihood),
    Rolling(f64),
    Generate(String),
}

/// A document turned into its prompt and requests.
#[derive(Clone, Debug)]
pub struct Instance {
    pub doc_id: usize,
    pub context: String,
    /// The target as the task defines it (index, text or list).
    pub target: Value,
    /// Choices of a multiple-choice (or choice-indexed generation) task.
    pub choices: Vec<String>,
    pub requests: Vec<Request>,
}

/// A task ready to run.
pub struct Task {
    pub config: TaskConfig,
    pub(crate) env: Environment<'static>,
    pub(crate) features: HashSet<String>,
    pub(crate) docs: Vec<Doc>,
    pub(crate) fewshot_docs: Vec<Doc>,
    /// Few-shot exemplars per value of `fewshot_by.field`.
    pub(crate) fewshot_by: HashMap<String, Vec<Doc>>,
    pub(crate) num_fewshot: usize,
    /// `filter_list`'s pipelines (lm-evaluation-harness's `none` = take the first answer, without one).
    pub(crate) filters: Vec<crate::filters::FilterPipeline>,
    /// The run's hook worker (process_results, metric, aggregation and filter hooks use it too).
    pub hooks: Hooks,
    pub(crate) hooked: Hooked,
    /// The subword tokenizers ROUGE metrics name with `tokenizer:`, by that value.
    pub(crate) rouge_tokens: HashMap<String, crate::rouge::SubwordTokens>,
}

/// Which `!function` field a hooked value belongs to (index into [`Hooked::docs`]).
const TEXT: usize = 0;
const TARGET: usize = 1;
const CHOICE: usize = 2;
const HOOK_FIELDS: [(usize, &str); 3] = [
    (TEXT, "doc_to_text"),
    (TARGET, "doc_to_target"),
    (CHOICE, "doc_to_choice"),
];

/// Values of `!function` `doc_to_text` / `doc_to_target` / `doc_to_choice` fields, computed in
/// batches: for every task document when the task loads, and for the few-shot exemplars
/// [`Task::instances`] draws (lm-evaluation-harness runs the hooks on those only).
#[derive(Default)]
pub(crate) struct Hooked {
    /// Per field: one value per task document (empty when the field is not a function).
    pub(crate) docs: [Vec<Value>; 3],
    /// (field, index in the few-shot pool) -> value.
    pool: Mutex<HashMap<(usize, usize), Value>>,
}

/// The position of `doc` in `pool` when it is one of its elements (not an equal copy).
fn index_in(pool: &[Doc], doc: &Doc) -> Option<usize> {
    let start = pool.as_ptr() as usize;
    let size = std::mem::size_of::<Doc>().max(1);
    let at = doc as *const Doc as usize;
    (at >= start && at < start + pool.len() * size && (at - start).is_multiple_of(size))
        .then(|| (at - start) / size)
}

impl Task {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn docs(&self) -> &[Doc] {
        &self.docs
    }

    fn doc_err(&self, doc_id: usize, field: &str, msg: impl Into<String>) -> Error {
        Error::Doc {
            file: self.config.file.clone(),
            task: self.config.name.clone(),
            doc_id,
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn render(&self, t: &str, doc: &Doc, doc_id: usize, field: &str) -> Result<String> {
        template::render(&self.env, t, doc).map_err(|e| self.doc_err(doc_id, field, e))
    }

    /// The `!function` fields, by [`Hooked`] index and name.
    fn hook_functions(&self) -> Vec<(usize, &'static str, &Function)> {
        let c = &self.config;
        [
            Some(&c.doc_to_text),
            Some(&c.doc_to_target),
            c.doc_to_choice.as_ref(),
        ]
        .into_iter()
        .zip(HOOK_FIELDS)
        .filter_map(|(f, (i, name))| match f {
            Some(Field::Function(f)) => Some((i, name, f)),
            _ => None,
        })
        .collect()
    }

    /// Every `!function` field's values for `docs`, one batch per field; `label` and `ids` name
    /// a failing document (no ids: its position).
    pub(crate) fn hook_values(
        &self,
        docs: &[&Doc],
        label: &str,
        ids: &[usize],
    ) -> Result<[Vec<Value>; 3]> {
        let mut out: [Vec<Value>; 3] = Default::default();
        for (i, name, f) in self.hook_functions() {
            let site = Site {
                file: &self.config.file,
                task: &self.config.name,
                field: name,
                items: Items::Docs { label, ids },
            };
            out[i] = self.hooks.doc_field(f, docs, &site)?;
        }
        Ok(out)
    }

    /// A `!function` field's value for one document: computed at load time for the task's
    /// documents, by [`Task::instances`] for drawn exemplars, else (a `fewshot_by` exemplar, a
    /// caller's own document) computed now.
    fn hook_value(&self, field: usize, f: &Function, doc: &Doc, doc_id: usize) -> Result<Value> {
        // Precomputed values are the task's own functions'; a `fewshot_config` override differs.
        let own = self
            .hook_functions()
            .iter()
            .any(|(i, _, g)| *i == field && *g == f);
        if !own {
            let site = Site {
                file: &self.config.file,
                task: &self.config.name,
                field: HOOK_FIELDS[field].1,
                items: Items::Docs {
                    label: "few-shot doc",
                    ids: &[doc_id],
                },
            };
            return Ok(self
                .hooks
                .doc_field(f, &[doc], &site)?
                .pop()
                .unwrap_or(Value::Null));
        }
        if let Some(v) = index_in(&self.docs, doc).and_then(|i| self.hooked.docs[field].get(i)) {
            return Ok(v.clone());
        }
        if let Some(i) = index_in(&self.fewshot_docs, doc) {
            let pool = self.hooked.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = pool.get(&(field, i)) {
                return Ok(v.clone());
            }
        }
        let site = Site {
            file: &self.config.file,
            task: &self.config.name,
            field: HOOK_FIELDS[field].1,
            items: Items::Docs {
                label: "doc",
                ids: &[doc_id],
            },
        };
        Ok(self
            .hooks
            .doc_field(f, &[doc], &site)?
            .pop()
            .unwrap_or(Value::Null))
    }

    /// Runs the `!function` fields, in one batch per field, on the few-shot exemplars in `picks`
    /// that have no values yet.
    fn hook_exemplars(&self, picks: &[Vec<&Doc>]) -> Result<()> {
        if self.hook_functions().is_empty() {
            return Ok(());
        }
        let wanted: BTreeSet<usize> = picks
            .iter()
            .flatten()
            .filter_map(|d| index_in(&self.fewshot_docs, d))
            .collect();
        let missing: Vec<usize> = {
            let pool = self.hooked.pool.lock().unwrap_or_else(|e| e.into_inner());
            wanted
                .into_iter()
                .filter(|i| {
                    self.hook_functions()
                        .iter()
                        .any(|(f, _, _)| !pool.contains_key(&(*f, *i)))
                })
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let docs: Vec<&Doc> = missing.iter().map(|&i| &self.fewshot_docs[i]).collect();
        let values = self.hook_values(&docs, "few-shot doc", &missing)?;
        let mut pool = self.hooked.pool.lock().unwrap_or_else(|e| e.into_inner());
        for (field, vs) in values.into_iter().enumerate() {
            for (&i, v) in missing.iter().zip(vs) {
                pool.insert((field, i), v);
            }
        }
        Ok(())
    }

    /// `doc_to_text`: a column, or a rendered template.
    pub fn doc_to_text(&self, doc: &Doc, doc_id: usize) -> Result<String> {
        self.text_of(&self.config.doc_to_text, doc, doc_id)
    }

    fn text_of(&self, field: &Field, doc: &Doc, doc_id: usize) -> Result<String> {
        match self.text_value(field, doc, doc_id)? {
            Value::String(s) => Ok(s),
            v => Err(self.doc_err(
                doc_id,
                "doc_to_text",
                format!("gives {v}, a choice index, here where text is needed"),
            )),
        }
    }

    /// `doc_to_text` as lm-evaluation-harness returns it: text, or a choice index (an integer from
    /// a column, a function, or a template rendering to digits when `doc_to_choice` is set), which
    /// makes the task one of several inputs per document (Winogrande).
    fn text_value(&self, field: &Field, doc: &Doc, doc_id: usize) -> Result<Value> {
        let indexed = self.config.doc_to_choice.is_some();
        Ok(Value::String(match field {
            Field::Template(t) if self.features.contains(t) => match doc.get(t) {
                Some(v @ Value::Number(_)) if indexed => return Ok(v.clone()),
                _ => self.text_inner(field, doc, doc_id)?,
            },
            Field::Template(t) => {
                let s = self.render(t, doc, doc_id, "doc_to_text")?;
                if template::is_py_digits(&s) && indexed {
                    return s
                        .parse::<u64>()
                        .map(Value::from)
                        .map_err(|e| self.doc_err(doc_id, "doc_to_text", e.to_string()));
                }
                s
            }
            Field::Function(f) => match self.hook_value(TEXT, f, doc, doc_id)? {
                Value::String(s) => s,
                v @ Value::Number(_) if indexed => return Ok(v),
                v => {
                    return Err(self.doc_err(
                        doc_id,
                        "doc_to_text",
                        format!("{f} returned {v}, not text or a choice index"),
                    ))
                }
            },
            _ => self.text_inner(field, doc, doc_id)?,
        }))
    }

    /// Whether documents have several inputs (`doc_to_text` gives a choice index; the choices are
    /// the contexts), judged on the first document as the harness does.
    pub(crate) fn multiple_input(&self) -> Result<bool> {
        match self.docs.first() {
            Some(d) => Ok(self.text_value(&self.config.doc_to_text, d, 0)?.is_number()),
            None => Ok(false),
        }
    }

    /// A column's text, or the error for a field that cannot give text ([`Task::text_value`]
    /// handles templates and functions itself).
    fn text_inner(&self, field: &Field, doc: &Doc, doc_id: usize) -> Result<String> {
        match field {
            Field::Template(t) => match doc.get(t) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(self.doc_err(
                    doc_id,
                    "doc_to_text",
                    format!("column `{t}` is {v}, not text"),
                )),
                None => Err(self.doc_err(
                    doc_id,
                    "doc_to_text",
                    format!("document has no column `{t}`"),
                )),
            },
            _ => Err(self.doc_err(doc_id, "doc_to_text", "must be a column name or a template")),
        }
    }

    /// `doc_to_target`: an index, a text or a list, with the harness's conversions.
    pub fn doc_to_target(&self, doc: &Doc, doc_id: usize) -> Result<Value> {
        self.target_of(&self.config.doc_to_target, doc, doc_id)
    }

    fn target_of(&self, field: &Field, doc: &Doc, doc_id: usize) -> Result<Value> {
        match field {
            Field::Int(i) => Ok(Value::from(*i)),
            Field::List(l) => Ok(Value::Array(l.clone())),
            Field::Template(t) if self.features.contains(t) => {
                doc.get(t).cloned().ok_or_else(|| {
                    self.doc_err(
                        doc_id,
                        "doc_to_target",
                        format!("document has no column `{t}`"),
                    )
                })
            }
            Field::Template(t) => {
                let s = self.render(t, doc, doc_id, "doc_to_target")?;
                if template::is_py_digits(&s) && self.config.doc_to_choice.is_some() {
                    return s
                        .parse::<i64>()
                        .map(Value::from)
                        .map_err(|e| self.doc_err(doc_id, "doc_to_target", e.to_string()));
                }
                if s.len() >= 2 && s.starts_with('[') && s.ends_with(']') {
                    if let Ok(v) = template::literal_eval(&s) {
                        return Ok(v);
                    }
                }
                Ok(Value::String(s))
            }
            // The function's value as it is: an index, a text or a list.
            Field::Function(f) => self.hook_value(TARGET, f, doc, doc_id),
        }
    }

    /// `doc_to_choice`: a column, a template that renders to a Python list, or a literal list.
    pub fn doc_to_choice(&self, doc: &Doc, doc_id: usize) -> Result<Vec<String>> {
        self.choices_of(self.config.doc_to_choice.as_ref(), doc, doc_id)
    }

    fn choices_of(&self, field: Option<&Field>, doc: &Doc, doc_id: usize) -> Result<Vec<String>> {
        let v = match field {
            None => return Ok(Vec::new()),
            Some(Field::List(l)) => Value::Array(l.clone()),
            Some(Field::Template(t)) if self.features.contains(t) => {
                doc.get(t).cloned().unwrap_or(Value::Null)
            }
            Some(Field::Template(t)) => {
                let s = self.render(t, doc, doc_id, "doc_to_choice")?;
                template::literal_eval(&s).map_err(|e| self.doc_err(doc_id, "doc_to_choice", e))?
            }
            Some(Field::Int(_)) => {
                return Err(self.doc_err(
                    doc_id,
                    "doc_to_choice",
                    "must be a list, a column or a template",
                ))
            }
            Some(Field::Function(f)) => self.hook_value(CHOICE, f, doc, doc_id)?,
        };
        match v {
            Value::Array(a) if !a.is_empty() => Ok(a.iter().map(as_text).collect()),
            other => Err(self.doc_err(
                doc_id,
                "doc_to_choice",
                format!("must give a non-empty list of choices, got {other}"),
            )),
        }
    }

    /// The few-shot answer text of an exemplar (the harness's `build_qa_turn` rules).
    fn answer_text(
        &self,
        target: &Value,
        choices: &[String],
        doc_id: usize,
    ) -> Result<Option<String>> {
        Ok(match target {
            Value::Null => None,
            Value::String(s) if s.is_empty() => None,
            Value::Number(n) if !choices.is_empty() => {
                let i = n.as_u64().ok_or_else(|| {
                    self.doc_err(
                        doc_id,
                        "doc_to_target",
                        format!("{n} is not a choice index"),
                    )
                })? as usize;
                Some(choices.get(i).cloned().ok_or_else(|| {
                    self.doc_err(
                        doc_id,
                        "doc_to_target",
                        format!("index {i} but only {} choices", choices.len()),
                    )
                })?)
            }
            Value::Array(a) => a.first().map(as_text),
            other => Some(as_text(other)),
        })
    }

    /// Appends one few-shot exemplar, formatted with `fewshot_config`'s fields and delimiters.
    fn exemplar(&self, doc: &Doc, doc_id: usize, out: &mut String) -> Result<()> {
        let fc = &self.config.fewshot;
        let mut choices = match &fc.doc_to_choice {
            Some(f) => self.choices_of(Some(f), doc, doc_id)?,
            None => Vec::new(),
        };
        let q = match self.text_value(&fc.doc_to_text, doc, doc_id)? {
            Value::String(q) => q,
            // Several inputs: the exemplar's text is its right context; its answer the target.
            v => {
                let i = v.as_u64().unwrap_or(u64::MAX) as usize;
                let q = choices.get(i).cloned().ok_or_else(|| {
                    self.doc_err(
                        doc_id,
                        "doc_to_text",
                        format!("index {v} but {} choices", choices.len()),
                    )
                })?;
                choices.clear();
                q
            }
        };
        let a = self.target_of(&fc.doc_to_target, doc, doc_id)?;
        let prefix = self.gen_prefix(fc.gen_prefix.as_deref(), doc, doc_id)?;
        out.push_str(&q);
        match (self.answer_text(&a, &choices, doc_id)?, prefix) {
            (Some(ans), None) => {
                out.push_str(&fc.target_delimiter);
                out.push_str(&ans);
                out.push_str(&fc.fewshot_delimiter);
            }
            (Some(ans), Some(p)) => {
                if requires_delimiter(&q, &p) {
                    out.push_str(&fc.target_delimiter);
                }
                out.push_str(&maybe_delimit(&p, &ans));
                out.push_str(&fc.fewshot_delimiter);
            }
            (None, Some(p)) => {
                if requires_delimiter(&q, &p) {
                    out.push_str(&fc.target_delimiter);
                }
                out.push_str(&p);
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// `gen_prefix` of a document: a column's value, else the rendered template.
    fn gen_prefix(&self, field: Option<&str>, doc: &Doc, doc_id: usize) -> Result<Option<String>> {
        let Some(f) = field else { return Ok(None) };
        let p = match doc.get(f) {
            Some(v) => as_text(v),
            None => self.render(f, doc, doc_id, "gen_prefix")?,
        };
        Ok((!p.is_empty()).then_some(p))
    }

    /// Builds every document's prompt and requests, in document order. Few-shot exemplars are drawn
    /// from one `random.Random(seed)` consumed in that order, exactly as the harness does.
    pub fn instances(&self, seed: u64) -> Result<Vec<Instance>> {
        let mut rnd = PyRandom::new(seed);
        let exclude_self = self.config.fewshot.split == self.config.test_split;
        let n = self.num_fewshot;
        let multiple_input =
            self.config.output_type == OutputType::MultipleChoice && self.multiple_input()?;
        let mut out = Vec::with_capacity(self.docs.len());
        // Exemplars are drawn first, so `!function` fields run on all of them in one batch.
        let mut picks = Vec::with_capacity(self.docs.len());
        for (doc_id, doc) in self.docs.iter().enumerate() {
            picks.push(if n > 0 && self.config.fewshot_by.is_none() {
                self.sample_fewshot(&mut rnd, doc, doc_id, n, exclude_self)?
            } else {
                Vec::new()
            });
        }
        self.hook_exemplars(&picks)?;
        for ((doc_id, doc), picked) in self.docs.iter().enumerate().zip(picks) {
            let mut ctx = String::new();
            if let Some(d) = &self.config.description {
                let s = match doc.get(d) {
                    Some(v) => as_text(v),
                    None => self.render(d, doc, doc_id, "description")?,
                };
                ctx.push_str(&s);
            }
            if n > 0 {
                if let Some(fb) = &self.config.fewshot_by {
                    let v = doc.get(&fb.field).map(as_text).unwrap_or_default();
                    let ex = self
                        .fewshot_by
                        .get(&v)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    for e in ex {
                        self.exemplar(e, doc_id, &mut ctx)?;
                    }
                } else {
                    for e in picked {
                        self.exemplar(e, doc_id, &mut ctx)?;
                    }
                }
            }
            let prefix = self.gen_prefix(self.config.gen_prefix.as_deref(), doc, doc_id)?;
            if !multiple_input {
                let q = self.doc_to_text(doc, doc_id)?;
                ctx.push_str(&q);
                if let Some(p) = &prefix {
                    // The answer starts with the prefix (lm-eval's assistant turn, as plain text).
                    if requires_delimiter(&q, p) {
                        ctx.push_str(&self.config.target_delimiter);
                    }
                    ctx.push_str(p);
                }
            }
            out.push(self.requests(doc, doc_id, ctx, multiple_input)?);
        }
        Ok(out)
    }

    fn sample_fewshot<'a>(
        &'a self,
        rnd: &mut PyRandom,
        doc: &Doc,
        doc_id: usize,
        n: usize,
        exclude_self: bool,
    ) -> Result<Vec<&'a Doc>> {
        let pool = &self.fewshot_docs;
        if self.config.fewshot.sampler == crate::config::Sampler::FirstN {
            // The pool's first n, after dropping documents equal to this one when they share a split.
            let res: Vec<&Doc> = pool
                .iter()
                .filter(|d| !exclude_self || *d != doc)
                .take(n)
                .collect();
            if res.len() < n {
                return Err(self.doc_err(
                    doc_id,
                    "num_fewshot",
                    format!(
                        "{n} few-shot examples requested but the few-shot pool has {}",
                        res.len()
                    ),
                ));
            }
            return Ok(res);
        }
        let want = if exclude_self { n + 1 } else { n };
        if want > pool.len() {
            return Err(self.doc_err(
                doc_id,
                "num_fewshot",
                format!(
                    "{n} few-shot examples requested but the few-shot split has {}",
                    pool.len()
                ),
            ));
        }
        let picked: Vec<&Doc> = rnd
            .sample(pool.len(), want)
            .into_iter()
            .map(|i| &pool[i])
            .collect();
        if !exclude_self {
            return Ok(picked);
        }
        // Exemplars equal to the document (by content) are dropped, as `x != doc` does in the harness.
        let mut res: Vec<&Doc> = picked.into_iter().filter(|d| *d != doc).take(n).collect();
        if res.len() < n {
            let rest: Vec<&Doc> = pool.iter().filter(|d| *d != doc).collect();
            if rest.len() < n {
                return Err(self.doc_err(
                    doc_id,
                    "num_fewshot",
                    "not enough few-shot examples that differ from the document",
                ));
            }
            res = rnd
                .sample(rest.len(), n)
                .into_iter()
                .map(|i| rest[i])
                .collect();
        }
        Ok(res)
    }

    fn requests(
        &self,
        doc: &Doc,
        doc_id: usize,
        ctx: String,
        multiple_input: bool,
    ) -> Result<Instance> {
        let cfg = &self.config;
        let target = self.doc_to_target(doc, doc_id)?;
        let choices = if cfg.doc_to_choice.is_some() {
            self.doc_to_choice(doc, doc_id)?
        } else {
            Vec::new()
        };
        let ll = |c: &str, k: String| {
            Request::Loglikelihood(LoglikelihoodRequest {
                context: c.to_string(),
                continuation: k,
            })
        };
        let requests = match cfg.output_type {
            OutputType::MultipleChoice if multiple_input => {
                // Several inputs: one context per choice, the target as every continuation.
                let gold = self.text_value(&cfg.doc_to_text, doc, doc_id)?;
                let cont = format!("{}{}", cfg.target_delimiter, as_text(&target));
                let prefix = self.gen_prefix(cfg.gen_prefix.as_deref(), doc, doc_id)?;
                let r = choices
                    .iter()
                    .map(|c| {
                        let p = prefix.as_deref().unwrap_or("");
                        ll(&format!("{ctx}{c}{p}"), cont.clone())
                    })
                    .collect();
                return Ok(Instance {
                    doc_id,
                    context: ctx,
                    target: gold,
                    choices,
                    requests: r,
                });
            }
            OutputType::MultipleChoice => {
                let mut r: Vec<Request> = choices
                    .iter()
                    .map(|c| ll(&ctx, format!("{}{c}", cfg.target_delimiter)))
                    .collect();
                if cfg
                    .metric_list
                    .iter()
                    .any(|m| m.metric == "acc_mutual_info")
                {
                    r.extend(
                        choices
                            .iter()
                            .map(|c| ll("", format!("{}{c}", cfg.target_delimiter))),
                    );
                }
                r
            }
            OutputType::Loglikelihood => vec![ll(&ctx, as_text(&target))],
            OutputType::LoglikelihoodRolling => vec![Request::Rolling(as_text(&target))],
            OutputType::GenerateUntil => {
                let g = cfg.generation_kwargs.clone().unwrap_or_else(|| {
                    crate::config::GenerationKwargs::harness_default(&cfg.fewshot_delimiter)
                });
                let temperature = if g.do_sample {
                    g.temperature.max(0.0)
                } else {
                    0.0
                };
                // `repeats` answers per document; sampled ones each with their own seed, greedy
                // ones identical (the runner computes those once).
                (0..cfg.repeats)
                    .map(|r| {
                        Request::Generate(GenerateRequest {
                            context: ctx.clone(),
                            until: g.until.clone(),
                            max_gen_toks: g.max_gen_toks,
                            temperature,
                            top_p: g.top_p,
                            num_beams: g.num_beams,
                            length_penalty: g.length_penalty,
                            early_stopping: g.early_stopping,
                            seed: if temperature > 0.0 {
                                1234 + r as u64
                            } else {
                                1234
                            },
                        })
                    })
                    .collect()
            }
        };
        Ok(Instance {
            doc_id,
            context: ctx,
            target,
            choices,
            requests,
        })
    }

    /// A document's requests as lm-evaluation-harness's `--log_samples` writes their arguments:
    /// `{"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}`, one entry per request in
    /// request order; a generation's `arg_1` is its `generation_kwargs` mapping, a rolling
    /// log-likelihood has `arg_0` only. JSON with Python's `json.dumps` separators, non-ASCII unescaped.
    pub fn harness_arguments(&self, requests: &[Request]) -> String {
        let mut out = String::from("{");
        // Repeated generations are one request to the harness (its `repeats`), logged once.
        let logged = match requests.first() {
            Some(Request::Generate(_)) => &requests[..1],
            _ => requests,
        };
        for (i, r) in logged.iter().enumerate() {
            let mut args = serde_json::Map::new();
            match r {
                Request::Loglikelihood(l) => {
                    args.insert("arg_0".into(), Value::from(l.context.as_str()));
                    args.insert("arg_1".into(), Value::from(l.continuation.as_str()));
                }
                Request::Rolling(text) => {
                    args.insert("arg_0".into(), Value::from(text.as_str()));
                }
                Request::Generate(g) => {
                    let kwargs = match &self.config.generation_kwargs {
                        Some(k) => k.harness_args.clone(),
                        None => {
                            crate::config::GenerationKwargs::harness_default(
                                &self.config.fewshot_delimiter,
                            )
                            .harness_args
                        }
                    };
                    args.insert("arg_0".into(), Value::from(g.context.as_str()));
                    args.insert("arg_1".into(), Value::Object(kwargs));
                }
            }
            // Written in request order (a map would sort `gen_args_10` before `gen_args_2`).
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!(
                "\"gen_args_{i}\": {}",
                python_json(&Value::Object(args))
            ));
        }
        out.push('}');
        out
    }

    /// Values of the fields named by `group_by` and `bias` for a document (for per-group metrics).
    pub fn attributes(&self, doc_id: usize) -> BTreeMap<String, String> {
        let mut fields: Vec<&str> = self.config.group_by.iter().map(String::as_str).collect();
        if let Some(b) = &self.config.bias {
            fields.push(&b.group);
            fields.push(&b.template);
            if let Some(s) = &b.source {
                fields.push(s);
            }
        }
        let doc = &self.docs[doc_id];
        fields
            .into_iter()
            .filter_map(|f| Some((f.to_string(), as_text(doc.get(f)?))))
            .collect()
    }
}

/// lm-evaluation-harness's `requires_delimiter`: neither side has whitespace at the join.
fn requires_delimiter(prefix: &str, suffix: &str) -> bool {
    match (prefix.chars().last(), suffix.chars().next()) {
        (Some(a), Some(b)) => !(crate::pytext::is_space(a) || crate::pytext::is_space(b)),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// lm-evaluation-harness's `maybe_delimit(prefix, suffix, " ")`.
fn maybe_delimit(prefix: &str, suffix: &str) -> String {
    if prefix.is_empty() {
        return suffix.to_string();
    }
    if suffix.is_empty() {
        return prefix.to_string();
    }
    if requires_delimiter(prefix, suffix) {
        format!("{prefix} {suffix}")
    } else {
        format!("{prefix}{suffix}")
    }
}

/// `json.dumps(v, ensure_ascii=False)`: `", "` and `": "` separators (object keys come out sorted).
fn python_json(v: &Value) -> String {
    struct Py;
    impl serde_json::ser::Formatter for Py {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, Py);
    // Serialising a `Value` into memory cannot fail, and serde_json writes UTF-8.
    let _ = serde::Serialize::serialize(v, &mut ser);
    String::from_utf8_lossy(&buf).into_owned()
}
