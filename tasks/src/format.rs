//! The data file formats moeval reads (shared by local data files and Hub datasets).

/// The file formats `dataset_path` may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Parquet,
}

impl Format {
    pub fn from_dataset_path(name: &str) -> Option<Format> {
        match name {
            "json" | "jsonl" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}
