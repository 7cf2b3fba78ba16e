//! attune-aligner: turns logged preferences into LoRA adapter generations
//! (CLHA). It owns the preference store the server logs completions and
//! feedback into; the loss, the training loop and the aligner thread land
//! with their issues.

pub mod loss;
pub mod store;

pub use store::{Store, StoreError};
