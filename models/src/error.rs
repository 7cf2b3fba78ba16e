//! Error types of the model layer: one enum for loading (files, formats, metadata)
//! and one for running the model.

use std::path::PathBuf;

/// What went wrong while loading a model, its tokenizer or its chat template.
/// Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("{path} is not a readable safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error("{path} is truncated or damaged: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor `{name}` has type {dtype}, which attune cannot serve")]
    UnsupportedQuant {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: metadata `{key}` {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: invalid model configuration: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template from {path}: {reason}")]
    ChatTemplate { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

/// Errors while running the model or sampling from it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("sequence of {tokens} tokens is longer than the model's context of {context}")]
    ContextOverflow { tokens: usize, context: usize },
    #[error("batch has {tokens} token slices but {caches} KV caches")]
    BatchMismatch { tokens: usize, caches: usize },
    #[error("empty token slice for sequence {index}")]
    EmptyInput { index: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("chat template: {0}")]
    Template(String),
}
