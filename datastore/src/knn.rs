//! kNN-LM entries: one per datastore position, key = the model's final hidden state there (stored as
//! f16), value = the next token, with the block it came from. Search is exact (squared L2 over all
//! keys), which is what small stores need and what makes opt-out trivially exact.
//!
//! ```
//! use datastore::knn::{KnnIndex, KnnWriter, next_token_distribution};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let mut w = KnnWriter::create(tmp.path(), 2)?;
//! w.push(7, &[0.0, 0.0, 1.0, 1.0], &[42, 43])?; // block 7: two positions
//! w.finish("my-model", "")?;
//! let knn = KnnIndex::open(tmp.path())?;
//! let nn = knn.search(&[0.9, 1.0], 1);
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
            _lock: lock,
        })
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
    pub fn finish(mut self, model: &str, model_sha256: &str) -> Result<u64> {
        for (w, name) in [(&mut self.keys, KEYS), (&mut self.entries, ENTRIES)] {
            let p = self.dir.join(name);
            w.flush().map_err(Error::io(&p))?;
            w.get_ref().sync_all().map_err(Error::io(&p))?;
        }
        durable::sync_dir(&self.dir).map_err(Error::io(&self.dir))?;
        durable::fault::point("knn.written");
        let store = &self.store;
        if store.join(crate::manifest::FILE).is_file() {
            let mut m = Manifest::read(store)?;
            m.knn = Some(KnnInfo {
                model: model.to_string(),
                model_sha256: model_sha256.to_string(),
                dim: self.dim,
                entries: self.count,
                dtype: "f16".into(),
                search: "exact".into(),
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

/// kNN entries in memory (keys widened to f32 for the distance loop).
pub struct KnnIndex {
    dim: usize,
    keys: Vec<f32>,
    values: Vec<u32>,
    blocks: Vec<u64>,
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(Error::io(path))?;
    Ok(buf)
}

impl KnnIndex {
    /// Loads `knn/` from a store directory.
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
        let d = dir.join(name);
        let dim_path = d.join(DIM);
        let dim: usize = String::from_utf8_lossy(&read_all(&dim_path)?)
            .trim()
            .parse()
            .map_err(|_| Error::store(dir, format!("{} is not a number", dim_path.display())))?;
        let kb = read_all(&d.join(KEYS))?;
        let eb = read_all(&d.join(ENTRIES))?;
        let n = eb.len() / 12;
        if eb.len() % 12 != 0 || dim == 0 || kb.len() != n * dim * 2 {
            return Err(Error::store(
                dir,
                format!(
                    "{} and {} disagree in size; rebuild the kNN keys",
                    KEYS, ENTRIES
                ),
            ));
        }
        let keys = kb
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let (values, blocks) = eb
            .chunks_exact(12)
            .map(|c| {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[4..12]);
                (v, u64::from_le_bytes(b))
            })
            .unzip();
        Ok(KnnIndex {
            dim,
            keys,
            values,
            blocks,
        })
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Next token stored at an entry.
    pub fn value(&self, entry: usize) -> u32 {
        self.values[entry]
    }

    /// Block an entry came from.
    pub fn block(&self, entry: usize) -> u64 {
        self.blocks[entry]
    }

    /// The `k` nearest entries to `query` by squared L2 distance, nearest first (ties: lower entry).
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Neighbor> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let mut all: Vec<Neighbor> = self
            .keys
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(entry, key)| Neighbor {
                entry,
                distance: key.iter().zip(query).map(|(a, b)| (a - b) * (a - b)).sum(),
            })
            .collect();
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

/// Writes the store's keys without the entries of `blocks` into a new folder, synced, and returns its
/// name and the number of entries dropped. The caller switches the manifest to it.
pub(crate) fn remove_blocks(
    dir: &Path,
    current: &str,
    blocks: &HashSet<u64>,
) -> Result<(String, u64)> {
    let knn = KnnIndex::open_in(dir, current)?;
    let name = fresh_name(dir);
    let d = dir.join(&name);
    std::fs::create_dir_all(&d).map_err(Error::io(&d))?;
    let mut keys = Vec::new();
    let mut entries = Vec::new();
    let mut removed = 0;
    for i in 0..knn.len() {
        if blocks.contains(&knn.blocks[i]) {
            removed += 1;
            continue;
        }
        for &x in &knn.keys[i * knn.dim..(i + 1) * knn.dim] {
            keys.extend_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        entries.extend_from_slice(&knn.values[i].to_le_bytes());
        entries.extend_from_slice(&knn.blocks[i].to_le_bytes());
    }
    for (file, bytes) in [
        (KEYS, keys),
        (ENTRIES, entries),
        (DIM, knn.dim.to_string().into_bytes()),
    ] {
        let p = d.join(file);
        crate::manifest::write_atomic(&p, &bytes)?;
    }
    Ok((name, removed))
}
