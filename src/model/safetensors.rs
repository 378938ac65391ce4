//! Memory-mapped safetensors files, single or sharded (`model.safetensors.index.json`).
//!
//! The header of every shard is validated by the `safetensors` crate (offsets contiguous, data exactly
//! filling the file), so a truncated file or a header that lies is an error naming the file. Tensors are
//! converted to f32 only when asked for, one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::{Metadata, SafeTensors};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// All tensors of a Hugging Face checkpoint, by name.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    /// name → shard index
    index: BTreeMap<String, usize>,
}

/// Shape and storage type of one tensor, as stored.
#[derive(Debug, Clone)]
pub struct StoredInfo {
    pub shape: Vec<usize>,
    pub dtype: String,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: read-only map of a file we never write while it is mapped.
    let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))?;
    let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow!(
            "{}: invalid safetensors file ({e}); truncated, corrupted, or the header lies about sizes",
            path.display()
        )
    })?;
    Ok(Shard { path: path.to_path_buf(), mmap, header_len, meta })
}

impl SafetensorsStore {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    bail!("{}: shard name {f:?} escapes the model directory", index.display());
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json (a Hugging Face model directory is expected)",
                dir.display()
            );
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let shard = open_shard(f)?;
            for name in shard.meta.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    bail!("{}: tensor {name} is also in another shard", f.display());
                }
            }
            shards.push(shard);
        }
        Ok(Self { shards, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<StoredInfo> {
        let s = &self.shards[*self.index.get(name)?];
        let i = s.meta.info(name)?;
        Some(StoredInfo { shape: i.shape.clone(), dtype: format!("{:?}", i.dtype) })
    }

    /// Load one tensor as f32 (F32, F16 and BF16 are stored types we accept).
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let shape = self.info(name).ok_or_else(|| anyhow!("tensor {name} not found in the checkpoint"))?.shape;
        // A 0-D tensor is read as one row.
        let t = self.load_rows_f32(name, 0..shape.first().copied().unwrap_or(1))?;
        Ok(t.reshape(shape)?)
    }

    /// Rows `rows` (outermost dimension) of one tensor as f32, read alone from the mapped file.
    pub fn load_rows_f32(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let si = *self.index.get(name).ok_or_else(|| anyhow!("tensor {name} not found in the checkpoint"))?;
        let s = &self.shards[si];
        let info = s.meta.info(name).expect("indexed");
        let mut shape = if info.shape.is_empty() { vec![1] } else { info.shape.clone() };
        let n = shape[0];
        if rows.start > rows.end || rows.end > n {
            bail!("{}: tensor {name}: rows {rows:?} out of 0..{n}", s.path.display());
        }
        let row_bytes = (info.data_offsets.1 - info.data_offsets.0) / n.max(1);
        let start = 8 + s.header_len + info.data_offsets.0 + rows.start * row_bytes;
        let end = start + rows.len() * row_bytes;
        let bytes = &s.mmap[start..end];
        shape[0] = rows.len();
        let values = match info.dtype {
            Dtype::F32 => to_f32(bytes, f32::from_le_bytes),
            Dtype::F16 => to_f32(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => to_f32(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
            other => {
                bail!("{}: tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported", s.path.display())
            }
        };
        Tensor::from_vec(values, shape, &Device::Cpu).with_context(|| format!("{}: tensor {name}", s.path.display()))
    }
}

/// Elements per conversion task. When the layers do not fit in memory, a layer's weights are read again on
/// every batch, so the conversion runs on all threads (on one, it took as long as the layer's forward pass on
/// sixteen). Every conversion to f32 is exact, so the split changes nothing.
const CONVERT_CHUNK: usize = 1 << 16;

/// Little-endian values of `N` bytes each, as f32.
fn to_f32<const N: usize>(bytes: &[u8], value: impl Fn([u8; N]) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; bytes.len() / N];
    out.par_chunks_mut(CONVERT_CHUNK).zip(bytes.par_chunks(N * CONVERT_CHUNK)).for_each(|(dst, src)| {
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(N)) {
            *d = value(b.try_into().expect("N bytes"));
        }
    });
    out
}
