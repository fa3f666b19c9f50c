//! Consume queues: per topic and queue id, fixed 20-byte entries (commit-log offset, size,
//! tag code) indexed by queue offset. They are derived data: recovery rebuilds them from the
//! commit log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use super::StoreError;

/// Bytes per consume-queue entry.
pub const ENTRY_SIZE: u64 = 20;

/// One consume-queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqEntry {
    /// Commit-log offset of the message.
    pub offset: u64,
    /// Stored size of the message.
    pub size: u32,
    /// Tag code (Java hash of the tags) for broker-side filtering.
    pub tags_code: i64,
}

/// The index of one queue of one topic.
#[derive(Debug)]
pub struct ConsumeQueue {
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue_id: i32,
    file: File,
    path: PathBuf,
    /// Entries written (the queue's max offset, exclusive).
    count: AtomicU64,
    /// First entry still pointing at stored data.
    min: AtomicU64,
    dirty: AtomicBool,
    /// Wakes long-polling pulls when an entry is added.
    pub arrived: Notify,
}

impl ConsumeQueue {
    /// Opens or creates the queue file `dir/<topic>/<queue_id>`.
    pub fn open(dir: &Path, topic: &str, queue_id: i32) -> Result<ConsumeQueue, StoreError> {
        let tdir = dir.join(topic);
        std::fs::create_dir_all(&tdir).map_err(|e| StoreError::io(&tdir, e))?;
        let path = tdir.join(queue_id.to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        Ok(ConsumeQueue {
            topic: topic.to_string(),
            queue_id,
            file,
            path,
            count: AtomicU64::new(len / ENTRY_SIZE),
            min: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            arrived: Notify::new(),
        })
    }

    /// Queue offset the next message gets (and the max offset, exclusive).
    pub fn max_offset(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// First queue offset whose message is still stored.
    pub fn min_offset(&self) -> u64 {
        self.min.load(Ordering::Acquire).min(self.max_offset())
    }

    /// Writes the entry for queue offset `index` (the next one, or a re-dispatch during
    /// recovery) and wakes waiting pulls.
    pub fn put(&self, index: u64, e: CqEntry) -> Result<(), StoreError> {
        let mut buf = [0u8; ENTRY_SIZE as usize];
        buf[..8].copy_from_slice(&e.offset.to_be_bytes());
        buf[8..12].copy_from_slice(&e.size.to_be_bytes());
        buf[12..].copy_from_slice(&e.tags_code.to_be_bytes());
        self.file
            .write_all_at(&buf, index * ENTRY_SIZE)
            .map_err(|err| StoreError::io(&self.path, err))?;
        self.count.fetch_max(index + 1, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Reads up to `max` entries starting at queue offset `from`.
    pub fn get(&self, from: u64, max: usize) -> Result<Vec<CqEntry>, StoreError> {
        let end = self.max_offset().min(from + max as u64);
        if from >= end {
            return Ok(Vec::new());
        }
        let n = (end - from) as usize;
        let mut buf = vec![0u8; n * ENTRY_SIZE as usize];
        self.file
            .read_exact_at(&mut buf, from * ENTRY_SIZE)
            .map_err(|err| StoreError::io(&self.path, err))?;
        Ok(buf
            .chunks_exact(ENTRY_SIZE as usize)
            .map(|c| CqEntry {
                offset: u64::from_be_bytes(c[..8].try_into().unwrap_or_default()),
                size: u32::from_be_bytes(c[8..12].try_into().unwrap_or_default()),
                tags_code: i64::from_be_bytes(c[12..20].try_into().unwrap_or_default()),
            })
            .collect())
    }

    /// Drops entries whose message lies at or after commit-log offset `end` (they are
    /// re-dispatched by recovery); returns how many were dropped.
    pub fn truncate_from_offset(&self, end: u64) -> Result<u64, StoreError> {
        let count = self.max_offset();
        // Entries are in commit-log order, so binary search for the first one at or past end.
        let (mut lo, mut hi) = (0u64, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.get(mid, 1)?;
            if e.first().is_some_and(|e| e.offset >= end) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if lo < count {
            self.file
                .set_len(lo * ENTRY_SIZE)
                .map_err(|err| StoreError::io(&self.path, err))?;
            self.count.store(lo, Ordering::Release);
            self.dirty.store(true, Ordering::Release);
        }
        Ok(count - lo)
    }

    /// Marks entries pointing before commit-log offset `min_phys` as gone (after retention
    /// deleted their segments).
    pub fn correct_min_offset(&self, min_phys: u64) -> Result<(), StoreError> {
        let (mut lo, mut hi) = (self.min_offset(), self.max_offset());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self
                .get(mid, 1)?
                .first()
                .is_some_and(|e| e.offset >= min_phys)
            {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        self.min.store(lo, Ordering::Release);
        Ok(())
    }

    /// Makes written entries durable if any changed since the last flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.file
                .sync_data()
                .map_err(|err| StoreError::io(&self.path, err))?;
        }
        Ok(())
    }
}
