//! Checkpoints and architectures.
//!
//! A [`Checkpoint`] is a configuration, a tokenizer and a [`Weights`] store that hands out tensors by their
//! Hugging Face names, converted to f32 one at a time from a memory map (safetensors or GGUF). An
//! architecture is one file ([`llama`], [`opt`]) holding everything about it: its configuration (a
//! [`Config`]: `config.json` as serde reads it, GGUF metadata), one table of its tensor names, and the
//! [`CausalLm`] it builds: embeddings and head are materialised once, decoder layers only when
//! [`CausalLm::load_layer`] is called, so a pruner can hold one layer at a time. Each [`DecoderLayer`] names its
//! linear operators and reports their inputs to an optional hook. Nothing outside this module knows which
//! architecture it runs; adding one is its file and a line in [`ARCHITECTURES`].

pub mod export;
pub mod export_gguf;
pub mod gemma3;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod llama;
pub mod opt;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use serde_json::Value as Json;

pub use linear::Linear;

use crate::data::tokenizer::Tokenizer;
use gguf::GgufFile;
use safetensors::SafetensorsStore;

/// Where the weights come from.
pub enum Weights {
    Safetensors(SafetensorsStore),
    Gguf(GgufWeights),
}

/// A GGUF file seen through Hugging Face tensor names.
pub struct GgufWeights {
    pub file: GgufFile,
    /// HF name → (GGUF name, how its data becomes the Hugging Face tensor)
    map: BTreeMap<String, (String, FromGguf)>,
}

/// Shape and stored type of one tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Every architecture: how to read its `config.json` (by `model_type`) and its GGUF metadata (by
/// `general.architecture`).
#[rustfmt::skip]
pub const ARCHITECTURES: &[Architecture] = &[
    llama::ARCHITECTURE,
    opt::ARCHITECTURE,
    gemma3::ARCHITECTURE,
];

/// An architecture in the registry.
pub struct Architecture {
    /// The `model_type` values of `config.json` it reads.
    pub model_types: &'static [&'static str],
    /// The `general.architecture` values of GGUF files it reads.
    pub gguf_architectures: &'static [&'static str],
    pub from_hf: fn(&Json) -> Result<ModelConfig>,
    pub from_gguf: Option<fn(&GgufFile) -> Result<ModelConfig>>,
}

/// A configuration, shared by the checkpoint and the model built from it.
pub type ModelConfig = Arc<dyn Config>;

/// What the rest of the program knows of an architecture, from its configuration.
pub trait Config: std::fmt::Debug + Send + Sync {
    /// `llama`, `qwen2`, `opt`, ... as the checkpoint names it.
    fn model_type(&self) -> &str;
    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn eos_token_id(&self) -> Option<u32>;
    fn max_positions(&self) -> usize;
    /// Multiply-add FLOPs (2 per MAC) of one token's forward pass in a causal window of `seqlen`: every
    /// linear operator, the LM head, and attention (QKᵀ and PV over the (seqlen + 1) / 2 keys a query sees).
    fn flops_per_token(&self, seqlen: usize) -> f64;
    /// Every tensor the architecture reads, under its Hugging Face name, in the order checkpoints are written
    /// (`weights`: the names a checkpoint uses where an architecture has variants).
    fn tensors(&self, weights: &Weights) -> Vec<TensorSpec>;
    /// The Hugging Face name of GGUF tensor `name`, and how its data becomes the Hugging Face tensor.
    fn hf_name_of_gguf(&self, name: &str) -> Option<(String, FromGguf)>;
    /// A `config.json` that Hugging Face `transformers` loads.
    fn to_hf_json(&self) -> Json;
    /// For GGUF output from a Hugging Face folder: llama.cpp's `general.architecture` and model keys for this
    /// configuration, or None where llama.cpp has no graph for it.
    fn gguf_metadata(&self) -> Option<Vec<(String, gguf::Value)>> {
        None
    }
    /// Every GGUF tensor name the configuration may have (mapped to Hugging Face by `hf_name_of_gguf`).
    fn gguf_tensor_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// The model (embeddings and head in f32 now, layers on demand).
    fn build(&self, weights: Arc<Weights>) -> Result<Box<dyn CausalLm>>;
}

/// A token id in `config.json`, or several (some configs list several EOS ids: the first is the one used).
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(t) => Some(*t),
            Self::Many(v) => v.first().copied(),
        }
    }
}

/// How a GGUF tensor's data becomes its Hugging Face counterpart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromGguf {
    AsIs,
    /// llama.cpp's rotary permutation of Q/K rows (its `llama` architecture), over this many heads.
    UnpermuteRows(usize),
    /// llama.cpp stores Gemma's RMSNorm weights as `1 + w`; Hugging Face stores `w`.
    MinusOne,
}

/// One tensor an architecture reads.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Absent tensors that are not required are not read (a bias the configuration does not ask for).
    pub required: bool,
    /// The weight of a linear operator of a decoder layer: what pruning prunes.
    pub linear: bool,
}

impl TensorSpec {
    pub fn new(name: &str, shape: Vec<usize>, required: bool) -> Self {
        Self { name: name.to_string(), shape, required, linear: false }
    }
}

/// Parse a Hugging Face `config.json`.
pub fn config_from_hf_json(j: &Json) -> Result<ModelConfig> {
    let model_type = j.get("model_type").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("missing \"model_type\""))?;
    let known = || ARCHITECTURES.iter().flat_map(|a| a.model_types.iter().copied()).collect::<Vec<_>>().join(", ");
    let arch = ARCHITECTURES
        .iter()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| anyhow!("unsupported architecture \"{model_type}\" (supported: {})", known()))?;
    (arch.from_hf)(j)
}

/// Read the configuration of a GGUF file.
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let name = g.get_str("general.architecture")?;
    let readers = || ARCHITECTURES.iter().filter(|a| a.from_gguf.is_some());
    let known = readers().flat_map(|a| a.gguf_architectures.iter().copied()).collect::<Vec<_>>().join(", ");
    let from = readers().find(|a| a.gguf_architectures.contains(&name)).and_then(|a| a.from_gguf).ok_or_else(|| {
        anyhow!("{}: unsupported GGUF architecture \"{name}\" (supported: {known})", g.path.display())
    })?;
    from(g)
}

impl GgufWeights {
    /// The GGUF tensor behind Hugging Face name `name`, and how it maps.
    fn entry(&self, name: &str) -> Result<&(String, FromGguf)> {
        self.map.get(name).ok_or_else(|| anyhow!("{}: no tensor for {name}", self.file.path.display()))
    }

    fn new(file: GgufFile, cfg: &dyn Config) -> Result<Self> {
        let mut map = BTreeMap::new();
        for g in &file.order {
            let (hf, how) = cfg.hf_name_of_gguf(g).ok_or_else(|| {
                anyhow!("{}: tensor {g} is not part of a supported {} model", file.path.display(), cfg.model_type())
            })?;
            map.insert(hf, (g.clone(), how));
        }
        Ok(Self { file, map })
    }
}

impl Weights {
    pub fn names(&self) -> Vec<String> {
        match self {
            Weights::Safetensors(s) => s.names().cloned().collect(),
            Weights::Gguf(g) => g.map.keys().cloned().collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors(s) => s.contains(name),
            Weights::Gguf(g) => g.map.contains_key(name),
        }
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        match self {
            Weights::Safetensors(s) => {
                s.info(name).map(|i| TensorMeta { name: name.to_string(), shape: i.shape, dtype: i.dtype })
            }
            Weights::Gguf(g) => {
                let (gname, _) = g.map.get(name)?;
                let e = g.file.tensors.get(gname)?;
                Some(TensorMeta {
                    name: name.to_string(),
                    shape: e.shape.clone(),
                    dtype: gguf::dtype_name(e.dtype).into(),
                })
            }
        }
    }

    /// One tensor in f32, in the Hugging Face layout.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        match self {
            Weights::Safetensors(s) => s.load_f32(name),
            Weights::Gguf(g) => {
                let (gname, how) = g.entry(name)?;
                let t = g.file.dequantize(gname)?;
                match how {
                    FromGguf::AsIs => Ok(t),
                    FromGguf::UnpermuteRows(h) => gguf::unpermute_rows(&t, *h),
                    FromGguf::MinusOne => Ok((t - 1.0)?),
                }
            }
        }
    }

    /// Rows `rows` of the matrix `name` in f32, read alone (the rest of it is not touched): how a large
    /// embedding is embedded from and written out. Only for tensors stored in the Hugging Face row order
    /// (a rotary-permuted GGUF projection is read whole and cut).
    pub fn load_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor> {
        match self {
            Weights::Safetensors(s) => s.load_rows_f32(name, rows),
            Weights::Gguf(g) => {
                let (gname, how) = g.entry(name)?;
                match how {
                    FromGguf::AsIs => g.file.dequantize_rows(gname, rows),
                    FromGguf::MinusOne => Ok((g.file.dequantize_rows(gname, rows)? - 1.0)?),
                    FromGguf::UnpermuteRows(_) => Ok(self.load(name)?.narrow(0, rows.start, rows.len())?),
                }
            }
        }
    }

    /// Load `name`, check its shape, and place it on the run's device: how a model reads its tensors.
    pub fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        ensure!(t.dims() == shape, "tensor {name} has shape {:?} but the configuration implies {:?}", t.dims(), shape);
        Ok(t.to_device(crate::device::current())?)
    }
}

/// Where a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HfDir,
    Gguf,
}

/// A model on disk: configuration, tokenizer (when one ships with it), and weights.
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: Format,
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    pub weights: Arc<Weights>,
}

impl Checkpoint {
    /// Open a Hugging Face model directory or a `.gguf` file.
    /// A path that does not exist but reads `org/name` is a Hugging Face Hub model ([`hub::resolve`]).
    pub fn open(path: &Path) -> Result<Self> {
        let resolved = hub::resolve(path)?;
        let path = resolved.as_path();
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        // An output folder of `--out-format gguf` holds its model.gguf beside report.json.
        let gguf_in_dir = path.join(export_gguf::FILE_NAME);
        if path.is_dir() && !path.join("config.json").exists() && gguf_in_dir.is_file() {
            return Self::open_gguf(&gguf_in_dir);
        }
        if path.is_dir() { Self::open_hf_dir(path) } else { Self::open_gguf(path) }
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let config = config_from_hf_json(&json).with_context(|| format!("{}", cfg_path.display()))?;
        let weights = Weights::Safetensors(SafetensorsStore::open_dir(dir)?);
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
        let ck = Self { path: dir.to_path_buf(), format: Format::HfDir, config, tokenizer, weights: Arc::new(weights) };
        ck.check_shapes().with_context(|| format!("{}: config.json disagrees with the weights", dir.display()))?;
        Ok(ck)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        let tokenizer = Some(Tokenizer::from_gguf(&file)?);
        let weights = Weights::Gguf(GgufWeights::new(file, config.as_ref())?);
        let ck = Self { path: path.to_path_buf(), format: Format::Gguf, config, tokenizer, weights: Arc::new(weights) };
        ck.check_shapes().with_context(|| format!("{}: metadata disagrees with the tensors", path.display()))?;
        Ok(ck)
    }

    /// Every tensor the architecture needs exists with the shape the configuration implies.
    pub fn check_shapes(&self) -> Result<()> {
        for t in self.config.tensors(&self.weights) {
            match self.weights.meta(&t.name) {
                Some(m) => {
                    ensure!(m.shape == t.shape, "tensor {} has shape {:?}, expected {:?}", t.name, m.shape, t.shape)
                }
                None => ensure!(!t.required, "tensor {} is missing", t.name),
            }
        }
        Ok(())
    }

    /// Every tensor this checkpoint holds that the architecture reads: what `convert` writes, and `prune` with
    /// its layers pruned.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        self.config
            .tensors(&self.weights)
            .into_iter()
            .filter(|t| t.required || self.weights.contains(&t.name))
            .collect()
    }

    /// The tokenizer, or an error saying where it was looked for.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!("{}: no tokenizer.json beside the model (needed to tokenize text)", self.path.display())
        })
    }

    /// Build the model (embeddings and head in f32 now, layers on demand).
    pub fn model(&self) -> Result<Box<dyn CausalLm>> {
        self.config.build(self.weights.clone())
    }
}

/// What a decoder layer needs besides its input, for one sequence length (attention is always causal).
#[derive(Clone)]
pub struct LayerContext {
    pub seqlen: usize,
    /// RoPE tables, one per kind of layer the architecture has (none for OPT; Gemma 3: global, local).
    pub rope: Vec<Rope>,
}

/// RoPE tables for one sequence length: `(seqlen, head_dim/2)` cosines and sines of position × inverse
/// frequency (angles in f32, as transformers computes them), rotating the two halves of each head (the
/// Hugging Face layout).
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(inv_freq: &[f32], seqlen: usize) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seqlen * half);
        let mut sin = Vec::with_capacity(seqlen * half);
        for p in 0..seqlen {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let dev = crate::device::current();
        Ok(Self { cos: Tensor::from_vec(cos, (seqlen, half), dev)?, sin: Tensor::from_vec(sin, (seqlen, half), dev)? })
    }

    /// Rotate `x` `(batch, heads, t, head_dim)`, positions `0..t`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        Ok(candle_nn::rotary_emb::rope(x, &self.cos.narrow(0, 0, t)?, &self.sin.narrow(0, 0, t)?)?)
    }
}

/// RoPE inverse frequencies `θ^(−2i/d)`, `i < d/2`, before any rescaling.
pub fn rope_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect()
}

/// Called with (operator name, operator input) as a layer runs; the input is `(batch, seq, in_features)`.
pub type Hook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

/// One step of error correction's walk through a layer ([`DecoderLayer::next_group_input`]).
pub struct GroupStep {
    /// The input of the operator group stepped to.
    pub input: Tensor,
    /// The residual stream after attention, where this step computed it.
    pub residual: Option<Tensor>,
}

/// One decoder layer, materialised in f32.
pub trait DecoderLayer: Send + Sync {
    /// `x`: `(batch, seq, hidden)` → same shape.
    fn forward(&self, x: &Tensor, ctx: &LayerContext, hook: Option<Hook>) -> Result<Tensor>;
    /// Run the layer only as far as its operators' inputs, reporting each to `hook` (all that input
    /// statistics need: the last projection and the residual are skipped).
    fn capture(&self, x: &Tensor, ctx: &LayerContext, hook: Hook) -> Result<()>;
    /// The input of operator group `gi` from the layer input `x` and `prev`, the input of group `gi − 1`,
    /// computed as `capture` would but without rerunning what lies before `prev`; `None` where the layer
    /// cannot (then run `capture`). Error correction uses it to step from group to group.
    fn next_group_input(&self, _gi: usize, _x: &Tensor, _prev: &Tensor) -> Result<Option<GroupStep>> {
        Ok(None)
    }
    /// Whether [`Self::next_group_input`] steps to group `gi` (error correction keeps the previous group's
    /// inputs only for a step: a LLaMA-2-70B layer's are 8 GiB a stream).
    fn steps_to(&self, _gi: usize) -> bool {
        false
    }
    /// The layer's output from the residual stream after attention (as a [`GroupStep`] gave it) and the last
    /// group's input, computed as `forward` would; `None` where the layer cannot. Error correction holds both
    /// at the end of its walk and so skips a last pass through the layer.
    fn output_from(&self, _residual: &Tensor, _last_input: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Names of the linear operators, in data-flow order (`q_proj`, `k_proj`, ... / `fc1`, `fc2`).
    fn linear_names(&self) -> &'static [&'static str];
    /// The operators grouped by shared input, in data-flow order (q, k, v read the same tensor).
    fn input_groups(&self) -> &'static [&'static [&'static str]];
    /// The linear operators, in the order of [`Self::linear_names`].
    fn ops(&self) -> &[Linear];
    fn ops_mut(&mut self) -> &mut [Linear];
    /// The linear operator named `name` (one of [`Self::linear_names`]).
    fn linear(&self, name: &str) -> Option<&Linear> {
        let k = self.linear_names().iter().position(|n| *n == name)?;
        self.ops().get(k)
    }
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let k = self.linear_names().iter().position(|n| *n == name)?;
        self.ops_mut().get_mut(k)
    }
    /// [`Self::linear`] for a name the architecture's own code gives: one that is not an operator is a bug.
    fn op(&self, name: &str) -> &Linear {
        self.linear(name).unwrap_or_else(|| panic!("{name}: not an operator of this layer"))
    }
    /// Every tensor of the layer under its Hugging Face name (for writing checkpoints).
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    /// Multiply the layer's linear maps in `dtype` from here ([`Linear::matmul`]); its attention's two products
    /// follow (they take the type of the query projection's).
    fn set_matmul_dtype(&mut self, dtype: candle_core::DType) {
        for l in self.ops_mut() {
            l.matmul = dtype;
        }
    }
}

/// A decoder-only language model run layer by layer.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn num_layers(&self) -> usize;
    /// Token ids `(batch, seq)` (u32) → hidden states entering layer 0, `(batch, seq, hidden)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    fn context(&self, seqlen: usize) -> Result<LayerContext>;
    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>>;
    /// Final norm (and projection): `(batch, seq, hidden)` → what the LM head multiplies, `(batch, seq, e)`.
    fn final_hidden(&self, h: &Tensor) -> Result<Tensor>;
    /// The LM head's weight `(vocab, e)` (the embeddings when tied), read on first use and kept.
    fn lm_head(&self) -> Result<&Tensor>;
    /// Logits `(batch, seq, vocab)`.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        Linear::new(self.lm_head()?.clone(), None).forward(&self.final_hidden(h)?)
    }
}

/// Rows of a vocabulary matrix read at once when it is not kept whole (16 MiB in f32 at hidden 1024).
pub const VOCAB_BLOCK_ROWS: usize = 4096;

/// A `vocab × hidden` matrix (token embeddings, LM head) read from the checkpoint when first needed whole, and
/// then kept. Until then a lookup reads it for that call alone: a pruning walk embeds its calibration samples
/// once and so never holds the matrix (Gemma 3's is 671 MB in f32) while it prunes.
pub struct VocabMatrix {
    weights: Arc<Weights>,
    name: String,
    shape: [usize; 2],
    whole: std::sync::OnceLock<Tensor>,
}

impl VocabMatrix {
    /// Checks that the checkpoint has `name` with `shape`; reads nothing.
    pub fn new(weights: &Arc<Weights>, name: &str, shape: [usize; 2]) -> Result<Self> {
        let meta = weights.meta(name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
        ensure!(
            meta.shape == shape,
            "tensor {name} has shape {:?} but the configuration implies {:?}",
            meta.shape,
            shape
        );
        Ok(Self { weights: weights.clone(), name: name.to_string(), shape, whole: Default::default() })
    }

    /// The rows `ids` (a flat u32 tensor): from the kept matrix, else read for this call alone, a block of
    /// [`VOCAB_BLOCK_ROWS`] rows at a time, so that the matrix is never whole in memory.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let [v, h] = self.shape;
        // Checked on the host first: on a GPU an id out of range is a device-side assert, which poisons the
        // CUDA context for the rest of the process instead of failing this call.
        let host_ids = ids.to_vec1::<u32>()?;
        if let Some(&bad) = host_ids.iter().find(|&&id| id as usize >= v) {
            bail!("token id {bad} is outside the vocabulary of {v} ({})", self.name);
        }
        if let Some(t) = self.whole.get() {
            return Ok(t.index_select(&ids.to_device(t.device())?, 0)?);
        }
        let ids = host_ids;
        // Positions of the ids in each block, so that each block is read once.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&p| ids[p]);
        let mut out = vec![0f32; ids.len() * h];
        let mut next = 0;
        while next < order.len() {
            let start = ids[order[next]] as usize / VOCAB_BLOCK_ROWS * VOCAB_BLOCK_ROWS;
            let end = (start + VOCAB_BLOCK_ROWS).min(v);
            let block = self.weights.load_rows(&self.name, start..end)?;
            crate::linalg::with_f32(&block, |xs| {
                while next < order.len() && (ids[order[next]] as usize) < end {
                    let (p, r) = (order[next], ids[order[next]] as usize - start);
                    out[p * h..(p + 1) * h].copy_from_slice(&xs[r * h..(r + 1) * h]);
                    next += 1;
                }
            })?;
        }
        Ok(Tensor::from_vec(out, (ids.len(), h), crate::device::current())?)
    }

    /// The whole matrix, kept from now on.
    pub fn whole(&self) -> Result<&Tensor> {
        if let Some(t) = self.whole.get() {
            return Ok(t);
        }
        let t = self.weights.load_shaped(&self.name, &self.shape)?;
        Ok(self.whole.get_or_init(|| t))
    }
}

/// The decoder layer a tensor belongs to (`...layers.{i}.…`).
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Run a whole model on token ids and return logits: the simple path, every layer loaded in turn.
pub fn forward_logits(model: &dyn CausalLm, ids: &Tensor) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    let ctx = model.context(t)?;
    let mut h = model.embed(ids)?;
    for i in 0..model.num_layers() {
        let layer = model.load_layer(i)?;
        h = layer.forward(&h, &ctx, None).with_context(|| format!("decoder layer {i}"))?;
    }
    model.head(&h)
}
