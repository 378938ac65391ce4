//! `prune --resume`: a pruned output is assembled aside (`.OUT.partial`, [`AtomicDir`]), each finished layer
//! landing in `layers/` with its report as it is done, beside `run.json`, the run's [`Fingerprint`]. A run
//! killed at any point leaves that folder; the same command with `--resume` reloads its finished layers and
//! ends with the same bytes as an uninterrupted run. A run whose fingerprint differs is refused, naming the
//! first difference, without touching the interrupted one's work.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::export::{OutDType, write_safetensors};
use crate::model::safetensors::SafetensorsStore;
use crate::model::{CausalLm, DecoderLayer, TensorSpec};
use crate::output::{AtomicDir, Claim, write_atomic};
use crate::prune::PruneOptions;
use crate::prune::layer::LayerReport;
use crate::prune::pipeline::FinishedLayer;

/// What decides the pruned layers' bytes: a resumed run must match the interrupted one on all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The model, resolved to an absolute path.
    pub model: String,
    pub method: String,
    pub options: PruneOptions,
    pub calibration_sha256: Option<String>,
}

/// The folder a prune is assembled in, with the layers it has finished.
pub struct Aside {
    pub dir: AtomicDir,
    /// How many of the run's layers an interrupted run had finished.
    pub resumed: usize,
}

impl Aside {
    /// Open the folder aside for `claim`: with `resume`, what an interrupted run with the same fingerprint
    /// left there is kept; anything else starts clean.
    pub fn open(claim: Claim, resume: bool, run: &Fingerprint, range: (usize, usize)) -> Result<Self> {
        let (dir, resumed) = AtomicDir::resumable(claim, resume)?;
        let aside = Self { dir, resumed: 0 };
        let run_file = aside.run_file();
        if resumed && run_file.exists() {
            let text =
                std::fs::read_to_string(&run_file).with_context(|| format!("{}: cannot read", run_file.display()))?;
            let old: Fingerprint = serde_json::from_str(&text).with_context(|| {
                format!("{}: written by another version of fistaprune; --force starts over", run_file.display())
            })?;
            if old != *run {
                let d = first_difference("", &serde_json::to_value(&old)?, &serde_json::to_value(run)?)
                    .unwrap_or_else(|| "?".into());
                bail!(
                    "--resume: the interrupted run in {} differs ({d}); rerun it with its flags, or --force to start over",
                    aside.dir.tmp.display()
                );
            }
        } else {
            // Nothing to continue from without the fingerprint: start clean.
            std::fs::remove_dir_all(aside.layers()).ok();
            write_atomic(&run_file, serde_json::to_string_pretty(run)?.as_bytes())?;
        }
        std::fs::create_dir_all(aside.layers())?;
        let done = aside.done(range);
        Ok(Self { resumed: done, ..aside })
    }

    /// How many of the layers in `range` are finished here.
    fn done(&self, range: (usize, usize)) -> usize {
        let l = self.layers();
        (range.0..=range.1).filter(|&i| layer_file(&l, i).exists() && layer_report_file(&l, i).exists()).count()
    }

    /// The walk failed with `e`. Where the GPU ran out of memory ([`crate::device::hint`]) the finished layers
    /// stay aside, and the error says so: the same command with `--resume` and an option that saves memory
    /// (`--offload-activations` changes no pruned byte) continues after them. Any other failure removes them,
    /// as a failed run leaves nothing.
    pub fn fail(&mut self, e: anyhow::Error, range: (usize, usize)) -> anyhow::Error {
        if crate::device::hint(&e).is_none() {
            return e;
        }
        let done = self.done(range);
        self.dir.keep();
        let (tmp, s) = (self.dir.tmp.display(), if done == 1 { "" } else { "s" });
        e.context(format!(
            "{done} finished layer{s} kept in {tmp}: the same command with --resume continues after them"
        ))
    }

    /// Where the finished layers land.
    pub fn layers(&self) -> PathBuf {
        self.dir.tmp.join("layers")
    }

    fn run_file(&self) -> PathBuf {
        self.dir.tmp.join("run.json")
    }

    /// Save a finished layer (f32) and its report; the weights land last, so that a layer whose weights are
    /// there is complete.
    pub fn save(&self, i: usize, layer: &dyn DecoderLayer, report: &LayerReport) -> Result<()> {
        let dir = self.layers();
        write_atomic(&layer_report_file(&dir, i), serde_json::to_string(report)?.as_bytes())?;
        let tensors = layer.named_tensors();
        let specs: Vec<TensorSpec> = tensors.iter().map(|(n, t)| TensorSpec::new(n, t.dims().to_vec(), true)).collect();
        let mut load = |name: &str| -> Result<Tensor> {
            Ok(tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).expect("named"))
        };
        let tmp = dir.join(format!(".layer-{i:05}.tmp"));
        write_safetensors(&tmp, &specs, OutDType::F32, &mut load)?;
        std::fs::rename(&tmp, layer_file(&dir, i))?;
        Ok(())
    }

    /// Layer `i` as an interrupted run left it (its weights on top of the model's layer), if it finished.
    pub fn finished(&self, model: &dyn CausalLm, i: usize) -> Result<Option<FinishedLayer>> {
        let dir = self.layers();
        let (file, rep) = (layer_file(&dir, i), layer_report_file(&dir, i));
        if !file.exists() || !rep.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&rep).with_context(|| format!("{}: cannot read", rep.display()))?;
        let report: LayerReport =
            serde_json::from_str(&text).with_context(|| format!("{}: not a layer report", rep.display()))?;
        ensure!(report.layer == i, "{}: the report of layer {}, not {i}", rep.display(), report.layer);
        let store = SafetensorsStore::open_files(std::slice::from_ref(&file))?;
        let mut layer = model.load_layer(i)?;
        let names: Vec<String> = layer.named_tensors().into_iter().map(|(n, _)| n).collect();
        for op in layer.linear_names() {
            let suffix = format!(".{op}.weight");
            let full = names
                .iter()
                .find(|n| n.ends_with(&suffix))
                .ok_or_else(|| anyhow!("decoder layer {i}: no tensor for {op}"))?;
            let w = store.load_f32(full).with_context(|| format!("{}: {full}", file.display()))?;
            let lin = layer.linear_mut(op).expect("listed");
            ensure!(
                w.dims() == lin.weight.dims(),
                "{}: {full} has shape {:?}, the model {:?}",
                file.display(),
                w.dims(),
                lin.weight.dims()
            );
            lin.set_weight(w)?;
        }
        Ok(Some((layer, report)))
    }

    /// The run is over: drop the fingerprint (and, unless `keep_layers`, the finished layers, kept until now
    /// so that a run killed while assembling or evaluating resumes without pruning again), and move the
    /// folder into place.
    pub fn commit(self, keep_layers: bool) -> Result<()> {
        if !keep_layers {
            std::fs::remove_dir_all(self.layers())?;
        }
        std::fs::remove_file(self.run_file())?;
        self.dir.commit()
    }
}

/// `layer-00012.safetensors` in `dir`.
pub fn layer_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("layer-{i:05}.safetensors"))
}

fn layer_report_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("layer-{i:05}.json"))
}

/// The first place where two run descriptions differ, as `key: old → new`.
fn first_difference(path: &str, old: &serde_json::Value, new: &serde_json::Value) -> Option<String> {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let null = serde_json::Value::Null;
                first_difference(&p, a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null))
            })
        }
        _ => (old != new).then(|| format!("{path}: {old} → {new}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{Kind, RunPaths};
    use crate::prune::mask::Target;

    /// Out of GPU memory, the finished layers stay aside for `--resume` and the error says where; any other
    /// failure removes them.
    #[test]
    fn out_of_gpu_memory_keeps_the_finished_layers_and_other_failures_do_not() {
        let d = std::env::temp_dir().join(format!("fistaprune-aside-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let run = Fingerprint {
            model: "m".into(),
            method: "magnitude".into(),
            options: PruneOptions::new(Target { sparsity: Some(0.5), pattern: None }),
            calibration_sha256: None,
        };
        let oom = || anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("decoder layer 2");
        for (e, kept) in [(oom(), true), (anyhow!("decoder layer 2: NaN or Inf in the calibration activations"), false)]
        {
            let claim = RunPaths::new().claim("--out", &d.join("out"), Kind::Folder, false).unwrap();
            let mut aside = Aside::open(claim, false, &run, (0, 3)).unwrap();
            for i in 0..2 {
                std::fs::write(layer_file(&aside.layers(), i), b"w").unwrap();
                std::fs::write(layer_report_file(&aside.layers(), i), b"{}").unwrap();
            }
            let tmp = aside.dir.tmp.clone();
            let msg = format!("{:#}", aside.fail(e, (0, 3)));
            drop(aside);
            assert_eq!(tmp.exists(), kept, "{msg}");
            assert_eq!(msg.contains("2 finished layers kept in") && msg.contains("--resume"), kept, "{msg}");
            std::fs::remove_dir_all(&tmp).ok();
        }
        std::fs::remove_dir_all(&d).ok();
    }
}
