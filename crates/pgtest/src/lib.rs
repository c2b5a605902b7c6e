//! A PostgreSQL server of a test's own: a fresh cluster (Debian's `initdb` and `pg_ctl`) in a
//! temporary directory, reached through a Unix socket there — no port to collide with, nothing
//! on the network — and stopped, with its directory, when dropped. Used by the store's engine
//! tests and by the end-to-end tests; `.ci/run` installs Debian's `postgresql` when missing.

/// One running cluster. Its server binaries run as the `postgres` user when the tests run as
/// root (PostgreSQL refuses root).
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl Cluster {
    pub fn start() -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max_by_key(|b| b.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()))
            .expect("PostgreSQL's server is not installed (Debian: apt-get install postgresql; .ci/run does)");
        let dir = tempfile::Builder::new().prefix("updraft-pg").tempdir_in("/tmp").unwrap();
        let cluster = Cluster { dir, bin };
        if is_root() {
            let ok = std::process::Command::new("chown").arg("postgres:").arg(cluster.dir.path()).status().unwrap();
            assert!(ok.success(), "chown the cluster's directory to postgres");
        }
        let data = cluster.data();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"]);
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nfsync = on\n",
            cluster.dir.path().display()
        );
        let path = cluster.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        let log = cluster.dir.path().join("log").display().to_string();
        cluster.run("pg_ctl", &["-D", &data, "-l", &log, "-w", "-t", "120", "start"]);
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
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
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{tool} {args:?}: {text}");
        text
    }

    /// The default database's URL: the socket directory, percent-encoded as the host.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        let host = self.dir.path().display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{host}/{database}")
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
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
