//! Reading tensors from a checkpoint's safetensors files (one file or shards listed in an index).
//!
//! Files are memory-mapped and opened on first use, so a tensor that is never asked for (an opted-out
//! expert, say) is never read, and a shard holding only such tensors is never opened.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

struct Shard {
    path: PathBuf,
    open: OnceLock<std::result::Result<OpenShard, String>>,
}

/// A mapped file with its parsed header, so each tensor read costs no header parse.
struct OpenShard {
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a checkpoint directory, read lazily and converted to f32.
pub struct Weights {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl Weights {
    /// Opens `model.safetensors.index.json` when present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            return Self::open_index(dir, &index_path);
        }
        let path = dir.join("model.safetensors");
        if !path.exists() {
            return Err(Error::Weights {
                path,
                message: "not found (nor model.safetensors.index.json); is this a model directory?"
                    .into(),
            });
        }
        let mut weights = Weights {
            shards: vec![Shard {
                path: path.clone(),
                open: OnceLock::new(),
            }],
            index: HashMap::new(),
        };
        let names: Vec<String> = weights
            .open_shard(0)?
            .metadata
            .tensors()
            .into_keys()
            .collect();
        weights.index = names.into_iter().map(|n| (n, 0)).collect();
        Ok(weights)
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self> {
        let err = |message: String| Error::Weights {
            path: index_path.to_path_buf(),
            message,
        };
        let text =
            std::fs::read_to_string(index_path).map_err(|e| err(format!("cannot read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| err("missing object `weight_map`".into()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if map.values().any(|v| !v.is_string()) {
            return Err(err("`weight_map` values must be file names".into()));
        }
        let files: Vec<&str> = files.into_iter().collect();
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            let path = dir.join(f);
            if !path.exists() {
                return Err(err(format!(
                    "shard `{f}` is listed in weight_map but missing from {}",
                    dir.display()
                )));
            }
            shards.push(Shard {
                path,
                open: OnceLock::new(),
            });
        }
        let index = map
            .iter()
            .map(|(name, file)| {
                let f = file.as_str().unwrap_or_default();
                (
                    name.clone(),
                    files.iter().position(|x| *x == f).unwrap_or(0),
                )
            })
            .collect();
        Ok(Weights { shards, index })
    }

    fn open_shard(&self, shard: usize) -> Result<&OpenShard> {
        let s = &self.shards[shard];
        let open = s.open.get_or_init(|| {
            let file = File::open(&s.path).map_err(|e| format!("cannot open: {e}"))?;
            // SAFETY: checkpoint files are not modified while a model is loading; the map is read-only.
            let mmap =
                unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot memory-map: {e}"))?;
            let (n, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| format!("corrupt or truncated safetensors file: {e}"))?;
            Ok(OpenShard {
                mmap,
                data_start: 8 + n,
                metadata,
            })
        });
        open.as_ref().map_err(|message| Error::Weights {
            path: s.path.clone(),
            message: message.clone(),
        })
    }

    /// True when the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names of all tensors in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Reads the values of tensor `name` as f32 and checks its shape.
    pub fn get_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (path, open, info) = self.entry_of_shape(name, shape)?;
        let (begin, end) = (
            open.data_start + info.data_offsets.0,
            open.data_start + info.data_offsets.1,
        );
        let unsupported = || Error::Weights {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` has dtype {:?}; supported: F32, BF16, F16",
                info.dtype
            ),
        };
        to_f32(info.dtype, &[]).ok_or_else(unsupported)?;
        let mut data = Vec::with_capacity((end - begin) * 8 / info.dtype.bitsize());
        stream(&open.mmap, begin, end, |bytes| {
            data.extend(to_f32(info.dtype, bytes).unwrap_or_default())
        });
        finite(path, name, &data)?;
        Ok(data)
    }

    /// Reads tensor `name` in its stored dtype (bf16 / f16 as their bits) and checks its shape.
    pub fn get_stored(&self, name: &str, shape: &[usize]) -> Result<crate::matmul::Weight> {
        use crate::matmul::Weight;
        let (path, open, info) = self.entry_of_shape(name, shape)?;
        let (begin, end) = (
            open.data_start + info.data_offsets.0,
            open.data_start + info.data_offsets.1,
        );
        let bits = |mmap: &Mmap| -> Vec<u16> {
            let mut v = Vec::with_capacity((end - begin) / 2);
            stream(mmap, begin, end, |bytes| {
                v.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]])),
                )
            });
            v
        };
        // An all-ones exponent is an infinity or a NaN.
        let nonfinite = |v: &[u16], exponent: u16| v.iter().any(|&b| b & exponent == exponent);
        let w = match info.dtype {
            Dtype::BF16 => Weight::Bf16(bits(&open.mmap)),
            Dtype::F16 => Weight::F16(bits(&open.mmap)),
            _ => return self.get_values(name, shape).map(Weight::F32),
        };
        let bad = match &w {
            Weight::Bf16(v) => nonfinite(v, 0x7f80),
            Weight::F16(v) => nonfinite(v, 0x7c00),
            Weight::F32(_) => false,
        };
        if bad {
            finite(path, name, &w.to_f32())?;
        }
        Ok(w)
    }

    /// Reads the rows of the 2-D tensor `name` that `keep` selects as f32, the others zero; the bytes
    /// of rows not kept are never read.
    pub fn get_rows(
        &self,
        name: &str,
        shape: [usize; 2],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<f32>> {
        let (path, open, info) = self.entry_of_shape(name, &shape)?;
        let [rows, cols] = shape;
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{name}` has dtype {other:?}; supported: F32, BF16, F16"
                    ),
                })
            }
        };
        let begin = open.data_start + info.data_offsets.0;
        let mut out = vec![0f32; rows * cols];
        for (r, dst) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            if keep(r) {
                let at = begin + r * cols * width;
                let row = to_f32(info.dtype, &open.mmap[at..at + cols * width]).unwrap_or_default();
                dst.copy_from_slice(&row);
            }
        }
        finite(path, name, &out)?;
        Ok(out)
    }

    /// The stored bytes of tensor `name` with their dtype and shape, borrowed from the memory map (for
    /// tools that copy or compare tensors without converting them).
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let (_, open, info) = self.entry(name)?;
        let (begin, end) = info.data_offsets;
        Ok((
            info.dtype,
            info.shape.clone(),
            &open.mmap[open.data_start + begin..open.data_start + end],
        ))
    }

    /// [`Self::entry`], checked to have `shape`.
    fn entry_of_shape(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(&Path, &OpenShard, &TensorInfo)> {
        let (path, open, info) = self.entry(name)?;
        if info.shape != shape {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    info.shape
                ),
            });
        }
        Ok((path, open, info))
    }

    /// The file, open shard and header entry of tensor `name`.
    fn entry(&self, name: &str) -> Result<(&Path, &OpenShard, &TensorInfo)> {
        let &shard = self.index.get(name).ok_or_else(|| Error::Weights {
            path: self
                .shards
                .first()
                .map(|s| s.path.clone())
                .unwrap_or_default(),
            message: format!("missing tensor `{name}`"),
        })?;
        let path = self.shards[shard].path.as_path();
        let open = self.open_shard(shard)?;
        let info = open.metadata.info(name).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            message: format!("tensor `{name}` (listed in the index) is not in this file"),
        })?;
        Ok((path, open, info))
    }
}

/// A NaN or infinity in a weight poisons every output it reaches without any error; only the values
/// actually read are checked, so opted-out experts stay unread.
fn finite(path: &Path, name: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Weights {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` holds {} non-finite value(s) (first at element {i}: {}); the checkpoint is corrupt",
                data.iter().filter(|x| !x.is_finite()).count(),
                data[i]
            ),
        }),
    }
}

/// The page size [`release_pages`] rounds to.
const PAGE: usize = 4096;

/// Hands `mmap[begin..end]` to `convert` in chunks of whole elements, dropping the pages read so far
/// from this process's resident set after each: loading holds the converted weights plus one chunk of
/// the file, never a whole tensor twice (the largest, an embedding or LM head, was most of the gap
/// between peak memory and the weights' size).
fn stream(mmap: &Mmap, begin: usize, end: usize, mut convert: impl FnMut(&[u8])) {
    // A multiple of every element width (2 and 4 bytes).
    const CHUNK: usize = 1 << 20;
    let (mut at, mut released) = (begin, begin);
    while at < end {
        let next = (at + CHUNK).min(end);
        convert(&mmap[at..next]);
        // From the page the last call stopped at: the page straddling `at` is complete only now.
        release_pages(mmap, released, next);
        released = released.max(next / PAGE * PAGE);
        at = next;
    }
}

/// Drops the whole pages of `mmap[begin..end]` from this process's resident set once they have been
/// converted, so loading does not hold the file and the converted weights in memory at the same time.
fn release_pages(mmap: &Mmap, begin: usize, end: usize) {
    let (first, last) = (begin.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
    if last > first {
        // SAFETY: the map is a read-only private file mapping that no slice outlives here; after
        // MADV_DONTNEED a later access simply reads the page from the file again.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
    }
}

/// Converts stored bytes of an F32, BF16 or F16 tensor to f32 values (`None` for other dtypes).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}
