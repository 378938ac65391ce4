//! Time one decoder layer's forward on a calibration-sized batch, by part:
//! `cargo run --release --example profile_layer -- MODEL [BATCH] [SEQLEN]`.
use candle_core::{DType, Device, Tensor};
use fistaprune::model::Checkpoint;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    if std::env::var("TUNE").is_ok() {
        fistaprune::util::tune_allocator();
    }
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("model path");
    let b: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(8);
    let t: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(512);
    let ck = Checkpoint::open(std::path::Path::new(&path))?;
    let model = ck.model()?;
    let layer = model.load_layer(0)?;
    let ctx = model.context(t)?;
    let h = ck.config.flops_per_token(t);
    let x = Tensor::randn(0f32, 1.0, (b, t, 576), &Device::Cpu)?.to_dtype(DType::F32)?;
    for rep in 0..3 {
        let s = Instant::now();
        let _ = layer.forward(&x, &ctx, None)?;
        let f = s.elapsed().as_secs_f64();
        let lin = layer.linear("q_proj").unwrap();
        let s = Instant::now();
        let _ = lin.forward(&x)?;
        let q = s.elapsed().as_secs_f64();
        let per_layer = (h - 2.0 * 49152.0 * 576.0) / ck.config.num_layers() as f64;
        println!(
            "rep {rep}: layer {f:.3}s ({:.1} GFLOP/s), q_proj alone {q:.4}s ({:.1} GFLOP/s)",
            per_layer * (b * t) as f64 / f / 1e9,
            2.0 * (b * t * 576 * 576) as f64 / q / 1e9
        );
    }
    Ok(())
}
