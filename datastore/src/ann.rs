//! Approximate kNN over a store's keys, for stores too large to scan: HNSW graphs from usearch.
//!
//! Invariants:
//! - The keys stay in the key folder (`keys.f16`, memory-mapped); the graphs are extra files there.
//! - The keys are cut into contiguous *parts*; part `i` covers entries `start..start + len` and labels
//!   its vectors by their offset `0..len`. Each part is built alone, on one thread, in entry order: a
//!   build holds at most one part's graph per thread in memory, the same keys always give the same
//!   graphs, and an opt-out rebuilds only the parts that held removed entries.
//! - A key repeated within a part (every document's first position, boilerplate) enters the graph
//!   once, at its first offset; the part's duplicates file lists the offsets that share it. Thousands
//!   of identical vectors otherwise fill each other's edge lists, and a query that lands away from the
//!   keys (a model with an expert opted out) cannot walk the graph to its true neighbours.
//! - Part files are written once (temporary file, sync, rename) and never changed; `ann.json` lists
//!   them and is written last, so a folder either has a complete index or is not switched to.
//! - The graphs only propose candidates: [`crate::knn::KnnIndex::search`] re-ranks them with the exact
//!   distances, so every neighbour returned carries the distance exact search gives it.

use std::collections::hash_map::{Entry, HashMap};
use std::path::Path;

use memmap2::Mmap;
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
            // Measured on 6.5M keys with queries from a model with an expert opted out (far from
            // the keys): kNN-LM perplexity within 1% of exact search needs this breadth.
            connectivity: 32,
            expansion_add: 256,
            expansion_search: 16384,
            part_entries: 1 << 20,
        }
    }
}

impl AnnSettings {
    /// Entries per part that keep one part's graph and vectors within `mib` MiB for keys of `dim`
    /// dimensions (f16 vectors, `connectivity` edges per node in both directions on the base layer,
    /// and the table that finds repeated keys while building).
    pub fn part_entries_for(mib: u64, dim: usize, connectivity: usize) -> u64 {
        let per_entry = (dim * 2 + connectivity * 2 * 4 + 64 + 48) as u64;
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
    /// The file of `(first offset, offset)` pairs (little-endian u64, sorted) for the offsets whose key
    /// repeats an earlier one's; absent when every key of the part is distinct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<String>,
}

/// A part's duplicates file, memory-mapped.
struct Duplicates(Mmap);

impl Duplicates {
    fn pair(&self, i: usize) -> (u64, u64) {
        let b = &self.0[i * 16..i * 16 + 16];
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[..8]);
        let first = u64::from_le_bytes(x);
        x.copy_from_slice(&b[8..]);
        (first, u64::from_le_bytes(x))
    }

    fn len(&self) -> usize {
        self.0.len() / 16
    }

    /// The offsets sharing the key at `first`, ascending, at most `limit` of them.
    fn of(&self, first: u64, limit: usize) -> impl Iterator<Item = u64> + '_ {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.pair(mid).0 < first {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo..self.len())
            .map(|i| self.pair(i))
            .take_while(move |p| p.0 == first)
            .map(|p| p.1)
            .take(limit)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Layout {
    library: String,
    settings: AnnSettings,
    parts: Vec<Part>,
}

/// Names the graphs' format; an index whose layout names another is rebuilt, never reused.
const LIBRARY: &str = "usearch hnsw, f16 vectors, squared L2, repeated keys once";

/// An opened approximate index: the parts' graphs and duplicates, memory-mapped.
pub(crate) struct Ann {
    settings: AnnSettings,
    parts: Vec<(Part, Index, Option<Duplicates>)>,
}

fn usearch_error<E: std::fmt::Display>(path: &Path, what: &str) -> impl FnOnce(E) -> Error {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| Error::Input {
        path,
        message: format!("{what}: {e}; rebuild the kNN index"),
    }
}

/// The layout of key folder `dir`'s index, or `None` when the folder has none.
fn read_layout(dir: &Path) -> Result<Option<Layout>> {
    let path = dir.join(LAYOUT);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Input {
                path,
                message: format!("invalid index layout: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path)(e)),
    }
}

impl Ann {
    /// Opens the index of key folder `dir` (keys of `dim` dimensions, `entries` of them), or `None` when
    /// the folder has none.
    pub(crate) fn open(dir: &Path, dim: usize, entries: u64) -> Result<Option<Ann>> {
        let Some(layout) = read_layout(dir)? else {
            return Ok(None);
        };
        let covered: u64 = layout.parts.iter().map(|p| p.len).sum();
        if covered != entries {
            return Err(Error::Input {
                path: dir.join(LAYOUT),
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
            let duplicates = match &p.duplicates {
                Some(name) => {
                    let path = dir.join(name);
                    let f = std::fs::File::open(&path).map_err(Error::io(&path))?;
                    // SAFETY: part files are written once and never changed while a store is open.
                    let map = unsafe { Mmap::map(&f) }.map_err(Error::io(&path))?;
                    if map.len() % 16 != 0 {
                        return Err(Error::Input {
                            path,
                            message: "truncated duplicates file; rebuild the kNN index".into(),
                        });
                    }
                    Some(Duplicates(map))
                }
                None => None,
            };
            let distinct = p.len - duplicates.as_ref().map_or(0, |d| d.len() as u64);
            if index.size() as u64 != distinct || index.dimensions() != dim {
                return Err(Error::Input {
                    path: file,
                    message: format!(
                        "holds {} vectors of {} dimensions, expected {distinct} of {dim}; rebuild the kNN index",
                        index.size(),
                        index.dimensions(),
                    ),
                });
            }
            // One search context per thread that may search at once.
            index
                .reserve_capacity_and_threads(index.size(), threads)
                .map_err(usearch_error(&file, "cannot prepare the index for search"))?;
            parts.push((p, index, duplicates));
        }
        Ok(Some(Ann {
            settings: layout.settings,
            parts,
        }))
    }

    pub(crate) fn settings(&self) -> AnnSettings {
        self.settings
    }

    /// Candidates for the `k` nearest neighbours of `query`, in groups of entries that share one key
    /// (the first entry of each group is the one in the graph): up to `k` keys from every part, each
    /// with the first `k` entries holding it (ties between equal distances go to the lower entry, so
    /// no later one can be among the `k` nearest).
    pub(crate) fn candidates(&self, query: &[f32], k: usize) -> Result<Vec<Vec<usize>>> {
        let mut out = Vec::with_capacity(k * self.parts.len());
        for (p, index, duplicates) in &self.parts {
            let m = index
                .search(query, k.min(index.size()))
                .map_err(|e| Error::Usage(format!("kNN index search failed: {e}")))?;
            for &label in &m.keys {
                let mut group = vec![(p.start + label) as usize];
                if let Some(d) = duplicates {
                    group.extend(d.of(label, k - 1).map(|o| (p.start + o) as usize));
                }
                out.push(group);
            }
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
    let mut first: HashMap<&[u8], u64> = HashMap::new();
    let mut distinct: Vec<u64> = Vec::new();
    let mut repeats: Vec<(u64, u64)> = Vec::new();
    for label in 0..len {
        let bytes = keys.key_bytes((start + label) as usize);
        match first.entry(bytes) {
            Entry::Occupied(f) => repeats.push((*f.get(), label)),
            Entry::Vacant(v) => {
                v.insert(label);
                distinct.push(label);
            }
        }
    }
    drop(first);
    // In entry order on one thread: the graph then depends on the keys alone, so a rebuild (after a
    // crash, or on another machine) gives the same neighbours; parts are built in parallel instead.
    // A scrambled order found held-out keys' neighbours more often at small search breadths but served
    // kNN-LM with an expert opted out worse at the default breadth (docs/datastore.md).
    for label in distinct {
        index
            .add(label, &keys.key((start + label) as usize))
            .map_err(usearch_error(&path, "cannot add a key"))?;
    }
    let duplicates = if repeats.is_empty() {
        None
    } else {
        repeats.sort_unstable();
        let name = format!("part-{start:012}-{len}.duplicates");
        let bytes: Vec<u8> = repeats
            .iter()
            .flat_map(|&(f, o)| f.to_le_bytes().into_iter().chain(o.to_le_bytes()))
            .collect();
        crate::manifest::write_atomic(&dir.join(&name), &bytes)?;
        Some(name)
    };
    index
        .save(&tmp.to_string_lossy())
        .map_err(usearch_error(&tmp, "cannot save the index"))?;
    drop(index);
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io(&path))?;
    durable::fault::point("knn.index.part");
    Ok(Part {
        file,
        start,
        len,
        duplicates,
    })
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

/// Gives key folder `new` the graphs of `old` (same keys) when they were built as `settings` asks,
/// apart from `expansion_search`, which only searches read: the part files are linked and the new
/// breadth recorded. False (nothing written) when the graphs must be built.
pub(crate) fn reuse(old: &Path, new: &Path, settings: AnnSettings) -> Result<bool> {
    let Some(layout) = read_layout(old)? else {
        return Ok(false);
    };
    let same = AnnSettings {
        expansion_search: settings.expansion_search,
        ..layout.settings
    };
    if layout.library != LIBRARY || same != settings {
        return Ok(false);
    }
    for p in &layout.parts {
        for f in std::iter::once(&p.file).chain(&p.duplicates) {
            crate::manifest::link_or_copy(&old.join(f), &new.join(f))?;
        }
    }
    write_layout(new, settings, layout.parts)?;
    Ok(true)
}

/// After an opt-out compacted the keys from folder `old` into `new` (`kept[i]`: whether old entry `i`
/// survived), gives `new` an index: a part none of whose entries went is linked as it is, at its new
/// offset; a part that lost entries is rebuilt from the remaining keys, so removed keys are in no
/// file of the new folder.
pub(crate) fn carry_over(old: &Path, new: &Path, kept: &[bool], keys: &KnnIndex) -> Result<()> {
    let layout = read_layout(old)?
        .ok_or_else(|| Error::io(old.join(LAYOUT))(std::io::ErrorKind::NotFound.into()))?;
    let mut parts = Vec::new();
    let mut new_start = 0u64;
    for p in layout.parts {
        let range = p.start as usize..(p.start + p.len) as usize;
        let survivors = kept[range].iter().filter(|&&k| k).count() as u64;
        if survivors == p.len {
            let link = |from: &str, file: String| -> Result<String> {
                let to = new.join(&file);
                if !to.exists() {
                    crate::manifest::link_or_copy(&old.join(from), &to)?;
                }
                Ok(file)
            };
            parts.push(Part {
                file: link(&p.file, format!("part-{new_start:012}-{}.usearch", p.len))?,
                start: new_start,
                len: p.len,
                duplicates: match &p.duplicates {
                    Some(d) => Some(link(
                        d,
                        format!("part-{new_start:012}-{}.duplicates", p.len),
                    )?),
                    None => None,
                },
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
