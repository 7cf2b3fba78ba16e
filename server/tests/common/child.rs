//! `attune serve` as a child process over a tiny model, for tests that signal
//! or kill it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use attune_models::testing::{TinyModel, TinySpec};

/// Writes the tiny model into `dir/model` (once) and answers its path.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    if !model.exists() {
        std::fs::create_dir_all(&model).unwrap();
        TinyModel::new(TinySpec::default())
            .write_hf(&model)
            .unwrap();
    }
    model
}

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

/// A served child process and the address it listens on.
pub struct ChildServer {
    pub child: Child,
    pub addr: String,
}

impl ChildServer {
    /// Starts `attune serve` on port 0 over the tiny model in `dir`, with its
    /// store at `dir/store.sqlite3`, and waits until it listens. The aligner
    /// is off unless `env` turns it on.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> ChildServer {
        let model = tiny_model(dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_attune"))
            .args(["serve", "--port", "0", "--threads", "1", "--model"])
            .arg(&model)
            .arg("--store")
            .arg(dir.join("store.sqlite3"))
            .env("ATTUNE_ADAPTERS", dir.join("adapters"))
            .env("ATTUNE_ALIGNER__ENABLED", "false")
            .envs(env.iter().copied())
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
        ChildServer { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The model name clients use (the model folder's name).
    pub fn model_name(&self) -> &'static str {
        "model"
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
