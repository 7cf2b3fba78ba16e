//! attune-server: the `attune` binary's library — the continuous-batching
//! engine, the OpenAI-compatible HTTP API, Prometheus metrics, and the CLI
//! commands.

pub mod api;
pub mod engine;
pub mod metrics;
