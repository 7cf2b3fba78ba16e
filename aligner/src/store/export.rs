//! Exporting records as ranked JSON lines, streamed: one record a line,
//! responses best first, so that `import` reads the file back unchanged.

use std::io::Write;

use serde_json::json;

use super::{Store, StoreError};

/// Writes every record with id above `watermark` to `out`; answers how many.
pub fn export_ranked(
    store: &Store,
    watermark: i64,
    out: &mut impl Write,
) -> Result<u64, StoreError> {
    let mut written = 0u64;
    store.for_each_record(watermark, usize::MAX, |r| {
        let line = json!({
            "prompt": r.messages,
            "responses": r.candidates.iter().map(|c| &c.text).collect::<Vec<_>>(),
            "ranking": (0..r.candidates.len()).collect::<Vec<_>>(),
            "id": r.id,
            "kind": r.kind,
            "created_ms": r.created_ms,
            "generations": r.candidates.iter().map(|c| c.generation).collect::<Vec<_>>(),
        });
        serde_json::to_writer(&mut *out, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| StoreError::Export(e.to_string()))?;
        written += 1;
        Ok(())
    })?;
    out.flush().map_err(|e| StoreError::Export(e.to_string()))?;
    Ok(written)
}
