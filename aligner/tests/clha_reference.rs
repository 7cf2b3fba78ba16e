//! CLHA on the real default model against `../shared/reference/smollm2.json`
//! (PyTorch, float32): per-candidate log-prob sums and means within 1e-3, the
//! ranking, SFT and total losses within 1e-4 relative.

use attune_aligner::loss::{clha_loss, ClhaParams, Group, Scores};
use attune_models::testing::{default_model, reference};
use attune_models::{LoadOptions, LoadedModel, PromptResponse, ResponseBatch, WeightFormat};

#[test]
fn clha_scores_and_losses_match_the_pytorch_reference() {
    let model =
        LoadedModel::load(&LoadOptions::new(default_model()).with_format(WeightFormat::F32))
            .unwrap();
    let r = reference();
    let clha = &r["clha"];
    let mut pairs = Vec::new();
    let mut groups = Vec::new();
    let mut want = Vec::new();
    for ex in clha["examples"].as_array().unwrap() {
        let prompt = model
            .tokenizer
            .encode(ex["prompt"].as_str().unwrap())
            .unwrap();
        let start = pairs.len();
        let mut rewards = Vec::new();
        for c in ex["candidates"].as_array().unwrap() {
            let response = model
                .tokenizer
                .encode(c["response"].as_str().unwrap())
                .unwrap();
            assert_eq!(response.len() as u64, c["n_tokens"].as_u64().unwrap());
            pairs.push(PromptResponse {
                prompt: prompt.clone(),
                response,
            });
            rewards.push(c["reward"].as_f64().unwrap());
            want.push((
                c["sum_logprob"].as_f64().unwrap(),
                c["mean_logprob"].as_f64().unwrap(),
            ));
        }
        groups.push(Group { start, rewards });
    }
    let batch = ResponseBatch::new(&pairs, 512);
    assert!(batch.kept.iter().all(Option::is_some));
    let sums = model.model.response_logprobs(&batch, None, false).unwrap();
    let scores = Scores {
        sums,
        lens: batch.response_lens(),
    };
    let got_sums = scores.sums.to_vec1::<f32>().unwrap();
    let got_means = scores.means().unwrap().to_vec1::<f32>().unwrap();
    let worst = want
        .iter()
        .zip(&got_sums)
        .map(|((s, _), g)| (*g as f64 - s).abs())
        .fold(0.0, f64::max);
    eprintln!("largest difference of a candidate's log-prob sum: {worst:.2e}");
    for (i, (s, m)) in want.iter().enumerate() {
        assert!(
            (got_sums[i] as f64 - s).abs() < 1e-3,
            "candidate {i}: sum {} vs {s}",
            got_sums[i]
        );
        assert!(
            (got_means[i] as f64 - m).abs() < 1e-3,
            "candidate {i}: mean {} vs {m}",
            got_means[i]
        );
    }
    let loss = clha_loss(&scores, &groups, &ClhaParams::default()).unwrap();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    let total = loss.total.to_scalar::<f32>().unwrap() as f64;
    for (name, got, want) in [
        (
            "ranking",
            loss.ranking,
            clha["ranking_loss"].as_f64().unwrap(),
        ),
        ("sft", loss.sft, clha["sft_loss"].as_f64().unwrap()),
        ("total", total, clha["total"].as_f64().unwrap()),
    ] {
        assert!(rel(got, want) < 1e-4, "{name} loss {got} vs {want}");
    }
}
