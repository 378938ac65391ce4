//! Calibration samples: `nsamples` windows of `seqlen` token ids, drawn with a seeded RNG.
//!
//! - **documents** (the peers' C4 recipe, SparseGPT / Wanda `get_c4`): draw random documents until one
//!   tokenizes to more than `seqlen` tokens, then take a random window of it; repeat `nsamples` times.
//! - **stream**: the documents tokenized in file order and joined with the EOS token (one string for
//!   WikiText, PTB or plain text, as the peers' WikiText recipe), random windows of the stream.
//! - **auto** (default): documents when at least `nsamples` documents are longer than `seqlen`, else stream.
//!   Only a few of the 1,000 documents of the C4 sample exceed 2,048 tokens: at that length auto streams.
//!
//! The RNG is ChaCha8 seeded with `--seed`; a sample set can be saved and reloaded, so that two runs (or a
//! Python reference) share exactly the same token ids.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dataset::{self, TextFormat};
use super::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CalibMode {
    Auto,
    Documents,
    Stream,
}

/// A calibration set: its token ids and where they came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// Marks a saved calibration file (format version).
    pub fistaprune_calibration: u32,
    #[serde(flatten)]
    pub info: CalibrationInfo,
    pub ids: Vec<Vec<u32>>,
}

/// Where a calibration set came from, without its ids (what reports carry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    pub source: String,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// The mode used (documents or stream).
    pub mode: CalibMode,
    /// Documents in the source, and how many are longer than `seqlen` tokens.
    pub documents: usize,
    pub long_documents: usize,
    /// sha256 of the ids as little-endian u32, sample after sample.
    pub sha256: String,
}

/// The peers' calibration: 128 samples of 2,048 tokens.
pub const DEFAULT_NSAMPLES: usize = 128;
pub const DEFAULT_SEQLEN: usize = 2048;

/// Where the calibration samples come from and how they are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CalibOptions {
    /// Calibration text (C4 .jsonl/.json.gz, WikiText, any text, .parquet), a file saved with --save-calib, or a
    /// name the peers use (c4, wikitext2, ptb: their train split, through the Hugging Face cache).
    #[cfg_attr(feature = "cli", arg(long))]
    pub calib: Option<PathBuf>,
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub calib_format: Option<TextFormat>,
    /// documents: random long document, random window (the peers' C4 recipe); stream: documents joined
    /// with EOS, random windows; auto: documents when enough are long enough.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "auto"))]
    pub calib_mode: CalibMode,
    /// Calibration samples [default: 128, or the count a saved --calib file holds].
    #[cfg_attr(feature = "cli", arg(long))]
    pub nsamples: Option<usize>,
    /// Tokens per calibration sample [default: 2048, or the length a saved --calib file holds].
    #[cfg_attr(feature = "cli", arg(long))]
    pub seqlen: Option<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
}

impl Default for CalibOptions {
    fn default() -> Self {
        Self { calib: None, calib_format: None, calib_mode: CalibMode::Auto, nsamples: None, seqlen: None, seed: 0 }
    }
}

/// sha256 of the ids as little-endian u32.
pub fn fingerprint(ids: &[Vec<u32>]) -> String {
    let mut h = Sha256::new();
    for s in ids {
        for &t in s {
            h.update(t.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Calibration {
    /// Draw a calibration set, or load a saved one when `--calib` is a saved calibration file (its sample
    /// count and length must then agree with `spec` where it sets them).
    pub fn build(tok: &Tokenizer, spec: &CalibOptions) -> Result<Self> {
        let source = spec.calib.as_deref().ok_or_else(|| anyhow!("--calib is required"))?;
        if let Some(saved) = Self::try_load(source)? {
            ensure!(
                spec.nsamples.is_none_or(|n| n == saved.info.nsamples)
                    && spec.seqlen.is_none_or(|n| n == saved.info.seqlen),
                "{}: holds {} x {} samples, but --nsamples {} --seqlen {} were asked",
                source.display(),
                saved.info.nsamples,
                saved.info.seqlen,
                spec.nsamples.unwrap_or(saved.info.nsamples),
                spec.seqlen.unwrap_or(saved.info.seqlen)
            );
            return Ok(saved);
        }
        let (nsamples, seqlen) = (spec.nsamples.unwrap_or(DEFAULT_NSAMPLES), spec.seqlen.unwrap_or(DEFAULT_SEQLEN));
        ensure!(nsamples > 0, "--nsamples must be at least 1");
        ensure!(seqlen >= 2, "--seqlen must be at least 2");
        let text = dataset::Source::locate(source, spec.calib_format, dataset::Role::Calibration)?;
        let docs = text.documents()?;
        ensure!(!docs.is_empty(), "{}: no documents", text.path.display());
        // Each document as the peers tokenize it (with the tokenizer's own BOS, if any).
        let toks: Vec<Vec<u32>> = docs.par_iter().map(|d| tok.encode(d, true)).collect::<Result<_>>()?;
        let long = toks.iter().filter(|t| t.len() > seqlen).count();
        let mode = match spec.calib_mode {
            CalibMode::Auto if long >= nsamples && docs.len() > 1 => CalibMode::Documents,
            CalibMode::Auto => CalibMode::Stream,
            m => m,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut ids = Vec::with_capacity(nsamples);
        match mode {
            CalibMode::Documents => {
                ensure!(
                    long > 0,
                    "{}: no document is longer than --seqlen {} tokens (use --calib-mode stream)",
                    source.display(),
                    seqlen
                );
                for _ in 0..nsamples {
                    let doc = loop {
                        let d = &toks[rng.random_range(0..toks.len())];
                        if d.len() > seqlen {
                            break d;
                        }
                    };
                    // As `random.randint(0, len - seqlen - 1)`: both ends included.
                    let start = rng.random_range(0..doc.len() - seqlen);
                    ids.push(doc[start..start + seqlen].to_vec());
                }
            }
            _ => {
                let eos = tok.eos_id;
                let mut stream = Vec::new();
                for (i, t) in toks.iter().enumerate() {
                    if i > 0 {
                        stream.extend(eos);
                    }
                    stream.extend_from_slice(t);
                }
                if stream.len() <= seqlen {
                    bail!(
                        "{}: {} tokens in all, not enough for one calibration window of {}",
                        source.display(),
                        stream.len(),
                        seqlen
                    );
                }
                for _ in 0..nsamples {
                    let start = rng.random_range(0..stream.len() - seqlen);
                    ids.push(stream[start..start + seqlen].to_vec());
                }
            }
        }
        let info = CalibrationInfo {
            source: source.display().to_string(),
            nsamples,
            seqlen,
            seed: spec.seed,
            mode,
            documents: docs.len(),
            long_documents: long,
            sha256: fingerprint(&ids),
        };
        Ok(Self { fistaprune_calibration: 1, info, ids })
    }

    /// A saved calibration file, or `None` if `path` is something else.
    pub fn try_load(path: &Path) -> Result<Option<Self>> {
        let name = path.to_string_lossy();
        if !name.ends_with(".json") {
            return Ok(None);
        }
        let head: String = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            let mut b = vec![0u8; 256];
            let n = f.read(&mut b)?;
            String::from_utf8_lossy(&b[..n]).into_owned()
        };
        if !head.contains("fistaprune_calibration") {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let c: Calibration =
            serde_json::from_str(&text).with_context(|| format!("{}: not a valid calibration file", path.display()))?;
        ensure!(
            c.ids.len() == c.info.nsamples && c.ids.iter().all(|s| s.len() == c.info.seqlen),
            "{}: the ids are not {} x {}",
            path.display(),
            c.info.nsamples,
            c.info.seqlen
        );
        ensure!(
            fingerprint(&c.ids) == c.info.sha256,
            "{}: the ids do not match their sha256 (edited or corrupted)",
            path.display()
        );
        Ok(Some(c))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let marked = crate::output::marked(serde_json::to_value(self)?);
        crate::output::write_atomic(path, serde_json::to_string(&marked)?.as_bytes())
    }

    /// Check every id is inside the model's vocabulary.
    pub fn check_vocab(&self, vocab: usize, what: &Path) -> Result<()> {
        if let Some(bad) = self.ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}", what.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama/tokenizer.json")))
            .unwrap()
    }

    fn corpus(name: &str, docs: &[&str]) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fistaprune-calib-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let lines: Vec<String> = docs.iter().map(|t| serde_json::json!({"text": t}).to_string()).collect();
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    fn spec(p: &Path, nsamples: usize, seqlen: usize, mode: CalibMode) -> CalibOptions {
        CalibOptions {
            calib: Some(p.to_path_buf()),
            calib_format: Some(TextFormat::C4),
            nsamples: Some(nsamples),
            seqlen: Some(seqlen),
            seed: 0,
            calib_mode: mode,
        }
    }

    #[test]
    fn documents_mode_takes_windows_from_long_documents_only() {
        let tok = tokenizer();
        let long = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(8);
        let p = corpus("docs.jsonl", &["short one", &long, "another short", &long.to_uppercase()]);
        let c = Calibration::build(&tok, &spec(&p, 6, 20, CalibMode::Documents)).unwrap();
        assert_eq!(c.info.mode, CalibMode::Documents);
        assert_eq!(c.info.long_documents, 2);
        let docs = [tok.encode(&long, true).unwrap(), tok.encode(&long.to_uppercase(), true).unwrap()];
        for s in &c.ids {
            assert_eq!(s.len(), 20);
            assert!(docs.iter().any(|d| d.windows(20).any(|w| w == s.as_slice())), "window not inside a long document");
        }
        // Auto: 2 long documents < 6 samples, so it streams.
        let a = Calibration::build(&tok, &spec(&p, 6, 20, CalibMode::Auto)).unwrap();
        assert_eq!(a.info.mode, CalibMode::Stream);
    }

    #[test]
    fn stream_mode_joins_documents_with_eos() {
        let tok = tokenizer();
        let p = corpus("stream.jsonl", &["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]);
        let c = Calibration::build(&tok, &spec(&p, 5, 8, CalibMode::Stream)).unwrap();
        let eos = tok.eos_id.unwrap();
        let mut stream = Vec::new();
        for (i, d) in ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"].iter().enumerate() {
            if i > 0 {
                stream.push(eos);
            }
            stream.extend(tok.encode(d, true).unwrap());
        }
        for s in &c.ids {
            assert!(stream.windows(8).any(|w| w == s.as_slice()));
        }
        assert!(
            Calibration::build(&tok, &spec(&p, 5, 400, CalibMode::Stream))
                .unwrap_err()
                .to_string()
                .contains("not enough")
        );
    }

    #[test]
    fn seeds_reproduce_and_saved_files_round_trip() {
        let tok = tokenizer();
        let p = corpus(
            "seed.jsonl",
            &[&"lorem ipsum dolor sit amet ".repeat(30), &"consectetur adipiscing elit ".repeat(30)],
        );
        let a = Calibration::build(&tok, &spec(&p, 4, 16, CalibMode::Auto)).unwrap();
        let b = Calibration::build(&tok, &spec(&p, 4, 16, CalibMode::Auto)).unwrap();
        assert_eq!(a.ids, b.ids);
        let mut s = spec(&p, 4, 16, CalibMode::Auto);
        s.seed = 1;
        assert_ne!(Calibration::build(&tok, &s).unwrap().ids, a.ids);
        let saved = p.with_file_name("saved.json");
        a.save(&saved).unwrap();
        let back = Calibration::build(&tok, &spec(&saved, 4, 16, CalibMode::Auto)).unwrap();
        assert_eq!(back.ids, a.ids);
        assert!(
            Calibration::build(&tok, &spec(&saved, 8, 16, CalibMode::Auto))
                .unwrap_err()
                .to_string()
                .contains("holds 4 x 16")
        );
        // A tampered file is refused.
        let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        j["ids"][0][0] = serde_json::json!(j["ids"][0][0].as_u64().unwrap() + 1);
        std::fs::write(&saved, j.to_string()).unwrap();
        let e = Calibration::try_load(&saved).unwrap_err().to_string();
        assert!(e.contains("sha256"), "{e}");
    }
}
