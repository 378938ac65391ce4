//! GGUF (v2/v3) reader: metadata, tensor directory and dequantisation to f32.
//!
//! The parser is our own rather than candle's `gguf_file`, because a file whose header lies must give a
//! clear error and never a panic or a huge allocation: every length read from the file is checked against
//! the bytes that remain before anything is allocated, and every tensor's extent against the file size.
//! Dequantisation itself is candle's (`qtensor_from_ggml`), fed from the memory map.
//!
//! GGUF conventions handled here: dimensions are stored fastest-first (`ne[0]` = inputs of a weight), so
//! the row-major shape is the reverse; and llama.cpp stores the Q and K projections of `llama`-architecture
//! models permuted for its adjacent-pair rotary layout, which [`unpermute_rows`] undoes so that weights come
//! out in the Hugging Face layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::quantized::{GgmlDType, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// Row-major shape (the reverse of GGUF's `ne`).
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Tensor names in file order.
    pub order: Vec<String>,
    mmap: Mmap,
}

/// GGUF type ids of the quantisations we can dequantise (ggml.h `ggml_type`).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Names of ggml types we know of but cannot dequantise, for the error message.
fn ggml_type_name(id: u32) -> String {
    let known = [
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    known.iter().find(|(k, _)| *k == id).map(|(_, n)| n.to_string()).unwrap_or_else(|| format!("type id {id}"))
}

pub fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Bounded little-endian reader over the mapped bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            anyhow!("truncated: {what} needs {n} bytes at offset {} but the file has {}", self.pos, self.buf.len())
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    /// A count or length: u32 in v1, u64 from v2 on.
    fn len(&mut self, version: u32) -> Result<u64> {
        if version == 1 { self.u32().map(|v| v as u64) } else { self.u64() }
    }
    fn string(&mut self, version: u32, what: &str) -> Result<String> {
        let n = self.len(version)?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| anyhow!("{what}: string length {n} at offset {} runs past the end of the file", self.pos))?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, version: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string(version, key)?),
            9 => {
                ensure!(depth == 0, "metadata {key}: nested arrays are not supported");
                let ety = self.u32()?;
                let n = self.len(version)?;
                // Every element takes at least one byte: a count above the remaining bytes is a lie.
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= self.remaining())
                    .ok_or_else(|| anyhow!("metadata {key}: array length {n} runs past the end of the file"))?;
                // Grown as elements are read, so that a lying count allocates nothing it cannot fill.
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    v.push(self.value(ety, version, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => bail!("metadata {key}: unknown value type {t}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only map; the file is not modified by us while mapped.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))?;
        Self::parse(path, mmap).with_context(|| format!("{}: not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut r = Reader { buf: &mmap, pos: 0 };
        let magic = r.take(4, "magic")?;
        ensure!(magic == b"GGUF", "bad magic {:?} (expected \"GGUF\")", String::from_utf8_lossy(magic));
        let version = r.u32()?;
        ensure!((1..=3).contains(&version), "unsupported GGUF version {version}");
        let n_tensors = r.len(version)?;
        let n_kv = r.len(version)?;
        // Each KV pair takes at least 12 bytes and each tensor info at least 24.
        ensure!(
            n_kv.saturating_mul(12) <= r.remaining() as u64,
            "header claims {n_kv} metadata entries, more than the file can hold (truncated, or the header lies)"
        );
        ensure!(
            n_tensors.saturating_mul(24) <= r.remaining() as u64,
            "header claims {n_tensors} tensors, more than the file can hold (truncated, or the header lies)"
        );
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string(version, "metadata key")?;
            let ty = r.u32()?;
            let v = r.value(ty, version, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().ok_or_else(|| anyhow!("general.alignment is not an integer"))? as usize,
            None => 32,
        };
        ensure!(alignment > 0 && alignment.is_power_of_two(), "general.alignment {alignment} is not a power of two");

        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(version, "tensor name")?;
            let n_dims = r.u32()? as usize;
            ensure!(n_dims <= 4, "tensor {name}: {n_dims} dimensions (at most 4)");
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(r.len(version)?);
            }
            let ty = r.u32()?;
            let offset = r.u64()?;
            let dtype = ggml_dtype(ty).ok_or_else(|| {
                anyhow!("tensor {name}: unsupported quantisation {} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)", ggml_type_name(ty))
            })?;
            let mut elems: u64 = 1;
            for &d in &ne {
                elems = elems.checked_mul(d).ok_or_else(|| anyhow!("tensor {name}: shape {ne:?} overflows"))?;
            }
            let bs = dtype.block_size() as u64;
            ensure!(
                ne.first().copied().unwrap_or(1) % bs == 0,
                "tensor {name}: row length {} is not a multiple of the {} block size {bs}",
                ne.first().copied().unwrap_or(1),
                dtype_name(dtype)
            );
            let nbytes = (elems / bs)
                .checked_mul(dtype.type_size() as u64)
                .ok_or_else(|| anyhow!("tensor {name}: size overflows"))?;
            let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
            infos.push((i, name, shape, dtype, offset, nbytes));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = BTreeMap::new();
        let mut order = Vec::new();
        for (_, name, shape, dtype, offset, nbytes) in infos {
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => bail!(
                    "tensor {name} ({} {:?}) claims bytes {}..{} but the file is only {file_len} bytes (truncated, or the header lies)",
                    dtype_name(dtype),
                    shape,
                    data_start as u64 + offset,
                    (data_start as u64).saturating_add(offset).saturating_add(nbytes),
                ),
            }
            ensure!(!tensors.contains_key(&name), "tensor {name} appears twice");
            order.push(name.clone());
            tensors.insert(
                name.clone(),
                TensorEntry {
                    name,
                    shape,
                    dtype,
                    offset: (data_start as u64 + offset) as usize,
                    nbytes: nbytes as usize,
                },
            );
        }
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, order, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata key {key} is missing", self.path.display()))?
            .as_u64()
            .ok_or_else(|| anyhow!("{}: metadata key {key} is not an unsigned integer", self.path.display()))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata key {key} is missing", self.path.display()))?
            .as_f64()
            .ok_or_else(|| anyhow!("{}: metadata key {key} is not a number", self.path.display()))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata key {key} is missing", self.path.display()))?
            .as_str()
            .ok_or_else(|| anyhow!("{}: metadata key {key} is not a string", self.path.display()))
    }

    /// Dequantise one tensor to f32 in its row-major shape.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let e = self.tensors.get(name).ok_or_else(|| anyhow!("{}: no tensor named {name}", self.path.display()))?;
        self.dequantize_bytes(name, e, e.offset..e.offset + e.nbytes, e.shape.clone())
    }

    /// Rows `rows` of the 2-D tensor `name` (outermost dimension first), dequantised to f32: a block of a
    /// 262k-row embedding without the rest of it. Every row is a whole number of quantisation blocks (GGUF
    /// requires it), so a range of rows is a range of bytes.
    pub fn dequantize_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let e = self.tensors.get(name).ok_or_else(|| anyhow!("{}: no tensor named {name}", self.path.display()))?;
        let (n, cols) = match e.shape[..] {
            [n, cols] => (n, cols),
            _ => bail!("{}: tensor {name} is not a matrix ({:?})", self.path.display(), e.shape),
        };
        ensure!(rows.start <= rows.end && rows.end <= n, "tensor {name}: rows {rows:?} out of 0..{n}");
        let row_bytes = e.nbytes / n.max(1);
        let start = e.offset + rows.start * row_bytes;
        self.dequantize_bytes(name, e, start..start + rows.len() * row_bytes, vec![rows.len(), cols])
    }

    fn dequantize_bytes(
        &self,
        name: &str,
        e: &TensorEntry,
        bytes: std::ops::Range<usize>,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        let raw = &self.mmap[bytes];
        let nbytes = raw.len();
        let ctx = || format!("{}: tensor {name} ({})", self.path.display(), dtype_name(e.dtype));
        // candle reinterprets the bytes as blocks in place, which needs 4-byte alignment (f32 / f16 fields).
        let aligned;
        let raw = if (raw.as_ptr() as usize).is_multiple_of(4) {
            raw
        } else {
            let mut buf = vec![0u32; nbytes.div_ceil(4)];
            // SAFETY: buf has at least nbytes bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, nbytes) };
            dst.copy_from_slice(raw);
            aligned = buf;
            // SAFETY: same allocation, nbytes long.
            unsafe { std::slice::from_raw_parts(aligned.as_ptr() as *const u8, nbytes) }
        };
        let q = qtensor_from_ggml(e.dtype, raw, shape, &Device::Cpu).with_context(ctx)?;
        q.dequantize(&Device::Cpu).with_context(ctx)
    }
}

/// Undo llama.cpp's rotary permutation of a Q or K projection (rows = heads × head_dim).
///
/// llama.cpp's converter reshapes the Hugging Face rows as (heads, 2, head_dim/2) and swaps the last two
/// axes, so that the two halves that HF rotates together become adjacent pairs. We apply the inverse:
/// view as (heads, head_dim/2, 2) and swap back. Works for weights (rows × in) and biases (rows).
pub fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    ensure!(rows.is_multiple_of(2 * n_heads), "cannot un-permute {rows} rows into {n_heads} rotary heads");
    let half = rows / n_heads / 2;
    let rest: usize = dims[1..].iter().product();
    let t = t.reshape((n_heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(t.reshape(dims)?)
}

/// llama.cpp's rotary permutation of Q/K rows, as its converter applies it to a Hugging Face weight (the inverse
/// of [`unpermute_rows`]): for GGUF output.
pub fn permute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    ensure!(rows.is_multiple_of(2 * n_heads), "cannot permute {rows} rows into {n_heads} rotary heads");
    let rest: usize = dims[1..].iter().product();
    let t = t.reshape((n_heads, 2, rows / n_heads / 2, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(t.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, written the way its converter writes it.
    fn permute(t: &Tensor, n_heads: usize) -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((n_heads, 2, rows / n_heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let t = Tensor::arange(0f32, 24.0 * 3.0, &Device::Cpu).unwrap().reshape((24, 3)).unwrap();
        for heads in [1, 2, 3, 6] {
            let back = unpermute_rows(&permute(&t, heads), heads).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap(), "heads {heads}");
            // Ours, for GGUF output, is the converter's.
            let ours = permute_rows(&t, heads).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(ours, permute(&t, heads).to_vec2::<f32>().unwrap(), "heads {heads}");
        }
        assert!(unpermute_rows(&t, 5).is_err());
        assert!(permute_rows(&t, 5).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap property test of the header parser: random and mutated headers give errors, not panics.
        let real = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama_gguf/tiny.gguf")).unwrap();
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dir = std::env::temp_dir().join(format!("fistaprune-gguf-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.gguf");
        for i in 0..300 {
            let mut b = real[..(real.len().min(4096))].to_vec();
            if i % 3 == 0 {
                b.truncate((next() as usize) % b.len());
            }
            for _ in 0..(1 + next() % 8) {
                let at = (next() as usize) % b.len().max(1);
                if let Some(x) = b.get_mut(at) {
                    *x = next() as u8;
                }
            }
            std::fs::write(&p, &b).unwrap();
            let _ = GgufFile::open(&p);
        }
    }
}
