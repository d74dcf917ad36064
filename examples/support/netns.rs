//! Real links for benchmarks: hosts in network namespaces on one bridge, each host's uplink
//! shaped by a `tbf` qdisc (a queue, then drops, as home and cloud links are shaped) and, on
//! request, random loss on every host by `nftables`. Runs as root; installs `iproute2` and
//! `nftables` from the distribution's packages when they are missing.
//!
//! Layout: a switch namespace holding a bridge, and one namespace per host, joined to the
//! bridge by a veth pair; host `i` is `10.77.0.(i + 1)/24` on its `eth0`. Everything is made
//! under one prefix and removed when the [`Net`] is dropped (and at the next start, should a
//! run have been killed).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// How a host's uplink is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Uplink rate, Mbit/s.
    pub mbit: u64,
    /// Share of the packets each host sends that are dropped at random, percent.
    pub loss_pct: f64,
}

/// Hosts on one bridge.
pub struct Net {
    prefix: String,
}

/// Runs `program args` and fails with what it printed if it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `program` with `input` on its standard input.
fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{program}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Installs what the harness needs (`ip` and `tc` from iproute2, `nft` from nftables) when it
/// is missing, from the distribution's packages.
pub fn install_tools(loss: bool) -> Result<(), String> {
    let mut missing = Vec::new();
    if !have("ip") || !have("tc") {
        missing.push("iproute2");
    }
    if loss && !have("nft") {
        missing.push("nftables");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(", "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let apt = |args: &[&str]| {
        let status = Command::new("apt-get")
            .args(args)
            .envs(env)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("apt-get: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {} failed", args.join(" ")))
        }
    };
    // The package lists may be stale or absent on a fresh machine.
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install).or_else(|_| {
        apt(&["update"])?;
        apt(&install)
    })
}

impl Net {
    /// `hosts` hosts on one bridge, every uplink shaped by `link`. Needs root.
    pub fn new(prefix: &str, hosts: usize, link: Link) -> Result<Self, String> {
        // SAFETY: geteuid has no arguments and no failure mode.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        install_tools(link.loss_pct > 0.0)?;
        let net = Self {
            prefix: prefix.to_string(),
        };
        net.remove_leftovers();
        let sw = net.switch();
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            net.add_host(i, link)?;
        }
        Ok(net)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// The address of host `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8)
    }

    fn add_host(&self, i: usize, link: Link) -> Result<(), String> {
        let (ns, sw) = (self.ns(i), self.switch());
        let port = format!("p{i}");
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
        )?;
        run("ip", &["-n", &sw, "link", "set", &port, "master", "br0"])?;
        run("ip", &["-n", &sw, "link", "set", &port, "up"])?;
        let addr = format!("{}/16", self.ip(i));
        run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        let rate = format!("{}mbit", link.mbit);
        run(
            "ip",
            &[
                "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                &rate, "burst", "256kb", "latency", "50ms",
            ],
        )?;
        if link.loss_pct > 0.0 {
            let per_10k = (link.loss_pct * 100.0).round() as u64;
            let rules = format!(
                "table inet snloss {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  numgen random mod 10000 < {per_10k} drop\n }}\n}}\n"
            );
            run_with_input("ip", &["netns", "exec", &ns, "nft", "-f", "-"], &rules)?;
        }
        Ok(())
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Removes the namespaces a killed run may have left under this prefix.
    fn remove_leftovers(&self) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        let mine = format!("{}-", self.prefix);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&mine) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove_leftovers();
    }
}
