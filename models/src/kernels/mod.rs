//! CPU kernels attune needs and candle 0.11.1 lacks in a usable form.

pub mod attention;
pub mod autograd;
pub mod lora;
pub mod q8_0;

/// An output buffer shared by a parallel region's workers, each writing its
/// own disjoint part.
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: users guarantee workers write disjoint elements.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Pointer to element `index`; callers stay within the buffer.
    pub(crate) fn at(&self, index: usize) -> *mut f32 {
        // SAFETY: in bounds by the caller's contract.
        unsafe { self.0.add(index) }
    }
}
