//! Loading a task: its documents (read from its data files, or built by its suite) and its
//! few-shot pool, as lm-evaluation-harness picks them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::TaskConfig;
use crate::dataset::Doc;
use crate::dataset::{self, as_text, Source};
use crate::error::{Error, Result};
use crate::hooks::{Items, Site};
use crate::task::{LoadOptions, Task};
use crate::template;

impl Task {
    /// Reads a task's data and prepares its few-shot pool.
    pub fn load(mut config: TaskConfig, opts: &LoadOptions) -> Result<Task> {
        config.override_generation(&opts.gen_kwargs)?;
        let cwd = PathBuf::from(".");
        let dir = config
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cwd.clone());
        let bases: Vec<&Path> = vec![&cwd, &dir];
        // Scoring and filter hooks must resolve before any document is answered (the others are
        // called while loading, which reports them).
        for (field, f) in crate::check::hook_functions(&config)? {
            if matches!(field, "process_results" | "metric_list" | "filter_list") {
                crate::check::resolve(&f).map_err(|msg| Error::Config {
                    file: config.file.clone(),
                    msg: format!("task `{}`, field `{field}`: {msg}", config.name),
                })?;
            }
        }
        // `process_docs` runs on each split as it is read, before `limit`, as the harness does.
        let process = |docs: Vec<Doc>, split: &str| -> Result<Vec<Doc>> {
            let Some(f) = &config.process_docs else {
                return Ok(docs);
            };
            let label = format!("split `{split}`");
            let site = Site {
                file: &config.file,
                task: &config.name,
                field: "process_docs",
                items: Items::Whole(&label),
            };
            opts.hooks.process_docs(f, &docs, &site)
        };
        let split = config
            .test_split
            .clone()
            .or_else(|| config.validation_split.clone())
            .ok_or_else(|| Error::Config {
                file: config.file.clone(),
                msg: format!(
                    "task `{}`: needs `test_split` or `validation_split`",
                    config.name
                ),
            })?;
        let mut docs = match &config.suite {
            // A suite builds its documents, few-shot exemplars included, itself (suites/).
            Some(_) => crate::suites::load_docs(&config, &split, &bases, opts)?,
            None => dataset::read_split(&config, &split, &bases)?.ok_or_else(|| Error::Config {
            file: config.file.clone(),
            msg: format!(
                "task `{}`: no data file for split `{split}` in dataset_kwargs.data_files (has: {})",
                config.name,
                config.data_files.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?,
        };
        docs = process(docs, &split)?;
        let features: HashSet<String> = docs.iter().flat_map(|d| d.keys().cloned()).collect();
        let num_fewshot = if config.suite.is_some() {
            0
        } else {
            opts.num_fewshot.unwrap_or(config.num_fewshot)
        };
        // A few-shot pool read from the evaluated split reuses its processed documents.
        let processed_split = (config.process_docs.is_some()
            && num_fewshot > 0
            && opts.limit.is_some_and(|l| l < docs.len()))
        .then(|| docs.clone());
        if let Some(l) = opts.limit {
            docs.truncate(l);
        }
        let mut fewshot_docs = Vec::new();
        let mut fewshot_by = HashMap::new();
        if num_fewshot > 0 {
            if let Some(fb) = &config.fewshot_by {
                for d in &docs {
                    let v = d.get(&fb.field).map(as_text).unwrap_or_default();
                    if fewshot_by.contains_key(&v) {
                        continue;
                    }
                    let key = fb.map.get(&v).cloned().unwrap_or_else(|| v.clone());
                    let path = fb.data_files.replace("{value}", &key);
                    let mut ex = dataset::read_lenient_csv(&Source::parse(&path, &bases))?;
                    ex.truncate(fb.n.min(num_fewshot));
                    // Exemplars share the document's field value, so templates can branch on it.
                    for e in &mut ex {
                        e.entry(fb.field.clone())
                            .or_insert_with(|| Value::String(v.clone()));
                    }
                    fewshot_by.insert(v, ex);
                }
            } else if let (None, Some(samples)) = (&config.fewshot.split, &config.fewshot.samples) {
                // `fewshot_config.samples`: the exemplars are given in the task file.
                fewshot_docs = samples
                    .iter()
                    .filter_map(|v| v.as_object().cloned())
                    .collect();
            } else {
                // The harness's fallback order: the few-shot split, else train, validation, test.
                let candidates = [
                    config.fewshot.split.clone(),
                    config.training_split.clone(),
                    config.validation_split.clone(),
                    config.test_split.clone(),
                ];
                for c in candidates.into_iter().flatten() {
                    if config.process_docs.is_some() && c == split {
                        fewshot_docs = processed_split.unwrap_or_else(|| docs.clone());
                        break;
                    }
                    if let Some(d) = dataset::read_split(&config, &c, &bases)? {
                        fewshot_docs = process(d, &c)?;
                        break;
                    }
                    if config.fewshot.split.as_deref() == Some(c.as_str()) {
                        return Err(Error::Config {
                            file: config.file.clone(),
                            msg: format!(
                                "task `{}`: no data file for fewshot_split `{c}`",
                                config.name
                            ),
                        });
                    }
                }
                if let Some(idx) = &config.fewshot.indices {
                    fewshot_docs = idx
                        .iter()
                        .map(|&i| {
                            fewshot_docs.get(i).cloned().ok_or_else(|| Error::Config {
                                file: config.file.clone(),
                                msg: format!(
                                    "task `{}`: fewshot_config.fewshot_indices names row {i}, but the few-shot split has {} rows",
                                    config.name,
                                    fewshot_docs.len()
                                ),
                            })
                        })
                        .collect::<Result<_>>()?;
                }
            }
        }
        let filters =
            crate::filters::parse_filter_list(config.filter_list.as_ref()).map_err(|e| {
                Error::Config {
                    file: config.file.clone(),
                    msg: format!("task `{}`, field `filter_list`: {e}", config.name),
                }
            })?;
        if config.filter_list.is_some()
            && config.output_type != crate::config::OutputType::GenerateUntil
        {
            return Err(Error::Config {
                file: config.file.clone(),
                msg: format!(
                    "task `{}`: filter_list is supported on generate_until tasks only (this one is {:?})",
                    config.name, config.output_type
                ),
            });
        }
        // ROUGE over a subword tokenizer's tokens (SNI's cross-lingual track): loaded once here.
        let mut rouge_tokens = HashMap::new();
        for m in &config.metric_list {
            let Some(v) = m.kwargs.get("tokenizer") else {
                continue;
            };
            let err = |msg: String| Error::Config {
                file: config.file.clone(),
                msg: format!("task `{}`, metric `{}`: {msg}", config.name, m.metric),
            };
            if crate::rouge::Rouge::parse(&m.metric).is_none() {
                return Err(err(
                    "`tokenizer` is an option of the ROUGE metrics only".into()
                ));
            }
            if m.kwargs.contains_key("use_stemmer") {
                return Err(err(
                    "`use_stemmer` does nothing with `tokenizer` (rouge_score stems its own \
                     tokeniser's tokens only); remove one"
                        .into(),
                ));
            }
            let raw = v.as_str().ok_or_else(|| {
                err("`tokenizer` must be a path to a tokenizer.json or a model folder".into())
            })?;
            let path = crate::dataset::Source::parse(raw, &bases).path;
            let t = crate::rouge::SubwordTokens::load(&path).map_err(err)?;
            rouge_tokens.insert(raw.to_string(), t);
        }
        let mut task = Task {
            rouge_tokens,
            filters,
            env: template::environment(),
            features,
            docs,
            fewshot_docs,
            fewshot_by,
            num_fewshot,
            config,
            hooks: opts.hooks.clone(),
            hooked: Default::default(),
        };
        // `!function` fields run once, in one batch per field, over the documents evaluated.
        let docs: Vec<&Doc> = task.docs.iter().collect();
        let values = task.hook_values(&docs, "doc", &[])?;
        task.hooked.docs = values;
        Ok(task)
    }
}
