//! The official `openai` Python client talks to attune unchanged: a completion,
//! a stream, and an error surfaced as the client's own exception type.

mod common;

use std::process::Command;

use attune_config::Config;

const SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}],
                                   max_tokens=5, n=2, seed=1, logprobs=True, top_logprobs=2)
assert len(r.choices) == 2 and r.usage.completion_tokens == 10, r
assert r.id.startswith("chatcmpl-") and r.system_fingerprint
assert len(r.choices[0].logprobs.content) == 5
chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}],
              max_tokens=4, stream=True, stream_options={"include_usage": True}))
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
try:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=3)
    raise SystemExit("expected a BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "top_p" in str(e), e
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected a NotFoundError")
except openai.NotFoundError:
    pass
print("ok")
"#;

#[test]
fn the_official_openai_python_client_works_unchanged() {
    let have = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success());
    assert!(
        matches!(have, Ok(true)),
        "the Python package `openai` is needed: python3 -m pip install openai (make test installs it)"
    );
    let server = common::start(Config::default());
    let addr = server.addr;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &format!("http://{addr}/v1")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
