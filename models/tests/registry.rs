//! The adapter registry on disk: publish, activate, reopen, prune, and what
//! it does with half-written or damaged generations.

use attune_models::registry::fingerprint;
use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{Checkpoint, Llama, LoraAdapter, LoraConfig, LoraInit, Registry, WeightFormat};
use candle_core::Device;

fn model() -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let mut ckpt = Checkpoint::open(dir.path(), &Device::Cpu).unwrap();
    let m = Llama::load(&mut ckpt, WeightFormat::F32).unwrap();
    (dir, m)
}

fn adapter(m: &Llama, seed: u64) -> LoraAdapter {
    LoraAdapter::new(
        LoraConfig::default(),
        m.config(),
        LoraInit::Random,
        seed,
        &Device::Cpu,
    )
    .unwrap()
}

fn open(root: &std::path::Path, m: &Llama, keep: usize) -> Registry {
    Registry::open(root, m.config(), &Device::Cpu, keep, "tiny").unwrap()
}

fn first_a(a: &LoraAdapter) -> Vec<f32> {
    a.named_vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn published_generations_survive_a_restart_with_the_active_one() {
    let (_d, m) = model();
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path(), &m, 5);
    assert!(reg.active().is_none());
    assert_eq!(
        fingerprint(reg.active().as_deref(), "tiny"),
        "attune-base-tiny"
    );
    let training = adapter(&m, 1);
    let g1 = reg
        .publish(&training, None, serde_json::json!({"accuracy": 0.6}), true)
        .unwrap();
    // Training goes on: the published generation does not follow.
    let before = first_a(&g1.adapter);
    let (_, v) = &training.named_vars()[0];
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert_eq!(first_a(&g1.adapter), before);
    let g2 = reg
        .publish(&adapter(&m, 2), Some(1), serde_json::json!({}), false)
        .unwrap();
    assert_eq!((g1.number, g2.number), (1, 2));
    assert_eq!(reg.active().unwrap().number, 1);
    assert!(g1.fingerprint().starts_with("attune-g1-"));
    drop(reg);

    let reg = open(root.path(), &m, 5);
    assert_eq!(reg.list().len(), 2);
    let active = reg.active().unwrap();
    assert_eq!((active.number, &active.hash), (1, &g1.hash));
    assert_eq!(first_a(&active.adapter), before);
    assert_eq!(active.metrics["accuracy"], 0.6);
    assert_eq!(reg.get(2).unwrap().parent, Some(1));
    reg.activate(2).unwrap();
    reg.activate(0).unwrap();
    assert!(reg.active().is_none());
    assert!(reg.activate(9).is_err());
    drop(reg);
    assert!(open(root.path(), &m, 5).active().is_none());
}

#[test]
fn unfinished_and_damaged_generations_are_never_served() {
    let (_d, m) = model();
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path(), &m, 5);
    reg.publish(&adapter(&m, 1), None, serde_json::json!({}), true)
        .unwrap();
    reg.publish(&adapter(&m, 2), Some(1), serde_json::json!({}), true)
        .unwrap();
    drop(reg);
    let gens = root.path().join("generations");
    // A crash while staging generation 3 leaves a hidden folder.
    std::fs::create_dir_all(gens.join(".staging-3")).unwrap();
    std::fs::write(gens.join(".staging-3/adapter_model.safetensors"), b"half").unwrap();
    // Generation 2's weights are damaged on disk.
    let w = gens.join("2/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&w, bytes).unwrap();
    let reg = open(root.path(), &m, 5);
    assert!(!gens.join(".staging-3").exists());
    assert_eq!(reg.list().iter().map(|g| g.number).collect::<Vec<_>>(), [1]);
    // The active generation (2) is unusable: the base model is served.
    assert!(reg.active().is_none());
    // The next publish does not reuse a damaged number's folder by accident.
    let g = reg
        .publish(&adapter(&m, 3), Some(1), serde_json::json!({}), true)
        .unwrap();
    assert!(g.number >= 2);
}

#[test]
fn only_the_last_generations_are_kept_and_never_the_active_one_is_dropped() {
    let (_d, m) = model();
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path(), &m, 2);
    reg.publish(&adapter(&m, 1), None, serde_json::json!({}), true)
        .unwrap();
    for s in 2..=4 {
        reg.publish(&adapter(&m, s), Some(1), serde_json::json!({}), false)
            .unwrap();
    }
    let kept: Vec<u64> = reg.list().iter().map(|g| g.number).collect();
    assert_eq!(kept, [1, 4]);
    assert!(!root.path().join("generations/2").exists());
}
