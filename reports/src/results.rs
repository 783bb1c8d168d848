//! Reading run directories back: `manifest.json`, `samples.parquet`, `metrics.parquet`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::tables::SAMPLE_COLUMNS;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{file_err, io, Result};
use crate::manifest::Manifest;

/// One row of `samples.parquet`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SampleRow {
    pub run_id: String,
    pub model_id: String,
    pub weights_hash: String,
    pub mask: String,
    pub task: String,
    pub doc_id: i64,
    pub prompt_hash: String,
    pub prompt: String,
    pub choice_loglikelihoods: Option<Vec<f64>>,
    pub loglikelihood: Option<f64>,
    pub prediction: Option<String>,
    pub target: String,
    /// The requests' arguments as lm-evaluation-harness logs them (JSON); empty in runs written before
    /// the column existed.
    pub arguments: String,
    /// Group attributes (string columns after the fixed ones).
    pub attributes: BTreeMap<String, String>,
    /// Per-sample metric values (double columns after the fixed ones), in column order.
    pub metrics: Vec<(String, f64)>,
}

/// One row of `metrics.parquet`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricRow {
    pub run_id: String,
    pub model_id: String,
    pub weights_hash: String,
    pub mask: String,
    pub experts: String,
    pub opted_out: String,
    /// Retrieval settings (`none` without a datastore).
    pub retrieval: String,
    pub task: String,
    pub metric: String,
    pub value: Option<f64>,
    pub stderr: Option<f64>,
    pub n: i64,
    /// As the run recorded it from the task file; runs older than the column get the metric's default
    /// ([`tasks::metrics::higher_is_better`]).
    pub higher_is_better: bool,
    /// lm-evaluation-harness's name of the metric's aggregation, for metrics the task configures.
    pub aggregation: Option<String>,
}

/// A run directory read back.
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub samples: Vec<SampleRow>,
    pub metrics: Vec<MetricRow>,
}

impl Run {
    /// Whether larger values of a task's metric are better, as the run recorded it (the metric's
    /// default when the run has no row for it).
    pub fn higher_is_better(&self, task: &str, metric: &str) -> bool {
        self.metrics
            .iter()
            .find(|m| m.task == task && m.metric == metric)
            .map_or_else(
                || tasks::metrics::higher_is_better(metric),
                |m| m.higher_is_better,
            )
    }

    /// The run's mask variants in the order they were run (`full` first).
    pub fn masks(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.metrics {
            if !out.contains(&m.mask) {
                out.push(m.mask.clone());
            }
        }
        out
    }

    /// The samples of one mask (the first run when `None`), restricted to `tasks` unless empty:
    /// what `moeval compare` pairs. Returns the mask chosen.
    pub fn samples_of(
        &self,
        mask: Option<&str>,
        tasks: &[String],
    ) -> Result<(String, Vec<&SampleRow>)> {
        let masks = self.masks();
        let m = match mask {
            Some(m) if !masks.iter().any(|x| x == m) => {
                return Err(crate::error::Error::Invalid(format!(
                    "{}: no mask `{m}` (has {})",
                    self.dir.display(),
                    masks.join(", ")
                )))
            }
            Some(m) => m.to_string(),
            None => masks.first().cloned().unwrap_or_default(),
        };
        let rows = self
            .samples
            .iter()
            .filter(|s| s.mask == m && (tasks.is_empty() || tasks.contains(&s.task)))
            .collect();
        Ok((m, rows))
    }
}

/// Reads every record batch of a Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| file_err(path, e))?
        .build()
        .map_err(|e| file_err(path, e))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))
}

struct Cols<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
}

impl Cols<'_> {
    fn col(&self, name: &str) -> Result<&dyn Array> {
        self.batch
            .column_by_name(name)
            .map(|c| c.as_ref())
            .ok_or_else(|| file_err(self.path, format!("no column `{name}`")))
    }
    fn strings(&self, name: &str) -> Result<Vec<Option<String>>> {
        let c = self.col(name)?;
        let s = c
            .as_string_opt::<i32>()
            .ok_or_else(|| file_err(self.path, format!("column `{name}` is not a string")))?;
        Ok(s.iter().map(|v| v.map(str::to_string)).collect())
    }
    fn req_strings(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .strings(name)?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect())
    }
    fn floats(&self, name: &str) -> Result<Vec<Option<f64>>> {
        let c = self.col(name)?;
        let f = c
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| file_err(self.path, format!("column `{name}` is not a double")))?;
        Ok(f.iter().collect())
    }
    fn has(&self, name: &str) -> bool {
        self.batch.column_by_name(name).is_some()
    }
    fn bools(&self, name: &str) -> Result<Vec<Option<bool>>> {
        let c = self.col(name)?;
        let b = c
            .as_boolean_opt()
            .ok_or_else(|| file_err(self.path, format!("column `{name}` is not a boolean")))?;
        Ok(b.iter().collect())
    }
    fn ints(&self, name: &str) -> Result<Vec<i64>> {
        let c = self.col(name)?;
        let f = c
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| file_err(self.path, format!("column `{name}` is not an int64")))?;
        Ok(f.iter().map(Option::unwrap_or_default).collect())
    }
}

/// Reads `samples.parquet`.
pub fn read_samples(path: &Path) -> Result<Vec<SampleRow>> {
    let mut out = Vec::new();
    for batch in read_parquet(path)? {
        let c = Cols {
            path,
            batch: &batch,
        };
        let n = batch.num_rows();
        let s = |name| c.req_strings(name);
        let (run, model, wh, mask, task, ph, prompt, target) = (
            s("run_id")?,
            s("model_id")?,
            s("weights_hash")?,
            s("mask")?,
            s("task")?,
            s("prompt_hash")?,
            s("prompt")?,
            s("target")?,
        );
        let arguments = match batch.schema().field_with_name("arguments") {
            Ok(_) => c.strings("arguments")?,
            Err(_) => vec![None; n],
        };
        let doc = c.ints("doc_id")?;
        let ll = c.floats("loglikelihood")?;
        let pred = c.strings("prediction")?;
        let choices = c
            .col("choice_loglikelihoods")?
            .as_list_opt::<i32>()
            .ok_or_else(|| file_err(path, "column `choice_loglikelihoods` is not a list"))?;
        let mut attrs: Vec<(String, Vec<Option<String>>)> = Vec::new();
        let mut metrics: Vec<(String, Vec<Option<f64>>)> = Vec::new();
        for f in batch.schema().fields() {
            if SAMPLE_COLUMNS.contains(&f.name().as_str()) {
                continue;
            }
            match f.data_type() {
                DataType::Utf8 => attrs.push((f.name().clone(), c.strings(f.name())?)),
                DataType::Float64 => metrics.push((f.name().clone(), c.floats(f.name())?)),
                _ => {}
            }
        }
        for i in 0..n {
            let cl = (!choices.is_null(i)).then(|| {
                let v = choices.value(i);
                v.as_primitive::<Float64Type>()
                    .iter()
                    .map(|x| x.unwrap_or(f64::NAN))
                    .collect()
            });
            out.push(SampleRow {
                run_id: run[i].clone(),
                model_id: model[i].clone(),
                weights_hash: wh[i].clone(),
                mask: mask[i].clone(),
                task: task[i].clone(),
                doc_id: doc[i],
                prompt_hash: ph[i].clone(),
                prompt: prompt[i].clone(),
                choice_loglikelihoods: cl,
                loglikelihood: ll[i],
                prediction: pred[i].clone(),
                target: target[i].clone(),
                arguments: arguments[i].clone().unwrap_or_default(),
                attributes: attrs
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v[i].clone()?)))
                    .collect(),
                metrics: metrics
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v[i]?)))
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Reads `metrics.parquet`.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>> {
    let mut out = Vec::new();
    for batch in read_parquet(path)? {
        let c = Cols {
            path,
            batch: &batch,
        };
        let s = |name| c.req_strings(name);
        let (run, model, wh, mask, experts, opted, task, metric) = (
            s("run_id")?,
            s("model_id")?,
            s("weights_hash")?,
            s("mask")?,
            s("experts")?,
            s("opted_out")?,
            s("task")?,
            s("metric")?,
        );
        let retrieval = s("retrieval")?;
        let (value, stderr, n) = (c.floats("value")?, c.floats("stderr")?, c.ints("n")?);
        // Columns added later: absent in older runs.
        let hib = if c.has("higher_is_better") {
            c.bools("higher_is_better")?
        } else {
            vec![None; batch.num_rows()]
        };
        let aggregation = if c.has("aggregation") {
            c.strings("aggregation")?
        } else {
            vec![None; batch.num_rows()]
        };
        for i in 0..batch.num_rows() {
            out.push(MetricRow {
                run_id: run[i].clone(),
                model_id: model[i].clone(),
                weights_hash: wh[i].clone(),
                mask: mask[i].clone(),
                experts: experts[i].clone(),
                opted_out: opted[i].clone(),
                retrieval: retrieval[i].clone(),
                task: task[i].clone(),
                metric: metric[i].clone(),
                value: value[i],
                stderr: stderr[i],
                n: n[i],
                higher_is_better: hib[i]
                    .unwrap_or_else(|| tasks::metrics::higher_is_better(&metric[i])),
                aggregation: aggregation[i].clone(),
            });
        }
    }
    Ok(out)
}

/// Reads a complete run directory.
pub fn load_run(dir: &Path) -> Result<Run> {
    let manifest = Manifest::read(&dir.join("manifest.json"))?;
    if manifest.status != "complete" {
        return Err(file_err(
            &dir.join("manifest.json"),
            format!(
                "run `{}` is {} (resume it with `moeval eval --resume {}`)",
                manifest.run_id,
                manifest.status,
                dir.display()
            ),
        ));
    }
    Ok(Run {
        dir: dir.to_path_buf(),
        samples: read_samples(&dir.join("samples.parquet"))?,
        metrics: read_metrics(&dir.join("metrics.parquet"))?,
        manifest,
    })
}

/// Shard folders (`shard=I-of-N`) of a run directory, sorted.
pub fn shard_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("shard="))
        })
        .collect();
    v.sort();
    v
}

/// Run directories under `path`: the folder itself when it is a run (it has `manifest.json` or
/// shard folders), else its sub-folders that are.
pub fn discover_runs(path: &Path) -> Result<Vec<PathBuf>> {
    let is_run = |p: &Path| p.join("manifest.json").is_file() || !shard_dirs(p).is_empty();
    if is_run(path) {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && is_run(p))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(file_err(
            path,
            "no run directories here (looked for manifest.json)",
        ));
    }
    Ok(v)
}
