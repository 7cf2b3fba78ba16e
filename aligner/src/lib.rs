//! attune-aligner: turns logged preferences into LoRA adapter generations (CLHA).
//! The preference store, the loss and the aligner thread land with their issues;
//! for now the crate only fixes its place in the workspace.

/// The objective the aligner optimises, named as in `design/clha.md`.
pub const OBJECTIVE: &str = "clha";
