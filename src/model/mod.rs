//! Checkpoints and architectures.
//!
//! A [`Checkpoint`] is a configuration, a tokenizer and a [`Weights`] store that hands out tensors by their
//! Hugging Face names, converted to f32 one at a time from a memory map (safetensors or GGUF). An
//! architecture ([`llama`], [`opt`]) builds a [`CausalLm`] from it: embeddings and head are materialised once,
//! decoder layers only when [`CausalLm::load_layer`] is called, so a pruner can hold one layer at a time.
//! Each [`DecoderLayer`] names its linear operators and reports their inputs to an optional hook.

pub mod config;
pub mod export;
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

pub use config::{LlamaConfig, ModelConfig, OptConfig};
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
    /// HF name → (GGUF name, number of rotary heads to un-permute, if Q/K of a `llama` GGUF)
    map: BTreeMap<String, (String, Option<usize>)>,
}

/// Shape and stored type of one tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl GgufWeights {
    fn new(file: GgufFile, cfg: &ModelConfig) -> Result<Self> {
        let ModelConfig::Llama(c) = cfg else { bail!("GGUF: only LLaMA-family architectures are supported") };
        // llama.cpp permutes Q/K only for its `llama` architecture; qwen2 uses the NeoX (HF) layout.
        let permuted = c.model_type == "llama";
        let mut map = BTreeMap::new();
        for g in &file.order {
            let (hf, heads) = match g.as_str() {
                "token_embd.weight" => ("model.embed_tokens.weight".to_string(), None),
                "output_norm.weight" => ("model.norm.weight".to_string(), None),
                "output.weight" => ("lm_head.weight".to_string(), None),
                _ => {
                    let Some(rest) = g.strip_prefix("blk.") else {
                        bail!("{}: unexpected tensor {g}", file.path.display())
                    };
                    let (idx, tail) = rest
                        .split_once('.')
                        .ok_or_else(|| anyhow!("{}: unexpected tensor {g}", file.path.display()))?;
                    let i: usize = idx.parse().with_context(|| format!("{}: tensor {g}", file.path.display()))?;
                    let (module, suffix) = tail
                        .rsplit_once('.')
                        .ok_or_else(|| anyhow!("{}: unexpected tensor {g}", file.path.display()))?;
                    let (hf_mod, heads) = match module {
                        "attn_norm" => ("input_layernorm", None),
                        "ffn_norm" => ("post_attention_layernorm", None),
                        "attn_q" => ("self_attn.q_proj", permuted.then_some(c.num_attention_heads)),
                        "attn_k" => ("self_attn.k_proj", permuted.then_some(c.num_key_value_heads)),
                        "attn_v" => ("self_attn.v_proj", None),
                        "attn_output" => ("self_attn.o_proj", None),
                        "ffn_gate" => ("mlp.gate_proj", None),
                        "ffn_up" => ("mlp.up_proj", None),
                        "ffn_down" => ("mlp.down_proj", None),
                        _ => bail!("{}: tensor {g} is not part of a supported llama layer", file.path.display()),
                    };
                    (format!("model.layers.{i}.{hf_mod}.{suffix}"), heads)
                }
            };
            map.insert(hf, (g.clone(), heads));
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
                let (gname, heads) =
                    g.map.get(name).ok_or_else(|| anyhow!("{}: no tensor for {name}", g.file.path.display()))?;
                let t = g.file.dequantize(gname)?;
                match heads {
                    Some(h) => gguf::unpermute_rows(&t, *h),
                    None => Ok(t),
                }
            }
        }
    }

    /// Load `name` and check its shape.
    pub fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        ensure!(t.dims() == shape, "tensor {name} has shape {:?} but the configuration implies {:?}", t.dims(), shape);
        Ok(t)
    }

    /// Load `name` if present, checking its shape.
    pub fn load_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) { self.load_shaped(name, shape).map(Some) } else { Ok(None) }
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
        if path.is_dir() { Self::open_hf_dir(path) } else { Self::open_gguf(path) }
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let config = ModelConfig::from_hf_json(&json).with_context(|| format!("{}", cfg_path.display()))?;
        let weights = Weights::Safetensors(SafetensorsStore::open_dir(dir)?);
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
        let ck = Self { path: dir.to_path_buf(), format: Format::HfDir, config, tokenizer, weights: Arc::new(weights) };
        ck.check_shapes().with_context(|| format!("{}: config.json disagrees with the weights", dir.display()))?;
        Ok(ck)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Some(Tokenizer::from_gguf(&file)?);
        let weights = Weights::Gguf(GgufWeights::new(file, &config)?);
        let ck = Self { path: path.to_path_buf(), format: Format::Gguf, config, tokenizer, weights: Arc::new(weights) };
        ck.check_shapes().with_context(|| format!("{}: metadata disagrees with the tensors", path.display()))?;
        Ok(ck)
    }

    /// Every tensor the architecture needs exists with the shape the configuration implies.
    pub fn check_shapes(&self) -> Result<()> {
        for (name, shape, required) in self.expected_tensors() {
            match self.weights.meta(&name) {
                Some(m) => ensure!(m.shape == shape, "tensor {name} has shape {:?}, expected {:?}", m.shape, shape),
                None => ensure!(!required, "tensor {name} is missing"),
            }
        }
        Ok(())
    }

    /// (name, shape, required) of every tensor the architecture reads.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        match &self.config {
            ModelConfig::Llama(c) => llama::expected_tensors(c),
            ModelConfig::Opt(c) => opt::expected_tensors(c, &self.weights),
        }
    }

    /// The tokenizer, or an error saying where it was looked for.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!("{}: no tokenizer.json beside the model (needed to tokenize text)", self.path.display())
        })
    }

    /// Build the model (embeddings and head in f32 now, layers on demand).
    pub fn model(&self) -> Result<Box<dyn CausalLm>> {
        Ok(match &self.config {
            ModelConfig::Llama(c) => Box::new(llama::Llama::new(c.clone(), self.weights.clone())?),
            ModelConfig::Opt(c) => Box::new(opt::Opt::new(c.clone(), self.weights.clone())?),
        })
    }
}

/// What a decoder layer needs besides its input, for one sequence length (attention is always causal).
pub struct LayerContext {
    pub seqlen: usize,
    /// `(seqlen, head_dim/2)` RoPE tables (LLaMA family only).
    pub cos: Option<Tensor>,
    pub sin: Option<Tensor>,
}

/// Called with (operator name, operator input) as a layer runs; the input is `(batch, seq, in_features)`.
pub type Hook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

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
    fn next_group_input(&self, _gi: usize, _x: &Tensor, _prev: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Names of the linear operators, in data-flow order (`q_proj`, `k_proj`, ... / `fc1`, `fc2`).
    fn linear_names(&self) -> &'static [&'static str];
    /// The operators grouped by shared input, in data-flow order (q, k, v read the same tensor).
    fn input_groups(&self) -> &'static [&'static [&'static str]];
    fn linear(&self, name: &str) -> Option<&Linear>;
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear>;
    /// Every tensor of the layer under its Hugging Face name (for writing checkpoints).
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
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
    /// The LM head's weight `(vocab, e)` (the embeddings when tied).
    fn lm_head(&self) -> &Tensor;
    /// Logits `(batch, seq, vocab)`.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        Linear::new(self.lm_head().clone(), None).forward(&self.final_hidden(h)?)
    }
    /// Non-layer tensors (embeddings, norms, head) under their Hugging Face names.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
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
