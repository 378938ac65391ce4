//! Model configurations: read from a Hugging Face `config.json` or GGUF metadata, written back as
//! `config.json` by `convert` and `prune`.

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value as Json, json};

use super::gguf::GgufFile;

/// How RoPE frequencies are rescaled for long context (Hugging Face `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq / factor`.
    Linear { factor: f64 },
    /// LLaMA 3.1's piecewise rescaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The LLaMA family: LLaMA 1/2/3, Mistral, SmolLM2, Qwen2 (q/k/v biases).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, ... as given; written back unchanged.
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
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// OPT (125M ... 66B): learned positions (offset 2), LayerNorm, ReLU, biases everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// Pre-LN (true for all sizes but 350M).
    pub do_layer_norm_before: bool,
    /// Embedding width; differs from `hidden_size` in OPT-350M, which then has project_in/out.
    pub word_embed_proj_dim: usize,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    pub remove_final_layer_norm: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Opt(OptConfig),
}

fn get_usize(j: &Json, key: &str) -> Result<usize> {
    j.get(key).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| anyhow!("missing or non-integer \"{key}\""))
}

fn opt_usize(j: &Json, key: &str) -> Option<usize> {
    j.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

fn opt_bool(j: &Json, key: &str, default: bool) -> bool {
    j.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
}

fn opt_token(j: &Json, key: &str) -> Option<u32> {
    match j.get(key) {
        Some(Json::Number(n)) => n.as_u64().map(|v| v as u32),
        // Some configs list several EOS ids: the first is the one used for padding/separation.
        Some(Json::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
        _ => None,
    }
}

fn parse_rope(j: &Json) -> Result<(f64, Option<RopeScaling>)> {
    // transformers ≥ 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    let params = j.get("rope_parameters").filter(|v| v.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| j.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    let scaling = params.or_else(|| j.get("rope_scaling").filter(|v| v.is_object()));
    let Some(s) = scaling else { return Ok((theta, None)) };
    let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).ok_or_else(|| anyhow!("rope scaling: missing \"{k}\""));
    let scaling = match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: f("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        }),
        other => bail!("rope scaling type \"{other}\" is not supported (default, linear, llama3 are)"),
    };
    Ok((theta, scaling))
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(j: &Json) -> Result<Self> {
        let model_type =
            j.get("model_type").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("missing \"model_type\""))?;
        match model_type {
            "llama" | "mistral" | "qwen2" | "smollm" | "smollm2" => {
                let hidden = get_usize(j, "hidden_size")?;
                let heads = get_usize(j, "num_attention_heads")?;
                let (rope_theta, rope_scaling) = parse_rope(j)?;
                let attention_bias = opt_bool(j, "attention_bias", false);
                let is_qwen = model_type == "qwen2";
                let cfg = LlamaConfig {
                    model_type: model_type.to_string(),
                    vocab_size: get_usize(j, "vocab_size")?,
                    hidden_size: hidden,
                    intermediate_size: get_usize(j, "intermediate_size")?,
                    num_hidden_layers: get_usize(j, "num_hidden_layers")?,
                    num_attention_heads: heads,
                    num_key_value_heads: opt_usize(j, "num_key_value_heads").unwrap_or(heads),
                    head_dim: opt_usize(j, "head_dim").unwrap_or(hidden / heads.max(1)),
                    rms_norm_eps: j.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-6),
                    rope_theta,
                    rope_scaling,
                    max_position_embeddings: opt_usize(j, "max_position_embeddings").unwrap_or(4096),
                    tie_word_embeddings: opt_bool(j, "tie_word_embeddings", false),
                    qkv_bias: is_qwen || attention_bias,
                    o_bias: attention_bias && !is_qwen,
                    mlp_bias: opt_bool(j, "mlp_bias", false),
                    bos_token_id: opt_token(j, "bos_token_id"),
                    eos_token_id: opt_token(j, "eos_token_id"),
                };
                if let Some(act) = j.get("hidden_act").and_then(|v| v.as_str()) {
                    ensure!(act == "silu", "hidden_act \"{act}\" is not supported for {model_type} (silu is)");
                }
                cfg.validate()?;
                Ok(ModelConfig::Llama(cfg))
            }
            "opt" => {
                let hidden = get_usize(j, "hidden_size")?;
                let cfg = OptConfig {
                    vocab_size: get_usize(j, "vocab_size")?,
                    hidden_size: hidden,
                    ffn_dim: get_usize(j, "ffn_dim")?,
                    num_hidden_layers: get_usize(j, "num_hidden_layers")?,
                    num_attention_heads: get_usize(j, "num_attention_heads")?,
                    max_position_embeddings: opt_usize(j, "max_position_embeddings").unwrap_or(2048),
                    do_layer_norm_before: opt_bool(j, "do_layer_norm_before", true),
                    word_embed_proj_dim: opt_usize(j, "word_embed_proj_dim").unwrap_or(hidden),
                    enable_bias: opt_bool(j, "enable_bias", true),
                    layer_norm_elementwise_affine: opt_bool(j, "layer_norm_elementwise_affine", true),
                    remove_final_layer_norm: opt_bool(j, "_remove_final_layer_norm", false),
                    tie_word_embeddings: opt_bool(j, "tie_word_embeddings", true),
                    bos_token_id: opt_token(j, "bos_token_id"),
                    eos_token_id: opt_token(j, "eos_token_id"),
                    pad_token_id: opt_token(j, "pad_token_id"),
                };
                if let Some(act) = j.get("activation_function").and_then(|v| v.as_str()) {
                    ensure!(act == "relu", "activation_function \"{act}\" is not supported for OPT (relu is)");
                }
                ensure!(
                    cfg.num_attention_heads > 0 && hidden % cfg.num_attention_heads == 0,
                    "hidden_size {hidden} is not divisible by num_attention_heads {}",
                    cfg.num_attention_heads
                );
                Ok(ModelConfig::Opt(cfg))
            }
            other => bail!("unsupported architecture \"{other}\" (supported: llama, mistral, qwen2, opt)"),
        }
    }

    /// Read the configuration of a GGUF file (`llama` and `qwen2` architectures).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        let k = |s: &str| format!("{arch}.{s}");
        match arch.as_str() {
            "llama" | "qwen2" => {
                let hidden = g.get_u64(&k("embedding_length"))? as usize;
                let heads = g.get_u64(&k("attention.head_count"))? as usize;
                let kv = g.get_u64(&k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(heads);
                ensure!(heads > 0, "{}: attention.head_count is 0", g.path.display());
                let head_dim = g
                    .get_u64(&k("attention.key_length"))
                    .or_else(|_| g.get_u64(&k("rope.dimension_count")))
                    .map(|v| v as usize)
                    .unwrap_or(hidden / heads);
                let embd = g
                    .tensors
                    .get("token_embd.weight")
                    .ok_or_else(|| anyhow!("{}: no token_embd.weight tensor", g.path.display()))?;
                let vocab_size = embd.shape[0];
                let tied = !g.tensors.contains_key("output.weight");
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
                let is_qwen = arch == "qwen2";
                let qkv_bias = g.tensors.contains_key("blk.0.attn_q.bias");
                let cfg = LlamaConfig {
                    model_type: arch.clone(),
                    vocab_size,
                    hidden_size: hidden,
                    intermediate_size: g.get_u64(&k("feed_forward_length"))? as usize,
                    num_hidden_layers: g.get_u64(&k("block_count"))? as usize,
                    num_attention_heads: heads,
                    num_key_value_heads: kv,
                    head_dim,
                    rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
                    rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10000.0),
                    rope_scaling,
                    max_position_embeddings: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(4096),
                    tie_word_embeddings: tied,
                    qkv_bias: qkv_bias || is_qwen,
                    o_bias: g.tensors.contains_key("blk.0.attn_output.bias"),
                    mlp_bias: g.tensors.contains_key("blk.0.ffn_down.bias"),
                    bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
                    eos_token_id: g.get_u64("tokenizer.ggml.eos_token_id").ok().map(|v| v as u32),
                };
                cfg.validate().with_context(|| format!("{}: inconsistent metadata", g.path.display()))?;
                Ok(ModelConfig::Llama(cfg))
            }
            other => bail!("{}: unsupported GGUF architecture \"{other}\" (supported: llama, qwen2)", g.path.display()),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Opt(c) => c.num_hidden_layers,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Opt(c) => c.vocab_size,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Llama(c) => c.eos_token_id,
            ModelConfig::Opt(c) => c.eos_token_id,
        }
    }

    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Opt(c) => c.max_position_embeddings,
        }
    }

    pub fn model_type(&self) -> &str {
        match self {
            ModelConfig::Llama(c) => &c.model_type,
            ModelConfig::Opt(_) => "opt",
        }
    }

    /// Multiply-add FLOPs (2 per MAC) of one token's forward pass in a causal window of `seqlen`: every linear
    /// operator, the LM head, and attention (QKᵀ and PV over the (seqlen + 1) / 2 keys a query sees on average).
    pub fn flops_per_token(&self, seqlen: usize) -> f64 {
        let (layers, linear, attn_width, head) = match self {
            ModelConfig::Llama(c) => {
                let q = c.num_attention_heads * c.head_dim;
                let kv = c.num_key_value_heads * c.head_dim;
                let h = c.hidden_size;
                let lin = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size;
                (c.num_hidden_layers, lin, q, c.vocab_size * h)
            }
            ModelConfig::Opt(c) => {
                let h = c.hidden_size;
                let lin = 4 * h * h + 2 * h * c.ffn_dim;
                let proj = if c.word_embed_proj_dim != h { 2 * h * c.word_embed_proj_dim } else { 0 };
                (c.num_hidden_layers, lin, h, c.vocab_size * c.word_embed_proj_dim + proj)
            }
        };
        let keys = (seqlen as f64 + 1.0) / 2.0;
        2.0 * (layers * linear + head) as f64 + layers as f64 * 2.0 * 2.0 * keys * attn_width as f64
    }

    /// A `config.json` that Hugging Face `transformers` loads.
    pub fn to_hf_json(&self) -> Json {
        match self {
            ModelConfig::Llama(c) => {
                let rope_parameters = match &c.rope_scaling {
                    None => json!({"rope_type": "default", "rope_theta": c.rope_theta}),
                    Some(RopeScaling::Linear { factor }) => {
                        json!({"rope_type": "linear", "factor": factor, "rope_theta": c.rope_theta})
                    }
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    }) => json!({
                        "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": original_max_position_embeddings,
                        "rope_theta": c.rope_theta
                    }),
                };
                let model_type = if c.model_type == "qwen2" { "qwen2" } else { "llama" };
                let arch = if model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
                let mut j = json!({
                    "architectures": [arch],
                    "model_type": model_type,
                    "vocab_size": c.vocab_size,
                    "hidden_size": c.hidden_size,
                    "intermediate_size": c.intermediate_size,
                    "num_hidden_layers": c.num_hidden_layers,
                    "num_attention_heads": c.num_attention_heads,
                    "num_key_value_heads": c.num_key_value_heads,
                    "head_dim": c.head_dim,
                    "hidden_act": "silu",
                    "rms_norm_eps": c.rms_norm_eps,
                    "max_position_embeddings": c.max_position_embeddings,
                    "tie_word_embeddings": c.tie_word_embeddings,
                    "rope_theta": c.rope_theta,
                    "rope_parameters": rope_parameters,
                    "bos_token_id": c.bos_token_id,
                    "eos_token_id": c.eos_token_id,
                    "torch_dtype": "float32",
                    "dtype": "float32",
                });
                if model_type == "llama" {
                    j["attention_bias"] = json!(c.qkv_bias);
                    j["mlp_bias"] = json!(c.mlp_bias);
                }
                j
            }
            ModelConfig::Opt(c) => json!({
                "architectures": ["OPTForCausalLM"],
                "model_type": "opt",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "ffn_dim": c.ffn_dim,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "max_position_embeddings": c.max_position_embeddings,
                "do_layer_norm_before": c.do_layer_norm_before,
                "word_embed_proj_dim": c.word_embed_proj_dim,
                "enable_bias": c.enable_bias,
                "layer_norm_elementwise_affine": c.layer_norm_elementwise_affine,
                "_remove_final_layer_norm": c.remove_final_layer_norm,
                "activation_function": "relu",
                "tie_word_embeddings": c.tie_word_embeddings,
                "bos_token_id": c.bos_token_id,
                "eos_token_id": c.eos_token_id,
                "pad_token_id": c.pad_token_id,
                "torch_dtype": "float32",
                "dtype": "float32",
            }),
        }
    }
}

impl LlamaConfig {
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

    /// RoPE inverse frequencies, as Hugging Face computes them (including the rescalings we support).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
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
