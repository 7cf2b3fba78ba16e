//! attune-aligner: turns logged preferences into LoRA adapter generations
//! (CLHA). It owns the preference store the server logs completions and
//! feedback into, the objectives (CLHA, DPO), the LoRA training loop and the
//! offline evaluation, and the aligner thread that runs rounds of it inside
//! `attune serve` ([`online`]).

pub mod data;
pub mod eval;
pub mod loss;
pub mod online;
pub mod reward;
pub mod store;
pub mod train;

pub use store::{Store, StoreError};
