//! Hugging Face Hub datasets read from the local Hub cache: which files of a dataset repository a
//! task's (`dataset_path`, `dataset_name`, split, revision) reads, decided as the `datasets` library
//! (5.2, which lm-evaluation-harness 0.4.13 calls) decides it for a repository without a loading
//! script. This module never touches the network: a file that is not in the cache is an
//! [`Error::HubMissing`] that names it, which the harness downloads when it may.
//!
//! Invariants:
//! - Resolution is a pure function of a repository's file list and README.md ([`Listing`]), so one
//!   code path decides what to read offline ([`find`]) and what to download online ([`plan`]).
//! - Order: `dataset_kwargs.data_files`, else the automatic split patterns under
//!   `dataset_kwargs.data_dir`, else the README.md front matter's `configs:`, else the automatic split
//!   patterns of the repository; when revision `main` has no data file for the split, the Parquet
//!   export the Hub keeps for every dataset (`refs/convert/parquet`: `{config}/{split}/NNNN.parquet`
//!   or `{config}/partial-{split}/NNNN.parquet`).
//! - A split is read whole or not at all: shards named `…-NNNNN-of-MMMMM.…` must all be present, and
//!   the export's `NNNN.parquet` files must be numbered without gaps; what lacks is reported missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use serde_json::Value;

use crate::config::TaskConfig;
use crate::error::{Error, Result};
use crate::format::Format;

/// The revision of the Parquet export the Hub serves for every dataset.
pub const PARQUET_EXPORT: &str = "refs/convert/parquet";

/// A dataset as a task names it: a Hub repository (or a local folder laid out like one), a
/// configuration, a revision and the `dataset_kwargs` that change which files are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetRef {
    /// `owner/name` on the Hub, or a local folder.
    pub repo: String,
    /// `dataset_name`: the configuration (subset); `None` is the default configuration.
    pub config: Option<String>,
    /// `dataset_kwargs.revision`, else `main`.
    pub revision: String,
    /// `dataset_kwargs.data_dir`: a folder of the repository whose files are matched instead.
    pub data_dir: Option<String>,
    /// `dataset_kwargs.data_files` (split -> patterns), relative to the repository (and `data_dir`).
    pub data_files: Option<Vec<(String, Vec<String>)>>,
}

impl DatasetRef {
    /// The Hub dataset (or local folder) a task reads; `None` when its `dataset_path` names a file
    /// format (`json`, `csv`, `parquet`), whose files are `dataset_kwargs.data_files`.
    pub fn of_task(cfg: &TaskConfig) -> Option<DatasetRef> {
        if Format::from_dataset_path(&cfg.dataset_path).is_some() {
            return None;
        }
        let kw = &cfg.dataset_kwargs;
        let text = |k: &str| kw.get(k).and_then(Value::as_str).map(str::to_string);
        let data_files = kw
            .get("data_files")
            .filter(|v| !v.is_null())
            .map(|_| cfg.data_files.clone().into_iter().collect());
        Some(DatasetRef {
            repo: cfg.dataset_path.clone(),
            config: cfg.dataset_name.clone(),
            revision: text("revision").unwrap_or_else(|| "main".into()),
            data_dir: text("data_dir"),
            data_files,
        })
    }

    fn config_label(&self) -> String {
        match &self.config {
            Some(c) => format!("`{c}`"),
            None => "default".into(),
        }
    }
}

/// A repository's files at one revision (paths relative to its root, `/`-separated, sorted) and
/// the text of its README.md when that is known.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    files: Vec<String>,
    readme: Option<String>,
}

impl Listing {
    pub fn new(mut files: Vec<String>, readme: Option<String>) -> Listing {
        files.sort();
        files.dedup();
        Listing { files, readme }
    }

    /// The files under `dir` (a snapshot folder or a local dataset folder), following the
    /// snapshot's symbolic links into `blobs/`; a link whose blob is gone is not a file.
    pub fn from_dir(dir: &Path) -> std::io::Result<Listing> {
        let mut files = Vec::new();
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((d, rel)) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                let rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                // `metadata` follows links, so a snapshot's links count as the blobs they point to.
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_dir() => stack.push((path, rel)),
                    Ok(m) if m.is_file() => files.push(rel),
                    _ => {}
                }
            }
        }
        let readme = files
            .iter()
            .any(|f| f == README)
            .then(|| std::fs::read_to_string(dir.join(README)))
            .transpose()?;
        Ok(Listing::new(files, readme))
    }

    pub fn files(&self) -> &[String] {
        &self.files
    }

    pub fn has(&self, file: &str) -> bool {
        self.files
            .binary_search_by(|f| f.as_str().cmp(file))
            .is_ok()
    }
}

const README: &str = "README.md";

/// The data files of one split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub format: Format,
    /// Repository-relative paths, in the order their rows are read.
    pub files: Vec<String>,
}

/// Why a listing gives no files for a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// Nothing matches (perhaps not downloaded yet): the files or patterns that matched nothing.
    NoData { needed: Vec<String> },
    /// The repository cannot give the split whatever is downloaded (unknown configuration or split,
    /// several default configurations, a format moeval does not read, a malformed README.md).
    Invalid(String),
}

/// One `configs:` entry of README.md.
struct MetaConfig {
    name: String,
    data_files: Option<Value>,
    data_dir: Option<String>,
    default: bool,
}

/// The README.md front matter's `configs:` (empty without a README or front matter).
fn meta_configs(readme: Option<&str>) -> Result<Vec<MetaConfig>, Unresolved> {
    let Some(text) = readme else {
        return Ok(Vec::new());
    };
    let Some(yaml) = front_matter(text) else {
        return Ok(Vec::new());
    };
    let invalid = |m: String| Unresolved::Invalid(format!("README.md: {m}"));
    let meta: Value = serde_yaml_ng::from_str(yaml)
        .map_err(|e| invalid(format!("front matter is not YAML: {e}")))?;
    let Some(configs) = meta.get("configs").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = configs
        .as_array()
        .ok_or_else(|| invalid("`configs` must be a list".into()))?;
    list.iter()
        .map(|c| {
            let name = c
                .get("config_name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("a `configs` entry has no `config_name`: {c}")))?;
            let data_files = c.get("data_files").filter(|v| !v.is_null()).cloned();
            // `datasets` accepts a path, a list of paths or a list of `{split, path}` here, not
            // a mapping.
            if data_files.as_ref().is_some_and(Value::is_object) {
                return Err(invalid(format!(
                    "configuration `{name}`: `data_files` must be a path, a list of paths or a list of {{split, path}}"
                )));
            }
            Ok(MetaConfig {
                name: name.to_string(),
                data_files,
                data_dir: c.get("data_dir").and_then(Value::as_str).map(str::to_string),
                default: c.get("default").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

/// The YAML between a leading `---` line and the next `---` line (huggingface_hub's rule).
fn front_matter(text: &str) -> Option<&str> {
    let body = text.trim_start();
    let body = body.strip_prefix("---")?;
    let body = body
        .strip_prefix("\r\n")
        .or_else(|| body.strip_prefix('\n'))
        .or_else(|| body.strip_prefix('\r'))?;
    let mut start = 0;
    for line in body.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']);
        if l.trim_end_matches([' ', '\t']) == "---" {
            return Some(&body[..start]);
        }
        start += line.len();
    }
    None
}

/// `data_files` as `datasets`' `sanitize_patterns` reads it: a path, a list, a split mapping or a
/// list of `{split, path}`; a bare path or list is split `train`.
fn sanitize(v: &Value) -> Result<Vec<(String, Vec<String>)>, Unresolved> {
    let strs = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    };
    let bad = || Unresolved::Invalid(format!("README.md: malformed `data_files`: {v}"));
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, p)| Ok((k.clone(), strs(p).ok_or_else(bad)?)))
            .collect(),
        Value::Array(a) if a.iter().any(Value::is_object) => {
            let mut out: Vec<(String, Vec<String>)> = Vec::new();
            for e in a {
                let split = e.get("split").and_then(Value::as_str).ok_or_else(bad)?;
                let paths = e.get("path").and_then(strs).ok_or_else(bad)?;
                if out.iter().any(|(s, _)| s == split) {
                    return Err(Unresolved::Invalid(format!(
                        "README.md: split `{split}` appears twice in `data_files`"
                    )));
                }
                out.push((split.to_string(), paths));
            }
            Ok(out)
        }
        _ => Ok(vec![("train".into(), strs(v).ok_or_else(bad)?)]),
    }
}

/// Split keywords of the automatic patterns (`datasets/data_files.py`, `SPLIT_KEYWORDS`).
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
/// Characters around a split keyword in a file or folder name (`NON_WORDS_CHARS`).
const SEP: &str = "-._ 0-9";
/// First tried: sharded files named by split (`SPLIT_PATTERN_SHARDED`).
const SHARDED: &str = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";
/// Files never taken as data unless named exactly (`FILES_TO_IGNORE`).
const FILES_TO_IGNORE: [&str; 6] = [
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// The automatic pattern sets in the order `datasets` tries them (`ALL_DEFAULT_PATTERNS`, for
/// fsspec >= 2023.12): inspect logs, Harbor tasks, split in a folder name, split in a file name,
/// everything as `train`. The first set with a match for any split wins.
fn default_pattern_sets() -> Vec<Vec<(String, Vec<String>)>> {
    let by_keyword = |bases: &[&str]| -> Vec<(String, Vec<String>)> {
        SPLIT_KEYWORDS
            .iter()
            .map(|(split, kws)| {
                let pats = kws
                    .iter()
                    .flat_map(|k| {
                        bases
                            .iter()
                            .map(move |b| b.replace("{keyword}", k).replace("{sep}", SEP))
                    })
                    .collect();
                (split.to_string(), pats)
            })
            .collect()
    };
    vec![
        vec![("logs".into(), vec!["**/*.eval".into()])],
        vec![(
            "test".into(),
            vec!["**/task.toml".into(), "**/instruction.md".into()],
        )],
        by_keyword(&[
            "**/{keyword}/**",
            "**/{keyword}[{sep}]*/**",
            "**/*[{sep}]{keyword}/**",
            "**/*[{sep}]{keyword}[{sep}]*/**",
        ]),
        by_keyword(&["**/{keyword}[{sep}]*", "**/*[{sep}]{keyword}[{sep}]*"]),
        vec![("train".into(), vec!["**".into()])],
    ]
}

/// `datasets`' `_get_data_files_patterns`: the split patterns of a folder, or `None` when nothing
/// in it is a data file.
fn automatic_patterns(listing: &Listing, base: &str) -> Option<Vec<(String, Vec<String>)>> {
    let sharded = SHARDED.replace("{split}", "*");
    let matched = match_pattern(listing, base, &sharded, None);
    if !matched.is_empty() {
        let mut splits: Vec<String> = matched
            .iter()
            .filter_map(|p| {
                let name = p.rsplit('/').next()?;
                let (split, rest) = name.split_once('-')?;
                rest.as_bytes()
                    .get(..14)
                    .is_some_and(|r| r[5..9] == *b"-of-")
                    .then(|| split.to_string())
            })
            .collect();
        splits.sort();
        splits.dedup();
        // Train, validation, test first, then the others by name (as `datasets` orders them).
        let known = ["train", "validation", "test"];
        let mut ordered: Vec<String> = known
            .iter()
            .filter(|k| splits.iter().any(|s| s == *k))
            .map(|k| k.to_string())
            .collect();
        ordered.extend(splits.into_iter().filter(|s| !known.contains(&s.as_str())));
        return Some(
            ordered
                .into_iter()
                .map(|s| {
                    let p = SHARDED.replace("{split}", &s);
                    (s, vec![p])
                })
                .collect(),
        );
    }
    default_pattern_sets().into_iter().find_map(|set| {
        let found: Vec<(String, Vec<String>)> = set
            .into_iter()
            .filter(|(_, pats)| {
                pats.iter()
                    .any(|p| !match_pattern(listing, base, p, None).is_empty())
            })
            .collect();
        (!found.is_empty()).then_some(found)
    })
}

fn join_base(base: &str, pattern: &str) -> String {
    let base = base.trim_matches('/');
    let pattern = pattern.trim_start_matches("./");
    if base.is_empty() {
        pattern.to_string()
    } else {
        format!("{base}/{pattern}")
    }
}

fn glob(pattern: &str) -> Option<GlobMatcher> {
    // fsspec's glob: `*` and `?` stay within one path component, `**` spans components.
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(false)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

/// Hidden files and folders (a component starting with `.`) and special folders (`__x`) match
/// only when the pattern names as many of them (`datasets`' `resolve_pattern` rules).
fn hidden_or_special(path: &str, pattern: &str) -> bool {
    let hidden = |s: &str| {
        s.split('/')
            .filter(|c| c.starts_with('.') && !c.chars().all(|ch| ch == '.'))
            .count()
    };
    let special = |s: &str| {
        let parent = s.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        parent.split('/').filter(|c| c.starts_with("__")).count()
    };
    hidden(path) != hidden(pattern) || special(path) != special(pattern)
}

/// The files matching one pattern (relative to `base`), as `resolve_pattern` finds them; with
/// `extensions`, only files with one of them among their name's suffixes.
fn match_pattern(
    listing: &Listing,
    base: &str,
    pattern: &str,
    extensions: Option<&dyn Fn(&str) -> bool>,
) -> Vec<String> {
    let full = join_base(base, pattern);
    let Some(m) = glob(&full) else {
        return Vec::new();
    };
    let pattern_name = full.rsplit('/').next().unwrap_or(&full);
    listing
        .files
        .iter()
        .filter(|f| m.is_match(f.as_str()))
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            !(FILES_TO_IGNORE.contains(&name) && name != pattern_name)
        })
        .filter(|f| !hidden_or_special(f, &full))
        .filter(|f| {
            extensions.is_none_or(|ok| {
                let name = f.rsplit('/').next().unwrap_or(f);
                name.split('.').skip(1).any(|s| ok(&format!(".{s}")))
            })
        })
        .cloned()
        .collect()
}

fn has_magic(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

/// Every extension `datasets` 5.2 maps to a builder (`_EXTENSION_TO_MODULE`), by builder, plus the
/// metadata file names of the folder builders (`_ALL_METADATA_FILENAMES`). Only the first three are
/// read here; the others are known so that inference and filtering pick what `datasets` picks.
pub const EXTENSIONS: [(&str, &str); 25] = [
    ("csv", ".csv .tsv"),
    ("json", ".json .jsonl .ndjson"),
    ("parquet", ".parquet .geoparquet .gpq"),
    ("arrow", ".arrow"),
    ("text", ".txt"),
    ("conll", ".conll .conllu"),
    ("webdataset", ".tar"),
    ("xml", ".xml"),
    ("hdf5", ".hdf5 .h5"),
    ("eval", ".eval"),
    ("harbor", ".toml .md"),
    ("lance", ".lance"),
    ("tsfile", ".tsfile"),
    ("vortex", ".vortex"),
    ("fasta", ".fa .fasta .fna .ffn .faa .frn .afa"),
    ("genbank", ".gb .gbk .genbank"),
    ("fastq", ".fq .fastq"),
    ("pdb", ".pdb .ent .PDB .ENT"),
    ("mmcif", ".cif .mmcif"),
    ("imagefolder", IMAGE_EXTENSIONS),
    ("audiofolder", AUDIO_EXTENSIONS),
    (
        "videofolder",
        ".mpeg .MPEG .avi .mp4 .mov .mkv .AVI .MP4 .MOV .MKV",
    ),
    ("meshfolder", ".glb .gltf .ply .stl .GLB .GLTF .PLY .STL"),
    ("pdffolder", ".pdf .PDF"),
    ("niftifolder", ".nii .NII"),
];
const IMAGE_EXTENSIONS: &str = include_str!("hub_image_extensions.txt");
const AUDIO_EXTENSIONS: &str = include_str!("hub_audio_extensions.txt");
/// Extensions of metadata files some builders read beside their data (`lance`'s).
const METADATA_EXTENSIONS: [&str; 3] = [".idx", ".manifest", ".txn"];
const METADATA_FILENAMES: [&str; 6] = [
    "instruction.md",
    "latest_version_hint.json",
    "metadata.csv",
    "metadata.jsonl",
    "metadata.parquet",
    "task.toml",
];

fn module_of(ext: &str) -> Option<&'static str> {
    EXTENSIONS
        .iter()
        .find(|(_, exts)| exts.split_whitespace().any(|e| e == ext))
        .map(|(m, _)| *m)
}

fn allowed_extension(ext: &str) -> bool {
    ext == ".zip" || METADATA_EXTENSIONS.contains(&ext) || module_of(ext).is_some()
}

/// `infer_module_for_data_files_list`: the builder of the most common extension (metadata files
/// last; ties go to parquet, lance, vortex, arrow, jsonl, json, csv, then the name).
fn infer_module(files: &[String]) -> Option<&'static str> {
    let mut counts: BTreeMap<(String, bool), usize> = BTreeMap::new();
    for f in files {
        let name = f.rsplit('/').next().unwrap_or(f);
        let meta = METADATA_FILENAMES.contains(&name);
        for s in name.split('.').skip(1) {
            *counts
                .entry((format!(".{}", s.to_lowercase()), meta))
                .or_default() += 1;
        }
    }
    let favourites = [
        ".parquet", ".lance", ".vortex", ".arrow", ".jsonl", ".json", ".csv",
    ];
    let mut ranked: Vec<_> = counts.into_iter().collect();
    ranked.sort_by(|((ea, ma), ca), ((eb, mb), cb)| {
        let key = |e: &str, m: bool, c: usize| {
            let fav: Vec<bool> = favourites.iter().map(|f| *f == e).collect();
            (!m, c, fav)
        };
        key(eb, *mb, *cb)
            .cmp(&key(ea, *ma, *ca))
            .then_with(|| eb.cmp(ea))
    });
    ranked.into_iter().find_map(|((ext, _), _)| {
        if ext == ".zip" {
            Some("zip")
        } else {
            module_of(&ext)
        }
    })
}

/// `DataFilesList.filter`: files whose name ends in one of the builder's extensions (optionally
/// followed by one more suffix, such as `.gz`).
fn keep_module_files(files: Vec<String>, module: &str) -> Vec<String> {
    let exts: Vec<String> = EXTENSIONS
        .iter()
        .filter(|(m, _)| *m == module)
        .flat_map(|(_, e)| e.split_whitespace().map(str::to_string))
        .chain([".zip".to_string()])
        .collect();
    files
        .into_iter()
        .filter(|f| {
            exts.iter().any(|e| {
                f.match_indices(e.as_str()).any(|(i, _)| {
                    let rest = &f[i + e.len()..];
                    rest.is_empty() || (rest.starts_with('.') && rest.len() > 1)
                })
            })
        })
        .collect()
}

/// Where a split's patterns come from.
struct SplitPatterns {
    /// Folder the patterns are relative to.
    base: String,
    patterns: Vec<(String, Vec<String>)>,
    /// From a README.md configuration (whose files `datasets` does not filter by format) rather
    /// than from `dataset_kwargs` or the automatic patterns.
    from_config: bool,
    /// The split names are fixed by the repository (README.md or `data_files`), so a split not
    /// among them cannot appear by downloading more.
    defined: bool,
}

/// The configuration a task names (or the default one) and the patterns of its splits.
fn split_patterns(listing: &Listing, d: &DatasetRef) -> Result<SplitPatterns, Unresolved> {
    let configs = meta_configs(listing.readme.as_deref())?;
    let names = || {
        configs
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The configuration is checked even when data_files or data_dir override its files.
    let chosen: Option<&MetaConfig> = if configs.is_empty() {
        match d.config.as_deref() {
            None | Some("default") => None,
            // The configuration may be defined by a README.md that is not downloaded.
            Some(_) if listing.readme.is_none() => {
                return Err(Unresolved::NoData {
                    needed: vec![README.into()],
                });
            }
            // No data file at all (a dataset with a loading script): its configurations are in
            // the script, and their files in the Parquet export.
            Some(_) if match_pattern(listing, "", "**", Some(&allowed_extension)).is_empty() => {
                return Err(Unresolved::NoData {
                    needed: vec!["** (any data file)".into()],
                });
            }
            Some(c) => {
                return Err(Unresolved::Invalid(format!(
                    "no configuration `{c}`: README.md defines none (only `default`)"
                )))
            }
        }
    } else {
        let default = configs
            .iter()
            .filter(|c| configs.len() == 1 || c.name == "default" || c.default)
            .collect::<Vec<_>>();
        match d.config.as_deref() {
            Some(name) => Some(configs.iter().find(|c| c.name == name).ok_or_else(|| {
                Unresolved::Invalid(format!(
                    "no configuration `{name}`; README.md defines {}",
                    names()
                ))
            })?),
            None => match default.as_slice() {
                [one] => Some(*one),
                [] => {
                    return Err(Unresolved::Invalid(format!(
                        "the dataset has several configurations and none is the default: set `dataset_name` to one of {}",
                        names()
                    )))
                }
                [a, b, ..] => {
                    return Err(Unresolved::Invalid(format!(
                        "README.md marks several default configurations (`{}` and `{}`)",
                        a.name, b.name
                    )))
                }
            },
        }
    };
    let (base, patterns, from_config) = if let Some(df) = &d.data_files {
        let base = d.data_dir.clone().unwrap_or_default();
        (base, Some(df.clone()), false)
    } else if let Some(dir) = &d.data_dir {
        (dir.clone(), None, false)
    } else if let Some(c) = chosen {
        let base = c.data_dir.clone().unwrap_or_default();
        let pats = c.data_files.as_ref().map(sanitize).transpose()?;
        (base, pats, true)
    } else {
        (String::new(), None, false)
    };
    let defined = patterns.is_some();
    let patterns = match patterns {
        Some(p) => p,
        None => automatic_patterns(listing, &base).ok_or_else(|| Unresolved::NoData {
            needed: vec![format!("{} (any data file)", join_base(&base, "**"))],
        })?,
    };
    Ok(SplitPatterns {
        base,
        patterns,
        from_config,
        defined,
    })
}

/// The files of one split's patterns (`DataFilesList.from_patterns`): a pattern without
/// wildcards names a file that must exist; a glob may match nothing, but not all of them may.
fn pattern_files(
    listing: &Listing,
    base: &str,
    pats: &[String],
) -> Result<Vec<String>, Unresolved> {
    let allowed: &dyn Fn(&str) -> bool = &|e: &str| allowed_extension(e);
    let mut files = Vec::new();
    let mut unmatched = Vec::new();
    for p in pats {
        let got = match_pattern(listing, base, p, Some(allowed));
        if got.is_empty() {
            unmatched.push(join_base(base, p));
        }
        files.extend(got);
    }
    let exact: Vec<String> = unmatched
        .iter()
        .filter(|p| !has_magic(p))
        .cloned()
        .collect();
    if !exact.is_empty() {
        return Err(Unresolved::NoData { needed: exact });
    }
    if files.is_empty() {
        return Err(Unresolved::NoData { needed: unmatched });
    }
    Ok(files)
}

/// The files of `split` as `datasets` hands them to its builder, before moeval's format check.
pub fn resolve_files(
    listing: &Listing,
    d: &DatasetRef,
    split: &str,
) -> Result<Vec<String>, Unresolved> {
    let sp = split_patterns(listing, d)?;
    let Some((_, pats)) = sp.patterns.iter().find(|(s, _)| s == split) else {
        if sp.defined {
            let have: Vec<String> = sp.patterns.iter().map(|(s, _)| format!("`{s}`")).collect();
            return Err(Unresolved::Invalid(format!(
                "no split `{split}` (the configuration has {})",
                have.join(", ")
            )));
        }
        // The automatic patterns found other splits; this one's files may not be cached yet.
        let auto: Vec<String> = default_pattern_sets()
            .into_iter()
            .flatten()
            .filter(|(s, _)| s == split)
            .flat_map(|(_, p)| p)
            .map(|p| join_base(&sp.base, &p))
            .collect();
        return Err(Unresolved::NoData {
            needed: if auto.is_empty() {
                vec![join_base(&sp.base, &SHARDED.replace("{split}", split))]
            } else {
                auto
            },
        });
    };
    let files = pattern_files(listing, &sp.base, pats)?;
    if sp.from_config {
        return Ok(files);
    }
    // Without a configuration, `datasets` infers one builder from every split's files (they must
    // agree) and keeps only the files that builder reads.
    let mut modules: Vec<(&str, &'static str)> = Vec::new();
    for (s, p) in &sp.patterns {
        let Ok(f) = pattern_files(listing, &sp.base, p) else {
            continue;
        };
        if let Some(m) = infer_module(&f) {
            modules.push((s, m));
        }
    }
    let module = match modules.first() {
        Some((_, m)) => *m,
        None => return Ok(files),
    };
    if let Some((s, m)) = modules.iter().find(|(_, m)| *m != module) {
        return Err(Unresolved::Invalid(format!(
            "the splits' files are of different formats (`{}`: {module}, `{s}`: {m}), which `datasets` refuses",
            modules[0].0
        )));
    }
    Ok(keep_module_files(files, module))
}

/// Resolves the files of `split` in a repository listing (the `main` revision's or a local
/// folder's) and the format they are read in. Errors say what matched nothing, or why the split
/// cannot exist.
pub fn resolve(listing: &Listing, d: &DatasetRef, split: &str) -> Result<Resolved, Unresolved> {
    let files = resolve_files(listing, d, split)?;
    let module = infer_module(&files).ok_or_else(|| {
        Unresolved::Invalid(format!("no supported data file among {}", files.join(", ")))
    })?;
    let files = keep_module_files(files, module);
    let format = match module {
        "parquet" => Format::Parquet,
        "json" => Format::Json,
        "csv" if files.iter().all(|f| !f.contains(".tsv")) => Format::Csv,
        other => {
            return Err(Unresolved::Invalid(format!(
                "its files ({}) are read by `datasets`' `{other}` builder; moeval reads Parquet, JSON / JSON Lines and CSV",
                files.join(", ")
            )))
        }
    };
    check_shards(listing, &files)?;
    Ok(Resolved { format, files })
}

/// Every shard of a `…-NNNNN-of-MMMMM.…` series that has one file present must be present.
fn check_shards(listing: &Listing, files: &[String]) -> Result<(), Unresolved> {
    let mut needed = Vec::new();
    for f in files {
        let Some((prefix, idx, total, suffix)) = shard_parts(f) else {
            continue;
        };
        if idx != 0 {
            continue;
        }
        for i in 1..total {
            let want = format!("{prefix}-{i:05}-of-{total:05}{suffix}");
            if !listing.has(&want) {
                needed.push(want);
            }
        }
    }
    if needed.is_empty() {
        Ok(())
    } else {
        Err(Unresolved::NoData { needed })
    }
}

/// `(prefix, index, count, suffix)` of `prefix-00001-of-00003.parquet`.
fn shard_parts(f: &str) -> Option<(&str, usize, usize, &str)> {
    let at = f.rfind("-of-")?;
    let (head, tail) = (&f[..at], &f[at + 4..]);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let (prefix, idx) = head.rsplit_once('-')?;
    let total = tail.get(..5)?;
    if !digits(idx) || !digits(total) {
        return None;
    }
    Some((prefix, idx.parse().ok()?, total.parse().ok()?, &tail[5..]))
}

/// Resolves `split` in a listing of the Parquet export (`refs/convert/parquet`):
/// `{config}/{split}/NNNN.parquet`, else `{config}/partial-{split}/NNNN.parquet`.
pub fn resolve_export(
    listing: &Listing,
    config: Option<&str>,
    split: &str,
) -> Result<Resolved, Unresolved> {
    let mut configs: Vec<&str> = listing
        .files
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .filter_map(|f| f.split_once('/').map(|(c, _)| c))
        .collect();
    configs.dedup();
    let config = match config {
        Some(c) => c.to_string(),
        None if configs.len() == 1 => configs[0].to_string(),
        None if configs.contains(&"default") || configs.is_empty() => "default".into(),
        None => {
            return Err(Unresolved::Invalid(format!(
                "the Parquet export has several configurations ({}) and none is `default`: set `dataset_name`",
                configs.join(", ")
            )))
        }
    };
    for dir in [
        format!("{config}/{split}"),
        format!("{config}/partial-{split}"),
    ] {
        let files: Vec<String> = listing
            .files
            .iter()
            .filter(|f| {
                f.strip_prefix(&dir)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|n| !n.contains('/') && n.ends_with(".parquet"))
            })
            .cloned()
            .collect();
        if files.is_empty() {
            continue;
        }
        // Shards are numbered 0000, 0001, …: a gap is a file not downloaded.
        let needed: Vec<String> = (0..files.len())
            .map(|i| format!("{dir}/{i:04}.parquet"))
            .filter(|f| !listing.has(f))
            .collect();
        if !needed.is_empty() {
            return Err(Unresolved::NoData { needed });
        }
        return Ok(Resolved {
            format: Format::Parquet,
            files,
        });
    }
    Err(Unresolved::NoData {
        needed: vec![format!("{config}/{split}/*.parquet")],
    })
}

/// Whether a variable is set to a true value the way huggingface_hub reads it (1, ON, YES, TRUE).
fn env_true(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()))
}

/// `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) is true: nothing may use the network.
pub fn offline() -> bool {
    env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE")
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// The Hub cache folder as huggingface_hub computes it: `HF_HUB_CACHE`, else the older
/// `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, with `HF_HOME` defaulting to
/// `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(d) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return expand_home(&d);
    }
    hf_home().join("hub")
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match var("HF_HOME") {
        Some(h) => expand_home(&h),
        None => match var("XDG_CACHE_HOME") {
            Some(x) => expand_home(&x).join("huggingface"),
            None => expand_home("~/.cache").join("huggingface"),
        },
    }
}

/// A dataset repository's folder in the cache: `datasets--{owner}--{name}`.
pub fn repo_folder(root: &Path, repo: &str) -> PathBuf {
    root.join(format!("datasets--{}", repo.replace('/', "--")))
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit a revision points to in the cache (`refs/{revision}`; a commit hash is itself) and
/// its snapshot folder, when both are there.
pub fn snapshot(root: &Path, repo: &str, revision: &str) -> Option<(String, PathBuf)> {
    let folder = repo_folder(root, repo);
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = folder.join("snapshots").join(&commit);
    dir.is_dir().then_some((commit, dir))
}

/// What a task's split reads from the cache.
#[derive(Clone, Debug)]
pub struct Found {
    pub format: Format,
    /// Snapshot paths (links into `blobs/`), in reading order.
    pub paths: Vec<PathBuf>,
    /// The revision the files come from (the task's, or [`PARQUET_EXPORT`]) and its commit.
    pub revision: String,
    pub commit: String,
}

pub use crate::error::Missing;

fn hub_error(d: &DatasetRef, split: &str, msg: String) -> Error {
    Error::Hub {
        repo: d.repo.clone(),
        config: d.config_label(),
        split: split.to_string(),
        revision: d.revision.clone(),
        msg,
    }
}

/// Finds the files of `split` in the Hub cache under `root` (no network): the revision's
/// snapshot first, then, for revision `main`, the Parquet export. Files that are not there are an
/// [`Error::HubMissing`]; a split that cannot exist is an [`Error::Hub`].
pub fn find(root: &Path, d: &DatasetRef, split: &str) -> Result<Found> {
    let mut needed = Vec::new();
    let main = snapshot(root, &d.repo, &d.revision);
    let main_listing = match &main {
        Some((_, dir)) => Some(Listing::from_dir(dir).map_err(|e| Error::Io {
            context: format!("cannot list {}", dir.display()),
            source: e,
        })?),
        None => None,
    };
    match (&main, &main_listing) {
        (Some((commit, dir)), Some(listing)) => match resolve(listing, d, split) {
            Ok(r) => {
                return Ok(Found {
                    format: r.format,
                    paths: r.files.iter().map(|f| dir.join(f)).collect(),
                    revision: d.revision.clone(),
                    commit: commit.clone(),
                })
            }
            Err(Unresolved::Invalid(msg)) => return Err(hub_error(d, split, msg)),
            Err(Unresolved::NoData { needed: n }) => needed.push((d.revision.clone(), n)),
        },
        // Nothing of the revision is cached: no pattern to name yet (README.md decides them).
        _ => needed.push((d.revision.clone(), Vec::new())),
    }
    // The export mirrors `main` only, and holds no files for a data_dir or data_files choice.
    if d.revision == "main" && d.data_dir.is_none() && d.data_files.is_none() {
        if let Some((commit, dir)) = snapshot(root, &d.repo, PARQUET_EXPORT) {
            let listing = Listing::from_dir(&dir).map_err(|e| Error::Io {
                context: format!("cannot list {}", dir.display()),
                source: e,
            })?;
            match resolve_export(&listing, d.config.as_deref(), split) {
                Ok(r) => {
                    return Ok(Found {
                        format: r.format,
                        paths: r.files.iter().map(|f| dir.join(f)).collect(),
                        revision: PARQUET_EXPORT.into(),
                        commit,
                    })
                }
                Err(Unresolved::Invalid(msg)) => return Err(hub_error(d, split, msg)),
                Err(Unresolved::NoData { needed: n }) => needed.push((PARQUET_EXPORT.into(), n)),
            }
        }
    }
    Err(Error::HubMissing(Box::new(Missing {
        task: None,
        repo: d.repo.clone(),
        config: d.config.clone(),
        revision: d.revision.clone(),
        split: split.to_string(),
        cache_dir: repo_folder(root, &d.repo),
        needed,
    })))
}

/// Finds the files of `split` in a local folder laid out like a Hub repository (lm-evaluation-
/// harness accepts a folder as `dataset_path`).
pub fn find_local(dir: &Path, d: &DatasetRef, split: &str) -> Result<Found> {
    let listing = Listing::from_dir(dir).map_err(|e| Error::Io {
        context: format!("cannot list {}", dir.display()),
        source: e,
    })?;
    match resolve(&listing, d, split) {
        Ok(r) => Ok(Found {
            format: r.format,
            paths: r.files.iter().map(|f| dir.join(f)).collect(),
            revision: String::new(),
            commit: String::new(),
        }),
        Err(Unresolved::Invalid(msg)) => Err(hub_error(d, split, msg)),
        Err(Unresolved::NoData { needed }) => Err(hub_error(
            d,
            split,
            format!(
                "nothing in the folder {} matches {}",
                dir.display(),
                quote_all(&needed)
            ),
        )),
    }
}

fn quote_all(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to download for some splits, decided from the remote listings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Repository-relative files of the revision (README.md first when the repository has one).
    pub files: Vec<String>,
    /// Splits with no data file at the revision, to be looked for in the Parquet export.
    pub export_splits: Vec<String>,
    /// Splits that cannot be had, with the reason (unknown split, unsupported format, …).
    pub problems: Vec<(String, String)>,
}

/// Plans the download of `splits` from a listing of the revision (with its README.md text once
/// that is fetched): the same resolution as [`find`], over the remote file list.
pub fn plan(listing: &Listing, d: &DatasetRef, splits: &[String]) -> Plan {
    let mut p = Plan::default();
    if listing.has(README) {
        p.files.push(README.into());
    }
    for s in splits {
        match resolve(listing, d, s) {
            Ok(r) => p.files.extend(r.files),
            Err(Unresolved::NoData { .. })
                if d.revision == "main" && d.data_dir.is_none() && d.data_files.is_none() =>
            {
                p.export_splits.push(s.clone())
            }
            Err(Unresolved::NoData { needed }) => p
                .problems
                .push((s.clone(), format!("nothing matches {}", quote_all(&needed)))),
            Err(Unresolved::Invalid(msg)) => p.problems.push((s.clone(), msg)),
        }
    }
    dedup_keep_order(&mut p.files);
    p
}

/// The export files of `splits` (from a listing of [`PARQUET_EXPORT`]); splits it lacks are
/// returned as problems.
pub fn plan_export(
    listing: &Listing,
    config: Option<&str>,
    splits: &[String],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for s in splits {
        match resolve_export(listing, config, s) {
            Ok(r) => files.extend(r.files),
            Err(Unresolved::NoData { needed }) => problems.push((
                s.clone(),
                format!(
                    "no data file at `main` nor in the Parquet export ({})",
                    quote_all(&needed)
                ),
            )),
            Err(Unresolved::Invalid(msg)) => problems.push((s.clone(), msg)),
        }
    }
    dedup_keep_order(&mut files);
    (files, problems)
}

fn dedup_keep_order(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|f| seen.insert(f.clone()));
}

/// The splits a task may read: its test, validation, training and few-shot splits, once each.
pub fn task_splits(cfg: &TaskConfig) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in [
        &cfg.test_split,
        &cfg.validation_split,
        &cfg.training_split,
        &cfg.fewshot_split,
    ]
    .into_iter()
    .flatten()
    {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str], readme: Option<&str>) -> Listing {
        let mut f: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        if readme.is_some() {
            f.push(README.into());
        }
        Listing::new(f, readme.map(str::to_string))
    }

    fn dref(config: Option<&str>) -> DatasetRef {
        DatasetRef {
            repo: "o/n".into(),
            config: config.map(str::to_string),
            revision: "main".into(),
            data_dir: None,
            data_files: None,
        }
    }

    #[test]
    fn front_matter_is_the_leading_yaml_block() {
        assert_eq!(front_matter("---\na: 1\n---\n# t"), Some("a: 1\n"));
        assert_eq!(front_matter("\n---\r\na: 1\r\n---  \n"), Some("a: 1\r\n"));
        assert_eq!(front_matter("# t\n---\na: 1\n---\n"), None);
    }

    #[test]
    fn shards_must_all_be_present() {
        let l = listing(
            &[
                "data/train-00000-of-00003.parquet",
                "data/train-00002-of-00003.parquet",
            ],
            None,
        );
        assert_eq!(
            resolve(&l, &dref(None), "train"),
            Err(Unresolved::NoData {
                needed: vec!["data/train-00001-of-00003.parquet".into()]
            })
        );
    }

    #[test]
    fn export_numbering_without_gaps() {
        let l = listing(
            &["default/test/0000.parquet", "default/test/0002.parquet"],
            None,
        );
        assert!(matches!(
            resolve_export(&l, None, "test"),
            Err(Unresolved::NoData { .. })
        ));
        let l = listing(&["c/partial-test/0000.parquet"], None);
        assert_eq!(
            resolve_export(&l, Some("c"), "test").unwrap().files,
            vec!["c/partial-test/0000.parquet".to_string()]
        );
    }

    #[test]
    fn module_inference_prefers_the_most_common_extension_then_parquet() {
        let f = |v: &[&str]| infer_module(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(f(&["a.csv", "b.parquet"]), Some("parquet"));
        assert_eq!(f(&["a.csv", "b.csv", "c.parquet"]), Some("csv"));
        assert_eq!(f(&["a.jsonl", "b.json"]), Some("json"));
        assert_eq!(f(&["metadata.csv", "a.png"]), Some("imagefolder"));
    }
}
