//! Reading a stored blob to send it, in chunks, the way that costs least: each chunk is read
//! straight into the memory it is sent from (no copy between a file buffer and the chunk), on
//! the serving task itself while the bytes are in the page cache (`preadv2` with `RWF_NOWAIT`:
//! no hand-off to another thread, no context switch), and on the blocking pool only for what
//! must wait for the disk. The streams a server is sending share their buffers, last in first
//! out: a chunk is read into the buffer the connection finished sending most recently, which is
//! still in the CPU's cache, so a download allocates nothing per chunk, never zeroes memory
//! twice, and the copy from the page cache writes to cached memory (with a few buffers per
//! stream instead, 100 downloads at once cost 1.22–1.28 times nginx's CPU per byte, shared
//! 1.16–1.20: `UPDRAFT_BENCH=serving`). The buffers go when the last stream does.
//!
//! The invariant: a chunk handed out is exactly the blob's bytes at its offset; a blob shorter
//! than the size it was served with is an error, never a short or padded chunk.
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use rustix::io::{Errno, ReadWriteFlags};

/// Reads one blob from an offset to its end, one chunk at a time.
pub struct ChunkReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
    chunk: usize,
    spare: Arc<Spare>,
    /// Chunks that had to wait for the disk (read on the blocking pool).
    waited: u64,
}

/// Buffers kept for the next chunks while streams are being sent (at 256 KiB, 16 MiB): beyond
/// them a buffer sent is freed. Fewer (16) left 100 streams at once allocating and zeroing
/// buffers often enough to lose the gain.
const SPARES: usize = 64;

/// Buffers chunks were sent from, back once the connection is done with them; the last one
/// back is the first one out.
#[derive(Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

/// The memory chunks of `chunk` bytes are read into, shared by every blob a server is sending
/// at once: the spare buffers live as long as some stream or chunk holds them, and none are
/// kept once the last has gone.
pub struct ChunkBuffers {
    chunk: usize,
    live: Mutex<Weak<Spare>>,
}

impl ChunkBuffers {
    pub fn new(chunk: usize) -> Self {
        assert!(chunk > 0, "chunks have bytes");
        Self { chunk, live: Mutex::new(Weak::new()) }
    }

    /// The spare buffers of the streams being sent, or new (empty) ones when none is.
    fn share(&self) -> Arc<Spare> {
        let mut live = self.live.lock().expect("chunk buffers");
        live.upgrade().unwrap_or_else(|| {
            let spare = Arc::default();
            *live = Arc::downgrade(&spare);
            spare
        })
    }
}

/// A chunk's memory, lent to the connection: its first `len` bytes are the chunk; dropped
/// (the last `Bytes` sharing it gone), it goes back to the spares it came from.
struct Lent {
    buf: Vec<u8>,
    len: usize,
    spare: Arc<Spare>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut spare = self.spare.0.lock().expect("spare chunk buffers");
        if spare.len() < SPARES {
            spare.push(std::mem::take(&mut self.buf));
        }
    }
}

impl ChunkReader {
    /// Opens `path` (on the blocking pool: opening may wait for the disk) to read from
    /// `offset` up to `size` (the blob's size as served), in chunks of `buffers`' size (the
    /// last shorter), read into `buffers`.
    pub async fn open(path: PathBuf, offset: u64, size: u64, buffers: &ChunkBuffers) -> io::Result<ChunkReader> {
        let file = blocking(move || File::open(path)).await?;
        Ok(ChunkReader {
            file: Arc::new(file),
            pos: offset.min(size),
            end: size,
            chunk: buffers.chunk,
            spare: buffers.share(),
            waited: 0,
        })
    }

    /// How many chunks so far had to wait for the disk.
    pub fn waited(&self) -> u64 {
        self.waited
    }

    /// The next chunk and its offset in the blob, or `None` at the end.
    pub async fn next(&mut self) -> io::Result<Option<(u64, Bytes)>> {
        let len = (self.end - self.pos).min(self.chunk as u64) as usize;
        if len == 0 {
            return Ok(None);
        }
        let spare = self.spare.0.lock().expect("spare chunk buffers").pop();
        let mut buf = spare.unwrap_or_else(|| vec![0; self.chunk]);
        let (pos, file) = (self.pos, self.file.clone());
        let cached = read_cached(&file, &mut buf[..len], pos)?;
        if cached < len {
            self.waited += 1;
            buf = blocking(move || file.read_exact_at(&mut buf[cached..len], pos + cached as u64).map(|()| buf))
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => shorter(pos + len as u64),
                    _ => e,
                })?;
        }
        self.pos += len as u64;
        Ok(Some((pos, Bytes::from_owner(Lent { buf, len, spare: self.spare.clone() }))))
    }
}

/// Runs `f` on the blocking pool; a task that could not finish is an I/O error like any other.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Reads into `buf` what the page cache holds of the file from `pos` on, without waiting for
/// the disk: how many bytes were read (all of `buf`, or fewer where the next were not cached,
/// or none where the file system cannot say).
fn read_cached(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match rustix::io::preadv2(file, &mut [IoSliceMut::new(&mut buf[n..])], pos + n as u64, ReadWriteFlags::NOWAIT) {
            Ok(0) => return Err(shorter(pos + buf.len() as u64)),
            Ok(k) => n += k,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn shorter(needed: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("the blob ends before byte {needed} of its recorded size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(size: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    /// A reader of its own buffers, of `chunk` bytes.
    async fn open(f: &tempfile::NamedTempFile, offset: u64, size: u64, chunk: usize) -> ChunkReader {
        open_in(f, offset, size, &ChunkBuffers::new(chunk)).await
    }

    async fn open_in(f: &tempfile::NamedTempFile, offset: u64, size: u64, buffers: &ChunkBuffers) -> ChunkReader {
        ChunkReader::open(f.path().to_path_buf(), offset, size, buffers).await.unwrap()
    }

    /// The next chunk's bytes, checking it comes at the offset reading has reached.
    async fn next(r: &mut ChunkReader) -> io::Result<Option<Bytes>> {
        let expected = r.pos;
        Ok(r.next().await?.map(|(at, data)| {
            assert_eq!(at, expected, "a chunk's offset is where the one before it ended");
            data
        }))
    }

    async fn read_all(r: &mut ChunkReader) -> io::Result<Vec<Bytes>> {
        let mut chunks = Vec::new();
        while let Some(c) = next(r).await? {
            chunks.push(c);
        }
        Ok(chunks)
    }

    #[tokio::test]
    async fn chunks_are_the_blob_from_any_offset() {
        let (f, data) = blob(10_000);
        for (offset, chunk) in [(0, 4096), (1, 4096), (4095, 4096), (9_999, 7), (10_000, 4096), (3, 20_000)] {
            let mut r = open(&f, offset, data.len() as u64, chunk).await;
            let chunks = read_all(&mut r).await.unwrap();
            assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= chunk), "{offset}/{chunk}");
            assert_eq!(chunks.concat(), &data[offset as usize..], "{offset}/{chunk}");
        }
    }

    #[tokio::test]
    async fn buffers_come_back_once_sent_and_chunks_stay_intact_while_held() {
        let (f, data) = blob(64 * 1024);
        let mut r = open(&f, 0, data.len() as u64, 4096).await;
        let first = next(&mut r).await.unwrap().unwrap();
        // Sent and gone: the next chunk reuses its memory.
        let second = next(&mut r).await.unwrap().unwrap();
        let at = second.as_ptr();
        drop(second);
        let third = next(&mut r).await.unwrap().unwrap();
        assert_eq!(third.as_ptr(), at, "the third chunk is read into the second's buffer");
        assert_eq!(&third[..], &data[8192..12288]);
        // Still held: its bytes are not overwritten by later reads.
        let rest = read_all(&mut r).await.unwrap();
        assert_eq!(&first[..], &data[..4096]);
        assert_eq!(rest.concat(), &data[12288..]);
        assert!(r.spare.0.lock().unwrap().len() <= SPARES);
    }

    #[tokio::test]
    async fn streams_sent_at_once_share_buffers_until_the_last_is_gone() {
        let (f, data) = blob(64 * 1024);
        let buffers = ChunkBuffers::new(4096);
        let size = data.len() as u64;
        let mut a = open_in(&f, 0, size, &buffers).await;
        let mut b = open_in(&f, 4096, size, &buffers).await;
        let sent = next(&mut a).await.unwrap().unwrap();
        let at = sent.as_ptr();
        drop(sent);
        let other = next(&mut b).await.unwrap().unwrap();
        assert_eq!(other.as_ptr(), at, "another stream's next chunk is read into the buffer sent last");
        assert_eq!(&other[..], &data[4096..8192]);
        // A chunk still held keeps the buffers after its stream has gone.
        drop((a, b));
        assert!(buffers.live.lock().unwrap().upgrade().is_some(), "a chunk is still being sent");
        drop(other);
        assert!(buffers.live.lock().unwrap().upgrade().is_none(), "no stream, no chunk: no buffers kept");
        let mut c = open_in(&f, 0, size, &buffers).await;
        assert!(c.spare.0.lock().unwrap().is_empty(), "a later stream starts with none");
        assert_eq!(read_all(&mut c).await.unwrap().concat(), data);
    }

    #[tokio::test]
    async fn what_the_page_cache_lacks_is_read_on_the_blocking_pool() {
        let (f, data) = blob(256 * 1024);
        let file = File::open(f.path()).unwrap();
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let mut r = open(&f, 0, data.len() as u64, 64 * 1024).await;
        let chunks = read_all(&mut r).await.unwrap();
        assert_eq!(chunks.concat(), data);
        assert!(r.waited() > 0, "the evicted blob was read without waiting for the disk");
    }

    #[tokio::test]
    async fn a_blob_shorter_than_its_size_is_an_error_not_a_short_chunk() {
        let (f, data) = blob(5000);
        let mut r = open(&f, 0, data.len() as u64 + 10, 4096).await;
        assert_eq!(next(&mut r).await.unwrap().unwrap(), &data[..4096]);
        let e = next(&mut r).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("5010"), "{e}");
    }
}
