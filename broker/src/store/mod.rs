//! The message store: commit log, consume queues, flushing (group commit or background),
//! crash recovery, and the small persisted tables (topics, consumer offsets, checkpoint).

pub mod commitlog;
pub mod consume_queue;
pub mod groups;
pub mod index;
pub mod message;
pub mod offsets;
pub mod persist;
pub mod topics;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use commitlog::CommitLog;
use consume_queue::{ConsumeQueue, CqEntry, Queues};
use index::{IndexEntry, IndexSize, KeyIndex};
use message::{NewMessage, StoredRef};
use persist::{load_json, save_json};

/// What went wrong in the store; paths are included so an operator can find the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A state file holds bad JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// File.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// On-disk data contradicts itself or the configuration.
    #[error("store is inconsistent: {0}")]
    Corrupt(String),
    /// A message (or batch) does not fit in a commit-log segment.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of the message.
        len: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A message's properties do not fit the stored form's 16-bit length field: stored, no
    /// reader could decode the message (or any behind it at recovery).
    #[error("message properties of {len} bytes exceed the limit of {max} bytes", max = i16::MAX)]
    PropertiesTooLong {
        /// Length of the properties string.
        len: usize,
    },
    /// The store's file system is fuller than `diskSpaceWarningLevelRatio`.
    #[error(
        "the store's disk is {:.1}% full (over diskSpaceWarningLevelRatio): no more messages \
         until space is freed",
        .0 * 100.0
    )]
    DiskFull(f64),
    /// Another process (or another open store in this one) has the store.
    #[error(
        "{0}: the store is in use by another broker (each broker needs a store directory of \
         its own: check storePathRootDir)"
    )]
    Locked(PathBuf),
    /// An offset outside the stored range was read.
    #[error("offset {offset} is not stored")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
    },
    /// SYNC_FLUSH could not make the data durable in time (the data is stored, maybe not yet
    /// durable).
    #[error("flush did not complete within {0:?}")]
    FlushTimeout(Duration),
    /// The store is shutting down or its flusher died.
    #[error("store is shut down")]
    Shutdown,
    /// The store stopped taking data until a restart recovers it: writing the commit log to
    /// disk failed and pages may be lost (nothing more is acknowledged as durable either), or
    /// a consume queue could not be written after the log took its messages.
    #[error(
        "{0}; the store takes no more messages until the broker restarts and recovers its log"
    )]
    WriteBackFailed(String),
}

impl StoreError {
    /// The same error for another caller (I/O and JSON causes are carried as text).
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Json { path, source } => {
                StoreError::Corrupt(format!("{}: invalid JSON: {source}", path.display()))
            }
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
            StoreError::MessageTooLarge { len, max } => StoreError::MessageTooLarge {
                len: *len,
                max: *max,
            },
            StoreError::PropertiesTooLong { len } => StoreError::PropertiesTooLong { len: *len },
            StoreError::Locked(p) => StoreError::Locked(p.clone()),
            StoreError::DiskFull(u) => StoreError::DiskFull(*u),
            StoreError::OutOfRange { offset } => StoreError::OutOfRange { offset: *offset },
            StoreError::FlushTimeout(d) => StoreError::FlushTimeout(*d),
            StoreError::Shutdown => StoreError::Shutdown,
            StoreError::WriteBackFailed(m) => StoreError::WriteBackFailed(m.clone()),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// When a send is acknowledged relative to the disk (broker.conf `flushDiskType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushDiskType {
    /// Acknowledge from memory; flush in the background.
    Async,
    /// Acknowledge once fsync'ed; concurrent sends share one flush.
    Sync,
}

/// Store settings, from broker.conf.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `storePathRootDir`.
    pub root: PathBuf,
    /// `mappedFileSizeCommitLog`.
    pub segment_size: u64,
    /// `flushDiskType`.
    pub flush: FlushDiskType,
    /// `flushIntervalCommitLog` (ms).
    pub flush_interval_ms: u64,
    /// `flushCommitLogLeastPages`.
    pub flush_least_pages: u64,
    /// `flushCommitLogThoroughInterval` (ms): flush whatever is dirty at least this often.
    pub flush_thorough_interval_ms: u64,
    /// `syncFlushTimeout` (ms).
    pub sync_flush_timeout_ms: u64,
    /// Address written into stored messages and message ids.
    pub store_host: SocketAddr,
    /// Whether a thread keeps zeroes written ahead of the commit log's end, so appends (and a
    /// slave's replicated writes) land in pages that exist; under SYNC_FLUSH the zeroes are
    /// written out to the disk too, so a group commit has only data to write. The broker sets
    /// it for SYNC_FLUSH and for slaves only.
    pub prepare_ahead: bool,
    /// Delay of each delay level, ms (`messageDelayLevel`): recovery and a slave's indexing
    /// give a delayed message its delivery time by it.
    pub delay_levels_ms: Arc<[i64]>,
    /// Share of the store's file system in use at which appends are refused
    /// (`diskSpaceWarningLevelRatio`): a write that fails half-way on a full disk is worse.
    pub disk_full_ratio: f64,
    /// The key index's file size, or none without one (`messageIndexEnable=false`).
    pub index: Option<IndexSize>,
}

#[cfg(test)]
impl StoreConfig {
    /// Small segments and short flush intervals, so tests cross segments and see flushes
    /// quickly.
    pub(crate) fn for_tests(root: &std::path::Path, flush: FlushDiskType) -> StoreConfig {
        StoreConfig {
            root: root.to_path_buf(),
            segment_size: 64 * 1024,
            flush,
            flush_interval_ms: 20,
            flush_least_pages: 4,
            flush_thorough_interval_ms: 100,
            sync_flush_timeout_ms: 5_000,
            store_host: "127.0.0.1:10911".parse().unwrap(),
            prepare_ahead: true,
            delay_levels_ms: message::DELAY_LEVELS_MS.into(),
            disk_full_ratio: 0.90,
            index: Some(IndexSize {
                slots: 64,
                entries: 256,
            }),
        }
    }
}

/// Where a stored message landed.
#[derive(Debug, Clone, PartialEq)]
pub struct PutResult {
    /// Commit-log offset.
    pub physical_offset: u64,
    /// Position in its queue.
    pub queue_offset: u64,
    /// Queue it went to.
    pub queue_id: i32,
    /// Stored size.
    pub size: u32,
    /// End of the message in the commit log (what a slave or flush must reach).
    pub end: u64,
}

/// Outcome of a read from a queue, mirroring RocketMQ's GetMessageStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetStatus {
    /// Messages were found.
    Found,
    /// The offset is the end of the queue: nothing new yet.
    NoNewMessage,
    /// The queue has no messages at all.
    NoMessageInQueue,
    /// Messages exist but the filter matched none of those looked at.
    NoMatchedMessage,
    /// The offset is below the first stored message.
    OffsetTooSmall,
    /// The offset is beyond the end of the queue.
    OffsetOverflow,
}

/// A read from a queue.
#[derive(Debug, Clone)]
pub struct GetResult {
    /// What happened.
    pub status: GetStatus,
    /// Stored messages, back to back.
    pub body: Bytes,
    /// How many messages `body` holds.
    pub count: usize,
    /// Queue offset the next read should start at.
    pub next_offset: u64,
    /// Lowest stored queue offset.
    pub min_offset: u64,
    /// Queue end (exclusive).
    pub max_offset: u64,
    /// Commit-log bytes after the last message returned (how far behind the reader is).
    pub lag_bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Checkpoint {
    /// Commit-log offset up to which the log and every consume queue are durable and agree.
    consistent_offset: u64,
    /// Whether the broker stopped cleanly (nothing past `consistent_offset`).
    clean_shutdown: bool,
}

/// Replicated bytes a slave has stored but not yet indexed.
#[derive(Default)]
struct Unindexed {
    /// The log from the dispatched offset on, kept until its messages are complete.
    bytes: Vec<u8>,
    /// Whether indexing met data whose size cannot be trusted and stopped there (until a
    /// restart): nothing more is kept, as nothing more can be indexed.
    stopped: bool,
}

struct Waiter {
    end: u64,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// State shared with the flusher thread.
struct FlushShared {
    waiters: Mutex<Vec<Waiter>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Stop without the final flush and clean checkpoint, as a crash would (tests only).
    abandon: AtomicBool,
}

/// How far ahead of the commit log's end zeroes are kept (between half of this and all of
/// it): about half a second of appends at full speed.
const PREPARE_AHEAD: u64 = 16 << 20;

/// Which message a search by time answers when several, or none, were stored at that time
/// (RocketMQ 5's `boundaryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Boundary {
    /// The first message stored at or after the time.
    #[default]
    Lower,
    /// The last message stored at or before the time.
    Upper,
}

/// The broker's storage engine.
pub struct MessageStore {
    cfg: StoreConfig,
    /// The store's lock file, held locked while the store is open: two brokers on one store
    /// would write over each other's log and configs.
    _lock: std::fs::File,
    commitlog: CommitLog,
    queues: Queues,
    /// Serializes appends so commit-log order and queue offsets agree; holds the encode buffer.
    write_lock: Mutex<Encoded>,
    /// Commit-log offset below which every message is appended and dispatched to its queue.
    dispatched: AtomicU64,
    /// Commit-log offset the last checkpoint counts (a crash recovers from there).
    checkpointed: AtomicU64,
    /// Share of the store's file system in use, in millionths, as last measured.
    disk_used: AtomicU64,
    flush: Arc<FlushShared>,
    /// The flusher and, with `prepare_ahead`, the preparer; joined at shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Consumer offsets.
    pub offsets: offsets::ConsumerOffsets,
    /// Subscription groups an operator configured.
    pub groups: groups::GroupTable,
    /// Topic configs.
    pub topics: topics::TopicTable,
    /// What recovery found at start.
    pub recovery: commitlog::RecoveryReport,
    /// Wakes replication senders when the log grows.
    pub appended: tokio::sync::Notify,
    /// The commit log's first offset when every queue's minimum was last moved to it.
    queues_min: AtomicU64,
    /// Bytes a slave received past the last indexed message (dispatched once complete).
    partial: Mutex<Unindexed>,
    /// Sends waiting to share the next commit-log write.
    group: Mutex<SendGroup>,
    /// Finds messages by key; built behind the log by the `key-index` thread.
    index: Option<KeyIndex>,
}

/// Messages found by key (QUERY_MESSAGE).
#[derive(Debug, Clone, Default)]
pub struct KeyQuery {
    /// The stored messages, in commit-log order.
    pub messages: Vec<Bytes>,
    /// Store time of the newest indexed key (0 when none is).
    pub last_time: i64,
    /// Commit-log offset before which every message is indexed.
    pub indexed_through: u64,
}

/// Messages encoded for one commit-log write, and their keys for the key index.
struct Encoded {
    bytes: BytesMut,
    keys: Vec<IndexEntry>,
}

/// Log bytes read per step of the key index's thread, where it reads the log.
const INDEX_CHUNK: u64 = 1 << 20;
/// The key index's thread's pause once it has caught up (at most): keys gather meanwhile,
/// and it wakes a couple of hundred times a second under load rather than for every write.
const INDEX_PAUSE: Duration = Duration::from_millis(5);

/// What the key index's thread keeps between steps.
#[derive(Default)]
struct IndexStep {
    /// Keys handed over, kept while the log before them is read.
    handed: Option<index::Feed>,
    /// Log read buffer, and the keys found in it.
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
}

/// Where [`MessageStore::walk_log`] stopped.
struct Walked {
    /// Bytes of whole messages and fillers walked.
    used: usize,
    /// Why the data after them cannot be walked, if it is not merely incomplete.
    untrusted: Option<String>,
}

/// Groups of sends a leader writes in a row before it lets its event loop's other tasks run
/// (see `MessageStore::drain_group`). Writing each group queued meanwhile at once keeps
/// SYNC_FLUSH with connections on two loops 5% faster than yielding after every group.
#[cfg(not(test))]
const INLINE_ROUNDS: usize = 8;
/// One in tests, which then need only one group queued during a write to see the yield.
#[cfg(test)]
const INLINE_ROUNDS: usize = 1;

/// Sends queued for one shared commit-log write, and whether a task is about to write them.
#[derive(Default)]
struct SendGroup {
    sends: Vec<GroupedSend>,
    leading: bool,
}

/// One queued send and where its result goes.
struct GroupedSend {
    msgs: Vec<NewMessage>,
    done: oneshot::Sender<Result<Vec<PutResult>, StoreError>>,
}

/// Sends encoded but not yet written: each one's index among the results, and its messages'
/// queues, results and tag codes.
type Staged = Vec<(usize, Vec<(Arc<ConsumeQueue>, PutResult, i64)>)>;

/// Writes the queued group when dropped (the leader's duty, even if it is cancelled).
struct GroupWriter(Arc<MessageStore>);

impl GroupWriter {
    /// Hands the write to a task of its own. On the connection's event loop it runs once the
    /// connection task yields, after that has decoded every frame already received, so more
    /// sends join the group. Should the task be dropped unpolled (the runtime shutting down),
    /// dropping it still writes the group.
    fn hand_off(self) {
        tokio::spawn(async move { drop(self) });
    }
}

impl Drop for GroupWriter {
    fn drop(&mut self) {
        self.0.drain_group();
    }
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStore")
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The commit-log offset past the last message any queue indexes (0 when none does).
fn indexed_end(queues: &[Arc<ConsumeQueue>]) -> Result<u64, StoreError> {
    let mut end = 0;
    for cq in queues {
        let last = cq.max_offset();
        if last == 0 {
            continue;
        }
        if let Some(e) = cq.get(last - 1, 1)?.first() {
            end = end.max(e.offset + u64::from(e.size));
        }
    }
    Ok(end)
}

/// Takes the store's lock file (`<root>/lock`, as Java's broker locks it) for as long as the
/// returned file is open; refuses a store another broker has open.
fn lock_store(root: &Path) -> Result<std::fs::File, StoreError> {
    let path = root.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(path)),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::io(&path, e)),
    }
}

impl MessageStore {
    /// Opens the store under `cfg.root`, recovering from a crash if the last stop was not
    /// clean, and starts the flusher thread (and the preparer with `prepare_ahead`).
    pub fn open(cfg: StoreConfig) -> Result<Arc<MessageStore>, StoreError> {
        let root = cfg.root.clone();
        let config_dir = root.join("config");
        commitlog::create_dir_durable(&config_dir)?;
        let lock = lock_store(&root)?;
        let commitlog = CommitLog::open(&root.join("commitlog"), cfg.segment_size)?;
        let cq_dir = root.join("consumequeue");
        let checkpoint_path = root.join("checkpoint");
        // No checkpoint means a new store: nothing to recover. One that cannot be read
        // (damaged outside the broker: it is replaced atomically) is only a hint of where to
        // start: the log is scanned from its start, as after a crash, instead of the broker
        // refusing to start.
        let queues = Queues::open(&cq_dir)?;
        let all_queues = queues.all();
        let (checkpoint, trusted): (Checkpoint, u64) = match load_json(&checkpoint_path) {
            Ok(c) => {
                let c = c.unwrap_or(Checkpoint {
                    consistent_offset: 0,
                    clean_shutdown: true,
                });
                let trusted = c.consistent_offset;
                (c, trusted)
            }
            Err(e @ StoreError::Json { .. }) => {
                tracing::warn!(error = %e, "the checkpoint cannot be read; recovering the whole commit log");
                // What lies before the segment the queues reach into was flushed long ago;
                // only the rest may hold a torn tail.
                let indexed = indexed_end(&all_queues)?.max(commitlog.min_offset());
                let trusted = indexed - indexed % cfg.segment_size;
                let c = Checkpoint {
                    consistent_offset: 0,
                    clean_shutdown: false,
                };
                (c, trusted)
            }
            Err(e) => return Err(e),
        };

        // Consume-queue entries past the checkpoint may be torn or point at a torn tail:
        // drop them and re-dispatch from the commit log. With no queue at all while the log
        // holds messages (the `consumequeue` directory deleted to have it rebuilt, as
        // operators do with Java's broker), everything is re-dispatched: otherwise the
        // messages stayed invisible and their queue offsets were handed out again. Queues
        // that merely end early are not taken for that: a deleted topic's were the last to
        // be written, and would come back.
        let rebuild =
            all_queues.is_empty() && checkpoint.consistent_offset > commitlog.min_offset();
        let from = if rebuild {
            commitlog.min_offset()
        } else {
            checkpoint.consistent_offset
        };
        if from < checkpoint.consistent_offset {
            tracing::warn!(
                checkpoint = checkpoint.consistent_offset,
                from,
                "the consume queues end before the checkpoint; rebuilding them from the commit log"
            );
        }
        for cq in &all_queues {
            cq.truncate_from_offset(from)?;
        }
        let report = {
            let open_queue = |m: &StoredRef<'_>| -> Result<(), StoreError> {
                let cq = queues.get_or_create(m.topic, m.queue_id)?;
                cq.put(
                    m.queue_offset as u64,
                    CqEntry {
                        offset: m.physical_offset as u64,
                        size: m.total_size as u32,
                        tags_code: m.queue_tags_code(&cfg.delay_levels_ms),
                    },
                )
            };
            commitlog.recover(from, !checkpoint.clean_shutdown, trusted, open_queue)?
        };
        if report.truncated_bytes > 0 {
            // What lay past the first message recovery could not read is gone: a torn tail
            // after a crash, or damage (Java's recovery cuts the log there too).
            tracing::warn!(
                from,
                redispatched = report.messages,
                cut_at = report.end,
                torn_bytes = report.truncated_bytes,
                later_segments_removed = report.segments_removed,
                "commit log cut at the first message recovery could not read; everything after it was dropped"
            );
        } else if report.skipped > 0 {
            tracing::warn!(
                from,
                redispatched = report.messages,
                damaged_messages_skipped = report.skipped,
                end = report.end,
                "commit log recovered past damaged messages (see the errors above)"
            );
        } else if report.messages > 0 || !checkpoint.clean_shutdown {
            tracing::info!(
                from,
                redispatched = report.messages,
                torn_bytes = report.truncated_bytes,
                end = report.end,
                clean = checkpoint.clean_shutdown,
                "commit log recovered"
            );
        }
        let min_phys = commitlog.min_offset();
        for cq in queues.all() {
            cq.correct_min_offset(min_phys)?;
        }

        let offsets = offsets::ConsumerOffsets::load(config_dir.join("consumerOffset.json"))?;
        let topics = topics::TopicTable::load(config_dir.join("topics.json"))?;
        let groups = groups::GroupTable::load(config_dir.join("subscriptionGroup.json"))?;
        let end = report.end;
        // The index is derived from the log: one that cannot be opened costs its queries, not
        // the broker.
        let index = cfg.index.and_then(|size| {
            KeyIndex::open(&root.join("index"), size, min_phys, end)
                .inspect_err(|e| {
                    tracing::error!(error = %e, "the key index cannot be opened; messages cannot be queried by key until a restart")
                })
                .ok()
        });
        let store = Arc::new(MessageStore {
            _lock: lock,
            cfg,
            commitlog,
            queues,
            write_lock: Mutex::new(Encoded {
                bytes: BytesMut::with_capacity(1 << 20),
                keys: Vec::new(),
            }),
            dispatched: AtomicU64::new(end),
            checkpointed: AtomicU64::new(end),
            disk_used: AtomicU64::new(0),
            flush: Arc::new(FlushShared {
                waiters: Mutex::new(Vec::new()),
                wake: Condvar::new(),
                stop: AtomicBool::new(false),
                abandon: AtomicBool::new(false),
            }),
            threads: Mutex::new(Vec::new()),
            offsets,
            topics,
            groups,
            recovery: report,
            appended: tokio::sync::Notify::new(),
            queues_min: AtomicU64::new(min_phys),
            partial: Mutex::new(Unindexed::default()),
            group: Mutex::new(SendGroup::default()),
            index,
        });
        // Mark the store as running: a crash from now on must recover. The entries recovery
        // rebuilt may still be in the queues' buffers: on disk first, or a crash before the
        // next checkpoint would lose them for good (the next start would trust `end`).
        for cq in store.all_queues() {
            cq.flush()?;
        }
        // How full the disk is, before the first append: a broker restarted on a full disk
        // refuses messages from the start, not from its first periodic measurement.
        if let Err(e) = store.measure_disk() {
            tracing::warn!(error = %e, "cannot measure the store's disk");
        }
        store.write_checkpoint(end, false)?;
        let mut started = store.start_thread("commitlog-flush", Self::flush_loop);
        if started.is_ok() && store.cfg.prepare_ahead {
            started = store.start_thread("commitlog-prepare", Self::prepare_loop);
        }
        if started.is_ok() && store.index.is_some() {
            started = store.start_thread("key-index", Self::index_loop);
        }
        if let Err(e) = started {
            // Stop what did start: it holds the store.
            store.shutdown();
            return Err(e);
        }
        Ok(store)
    }

    /// Runs `work` on a thread of its own until [`MessageStore::shutdown`] joins it.
    fn start_thread(
        self: &Arc<Self>,
        name: &str,
        work: fn(&MessageStore),
    ) -> Result<(), StoreError> {
        let s = self.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&s))
            .map_err(|e| StoreError::io(&self.cfg.root, e))?;
        lock(&self.threads).push(handle);
        Ok(())
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The commit log (read side, replication and metrics).
    pub fn commitlog(&self) -> &CommitLog {
        &self.commitlog
    }

    fn write_checkpoint(&self, offset: u64, clean: bool) -> Result<(), StoreError> {
        save_json(
            &self.cfg.root.join("checkpoint"),
            &Checkpoint {
                consistent_offset: offset,
                clean_shutdown: clean,
            },
        )
    }

    /// Measures how full the store's file system is (statvfs), records it and returns it.
    pub fn measure_disk(&self) -> Result<f64, StoreError> {
        let st = nix::sys::statvfs::statvfs(&self.cfg.root)
            .map_err(|e| StoreError::io(&self.cfg.root, std::io::Error::from(e)))?;
        let total = st.blocks() as f64;
        let used = if total > 0.0 {
            1.0 - st.blocks_available() as f64 / total
        } else {
            0.0
        };
        self.record_disk_usage(used);
        Ok(used)
    }

    /// Records how full the store's file system is (a share, 0 to 1).
    pub fn record_disk_usage(&self, used: f64) {
        let millionths = (used.clamp(0.0, 1.0) * 1e6) as u64;
        self.disk_used.store(millionths, Ordering::Release);
    }

    /// How full the disk is, if fuller than `disk_full_ratio`: appends are refused.
    pub fn disk_full(&self) -> Option<f64> {
        let used = self.disk_used.load(Ordering::Acquire) as f64 / 1e6;
        (used >= self.cfg.disk_full_ratio).then_some(used)
    }

    /// The consume queue of `topic`/`queue_id`, if it exists.
    pub fn queue(&self, topic: &str, queue_id: i32) -> Option<Arc<ConsumeQueue>> {
        self.queues.get(topic, queue_id)
    }

    /// Deletes a topic: its config, its queues and every group's offsets of it. Its messages
    /// stay in the commit log until retention deletes their segments (as in Java).
    pub fn delete_topic(&self, topic: &str) -> Result<(), StoreError> {
        self.topics.remove(topic)?;
        self.queues.remove_topic(topic)?;
        self.offsets.remove_topic(topic);
        Ok(())
    }

    /// Queues a topic has locally (highest queue id + 1), 0 when it has none.
    pub fn queue_count(&self, topic: &str) -> i32 {
        self.queues.count(topic)
    }

    /// Every consume queue.
    pub fn all_queues(&self) -> Vec<Arc<ConsumeQueue>> {
        self.queues.all()
    }

    fn queue_or_create(&self, topic: &str, queue_id: i32) -> Result<Arc<ConsumeQueue>, StoreError> {
        self.queues.get_or_create(topic, queue_id)
    }

    /// Appends messages (all of one batch land contiguously) without waiting for the disk.
    pub fn append(&self, msgs: &[NewMessage]) -> Result<Vec<PutResult>, StoreError> {
        self.append_many(&[msgs])
            .pop()
            .unwrap_or(Err(StoreError::Shutdown))
    }

    /// Appends messages like [`MessageStore::append`], sharing one commit-log write with the
    /// sends that are ready at the same moment. With `company` (the caller knows other
    /// requests are being handled), the first send of a group yields once so the other ready
    /// request tasks join it, then writes the whole group. Each send's messages still land
    /// contiguously, and every send returns only after its bytes are in the page cache (so a
    /// process crash loses nothing acknowledged).
    pub async fn append_grouped(
        self: &Arc<Self>,
        msgs: Vec<NewMessage>,
        company: bool,
    ) -> Result<Vec<PutResult>, StoreError> {
        let (done, result) = oneshot::channel();
        let lead = {
            let mut g = lock(&self.group);
            g.sends.push(GroupedSend { msgs, done });
            !std::mem::replace(&mut g.leading, true)
        };
        if lead {
            // The group is written when this guard drops: by its own task after the yield, at
            // once without company, or at once if this task is cancelled while yielding, so no
            // follower is left waiting.
            let writer = GroupWriter(self.clone());
            if company {
                tokio::task::yield_now().await;
                writer.hand_off();
            }
        }
        result.await.unwrap_or(Err(StoreError::Shutdown))
    }

    /// Writes queued grouped sends until none are left, then gives up the leader role.
    ///
    /// Sends queued while a group was being written come from connections on other event
    /// loops. They are written at once until [`INLINE_ROUNDS`] groups, the leader's own
    /// included, have been written in a row; after that, on an event loop, by a task of its
    /// own queued behind this loop's ready tasks (answers to write, frames to read), which
    /// would otherwise wait until the queue runs dry, and under sustained sends from other
    /// loops it need not.
    fn drain_group(self: &Arc<Self>) {
        // Should writing panic, the role is given up anyway: the sends taken fail (their
        // result senders drop) and the next send leads a new group instead of waiting forever.
        struct Release<'a>(&'a MessageStore);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    lock(&self.0.group).leading = false;
                }
            }
        }
        let _release = Release(self);
        for round in 1.. {
            let sends = {
                let mut g = lock(&self.group);
                if g.sends.is_empty() {
                    g.leading = false;
                    return;
                }
                std::mem::take(&mut g.sends)
            };
            let batches: Vec<&[NewMessage]> = sends.iter().map(|s| &s.msgs[..]).collect();
            let results = self.append_many(&batches);
            for (send, r) in sends.into_iter().zip(results) {
                let _ = send.done.send(r);
            }
            // Below the limit the next turn of the loop looks at the queue anyway.
            if round >= INLINE_ROUNDS
                && !lock(&self.group).sends.is_empty()
                && tokio::runtime::Handle::try_current().is_ok()
            {
                // Still the leader: the new task writes them, or its drop does.
                GroupWriter(self.clone()).hand_off();
                return;
            }
        }
    }

    /// Appends several sends in order with as few commit-log writes as segment boundaries
    /// allow; one result per send. A send too large fails alone; a failed write fails the
    /// sends it carried.
    fn append_many(&self, sends: &[&[NewMessage]]) -> Vec<Result<Vec<PutResult>, StoreError>> {
        if let Some(used) = self.disk_full() {
            return sends
                .iter()
                .map(|_| Err(StoreError::DiskFull(used)))
                .collect();
        }
        let store_host = self.cfg.store_host;
        let max = self.commitlog.max_message_len();
        let mut encoded = lock(&self.write_lock);
        let Encoded { bytes: buf, keys } = &mut *encoded;
        buf.clear();
        keys.clear();
        let now = topics::now_ms();
        let mut out: Vec<Result<Vec<PutResult>, StoreError>> = Vec::with_capacity(sends.len());
        // The sends encoded into `buf` but not yet written: (index in `out`, their entries).
        let mut staged = Staged::new();
        let mut next_in_queue: Vec<(Arc<ConsumeQueue>, u64)> = Vec::new();
        let mut start = 0u64;
        for msgs in sends {
            let (mut total, mut longest_properties) = (0u64, 0usize);
            for m in msgs.iter() {
                total += m.stored_len(&store_host) as u64;
                longest_properties = longest_properties.max(m.properties.len());
            }
            if total > max {
                out.push(Err(StoreError::MessageTooLarge { len: total, max }));
                continue;
            }
            if longest_properties > i16::MAX as usize {
                out.push(Err(StoreError::PropertiesTooLong {
                    len: longest_properties,
                }));
                continue;
            }
            if !buf.is_empty() {
                let pos = start + buf.len() as u64;
                if self.commitlog.start_after(pos, total) != pos {
                    // Crossing into the next segment: write what is staged first.
                    self.write_staged(buf, keys, start, &mut staged, &mut out);
                    next_in_queue.clear();
                }
            }
            if buf.is_empty() {
                start = self.commitlog.next_start(total);
            }
            let queues: Result<Vec<_>, _> = msgs
                .iter()
                .map(|m| self.queue_or_create(&m.topic, m.queue_id))
                .collect();
            let queues = match queues {
                Ok(q) => q,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let mut entries = Vec::with_capacity(msgs.len());
            for (m, cq) in msgs.iter().zip(queues) {
                let qoff = match next_in_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &cq)) {
                    Some((_, n)) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        let n = cq.max_offset();
                        next_in_queue.push((cq.clone(), n));
                        n
                    }
                };
                let phys = start + buf.len() as u64;
                let before = buf.len();
                m.encode(buf, qoff as i64, phys as i64, now, &store_host);
                let size = (buf.len() - before) as u32;
                if self.index.is_some() {
                    index::entries_of(keys, &m.topic, &m.properties, m.sys_flag, phys, now);
                }
                let r = PutResult {
                    physical_offset: phys,
                    queue_offset: qoff,
                    queue_id: m.queue_id,
                    size,
                    end: phys + u64::from(size),
                };
                entries.push((cq, r, m.tags_code));
            }
            staged.push((out.len(), entries));
            out.push(Ok(Vec::new()));
        }
        self.write_staged(buf, keys, start, &mut staged, &mut out);
        drop(encoded);
        self.appended.notify_waiters();
        out
    }

    /// Writes the encoded `buf` (starting at commit-log offset `start`), indexes its messages
    /// (their `keys` go to the key index) and fills in the results of the sends it carried.
    fn write_staged(
        &self,
        buf: &mut BytesMut,
        keys: &mut Vec<IndexEntry>,
        start: u64,
        staged: &mut Staged,
        out: &mut [Result<Vec<PutResult>, StoreError>],
    ) {
        if buf.is_empty() {
            return;
        }
        // Where the log ended before this write: a segment it closes gets a filler first, and
        // the key index is handed the range from here, filler included.
        let log_end = self.commitlog.max_offset();
        let written = self.commitlog.append(buf).and_then(|at| {
            debug_assert_eq!(at, start);
            if self.cfg.flush == FlushDiskType::Sync {
                // A hint: the flush still makes the data durable if this fails.
                if let Err(e) = self.commitlog.start_writeback(at, buf.len() as u64) {
                    tracing::debug!(error = %e, "starting commit-log write-back failed");
                }
            }
            for (_, entries) in staged.iter() {
                for (cq, r, tags_code) in entries {
                    let entry = CqEntry {
                        offset: r.physical_offset,
                        size: r.size,
                        tags_code: *tags_code,
                    };
                    // The log holds the messages now, with their queue offsets: going on would
                    // hand those offsets out again. Recovery from the last checkpoint, which
                    // counts none of this, rebuilds the queues from the log.
                    cq.put(r.queue_offset, entry).map_err(|e| {
                        self.commitlog.stop_writes(format!(
                            "writing consume queue {}/{} failed after the commit log took its \
                             message ({e})",
                            cq.topic, cq.queue_id
                        ))
                    })?;
                }
            }
            let end = at + buf.len() as u64;
            if let Some(index) = &self.index {
                index.hand_over(log_end, end, keys);
            }
            self.dispatched.store(end, Ordering::Release);
            Ok(())
        });
        keys.clear();
        for (i, entries) in staged.drain(..) {
            out[i] = match &written {
                Ok(()) => Ok(entries.into_iter().map(|(_, r, _)| r).collect()),
                Err(e) => Err(e.duplicate()),
            };
        }
        buf.clear();
    }

    /// Appends bytes replicated from a master at `offset` (the local end); the log stays
    /// byte-identical to the master's. [`MessageStore::dispatch_replicated`] indexes them: the
    /// two are apart so a slave acknowledges as soon as the bytes are stored, as Java's slaves
    /// do, and a SYNC_MASTER send does not wait for the slave's indexing.
    pub fn replicate(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let _writer = lock(&self.write_lock);
        self.commitlog.append_at(offset, data)?;
        let mut partial = lock(&self.partial);
        if !partial.stopped {
            partial.bytes.extend_from_slice(data);
        }
        Ok(())
    }

    /// Starts an empty slave's log at `offset`, a segment boundary (its master's first
    /// segments are gone); indexing starts there too.
    pub fn reset_start(&self, offset: u64) -> Result<(), StoreError> {
        let _writer = lock(&self.write_lock);
        self.commitlog.reset_start(offset)?;
        self.dispatched.store(offset, Ordering::Release);
        Ok(())
    }

    /// Indexes every replicated message that has fully arrived. A message that cannot be read
    /// but whose size can be trusted is skipped and logged, as Java's reput service skips it;
    /// data whose size cannot be trusted stops indexing there for good (until a restart, whose
    /// recovery ends the log there), which is reported once, as an error.
    pub fn dispatch_replicated(&self) -> Result<(), StoreError> {
        let _writer = lock(&self.write_lock);
        let mut partial = lock(&self.partial);
        if partial.stopped {
            return Ok(());
        }
        // `partial` starts at the dispatched offset, always a message (or filler) boundary.
        let from = self.dispatched.load(Ordering::Acquire);
        let mut keys = Vec::new();
        let walked = self.walk_log(&partial.bytes, from, |pos, msg| {
            match message::parse_stored_for_index(msg) {
                Ok(m) => {
                    if self.index.is_some() {
                        index::entries_of(
                            &mut keys,
                            m.topic,
                            m.properties,
                            m.sys_flag,
                            pos,
                            m.store_timestamp,
                        );
                    }
                    let cq = self.queue_or_create(m.topic, m.queue_id)?;
                    cq.put(
                        m.queue_offset as u64,
                        CqEntry {
                            offset: pos,
                            size: msg.len() as u32,
                            tags_code: m.queue_tags_code(&self.cfg.delay_levels_ms),
                        },
                    )?;
                }
                Err(e) => tracing::error!(
                    offset = pos,
                    size = msg.len(),
                    error = %e,
                    "a replicated message cannot be read; it is skipped and not indexed"
                ),
            }
            Ok(())
        })?;
        let (used, untrusted) = (walked.used, walked.untrusted);
        let pos = from + used as u64;
        if let Some(index) = &self.index {
            index.hand_over(from, pos, &mut keys);
        }
        partial.bytes.drain(..used);
        self.dispatched.store(pos, Ordering::Release);
        if untrusted.is_some() {
            partial.stopped = true;
            partial.bytes = Vec::new();
        }
        drop(partial);
        self.appended.notify_waiters();
        match untrusted {
            Some(why) => Err(StoreError::Corrupt(format!(
                "{why}; indexing of replicated messages stops there until a restart"
            ))),
            None => Ok(()),
        }
    }

    /// Bytes of replicated data held in memory until they are indexed.
    #[cfg(test)]
    pub(crate) fn unindexed_bytes(&self) -> usize {
        lock(&self.partial).bytes.len()
    }

    /// Calls `each(offset, message)` for every whole message in `bytes`, log data from `pos`
    /// (a message or filler boundary) on; fillers are passed over whole. Stops at an
    /// incomplete message, or at data whose size cannot be trusted, as the appender
    /// guarantees it: a message magic, and room in the segment for the message and a filler
    /// header after it.
    fn walk_log(
        &self,
        bytes: &[u8],
        mut pos: u64,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<Walked, StoreError> {
        let seg = self.commitlog.segment_size();
        let mut used = 0usize;
        let mut untrusted = None;
        loop {
            let rest = &bytes[used..];
            if rest.len() < 8 {
                break;
            }
            let size = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let magic = i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if magic == message::BLANK_MAGIC {
                // The rest of the segment is filler; wait until all of it has arrived.
                let skip = (seg - pos % seg) as usize;
                if rest.len() < skip {
                    break;
                }
                used += skip;
                pos += skip as u64;
                continue;
            }
            if (magic != message::MAGIC_V1 && magic != message::MAGIC_V2)
                || size <= 8
                || pos % seg + size as u64 > self.commitlog.max_message_len()
            {
                untrusted = Some(format!(
                    "log data at {pos} is not a message (size {size}, magic {magic:#x})"
                ));
                break;
            }
            if rest.len() < size as usize {
                break;
            }
            each(pos, &rest[..size as usize])?;
            used += size as usize;
            pos += size as u64;
        }
        Ok(Walked { used, untrusted })
    }

    /// Builds the key index behind the log (see [`index`]): a step at a time, with a pause
    /// once it has caught up, and a checkpoint every second.
    fn index_loop(&self) {
        let Some(index) = &self.index else {
            return;
        };
        let mut step = IndexStep::default();
        let mut last_checkpoint = Instant::now();
        let mut idle = INDEX_PAUSE;
        let mut failing = false;
        let (mut last_report, mut reported_from) = (Instant::now(), index.indexed_through());
        loop {
            if self.flush.abandon.load(Ordering::Acquire) {
                return;
            }
            let stopping = self.flush.stop.load(Ordering::Acquire);
            let progressed = match self.index_step(index, &mut step) {
                Ok(p) => {
                    if failing {
                        tracing::info!("the key index is being built again");
                        failing = false;
                    }
                    p
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "building the key index failed; retried every second");
                        failing = true;
                    }
                    false
                }
            };
            if stopping || last_checkpoint.elapsed() >= Duration::from_secs(1) {
                last_checkpoint = Instant::now();
                if let Err(e) = index.checkpoint() {
                    tracing::warn!(error = %e, "saving the key index's progress failed; tried again in a second");
                }
            }
            if stopping {
                return;
            }
            // A long catch-up (an index built anew over a large log) reports its progress.
            if last_report.elapsed() >= Duration::from_secs(10) {
                let (at, end) = (index.indexed_through(), self.dispatched_offset());
                if at < end && at - reported_from.min(at) > INDEX_CHUNK {
                    tracing::info!(
                        indexed_through = at,
                        log_end = end,
                        "building the key index"
                    );
                }
                (last_report, reported_from) = (Instant::now(), at);
            }
            if failing {
                self.pause(Duration::from_secs(1));
            } else if progressed {
                idle = INDEX_PAUSE;
            } else {
                self.pause(idle);
                // Under load each pause lets a few milliseconds of keys gather; a quiet broker
                // looks twenty times a second.
                idle = (idle * 2).min(Duration::from_millis(50));
            }
        }
    }

    /// Indexes what was handed over, or the next chunk of the log where nothing was (what
    /// lies before the hand-over's range); whether there was anything to index.
    fn index_step(&self, index: &KeyIndex, step: &mut IndexStep) -> Result<bool, StoreError> {
        // A slave's log may start past 0 before it holds a segment.
        let log_min = match self.commitlog.min_offset() {
            0 if !self.commitlog.holds(0) => self.commitlog.max_offset(),
            min => min,
        };
        index.skip_to(log_min);
        let from = index.indexed_through();
        if step.handed.is_none() {
            step.handed = index.take_handed();
        }
        let until = match &step.handed {
            Some(h) if h.to <= from => {
                step.handed = None;
                return Ok(true);
            }
            Some(h) if h.from <= from => {
                index.add(h.from_offset(from), h.to)?;
                step.handed = None;
                return Ok(true);
            }
            Some(h) => h.from,
            None => self.dispatched.load(Ordering::Acquire),
        };
        if from >= until {
            return Ok(false);
        }
        let (buf, entries) = (&mut step.buf, &mut step.entries);
        let mut len = self
            .commitlog
            .chunk_len(from, INDEX_CHUNK)
            .min(until - from);
        loop {
            buf.resize(len as usize, 0);
            self.commitlog.read_into(from, buf)?;
            entries.clear();
            let walked = self.walk_log(buf, from, |pos, msg| {
                match message::parse_stored_for_index(msg) {
                    Ok(m) => index::entries_of(
                        entries,
                        m.topic,
                        m.properties,
                        m.sys_flag,
                        pos,
                        m.store_timestamp,
                    ),
                    Err(e) => tracing::warn!(offset = pos, error = %e, "a message cannot be read; it is not indexed by key"),
                }
                Ok(())
            })?;
            if walked.used > 0 {
                index.add(entries, from + walked.used as u64)?;
                return Ok(true);
            }
            if let Some(why) = walked.untrusted {
                // Below the dispatched offset every message was read once already: this is
                // damage since. Indexing goes on at the next segment.
                let seg = self.commitlog.segment_size();
                let next = from - from % seg + seg;
                let next = next.min(until);
                tracing::error!(offset = from, next, "{why}; the key index skips it");
                index.add(&[], next)?;
                return Ok(true);
            }
            // The message at `from` is longer than a chunk: read it whole.
            let longer = match buf.get(..4) {
                Some(b) => {
                    let size = u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    self.commitlog.chunk_len(from, size).min(until - from)
                }
                None => 0,
            };
            if longer <= len {
                return Err(StoreError::Corrupt(format!(
                    "the key index cannot read the message at {from}: it runs past the log it may read"
                )));
            }
            len = longer;
        }
    }

    /// Messages of `topic` filed under `key` and stored within `[begin, end]` (ms), at most
    /// `max`, newest first (QUERY_MESSAGE): each is read and checked, so a hash collision or
    /// an entry of a message the log no longer holds is passed over.
    pub fn query_by_key(
        &self,
        topic: &str,
        key: &str,
        max: usize,
        begin: i64,
        end: i64,
    ) -> Result<KeyQuery, StoreError> {
        let Some(index) = &self.index else {
            return Ok(KeyQuery::default());
        };
        let mut found: Vec<(u64, Bytes)> = Vec::new();
        let mut visit = |offset: u64| -> Result<bool, StoreError> {
            if found.iter().any(|(o, _)| *o == offset) {
                return Ok(true);
            }
            let bytes = match self.commitlog.read_raw(offset) {
                Ok(b) => b,
                // Gone with retention, or an entry of a message a power cut took, whose
                // offset now lies inside another: not this query's failure.
                Err(e) => {
                    tracing::debug!(offset, error = %e, "a key index entry points at no message");
                    return Ok(true);
                }
            };
            if let Ok(m) = message::parse_stored(&bytes) {
                if m.topic == topic && index::has_key(m.properties, key) {
                    found.push((offset, bytes.clone()));
                }
            }
            Ok(found.len() < max)
        };
        if max > 0 {
            index.query(topic, key, begin, end, &mut visit)?;
        }
        found.sort_by_key(|(o, _)| *o);
        Ok(KeyQuery {
            messages: found.into_iter().map(|(_, b)| b).collect(),
            last_time: index.last_time(),
            indexed_through: index.indexed_through(),
        })
    }

    /// Commit-log offset before which every message is in the key index; none without one.
    pub fn key_index_offset(&self) -> Option<u64> {
        self.index.as_ref().map(KeyIndex::indexed_through)
    }

    /// Commit-log offset up to which every message is indexed.
    pub fn dispatched_offset(&self) -> u64 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Commit-log offset the last checkpoint counts: after a crash recovery rescans the log
    /// from here, so one far behind the log's end (checkpoints stopped after a failed sync)
    /// means a long recovery.
    pub fn checkpoint_offset(&self) -> u64 {
        self.checkpointed.load(Ordering::Acquire)
    }

    /// Total messages indexed across all queues (for replication lag in messages).
    pub fn total_messages(&self) -> u64 {
        self.all_queues().iter().map(|q| q.max_offset()).sum()
    }

    /// Appends messages and, under SYNC_FLUSH, waits until they are durable.
    pub async fn put(&self, msgs: &[NewMessage]) -> Result<Vec<PutResult>, StoreError> {
        let results = self.append(msgs)?;
        if self.cfg.flush == FlushDiskType::Sync {
            if let Some(end) = results.iter().map(|r| r.end).max() {
                self.wait_durable(end).await?;
            }
        }
        Ok(results)
    }

    /// Waits until the commit log is durable up to `end` (group commit: one fsync serves every
    /// writer waiting at that moment).
    pub async fn wait_durable(&self, end: u64) -> Result<(), StoreError> {
        if self.commitlog.flushed_offset() >= end {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiters = lock(&self.flush.waiters);
            waiters.push(Waiter { end, done: tx });
            waiters.len() == 1
        };
        // The flusher sleeps only while the list is empty, so only the first waiter of a batch
        // needs to wake it: the others would each cost a futex call on the connection's loop.
        if first {
            self.flush.wake.notify_one();
        }
        let timeout = Duration::from_millis(self.cfg.sync_flush_timeout_ms);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(StoreError::Shutdown),
            Err(_) => Err(StoreError::FlushTimeout(timeout)),
        }
    }

    /// Keeps zeroes ahead of the commit log's end (see [`CommitLog::prepare_ahead`]): writes
    /// then fill pages that exist instead of allocating them, and under SYNC_FLUSH, where the
    /// zeroes are written out to the disk, each group commit has only data to write.
    fn prepare_loop(&self) {
        let mut idle = Duration::from_millis(1);
        let mut refilling = false;
        while !self.flush.stop.load(Ordering::Acquire) {
            match self.commitlog.prepare_ahead(PREPARE_AHEAD, refilling) {
                Ok(Some(zeroes)) => {
                    // Written out piece by piece: a group commit never finds more than one
                    // piece of zeroes to write along with its sends.
                    if self.cfg.flush == FlushDiskType::Sync {
                        match self.commitlog.write_out(&zeroes) {
                            // Logged there, once; it fails every flush after it.
                            Ok(()) | Err(StoreError::WriteBackFailed(_)) => {}
                            // The zeroes go out with the next flush instead.
                            Err(e) => tracing::warn!(error = %e, "writing zeroes out failed"),
                        }
                    }
                    refilling = true;
                    idle = Duration::from_millis(1);
                }
                Ok(None) => {
                    refilling = false;
                    self.pause(idle);
                    // A quiet broker checks less and less often, down to ten times a second.
                    idle = (idle * 2).min(Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "preparing commit-log pages failed");
                    refilling = false;
                    self.pause(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sleeps for `d`, or less when the store is shutting down (in steps of 100 ms at most).
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.flush.stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    fn flush_loop(&self) {
        let interval = Duration::from_millis(self.cfg.flush_interval_ms.max(1));
        let thorough = Duration::from_millis(self.cfg.flush_thorough_interval_ms.max(1));
        let checkpoint_every = Duration::from_secs(1);
        let mut last_thorough = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut create_failed: Option<Instant> = None;
        let mut checkpoint_failed = false;
        loop {
            let batch: Vec<Waiter> = {
                let mut w = lock(&self.flush.waiters);
                if w.is_empty() && !self.flush.stop.load(Ordering::Acquire) {
                    w = self
                        .flush
                        .wake
                        .wait_timeout(w, interval)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                std::mem::take(&mut *w)
            };
            if self.flush.abandon.load(Ordering::Acquire) {
                return;
            }
            // Sends that registered while the last flush ran are often covered by it already:
            // answer them without another fsync.
            let flushed = self.commitlog.flushed_offset();
            let (covered, batch): (Vec<Waiter>, Vec<Waiter>) =
                batch.into_iter().partition(|w| w.end <= flushed);
            for w in covered {
                let _ = w.done.send(Ok(()));
            }
            let stopping = self.flush.stop.load(Ordering::Acquire);
            let dirty_pages =
                (self.commitlog.max_offset() - self.commitlog.flushed_offset()) / 4096;
            let due = !batch.is_empty()
                || stopping
                || (dirty_pages > 0 && dirty_pages >= self.cfg.flush_least_pages)
                || (dirty_pages > 0
                    || self.commitlog.max_offset() > self.commitlog.flushed_offset())
                    && last_thorough.elapsed() >= thorough;
            if due {
                match self.commitlog.flush() {
                    Ok(durable) => {
                        last_thorough = Instant::now();
                        let mut pending = Vec::new();
                        for w in batch {
                            if w.end <= durable {
                                let _ = w.done.send(Ok(()));
                            } else {
                                pending.push(w);
                            }
                        }
                        if !pending.is_empty() {
                            lock(&self.flush.waiters).extend(pending);
                        }
                    }
                    Err(e) => {
                        // Logged where it was recorded: it fails every flush after it.
                        for w in batch {
                            let _ = w.done.send(Err(e.duplicate()));
                        }
                    }
                }
            }
            if !stopping && create_failed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                create_failed = None;
                if let Err(e) = self.commitlog.create_next_ahead() {
                    // The append that needs it tries again, and reports what fails. Retried
                    // once a second, not at every group commit.
                    tracing::warn!(error = %e, "creating the next commit-log segment failed");
                    create_failed = Some(Instant::now());
                }
            }
            if stopping || last_checkpoint.elapsed() >= checkpoint_every {
                last_checkpoint = Instant::now();
                let consistent = self.dispatched.load(Ordering::Acquire);
                // After a failed write-back no checkpoint can be made (the log cannot be
                // flushed), and after a failed sync of the data a checkpoint counts none may
                // be: a queue's sync that failed would succeed when tried again, over pages
                // the disk may not have. The last good checkpoint stands, and recovery starts
                // there. Failing to write the checkpoint file itself (a full disk) is only
                // tried again: the data it would count is on disk.
                let failed = checkpoint_failed || self.commitlog.stopped().is_some();
                // `checkpointed` starts at the checkpoint written at open, not at what is
                // dispatched when this thread starts: messages appended in between would
                // otherwise wait for the next append.
                let checkpointed = self.checkpointed.load(Ordering::Acquire);
                if (consistent != checkpointed || stopping) && !failed {
                    if let Err(e) = self.sync_for_checkpoint(consistent) {
                        tracing::error!(error = %e, "checkpoint failed; no more checkpoints until a restart, which recovers from the last one");
                        checkpoint_failed = true;
                    } else if let Err(e) = self.write_checkpoint(consistent, stopping) {
                        tracing::warn!(error = %e, "writing the checkpoint failed; tried again in a second");
                    } else {
                        self.checkpointed.store(consistent, Ordering::Release);
                    }
                }
                if let Err(e) = self.offsets.persist() {
                    tracing::error!(error = %e, "saving consumer offsets failed");
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Makes the log and queues durable up to `consistent`, for a checkpoint to record.
    fn sync_for_checkpoint(&self, consistent: u64) -> Result<(), StoreError> {
        if self.commitlog.flushed_offset() < consistent {
            self.commitlog.flush()?;
        }
        for cq in self.all_queues() {
            cq.flush()?;
        }
        Ok(())
    }

    /// Deletes commit-log segments older than `reserved` (`fileReservedTime`, which may change
    /// while the broker runs) and moves queue minimums.
    pub fn delete_expired(&self, reserved: Duration) -> Result<(), StoreError> {
        self.commitlog.delete_expired(reserved)?;
        self.correct_queue_minimums()?;
        match &self.index {
            Some(index) => index.delete_before(self.commitlog.min_offset()),
            None => Ok(()),
        }
    }

    /// Whether some queue's minimum still points before the commit log's first offset (a
    /// correction after retention failed): [`MessageStore::correct_queue_minimums`] is due.
    pub fn queue_minimums_behind(&self) -> bool {
        self.commitlog.min_offset() != self.queues_min.load(Ordering::Acquire)
    }

    /// Moves every queue's minimum to the commit log's first offset, if it moved since the
    /// last time this completed.
    pub fn correct_queue_minimums(&self) -> Result<(), StoreError> {
        let min = self.commitlog.min_offset();
        if min != self.queues_min.load(Ordering::Acquire) {
            // Every queue, whatever one of them answers: a queue left behind would send its
            // consumers to deleted data until the next correction, which only a completed
            // one marks done.
            let mut failed = None;
            for cq in self.all_queues() {
                if let Err(e) = cq.correct_min_offset(min) {
                    failed.get_or_insert(e);
                }
            }
            match failed {
                Some(e) => return Err(e),
                None => self.queues_min.store(min, Ordering::Release),
            }
        }
        Ok(())
    }

    /// Reads up to `max_count` messages (and about `max_bytes`) of a queue from `offset`,
    /// keeping those whose tag code `filter` accepts.
    pub fn get(
        &self,
        topic: &str,
        queue_id: i32,
        offset: u64,
        max_count: usize,
        max_bytes: usize,
        filter: impl Fn(i64) -> bool,
    ) -> Result<GetResult, StoreError> {
        let Some(cq) = self.queue(topic, queue_id) else {
            return Ok(GetResult {
                status: GetStatus::NoMessageInQueue,
                body: Bytes::new(),
                count: 0,
                next_offset: 0,
                min_offset: 0,
                max_offset: 0,
                lag_bytes: 0,
            });
        };
        let (min, max) = (cq.min_offset(), cq.max_offset());
        let mut res = GetResult {
            status: GetStatus::NoNewMessage,
            body: Bytes::new(),
            count: 0,
            next_offset: offset,
            min_offset: min,
            max_offset: max,
            lag_bytes: 0,
        };
        if max == 0 {
            res.status = GetStatus::NoMessageInQueue;
            res.next_offset = 0;
            return Ok(res);
        }
        if offset < min {
            res.status = GetStatus::OffsetTooSmall;
            res.next_offset = min;
            return Ok(res);
        }
        if offset == max {
            return Ok(res);
        }
        if offset > max {
            res.status = GetStatus::OffsetOverflow;
            res.next_offset = max;
            return Ok(res);
        }
        // Look at up to max_count entries (more when filtering skips some), stopping at the
        // byte budget.
        let scan = max_count.max(1) * if max_count < 64 { 8 } else { 2 };
        let entries = cq.get(offset, scan)?;
        let mut body = BytesMut::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut next = offset;
        let mut count = 0;
        let mut bytes = 0usize;
        // Entries whose segment retention has just deleted, before the queue's minimum was
        // moved past them, are passed over like messages of other tags (Java answers
        // MESSAGE_WAS_REMOVING the same way: retry from further on).
        let log_min = self.commitlog.min_offset();
        for e in &entries {
            if count >= max_count || (bytes > 0 && bytes + e.size as usize > max_bytes) {
                break;
            }
            next += 1;
            // An empty entry stands for a replicated message a slave could not read.
            if e.is_empty() || e.offset < log_min || !filter(e.tags_code) {
                continue;
            }
            match ranges.last_mut() {
                Some((_, end)) if *end == e.offset => *end += u64::from(e.size),
                _ => ranges.push((e.offset, e.offset + u64::from(e.size))),
            }
            count += 1;
            bytes += e.size as usize;
        }
        for (start, end) in ranges {
            body.extend_from_slice(&self.commitlog.read(start, (end - start) as usize)?);
        }
        res.next_offset = next;
        res.count = count;
        res.body = body.freeze();
        res.status = if count > 0 {
            GetStatus::Found
        } else {
            GetStatus::NoMatchedMessage
        };
        if let Some(last) = entries.get((next - offset).saturating_sub(1) as usize) {
            res.lag_bytes = self
                .commitlog
                .max_offset()
                .saturating_sub(last.offset + u64::from(last.size));
        }
        Ok(res)
    }

    /// Queue offset of the message stored at `timestamp` (ms), by `boundary`: the first one
    /// stored at or after it (the queue end if none is), or the last one stored at or before it
    /// (the queue's first if none is).
    pub fn search_offset(
        &self,
        topic: &str,
        queue_id: i32,
        timestamp: i64,
        boundary: Boundary,
    ) -> Result<u64, StoreError> {
        let Some(cq) = self.queue(topic, queue_id) else {
            return Ok(0);
        };
        let (min, max) = (cq.min_offset(), cq.max_offset());
        let log_min = self.commitlog.min_offset();
        // The first entry stored after `timestamp` (Upper), or at or after it (Lower).
        let (mut lo, mut hi) = (min, max);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // An empty entry (a replicated message a slave could not read) has no time: the
            // next entry with one stands for it, and with none up to `hi`, it counts as later
            // than any time.
            let mut probe = mid;
            let e = loop {
                match cq.get(probe, 1)?.first().copied() {
                    Some(e) if e.is_empty() && probe + 1 < hi => probe += 1,
                    other => break other,
                }
            };
            let Some(e) = e else {
                break;
            };
            // An entry whose segment retention deleted (before the queue's minimum moved)
            // counts as earlier than any time.
            let stored = if e.is_empty() {
                i64::MAX
            } else if e.offset < log_min {
                i64::MIN
            } else {
                self.commitlog.read_store_timestamp(e.offset)?
            };
            let before = match boundary {
                Boundary::Lower => stored < timestamp,
                Boundary::Upper => stored <= timestamp,
            };
            if before {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(match boundary {
            Boundary::Lower => lo,
            Boundary::Upper => lo.saturating_sub(1).max(min),
        })
    }

    /// Bytes of the commit log from the message at queue offset `index` of `topic`/`queue_id`
    /// to the log's end: how far behind the end a read from there is. `None` without such an
    /// entry.
    pub fn lag_at(
        &self,
        topic: &str,
        queue_id: i32,
        index: u64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(cq) = self.queue(topic, queue_id) else {
            return Ok(None);
        };
        let end = self.commitlog.max_offset();
        Ok(cq
            .get(index, 1)?
            .first()
            .filter(|e| !e.is_empty())
            .map(|e| end.saturating_sub(e.offset)))
    }

    /// Store time of the first stored message of a queue.
    pub fn earliest_time(&self, topic: &str, queue_id: i32) -> Result<Option<i64>, StoreError> {
        let Some(cq) = self.queue(topic, queue_id) else {
            return Ok(None);
        };
        self.store_time_at(&cq, cq.min_offset())
    }

    /// Store time of the oldest message still in the commit log.
    pub fn earliest_message_time(&self) -> Result<Option<i64>, StoreError> {
        let first = self.commitlog.min_offset();
        if first >= self.commitlog.max_offset() {
            return Ok(None);
        }
        Ok(Some(self.commitlog.read_store_timestamp(first)?))
    }

    /// Store time of the message at `index` of a queue (none past its end).
    pub fn store_time_at(&self, cq: &ConsumeQueue, index: u64) -> Result<Option<i64>, StoreError> {
        match cq.get(index, 1)?.first() {
            // An empty entry (a replicated message a slave could not read) has no time.
            Some(e) if !e.is_empty() => Ok(Some(self.commitlog.read_store_timestamp(e.offset)?)),
            _ => Ok(None),
        }
    }

    /// Flushes everything, records a clean shutdown and stops the store's threads.
    pub fn shutdown(&self) {
        self.flush.stop.store(true, Ordering::Release);
        self.flush.wake.notify_all();
        for h in std::mem::take(&mut *lock(&self.threads)) {
            let _ = h.join();
        }
    }

    /// Stops the store's threads as a crash would: nothing more is flushed and the
    /// checkpoint is left as it was, not marked clean.
    #[cfg(test)]
    pub(crate) fn crash(&self) {
        self.flush.abandon.store(true, Ordering::Release);
        self.shutdown();
    }
}
