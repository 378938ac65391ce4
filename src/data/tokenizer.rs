//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from GGUF metadata.
//!
//! GGUF keeps the vocabulary, merges and token types but not the pre-tokenizer; `tokenizer.ggml.pre` names
//! it, and we follow llama.cpp's table so that ids match the original model's `tokenizer.json` (for SmolLM2's
//! `smollm`: every digit is its own pre-token, then GPT-2 byte-level BPE). `llama` (SentencePiece)
//! vocabularies become a byte-fallback BPE whose merges are derived from the token scores, as transformers'
//! GGUF converter does.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail, ensure};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::model::gguf::{GgufFile, Value};

/// A tokenizer and the special ids we need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

/// llama.cpp token types (llama-vocab.h).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenisation patterns of LLaMA 3 (digits in threes) and Qwen2 (single digits), as llama.cpp has them.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, as a Hugging Face pre-tokenizer.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(tk_err)?,
        ))
    };
    Ok(match pre {
        // GPT-2's own regex, applied by ByteLevel.
        "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "olmo"
        | "mpt" | "falcon" | "bloom" | "poro-chat" | "viking" => byte_level(true),
        // Every digit its own pre-token, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]))
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]))
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]))
        }
        other => bail!(
            "tokenizer.ggml.pre \"{other}\" is not supported (supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2, ...)"
        ),
    })
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        // Special ids from the conventional names; the model config may override them.
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos_id = find(&["<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "</s>"]);
        let eos_id = find(&["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"]);
        Ok(Self { inner, bos_id, eos_id })
    }

    /// Rebuild the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path.display();
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| anyhow!("{path}: tokenizer.ggml.tokens is missing"))?
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| anyhow!("{path}: a token is not a string")))
            .collect::<Result<_>>()?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![1; tokens.len()],
        };
        ensure!(types.len() == tokens.len(), "{path}: {} token types for {} tokens", types.len(), tokens.len());
        let id = |k: &str| g.get_u64(k).ok().map(|v| v as u32).filter(|&i| (i as usize) < tokens.len());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let unk_id = id("tokenizer.ggml.unknown_token_id");
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let stored_merges: Option<Vec<(String, String)>> =
            g.get("tokenizer.ggml.merges").and_then(|v| v.as_array()).map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str())
                    .filter_map(|m| m.split_once(' ').map(|(l, r)| (l.to_string(), r.to_string())))
                    .collect()
            });

        let mut inner = match model {
            "gpt2" => {
                let merges =
                    stored_merges.ok_or_else(|| anyhow!("{path}: gpt2 tokenizer without tokenizer.ggml.merges"))?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab.clone().into_iter().collect::<Vocab>(), merges)
                    .build()
                    .map_err(tk_err)?;
                let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre).map_err(|e| anyhow!("{path}: {e}"))?));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
                t
            }
            "llama" => {
                let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                    Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                    None => vec![0.0; tokens.len()],
                };
                ensure!(scores.len() == tokens.len(), "{path}: {} scores for {} tokens", scores.len(), tokens.len());
                let merges = stored_merges.unwrap_or_else(|| merges_from_scores(&tokens, &scores, &vocab));
                let mut b = BPE::builder()
                    .vocab_and_merges(vocab.clone().into_iter().collect::<Vocab>(), merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(u) = unk_id {
                    b = b.unk_token(tokens[u as usize].clone());
                }
                let bpe = b.build().map_err(tk_err)?;
                let add_space = g.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
                let mut t = tokenizers::Tokenizer::new(bpe);
                let mut norms = Vec::new();
                if add_space {
                    norms.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
                }
                norms.push(NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(tk_err)?));
                t.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(norms)))).map_err(tk_err)?;
                let mut decs = vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tk_err)?),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                ];
                if add_space {
                    decs.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
                }
                t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decs))));
                t
            }
            other => bail!("{path}: tokenizer.ggml.model \"{other}\" is not supported (gpt2, llama are)"),
        };

        // Control and user-defined tokens are matched whole, before the model sees the text.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL || **ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, ty)| AddedToken::from(t.clone(), *ty == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(specials).map_err(tk_err)?;

        let default_bos = model == "llama";
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(default_bos);
        if add_bos {
            let b = bos_id.ok_or_else(|| anyhow!("{path}: add_bos_token is set but there is no bos_token_id"))?;
            let bt = tokens[b as usize].clone();
            let tp = TemplateProcessing::builder()
                .try_single(format!("{bt} $A"))
                .map_err(|e| anyhow!("{e}"))?
                .try_pair(format!("{bt} $A {bt} $B"))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bt, b)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            inner.with_post_processor(Some(tp));
        }
        Ok(Self { inner, bos_id, eos_id })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (e.g. a BOS) added as it defines them.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The `tokenizer.*` metadata llama.cpp reads, for GGUF output from a `tokenizer.json`: byte-level BPE
    /// vocabularies (GPT-2, SmolLM, LLaMA 3, Qwen 2) only, as llama.cpp's converter writes them. The
    /// pre-tokenizer's llama.cpp name is found by behaviour: the one of [`gpt2_pre_tokenizer`]'s that splits a
    /// probe text exactly as this tokenizer's own pre-tokenizer does.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, Value)>> {
        let json: serde_json::Value = serde_json::from_str(&self.to_json()?)?;
        let model = &json["model"];
        let byte_level = json.to_string().contains("\"ByteLevel\"");
        if model["type"] != "BPE" || !byte_level {
            bail!(
                "only byte-level BPE tokenizers (GPT-2, SmolLM, LLaMA 3, Qwen) can be written to GGUF from a tokenizer.json yet; convert from the model's GGUF file instead"
            );
        }
        let pre = self.llama_cpp_pre()?;
        let n = self.inner.get_vocab_size(true);
        let mut tokens = vec![String::new(); n];
        let mut types = vec![1i32; n];
        for (t, id) in self.inner.get_vocab(true) {
            ensure!((id as usize) < n, "tokenizer: id {id} of {t:?} is past the vocabulary's {n}");
            tokens[id as usize] = t;
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            types[id as usize] = if added.special { TOKEN_TYPE_CONTROL as i32 } else { TOKEN_TYPE_USER_DEFINED as i32 };
        }
        ensure!(tokens.iter().all(|t| !t.is_empty()), "tokenizer: the vocabulary has holes (ids with no token)");
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .ok_or_else(|| anyhow!("tokenizer.json: BPE without merges"))?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(Value::String(s.clone())),
                serde_json::Value::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                ))),
                other => bail!("tokenizer.json: a merge is {other}"),
            })
            .collect::<Result<_>>()?;
        let adds_bos = self.bos_id.is_some_and(|b| self.encode("a", true).is_ok_and(|ids| ids.first() == Some(&b)));
        let mut kv = vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.merges".into(), Value::Array(merges)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)),
        ];
        for (key, id) in [("bos", self.bos_id), ("eos", self.eos_id)] {
            if let Some(id) = id {
                kv.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
            }
        }
        Ok(kv)
    }

    /// llama.cpp's name for this tokenizer's pre-tokenizer: the candidate that splits a probe text the same way.
    fn llama_cpp_pre(&self) -> Result<&'static str> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        const PROBE: &str = "Hello World! It's 2024-12-04, 3.14159 and 1234567 \n\n\t  tabs   and\r\nCRLF \
            don't we'll I'M ÄÖü ΑΒΓ 漢字 🦀 ,,, --- ... x1y22z333";
        let own = self.inner.get_pre_tokenizer().ok_or_else(|| anyhow!("tokenizer: no pre-tokenizer"))?;
        let splits = |p: &dyn Fn(&mut PreTokenizedString) -> tokenizers::Result<()>| -> Result<Vec<String>> {
            let mut s = PreTokenizedString::from(PROBE);
            p(&mut s).map_err(tk_err)?;
            Ok(s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(t, _, _)| t.to_string())
                .collect())
        };
        let want = splits(&|s| own.pre_tokenize(s))?;
        for name in ["gpt-2", "smollm", "llama-bpe", "qwen2"] {
            let cand = gpt2_pre_tokenizer(name)?;
            if splits(&|s| cand.pre_tokenize(s))? == want {
                return Ok(name);
            }
        }
        bail!("tokenizer: its pre-tokenizer is none llama.cpp knows by name here (gpt-2, smollm, llama-bpe, qwen2)")
    }

    /// Serialise as `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| anyhow!("tokenizer: {e}"))
    }
}

/// Merges for a SentencePiece vocabulary: every split of a token into two tokens, ordered by the score of the
/// merged token (highest first), ties by the ids of the parts, as transformers' `SentencePieceExtractor`.
fn merges_from_scores(tokens: &[String], scores: &[f64], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (i, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(i);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((score, il, ir, l.to_string(), r.to_string()));
            }
        }
        local.sort_by_key(|m| (m.1, m.2));
        merges.extend(local);
    }
    // Stable: equal scores keep the order above.
    merges.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}
