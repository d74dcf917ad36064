//! The `node` example driven as a process, as scripts and service managers drive it: JSON lines
//! read as they come, stderr kept for the failure messages.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `node` example binary, built by `cargo test` beside this test.
pub fn node_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("node");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples",
        bin.display()
    );
    bin
}

pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    /// Every event read so far, for waits that look back.
    seen: std::cell::RefCell<Vec<serde_json::Value>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    pub fn start(args: &[&str], token: &str) -> Self {
        Self::start_with(args, &[("SNAPSHOT_TOKEN", token)])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(node_bin())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self {
            child,
            lines,
            seen: Default::default(),
            stderr,
        }
    }

    /// The next `name` event, within two minutes.
    pub fn wait_event(&self, name: &str) -> serde_json::Value {
        let started = std::time::Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no {name} event in two minutes; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            let v = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("no {name} event; stderr:\n{}", self.stderr.lock().unwrap())
                });
            self.seen.borrow_mut().push(v.clone());
            if v["event"] == name {
                return v;
            }
        }
    }

    /// Whether a `name` event was read already.
    pub fn saw(&self, name: &str) -> bool {
        self.seen.borrow().iter().any(|v| v["event"] == name)
    }

    /// The first `name` event, read already or still to come, for which `pred` holds.
    pub fn find_event(
        &self,
        name: &str,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let earlier = self
            .seen
            .borrow()
            .iter()
            .find(|v| v["event"] == name && pred(v))
            .cloned();
        if let Some(v) = earlier {
            return v;
        }
        loop {
            let v = self.wait_event(name);
            if pred(&v) {
                return v;
            }
        }
    }
}

impl Proc {
    /// Sends `signal` (`libc::SIGINT`, `libc::SIGKILL`, ...) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the stderr reader finish.
                std::thread::sleep(Duration::from_millis(200));
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {timeout:?}; stderr:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node example's arguments for a node on `dir` listening on loopback only (swarm and
/// chunk stream, ports the OS picks), then `more`.
pub fn on_loopback<'a>(dir: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--data-dir",
        dir,
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--streamer",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(more);
    args
}
