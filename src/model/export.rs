//! Writing checkpoints: Hugging Face model directories (`config.json`, `tokenizer.json` and safetensors,
//! sharded past a size limit, with `model.safetensors.index.json`), or one GGUF file ([`super::export_gguf`]).
//!
//! Tensors are streamed: the header is computed from the shapes first, then each tensor is produced, converted
//! and written one at a time, so a model larger than memory can be written. The caller assembles the
//! directory aside and renames it into place when complete ([`crate::output::AtomicDir`]).

use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};
use serde_json::json;

use crate::data::tokenizer::Tokenizer;
use crate::model::{Checkpoint, Format, TensorSpec, Weights, layer_of};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[allow(non_camel_case_types)] // ggml's names
pub enum OutDType {
    F32,
    F16,
    Bf16,
    /// GGUF only: 8-bit blocks of 32 with an f16 scale (pruned zeros stay exactly zero).
    #[serde(rename = "q8_0")]
    #[cfg_attr(feature = "cli", value(name = "q8_0"))]
    Q8_0,
    /// GGUF only: 4-bit blocks of 32 with an f16 scale (pruned zeros stay exactly zero).
    #[serde(rename = "q4_0")]
    #[cfg_attr(feature = "cli", value(name = "q4_0"))]
    Q4_0,
}

/// The format a checkpoint is written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum OutFormat {
    /// A Hugging Face folder: config.json, tokenizer, safetensors.
    #[default]
    Hf,
    /// One GGUF file, `model.gguf` in the output folder, that llama.cpp loads.
    Gguf,
}

/// How a checkpoint is written.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct WriteOptions {
    /// Output weight type (default: the input's decoder weights'; f32 for GGUF input). q8_0 and q4_0 are for
    /// GGUF output.
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub dtype: Option<OutDType>,
    /// Output format: a Hugging Face folder, or `model.gguf` (llama.cpp) in the output folder.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = OutFormat::Hf))]
    pub out_format: OutFormat,
    /// Largest safetensors shard, in GB.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 5.0))]
    pub max_shard_gb: f64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { dtype: None, out_format: OutFormat::Hf, max_shard_gb: 5.0 }
    }
}

impl WriteOptions {
    pub fn max_shard_bytes(&self) -> usize {
        (self.max_shard_gb * 1e9) as usize
    }

    /// Refuse a combination that cannot be written, before any work.
    pub fn check(&self) -> Result<()> {
        if let Some(d @ (OutDType::Q8_0 | OutDType::Q4_0)) = self.dtype
            && self.out_format != OutFormat::Gguf
        {
            bail!("--dtype {} is a GGUF type: add --out-format gguf", d.name());
        }
        Ok(())
    }

    /// `--dtype`, else the stored type of `ck`'s decoder layers (f32 for GGUF, whose weights are quantised).
    pub fn dtype_for(&self, ck: &Checkpoint) -> OutDType {
        self.dtype.unwrap_or_else(|| {
            if ck.format == Format::Gguf {
                return OutDType::F32;
            }
            let names = ck.weights.names();
            let dt = names.iter().find(|n| layer_of(n).is_some()).and_then(|n| ck.weights.meta(n)).map(|m| m.dtype);
            match dt.as_deref() {
                Some("BF16") => OutDType::Bf16,
                Some("F16") => OutDType::F16,
                _ => OutDType::F32,
            }
        })
    }
}

impl OutDType {
    /// Bytes per weight, for the free-space check (blocks of 32 with a 2-byte scale for the GGUF types).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            OutDType::F32 => 4.0,
            OutDType::F16 | OutDType::Bf16 => 2.0,
            OutDType::Q8_0 => 34.0 / 32.0,
            OutDType::Q4_0 => 18.0 / 32.0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OutDType::F32 => "f32",
            OutDType::F16 => "f16",
            OutDType::Bf16 => "bf16",
            OutDType::Q8_0 => "q8_0",
            OutDType::Q4_0 => "q4_0",
        }
    }
    fn size(self) -> usize {
        match self {
            OutDType::F32 => 4,
            _ => 2,
        }
    }
    fn st_name(self) -> &'static str {
        match self {
            OutDType::F32 => "F32",
            OutDType::F16 => "F16",
            OutDType::Bf16 => "BF16",
            OutDType::Q8_0 | OutDType::Q4_0 => unreachable!("refused by WriteOptions::check"),
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDType::F32 => "float32",
            OutDType::F16 => "float16",
            OutDType::Bf16 => "bfloat16",
            OutDType::Q8_0 | OutDType::Q4_0 => unreachable!("refused by WriteOptions::check"),
        }
    }
}

/// Where the writers get each tensor (f32, in the Hugging Face layout).
pub trait TensorSource {
    /// The whole tensor `name`.
    fn load(&mut self, name: &str) -> Result<Tensor>;

    /// Rows `rows` of the matrix `name`, read alone, where this source can (a memory-mapped input tensor);
    /// `None` where it cannot. A writer takes a matrix above [`STREAM_ELEMENTS`] this way, a block of rows at a
    /// time, so that it is never whole in memory (Gemma 3's embeddings are 671 MB in f32).
    fn load_rows(&mut self, _name: &str, _rows: Range<usize>) -> Option<Result<Tensor>> {
        None
    }
}

impl<F: FnMut(&str) -> Result<Tensor>> TensorSource for F {
    fn load(&mut self, name: &str) -> Result<Tensor> {
        self(name)
    }
}

/// An input checkpoint's own tensors (`convert`).
impl TensorSource for &Weights {
    fn load(&mut self, name: &str) -> Result<Tensor> {
        Weights::load(self, name)
    }

    fn load_rows(&mut self, name: &str, rows: Range<usize>) -> Option<Result<Tensor>> {
        Some(Weights::load_rows(self, name, rows))
    }
}

/// An input checkpoint's tensors with its decoder layers' from `layers` (layer index, name): a pruned model.
pub struct WithLayers<'a, F> {
    pub weights: &'a Weights,
    pub layers: F,
}

impl<F: FnMut(usize, &str) -> Result<Tensor>> TensorSource for WithLayers<'_, F> {
    fn load(&mut self, name: &str) -> Result<Tensor> {
        match layer_of(name) {
            Some(i) => (self.layers)(i, name),
            None => self.weights.load(name),
        }
    }

    fn load_rows(&mut self, name: &str, rows: Range<usize>) -> Option<Result<Tensor>> {
        layer_of(name).is_none().then(|| self.weights.load_rows(name, rows))
    }
}

/// Matrices above this many elements are written a block of rows at a time when their source can read rows
/// alone (16 MiB per block in f32).
pub const STREAM_ELEMENTS: usize = 1 << 22;

/// Produce tensor `name` of shape `shape` from `src` and hand it to `each`: in blocks of whole rows when it is a
/// large matrix, `rows_alone` allows it and the source can, else whole. Every block's shape is checked.
pub(super) fn produce(
    src: &mut dyn TensorSource,
    name: &str,
    shape: &[usize],
    rows_alone: bool,
    mut each: impl FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    if let ([rows, cols], true) = (shape, rows_alone && shape.iter().product::<usize>() > STREAM_ELEMENTS) {
        let step = (STREAM_ELEMENTS / cols.max(&1)).max(1);
        let mut start = 0;
        while start < *rows {
            let end = (start + step).min(*rows);
            let Some(block) = src.load_rows(name, start..end) else {
                ensure!(start == 0, "tensor {name}: rows {start}..{end} cannot be read alone");
                break;
            };
            let block = block?;
            ensure!(
                block.dims() == [end - start, *cols],
                "tensor {name}: rows {start}..{end} produced shape {:?}",
                block.dims()
            );
            each(&block)?;
            start = end;
        }
        if start > 0 {
            return Ok(());
        }
    }
    let t = src.load(name)?;
    if t.dims() != shape {
        bail!("tensor {name}: produced shape {:?}, expected {:?}", t.dims(), shape);
    }
    each(&t)
}

/// Write `t` as little-endian `dtype`, converting a block at a time (no whole copy of a large tensor).
fn write_tensor(w: &mut impl Write, t: &Tensor, dtype: OutDType) -> Result<()> {
    const BLOCK: usize = 1 << 16;
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    let mut buf = Vec::with_capacity(BLOCK * 4);
    crate::linalg::with_f32(&t, |xs| -> Result<()> {
        for block in xs.chunks(BLOCK) {
            buf.clear();
            encode_floats(&mut buf, block, dtype)?;
            w.write_all(&buf)?;
        }
        Ok(())
    })?
}

/// Append `xs` to `buf` as little-endian f32, f16 or bf16 (the block types are the GGUF writer's).
pub(super) fn encode_floats(buf: &mut Vec<u8>, xs: &[f32], dtype: OutDType) -> Result<()> {
    match dtype {
        OutDType::F32 => buf.extend(xs.iter().flat_map(|x| x.to_le_bytes())),
        OutDType::F16 => buf.extend(xs.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes())),
        OutDType::Bf16 => buf.extend(xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())),
        OutDType::Q8_0 | OutDType::Q4_0 => bail!("{} is a GGUF type", dtype.name()),
    }
    Ok(())
}

/// Write one safetensors file holding `specs`, producing each tensor from `src`.
pub fn write_safetensors(path: &Path, specs: &[TensorSpec], dtype: OutDType, src: &mut dyn TensorSource) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for TensorSpec { name, shape, .. } in specs {
        let n = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            json!({"dtype": dtype.st_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // Pad so that the data starts 8-byte aligned, as the reference writer does.
    while (hbytes.len() + 8) % 8 != 0 {
        hbytes.push(b' ');
    }
    let f = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, f);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
    w.write_all(&hbytes)?;
    for TensorSpec { name, shape, .. } in specs {
        produce(src, name, shape, true, |t| write_tensor(&mut w, t, dtype))
            .with_context(|| format!("{}: write failed", path.display()))?;
    }
    let f = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("{}: write failed", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Write the weights of a model into `dir` as `model.safetensors`, or as shards of at most
/// `max_shard_bytes` with an index.
pub fn write_weights(
    dir: &Path,
    specs: &[TensorSpec],
    dtype: OutDType,
    max_shard_bytes: usize,
    src: &mut dyn TensorSource,
) -> Result<()> {
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for t in specs {
        let n = t.shape.iter().product::<usize>() * dtype.size();
        if size > 0 && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(t.clone());
        size += n;
        total += n;
    }
    if shards.len() == 1 {
        return write_safetensors(&dir.join("model.safetensors"), &shards[0], dtype, src);
    }
    let k = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{k:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&file), shard, dtype, src)?;
        for t in shard {
            weight_map.insert(t.name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    Ok(())
}

/// Write the tokenizer files transformers' `AutoTokenizer` reads.
pub fn write_tokenizer(dir: &Path, tok: &Tokenizer) -> Result<()> {
    std::fs::write(dir.join("tokenizer.json"), tok.to_json()?)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// `ck`'s model with the tensors `specs` (each produced by `src`), written into the existing directory `dir`
/// in the format `format`.
pub fn write_checkpoint(
    dir: &Path,
    ck: &Checkpoint,
    specs: &[TensorSpec],
    dtype: OutDType,
    write: &WriteOptions,
    src: &mut dyn TensorSource,
) -> Result<()> {
    write.check()?;
    match write.out_format {
        OutFormat::Hf => write_hf_contents(
            dir,
            &ck.config.to_hf_json(),
            ck.tokenizer.as_ref(),
            specs,
            dtype,
            write.max_shard_bytes(),
            src,
        ),
        OutFormat::Gguf => {
            super::export_gguf::write_gguf(&dir.join(super::export_gguf::FILE_NAME), ck, specs, dtype, src)
        }
    }
}

/// The files of a Hugging Face model directory, written into the existing directory `dir`.
pub fn write_hf_contents(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer: Option<&Tokenizer>,
    specs: &[TensorSpec],
    dtype: OutDType,
    max_shard_bytes: usize,
    src: &mut dyn TensorSource,
) -> Result<()> {
    let mut config = config.clone();
    config["torch_dtype"] = json!(dtype.torch_name());
    config["dtype"] = json!(dtype.torch_name());
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    if let Some(t) = tokenizer {
        write_tokenizer(dir, t)?;
    }
    write_weights(dir, specs, dtype, max_shard_bytes, src)
}
