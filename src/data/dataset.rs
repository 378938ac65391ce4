//! Evaluation text, read the way the peers (SparseGPT, Wanda, GPTQ) read it, and cut into windows.
//!
//! - WikiText-2: Hugging Face rows (a whitespace-only line becomes `""`, any other line the line plus
//!   `"\n"`; or rows given as JSON lines with `text`), joined with `"\n\n"`.
//! - C4: the documents' `text` joined with `" "` (SparseGPT's C4 evaluation).
//! - PTB: the stripped lines (or `sentence` fields) joined with `" "`.
//! - Any other UTF-8 file: its contents as they are.
//!
//! The string is tokenized once and cut into non-overlapping windows of `seqlen` tokens; the partial window
//! at the end is dropped.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value as Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    Wikitext,
    C4,
    Ptb,
    Text,
}

/// Read a file, gunzipping `.gz`, as UTF-8.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not a valid gzip file", path.display()))?;
        out
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

fn is_json_name(path: &Path) -> bool {
    let n = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let n = n.strip_suffix(".gz").unwrap_or(&n).to_string();
    n.ends_with(".jsonl") || n.ends_with(".json")
}

/// JSON records: one object per line, or one array of objects.
pub fn json_records(path: &Path, text: &str) -> Result<Vec<Json>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Json = serde_json::from_str(trimmed).with_context(|| format!("{}: invalid JSON", path.display()))?;
        return Ok(v.as_array().cloned().unwrap_or_default());
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}: invalid JSON", path.display(), i + 1))
        })
        .collect()
}

fn field<'a>(path: &Path, i: usize, rec: &'a Json, names: &[&str]) -> Result<&'a str> {
    names
        .iter()
        .find_map(|n| rec.get(*n).and_then(|v| v.as_str()))
        .ok_or_else(|| anyhow!("{}: record {} has no string field {}", path.display(), i + 1, names.join(" or ")))
}

/// Guess the format from the file name and, for JSON, the first record.
pub fn detect_format(path: &Path) -> TextFormat {
    let name = path.to_string_lossy().to_lowercase();
    if name.contains("wiki") {
        TextFormat::Wikitext
    } else if name.contains("ptb") || name.contains("penn") {
        TextFormat::Ptb
    } else if name.contains("c4") || is_json_name(path) {
        TextFormat::C4
    } else {
        TextFormat::Text
    }
}

/// The single string the peers tokenize for perplexity on `path`.
pub fn eval_text(path: &Path, format: TextFormat) -> Result<String> {
    let raw = read_text_file(path)?;
    let text = match format {
        TextFormat::Wikitext => {
            let rows: Vec<String> = if is_json_name(path) {
                json_records(path, &raw)?
                    .iter()
                    .enumerate()
                    .map(|(i, r)| field(path, i, r, &["text"]).map(String::from))
                    .collect::<Result<_>>()?
            } else {
                raw.lines().map(|l| if l.trim().is_empty() { String::new() } else { format!("{l}\n") }).collect()
            };
            rows.join("\n\n")
        }
        TextFormat::C4 => {
            let recs = json_records(path, &raw)?;
            let docs: Vec<&str> =
                recs.iter().enumerate().map(|(i, r)| field(path, i, r, &["text"])).collect::<Result<_>>()?;
            docs.join(" ")
        }
        TextFormat::Ptb => {
            if is_json_name(path) {
                let recs = json_records(path, &raw)?;
                let s: Vec<&str> = recs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| field(path, i, r, &["sentence", "text"]).map(str::trim))
                    .collect::<Result<_>>()?;
                s.join(" ")
            } else {
                raw.lines().map(str::trim).collect::<Vec<_>>().join(" ")
            }
        }
        TextFormat::Text => raw,
    };
    if text.trim().is_empty() {
        bail!("{}: no text (empty file or no records)", path.display());
    }
    Ok(text)
}

/// Cut `ids` into non-overlapping windows of `seqlen`, at most `max_windows` of them.
pub fn windows(ids: &[u32], seqlen: usize, max_windows: Option<usize>, what: &str) -> Result<Vec<Vec<u32>>> {
    ensure!(seqlen >= 2, "--seqlen must be at least 2");
    let n = ids.len() / seqlen;
    ensure!(n > 0, "{what}: {} tokens, shorter than one window of {seqlen}", ids.len());
    let n = max_windows.map_or(n, |m| m.min(n));
    Ok(ids.chunks_exact(seqlen).take(n).map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, contents: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fistaprune-ds-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    #[test]
    fn wikitext_rows_are_joined_like_hugging_face() {
        let p = tmp("wiki.test.raw", " = Title = \n \n Some text .\n");
        // Rows: " = Title = \n", "", " Some text .\n" joined with "\n\n".
        assert_eq!(eval_text(&p, TextFormat::Wikitext).unwrap(), " = Title = \n\n\n\n\n Some text .\n");
        let j = tmp("wiki.jsonl", "{\"text\": \" = Title = \\n\"}\n{\"text\": \"\"}\n");
        assert_eq!(eval_text(&j, TextFormat::Wikitext).unwrap(), " = Title = \n\n\n");
    }

    #[test]
    fn ptb_and_c4_join_with_spaces() {
        let p = tmp("ptb.txt", " a b \n c d \n");
        assert_eq!(eval_text(&p, TextFormat::Ptb).unwrap(), "a b c d");
        let c = tmp("c4.jsonl", "{\"text\":\"one\",\"url\":\"u\"}\n{\"text\":\"two\\/2\"}\n");
        assert_eq!(eval_text(&c, TextFormat::C4).unwrap(), "one two/2");
        let bad = tmp("bad.jsonl", "{\"text\":\"one\"}\n{\"txt\":\"two\"}\n");
        let e = eval_text(&bad, TextFormat::C4).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("record 2"), "{e}");
    }

    #[test]
    fn windows_drop_the_partial_tail_and_honour_max() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(windows(&ids, 3, None, "x").unwrap(), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
        assert_eq!(windows(&ids, 3, Some(1), "x").unwrap().len(), 1);
        assert!(windows(&ids, 11, None, "x").unwrap_err().to_string().contains("shorter than one window"));
    }

    #[test]
    fn formats_are_guessed_from_names() {
        assert_eq!(detect_format(Path::new("a/wikitext-2-raw/wiki.test.raw")), TextFormat::Wikitext);
        assert_eq!(detect_format(Path::new("ptb.test.txt")), TextFormat::Ptb);
        assert_eq!(detect_format(Path::new("c4-validation.json.gz")), TextFormat::C4);
        assert_eq!(detect_format(Path::new("notes.txt")), TextFormat::Text);
    }
}
