//! A linear operator `y = x Wᵀ + b` with its weight in f32, the unit a pruner works on.

use anyhow::Result;
use candle_core::{D, DType, Tensor};

/// Weight `(out, in)` as Hugging Face stores it, optional bias `(out,)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The type its product multiplies in ([`crate::linalg::matmul_nt_in`]): f32, or bf16/f16 for a pruning
    /// walk's calibration passes under `--matmul-dtype` (the layer's attention products follow the query
    /// projection's). The weight itself stays f32.
    pub matmul: DType,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, matmul: DType::F32 }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Replace the weight (a pruned or resumed one, made on the host), keeping it on the old weight's device.
    pub fn set_weight(&mut self, w: Tensor) -> Result<()> {
        self.weight = w.to_device(self.weight.device())?;
        Ok(())
    }

    /// `x`: `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, x.dim(D::Minus1)?))?;
        let mut y = crate::linalg::matmul_nt_in(&x2, &self.weight, self.matmul)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_features();
        Ok(y.reshape(out)?)
    }
}
