//! The key index: finds stored messages by their keys (`KEYS`) and client message ids
//! (`UNIQ_KEY`) for QUERY_MESSAGE (`queryMsgByKey`, `queryMsgByUniqueKey`, and the message
//! tabs of consoles), as Java's IndexService does.
//!
//! It is derived from the commit log and built behind it by a thread of the store's own, so
//! sends never wait for it, and it can always be rebuilt from the log: deleting the `index`
//! directory has the whole log indexed again. Files (`index/<sequence>`) hold a header, a
//! table of hash slots and entries. Each entry (key hash, commit-log offset, store time, the
//! previous entry of its slot) chains back through the keys of the same slot, newest first.
//! Whatever writes the log (a master's appends, a slave's indexing of what it received) hands
//! the keys of what it wrote to the thread, which then need not read the messages back; the
//! thread reads the log itself only for what it was not handed (at start, after a crash, or
//! when it fell too far behind).
//!
//! The file being written keeps its slots in memory and writes its entries as it goes; its
//! progress is recorded in `index/checkpoint.json` after the entries are on disk, and a
//! restart replays the slots from the entries the checkpoint counts. A full file gets its slot
//! table written and synced, then its sealed header (synced too), and only then does the next
//! file start. Sealed files never change, so queries read them without holding the index's
//! lock. Files whose last message the log no longer holds are deleted with it.
//!
//! Hash collisions, and entries of messages a power cut took from the log's tail (a sealed
//! file keeps them), are harmless: the store reads each message found and keeps only those
//! whose topic and key match.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::commitlog::create_dir_durable;
use super::message::{TX_MASK, TX_ROLLBACK};
use super::persist::{load_json, save_json};
use super::StoreError;

/// Marks an index file ("FMQI").
const MAGIC: u32 = 0x464D_5149;
/// Format of the files this code writes.
const VERSION: u32 = 1;
/// Header bytes before the slot table.
const HEADER_LEN: u64 = 64;
/// Bytes per entry: key hash (4), previous entry of the slot (4), commit-log offset (8), store
/// time (8).
const ENTRY_LEN: u64 = 24;
/// Separator of the keys in `KEYS` (Java's `MessageConst.KEY_SEPARATOR`).
const KEY_SEPARATOR: char = ' ';
/// Most entries handed over and not yet taken by the index's thread (6 MiB): past that the
/// hand-over starts again, and the thread reads what it missed from the log.
#[cfg(not(test))]
const FEED_CAP: usize = 1 << 18;
/// Most hash slots per file: the table of the file being written is kept in memory (4 bytes a
/// slot), so this caps it at 200 MB.
pub const MAX_SLOTS: u32 = 50_000_000;
/// Most entries per file (24 bytes each: a 2.4 GB file).
pub const MAX_ENTRIES: u32 = 100_000_000;
/// Most offsets a query takes from the file being written while it holds the index's lock;
/// the messages are read after (hash collisions are rare, so far fewer are ever needed).
const ACTIVE_CANDIDATES: usize = 1024;
/// Few in tests, whose stores then index both ways.
#[cfg(test)]
const FEED_CAP: usize = 100;

/// How large index files are: `maxHashSlotNum` slots, `maxIndexNum` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexSize {
    /// Hash slots per file (4 bytes each, kept in memory for the file being written).
    pub slots: u32,
    /// Entries per file (24 bytes each).
    pub entries: u32,
}

impl Default for IndexSize {
    /// 1M slots and 4M entries: a 100 MB file and 4 MiB of memory (Java's 5M and 20M would
    /// keep 20 MiB resident, more than the rest of an idle broker).
    fn default() -> Self {
        IndexSize {
            slots: 1_000_000,
            entries: 4_000_000,
        }
    }
}

/// One key of one message, as the index stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// [`key_hash`] of the topic and key.
    pub hash: u32,
    /// Commit-log offset of the message.
    pub offset: u64,
    /// Its store time (ms).
    pub store_time: i64,
}

/// The keys a message is found by: its client message id (`UNIQ_KEY`), then each of its
/// `KEYS`. One pass over the properties (this runs for every message stored); as everywhere,
/// a repeated property's last value counts.
pub fn keys(properties: &str) -> impl Iterator<Item = &str> {
    let (mut uniq, mut keys) = (None, None);
    for kv in properties.split('\u{2}') {
        if let Some(v) = kv.strip_prefix("UNIQ_KEY\u{1}") {
            uniq = Some(v);
        } else if let Some(v) = kv.strip_prefix("KEYS\u{1}") {
            keys = Some(v);
        }
    }
    uniq.into_iter()
        .chain(keys.into_iter().flat_map(|k| k.split(KEY_SEPARATOR)))
        .filter(|k| !k.is_empty())
}

/// Adds the entries of one stored message to `out`: one per key, none for a rolled-back
/// transaction's message (as Java's index skips them).
pub fn entries_of(
    out: &mut Vec<IndexEntry>,
    topic: &str,
    properties: &str,
    sys_flag: i32,
    offset: u64,
    store_time: i64,
) {
    if sys_flag & TX_MASK == TX_ROLLBACK {
        return;
    }
    out.extend(keys(properties).map(|k| IndexEntry {
        hash: key_hash(topic, k),
        offset,
        store_time,
    }));
}

/// Whether `key` is one of the keys [`keys`] gives for `properties`.
pub fn has_key(properties: &str, key: &str) -> bool {
    keys(properties).any(|k| k == key)
}

/// The hash a key is filed under: FNV-1a of `topic#key` (stable across restarts and builds,
/// unlike std's hasher).
pub fn key_hash(topic: &str, key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in topic.bytes().chain([b'#']).chain(key.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    slots: u32,
    capacity: u32,
    entries: u32,
    sealed: bool,
    /// Earliest and latest store time among the entries (a query skips files outside its
    /// time range).
    begin_time: i64,
    end_time: i64,
    /// Commit-log offset before which every message was indexed when the file was sealed.
    through: u64,
    /// Commit-log offset of the last entry's message: the file goes once the log starts past it.
    last_offset: u64,
    /// Commit-log offset from which the file indexes (everything before was indexed before it).
    begin_offset: u64,
}

impl Header {
    fn new(size: IndexSize, begin_offset: u64) -> Header {
        Header {
            slots: size.slots,
            capacity: size.entries,
            entries: 0,
            sealed: false,
            begin_time: i64::MAX,
            end_time: i64::MIN,
            through: 0,
            last_offset: 0,
            begin_offset,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        let fields32 = [
            MAGIC,
            VERSION,
            self.slots,
            self.capacity,
            self.entries,
            u32::from(self.sealed),
        ];
        for (i, v) in fields32.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        let fields64 = [
            self.begin_time as u64,
            self.end_time as u64,
            self.through,
            self.last_offset,
            self.begin_offset,
        ];
        for (i, v) in fields64.iter().enumerate() {
            b[24 + i * 8..32 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8; HEADER_LEN as usize]) -> Option<Header> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        // Sizes out of range are damage: they would have the replay allocate gigabytes.
        if u32_at(0) != MAGIC
            || u32_at(4) != VERSION
            || !(1..=MAX_SLOTS).contains(&u32_at(8))
            || !(1..=MAX_ENTRIES).contains(&u32_at(12))
        {
            return None;
        }
        Some(Header {
            slots: u32_at(8),
            capacity: u32_at(12),
            entries: u32_at(16).min(u32_at(12)),
            sealed: u32_at(20) != 0,
            begin_time: u64_at(24) as i64,
            end_time: u64_at(32) as i64,
            through: u64_at(40),
            last_offset: u64_at(48),
            begin_offset: u64_at(56),
        })
    }
}

/// One index file.
struct IndexFile {
    seq: u64,
    path: PathBuf,
    file: File,
    header: Header,
    /// The slot table of the file being written (each slot: the 1-based number of its newest
    /// entry, 0 for none); read from the file once it is sealed.
    slots: Option<Vec<u32>>,
}

impl IndexFile {
    fn slot_of(&self, hash: u32) -> u32 {
        hash % self.header.slots
    }

    fn entry_pos(&self, number: u32) -> u64 {
        HEADER_LEN + 4 * u64::from(self.header.slots) + ENTRY_LEN * u64::from(number - 1)
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::io(&self.path, e)
    }

    /// The newest entry of `hash`'s slot (1-based; 0 for none).
    fn head(&self, hash: u32) -> Result<u32, StoreError> {
        let slot = self.slot_of(hash);
        if let Some(slots) = &self.slots {
            return Ok(slots[slot as usize]);
        }
        let mut b = [0u8; 4];
        self.file
            .read_exact_at(&mut b, HEADER_LEN + 4 * u64::from(slot))
            .map_err(|e| self.io(e))?;
        Ok(u32::from_be_bytes(b))
    }

    /// Entry `number` (1-based) and the number of the entry before it in its slot.
    fn entry(&self, number: u32) -> Result<(IndexEntry, u32), StoreError> {
        let mut b = [0u8; ENTRY_LEN as usize];
        self.file
            .read_exact_at(&mut b, self.entry_pos(number))
            .map_err(|e| self.io(e))?;
        Ok(decode_entry(&b))
    }

    /// Calls `visit` with the offset of each entry of `hash` stored within `[begin, end]`,
    /// newest first, until it returns false; returns false if it did.
    fn walk(
        &self,
        hash: u32,
        begin: i64,
        end: i64,
        visit: &mut dyn FnMut(u64) -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let mut number = self.head(hash)?;
        // Each step goes to an earlier entry; anything else is damage, and ends the walk.
        while number != 0 && number <= self.header.entries {
            let (e, prev) = self.entry(number)?;
            if e.hash == hash && e.store_time >= begin && e.store_time <= end && !visit(e.offset)? {
                return Ok(false);
            }
            if e.store_time < begin || prev >= number {
                break;
            }
            number = prev;
        }
        Ok(true)
    }

    /// Writes the header (at the start of the file).
    fn write_header(&self) -> Result<(), StoreError> {
        self.file
            .write_all_at(&self.header.encode(), 0)
            .map_err(|e| self.io(e))
    }
}

fn encode_entry(e: &IndexEntry, prev: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.hash.to_be_bytes());
    out.extend_from_slice(&prev.to_be_bytes());
    out.extend_from_slice(&e.offset.to_be_bytes());
    out.extend_from_slice(&e.store_time.to_be_bytes());
}

fn decode_entry(b: &[u8]) -> (IndexEntry, u32) {
    let mut x = [0u8; 8];
    let hash = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let prev = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    x.copy_from_slice(&b[8..16]);
    let offset = u64::from_be_bytes(x);
    x.copy_from_slice(&b[16..24]);
    let store_time = i64::from_be_bytes(x);
    (
        IndexEntry {
            hash,
            offset,
            store_time,
        },
        prev,
    )
}

/// How far the file being written had got when it was last on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexCheckpoint {
    /// Sequence number of the file being written.
    file: u64,
    /// Its entries on disk.
    entries: u32,
    /// Commit-log offset before which every message is indexed.
    through: u64,
}

/// The files, and how far the log is indexed.
struct Files {
    /// Sealed files, oldest first; never written again, so read without the lock.
    sealed: Vec<Arc<IndexFile>>,
    /// The file being written.
    active: IndexFile,
    /// Commit-log offset before which every message is indexed.
    through: u64,
    /// Whether entries were added since the last checkpoint.
    dirty: bool,
}

/// Keys of messages just written, handed to the index's thread.
#[derive(Debug, Default)]
pub struct Feed {
    /// The log range covered: the keys of every message in `[from, to)` are in `entries`.
    pub from: u64,
    /// End of the range covered.
    pub to: u64,
    /// The keys, in log order.
    pub entries: Vec<IndexEntry>,
}

impl Feed {
    /// The keys of the messages at or after `offset`.
    pub fn from_offset(&self, offset: u64) -> &[IndexEntry] {
        &self.entries[self.entries.partition_point(|e| e.offset < offset)..]
    }
}

/// The key index of a store.
pub struct KeyIndex {
    dir: PathBuf,
    size: IndexSize,
    files: Mutex<Files>,
    /// `Files::through`, readable without the lock (metrics, answers' headers).
    through: AtomicU64,
    /// Keys handed over by the log's writer, not yet taken.
    feed: Mutex<Feed>,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}")
}

/// Opens an index file and reads its header; `None` if it is not one (a file created but
/// never given its header, or damaged).
fn open_file(seq: u64, path: PathBuf) -> Result<Option<IndexFile>, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    let mut b = [0u8; HEADER_LEN as usize];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(StoreError::io(&path, e)),
    }
    Ok(Header::decode(&b).map(|header| IndexFile {
        seq,
        path,
        file,
        header,
        slots: None,
    }))
}

impl KeyIndex {
    /// Opens the index in `dir`, checked against the commit log that now spans
    /// `[log_min, log_end)`: what the log no longer holds past its end (a torn tail cut by
    /// recovery) is dropped from the file being written, and indexing resumes from
    /// [`KeyIndex::indexed_through`].
    pub fn open(
        dir: &Path,
        size: IndexSize,
        log_min: u64,
        log_end: u64,
    ) -> Result<KeyIndex, StoreError> {
        create_dir_durable(dir)?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name();
            let Some(seq) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            found.push((seq, entry.path()));
        }
        found.sort();
        let checkpoint: Option<IndexCheckpoint> = match load_json(&dir.join("checkpoint.json")) {
            Ok(c) => c,
            Err(e @ StoreError::Json { .. }) => {
                tracing::warn!(error = %e, "the key index's checkpoint cannot be read; the file it counted is built again");
                None
            }
            Err(e) => return Err(e),
        };
        let last_seq = found.last().map(|(s, _)| *s);
        let mut sealed = Vec::new();
        let mut active = None;
        for (seq, path) in found {
            let is_last = Some(seq) == last_seq;
            match open_file(seq, path.clone())? {
                Some(f) if f.header.sealed => sealed.push(Arc::new(f)),
                Some(f) if is_last && checkpoint.as_ref().is_some_and(|c| c.file == seq) => {
                    active = Some(f)
                }
                // Not sealed and not the file the checkpoint counts: a file whose first
                // checkpoint never came, or one left behind by damage. What it held is
                // indexed again. (A file is created only once the one before is sealed, so
                // this never drops a file with entries no other holds.)
                _ => {
                    tracing::info!(file = %path.display(), "dropping an unfinished key index file");
                    std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                }
            }
        }
        let next_seq = last_seq.map_or(1, |s| s + 1);
        let (active, mut through) = match (active, checkpoint) {
            (Some(mut f), Some(c)) => {
                f.header.entries = c.entries.min(f.header.capacity);
                // Entries of messages past the log's end are gone with them.
                let keep_before = if c.through > log_end {
                    log_end
                } else {
                    u64::MAX
                };
                let resume = Self::replay(&mut f, keep_before)?;
                (f, resume.map_or(c.through, |r| c.through.min(r)))
            }
            // A new file has nothing to replay (and its empty slot table stays untouched
            // memory until keys come).
            _ => {
                let through = sealed.last().map_or(log_min, |f| f.header.through);
                (Self::create_file(dir, next_seq, size, through)?, through)
            }
        };
        through = through.min(log_end).max(log_min);
        let files = Files {
            sealed,
            active,
            through,
            dirty: true,
        };
        Ok(KeyIndex {
            dir: dir.to_path_buf(),
            size,
            files: Mutex::new(files),
            through: AtomicU64::new(through),
            feed: Mutex::new(Feed::default()),
        })
    }

    /// Creates file `seq`, empty, with its header: it indexes from `begin_offset` on.
    fn create_file(
        dir: &Path,
        seq: u64,
        size: IndexSize,
        begin_offset: u64,
    ) -> Result<IndexFile, StoreError> {
        let path = dir.join(file_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let f = IndexFile {
            seq,
            path,
            file,
            header: Header::new(size, begin_offset),
            slots: Some(vec![0; size.slots as usize]),
        };
        f.write_header()?;
        Ok(f)
    }

    /// Rebuilds the slots of the file being written from its entries, keeping those of
    /// messages before `keep_before` and stopping at the first damaged one (or where the file
    /// ends early). When entries are dropped, returns where indexing must resume: the message
    /// of the last entry kept (its other keys may be among those dropped), or where the file
    /// began.
    fn replay(f: &mut IndexFile, keep_before: u64) -> Result<Option<u64>, StoreError> {
        let mut slots = vec![0u32; f.header.slots as usize];
        let (mut begin_time, mut end_time) = (i64::MAX, i64::MIN);
        let mut last_offset = None;
        // No more than the file holds (a checkpoint counts only entries written before it,
        // but the file system may have lost their length in a power cut).
        let len = f
            .file
            .metadata()
            .map_err(|e| StoreError::io(&f.path, e))?
            .len();
        let on_disk = len.saturating_sub(f.entry_pos(1)) / ENTRY_LEN;
        let total = f
            .header
            .entries
            .min(u32::try_from(on_disk).unwrap_or(u32::MAX));
        let mut cut = total < f.header.entries;
        let mut buf = vec![0u8; (ENTRY_LEN as usize) * 4096];
        let mut number = 1u32;
        'read: while number <= total {
            let n = (total - number + 1).min(4096);
            let b = &mut buf[..(n as usize) * ENTRY_LEN as usize];
            f.file
                .read_exact_at(b, f.entry_pos(number))
                .map_err(|e| StoreError::io(&f.path, e))?;
            for chunk in b.chunks_exact(ENTRY_LEN as usize) {
                let (e, prev) = decode_entry(chunk);
                let slot = (e.hash % f.header.slots) as usize;
                // A valid entry chains to the slot's newest entry before it, and its message
                // lies between the file's start and the log's end, after the last entry's.
                let in_order = e.offset >= last_offset.unwrap_or(f.header.begin_offset);
                if e.offset >= keep_before {
                    // Every message before the log's end is indexed: the caller resumes there.
                    break 'read;
                }
                if prev != slots[slot] || !in_order {
                    cut = true;
                    break 'read;
                }
                slots[slot] = number;
                begin_time = begin_time.min(e.store_time);
                end_time = end_time.max(e.store_time);
                last_offset = Some(e.offset);
                number += 1;
            }
        }
        f.header.entries = number - 1;
        f.header.begin_time = begin_time;
        f.header.end_time = end_time;
        f.header.last_offset = last_offset.unwrap_or(0);
        f.slots = Some(slots);
        Ok(cut.then(|| last_offset.unwrap_or(f.header.begin_offset)))
    }

    /// Commit-log offset before which every message is indexed: where indexing resumes.
    pub fn indexed_through(&self) -> u64 {
        self.through.load(Ordering::Acquire)
    }

    /// Records how far the log is indexed.
    fn set_through(&self, f: &mut Files, through: u64) {
        f.through = through;
        f.dirty = true;
        self.through.store(through, Ordering::Release);
    }

    /// Moves the start of indexing up to `offset` when the log no longer holds what lies
    /// before it (retention, or a slave's log started at its master's first segment).
    pub fn skip_to(&self, offset: u64) {
        if self.indexed_through() >= offset {
            return;
        }
        let mut f = lock(&self.files);
        if f.through < offset {
            self.set_through(&mut f, offset);
        }
    }

    /// Hands over `entries`, the keys of the messages just written in `[from, to)` of the
    /// log (and empties it). Called in log order; a range that does not follow the last one,
    /// or a hand-over grown too long, starts it anew, and the thread reads what lies between
    /// from the log.
    pub fn hand_over(&self, from: u64, to: u64, entries: &mut Vec<IndexEntry>) {
        let mut f = lock(&self.feed);
        if f.to != from || f.entries.len() + entries.len() > FEED_CAP {
            f.entries.clear();
            f.from = from;
        }
        f.entries.append(entries);
        f.to = to;
    }

    /// Takes what was handed over, if it covers any of the log.
    pub fn take_handed(&self) -> Option<Feed> {
        let mut f = lock(&self.feed);
        if f.to <= f.from {
            return None;
        }
        let to = f.to;
        Some(std::mem::replace(
            &mut *f,
            Feed {
                from: to,
                to,
                entries: Vec::new(),
            },
        ))
    }

    /// Adds the keys of the messages before `through` that the last call had not indexed.
    pub fn add(&self, entries: &[IndexEntry], through: u64) -> Result<(), StoreError> {
        let mut f = lock(&self.files);
        let mut rest = entries;
        while !rest.is_empty() {
            if f.active.header.entries == f.active.header.capacity {
                // Every message before this key's was indexed (its other keys may sit in
                // the sealed file: a query sees the message once either way).
                self.seal(&mut f, rest[0].offset)?;
            }
            let h = f.active.header;
            let take = ((h.capacity - h.entries) as usize).min(rest.len());
            Self::append(&mut f.active, &rest[..take])?;
            rest = &rest[take..];
        }
        if through > f.through {
            self.set_through(&mut f, through);
        }
        f.dirty = true;
        Ok(())
    }

    /// Writes `entries` to the file being written and links them into its slots; on a
    /// failed write the slots are left as they were.
    fn append(f: &mut IndexFile, entries: &[IndexEntry]) -> Result<(), StoreError> {
        let header = f.header;
        let Some(slots) = f.slots.as_mut() else {
            return Err(StoreError::Corrupt(format!(
                "{}: the key index file being written has no slot table",
                f.path.display()
            )));
        };
        let mut undo = Vec::with_capacity(entries.len());
        let mut bytes = Vec::with_capacity(entries.len() * ENTRY_LEN as usize);
        let mut number = header.entries;
        for e in entries {
            number += 1;
            let slot = (e.hash % header.slots) as usize;
            undo.push((slot, slots[slot]));
            encode_entry(e, slots[slot], &mut bytes);
            slots[slot] = number;
        }
        let at = HEADER_LEN + 4 * u64::from(header.slots) + ENTRY_LEN * u64::from(header.entries);
        if let Err(e) = f.file.write_all_at(&bytes, at) {
            for (slot, old) in undo.into_iter().rev() {
                slots[slot] = old;
            }
            return Err(StoreError::io(&f.path, e));
        }
        let h = &mut f.header;
        h.entries = number;
        for e in entries {
            h.begin_time = h.begin_time.min(e.store_time);
            h.end_time = h.end_time.max(e.store_time);
        }
        if let Some(last) = entries.last() {
            h.last_offset = last.offset;
        }
        Ok(())
    }

    /// Seals the full file being written and starts the next one. The slot table is on disk
    /// before the header says the file is sealed, and the next file is created only once it
    /// is, so a crash at any point leaves either the unsealed file (its checkpoint stands) or
    /// the sealed one. A failure is tried again by the next call.
    fn seal(&self, f: &mut Files, through: u64) -> Result<(), StoreError> {
        let a = &mut f.active;
        if !a.header.sealed {
            let slots = a.slots.as_deref().unwrap_or_default();
            let mut table = Vec::with_capacity(slots.len() * 4);
            for s in slots {
                table.extend_from_slice(&s.to_be_bytes());
            }
            a.file
                .write_all_at(&table, HEADER_LEN)
                .and_then(|()| a.file.sync_data())
                .map_err(|e| StoreError::io(&a.path, e))?;
            a.header.sealed = true;
            a.header.through = through;
            let written = a
                .write_header()
                .and_then(|()| a.file.sync_data().map_err(|e| StoreError::io(&a.path, e)));
            if let Err(e) = written {
                a.header.sealed = false;
                return Err(e);
            }
            tracing::debug!(file = %a.path.display(), entries = a.header.entries, "key index file sealed");
        }
        let next = Self::create_file(&self.dir, a.seq + 1, self.size, a.header.through)?;
        let mut done = std::mem::replace(&mut f.active, next);
        done.slots = None;
        f.sealed.push(Arc::new(done));
        Ok(())
    }

    /// Makes what was added durable and records it, so a restart resumes from here. The sync
    /// runs without the lock, so queries and the log's writer do not wait for the disk.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let (file, path, c) = {
            let mut f = lock(&self.files);
            if !f.dirty {
                return Ok(());
            }
            f.dirty = false;
            let a = &f.active;
            let file = a.file.try_clone().map_err(|e| StoreError::io(&a.path, e));
            let c = IndexCheckpoint {
                file: a.seq,
                entries: a.header.entries,
                through: f.through,
            };
            (file, a.path.clone(), c)
        };
        let saved = file
            .and_then(|file| file.sync_data().map_err(|e| StoreError::io(&path, e)))
            .and_then(|()| save_json(&self.dir.join("checkpoint.json"), &c));
        if saved.is_err() {
            lock(&self.files).dirty = true;
        }
        saved
    }

    /// Calls `visit` with the commit-log offset of each message filed under `topic`'s `key`
    /// and stored within `[begin, end]` (ms), newest first, until it returns false. An
    /// offset may come twice, and a hash collision may bring a message of another key.
    /// `visit` runs without the index's lock (it reads messages).
    pub fn query(
        &self,
        topic: &str,
        key: &str,
        begin: i64,
        end: i64,
        visit: &mut dyn FnMut(u64) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let hash = key_hash(topic, key);
        let in_range = |h: &Header| h.entries > 0 && h.end_time >= begin && h.begin_time <= end;
        let (newest, sealed) = {
            let f = lock(&self.files);
            let mut newest = Vec::new();
            if in_range(&f.active.header) {
                f.active.walk(hash, begin, end, &mut |offset| {
                    newest.push(offset);
                    Ok(newest.len() < ACTIVE_CANDIDATES)
                })?;
            }
            (newest, f.sealed.clone())
        };
        for offset in newest {
            if !visit(offset)? {
                return Ok(());
            }
        }
        for file in sealed.iter().rev() {
            if in_range(&file.header) && !file.walk(hash, begin, end, visit)? {
                break;
            }
        }
        Ok(())
    }

    /// Store time of the newest indexed key (0 when there is none), for the answer's
    /// `indexLastUpdateTimestamp`.
    pub fn last_time(&self) -> i64 {
        let f = lock(&self.files);
        let a = &f.active.header;
        if a.entries > 0 {
            return a.end_time;
        }
        f.sealed.last().map_or(0, |s| s.header.end_time)
    }

    /// Deletes the sealed files whose every message lies before `log_min` (gone from the log).
    pub fn delete_before(&self, log_min: u64) -> Result<(), StoreError> {
        loop {
            let old = {
                let mut f = lock(&self.files);
                match f.sealed.first() {
                    Some(s) if s.header.last_offset < log_min => f.sealed.remove(0),
                    _ => return Ok(()),
                }
            };
            // A query still reading it keeps the file open until it is done.
            std::fs::remove_file(&old.path).map_err(|e| StoreError::io(&old.path, e))?;
            tracing::info!(file = %old.path.display(), "key index file deleted with the log it indexed");
        }
    }

    /// Index files on disk (sealed and being written).
    pub fn file_count(&self) -> usize {
        lock(&self.files).sealed.len() + 1
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SMALL: IndexSize = IndexSize {
        slots: 4,
        entries: 8,
    };

    fn entry(key: &str, offset: u64) -> IndexEntry {
        IndexEntry {
            hash: key_hash("T", key),
            offset,
            store_time: 1_000 + offset as i64,
        }
    }

    /// Every offset filed under `key` within `[begin, end]`, as a query visits them.
    fn find(index: &KeyIndex, key: &str, begin: i64, end: i64) -> Vec<u64> {
        let mut out = Vec::new();
        index
            .query("T", key, begin, end, &mut |o| {
                out.push(o);
                Ok(true)
            })
            .unwrap();
        out
    }

    fn all(index: &KeyIndex, key: &str) -> Vec<u64> {
        find(index, key, i64::MIN, i64::MAX)
    }

    /// Keys `a` and `b` in turn, one message every 100 bytes from 0 to `n * 100`.
    fn fill(index: &KeyIndex, n: u64) {
        for i in 0..n {
            let key = if i % 2 == 0 { "a" } else { "b" };
            index.add(&[entry(key, i * 100)], (i + 1) * 100).unwrap();
        }
    }

    #[test]
    fn keys_are_the_client_id_then_each_key_of_keys() {
        let p = "KEYS\u{1}k1 k2  k3\u{2}UNIQ_KEY\u{1}ID\u{2}TAGS\u{1}t\u{2}";
        assert_eq!(keys(p).collect::<Vec<_>>(), ["ID", "k1", "k2", "k3"]);
        assert!(has_key(p, "k2") && !has_key(p, "t") && !has_key(p, ""));
        assert_eq!(keys("TAGS\u{1}t\u{2}").count(), 0);
        assert_ne!(key_hash("T", "k"), key_hash("U", "k"));
        // The hash is part of the file format: it must not change between builds.
        assert_eq!(key_hash("", ""), 0x260c_9112);
    }

    #[test]
    fn keys_are_found_newest_first_across_sealed_files_and_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        fill(&index, 20);
        assert_eq!(index.file_count(), 3, "8 entries a file");
        let a: Vec<u64> = (0..20)
            .filter(|i| i % 2 == 0)
            .rev()
            .map(|i| i * 100)
            .collect();
        assert_eq!(all(&index, "a"), a);
        assert_eq!(all(&index, "c"), Vec::<u64>::new());
        // Store times are 1000 + offset: both bounds count.
        assert_eq!(find(&index, "b", 1_300, 1_700), [700, 500, 300]);
        assert_eq!(index.indexed_through(), 2_000);
        assert_eq!(index.last_time(), 1_000 + 1_900);
        // A visitor that has enough stops the walk.
        let mut seen = 0;
        index
            .query("T", "a", i64::MIN, i64::MAX, &mut |_| {
                seen += 1;
                Ok(seen < 3)
            })
            .unwrap();
        assert_eq!(seen, 3);
    }

    #[test]
    fn a_restart_resumes_from_the_checkpoint_and_forgets_what_came_after() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        fill(&index, 11);
        index.checkpoint().unwrap();
        // Written but never counted by a checkpoint: a crash forgets them.
        index
            .add(&[entry("a", 1_100), entry("z", 1_100)], 1_200)
            .unwrap();
        drop(index);
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        assert_eq!(index.indexed_through(), 1_100);
        assert_eq!(all(&index, "z"), Vec::<u64>::new());
        assert_eq!(all(&index, "a"), [1_000, 800, 600, 400, 200, 0]);
        // Added again, the keys chain on from the checkpointed entries.
        index.add(&[entry("a", 1_100)], 1_200).unwrap();
        assert_eq!(all(&index, "a")[..2], [1_100, 1_000]);
    }

    #[test]
    fn entries_of_messages_past_a_cut_log_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        fill(&index, 12);
        index.checkpoint().unwrap();
        drop(index);
        // Recovery cut the log at 1,000: the messages at 1,000 and 1,100 are gone.
        let index = KeyIndex::open(dir.path(), SMALL, 0, 1_000).unwrap();
        assert_eq!(index.indexed_through(), 1_000);
        assert_eq!(all(&index, "a"), [800, 600, 400, 200, 0]);
        assert_eq!(all(&index, "b"), [900, 700, 500, 300, 100]);
        // New messages at the same offsets are indexed afresh.
        index.add(&[entry("c", 1_000)], 1_100).unwrap();
        assert_eq!(all(&index, "c"), [1_000]);
    }

    #[test]
    fn a_file_never_checkpointed_is_dropped_and_built_again_from_the_sealed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        index.checkpoint().unwrap();
        // Fills the first file (sealed when the ninth key comes) and starts the second: the
        // checkpoint still names the first.
        fill(&index, 10);
        drop(index);
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        assert_eq!(index.file_count(), 2, "the sealed file and a new one");
        assert_eq!(index.indexed_through(), 800, "where the sealed file ended");
        assert_eq!(all(&index, "a"), [600, 400, 200, 0]);
    }

    #[test]
    fn a_damaged_entry_ends_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        fill(&index, 6);
        index.checkpoint().unwrap();
        drop(index);
        // The fourth entry's link to the entry before it in its slot is broken.
        let path = dir.path().join(file_name(1));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let at = HEADER_LEN + 4 * u64::from(SMALL.slots) + ENTRY_LEN * 3 + 4;
        file.write_all_at(&7u32.to_be_bytes(), at).unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        assert_eq!(
            index.indexed_through(),
            200,
            "indexed again from the message of the last entry kept"
        );
        assert_eq!(all(&index, "b"), [100]);
    }

    #[test]
    fn keys_handed_over_in_log_order_are_taken_at_once_and_a_gap_starts_anew() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        assert!(index.take_handed().is_none());
        index.hand_over(0, 100, &mut vec![entry("a", 0)]);
        let mut two = vec![entry("b", 100), entry("c", 150)];
        index.hand_over(100, 200, &mut two);
        assert!(two.is_empty(), "taken");
        let h = index.take_handed().unwrap();
        assert_eq!((h.from, h.to, h.entries.len()), (0, 200, 3));
        assert_eq!(h.from_offset(120), &[entry("c", 150)]);
        assert!(index.take_handed().is_none(), "taken once");
        // A range that does not follow (a write that failed in between) drops what was not
        // taken: the thread reads the log up to the new range instead.
        index.hand_over(200, 300, &mut vec![entry("d", 200)]);
        index.hand_over(400, 500, &mut vec![entry("e", 400)]);
        let h = index.take_handed().unwrap();
        assert_eq!((h.from, h.to), (400, 500));
        assert_eq!(h.entries, [entry("e", 400)]);
        // So does one grown past its limit.
        let mut many: Vec<IndexEntry> = (0..FEED_CAP as u64).map(|i| entry("f", 500 + i)).collect();
        index.hand_over(500, 600, &mut many);
        index.hand_over(600, 700, &mut vec![entry("g", 600)]);
        let h = index.take_handed().unwrap();
        assert_eq!((h.from, h.entries.len()), (600, 1));
        // A range of messages without keys still moves the index on.
        index.hand_over(700, 800, &mut Vec::new());
        let h = index.take_handed().unwrap();
        assert_eq!((h.from, h.to), (700, 800));
    }

    #[test]
    fn sealed_files_go_once_the_log_no_longer_holds_their_messages() {
        let dir = tempfile::tempdir().unwrap();
        let index = KeyIndex::open(dir.path(), SMALL, 0, u64::MAX).unwrap();
        fill(&index, 20);
        index.delete_before(700).unwrap();
        assert_eq!(
            index.file_count(),
            3,
            "the first file's last message is at 700"
        );
        index.delete_before(701).unwrap();
        assert_eq!(index.file_count(), 2);
        assert_eq!(
            all(&index, "a")[..],
            [1_800, 1_600, 1_400, 1_200, 1_000, 800]
        );
        // Indexing resumes past what the log lost.
        index.skip_to(5_000);
        assert_eq!(index.indexed_through(), 5_000);
        index.skip_to(10);
        assert_eq!(index.indexed_through(), 5_000);
    }
}
