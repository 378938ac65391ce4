//! Evaluation text, read the way the peers (SparseGPT, Wanda, GPTQ) read it, and cut into windows.
//!
//! - WikiText-2: Hugging Face rows (a whitespace-only line becomes `""`, any other line the line plus
//!   `"\n"`; or rows given as JSON lines with `text`), joined with `"\n\n"`.
//! - C4: the documents' `text` joined with `" "` (SparseGPT's C4 evaluation).
//! - PTB: the stripped lines (or `sentence` fields) joined with `" "`.
//! - Any other UTF-8 file: its contents as they are.
//!
//! Besides files, `--dataset` and `--calib` take the names the peers' scripts use (`wikitext2`, `c4`, `ptb`):
//! the same hub files their loaders read, through the Hugging Face cache ([`Source::locate`]).
//!
//! The string is tokenized once and cut into non-overlapping windows of `seqlen` tokens; the partial window
//! at the end is dropped.

use std::io::Read;
use std::path::{Path, PathBuf};

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

/// What a text is read for: the named datasets use their train split for calibration and their test (or
/// validation) split for evaluation, as the peers' loaders do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Calibration,
    Evaluation,
}

/// A dataset the peers' scripts load by name from the Hugging Face Hub (SparseGPT's and Wanda's `datautils`),
/// and the file of it we read.
struct Named {
    name: &'static str,
    role: Role,
    repo: &'static str,
    revision: &'static str,
    file: &'static str,
    format: TextFormat,
    /// SparseGPT evaluates C4 on the first 1,100 validation documents only.
    max_docs: Option<usize>,
}

#[rustfmt::skip]
const NAMED: &[Named] = &[
    Named { name: "wikitext2", role: Role::Evaluation, repo: "Salesforce/wikitext", revision: "main", file: "wikitext-2-raw-v1/test-00000-of-00001.parquet", format: TextFormat::Wikitext, max_docs: None },
    Named { name: "wikitext2", role: Role::Calibration, repo: "Salesforce/wikitext", revision: "main", file: "wikitext-2-raw-v1/train-00000-of-00001.parquet", format: TextFormat::Wikitext, max_docs: None },
    Named { name: "c4", role: Role::Evaluation, repo: "allenai/c4", revision: "main", file: "en/c4-validation.00000-of-00008.json.gz", format: TextFormat::C4, max_docs: Some(1100) },
    Named { name: "c4", role: Role::Calibration, repo: "allenai/c4", revision: "main", file: "en/c4-train.00000-of-01024.json.gz", format: TextFormat::C4, max_docs: None },
    Named { name: "ptb", role: Role::Evaluation, repo: "ptb-text-only/ptb_text_only", revision: "refs/convert/parquet", file: "penn_treebank/test/0000.parquet", format: TextFormat::Ptb, max_docs: None },
    Named { name: "ptb", role: Role::Calibration, repo: "ptb-text-only/ptb_text_only", revision: "refs/convert/parquet", file: "penn_treebank/train/0000.parquet", format: TextFormat::Ptb, max_docs: None },
];

/// The dataset names `--dataset` and `--calib` take besides files.
pub fn dataset_names() -> Vec<&'static str> {
    let mut v: Vec<_> = NAMED.iter().map(|n| n.name).collect();
    v.dedup();
    v
}

/// A text to read: a file, in a format, perhaps only its first documents.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub format: TextFormat,
    pub max_docs: Option<usize>,
    /// The dataset name it was given by, if any.
    pub name: Option<&'static str>,
}

impl Source {
    /// `given` as the user wrote it (`--dataset`, `--calib`): an existing file, else a dataset named the way the
    /// peers' scripts name it (`wikitext2`, `c4`, `ptb`), from the Hugging Face cache (downloaded into it when
    /// online). `format` overrides the one guessed from the file name.
    pub fn locate(given: &Path, format: Option<TextFormat>, role: Role) -> Result<Self> {
        let text = given.to_string_lossy();
        let named = NAMED.iter().find(|n| n.name == text && n.role == role);
        let Some(n) = named.filter(|_| !given.exists()) else {
            let format = format.unwrap_or_else(|| detect_format(given));
            return Ok(Self { path: given.to_path_buf(), format, max_docs: None, name: None });
        };
        let instead = "pass the file's path instead of its name";
        let path = crate::model::hub::dataset_file(n.repo, n.revision, n.file, instead)
            .with_context(|| format!("dataset {}", n.name))?;
        Ok(Self { path, format: format.unwrap_or(n.format), max_docs: n.max_docs, name: Some(n.name) })
    }

    /// How messages and reports name it: the dataset name, else the path.
    pub fn shown(&self) -> String {
        self.name.map_or_else(|| self.path.display().to_string(), String::from)
    }

    /// The records of a Parquet or JSON file (the first `max_docs`); `None` for plain text.
    fn records(&self) -> Result<Option<Vec<Json>>> {
        let path = &self.path;
        let mut recs = if path.extension().is_some_and(|e| e == "parquet") {
            parquet_records(path)?
        } else if is_json_name(path) || self.format == TextFormat::C4 {
            json_records(path, &read_text_file(path)?)?
        } else {
            return Ok(None);
        };
        if let Some(n) = self.max_docs {
            recs.truncate(n);
        }
        Ok(Some(recs))
    }

    /// The documents' strings in field `names` (the first present).
    fn fields(&self, recs: &[Json], names: &[&str]) -> Result<Vec<String>> {
        recs.iter().enumerate().map(|(i, r)| field(&self.path, i, r, names).map(String::from)).collect()
    }

    /// The single string the peers tokenize for perplexity.
    pub fn text(&self) -> Result<String> {
        let path = &self.path;
        let text = match (self.format, self.records()?) {
            (TextFormat::Wikitext, Some(recs)) => self.fields(&recs, &["text"])?.join("\n\n"),
            (TextFormat::Wikitext, None) => {
                let raw = read_text_file(path)?;
                let rows: Vec<String> =
                    raw.lines().map(|l| if l.trim().is_empty() { String::new() } else { format!("{l}\n") }).collect();
                rows.join("\n\n")
            }
            (TextFormat::C4, recs) => self.fields(&recs.unwrap_or_default(), &["text"])?.join(" "),
            (TextFormat::Ptb, Some(recs)) => {
                self.fields(&recs, &["sentence", "text"])?.iter().map(|s| s.trim()).collect::<Vec<_>>().join(" ")
            }
            (TextFormat::Ptb, None) => read_text_file(path)?.lines().map(str::trim).collect::<Vec<_>>().join(" "),
            (TextFormat::Text, _) => read_text_file(path)?,
        };
        if text.trim().is_empty() {
            bail!("{}: no text (empty file or no records)", path.display());
        }
        Ok(text)
    }

    /// The documents of a calibration source: C4 records, or the whole evaluation string as one document.
    pub fn documents(&self) -> Result<Vec<String>> {
        match self.format {
            TextFormat::C4 => self.fields(&self.records()?.unwrap_or_default(), &["text"]),
            _ => Ok(vec![self.text()?]),
        }
    }
}

/// Rows of a Parquet file (the hub's format for most datasets), each as a JSON object of its columns.
pub fn parquet_records(path: &Path) -> Result<Vec<Json>> {
    use parquet::file::reader::SerializedFileReader;
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader =
        SerializedFileReader::new(f).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    reader
        .into_iter()
        .map(|r| r.map(|row| row.to_json_value()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: cannot read its rows", path.display()))
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

    /// The evaluation string of the file `path` read as `format`.
    fn eval_text(path: &Path, format: TextFormat) -> Result<String> {
        Source { path: path.to_path_buf(), format, max_docs: None, name: None }.text()
    }

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
        // The named C4 evaluation reads only the first documents (SparseGPT's 1,100).
        let first = Source { path: c.clone(), format: TextFormat::C4, max_docs: Some(1), name: Some("c4") };
        assert_eq!(first.text().unwrap(), "one");
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
