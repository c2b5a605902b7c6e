//! Test hosts in network namespaces, for what crosses a network: mDNS discovery, failover,
//! partitions. A [`Lab`] creates a switch namespace holding two bridges ("lan" 10.77.1.0/24 and
//! "back" 10.77.2.0/24) and one namespace per host, wired with veth pairs; it deletes them all
//! when dropped, and deletes those a killed test run left behind. Nothing here touches the
//! machine's own namespace: processes run with `ip netns exec`.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bin;

/// Every namespace the tests make is named `updt-PID-…`, so that one left by a killed run is
/// recognised and removed.
const PREFIX: &str = "updt";

pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("cannot run `ip` (install iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {} (the namespace tests need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A namespace name no other of this process's has: `updt-PID-TAGN`.
pub(crate) fn fresh_name(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{PREFIX}-{}-{tag}{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

/// Deletes namespaces of earlier test processes that died without cleaning up.
pub(crate) fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        if let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// One test host: its namespace and addresses.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    /// Address on the lan (10.77.1.N).
    pub lan: String,
    /// Address on the back network (10.77.2.N), for hosts given one.
    pub back: Option<String>,
}

pub struct Lab {
    id: String,
    switch: String,
    hosts: Vec<String>,
    next_host: u8,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    pub fn new() -> Lab {
        remove_stale();
        let id = fresh_name("");
        let switch = format!("{id}-sw");
        ip(&["netns", "add", &switch]);
        let lab = Lab { id, switch, hosts: vec![], next_host: 1 };
        for br in ["lan", "back"] {
            ip(&["-n", &lab.switch, "link", "add", br, "type", "bridge"]);
            ip(&["-n", &lab.switch, "link", "set", br, "up"]);
        }
        lab
    }

    /// A new host on the lan (and on the back network when `back`).
    pub fn host(&mut self, name: &str, back: bool) -> Host {
        let n = self.next_host;
        self.next_host += 1;
        let ns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let wire = |bridge: &str, dev: &str, net: u8| -> String {
            // The switch end is named after the host number: unique in the switch, short
            // enough for the kernel's 15 characters.
            let peer = format!("{bridge}{n}");
            ip(&["-n", &self.switch, "link", "add", &peer, "type", "veth", "peer", "name", dev, "netns", &ns]);
            ip(&["-n", &self.switch, "link", "set", &peer, "master", bridge, "up"]);
            let addr = format!("10.77.{net}.{n}");
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", &ns, "link", "set", dev, "up"]);
            addr
        };
        let lan = wire("lan", "eth0", 1);
        let back = back.then(|| wire("back", "eth1", 2));
        Host { ns, lan, back }
    }

    /// Cuts `host` off the lan (its back network stays up).
    pub fn cut_lan(&self, host: &Host) {
        ip(&["-n", &host.ns, "link", "set", "eth0", "down"]);
    }

    /// Cuts `host` off the back network (its lan stays up).
    pub fn cut_back(&self, host: &Host) {
        ip(&["-n", &host.ns, "link", "set", "eth1", "down"]);
    }

    /// Waits until something listens on `addr:port` as seen from inside `host`.
    pub fn wait_port(&self, host: &Host, addr: &str, port: u16) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let ok = Command::new("ip")
                .args(["netns", "exec", &host.ns, "bash", "-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nothing listens on {addr}:{port} as seen from {}", host.ns);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes are the caller's and die with their handles; namespaces go here (a
        // namespace with processes still in it disappears when they exit).
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A command that runs `program` (a workspace binary) inside `host`.
pub fn command_in(host: &Host, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &host.ns]).arg(bin(program));
    c
}
