//! Golden checks of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against
//! values computed independently with PyTorch/transformers (`shared/reference`).

mod common;

use std::sync::OnceLock;

use attune_models::sampling::log_softmax;
use attune_models::{LoadOptions, LoadedModel, LogitsFor, WeightFormat};
use candle_core::D;

fn f32_model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(&LoadOptions::new(common::default_model()).with_format(WeightFormat::F32))
            .unwrap()
    })
}

fn q8_model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load(&LoadOptions::new(common::default_model())).unwrap())
}

fn vnni_model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(
            &LoadOptions::new(common::default_model()).with_format(WeightFormat::QuantizedVnni),
        )
        .unwrap()
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn last_logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.model.new_cache();
    m.model
        .forward_one(ids, &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tokenizer_ids_equal_the_reference_exactly() {
    let r = common::reference();
    let tok = &q8_model().tokenizer;
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
        // and decoding gives the text back
        assert_eq!(tok.decode(&ids(&case["ids"]), false).unwrap(), text);
    }
}

#[test]
fn f32_logits_match_the_reference_within_1e_3() {
    let r = common::reference();
    let m = f32_model();
    for case in r["logits"].as_array().unwrap() {
        let input = ids(&case["ids"]);
        assert_eq!(
            m.tokenizer.encode(case["text"].as_str().unwrap()).unwrap(),
            input
        );
        let logits = last_logits(m, &input);
        let lse = {
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            max + logits
                .iter()
                .map(|l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln() as f32
        };
        let want_lse = case["logsumexp"].as_f64().unwrap() as f32;
        assert!(
            (lse - want_lse).abs() < 1e-3,
            "logsumexp {lse} vs {want_lse}"
        );
        let pairs = case["top10"]
            .as_array()
            .unwrap()
            .iter()
            .chain(case["at_ids"].as_array().unwrap());
        for p in pairs {
            let id = p[0].as_u64().unwrap() as usize;
            let want = p[1].as_f64().unwrap() as f32;
            assert!(
                (logits[id] - want).abs() < 1e-3,
                "{:?}: logit of {id} is {}, reference {want}",
                case["text"],
                logits[id]
            );
        }
        let top: Vec<u32> = attune_models::sampling::top_k_of(&logits, 10)
            .iter()
            .map(|p| p.0)
            .collect();
        let want_top: Vec<u32> = case["top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(top[0], want_top[0]);
    }
}

#[test]
fn f32_suffix_logprobs_match_the_reference_within_1e_3() {
    let r = common::reference();
    let m = f32_model();
    for case in r["suffix_logprobs"].as_array().unwrap() {
        let prefix = ids(&case["prefix_ids"]);
        let suffix = ids(&case["suffix_ids"]);
        assert_eq!(
            m.tokenizer
                .encode(case["prefix"].as_str().unwrap())
                .unwrap(),
            prefix
        );
        assert_eq!(
            m.tokenizer
                .encode(case["suffix"].as_str().unwrap())
                .unwrap(),
            suffix
        );
        let got = m.model.continuation_logprobs(&prefix, &suffix).unwrap();
        for (i, (g, w)) in got
            .iter()
            .zip(case["token_logprobs"].as_array().unwrap())
            .enumerate()
        {
            let w = w.as_f64().unwrap() as f32;
            assert!(
                (g - w).abs() < 1e-3,
                "suffix token {i}: {g} vs reference {w}"
            );
        }
        let sum: f32 = got.iter().sum();
        assert!((sum as f64 - case["sum"].as_f64().unwrap()).abs() < 1e-3 * got.len() as f64);
    }
}

/// KL(p ‖ q) of two rows of logits, over the whole vocabulary.
fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| (a as f64).exp() * (a - b) as f64)
        .sum()
}

/// A quantized path against the reference: the same greedy token and KL below
/// `bound` at every fixture position. The full reference distribution is the f32
/// path, which the tests above pin to the reference.
fn check_argmax_and_kl(q: &LoadedModel, bound: f64) {
    let r = common::reference();
    let f = f32_model();
    // (input, the positions the reference fixes): last position of each logits
    // text, every position predicting a suffix token.
    let mut inputs: Vec<(Vec<u32>, std::ops::Range<usize>)> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let i = ids(&c["ids"]);
            let n = i.len();
            (i, n - 1..n)
        })
        .collect();
    for case in r["suffix_logprobs"].as_array().unwrap() {
        let mut all = ids(&case["prefix_ids"]);
        let p = all.len();
        all.extend(ids(&case["suffix_ids"]));
        let n = all.len();
        inputs.push((all, p - 1..n - 1));
    }
    let mut worst = 0f64;
    for (input, positions) in inputs {
        let mut cf = f.model.new_cache();
        let mut cq = q.model.new_cache();
        let lf = f
            .model
            .forward(&[&input], &mut [&mut cf], LogitsFor::All)
            .unwrap();
        let lq = q
            .model
            .forward(&[&input], &mut [&mut cq], LogitsFor::All)
            .unwrap();
        let (rf, rq): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (lf.to_vec2().unwrap(), lq.to_vec2().unwrap());
        let last = input.len() - 1;
        assert_eq!(
            lf.get(last)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
            lq.get(last)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
            "greedy token differs for {input:?}"
        );
        for pos in positions {
            let d = kl(&rf[pos], &rq[pos]);
            worst = worst.max(d);
            assert!(
                d < bound,
                "KL(reference ‖ q8) = {d} at position {pos} of {input:?}"
            );
        }
    }
    eprintln!("largest KL(reference ‖ q8) at the fixture positions: {worst:.5}");
}

/// The serving path (Q4_1 requantized to Q8_0): KL < 0.02.
#[test]
fn quantized_serving_path_keeps_argmax_and_small_kl() {
    check_argmax_and_kl(q8_model(), 0.02);
}

/// The opt-in VNNI layout quantizes activations per 256 values (candle's
/// repacked kernels), which costs accuracy: measured here, largest KL 0.031 at
/// the fixture positions (0.009 for the default layout). The bound guards
/// against a broken layout (which gives KL far above 1), not against that cost.
#[test]
fn vnni_padded_path_keeps_argmax_and_kl_under_0_15() {
    check_argmax_and_kl(vnni_model(), 0.15);
}

/// The serving path's batched step (prompts of different lengths prefilled
/// together, decoded together, leaving at different steps) gives the same greedy
/// text as running each prompt alone.
#[test]
fn default_model_batched_greedy_equals_one_at_a_time() {
    use attune_models::{ChatMessage, SamplingParams, StopConditions};
    let m = q8_model();
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "Write a haiku about the sea in English, please.",
    ];
    let requests: Vec<_> = questions
        .iter()
        .zip([24, 16, 20])
        .map(|(q, n)| {
            let text = m
                .template
                .render(&[ChatMessage::new("user", *q)], true)
                .unwrap();
            (
                m.tokenizer.encode(&text).unwrap(),
                SamplingParams::greedy(),
                StopConditions {
                    max_tokens: n,
                    stop: vec![],
                    eos_ids: m.tokenizer.eos_ids.clone(),
                    context: m.model.max_context(),
                },
            )
        })
        .collect();
    let together =
        attune_models::generate_batch(&m.model, &m.tokenizer, requests.clone(), |_, _| {}).unwrap();
    for (req, got) in requests.into_iter().zip(together) {
        let alone = attune_models::generate(&m.model, &m.tokenizer, req.0, req.1, req.2, |_, _| {})
            .unwrap();
        assert_eq!(alone.text, got.text);
        assert_eq!(alone.tokens, got.tokens);
    }
}
