//! Benchmark: the rate of FISTAPruner's iterations against the machine's GEMM rate, on the operator shapes of
//! SmolLM2-135M (`cargo run --release --example bench_fista`).
//!
//! Each FISTA iteration is one `m × n × n` GEMM (`Y G*`, 2 m n² FLOPs) plus element-wise work (gradient step,
//! soft threshold, momentum) of O(m n). The table gives, per shape: the plain GEMM rate of the same product
//! (faer, all threads), the rate of `fista` counting only its GEMM FLOPs (K = 20 iterations, no early stop),
//! their ratio, and the same for a whole `solve` (3 λ rounds, thresholds, error evaluations, CG re-fit)
//! counting every GEMM it runs.
use std::time::Instant;

use faer::{Accum, Mat};
use fistaprune::linalg::par;
use fistaprune::prune::Pattern;
use fistaprune::prune::fista::{Options as FistaOptions, Problem, Steps, fista_host, lambda_max, solve};

fn rand_mat(m: usize, n: usize, seed: u64) -> Mat<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Mat::from_fn(m, n, |_, _| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    })
}

fn matmul(a: &Mat<f32>, b: &Mat<f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0f32, par());
    out
}

/// Best of `reps` timings of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // (name, out m, in n) of SmolLM2-135M's operators.
    let shapes = [
        ("q_proj/o_proj", 576, 576),
        ("k_proj/v_proj", 192, 576),
        ("gate/up_proj", 1536, 576),
        ("down_proj", 576, 1536),
    ];
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:>14} {:>11} {:>12} {:>12} {:>7} {:>12} {:>7}",
        "operator", "m x n x n", "GEMM GF/s", "FISTA GF/s", "ratio", "solve GF/s", "ratio"
    );
    let (mut gemm_t, mut fista_t, mut flops_all) = (0.0, 0.0, 0.0);
    for &(name, m, n) in &shapes {
        let x = rand_mat(2048, n, n as u64);
        let g = matmul(&x.transpose().to_owned(), &x);
        let w = rand_mat(m, n, m as u64 + 7);
        let c = matmul(&w, &g);
        let p = Problem { w: &w, g: &g, c: &c, k: 1.0 };
        let gemm_flops = 2.0 * (m * n * n) as f64;
        let t_gemm = best(5, || {
            std::hint::black_box(matmul(&w, &g));
        });
        let l = lambda_max(&g, 30).unwrap();
        let iters = 20;
        let t_fista = best(3, || {
            std::hint::black_box(fista_host(&p, &w, Steps { lambda: 1e-3 * l, l, iters, tol: 0.0, project: None }));
        });
        let o = FistaOptions { tol: 0.0, refit_iters: 20, ..Default::default() };
        let pattern: Pattern = "2:4".parse().unwrap();
        // Every GEMM of `solve`: per round K iterations + 2 error evaluations; warm-start error; re-fit CG
        // (one per step, plus the residual and the error); power iteration (n² per step).
        let solve_gemms = (o.rounds * (o.iters + 2) + 1 + o.refit_iters + 2) as f64;
        let solve_flops = solve_gemms * gemm_flops + o.power_iters as f64 * 2.0 * (n * n) as f64;
        let t_solve = best(1, || {
            std::hint::black_box(solve(&p, &w, pattern, &o).unwrap());
        });
        let (rg, rf, rs) =
            (gemm_flops / t_gemm / 1e9, iters as f64 * gemm_flops / t_fista / 1e9, solve_flops / t_solve / 1e9);
        println!(
            "{name:>14} {:>11} {rg:>12.1} {rf:>12.1} {:>6.0}% {rs:>12.1} {:>6.0}%",
            format!("{m}x{n}x{n}"),
            100.0 * rf / rg,
            100.0 * rs / rg
        );
        // Weighted by one layer of SmolLM2 (q, k, v, o, gate, up, down).
        let count = match name {
            "q_proj/o_proj" | "k_proj/v_proj" | "gate/up_proj" => 2.0,
            _ => 1.0,
        };
        gemm_t += count * t_gemm * iters as f64;
        fista_t += count * t_fista;
        flops_all += count * iters as f64 * gemm_flops;
    }
    println!(
        "one decoder layer, K = 20: GEMM {:.1} GF/s, FISTA {:.1} GF/s: {:.0}% of the GEMM rate",
        flops_all / gemm_t / 1e9,
        flops_all / fista_t / 1e9,
        100.0 * gemm_t / fista_t
    );
}
