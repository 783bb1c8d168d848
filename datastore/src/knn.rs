//! kNN-LM entries: one per datastore position, key = the model's final hidden state there (stored as
//! f16), value = the next token, with the block it came from. Keys and entries stay on disk,
//! memory-mapped; key folders are written once and never changed, so a mapping never sees a write.
//! Search is exact (squared L2 over all keys) unless the folder holds an approximate index
//! ([`crate::ann`], built with [`KnnWriter::with_index`] or [`reindex`]), whose candidates are
//! re-ranked with the exact distances.
//!
//! ```
//! use datastore::knn::{KnnIndex, KnnWriter, next_token_distribution};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let mut w = KnnWriter::create(tmp.path(), 2)?;
//! w.push(7, &[0.0, 0.0, 1.0, 1.0], &[42, 43])?; // block 7: two positions
//! w.finish("my-model", "")?;
//! let knn = KnnIndex::open(tmp.path())?;
//! let nn = knn.search(&[0.9, 1.0], 1)?;
//! assert_eq!(knn.value(nn[0].entry), 43);
//! let p = next_token_distribution(&knn, &nn, 10.0);
//! assert_eq!(p[0].0, 43);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::ann::{Ann, AnnSettings};
use crate::manifest::{KnnInfo, Manifest};
use crate::{Error, Result};

pub(crate) const DIR: &str = "knn";
const KEYS: &str = "keys.f16";
const ENTRIES: &str = "entries.bin";
const DIM: &str = "dim";

/// A neighbour: entry index and squared L2 distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbor {
    pub entry: usize,
    pub distance: f32,
}

/// Writes kNN entries block by block into a new key folder; [`KnnWriter::finish`] switches the store
/// to it. In a store, the writer holds the store's writers' lock from `create` to `finish`, so no
/// opt-out can happen between reading the blocks and committing their keys.
pub struct KnnWriter {
    store: PathBuf,
    name: String,
    dir: PathBuf,
    dim: usize,
    keys: BufWriter<File>,
    entries: BufWriter<File>,
    count: u64,
    search: Search,
    _lock: Option<durable::Lock>,
}

impl KnnWriter {
    /// Starts a key folder under the store directory `dir` for keys of `dim` dimensions. In a store,
    /// first completes an interrupted opt-out and removes key folders a killed writer left behind.
    pub fn create(dir: &Path, dim: usize) -> Result<Self> {
        let is_store = dir.join(crate::manifest::FILE).is_file();
        let lock = if is_store {
            let lock = crate::txn::lock(dir)?;
            crate::store::complete_pending(dir)?;
            let current = Manifest::read(dir)?.knn.map(|k| k.dir);
            remove_stale(dir, current.as_deref())?;
            Some(lock)
        } else {
            None
        };
        let name = fresh_name(dir);
        let d = dir.join(&name);
        std::fs::create_dir_all(&d).map_err(Error::io(&d))?;
        let open = |name: &str| -> Result<BufWriter<File>> {
            let p = d.join(name);
            Ok(BufWriter::new(File::create(&p).map_err(Error::io(&p))?))
        };
        std::fs::write(d.join(DIM), dim.to_string()).map_err(Error::io(d.join(DIM)))?;
        Ok(KnnWriter {
            keys: open(KEYS)?,
            entries: open(ENTRIES)?,
            store: dir.to_path_buf(),
            name,
            dir: d,
            dim,
            count: 0,
            search: Search::Exact,
            _lock: lock,
        })
    }

    /// How the keys will be searched: [`KnnWriter::finish`] builds the approximate index it asks for.
    pub fn with_search(mut self, search: Search) -> Self {
        self.search = search;
        self
    }

    /// Adds the entries of one block: `keys` is `values.len()` rows of `dim` floats.
    pub fn push(&mut self, block_id: u64, keys: &[f32], values: &[u32]) -> Result<()> {
        if keys.len() != values.len() * self.dim {
            return Err(Error::Usage(format!(
                "kNN keys: {} floats for {} values of dimension {}",
                keys.len(),
                values.len(),
                self.dim
            )));
        }
        let kp = self.dir.join(KEYS);
        for &x in keys {
            self.keys
                .write_all(&f16::from_f32(x).to_le_bytes())
                .map_err(Error::io(&kp))?;
        }
        let ep = self.dir.join(ENTRIES);
        for &v in values {
            self.entries
                .write_all(&v.to_le_bytes())
                .and_then(|_| self.entries.write_all(&block_id.to_le_bytes()))
                .map_err(Error::io(&ep))?;
        }
        self.count += values.len() as u64;
        durable::fault::point("knn.push");
        Ok(())
    }

    /// Syncs the files and returns the number of entries. In a store, the manifest then records the
    /// keys' folder and model (a name and a hash identifying its weights) in one atomic write, and the
    /// previous keys are removed.
    pub fn finish(self, model: &str, model_sha256: &str) -> Result<u64> {
        self.finish_with(model, model_sha256, &|_, _| {})
    }

    /// [`KnnWriter::finish`], telling `progress` how many entries the approximate index holds so far
    /// while it is built.
    pub fn finish_with(
        mut self,
        model: &str,
        model_sha256: &str,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<u64> {
        for (w, name) in [(&mut self.keys, KEYS), (&mut self.entries, ENTRIES)] {
            let p = self.dir.join(name);
            w.flush().map_err(Error::io(&p))?;
            w.get_ref().sync_all().map_err(Error::io(&p))?;
        }
        durable::sync_dir(&self.dir).map_err(Error::io(&self.dir))?;
        durable::fault::point("knn.written");
        let index = self.search.resolve(self.count);
        if let Some(settings) = index {
            let keys = KnnIndex::open_folder(&self.store, &self.dir)?;
            crate::ann::build(&keys, &self.dir, settings, progress)?;
        }
        let store = &self.store;
        if store.join(crate::manifest::FILE).is_file() {
            let mut m = Manifest::read(store)?;
            m.knn = Some(KnnInfo {
                model: model.to_string(),
                model_sha256: model_sha256.to_string(),
                dim: self.dim,
                entries: self.count,
                dtype: "f16".into(),
                search: search_name(index.as_ref()),
                index,
                dir: self.name.clone(),
            });
            m.write(store)?;
            durable::fault::point("knn.committed");
            remove_stale(store, Some(&self.name))?;
            crate::store::audit(
                store,
                serde_json::json!({"action": "knn", "model": model, "entries": self.count, "identity": m.identity()}),
            )?;
        }
        Ok(self.count)
    }
}

/// Entries from which [`Search::Auto`] builds an approximate index: below, a scan of every key is
/// fast enough and exact.
pub const AUTO_INDEX_ENTRIES: u64 = 1_000_000;

/// How a store's kNN keys are searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Scan every key.
    Exact,
    /// Through an approximate index built with these settings.
    Index(AnnSettings),
    /// An index from [`AUTO_INDEX_ENTRIES`] entries on, exact below.
    Auto(AnnSettings),
}

impl Search {
    /// The index to build for `entries` keys (`None`: exact search).
    pub fn resolve(self, entries: u64) -> Option<AnnSettings> {
        match self {
            Search::Exact => None,
            Search::Index(s) => Some(s),
            Search::Auto(s) => (entries >= AUTO_INDEX_ENTRIES).then_some(s),
        }
    }
}

fn search_name(index: Option<&AnnSettings>) -> String {
    match index {
        Some(_) => "hnsw".into(),
        None => "exact".into(),
    }
}

/// Gives the keys of the store in `dir` the search `search` asks for: an approximate index, or none
/// (exact search). The keys are linked into a new key folder, the index is built there,
/// and the manifest switches to it in one write; `progress` gets the entries indexed so far. Holds the
/// store's writers' lock throughout.
pub fn reindex(
    dir: &Path,
    search: Search,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Manifest> {
    let _lock = crate::txn::lock(dir)?;
    crate::store::complete_pending(dir)?;
    let mut m = Manifest::read(dir)?;
    let Some(info) = m.knn.clone() else {
        return Err(Error::store(
            dir,
            "has no kNN-LM keys; build them with `moeval datastore knn`",
        ));
    };
    remove_stale(dir, Some(&info.dir))?;
    let settings = search.resolve(info.entries);
    let name = fresh_name(dir);
    let d = dir.join(&name);
    std::fs::create_dir_all(&d).map_err(Error::io(&d))?;
    for f in [KEYS, ENTRIES, DIM] {
        crate::manifest::link_or_copy(&dir.join(&info.dir).join(f), &d.join(f))?;
    }
    durable::sync_dir(&d).map_err(Error::io(&d))?;
    if let Some(s) = settings {
        // Only the search breadth changed: the graphs are kept, no rebuild.
        let old = dir.join(&info.dir);
        if !crate::ann::reuse(&old, &d, s)? {
            let keys = KnnIndex::open_folder(dir, &d)?;
            crate::ann::build(&keys, &d, s, progress)?;
        }
    }
    m.knn = Some(KnnInfo {
        search: search_name(settings.as_ref()),
        index: settings,
        dir: name.clone(),
        ..info
    });
    m.write(dir)?;
    durable::fault::point("knn.index.committed");
    remove_stale(dir, Some(&name))?;
    crate::store::audit(
        dir,
        serde_json::json!({"action": "knn-index", "search": search_name(settings.as_ref()), "index": settings, "identity": m.identity()}),
    )?;
    Ok(m)
}

/// A key folder name not in use: `knn`, else `knn-1`, `knn-2`, ...
fn fresh_name(store: &Path) -> String {
    std::iter::once(DIR.to_string())
        .chain((1..).map(|i| format!("{DIR}-{i}")))
        .find(|n| !store.join(n).exists())
        .unwrap_or_else(|| DIR.to_string())
}

/// Removes key folders other than `keep` (left by a killed writer, or replaced). Writers only, under
/// the store's lock.
pub(crate) fn remove_stale(store: &Path, keep: Option<&str>) -> Result<()> {
    let entries = std::fs::read_dir(store).map_err(Error::io(store))?;
    for e in entries {
        let e = e.map_err(Error::io(store))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_keys = name == DIR
            || name
                .strip_prefix("knn-")
                .is_some_and(|n| n.parse::<u64>().is_ok());
        if is_keys && Some(name.as_str()) != keep && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(Error::io(e.path()))?;
        }
    }
    durable::sync_dir(store).map_err(Error::io(store))
}

/// A file's bytes, memory-mapped (an empty file maps to nothing).
struct Mapped(Option<Mmap>);

impl Mapped {
    fn open(path: &Path) -> Result<Mapped> {
        let f = File::open(path).map_err(Error::io(path))?;
        let len = f.metadata().map_err(Error::io(path))?.len();
        if len == 0 {
            return Ok(Mapped(None));
        }
        // Sound because key folders are never written after they are complete (see the module docs).
        let map = unsafe { Mmap::map(&f) }.map_err(Error::io(path))?;
        Ok(Mapped(Some(map)))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// kNN entries, memory-mapped from a key folder, with its approximate index when it has one.
pub struct KnnIndex {
    dim: usize,
    len: usize,
    keys: Mapped,
    entries: Mapped,
    ann: Option<Ann>,
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(Error::io(path))?;
    Ok(buf)
}

/// Entries whose distances one exact-search task computes.
const SCAN_CHUNK: usize = 1 << 14;

impl KnnIndex {
    /// Opens the keys of the store in `dir` (the folder its manifest names; `knn/` outside a store).
    pub fn open(dir: &Path) -> Result<Self> {
        let name = if dir.join(crate::manifest::FILE).is_file() {
            Manifest::read(dir)?.knn.map(|k| k.dir)
        } else {
            None
        };
        Self::open_in(dir, name.as_deref().unwrap_or(DIR))
    }

    pub(crate) fn open_in(dir: &Path, name: &str) -> Result<Self> {
        let mut k = Self::open_folder(dir, &dir.join(name))?;
        k.ann = Ann::open(&dir.join(name), k.dim, k.len as u64)?;
        Ok(k)
    }

    /// Opens the keys and entries of key folder `d` of store `dir`, without its index.
    fn open_folder(dir: &Path, d: &Path) -> Result<Self> {
        let dim_path = d.join(DIM);
        let dim: usize = String::from_utf8_lossy(&read_all(&dim_path)?)
            .trim()
            .parse()
            .map_err(|_| Error::store(dir, format!("{} is not a number", dim_path.display())))?;
        let keys = Mapped::open(&d.join(KEYS))?;
        let entries = Mapped::open(&d.join(ENTRIES))?;
        let (kb, eb) = (keys.bytes().len(), entries.bytes().len());
        let len = eb / 12;
        if eb % 12 != 0 || dim == 0 || kb != len * dim * 2 {
            return Err(Error::store(
                dir,
                format!(
                    "{} and {} disagree in size; rebuild the kNN keys",
                    KEYS, ENTRIES
                ),
            ));
        }
        Ok(KnnIndex {
            dim,
            len,
            keys,
            entries,
            ann: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The approximate index's settings, when search goes through one.
    pub fn index_settings(&self) -> Option<AnnSettings> {
        self.ann.as_ref().map(Ann::settings)
    }

    fn entry(&self, entry: usize) -> &[u8] {
        &self.entries.bytes()[entry * 12..entry * 12 + 12]
    }

    /// Next token stored at an entry.
    pub fn value(&self, entry: usize) -> u32 {
        let e = self.entry(entry);
        u32::from_le_bytes([e[0], e[1], e[2], e[3]])
    }

    /// Block an entry came from.
    pub fn block(&self, entry: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.entry(entry)[4..12]);
        u64::from_le_bytes(b)
    }

    pub(crate) fn key_bytes(&self, entry: usize) -> &[u8] {
        &self.keys.bytes()[entry * self.dim * 2..(entry + 1) * self.dim * 2]
    }

    /// An entry's key, widened to f32 (exactly).
    pub fn key(&self, entry: usize) -> Vec<f32> {
        self.key_bytes(entry)
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    }

    /// Squared L2 distance of an entry's key to `query`, summed in dimension order (the arithmetic
    /// every search uses, so approximate and exact search agree on a neighbour's distance).
    pub fn distance(&self, entry: usize, query: &[f32]) -> f32 {
        self.key_bytes(entry)
            .chunks_exact(2)
            .zip(query)
            .map(|(c, q)| {
                let a = f16::from_le_bytes([c[0], c[1]]).to_f32();
                (a - q) * (a - q)
            })
            .sum()
    }

    /// The `k` nearest entries to `query` by squared L2 distance, nearest first (ties: lower entry):
    /// through the approximate index when the keys have one, else exact.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Neighbor>> {
        match &self.ann {
            Some(ann) if query.len() == self.dim && k > 0 => {
                let mut all = Vec::new();
                // Parts are disjoint and list each entry once, so no entry comes twice; the entries of
                // a group hold identical keys, hence one distance.
                for group in ann.candidates(query, k)? {
                    let distance = self.distance(group[0], query);
                    all.extend(group.into_iter().map(|entry| Neighbor { entry, distance }));
                }
                Ok(nearest(all, k))
            }
            _ => Ok(self.search_exact(query, k)),
        }
    }

    /// The `k` nearest entries by scanning every key (the reference the approximate index is measured
    /// against).
    pub fn search_exact(&self, query: &[f32], k: usize) -> Vec<Neighbor> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let chunks = self.len.div_ceil(SCAN_CHUNK);
        let found: Vec<Neighbor> = (0..chunks)
            .into_par_iter()
            .flat_map_iter(|c| {
                let first = c * SCAN_CHUNK;
                let last = (first + SCAN_CHUNK).min(self.len);
                let all = (first..last)
                    .map(|entry| Neighbor {
                        entry,
                        distance: self.distance(entry, query),
                    })
                    .collect();
                nearest(all, k)
            })
            .collect();
        nearest(found, k)
    }
}

/// The `k` nearest of `all`, nearest first (ties: lower entry).
fn nearest(mut all: Vec<Neighbor>, k: usize) -> Vec<Neighbor> {
    let order = |a: &Neighbor, b: &Neighbor| {
        a.distance
            .total_cmp(&b.distance)
            .then(a.entry.cmp(&b.entry))
    };
    if all.len() > k {
        all.select_nth_unstable_by(k - 1, order);
        all.truncate(k);
    }
    all.sort_by(order);
    all
}

/// Weight of each neighbour: softmax of negative distance / temperature (same order as `nn`).
pub fn neighbor_weights(nn: &[Neighbor], temperature: f32) -> Vec<f64> {
    let t = f64::from(temperature.max(f32::MIN_POSITIVE));
    let logits: Vec<f64> = nn.iter().map(|n| -f64::from(n.distance) / t).collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// p_kNN: the neighbours' weights summed per next token, most probable first (ties: lower token).
pub fn next_token_distribution(
    knn: &KnnIndex,
    nn: &[Neighbor],
    temperature: f32,
) -> Vec<(u32, f64)> {
    let mut p: Vec<(u32, f64)> = Vec::new();
    for (n, w) in nn.iter().zip(neighbor_weights(nn, temperature)) {
        let v = knn.value(n.entry);
        match p.iter_mut().find(|(t, _)| *t == v) {
            Some(e) => e.1 += w,
            None => p.push((v, w)),
        }
    }
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    p
}

/// Writes the store's keys without the entries of `blocks` into a new folder, synced, with an index
/// when the current keys have one (parts that held removed entries rebuilt), and returns its name and
/// the number of entries dropped. The caller switches the manifest to it.
pub(crate) fn remove_blocks(
    dir: &Path,
    current: &str,
    blocks: &HashSet<u64>,
) -> Result<(String, u64)> {
    let knn = KnnIndex::open_folder(dir, &dir.join(current))?;
    let name = fresh_name(dir);
    let d = dir.join(&name);
    std::fs::create_dir_all(&d).map_err(Error::io(&d))?;
    let kept: Vec<bool> = (0..knn.len())
        .map(|i| !blocks.contains(&knn.block(i)))
        .collect();
    let removed = kept.iter().filter(|&&k| !k).count() as u64;
    // Streamed to temporary files, synced, then renamed: a store's keys need not fit in memory.
    for file in [KEYS, ENTRIES] {
        let (p, tmp) = (d.join(file), d.join(format!("{file}.tmp")));
        let mut w = BufWriter::new(File::create(&tmp).map_err(Error::io(&tmp))?);
        for i in (0..knn.len()).filter(|&i| kept[i]) {
            let row = if file == KEYS {
                knn.key_bytes(i)
            } else {
                knn.entry(i)
            };
            w.write_all(row).map_err(Error::io(&tmp))?;
        }
        w.flush().map_err(Error::io(&tmp))?;
        w.get_ref().sync_all().map_err(Error::io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(Error::io(&p))?;
    }
    crate::manifest::write_atomic(&d.join(DIM), knn.dim.to_string().as_bytes())?;
    if dir.join(current).join(crate::ann::LAYOUT).is_file() {
        let compacted = KnnIndex::open_folder(dir, &d)?;
        crate::ann::carry_over(&dir.join(current), &d, &kept, &compacted)?;
    }
    Ok((name, removed))
}
