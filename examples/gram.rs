//! The device path's Gram matrix (`stats::Gram` on candle tensors) against the one full product it replaced,
//! on this machine's CPU through candle's operators, which the GPU path runs through cuBLAS:
//! `FISTAPRUNE_GENERIC=1 cargo run --release --example gram [-- ROWSxN ...]`. Prints each one's time and the
//! rate of the flops it does (the full product `2 rows n²`, the blocks `(B + 1) / 2B` of that).
use candle_core::{Device, Tensor};
use fistaprune::prune::stats::Gram;
use std::time::Instant;

fn seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let given: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (r, n) = a.split_once('x').expect("ROWSxN");
            (r.parse().expect("rows"), n.parse().expect("n"))
        })
        .collect();
    let shapes = if given.is_empty() { vec![(2048, 576), (2048, 1536), (2048, 2048), (2048, 5632)] } else { given };
    let x0 = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(fistaprune::device::generic(&x0), "run with FISTAPRUNE_GENERIC=1 (the device path's sum)");
    println!(
        "{:>12} {:>14} {:>14} {:>8} {:>8} {:>10}",
        "rows x n", "full s (GF/s)", "blocks s (GF/s)", "flops", "time", "finish s"
    );
    for (rows, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
        let full_flops = 2.0 * rows as f64 * (n * n) as f64;
        let w = Gram::device_block_width(n);
        let block_flops: f64 = (0..n).step_by(w).map(|j0| 2.0 * rows as f64 * ((n - j0) * w.min(n - j0)) as f64).sum();
        let reps = (2e10 / full_flops).clamp(1.0, 20.0) as usize;
        let full = seconds(reps, || {
            x.t().unwrap().matmul(&x).unwrap();
        });
        let mut g = Gram::new(n);
        let blocks = seconds(reps, || g.add(&x).unwrap());
        let t = Instant::now();
        g.finish().unwrap();
        // Once per operator group, not per batch: placing the blocks, the mirror, the copy to a host matrix.
        let finish = t.elapsed().as_secs_f64();
        println!(
            "{:>12} {:>7.3} ({:>4.0}) {:>7.3} ({:>4.0}) {:>8.3} {:>8.3} {:>10.3}",
            format!("{rows}x{n}"),
            full,
            full_flops / full / 1e9,
            blocks,
            block_flops / blocks / 1e9,
            block_flops / full_flops,
            blocks / full,
            finish
        );
    }
}
