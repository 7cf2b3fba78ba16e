//! Tiny random LLaMA models (GQA and not, tied and untied embeddings) saved as
//! safetensors and as GGUF: every loading path gives the same logits, the KV
//! cache and batching change nothing, and broken inputs give clear errors.

use std::path::Path;

use attune_models::testing::{TinyModel, TinySpec};
use attune_models::{
    Checkpoint, Llama, LoadError, LoadOptions, LoadedModel, LogitsFor, SamplingParams,
    StopConditions, WeightFormat,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

fn load(path: &Path, format: WeightFormat) -> Llama {
    let mut ck = Checkpoint::open(path, &Device::Cpu).unwrap();
    Llama::load(&mut ck, format).unwrap()
}

fn all_logits(m: &Llama, ids: &[u32]) -> Tensor {
    let mut cache = m.new_cache();
    m.forward(&[ids], &mut [&mut cache], LogitsFor::All)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const IDS: [u32; 9] = [5, 77, 200, 31, 259, 12, 12, 99, 3];

fn specs() -> Vec<TinySpec> {
    let mut v = Vec::new();
    for (kv_heads, tied) in [(2, true), (2, false), (4, true), (4, false)] {
        v.push(TinySpec {
            kv_heads,
            tied,
            seed: kv_heads as u64 * 10 + tied as u64,
            ..TinySpec::default()
        });
    }
    v
}

#[test]
fn safetensors_and_gguf_give_identical_logits_for_gqa_and_tied_variants() {
    for spec in specs() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = TinyModel::new(spec);
        tiny.write_hf(&dir.path().join("hf")).unwrap();
        tiny.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
            .unwrap();
        let hf = all_logits(&load(&dir.path().join("hf"), WeightFormat::F32), &IDS);
        for format in [WeightFormat::F32, WeightFormat::Quantized] {
            let gg = all_logits(&load(&dir.path().join("m.gguf"), format), &IDS);
            let d = max_abs_diff(&hf, &gg);
            assert!(d < 1e-4, "{spec:?} {format:?}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn q8_0_gguf_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec {
        hidden: 64,
        intermediate: 128,
        ..TinySpec::default()
    });
    tiny.write_hf(&dir.path().join("hf")).unwrap();
    tiny.write_gguf(&dir.path().join("q.gguf"), GgmlDType::Q8_0)
        .unwrap();
    let f = all_logits(&load(&dir.path().join("hf"), WeightFormat::F32), &IDS);
    // The VNNI layout quantizes activations per 256 values, hence its looser bound.
    for (format, bound) in [
        (WeightFormat::Quantized, 0.1),
        (WeightFormat::QuantizedVnni, 0.25),
    ] {
        let q = all_logits(&load(&dir.path().join("q.gguf"), format), &IDS);
        let d = max_abs_diff(&f, &q);
        assert!(d > 0.0 && d < bound, "{format:?}: max |Δlogit| = {d}");
    }
}

#[test]
fn decoding_with_the_kv_cache_equals_the_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let m = load(dir.path(), WeightFormat::F32);
    let full = all_logits(&m, &IDS);
    let mut cache = m.new_cache();
    m.forward_one(&IDS[..4], &mut cache).unwrap();
    for (i, &t) in IDS.iter().enumerate().skip(4) {
        let step = m.forward_one(&[t], &mut cache).unwrap();
        let d = max_abs_diff(&step, &full.get(i).unwrap());
        assert!(d < 1e-4, "position {i}: {d}");
    }
    assert_eq!(cache.len(), IDS.len());
}

#[test]
fn batched_step_equals_one_sequence_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let loaded =
        LoadedModel::load(&LoadOptions::new(dir.path()).with_format(WeightFormat::F32)).unwrap();
    let prompts: Vec<Vec<u32>> = vec![IDS[..3].to_vec(), IDS.to_vec(), vec![42]];
    let request = |p: &Vec<u32>, n: usize| {
        (
            p.clone(),
            SamplingParams::greedy(),
            StopConditions {
                max_tokens: n,
                stop: vec![],
                eos_ids: vec![],
                context: 256,
            },
        )
    };
    // different budgets, so sequences leave the batch at different steps
    let batch: Vec<_> = prompts
        .iter()
        .zip([12, 5, 9])
        .map(|(p, n)| request(p, n))
        .collect();
    let together =
        attune_models::generate_batch(&loaded.model, &loaded.tokenizer, batch.clone(), |_, _| {})
            .unwrap();
    for (req, got) in batch.into_iter().zip(together) {
        let alone =
            attune_models::generate_batch(&loaded.model, &loaded.tokenizer, vec![req], |_, _| {})
                .unwrap();
        assert_eq!(alone[0].tokens, got.tokens);
    }
}

#[test]
fn tokenizer_json_and_gguf_tokenizer_agree_and_templates_render() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default());
    tiny.write_hf(&dir.path().join("hf")).unwrap();
    tiny.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
        .unwrap();
    let a = LoadedModel::load(&LoadOptions::new(dir.path().join("hf"))).unwrap();
    let b = LoadedModel::load(&LoadOptions::new(dir.path().join("m.gguf"))).unwrap();
    let msgs = [attune_models::ChatMessage::new("user", "the 42 thethe")];
    let text = a.template.render(&msgs, true).unwrap();
    assert_eq!(text, b.template.render(&msgs, true).unwrap());
    let ids = a.tokenizer.encode(&text).unwrap();
    assert_eq!(ids, b.tokenizer.encode(&text).unwrap());
    assert_eq!(ids[0], 260, "<|im_start|> is one special token");
    assert!(ids.contains(&261));
    assert_eq!(a.tokenizer.decode(&ids, false).unwrap(), text);
    assert_eq!(a.tokenizer.eos_ids, vec![261]);
    assert_eq!(b.tokenizer.eos_ids, vec![261]);
}

fn err_of(path: &Path) -> String {
    match LoadedModel::load(&LoadOptions::new(path)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_truncated_and_garbage_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let e = err_of(&missing);
    assert!(
        e.contains("nope.gguf") && e.contains("does not exist"),
        "{e}"
    );

    let good = dir.path().join("m.gguf");
    TinyModel::new(TinySpec::default())
        .write_gguf(&good, GgmlDType::Q8_0)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() - 100, bytes.len() / 2, 40] {
        let t = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        let e = err_of(&t);
        assert!(e.contains(&format!("cut{cut}.gguf")), "{e}");
        assert!(
            e.contains("truncated") || e.contains("not a readable GGUF"),
            "cut at {cut}: {e}"
        );
    }
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all").unwrap();
    let e = err_of(&junk);
    assert!(
        e.contains("junk.gguf") && (e.contains("GGUF") || e.contains("truncated")),
        "{e}"
    );

    let hf = dir.path().join("hf");
    TinyModel::new(TinySpec::default()).write_hf(&hf).unwrap();
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = err_of(&hf);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_architecture_and_quant_type_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    TinyModel::new(TinySpec::default()).write_hf(&hf).unwrap();
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    let e = err_of(&hf);
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("config.json"),
        "{e}"
    );

    // A GGUF whose architecture is not llama.
    let g = dir.path().join("m.gguf");
    TinyModel::new(TinySpec::default())
        .write_gguf(&g, GgmlDType::F32)
        .unwrap();
    let mut bytes = std::fs::read(&g).unwrap();
    let pos = bytes.windows(5).position(|w| w == b"llama").unwrap();
    bytes[pos..pos + 5].copy_from_slice(b"mamba");
    let g2 = dir.path().join("mamba.gguf");
    std::fs::write(&g2, bytes).unwrap();
    let e = err_of(&g2);
    assert!(
        e.contains("mamba.gguf") && e.contains("unsupported architecture `mamba`"),
        "{e}"
    );

    // A quantization type attune does not serve.
    let q = dir.path().join("q81.gguf");
    TinyModel::new(TinySpec::default())
        .write_gguf(&q, GgmlDType::Q8_1)
        .unwrap();
    let e = err_of(&q);
    assert!(e.contains("q81.gguf") && e.contains("Q8_1"), "{e}");
}

#[test]
fn tokenizer_that_does_not_fit_the_vocabulary_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    TinyModel::new(TinySpec::default()).write_hf(&hf).unwrap();
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["vocab_size"] = serde_json::json!(100);
    std::fs::write(hf.join("config.json"), json.to_string()).unwrap();
    // The embedding no longer matches config either; shrink it so only the
    // tokenizer is wrong.
    let st = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
    let st: std::collections::HashMap<String, Tensor> = st
        .into_iter()
        .map(|(k, v)| {
            let v = if k.contains("embed_tokens") || k.contains("lm_head") {
                v.narrow(0, 0, 100).unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&st, hf.join("model.safetensors")).unwrap();
    let e = LoadedModel::load(&LoadOptions::new(&hf)).unwrap_err();
    assert!(matches!(e, LoadError::Tokenizer { .. }), "{e}");
    assert!(
        e.to_string().contains("tokenizer.json") || e.to_string().contains("hf"),
        "{e}"
    );
    assert!(e.to_string().contains("vocabulary of 100"), "{e}");
}

#[test]
fn cpu_attention_kernel_equals_the_tensor_path_for_prefill_decode_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let kernel = load(dir.path(), WeightFormat::F32);
    let mut tensor = load(dir.path(), WeightFormat::F32);
    tensor.set_tensor_attention(true);
    let run = |m: &Llama| {
        let mut a = m.new_cache();
        let mut b = m.new_cache();
        // prefill two sequences of different lengths together, then decode both
        let first = m
            .forward(
                &[&IDS[..5], &IDS[..2]],
                &mut [&mut a, &mut b],
                LogitsFor::All,
            )
            .unwrap();
        let step = m
            .forward(&[&[7], &[9]], &mut [&mut a, &mut b], LogitsFor::Last)
            .unwrap();
        (first, step)
    };
    let (k1, k2) = run(&kernel);
    let (t1, t2) = run(&tensor);
    assert!(max_abs_diff(&k1, &t1) < 1e-4);
    assert!(max_abs_diff(&k2, &t2) < 1e-4);
}

#[test]
fn sharded_half_precision_safetensors_load_like_the_single_f32_file() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default());
    let single = dir.path().join("single");
    tiny.write_hf(&single).unwrap();
    let reference = all_logits(&load(&single, WeightFormat::F32), &IDS);
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        // Two shards plus the index, as LLaMA-7B checkpoints come.
        let sharded = dir.path().join(format!("sharded-{dtype:?}"));
        std::fs::create_dir_all(&sharded).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(single.join(f), sharded.join(f)).unwrap();
        }
        let mut shards: [std::collections::HashMap<String, Tensor>; 2] = Default::default();
        let mut weight_map = serde_json::Map::new();
        for (i, (name, t)) in tiny.tensors.iter().enumerate() {
            let shard = i % 2;
            shards[shard].insert(name.clone(), t.to_dtype(dtype).unwrap());
            let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
            weight_map.insert(name.clone(), serde_json::Value::String(file));
        }
        for (i, shard) in shards.iter().enumerate() {
            let file = sharded.join(format!("model-0000{}-of-00002.safetensors", i + 1));
            candle_core::safetensors::save(shard, file).unwrap();
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            sharded.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let got = all_logits(&load(&sharded, WeightFormat::F32), &IDS);
        let d = max_abs_diff(&reference, &got);
        assert!(d < 0.1, "{dtype:?}: max |Δlogit| = {d}");
        LoadedModel::load(&LoadOptions::new(&sharded)).unwrap();
    }
}
