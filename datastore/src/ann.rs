//! Approximate kNN over a store's keys, for stores too large to scan: HNSW graphs from usearch.
//!
//! Invariants:
//! - The keys stay in the key folder (`keys.f16`, memory-mapped); the graphs are extra files there.
//! - The keys are cut into contiguous *parts*; part `i` covers entries `start..start + len` and labels
//!   its vectors `0..len`. Each part is built alone, on one thread, in entry order: a build holds at
//!   most one part's graph per thread in memory, the same keys always give the same graphs, and an
//!   opt-out rebuilds only the parts that held removed entries.
//! - Part files are written once (temporary file, sync, rename) and never changed; `ann.json` lists
//!   them and is written last, so a folder either has a complete index or is not switched to.
//! - The graphs only propose candidates: [`crate::knn::KnnIndex::search`] re-ranks them with the exact
//!   distances, so every neighbour returned carries the distance exact search gives it.

use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::knn::KnnIndex;
use crate::{Error, Result};

/// The file listing a key folder's parts.
pub(crate) const LAYOUT: &str = "ann.json";

/// How an approximate index is built and searched. Every field can change which neighbours are found,
/// so all of them are in the store's manifest.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AnnSettings {
    /// Edges per graph node (HNSW's M).
    pub connectivity: usize,
    /// Candidates kept while inserting (HNSW's efConstruction).
    pub expansion_add: usize,
    /// Candidates kept while searching (HNSW's ef); a search for more neighbours keeps that many.
    pub expansion_search: usize,
    /// Entries per part (the last part may hold fewer).
    pub part_entries: u64,
}

impl Default for AnnSettings {
    fn default() -> Self {
        AnnSettings {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            part_entries: 1 << 20,
        }
    }
}

impl AnnSettings {
    /// Entries per part that keep one part's graph and vectors within `mib` MiB for keys of `dim`
    /// dimensions (f16 vectors, `connectivity` edges per node in both directions on the base layer).
    pub fn part_entries_for(mib: u64, dim: usize, connectivity: usize) -> u64 {
        let per_entry = (dim * 2 + connectivity * 2 * 4 + 64) as u64;
        ((mib << 20) / per_entry).max(1024)
    }

    fn options(&self, dim: usize) -> IndexOptions {
        IndexOptions {
            dimensions: dim,
            metric: MetricKind::L2sq,
            quantization: ScalarKind::F16,
            connectivity: self.connectivity,
            expansion_add: self.expansion_add,
            expansion_search: self.expansion_search,
            multi: false,
        }
    }
}

/// One graph file and the entries it covers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Part {
    pub file: String,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Layout {
    library: String,
    settings: AnnSettings,
    parts: Vec<Part>,
}

const LIBRARY: &str = "usearch hnsw, f16 vectors, squared L2";

/// An opened approximate index: the parts' graphs, memory-mapped.
pub(crate) struct Ann {
    settings: AnnSettings,
    parts: Vec<(Part, Index)>,
}

fn usearch_error<E: std::fmt::Display>(path: &Path, what: &str) -> impl FnOnce(E) -> Error {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| Error::Input {
        path,
        message: format!("{what}: {e}; rebuild the kNN index"),
    }
}

impl Ann {
    /// Opens the index of key folder `dir` (keys of `dim` dimensions, `entries` of them), or `None` when
    /// the folder has none.
    pub(crate) fn open(dir: &Path, dim: usize, entries: u64) -> Result<Option<Ann>> {
        let path = dir.join(LAYOUT);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path)(e)),
        };
        let layout: Layout = serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            path: path.clone(),
            message: format!("invalid index layout: {e}"),
        })?;
        let covered: u64 = layout.parts.iter().map(|p| p.len).sum();
        if covered != entries {
            return Err(Error::Input {
                path,
                message: format!(
                    "the index covers {covered} entries, the keys hold {entries}; rebuild the kNN index"
                ),
            });
        }
        let threads = rayon::current_num_threads().max(1);
        let mut parts = Vec::with_capacity(layout.parts.len());
        for p in layout.parts {
            let file = dir.join(&p.file);
            let index = Index::new(&layout.settings.options(dim))
                .map_err(usearch_error(&file, "cannot create the index"))?;
            index
                .view(&file.to_string_lossy())
                .map_err(usearch_error(&file, "cannot map the index"))?;
            if index.size() as u64 != p.len || index.dimensions() != dim {
                return Err(Error::Input {
                    path: file,
                    message: format!(
                        "holds {} vectors of {} dimensions, expected {} of {dim}; rebuild the kNN index",
                        index.size(),
                        index.dimensions(),
                        p.len
                    ),
                });
            }
            // One search context per thread that may search at once.
            index
                .reserve_capacity_and_threads(index.size(), threads)
                .map_err(usearch_error(&file, "cannot prepare the index for search"))?;
            parts.push((p, index));
        }
        Ok(Some(Ann {
            settings: layout.settings,
            parts,
        }))
    }

    pub(crate) fn settings(&self) -> AnnSettings {
        self.settings
    }

    /// Candidate entries for the `k` nearest neighbours of `query`: up to `k` from every part.
    pub(crate) fn candidates(&self, query: &[f32], k: usize) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(k * self.parts.len());
        for (p, index) in &self.parts {
            let m = index
                .search(query, k.min(p.len as usize))
                .map_err(|e| Error::Usage(format!("kNN index search failed: {e}")))?;
            out.extend(m.keys.iter().map(|&label| (p.start + label) as usize));
        }
        Ok(out)
    }
}

/// Builds the graph of entries `start..start + len` of `keys` into `dir/file` (through a temporary
/// file, synced, then renamed).
fn build_part(
    keys: &KnnIndex,
    dir: &Path,
    settings: &AnnSettings,
    start: u64,
    len: u64,
) -> Result<Part> {
    let file = format!("part-{start:012}-{len}.usearch");
    let path = dir.join(&file);
    let tmp = dir.join(format!("{file}.tmp"));
    let index = Index::new(&settings.options(keys.dim()))
        .map_err(usearch_error(&path, "cannot create the index"))?;
    index
        .reserve(len as usize)
        .map_err(usearch_error(&path, "cannot reserve the index"))?;
    // In entry order on one thread: the graph then depends on the keys alone, so a rebuild (after a
    // crash, or on another machine) gives the same neighbours. Parts are built in parallel instead.
    for label in 0..len {
        let key = keys.key((start + label) as usize);
        index
            .add(label, &key)
            .map_err(usearch_error(&path, "cannot add a key"))?;
    }
    index
        .save(&tmp.to_string_lossy())
        .map_err(usearch_error(&tmp, "cannot save the index"))?;
    drop(index);
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io(&path))?;
    durable::fault::point("knn.index.part");
    Ok(Part { file, start, len })
}

/// Writes the list of parts, completing the index of key folder `dir`.
fn write_layout(dir: &Path, settings: AnnSettings, parts: Vec<Part>) -> Result<()> {
    let layout = Layout {
        library: LIBRARY.into(),
        settings,
        parts,
    };
    let json = serde_json::to_vec_pretty(&layout).map_err(|e| Error::Usage(e.to_string()))?;
    crate::manifest::write_atomic(&dir.join(LAYOUT), &json)?;
    durable::sync_dir(dir).map_err(Error::io(dir))
}

/// Builds an index over all of `keys` in its key folder `dir`, up to one part per thread at a time;
/// `progress` gets the entries indexed so far.
pub(crate) fn build(
    keys: &KnnIndex,
    dir: &Path,
    settings: AnnSettings,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    if settings.connectivity < 2 || settings.expansion_add == 0 || settings.expansion_search == 0 {
        return Err(Error::Usage(
            "kNN index settings: connectivity must be at least 2, expansions at least 1".into(),
        ));
    }
    let n = keys.len() as u64;
    let step = settings.part_entries.max(1);
    let ranges: Vec<(u64, u64)> = (0..n.div_ceil(step))
        .map(|i| (i * step, step.min(n - i * step)))
        .collect();
    let done = std::sync::atomic::AtomicU64::new(0);
    let parts = ranges
        .into_par_iter()
        .map(|(start, len)| {
            let part = build_part(keys, dir, &settings, start, len)?;
            let sofar = done.fetch_add(len, std::sync::atomic::Ordering::Relaxed) + len;
            progress(sofar, n);
            Ok(part)
        })
        .collect::<Result<Vec<Part>>>()?;
    write_layout(dir, settings, parts)
}

/// After an opt-out compacted the keys from folder `old` into `new` (`kept[i]`: whether old entry `i`
/// survived), gives `new` an index: a part none of whose entries went is linked as it is, at its new
/// offset; a part that lost entries is rebuilt from the remaining keys, so removed keys are in no
/// file of the new folder.
pub(crate) fn carry_over(old: &Path, new: &Path, kept: &[bool], keys: &KnnIndex) -> Result<()> {
    let bytes = std::fs::read(old.join(LAYOUT)).map_err(Error::io(old.join(LAYOUT)))?;
    let layout: Layout = serde_json::from_slice(&bytes).map_err(|e| Error::Input {
        path: old.join(LAYOUT),
        message: format!("invalid index layout: {e}"),
    })?;
    let mut parts = Vec::new();
    let mut new_start = 0u64;
    for p in layout.parts {
        let range = p.start as usize..(p.start + p.len) as usize;
        let survivors = kept[range].iter().filter(|&&k| k).count() as u64;
        if survivors == p.len {
            let file = format!("part-{new_start:012}-{}.usearch", p.len);
            let to = new.join(&file);
            if !to.exists() {
                std::fs::hard_link(old.join(&p.file), &to)
                    .or_else(|_| std::fs::copy(old.join(&p.file), &to).map(|_| ()))
                    .map_err(Error::io(&to))?;
            }
            parts.push(Part {
                file,
                start: new_start,
                len: p.len,
            });
        } else if survivors > 0 {
            parts.push(build_part(
                keys,
                new,
                &layout.settings,
                new_start,
                survivors,
            )?);
        }
        new_start += survivors;
    }
    write_layout(new, layout.settings, parts)
}
