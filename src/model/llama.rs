//! The LLaMA family (LLaMA 1/2/3, Mistral, SmolLM2, Qwen2, Qwen3): RMSNorm, rotary attention with grouped
//! key/value heads, SwiGLU MLP; Qwen2's q/k/v biases, Qwen3's RMSNorm on each query and key head, Mistral's
//! sliding-window attention. Matches Hugging Face `modeling_llama.py`, `modeling_mistral.py`,
//! `modeling_qwen2.py` and `modeling_qwen3.py`.
//!
//! Everything about the architecture is here: its `config.json` ([`ConfigJson`], as serde reads it) and GGUF
//! metadata, resolved into [`LlamaConfig`]; one table of its tensors' names (Hugging Face and GGUF, from
//! which loading, writing and the GGUF mapping all read); the model and its decoder layer.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::gguf::{GgufFile, Value};
use super::{
    Architecture, CausalLm, Config, DecoderLayer, FromGguf, GroupStep, Hook, LayerContext, Linear, ModelConfig, Rope,
    TensorSpec, TokenIds, VocabMatrix, Weights, rope_inv_freq,
};

pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2"],
    gguf_architectures: &["llama", "qwen2", "qwen3"],
    from_hf: |j| Ok(Arc::new(ConfigJson::deserialize(j)?.resolve()?)),
    from_gguf: Some(|g| Ok(Arc::new(LlamaConfig::from_gguf(g)?))),
};

/// A linear operator of the decoder layer: its name, its module under `model.layers.{i}.`, its name under
/// GGUF's `blk.{i}.`, its `(out, in)` shape and whether it has a bias.
struct Operator {
    name: &'static str,
    module: &'static str,
    gguf: &'static str,
    shape: fn(&LlamaConfig) -> [usize; 2],
    bias: fn(&LlamaConfig) -> bool,
}

/// The layer's operators in data-flow order: the one table of their names.
const OPERATORS: [Operator; 7] = [
    Operator {
        name: "q_proj",
        module: "self_attn.q_proj",
        gguf: "attn_q",
        shape: |c| [c.q_width(), c.hidden_size],
        bias: |c| c.qkv_bias,
    },
    Operator {
        name: "k_proj",
        module: "self_attn.k_proj",
        gguf: "attn_k",
        shape: |c| [c.kv_width(), c.hidden_size],
        bias: |c| c.qkv_bias,
    },
    Operator {
        name: "v_proj",
        module: "self_attn.v_proj",
        gguf: "attn_v",
        shape: |c| [c.kv_width(), c.hidden_size],
        bias: |c| c.qkv_bias,
    },
    Operator {
        name: "o_proj",
        module: "self_attn.o_proj",
        gguf: "attn_output",
        shape: |c| [c.hidden_size, c.q_width()],
        bias: |c| c.o_bias,
    },
    Operator {
        name: "gate_proj",
        module: "mlp.gate_proj",
        gguf: "ffn_gate",
        shape: |c| [c.intermediate_size, c.hidden_size],
        bias: |c| c.mlp_bias,
    },
    Operator {
        name: "up_proj",
        module: "mlp.up_proj",
        gguf: "ffn_up",
        shape: |c| [c.intermediate_size, c.hidden_size],
        bias: |c| c.mlp_bias,
    },
    Operator {
        name: "down_proj",
        module: "mlp.down_proj",
        gguf: "ffn_down",
        shape: |c| [c.hidden_size, c.intermediate_size],
        bias: |c| c.mlp_bias,
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

/// The layer's two RMSNorms (their module, their GGUF name): before attention, before the MLP.
const NORMS: [(&str, &str); 2] = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")];

/// Qwen3's RMSNorms on each query and key head (their module, their GGUF name), `head_dim` wide.
const QK_NORMS: [(&str, &str); 2] = [("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")];

/// The tensors outside the layers (Hugging Face name, GGUF name): embeddings, final norm, head.
const EMBED: (&str, &str) = ("model.embed_tokens.weight", "token_embd.weight");
const FINAL_NORM: (&str, &str) = ("model.norm.weight", "output_norm.weight");
const HEAD: (&str, &str) = ("lm_head.weight", "output.weight");

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// How RoPE frequencies are rescaled for long context (Hugging Face `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq / factor`.
    Linear { factor: f64 },
    /// LLaMA 3.1's piecewise rescaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// `config.json` of the family as Hugging Face writes it (the fields read; the rest is ignored).
#[derive(Debug, Deserialize)]
pub struct ConfigJson {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// transformers < 5.
    pub rope_scaling: Option<RopeJson>,
    /// transformers ≥ 5: the scaling and `rope_theta` together.
    pub rope_parameters: Option<RopeJson>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    /// Biases on q, k, v and o (Qwen2 has them on q, k, v whatever this says).
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub hidden_act: Option<String>,
    /// Mistral (all layers), Qwen (where `layer_types` or `use_sliding_window` says).
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    /// `sliding_attention` / `full_attention` per layer (transformers ≥ 5).
    pub layer_types: Option<Vec<String>>,
}

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Deserialize)]
pub struct RopeJson {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
}

impl ConfigJson {
    fn resolve(self) -> Result<LlamaConfig> {
        if let Some(act) = &self.hidden_act {
            ensure!(act == "silu", "hidden_act \"{act}\" is not supported for {} (silu is)", self.model_type);
        }
        let heads = self.num_attention_heads;
        let params = self.rope_parameters.as_ref();
        let rope_theta = params.and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10000.0);
        let rope_scaling = match params.or(self.rope_scaling.as_ref()) {
            Some(s) => s.scaling()?,
            None => None,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let is_qwen = self.model_type == "qwen2";
        let n = self.num_hidden_layers;
        let sliding: Vec<bool> = match (&self.layer_types, self.sliding_window) {
            (_, None) => vec![false; n],
            (Some(types), Some(_)) => {
                ensure!(types.len() == n, "layer_types has {} entries for {n} layers", types.len());
                types.iter().map(|t| t == "sliding_attention").collect()
            }
            (None, Some(_)) => vec![self.use_sliding_window.unwrap_or(true); n],
        };
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads.max(1)),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is_qwen || attention_bias,
            o_bias: attention_bias && !is_qwen,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: self.model_type == "qwen3",
            sliding_window: self.sliding_window.filter(|_| sliding.iter().any(|&s| s)),
            sliding,
            bos_token_id: self.bos_token_id.as_ref().and_then(TokenIds::first),
            eos_token_id: self.eos_token_id.as_ref().and_then(TokenIds::first),
            model_type: self.model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl RopeJson {
    fn scaling(&self) -> Result<Option<RopeScaling>> {
        let f = |v: Option<f64>, k: &str| v.ok_or_else(|| anyhow!("rope scaling: missing \"{k}\""));
        Ok(match self.rope_type.as_deref().or(self.type_.as_deref()).unwrap_or("default") {
            "default" => None,
            "linear" => Some(RopeScaling::Linear { factor: f(self.factor, "factor")? }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: f(self.factor, "factor")?,
                low_freq_factor: f(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: f(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: f(
                    self.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            }),
            other => bail!("rope scaling type \"{other}\" is not supported (default, linear, llama3 are)"),
        })
    }
}

/// The family's configuration, resolved (defaults filled in, Qwen2's biases made explicit).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, ... as given.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2; LLaMA's `attention_bias` also puts one on o).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm on each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// A sliding layer's query sees this many keys, itself included (Mistral, Qwen's sliding layers).
    pub sliding_window: Option<usize>,
    /// Per layer: sliding (true) or full attention.
    pub sliding: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Read the configuration of a GGUF file (`llama` and `qwen2` architectures).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = g.get_u64(&k("embedding_length"))? as usize;
        let heads = g.get_u64(&k("attention.head_count"))? as usize;
        let kv = g.get_u64(&k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(heads);
        ensure!(heads > 0, "{}: attention.head_count is 0", g.path.display());
        let head_dim = g
            .get_u64(&k("attention.key_length"))
            .or_else(|_| g.get_u64(&k("rope.dimension_count")))
            .map(|v| v as usize)
            .unwrap_or(hidden / heads);
        let embd = g.tensors.get(EMBED.1).ok_or_else(|| anyhow!("{}: no {} tensor", g.path.display(), EMBED.1))?;
        let rope_scaling = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear { factor: g.get_f64(&k("rope.scaling.factor"))? }),
            Some(other) => bail!("{}: rope scaling \"{other}\" is not supported", g.path.display()),
        };
        ensure!(
            !g.tensors.contains_key("rope_freqs.weight"),
            "{}: rope_freqs.weight (LLaMA-3.1 frequency factors) is not supported yet; use the Hugging Face checkpoint",
            g.path.display()
        );
        let has = |t: &str| g.tensors.contains_key(&format!("blk.0.{t}"));
        let layers = g.get_u64(&k("block_count"))? as usize;
        let cfg = Self {
            vocab_size: embd.shape[0],
            hidden_size: hidden,
            intermediate_size: g.get_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(4096),
            tie_word_embeddings: !g.tensors.contains_key(HEAD.1),
            qkv_bias: has("attn_q.bias") || arch == "qwen2",
            o_bias: has("attn_output.bias"),
            mlp_bias: has("ffn_down.bias"),
            qk_norm: has("attn_q_norm.weight"),
            // llama.cpp's llama, qwen2 and qwen3 graphs attend to the whole context.
            sliding_window: None,
            sliding: vec![false; layers],
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
            eos_token_id: g.get_u64("tokenizer.ggml.eos_token_id").ok().map(|v| v as u32),
            model_type: arch,
        };
        cfg.validate().with_context(|| format!("{}: inconsistent metadata", g.path.display()))?;
        Ok(cfg)
    }

    /// llama.cpp's architecture for this model, where its graph computes what ours does (no sliding window,
    /// no LLaMA-3.1 frequency rescaling).
    fn gguf_architecture(&self) -> Option<&'static str> {
        if self.sliding.iter().any(|&s| s) || matches!(self.rope_scaling, Some(RopeScaling::Llama3 { .. })) {
            return None;
        }
        match self.model_type.as_str() {
            "llama" | "mistral" | "smollm" | "smollm2" => Some("llama"),
            "qwen2" => Some("qwen2"),
            "qwen3" => Some("qwen3"),
            _ => None,
        }
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
        Ok(())
    }

    fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// RoPE inverse frequencies, as Hugging Face computes them (including the rescalings we support).
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = rope_inv_freq(self.rope_theta, self.head_dim);
        let scaled: Vec<f64> = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

impl Config for LlamaConfig {
    fn model_type(&self) -> &str {
        &self.model_type
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
        let keys = (seqlen as f64 + 1.0) / 2.0;
        let layers = self.num_hidden_layers as f64;
        2.0 * (layers * linear as f64 + head as f64) + layers * 2.0 * 2.0 * keys * self.q_width() as f64
    }

    fn tensors(&self, _weights: &Weights) -> Vec<TensorSpec> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![TensorSpec::new(EMBED.0, vec![v, h], true), TensorSpec::new(FINAL_NORM.0, vec![h], true)];
        // A tied head is not stored (transformers re-ties it on load), even where a checkpoint carries one.
        if !self.tie_word_embeddings {
            out.push(TensorSpec::new(HEAD.0, vec![v, h], true));
        }
        for l in 0..self.num_hidden_layers {
            let p = layer_prefix(l);
            for (norm, _) in NORMS {
                out.push(TensorSpec::new(&format!("{p}.{norm}.weight"), vec![h], true));
            }
            if self.qk_norm {
                for (norm, _) in QK_NORMS {
                    out.push(TensorSpec::new(&format!("{p}.{norm}.weight"), vec![self.head_dim], true));
                }
            }
            // Attention's weights then its biases, then the MLP's: the order checkpoints have always been
            // written in, so that their bytes do not move.
            for block in [&OPERATORS[..4], &OPERATORS[4..]] {
                for o in block {
                    let [rows, cols] = (o.shape)(self);
                    let name = format!("{p}.{}.weight", o.module);
                    out.push(TensorSpec { linear: true, ..TensorSpec::new(&name, vec![rows, cols], true) });
                }
                for o in block {
                    let rows = (o.shape)(self)[0];
                    out.push(TensorSpec::new(&format!("{p}.{}.bias", o.module), vec![rows], (o.bias)(self)));
                }
            }
        }
        out
    }

    fn hf_name_of_gguf(&self, name: &str) -> Option<(String, FromGguf)> {
        for (hf, g) in [EMBED, FINAL_NORM, HEAD] {
            if name == g {
                return Some((hf.to_string(), FromGguf::AsIs));
            }
        }
        let (i, rest) = name.strip_prefix("blk.")?.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let p = layer_prefix(i.parse().ok()?);
        if let Some((norm, _)) = NORMS.iter().chain(&QK_NORMS).find(|(_, g)| *g == module) {
            return Some((format!("{p}.{norm}.{suffix}"), FromGguf::AsIs));
        }
        let o = OPERATORS.iter().find(|o| o.gguf == module)?;
        // llama.cpp permutes Q/K rows for its `llama` architecture only (qwen2 keeps the NeoX / HF layout).
        let heads = match o.name {
            "q_proj" => Some(self.num_attention_heads),
            "k_proj" => Some(self.num_key_value_heads),
            _ => None,
        };
        let how = match heads {
            Some(h) if self.gguf_architecture() == Some("llama") => FromGguf::UnpermuteRows(h),
            _ => FromGguf::AsIs,
        };
        Some((format!("{p}.{}.{suffix}", o.module), how))
    }

    fn gguf_metadata(&self) -> Option<Vec<(String, Value)>> {
        let arch = self.gguf_architecture()?;
        let k = |s: &str| format!("{arch}.{s}");
        let u = |v: usize| Value::U32(v as u32);
        let mut kv = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (k("block_count"), u(self.num_hidden_layers)),
            (k("context_length"), u(self.max_position_embeddings)),
            (k("embedding_length"), u(self.hidden_size)),
            (k("feed_forward_length"), u(self.intermediate_size)),
            (k("attention.head_count"), u(self.num_attention_heads)),
            (k("attention.head_count_kv"), u(self.num_key_value_heads)),
            (k("attention.key_length"), u(self.head_dim)),
            (k("attention.value_length"), u(self.head_dim)),
            (k("rope.freq_base"), Value::F32(self.rope_theta as f32)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(self.rms_norm_eps as f32)),
            (k("vocab_size"), u(self.vocab_size)),
        ];
        if arch == "llama" {
            kv.push((k("rope.dimension_count"), u(self.head_dim)));
        }
        // config.json's special ids, over the tokenizer's guesses (as llama.cpp's converter reads them).
        for (key, id) in [("bos", self.bos_token_id), ("eos", self.eos_token_id)] {
            if let Some(id) = id {
                kv.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
            }
        }
        if let Some(RopeScaling::Linear { factor }) = self.rope_scaling {
            kv.push((k("rope.scaling.type"), Value::String("linear".into())));
            kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        Some(kv)
    }

    fn gguf_tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [EMBED.1, FINAL_NORM.1, HEAD.1].iter().map(|s| s.to_string()).collect();
        for i in 0..self.num_hidden_layers {
            for (_, g) in NORMS.iter().chain(&QK_NORMS) {
                names.push(format!("blk.{i}.{g}.weight"));
            }
            for o in &OPERATORS {
                names.extend(["weight", "bias"].map(|s| format!("blk.{i}.{}.{s}", o.gguf)));
            }
        }
        names
    }

    fn to_hf_json(&self) -> Json {
        let rope_parameters = match &self.rope_scaling {
            None => json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor, "rope_theta": self.rope_theta})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                    "rope_theta": self.rope_theta
                })
            }
        };
        let (model_type, arch) = match self.model_type.as_str() {
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
            "mistral" => ("mistral", "MistralForCausalLM"),
            _ => ("llama", "LlamaForCausalLM"),
        };
        let mut j = json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
            "dtype": "float32",
        });
        if model_type == "llama" {
            j["attention_bias"] = json!(self.qkv_bias);
            j["mlp_bias"] = json!(self.mlp_bias);
        }
        if let Some(w) = self.sliding_window {
            let types: Vec<&str> =
                self.sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
            j["sliding_window"] = json!(w);
            j["use_sliding_window"] = json!(true);
            j["layer_types"] = json!(types);
        }
        j
    }

    fn build(&self, weights: Arc<Weights>) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Llama::new(self.clone(), weights)?))
    }
}

pub struct Llama {
    model_cfg: ModelConfig,
    cfg: LlamaConfig,
    weights: Arc<Weights>,
    embed: VocabMatrix,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<VocabMatrix>,
}

pub struct LlamaLayer {
    idx: usize,
    cfg: LlamaConfig,
    /// As [`NORMS`].
    norms: [Tensor; 2],
    /// As [`QK_NORMS`] (Qwen3).
    qk_norms: Option<[Tensor; 2]>,
    /// As [`OPERATORS`].
    ops: [Linear; 7],
}

impl Llama {
    pub fn new(cfg: LlamaConfig, weights: Arc<Weights>) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = VocabMatrix::new(&weights, EMBED.0, [v, h])?;
        let norm = weights.load_shaped(FINAL_NORM.0, &[h])?;
        // A checkpoint may carry an lm_head even when tied; the tie decides, as in transformers.
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(VocabMatrix::new(&weights, HEAD.0, [v, h])?) };
        Ok(Self { model_cfg: Arc::new(cfg.clone()), cfg, weights, embed, norm, lm_head })
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self.embed.rows(&flat)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    fn context(&self, seqlen: usize) -> Result<LayerContext> {
        Ok(LayerContext { seqlen, rope: vec![Rope::new(&self.cfg.inv_freq(), seqlen)?] })
    }

    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>> {
        let (c, w, p) = (&self.cfg, &self.weights, layer_prefix(i));
        let norm = |(name, _): (&str, &str)| w.load_shaped(&format!("{p}.{name}.weight"), &[c.hidden_size]);
        let op = |o: &Operator| -> Result<Linear> {
            let [rows, cols] = (o.shape)(c);
            let weight = w.load_shaped(&format!("{p}.{}.weight", o.module), &[rows, cols])?;
            let bias =
                if (o.bias)(c) { Some(w.load_shaped(&format!("{p}.{}.bias", o.module), &[rows])?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let norms = [norm(NORMS[0])?, norm(NORMS[1])?];
        let qk = |(name, _): (&str, &str)| w.load_shaped(&format!("{p}.{name}.weight"), &[c.head_dim]);
        let qk_norms = if c.qk_norm { Some([qk(QK_NORMS[0])?, qk(QK_NORMS[1])?]) } else { None };
        let ops = [
            op(&OPERATORS[0])?,
            op(&OPERATORS[1])?,
            op(&OPERATORS[2])?,
            op(&OPERATORS[3])?,
            op(&OPERATORS[4])?,
            op(&OPERATORS[5])?,
            op(&OPERATORS[6])?,
        ];
        Ok(Box::new(LlamaLayer { idx: i, cfg: c.clone(), norms, qk_norms, ops }))
    }

    fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?)
    }

    fn lm_head(&self) -> Result<&Tensor> {
        // A model asked for its head is being run token by token: keep the embeddings too.
        self.embed.whole()?;
        self.lm_head.as_ref().unwrap_or(&self.embed).whole()
    }
}

impl LlamaLayer {
    fn attention(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let Some(f) = hook.as_mut() {
            for n in INPUT_GROUPS[0] {
                f(n, x)?;
            }
        }
        // Heads, each normed first where the model has per-head norms (Qwen3: 0 for q, 1 for k).
        let heads = |y: Tensor, n: usize, norm: Option<usize>| -> Result<Tensor> {
            let mut y = y.reshape((b, t, n, hd))?;
            if let (Some(k), Some(norms)) = (norm, &self.qk_norms) {
                y = candle_nn::ops::rms_norm(&y, &norms[k], c.rms_norm_eps as f32)?;
            }
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.op("q_proj").forward(x)?, nh, Some(0))?;
        let k = heads(self.op("k_proj").forward(x)?, nkv, Some(1))?;
        let v = heads(self.op("v_proj").forward(x)?, nkv, None)?;
        let (q, k) = (ctx.rope[0].apply(&q)?, ctx.rope[0].apply(&k)?);
        let window = c.sliding_window.filter(|_| c.sliding[self.idx]);
        let attn =
            crate::linalg::causal_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt(), window, self.op("q_proj").matmul)?;
        if let Some(f) = hook.as_mut() {
            f("o_proj", &attn)?;
        }
        self.op("o_proj").forward(&attn)
    }

    /// The layer up to its last projection: (residual stream after attention, input of down_proj).
    fn until_down(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &self.norms[0], eps)?;
        let x = (x + self.attention(&h, ctx, hook)?)?;
        let h = candle_nn::ops::rms_norm(&x, &self.norms[1], eps)?;
        if let Some(f) = hook.as_mut() {
            for n in INPUT_GROUPS[2] {
                f(n, &h)?;
            }
        }
        let act = crate::linalg::silu_mul(&self.op("gate_proj").forward(&h)?, &self.op("up_proj").forward(&h)?)?;
        if let Some(f) = hook.as_mut() {
            f("down_proj", &act)?;
        }
        Ok((x, act))
    }
}

impl LlamaLayer {
    /// The layer's output from the residual stream after attention and the input of down_proj.
    fn finish(&self, x: &Tensor, act: &Tensor) -> Result<Tensor> {
        Ok((x + self.op("down_proj").forward(act)?)?)
    }
}

impl DecoderLayer for LlamaLayer {
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
        let eps = self.cfg.rms_norm_eps as f32;
        Ok(match gi {
            // gate/up read the post-attention norm of the residual; down reads the SwiGLU activation.
            2 => {
                let x = (x + self.op("o_proj").forward(prev)?)?;
                let input = candle_nn::ops::rms_norm(&x, &self.norms[1], eps)?;
                Some(GroupStep { input, residual: Some(x) })
            }
            3 => Some(GroupStep {
                input: crate::linalg::silu_mul(
                    &self.op("gate_proj").forward(prev)?,
                    &self.op("up_proj").forward(prev)?,
                )?,
                residual: None,
            }),
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
        let mut v: Vec<(String, Tensor)> =
            NORMS.iter().zip(&self.norms).map(|((n, _), t)| (format!("{p}.{n}.weight"), t.clone())).collect();
        for ((n, _), t) in QK_NORMS.iter().zip(self.qk_norms.iter().flatten()) {
            v.push((format!("{p}.{n}.weight"), t.clone()));
        }
        for (o, l) in OPERATORS.iter().zip(&self.ops) {
            v.push((format!("{p}.{}.weight", o.module), l.weight.clone()));
            if let Some(b) = &l.bias {
                v.push((format!("{p}.{}.bias", o.module), b.clone()));
            }
        }
        v
    }
}
