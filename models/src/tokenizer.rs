//! Text ↔ token ids: a Hugging Face `tokenizer.json`, or a tokenizer rebuilt from
//! GGUF metadata (`tokenizer.ggml.*`). candle's own GGUF tokenizer adds a prefix
//! space for `pre = "smollm"`; here SmolLM gets what its `tokenizer.json` says:
//! every digit split on its own, then GPT-2 byte-level BPE with no prefix space.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{LoadError, ModelError};

/// GGUF `token_type` values.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// LLaMA-3's pre-tokenizer split pattern (llama.cpp `pre = "llama-bpe"`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus the ids generation needs to know.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that end generation (EOS and the chat template's end-of-turn).
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn strings(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Vec<String>, LoadError> {
    let v = md
        .get(key)
        .ok_or_else(|| tok_err(path, format!("metadata `{key}` is missing")))?;
    let arr = v
        .to_vec()
        .map_err(|_| tok_err(path, format!("metadata `{key}` is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|_| tok_err(path, format!("metadata `{key}` holds a non-string")))
        })
        .collect()
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::Missing {
                path: path.to_path_buf(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e.to_string()))?;
        Ok(Self {
            inner,
            eos_ids: vec![],
            bos_id: None,
        })
    }

    /// Rebuilds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Self, LoadError> {
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| tok_err(path, "metadata `tokenizer.ggml.model` is missing"))?;
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!(
                    "tokenizer model `{model}` is not supported from GGUF (only byte-level BPE, `gpt2`); \
                     use a Hugging Face directory with tokenizer.json"
                ),
            ));
        }
        let tokens = strings(md, "tokenizer.ggml.tokens", path)?;
        let merges = strings(md, "tokenizer.ggml.merges", path)?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(path, format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, e.to_string()))?;
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into());
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "llama-bpe" | "llama3" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_PATTERN.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(path, e.to_string()))?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(tok_err(
                    path,
                    format!("pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (smollm, llama-bpe, gpt2)"),
                ))
            }
        };
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if let Some(types) = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| {
                    matches!(
                        ty.to_i32(),
                        Ok(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                    )
                })
                .map(|(_, t)| AddedToken::from(t.clone(), true))
                .collect();
            inner
                .add_special_tokens(special)
                .map_err(|e| tok_err(path, e.to_string()))?;
        }
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        Ok(Self {
            inner,
            eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
        })
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Checks the tokenizer fits the model's embedding table.
    pub fn check_vocab(&self, model_vocab: usize, path: &Path) -> Result<(), LoadError> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= model_vocab {
            return Err(tok_err(
                path,
                format!(
                    "token id {max_id} does not fit the model's vocabulary of {model_vocab} \
                     (tokenizer and model do not match)"
                ),
            ));
        }
        if let Some(&bad) = self.eos_ids.iter().find(|&&id| id as usize >= model_vocab) {
            return Err(tok_err(
                path,
                format!("end-of-sequence id {bad} is outside the vocabulary of {model_vocab}"),
            ));
        }
        Ok(())
    }

    /// Encodes text as the model sees it: special tokens written in the text
    /// (`<|im_start|>`) become their ids; no BOS is added here.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    /// Decodes ids; special tokens are skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
