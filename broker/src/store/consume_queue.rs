//! Consume queues: per topic and queue id, fixed 20-byte entries (commit-log offset, size,
//! tag code) indexed by queue offset. They are derived data: recovery rebuilds them from the
//! commit log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::commitlog::{create_dir_durable, read, sync_dir, write};
use super::StoreError;

/// Bytes per consume-queue entry.
pub const ENTRY_SIZE: u64 = 20;

/// Entries buffered in memory before one write to the file (about 200 messages' worth).
const TAIL_BYTES: usize = 4096;

/// Granule of the disk space given back below a queue's minimum; one more is kept below the
/// minimum (see [`ConsumeQueue::release_before`]).
const RELEASE_PAGE: u64 = 4096;

/// Entries not yet written to the file: a send appends here instead of writing 20 bytes to
/// the file each time. Readers see them; [`ConsumeQueue::flush`] (and a full buffer) writes
/// them out. A crash may lose them, which recovery repairs from the commit log.
#[derive(Debug, Default)]
struct Tail {
    /// Queue offset of the first buffered entry.
    base: u64,
    /// Encoded entries from `base` on.
    buf: Vec<u8>,
}

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

impl CqEntry {
    /// Whether the entry holds no message: it stands for a replicated message a slave could
    /// not read (its queue offset kept, nothing to serve).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// Every consume queue of a store, by topic and queue id, opened or created on first use.
/// Looked up with a borrowed topic, so finding a queue allocates nothing (a send looks its
/// queue up once per message).
#[derive(Debug)]
pub struct Queues {
    dir: PathBuf,
    by_topic: RwLock<HashMap<String, HashMap<i32, Arc<ConsumeQueue>>>>,
}

impl Queues {
    /// Opens every queue file under `dir` (one directory per topic, one file per queue id).
    pub fn open(dir: &Path) -> Result<Queues, StoreError> {
        create_dir_durable(dir)?;
        let mut by_topic: HashMap<String, HashMap<i32, Arc<ConsumeQueue>>> = HashMap::new();
        for topic_dir in list(dir)? {
            let Some(topic) = topic_dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            for qfile in list(&topic_dir)? {
                let Some(qid) = qfile
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let cq = ConsumeQueue::open(dir, topic, qid)?;
                by_topic
                    .entry(topic.to_string())
                    .or_default()
                    .insert(qid, Arc::new(cq));
            }
        }
        Ok(Queues {
            dir: dir.to_path_buf(),
            by_topic: RwLock::new(by_topic),
        })
    }

    /// The queue `topic`/`queue_id`, if it exists.
    pub fn get(&self, topic: &str, queue_id: i32) -> Option<Arc<ConsumeQueue>> {
        read(&self.by_topic).get(topic)?.get(&queue_id).cloned()
    }

    /// The queue `topic`/`queue_id`, created (file and directory) if it does not exist yet.
    pub fn get_or_create(
        &self,
        topic: &str,
        queue_id: i32,
    ) -> Result<Arc<ConsumeQueue>, StoreError> {
        if let Some(q) = self.get(topic, queue_id) {
            return Ok(q);
        }
        let mut by_topic = write(&self.by_topic);
        if let Some(q) = by_topic.get(topic).and_then(|t| t.get(&queue_id)) {
            return Ok(q.clone());
        }
        let q = Arc::new(ConsumeQueue::open(&self.dir, topic, queue_id)?);
        by_topic
            .entry(topic.to_string())
            .or_default()
            .insert(queue_id, q.clone());
        Ok(q)
    }

    /// Queues `topic` has here (highest queue id + 1), 0 when it has none.
    pub fn count(&self, topic: &str) -> i32 {
        read(&self.by_topic)
            .get(topic)
            .and_then(|t| t.keys().max())
            .map_or(0, |q| q + 1)
    }

    /// Forgets a topic's queues and deletes their files (a deleted topic; its messages stay
    /// in the commit log until retention). Readers holding a queue keep reading it.
    pub fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        if write(&self.by_topic).remove(topic).is_none() {
            return Ok(());
        }
        let tdir = self.dir.join(topic);
        match std::fs::remove_dir_all(&tdir) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&tdir, e)),
        }
    }

    /// Every queue.
    pub fn all(&self) -> Vec<Arc<ConsumeQueue>> {
        read(&self.by_topic)
            .values()
            .flat_map(|t| t.values().cloned())
            .collect()
    }
}

/// The entries of directory `dir`, as paths.
fn list(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    std::fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| StoreError::io(dir, e))
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
    /// Bytes at the file's start whose disk space was given back (a hole reads as zeroes);
    /// `u64::MAX` when the file system cannot make holes.
    released: AtomicU64,
    dirty: AtomicBool,
    /// Directories holding entries made for this queue that may not be durable yet (its
    /// file's, its topic directory's): the next flush syncs them, off the send path, before
    /// a checkpoint counts the queue's entries as stored.
    unsynced_dirs: Mutex<Vec<PathBuf>>,
    tail: Mutex<Tail>,
    /// Wakes long-polling pulls when an entry is added.
    pub arrived: Notify,
}

#[cfg(test)]
impl ConsumeQueue {
    /// Points the queue's descriptor at a read-only one of the same file: a disk that
    /// refuses the queue's writes (EBADF), through the real calls.
    #[allow(unsafe_code)]
    pub(crate) fn break_writes(&self) {
        use std::os::fd::AsRawFd;
        let read_only = File::open(&self.path).unwrap();
        // SAFETY: both descriptors are open and owned; dup2 only replaces what the second
        // refers to.
        assert!(unsafe { libc::dup2(read_only.as_raw_fd(), self.file.as_raw_fd()) } >= 0);
    }
}

impl ConsumeQueue {
    /// Opens or creates the queue file `dir/<topic>/<queue_id>`.
    pub fn open(dir: &Path, topic: &str, queue_id: i32) -> Result<ConsumeQueue, StoreError> {
        let tdir = dir.join(topic);
        std::fs::create_dir_all(&tdir).map_err(|e| StoreError::io(&tdir, e))?;
        let path = tdir.join(queue_id.to_string());
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        let mut unsynced_dirs = Vec::new();
        let file = match options.clone().create_new(true).open(&path) {
            Ok(file) => {
                // The topic's directory too, whoever made it: an earlier attempt may have
                // made it and then failed to create the file.
                unsynced_dirs = vec![dir.to_path_buf(), tdir];
                Ok(file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => options.open(&path),
            Err(e) => Err(e),
        }
        .map_err(|e| StoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        Ok(ConsumeQueue {
            topic: topic.to_string(),
            queue_id,
            file,
            path,
            count: AtomicU64::new(len / ENTRY_SIZE),
            min: AtomicU64::new(0),
            released: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            unsynced_dirs: Mutex::new(unsynced_dirs),
            tail: Mutex::new(Tail {
                base: len / ENTRY_SIZE,
                buf: Vec::new(),
            }),
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
        {
            let mut tail = self.lock_tail();
            if self.max_offset() == 0 && index > 0 {
                // The first entry of a queue whose earlier ones are not stored here (a slave
                // that joined at its master's first offset, or recovery after retention): the
                // queue starts at it, so reads from its start find entries.
                self.min.fetch_max(index, Ordering::AcqRel);
            }
            if index != tail.base + (tail.buf.len() as u64) / ENTRY_SIZE {
                // Not the next entry (recovery rewriting one): write it in place.
                self.write_tail(&mut tail)?;
                self.file
                    .write_all_at(&buf, index * ENTRY_SIZE)
                    .map_err(|err| StoreError::io(&self.path, err))?;
                tail.base = tail.base.max(index + 1);
            } else {
                tail.buf.extend_from_slice(&buf);
                if tail.buf.len() >= TAIL_BYTES {
                    self.write_tail(&mut tail)?;
                }
            }
        }
        self.count.fetch_max(index + 1, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
        self.arrived.notify_waiters();
        Ok(())
    }

    fn lock_tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the buffered entries to the file (not yet durable).
    fn write_out(&self) -> Result<(), StoreError> {
        self.write_tail(&mut self.lock_tail())
    }

    /// [`ConsumeQueue::write_out`] for a caller already holding the buffer.
    fn write_tail(&self, tail: &mut Tail) -> Result<(), StoreError> {
        if !tail.buf.is_empty() {
            self.file
                .write_all_at(&tail.buf, tail.base * ENTRY_SIZE)
                .map_err(|err| StoreError::io(&self.path, err))?;
            tail.base += tail.buf.len() as u64 / ENTRY_SIZE;
            tail.buf.clear();
        }
        Ok(())
    }

    /// Reads up to `max` entries starting at queue offset `from`.
    pub fn get(&self, from: u64, max: usize) -> Result<Vec<CqEntry>, StoreError> {
        let end = self.max_offset().min(from.saturating_add(max as u64));
        if from >= end {
            return Ok(Vec::new());
        }
        let n = (end - from) as usize;
        let mut buf = vec![0u8; n * ENTRY_SIZE as usize];
        // Entries from the buffer's base on are copied from memory; those below it are in the
        // file, which is written before the base moves.
        let on_file = {
            let tail = self.lock_tail();
            let base = tail.base.clamp(from, end);
            let at = ((base - tail.base.min(base)) * ENTRY_SIZE) as usize;
            let dst = ((base - from) * ENTRY_SIZE) as usize;
            let want = ((end - base) * ENTRY_SIZE) as usize;
            let Some(src) = tail.buf.get(at..at + want) else {
                return Err(StoreError::Corrupt(format!(
                    "{}: entries {base}..{end} are neither on file nor buffered",
                    self.path.display()
                )));
            };
            buf[dst..].copy_from_slice(src);
            base
        };
        if on_file > from {
            self.file
                .read_exact_at(
                    &mut buf[..((on_file - from) * ENTRY_SIZE) as usize],
                    from * ENTRY_SIZE,
                )
                .map_err(|err| StoreError::io(&self.path, err))?;
        }
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
        self.write_out()?;
        let count = self.max_offset();
        // Back from the last entry to the last one that is whole and before `end`. Entries up
        // to the checkpoint were synced; those after it may be torn by a power loss, and a
        // zeroed one (offset 0, size 0) sorts before `end` too, so a binary search could stop
        // past it and keep it.
        let mut lo = count;
        while lo > 0 {
            let from = lo.saturating_sub(1024);
            let entries = self.get(from, (lo - from) as usize)?;
            match entries.iter().rposition(|e| e.size > 0 && e.offset < end) {
                Some(i) => {
                    lo = from + i as u64 + 1;
                    break;
                }
                None => lo = from,
            }
        }
        if lo < count {
            let mut tail = self.lock_tail();
            self.file
                .set_len(lo * ENTRY_SIZE)
                .map_err(|err| StoreError::io(&self.path, err))?;
            tail.base = lo;
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
        self.release_before(lo);
        Ok(())
    }

    /// Gives back the disk space of entries below queue offset `min`, whose messages
    /// retention deleted: the file keeps its size and offsets (a hole reads as zeroes, which
    /// readers pass over as empty entries), but a queue no longer grows on disk for as long as
    /// the broker runs. At least one page of entries below `min` stays whole, so recovery's
    /// backward scan for the last entry before a cut finds one there rather than taking the
    /// hole for a torn tail. Best effort: a file system without holes keeps the bytes.
    fn release_before(&self, min: u64) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let upto = (min * ENTRY_SIZE).saturating_sub(RELEASE_PAGE) / RELEASE_PAGE * RELEASE_PAGE;
        let from = self.released.load(Ordering::Acquire);
        if upto <= from {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(upto - from)) else {
            return;
        };
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset, len) {
            Ok(()) => self.released.store(upto, Ordering::Release),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
                tracing::debug!(path = %self.path.display(), "the file system cannot give back a consume queue's old entries");
                self.released.store(u64::MAX, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "giving back the disk space of a consume queue's old entries failed; tried again at the next retention");
            }
        }
    }

    /// Disk space the file takes (tests check entries below the minimum give theirs back).
    #[cfg(test)]
    fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    /// Makes written entries durable if any changed since the last flush, and the queue's
    /// file findable: the directory entries made when it was created.
    pub fn flush(&self) -> Result<(), StoreError> {
        // Taken before the write: an entry put after the write but before the flag was taken
        // would have its flag taken, yet not be in the file, and no later flush would sync it.
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        let written = self.write_out().and_then(|()| match dirty {
            true => self
                .file
                .sync_data()
                .map_err(|err| StoreError::io(&self.path, err)),
            false => Ok(()),
        });
        if written.is_err() && dirty {
            self.dirty.store(true, Ordering::Release);
        }
        written?;
        let mut dirs = self.unsynced_dirs.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(dir) = dirs.last() {
            sync_dir(dir)?;
            dirs.pop();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_whose_first_entry_is_not_at_zero_starts_there() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        cq.put(5, entry(5)).unwrap();
        cq.put(6, entry(6)).unwrap();
        assert_eq!(cq.min_offset(), 5);
        let from_start = cq.get(cq.min_offset(), 10).unwrap();
        assert_eq!(from_start, vec![entry(5), entry(6)]);
    }

    #[test]
    fn entries_torn_to_zeroes_past_the_checkpoint_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        for i in 0..10 {
            cq.put(i, entry(i)).unwrap();
        }
        cq.flush().unwrap();
        // A power loss kept entries 8 and 9 but not the pages of 5 to 7.
        cq.file
            .write_all_at(&[0u8; 3 * ENTRY_SIZE as usize], 5 * ENTRY_SIZE)
            .unwrap();
        drop(cq);
        let cq = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        // Entries 0-4 point before the checkpoint (entry(5)'s offset); the rest go.
        assert_eq!(cq.truncate_from_offset(entry(5).offset).unwrap(), 5);
        assert_eq!(cq.max_offset(), 5);
        assert_eq!(cq.get(4, 1).unwrap()[0].offset, entry(4).offset);
    }

    #[test]
    fn a_new_queue_makes_its_directory_entries_durable_at_its_first_flush() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        std::fs::create_dir(&root).unwrap();
        let away = dir.path().join("away");
        let cq = ConsumeQueue::open(&root, "T", 0).unwrap();
        cq.put(0, entry(0)).unwrap();
        // The topic's directory moved away: syncing it fails, so a flush that tries fails.
        std::fs::rename(root.join("T"), &away).unwrap();
        let err = cq.flush().unwrap_err();
        assert!(err.to_string().contains("consumequeue/T"), "{err}");
        std::fs::rename(&away, root.join("T")).unwrap();
        cq.flush().unwrap();
        // Synced once: later flushes leave the directories alone.
        std::fs::rename(root.join("T"), &away).unwrap();
        cq.put(1, entry(1)).unwrap();
        cq.flush().unwrap();
        std::fs::rename(&away, root.join("T")).unwrap();
        drop(cq);
        // A queue that already existed made no entry to sync.
        let cq = ConsumeQueue::open(&root, "T", 0).unwrap();
        std::fs::rename(root.join("T"), &away).unwrap();
        cq.put(2, entry(2)).unwrap();
        cq.flush().unwrap();
    }

    #[test]
    fn the_queue_set_finds_creates_and_counts_queues_and_reopens_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        let queues = Queues::open(&root).unwrap();
        assert!(queues.get("T", 0).is_none());
        assert_eq!(queues.count("T"), 0);
        let q3 = queues.get_or_create("T", 3).unwrap();
        q3.put(0, entry(0)).unwrap();
        q3.flush().unwrap();
        queues.get_or_create("T", 1).unwrap();
        queues.get_or_create("U", 0).unwrap();
        assert!(Arc::ptr_eq(&queues.get("T", 3).unwrap(), &q3));
        assert!(Arc::ptr_eq(&queues.get_or_create("T", 3).unwrap(), &q3));
        assert_eq!(queues.count("T"), 4);
        assert_eq!(queues.count("U"), 1);
        assert_eq!(queues.all().len(), 3);
        drop(queues);
        let reopened = Queues::open(&root).unwrap();
        assert_eq!(reopened.all().len(), 3);
        assert_eq!(reopened.get("T", 3).unwrap().max_offset(), 1);
        assert!(reopened.get("U", 1).is_none());
    }

    #[test]
    fn entries_below_the_minimum_give_their_disk_space_back_and_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        for i in 0..50_000 {
            cq.put(i, entry(i)).unwrap();
        }
        cq.flush().unwrap();
        let before = cq.disk_bytes();
        assert!(before >= 50_000 * ENTRY_SIZE, "{before}");
        // Retention deleted the messages of the first 40,000 entries (entry i is at i * 100).
        cq.correct_min_offset(40_000 * 100).unwrap();
        assert_eq!(cq.min_offset(), 40_000);
        let after = cq.disk_bytes();
        assert!(
            after <= before - 38_000 * ENTRY_SIZE,
            "{before} bytes before, {after} after"
        );
        // The entries from the minimum on, and a page's worth below it, read as before.
        let kept = 40_000 - RELEASE_PAGE / ENTRY_SIZE;
        assert_eq!(cq.get(kept, 1).unwrap(), vec![entry(kept)]);
        let got = cq.get(40_000, 10_000).unwrap();
        assert_eq!(got, (40_000..50_000).map(entry).collect::<Vec<_>>());
        // Reopened (a restart): the same minimum, the same entries.
        drop(cq);
        let cq = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        cq.correct_min_offset(40_000 * 100).unwrap();
        assert_eq!((cq.min_offset(), cq.max_offset()), (40_000, 50_000));
        assert_eq!(cq.get(49_999, 1).unwrap(), vec![entry(49_999)]);
        // A recovery that cuts the log before every entry left keeps the queue's offsets: it
        // stops at the whole entries below the minimum, not in the hole.
        cq.truncate_from_offset(45_000 * 100).unwrap();
        assert_eq!(cq.max_offset(), 45_000);
        cq.truncate_from_offset(40_000 * 100).unwrap();
        assert!(cq.max_offset() >= kept, "{}", cq.max_offset());
    }

    fn entry(i: u64) -> CqEntry {
        CqEntry {
            offset: i * 100,
            size: 100,
            tags_code: i as i64,
        }
    }

    #[test]
    fn reads_span_the_file_and_the_buffered_tail() {
        let dir = tempfile::tempdir().unwrap();
        let q = ConsumeQueue::open(dir.path(), "T", 0).unwrap();
        // 500 entries: two buffer-fulls went to the file, the rest is buffered.
        for i in 0..500 {
            q.put(i, entry(i)).unwrap();
        }
        assert_eq!(q.max_offset(), 500);
        let on_file = std::fs::metadata(&q.path).unwrap().len() / ENTRY_SIZE;
        assert!(on_file > 0 && on_file < 500, "on file: {on_file}");
        for (from, n) in [
            (0, 10),
            (on_file - 5, 10),
            (on_file, 3),
            (490, 50),
            (0, 500),
        ] {
            let got = q.get(from, n).unwrap();
            let want: Vec<CqEntry> = (from..(from + n as u64).min(500)).map(entry).collect();
            assert_eq!(got, want, "from {from} n {n}");
        }
        assert!(q.get(500, 10).unwrap().is_empty());
    }

    #[test]
    fn flush_writes_the_tail_and_a_crash_loses_only_unflushed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let q = ConsumeQueue::open(dir.path(), "T", 1).unwrap();
        for i in 0..50 {
            q.put(i, entry(i)).unwrap();
        }
        q.flush().unwrap();
        for i in 50..60 {
            q.put(i, entry(i)).unwrap();
        }
        drop(q); // a crash: the last ten were never written
        let q = ConsumeQueue::open(dir.path(), "T", 1).unwrap();
        assert_eq!(q.max_offset(), 50);
        assert_eq!(
            q.get(0, 100).unwrap(),
            (0..50).map(entry).collect::<Vec<_>>()
        );
        // Appending continues at the recovered end.
        q.put(50, entry(50)).unwrap();
        assert_eq!(q.get(49, 5).unwrap(), vec![entry(49), entry(50)]);
    }

    #[test]
    fn truncation_drops_buffered_and_written_entries() {
        let dir = tempfile::tempdir().unwrap();
        let q = ConsumeQueue::open(dir.path(), "T", 2).unwrap();
        for i in 0..300 {
            q.put(i, entry(i)).unwrap();
        }
        // Entries whose message is at or past commit-log offset 250 * 100 go.
        assert_eq!(q.truncate_from_offset(250 * 100).unwrap(), 50);
        assert_eq!(q.max_offset(), 250);
        q.put(250, entry(7)).unwrap();
        assert_eq!(q.get(249, 5).unwrap(), vec![entry(249), entry(7)]);
        q.flush().unwrap();
        drop(q);
        let q = ConsumeQueue::open(dir.path(), "T", 2).unwrap();
        assert_eq!(q.max_offset(), 251);
    }
}
