//! Harness for the workspace integration tests: starts the real binaries as processes on
//! loopback ports, builds keys and packages with the real admin-cli, waits for conditions, and
//! cleans up (processes are killed when their handle drops). Also a deliberately rogue agent
//! API server, for checking what the agent refuses.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod browser;
pub mod collector;
pub mod herdsim;
pub mod loadgen;
pub mod netns;
pub mod rogue;

/// Directory holding the workspace's binaries (the one this test binary was built into).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/e2e-<hash>, programs like bench from target/<profile>.
    let dir = exe.parent().expect("the executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().expect("deps has a parent") } else { dir }
        .to_path_buf()
}

/// Builds the workspace's binaries once per test process. `cargo test` does not build the
/// binaries of packages that have no integration tests of their own, and a stale binary would
/// test old code; cargo releases its build lock before running tests, so this is safe.
fn ensure_built() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        // Fail points are compiled in for the crash-point sweep; they do nothing unless
        // UPDRAFT_FAILPOINT names one.
        cmd.args(["build", "--quiet", "--bins", "--features", "updraft-agent/failpoints", "--manifest-path"])
            .arg(&manifest);
        // Exactly the product binaries: building other packages' binaries (bench) here would
        // unify features differently from `cargo test` and rebuild half the tree every run.
        for p in ["updraft-provider", "updraft-remote-provider", "updraft-agent", "updraft-admin-cli"] {
            cmd.args(["-p", p]);
        }
        if bin_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        // Into the target directory this program runs from, whatever CARGO_TARGET_DIR says now
        // (a bench started by path would otherwise build elsewhere and run stale binaries).
        if let Some(target) = bin_dir().parent() {
            cmd.arg("--target-dir").arg(target);
        }
        let status = cmd.status().expect("cannot run cargo to build the binaries");
        assert!(status.success(), "building the workspace binaries failed");
    });
}

pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds every binary",
        p.display()
    );
    p
}

/// A port free on 127.0.0.1 right now.
/// Every server the harness starts serves probes on a port of its own (see [`Proc::probe_addr`]).
pub const PROBES: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];
/// Every provider the harness starts serves its web console on a port of its own (see
/// [`Proc::web_addr`]), never on the shared default.
pub const WEB: [&str; 2] = ["--web-listen", "127.0.0.1:0"];

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends `signal` to the process `pid`, or to its process group when `group`, through kill(2).
/// Never through `/usr/bin/kill`: procps-ng 4.0.2's (Debian 12) turns `kill -KILL -PGID` into
/// kill(-1, SIGKILL), which as root ends every process on the machine — CI runs included.
/// Returns whether the signal was delivered.
pub fn signal(pid: u32, signal: i32, group: bool) -> bool {
    let pid = i32::try_from(pid).ok().filter(|p| *p > 1).unwrap_or_else(|| panic!("no process {pid} to signal"));
    // SAFETY: kill(2) with a checked positive pid (or its negation, a process group).
    unsafe { libc::kill(if group { -pid } else { pid }, signal) == 0 }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn wait_port(port: u16) {
    wait_until(&format!("port {port}"), Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A running process, killed (SIGKILL) when dropped. Output goes to a log file in the test's
/// directory, printed if the test fails.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// What it was started with, for [`Proc::again`].
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// The port it reported listening on (see [`Proc::listening_port`]).
    port: Option<u16>,
    /// Leads its own process group, killed whole (see [`Proc::spawn_group`]).
    group: bool,
}

impl Proc {
    pub fn start(dir: &Path, name: &str, program: &str, args: &[&str]) -> Proc {
        Self::start_env(dir, name, program, args, &[])
    }

    /// `UPDRAFT_PROFILE_PROVIDER`, when set, is a command (split on spaces) each provider is
    /// started under, for a profile of it in a benchmark: e.g. `heaptrack -o /tmp/ht.%p` (a file
    /// per provider) or `perf record -g -o /tmp/perf.data --`. The process watched (its memory,
    /// its pid) is then the wrapper's, which is the provider's only if the wrapper execs it.
    pub fn start_env(dir: &Path, name: &str, program: &str, args: &[&str], env: &[(String, String)]) -> Proc {
        let wrapper = std::env::var("UPDRAFT_PROFILE_PROVIDER").unwrap_or_default();
        let wrapper: Vec<&str> = if program == "provider" { wrapper.split_whitespace().collect() } else { vec![] };
        Self::start_under(dir, name, &wrapper, program, args, env)
    }

    /// `program` started as the last argument of `wrapper` (a profiler such as valgrind that
    /// runs it in its own process), or directly when `wrapper` is empty.
    pub fn start_under(
        dir: &Path,
        name: &str,
        wrapper: &[&str],
        program: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Proc {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(bin(program));
                cmd
            }
            None => Command::new(bin(program)),
        };
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn(dir, name, cmd)
    }

    /// The port a server started with `--listen 127.0.0.1:0` reports once bound (it exits with
    /// its log printed if it never does).
    pub fn listening_port(&mut self) -> u16 {
        let mut port = None;
        wait_until(&format!("{} to report its port", self.name), Duration::from_secs(30), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            port = log.lines().find_map(|l| {
                l.split_once(": listening on ").and_then(|(_, a)| a.trim().rsplit(':').next()?.parse().ok())
            });
            port.is_some() || self.exited()
        });
        let port = port.unwrap_or_else(|| panic!("{} exited before listening:\n{}", self.name, self.log_text()));
        self.port = Some(port);
        port
    }

    /// Where a server started with `--metrics-listen 127.0.0.1:0` serves its probes (as it
    /// reports once bound).
    pub fn probe_addr(&mut self) -> std::net::SocketAddr {
        let mut addr = None;
        wait_until(&format!("{} to report its probe port", self.name), Duration::from_secs(30), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            addr =
                log.lines().find_map(|l| l.split_once(": probes on http://").and_then(|(_, a)| a.trim().parse().ok()));
            addr.is_some() || self.exited()
        });
        addr.unwrap_or_else(|| panic!("{} exited before serving probes:\n{}", self.name, self.log_text()))
    }

    /// Where a provider serves its web console (as it reports once bound): `host:port`.
    pub fn web_addr(&mut self) -> std::net::SocketAddr {
        let mut addr = None;
        wait_until(&format!("{} to report its web console", self.name), Duration::from_secs(30), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            addr = log
                .lines()
                .find_map(|l| l.split_once(": web console on https://").and_then(|(_, a)| a.trim().parse().ok()));
            addr.is_some() || self.exited()
        });
        addr.unwrap_or_else(|| panic!("{} exited before serving its web console:\n{}", self.name, self.log_text()))
    }

    /// The same program started again with exactly the same arguments and environment (on the
    /// port it reported, where it was started on port 0), after a kill; its log is
    /// `NAME-again.log`.
    pub fn again(&self) -> Proc {
        let mut cmd = Command::new(&self.program);
        // The server's own port is kept (clients know it); any other port 0 (probes) is picked
        // afresh.
        let listen0 = std::ffi::OsStr::new("127.0.0.1:0");
        let flags = std::iter::once(None).chain(self.args.iter().map(Some));
        cmd.args(self.args.iter().zip(flags).map(|(a, flag)| match self.port {
            Some(p) if a == listen0 && flag.is_some_and(|f| f == "--listen") => format!("127.0.0.1:{p}").into(),
            _ => a.clone(),
        }));
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        let dir = self.log.parent().expect("a log has a directory");
        let mut p = Proc::spawn(dir, &format!("{}-again", self.name), cmd);
        if let Some(port) = self.port {
            p.port = Some(port);
            wait_port(port);
        }
        p
    }

    /// Starts `cmd` with its output in `dir/NAME.log`.
    pub fn spawn(dir: &Path, name: &str, mut cmd: Command) -> Proc {
        let program = cmd.get_program().to_owned();
        let args = cmd.get_args().map(|a| a.to_owned()).collect();
        let envs = cmd.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect();
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name: name.into(), child: Some(child), log, program, args, envs, port: None, group: false }
    }

    /// Like [`Proc::spawn`], for a program that starts processes of its own (nginx's master
    /// and its workers): it leads a new process group, and the whole group is killed with it,
    /// so no worker outlives the test.
    pub fn spawn_group(dir: &Path, name: &str, mut cmd: Command) -> Proc {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut p = Self::spawn(dir, name, cmd);
        p.group = true;
        p
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory now, in kB (from /proc).
    pub fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// Waits for the process to exit by itself; true if it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGTERM, as systemd's stop does; the process is left to exit by itself.
    pub fn term(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGTERM, false);
        }
    }

    /// SIGKILL, as a crash or power loss would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                signal(c.id(), libc::SIGKILL, true);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether this provider has said it holds `duty` (providers on one database share each
    /// duty out: `content-scanner`, `rollouts`, each to whichever takes it first).
    pub fn holds_duty(&self, duty: &str) -> bool {
        self.log_text().contains(&format!("holding the duty duty=\"{duty}\""))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.log_text());
        }
    }
}

/// One test's world: a temp directory, a release key, a private CA that issues every
/// process its certificate (mutual TLS, as in production), helpers to run admin-cli.
pub struct World {
    pub dir: tempfile::TempDir,
    /// Extra environment for every provider, site and agent this world starts (e.g. OTEL_* variables).
    pub env: Vec<(String, String)>,
    /// Extra environment for `admin-cli` (e.g. a longer UPDRAFT_CONNECT_TIMEOUT for a provider
    /// run under a profiler).
    pub admin_env: Vec<(String, String)>,
    pub key: PathBuf,
    pub pubkey: PathBuf,
    /// Plaintext (`--insecure`) instead of mutual TLS, for the few cases that need it.
    pub insecure: bool,
    /// The key providers sign catalog statements with, and its public half agents may pin.
    pub catalog_key: PathBuf,
    pub catalog_pub: PathBuf,
    _watchdog: Option<Watchdog>,
}

/// Longest one test may run. Every command and call of the harness has a deadline of its own;
/// this is the net under the test's own code, so that CI ends with a failure naming the test
/// instead of running until it is killed with nothing said.
pub const TEST_DEADLINE: Duration = Duration::from_secs(900);

/// Aborts the test binary, naming the test, if the test whose world armed it is still running
/// after [`TEST_DEADLINE`]; dropping it (the test ended) stands it down.
struct Watchdog {
    _stand_down: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Armed in test binaries (run from `target/*/deps`) only: a benchmark's world may rightly
    /// live longer.
    fn arm() -> Option<Watchdog> {
        let exe = std::env::current_exe().ok()?;
        if exe.parent()?.file_name()? != "deps" {
            return None;
        }
        let test = std::thread::current().name().unwrap_or("a test").to_string();
        let (stand_down, wait) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(TEST_DEADLINE) {
                // Straight to fd 2, not `eprintln!`: this thread inherits the test's output
                // capture, which an abort never prints.
                let say = format!("\n{test} is still running after {TEST_DEADLINE:?}: it hangs; aborting\n");
                // SAFETY: write(2) of a live buffer's bytes to the process's stderr.
                unsafe { libc::write(2, say.as_ptr().cast(), say.len()) };
                std::process::abort();
            }
        });
        Some(Watchdog { _stand_down: stand_down })
    }
}

/// The certificate name admin-cli uses in tests.
pub const ADMIN: &str = "ops";

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let out = run_ok(Command::new(bin("admin-cli")).args(["key", "generate", "--out"]).arg(&prefix));
        assert!(out.contains("key id"), "{out}");
        run_ok(Command::new(bin("admin-cli")).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
        let catalog = dir.path().join("catalog");
        run_ok(Command::new(bin("admin-cli")).args(["key", "generate", "--out"]).arg(&catalog));
        World {
            catalog_key: catalog.with_extension("key"),
            catalog_pub: catalog.with_extension("pub"),
            key: prefix.with_extension("key"),
            pubkey: prefix.with_extension("pub"),
            dir,
            env: vec![],
            admin_env: vec![],
            insecure: false,
            _watchdog: Watchdog::arm(),
        }
    }

    /// A world whose processes talk plaintext (`--insecure`).
    pub fn insecure() -> World {
        World { insecure: true, ..World::new() }
    }

    pub fn scheme(&self) -> &'static str {
        if self.insecure { "http" } else { "https" }
    }

    /// The transport environment for a process called `name` with `role`: its certificate
    /// (issued on first use, for `sans` when it serves) or `UPDRAFT_INSECURE`.
    pub fn tls_env(&self, name: &str, role: &str, sans: &[&str]) -> Vec<(String, String)> {
        if self.insecure {
            return vec![("UPDRAFT_INSECURE".into(), "true".into())];
        }
        let pki = self.path("pki");
        let crt = pki.join(format!("{name}.crt"));
        if !crt.exists() {
            let mut cmd = Command::new(bin("admin-cli"));
            cmd.args(["pki", "issue", name, "--role", role, "--dir"]).arg(&pki);
            if !sans.is_empty() {
                cmd.arg("--san").arg(sans.join(","));
            }
            run_ok(&mut cmd);
        }
        vec![
            ("UPDRAFT_TLS_CA".into(), pki.join("ca.crt").display().to_string()),
            ("UPDRAFT_TLS_CERT".into(), crt.display().to_string()),
            ("UPDRAFT_TLS_KEY".into(), pki.join(format!("{name}.key")).display().to_string()),
        ]
    }

    /// The environment of a process: the world's extra variables and its transport.
    pub fn env_for(&self, name: &str, role: &str, sans: &[&str]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(self.tls_env(name, role, sans));
        env
    }

    /// A connection to `url` presenting a certificate for `name` with `role` (see [`channel`]).
    pub async fn connect_as(&self, url: &str, name: &str, role: &str) -> tonic::transport::Channel {
        channel(self.transport(name, role).endpoint(url).unwrap()).await.unwrap()
    }

    /// A provider called `name` on the store of the provider `of` (the second member of a
    /// switchover pair), on a port the kernel picks.
    pub fn pair_member(&self, name: &str, of: &str) -> (Proc, String) {
        let store = self.path(of);
        let mut args = vec!["--store", store.to_str().unwrap(), "--listen", "127.0.0.1:0", "--name", name];
        args.extend(PROBES);
        args.extend(WEB);
        let mut p = Proc::start_env(self.dir.path(), name, "provider", &args, &self.env_for(name, "provider", &[]));
        let port = p.listening_port();
        wait_port(port);
        (p, format!("{}://127.0.0.1:{port}", self.scheme()))
    }

    /// The transport of an in-test client or server called `name` with `role`.
    pub fn transport(&self, name: &str, role: &str) -> updraft_runtime::tls::Transport {
        if self.insecure {
            return updraft_runtime::tls::Transport::Insecure;
        }
        let env = self.tls_env(name, role, &[]);
        let p = |i: usize| PathBuf::from(&env[i].1);
        updraft_runtime::tls::Transport::from_flags("test", Some(&p(0)), Some(&p(1)), Some(&p(2)), false).unwrap()
    }

    /// A server builder with this world's TLS for an in-test server called `name` (a rogue
    /// provider holds a valid provider certificate, but not the release key).
    pub fn server(&self, name: &str) -> tonic::transport::Server {
        let b = tonic::transport::Server::builder();
        match self.transport(name, "provider") {
            updraft_runtime::tls::Transport::Tls(t) => {
                let c = t.current();
                let (cert, key) = c.identity_pem();
                let tls = tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(c.ca_pem()));
                b.tls_config(tls).unwrap()
            }
            updraft_runtime::tls::Transport::Insecure => b,
        }
    }

    /// Serves a tonic router (a test double) on a fresh loopback port; returns its URL.
    pub fn serve(&self, router: tonic::transport::server::Router) -> String {
        format!("{}://{}", self.scheme(), serve_in_background(router))
    }

    /// The update ids a provider or site holds, read from its own catalog stream (as a site).
    pub fn site_catalog(&self, url: &str) -> Vec<String> {
        use updraft_proto::v1::replication_client::ReplicationClient;
        use updraft_proto::v1::{FollowRequest, catalog_event};
        let ep = self.transport("test-site", "remote-provider").endpoint(url).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut c = ReplicationClient::new(channel(ep).await.unwrap());
            let req = FollowRequest { after_seq: 0, site: "test".into() };
            let mut stream = c.follow_catalog(req).await.unwrap().into_inner();
            let mut ids = Vec::new();
            while let Some(ev) = stream.message().await.unwrap() {
                match ev.change {
                    Some(catalog_event::Change::Upsert(u)) => ids.push(u.id),
                    None if ev.caught_up => break,
                    _ => {}
                }
            }
            ids
        })
    }

    /// Waits until a site has replicated update `id`, so its agents' first check can see it.
    pub fn wait_site_has(&self, url: &str, id: &str) {
        wait_until(&format!("{url} to replicate {id}"), Duration::from_secs(30), || {
            self.site_catalog(url).iter().any(|i| i == id)
        });
    }

    /// Waits until a site holds every catalog change its upstream has made so far (deployments
    /// and states included), so its agents' next check sees them.
    pub fn wait_site_caught_up(&self, site: &str, upstream: &str) {
        let seq = |url: &str| self.admin_json(url, &["site", "status"])["catalog_seq"].as_u64().unwrap_or(0);
        let target = seq(upstream);
        wait_until(&format!("{site} to reach catalog {target}"), Duration::from_secs(30), || seq(site) >= target);
    }

    /// admin-cli with the world's admin certificate.
    pub fn admin_cli(&self) -> Command {
        let mut c = Command::new(bin("admin-cli"));
        c.envs(self.tls_env(ADMIN, "admin", &[])).envs(self.admin_env.iter().cloned());
        c
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Builds a signed package of `product` whose tree holds VERSION and bin/run.
    pub fn package(&self, product: &str, version: &str, key: &Path) -> PathBuf {
        self.package_with(product, version, key, &[])
    }

    /// Like [`World::package`], with extra `package build` flags (install type, labels, ...).
    pub fn package_with(&self, product: &str, version: &str, key: &Path, extra: &[&str]) -> PathBuf {
        let src = self.path(&format!("src-{product}-{version}"));
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        std::fs::write(src.join("bin/run"), format!("#!/bin/sh\necho {product} {version}\n")).unwrap();
        self.build_package(&src, product, version, key, extra)
    }

    /// Packs `src` as `product` `version`, signed with `key`, into `NAME-VERSION.pkg` in the
    /// world's directory, with extra `package build` flags.
    /// A package of `product` `version` signed with the world's key, holding one file of `mib`
    /// MiB of incompressible bytes (for downloads large enough to measure or to hold open).
    pub fn noise_package(&self, product: &str, version: &str, mib: usize) -> PathBuf {
        let src = self.path(&format!("src-{product}-{version}"));
        write_noise(&src.join("data.bin"), mib);
        self.build_package(&src, product, version, &self.key, &[])
    }

    pub fn build_package(&self, src: &Path, product: &str, version: &str, key: &Path, extra: &[&str]) -> PathBuf {
        let out = self.path(&format!("{product}-{version}.pkg"));
        run_ok(
            Command::new(bin("admin-cli"))
                .args(["package", "build", "--product", product, "--version", version, "--from"])
                .env_remove("UPDRAFT_INSECURE")
                .arg(src)
                .arg("--key")
                .arg(key)
                .arg("--out")
                .arg(&out)
                .args(extra),
        );
        out
    }

    /// A provider that trusts the world's release key (`trust`), or accepts unverified
    /// packages (`!trust`), with the content scanner fast enough for tests.
    pub fn provider(&self, name: &str, trust: bool) -> (Proc, String) {
        let pubkey = self.pubkey.to_str().unwrap().to_string();
        let trust_args: Vec<&str> = if trust { vec!["--trust-key", &pubkey] } else { vec!["--allow-unverified"] };
        self.provider_with(name, &trust_args)
    }

    /// A provider on a port the kernel picks (it reports it once bound).
    pub fn provider_with(&self, name: &str, extra: &[&str]) -> (Proc, String) {
        self.provider_env(name, extra, &[])
    }

    /// A provider with extra flags and extra environment variables (as systemd sets them, say).
    pub fn provider_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
        let store = self.path(name);
        self.provider_at(name, store.to_str().unwrap(), extra, env, &[])
    }

    /// A provider with extra flags, run under `wrapper` (see [`Proc::start_under`]).
    pub fn provider_under(&self, name: &str, wrapper: &[&str], extra: &[&str]) -> (Proc, String) {
        let store = self.path(name);
        self.provider_at(name, store.to_str().unwrap(), extra, &[], wrapper)
    }

    /// A provider called `name` with something in its store to move or merge: a published
    /// `editor` 1.0.0.0 (its id is returned), a group `lab`, and machine `m1` (an agent, also
    /// returned) having installed it.
    pub fn provider_with_a_store(&self, name: &str) -> (Proc, String, String, Proc) {
        let (p, url) = self.provider(name, true);
        let id = self.publish(&url, &self.package("editor", "1.0.0.0", &self.key));
        self.admin_ok(&url, &["group", "create", "lab"]);
        let m1 = self.agent("m1", &url);
        wait_until("m1 on v1", Duration::from_secs(40), || {
            self.installed("m1", "editor").as_deref() == Some("1.0.0.0")
        });
        (p, url, id, m1)
    }

    /// A provider called `name` on the PostgreSQL database at `url`, with its content location
    /// in `content` (shared with other providers or its own), trusting the world's release key.
    pub fn provider_on_database(&self, name: &str, url: &str, content: &Path) -> (Proc, String) {
        let pubkey = self.pubkey.to_str().unwrap().to_string();
        self.provider_at(name, url, &["--content", content.to_str().unwrap(), "--trust-key", &pubkey], &[], &[])
    }

    fn provider_at(
        &self,
        name: &str,
        store: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> (Proc, String) {
        let mut args = vec!["--store", store, "--listen", "127.0.0.1:0", "--name", name];
        args.extend(PROBES);
        args.extend(WEB);
        args.extend(["--scan-delay-secs", "0", "--scan-interval-secs", "1", "--scan-quiet-secs", "1"]);
        args.extend(["--bootstrap-admin", ADMIN, "--catalog-key", self.catalog_key.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let mut vars = self.env_for(name, "provider", &[]);
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut p = if wrapper.is_empty() {
            Proc::start_env(self.dir.path(), name, "provider", &args, &vars)
        } else {
            Proc::start_under(self.dir.path(), name, wrapper, "provider", &args, &vars)
        };
        let port = p.listening_port();
        wait_port(port);
        (p, format!("{}://127.0.0.1:{port}", self.scheme()))
    }

    /// Starts a provider called `name` on its store and the port of `url` (a store moved
    /// there, say); a restart of the same process is [`Proc::again`]. Its log is
    /// `NAME-again.log`.
    pub fn restart_provider(&self, name: &str, url: &str) -> Proc {
        let port = url.rsplit(':').next().unwrap().to_string();
        let (store, listen, pubkey) =
            (self.path(name), format!("127.0.0.1:{port}"), self.pubkey.to_str().unwrap().to_string());
        let catalog = self.catalog_key.to_str().unwrap();
        let args = [
            "--store",
            store.to_str().unwrap(),
            "--listen",
            &listen,
            "--name",
            name,
            "--trust-key",
            &pubkey,
            "--catalog-key",
            catalog,
            WEB[0],
            WEB[1],
        ];
        let env = self.env_for(name, "provider", &[]);
        let p = Proc::start_env(self.dir.path(), &format!("{name}-again"), "provider", &args, &env);
        wait_port(port.parse().unwrap());
        p
    }

    pub fn remote(&self, name: &str, upstream: &str) -> (Proc, String) {
        self.remote_with(name, upstream, &[])
    }

    /// A site with extra flags (limits, say).
    pub fn remote_with(&self, name: &str, upstream: &str, extra: &[&str]) -> (Proc, String) {
        self.remote_in_env(name, upstream, extra, &self.env_for(name, "remote-provider", &[]))
    }

    /// A site with the certificate `remote-provider enroll` left in its store directory.
    pub fn enrolled_remote(&self, name: &str, upstream: &str) -> (Proc, String) {
        self.remote_in_env(name, upstream, &[], &self.env)
    }

    /// `remote-provider enroll` for site `name` (its store directory) at `upstream`.
    pub fn enroll_remote(&self, name: &str, upstream: &str, args: &[&str]) -> Output {
        let ca = self.path("pki").join("ca.crt");
        output(
            Command::new(bin("remote-provider"))
                .args(["enroll", "--upstream", upstream, "--ca", ca.to_str().unwrap(), "--name", name, "--store"])
                .arg(self.path(name))
                .args(args),
        )
    }

    fn remote_in_env(&self, name: &str, upstream: &str, extra: &[&str], env: &[(String, String)]) -> (Proc, String) {
        let store = self.path(name);
        let mut args =
            vec!["--upstream", upstream, "--store", store.to_str().unwrap(), "--listen", "127.0.0.1:0", "--name", name];
        args.extend(PROBES);
        args.extend_from_slice(extra);
        let mut p = Proc::start_env(self.dir.path(), name, "remote-provider", &args, env);
        let port = p.listening_port();
        wait_port(port);
        (p, format!("{}://127.0.0.1:{port}", self.scheme()))
    }

    /// An agent that checks at start and then only when pushed or asked (interval one hour).
    /// `provider` may list several URLs, comma-separated, in order of preference.
    pub fn agent(&self, name: &str, provider: &str) -> Proc {
        self.agent_with(name, provider, &["--min-interval", "3600"])
    }

    /// An agent with its own extra flags (e.g. a short check interval). Returns once its
    /// control socket is there (so `agent check` and the like reach it), or once it has exited.
    pub fn agent_with(&self, name: &str, provider: &str, extra: &[&str]) -> Proc {
        self.agent_in_env(name, provider, extra, &self.env_for(name, "agent", &[]))
    }

    /// An agent with the certificate `agent enroll` left in its state directory (no TLS flags:
    /// it finds them there).
    pub fn enrolled_agent(&self, name: &str, provider: &str, extra: &[&str]) -> Proc {
        self.agent_in_env(name, provider, extra, &self.env)
    }

    fn agent_in_env(&self, name: &str, provider: &str, extra: &[&str], env: &[(String, String)]) -> Proc {
        let mut args = self.agent_args(name, extra);
        args.extend(["--provider".to_string(), provider.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let sock = self.state(name).join("agent.sock");
        let _ = std::fs::remove_file(&sock); // a crashed predecessor's
        let mut p = Proc::start_env(self.dir.path(), name, "agent", &args, env);
        wait_until(&format!("agent {name} listening or gone"), Duration::from_secs(30), || sock.exists() || p.exited());
        p
    }

    /// `agent enroll` for agent `name` (its state directory) at `provider` with `args`.
    pub fn enroll_agent(&self, name: &str, provider: &str, args: &[&str]) -> Output {
        let ca = self.path("pki").join("ca.crt");
        output(
            Command::new(bin("agent"))
                .args(["enroll", "--provider", provider, "--ca", ca.to_str().unwrap(), "--state-dir"])
                .arg(self.state(name))
                .args(args),
        )
    }

    /// `agent run` arguments for agent `name` in this world (install root, state, key), with
    /// no provider: callers add `--provider` or `--discover`.
    pub fn agent_args(&self, name: &str, extra: &[&str]) -> Vec<String> {
        let root = self.path(&format!("{name}-root"));
        let state = self.path(&format!("{name}-state"));
        let mut args: Vec<String> =
            ["run", "--install-root", root.to_str().unwrap(), "--state-dir"].iter().map(|s| s.to_string()).collect();
        args.push(state.to_str().unwrap().into());
        args.extend(["--trust-key".into(), self.pubkey.to_str().unwrap().into(), "--name".into(), name.into()]);
        args.extend(["--request-timeout".into(), "10".into()]);
        // Agents pin the world's catalog key, as they must, unless a test opts out.
        if !extra.contains(&"--allow-unsigned-catalog") && !extra.contains(&"--catalog-key") {
            args.extend(["--catalog-key".into(), self.catalog_pub.to_str().unwrap().into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn root(&self, agent: &str) -> PathBuf {
        self.path(&format!("{agent}-root"))
    }

    pub fn state(&self, agent: &str) -> PathBuf {
        self.path(&format!("{agent}-state"))
    }

    /// The installed version of `product` on `agent`, read from disk.
    pub fn installed(&self, agent: &str, product: &str) -> Option<String> {
        std::fs::read_to_string(self.root(agent).join(product).join("VERSION")).ok()
    }

    pub fn admin(&self, provider: &str, args: &[&str]) -> Output {
        output(self.admin_cli().arg("--provider").arg(provider).args(args))
    }

    pub fn admin_ok(&self, provider: &str, args: &[&str]) -> String {
        run_ok(self.admin_cli().arg("--provider").arg(provider).args(args))
    }

    pub fn admin_json(&self, provider: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.admin_ok(provider, &all)).expect("admin-cli --json prints JSON")
    }

    /// Imports and approves a package; returns its id. Machines get it only if they have its
    /// product or are given it (see [`World::publish`]).
    pub fn approve(&self, provider: &str, pkg: &Path) -> String {
        let id = self.admin_ok(provider, &["update", "add", pkg.to_str().unwrap()]).trim().to_string();
        self.admin_ok(provider, &["update", "state", &id, "ga"]);
        id
    }

    /// Imports and approves a package and deploys its product to the default group, so every
    /// machine there takes it: what most tests want. Returns the update id.
    pub fn publish(&self, provider: &str, pkg: &Path) -> String {
        let id = self.approve(provider, pkg);
        self.admin_ok(provider, &["deploy", product_of_id(&id), "--group", "default"]);
        id
    }

    pub fn agent_cmd(&self, agent: &str, args: &[&str]) -> Output {
        output(Command::new(bin("agent")).args(args).arg("--state-dir").arg(self.state(agent)))
    }
}

/// Longest an in-test client waits for a connection (handshakes included), and for each
/// call's answer to begin.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// A channel on `ep` for the harness's own clients: connected within [`CALL_DEADLINE`], and each
/// call answered within it, so a server that stops answering fails the test instead of
/// hanging it. (A stream's later messages are the caller's to bound.)
pub async fn channel(ep: tonic::transport::Endpoint) -> Result<tonic::transport::Channel, String> {
    updraft_runtime::tls::connect_within(ep.timeout(CALL_DEADLINE), CALL_DEADLINE).await
}

/// Serves a tonic router on a fresh loopback port from a background thread with its own
/// runtime (for the test doubles: a rogue provider, an OTLP collector); returns host:port.
pub fn serve_in_background(router: tonic::transport::server::Router) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)).await.unwrap();
        });
    });
    addr.to_string()
}

/// A plain HTTP/1.1 GET (probe ports): the status code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// The product an update id names: ids are "<product>-<version>-<hash prefix>", and versions
/// hold no '-'.
pub fn product_of_id(id: &str) -> &str {
    id.rsplitn(3, '-').nth(2).expect("an update id names its product")
}

/// `mib` MiB of incompressible bytes in a new file at `path` (its directory is made).
pub fn write_noise(path: &std::path::Path, mib: usize) {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

/// Runs the provider binary with `args` (store management, or a start expected to fail):
/// whether it succeeded, and what it printed.
pub fn provider_cmd(args: &[&str]) -> (bool, String) {
    let out = output(Command::new(bin("provider")).args(args));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)))
}

/// Longest a command a test runs (admin-cli, `agent check`, an enrollment …) may take. They
/// finish in seconds; one still running after this hangs, and the test fails naming it
/// instead of holding the whole suite until CI gives up.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(150);

/// Runs `cmd` with stdin closed and returns what it printed, as [`Command::output`] does, within
/// [`COMMAND_DEADLINE`]: past it the command is killed and the test fails with what it printed
/// so far. Its output goes to unnamed files, not pipes, so a process it leaves behind holding
/// them cannot keep this waiting either.
pub fn output(cmd: &mut Command) -> Output {
    use std::io::{Read, Seek};
    let (mut out, mut err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Polled, from every millisecond up to every 20 ms: no SIGCHLD handler, nothing shared
    // with the test's other threads.
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    let finished = loop {
        match child.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if started.elapsed() > COMMAND_DEADLINE => break None,
            None => std::thread::sleep(pause),
        }
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let read = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.rewind().and_then(|_| f.read_to_end(&mut v)).unwrap();
        v
    };
    let Some(status) = finished else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{cmd:?} was still running after {COMMAND_DEADLINE:?}; killed.\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&read(&mut out)),
            String::from_utf8_lossy(&read(&mut err))
        );
    };
    Output { status, stdout: read(&mut out), stderr: read(&mut err) }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}
