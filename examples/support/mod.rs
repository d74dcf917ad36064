//! Helpers shared by the benchmark examples: resource usage of this process and phases run as
//! child processes, so each phase's peak memory and CPU time are its own.
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

/// CPU time and peak resident memory of this process so far.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub peak_rss_mib: f64,
}

pub fn usage() -> Usage {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Usage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        peak_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    }
}

/// Runs this example again as `args`, and returns the last line it printed (a JSON object).
pub fn run_phase(args: &[&str]) -> String {
    quiesce();
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run phase");
    assert!(out.status.success(), "phase {args:?} failed");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .last()
        .expect("phase printed nothing")
        .to_string()
}

/// Reads a number field from a flat JSON object printed by a phase.
pub fn field(json: &str, name: &str) -> f64 {
    let pat = format!("\"{name}\":");
    let start = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + pat.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {json}"))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Writes back dirty pages and lets the disk settle, so that one phase's writeback does not
/// land on the next phase's clock.
pub fn quiesce() {
    // SAFETY: sync has no arguments and no failure mode.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}
