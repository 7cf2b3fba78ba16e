//! `attune feedback import|export|stats`: the preference store from the
//! command line. Works beside a running server (SQLite WAL; the import waits
//! its turn for the write lock).

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use attune_aligner::store::{export_ranked, import_file, ImportFormat};
use attune_aligner::Store;
use attune_config::Config;

use crate::cli::FeedbackCommand;

pub fn run(mut cfg: Config, cmd: FeedbackCommand) -> Result<()> {
    match cmd {
        FeedbackCommand::Import {
            file,
            format,
            store,
        } => {
            super::apply_store_flag(&mut cfg, &store);
            let format: ImportFormat = format
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
            let store = Store::open(&cfg.store)?;
            let start = Instant::now();
            let report = import_file(&store, &file, format, |r| {
                tracing::info!(
                    lines = r.lines,
                    stored = r.stored,
                    already_stored = r.already_stored,
                    rejected = r.rejected,
                    "importing"
                );
            })?;
            for r in &report.reasons {
                println!("rejected line {}: {}", r.line, r.reason);
            }
            if report.rejected as usize > report.reasons.len() {
                println!(
                    "... and {} more rejected lines",
                    report.rejected as usize - report.reasons.len()
                );
            }
            println!(
                "{}: {} lines, {} stored, {} already stored, {} rejected ({:.1}s) into {}",
                file.display(),
                report.lines,
                report.stored,
                report.already_stored,
                report.rejected,
                start.elapsed().as_secs_f64(),
                store.path().display()
            );
            Ok(())
        }
        FeedbackCommand::Export {
            output,
            after,
            store,
        } => {
            super::apply_store_flag(&mut cfg, &store);
            let store = Store::open(&cfg.store)?;
            let n = match &output {
                Some(path) => {
                    // Written beside the target and renamed, so a failed export
                    // never leaves a truncated file under the final name.
                    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                    let tmp =
                        tempfile::NamedTempFile::new_in(dir.unwrap_or(std::path::Path::new(".")))
                            .with_context(|| format!("cannot write beside {}", path.display()))?;
                    let mut out = std::io::BufWriter::new(tmp);
                    let n = export_ranked(&store, after, &mut out)?;
                    out.into_inner()
                        .map_err(|e| e.into_error())?
                        .persist(path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    n
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let n = export_ranked(&store, after, &mut out)?;
                    out.flush()?;
                    n
                }
            };
            tracing::info!(records = n, "exported");
            Ok(())
        }
        FeedbackCommand::Stats { store } => {
            super::apply_store_flag(&mut cfg, &store);
            let store = Store::open(&cfg.store)?;
            let s = store.stats()?;
            println!("store        {}", store.path().display());
            println!("completions  {}", s.completions);
            println!("records      {} ({} pairs)", s.records, s.pairs);
            for k in &s.by_kind {
                println!(
                    "  {:<10} {} records, {} pairs",
                    k.kind.as_str(),
                    k.records,
                    k.pairs
                );
            }
            for g in &s.by_generation {
                let name = g
                    .generation
                    .map_or("imported".to_string(), |g| format!("generation {g}"));
                println!("  {:<14} {} records", name, g.records);
            }
            Ok(())
        }
    }
}
