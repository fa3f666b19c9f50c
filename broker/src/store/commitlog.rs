//! The commit log: every message of every topic, appended to fixed-size segment files named
//! by their first offset. Reads are positional (`pread`); durability is `fdatasync`, done by the
//! flusher thread, never on the async runtime.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use bytes::{Bytes, BytesMut};

use super::message::{
    decode_stored, parse_stored, StoredMessage, StoredRef, BLANK_MAGIC, FLAG_BORN_V6, MAGIC_V1,
    MAGIC_V2, POS_STORE_TIMESTAMP_V4, POS_SYS_FLAG,
};
use super::{lock, StoreError};

/// Room always kept at a segment's end for the blank filler that closes it.
const END_BLANK_MIN: u64 = 8;

/// Page size assumed when preparing the log ahead of its end.
const PAGE: u64 = 4096;

/// Zeroes written ahead of the log's end at one time (see [`CommitLog::prepare_ahead`]).
const PREPARE_CHUNK: usize = 256 * 1024;

/// Source of the zeroes written ahead.
static ZEROES: [u8; PREPARE_CHUNK] = [0; PREPARE_CHUNK];

/// One segment file.
#[derive(Debug)]
pub struct Segment {
    /// Commit-log offset of the file's first byte.
    pub base: u64,
    file: File,
    path: PathBuf,
    /// The file opened a second time, for the waits of [`CommitLog::write_out`]: the kernel
    /// reports a write-back error once per open file, so with a descriptor of its own the
    /// zeroing thread cannot take an error the flush thread's `fdatasync` must see.
    write_out: std::sync::OnceLock<File>,
}

impl Segment {
    fn new(base: u64, file: File, path: PathBuf) -> Segment {
        Segment {
            base,
            file,
            path,
            write_out: std::sync::OnceLock::new(),
        }
    }

    /// The descriptor the zeroing thread waits on, opened at its first use.
    fn write_out_file(&self) -> Result<&File, StoreError> {
        if let Some(f) = self.write_out.get() {
            return Ok(f);
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| StoreError::io(&self.path, e))?;
        Ok(self.write_out.get_or_init(|| f))
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the file's data, and the block allocations it needs, durable.
    pub fn sync_data(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(&self.path, e))
    }

    /// Runs `sync_file_range` with `flags` over `len` bytes at `offset` in the file: write-back
    /// of a range, without the device flush (and, on a journaling file system, the journal
    /// commit) an `fdatasync` of the whole file would add.
    #[allow(unsafe_code)]
    fn sync_range(
        &self,
        file: &File,
        offset: u64,
        len: u64,
        flags: libc::c_uint,
    ) -> Result<(), StoreError> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            // The system call would take 0 for "to the end of the file".
            return Ok(());
        }
        let too_far = || {
            StoreError::Corrupt(format!(
                "write-back range {offset}+{len} of {} too large",
                self.path.display()
            ))
        };
        let offset = i64::try_from(offset).map_err(|_| too_far())?;
        let len = i64::try_from(len).map_err(|_| too_far())?;
        // SAFETY: sync_file_range only reads its four integer arguments; the descriptor is
        // open for as long as `self` lives, and no memory is shared with the kernel. Neither
        // nix nor rustix wraps this call.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(StoreError::io(&self.path, std::io::Error::last_os_error()))
        }
    }
}

/// Zeroes just written ahead of the log's end by [`CommitLog::prepare_ahead`], for
/// [`CommitLog::write_out`].
#[derive(Debug)]
pub struct ZeroRun {
    seg: Arc<Segment>,
    /// Where the zeroes start in the segment's file.
    offset: u64,
    len: u64,
}

#[cfg(test)]
impl ZeroRun {
    /// A run of the log's first segment that no write-out can take (longer than any file).
    pub(crate) fn unwritable(log: &CommitLog) -> Option<ZeroRun> {
        Some(ZeroRun {
            seg: log.segment_for(log.min_offset())?,
            offset: 4096,
            len: u64::MAX,
        })
    }
}

#[cfg(test)]
impl CommitLog {
    /// Points the segment holding `offset` at /dev/null, which takes writes but refuses
    /// `fdatasync` (EINVAL): a disk whose write-back fails, through the real calls.
    pub(crate) fn break_syncing(&self, offset: u64) {
        let mut segs = write(&self.segments);
        let idx = ((offset - segs[0].base) / self.segment_size) as usize;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let path = segs[idx].path.clone();
        segs[idx] = Arc::new(Segment::new(segs[idx].base, file, path));
    }
}

/// The append-only log of all messages.
#[derive(Debug)]
pub struct CommitLog {
    dir: PathBuf,
    segment_size: u64,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// End of the appended data (next write position).
    written: AtomicU64,
    /// End of the data known to be on disk.
    flushed: AtomicU64,
    /// The zeroes written ahead of the data. Held while writing data, and while choosing
    /// where zeroes go, but not while writing them: an append waits for the zeroes only
    /// when it would land on the range being filled.
    prepared: Mutex<Prepared>,
    /// Set when writing the log to disk failed (a flush, a write-out of zeroes or the
    /// write-back hint): the kernel reports a file's write-back error once per open file and
    /// may drop the pages it could not write, so no later flush may succeed in its place and
    /// no more data is taken (see [`CommitLog::stopped`]).
    write_back_failed: std::sync::OnceLock<String>,
    /// Set when the store must take no more data although the log itself is sound (a consume
    /// queue could not be written after the log took its messages): appends are refused,
    /// flushes go on, so what was acknowledged still reaches the disk.
    stopped: std::sync::OnceLock<String>,
    /// Held while a segment file is created: the appender and the flush thread, which creates
    /// the next segment ahead of the data, never create the same one twice.
    creating: Mutex<()>,
    /// Signalled when a fill of zeroes ends, written or not.
    filled: Condvar,
    /// Times a writer waited for a fill (tests check their races ran).
    #[cfg(test)]
    waits: AtomicU64,
    /// An error every write of data returns instead of writing (0: none), standing in for a
    /// disk that fails (tests only).
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicI32,
}

/// Where the zeroes ahead of the data stand.
#[derive(Debug, Default)]
struct Prepared {
    /// End of the zeroes written ahead of the data.
    end: u64,
    /// The range being filled with zeroes right now, outside the lock.
    filling: Option<(u64, u64)>,
    /// Writers waiting for a fill to end: no new fill starts until they have written, so a
    /// writer never waits through more than one.
    waiting: usize,
}

impl Prepared {
    /// Whether zeroes are being written over any of `[from, to)`.
    fn filling_over(&self, from: u64, to: u64) -> bool {
        self.filling
            .is_some_and(|(start, stop)| from < stop && start < to)
    }
}

/// Ends a fill of zeroes however it ends (written, failed, or a panic): clears the mark and
/// wakes the writers waiting on it.
struct Fill<'a> {
    log: &'a CommitLog,
    /// End of the range, set once its zeroes are written.
    written: Option<u64>,
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        let mut prepared = lock(&self.log.prepared);
        prepared.filling = None;
        if let Some(stop) = self.written {
            prepared.end = stop;
        }
        drop(prepared);
        self.log.filled.notify_all();
    }
}

fn segment_name(base: u64) -> String {
    format!("{base:020}")
}

impl CommitLog {
    /// Opens (or creates) the commit log in `dir`; call [`CommitLog::recover`] before use.
    pub fn open(dir: &Path, segment_size: u64) -> Result<CommitLog, StoreError> {
        create_dir_durable(dir)?;
        let mut segments = Vec::new();
        let mut empty = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name();
            let Some(base) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue; // not a segment (e.g. a temp file)
            };
            let path = entry.path();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| StoreError::io(&path, e))?;
            let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
            if len == 0 {
                // Created but not yet sized when the process stopped (it is sized right after
                // it is created); checked below to be the last one.
                empty.push(base);
            } else if len != segment_size {
                return Err(StoreError::Corrupt(format!(
                    "segment {} is {len} bytes but mappedFileSizeCommitLog is {segment_size}; \
                     the segment size cannot change once data is stored",
                    path.display()
                )));
            }
            if base % segment_size != 0 {
                return Err(StoreError::Corrupt(format!(
                    "segment {} does not start at a multiple of {segment_size}",
                    path.display()
                )));
            }
            segments.push(Arc::new(Segment::new(base, file, path)));
        }
        segments.sort_by_key(|s| s.base);
        if let Some(base) = empty
            .iter()
            .find(|&&b| Some(b) != segments.last().map(|s| s.base))
        {
            return Err(StoreError::Corrupt(format!(
                "segment {} is empty but not the last one",
                dir.join(segment_name(*base)).display()
            )));
        }
        if let (Some(_), Some(last)) = (empty.first(), segments.last()) {
            last.file
                .set_len(segment_size)
                .map_err(|e| StoreError::io(&last.path, e))?;
            tracing::warn!(path = %last.path.display(), "sized a segment whose creation a stop interrupted");
        }
        for pair in segments.windows(2) {
            if pair[1].base != pair[0].base + segment_size {
                return Err(StoreError::Corrupt(format!(
                    "commit log has a gap between {} and {}",
                    pair[0].path.display(),
                    pair[1].path.display()
                )));
            }
        }
        Ok(CommitLog {
            dir: dir.to_path_buf(),
            segment_size,
            segments: RwLock::new(segments),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            prepared: Mutex::new(Prepared::default()),
            write_back_failed: std::sync::OnceLock::new(),
            stopped: std::sync::OnceLock::new(),
            creating: Mutex::new(()),
            filled: Condvar::new(),
            #[cfg(test)]
            waits: AtomicU64::new(0),
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// Size of each segment file.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// First offset still stored.
    pub fn min_offset(&self) -> u64 {
        read(&self.segments).first().map_or(0, |s| s.base)
    }

    /// End of appended data.
    pub fn max_offset(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// End of durable data.
    pub fn flushed_offset(&self) -> u64 {
        self.flushed.load(Ordering::Acquire)
    }

    /// Largest message that fits in a segment.
    pub fn max_message_len(&self) -> u64 {
        self.segment_size - END_BLANK_MIN
    }

    fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segs = read(&self.segments);
        let first = segs.first()?.base;
        if offset < first {
            return None;
        }
        let idx = ((offset - first) / self.segment_size) as usize;
        segs.get(idx).cloned()
    }

    fn create_segment(&self, base: u64) -> Result<Arc<Segment>, StoreError> {
        let path = self.dir.join(segment_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        file.set_len(self.segment_size)
            .map_err(|e| StoreError::io(&path, e))?;
        sync_dir(&self.dir)?;
        let seg = Arc::new(Segment::new(base, file, path));
        let mut segs = write(&self.segments);
        segs.push(seg.clone());
        Ok(seg)
    }

    /// Where a message of `len` bytes would start: `written`, or the next segment's base when it
    /// does not fit in the current one (the caller must then call [`CommitLog::append`], which
    /// writes the filler).
    pub fn next_start(&self, len: u64) -> u64 {
        self.start_after(self.max_offset(), len)
    }

    /// Where a message of `len` bytes would start if the log ended at `pos`.
    pub fn start_after(&self, pos: u64, len: u64) -> u64 {
        let room = self.segment_size - pos % self.segment_size;
        if len + END_BLANK_MIN > room {
            pos + room
        } else {
            pos
        }
    }

    /// Appends `data` (one or more whole messages) at [`CommitLog::next_start`]; the single
    /// writer (the store's write lock holder) calls this. Returns the start offset.
    pub fn append(&self, data: &[u8]) -> Result<u64, StoreError> {
        // A failure recorded between this check and the write lets this write in: under
        // SYNC_FLUSH its flush fails, so it is never acknowledged as durable; under
        // ASYNC_FLUSH it is acknowledged, as that policy allows.
        self.check_writable()?;
        let len = data.len() as u64;
        if len > self.max_message_len() {
            return Err(StoreError::MessageTooLarge {
                len,
                max: self.max_message_len(),
            });
        }
        // Held for the filler and the data: zeroes written ahead must not land on either.
        let (_zeroes, (mut pos, end)) = self.lock_for_data(|| {
            let pos = self.max_offset();
            (pos, self.start_after(pos, len) + len)
        });
        let room = self.segment_size - pos % self.segment_size;
        let closes = end - pos > len;
        if closes {
            // Close the segment with a filler so readers and recovery jump to the next one.
            if !pos.is_multiple_of(self.segment_size) || self.segment_for(pos).is_some() {
                let seg = self.segment_or_create(pos)?;
                let mut blank = [0u8; 8];
                blank[..4].copy_from_slice(&(room as i32).to_be_bytes());
                blank[4..].copy_from_slice(&BLANK_MAGIC.to_be_bytes());
                self.write_data(&seg, &blank, pos)?;
            }
            pos += room;
        }
        let seg = self
            .segment_or_create(pos)
            .map_err(|e| self.write_failed(e))?;
        self.write_data(&seg, data, pos)?;
        self.written.store(pos + len, Ordering::Release);
        Ok(pos)
    }

    /// Writes `data` at log offset `pos` of `seg`; a failure is sorted by `write_failed`.
    fn write_data(&self, seg: &Segment, data: &[u8], pos: u64) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let errno = self.fail_writes.load(Ordering::Relaxed);
            if errno != 0 {
                let e = std::io::Error::from_raw_os_error(errno);
                return Err(self.write_failed(StoreError::io(&seg.path, e)));
            }
        }
        seg.file
            .write_all_at(data, pos - seg.base)
            .map_err(|e| self.write_failed(StoreError::io(&seg.path, e)))
    }

    /// Sorts a failed write of the log: a file system gone read-only (ext4 remounts itself so
    /// after a journal error) or an I/O error will not take the next write either, so it is
    /// recorded as a failed write-back is: the broker turns unready, withdraws its write
    /// permission and refuses sends until a restart, instead of failing each send alone while
    /// it still looks writable. A full disk (ENOSPC) stays a failure of this write only: the
    /// disk watch refuses sends before that, and space may come back.
    fn write_failed(&self, e: StoreError) -> StoreError {
        match &e {
            StoreError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EROFS | libc::EIO)) =>
            {
                self.write_back_lost(e)
            }
            _ => e,
        }
    }

    /// Takes the zeroes' lock for a write of `[from, to)` as `range` gives it under the lock,
    /// waiting while zeroes are being written over any of it (only when the data has caught
    /// up with them). Returns the lock and the range.
    fn lock_for_data(
        &self,
        range: impl Fn() -> (u64, u64),
    ) -> (MutexGuard<'_, Prepared>, (u64, u64)) {
        let mut z = lock(&self.prepared);
        loop {
            let (from, to) = range();
            if !z.filling_over(from, to) {
                return (z, (from, to));
            }
            z.waiting += 1;
            #[cfg(test)]
            self.waits.fetch_add(1, Ordering::Relaxed);
            z = self.filled.wait(z).unwrap_or_else(|p| p.into_inner());
            z.waiting -= 1;
        }
    }

    /// Starts writing `len` bytes at `pos` to disk without waiting for them (SYNC_FLUSH): the
    /// flush that follows finds them already on their way, which shortens each group commit.
    /// Pages already being written are skipped, so this does not block on the flusher.
    pub fn start_writeback(&self, pos: u64, len: u64) -> Result<(), StoreError> {
        let Some(seg) = self.segment_for(pos) else {
            return Ok(());
        };
        // Nothing is waited for, so no earlier write-back error is reported (and taken) here.
        // What the call itself returns can be data the file system dropped (delayed
        // allocation failing for want of space, or an I/O error): that is recorded as a flush
        // failure would be. Anything else leaves the pages dirty, for the flush to write.
        seg.sync_range(&seg.file, pos - seg.base, len, libc::SYNC_FILE_RANGE_WRITE)
            .map_err(|e| match &e {
                StoreError::Io { source, .. }
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::EIO | libc::ENOSPC | libc::EDQUOT)
                    ) =>
                {
                    self.write_back_lost(e)
                }
                _ => e,
            })
    }

    /// Writes `zeroes` to the disk and waits until they are there (SYNC_FLUSH), so their
    /// blocks are allocated before appends overwrite them and a group commit has only data to
    /// write. No `fdatasync`: the allocation becomes durable with the first group commit that
    /// syncs the segment, and a second thread syncing the same file made group commits wait
    /// for its device flushes and journal commits (see README, Storage and durability).
    ///
    /// The wait reports any write-back error of the file, data pages' included, once per open
    /// file: it waits on a descriptor of its own, so the flush thread's `fdatasync` still sees
    /// the error. A failure here, like one of a flush, makes every later [`CommitLog::flush`]
    /// and append fail (see [`CommitLog::stopped`]).
    pub fn write_out(&self, zeroes: &ZeroRun) -> Result<(), StoreError> {
        let seg = &zeroes.seg;
        // A descriptor that cannot be opened (too many open files) says nothing of the disk.
        let file = seg.write_out_file()?;
        seg.sync_range(
            file,
            zeroes.offset,
            zeroes.len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
        .map_err(|e| self.write_back_lost(e))
    }

    /// Records that writing the log to disk failed and returns the error every caller gets
    /// from now on: nothing more is appended or flushed.
    fn write_back_lost(&self, e: StoreError) -> StoreError {
        let why = format!("writing the commit log to disk failed ({e})");
        if self.write_back_failed.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "the store takes no more messages until a restart recovers its log");
        }
        StoreError::WriteBackFailed(why)
    }

    /// Makes the store take no more data until a restart recovers it, for a failure after
    /// which log and queues may disagree although the log is sound: what it holds is still
    /// flushed. The first reason is logged, and is what every caller gets from now on.
    pub(crate) fn stop_writes(&self, why: String) -> StoreError {
        if self.stopped.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "the store takes no more messages until a restart recovers its log");
        }
        StoreError::WriteBackFailed(why)
    }

    /// Why the store takes no more data, if it stopped: writing the log to disk failed, or
    /// log and queues may disagree ([`CommitLog::stop_writes`]).
    ///
    /// Pages written before a failed write-back may be lost, and a log that went on past
    /// them would lose acknowledged messages at the next recovery, which stops at the first
    /// damaged one. A restart recovers it.
    pub fn stopped(&self) -> Option<&str> {
        self.write_back_failed
            .get()
            .or_else(|| self.stopped.get())
            .map(String::as_str)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        match self.stopped() {
            Some(e) => Err(StoreError::WriteBackFailed(e.to_string())),
            None => Ok(()),
        }
    }

    /// Writes replicated bytes verbatim at `offset`, which must be the current end (slaves
    /// only). The range must not cross a segment boundary.
    pub fn append_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.check_writable()?;
        let end = self.max_offset();
        if offset != end {
            return Err(StoreError::Corrupt(format!(
                "replicated data starts at {offset} but the local commit log ends at {end}"
            )));
        }
        let room = self.segment_size - offset % self.segment_size;
        if data.len() as u64 > room {
            return Err(StoreError::Corrupt(format!(
                "replicated chunk of {} bytes at {offset} crosses a segment boundary",
                data.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let seg = self
            .segment_or_create(offset)
            .map_err(|e| self.write_failed(e))?;
        let (_zeroes, _) = self.lock_for_data(|| (offset, offset + data.len() as u64));
        self.write_data(&seg, data, offset)?;
        self.written
            .store(offset + data.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Writes zeroes over up to 256 KiB of the log's not-yet-written part, within `ahead`
    /// bytes of its end, in segments that already exist. Once these zeroes are written out
    /// ([`CommitLog::write_out`]), a flush of later appends writes data only: the blocks are
    /// allocated, which halves the cost of each `fdatasync` here (ext4). `refilling` continues
    /// a run up to `ahead`; otherwise a run starts only when less than half of `ahead` is
    /// left, so zeroes go out in large runs. Returns the zeroes written, or `None` when there
    /// is nothing to write now: the log is prepared far enough, another fill is running, or a
    /// writer waits for the last one. Meant for one caller, the store's preparing thread.
    pub fn prepare_ahead(
        &self,
        ahead: u64,
        refilling: bool,
    ) -> Result<Option<ZeroRun>, StoreError> {
        let mut prepared = lock(&self.prepared);
        if prepared.waiting > 0 || prepared.filling.is_some() {
            // A writer waits for the last fill and goes first; or another caller is filling.
            return Ok(None);
        }
        let end = self.max_offset();
        // Whole pages past the data only: the page holding the end has data in it.
        let start = prepared.end.max(end).next_multiple_of(PAGE);
        let low = if refilling { ahead } else { ahead / 2 };
        if start >= end + low {
            return Ok(None);
        }
        let Some(seg) = self.segment_for(start) else {
            return Ok(None);
        };
        let stop = (start + PREPARE_CHUNK as u64)
            .min(seg.base + self.segment_size)
            .min(end + ahead);
        if stop <= start {
            return Ok(None);
        }
        // Written outside the lock, so appends before this range go on meanwhile.
        prepared.filling = Some((start, stop));
        drop(prepared);
        let mut fill = Fill {
            log: self,
            written: None,
        };
        seg.file
            .write_all_at(&ZEROES[..(stop - start) as usize], start - seg.base)
            .map_err(|e| StoreError::io(&seg.path, e))?;
        fill.written = Some(stop);
        drop(fill);
        Ok(Some(ZeroRun {
            offset: start - seg.base,
            len: stop - start,
            seg,
        }))
    }

    /// Largest chunk starting at `offset` that stays within one segment and the written data.
    pub fn chunk_len(&self, offset: u64, max: u64) -> u64 {
        let room = self.segment_size - offset % self.segment_size;
        max.min(room).min(self.max_offset().saturating_sub(offset))
    }

    /// Moves an empty log's start to `offset` (a slave joining a master whose old segments
    /// are gone). Fails if the log holds data.
    pub fn reset_start(&self, offset: u64) -> Result<(), StoreError> {
        if self.max_offset() != 0 || !read(&self.segments).is_empty() {
            return Err(StoreError::Corrupt(format!(
                "cannot start the commit log at {offset}: it already holds data"
            )));
        }
        if !offset.is_multiple_of(self.segment_size) {
            return Err(StoreError::Corrupt(format!(
                "cannot start the commit log at {offset}: not a segment boundary"
            )));
        }
        self.written.store(offset, Ordering::Release);
        self.flushed.store(offset, Ordering::Release);
        Ok(())
    }

    fn segment_or_create(&self, pos: u64) -> Result<Arc<Segment>, StoreError> {
        if let Some(s) = self.segment_for(pos) {
            return Ok(s);
        }
        let _one = lock(&self.creating);
        // Created ahead meanwhile (see `create_next_ahead`)?
        match self.segment_for(pos) {
            Some(s) => Ok(s),
            None => self.create_segment(pos - pos % self.segment_size),
        }
    }

    /// Creates the segment after the one being written once the data is past its middle, so
    /// the append that crosses into it finds the file there: creating it (and syncing the
    /// directory) would otherwise block the appending thread, an event loop. Returns whether
    /// a segment was created. Recovery removes a created segment that holds no data.
    pub fn create_next_ahead(&self) -> Result<bool, StoreError> {
        let end = self.max_offset();
        let in_segment = end % self.segment_size;
        let next = end - in_segment + self.segment_size;
        if in_segment < self.segment_size / 2
            || self.segment_for(end).is_none()
            || self.segment_for(next).is_some()
        {
            return Ok(false);
        }
        let _one = lock(&self.creating);
        if self.segment_for(next).is_some() {
            return Ok(false);
        }
        self.create_segment(next)?;
        Ok(true)
    }

    /// Whether the byte at `offset` is stored (a slave compares only what it has).
    pub fn holds(&self, offset: u64) -> bool {
        offset < self.max_offset() && self.segment_for(offset).is_some()
    }

    /// Reads `len` bytes at `offset`; the range must lie within one segment.
    pub fn read(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        // Before allocating: `len` may come from a damaged size field.
        if offset.saturating_add(len as u64) > self.max_offset() {
            return Err(StoreError::OutOfRange { offset });
        }
        let mut buf = BytesMut::zeroed(len);
        self.read_into(offset, &mut buf)?;
        Ok(buf.freeze())
    }

    /// Fills `buf` with the bytes at `offset` (within one segment), for callers that frame
    /// them in a buffer of their own (replication) and would otherwise copy them twice.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if offset.saturating_add(buf.len() as u64) > self.max_offset() {
            return Err(StoreError::OutOfRange { offset });
        }
        let seg = self
            .segment_for(offset)
            .ok_or(StoreError::OutOfRange { offset })?;
        seg.file
            .read_exact_at(buf, offset - seg.base)
            .map_err(|e| StoreError::io(&seg.path, e))
    }

    /// The store time of the message at `offset`, read from its header alone (searches by
    /// time and stats need nothing else, and a body can be megabytes).
    pub fn read_store_timestamp(&self, offset: u64) -> Result<i64, StoreError> {
        let mut head = [0u8; POS_SYS_FLAG + 4];
        self.read_into(offset, &mut head)?;
        let size = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let sys_flag = i32::from_be_bytes([
            head[POS_SYS_FLAG],
            head[POS_SYS_FLAG + 1],
            head[POS_SYS_FLAG + 2],
            head[POS_SYS_FLAG + 3],
        ]);
        // An IPv6 born host takes 12 bytes more than an IPv4 one.
        let at = POS_STORE_TIMESTAMP_V4 + if sys_flag & FLAG_BORN_V6 != 0 { 12 } else { 0 };
        if size <= 0 || (size as usize) < at + 8 {
            return Err(StoreError::Corrupt(format!(
                "message at {offset}: size {size} leaves no room for its store time"
            )));
        }
        let mut t = [0u8; 8];
        self.read_into(offset + at as u64, &mut t)?;
        Ok(i64::from_be_bytes(t))
    }

    /// The stored bytes of the message at `offset`, as its size field gives them (undecoded:
    /// answers that carry the message as stored).
    pub fn read_raw(&self, offset: u64) -> Result<Bytes, StoreError> {
        let head = self.read(offset, 4)?;
        let size = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if size <= 0 {
            return Err(StoreError::OutOfRange { offset });
        }
        if size as u64 > self.max_message_len() {
            return Err(StoreError::Corrupt(format!(
                "message at {offset}: size {size} exceeds the largest a segment holds"
            )));
        }
        self.read(offset, size as usize)
    }

    /// Reads and decodes the message at `offset`.
    pub fn read_message(&self, offset: u64) -> Result<StoredMessage, StoreError> {
        let bytes = self.read_raw(offset)?;
        decode_stored(&bytes).map_err(|e| StoreError::Corrupt(format!("message at {offset}: {e}")))
    }

    /// Makes everything appended so far durable; returns the durable end. Runs on the
    /// flusher thread.
    pub fn flush(&self) -> Result<u64, StoreError> {
        let target = self.max_offset();
        let from = self.flushed_offset();
        if target <= from {
            return Ok(from);
        }
        // Only a failed write-back stops flushes: a store stopped for its queues still makes
        // what its log took durable.
        if let Some(e) = self.write_back_failed.get() {
            return Err(StoreError::WriteBackFailed(e.clone()));
        }
        let segs: Vec<Arc<Segment>> = read(&self.segments)
            .iter()
            .filter(|s| s.base + self.segment_size > from && s.base < target)
            .cloned()
            .collect();
        for s in segs {
            s.sync_data().map_err(|e| self.write_back_lost(e))?;
        }
        self.flushed.fetch_max(target, Ordering::AcqRel);
        Ok(target)
    }

    /// Scans forward from `from` (a message boundary known to be valid) and returns every
    /// valid message after it, stopping at the first torn or corrupt one past `trusted`.
    /// Sets the write position to the end of the last valid message and zeroes everything
    /// after it, so a torn tail never resurfaces. After a crash (`crashed`), what lies past
    /// `from` is read from the disk, not from the page cache (see `read_from_disk`).
    ///
    /// Below `trusted` the log was durable (a checkpoint counted it), so a message there that
    /// cannot be read is damage, not a torn tail: it is passed over when its size can be
    /// trusted, and otherwise recovery fails with nothing cut. Cutting there would delete
    /// every later segment, acknowledged data included (a rebuild of the queues scans the
    /// whole log).
    pub fn recover(
        &self,
        from: u64,
        crashed: bool,
        trusted: u64,
        mut on_message: impl FnMut(&StoredRef<'_>) -> Result<(), StoreError>,
    ) -> Result<RecoveryReport, StoreError> {
        let damaged = |pos: u64, what: &str| {
            StoreError::Corrupt(format!(
                "the commit log is damaged at offset {pos} ({what}), below the checkpoint's \
                 {trusted}: nothing was cut; restore the store from a copy (or a slave), or \
                 remove the damaged segment and everything after it by hand to accept the loss"
            ))
        };
        let mut pos = from.max(self.min_offset());
        let mut report = RecoveryReport::default();
        let segs: Vec<Arc<Segment>> = read(&self.segments).clone();
        const CHUNK: usize = 4 << 20;
        'segments: for seg in segs.iter() {
            if seg.base + self.segment_size <= pos {
                continue;
            }
            if pos < seg.base {
                pos = seg.base;
            }
            if crashed {
                read_from_disk(seg, pos - seg.base)?;
            }
            let mut buf: Vec<u8> = Vec::new();
            let mut buf_start = pos; // commit-log offset of buf[0]
            loop {
                let in_seg = pos - seg.base;
                if in_seg + 8 > self.segment_size {
                    if pos < trusted {
                        return Err(damaged(pos, "a segment ends without its filler"));
                    }
                    break 'segments;
                }
                // Make sure the header, then the whole message, are in buf.
                let rel = (pos - buf_start) as usize;
                if rel + 8 > buf.len() {
                    buf = read_chunk(seg, in_seg, CHUNK, self.segment_size)?;
                    buf_start = pos;
                }
                let rel = (pos - buf_start) as usize;
                let size = i32::from_be_bytes([buf[rel], buf[rel + 1], buf[rel + 2], buf[rel + 3]]);
                let magic =
                    i32::from_be_bytes([buf[rel + 4], buf[rel + 5], buf[rel + 6], buf[rel + 7]]);
                if magic == BLANK_MAGIC {
                    pos = seg.base + self.segment_size;
                    continue 'segments;
                }
                if (magic != MAGIC_V1 && magic != MAGIC_V2)
                    || size <= 8
                    || in_seg + size as u64 + END_BLANK_MIN > self.segment_size
                {
                    if pos < trusted {
                        return Err(damaged(pos, "no message starts there"));
                    }
                    break 'segments;
                }
                let size = size as usize;
                if rel + size > buf.len() {
                    buf = read_chunk(seg, in_seg, CHUNK.max(size), self.segment_size)?;
                    buf_start = pos;
                }
                let rel = (pos - buf_start) as usize;
                let msg = match parse_stored(&buf[rel..rel + size]) {
                    Ok(m) if m.physical_offset as u64 == pos => m,
                    _ if pos < trusted => {
                        // Its header holds: the next message starts right after it.
                        tracing::error!(offset = pos, size, "a damaged message below the checkpoint is passed over; its queue entry stays empty");
                        report.skipped += 1;
                        pos += size as u64;
                        continue;
                    }
                    _ => break 'segments,
                };
                on_message(&msg)?;
                report.messages += 1;
                pos += size as u64;
            }
        }
        // Everything from pos on is torn or garbage: zero it within the tail segment and drop
        // later segments.
        let end = pos;
        let mut segs = write(&self.segments);
        while let Some(last) = segs.last() {
            if last.base > end || (last.base == end && end != 0 && segs.len() > 1) {
                let path = last.path.clone();
                segs.pop();
                std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                report.segments_removed += 1;
            } else {
                break;
            }
        }
        if let Some(seg) = segs
            .iter()
            .find(|s| s.base <= end && end < s.base + self.segment_size)
        {
            let in_seg = end - seg.base;
            report.truncated_bytes = zero_tail(seg, in_seg, self.segment_size)?;
        }
        drop(segs);
        self.written.store(end, Ordering::Release);
        self.flushed.store(end, Ordering::Release);
        report.end = end;
        Ok(report)
    }

    /// Deletes segments that lie wholly before `offset` and whose file is older than
    /// `max_age`; never the segment being written. Returns the new min offset.
    pub fn delete_expired(&self, max_age: std::time::Duration) -> Result<u64, StoreError> {
        let now = std::time::SystemTime::now();
        let written = self.max_offset();
        let mut segs = write(&self.segments);
        while segs.len() > 1 {
            let first = &segs[0];
            if first.base + self.segment_size > written {
                break;
            }
            let modified = first
                .file
                .metadata()
                .and_then(|m| m.modified())
                .map_err(|e| StoreError::io(&first.path, e))?;
            if now.duration_since(modified).unwrap_or_default() < max_age {
                break;
            }
            let path = first.path.clone();
            std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            tracing::info!(segment = %path.display(), "deleted expired commit-log segment");
            segs.remove(0);
        }
        Ok(segs.first().map_or(0, |s| s.base))
    }
}

/// What crash recovery found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RecoveryReport {
    /// Valid messages found after the checkpoint.
    pub messages: u64,
    /// Non-zero bytes zeroed after the last valid message (a torn tail).
    pub truncated_bytes: u64,
    /// Segment files removed past the valid end.
    pub segments_removed: u64,
    /// Damaged messages below the checkpoint passed over (see [`CommitLog::recover`]).
    pub skipped: u64,
    /// End of the valid log.
    pub end: u64,
}

/// Makes recovery read a segment from `at` on as the disk holds it, not as the page cache
/// does: after a failed write-back the kernel may keep the pages it could not write, clean
/// and readable, so a restarted broker would take messages the disk never got for recovered
/// and never write them again. Dirty pages (a crash leaves them, and they are good) are
/// written first; a failure there fails the start.
fn read_from_disk(seg: &Segment, at: u64) -> Result<(), StoreError> {
    if let Err(e) = seg.sync_data() {
        // A file newly opened is told of a write-back error nobody has seen yet (the last
        // process died before its next sync): that one is about pages already lost, which
        // the scan below finds missing. Only a second failure is about pages written now.
        tracing::warn!(error = %e, "an earlier write of the commit log to disk failed; recovering from what the disk holds");
        seg.sync_data()?;
    }
    let from = (at - at % PAGE) as libc::off_t;
    if let Err(e) = nix::fcntl::posix_fadvise(
        &seg.file,
        from,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    ) {
        tracing::warn!(path = %seg.path.display(), error = %e, "cannot drop cached pages before recovery; recovering from the page cache");
    }
    Ok(())
}

fn read_chunk(seg: &Segment, at: u64, len: usize, seg_size: u64) -> Result<Vec<u8>, StoreError> {
    let len = len.min((seg_size - at) as usize);
    let mut buf = vec![0u8; len];
    seg.file
        .read_exact_at(&mut buf, at)
        .map_err(|e| StoreError::io(&seg.path, e))?;
    Ok(buf)
}

/// Zeroes a segment from `at` to its end; returns how many non-zero bytes were there.
fn zero_tail(seg: &Segment, at: u64, seg_size: u64) -> Result<u64, StoreError> {
    const CHUNK: usize = 1 << 20;
    let mut dirty = 0u64;
    let mut pos = at;
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    while pos < seg_size {
        // Ranges the file holds no data for were never written, so nothing stale can be
        // there: jump past them instead of reading (up to a segment of) zeros. Filesystems
        // without SEEK_DATA get every byte read.
        match nix::unistd::lseek(&seg.file, pos as i64, nix::unistd::Whence::SeekData) {
            Ok(data) if data as u64 >= seg_size => break,
            Ok(data) => pos = pos.max(data as u64),
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => {}
        }
        let n = CHUNK.min((seg_size - pos) as usize);
        seg.file
            .read_exact_at(&mut buf[..n], pos)
            .map_err(|e| StoreError::io(&seg.path, e))?;
        // Every chunk is checked: stale messages past a torn one must never be mistaken for
        // new ones by a later recovery.
        // An OR over the chunk vectorizes (a restart reads up to a whole segment of mostly
        // zeros); the exact count is only needed for the rare dirty chunk.
        let nz = if buf[..n].iter().fold(0u8, |acc, b| acc | b) == 0 {
            0
        } else {
            buf[..n].iter().filter(|b| **b != 0).count() as u64
        };
        if nz > 0 {
            dirty += nz;
            seg.file
                .write_all_at(&zeros[..n], pos)
                .map_err(|e| StoreError::io(&seg.path, e))?;
        }
        pos += n as u64;
    }
    if dirty > 0 {
        seg.file
            .sync_data()
            .map_err(|e| StoreError::io(&seg.path, e))?;
    }
    Ok(dirty)
}

/// Creates `dir` and any missing parents, making each new directory's entry durable: the
/// files in it are synced, but on a file system without a journal a power loss could still
/// take away the directory that names them.
pub fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        missing.push(d);
        at = d.parent();
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    for d in missing.iter().rev() {
        match d.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => sync_dir(parent)?,
            None => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Makes a directory entry (a new or renamed file) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Reads behind `l`, whether or not a writer panicked (the data stays consistent).
pub(super) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes behind `l`, whether or not an earlier writer panicked.
pub(super) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_read_only_or_failing_disk_stops_the_log_a_full_one_fails_the_write_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
        let fail = |log: &CommitLog, errno| log.fail_writes.store(errno, Ordering::Relaxed);
        // A full disk fails the write, and only it.
        fail(&log, libc::ENOSPC);
        assert!(matches!(log.append(b"full"), Err(StoreError::Io { .. })));
        assert!(log.stopped().is_none());
        fail(&log, 0);
        log.append(b"still taken").unwrap();
        // A file system gone read-only stops the log.
        fail(&log, libc::EROFS);
        assert!(matches!(
            log.append(b"read-only"),
            Err(StoreError::WriteBackFailed(_))
        ));
        fail(&log, 0);
        assert!(log.stopped().is_some_and(|w| w.contains("Read-only")));
        assert!(matches!(
            log.append(b"refused"),
            Err(StoreError::WriteBackFailed(_))
        ));
        // So does an I/O error, on a slave's replicated write too.
        let other = CommitLog::open(&dir.path().join("other"), 64 * 1024).unwrap();
        fail(&other, libc::EIO);
        assert!(other.append_at(0, b"replicated").is_err());
        assert!(other.stopped().is_some());
    }

    #[test]
    fn a_damaged_size_field_is_refused_before_anything_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
        // A size of 2 GiB - 1 where a message would start (say, an id asked of VIEW_MESSAGE).
        log.append(&[0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]).unwrap();
        assert!(matches!(log.read_message(0), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            log.read(0, usize::MAX),
            Err(StoreError::OutOfRange { offset: 0 })
        ));
    }

    #[test]
    fn a_failed_write_out_fails_every_later_flush_and_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
        log.append(&[1u8; 100]).unwrap();
        assert_eq!(log.flush().unwrap(), 100);
        // What the kernel reports once for the whole file: here a range it refuses.
        log.append(&[2u8; 100]).unwrap();
        let bad = ZeroRun::unwritable(&log).unwrap();
        assert!(log.write_out(&bad).is_err());
        for _ in 0..2 {
            match log.flush() {
                Err(StoreError::WriteBackFailed(why)) => assert!(why.contains("too large")),
                other => panic!("flushed after a failed write-out: {other:?}"),
            }
        }
        assert_eq!(log.flushed_offset(), 100, "only what was synced before");
        assert!(matches!(
            log.append(&[3u8; 100]),
            Err(StoreError::WriteBackFailed(_))
        ));
        assert_eq!(log.max_offset(), 200, "nothing taken after the failure");
    }

    #[test]
    fn a_segment_left_empty_by_a_stop_during_its_creation_is_sized() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
            log.append(&[1u8; 100]).unwrap();
            log.flush().unwrap();
        }
        // Killed between creating the next segment and sizing it.
        std::fs::File::create(dir.path().join(segment_name(64 * 1024))).unwrap();
        let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join(segment_name(64 * 1024)))
                .unwrap()
                .len(),
            64 * 1024
        );
        drop(log);
        // An empty segment anywhere else is damage, not an interrupted creation.
        std::fs::remove_file(dir.path().join(segment_name(0))).unwrap();
        std::fs::File::create(dir.path().join(segment_name(0))).unwrap();
        match CommitLog::open(dir.path(), 64 * 1024) {
            Err(StoreError::Corrupt(why)) => assert!(why.contains("not the last"), "{why}"),
            other => panic!("an empty first segment was taken: {other:?}"),
        }
    }

    #[test]
    fn a_failed_flush_fails_every_later_flush_and_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(dir.path(), 64 * 1024).unwrap();
        log.append(&[1u8; 100]).unwrap();
        assert_eq!(log.flush().unwrap(), 100);
        assert_eq!(log.stopped(), None);
        log.break_syncing(0);
        log.append(&[2u8; 100]).unwrap();
        match log.flush() {
            Err(StoreError::WriteBackFailed(why)) => assert!(why.contains("Invalid argument")),
            other => panic!("the broken sync was not reported: {other:?}"),
        }
        // The kernel would report the error once and may drop the pages: the next flush,
        // with nothing new to report, must not succeed in its place.
        for _ in 0..2 {
            assert!(matches!(log.flush(), Err(StoreError::WriteBackFailed(_))));
        }
        assert!(log.stopped().unwrap().contains("Invalid argument"));
        assert!(matches!(
            log.append(&[3u8; 100]),
            Err(StoreError::WriteBackFailed(_))
        ));
        assert!(matches!(
            log.append_at(200, &[3u8; 100]),
            Err(StoreError::WriteBackFailed(_))
        ));
        assert_eq!((log.max_offset(), log.flushed_offset()), (200, 100));
    }

    #[test]
    fn an_append_waits_only_for_zeroes_written_over_its_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(CommitLog::open(dir.path(), 64 * 1024).unwrap());
        log.append(&[1u8; 100]).unwrap();
        // Zeroes being written past the end, marked as the preparing thread marks them.
        lock(&log.prepared).filling = Some((32 * 1024, 48 * 1024));
        let append = |len: usize| {
            let (log, (tx, rx)) = (log.clone(), mpsc::channel());
            std::thread::spawn(move || tx.send(log.append(&vec![2u8; len])));
            rx
        };
        // An append before that range goes ahead.
        let before = append(100).recv_timeout(Duration::from_secs(30));
        assert_eq!(before.expect("the append waited").unwrap(), 100);
        // While a fill runs, no other starts.
        assert!(log.prepare_ahead(1 << 20, true).unwrap().is_none());
        // One reaching into it waits until the zeroes are written, then lands at its own
        // offset, over them.
        let into = append(40 * 1024);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while lock(&log.prepared).waiting == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the append never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            into.try_recv().is_err(),
            "the append did not wait for the zeroes under it"
        );
        // The fill ends; until the waiting append has written, no new fill starts either.
        {
            let mut z = lock(&log.prepared);
            z.filling = None;
            z.end = 48 * 1024;
        }
        // Nothing else wakes the append meanwhile: it still waits.
        assert!(
            log.prepare_ahead(1 << 20, true).unwrap().is_none(),
            "a fill started ahead of a waiting append"
        );
        log.filled.notify_all();
        let into = into.recv_timeout(Duration::from_secs(30));
        assert_eq!(into.expect("the append never resumed").unwrap(), 200);
        assert_eq!(log.read(200, 4).unwrap()[..], [2u8; 4]);
    }

    #[test]
    fn an_append_finds_the_segment_created_while_it_waited() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(CommitLog::open(dir.path(), 64 * 1024).unwrap());
        log.append(&[1u8; 60 * 1024]).unwrap();
        // The flush thread is creating the next segment; an append needing it meanwhile.
        let creating = lock(&log.creating);
        let crossing = {
            let log = log.clone();
            std::thread::spawn(move || log.append(&[2u8; 8 * 1024]))
        };
        std::thread::sleep(Duration::from_millis(50));
        log.create_segment(64 * 1024).unwrap();
        drop(creating);
        assert_eq!(crossing.join().unwrap().unwrap(), 64 * 1024);
        let bases: Vec<u64> = read(&log.segments).iter().map(|s| s.base).collect();
        assert_eq!(bases, [0, 64 * 1024], "a segment was created twice");
    }

    #[test]
    fn appends_racing_the_zeroes_ahead_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(CommitLog::open(dir.path(), 64 * 1024).unwrap());
        /// Stops the preparing thread however the test ends.
        struct Stop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let stop = Stop(Arc::default());
        let started = Arc::new(std::sync::Barrier::new(2));
        let preparer = {
            let (log, stop, started) = (log.clone(), stop.0.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                while !stop.load(Ordering::Acquire) {
                    // As the flush thread does: the next segment is often there before the
                    // data, and zeroes go into it too.
                    log.create_next_ahead().unwrap();
                    if log.prepare_ahead(1 << 20, true).unwrap().is_none() {
                        std::thread::yield_now();
                    }
                }
            })
        };
        // Sizes up to a third of a segment, so appends often close a segment, and the next
        // one lands where the preparer starts zeroing the new segment.
        // At least 2,000 appends, and on until some waited for a fill: a preparer starved of
        // CPU (tests run in parallel) must not let the race go unrun.
        let mut written = Vec::new();
        started.wait();
        for i in 0..20_000u32 {
            if i >= 2000 && log.waits.load(Ordering::Relaxed) > 0 {
                break;
            }
            let len = 64 + (i as usize * 7919) % (20 * 1024);
            let byte = (i % 251) as u8 + 1;
            written.push((log.append(&vec![byte; len]).unwrap(), len, byte));
        }
        drop(stop);
        preparer.join().unwrap();
        assert!(
            log.waits.load(Ordering::Relaxed) > 0,
            "no append ever waited for zeroes: the race was not run"
        );
        // The appender and the preparer never created a segment twice, nor skipped one.
        let bases: Vec<u64> = read(&log.segments).iter().map(|s| s.base).collect();
        assert!(bases.len() > 2, "{} segments", bases.len());
        assert!(
            bases.windows(2).all(|w| w[1] == w[0] + 64 * 1024),
            "{bases:?}"
        );
        for (offset, len, byte) in written {
            let got = log.read(offset, len).unwrap();
            assert!(
                got.iter().all(|b| *b == byte),
                "the message at {offset} was overwritten"
            );
        }
    }
}
