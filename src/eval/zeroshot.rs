//! Zero-shot multiple-choice accuracy, scored the way lm-evaluation-harness does (as the pruning papers ran it).
//!
//! Each example becomes one [`Choice`] per answer: a context and a continuation. A choice's score is the summed
//! log-likelihood of its continuation's tokens given the context; `acc` picks the highest score, `acc_norm`
//! the highest score divided by the answer's length in characters (the harness's `len(choice)`, without the
//! leading space). Tokens follow the harness's `_encode_pair`: trailing spaces of the context move to the
//! continuation, `context + continuation` is encoded whole, and the continuation's tokens are what follows
//! the context's own encoding, each encoding with the tokenizer's own special tokens as the current harness
//! does (a LLaMA tokenizer's BOS; SmolLM2's adds none); an empty context is the BOS (else EOS) token alone.
//!
//! Tasks and prompts (the harness's): BoolQ `"{passage}\nQuestion: {question}?\nAnswer:"` + `" no"`/`" yes"`
//! (the passage as `"{title} -- {passage}"` for Google's original rows); RTE
//! `"{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"` + `" True"`/`" False"`; ARC
//! `"Question: {question}\nAnswer:"` + `" {choice}"`; OpenBookQA `"{question_stem}"` + `" {choice}"`;
//! HellaSwag `"{activity_label}: {ctx_a} {Ctx_b}"` (cleaned) + `" {ending}"`; WinoGrande, partial scoring:
//! the sentence up to `_` with each option as context, the rest of the sentence as the shared continuation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::data::tokenizer::Tokenizer;
use crate::eval::perplexity::{LayerCache, head_nll_sum};
use crate::model::CausalLm;
use crate::util::{Progress, check_finite, progress_bar};

/// The tasks, by their lm-evaluation-harness names.
pub const TASKS: &[&str] = &["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"];

/// One answer of an example: scored as `log p(continuation | context)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
    /// Characters `acc_norm` divides by (the answer text, without the delimiter).
    pub norm_len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub choices: Vec<Choice>,
    pub gold: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    pub task: String,
    pub file: String,
    pub examples: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// Standard errors (binomial), as the harness prints.
    pub acc_stderr: f64,
    pub acc_norm_stderr: f64,
    pub seconds: f64,
}

/// The usual file of `task` under `dir` (the layout of `../shared/data/zeroshot`, or the other names the
/// datasets ship with).
pub fn task_file(dir: &Path, task: &str) -> Result<PathBuf> {
    let candidates: &[&str] = match task {
        "boolq" => &["boolq/dev.jsonl", "boolq/val.jsonl", "boolq/validation.jsonl"],
        "rte" => &["rte/dev.jsonl", "rte/val.jsonl", "rte/validation.jsonl", "rte/dev.tsv"],
        "hellaswag" => &["hellaswag/hellaswag_val.jsonl", "hellaswag/dev.jsonl", "hellaswag/validation.jsonl"],
        "winogrande" => &["winogrande/dev.jsonl", "winogrande/validation.jsonl"],
        "arc_easy" => &["arc_easy/test.json", "arc_easy/test.jsonl"],
        "arc_challenge" => &["arc_challenge/test.json", "arc_challenge/test.jsonl"],
        "openbookqa" => &["openbookqa/test.jsonl", "openbookqa/test.json"],
        other => bail!("--tasks: unknown task {other:?} (known: {})", TASKS.join(", ")),
    };
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("{}: no file for task {task} (looked for {})", dir.display(), candidates.join(", ")))
}

/// Where lm-evaluation-harness reads `task` on the Hugging Face Hub: the dataset repository and the Parquet
/// file of the split it scores (`--tasks-dir hub`).
pub fn hub_task_file(task: &str) -> Result<(&'static str, &'static str)> {
    Ok(match task {
        "boolq" => ("aps/super_glue", "boolq/validation-00000-of-00001.parquet"),
        "rte" => ("aps/super_glue", "rte/validation-00000-of-00001.parquet"),
        "hellaswag" => ("Rowan/hellaswag", "data/validation-00000-of-00001.parquet"),
        "winogrande" => ("allenai/winogrande", "winogrande_xl/validation-00000-of-00001.parquet"),
        "arc_easy" => ("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet"),
        "arc_challenge" => ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet"),
        "openbookqa" => ("allenai/openbookqa", "main/test-00000-of-00001.parquet"),
        other => bail!("--tasks: unknown task {other:?} (known: {})", TASKS.join(", ")),
    })
}

/// Rows of a Parquet file (the hub's format for these datasets).
fn read_parquet(path: &Path) -> Result<Vec<Value>> {
    let rows = crate::data::dataset::parquet_records(path)?;
    ensure!(!rows.is_empty(), "{}: no examples", path.display());
    Ok(rows)
}

/// Rows of a `.jsonl` file (one object per line) or a `.json` array.
fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let rows = if text.trim_start().starts_with('[') {
        match serde_json::from_str::<Value>(&text).with_context(|| format!("{}: invalid JSON", path.display()))? {
            Value::Array(a) => a,
            _ => bail!("{}: expected a JSON array", path.display()),
        }
    } else {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            v.push(serde_json::from_str(line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?);
        }
        v
    };
    ensure!(!rows.is_empty(), "{}: no examples", path.display());
    Ok(rows)
}

/// Rows of a GLUE-style `.tsv` (header line, tab-separated) as objects.
fn read_tsv(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or_else(|| anyhow!("{}: empty", path.display()))?.split('\t').collect();
    Ok(lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            Value::Object(
                header.iter().zip(l.split('\t')).map(|(k, v)| (k.to_string(), Value::String(v.into()))).collect(),
            )
        })
        .collect())
}

fn field<'a>(row: &'a Value, key: &str) -> Result<&'a Value> {
    row.get(key).ok_or_else(|| anyhow!("no field {key:?}"))
}

fn text<'a>(row: &'a Value, key: &str) -> Result<&'a str> {
    field(row, key)?.as_str().ok_or_else(|| anyhow!("field {key:?} is not a string"))
}

/// Answers after a delimiter `" "`, as the harness builds them.
fn answers(context: &str, texts: &[String]) -> Vec<Choice> {
    texts
        .iter()
        .map(|t| Choice { context: context.into(), continuation: format!(" {t}"), norm_len: t.chars().count() })
        .collect()
}

/// The gold index of a label among `labels` ("A".."E", or "1".."5" in a few ARC rows).
fn gold_of(labels: &[String], key: &str) -> Result<usize> {
    labels.iter().position(|l| l == key).ok_or_else(|| anyhow!("answerKey {key:?} is not among the labels {labels:?}"))
}

/// HellaSwag's text cleaning (the harness's `preprocess`: strip, `" [title]"` → `". "`, drop every
/// `\[.*?\]`, `"  "` → `" "`).
fn hellaswag_clean(s: &str) -> String {
    let s = s.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    // Non-greedy and within a line, as the regex: from each '[' to the next ']' unless a newline comes first.
    while let Some(open) = rest.find('[') {
        match rest[open..].find([']', '\n']) {
            Some(close) if rest.as_bytes()[open + close] == b']' => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c.flat_map(|x| x.to_lowercase())).collect(),
        None => String::new(),
    }
}

/// One row of `task` as an example.
pub fn example(task: &str, row: &Value) -> Result<Example> {
    Ok(match task {
        "boolq" => {
            let passage = match row.get("title").and_then(Value::as_str) {
                Some(t) => format!("{t} -- {}", text(row, "passage")?),
                None => text(row, "passage")?.to_string(),
            };
            let yes = match (row.get("answer"), row.get("label")) {
                (Some(Value::Bool(b)), _) => *b,
                (_, Some(l)) => l.as_u64().ok_or_else(|| anyhow!("label is not 0/1"))? == 1,
                _ => bail!("no field \"answer\" or \"label\""),
            };
            let context = format!("{passage}\nQuestion: {}?\nAnswer:", text(row, "question")?);
            Example { choices: answers(&context, &["no".into(), "yes".into()]), gold: yes as usize }
        }
        "rte" => {
            let (s1, s2) = match (row.get("sentence1"), row.get("premise")) {
                (Some(_), _) => (text(row, "sentence1")?, text(row, "sentence2")?),
                (_, Some(_)) => (text(row, "premise")?, text(row, "hypothesis")?),
                _ => bail!("no field \"sentence1\" or \"premise\""),
            };
            // 0 / "entailment" → True.
            let entail = match field(row, "label")? {
                Value::String(s) => match s.as_str() {
                    "entailment" | "0" => true,
                    "not_entailment" | "1" => false,
                    o => bail!("label {o:?} is not entailment / not_entailment"),
                },
                v => v.as_u64().ok_or_else(|| anyhow!("label is not 0/1"))? == 0,
            };
            let context = format!("{s1}\nQuestion: {s2} True or False?\nAnswer:");
            Example { choices: answers(&context, &["True".into(), "False".into()]), gold: (!entail) as usize }
        }
        "hellaswag" => {
            let ctx = format!("{} {}", text(row, "ctx_a")?, capitalize(text(row, "ctx_b")?));
            let context = hellaswag_clean(&format!("{}: {ctx}", text(row, "activity_label")?));
            let endings: Vec<String> = field(row, "endings")?
                .as_array()
                .ok_or_else(|| anyhow!("endings is not a list"))?
                .iter()
                .map(|e| e.as_str().map(hellaswag_clean).ok_or_else(|| anyhow!("an ending is not a string")))
                .collect::<Result<_>>()?;
            let gold = match field(row, "label")? {
                Value::String(s) => s.parse()?,
                v => v.as_u64().ok_or_else(|| anyhow!("label is not an index"))? as usize,
            };
            Example { choices: answers(&context, &endings), gold }
        }
        "winogrande" => {
            let s = text(row, "sentence")?;
            let blank = s.find('_').ok_or_else(|| anyhow!("sentence has no \"_\""))?;
            let rest = s[blank + 1..].trim();
            let options = [text(row, "option1")?, text(row, "option2")?];
            let choices = options
                .iter()
                .map(|o| Choice {
                    context: format!("{}{o}", &s[..blank]),
                    continuation: format!(" {rest}"),
                    norm_len: rest.chars().count(),
                })
                .collect();
            let gold = match text(row, "answer")? {
                "1" => 0,
                "2" => 1,
                o => bail!("answer {o:?} is not \"1\" or \"2\""),
            };
            Example { choices, gold }
        }
        "arc_easy" | "arc_challenge" | "openbookqa" => {
            // ARC (Hugging Face schema), OpenBookQA (AI2's nested rows or Hugging Face's flat ones).
            let (stem, choices) = match (row.get("question_stem"), field(row, "question")) {
                (Some(Value::String(q)), _) => (q.as_str(), row.get("choices")),
                (_, Ok(Value::Object(q))) => (
                    q.get("stem").and_then(Value::as_str).ok_or_else(|| anyhow!("question has no stem"))?,
                    q.get("choices"),
                ),
                (_, Ok(Value::String(q))) => (q.as_str(), row.get("choices")),
                (_, Ok(_)) => bail!("question is neither text nor an object"),
                (_, Err(e)) => return Err(e),
            };
            let choices = choices.ok_or_else(|| anyhow!("no field \"choices\""))?;
            let (texts, labels): (Vec<String>, Vec<String>) = match choices {
                Value::Array(a) => a
                    .iter()
                    .map(|c| Ok((text(c, "text")?.to_string(), text(c, "label")?.to_string())))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .unzip(),
                Value::Object(_) => {
                    let list = |k: &str| -> Result<Vec<String>> {
                        field(choices, k)?
                            .as_array()
                            .ok_or_else(|| anyhow!("choices.{k} is not a list"))?
                            .iter()
                            .map(|v| {
                                v.as_str().map(String::from).ok_or_else(|| anyhow!("choices.{k} holds a non-string"))
                            })
                            .collect()
                    };
                    (list("text")?, list("label")?)
                }
                _ => bail!("choices is neither a list nor an object"),
            };
            let gold = gold_of(&labels, text(row, "answerKey")?)?;
            let context = if task == "openbookqa" { stem.to_string() } else { format!("Question: {stem}\nAnswer:") };
            Example { choices: answers(&context, &texts), gold }
        }
        other => bail!("unknown task {other:?}"),
    })
}

/// Every example of `task` in `path` (the first `limit`).
pub fn load_task(task: &str, path: &Path, limit: Option<usize>) -> Result<Vec<Example>> {
    let rows = match path.extension().and_then(|e| e.to_str()) {
        Some("tsv") => read_tsv(path)?,
        Some("parquet") => read_parquet(path)?,
        _ => read_rows(path)?,
    };
    let n = limit.unwrap_or(rows.len()).min(rows.len());
    rows[..n]
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let e = example(task, r).with_context(|| format!("{}: example {}", path.display(), i + 1))?;
            ensure!(
                e.gold < e.choices.len() && e.choices.len() >= 2,
                "{}: example {}: gold {} of {} choices",
                path.display(),
                i + 1,
                e.gold,
                e.choices.len()
            );
            Ok(e)
        })
        .collect()
}

/// `acc` and `acc_norm` of examples given each choice's log-likelihood (`scores[i][j]`). Ties go to the first
/// choice, as `argmax` does.
pub fn accuracy(examples: &[Example], scores: &[Vec<f64>]) -> (f64, f64) {
    let argmax = |v: &[f64]| v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b });
    let (mut acc, mut norm) = (0usize, 0usize);
    for (e, s) in examples.iter().zip(scores) {
        acc += (argmax(s) == e.gold) as usize;
        let n: Vec<f64> = s.iter().zip(&e.choices).map(|(x, c)| x / c.norm_len.max(1) as f64).collect();
        norm += (argmax(&n) == e.gold) as usize;
    }
    let n = examples.len().max(1) as f64;
    (acc as f64 / n, norm as f64 / n)
}

/// Token ids of a choice: `(context, continuation)` as the harness's `_encode_pair` splits them; `prefix` stands
/// for an empty context.
pub fn encode_pair(tok: &Tokenizer, prefix: u32, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    if context.is_empty() {
        return Ok((vec![prefix], tok.encode(&continuation, false)?));
    }
    let whole = tok.encode(&format!("{context}{continuation}"), true)?;
    let ctx = tok.encode(context, true)?;
    ensure!(whole.len() > ctx.len(), "the continuation {continuation:?} encodes to no tokens");
    // The continuation's tokens are what the whole encoding has past the context's own length.
    let cont = whole[ctx.len()..].to_vec();
    Ok((ctx, cont))
}

/// Log-likelihood of each choice of `e` under `model`: the choices run as one batch, padded at the end (the
/// causal mask keeps padding out of the scored positions).
pub fn score_example(
    model: &dyn CausalLm,
    cache: &LayerCache,
    tok: &Tokenizer,
    eos: u32,
    e: &Example,
) -> Result<Vec<f64>> {
    let max_pos = model.config().max_positions();
    let mut seqs = Vec::new();
    for c in &e.choices {
        let (ctx, cont) = encode_pair(tok, eos, &c.context, &c.continuation)?;
        let mut all = [ctx, cont.clone()].concat();
        // The harness keeps the last max_length + 1 tokens and feeds all but the last.
        if all.len() > max_pos + 1 {
            all.drain(..all.len() - max_pos - 1);
        }
        seqs.push((all, cont));
    }
    // One shared context and one-token answers (BoolQ, RTE): one sequence serves every choice.
    let shared = seqs.iter().all(|(s, c)| c.len() == 1 && s[..s.len() - 1] == seqs[0].0[..seqs[0].0.len() - 1]);
    let run = if shared { &seqs[..1] } else { &seqs[..] };
    let len = run.iter().map(|(s, _)| s.len() - 1).max().unwrap_or(1);
    let flat: Vec<u32> = run
        .iter()
        .flat_map(|(s, _)| s[..s.len() - 1].iter().copied().chain(std::iter::repeat_n(eos, len - (s.len() - 1))))
        .collect();
    let ids = Tensor::from_vec(flat, (run.len(), len), &Device::Cpu)?;
    let ctx = model.context(len)?;
    let mut h = model.embed(&ids)?;
    for i in 0..model.num_layers() {
        h = cache.forward(i, &h, &ctx).with_context(|| format!("decoder layer {i}"))?;
        check_finite(&h, &format!("output of decoder layer {i}"))?;
    }
    let fin = model.final_hidden(&h)?;
    let mut out = Vec::new();
    if shared {
        let x = fin.get(0)?.narrow(0, len - 1, 1)?;
        for (_, cont) in &seqs {
            let nll = head_nll_sum(&x, model.lm_head()?, cont)?;
            ensure!(nll.is_finite(), "non-finite log-likelihood (logits hold NaN or Inf)");
            out.push(-nll);
        }
        return Ok(out);
    }
    for (b, (s, cont)) in seqs.iter().enumerate() {
        let n = cont.len();
        // Inputs s[..-1]; position p predicts s[p + 1]; the continuation is the last n targets.
        let start = s.len() - 1 - n;
        let x = fin.get(b)?.narrow(0, start, n)?;
        let nll = head_nll_sum(&x, model.lm_head()?, &s[start + 1..])?;
        ensure!(nll.is_finite(), "non-finite log-likelihood (logits hold NaN or Inf)");
        out.push(-nll);
    }
    Ok(out)
}

/// Every choice's log-likelihood, example by example (progress shown as stage `stage`).
pub fn score_all(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    eos: u32,
    examples: &[Example],
    stage: &str,
    progress: Progress,
) -> Result<Vec<Vec<f64>>> {
    let cache = LayerCache::new(model, 4 << 30)?;
    let pb = progress_bar(examples.len() as u64, stage, progress);
    let mut scores = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let score = || score_example(model, &cache, tok, eos, e).with_context(|| format!("example {}", i + 1));
        scores.push(match score() {
            // Out of GPU memory: the kept layers go (a notice: the run goes on differently), and the example again.
            Err(err) if crate::device::out_of_memory(&err) && cache.let_go() => {
                eprintln!("{stage}: out of GPU memory: reading the layers again for every example from here");
                score()?
            }
            s => s?,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(scores)
}

/// `task` from `path` on `model`.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    eos: u32,
    task: &str,
    path: &Path,
    limit: Option<usize>,
    progress: Progress,
) -> Result<TaskResult> {
    let t0 = Instant::now();
    let examples = load_task(task, path, limit)?;
    let scores =
        score_all(model, tok, eos, &examples, task, progress).with_context(|| format!("{}", path.display()))?;
    let (acc, acc_norm) = accuracy(&examples, &scores);
    let n = examples.len() as f64;
    let se = |p: f64| (p * (1.0 - p) / (n - 1.0).max(1.0)).sqrt();
    Ok(TaskResult {
        task: task.into(),
        file: path.display().to_string(),
        examples: examples.len(),
        acc,
        acc_norm,
        acc_stderr: se(acc),
        acc_norm_stderr: se(acc_norm),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_are_the_harness_ones() {
        let b = example("boolq", &json!({"question": "is it", "title": "T", "passage": "P.", "answer": true})).unwrap();
        assert_eq!(b.choices[0].context, "T -- P.\nQuestion: is it?\nAnswer:");
        assert_eq!(
            (b.choices[0].continuation.as_str(), b.choices[1].continuation.as_str(), b.gold),
            (" no", " yes", 1)
        );
        let hf = example("boolq", &json!({"question": "q", "passage": "T -- P.", "label": 0})).unwrap();
        assert_eq!((hf.choices[0].context.as_str(), hf.gold), ("T -- P.\nQuestion: q?\nAnswer:", 0));
        let w = example(
            "winogrande",
            &json!({"sentence": "A beat B so _ won the cup.", "option1": "A", "option2": "B", "answer": "1"}),
        )
        .unwrap();
        assert_eq!(
            w.choices[0],
            Choice { context: "A beat B so A".into(), continuation: " won the cup.".into(), norm_len: 12 }
        );
        assert_eq!((w.choices[1].context.as_str(), w.gold), ("A beat B so B", 0));
        let a = example(
            "arc_easy",
            &json!({"question": "Why?", "choices": {"text": ["x", "yy"], "label": ["1", "2"]}, "answerKey": "2"}),
        )
        .unwrap();
        assert_eq!(
            (a.choices[1].context.as_str(), a.choices[1].continuation.as_str(), a.choices[1].norm_len, a.gold),
            ("Question: Why?\nAnswer:", " yy", 2, 1)
        );
        let o = example("openbookqa", &json!({"question": {"stem": "Fog is", "choices": [{"text": "wet", "label": "A"}, {"text": "dry", "label": "B"}]}, "answerKey": "A"})).unwrap();
        assert_eq!((o.choices[0].context.as_str(), o.choices[1].continuation.as_str(), o.gold), ("Fog is", " dry", 0));
        let r = example("rte", &json!({"sentence1": "S1.", "sentence2": "S2.", "label": "not_entailment"})).unwrap();
        assert_eq!(
            (r.choices[0].context.as_str(), r.choices[0].continuation.as_str(), r.gold),
            ("S1.\nQuestion: S2. True or False?\nAnswer:", " True", 1)
        );
        let h = example(
            "hellaswag",
            &json!({"activity_label": "Baking", "ctx_a": "A man [header] mixes flour.", "ctx_b": "he", "endings": ["adds eggs [step].", "sleeps."], "label": "0"}),
        )
        .unwrap();
        assert_eq!(
            (h.choices[0].context.as_str(), h.choices[0].continuation.as_str(), h.gold),
            ("Baking: A man mixes flour. He", " adds eggs .", 0)
        );
        assert_eq!(hellaswag_clean(" a [title] b [x] c [open "), "a. b c [open");
        assert!(
            example("winogrande", &json!({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}))
                .is_err()
        );
        assert!(
            example(
                "arc_easy",
                &json!({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"})
            )
            .is_err()
        );
    }

    #[test]
    fn acc_and_acc_norm_by_hand() {
        let ex = |lens: &[usize], gold| Example {
            choices: lens
                .iter()
                .map(|&n| Choice { context: String::new(), continuation: String::new(), norm_len: n })
                .collect(),
            gold,
        };
        // 1: raw picks 0 (−2 > −3), normalized picks 1 (−3/6 = −0.5 > −2/2 = −1): gold 1 → acc 0, norm 1.
        // 2: raw picks 1 and normalized picks 1 (−1/2 > −4/4): gold 1 → both right.
        // 3: a tie goes to the first choice: gold 1 → both wrong.
        let examples = [ex(&[2, 6], 1), ex(&[4, 2], 1), ex(&[1, 1], 1)];
        let scores = [vec![-2.0, -3.0], vec![-4.0, -1.0], vec![-1.0, -1.0]];
        let (acc, norm) = accuracy(&examples, &scores);
        assert!((acc - 1.0 / 3.0).abs() < 1e-12 && (norm - 2.0 / 3.0).abs() < 1e-12, "{acc} {norm}");
    }
}
