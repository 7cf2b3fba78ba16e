//! attune-server: the `attune` binary's library — the continuous-batching
//! engine, the OpenAI-compatible HTTP API, and the CLI commands.

pub mod api;
pub mod engine;
