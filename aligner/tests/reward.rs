//! Reward models on tiny random LLaMAs: a `LlamaForSequenceClassification`
//! directory loads and scores the last token; Bradley–Terry training learns a
//! preference; the saved directory loads back with the same rewards.

use std::collections::HashMap;
use std::path::Path;

use attune_aligner::reward::{rescore, score, RewardTrainer};
use attune_aligner::train::{Schedule, TrainConfig};
use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{
    LoadOptions, LoadedModel, LoraConfig, PromptResponse, RewardModel, WeightFormat,
};
use candle_core::{Device, Tensor};

fn tiny_dir(dir: &Path) {
    TinyModel::new(TinySpec::default()).write_hf(dir).unwrap();
}

/// Turns the tiny causal LM directory into a sequence classifier.
fn make_classifier(dir: &Path) -> Tensor {
    let path = dir.join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 100.0).collect();
    let head = Tensor::from_vec(w, (1, 64), &Device::Cpu).unwrap();
    tensors.insert("score.weight".into(), head.clone());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
    cfg["num_labels"] = serde_json::json!(1);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    head
}

#[test]
fn a_sequence_classifier_directory_scores_the_last_token_of_each_sequence() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dir(dir.path());
    let head = make_classifier(dir.path());
    let rm = RewardModel::load(dir.path(), &Device::Cpu).unwrap();
    let seqs = vec![vec![3u32, 9, 27, 81], vec![5u32, 25]];
    let batched = rm
        .rewards(&seqs, 512, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let tokens = Tensor::new(s.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = rm.base.model.hidden_train(&tokens, None, false).unwrap();
        let last = h.squeeze(0).unwrap().get(s.len() - 1).unwrap();
        let want: f32 = (last * head.squeeze(0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (batched[i] - want).abs() < 1e-4,
            "sequence {i}: {} vs {want}",
            batched[i]
        );
    }
}

#[test]
fn bradley_terry_training_learns_a_preference_and_the_saved_model_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dir(dir.path());
    let base =
        LoadedModel::load(&LoadOptions::new(dir.path()).with_format(WeightFormat::F32)).unwrap();
    // Responses made of "good" tokens are better than ones made of "bad" tokens.
    let examples: Vec<Vec<PromptResponse>> = (0..8u32)
        .map(|i| {
            let prompt = vec![1 + i, 2 + i, 3];
            vec![
                PromptResponse {
                    prompt: prompt.clone(),
                    response: vec![40 + i % 3, 41, 42],
                },
                PromptResponse {
                    prompt,
                    response: vec![90 + i % 3, 91, 92],
                },
            ]
        })
        .collect();
    let rm = RewardModel::for_training(base, LoraConfig::default(), 7).unwrap();
    let cfg = TrainConfig {
        lr: 1e-2,
        warmup_steps: 0,
        schedule: Schedule::Constant,
        total_steps: 40,
        block_size: 64,
        ..TrainConfig::default()
    };
    let mut trainer = RewardTrainer::new(rm, cfg).unwrap();
    let first = trainer.step(&[&examples]).unwrap().loss;
    let mut last = first;
    for _ in 0..30 {
        last = trainer.step(&[&examples]).unwrap().loss;
    }
    assert!(last < first * 0.5, "loss {first} → {last}");
    let rewards = score(trainer.model(), &examples, 64, 8, |_| {}).unwrap();
    assert!(rewards.iter().all(|r| r[0] > r[1]), "{rewards:?}");

    // Saved with the adapter merged, it loads back with the same rewards.
    let out = tempfile::tempdir().unwrap();
    trainer.model().save_hf(out.path()).unwrap();
    let back = RewardModel::load(out.path(), &Device::Cpu).unwrap();
    let again = score(&back, &examples, 64, 8, |_| {}).unwrap();
    for (a, b) in rewards.iter().flatten().zip(again.iter().flatten()) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }

    // Rescoring puts the higher reward first.
    let swapped = vec![examples[0][1].clone(), examples[0][0].clone()];
    let s = rescore(swapped, &[rewards[0][1], rewards[0][0]]);
    assert_eq!(s.candidates[0], examples[0][0]);
    assert!(s.rewards[0] > s.rewards[1]);
}
