//! Exports runs as a Hive-partitioned Parquet dataset, so DuckDB, Polars or Spark query every run
//! at once: `samples/run_id=R/mask=M/task=T/part-K.parquet`, `metrics/run_id=R/part-0.parquet`.
//! Partition columns are taken out of the files (readers add them back from the path).

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::RecordBatch;

use crate::error::{file_err, io, Result};
use crate::results::{read_parquet, Run};

/// Hive escaping of a partition value: anything but `[A-Za-z0-9_.-]` becomes `%XX`.
pub fn escape(v: &str) -> String {
    let mut s = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.is_empty() {
        "__HIVE_DEFAULT_PARTITION__".into()
    } else {
        s
    }
}

fn string_col(path: &Path, b: &RecordBatch, name: &str) -> Result<Vec<String>> {
    let c = b
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| file_err(path, format!("no string column `{name}`")))?;
    Ok(c.iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect())
}

fn without(b: &RecordBatch, drop: &[&str]) -> Result<RecordBatch> {
    let keep: Vec<usize> = b
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !drop.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    b.project(&keep)
        .map_err(|e| crate::error::Error::Invalid(e.to_string()))
}

fn write(path: &Path, batch: &RecordBatch) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    crate::tables::write_parquet_atomic(path, batch).map_err(|e| file_err(path, e))
}

/// Writes the dataset under `out` (its `samples/` and `metrics/` folders are replaced) and returns
/// the files written.
pub fn export(runs: &[Run], out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for sub in ["samples", "metrics"] {
        let d = out.join(sub);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(io(&d))?;
        }
    }
    for run in runs {
        let rid = escape(&run.manifest.run_id);
        let sp = run.dir.join("samples.parquet");
        let mut part = std::collections::HashMap::<PathBuf, usize>::new();
        for b in read_parquet(&sp)? {
            let masks = string_col(&sp, &b, "mask")?;
            let tasks = string_col(&sp, &b, "task")?;
            // Rows of one (mask, task) are contiguous in a run's file; each block is one part.
            let mut start = 0;
            while start < b.num_rows() {
                let mut end = start + 1;
                while end < b.num_rows() && masks[end] == masks[start] && tasks[end] == tasks[start]
                {
                    end += 1;
                }
                let dir = out
                    .join("samples")
                    .join(format!("run_id={rid}"))
                    .join(format!("mask={}", escape(&masks[start])))
                    .join(format!("task={}", escape(&tasks[start])));
                let k = part.entry(dir.clone()).or_insert(0);
                let path = dir.join(format!("part-{k}.parquet"));
                *k += 1;
                write(
                    &path,
                    &without(&b.slice(start, end - start), &["run_id", "mask", "task"])?,
                )?;
                files.push(path);
                start = end;
            }
        }
        let mp = run.dir.join("metrics.parquet");
        for (k, b) in read_parquet(&mp)?.iter().enumerate() {
            let path = out
                .join("metrics")
                .join(format!("run_id={rid}"))
                .join(format!("part-{k}.parquet"));
            write(&path, &without(b, &["run_id"])?)?;
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaping() {
        assert_eq!(super::escape("-expert-2"), "-expert-2");
        assert_eq!(super::escape("a b/c=d"), "a%20b%2Fc%3Dd");
        assert_eq!(super::escape(""), "__HIVE_DEFAULT_PARTITION__");
    }
}
