//! Shared helpers of the model tests (they live in `attune_models::testing`
//! so every crate's tests find the default model and the reference the same way).
#![allow(dead_code)]

pub use attune_models::testing::{default_model, reference};
