//! Shared helpers of the model tests: where the default model and the reference
//! fixtures live.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model: `ATTUNE_MODEL`, else the fetch script's cache location.
/// Tests that need it fail loudly when it is absent: `make test` fetches it.
pub fn default_model() -> PathBuf {
    if let Ok(p) = std::env::var("ATTUNE_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("ATTUNE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/attune")
        });
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "default model not found at {}: run scripts/fetch-model.sh (make test does)",
        p.display()
    );
    p
}

/// The project's shared folder (design, reference values, data): `ATTUNE_SHARED_DIR`,
/// else `../shared` beside the checkout, else `/work/shared`.
pub fn shared_dir() -> PathBuf {
    if let Ok(p) = std::env::var("ATTUNE_SHARED_DIR") {
        return PathBuf::from(p);
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if beside.exists() {
        return beside;
    }
    let fixed = PathBuf::from("/work/shared");
    assert!(
        fixed.exists(),
        "the shared folder (reference values) is neither at {} nor at {}: set ATTUNE_SHARED_DIR",
        beside.display(),
        fixed.display()
    );
    fixed
}

pub fn reference() -> serde_json::Value {
    let p = shared_dir().join("reference/smollm2.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}
