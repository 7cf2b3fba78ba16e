//! The adapter registry: numbered, immutable LoRA generations on disk and in
//! memory, and which one is active.
//!
//! Layout under the registry's folder: `generations/<n>/` holds PEFT's files
//! and `manifest.json` (number, parent, creation time, the weights' sha256,
//! metrics); `ACTIVE` names the active generation (absent or `0`: the base
//! model). A generation is staged in a hidden folder, synced, then renamed
//! into place, and `ACTIVE` is replaced by rename too, so a crash at any point
//! leaves either the old state or the new one; staging leftovers are removed
//! when the registry opens.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::llama::LlamaConfig;
use crate::lora::{AdapterFileError, LoraAdapter, ADAPTER_WEIGHTS};

const MANIFEST: &str = "manifest.json";
const ACTIVE: &str = "ACTIVE";
const STAGING_PREFIX: &str = ".staging-";
/// Test hook (never set in production): a file path; `publish` writes the
/// staged generation's number there and stalls before its rename.
const STALL_HOOK: &str = "ATTUNE_TEST_PUBLISH_STALL";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Adapter(#[from] AdapterFileError),
    #[error("registry {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("there is no generation {0}")]
    Unknown(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One published adapter generation. Never changes once made.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    /// sha256 of the adapter's weights file, hex.
    pub hash: String,
    pub parent: Option<u64>,
    pub created_ms: i64,
    /// What the aligner measured when it made this generation.
    pub metrics: serde_json::Value,
    /// Its own variables, shared with nothing that trains.
    pub adapter: LoraAdapter,
}

impl Generation {
    /// Names the weights serving a response (`system_fingerprint`).
    pub fn fingerprint(&self) -> String {
        format!(
            "attune-g{}-{}",
            self.number,
            &self.hash[..12.min(self.hash.len())]
        )
    }
}

/// The fingerprint of responses served by `generation` (`None`: the base model).
pub fn fingerprint(generation: Option<&Generation>, model_name: &str) -> String {
    match generation {
        Some(g) => g.fingerprint(),
        None => format!("attune-base-{model_name}"),
    }
}

/// One change of the active generation, as reported to the hook of
/// [`Registry::on_activate`] (monitoring).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activation {
    /// The generation active before (0: the base model).
    pub from: u64,
    pub to: u64,
    /// How long the durable write and the swap took.
    pub seconds: f64,
}

/// Called after every activation.
pub type ActivationHook = Arc<dyn Fn(Activation) + Send + Sync>;

struct State {
    generations: BTreeMap<u64, Arc<Generation>>,
    active: Option<Arc<Generation>>,
    /// The next number: above every generation folder on disk, damaged
    /// ones included, so a number is never reused.
    next: u64,
}

/// Generations of one model's adapters. Handlers read the active generation
/// for every request; publishing and activation are rare: a read-write lock
/// held only to clone or swap an `Arc`.
pub struct Registry {
    root: PathBuf,
    /// Generations kept on disk (the active one always is).
    keep: usize,
    base_model: String,
    state: RwLock<State>,
    /// Set once by the server for its metrics; read on each activation.
    hook: RwLock<Option<ActivationHook>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn sha256_file(path: &Path) -> Result<String, RegistryError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl Registry {
    /// Opens (creating) the registry in `root`: loads every complete
    /// generation, removes staging leftovers, and restores the active one.
    pub fn open(
        root: &Path,
        model: &LlamaConfig,
        device: &Device,
        keep: usize,
        base_model: &str,
    ) -> Result<Self, RegistryError> {
        let gens_dir = root.join("generations");
        std::fs::create_dir_all(&gens_dir).map_err(io(&gens_dir))?;
        let mut generations = BTreeMap::new();
        let mut next = 1;
        for entry in std::fs::read_dir(&gens_dir).map_err(io(&gens_dir))? {
            let entry = entry.map_err(io(&gens_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(STAGING_PREFIX) {
                tracing::warn!(path = %path.display(), "removing an unfinished generation");
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
                continue;
            }
            let Ok(number) = name.parse::<u64>() else {
                continue;
            };
            next = next.max(number + 1);
            match Self::read_generation(&path, model, device) {
                Ok(g) => {
                    generations.insert(g.number, Arc::new(g));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "skipping a damaged generation")
                }
            }
        }
        let active_path = root.join(ACTIVE);
        let active = match std::fs::read_to_string(&active_path) {
            Ok(text) => {
                let n: u64 = text.trim().parse().map_err(|_| RegistryError::Invalid {
                    path: active_path.clone(),
                    message: format!("`{}` is not a generation number", text.trim()),
                })?;
                match n {
                    0 => None,
                    n => match generations.get(&n) {
                        Some(g) => Some(g.clone()),
                        None => {
                            tracing::error!(
                                generation = n,
                                "the active generation is missing; serving the base model"
                            );
                            None
                        }
                    },
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&active_path)(e)),
        };
        tracing::info!(
            generations = generations.len(),
            active = active.as_ref().map_or(0, |g: &Arc<Generation>| g.number),
            "adapter registry open"
        );
        Ok(Self {
            root: root.to_path_buf(),
            keep: keep.max(1),
            base_model: base_model.to_string(),
            state: RwLock::new(State {
                generations,
                active,
                next,
            }),
            hook: RwLock::new(None),
        })
    }

    fn read_generation(
        dir: &Path,
        model: &LlamaConfig,
        device: &Device,
    ) -> Result<Generation, RegistryError> {
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
        let invalid = |message: String| RegistryError::Invalid {
            path: manifest_path.clone(),
            message,
        };
        let m: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let number = m["generation"]
            .as_u64()
            .ok_or_else(|| invalid("`generation` is missing".into()))?;
        let hash = m["sha256"]
            .as_str()
            .ok_or_else(|| invalid("`sha256` is missing".into()))?
            .to_string();
        let actual = sha256_file(&dir.join(ADAPTER_WEIGHTS))?;
        if actual != hash {
            return Err(invalid(format!(
                "the weights' sha256 is {actual}, the manifest says {hash}"
            )));
        }
        Ok(Generation {
            number,
            hash,
            parent: m["parent"].as_u64(),
            created_ms: m["created_ms"].as_i64().unwrap_or(0),
            metrics: m["metrics"].clone(),
            adapter: LoraAdapter::load_peft(dir, model, device)?,
        })
    }

    /// The generation new requests are served with (`None`: the base model).
    pub fn active(&self) -> Option<Arc<Generation>> {
        self.state.read().active.clone()
    }

    pub fn get(&self, number: u64) -> Option<Arc<Generation>> {
        self.state.read().generations.get(&number).cloned()
    }

    /// Every kept generation, oldest first.
    pub fn list(&self) -> Vec<Arc<Generation>> {
        self.state.read().generations.values().cloned().collect()
    }

    /// Writes `adapter` as the next generation (atomically, see the module
    /// docs), registers it and, with `activate`, makes it active. The adapter
    /// is copied: later training of `adapter` does not reach the generation.
    pub fn publish(
        &self,
        adapter: &LoraAdapter,
        parent: Option<u64>,
        metrics: serde_json::Value,
        activate: bool,
    ) -> Result<Arc<Generation>, RegistryError> {
        let gens_dir = self.root.join("generations");
        // Publishing is serialized by its caller (the aligner thread); the
        // number is taken here and the folder claimed by the rename below.
        let number = {
            let mut state = self.state.write();
            let n = state.next;
            state.next += 1;
            n
        };
        let staged = gens_dir.join(format!("{STAGING_PREFIX}{number}"));
        if staged.exists() {
            std::fs::remove_dir_all(&staged).map_err(io(&staged))?;
        }
        let created_ms = now_ms();
        let written = self.stage(&staged, adapter, number, parent, created_ms, &metrics);
        let hash = match written {
            Ok(hash) => hash,
            Err(e) => {
                // Nothing half-written stays behind (a crash here is cleaned
                // up by `open`).
                let _ = std::fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        if let Some(marker) = std::env::var_os(STALL_HOOK) {
            // Test hook: announce the staged generation and stop before the
            // rename, so a test can kill the process exactly here.
            let _ = std::fs::write(&marker, number.to_string());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        let dir = gens_dir.join(number.to_string());
        std::fs::rename(&staged, &dir).map_err(io(&dir))?;
        sync_dir(&gens_dir)?;
        let generation = Arc::new(Generation {
            number,
            hash,
            parent,
            created_ms,
            metrics,
            adapter: adapter.snapshot().map_err(|e| RegistryError::Invalid {
                path: dir.clone(),
                message: e.to_string(),
            })?,
        });
        self.state
            .write()
            .generations
            .insert(number, generation.clone());
        if activate {
            self.activate(number)?;
        }
        self.prune();
        Ok(generation)
    }

    /// Writes a generation's files into `staged` and syncs them; answers the
    /// weights' sha256.
    fn stage(
        &self,
        staged: &Path,
        adapter: &LoraAdapter,
        number: u64,
        parent: Option<u64>,
        created_ms: i64,
        metrics: &serde_json::Value,
    ) -> Result<String, RegistryError> {
        std::fs::create_dir_all(staged).map_err(io(staged))?;
        adapter.write_peft_files(staged, &self.base_model)?;
        let hash = sha256_file(&staged.join(ADAPTER_WEIGHTS))?;
        let manifest = serde_json::json!({
            "generation": number,
            "parent": parent,
            "created_ms": created_ms,
            "sha256": hash,
            "base_model": self.base_model,
            "metrics": metrics,
        });
        let manifest_path = staged.join(MANIFEST);
        let mut f = std::fs::File::create(&manifest_path).map_err(io(&manifest_path))?;
        f.write_all(&serde_json::to_vec_pretty(&manifest).expect("json"))
            .and_then(|()| f.sync_all())
            .map_err(io(&manifest_path))?;
        sync_dir(staged)?;
        Ok(hash)
    }

    /// Makes generation `number` (0: the base model) the one new requests get,
    /// durably.
    pub fn activate(&self, number: u64) -> Result<(), RegistryError> {
        let started = std::time::Instant::now();
        let generation = match number {
            0 => None,
            n => Some(self.get(n).ok_or(RegistryError::Unknown(n))?),
        };
        let tmp = self.root.join(format!("{ACTIVE}.tmp"));
        let path = self.root.join(ACTIVE);
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(number.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.root)?;
        let previous = std::mem::replace(&mut self.state.write().active, generation);
        let from = previous.map_or(0, |g| g.number);
        tracing::info!(generation = number, from, "activated");
        if let Some(hook) = self.hook.read().clone() {
            hook(Activation {
                from,
                to: number,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    }

    /// Calls `hook` after every activation from now on (replacing any
    /// earlier hook).
    pub fn on_activate(&self, hook: ActivationHook) {
        *self.hook.write() = Some(hook);
    }

    /// Deletes the oldest generations beyond `keep` (never the active one).
    /// In-flight requests hold their generation's `Arc`, so they finish on it.
    fn prune(&self) {
        let mut state = self.state.write();
        let active = state.active.as_ref().map(|g| g.number);
        while state.generations.len() > self.keep {
            let Some(&oldest) = state.generations.keys().find(|&&n| Some(n) != active) else {
                break;
            };
            state.generations.remove(&oldest);
            let dir = self.root.join("generations").join(oldest.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove an old generation");
            }
        }
    }
}
