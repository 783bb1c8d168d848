//! Input rows from JSON Lines or Parquet files, streamed (a corpus larger than memory passes through).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use crate::{Error, Result};

/// Which fields hold what.
#[derive(Clone, Debug)]
pub(crate) struct Fields<'a> {
    pub text: &'a str,
    pub owner: &'a str,
    pub license: &'a str,
    pub id: &'a str,
}

/// A document as read from the input.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    /// 1-based line (JSON Lines) or row (Parquet) number.
    pub line: u64,
    pub doc_id: String,
    pub text: String,
    pub owner: String,
    pub license: String,
}

/// A row, or why it cannot be used (with its 1-based line or row number).
pub(crate) enum Outcome {
    Row(Row),
    Malformed { line: u64, reason: String },
}

/// Streams the rows of `path` into `sink`; `progress` receives bytes (approximately, for Parquet) read.
pub(crate) fn read(
    path: &Path,
    fields: &Fields,
    sink: &mut dyn FnMut(Outcome) -> Result<()>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "json" | "ndjson" => read_jsonl(path, fields, sink, progress),
        "parquet" => read_parquet(path, fields, sink, progress),
        _ => Err(Error::Input {
            path: path.to_path_buf(),
            message: "unknown input format: use .jsonl (JSON Lines) or .parquet".into(),
        }),
    }
}

/// The document id of a row without an id field: file name and line.
fn default_id(path: &Path, line: u64) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    format!("{name}:{line}")
}

fn read_jsonl(
    path: &Path,
    fields: &Fields,
    sink: &mut dyn FnMut(Outcome) -> Result<()>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let file = File::open(path).map_err(Error::io(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(Error::io(path))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        progress(n as u64);
        let outcome = match std::str::from_utf8(&buf) {
            Err(e) => Outcome::Malformed {
                line,
                reason: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            },
            Ok(s) if s.trim().is_empty() => continue,
            Ok(s) => match serde_json::from_str::<Value>(s) {
                Err(e) => Outcome::Malformed {
                    line,
                    reason: format!("not valid JSON: {e}"),
                },
                Ok(v) => json_row(&v, fields)
                    .map(|(id, text, owner, license)| {
                        Outcome::Row(Row {
                            line,
                            doc_id: id.unwrap_or_else(|| default_id(path, line)),
                            text,
                            owner,
                            license,
                        })
                    })
                    .unwrap_or_else(|reason| Outcome::Malformed { line, reason }),
            },
        };
        sink(outcome)?;
    }
}

type Parts = (Option<String>, String, String, String);

fn json_row(v: &Value, f: &Fields) -> std::result::Result<Parts, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    let string = |name: &str, required: bool| -> std::result::Result<Option<String>, String> {
        match obj.get(name) {
            None | Some(Value::Null) if required => Err(format!("missing field `{name}`")),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "field `{name}` is {}, expected a string",
                kind(other)
            )),
        }
    };
    let text = string(f.text, true)?.unwrap_or_default();
    let owner = string(f.owner, true)?.unwrap_or_default();
    let license = string(f.license, false)?.unwrap_or_else(|| "unknown".into());
    // Ids may be numbers too.
    let id = match obj.get(f.id) {
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => string(f.id, false)?,
    };
    Ok((id, text, owner, license))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_parquet(
    path: &Path,
    fields: &Fields,
    sink: &mut dyn FnMut(Outcome) -> Result<()>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let file = File::open(path).map_err(Error::io(path))?;
    let size = file.metadata().map_err(Error::io(path))?.len();
    let perr = |e: parquet::errors::ParquetError| Error::Input {
        path: path.to_path_buf(),
        message: format!("cannot read Parquet: {e}"),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
    let total_rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
    let reader = builder.with_batch_size(1024).build().map_err(perr)?;
    let mut line = 0u64;
    let mut reported = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| Error::Input {
            path: path.to_path_buf(),
            message: format!("cannot read Parquet: {e}"),
        })?;
        let column = |name: &str, required: bool| -> Result<Option<ArrayRef>> {
            match batch.column_by_name(name) {
                Some(c) => Ok(Some(c.clone())),
                None if required => Err(Error::Input {
                    path: path.to_path_buf(),
                    message: format!("no column `{name}` (choose it with the field options)"),
                }),
                None => Ok(None),
            }
        };
        let text = column(fields.text, true)?;
        let owner = column(fields.owner, true)?;
        let license = column(fields.license, false)?;
        let id = column(fields.id, false)?;
        for i in 0..batch.num_rows() {
            line += 1;
            let get = |c: &Option<ArrayRef>, name: &str, required: bool| {
                cell(c.as_ref(), i, name, required)
            };
            let row = (|| {
                let text = get(&text, fields.text, true)?.unwrap_or_default();
                let owner = get(&owner, fields.owner, true)?.unwrap_or_default();
                let license =
                    get(&license, fields.license, false)?.unwrap_or_else(|| "unknown".into());
                let doc_id = get(&id, fields.id, false)?.unwrap_or_else(|| default_id(path, line));
                Ok::<_, String>(Row {
                    line,
                    doc_id,
                    text,
                    owner,
                    license,
                })
            })();
            sink(match row {
                Ok(r) => Outcome::Row(r),
                Err(reason) => Outcome::Malformed { line, reason },
            })?;
        }
        let done = size * line / total_rows;
        progress(done - reported);
        reported = done;
    }
    Ok(())
}

/// A cell as a string: UTF-8 columns as they are, integer columns (ids) printed.
fn cell(
    col: Option<&ArrayRef>,
    i: usize,
    name: &str,
    required: bool,
) -> std::result::Result<Option<String>, String> {
    let Some(col) = col else { return Ok(None) };
    if col.is_null(i) {
        return if required {
            Err(format!("field `{name}` is null"))
        } else {
            Ok(None)
        };
    }
    if let Some(a) = col.as_string_opt::<i32>() {
        return Ok(Some(a.value(i).to_string()));
    }
    if let Some(a) = col.as_string_opt::<i64>() {
        return Ok(Some(a.value(i).to_string()));
    }
    if let Some(a) = col.as_string_view_opt() {
        return Ok(Some(a.value(i).to_string()));
    }
    if let Some(a) = col.as_primitive_opt::<arrow_array::types::Int64Type>() {
        return Ok(Some(a.value(i).to_string()));
    }
    Err(format!(
        "field `{name}` has type {}, expected a string",
        col.data_type()
    ))
}
