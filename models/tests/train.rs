//! The differentiable training forward on tiny random models: it agrees with
//! the serving forward, padding does not change a row's score, every LoRA
//! variable gets a gradient and no frozen weight does, and the gradients match
//! finite differences.

use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{
    Checkpoint, KvCache, Llama, LogitsFor, LoraAdapter, LoraConfig, LoraInit, LoraTarget,
    PromptResponse, ResponseBatch, WeightFormat,
};
use candle_core::{Device, Tensor};

fn tiny(spec: TinySpec) -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(spec).write_hf(dir.path()).unwrap();
    let mut ckpt = Checkpoint::open(dir.path(), &Device::Cpu).unwrap();
    let model = Llama::load(&mut ckpt, WeightFormat::F32).unwrap();
    (dir, model)
}

fn all_targets() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTarget::ALL.to_vec(),
    }
}

/// A LoRA adapter on every projection, with random A and B.
fn random_lora(model: &Llama, seed: u64) -> LoraAdapter {
    LoraAdapter::new(
        all_targets(),
        model.config(),
        LoraInit::Random,
        seed,
        &Device::Cpu,
    )
    .unwrap()
}

fn pairs() -> Vec<PromptResponse> {
    vec![
        PromptResponse {
            prompt: vec![1, 5, 9, 13],
            response: vec![20, 21, 22],
        },
        PromptResponse {
            prompt: vec![2, 3],
            response: vec![30, 31, 32, 33, 34],
        },
        PromptResponse {
            prompt: vec![7],
            response: vec![40],
        },
    ]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn training_forward_matches_the_serving_forward() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            tied: false,
            kv_heads: 4,
            ..TinySpec::default()
        },
    ] {
        let (_dir, model) = tiny(spec);
        let tokens: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
        let mut cache: KvCache = model.new_cache();
        let serving = model
            .forward(&[&tokens], &mut [&mut cache], LogitsFor::All)
            .unwrap();
        let t = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let training = model
            .forward_train(&t, None, false)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_abs_diff(&serving, &training);
        assert!(d < 1e-4, "largest logit difference {d}");
    }
}

#[test]
fn a_rows_score_does_not_depend_on_the_batch_it_is_in() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 3);
    let all = model
        .response_logprobs(&ResponseBatch::new(&pairs(), 64), Some(&lora), false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, p) in pairs().into_iter().enumerate() {
        let one = model
            .response_logprobs(&ResponseBatch::new(&[p], 64), Some(&lora), false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (one[0] - all[i]).abs() < 1e-4,
            "row {i}: {} alone, {} batched",
            one[0],
            all[i]
        );
        assert!(all[i] < 0.0);
    }
}

#[test]
fn a_frozen_adapter_scores_the_same_and_builds_no_graph() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 3);
    let batch = ResponseBatch::new(&pairs(), 64);
    let tracked = model.response_logprobs(&batch, Some(&lora), false).unwrap();
    let frozen = model
        .response_logprobs(&batch, Some(&lora.frozen()), false)
        .unwrap();
    assert!(max_abs_diff(&tracked, &frozen) < 1e-6);
    // The tracked score reaches the adapter's variables; the frozen one does
    // not (no graph through it: nothing kept alive for a backward pass).
    let reaches = |t: &Tensor| {
        let grads = t.sum_all().unwrap().backward().unwrap();
        lora.vars()
            .iter()
            .any(|v| grads.get(v.as_tensor()).is_some())
    };
    assert!(reaches(&tracked));
    assert!(!reaches(&frozen));
}

#[test]
fn every_lora_variable_gets_a_gradient_and_no_frozen_weight_does() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 3);
    let sums = model
        .response_logprobs(&ResponseBatch::new(&pairs(), 64), Some(&lora), true)
        .unwrap();
    let grads = sums.sum_all().unwrap().backward().unwrap();
    let named = lora.named_vars();
    assert_eq!(named.len(), 2 * 7 * 2);
    for (name, var) in &named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
    let frozen = model.frozen_tensors();
    assert!(frozen.len() > 10);
    for t in &frozen {
        assert!(
            grads.get(t).is_none(),
            "a frozen tensor of shape {:?} got a gradient",
            t.shape()
        );
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 5);
    let batch = ResponseBatch::new(&pairs(), 64);
    let f = || -> f64 {
        let s = model.response_logprobs(&batch, Some(&lora), false).unwrap();
        s.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let grads = model
        .response_logprobs(&batch, Some(&lora), false)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let named = lora.named_vars();
    // A and B of a few projections in both layers, a few elements each.
    for (name, var) in named.iter().step_by(3) {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let flat = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [0, flat.len() / 2, flat.len() - 1] {
            let eps = 1e-2f32;
            let eval = |delta: f32| {
                let mut v = flat.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, original.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                f()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            var.set(&original).unwrap();
            let analytic = g[idx] as f64;
            let tol = 2e-2 * numeric.abs().max(analytic.abs()).max(1e-1);
            assert!(
                (numeric - analytic).abs() < tol,
                "{name}[{idx}]: finite difference {numeric}, backprop {analytic}"
            );
        }
    }
}

#[test]
fn a_saved_peft_adapter_loads_back_identical_and_replaces_the_old_one() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 9);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("adapter");
    // An older adapter is replaced whole.
    LoraAdapter::new(
        LoraConfig::default(),
        model.config(),
        LoraInit::Random,
        1,
        &Device::Cpu,
    )
    .unwrap()
    .save_peft(&dir, "tiny")
    .unwrap();
    lora.save_peft(&dir, "tiny").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    let back = LoraAdapter::load_peft(&dir, model.config(), &Device::Cpu).unwrap();
    for ((n1, v1), (n2, v2)) in lora.named_vars().iter().zip(back.named_vars()) {
        assert_eq!(n1, &n2);
        assert_eq!(max_abs_diff(v1.as_tensor(), v2.as_tensor()), 0.0, "{n1}");
    }
    assert!(
        n_entries(out.path()) == 1,
        "no staging folders are left behind"
    );
    // A snapshot does not follow later changes to the original.
    let snap = lora.snapshot().unwrap();
    let (_, v) = &lora.named_vars()[0];
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert!(max_abs_diff(snap.named_vars()[0].1.as_tensor(), v.as_tensor()) > 0.0);
}

fn n_entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn a_broken_adapter_directory_gets_an_error_naming_the_file() {
    let (_dir, model) = tiny(TinySpec::default());
    let out = tempfile::tempdir().unwrap();
    let e = LoraAdapter::load_peft(out.path(), model.config(), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    // Shapes from another model.
    let other = tiny(TinySpec {
        hidden: 32,
        intermediate: 64,
        ..TinySpec::default()
    })
    .1;
    let dir = out.path().join("a");
    LoraAdapter::new(
        LoraConfig::default(),
        other.config(),
        LoraInit::Random,
        1,
        &Device::Cpu,
    )
    .unwrap()
    .save_peft(&dir, "other")
    .unwrap();
    let e = LoraAdapter::load_peft(&dir, model.config(), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
}

#[test]
fn the_serving_forward_applies_adapters_unmerged_per_sequence() {
    let (_dir, model) = tiny(TinySpec::default());
    let lora = random_lora(&model, 11);
    let a: Vec<u32> = vec![3, 14, 15, 92, 65];
    let b: Vec<u32> = vec![35, 89, 79];
    // With the adapter, the serving path equals the training path.
    let mut cache = model.new_cache();
    let serving = model
        .forward_adapted(&[&a], &mut [&mut cache], &[Some(&lora)], LogitsFor::All)
        .unwrap();
    let t = Tensor::new(a.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let training = model
        .forward_train(&t, Some(&lora), false)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_abs_diff(&serving, &training) < 1e-4);
    // A batch mixing an adapted and a base sequence gives each its own logits,
    // in prefill and in a decode step.
    let alone = |toks: &[u32], adapter: Option<&LoraAdapter>| {
        let mut c = model.new_cache();
        let first = model
            .forward_adapted(&[toks], &mut [&mut c], &[adapter], LogitsFor::Last)
            .unwrap();
        let next = model
            .forward_adapted(&[&[7]], &mut [&mut c], &[adapter], LogitsFor::Last)
            .unwrap();
        (first, next)
    };
    let (a1, a2) = alone(&a, Some(&lora));
    let (b1, b2) = alone(&b, None);
    let (mut ca, mut cb) = (model.new_cache(), model.new_cache());
    let first = model
        .forward_adapted(
            &[&a, &b],
            &mut [&mut ca, &mut cb],
            &[Some(&lora), None],
            LogitsFor::Last,
        )
        .unwrap();
    let next = model
        .forward_adapted(
            &[&[7], &[7]],
            &mut [&mut ca, &mut cb],
            &[Some(&lora), None],
            LogitsFor::Last,
        )
        .unwrap();
    assert!(max_abs_diff(&first.get(0).unwrap(), &a1.squeeze(0).unwrap()) < 1e-4);
    assert!(max_abs_diff(&first.get(1).unwrap(), &b1.squeeze(0).unwrap()) < 1e-4);
    assert!(max_abs_diff(&next.get(0).unwrap(), &a2.squeeze(0).unwrap()) < 1e-4);
    assert!(max_abs_diff(&next.get(1).unwrap(), &b2.squeeze(0).unwrap()) < 1e-4);
    // And the adapter changes the output.
    assert!(max_abs_diff(&a1, &alone(&a, None).0) > 1e-3);
}

#[test]
fn a_model_written_with_the_adapter_merged_equals_the_adapter_applied_unmerged() {
    let (dir, model) = tiny(TinySpec {
        tied: false,
        ..TinySpec::default()
    });
    let lora = random_lora(&model, 13);
    let loaded = attune_models::LoadedModel::load(
        &attune_models::LoadOptions::new(dir.path()).with_format(WeightFormat::F32),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let tensors = model.hf_tensors(Some(&lora)).unwrap().into_iter().collect();
    loaded.write_hf(out.path(), &tensors, &[]).unwrap();
    let merged = attune_models::LoadedModel::load(
        &attune_models::LoadOptions::new(out.path()).with_format(WeightFormat::F32),
    )
    .unwrap();
    let toks: Vec<u32> = vec![3, 14, 15, 92, 65];
    let mut c1 = model.new_cache();
    let unmerged = model
        .forward_adapted(&[&toks], &mut [&mut c1], &[Some(&lora)], LogitsFor::All)
        .unwrap();
    let mut c2 = merged.model.new_cache();
    let merged_logits = merged
        .model
        .forward(&[&toks], &mut [&mut c2], LogitsFor::All)
        .unwrap();
    assert!(max_abs_diff(&unmerged, &merged_logits) < 1e-4);
}
