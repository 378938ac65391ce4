//! OPT (Zhang et al. 2022): learned positions with an offset of 2, LayerNorm before (or, for OPT-350M,
//! after) each block, ReLU MLP, biases everywhere, and `project_in`/`project_out` when the embedding width
//! differs from the hidden size. Matches Hugging Face `modeling_opt.py`.
//!
//! Everything about the architecture is here: its `config.json` ([`OptConfig`], as serde reads it), one table
//! of its tensors' names, the model and its decoder layer. OPT has no GGUF form here.

use std::sync::Arc;

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{
    Architecture, CausalLm, Config, DecoderLayer, GroupStep, Hook, LayerContext, Linear, ModelConfig, TensorSpec,
    VocabMatrix, Weights,
};

pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["opt"],
    gguf_architectures: &[],
    from_hf: |j| Ok(Arc::new(OptConfig::deserialize(j)?.checked()?)),
    from_gguf: None,
};

/// A linear operator of the decoder layer: its name, its module under `…layers.{i}.`, and whether it is
/// `(hidden, hidden)` (attention) or part of the MLP.
struct Operator {
    name: &'static str,
    module: &'static str,
    shape: fn(&OptConfig) -> [usize; 2],
}

/// The layer's operators in data-flow order: the one table of their names.
const OPERATORS: [Operator; 6] = [
    Operator { name: "q_proj", module: "self_attn.q_proj", shape: |c| [c.hidden_size, c.hidden_size] },
    Operator { name: "k_proj", module: "self_attn.k_proj", shape: |c| [c.hidden_size, c.hidden_size] },
    Operator { name: "v_proj", module: "self_attn.v_proj", shape: |c| [c.hidden_size, c.hidden_size] },
    Operator { name: "out_proj", module: "self_attn.out_proj", shape: |c| [c.hidden_size, c.hidden_size] },
    Operator { name: "fc1", module: "fc1", shape: |c| [c.ffn_dim, c.hidden_size] },
    Operator { name: "fc2", module: "fc2", shape: |c| [c.hidden_size, c.ffn_dim] },
];

/// [`OPERATORS`]' names, for [`DecoderLayer::linear_names`].
const OPERATOR_NAMES: [&str; 6] = {
    let mut names = [""; 6];
    let mut k = 0;
    while k < names.len() {
        names[k] = OPERATORS[k].name;
        k += 1;
    }
    names
};

/// The operators grouped by the input they share, in data-flow order.
const INPUT_GROUPS: [&[&str]; 4] = [&["q_proj", "k_proj", "v_proj"], &["out_proj"], &["fc1"], &["fc2"]];

/// The layer's two LayerNorms: around attention, around the MLP.
const NORMS: [&str; 2] = ["self_attn_layer_norm", "final_layer_norm"];

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

/// `config.json` of OPT (125M ... 66B), as Hugging Face writes it (the fields read; the rest is ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Pre-LN (true for all sizes but 350M).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// Embedding width; differs from `hidden_size` in OPT-350M, which then has project_in/out.
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(rename = "_remove_final_layer_norm", default)]
    pub remove_final_layer_norm: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub activation_function: Option<String>,
}

fn default_positions() -> usize {
    2048
}

fn yes() -> bool {
    true
}

impl OptConfig {
    fn checked(self) -> Result<Self> {
        if let Some(act) = &self.activation_function {
            ensure!(act == "relu", "activation_function \"{act}\" is not supported for OPT (relu is)");
        }
        ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Ok(self)
    }

    fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    fn projected(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }

    fn final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
}

impl Config for OptConfig {
    fn model_type(&self) -> &str {
        "opt"
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
        let (h, e) = (self.hidden_size, self.embed_dim());
        let linear: usize = OPERATORS.iter().map(|o| (o.shape)(self).iter().product::<usize>()).sum();
        let proj = if self.projected() { 2 * h * e } else { 0 };
        let head = self.vocab_size * e + proj;
        let keys = (seqlen as f64 + 1.0) / 2.0;
        let layers = self.num_hidden_layers as f64;
        2.0 * (layers * linear as f64 + head as f64) + layers * 2.0 * 2.0 * keys * h as f64
    }

    fn tensors(&self, weights: &Weights) -> Vec<TensorSpec> {
        let p = prefix(weights);
        let (h, v, e) = (self.hidden_size, self.vocab_size, self.embed_dim());
        let affine = self.layer_norm_elementwise_affine;
        let final_ln = self.final_layer_norm() && affine;
        let mut out = vec![
            TensorSpec::new(&format!("{p}embed_tokens.weight"), vec![v, e], true),
            TensorSpec::new(
                &format!("{p}embed_positions.weight"),
                vec![self.max_position_embeddings + POS_OFFSET, h],
                true,
            ),
            TensorSpec::new(&format!("{p}project_in.weight"), vec![h, e], self.projected()),
            TensorSpec::new(&format!("{p}project_out.weight"), vec![e, h], self.projected()),
            TensorSpec::new(&format!("{p}final_layer_norm.weight"), vec![h], final_ln),
            TensorSpec::new(&format!("{p}final_layer_norm.bias"), vec![h], final_ln),
        ];
        // A tied head is not stored (transformers re-ties it on load), even where a checkpoint carries one.
        if !self.tie_word_embeddings {
            out.push(TensorSpec::new("lm_head.weight", vec![v, e], true));
        }
        for l in 0..self.num_hidden_layers {
            let lp = format!("{p}layers.{l}");
            for o in &OPERATORS {
                let [rows, cols] = (o.shape)(self);
                out.push(TensorSpec {
                    linear: true,
                    ..TensorSpec::new(&format!("{lp}.{}.weight", o.module), vec![rows, cols], true)
                });
                out.push(TensorSpec::new(&format!("{lp}.{}.bias", o.module), vec![rows], self.enable_bias));
            }
            for n in NORMS {
                out.push(TensorSpec::new(&format!("{lp}.{n}.weight"), vec![h], affine));
                out.push(TensorSpec::new(&format!("{lp}.{n}.bias"), vec![h], affine));
            }
        }
        out
    }

    fn hf_name_of_gguf(&self, _name: &str) -> Option<(String, super::FromGguf)> {
        None
    }

    fn to_hf_json(&self) -> Json {
        json!({
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "ffn_dim": self.ffn_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "do_layer_norm_before": self.do_layer_norm_before,
            "word_embed_proj_dim": self.embed_dim(),
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "activation_function": "relu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "dtype": "float32",
        })
    }

    fn build(&self, weights: Arc<Weights>) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Opt::new(self.clone(), weights)?))
    }
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
                weight: Tensor::ones(h, DType::F32, crate::device::current())?,
                bias: Tensor::zeros(h, DType::F32, crate::device::current())?,
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
    embed: VocabMatrix,
    positions: Tensor,
    project_in: Option<Tensor>,
    project_out: Option<Tensor>,
    final_ln: Option<LayerNorm>,
    lm_head: Option<VocabMatrix>,
}

pub struct OptLayer {
    idx: usize,
    prefix: &'static str,
    cfg: OptConfig,
    /// As [`NORMS`].
    norms: [LayerNorm; 2],
    /// As [`OPERATORS`].
    ops: [Linear; 6],
}

impl Opt {
    pub fn new(cfg: OptConfig, weights: Arc<Weights>) -> Result<Self> {
        let p = prefix(&weights);
        let (h, v, e) = (cfg.hidden_size, cfg.vocab_size, cfg.embed_dim());
        let embed = VocabMatrix::new(&weights, &format!("{p}embed_tokens.weight"), [v, e])?;
        let positions = weights
            .load_shaped(&format!("{p}embed_positions.weight"), &[cfg.max_position_embeddings + POS_OFFSET, h])?;
        let (project_in, project_out) = if cfg.projected() {
            (
                Some(weights.load_shaped(&format!("{p}project_in.weight"), &[h, e])?),
                Some(weights.load_shaped(&format!("{p}project_out.weight"), &[e, h])?),
            )
        } else {
            (None, None)
        };
        let final_ln = if cfg.final_layer_norm() {
            Some(LayerNorm::load(&weights, &format!("{p}final_layer_norm"), h, cfg.layer_norm_elementwise_affine)?)
        } else {
            None
        };
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(VocabMatrix::new(&weights, "lm_head.weight", [v, e])?) };
        Ok(Self {
            model_cfg: Arc::new(cfg.clone()),
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
        ensure!(
            t <= self.cfg.max_position_embeddings,
            "sequence length {t} exceeds OPT's {} positions",
            self.cfg.max_position_embeddings
        );
        let mut x = self.embed.rows(&ids.flatten_all()?)?.reshape((b, t, self.cfg.embed_dim()))?;
        if let Some(p) = &self.project_in {
            x = Linear::new(p.clone(), None).forward(&x)?;
        }
        let pos = self.positions.narrow(0, POS_OFFSET, t)?;
        Ok(x.broadcast_add(&pos)?)
    }

    fn context(&self, seqlen: usize) -> Result<LayerContext> {
        Ok(LayerContext { seqlen, rope: Vec::new() })
    }

    fn load_layer(&self, i: usize) -> Result<Box<dyn DecoderLayer>> {
        let (c, w) = (&self.cfg, &self.weights);
        let lp = format!("{}layers.{i}", self.prefix);
        let op = |o: &Operator| -> Result<Linear> {
            let [rows, cols] = (o.shape)(c);
            let weight = w.load_shaped(&format!("{lp}.{}.weight", o.module), &[rows, cols])?;
            let bias =
                if c.enable_bias { Some(w.load_shaped(&format!("{lp}.{}.bias", o.module), &[rows])?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let norm = |n: &str| LayerNorm::load(w, &format!("{lp}.{n}"), c.hidden_size, c.layer_norm_elementwise_affine);
        Ok(Box::new(OptLayer {
            idx: i,
            prefix: self.prefix,
            cfg: c.clone(),
            norms: [norm(NORMS[0])?, norm(NORMS[1])?],
            ops: [
                op(&OPERATORS[0])?,
                op(&OPERATORS[1])?,
                op(&OPERATORS[2])?,
                op(&OPERATORS[3])?,
                op(&OPERATORS[4])?,
                op(&OPERATORS[5])?,
            ],
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

    fn lm_head(&self) -> Result<&Tensor> {
        // A model asked for its head is being run token by token: keep the embeddings too.
        self.embed.whole()?;
        self.lm_head.as_ref().unwrap_or(&self.embed).whole()
    }
}

impl OptLayer {
    fn attention(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, h) = x.dims3()?;
        let nh = c.num_attention_heads;
        let hd = h / nh;
        if let Some(f) = hook.as_mut() {
            for n in INPUT_GROUPS[0] {
                f(n, x)?;
            }
        }
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(self.op("q_proj").forward(x)?)?;
        let k = heads(self.op("k_proj").forward(x)?)?;
        let v = heads(self.op("v_proj").forward(x)?)?;
        let attn =
            crate::linalg::causal_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt(), None, self.op("q_proj").matmul)?;
        if let Some(f) = hook.as_mut() {
            f("out_proj", &attn)?;
        }
        self.op("out_proj").forward(&attn)
    }

    /// The layer up to its last projection: (residual stream after attention, input of fc2).
    /// The layer's output from the residual stream after attention and the input of fc2.
    fn finish(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let x = (x + self.op("fc2").forward(a)?)?;
        if self.cfg.do_layer_norm_before { Ok(x) } else { self.norms[1].forward(&x) }
    }

    fn until_fc2(&self, x: &Tensor, hook: &mut Option<Hook>) -> Result<(Tensor, Tensor)> {
        let pre = self.cfg.do_layer_norm_before;
        let [attn_ln, ffn_ln] = &self.norms;
        let h = if pre { attn_ln.forward(x)? } else { x.clone() };
        let mut x = (x + self.attention(&h, hook)?)?;
        if !pre {
            x = attn_ln.forward(&x)?;
        }
        let h = if pre { ffn_ln.forward(&x)? } else { x.clone() };
        if let Some(f) = hook.as_mut() {
            f("fc1", &h)?;
        }
        let a = self.op("fc1").forward(&h)?.relu()?;
        if let Some(f) = hook.as_mut() {
            f("fc2", &a)?;
        }
        Ok((x, a))
    }
}

impl DecoderLayer for OptLayer {
    fn forward(&self, x: &Tensor, _ctx: &LayerContext, mut hook: Option<Hook>) -> Result<Tensor> {
        let (x, a) = self.until_fc2(x, &mut hook)?;
        self.finish(&x, &a)
    }

    fn capture(&self, x: &Tensor, _ctx: &LayerContext, hook: Hook) -> Result<()> {
        self.until_fc2(x, &mut Some(hook)).map(|_| ())
    }

    fn steps_to(&self, gi: usize) -> bool {
        matches!(gi, 2 | 3)
    }

    fn next_group_input(&self, gi: usize, x: &Tensor, prev: &Tensor) -> Result<Option<GroupStep>> {
        let pre = self.cfg.do_layer_norm_before;
        Ok(match gi {
            2 => {
                let x = (x + self.op("out_proj").forward(prev)?)?;
                // Post-LN: the residual stream is itself normalised, and fc1 reads it as it is.
                let x = if pre { x } else { self.norms[0].forward(&x)? };
                let input = if pre { self.norms[1].forward(&x)? } else { x.clone() };
                Some(GroupStep { input, residual: Some(x) })
            }
            3 => Some(GroupStep { input: self.op("fc1").forward(prev)?.relu()?, residual: None }),
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
        let lp = format!("{}layers.{}", self.prefix, self.idx);
        let affine = self.cfg.layer_norm_elementwise_affine;
        let mut v = Vec::new();
        for (n, ln) in NORMS.iter().zip(&self.norms) {
            ln.named(&format!("{lp}.{n}"), affine, &mut v);
        }
        for (o, l) in OPERATORS.iter().zip(&self.ops) {
            v.push((format!("{lp}.{}.weight", o.module), l.weight.clone()));
            if let Some(b) = &l.bias {
                v.push((format!("{lp}.{}.bias", o.module), b.clone()));
            }
        }
        v
    }
}
