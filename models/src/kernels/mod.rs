//! CPU kernels attune needs and candle 0.11.1 lacks in a usable form.

pub mod q8_0;
