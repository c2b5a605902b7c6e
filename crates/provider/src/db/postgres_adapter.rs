//! The shared engine: PostgreSQL. Every tree is the rows of one table keyed by (tree, key), so
//! the store's layout needs no schema of its own and a new tree is a new name, not a migration.
//!
//! Connections are owned by worker threads, one each: the synchronous client blocks on its own
//! runtime, which must never happen on a thread that drives the provider's async tasks. A call
//! leases a worker from a bounded pool, hands it a job and waits for the answer — telling tokio
//! first, when the caller is an async worker, so its other tasks move elsewhere meanwhile; a
//! transaction keeps its worker from `BEGIN` to `COMMIT`. Transactions run `SERIALIZABLE`, one
//! of this process at a time, and are run again when PostgreSQL reports a serialization failure
//! or deadlock (another provider's transaction), as the seam allows.
//!
//! Every wait on the server is bounded (connecting, unacknowledged bytes, keepalives at both
//! ends); a server that cannot be reached is [`Error::Unreachable`], not a refused statement.
//!
//! Every statement outside a transaction, and every `COMMIT`, is durable when it returns
//! (PostgreSQL's `synchronous_commit`), so [`Engine::flush`] has nothing left to do. A lost
//! connection is dropped from the pool and a new one is made on the next lease; with several
//! hosts and `target_session_attrs=read-write` in the URL, that is how a failover is followed.
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{NoTls, Row, Statement};

use super::{Engine, EngineTx, Entry, Error, Held, Iter, Result, TxStep, Value};

const ENGINE: &str = "postgresql";
/// Connections one provider holds at most.
const POOL_SIZE: usize = 8;
/// Rows fetched per round trip when iterating.
const PAGE: i64 = 512;
/// Attempts at a transaction that keeps meeting serialization failures.
const TX_ATTEMPTS: usize = 100;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS updraft_trees (name TEXT PRIMARY KEY);
    CREATE TABLE IF NOT EXISTS updraft_kv (
        tree TEXT NOT NULL,
        k BYTEA NOT NULL,
        v BYTEA NOT NULL,
        PRIMARY KEY (tree, k)
    );
    CREATE SEQUENCE IF NOT EXISTS updraft_ids;
";

/// An error from the client: [`Error::Unreachable`] when the server cannot be reached or has
/// gone (no answer at all, a connection exception, the server shutting down or read-only after a
/// failover), [`Error::Engine`] when it refused a statement.
fn err(e: &postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let message = format!("{} ({})", db.message(), db.code().code());
            let code = db.code().code();
            if code.starts_with("08") || code.starts_with("57P") || code == "25006" {
                Error::Unreachable { engine: ENGINE, message }
            } else {
                Error::Engine { engine: ENGINE, message }
            }
        }
        None => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            Error::Unreachable { engine: ENGINE, message }
        }
    }
}

/// How long a provider waits for the database server before it takes it for unreachable:
/// connecting, and for a statement's bytes to be acknowledged (a link cut, a host gone).
const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Bounds every wait on the server, unless the connection string chose otherwise: connecting,
/// unacknowledged bytes (`tcp_user_timeout`), and a silent peer on an idle connection (TCP
/// keepalives, at both ends, so the server also drops a cut-off provider's session and its
/// duty locks within seconds instead of the system's two hours).
fn bounded(mut config: postgres::Config) -> postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(REACH_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(REACH_TIMEOUT);
    }
    if config.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(3));
        config.keepalives_interval(std::time::Duration::from_secs(1)).keepalives_retries(3);
    }
    if config.get_options().is_none() {
        config.options(&format!(
            "-c tcp_keepalives_idle=3 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 -c tcp_user_timeout={}",
            REACH_TIMEOUT.as_millis()
        ));
    }
    config
}

fn retryable(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// A connection and the statements prepared on it.
struct Conn {
    client: postgres::Client,
    prepared: HashMap<String, Statement>,
}

impl Conn {
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> std::result::Result<Vec<Row>, postgres::Error> {
        let statement = match self.prepared.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = self.client.prepare(sql)?;
                self.prepared.insert(sql.to_string(), s.clone());
                s
            }
        };
        self.client.query(&statement, params)
    }
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// One connection on its own thread.
struct Worker {
    jobs: mpsc::Sender<Job>,
    /// The connection was lost: do not give this worker out again.
    broken: bool,
}

impl Worker {
    fn connect(config: &postgres::Config) -> Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready, connected) = mpsc::channel();
        let config = config.clone();
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                let mut conn = match config.connect(NoTls) {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        Conn { client, prepared: HashMap::new() }
                    }
                    Err(e) => return drop(ready.send(Err(err(&e)))),
                };
                // Ends when the worker (its sender) is dropped.
                for job in inbox {
                    job(&mut conn);
                }
            })
            .map_err(|e| Error::Engine { engine: ENGINE, message: format!("cannot start a connection thread: {e}") })?;
        blocking(|| connected.recv()).map_err(|_| gone())??;
        Ok(Worker { jobs, broken: false })
    }

    /// Runs `f` on this worker's connection and waits for its answer.
    fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> std::result::Result<R, postgres::Error> + Send + 'static,
    ) -> std::result::Result<R, Failure> {
        let (answer, answered) = mpsc::channel();
        let job: Job = Box::new(move |conn| {
            let out = f(conn);
            let _ = answer.send((out, conn.client.is_closed()));
        });
        if self.jobs.send(job).is_err() {
            self.broken = true;
            return Err(Failure::Other(gone()));
        }
        let (out, closed) = blocking(|| answered.recv()).map_err(|_| {
            self.broken = true;
            Failure::Other(gone())
        })?;
        self.broken |= closed;
        out.map_err(|e| if retryable(&e) { Failure::Retry(err(&e)) } else { Failure::Other(err(&e)) })
    }
}

/// Runs `f`, which waits on the database server, telling tokio first when the caller is one of
/// a multi-threaded runtime's workers (the store's calls are synchronous, made from async
/// handlers): the worker's other tasks move to another thread instead of waiting behind this
/// one, so a slow statement never stalls checks that need no database at all.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn gone() -> Error {
    Error::Engine { engine: ENGINE, message: "the connection's thread has stopped".into() }
}

/// Why a statement failed: worth running the transaction again, or not.
enum Failure {
    Retry(Error),
    Other(Error),
}

impl Failure {
    fn error(&self) -> &Error {
        match self {
            Failure::Retry(e) | Failure::Other(e) => e,
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Retry(e) | Failure::Other(e) => e,
        }
    }
}

struct Pool {
    config: postgres::Config,
    state: Mutex<PoolState>,
    freed: Condvar,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Worker>,
    open: usize,
}

/// A worker lent out of the pool; back in it when dropped, unless its connection was lost.
struct Lease<'a> {
    pool: &'a Pool,
    worker: Option<Worker>,
}

impl Pool {
    fn lease(&self) -> Result<Lease<'_>> {
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(worker) = state.idle.pop() {
                return Ok(Lease { pool: self, worker: Some(worker) });
            }
            if state.open < POOL_SIZE {
                state.open += 1;
                drop(state);
                return match Worker::connect(&self.config) {
                    Ok(worker) => Ok(Lease { pool: self, worker: Some(worker) }),
                    Err(e) => {
                        self.state.lock().map_err(|_| poisoned())?.open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            state = blocking(|| self.freed.wait(state)).map_err(|_| poisoned())?;
        }
    }
}

impl Lease<'_> {
    fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> std::result::Result<R, postgres::Error> + Send + 'static,
    ) -> std::result::Result<R, Failure> {
        self.worker.as_mut().expect("a lease holds its worker until dropped").run(f)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else { return };
        if let Ok(mut state) = self.pool.state.lock() {
            if worker.broken {
                state.open -= 1;
            } else {
                state.idle.push(worker);
            }
        }
        self.pool.freed.notify_one();
    }
}

fn poisoned() -> Error {
    Error::Engine { engine: ENGINE, message: "the connection pool is poisoned".into() }
}

pub struct PgEngine {
    pool: Arc<Pool>,
    trees: RwLock<Vec<String>>,
    /// Taken by each transaction attempt (see [`Engine::transaction`]).
    transactions: Mutex<()>,
}

impl PgEngine {
    /// Connects to the database at `url` (`postgres://…` or `host=… dbname=…`; several hosts
    /// and `target_session_attrs=read-write` are understood) and creates the tables if needed.
    pub fn open(url: &str) -> Result<Self> {
        let config: postgres::Config = url.parse().map_err(|e: postgres::Error| Error::Engine {
            engine: ENGINE,
            message: format!("not a PostgreSQL connection string ({e}): {}", redact(url)),
        })?;
        let config = bounded(config);
        let pool = Arc::new(Pool { config, state: Mutex::new(PoolState::default()), freed: Condvar::new() });
        pool.lease()?
            .run(|c| {
                // Two providers starting at once must not race to create the same tables.
                let mut tx = c.client.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock(7463)", &[])?;
                tx.batch_execute(SCHEMA)?;
                tx.commit()
            })
            .map_err(Error::from)?;
        Ok(Self { pool, trees: RwLock::new(Vec::new()), transactions: Mutex::new(()) })
    }

    fn tree_name(&self, index: usize) -> Result<String> {
        let trees = self.trees.read().map_err(|_| poisoned())?;
        trees
            .get(index)
            .cloned()
            .ok_or_else(|| Error::Engine { engine: ENGINE, message: format!("no open tree {index}") })
    }

    fn one<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> std::result::Result<R, postgres::Error> + Send + 'static,
    ) -> Result<R> {
        Ok(self.pool.lease()?.run(f)?)
    }
}

/// A connection string with its password, if any, left out (for messages).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ if url.contains("password") => "(a connection string with a password)".into(),
        _ => url.to_string(),
    }
}

const GET: &str = "SELECT v FROM updraft_kv WHERE tree = $1 AND k = $2";
const INSERT: &str = "WITH old AS (SELECT v FROM updraft_kv WHERE tree = $1 AND k = $2 FOR UPDATE),
     new AS (INSERT INTO updraft_kv (tree, k, v) VALUES ($1, $2, $3)
             ON CONFLICT (tree, k) DO UPDATE SET v = EXCLUDED.v)
     SELECT v FROM old";
const REMOVE: &str = "DELETE FROM updraft_kv WHERE tree = $1 AND k = $2 RETURNING v";

fn get(c: &mut Conn, tree: &str, key: &[u8]) -> std::result::Result<Option<Value>, postgres::Error> {
    Ok(c.query(GET, &[&tree, &key])?.first().map(|r| r.get(0)))
}

fn insert(c: &mut Conn, tree: &str, key: &[u8], value: &[u8]) -> std::result::Result<Option<Value>, postgres::Error> {
    Ok(c.query(INSERT, &[&tree, &key, &value])?.first().map(|r| r.get(0)))
}

fn remove(c: &mut Conn, tree: &str, key: &[u8]) -> std::result::Result<Option<Value>, postgres::Error> {
    Ok(c.query(REMOVE, &[&tree, &key])?.first().map(|r| r.get(0)))
}

impl Engine for PgEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn open_tree(&self, name: &str) -> Result<usize> {
        if let Some(i) = self.trees.read().map_err(|_| poisoned())?.iter().position(|n| n == name) {
            return Ok(i);
        }
        let owned = name.to_string();
        self.one(move |c| {
            c.query("INSERT INTO updraft_trees (name) VALUES ($1) ON CONFLICT DO NOTHING", &[&owned]).map(drop)
        })?;
        let mut trees = self.trees.write().map_err(|_| poisoned())?;
        if let Some(i) = trees.iter().position(|n| n == name) {
            return Ok(i);
        }
        trees.push(name.to_string());
        Ok(trees.len() - 1)
    }

    fn tree_names(&self) -> Result<Vec<String>> {
        self.one(|c| {
            Ok(c.query("SELECT name FROM updraft_trees ORDER BY name", &[])?.iter().map(|r| r.get(0)).collect())
        })
    }

    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let (tree, key) = (self.tree_name(tree)?, key.to_vec());
        self.one(move |c| get(c, &tree, &key))
    }

    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>> {
        let (tree, key, value) = (self.tree_name(tree)?, key.to_vec(), value.to_vec());
        self.one(move |c| insert(c, &tree, &key, &value))
    }

    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let (tree, key) = (self.tree_name(tree)?, key.to_vec());
        self.one(move |c| remove(c, &tree, &key))
    }

    fn len(&self, tree: usize) -> Result<usize> {
        let tree = self.tree_name(tree)?;
        self.one(move |c| {
            let n: i64 = c.query("SELECT count(*) FROM updraft_kv WHERE tree = $1", &[&tree])?[0].get(0);
            Ok(n as usize)
        })
    }

    fn range(&self, tree: usize, from: Bound<&[u8]>, to: Bound<&[u8]>, rev: bool) -> Result<Iter<'_>> {
        Ok(Box::new(Pages {
            pool: &self.pool,
            tree: self.tree_name(tree)?,
            from: from.map(<[u8]>::to_vec),
            to: to.map(<[u8]>::to_vec),
            rev,
            buffered: VecDeque::new(),
            done: false,
        }))
    }

    fn shared(&self) -> bool {
        true
    }

    fn hold(&self, duty: &str) -> Result<Option<Box<dyn Held>>> {
        // A session lock on a connection of the duty's own, outside the pool: released when
        // the handle (its connection) goes, or when this process or its connection dies.
        let mut worker = Worker::connect(&self.pool.config)?;
        let duty = duty.to_string();
        let got = worker.run(move |c| {
            Ok(c.client.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&duty])?.get::<_, bool>(0))
        })?;
        Ok(got.then(|| Box::new(Duty(Mutex::new(worker))) as Box<dyn Held>))
    }

    fn transaction(&self, f: &dyn Fn(&dyn EngineTx) -> TxStep) -> Result<()> {
        let mut last = None;
        for attempt in 0..TX_ATTEMPTS {
            if attempt > 0 {
                let pause = std::time::Duration::from_millis(fastrand::u64(1..=(attempt as u64).min(20)));
                blocking(|| std::thread::sleep(pause));
            }
            // One transaction of this process at a time: they nearly all meet at the catalog's
            // sequence number, and run one after another they never fail each other (only
            // another provider's can), where concurrent ones kept failing, backing off and
            // running again. (A database-wide lock taken before `BEGIN`, to do the same across
            // providers, cost more round trips than the conflicts it saved: measured, not kept.)
            let _turn = blocking(|| self.transactions.lock()).map_err(|_| poisoned())?;
            let mut lease = self.pool.lease()?;
            lease.run(|c| c.client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE"))?;
            let tx = PgTx { engine: self, lease: std::cell::RefCell::new(lease), failed: Cell::new(None) };
            let step = f(&tx);
            let PgTx { lease, failed, .. } = tx;
            let mut lease = lease.into_inner();
            let outcome = match (failed.into_inner(), step) {
                (Some(failure), _) => Err(failure),
                (None, TxStep::Abort) => lease.run(|c| c.client.batch_execute("ROLLBACK")),
                (None, TxStep::Commit) => lease.run(|c| c.client.batch_execute("COMMIT")),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(failure) => {
                    // Whatever failed, leave the connection outside any transaction.
                    let _ = lease.run(|c| c.client.batch_execute("ROLLBACK"));
                    match failure {
                        Failure::Retry(e) => last = Some(e),
                        Failure::Other(e) => return Err(e),
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Engine { engine: ENGINE, message: "a transaction kept conflicting".into() }))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn generate_id(&self) -> Result<u64> {
        self.one(|c| {
            let n: i64 = c.query("SELECT nextval('updraft_ids')", &[])?[0].get(0);
            Ok(n as u64)
        })
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.one(|c| {
            let q = "SELECT pg_total_relation_size('updraft_kv') + pg_total_relation_size('updraft_trees')";
            let n: i64 = c.query(q, &[])?[0].get(0);
            Ok(n.max(0) as u64)
        })
    }
}

/// A duty's lock, held by its connection.
struct Duty(Mutex<Worker>);

impl Held for Duty {
    fn still_held(&self) -> bool {
        let Ok(mut worker) = self.0.lock() else { return false };
        !worker.broken && worker.run(|c| c.client.simple_query("SELECT 1").map(drop)).is_ok()
    }
}

/// A transaction's statements, all on its leased connection; the first failure is kept and
/// decides the outcome (a serialization failure runs the transaction again).
struct PgTx<'a> {
    engine: &'a PgEngine,
    lease: std::cell::RefCell<Lease<'a>>,
    failed: Cell<Option<Failure>>,
}

impl PgTx<'_> {
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> std::result::Result<R, postgres::Error> + Send + 'static,
    ) -> Result<R> {
        // After a failed statement PostgreSQL refuses the rest of the transaction.
        let outcome = match self.failed.take() {
            Some(failure) => Err(failure),
            None => self.lease.borrow_mut().run(f),
        };
        outcome.map_err(|failure| {
            let e = failure.error().clone();
            self.failed.set(Some(failure));
            e
        })
    }
}

impl EngineTx for PgTx<'_> {
    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let (tree, key) = (self.engine.tree_name(tree)?, key.to_vec());
        self.run(move |c| get(c, &tree, &key))
    }

    fn insert(&self, tree: usize, key: &[u8], value: &[u8]) -> Result<Option<Value>> {
        let (tree, key, value) = (self.engine.tree_name(tree)?, key.to_vec(), value.to_vec());
        self.run(move |c| insert(c, &tree, &key, &value))
    }

    fn remove(&self, tree: usize, key: &[u8]) -> Result<Option<Value>> {
        let (tree, key) = (self.engine.tree_name(tree)?, key.to_vec());
        self.run(move |c| remove(c, &tree, &key))
    }
}

/// A range read a page at a time, each page on whichever connection is free (like sled's
/// iterators, not a snapshot: it sees what is there when each page is read).
struct Pages<'a> {
    pool: &'a Pool,
    tree: String,
    /// What is left to read.
    from: Bound<Vec<u8>>,
    to: Bound<Vec<u8>>,
    rev: bool,
    buffered: VecDeque<Entry>,
    done: bool,
}

impl Pages<'_> {
    fn fetch(&mut self) -> Result<()> {
        let mut sql = String::from("SELECT k, v FROM updraft_kv WHERE tree = $1");
        let mut params: Vec<Vec<u8>> = Vec::new();
        for (bound, incl, excl) in [(&self.from, ">=", ">"), (&self.to, "<=", "<")] {
            let op = match bound {
                Bound::Included(k) => (incl, k),
                Bound::Excluded(k) => (excl, k),
                Bound::Unbounded => continue,
            };
            params.push(op.1.clone());
            sql.push_str(&format!(" AND k {} ${}", op.0, params.len() + 1));
        }
        sql.push_str(if self.rev { " ORDER BY k DESC" } else { " ORDER BY k" });
        sql.push_str(&format!(" LIMIT {PAGE}"));
        let tree = self.tree.clone();
        let rows: Vec<Entry> = self.pool.lease()?.run(move |c| {
            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&tree];
            args.extend(params.iter().map(|p| p as &(dyn ToSql + Sync)));
            Ok(c.query(&sql, &args)?.iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        self.done = (rows.len() as i64) < PAGE;
        if let Some((last, _)) = rows.last() {
            let next = Bound::Excluded(last.clone());
            if self.rev { self.to = next } else { self.from = next }
        }
        self.buffered.extend(rows);
        Ok(())
    }
}

impl Iterator for Pages<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffered.is_empty()
            && !self.done
            && let Err(e) = self.fetch()
        {
            self.done = true;
            return Some(Err(e));
        }
        self.buffered.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(super::redact("postgres://u:secret@db1,db2/updraft"), "postgres://…@db1,db2/updraft");
        assert!(!super::redact("host=db password=secret").contains("secret"));
    }
}
