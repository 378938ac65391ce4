//! Writing GGUF v3 files that llama.cpp runs, so that a llama.cpp or Ollama user gets the pruned model in the
//! format they load, without llama.cpp's Python converter.
//!
//! What llama.cpp expects, and what this writer does for it:
//! - from a GGUF input, its metadata (architecture keys as llama.cpp names them, the whole tokenizer) carried
//!   over, with `general.file_type` saying what we wrote; from a Hugging Face folder, the keys llama.cpp's
//!   converter writes, from the configuration ([`super::Config::gguf_metadata`]) and `tokenizer.json`
//!   (byte-level BPE vocabularies: [`crate::data::tokenizer::Tokenizer::gguf_metadata`]);
//! - llama.cpp's tensor names, each tensor turned back from the Hugging Face layout we compute in (the LLaMA
//!   family's Q/K rows permuted for its rotary layout, Gemma's norms stored as `1 + w`): the inverse of what
//!   the reader undoes ([`super::FromGguf`]);
//! - norms and biases in F32 (llama.cpp's converter keeps one-dimensional tensors so), matrices in the type
//!   asked for. Q8_0 and Q4_0 rows that are not whole blocks of 32 fall back to F16, as the converter does.
//!
//! Every type offered keeps a pruned zero exactly zero: F16/BF16 represent 0 exactly, and Q8_0 / Q4_0 store
//! `q · d` with a zero input giving `q = 0` (Q4_0: the offset code 8, i.e. `(8 − 8) · d`). Types with a
//! per-block minimum (Q4_1, the K-quants) would not, and are not offered.
//!
//! Tensors are quantised and written a block of rows at a time, so no second copy of a large tensor is held.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use candle_core::Tensor;
use candle_core::quantized::{GgmlDType, QTensor};

use super::export::{OutDType, TensorSource, encode_floats, produce};
use super::gguf::{Value, permute_rows};
use super::{Checkpoint, FromGguf, TensorSpec, Weights};

/// The file's name inside an output folder.
pub const FILE_NAME: &str = "model.gguf";

/// GGUF's default data alignment (`general.alignment` is left unset).
const ALIGNMENT: usize = 32;

/// Keys of the input that describe how its tensors were stored, not the model: rewritten or dropped.
const STORAGE_KEYS: &[&str] = &["general.file_type", "general.quantization_version", "general.alignment"];

/// Hugging Face name → (GGUF name, how the reader turns the GGUF data into the Hugging Face tensor).
type GgufNames = BTreeMap<String, (String, FromGguf)>;

/// One tensor as written.
struct Entry {
    gguf: String,
    hf: String,
    /// Row-major shape (GGUF stores it reversed).
    shape: Vec<usize>,
    how: FromGguf,
    ty: GgmlDType,
}

impl Entry {
    fn nbytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n / self.ty.block_size() * self.ty.type_size()
    }
}

/// Write `ck`'s model as one GGUF file at `path`: the tensors in `specs`, each produced under its Hugging Face
/// name by `src`.
pub fn write_gguf(
    path: &Path,
    ck: &Checkpoint,
    specs: &[TensorSpec],
    dtype: OutDType,
    src: &mut dyn TensorSource,
) -> Result<()> {
    let (mut metadata, names) = match ck.weights.as_ref() {
        Weights::Gguf(src) => {
            let carried = src.file.metadata.iter().filter(|(k, _)| !STORAGE_KEYS.contains(&k.as_str()));
            (carried.map(|(k, v)| (k.clone(), v.clone())).collect(), src.map.clone())
        }
        Weights::Safetensors(_) => from_hf(ck)?,
    };
    // Hugging Face name → (GGUF name, how the reader turns it back).
    let entries = specs
        .iter()
        .filter(|s| ck.weights.contains(&s.name))
        .map(|s| {
            let (gguf, how) = names.get(&s.name).with_context(|| format!("{}: no GGUF name", s.name))?;
            Ok(Entry { gguf: gguf.clone(), hf: s.name.clone(), shape: s.shape.clone(), how: *how, ty: ty_of(s, dtype) })
        })
        .collect::<Result<Vec<_>>>()?;
    metadata.insert("general.file_type".into(), Value::U32(file_type(dtype)));
    // As llama.cpp's converter writes it, quantised or not.
    metadata.insert("general.quantization_version".into(), Value::U32(2));
    write_file(path, &metadata, &entries, src).with_context(|| format!("{}: write failed", path.display()))
}

/// The metadata and tensor names of a Hugging Face checkpoint as llama.cpp's converter would write them: the
/// architecture's keys ([`super::Config::gguf_metadata`]) and the tokenizer's.
fn from_hf(ck: &Checkpoint) -> Result<(BTreeMap<String, Value>, GgufNames)> {
    let path = ck.path.display();
    let cfg = ck.config.as_ref();
    let model = cfg
        .gguf_metadata()
        .with_context(|| {
            format!(
                "{path}: a Hugging Face {} folder cannot be written as GGUF yet (LLaMA, Qwen2 and Qwen3 can, without sliding windows or LLaMA-3.1 RoPE scaling; a GGUF input can always)",
                cfg.model_type()
            )
        })?;
    let tokenizer = ck.tokenizer.as_ref().with_context(|| format!("{path}: no tokenizer.json to carry over"))?;
    // The configuration's keys last: its special ids win over the tokenizer's.
    let mut metadata: BTreeMap<String, Value> =
        tokenizer.gguf_metadata().with_context(|| format!("{path}: tokenizer.json"))?.into_iter().collect();
    metadata.extend(model);
    metadata.insert("general.type".into(), Value::String("model".into()));
    let name = ck.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    metadata.insert("general.name".into(), Value::String(name));
    let names =
        cfg.gguf_tensor_names().into_iter().filter_map(|g| cfg.hf_name_of_gguf(&g).map(|(hf, how)| (hf, (g, how))));
    Ok((metadata, names.collect()))
}

/// The GGUF type of one tensor: one-dimensional ones in F32; quantised types where the rows are whole blocks.
fn ty_of(s: &TensorSpec, dtype: OutDType) -> GgmlDType {
    if s.shape.len() < 2 {
        return GgmlDType::F32;
    }
    let q = match dtype {
        OutDType::F32 => return GgmlDType::F32,
        OutDType::F16 => return GgmlDType::F16,
        OutDType::Bf16 => return GgmlDType::BF16,
        OutDType::Q8_0 => GgmlDType::Q8_0,
        OutDType::Q4_0 => GgmlDType::Q4_0,
    };
    if s.shape.last().is_some_and(|&n| n.is_multiple_of(q.block_size())) { q } else { GgmlDType::F16 }
}

/// llama.cpp's `llama_ftype` of a file whose matrices are mostly `dtype`.
fn file_type(dtype: OutDType) -> u32 {
    match dtype {
        OutDType::F32 => 0,
        OutDType::F16 => 1,
        OutDType::Q4_0 => 2,
        OutDType::Q8_0 => 7,
        OutDType::Bf16 => 32,
    }
}

/// ggml's type id (ggml.h `ggml_type`).
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 8,
        GgmlDType::BF16 => 30,
        other => unreachable!("{other:?} is never written"),
    }
}

fn write_file(
    path: &Path,
    metadata: &BTreeMap<String, Value>,
    entries: &[Entry],
    src: &mut dyn TensorSource,
) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = Counted { w: BufWriter::with_capacity(1 << 22, f), n: 0 };
    w.put(b"GGUF")?;
    w.put(&3u32.to_le_bytes())?;
    w.put(&(entries.len() as u64).to_le_bytes())?;
    w.put(&(metadata.len() as u64).to_le_bytes())?;
    for (k, v) in metadata {
        w.string(k)?;
        w.put(&value_type(v).to_le_bytes())?;
        w.value(v)?;
    }
    let mut offset = 0usize;
    for e in entries {
        w.string(&e.gguf)?;
        w.put(&(e.shape.len() as u32).to_le_bytes())?;
        for &d in e.shape.iter().rev() {
            w.put(&(d as u64).to_le_bytes())?;
        }
        w.put(&type_id(e.ty).to_le_bytes())?;
        w.put(&(offset as u64).to_le_bytes())?;
        offset += e.nbytes().div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    w.pad()?;
    for e in entries {
        let start = w.n;
        // A rotary permutation mixes the rows of a head: those tensors are produced whole.
        let rows_alone = !matches!(e.how, FromGguf::UnpermuteRows(_));
        produce(src, &e.hf, &e.shape, rows_alone, |t| {
            let t = match e.how {
                FromGguf::AsIs => t.clone(),
                FromGguf::UnpermuteRows(heads) => permute_rows(t, heads)?,
                FromGguf::MinusOne => (t + 1.0)?,
            };
            write_data(&mut w, &t, e.ty)
        })
        .with_context(|| format!("tensor {}", e.gguf))?;
        debug_assert_eq!(w.n - start, e.nbytes());
        w.pad()?;
    }
    let f = w.w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(())
}

/// The data of one tensor in type `ty`, a block of rows at a time.
fn write_data(w: &mut Counted, t: &Tensor, ty: GgmlDType) -> Result<()> {
    const BLOCK: usize = 1 << 16;
    let cols = t.dims().last().copied().unwrap_or(1).max(1);
    let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    let rows_per_block = (BLOCK / cols).max(1);
    crate::linalg::with_f32(&t, |xs| -> Result<()> {
        let mut buf = Vec::with_capacity(BLOCK * 4);
        for block in xs.chunks(rows_per_block * cols) {
            buf.clear();
            match ty {
                GgmlDType::F32 => encode_floats(&mut buf, block, OutDType::F32)?,
                GgmlDType::F16 => encode_floats(&mut buf, block, OutDType::F16)?,
                GgmlDType::BF16 => encode_floats(&mut buf, block, OutDType::Bf16)?,
                _ => {
                    let rows = Tensor::from_slice(block, (block.len() / cols, cols), &candle_core::Device::Cpu)?;
                    buf.extend_from_slice(&QTensor::quantize(&rows, ty)?.data()?);
                }
            }
            w.put(&buf)?;
        }
        Ok(())
    })?
}

/// GGUF's type id of a metadata value (an empty array is written as an array of u32).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A writer that knows its position, for the alignment padding.
struct Counted {
    w: BufWriter<std::fs::File>,
    n: usize,
}

impl Counted {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b)?;
        self.n += b.len();
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pad = self.n.div_ceil(ALIGNMENT) * ALIGNMENT - self.n;
        self.put(&[0u8; ALIGNMENT][..pad])
    }

    fn string(&mut self, s: &str) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    fn value(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::U8(x) => self.put(&x.to_le_bytes()),
            Value::I8(x) => self.put(&x.to_le_bytes()),
            Value::U16(x) => self.put(&x.to_le_bytes()),
            Value::I16(x) => self.put(&x.to_le_bytes()),
            Value::U32(x) => self.put(&x.to_le_bytes()),
            Value::I32(x) => self.put(&x.to_le_bytes()),
            Value::F32(x) => self.put(&x.to_le_bytes()),
            Value::Bool(x) => self.put(&[*x as u8]),
            Value::String(s) => self.string(s),
            Value::U64(x) => self.put(&x.to_le_bytes()),
            Value::I64(x) => self.put(&x.to_le_bytes()),
            Value::F64(x) => self.put(&x.to_le_bytes()),
            Value::Array(a) => {
                let ety = a.first().map(value_type).unwrap_or(4);
                ensure!(a.iter().all(|x| value_type(x) == ety), "a GGUF array holds values of one type");
                self.put(&ety.to_le_bytes())?;
                self.put(&(a.len() as u64).to_le_bytes())?;
                a.iter().try_for_each(|x| self.value(x))
            }
        }
    }
}
