//! Where the time of one forward window goes: `cargo run --release --example profile_forward -- MODEL`.
use candle_core::{Device, Tensor};
use fistaprune::model::Checkpoint;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).expect("model path");
    let t = 512;
    let ck = Checkpoint::open(std::path::Path::new(&path))?;
    let model = ck.model()?;
    let s = Instant::now();
    let layers: Vec<_> = (0..model.num_layers()).map(|i| model.load_layer(i)).collect::<anyhow::Result<_>>()?;
    println!("materialising {} layers: {:.3}s", layers.len(), s.elapsed().as_secs_f64());
    let ctx = model.context(t)?;
    let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % 49152).collect();
    let ids = Tensor::from_vec(ids, (1, t), &Device::Cpu)?;
    for rep in 0..3 {
        let s = Instant::now();
        let mut h = model.embed(&ids)?;
        let e = s.elapsed().as_secs_f64();
        let s = Instant::now();
        for l in &layers {
            h = l.forward(&h, &ctx, None)?;
        }
        let ls = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let fin = model.final_hidden(&h)?.squeeze(0)?;
        let hs = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let tg: Vec<u32> = (0..t as u32).collect();
        let n = fistaprune::eval::perplexity::head_nll_sum(&fin, model.lm_head()?, &tg)?;
        let ns = s.elapsed().as_secs_f64();
        println!(
            "rep {rep}: embed {e:.3}s layers {ls:.3}s final norm {hs:.3}s head+nll {ns:.3}s ({n:.1}) total {:.3}s",
            e + ls + hs + ns
        );
    }
    Ok(())
}
