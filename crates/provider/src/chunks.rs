//! Reading a stored blob to send it, in chunks, the way that costs least: the blob's file is
//! mapped into memory, once however many streams are sending it, and each chunk is a slice of
//! that mapping. The bytes go from the page cache to the socket (or to TLS's encryption) with
//! no copy of our own, and a chunk the page cache holds allocates nothing. Reading each chunk
//! into a buffer first, 100 downloads at once cost 1.17–1.21 times nginx's CPU per byte and
//! reached 0.88–0.92 of its throughput; mapped, 0.82–0.84 and 1.16–1.19
//! (`UPDRAFT_BENCH=serving`). A chunk the page cache lacks is read on the blocking pool before it is handed out, so the serving task never
//! waits for the disk, and a disk error is an error of that stream. A mapping goes when the
//! last stream and chunk of its file do.
//!
//! The invariants: a chunk handed out is exactly the blob's bytes at its offset; a blob shorter
//! than the size it was served with is an error, never a short or padded chunk. Both rest on
//! the blob directory's rule (`blobs`): a file there is never changed in place, only renamed
//! in (complete) or away (quarantined), so a mapping's bytes cannot change or vanish under it.
//! One case is left to chance: the page cache evicting a chunk's pages between the check that
//! they are there and their sending, and the disk then failing to read them again. Sent in
//! the clear, the socket's write then fails; encrypted, the process gets the fault (SIGBUS).
//! The check (`mincore`) sees the page cache only for files the process owns or may write, as
//! the provider does the blobs it stored; of any other file every page looks cached, so its
//! chunks are sent without the disk read first.
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use memmap2::Mmap;

/// Reads one blob from an offset to its end, one chunk at a time.
pub struct ChunkReader {
    file: Arc<File>,
    map: Mapped,
    pos: u64,
    end: u64,
    chunk: usize,
    /// Chunks that had to wait for the disk (read on the blocking pool).
    waited: u64,
}

/// A blob file mapped whole, shared by the streams sending it and the chunks they handed out.
#[derive(Clone)]
struct Mapped(Arc<Mmap>);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The files being sent, each mapped once, by device and inode (a blob renamed away and
/// fetched again under its name is another file), and the size of their chunks. A mapping is
/// held by its streams and chunks only: none is kept once the last has gone.
pub struct BlobMaps {
    chunk: usize,
    live: Mutex<HashMap<(u64, u64), Weak<Mmap>>>,
}

impl BlobMaps {
    pub fn new(chunk: usize) -> Self {
        assert!(chunk > 0, "chunks have bytes");
        Self { chunk, live: Mutex::default() }
    }

    /// `file`'s mapping: the one its other streams share, or a new one.
    fn share(&self, file: &File) -> io::Result<Mapped> {
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        let mut live = self.live.lock().expect("blob maps");
        if let Some(map) = live.get(&key).and_then(Weak::upgrade) {
            return Ok(Mapped(map));
        }
        // SAFETY: a blob's file is never written, truncated or extended once under its name
        // (the module's invariant), so the mapped bytes stay what they were when mapped.
        let map = Arc::new(unsafe { Mmap::map(file)? });
        live.retain(|_, m| m.strong_count() > 0);
        live.insert(key, Arc::downgrade(&map));
        Ok(Mapped(map))
    }

    /// How many files are mapped now.
    #[cfg(test)]
    fn mapped(&self) -> usize {
        self.live.lock().unwrap().values().filter(|m| m.strong_count() > 0).count()
    }
}

impl ChunkReader {
    /// Opens `path` (on the blocking pool: opening may wait for the disk) to read from
    /// `offset` up to `size` (the blob's size as served), in chunks of `maps`' size (the last
    /// shorter), from the file's mapping in `maps`.
    pub async fn open(path: PathBuf, offset: u64, size: u64, maps: &BlobMaps) -> io::Result<ChunkReader> {
        let file = blocking(move || File::open(path)).await?;
        let map = maps.share(&file)?;
        Ok(ChunkReader { file: Arc::new(file), map, pos: offset.min(size), end: size, chunk: maps.chunk, waited: 0 })
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
        let (pos, start) = (self.pos, self.pos as usize);
        if start + len > self.map.0.len() {
            return Err(shorter(pos + len as u64));
        }
        if !resident(&self.map.0[start..start + len]) {
            // Into the page cache, where the mapping finds it, with a read's errors: a page the
            // disk cannot give is this stream's error, not a fault.
            self.waited += 1;
            let file = self.file.clone();
            blocking(move || file.read_exact_at(&mut vec![0; len], pos)).await?;
        }
        self.pos += len as u64;
        Ok(Some((pos, Bytes::from_owner(self.map.clone()).slice(start..start + len))))
    }
}

/// Whether every page under `bytes` (part of a file mapping) is in the page cache.
fn resident(bytes: &[u8]) -> bool {
    /// Pages asked about at once (2 MiB of 4 KiB pages), on the stack.
    const BATCH: usize = 512;
    let page = rustix::param::page_size();
    let addr = bytes.as_ptr() as usize;
    let (mut at, end) = (addr - addr % page, addr + bytes.len());
    let mut pages = [0u8; BATCH];
    while at < end {
        let len = (end - at).min(BATCH * page);
        // SAFETY: `at..at + len` lies in the pages of a live mapping (`bytes` borrows it), and
        // `pages` has a byte for each of them.
        let r = unsafe { libc::mincore(at as *mut libc::c_void, len, pages.as_mut_ptr()) };
        if r != 0 || pages[..len.div_ceil(page)].iter().any(|p| p & 1 == 0) {
            return false;
        }
        at += len;
    }
    true
}

/// Runs `f` on the blocking pool; a task that could not finish is an I/O error like any other.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(e)))
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

    /// A reader of its own mappings, in chunks of `chunk` bytes.
    async fn open(f: &tempfile::NamedTempFile, offset: u64, size: u64, chunk: usize) -> ChunkReader {
        open_in(f, offset, size, &BlobMaps::new(chunk)).await
    }

    async fn open_in(f: &tempfile::NamedTempFile, offset: u64, size: u64, maps: &BlobMaps) -> ChunkReader {
        ChunkReader::open(f.path().to_path_buf(), offset, size, maps).await.unwrap()
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
            assert_eq!(r.waited(), 0, "a blob just written is in the page cache: sent without a read");
        }
    }

    #[tokio::test]
    async fn streams_of_a_file_share_one_mapping_until_the_last_chunk_is_gone() {
        let (f, data) = blob(64 * 1024);
        let (g, other) = blob(8 * 1024);
        let maps = BlobMaps::new(4096);
        let size = data.len() as u64;
        let mut a = open_in(&f, 0, size, &maps).await;
        let mut b = open_in(&f, 4096, size, &maps).await;
        let first = next(&mut a).await.unwrap().unwrap();
        let second = next(&mut b).await.unwrap().unwrap();
        assert_eq!(maps.mapped(), 1, "two streams of one file, one mapping");
        assert_eq!(second.as_ptr(), first.as_ptr().wrapping_add(4096), "both are slices of it");
        assert_eq!((&first[..], &second[..]), (&data[..4096], &data[4096..8192]));
        let mut c = open_in(&g, 0, other.len() as u64, &maps).await;
        assert_eq!(read_all(&mut c).await.unwrap().concat(), other);
        drop(c);
        assert_eq!(maps.mapped(), 1, "another file's mapping goes with its stream");
        // A chunk still held keeps the mapping after its stream has gone.
        drop((a, b, first));
        assert_eq!(maps.mapped(), 1, "a chunk is still being sent");
        drop(second);
        assert_eq!(maps.mapped(), 0, "no stream, no chunk: nothing mapped");
        let mut d = open_in(&f, 0, size, &maps).await;
        assert_eq!(read_all(&mut d).await.unwrap().concat(), data);
    }

    #[tokio::test]
    async fn a_blob_fetched_again_under_its_name_is_not_the_file_still_being_sent() {
        let (f, data) = blob(16 * 1024);
        let maps = BlobMaps::new(4096);
        let mut old = open_in(&f, 0, data.len() as u64, &maps).await;
        let first = next(&mut old).await.unwrap().unwrap();
        // Quarantined (renamed away), and the good content written under the name again.
        let away = f.path().with_extension("quarantined");
        std::fs::rename(f.path(), &away).unwrap();
        let fresh: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
        std::fs::write(f.path(), &fresh).unwrap();
        let mut new = open_in(&f, 0, fresh.len() as u64, &maps).await;
        assert_eq!(maps.mapped(), 2, "a new file, a new mapping");
        assert_eq!(read_all(&mut new).await.unwrap().concat(), fresh);
        let rest = read_all(&mut old).await.unwrap();
        assert_eq!([first].iter().chain(&rest).map(|c| &c[..]).collect::<Vec<_>>().concat(), data);
        std::fs::remove_file(away).unwrap();
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
