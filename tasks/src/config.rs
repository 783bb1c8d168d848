//! Task files: lm-evaluation-harness YAML (with `include`, groups and tags) plus this project's
//! documented extensions (see docs/tasks.md), and the registry that finds them by name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{io_err, Error, Result};
use crate::lm::EarlyStopping;

/// Marker key for a value that carried a YAML tag such as `!function utils.process`.
const TAG_KEY: &str = "__yaml_tag__";
/// Beside [`TAG_KEY`]: the folder of the YAML file the tag was written in, which `!function`
/// modules are found relative to (an included file's folder, not the including one's).
const TAG_DIR_KEY: &str = "__yaml_dir__";

/// A `!function module.name` reference: `name` defined in `dir/module.py`, as lm-evaluation-harness
/// resolves it (relative to the YAML file that wrote the tag).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Function {
    pub dir: PathBuf,
    /// The module's file stem (`utils` for `utils.process_docs`; dotted stems stay dotted).
    pub module: String,
    pub name: String,
}

impl Function {
    /// The Python file defining the function.
    pub fn file(&self) -> PathBuf {
        self.dir.join(format!("{}.py", self.module))
    }

    /// Reads a tagged value's marker, if it is a `!function`.
    pub fn from_value(v: &Value) -> Option<Function> {
        let o = v.as_object()?;
        let tag = o.get(TAG_KEY)?.as_str()?;
        let spec = tag.strip_prefix("!function ")?.trim();
        let (module, name) = spec.rsplit_once('.')?;
        let dir = o.get(TAG_DIR_KEY).and_then(Value::as_str).unwrap_or(".");
        Some(Function {
            dir: PathBuf::from(dir),
            module: module.to_string(),
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "!function {}.{} ({})",
            self.module,
            self.name,
            self.file().display()
        )
    }
}

/// How a task turns a document into requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputType {
    MultipleChoice,
    Loglikelihood,
    LoglikelihoodRolling,
    GenerateUntil,
}

/// A `doc_to_text` / `doc_to_target` / `doc_to_choice` value.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    /// A column name or a Jinja template.
    Template(String),
    Int(i64),
    List(Vec<Value>),
    /// Python code (`!function`), run by the hook worker.
    Function(Function),
}

/// One entry of `metric_list`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSpec {
    pub metric: String,
    /// The task file's `higher_is_better`, carried into the results (`None`: the metric's default,
    /// [`crate::metrics::higher_is_better`]).
    pub higher_is_better: Option<bool>,
    /// `ignore_case`, `ignore_punctuation`, `kind` and other options passed to the metric.
    pub kwargs: Map<String, Value>,
    /// `metric: !function m.f`: a Python metric, called per document as lm-evaluation-harness calls
    /// it (`metric` is then the function's name).
    pub function: Option<Function>,
    /// `aggregation: !function m.g`: a Python aggregation over the per-document values.
    pub aggregation: Option<Function>,
}

/// `generation_kwargs`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationKwargs {
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// Beam search (transformers' `num_beams`, `length_penalty`, `early_stopping`); 1 = no beams.
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// The mapping as lm-evaluation-harness passes it to the model (`temperature` as a float, `until`
    /// added when missing): what the `arguments` column of samples.parquet shows.
    pub harness_args: Map<String, Value>,
}

impl GenerationKwargs {
    /// What the harness uses when a generation task gives no `generation_kwargs`.
    pub fn harness_default(fewshot_delimiter: &str) -> Self {
        let until = vec![fewshot_delimiter.to_string()];
        let mut harness_args = Map::new();
        harness_args.insert("temperature".into(), Value::from(0.0));
        harness_args.insert("do_sample".into(), Value::Bool(false));
        harness_args.insert("max_gen_toks".into(), Value::from(256));
        harness_args.insert("until".into(), Value::from(until.clone()));
        Self {
            until,
            max_gen_toks: 256,
            do_sample: false,
            temperature: 0.0,
            top_p: None,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            harness_args,
        }
    }
}

/// Extension: few-shot exemplars chosen per value of a document field, from one file per value
/// (the CALM protocol: exemplars of the document's source dataset).
#[derive(Clone, Debug, PartialEq)]
pub struct FewshotBy {
    pub field: String,
    /// Path with `{value}` (and `{data_dir}`) placeholders; read with the lenient CSV reader.
    pub data_files: String,
    /// Maps a field value to the `{value}` used in the path (default: the value itself).
    pub map: BTreeMap<String, String>,
    /// Exemplars taken, in file order.
    pub n: usize,
}

/// Extension: bias metrics over groups of documents (CALM).
#[derive(Clone, Debug, PartialEq)]
pub struct BiasSpec {
    /// Document field with the demographic group (e.g. `gender`).
    pub group: String,
    /// Document field identifying the template the document was generated from.
    pub template: String,
    /// Document field naming the source dataset (for the source exclusion rule), if any.
    pub source: Option<String>,
    /// The per-sample metric the bias is computed on (default `acc`).
    pub metric: String,
    /// A second per-sample metric (the project's matching), reported as `bias_score_moeval`.
    pub moeval_metric: Option<String>,
    /// The task whose exclusions also apply (CALM judges a task's gender and race halves together).
    pub joint_with: Option<String>,
}

/// `fewshot_config.sampler`: how exemplars are drawn from the few-shot pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// `random.Random(seed).sample`, the harness's default.
    Default,
    /// The pool's first N documents, in order (MMLU's canonical exemplars).
    FirstN,
}

/// `fewshot_config`, with the task's own fields filled in where it gives none (as
/// lm-evaluation-harness 0.4.13's `FewshotConfig.from_dict` inherits them).
#[derive(Clone, Debug, PartialEq)]
pub struct FewshotConfig {
    pub sampler: Sampler,
    /// `fewshot_config.split`, else the task's `fewshot_split`.
    pub split: Option<String>,
    /// `fewshot_config.samples`: literal exemplars (used when no split is named).
    pub samples: Option<Vec<Value>>,
    /// `fewshot_config.fewshot_indices`: the pool is these rows of the few-shot split, in this order.
    pub indices: Option<Vec<usize>>,
    /// `fewshot_config.process_docs`, else the task's.
    pub process_docs: Option<Function>,
    pub doc_to_text: Field,
    pub doc_to_target: Field,
    pub doc_to_choice: Option<Field>,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    /// `fewshot_config.gen_prefix`, else the task's.
    pub gen_prefix: Option<String>,
}

/// A parsed task file (after `include`s are merged).
#[derive(Clone, Debug)]
pub struct TaskConfig {
    pub name: String,
    pub file: PathBuf,
    pub tags: Vec<String>,
    pub dataset_path: String,
    /// `dataset_name`: the Hub dataset's configuration (subset).
    pub dataset_name: Option<String>,
    /// `dataset_kwargs` as written (`data_files` and `join_files` are also parsed below).
    pub dataset_kwargs: Map<String, Value>,
    pub data_files: BTreeMap<String, Vec<String>>,
    /// Extension: per split, a CSV whose rows are joined to the data rows by position.
    pub join_files: BTreeMap<String, String>,
    pub training_split: Option<String>,
    pub validation_split: Option<String>,
    pub test_split: Option<String>,
    pub fewshot_split: Option<String>,
    pub output_type: OutputType,
    pub doc_to_text: Field,
    pub doc_to_target: Field,
    pub doc_to_choice: Option<Field>,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub num_fewshot: usize,
    pub description: Option<String>,
    pub metric_list: Vec<MetricSpec>,
    pub generation_kwargs: Option<GenerationKwargs>,
    pub fewshot_by: Option<FewshotBy>,
    /// Extension: fields whose values split each mean metric into per-group values.
    pub group_by: Vec<String>,
    pub bias: Option<BiasSpec>,
    /// Extension: a built-in document builder and its metrics (`suite: {kind: sni | pairwise |
    /// pointwise | classification | cobbler, ...}`), checked when the task loads (see `suites/`).
    pub suite: Option<Map<String, Value>>,
    /// `process_docs`: a Python hook applied to each split's documents.
    pub process_docs: Option<Function>,
    /// How few-shot exemplars are drawn and formatted.
    pub fewshot: FewshotConfig,
    /// `gen_prefix`: a column or template whose text starts the answer (after the question, the
    /// target delimiter when neither side has whitespace at the join).
    pub gen_prefix: Option<String>,
    /// `repeats`: answers drawn per request (several only make sense with sampling).
    pub repeats: usize,
    /// `filter_list` as written: named pipelines applied to each document's answers.
    pub filter_list: Option<Value>,
    /// `metadata.version`, recorded in the results.
    pub version: Option<Value>,
    /// Fields accepted but without effect here, said once in the task's notes.
    pub ignored: Vec<String>,
    /// `process_results`: a Python hook that scores a document from its answers.
    pub process_results: Option<Function>,
}

/// A group (or suite) of tasks, with optional aggregate metrics.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub name: String,
    pub file: PathBuf,
    /// Member names (tasks or groups), in order.
    pub tasks: Vec<String>,
    pub aggregate: Vec<AggregateSpec>,
}

/// `aggregate_metric_list` entry: a mean of a metric over the group's tasks.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateSpec {
    pub metric: String,
    pub weight_by_size: bool,
}

/// Reads `generation_kwargs` as the harness's HF backend passes them on (beam settings to
/// transformers' `generate`).
fn parse_generation_kwargs(
    g: &Map<String, Value>,
    fewshot_delimiter: &str,
) -> std::result::Result<GenerationKwargs, String> {
    // The harness hands every key to the model's `generate`, so an ignored one would change what the
    // reference computes without a word: refuse what the engine does not implement.
    const KNOWN: [&str; 9] = [
        "until",
        "max_gen_toks",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "num_beams",
        "length_penalty",
        "early_stopping",
    ];
    if let Some(k) = g.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!(
            "generation_kwargs.{k} is not supported by moeval's decoder (supported: {})",
            KNOWN.join(", ")
        ));
    }
    let until = match g.get("until") {
        None => vec![fewshot_delimiter.to_string()],
        Some(v) => string_list(v).ok_or("generation_kwargs.until must be a string or a list")?,
    };
    let do_sample = g.get("do_sample").and_then(Value::as_bool).unwrap_or(false);
    let num_beams = match g.get("num_beams") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => {
                return Err(format!(
                    "generation_kwargs.num_beams must be an integer >= 1, not {v}"
                ))
            }
        },
    };
    if num_beams > 1 && do_sample {
        return Err("generation_kwargs: beam sampling (num_beams > 1 with do_sample: true) is not supported".into());
    }
    let length_penalty = match g.get("length_penalty") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("generation_kwargs.length_penalty must be a number, not {v}"))?,
    };
    let early_stopping = match g.get("early_stopping") {
        None | Some(Value::Bool(false)) => EarlyStopping::Heuristic,
        Some(Value::Bool(true)) => EarlyStopping::Always,
        Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
        Some(v) => {
            return Err(format!(
                "generation_kwargs.early_stopping must be true, false or \"never\", not {v}"
            ))
        }
    };
    let mut harness_args = g.clone();
    if let Some(t) = harness_args.get_mut("temperature") {
        if let Some(x) = t.as_f64() {
            *t = Value::from(x);
        }
    }
    harness_args
        .entry("until")
        .or_insert_with(|| Value::from(until.clone()));
    Ok(GenerationKwargs {
        until,
        // transformers' `max_new_tokens`, passed through by the harness, wins over its length budget.
        max_gen_toks: g
            .get("max_new_tokens")
            .or_else(|| g.get("max_gen_toks"))
            .and_then(Value::as_u64)
            .unwrap_or(256) as usize,
        do_sample,
        temperature: g.get("temperature").and_then(Value::as_f64).unwrap_or(0.0),
        top_p: g.get("top_p").and_then(Value::as_f64),
        num_beams,
        length_penalty,
        early_stopping,
        harness_args,
    })
}

fn cfg_err(file: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

fn yaml_to_json(v: serde_yaml_ng::Value) -> Value {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(s) => Value::Array(s.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        other => serde_yaml_ng::to_string(&other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => {
            let mut m = Map::new();
            let value = match t.value {
                Y::String(s) => s,
                other => serde_yaml_ng::to_string(&other).unwrap_or_default(),
            };
            m.insert(TAG_KEY.into(), Value::String(format!("{} {value}", t.tag)));
            Value::Object(m)
        }
    }
}

/// Reads a YAML file and merges its `include`s (the including file's keys win).
pub fn read_yaml(file: &Path) -> Result<Map<String, Value>> {
    read_yaml_depth(file, 0)
}

fn read_yaml_depth(file: &Path, depth: usize) -> Result<Map<String, Value>> {
    if depth > 16 {
        return Err(cfg_err(file, "`include` nests too deeply (a cycle?)"));
    }
    let text = std::fs::read_to_string(file).map_err(io_err(format!("{}", file.display())))?;
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| cfg_err(file, format!("invalid YAML: {e}")))?;
    let mut json = yaml_to_json(y);
    mark_tag_dirs(&mut json, file.parent().unwrap_or(Path::new(".")));
    let mut map = match json {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        _ => return Err(cfg_err(file, "a task file must be a YAML mapping")),
    };
    let includes: Vec<String> = match map.remove("include") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(cfg_err(file, "`include` entries must be file names")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(cfg_err(file, "`include` must be a file name or a list")),
    };
    if includes.is_empty() {
        return Ok(map);
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut merged = Map::new();
    for inc in includes {
        let path = dir.join(&inc);
        let base = read_yaml_depth(&path, depth + 1)
            .map_err(|e| cfg_err(file, format!("cannot include `{inc}`: {e}")))?;
        merged.extend(base);
    }
    merged.extend(map);
    Ok(merged)
}

/// Records the folder of `file` in every tagged value of it (see [`TAG_DIR_KEY`]).
fn mark_tag_dirs(v: &mut Value, dir: &Path) {
    match v {
        Value::Object(o) if o.contains_key(TAG_KEY) => {
            o.entry(TAG_DIR_KEY)
                .or_insert_with(|| Value::String(dir.to_string_lossy().into_owned()));
        }
        Value::Object(o) => o.values_mut().for_each(|x| mark_tag_dirs(x, dir)),
        Value::Array(a) => a.iter_mut().for_each(|x| mark_tag_dirs(x, dir)),
        _ => {}
    }
}

fn tagged(v: &Value) -> Option<&str> {
    v.as_object()?.get(TAG_KEY)?.as_str()
}

fn opt_str(m: &Map<String, Value>, key: &str, file: &Path) -> Result<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) if tagged(v).is_some() => Err(cfg_err(
            file,
            format!(
                "`{key}` is Python code ({}), which moeval cannot run",
                tagged(v).unwrap_or("")
            ),
        )),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(cfg_err(file, format!("`{key}` must be a string"))),
    }
}

fn field(m: &Map<String, Value>, key: &str, file: &Path) -> Result<Option<Field>> {
    Ok(match m.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Field::Template(s.clone())),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Some(Field::Int(i)),
            None => return Err(cfg_err(file, format!("`{key}` must be an integer"))),
        },
        Some(Value::Array(a)) => Some(Field::List(a.clone())),
        Some(v @ Value::Object(_)) if tagged(v).is_some() => match Function::from_value(v) {
            Some(f) => Some(Field::Function(f)),
            None => {
                return Err(cfg_err(
                    file,
                    format!(
                        "`{key}` has an unsupported YAML tag ({})",
                        tagged(v).unwrap_or("")
                    ),
                ))
            }
        },
        // A mapping of choices: its values, in order.
        Some(Value::Object(o)) => Some(Field::List(o.values().cloned().collect())),
        Some(Value::Bool(_)) => return Err(cfg_err(file, format!("`{key}` cannot be a boolean"))),
    })
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// Keys this project understands; anything else is reported, so typos do not pass silently.
const KNOWN_KEYS: &[&str] = &[
    "task",
    "tag",
    "group",
    "task_alias",
    "group_alias",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "num_fewshot",
    "description",
    "metric_list",
    "generation_kwargs",
    "metadata",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "repeats",
    "fewshot_config",
    "filter_list",
    "process_docs",
    "process_results",
    "fewshot_by",
    "group_by",
    "bias",
    "aggregate_metric_list",
    "suite",
    "gen_prefix",
    "unsafe_code",
    "doc_to_image",
    "doc_to_audio",
    "use_prompt",
    "custom_dataset",
];

/// `fewshot_config` keys lm-evaluation-harness 0.4.13 defines.
const FEWSHOT_KEYS: &[&str] = &[
    "sampler",
    "split",
    "process_docs",
    "fewshot_indices",
    "samples",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "gen_prefix",
    "fewshot_delimiter",
    "target_delimiter",
];

/// Parses `--gen-kwargs` as lm-evaluation-harness parses `--gen_kwargs`: `key=value` pairs joined
/// by commas; `true`/`false` (any case) are booleans, integers and floats numbers, anything else text.
pub fn parse_gen_kwargs(s: &str) -> std::result::Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!("`{part}` is not key=value (e.g. max_gen_toks=64,temperature=0)")
        })?;
        let v = match v.to_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => v
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| v.parse::<f64>().map(Value::from))
                .unwrap_or_else(|_| Value::from(v)),
        };
        out.insert(k.trim().to_string(), v);
    }
    Ok(out)
}

impl TaskConfig {
    /// Applies `--gen-kwargs` to a generation task, as the harness does: the pairs update its
    /// `generation_kwargs` (new keys go last). Other tasks are left as they are.
    pub fn override_generation(&mut self, overrides: &Map<String, Value>) -> Result<()> {
        if overrides.is_empty() || self.output_type != OutputType::GenerateUntil {
            return Ok(());
        }
        let mut g = self
            .generation_kwargs
            .as_ref()
            .map(|g| g.harness_args.clone())
            .unwrap_or_default();
        for (k, v) in overrides {
            g.insert(k.clone(), v.clone());
        }
        let parsed = parse_generation_kwargs(&g, &self.fewshot_delimiter).map_err(|e| {
            cfg_err(
                &self.file,
                format!("task `{}`: --gen-kwargs: {e}", self.name),
            )
        })?;
        self.generation_kwargs = Some(parsed);
        Ok(())
    }

    /// Parses a task mapping (includes already merged). `data_dir` fills `{data_dir}` placeholders.
    pub fn from_map(m: &Map<String, Value>, file: &Path, data_dir: &Path) -> Result<TaskConfig> {
        let name = opt_str(m, "task", file)?
            .ok_or_else(|| cfg_err(file, "missing `task` (the task's name)"))?;
        let file_ctx = |msg: String| cfg_err(file, format!("task `{name}`: {msg}"));
        if let Some(k) = m.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(file_ctx(format!("unknown key `{k}` (see docs/tasks.md)")));
        }
        // Keys the harness defines whose behaviour moeval does not reproduce: refused, never skipped.
        let set = |k: &str| {
            m.get(k)
                .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        };
        if set("unsafe_code") {
            return Err(file_ctx(
                "`unsafe_code: true`: the task executes model-written code, which moeval refuses to run"
                    .into(),
            ));
        }
        for (k, why) in [
            (
                "doc_to_image",
                "images are not supported (text models only)",
            ),
            ("doc_to_audio", "audio is not supported (text models only)"),
            ("use_prompt", "promptsource prompts are not supported"),
            (
                "custom_dataset",
                "a custom dataset callable is not supported",
            ),
        ] {
            if set(k) {
                return Err(file_ctx(format!("`{k}`: {why}")));
            }
        }
        let hook = |key: &str| -> Result<Option<Function>> {
            match m.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => Function::from_value(v).map(Some).ok_or_else(|| {
                    cfg_err(
                        file,
                        format!(
                            "task `{name}`: `{key}` must be a `!function module.name` reference"
                        ),
                    )
                }),
            }
        };
        let process_docs = hook("process_docs")?;
        let process_results = hook("process_results")?;
        let dd = data_dir.to_string_lossy();
        let subst = |s: &str| s.replace("{data_dir}", &dd);
        let dataset_path = opt_str(m, "dataset_path", file)?
            .ok_or_else(|| file_ctx("missing `dataset_path`".into()))?;
        let kwargs = m
            .get("dataset_kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut data_files = BTreeMap::new();
        match kwargs.get("data_files") {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                for (split, v) in o {
                    let files = string_list(v).ok_or_else(|| {
                        file_ctx(format!(
                            "dataset_kwargs.data_files.{split} must be a path or a list of paths"
                        ))
                    })?;
                    data_files.insert(split.clone(), files.iter().map(|f| subst(f)).collect());
                }
            }
            Some(v) => {
                let files = string_list(v).ok_or_else(|| {
                    file_ctx("dataset_kwargs.data_files must be a path, list or mapping".into())
                })?;
                data_files.insert(
                    "train".to_string(),
                    files.iter().map(|f| subst(f)).collect(),
                );
            }
        }
        let mut join_files = BTreeMap::new();
        if let Some(Value::Object(o)) = kwargs.get("join_files") {
            for (split, v) in o {
                let f = v.as_str().ok_or_else(|| {
                    file_ctx(format!("dataset_kwargs.join_files.{split} must be a path"))
                })?;
                join_files.insert(split.clone(), subst(f));
            }
        }
        let output_type = match opt_str(m, "output_type", file)?.as_deref() {
            None | Some("generate_until") => OutputType::GenerateUntil,
            Some("multiple_choice") => OutputType::MultipleChoice,
            Some("loglikelihood") => OutputType::Loglikelihood,
            Some("loglikelihood_rolling") => OutputType::LoglikelihoodRolling,
            Some(o) => return Err(file_ctx(format!("unknown output_type `{o}`"))),
        };
        let target_delimiter = opt_str(m, "target_delimiter", file)?.unwrap_or_else(|| " ".into());
        let fewshot_delimiter =
            opt_str(m, "fewshot_delimiter", file)?.unwrap_or_else(|| "\n\n".into());
        let num_fewshot = match m.get("num_fewshot") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| file_ctx("`num_fewshot` must be a non-negative integer".into()))?
                as usize,
        };
        let metric_list = match m.get("metric_list") {
            None | Some(Value::Null) => default_metrics(output_type),
            Some(Value::Array(a)) => {
                a.iter()
                    .map(|e| {
                        let mut o = e.as_object().cloned().ok_or_else(|| {
                            file_ctx("metric_list entries must be mappings".into())
                        })?;
                        let (metric, function) = match o.remove("metric") {
                            Some(Value::String(s)) => (s, None),
                            Some(v) if Function::from_value(&v).is_some() => {
                                let f = Function::from_value(&v).expect("checked");
                                (f.name.clone(), Some(f))
                            }
                            _ => {
                                return Err(file_ctx(
                                    "metric_list entry without a `metric` name".into(),
                                ))
                            }
                        };
                        let higher_is_better = match o.remove("higher_is_better") {
                            None | Some(Value::Null) => None,
                            Some(Value::Bool(b)) => Some(b),
                            Some(_) => {
                                return Err(file_ctx(format!(
                                    "metric `{metric}`: `higher_is_better` must be true or false"
                                )))
                            }
                        };
                        // The aggregation is the metric's own (a task file may name it, not change
                        // it), or a Python function.
                        let aggregation = match o.remove("aggregation") {
                            None | Some(Value::Null) => None,
                            Some(Value::String(a))
                                if a == crate::metrics::aggregation_of(&metric)
                                    || (a == "mean"
                                        && (function.is_some()
                                            || m.contains_key("process_results"))) =>
                            {
                                None
                            }
                            Some(v) if Function::from_value(&v).is_some() => {
                                Function::from_value(&v)
                            }
                            Some(a) => {
                                return Err(file_ctx(format!(
                                    "metric `{metric}`: aggregation {a} is not supported; moeval \
                                     aggregates `{metric}` with `{}` (remove the key or name that)",
                                    crate::metrics::aggregation_of(&metric)
                                )))
                            }
                        };
                        Ok(MetricSpec {
                            metric,
                            higher_is_better,
                            kwargs: o,
                            function,
                            aggregation,
                        })
                    })
                    .collect::<Result<_>>()?
            }
            Some(_) => return Err(file_ctx("`metric_list` must be a list".into())),
        };
        let generation_kwargs = match m.get("generation_kwargs") {
            None | Some(Value::Null) => (output_type == OutputType::GenerateUntil)
                .then(|| GenerationKwargs::harness_default(&fewshot_delimiter)),
            Some(Value::Object(g)) => {
                Some(parse_generation_kwargs(g, &fewshot_delimiter).map_err(file_ctx)?)
            }
            Some(_) => return Err(file_ctx("`generation_kwargs` must be a mapping".into())),
        };
        let fewshot_by = match m.get("fewshot_by") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(FewshotBy {
                field: o
                    .get("field")
                    .and_then(Value::as_str)
                    .ok_or_else(|| file_ctx("fewshot_by.field is required".into()))?
                    .to_string(),
                data_files: subst(
                    o.get("data_files")
                        .and_then(Value::as_str)
                        .ok_or_else(|| file_ctx("fewshot_by.data_files is required".into()))?,
                ),
                map: o
                    .get("map")
                    .and_then(Value::as_object)
                    .map(|mm| {
                        mm.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default(),
                n: o.get("n")
                    .and_then(Value::as_u64)
                    .unwrap_or(num_fewshot as u64) as usize,
            }),
            Some(_) => return Err(file_ctx("`fewshot_by` must be a mapping".into())),
        };
        let group_by = match m.get("group_by") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => string_list(v)
                .ok_or_else(|| file_ctx("`group_by` must be a field name or a list".into()))?,
        };
        let bias = match m.get("bias") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => {
                let get = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
                Some(BiasSpec {
                    group: get("group").ok_or_else(|| file_ctx("bias.group is required".into()))?,
                    template: get("template")
                        .ok_or_else(|| file_ctx("bias.template is required".into()))?,
                    source: get("source"),
                    metric: get("metric").unwrap_or_else(|| "acc".into()),
                    moeval_metric: get("moeval_metric"),
                    joint_with: get("joint_with"),
                })
            }
            Some(_) => return Err(file_ctx("`bias` must be a mapping".into())),
        };
        let suite = match m.get("suite") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(_) => return Err(file_ctx("`suite` must be a mapping".into())),
        };
        let doc_to_text = field(m, "doc_to_text", file)?
            .ok_or_else(|| file_ctx("missing `doc_to_text`".into()))?;
        let doc_to_target = field(m, "doc_to_target", file)?
            .ok_or_else(|| file_ctx("missing `doc_to_target`".into()))?;
        let doc_to_choice = field(m, "doc_to_choice", file)?;
        if output_type == OutputType::MultipleChoice && doc_to_choice.is_none() {
            return Err(file_ctx("multiple_choice needs `doc_to_choice`".into()));
        }
        let fewshot_split = opt_str(m, "fewshot_split", file)?;
        let gen_prefix = opt_str(m, "gen_prefix", file)?;
        let fewshot = {
            let fc = match m.get("fewshot_config") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(o)) => o.clone(),
                Some(_) => return Err(file_ctx("`fewshot_config` must be a mapping".into())),
            };
            if let Some(k) = fc.keys().find(|k| !FEWSHOT_KEYS.contains(&k.as_str())) {
                return Err(file_ctx(format!(
                    "unknown key `fewshot_config.{k}` (known: {})",
                    FEWSHOT_KEYS.join(", ")
                )));
            }
            if fc.get("gen_prefix").is_some_and(|v| !v.is_null()) {
                return Err(file_ctx(
                    "`fewshot_config.gen_prefix` is not supported yet".into(),
                ));
            }
            let sampler = match fc.get("sampler") {
                None | Some(Value::Null) => Sampler::Default,
                Some(Value::String(s)) if s == "default" => Sampler::Default,
                Some(Value::String(s)) if s == "first_n" => Sampler::FirstN,
                Some(v) => {
                    return Err(file_ctx(format!(
                        "fewshot_config.sampler {v} is not a sampler lm-evaluation-harness registers (default, first_n)"
                    )))
                }
            };
            let indices = match fc.get("fewshot_indices") {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) => Some(
                    a.iter()
                        .map(|x| x.as_u64().map(|i| i as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            file_ctx(
                                "fewshot_config.fewshot_indices must be a list of row numbers"
                                    .into(),
                            )
                        })?,
                ),
                Some(_) => {
                    return Err(file_ctx(
                        "fewshot_config.fewshot_indices must be a list of row numbers".into(),
                    ))
                }
            };
            let samples = match fc.get("samples") {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) if a.iter().all(Value::is_object) => Some(a.clone()),
                Some(v) if Function::from_value(v).is_some() => return Err(file_ctx(
                    "fewshot_config.samples as a `!function` is not supported; list the exemplars"
                        .into(),
                )),
                Some(_) => {
                    return Err(file_ctx(
                        "fewshot_config.samples must be a list of documents (mappings)".into(),
                    ))
                }
            };
            let process_docs = match fc.get("process_docs") {
                None | Some(Value::Null) => process_docs.clone(),
                Some(v) => Some(Function::from_value(v).ok_or_else(|| {
                    file_ctx("fewshot_config.process_docs must be a `!function` reference".into())
                })?),
            };
            FewshotConfig {
                sampler,
                split: opt_str(&fc, "split", file)?.or_else(|| fewshot_split.clone()),
                samples,
                indices,
                process_docs,
                doc_to_text: field(&fc, "doc_to_text", file)?
                    .unwrap_or_else(|| doc_to_text.clone()),
                doc_to_target: field(&fc, "doc_to_target", file)?
                    .unwrap_or_else(|| doc_to_target.clone()),
                doc_to_choice: field(&fc, "doc_to_choice", file)?.or_else(|| doc_to_choice.clone()),
                target_delimiter: opt_str(&fc, "target_delimiter", file)?
                    .unwrap_or_else(|| target_delimiter.clone()),
                fewshot_delimiter: opt_str(&fc, "fewshot_delimiter", file)?
                    .unwrap_or_else(|| fewshot_delimiter.clone()),
                gen_prefix: opt_str(&fc, "gen_prefix", file)?.or_else(|| gen_prefix.clone()),
            }
        };
        let repeats = match m.get("repeats") {
            None | Some(Value::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => n as usize,
                _ => {
                    return Err(file_ctx(format!(
                        "`repeats` must be an integer >= 1, not {v}"
                    )))
                }
            },
        };
        let version = m
            .get("metadata")
            .and_then(|md| md.get("version"))
            .filter(|v| !v.is_null())
            .cloned();
        let mut ignored = Vec::new();
        if set("should_decontaminate") || set("doc_to_decontamination_query") {
            ignored.push(
                "`should_decontaminate` / `doc_to_decontamination_query` are ignored: moeval runs no decontamination (as lm-evaluation-harness without --decontamination_ngrams_path)".to_string(),
            );
        }
        Ok(TaskConfig {
            tags: m.get("tag").and_then(string_list).unwrap_or_default(),
            dataset_path,
            dataset_name: opt_str(m, "dataset_name", file)?,
            dataset_kwargs: kwargs,
            data_files,
            join_files,
            training_split: opt_str(m, "training_split", file)?,
            validation_split: opt_str(m, "validation_split", file)?,
            test_split: opt_str(m, "test_split", file)?,
            fewshot_split,
            output_type,
            doc_to_text,
            doc_to_target,
            doc_to_choice,
            target_delimiter,
            fewshot_delimiter,
            num_fewshot,
            description: opt_str(m, "description", file)?,
            metric_list,
            generation_kwargs,
            fewshot_by,
            group_by,
            bias,
            suite,
            process_docs,
            process_results,
            fewshot,
            gen_prefix,
            repeats,
            filter_list: m.get("filter_list").filter(|v| !v.is_null()).cloned(),
            version,
            ignored,
            file: file.to_path_buf(),
            name,
        })
    }
}

fn default_metrics(t: OutputType) -> Vec<MetricSpec> {
    let names: &[&str] = match t {
        OutputType::MultipleChoice => &["acc", "acc_norm"],
        OutputType::Loglikelihood => &["perplexity", "acc"],
        OutputType::LoglikelihoodRolling => {
            &["word_perplexity", "byte_perplexity", "bits_per_byte"]
        }
        OutputType::GenerateUntil => &["exact_match"],
    };
    names
        .iter()
        .map(|n| MetricSpec {
            metric: n.to_string(),
            higher_is_better: None,
            kwargs: Map::new(),
            function: None,
            aggregation: None,
        })
        .collect()
}

/// Everything a [`Registry`] found, as `--tasks list` prints it (each part sorted by name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    /// (group, its file).
    pub groups: Vec<(String, PathBuf)>,
    /// (task, its file, its `output_type` as written, empty when the file gives none).
    pub tasks: Vec<(String, PathBuf, String)>,
    /// Tag names.
    pub tags: Vec<String>,
}

/// Every task, group and tag found under some directories, by name.
#[derive(Debug, Default)]
pub struct Registry {
    /// Task name -> (file, merged mapping).
    tasks: BTreeMap<String, (PathBuf, Map<String, Value>)>,
    groups: BTreeMap<String, GroupConfig>,
    tags: BTreeMap<String, Vec<String>>,
    /// Files that could not be parsed, reported when a name is not found.
    broken: Vec<(PathBuf, String)>,
}

impl Registry {
    /// Scans directories (recursively) for `*.yaml` / `*.yml` task and group files.
    pub fn scan(dirs: &[PathBuf]) -> Result<Registry> {
        let mut reg = Registry::default();
        for d in dirs {
            if !d.is_dir() {
                return Err(cfg_err(
                    d,
                    "not a directory (--include-path needs a folder of task files)",
                ));
            }
            let mut files = Vec::new();
            walk(d, &mut files).map_err(io_err(format!("{}", d.display())))?;
            files.sort();
            // Parsing is independent per file (lm-eval's library has ~14,000); registering stays in
            // file order, so later files win exactly as before.
            use rayon::prelude::*;
            let parsed: Vec<_> = files.par_iter().map(|f| read_yaml(f)).collect();
            for (f, m) in files.into_iter().zip(parsed) {
                match m {
                    Ok(m) => reg.add(f, m),
                    Err(e) => reg.broken.push((f, e.to_string())),
                }
            }
        }
        Ok(reg)
    }

    fn add(&mut self, file: PathBuf, m: Map<String, Value>) {
        let group_name = m.get("group").and_then(Value::as_str).map(str::to_string);
        match (group_name, m.get("task")) {
            (Some(g), Some(Value::Array(members))) => {
                let mut tasks = Vec::new();
                for (i, mem) in members.iter().enumerate() {
                    match mem {
                        Value::String(s) => tasks.push(s.clone()),
                        Value::Object(o) => {
                            // An inline task: its own mapping, possibly overriding a named task.
                            let mut o = o.clone();
                            let name = o.get("task").and_then(Value::as_str).map(str::to_string);
                            let Some(name) = name else {
                                self.broken.push((
                                    file.clone(),
                                    format!("group `{g}` member {i} has no `task`"),
                                ));
                                continue;
                            };
                            if let Some((_, base)) = self.tasks.get(&name) {
                                let mut merged = base.clone();
                                merged.append(&mut o);
                                o = merged;
                            }
                            tasks.push(name.clone());
                            self.tasks.insert(name, (file.clone(), o));
                        }
                        _ => self.broken.push((
                            file.clone(),
                            format!("group `{g}` member {i} is not a name"),
                        )),
                    }
                }
                let aggregate = m
                    .get("aggregate_metric_list")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| {
                                Some(AggregateSpec {
                                    metric: e.get("metric")?.as_str()?.to_string(),
                                    weight_by_size: e
                                        .get("weight_by_size")
                                        .and_then(Value::as_bool)
                                        .unwrap_or(true),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.groups.insert(
                    g.clone(),
                    GroupConfig {
                        name: g,
                        file,
                        tasks,
                        aggregate,
                    },
                );
            }
            (_, Some(Value::String(t))) => {
                let t = t.clone();
                for tag in m.get("tag").and_then(string_list).unwrap_or_default() {
                    self.tags.entry(tag).or_default().push(t.clone());
                }
                // lm-evaluation-harness 0.3 files name their groups with `group` on the task itself.
                if let Some(gs) = m.get("group").and_then(string_list) {
                    for g in gs {
                        self.tags.entry(g).or_default().push(t.clone());
                    }
                }
                self.tasks.insert(t, (file, m));
            }
            // Templates meant only for `include` have no task name.
            _ => {}
        }
    }

    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Every group, task and tag found (what `lm_eval --tasks list` lists).
    pub fn listing(&self) -> Listing {
        Listing {
            groups: self
                .groups
                .values()
                .map(|g| (g.name.clone(), g.file.clone()))
                .collect(),
            tasks: self
                .tasks
                .iter()
                .map(|(name, (file, m))| {
                    let output_type = m.get("output_type").map(as_text_value).unwrap_or_default();
                    (name.clone(), file.clone(), output_type)
                })
                .collect(),
            tags: self.tags.keys().cloned().collect(),
        }
    }

    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.get(name)
    }

    /// Expands names (tasks, groups, tags; comma-separated lists allowed) into task names, in order,
    /// without duplicates.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for n in names
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            self.expand(n, &mut out, &mut seen, 0)?;
        }
        Ok(out)
    }

    fn expand(
        &self,
        name: &str,
        out: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 16 {
            return Err(Error::UnknownTask {
                name: name.into(),
                hint: " (groups nest too deeply)".into(),
            });
        }
        if self.tasks.contains_key(name) {
            if seen.insert(name.to_string()) {
                out.push(name.to_string());
            }
            return Ok(());
        }
        if let Some(g) = self.groups.get(name) {
            for t in &g.tasks {
                self.expand(t, out, seen, depth + 1)?;
            }
            return Ok(());
        }
        if let Some(ts) = self.tags.get(name) {
            for t in ts {
                self.expand(t, out, seen, depth + 1)?;
            }
            return Ok(());
        }
        let mut hint = String::new();
        let close: Vec<&str> = self
            .tasks
            .keys()
            .chain(self.groups.keys())
            .filter(|k| k.contains(name) || name.contains(k.as_str()))
            .map(String::as_str)
            .take(5)
            .collect();
        if !close.is_empty() {
            hint.push_str(&format!("; similar names: {}", close.join(", ")));
        }
        if let Some((f, e)) = self.broken.first() {
            hint.push_str(&format!(
                "; {} task file(s) could not be read, e.g. {}: {e}",
                self.broken.len(),
                f.display()
            ));
        }
        if hint.is_empty() {
            hint = "; pass the folder of its YAML file with --include-path".into();
        }
        Err(Error::UnknownTask {
            name: name.into(),
            hint,
        })
    }

    /// The parsed configuration of a task.
    pub fn task_config(&self, name: &str, data_dir: &Path) -> Result<TaskConfig> {
        let (file, m) = self.tasks.get(name).ok_or_else(|| Error::UnknownTask {
            name: name.into(),
            hint: String::new(),
        })?;
        TaskConfig::from_map(m, file, data_dir)
    }

    /// Groups containing every one of `tasks`' members that ran, for aggregate metrics.
    pub fn groups(&self) -> impl Iterator<Item = &GroupConfig> {
        self.groups.values()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    Ok(())
}

/// A YAML scalar as written (strings unquoted).
fn as_text_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
