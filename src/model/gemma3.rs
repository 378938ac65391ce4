//! Gemma 3 (text): embeddings scaled by √hidden; RMSNorm weights that mean `1 + w`, four of them per layer
//! around attention and the MLP ("sandwich"), and RMSNorm on each query and key head before RoPE; attention
//! scaled by `query_pre_attn_scalar^−½`; a GELU (tanh) gated MLP; sliding-window attention (a query sees the
//! `sliding_window` keys up to itself) on five layers of every six, with their own RoPE base; a tied head.
//! Matches Hugging Face `modeling_gemma3.py` (`Gemma3ForCausalLM`).
//!
//! Everything about the architecture is here: its `config.json` ([`ConfigJson`], `model_type` `gemma3_text`)
//! and its GGUF metadata (llama.cpp's `gemma3`, which stores the norms as `1 + w` and leaves the sliding
//! pattern, the local RoPE base and the attention scale to convention), resolved into [`Gemma3Config`]; one
//! table of its tensors' names; the model and its decoder layer.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::gguf::GgufFile;
use super::{
    Architecture, CausalLm, Config, DecoderLayer, FromGguf, GroupStep, Hook, LayerContext, Linear, ModelConfig, Rope,
    TensorSpec, TokenIds, VocabMatrix, Weights, rope_inv_freq,
};

pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["gemma3_text"],
    gguf_architectures: &["gemma3"],
    from_hf: |j| Ok(Arc::new(ConfigJson::deserialize(j)?.resolve()?)),
    from_gguf: Some(|g| Ok(Arc::new(Gemma3Config::from_gguf(g)?))),
};

/// A linear operator of the decoder layer: its name, its module under `model.layers.{i}.`, its name under
/// GGUF's `blk.{i}.`, and its `(out, in)` shape. None has a bias.
struct Operator {
    name: &'static str,
    module: &'static str,
    gguf: &'static str,
    shape: fn(&Gemma3Config) -> [usize; 2],
}

/// The layer's operators in data-flow order: the one table of their names.
const OPERATORS: [Operator; 7] = [
    Operator { name: "q_proj", module: "self_attn.q_proj", gguf: "attn_q", shape: |c| [c.q_width(), c.hidden_size] },
    Operator { name: "k_proj", module: "self_attn.k_proj", gguf: "attn_k", shape: |c| [c.kv_width(), c.hidden_size] },
    Operator { name: "v_proj", module: "self_attn.v_proj", gguf: "attn_v", shape: |c| [c.kv_width(), c.hidden_size] },
    Operator {
        name: "o_proj",
        module: "self_attn.o_proj",
        gguf: "attn_output",
        shape: |c| [c.hidden_size, c.q_width()],
    },
    Operator {
        name: "gate_proj",
        module: "mlp.gate_proj",
        gguf: "ffn_gate",
        shape: |c| [c.intermediate_size, c.hidden_size],
    },
    Operator {
        name: "up_proj",
        module: "mlp.up_proj",
        gguf: "ffn_up",
        shape: |c| [c.intermediate_size, c.hidden_size],
    },
    Operator {
        name: "down_proj",
        module: "mlp.down_proj",
        gguf: "ffn_down",
        shape: |c| [c.hidden_size, c.intermediate_size],
    },
];

/// [`OPERATORS`]' names, for [`DecoderLayer::linear_names`].
const OPERATOR_NAMES: [&str; 7] = {
    let mut names = [""; 7];
    let mut k = 0;
    while k < names.len() {
        names[k] = OPERATORS[k].name;
        k += 1;
    }
    names
};

/// The operators grouped by the input they share, in data-flow order.
const INPUT_GROUPS: [&[&str]; 4] =
    [&["q_proj", "k_proj", "v_proj"], &["o_proj"], &["gate_proj", "up_proj"], &["down_proj"]];

/// A norm of the decoder layer: its module, its GGUF name, its width.
struct Norm {
    module: &'static str,
    gguf: &'static str,
    width: fn(&Gemma3Config) -> usize,
}

/// The layer's RMSNorms, as [`GemmaLayer::norms`] holds them.
const NORMS: [Norm; 6] = [
    Norm { module: "input_layernorm", gguf: "attn_norm", width: |c| c.hidden_size },
    Norm { module: "post_attention_layernorm", gguf: "post_attention_norm", width: |c| c.hidden_size },
    Norm { module: "pre_feedforward_layernorm", gguf: "ffn_norm", width: |c| c.hidden_size },
    Norm { module: "post_feedforward_layernorm", gguf: "post_ffw_norm", width: |c| c.hidden_size },
    Norm { module: "self_attn.q_norm", gguf: "attn_q_norm", width: |c| c.head_dim },
    Norm { module: "self_attn.k_norm", gguf: "attn_k_norm", width: |c| c.head_dim },
];
const INPUT_NORM: usize = 0;
const POST_ATTENTION_NORM: usize = 1;
const PRE_FFN_NORM: usize = 2;
const POST_FFN_NORM: usize = 3;
const Q_NORM: usize = 4;
const K_NORM: usize = 5;

/// The tensors outside the layers (Hugging Face name, GGUF name): embeddings, final norm, head (when untied).
const EMBED: (&str, &str) = ("model.embed_tokens.weight", "token_embd.weight");
const FINAL_NORM: (&str, &str) = ("model.norm.weight", "output_norm.weight");
const HEAD: (&str, &str) = ("lm_head.weight", "output.weight");

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// `config.json` of Gemma 3's text model as Hugging Face writes it (the fields read; the rest is ignored).
#[derive(Debug, Deserialize)]
pub struct ConfigJson {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_activation: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer; else every `sliding_window_pattern`-th layer is full.
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_: Option<usize>,
    /// The global layers' RoPE base (transformers < 5).
    pub rope_theta: Option<f64>,
    /// The sliding layers' RoPE base (transformers < 5).
    pub rope_local_base_freq: Option<f64>,
    /// The global layers' RoPE scaling (transformers < 5).
    pub rope_scaling: Option<RopeJson>,
    /// transformers ≥ 5: `{"full_attention": {...}, "sliding_attention": {...}}`.
    pub rope_parameters: Option<RopeParameters>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub attention_bias: Option<bool>,
    pub use_bidirectional_attention: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
}

/// One layer type's RoPE: its base and its scaling.
#[derive(Debug, Deserialize)]
pub struct RopeJson {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct RopeParameters {
    pub full_attention: Option<RopeJson>,
    pub sliding_attention: Option<RopeJson>,
}

impl RopeJson {
    /// A linear scaling factor, if any.
    fn linear_factor(&self) -> Result<Option<f64>> {
        match self.rope_type.as_deref().or(self.type_.as_deref()).unwrap_or("default") {
            "default" => Ok(None),
            "linear" => Ok(Some(self.factor.ok_or_else(|| anyhow!("rope scaling: missing \"factor\""))?)),
            other => bail!("Gemma 3: rope scaling type \"{other}\" is not supported (default, linear are)"),
        }
    }
}

impl ConfigJson {
    fn resolve(self) -> Result<Gemma3Config> {
        if let Some(act) = &self.hidden_activation {
            ensure!(
                act == "gelu_pytorch_tanh",
                "hidden_activation \"{act}\" is not supported for Gemma 3 (gelu_pytorch_tanh is)"
            );
        }
        ensure!(self.attn_logit_softcapping.is_none(), "attn_logit_softcapping is not supported (Gemma 3 has none)");
        ensure!(self.final_logit_softcapping.is_none(), "final_logit_softcapping is not supported yet");
        ensure!(!self.attention_bias.unwrap_or(false), "attention_bias is not supported for Gemma 3");
        ensure!(
            !self.use_bidirectional_attention.unwrap_or(false),
            "bidirectional attention (EmbeddingGemma) is not supported"
        );
        let n = self.num_hidden_layers;
        let sliding = match &self.layer_types {
            Some(types) => {
                ensure!(types.len() == n, "layer_types has {} entries for {n} layers", types.len());
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => bail!("layer type \"{other}\" is not supported"),
                    })
                    .collect::<Result<_>>()?
            }
            None => pattern(n, self.sliding_window_pattern.or(self.sliding_window_pattern_).unwrap_or(6)),
        };
        let params = self.rope_parameters.as_ref();
        let full = params.and_then(|p| p.full_attention.as_ref()).or(self.rope_scaling.as_ref());
        let local = params.and_then(|p| p.sliding_attention.as_ref());
        if let Some(l) = local {
            ensure!(l.linear_factor()?.is_none(), "Gemma 3: RoPE scaling on the sliding layers is not supported");
        }
        let heads = self.num_attention_heads;
        let head_dim = self.head_dim.unwrap_or(256);
        let cfg = Gemma3Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: n,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            query_pre_attn_scalar: self.query_pre_attn_scalar.unwrap_or(256.0),
            sliding_window: self.sliding_window.unwrap_or(4096),
            sliding,
            rope_theta: full.and_then(|r| r.rope_theta).or(self.rope_theta).unwrap_or(1e6),
            rope_local_theta: local.and_then(|r| r.rope_theta).or(self.rope_local_base_freq).unwrap_or(1e4),
            rope_linear_factor: match full {
                Some(r) => r.linear_factor()?,
                None => None,
            },
            max_position_embeddings: self.max_position_embeddings.unwrap_or(131_072),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
            bos_token_id: self.bos_token_id.as_ref().and_then(TokenIds::first),
            eos_token_id: self.eos_token_id.as_ref().and_then(TokenIds::first),
            pad_token_id: self.pad_token_id.as_ref().and_then(TokenIds::first),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Every `every`-th layer global, the others sliding (transformers' and llama.cpp's default, 6).
fn pattern(layers: usize, every: usize) -> Vec<bool> {
    (0..layers).map(|i| every == 0 || !(i + 1).is_multiple_of(every)).collect()
}

/// Gemma 3's text configuration, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Attention logits are scaled by `query_pre_attn_scalar^−½`.
    pub query_pre_attn_scalar: f64,
    /// A sliding layer's query sees this many keys, itself included.
    pub sliding_window: usize,
    /// Per layer: sliding (true) or global.
    pub sliding: Vec<bool>,
    /// RoPE base of the global layers, and their linear scaling.
    pub rope_theta: f64,
    pub rope_linear_factor: Option<f64>,
    /// RoPE base of the sliding layers.
    pub rope_local_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Gemma3Config {
    /// Read llama.cpp's `gemma3` metadata. What it does not write is what llama.cpp assumes too: every sixth
    /// layer global (unless `attention.sliding_window_pattern` says otherwise), the sliding layers' RoPE base
    /// 10,000, and the attention scale `head_dim^−½` (`(hidden / heads)^−½` for the 62-layer 27B model).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let k = |s: &str| format!("gemma3.{s}");
        let hidden = g.get_u64(&k("embedding_length"))? as usize;
        let heads = g.get_u64(&k("attention.head_count"))? as usize;
        ensure!(heads > 0, "{}: attention.head_count is 0", g.path.display());
        let layers = g.get_u64(&k("block_count"))? as usize;
        let head_dim = g.get_u64(&k("attention.key_length")).map(|v| v as usize).unwrap_or(256);
        let embd = g.tensors.get(EMBED.1).ok_or_else(|| anyhow!("{}: no {} tensor", g.path.display(), EMBED.1))?;
        let rope_linear_factor = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => None,
            Some("linear") => Some(g.get_f64(&k("rope.scaling.factor"))?),
            Some(other) => bail!("{}: rope scaling \"{other}\" is not supported", g.path.display()),
        };
        ensure!(
            g.get(&k("final_logit_softcapping")).is_none(),
            "{}: final_logit_softcapping is not supported yet",
            g.path.display()
        );
        let every = g.get_u64(&k("attention.sliding_window_pattern")).map(|v| v as usize).unwrap_or(6);
        let cfg = Self {
            vocab_size: embd.shape[0],
            hidden_size: hidden,
            intermediate_size: g.get_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: g.get_u64(&k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(heads),
            head_dim,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            query_pre_attn_scalar: if layers == 62 { (hidden / heads) as f64 } else { head_dim as f64 },
            sliding_window: g.get_u64(&k("attention.sliding_window")).map(|v| v as usize).unwrap_or(usize::MAX),
            sliding: pattern(layers, every),
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(1e6),
            rope_linear_factor,
            rope_local_theta: 1e4,
            max_position_embeddings: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(131_072),
            tie_word_embeddings: !g.tensors.contains_key(HEAD.1),
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
            eos_token_id: g.get_u64("tokenizer.ggml.eos_token_id").ok().map(|v| v as u32),
            pad_token_id: g.get_u64("tokenizer.ggml.padding_token_id").ok().map(|v| v as u32),
        };
        cfg.validate().with_context(|| format!("{}: inconsistent metadata", g.path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.num_attention_heads > 0, "num_attention_heads is 0");
        ensure!(
            self.num_key_value_heads > 0 && self.num_attention_heads.is_multiple_of(self.num_key_value_heads),
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        ensure!(self.head_dim.is_multiple_of(2) && self.head_dim > 0, "head_dim {} must be even", self.head_dim);
        ensure!(self.sliding_window > 0, "sliding_window is 0");
        Ok(())
    }

    fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The global layers' RoPE inverse frequencies (scaled), then the sliding layers'.
    fn inv_freqs(&self) -> [Vec<f32>; 2] {
        let factor = self.rope_linear_factor.unwrap_or(1.0);
        let global = rope_inv_freq(self.rope_theta, self.head_dim).iter().map(|f| (f / factor) as f32).collect();
        let local = rope_inv_freq(self.rope_local_theta, self.head_dim).iter().map(|&f| f as f32).collect();
        [global, local]
    }
}

impl Config for Gemma3Config {
    fn model_type(&self) -> &str {
        "gemma3_text"
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }

    fn flops_per_token(&self, seqlen: usize) -> f64 {
        let linear: usize = OPERATORS.iter().map(|o| (o.shape)(self).iter().product::<usize>()).sum();
        let head = self.vocab_size * self.hidden_size;
        // Keys a query sees on average: (seqlen + 1) / 2, or about the window in a sliding layer.
        let keys = |sliding: bool| {
            let all = (seqlen as f64 + 1.0) / 2.0;
            if sliding { all.min(self.sliding_window as f64) } else { all }
        };
        let attn: f64 = self.sliding.iter().map(|&s| 2.0 * 2.0 * keys(s) * self.q_width() as f64).sum();
        2.0 * (self.num_hidden_layers as f64 * linear as f64 + head as f64) + attn
    }

    fn tensors(&self, _weights: &Weights) -> Vec<TensorSpec> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![TensorSpec::new(EMBED.0, vec![v, h], true)];
        for l in 0..self.num_hidden_layers {
            let p = layer_prefix(l);
            for o in &OPERATORS {
                let name = format!("{p}.{}.weight", o.module);
                out.push(TensorSpec { linear: true, ..TensorSpec::new(&name, (o.shape)(self).to_vec(), true) });
            }
            for n in &NORMS {
                out.push(TensorSpec::new(&format!("{p}.{}.weight", n.module), vec![(n.width)(self)], true));
            }
        }
        out.push(TensorSpec::new(FINAL_NORM.0, vec![h], true));
        // A tied head is not stored (transformers re-ties it on load), even where a checkpoint carries one.
        if !self.tie_word_embeddings {
            out.push(TensorSpec::new(HEAD.0, vec![v, h], true));
        }
        out
    }

    fn hf_name_of_gguf(&self, name: &str) -> Option<(String, FromGguf)> {
        if name == EMBED.1 || name == HEAD.1 {
            let hf = if name == EMBED.1 { EMBED.0 } else { HEAD.0 };
            return Some((hf.to_string(), FromGguf::AsIs));
        }
        // llama.cpp adds 1 to every norm weight of Gemma 3.
        if name == FINAL_NORM.1 {
            return Some((FINAL_NORM.0.to_string(), FromGguf::MinusOne));
        }
        let (i, rest) = name.strip_prefix("blk.")?.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let p = layer_prefix(i.parse().ok()?);
        if let Some(n) = NORMS.iter().find(|n| n.gguf == module) {
            return Some((format!("{p}.{}.{suffix}", n.module), FromGguf::MinusOne));
        }
        // Gemma's rotary layout is Hugging Face's: llama.cpp does not permute its Q/K rows.
        let o = OPERATORS.iter().find(|o| o.gguf == module)?;
        Some((format!("{p}.{}.{suffix}", o.module), FromGguf::AsIs))
    }

    fn to_hf_json(&self) -> Json {
        let layer_types: Vec<&str> =
            self.sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
        let rope_scaling = self.rope_linear_factor.map(|f| json!({"rope_type": "linear", "factor": f}));
        json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            // transformers wants a whole number here.
            "query_pre_attn_scalar": if self.query_pre_attn_scalar.fract() == 0.0 {
                json!(self.query_pre_attn_scalar as u64)
            } else {
                json!(self.query_pre_attn_scalar)
            },
            "sliding_window": self.sliding_window,
            "layer_types": layer_types,
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_theta,
            "rope_scaling": rope_scaling,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "attention_bias": false,
            "use_bidirectional_attention": false,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "dtype": "float32",
        })
    }

    fn build(&self, weights: Arc<Weights>) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Gemma3::new(self.clone(), weights)?))
    }
}

/// An RMSNorm whose weight `w` scales by `1 + w`: `w` as checkpoints store it, and the scale.
#[derive(Clone)]
struct Norm1p {
    weight: Tensor,
    scale: Tensor,
}

impl Norm1p {
    fn new(weight: Tensor) -> Result<Self> {
        Ok(Self { scale: (&weight + 1.0)?, weight })
    }

    /// Over the last dimension, in f32 (as transformers: `x · rsqrt(mean(x²) + ε) · (1 + w)`).
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.scale, eps as f32)?)
    }
}

pub struct Gemma3 {
    model_cfg: ModelConfig,
    cfg: Gemma3Config,
    weights: Arc<Weights>,
    embed: VocabMatrix,
    /// √hidden, in f32 (transformers casts it to the embeddings' type).
    embed_scale: f64,
    norm: Norm1p,
    /// `None` when tied to the embeddings.
    lm_head: Option<VocabMatrix>,
}

pub struct GemmaLayer {
    idx: usize,
    cfg: Gemma3Config,
    /// As [`NORMS`].
    norms: [Norm1p; 6],
    /// As [`OPERATORS`].
    ops: [Linear; 7],
}

impl Gemma3 {
    pub fn new(cfg: Gemma3Config, weights: Arc<Weights>) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = VocabMatrix::new(&weights, EMBED.0, [v, h])?;
        let norm = Norm1p::new(weights.load_shaped(FINAL_NORM.0, &[h])?)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(VocabMatrix::new(&weights, HEAD.0, [v, h])?) };
        let embed_scale = (h as f64).sqrt() as f32 as f64;
        Ok(Self { model_cfg: Arc::new(cfg.clone()), cfg, weights, embed, embed_scale, norm, lm_head })
    }
}

impl CausalLm for Gemma3 {
    fn config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed.rows(&ids.flatten_all()?)?.reshape((b, t, self.cfg.hidden_size))?;
        Ok((x * self.embed_scale)?)
    }

    fn context(&self, seqlen: usize) -> Result<LayerContext> {
        let [global, local] = self.cfg.inv_freqs();
        Ok(LayerContext { seqlen, rope: vec![Rope::new(&global, seqlen)?, Rope::new(&local, seqlen)?] })
    }

    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>> {
        let (c, w, p) = (&self.cfg, &self.weights, layer_prefix(i));
        let norm = |n: &Norm| Norm1p::new(w.load_shaped(&format!("{p}.{}.weight", n.module), &[(n.width)(c)])?);
        let op = |o: &Operator| -> Result<Linear> {
            Ok(Linear::new(w.load_shaped(&format!("{p}.{}.weight", o.module), &(o.shape)(c))?, None))
        };
        let norms = [
            norm(&NORMS[0])?,
            norm(&NORMS[1])?,
            norm(&NORMS[2])?,
            norm(&NORMS[3])?,
            norm(&NORMS[4])?,
            norm(&NORMS[5])?,
        ];
        let ops = [
            op(&OPERATORS[0])?,
            op(&OPERATORS[1])?,
            op(&OPERATORS[2])?,
            op(&OPERATORS[3])?,
            op(&OPERATORS[4])?,
            op(&OPERATORS[5])?,
            op(&OPERATORS[6])?,
        ];
        Ok(Box::new(GemmaLayer { idx: i, cfg: c.clone(), norms, ops }))
    }

    fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm.forward(hidden, self.cfg.rms_norm_eps)
    }

    fn lm_head(&self) -> Result<&Tensor> {
        // A model asked for its head is being run token by token: keep the embeddings too.
        self.embed.whole()?;
        self.lm_head.as_ref().unwrap_or(&self.embed).whole()
    }
}

impl GemmaLayer {
    fn norm(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        self.norms[k].forward(x, self.cfg.rms_norm_eps)
    }

    fn sliding(&self) -> bool {
        self.cfg.sliding[self.idx]
    }

    fn attention(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let Some(f) = hook.as_mut() {
            for n in INPUT_GROUPS[0] {
                f(n, x)?;
            }
        }
        // Per-head RMSNorm on queries and keys, then RoPE (the sliding layers' own tables).
        let heads = |y: Tensor, n: usize, norm: Option<usize>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, hd))?;
            let y = match norm {
                Some(k) => self.norm(k, &y)?,
                None => y,
            };
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let rope = &ctx.rope[usize::from(self.sliding())];
        let q = rope.apply(&heads(self.op("q_proj").forward(x)?, nh, Some(Q_NORM))?)?;
        let k = rope.apply(&heads(self.op("k_proj").forward(x)?, nkv, Some(K_NORM))?)?;
        let v = heads(self.op("v_proj").forward(x)?, nkv, None)?;
        let scale = c.query_pre_attn_scalar.powf(-0.5) as f32;
        let window = self.sliding().then_some(c.sliding_window);
        let attn = crate::linalg::causal_attention(&q, &k, &v, scale, window, self.op("q_proj").matmul)?;
        if let Some(f) = hook.as_mut() {
            f("o_proj", &attn)?;
        }
        self.op("o_proj").forward(&attn)
    }

    /// The residual after attention: `x + post_attention_norm(o)`, and the MLP's input `pre_ffn_norm` of it.
    fn after_attention(&self, x: &Tensor, o: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = (x + self.norm(POST_ATTENTION_NORM, o)?)?;
        let h = self.norm(PRE_FFN_NORM, &x)?;
        Ok((x, h))
    }

    /// The MLP's gated activation, `gelu_tanh(gate(h)) · up(h)`: the input of down_proj.
    fn activation(&self, h: &Tensor) -> Result<Tensor> {
        Ok((self.op("gate_proj").forward(h)?.gelu()? * self.op("up_proj").forward(h)?)?)
    }

    /// The layer's output from the residual stream after attention and the input of down_proj.
    fn finish(&self, x: &Tensor, act: &Tensor) -> Result<Tensor> {
        Ok((x + self.norm(POST_FFN_NORM, &self.op("down_proj").forward(act)?)?)?)
    }

    /// The layer up to its last projection: (residual stream after attention, input of down_proj).
    fn until_down(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<(Tensor, Tensor)> {
        let h = self.norm(INPUT_NORM, x)?;
        let o = self.attention(&h, ctx, hook)?;
        let (x, h) = self.after_attention(x, &o)?;
        if let Some(f) = hook.as_mut() {
            for n in INPUT_GROUPS[2] {
                f(n, &h)?;
            }
        }
        let act = self.activation(&h)?;
        if let Some(f) = hook.as_mut() {
            f("down_proj", &act)?;
        }
        Ok((x, act))
    }
}

impl DecoderLayer for GemmaLayer {
    fn forward(&self, x: &Tensor, ctx: &LayerContext, mut hook: Option<Hook>) -> Result<Tensor> {
        let (x, act) = self.until_down(x, ctx, &mut hook)?;
        self.finish(&x, &act)
    }

    fn capture(&self, x: &Tensor, ctx: &LayerContext, hook: Hook) -> Result<()> {
        self.until_down(x, ctx, &mut Some(hook)).map(|_| ())
    }

    fn steps_to(&self, gi: usize) -> bool {
        matches!(gi, 2 | 3)
    }

    fn next_group_input(&self, gi: usize, x: &Tensor, prev: &Tensor) -> Result<Option<GroupStep>> {
        Ok(match gi {
            // gate/up read the pre-MLP norm of the residual; down reads the gated activation.
            2 => {
                let (x, input) = self.after_attention(x, &self.op("o_proj").forward(prev)?)?;
                Some(GroupStep { input, residual: Some(x) })
            }
            3 => Some(GroupStep { input: self.activation(prev)?, residual: None }),
            _ => None,
        })
    }

    fn output_from(&self, residual: &Tensor, last_input: &Tensor) -> Result<Option<Tensor>> {
        self.finish(residual, last_input).map(Some)
    }

    fn linear_names(&self) -> &'static [&'static str] {
        &OPERATOR_NAMES
    }

    fn input_groups(&self) -> &'static [&'static [&'static str]] {
        &INPUT_GROUPS
    }

    fn ops(&self) -> &[Linear] {
        &self.ops
    }

    fn ops_mut(&mut self) -> &mut [Linear] {
        &mut self.ops
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = layer_prefix(self.idx);
        let mut v: Vec<(String, Tensor)> = OPERATORS
            .iter()
            .zip(&self.ops)
            .map(|(o, l)| (format!("{p}.{}.weight", o.module), l.weight.clone()))
            .collect();
        v.extend(NORMS.iter().zip(&self.norms).map(|(n, t)| (format!("{p}.{}.weight", n.module), t.weight.clone())));
        v
    }
}
