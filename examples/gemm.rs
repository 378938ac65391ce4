//! GEMM rate of faer and of candle on this machine, for the shapes of a SmolLM2 forward pass:
//! `cargo run --release --example gemm`, or for the shapes given: `... --example gemm -- 512x640x2048 ...`.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn rate(flops: f64, mut f: impl FnMut()) -> f64 {
    f();
    let reps = (3e10 / flops).max(3.0) as usize;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let given: Vec<(usize, usize, usize)> = std::env::args().skip(1).map(|a| parse_shape(&a)).collect();
    let smollm2 = [
        (2048usize, 2048usize, 2048usize),
        (512, 576, 576),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
        (2048, 576, 1536),
        (128, 576, 49152),
        (64, 576, 49152),
    ];
    let shapes = if given.is_empty() { smollm2.to_vec() } else { given };
    println!("{:>18} {:>10} {:>10} {:>10} {:>10}", "r x k x n", "candle", "faer x.wT", "faer colmj", "faer x.B");
    for &(r, k, n) in &shapes {
        let flops = 2.0 * (r * k * n) as f64;
        let x = Tensor::randn(0f32, 1.0, (r, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let c = rate(flops, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let f = rate(flops, || {
            fistaprune::linalg::matmul_nt(&x, &w).unwrap();
        });
        let a = faer::Mat::<f32>::from_fn(r, k, |i, j| (i + j) as f32);
        let b = faer::Mat::<f32>::from_fn(k, n, |i, j| (i * j) as f32);
        let mut out = faer::Mat::<f32>::zeros(r, n);
        let g = rate(flops, || {
            faer::linalg::matmul::matmul(
                out.as_mut(),
                faer::Accum::Replace,
                a.as_ref(),
                b.as_ref(),
                1.0,
                fistaprune::linalg::par(),
            );
        });
        // x · B with B = Wᵀ stored (k, n) row-major
        let bt = w.t().unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut o2 = vec![0f32; r * n];
        let h = rate(flops, || {
            let a = faer::MatRef::from_row_major_slice(&xs, r, k);
            let b = faer::MatRef::from_row_major_slice(&bt, k, n);
            let c = faer::MatMut::from_row_major_slice_mut(&mut o2, r, n);
            faer::linalg::matmul::matmul(c, faer::Accum::Replace, a, b, 1.0, fistaprune::linalg::par());
        });
        println!("{:>18} {c:>10.1} {f:>10.1} {g:>10.1} {h:>10.1}", format!("{r}x{k}x{n}"));
    }
}

fn parse_shape(s: &str) -> (usize, usize, usize) {
    let d: Vec<usize> = s.split('x').map(|v| v.parse().expect("a shape is RxKxN, e.g. 512x640x2048")).collect();
    assert_eq!(d.len(), 3, "a shape is RxKxN, e.g. 512x640x2048");
    (d[0], d[1], d[2])
}
