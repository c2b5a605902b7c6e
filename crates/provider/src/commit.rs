//! Group commit for the store. One thread flushes the engine for every writer waiting at that moment,
//! checking the fence first, so a flush costs one fsync however many writes it covers, and
//! nothing waits on an engine's asynchronous flush (sled's concurrent `flush_async` futures can be
//! left unwoken: sled #1241, #1308). Writes nobody waits on (a machine's last contact, recorded on every check) are
//! flushed by the next commit, within [`FLUSH_EVERY`].
//!
//! The invariant: [`Committer::durable`] returns `Ok` only after a flush that *began after it
//! was called* has finished, so every write made before the call is on disk.
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::db::Db;
use crate::error::{ProviderError, Result};
use crate::pair::Fence;

/// Longest time a write nobody waits on stays only in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Work done on the commit thread before each flush (writes gathered in memory); a failure
/// fails the writers waiting on that flush.
pub type BeforeFlush = Box<dyn Fn() -> Result<()> + Send>;

#[derive(Default)]
struct Queue {
    /// Generations asked for by waiting writers; the flusher serves all of them at once.
    requested: u64,
    /// Writes nobody waits on are waiting for a flush.
    dirty: bool,
    /// The last store handle is gone: flush once more and stop.
    stop: bool,
}

/// How the last flush ended, for the generations it covered.
#[derive(Clone, Debug)]
struct Flushed {
    generation: u64,
    failure: Option<Failure>,
}

#[derive(Clone, Debug)]
enum Failure {
    Fenced { mine: u64, current: u64 },
    Io(String),
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The store's side of the commit thread. Dropping it stops the thread after a final flush
/// (fence permitting) and waits for it, so the database is released when the store is.
pub struct Committer {
    shared: Arc<Shared>,
    done: watch::Receiver<Flushed>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the commit thread for `db`; `before` runs before every flush (writes gathered in
    /// memory, such as machines' contacts, join the commit there).
    pub fn start(db: Db, fence: Arc<OnceLock<Fence>>, before: BeforeFlush) -> Result<Self> {
        let shared = Arc::new(Shared { queue: Mutex::new(Queue::default()), wake: Condvar::new() });
        let (tx, done) = watch::channel(Flushed { generation: 0, failure: None });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || run(db, fence, before, thread_shared, tx))
            .map_err(|e| ProviderError::Io(format!("cannot start the store's commit thread: {e}")))?;
        Ok(Self { shared, done, thread: Some(thread) })
    }

    /// Waits until every write made before this call is on disk (or the fence refused it).
    pub async fn durable(&self) -> Result<()> {
        let mine = {
            let mut q = self.shared.queue.lock().map_err(|_| poisoned())?;
            q.requested += 1;
            q.requested
        };
        self.shared.wake.notify_one();
        let mut done = self.done.clone();
        let flushed = done
            .wait_for(|f| f.generation >= mine)
            .await
            .map_err(|_| ProviderError::Store("the store's commit thread has stopped".into()))?
            .clone();
        match flushed.failure {
            None => Ok(()),
            Some(Failure::Fenced { mine, current }) => Err(ProviderError::Fenced { mine, current }),
            Some(Failure::Io(e)) => Err(ProviderError::Store(format!("flushing the store: {e}"))),
        }
    }

    /// Marks writes that nobody waits on: the next commit, within [`FLUSH_EVERY`], takes them.
    pub fn soon(&self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.dirty = true;
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.stop = true;
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poisoned() -> ProviderError {
    ProviderError::Store("the store's commit queue is poisoned".into())
}

fn run(db: Db, fence: Arc<OnceLock<Fence>>, before: BeforeFlush, shared: Arc<Shared>, tx: watch::Sender<Flushed>) {
    let mut served = 0u64;
    loop {
        let (generation, stop) = {
            let Ok(mut q) = shared.queue.lock() else { return };
            loop {
                if q.requested > served || q.stop {
                    break;
                }
                let (next, timeout) = match shared.wake.wait_timeout(q, FLUSH_EVERY) {
                    Ok(x) => x,
                    Err(_) => return,
                };
                q = next;
                if timeout.timed_out() && q.dirty {
                    break;
                }
            }
            q.dirty = false;
            (q.requested, q.stop)
        };
        // The fence first: a superseded provider writes nothing more, gathered writes included.
        let failure = match fence.get().map(Fence::check) {
            Some(Err(ProviderError::Fenced { mine, current })) => Some(Failure::Fenced { mine, current }),
            Some(Err(e)) => Some(Failure::Io(e.to_string())),
            _ => {
                let gathered = before().err().map(|e| Failure::Io(e.to_string()));
                db.flush().err().map(|e| Failure::Io(e.to_string())).or(gathered)
            }
        };
        if let Some(f) = &failure {
            tracing::error!(failure = ?f, "store flush refused or failed");
        }
        served = generation;
        tx.send_replace(Flushed { generation, failure });
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_writers_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_embedded(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        let c = Arc::new(Committer::start(db.clone(), Default::default(), Box::new(|| Ok(()))).unwrap());
        let tasks: Vec<_> = (0..500u32)
            .map(|i| {
                let (c, t) = (c.clone(), t.clone());
                tokio::spawn(async move {
                    t.insert(i.to_be_bytes(), b"x").unwrap();
                    c.durable().await
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
        let all = all.expect("no writer is left waiting");
        assert!(all.into_iter().all(|r| r.unwrap().is_ok()));
        // Writes nobody waits on are flushed by the next commit.
        t.insert(b"contact", b"y").unwrap();
        c.soon();
        drop(c);
    }

    #[tokio::test]
    async fn a_fenced_store_refuses_to_commit() {
        let dir = tempfile::tempdir().unwrap();
        let pair = crate::pair::PairDir::open(dir.path()).unwrap();
        let mine = pair.take_over("a", "http://a:1").unwrap();
        let fence = Arc::new(OnceLock::new());
        let _ = fence.set(pair.fence(mine));
        let c =
            Committer::start(Db::open_embedded(&dir.path().join("db")).unwrap(), fence, Box::new(|| Ok(()))).unwrap();
        c.durable().await.unwrap();
        pair.take_over("b", "http://b:1").unwrap();
        assert!(matches!(c.durable().await, Err(ProviderError::Fenced { .. })));
    }
}
