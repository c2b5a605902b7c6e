//! The README's walkthrough ("Running it by hand"), run as written: extracted from the README
//! at build time, so the two cannot drift. It runs as root in namespaces of its own — a network
//! namespace (the walkthrough's fixed ports 8092 and 8093 on a private loopback), a mount
//! namespace with empty file systems over `/opt` and `/var/lib` (its install root and root's
//! default state directories) and a PID namespace (everything it starts dies with it) — so it
//! touches nothing of the machine's.
//!
//! The test adds only what a person typing the commands does without thinking: after a server
//! or agent is started in the background, it waits until that one answers before going on; at
//! the end it waits for the pushed fix to be installed and for the machine and the site in the
//! fleet view.
use std::time::Duration;

use updraft_tests::{Proc, World};

const README: &str = include_str!("../README.md");

/// The first `sh` block after the heading `heading`, line by line.
fn block_after(text: &str, heading: &str) -> Vec<String> {
    let rest = &text[text.find(heading).unwrap_or_else(|| panic!("the README has no {heading:?}"))..];
    let start = rest.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block ends");
    rest[start..start + end].lines().map(str::to_string).collect()
}

/// What a person waits for after starting `program` in the background.
fn wait_after(program: &str) -> &'static str {
    match program {
        "provider" => "wait_for 'admin-cli update list >/dev/null 2>&1'",
        "remote-provider" => "wait_for '(exec 3<>/dev/tcp/127.0.0.1/8093) 2>/dev/null'",
        "agent" => "wait_for '[ -S /var/lib/updraft/agent/agent.sock ]'",
        other => panic!("the walkthrough starts {other:?} in the background: say here what to wait for"),
    }
}

/// The walkthrough with the waits after each command that ends in `&`.
fn script(lines: &[String]) -> String {
    let mut out = vec![
        "wait_for() { for _ in $(seq 600); do if eval \"$1\"; then return 0; fi; sleep 0.1; done; \
         echo \"walkthrough: timed out waiting for: $1\" >&2; return 1; }"
            .to_string(),
    ];
    let mut first: Option<String> = None;
    for line in lines {
        out.push(line.clone());
        let code = line.trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        let program = first.get_or_insert_with(|| code.split_whitespace().next().unwrap_or_default().to_string());
        if code.ends_with('\\') {
            continue; // the command goes on
        }
        if code.ends_with('&') {
            out.push(wait_after(program).to_string());
        }
        first = None;
    }
    out.join("\n")
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let lines = block_after(README, "## Running it by hand");
    assert!(lines.iter().any(|l| l.starts_with("provider ")), "not the walkthrough: {lines:?}");
    let w = World::new();
    let work = w.path("walkthrough");
    // `--from ./build`: the application the reader packages.
    std::fs::create_dir_all(work.join("build/bin")).unwrap();
    std::fs::write(work.join("build/bin/myapp"), "#!/bin/sh\necho myapp\n").unwrap();
    let checks = [
        "wait_for \"agent status --json | tr -d ' \\n' | grep -q '\\\"version\\\":\\\"1.0.0.1\\\"'\"",
        // The route is not part of the walkthrough's promise: the agent starts before the site
        // has caught up, and may first be answered by the centre.
        "wait_for \"admin-cli machine list | grep -q '^pc-17 .*agent'\"",
        "wait_for \"admin-cli machine list | grep -q '^branch-1 .*remote-provider'\"",
        "[ \"$(cat /opt/updraft/myapp/bin/myapp)\" = \"$(cat build/bin/myapp)\" ]",
        "echo WALKTHROUGH DONE",
    ];
    std::fs::write(work.join("walkthrough.sh"), format!("{}\n{}\n", script(&lines), checks.join("\n"))).unwrap();
    let bin = updraft_tests::bin("provider").parent().unwrap().to_path_buf();
    let runner = format!(
        "set -eu; ip link set lo up; mount -t tmpfs walkthrough /opt; mount -t tmpfs walkthrough /var/lib; \
         export PATH={}:$PATH; cd {}; exec bash -eu -o pipefail -x walkthrough.sh",
        bin.display(),
        work.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", &runner]);
    cmd.env_remove("UPDRAFT_TLS_CA").env_remove("UPDRAFT_TLS_CERT").env_remove("UPDRAFT_TLS_KEY");
    let mut p = Proc::spawn(w.dir.path(), "walkthrough", cmd);
    assert!(p.wait_exit(Duration::from_secs(240)), "the walkthrough did not finish:\n{}", p.log_text());
    let log = p.log_text();
    assert!(log.lines().any(|l| l == "WALKTHROUGH DONE"), "the walkthrough failed:\n{log}");
}
