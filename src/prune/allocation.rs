//! Non-uniform sparsity across decoder layers (METHOD.md §5): OWL's outlier-weighted allocation (Yin et al.
//! 2023, "Outlier Weighed Layerwise Sparsity"), on top of any method, for unstructured targets.
//!
//! Each layer's outlier ratio `D_l` is the share of its Wanda scores `|W_ij| · ‖X_j‖` (over all its operators,
//! on the dense model's calibration activations) above `m` times their mean. Layers with more outliers keep
//! more weights: the densities `1 − s_l` are the ratios mapped linearly onto `[0, 2λ]`, then shifted so that
//! their mean is `1 − s`. Every layer has the same parameter count in the architectures here, so the model's
//! sparsity stays `s`.

use anyhow::Result;
use candle_core::{D, DType, Tensor};

use super::pipeline::{WalkOptions, for_each_dense_layer};
use super::stats::{OpStats, SquareSums};
use crate::linalg::tensor_to_mat;
use crate::model::CausalLm;
use crate::util::{Progress, progress_bar};

/// OWL's knobs; the authors' defaults are λ = 0.08 and m = 5.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct OwlOptions {
    /// Unstructured only: spread the sparsity over the layers by their outlier ratios (OWL), mean unchanged.
    #[cfg_attr(feature = "cli", arg(long))]
    pub owl: bool,
    /// OWL: half the spread of the per-layer sparsities (λ).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = OwlOptions::default().owl_lambda))]
    pub owl_lambda: f64,
    /// OWL: a score is an outlier above this many times its layer's mean score (M).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = OwlOptions::default().owl_m))]
    pub owl_m: f64,
}

impl Default for OwlOptions {
    fn default() -> Self {
        Self { owl: false, owl_lambda: 0.08, owl_m: 5.0 }
    }
}

/// Per-layer sparsities from outlier ratios: mean `s`, spread `2λ` (uniform when all ratios are equal).
pub fn owl_sparsities(ratios: &[f64], s: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &r| (a.min(r), b.max(r)));
    if ratios.is_empty() || hi - lo <= 0.0 {
        return vec![s; ratios.len()];
    }
    let dens: Vec<f64> = ratios.iter().map(|r| (r - lo) / (hi - lo) * 2.0 * lambda).collect();
    let mean = dens.iter().sum::<f64>() / dens.len() as f64;
    dens.iter().map(|d| 1.0 - (d - mean + 1.0 - s)).collect()
}

/// Share of `scores` above `m` times their mean.
pub fn outlier_ratio(scores: &[f32], m: f64) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let mean = scores.iter().map(|&x| x as f64).sum::<f64>() / scores.len() as f64;
    scores.iter().filter(|&&x| x as f64 > m * mean).count() as f64 / scores.len() as f64
}

/// Every layer's outlier ratio, on the dense model's activations of the calibration samples.
pub fn layer_outlier_ratios(
    model: &dyn CausalLm,
    calib: &[Vec<u32>],
    walk: &WalkOptions,
    m: f64,
    progress: Progress,
) -> Result<Vec<f64>> {
    let pb = progress_bar(model.num_layers() as u64, "outliers", progress);
    let mut ratios = Vec::with_capacity(model.num_layers());
    for_each_dense_layer(model, calib, walk, &mut |i, layer, inputs| {
        let groups = layer.input_groups();
        // Σ x_j² per input column of each group.
        let mut sq: Vec<Option<SquareSums>> = (0..groups.len()).map(|_| None).collect();
        for x in inputs.acts {
            let x = crate::device::fetch(x)?.to_dtype(DType::F32)?;
            let mut hook = |name: &str, inp: &Tensor| -> Result<()> {
                if let Some(g) = groups.iter().position(|g| g[0] == name) {
                    let n = inp.dim(D::Minus1)?;
                    sq[g].get_or_insert_with(|| SquareSums::new(n)).add(inp)?;
                }
                Ok(())
            };
            layer.capture(&x, inputs.ctx, &mut hook)?;
        }
        let mut scores = Vec::new();
        for (g, names) in groups.iter().enumerate() {
            let Some(s) = sq[g].take() else { anyhow::bail!("decoder layer {i}: no input reached {}", names[0]) };
            let st = OpStats::of_square_sums(s.finish()?);
            st.check_finite(&format!("decoder layer {i}: input of {}", names.join(", ")))?;
            let norms = st.norms()?;
            for name in names.iter() {
                let w = tensor_to_mat(&layer.linear(name).expect("grouped operators exist").weight)?;
                for j in 0..w.ncols() {
                    scores.extend((0..w.nrows()).map(|r| w[(r, j)].abs() * norms[j]));
                }
            }
        }
        ratios.push(outlier_ratio(&scores, m));
        pb.inc(1);
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_matches_a_hand_computation() {
        // Ratios [0.01, 0.03, 0.02], λ = 0.1: normalised [0, 1, 0.5] · 0.2 = [0, 0.2, 0.1], mean 0.1;
        // densities [0.2, 0.4, 0.3] around 1 − 0.7 = 0.3 → sparsities [0.8, 0.6, 0.7].
        let s = owl_sparsities(&[0.01, 0.03, 0.02], 0.7, 0.1);
        for (a, b) in s.iter().zip([0.8, 0.6, 0.7]) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        assert!((s.iter().sum::<f64>() / 3.0 - 0.7).abs() < 1e-12);
        assert_eq!(owl_sparsities(&[0.2, 0.2], 0.5, 0.08), vec![0.5, 0.5]);
    }

    #[test]
    fn outlier_ratio_counts_scores_above_m_means() {
        // mean 1.45; 5 × mean = 7.25: only 10 is above.
        assert_eq!(outlier_ratio(&[0.5, 0.5, 0.5, 10.0, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0], 5.0), 0.1);
    }
}
