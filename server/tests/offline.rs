//! The offline jobs as a user runs them, on a tiny model: `train-rm`, `score`,
//! `align` (with rescoring and held-out evaluation), `eval` with the adapter,
//! and clear errors for bad flags.

#[path = "common/child.rs"]
mod child;

use std::path::Path;
use std::process::{Command, Output};

fn attune(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attune"))
        .args(args)
        .args(["--threads", "1", "--model"])
        .arg(child::tiny_model(dir))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn write_data(path: &Path) {
    let mut lines = String::new();
    for i in 0..8 {
        lines.push_str(
            &serde_json::json!({
                "prompt": [{"role": "user", "content": format!("question {i}?")}],
                "responses": [format!("a good answer {i}"), format!("bad {i}"), "meh".to_string()],
                "ranking": [0, 2, 1],
            })
            .to_string(),
        );
        lines.push('\n');
    }
    // HH-RLHF lines mix in; one is malformed and reported.
    lines.push_str(&serde_json::json!({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}).to_string());
    lines.push('\n');
    lines.push_str("{\"chosen\": 1}\n");
    std::fs::write(path, lines).unwrap();
}

#[test]
fn train_rm_score_align_and_eval_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    write_data(&data);
    let d = data.to_str().unwrap();
    let rm = dir.path().join("rm");
    let out = ok(&attune(
        &[
            "train-rm",
            "--data",
            d,
            "--out",
            rm.to_str().unwrap(),
            "--steps",
            "3",
            "--batch",
            "2",
            "--block-size",
            "64",
            "--eval-data",
            d,
            "--eval-every",
            "3",
        ],
        dir.path(),
    ));
    assert!(out.contains("held-out reward accuracy"), "{out}");
    assert!(rm.join("model.safetensors").exists() && rm.join("config.json").exists());

    let out = attune(
        &[
            "score",
            "--reward-model",
            rm.to_str().unwrap(),
            "--data",
            d,
            "--block-size",
            "64",
        ],
        dir.path(),
    );
    let text = ok(&out);
    assert_eq!(text.lines().count(), 9, "{text}");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["rewards"].as_array().unwrap().len(), 3);

    let adapter = dir.path().join("adapter");
    let out = ok(&attune(
        &[
            "align",
            "--data",
            d,
            "--out",
            adapter.to_str().unwrap(),
            "--steps",
            "3",
            "--batch",
            "2",
            "--block-size",
            "64",
            "--reward-model",
            rm.to_str().unwrap(),
            "--eval-data",
            d,
            "--eval-every",
            "2",
            "--eval-block-size",
            "64",
        ],
        dir.path(),
    ));
    assert!(
        out.contains("before training: preference accuracy"),
        "{out}"
    );
    assert!(out.contains("step 3: preference accuracy"), "{out}");
    assert!(adapter.join("final/adapter_model.safetensors").exists());
    assert!(adapter.join("final/adapter_config.json").exists());
    assert_eq!(
        std::fs::read_to_string(adapter.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    let per_pair = dir.path().join("pairs.jsonl");
    let out = ok(&attune(
        &[
            "eval",
            "--data",
            d,
            "--adapter",
            adapter.join("final").to_str().unwrap(),
            "--block-size",
            "64",
            "--per-pair",
            per_pair.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(out.contains("with adapter: preference accuracy"), "{out}");
    let out = ok(&attune(
        &[
            "eval",
            "--data",
            d,
            "--limit",
            "3",
            "--adapter",
            adapter.join("final").to_str().unwrap(),
            "--block-size",
            "64",
            "--reward-model",
            rm.to_str().unwrap(),
            "--max-new-tokens",
            "4",
        ],
        dir.path(),
    ));
    assert!(
        out.contains("greedy generations on 3 prompts: mean reward"),
        "{out}"
    );
    // 8 ranked lines of 3 responses (3 pairs each) and one HH pair.
    let pairs = std::fs::read_to_string(&per_pair).unwrap();
    assert_eq!(pairs.lines().count(), 8 * 3 + 1);
    let p: serde_json::Value = serde_json::from_str(pairs.lines().next().unwrap()).unwrap();
    assert!(
        p["chosen"]["sum"].as_f64().unwrap() < 0.0 && p["rejected"]["tokens"].as_u64().unwrap() > 0
    );
}

#[test]
fn bad_flags_get_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    write_data(&data);
    let d = data.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["align", "--data", d, "--out", "x", "--objective", "ppo"],
            "--objective",
        ),
        (
            vec!["align", "--data", d, "--out", "x", "--targets", "q,zz"],
            "--targets",
        ),
        (
            vec!["align", "--data", d, "--out", "x", "--schedule", "cyclic"],
            "--schedule",
        ),
        (
            vec!["eval", "--data", d, "--template", "fancy"],
            "--template",
        ),
        (
            vec!["eval", "--data", "/nonexistent.jsonl"],
            "/nonexistent.jsonl",
        ),
        (
            vec!["eval", "--data", d, "--adapter", "/nonexistent"],
            "--adapter",
        ),
        (
            vec!["score", "--data", d, "--reward-model", "/nonexistent"],
            "--reward-model",
        ),
    ] {
        let out = attune(&args, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
