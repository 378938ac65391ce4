//! The LLaMA family (LLaMA 1/2/3, Mistral, SmolLM2, Qwen2): RMSNorm, rotary attention with grouped
//! key/value heads, SwiGLU MLP. Matches Hugging Face `modeling_llama.py` / `modeling_qwen2.py`.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::config::LlamaConfig;
use super::{CausalLm, DecoderLayer, Hook, LayerContext, Linear, ModelConfig, Weights};

const LINEARS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

pub struct Llama {
    model_cfg: ModelConfig,
    cfg: LlamaConfig,
    weights: Arc<Weights>,
    embed: Tensor,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<Tensor>,
}

pub struct LlamaLayer {
    idx: usize,
    cfg: LlamaConfig,
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// (name, shape, required) of every tensor.
pub fn expected_tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h], true),
        ("model.norm.weight".to_string(), vec![h], true),
        ("lm_head.weight".to_string(), vec![v, h], !c.tie_word_embeddings),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |n: &str, s: Vec<usize>, req: bool| out.push((format!("{p}.{n}"), s, req));
        add("input_layernorm.weight", vec![h], true);
        add("post_attention_layernorm.weight", vec![h], true);
        add("self_attn.q_proj.weight", vec![q, h], true);
        add("self_attn.k_proj.weight", vec![kv, h], true);
        add("self_attn.v_proj.weight", vec![kv, h], true);
        add("self_attn.o_proj.weight", vec![h, q], true);
        add("self_attn.q_proj.bias", vec![q], c.qkv_bias);
        add("self_attn.k_proj.bias", vec![kv], c.qkv_bias);
        add("self_attn.v_proj.bias", vec![kv], c.qkv_bias);
        add("self_attn.o_proj.bias", vec![h], c.o_bias);
        add("mlp.gate_proj.weight", vec![i, h], true);
        add("mlp.up_proj.weight", vec![i, h], true);
        add("mlp.down_proj.weight", vec![h, i], true);
        add("mlp.gate_proj.bias", vec![i], c.mlp_bias);
        add("mlp.up_proj.bias", vec![i], c.mlp_bias);
        add("mlp.down_proj.bias", vec![h], c.mlp_bias);
    }
    out
}

impl Llama {
    pub fn new(cfg: LlamaConfig, weights: Arc<Weights>) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = weights.load_shaped("model.embed_tokens.weight", &[v, h])?;
        let norm = weights.load_shaped("model.norm.weight", &[h])?;
        // A checkpoint may carry an lm_head even when tied; the tie decides, as in transformers.
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(weights.load_shaped("lm_head.weight", &[v, h])?) };
        Ok(Self { model_cfg: ModelConfig::Llama(cfg.clone()), cfg, weights, embed, norm, lm_head })
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
        Ok(self.embed.index_select(&flat, 0)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    fn context(&self, seqlen: usize) -> Result<LayerContext> {
        // As transformers: angles = position × inv_freq in f32, then cos/sin.
        let inv = self.cfg.inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(seqlen * half);
        let mut sin = Vec::with_capacity(seqlen * half);
        for p in 0..seqlen {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(LayerContext {
            seqlen,
            cos: Some(Tensor::from_vec(cos, (seqlen, half), &Device::Cpu)?),
            sin: Some(Tensor::from_vec(sin, (seqlen, half), &Device::Cpu)?),
        })
    }

    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>> {
        let c = &self.cfg;
        let w = &self.weights;
        let p = format!("model.layers.{i}");
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = w.load_shaped(&format!("{p}.{name}.weight"), &[out, inp])?;
            let bias = if bias { Some(w.load_shaped(&format!("{p}.{name}.bias"), &[out])?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let layer = LlamaLayer {
            idx: i,
            cfg: c.clone(),
            input_norm: w.load_shaped(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_norm: w.load_shaped(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            q: lin("self_attn.q_proj", q, h, c.qkv_bias)?,
            k: lin("self_attn.k_proj", kv, h, c.qkv_bias)?,
            v: lin("self_attn.v_proj", kv, h, c.qkv_bias)?,
            o: lin("self_attn.o_proj", h, q, c.o_bias)?,
            gate: lin("mlp.gate_proj", inter, h, c.mlp_bias)?,
            up: lin("mlp.up_proj", inter, h, c.mlp_bias)?,
            down: lin("mlp.down_proj", h, inter, c.mlp_bias)?,
        };
        Ok(Box::new(layer))
    }

    fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?)
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h.clone()));
        }
        v
    }
}

impl LlamaLayer {
    fn attention(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let Some(f) = hook.as_mut() {
            for n in ["q_proj", "k_proj", "v_proj"] {
                f(n, x)?;
            }
        }
        let heads =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(self.q.forward(x)?, nh)?;
        let k = heads(self.k.forward(x)?, nkv)?;
        let v = heads(self.v.forward(x)?, nkv)?;
        let (cos, sin) = (ctx.cos.as_ref().expect("rope tables"), ctx.sin.as_ref().expect("rope tables"));
        let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        let attn = crate::linalg::causal_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt())?;
        if let Some(f) = hook.as_mut() {
            f("o_proj", &attn)?;
        }
        self.o.forward(&attn)
    }

    /// The layer up to its last projection: (residual stream after attention, input of down_proj).
    fn until_down(&self, x: &Tensor, ctx: &LayerContext, hook: &mut Option<Hook>) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &self.input_norm, eps)?;
        let x = (x + self.attention(&h, ctx, hook)?)?;
        let h = candle_nn::ops::rms_norm(&x, &self.post_norm, eps)?;
        if let Some(f) = hook.as_mut() {
            f("gate_proj", &h)?;
            f("up_proj", &h)?;
        }
        let act = (self.gate.forward(&h)?.silu()? * self.up.forward(&h)?)?;
        if let Some(f) = hook.as_mut() {
            f("down_proj", &act)?;
        }
        Ok((x, act))
    }
}

impl DecoderLayer for LlamaLayer {
    fn forward(&self, x: &Tensor, ctx: &LayerContext, mut hook: Option<Hook>) -> Result<Tensor> {
        let (x, act) = self.until_down(x, ctx, &mut hook)?;
        Ok((x + self.down.forward(&act)?)?)
    }

    fn capture(&self, x: &Tensor, ctx: &LayerContext, hook: Hook) -> Result<()> {
        self.until_down(x, ctx, &mut Some(hook)).map(|_| ())
    }

    fn next_group_input(&self, gi: usize, x: &Tensor, prev: &Tensor) -> Result<Option<Tensor>> {
        Ok(match gi {
            // gate/up read the post-attention norm of the residual; down reads the SwiGLU activation.
            2 => Some(candle_nn::ops::rms_norm(
                &(x + self.o.forward(prev)?)?,
                &self.post_norm,
                self.cfg.rms_norm_eps as f32,
            )?),
            3 => Some((self.gate.forward(prev)?.silu()? * self.up.forward(prev)?)?),
            _ => None,
        })
    }

    fn linear_names(&self) -> &'static [&'static str] {
        LINEARS
    }

    fn input_groups(&self) -> &'static [&'static [&'static str]] {
        &[&["q_proj", "k_proj", "v_proj"], &["o_proj"], &["gate_proj", "up_proj"], &["down_proj"]]
    }

    fn linear(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q_proj" => &self.q,
            "k_proj" => &self.k,
            "v_proj" => &self.v,
            "o_proj" => &self.o,
            "gate_proj" => &self.gate,
            "up_proj" => &self.up,
            "down_proj" => &self.down,
            _ => return None,
        })
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "q_proj" => &mut self.q,
            "k_proj" => &mut self.k,
            "v_proj" => &mut self.v,
            "o_proj" => &mut self.o,
            "gate_proj" => &mut self.gate,
            "up_proj" => &mut self.up,
            "down_proj" => &mut self.down,
            _ => return None,
        })
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = format!("model.layers.{}", self.idx);
        let mut v = vec![
            (format!("{p}.input_layernorm.weight"), self.input_norm.clone()),
            (format!("{p}.post_attention_layernorm.weight"), self.post_norm.clone()),
        ];
        for name in LINEARS {
            let module = if ["gate_proj", "up_proj", "down_proj"].contains(name) { "mlp" } else { "self_attn" };
            let l = self.linear(name).expect("known linear");
            v.push((format!("{p}.{module}.{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                v.push((format!("{p}.{module}.{name}.bias"), b.clone()));
            }
        }
        v
    }
}
