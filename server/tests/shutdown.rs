//! `attune serve` as a child process: SIGTERM lets an in-flight request finish
//! and the process exits 0.

#[path = "common/child.rs"]
mod child;

use std::process::Command;

use child::ChildServer;

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        ChildServer::start(dir.path(), &[("ATTUNE_SERVER__SHUTDOWN_GRACE_SECS", "20")]);
    let body = serde_json::json!({
        "model": server.model_name(),
        "messages": [{"role": "user", "content": "the"}],
        "max_tokens": 200,
        "stream": true,
    })
    .to_string();
    let url = server.url("/v1/chat/completions");
    let request = std::thread::spawn(move || {
        let mut r = ureq::post(&url)
            .header("content-type", "application/json")
            .send(&body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, text) = request.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream completed: {text}"
    );
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}
