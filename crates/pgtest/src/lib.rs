//! A PostgreSQL server of a test's own: a fresh cluster (Debian's `initdb` and `pg_ctl`) in a
//! temporary directory, reached through a Unix socket there — no port to collide with, nothing
//! on the network — and stopped, with its directory, when dropped. Used by the store's engine
//! tests and by the end-to-end tests; `.ci/run` installs Debian's `postgresql` when missing.

/// One running cluster. Its server binaries run as the `postgres` user when the tests run as
/// root (PostgreSQL refuses root).
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    /// The address it listens on, when it does (see [`Cluster::start_in`]).
    addr: Option<String>,
}

impl Cluster {
    /// A cluster reached only through its Unix socket.
    pub fn start() -> Cluster {
        Self::start_with(None)
    }

    /// A cluster whose server runs inside network namespace `netns` and listens on `addr`
    /// there (port 5432), open to its own subnet without a password (a test network of its
    /// own, see `tests/netns.rs`); [`Cluster::tcp_url`] names its databases by that address.
    /// Its socket still serves [`Cluster::database`].
    pub fn start_in(netns: &str, addr: &str) -> Cluster {
        Self::start_with(Some((netns, addr)))
    }

    fn start_with(net: Option<(&str, &str)>) -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max_by_key(|b| b.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()))
            .expect("PostgreSQL's server is not installed (Debian: apt-get install postgresql; .ci/run does)");
        let dir = tempfile::Builder::new().prefix("updraft-pg").tempdir_in("/tmp").unwrap();
        let cluster = Cluster { dir, bin, addr: net.map(|(_, a)| a.to_string()) };
        if is_root() {
            let ok = std::process::Command::new("chown").arg("postgres:").arg(cluster.dir.path()).status().unwrap();
            assert!(ok.success(), "chown the cluster's directory to postgres");
        }
        let data = cluster.data();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"]);
        let conf = format!(
            "listen_addresses = '{}'\nunix_socket_directories = '{}'\nfsync = on\n",
            net.map(|(_, a)| a).unwrap_or(""),
            cluster.dir.path().display()
        );
        let path = cluster.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        if net.is_some() {
            let hba = cluster.dir.path().join("data/pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).unwrap();
            text.push_str("host all all samenet trust\n");
            std::fs::write(&hba, text).unwrap();
        }
        let log = cluster.dir.path().join("log").display().to_string();
        let start = ["-D", data.as_str(), "-l", log.as_str(), "-w", "-t", "120", "start"];
        match net {
            // The server lives in the namespace; stopping it later needs only its pid file.
            Some((ns, _)) => cluster.run_in(Some(ns), "pg_ctl", &start),
            None => cluster.run("pg_ctl", &start),
        };
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// A hot standby of this cluster (`pg_basebackup -R`: it streams this one's WAL), on a
    /// socket of its own; [`Cluster::promote`] makes it the primary.
    pub fn standby(&self) -> Cluster {
        let dir = tempfile::Builder::new().prefix("updraft-pg").tempdir_in("/tmp").unwrap();
        let standby = Cluster { dir, bin: self.bin.clone(), addr: None };
        if is_root() {
            let ok = std::process::Command::new("chown").arg("postgres:").arg(standby.dir.path()).status().unwrap();
            assert!(ok.success(), "chown the standby's directory to postgres");
        }
        let (socket, data) = (self.socket(), standby.data());
        standby
            .run("pg_basebackup", &["-h", &socket, "-U", "postgres", "-D", &data, "-R", "-X", "stream", "-c", "fast"]);
        // Its own socket (the copied configuration names the primary's).
        let path = standby.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("unix_socket_directories = '{}'\n", standby.socket()));
        std::fs::write(&path, text).unwrap();
        let log = standby.dir.path().join("log").display().to_string();
        standby.run("pg_ctl", &["-D", &data, "-l", &log, "-w", "-t", "120", "start"]);
        standby
    }

    /// From now on a commit here returns only once a standby has it (no acknowledged write is
    /// lost when the standby takes over).
    pub fn synchronous(&self) {
        let socket = self.socket();
        self.run("psql", &["-h", &socket, "-U", "postgres", "-c", "ALTER SYSTEM SET synchronous_standby_names = '*'"]);
        self.run("pg_ctl", &["-D", &self.data(), "-w", "reload"]);
    }

    /// Promotes this standby to a primary, and waits until it accepts writes.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-w", "promote"]);
    }

    /// Stops the server at once, as a crash would (the directory stays until dropped).
    pub fn crash(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    /// The directory of its Unix socket: a `host` in a connection string.
    pub fn socket(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Runs `pgbench` on `database` with `script` (a file the `postgres` user can read) and
    /// `args`; returns its transactions per second.
    pub fn pgbench(&self, database: &str, script: &std::path::Path, args: &[&str]) -> f64 {
        let socket = self.dir.path().display().to_string();
        let file = self.dir.path().join("pgbench.sql");
        std::fs::copy(script, &file).unwrap();
        let file = file.display().to_string();
        let mut all = vec!["-h", &socket, "-U", "postgres", "-n", "-f", &file];
        all.extend_from_slice(args);
        all.push(database);
        let out = self.run("pgbench", &all);
        out.lines()
            .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no tps in pgbench's output: {out}"))
    }

    fn run(&self, tool: &str, args: &[&str]) -> String {
        self.run_in(None, tool, args)
    }

    fn run_in(&self, netns: Option<&str>, tool: &str, args: &[&str]) -> String {
        let out = self.command(netns, tool).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{tool} {args:?}: {text}");
        text
    }

    /// `[ip netns exec NETNS] [runuser -u postgres --] TOOL`: the server's tools refuse root.
    fn command(&self, netns: Option<&str>, tool: &str) -> std::process::Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        if is_root() {
            argv.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
        }
        argv.push(self.bin.join(tool).into());
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// The default database's URL: the socket directory, percent-encoded as the host.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        let host = self.dir.path().display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{host}/{database}")
    }

    /// Database `name`'s URL naming this cluster and `standby` as its hosts, with
    /// `target_session_attrs=read-write`: a client connects to whichever is the primary.
    pub fn url_with(&self, standby: &Cluster, name: &str) -> String {
        let host = |c: &Cluster| c.socket().replace('/', "%2F");
        format!("postgres://postgres@{},{}/{name}?target_session_attrs=read-write", host(self), host(standby))
    }

    /// Database `name`'s URL over TCP, for a cluster started with [`Cluster::start_in`].
    pub fn tcp_url(&self, name: &str) -> String {
        let addr = self.addr.as_deref().expect("a cluster started with start_in listens on an address");
        format!("postgres://postgres@{addr}:5432/{name}")
    }

    /// A new, empty database `name`, and its URL.
    pub fn database(&self, name: &str) -> String {
        let socket = self.dir.path().display().to_string();
        self.run("createdb", &["-h", &socket, "-U", "postgres", name]);
        self.url_of(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Not `run`: a cluster already crashed on purpose has nothing to stop.
        if self.dir.path().join("data/postmaster.pid").exists() {
            let _ = self.command(None, "pg_ctl").args(["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
        }
    }
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
