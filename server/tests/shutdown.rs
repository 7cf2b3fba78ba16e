//! `attune serve` as a child process: SIGTERM lets an in-flight request finish
//! and the process exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use attune_models::testing::{TinyModel, TinySpec};

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(TinySpec::default())
        .write_hf(dir.path())
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_attune"))
        .args(["serve", "--port", "0", "--threads", "1", "--model"])
        .arg(dir.path())
        .env("ATTUNE_SERVER__SHUTDOWN_GRACE_SECS", "20")
        .env("ATTUNE_STORE", dir.path().join("store.sqlite3"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = strip_ansi(
            &lines
                .next()
                .expect("server exited before listening")
                .unwrap(),
        );
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining the child's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let body = serde_json::json!({
        "model": name,
        "messages": [{"role": "user", "content": "the"}],
        "max_tokens": 200,
        "stream": true,
    })
    .to_string();
    let url = format!("http://{addr}/v1/chat/completions");
    let request = std::thread::spawn(move || {
        let mut r = ureq::post(&url)
            .header("content-type", "application/json")
            .send(&body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, text) = request.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream completed: {text}"
    );
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}
