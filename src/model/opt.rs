//! OPT (Zhang et al. 2022): learned positions with an offset of 2, LayerNorm before (or, for OPT-350M,
//! after) each block, ReLU MLP, biases everywhere, and `project_in`/`project_out` when the embedding width
//! differs from the hidden size. Matches Hugging Face `modeling_opt.py`.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::OptConfig;
use super::{CausalLm, DecoderLayer, Hook, LayerContext, Linear, ModelConfig, Weights};

const LINEARS: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];
/// OPT's learned position table starts at index 2 (a fairseq leftover).
const POS_OFFSET: usize = 2;
const LN_EPS: f64 = 1e-5;

/// `model.decoder.` in transformers' checkpoints; `decoder.` in some original OPT uploads.
fn prefix(weights: &Weights) -> &'static str {
    if weights.contains("decoder.embed_tokens.weight") && !weights.contains("model.decoder.embed_tokens.weight") {
        "decoder."
    } else {
        "model.decoder."
    }
}

pub fn expected_tensors(c: &OptConfig, weights: &Weights) -> Vec<(String, Vec<usize>, bool)> {
    let p = prefix(weights);
    let (h, f, v, e) = (c.hidden_size, c.ffn_dim, c.vocab_size, c.word_embed_proj_dim);
    let proj = e != h;
    let affine = c.layer_norm_elementwise_affine;
    let final_ln = c.do_layer_norm_before && !c.remove_final_layer_norm;
    let mut out = vec![
        (format!("{p}embed_tokens.weight"), vec![v, e], true),
        (format!("{p}embed_positions.weight"), vec![c.max_position_embeddings + POS_OFFSET, h], true),
        (format!("{p}project_in.weight"), vec![h, e], proj),
        (format!("{p}project_out.weight"), vec![e, h], proj),
        (format!("{p}final_layer_norm.weight"), vec![h], final_ln && affine),
        (format!("{p}final_layer_norm.bias"), vec![h], final_ln && affine),
        ("lm_head.weight".to_string(), vec![v, e], !c.tie_word_embeddings),
    ];
    let b = c.enable_bias;
    for l in 0..c.num_hidden_layers {
        let lp = format!("{p}layers.{l}");
        let mut add = |n: &str, s: Vec<usize>, req: bool| out.push((format!("{lp}.{n}"), s, req));
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(&format!("self_attn.{n}.weight"), vec![h, h], true);
            add(&format!("self_attn.{n}.bias"), vec![h], b);
        }
        add("fc1.weight", vec![f, h], true);
        add("fc1.bias", vec![f], b);
        add("fc2.weight", vec![h, f], true);
        add("fc2.bias", vec![h], b);
        for n in ["self_attn_layer_norm", "final_layer_norm"] {
            add(&format!("{n}.weight"), vec![h], affine);
            add(&format!("{n}.bias"), vec![h], affine);
        }
    }
    out
}

/// LayerNorm parameters (ones/zeros when the config has no affine part).
#[derive(Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, h: usize, affine: bool) -> Result<Self> {
        if affine {
            Ok(Self {
                weight: w.load_shaped(&format!("{name}.weight"), &[h])?,
                bias: w.load_shaped(&format!("{name}.bias"), &[h])?,
            })
        } else {
            Ok(Self {
                weight: Tensor::ones(h, DType::F32, &Device::Cpu)?,
                bias: Tensor::zeros(h, DType::F32, &Device::Cpu)?,
            })
        }
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.bias, LN_EPS as f32)?)
    }
    fn named(&self, name: &str, affine: bool, out: &mut Vec<(String, Tensor)>) {
        if affine {
            out.push((format!("{name}.weight"), self.weight.clone()));
            out.push((format!("{name}.bias"), self.bias.clone()));
        }
    }
}

pub struct Opt {
    model_cfg: ModelConfig,
    cfg: OptConfig,
    weights: Arc<Weights>,
    prefix: &'static str,
    embed: Tensor,
    positions: Tensor,
    project_in: Option<Tensor>,
    project_out: Option<Tensor>,
    final_ln: Option<LayerNorm>,
    lm_head: Option<Tensor>,
}

pub struct OptLayer {
    idx: usize,
    prefix: &'static str,
    cfg: OptConfig,
    attn_ln: LayerNorm,
    ffn_ln: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl Opt {
    pub fn new(cfg: OptConfig, weights: Arc<Weights>) -> Result<Self> {
        let p = prefix(&weights);
        let (h, v, e) = (cfg.hidden_size, cfg.vocab_size, cfg.word_embed_proj_dim);
        let embed = weights.load_shaped(&format!("{p}embed_tokens.weight"), &[v, e])?;
        let positions = weights
            .load_shaped(&format!("{p}embed_positions.weight"), &[cfg.max_position_embeddings + POS_OFFSET, h])?;
        let (project_in, project_out) = if e != h {
            (
                Some(weights.load_shaped(&format!("{p}project_in.weight"), &[h, e])?),
                Some(weights.load_shaped(&format!("{p}project_out.weight"), &[e, h])?),
            )
        } else {
            (None, None)
        };
        let final_ln = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(LayerNorm::load(&weights, &format!("{p}final_layer_norm"), h, cfg.layer_norm_elementwise_affine)?)
        } else {
            None
        };
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(weights.load_shaped("lm_head.weight", &[v, e])?) };
        Ok(Self {
            model_cfg: ModelConfig::Opt(cfg.clone()),
            cfg,
            weights,
            prefix: p,
            embed,
            positions,
            project_in,
            project_out,
            final_ln,
            lm_head,
        })
    }
}

impl CausalLm for Opt {
    fn config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        anyhow::ensure!(
            t <= self.cfg.max_position_embeddings,
            "sequence length {t} exceeds OPT's {} positions",
            self.cfg.max_position_embeddings
        );
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.word_embed_proj_dim))?;
        if let Some(p) = &self.project_in {
            x = Linear::new(p.clone(), None).forward(&x)?;
        }
        let pos = self.positions.narrow(0, POS_OFFSET, t)?;
        Ok(x.broadcast_add(&pos)?)
    }

    fn context(&self, seqlen: usize) -> Result<LayerContext> {
        Ok(LayerContext { seqlen, cos: None, sin: None })
    }

    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>> {
        let c = &self.cfg;
        let w = &self.weights;
        let lp = format!("{}layers.{i}", self.prefix);
        let (h, f) = (c.hidden_size, c.ffn_dim);
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let weight = w.load_shaped(&format!("{lp}.{name}.weight"), &[out, inp])?;
            let bias = if c.enable_bias { Some(w.load_shaped(&format!("{lp}.{name}.bias"), &[out])?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let affine = c.layer_norm_elementwise_affine;
        Ok(Box::new(OptLayer {
            idx: i,
            prefix: self.prefix,
            cfg: c.clone(),
            attn_ln: LayerNorm::load(w, &format!("{lp}.self_attn_layer_norm"), h, affine)?,
            ffn_ln: LayerNorm::load(w, &format!("{lp}.final_layer_norm"), h, affine)?,
            q: lin("self_attn.q_proj", h, h)?,
            k: lin("self_attn.k_proj", h, h)?,
            v: lin("self_attn.v_proj", h, h)?,
            out: lin("self_attn.out_proj", h, h)?,
            fc1: lin("fc1", f, h)?,
            fc2: lin("fc2", h, f)?,
        }))
    }

    fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut x = hidden.clone();
        if let Some(ln) = &self.final_ln {
            x = ln.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = Linear::new(p.clone(), None).forward(&x)?;
        }
        Ok(x)
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = self.prefix;
        let mut v = vec![
            (format!("{p}embed_tokens.weight"), self.embed.clone()),
            (format!("{p}embed_positions.weight"), self.positions.clone()),
        ];
        if let (Some(i), Some(o)) = (&self.project_in, &self.project_out) {
            v.push((format!("{p}project_in.weight"), i.clone()));
            v.push((format!("{p}project_out.weight"), o.clone()));
        }
        if let Some(ln) = &self.final_ln {
            ln.named(&format!("{p}final_layer_norm"), self.cfg.layer_norm_elementwise_affine, &mut v);
        }
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h.clone()));
        }
        v
    }
}

impl OptLayer {
    fn attention(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, h) = x.dims3()?;
        let nh = c.num_attention_heads;
        let hd = h / nh;
        if let Some(f) = hook.as_mut() {
            for n in ["q_proj", "k_proj", "v_proj"] {
                f(n, x)?;
            }
        }
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let attn = crate::linalg::causal_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt())?;
        if let Some(f) = hook.as_mut() {
            f("out_proj", &attn)?;
        }
        self.out.forward(&attn)
    }

    /// The layer up to its last projection: (residual stream after attention, input of fc2).
    fn until_fc2(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<(Tensor, Tensor)> {
        let pre = self.cfg.do_layer_norm_before;
        let h = if pre { self.attn_ln.forward(x)? } else { x.clone() };
        let mut x = (x + self.attention(&h, hook)?)?;
        if !pre {
            x = self.attn_ln.forward(&x)?;
        }
        let h = if pre { self.ffn_ln.forward(&x)? } else { x.clone() };
        if let Some(f) = hook.as_mut() {
            f("fc1", &h)?;
        }
        let a = self.fc1.forward(&h)?.relu()?;
        if let Some(f) = hook.as_mut() {
            f("fc2", &a)?;
        }
        Ok((x, a))
    }
}

impl DecoderLayer for OptLayer {
    fn forward(&self, x: &Tensor, _ctx: &LayerContext, mut hook: Option<Hook>) -> Result<Tensor> {
        let (x, a) = self.until_fc2(x, &mut hook)?;
        let x = (x + self.fc2.forward(&a)?)?;
        if self.cfg.do_layer_norm_before { Ok(x) } else { self.ffn_ln.forward(&x) }
    }

    fn capture(&self, x: &Tensor, _ctx: &LayerContext, hook: Hook) -> Result<()> {
        self.until_fc2(x, &mut Some(hook)).map(|_| ())
    }

    fn next_group_input(&self, gi: usize, x: &Tensor, prev: &Tensor) -> Result<Option<Tensor>> {
        let pre = self.cfg.do_layer_norm_before;
        Ok(match gi {
            2 => {
                let x = (x + self.out.forward(prev)?)?;
                Some(if pre { self.ffn_ln.forward(&x)? } else { self.attn_ln.forward(&x)? })
            }
            3 => Some(self.fc1.forward(prev)?.relu()?),
            _ => None,
        })
    }

    fn linear_names(&self) -> &'static [&'static str] {
        LINEARS
    }

    fn input_groups(&self) -> &'static [&'static [&'static str]] {
        &[&["q_proj", "k_proj", "v_proj"], &["out_proj"], &["fc1"], &["fc2"]]
    }

    fn linear(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q_proj" => &self.q,
            "k_proj" => &self.k,
            "v_proj" => &self.v,
            "out_proj" => &self.out,
            "fc1" => &self.fc1,
            "fc2" => &self.fc2,
            _ => return None,
        })
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "q_proj" => &mut self.q,
            "k_proj" => &mut self.k,
            "v_proj" => &mut self.v,
            "out_proj" => &mut self.out,
            "fc1" => &mut self.fc1,
            "fc2" => &mut self.fc2,
            _ => return None,
        })
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let lp = format!("{}layers.{}", self.prefix, self.idx);
        let affine = self.cfg.layer_norm_elementwise_affine;
        let mut v = Vec::new();
        self.attn_ln.named(&format!("{lp}.self_attn_layer_norm"), affine, &mut v);
        self.ffn_ln.named(&format!("{lp}.final_layer_norm"), affine, &mut v);
        for name in LINEARS {
            let module = if name.starts_with("fc") { String::new() } else { "self_attn.".to_string() };
            let l = self.linear(name).expect("known linear");
            v.push((format!("{lp}.{module}{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                v.push((format!("{lp}.{module}{name}.bias"), b.clone()));
            }
        }
        v
    }
}
