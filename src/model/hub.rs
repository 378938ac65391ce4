//! `--model org/name`: a Hugging Face Hub model, from the standard cache (`HF_HOME`, default
//! `~/.cache/huggingface`; `HF_HUB_CACHE` for the `hub` folder itself), downloaded into it first when the
//! machine is online and `HF_HUB_OFFLINE` is not set. The `hf-hub` crate keeps the cache layout
//! (`models--org--name/refs/main` → `snapshots/<commit>/`), so the Python tools share it. Zero-shot task
//! files come the same way from dataset repositories (`datasets--org--name`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::{Cache, Repo, RepoType};

/// Whether `s` names a hub repository (`org/name`) rather than a local path.
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else { return false };
    let ok = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name) && !s.ends_with(".gguf")
}

fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(PathBuf::from(p)),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The snapshot folder of `repo` in the cache, if it holds a complete model (config and weights).
fn cached(repo: &str) -> Option<PathBuf> {
    let c = cache().repo(Repo::model(repo.to_string()));
    let cfg = c.get("config.json")?;
    let dir = cfg.parent()?.to_path_buf();
    (dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists()).then_some(dir)
}

/// Download `repo`'s checkpoint files into the cache; its snapshot folder.
fn download(repo: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache()).with_progress(true).build()?;
    let r = api.model(repo.to_string());
    let cfg = r.get("config.json").with_context(|| format!("{repo}: cannot download config.json"))?;
    for optional in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let _ = r.get(optional);
    }
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut shards: Vec<&str> =
                json["weight_map"].as_object().into_iter().flatten().filter_map(|(_, v)| v.as_str()).collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                r.get(s).with_context(|| format!("{repo}: cannot download {s}"))?;
            }
        }
        Err(_) => {
            r.get("model.safetensors")
                .with_context(|| format!("{repo}: no model.safetensors (only safetensors checkpoints are read)"))?;
        }
    }
    Ok(cfg.parent().ok_or_else(|| anyhow!("{repo}: odd cache path"))?.to_path_buf())
}

/// `path` itself when it exists, else the cached snapshot of the hub model it names (nothing is downloaded).
pub fn cached_path(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    is_repo_id(&path.to_string_lossy()).then(|| cached(&path.to_string_lossy())).flatten()
}

/// A local path for `--model`: `path` itself when it exists, else the hub model it names.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let s = path.to_string_lossy();
    if path.exists() || !is_repo_id(&s) {
        return Ok(path.to_path_buf());
    }
    if let Some(dir) = cached(&s) {
        return Ok(dir);
    }
    let where_ = cache().path().display().to_string();
    if offline() {
        bail!(
            "{s}: not in the Hugging Face cache ({where_}) and HF_HUB_OFFLINE is set: download it on a machine that is online (or unset HF_HUB_OFFLINE), or pass a local path"
        );
    }
    download(&s).with_context(|| {
        format!("{s}: not in the Hugging Face cache ({where_}) and the download failed (offline?): fetch it where the hub is reachable into that cache, or pass a local path")
    })
}

/// A file of the hub dataset `repo` at `revision` (e.g. a task's Parquet split): from the cache, else
/// downloaded into it. `instead` says what the user can pass instead when neither works.
pub fn dataset_file(repo: &str, revision: &str, file: &str, instead: &str) -> Result<PathBuf> {
    let cache = cache();
    let r = Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string());
    if let Some(p) = cache.repo(r.clone()).get(file) {
        return Ok(p);
    }
    let where_ = cache.path().display().to_string();
    if offline() {
        bail!(
            "dataset {repo}, file {file}: not in the Hugging Face cache ({where_}) and HF_HUB_OFFLINE is set: download it on a machine that is online (or unset HF_HUB_OFFLINE), or {instead}"
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true).build()?;
    api.repo(r).get(file).with_context(|| {
        format!("dataset {repo}, file {file}: not in the Hugging Face cache ({where_}) and the download failed (offline?): fetch it where the hub is reachable into that cache, or {instead}")
    })
}

#[cfg(test)]
mod tests {
    use super::is_repo_id;

    #[test]
    fn repo_ids_and_paths() {
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M") && is_repo_id("facebook/opt-125m"));
        for p in ["model.gguf", "./a/b", "/abs/x", "a/b/c", "org/m.gguf", "../x", "a/"] {
            assert!(!is_repo_id(p), "{p}");
        }
    }
}
