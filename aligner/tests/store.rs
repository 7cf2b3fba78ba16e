//! The preference store against a real SQLite file: feedback validation,
//! idempotency, group commit isolation, retention, import/export of the real
//! HH-RLHF data, and reopening.

use std::path::{Path, PathBuf};

use attune_aligner::store::{
    export_ranked, import_file, ChoiceRecord, ChoiceRef, CompletionRecord, FeedbackError,
    FeedbackKind, FeedbackRequest, ImportFormat, NewFeedback, Store,
};
use attune_config::StoreConfig;
use attune_models::ChatMessage;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        path: dir.join("store.sqlite3"),
        ..StoreConfig::default()
    }
}

fn completion(id: &str, prompt: &str, n: usize, created_ms: i64) -> CompletionRecord {
    CompletionRecord {
        id: id.into(),
        created_ms,
        model: "tiny".into(),
        generation: 0,
        messages: vec![ChatMessage::new("user", prompt)],
        prompt: format!("<user>{prompt}</user>"),
        params: serde_json::json!({"temperature": 0.7}),
        choices: (0..n)
            .map(|i| ChoiceRecord {
                text: format!("{prompt} answer {i}"),
                tokens: vec![i as u32, 7, 9],
                finish_reason: "stop".into(),
            })
            .collect(),
    }
}

fn log(store: &Store, rec: CompletionRecord) {
    store
        .log_completion(rec)
        .unwrap()
        .wait_blocking()
        .unwrap()
        .unwrap();
}

fn feedback(
    store: &Store,
    request: FeedbackRequest,
    key: Option<&str>,
) -> Result<i64, FeedbackError> {
    store
        .submit_feedback(NewFeedback {
            request,
            idempotency_key: key.map(String::from),
        })
        .unwrap()
        .wait_blocking()
        .unwrap()
        .map(|r| r.id)
}

fn choice(id: &str, choice: usize) -> ChoiceRef {
    ChoiceRef {
        completion_id: id.into(),
        choice,
    }
}

fn ranking(id: &str, ranking: &[usize]) -> FeedbackRequest {
    FeedbackRequest::Ranking {
        completion_id: id.into(),
        ranking: ranking.to_vec(),
    }
}

fn hh_data() -> PathBuf {
    attune_models::testing::shared_dir().join("data/hh-rlhf-harmless-base.jsonl.gz")
}

#[test]
fn ranking_and_pair_feedback_are_stored_best_first_with_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    log(&store, completion("c1", "why?", 3, 1));
    log(&store, completion("c2", "why?", 1, 2));
    let a = feedback(&store, ranking("c1", &[2, 0, 1]), None).unwrap();
    let b = feedback(
        &store,
        FeedbackRequest::Pair {
            chosen: choice("c2", 0),
            rejected: choice("c1", 1),
        },
        None,
    )
    .unwrap();
    let ra = store.feedback(a).unwrap().unwrap();
    assert_eq!(ra.kind, FeedbackKind::Ranking);
    assert_eq!(ra.messages, vec![ChatMessage::new("user", "why?")]);
    let texts: Vec<_> = ra.candidates.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["why? answer 2", "why? answer 0", "why? answer 1"]);
    assert_eq!(ra.candidates[0].served, Some(choice("c1", 2)));
    assert_eq!(ra.candidates[0].generation, Some(0));
    assert_eq!(ra.pairs().count(), 3);
    let rb = store.feedback(b).unwrap().unwrap();
    assert_eq!(rb.candidates[0].served, Some(choice("c2", 0)));
    let after = store.preferences_after(a, 10).unwrap();
    assert_eq!(after.iter().map(|r| r.id).collect::<Vec<_>>(), [b]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.completions, stats.records, stats.pairs), (2, 2, 4));
    let c = store.completion("c1").unwrap().unwrap();
    assert_eq!(c.choices[1].tokens, [1, 7, 9]);
    assert_eq!(c, completion("c1", "why?", 3, 1));
}

#[test]
fn rejected_feedback_leaves_the_store_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    log(&store, completion("c1", "why?", 3, 1));
    log(&store, completion("c2", "how?", 2, 1));
    feedback(&store, ranking("c1", &[0, 1]), Some("k1")).unwrap();
    let before = store.content_digest().unwrap();
    let pair = |a: ChoiceRef, b: ChoiceRef| FeedbackRequest::Pair {
        chosen: a,
        rejected: b,
    };
    let cases: Vec<(FeedbackRequest, Option<&str>, &str)> = vec![
        (ranking("nope", &[0, 1]), None, "no completion"),
        (ranking("c1", &[0, 3]), None, "no choice 3"),
        (ranking("c1", &[1, 1]), None, "more than once"),
        (ranking("c1", &[1]), None, "at least two"),
        (
            pair(choice("c1", 0), choice("c2", 0)),
            None,
            "different prompts",
        ),
        (
            pair(choice("c1", 0), choice("zz", 0)),
            None,
            "no completion",
        ),
        (ranking("c1", &[2, 1]), Some("k1"), "different request"),
    ];
    for (req, key, needle) in cases {
        let e = feedback(&store, req, key).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert_eq!(store.content_digest().unwrap(), before);
}

#[test]
fn a_repeated_idempotency_key_is_acknowledged_but_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    log(&store, completion("c1", "why?", 2, 1));
    let first = store
        .submit_feedback(NewFeedback {
            request: ranking("c1", &[1, 0]),
            idempotency_key: Some("abc".into()),
        })
        .unwrap()
        .wait_blocking()
        .unwrap()
        .unwrap();
    assert!(!first.replayed);
    let again = store
        .submit_feedback(NewFeedback {
            request: ranking("c1", &[1, 0]),
            idempotency_key: Some("abc".into()),
        })
        .unwrap()
        .wait_blocking()
        .unwrap()
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.id, first.id);
    assert_eq!(store.stats().unwrap().records, 1);
}

#[test]
fn a_bad_command_in_a_group_commit_does_not_disturb_its_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    log(&store, completion("c1", "why?", 2, 1));
    // Queue many writes before waiting so the writer commits them together.
    let pending: Vec<_> = (0..200)
        .map(|i| {
            let req = if i % 3 == 0 {
                ranking("c1", &[0, 5])
            } else {
                ranking("c1", &[1, 0])
            };
            store
                .submit_feedback(NewFeedback {
                    request: req,
                    idempotency_key: None,
                })
                .unwrap()
        })
        .collect();
    let results: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_blocking().unwrap())
        .collect();
    let good = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(good, 133);
    assert!(results
        .iter()
        .enumerate()
        .all(|(i, r)| r.is_ok() == (i % 3 != 0)));
    assert_eq!(store.stats().unwrap().records, 133);
}

#[test]
fn retention_deletes_old_and_excess_completions_but_keeps_referenced_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        retention_days: 1,
        retention_max_completions: 3,
        ..config(dir.path())
    };
    let store = Store::open(&cfg).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old = now - 2 * 86_400_000;
    log(&store, completion("old-referenced", "q", 2, old));
    log(&store, completion("old", "q", 2, old));
    for i in 0..4 {
        log(
            &store,
            completion(&format!("new{i}"), "q", 2, now - 1000 + i),
        );
    }
    feedback(&store, ranking("old-referenced", &[0, 1]), None).unwrap();
    let deleted = store.prune().unwrap().wait_blocking().unwrap().unwrap();
    // "old" by age; then 5 remain for a limit of 3: new0 and new1 go, oldest first.
    assert_eq!(deleted, 3);
    for (id, kept) in [
        ("old-referenced", true),
        ("old", false),
        ("new0", false),
        ("new1", false),
        ("new2", true),
        ("new3", true),
    ] {
        assert_eq!(store.completion(id).unwrap().is_some(), kept, "{id}");
    }
    store.integrity_check().unwrap();
}

#[test]
fn hh_rlhf_import_counts_every_line_and_export_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    let report = import_file(&store, &hh_data(), ImportFormat::Auto, |_| {}).unwrap();
    assert_eq!(report.lines, 2000);
    // Four lines of the file have chosen/rejected dialogues that differ before
    // the final turn: they are not preference pairs over one prompt.
    assert_eq!(
        (report.stored, report.rejected),
        (1996, 4),
        "{:?}",
        report.reasons
    );
    let lines: Vec<u64> = report.reasons.iter().map(|r| r.line).collect();
    assert_eq!(lines, [1255, 1689, 1951, 1953]);
    assert!(report
        .reasons
        .iter()
        .all(|r| r.reason.contains("differ before")));
    assert_eq!(store.stats().unwrap().records, 1996);

    // Importing again stores nothing new.
    let again = import_file(&store, &hh_data(), ImportFormat::HhRlhf, |_| {}).unwrap();
    assert_eq!((again.stored, again.already_stored), (0, 1996));

    // Export, import the export into a fresh store, export again: same content.
    let exported = dir.path().join("export.jsonl");
    let n = export_ranked(&store, 0, &mut std::fs::File::create(&exported).unwrap()).unwrap();
    assert_eq!(n, 1996);
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(&config(dir2.path())).unwrap();
    let back = import_file(&store2, &exported, ImportFormat::Ranked, |_| {}).unwrap();
    assert_eq!((back.stored, back.rejected), (1996, 0));
    let a = store.preferences_after(0, usize::MAX).unwrap();
    let b = store2.preferences_after(0, usize::MAX).unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.messages, &x.candidates), (&y.messages, &y.candidates));
    }
    // The first pair of the file, as imported.
    assert_eq!(a[0].messages[0].role, "user");
    assert!(a[0].messages[0]
        .content
        .starts_with("what are some pranks with a pen"));
}

#[test]
fn records_survive_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = Store::open(&config(dir.path())).unwrap();
        log(&store, completion("c1", "why?", 2, 1));
        feedback(&store, ranking("c1", &[1, 0]), None).unwrap()
    };
    let store = Store::open(&config(dir.path())).unwrap();
    store.integrity_check().unwrap();
    assert_eq!(store.feedback(id).unwrap().unwrap().candidates.len(), 2);
}

#[test]
fn opening_a_file_that_is_not_a_database_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::write(&cfg.path, b"this is not sqlite, just text long enough to be a header ....................................").unwrap();
    let e = Store::open(&cfg).err().expect("must fail").to_string();
    assert!(e.contains("store.sqlite3"), "{e}");
}
