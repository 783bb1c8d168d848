//! Local dataset readers: JSON / JSON Lines, CSV and Parquet files, optionally members of a zip
//! archive (`zip://MEMBER::ARCHIVE`, the fsspec form Hugging Face `datasets` accepts).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};

use crate::config::TaskConfig;
use crate::error::{Error, Result};
use crate::hub;

/// One row of a dataset: column name -> value.
pub type Doc = Map<String, Value>;

pub use crate::format::Format;

/// Where the bytes of a data file are: a plain path or a zip member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub member: Option<String>,
}

impl Source {
    /// Parses `path` or `zip://member::archive.zip`; relative paths are resolved against `base` dirs in
    /// order (the first that exists wins; the first one otherwise, for the error message).
    pub fn parse(spec: &str, bases: &[&Path]) -> Source {
        let (member, path) = match spec.strip_prefix("zip://").and_then(|r| r.split_once("::")) {
            Some((m, p)) => (Some(m.to_string()), p),
            None => (None, spec),
        };
        let p = Path::new(path);
        let path = if p.is_absolute() || bases.is_empty() {
            p.to_path_buf()
        } else {
            bases
                .iter()
                .map(|b| b.join(p))
                .find(|c| c.exists())
                .unwrap_or_else(|| bases[0].join(p))
        };
        Source { path, member }
    }

    fn display(&self) -> PathBuf {
        match &self.member {
            Some(m) => PathBuf::from(format!("{}::{m}", self.path.display())),
            None => self.path.clone(),
        }
    }

    fn read_bytes(&self) -> Result<Vec<u8>> {
        let err = |msg: String| Error::Data {
            path: self.display(),
            msg,
        };
        let file = std::fs::File::open(&self.path).map_err(|e| err(format!("cannot open: {e}")))?;
        match &self.member {
            None => {
                let mut buf = Vec::new();
                std::io::BufReader::new(file)
                    .read_to_end(&mut buf)
                    .map_err(|e| err(e.to_string()))?;
                Ok(buf)
            }
            Some(m) => {
                let mut zip = zip::ZipArchive::new(file).map_err(|e| err(e.to_string()))?;
                let mut entry = zip
                    .by_name(m)
                    .map_err(|e| err(format!("no member `{m}` in the archive: {e}")))?;
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| err(e.to_string()))?;
                Ok(buf)
            }
        }
    }
}

/// Reads every row of a data file.
pub fn read(source: &Source, format: Format) -> Result<Vec<Doc>> {
    let bytes = source.read_bytes()?;
    let err = |msg: String| Error::Data {
        path: source.display(),
        msg,
    };
    match format {
        Format::Json => read_json(&bytes).map_err(err),
        Format::Csv => read_csv(&bytes).map_err(err),
        Format::Parquet => read_parquet(bytes).map_err(err),
    }
}

fn read_json(bytes: &[u8]) -> Result<Vec<Doc>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let trimmed = text.trim_start();
    // A JSON array of objects, or JSON Lines.
    if trimmed.starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
        return rows
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(m),
                _ => Err(format!("element {i} is not an object")),
            })
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(format!("line {}: not a JSON object", i + 1)),
            Err(e) => Err(format!("line {}: {e}", i + 1)),
        })
        .collect()
}

/// CSV with a header. Like pandas (which Hugging Face `datasets` uses), a column whose values all
/// parse as integers becomes integers, else floats, else strings; empty cells are null.
fn read_csv(bytes: &[u8]) -> Result<Vec<Doc>, String> {
    let mut rdr = csv::ReaderBuilder::new().from_reader(bytes);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| e.to_string())?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| format!("row {}: {e}", i + 1))?;
        rows.push(rec.iter().map(str::to_string).collect());
    }
    let kinds: Vec<u8> = (0..header.len())
        .map(|c| {
            let vals = rows
                .iter()
                .filter_map(|r| r.get(c))
                .filter(|v| !v.is_empty());
            let mut kind = 0u8; // 0 int, 1 float, 2 string
            for v in vals {
                if kind == 0 && v.parse::<i64>().is_err() {
                    kind = 1;
                }
                if kind == 1 && v.parse::<f64>().is_err() {
                    kind = 2;
                    break;
                }
            }
            kind
        })
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            header
                .iter()
                .enumerate()
                .map(|(c, h)| {
                    let v = r.get(c).map(String::as_str).unwrap_or("");
                    let val = if v.is_empty() {
                        Value::Null
                    } else {
                        match kinds[c] {
                            0 => v.parse::<i64>().map(Value::from).unwrap_or(Value::Null),
                            1 => v
                                .parse::<f64>()
                                .ok()
                                .and_then(serde_json::Number::from_f64)
                                .map(Value::Number)
                                .unwrap_or(Value::Null),
                            _ => Value::String(v.to_string()),
                        }
                    };
                    (h.clone(), val)
                })
                .collect()
        })
        .collect())
}

fn read_parquet(bytes: Vec<u8>) -> Result<Vec<Doc>, String> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| e.to_string())?;
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            let mut doc = Map::new();
            for (f, col) in schema.fields().iter().zip(batch.columns()) {
                doc.insert(f.name().clone(), arrow_value(col, row)?);
            }
            out.push(doc);
        }
    }
    Ok(out)
}

fn arrow_value(col: &Arc<dyn Array>, row: usize) -> Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    if col.is_null(row) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(row)),
        DataType::Utf8View => Value::from(col.as_string_view().value(row)),
        DataType::Boolean => Value::from(col.as_boolean().value(row)),
        DataType::Int8 => Value::from(col.as_primitive::<Int8Type>().value(row)),
        DataType::Int16 => Value::from(col.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => Value::from(col.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => Value::from(col.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Value::from(col.as_primitive::<UInt8Type>().value(row)),
        DataType::UInt16 => Value::from(col.as_primitive::<UInt16Type>().value(row)),
        DataType::UInt32 => Value::from(col.as_primitive::<UInt32Type>().value(row)),
        DataType::UInt64 => Value::from(col.as_primitive::<UInt64Type>().value(row)),
        DataType::Float32 => Value::from(col.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => Value::from(col.as_primitive::<Float64Type>().value(row)),
        DataType::List(_) => {
            let inner = col.as_list::<i32>().value(row);
            Value::Array(
                (0..inner.len())
                    .map(|i| arrow_value(&inner, i))
                    .collect::<Result<_, _>>()?,
            )
        }
        DataType::LargeList(_) => {
            let inner = col.as_list::<i64>().value(row);
            Value::Array(
                (0..inner.len())
                    .map(|i| arrow_value(&inner, i))
                    .collect::<Result<_, _>>()?,
            )
        }
        DataType::Struct(fields) => {
            let s = col.as_struct();
            let mut m = Map::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), arrow_value(c, row)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported Parquet column type {other}")),
    })
}

/// CSV as CALM's reference code reads its few-shot exemplar files (Python's `csv.reader` with
/// `skipinitialspace=True`, so prompts built from them are byte-identical): spaces before a field are
/// skipped, quoted fields keep their spaces and may span lines, and characters after a closing quote
/// are kept in the field up to the next comma. The reference takes columns by position with the
/// answer last, so a row shorter than the header keeps its last cell in the last column.
pub fn read_lenient_csv(source: &Source) -> Result<Vec<Doc>> {
    let bytes = source.read_bytes()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut rows = python_csv_rows(&text).into_iter();
    let Some(header) = rows.next() else {
        return Ok(Vec::new());
    };
    Ok(rows
        .map(|cells| {
            let n = cells.len().min(header.len());
            let mut doc: Doc = Map::new();
            for (h, c) in header.iter().zip(&cells[..n.saturating_sub(1)]) {
                doc.insert(h.clone(), Value::String(c.clone()));
            }
            if let (Some(h), Some(c)) = (header.last(), cells.last()) {
                doc.insert(h.clone(), Value::String(c.clone()));
            }
            doc
        })
        .collect())
}

/// The rows of Python's `csv.reader(skipinitialspace=True)` (excel dialect, not strict); blank
/// lines are dropped.
fn python_csv_rows(text: &str) -> Vec<Vec<String>> {
    #[derive(PartialEq)]
    enum St {
        StartField,
        InField,
        Quoted,
        QuoteInQuoted,
    }
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut st = St::StartField;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let eol = c == '\n' || c == '\r';
        match st {
            St::Quoted if c == '"' => st = St::QuoteInQuoted,
            St::Quoted => field.push(c),
            St::QuoteInQuoted if c == '"' => {
                field.push('"');
                st = St::Quoted;
            }
            St::StartField if !eol && c == '"' => st = St::Quoted,
            St::StartField if c == ' ' => {}
            _ if c == ',' => {
                row.push(std::mem::take(&mut field));
                st = St::StartField;
            }
            _ if eol => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                if !(row.is_empty() && field.is_empty() && st == St::StartField) {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                st = St::StartField;
            }
            _ => {
                field.push(c);
                st = St::InField;
            }
        }
    }
    if !(row.is_empty() && field.is_empty() && st == St::StartField) {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// The documents of a split: from `dataset_kwargs.data_files` when `dataset_path` names a format
/// (`json`, `csv`, `parquet`), else from a Hugging Face Hub dataset in the local cache or a local
/// folder laid out like one ([`crate::hub`]); joined by position with the split's `join_files`.
/// `None` when a format task names no file for the split.
pub(crate) fn read_split(
    cfg: &TaskConfig,
    split: &str,
    bases: &[&Path],
) -> Result<Option<Vec<Doc>>> {
    let mut docs = Vec::new();
    match Format::from_dataset_path(&cfg.dataset_path) {
        Some(format) => {
            let Some(files) = cfg.data_files.get(split) else {
                return Ok(None);
            };
            for f in files {
                docs.extend(read(&Source::parse(f, bases), format)?);
            }
        }
        None => {
            let found = find_dataset(cfg, split, bases)?;
            for p in &found.paths {
                docs.extend(read(
                    &Source {
                        path: p.clone(),
                        member: None,
                    },
                    found.format,
                )?);
            }
        }
    }
    if let Some(j) = cfg.join_files.get(split) {
        let src = Source::parse(j, bases);
        let extra = read(&src, Format::Csv)?;
        if extra.len() != docs.len() {
            return Err(Error::Data {
                path: src.path,
                msg: format!(
                    "join file has {} rows but split `{split}` has {} (rows are joined by position)",
                    extra.len(),
                    docs.len()
                ),
            });
        }
        for (i, (d, e)) in docs.iter_mut().zip(extra).enumerate() {
            for (k, v) in e {
                match d.get(&k) {
                    Some(old) if !same_value(old, &v) => {
                        return Err(Error::Data {
                            path: src.path.clone(),
                            msg: format!(
                                "row {i}: column `{k}` is {v} here but {old} in the data file"
                            ),
                        })
                    }
                    _ => {
                        d.insert(k, v);
                    }
                }
            }
        }
    }
    Ok(Some(docs))
}

/// Where a task that names no file format reads `split`: a local folder laid out like a Hub
/// repository (relative to the working directory, then the YAML file's folder), else a Hub
/// repository (`name` or `owner/name`) in the local Hugging Face cache.
pub fn find_dataset(cfg: &TaskConfig, split: &str, bases: &[&Path]) -> Result<hub::Found> {
    let d = hub::DatasetRef::of_task(cfg).ok_or_else(|| Error::Config {
        file: cfg.file.clone(),
        msg: format!(
            "task `{}`: dataset_path `{}` reads dataset_kwargs.data_files",
            cfg.name, cfg.dataset_path
        ),
    })?;
    let local = Source::parse(&cfg.dataset_path, bases).path;
    if local.is_dir() {
        return hub::find_local(&local, &d, split);
    }
    let is_repo_id = !Path::new(&cfg.dataset_path).is_absolute()
        && cfg.dataset_path.matches('/').count() <= 1
        && !cfg.dataset_path.is_empty();
    if !is_repo_id {
        return Err(Error::Config {
            file: cfg.file.clone(),
            msg: format!(
                "task `{}`: dataset_path `{}` is neither a file format (json, csv, parquet), a folder, nor a Hub dataset (`name` or `owner/name`)",
                cfg.name, cfg.dataset_path
            ),
        });
    }
    hub::find(&hub::cache_root(), &d, split).map_err(|e| match e {
        Error::HubMissing(mut m) => {
            m.task = Some(cfg.name.clone());
            Error::HubMissing(m)
        }
        other => other,
    })
}

/// The files a task's splits read (data files and join files; for a Hub dataset, its snapshot
/// files in the cache), for recording with a run. Files that cannot be found are left out.
pub fn data_paths(cfg: &TaskConfig, bases: &[&Path]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = if Format::from_dataset_path(&cfg.dataset_path).is_some() {
        cfg.data_files
            .values()
            .flatten()
            .map(|s| Source::parse(s, bases).path)
            .collect()
    } else {
        hub::task_splits(cfg)
            .iter()
            .filter_map(|s| find_dataset(cfg, s, bases).ok())
            .flat_map(|f| f.paths)
            .collect()
    };
    paths.extend(
        cfg.join_files
            .values()
            .map(|s| Source::parse(s, bases).path),
    );
    paths.sort();
    paths.dedup();
    paths
}

/// Equality across CSV's inferred types (a join column `1` equals a JSON `"1"`).
fn same_value(a: &Value, b: &Value) -> bool {
    a == b || as_text(a) == as_text(b)
}

/// A value as text, the way Python's `str` shows strings and numbers.
pub(crate) fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exemplar_csv_reads_like_python_csv_with_skipinitialspace() {
        // Expected rows: Python's csv.reader(io.StringIO(text), skipinitialspace=True).
        let text = "a, b,c\n\"x, y\", \" z\" ,w \n\"p\". \"q\", r,\"s\"\"t\"\n\n\"m\nn\",o,\n";
        let rows = python_csv_rows(text);
        let want: Vec<Vec<&str>> = vec![
            vec!["a", "b", "c"],
            vec!["x, y", " z ", "w "],
            vec!["p. \"q\"", "r", "s\"t"],
            vec!["m\nn", "o", ""],
        ];
        assert_eq!(rows, want);
    }

    #[test]
    fn csv_infers_column_types_like_pandas() {
        let docs = read_csv(b"a,b,c\n1,x,1.5\n2,,2\n").unwrap();
        assert_eq!(docs[0]["a"], Value::from(1));
        assert_eq!(docs[1]["b"], Value::Null);
        assert_eq!(docs[1]["c"], Value::from(2.0));
    }
}
