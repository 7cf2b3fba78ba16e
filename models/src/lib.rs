//! attune-models: everything that touches tensors — the LLaMA module (serving with
//! per-sequence KV caches), weight loading from GGUF and Hugging Face directories,
//! the tokenizer and chat template, and sampling.

pub mod chat_template;
pub mod checkpoint;
pub mod error;
pub mod generation;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod loaded;
pub mod lora;
pub mod registry;
pub mod reward;
pub mod sampling;
pub mod testing;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use checkpoint::{Checkpoint, WeightFormat};
pub use error::{LoadError, ModelError};
pub use generation::{
    generate, generate_batch, generate_batch_adapted, FinishReason, Generated, SequenceState,
    StepOutput, StopConditions,
};
pub use kv_cache::KvCache;
pub use llama::{Llama, LlamaConfig, LogitsFor, PromptResponse, ResponseBatch};
pub use loaded::{LoadOptions, LoadedModel};
pub use lora::{AdapterFileError, LoraAdapter, LoraConfig, LoraInit, LoraTarget};
pub use registry::{Generation, Registry, RegistryError};
pub use reward::RewardModel;
pub use sampling::{InvalidParam, Sampler, SamplingParams, TokenLogprob};
pub use tokenizer::TextTokenizer;
