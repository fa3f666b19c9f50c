//! The master side: accepts slaves, streams the commit log, tracks what each slave holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{
    ReplicationError, SyncWaitError, HEARTBEAT, HELLO_MAGIC, HELLO_VERSION, IDLE_TIMEOUT, MAX_CHUNK,
};
use crate::remoting::event_loop::FirstLoop;
use crate::store::MessageStore;

/// What the master knows of one connected slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveStatus {
    /// Slave's address.
    pub addr: SocketAddr,
    /// Commit-log offset the slave reported holding (at first, the offset it asked from).
    pub acked: u64,
    /// Whether `acked` came from the slave's own report: only then does it acknowledge
    /// SYNC_MASTER sends (the offset a slave asks from is not checked yet; see
    /// `slave::Overlap`).
    pub reported: bool,
}

/// The highest offset a slave has reported, which acknowledges sends up to it.
fn best_reported(slaves: &BTreeMap<u64, SlaveStatus>) -> u64 {
    slaves
        .values()
        .filter(|v| v.reported)
        .map(|v| v.acked)
        .max()
        .unwrap_or(0)
}

/// Master-side replication state shared with the send path.
pub struct ReplicationMaster {
    group: String,
    token: Option<String>,
    /// Slaves further behind than this do not count for SYNC_MASTER (haMaxGapNotInSync).
    max_gap: u64,
    next_id: AtomicU64,
    slaves: Mutex<BTreeMap<u64, SlaveStatus>>,
    waiters: Mutex<SyncWaiters>,
}

/// Sends waiting for a slave, ordered by the offset each needs, so an acknowledgement wakes
/// exactly the sends it completes (a broadcast woke every waiter on every acknowledgement).
#[derive(Default)]
struct SyncWaiters {
    /// Highest offset any slave has acknowledged.
    acked: u64,
    /// Registration order breaks ties between sends needing the same offset.
    seq: u64,
    pending: BTreeMap<(u64, u64), oneshot::Sender<()>>,
}

impl ReplicationMaster {
    /// State for the group `group`, requiring `token` from slaves when set.
    pub fn new(group: &str, token: Option<String>, max_gap: u64) -> Arc<ReplicationMaster> {
        Arc::new(ReplicationMaster {
            group: group.to_string(),
            token,
            max_gap,
            next_id: AtomicU64::new(1),
            slaves: Mutex::new(BTreeMap::new()),
            waiters: Mutex::new(SyncWaiters::default()),
        })
    }

    fn slaves_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SlaveStatus>> {
        self.slaves.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiters_lock(&self) -> std::sync::MutexGuard<'_, SyncWaiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether at least one slave is connected and every connected one has reported holding
    /// the log up to `offset` (where a consumer sent to a slave would read next).
    pub fn all_slaves_hold(&self, offset: u64) -> bool {
        let slaves = self.slaves_lock();
        !slaves.is_empty() && slaves.values().all(|s| s.reported && s.acked >= offset)
    }

    /// Connected slaves.
    pub fn slaves(&self) -> Vec<SlaveStatus> {
        self.slaves_lock().values().cloned().collect()
    }

    fn update(&self, id: u64, acked: u64) {
        // The best offset is published under the slaves lock, so two slaves' updates cannot
        // publish out of order (and move it backwards).
        let mut s = self.slaves_lock();
        if let Some(st) = s.get_mut(&id) {
            st.acked = acked;
            st.reported = true;
        }
        self.set_acked(best_reported(&s));
    }

    /// Registers a slave that asked for the log from `first`; returns its id.
    fn connected(&self, addr: SocketAddr, first: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slaves_lock().insert(
            id,
            SlaveStatus {
                addr,
                acked: first,
                reported: false,
            },
        );
        id
    }

    /// A slave that has reported holding the log up to `acked` (`reported`), or only asked
    /// from there; returns its id for [`ReplicationMaster::set_slave`].
    #[cfg(test)]
    pub(crate) fn add_slave(&self, acked: u64, reported: bool) -> u64 {
        let id = self.connected(SocketAddr::from(([127, 0, 0, 1], 1)), acked);
        if reported {
            self.update(id, acked);
        }
        id
    }

    /// A slave's report that it holds the log up to `acked`.
    #[cfg(test)]
    pub(crate) fn set_slave(&self, id: u64, acked: u64) {
        self.update(id, acked);
    }

    fn remove(&self, id: u64) {
        let mut s = self.slaves_lock();
        s.remove(&id);
        self.set_acked(best_reported(&s));
    }

    /// Records the best acknowledged offset and releases the sends it covers.
    fn set_acked(&self, max: u64) {
        let mut w = self.waiters_lock();
        w.acked = max;
        while let Some(entry) = w.pending.first_entry() {
            if entry.key().0 > max {
                break;
            }
            let _ = entry.remove().send(());
        }
    }

    /// Waits until a slave has acknowledged the commit log up to `end`. Fails at once when
    /// no slave is within `max_gap` of `log_end` (SLAVE_NOT_AVAILABLE, as RocketMQ answers).
    pub async fn wait(
        &self,
        end: u64,
        log_end: u64,
        timeout: Duration,
    ) -> Result<(), SyncWaitError> {
        let near = self
            .slaves_lock()
            .values()
            .any(|s| log_end.saturating_sub(s.acked) <= self.max_gap);
        if !near {
            return Err(SyncWaitError::NoSlave);
        }
        let (tx, rx) = oneshot::channel();
        let key = {
            let mut w = self.waiters_lock();
            if w.acked >= end {
                return Ok(());
            }
            w.seq += 1;
            let key = (end, w.seq);
            w.pending.insert(key, tx);
            key
        };
        // Forgets the registration however this wait ends (timeout, or the send's connection
        // going away), so abandoned waits do not pile up while no slave acknowledges.
        let _forget = ForgetWait(self, key);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SyncWaitError::NoSlave),
            Err(_) => Err(SyncWaitError::Timeout(timeout)),
        }
    }
}

/// Accepts slave connections on `listener` until `shutdown`, serving each on `first_loop`, the
/// event loop whose client connections' sends wake it without a cross-thread hop.
pub async fn serve(
    listener: TcpListener,
    store: Arc<MessageStore>,
    state: Arc<ReplicationMaster>,
    shutdown: CancellationToken,
    first_loop: FirstLoop,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (socket, addr) = match accepted {
            Ok((socket, addr)) => (socket, crate::net::canonical(addr)),
            Err(e) => {
                tracing::warn!(error = %e, "HA accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (store, state, stop) = (store.clone(), state.clone(), shutdown.child_token());
        first_loop.spawn(socket, move |socket| async move {
            match serve_slave(socket, addr, store, state, stop).await {
                Ok(()) => tracing::info!(slave = %addr, "slave disconnected"),
                Err(e) => tracing::warn!(slave = %addr, error = %e, "slave connection ended"),
            }
        });
    }
}

fn io(peer: SocketAddr) -> impl Fn(std::io::Error) -> ReplicationError {
    move |source| ReplicationError::Io {
        peer: peer.to_string(),
        source,
    }
}

async fn read_hello(
    rd: &mut OwnedReadHalf,
    peer: SocketAddr,
    state: &ReplicationMaster,
) -> Result<(), ReplicationError> {
    let e = io(peer);
    let magic = rd.read_u32().await.map_err(&e)?;
    if magic != HELLO_MAGIC {
        return Err(ReplicationError::Handshake(format!(
            "{peer} is not a ferromq slave (magic {magic:#x})"
        )));
    }
    let version = rd.read_u16().await.map_err(&e)?;
    if version != HELLO_VERSION {
        return Err(ReplicationError::Handshake(format!(
            "{peer} speaks HA protocol version {version}, we speak {HELLO_VERSION}"
        )));
    }
    let mut read_str = async |max: usize| -> Result<String, ReplicationError> {
        let n = rd.read_u16().await.map_err(&e)? as usize;
        if n > max {
            return Err(ReplicationError::Handshake(format!(
                "{peer} sent an oversized hello field"
            )));
        }
        let mut b = vec![0u8; n];
        rd.read_exact(&mut b).await.map_err(&e)?;
        String::from_utf8(b)
            .map_err(|_| ReplicationError::Handshake(format!("{peer} sent a non-UTF-8 hello")))
    };
    let group = read_str(256).await?;
    let token = read_str(1024).await?;
    if group != state.group {
        return Err(ReplicationError::Handshake(format!(
            "{peer} is a slave of group {group:?}, this master leads {:?}",
            state.group
        )));
    }
    if let Some(expected) = &state.token {
        if token.as_bytes() != expected.as_bytes() {
            return Err(ReplicationError::Handshake(format!(
                "{peer} presented a wrong haAuthToken"
            )));
        }
    }
    Ok(())
}

async fn serve_slave(
    socket: TcpStream,
    peer: SocketAddr,
    store: Arc<MessageStore>,
    state: Arc<ReplicationMaster>,
    stop: CancellationToken,
) -> Result<(), ReplicationError> {
    let (mut rd, mut wr) = socket.into_split();
    tokio::time::timeout(IDLE_TIMEOUT, read_hello(&mut rd, peer, &state))
        .await
        .map_err(|_| ReplicationError::Handshake(format!("{peer} sent no hello")))??;
    let first = tokio::time::timeout(IDLE_TIMEOUT, rd.read_u64())
        .await
        .map_err(|_| ReplicationError::Handshake(format!("{peer} reported no offset")))?
        .map_err(io(peer))?;
    let log = store.commitlog();
    if first > log.max_offset() {
        // A slave ahead of its master (e.g. a master restored from an old disk): merging
        // would silently fork the log. Refuse and say so.
        return Err(ReplicationError::Diverged(format!(
            "slave {peer} holds the commit log up to {first} but this master only up to {}; \
             the slave is ahead of its master and must be rebuilt or the master restored",
            log.max_offset()
        )));
    }
    // Not an acknowledgement: what the slave holds below `first` it has not yet compared with
    // this log. Its reports acknowledge.
    let id = state.connected(peer, first);
    tracing::info!(slave = %peer, offset = first, "slave connected");

    // Offsets reported by the slave, read concurrently with streaming.
    let reader_state = state.clone();
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                _ = reader_stop.cancelled() => return,
                r = tokio::time::timeout(IDLE_TIMEOUT, rd.read_u64()) => r,
            };
            match r {
                Ok(Ok(off)) => reader_state.update(id, off),
                _ => {
                    reader_stop.cancel();
                    return;
                }
            }
        }
    });
    let start = first.max(log.min_offset());
    let result = stream(&mut wr, peer, &store, start, Pace::default(), &stop).await;
    stop.cancel();
    let _ = reader.await;
    state.remove(id);
    result
}

/// When a stream sends heartbeats and where it reads chunks; tests set both.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// An empty frame after this long without data tells the slave its master is alive.
    heartbeat: Duration,
    /// A chunk starting further than this behind the log's end is read on a blocking thread:
    /// data that old may have left the page cache, and a disk read must not hold up the
    /// client connections that share the first loop.
    cold_after: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            heartbeat: HEARTBEAT,
            cold_after: COLD_AFTER,
        }
    }
}

/// Bytes behind the log's end past which a slave is taken to read cold data.
const COLD_AFTER: u64 = 64 << 20;

/// Sends the commit log from `next` on, chunk by chunk as it grows, and heartbeats while it
/// does not.
async fn stream(
    wr: &mut (impl AsyncWrite + Unpin),
    peer: SocketAddr,
    store: &Arc<MessageStore>,
    mut next: u64,
    pace: Pace,
    stop: &CancellationToken,
) -> Result<(), ReplicationError> {
    let log = store.commitlog();
    let mut last_sent = Instant::now();
    let mut frame = Vec::with_capacity(FRAME_HEAD + MAX_CHUNK as usize);
    loop {
        let appended = store.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let len = log.chunk_len(next, MAX_CHUNK);
        if len > 0 || last_sent.elapsed() >= pace.heartbeat {
            frame.clear();
            frame.extend_from_slice(&next.to_be_bytes());
            frame.extend_from_slice(&(len as u32).to_be_bytes());
            if len > 0 {
                // The chunk is read straight into the frame, behind its header: one copy. A
                // heartbeat reads nothing: at the end of the log there may be no segment.
                frame.resize(FRAME_HEAD + len as usize, 0);
                if log.max_offset().saturating_sub(next) > pace.cold_after {
                    frame = read_cold(store, next, frame).await?;
                } else {
                    log.read_into(next, &mut frame[FRAME_HEAD..])?;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                w = wr.write_all(&frame) => w.map_err(io(peer))?,
            }
            next += len;
            last_sent = Instant::now();
            if len > 0 {
                // A slave catching up finds chunk after chunk ready, and its socket rarely
                // full: let the loop's client connections run between chunks.
                if log.chunk_len(next, MAX_CHUNK) > 0 {
                    tokio::task::yield_now().await;
                }
                continue;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = &mut appended => {
                // Sends appending at the same moment join this chunk: one write and one
                // acknowledgement for all of them.
                tokio::task::yield_now().await;
            }
            _ = tokio::time::sleep(pace.heartbeat) => {}
        }
    }
}

/// Bytes before a chunk's data: its start offset and its size.
const FRAME_HEAD: usize = 12;

/// Fills `frame` behind its header with the log from `at` on a blocking thread, for chunks
/// that may have to come from the disk.
async fn read_cold(
    store: &Arc<MessageStore>,
    at: u64,
    mut frame: Vec<u8>,
) -> Result<Vec<u8>, ReplicationError> {
    let store = store.clone();
    let read = tokio::task::spawn_blocking(move || {
        #[cfg(test)]
        tests::COLD_READS.fetch_add(1, Ordering::Relaxed);
        let read = store.commitlog().read_into(at, &mut frame[FRAME_HEAD..]);
        read.map(|()| frame)
    });
    match read.await {
        Ok(read) => Ok(read?),
        // An error, not a resumed panic: the caller still unregisters the slave.
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(ReplicationError::ReadPanicked(what))
        }
        Err(_) => Err(crate::store::StoreError::Shutdown.into()),
    }
}

/// Removes a send's registration from the waiters when its wait ends.
struct ForgetWait<'a>(&'a ReplicationMaster, (u64, u64));

impl Drop for ForgetWait<'_> {
    fn drop(&mut self) {
        let mut w = self.0.waiters_lock();
        w.pending.remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks read on a blocking thread, by any test.
    pub(super) static COLD_READS: AtomicU64 = AtomicU64::new(0);

    fn with_slave() -> (Arc<ReplicationMaster>, u64) {
        let m = ReplicationMaster::new("g", None, 1 << 20);
        let id = m.connected("127.0.0.1:1".parse().unwrap(), 0);
        (m, id)
    }

    #[tokio::test]
    async fn the_offset_a_slave_asks_from_acknowledges_nothing() {
        let m = ReplicationMaster::new("g", None, 1 << 20);
        let id = m.connected("127.0.0.1:1".parse().unwrap(), 10_000);
        // Another slave's report makes the master work out the best offset again.
        let other = m.connected("127.0.0.1:2".parse().unwrap(), 0);
        m.update(other, 100);
        let short = Duration::from_millis(50);
        assert!(
            matches!(
                m.wait(5_000, 10_000, short).await,
                Err(SyncWaitError::Timeout(_))
            ),
            "a send was acknowledged by the offset a slave asked from"
        );
        m.update(id, 10_000);
        assert!(m.wait(5_000, 10_000, short).await.is_ok());
    }

    #[tokio::test]
    async fn an_acknowledgement_releases_exactly_the_sends_it_covers() {
        let (m, id) = with_slave();
        let long = Duration::from_secs(30);
        let waits: Vec<_> = [300u64, 100, 200]
            .into_iter()
            .map(|end| {
                let m = m.clone();
                tokio::spawn(async move { m.wait(end, end, long).await })
            })
            .collect();
        tokio::task::yield_now().await;
        while m.waiters.lock().unwrap().pending.len() < 3 {
            tokio::task::yield_now().await;
        }
        m.update(id, 250);
        let [w300, w100, w200]: [_; 3] = waits.try_into().unwrap();
        assert!(w100.await.unwrap().is_ok());
        assert!(w200.await.unwrap().is_ok());
        assert_eq!(
            m.waiters.lock().unwrap().pending.len(),
            1,
            "300 still waits"
        );
        m.update(id, 300);
        assert!(w300.await.unwrap().is_ok());
        // Already acknowledged: no wait at all.
        assert!(m.wait(50, 300, long).await.is_ok());
    }

    #[tokio::test]
    async fn a_timed_out_send_is_forgotten_and_no_slave_fails_at_once() {
        let (m, id) = with_slave();
        let short = Duration::from_millis(20);
        assert!(matches!(
            m.wait(100, 100, short).await,
            Err(SyncWaitError::Timeout(_))
        ));
        assert!(m.waiters.lock().unwrap().pending.is_empty());
        // A slave further behind than max_gap does not count.
        assert!(matches!(
            m.wait(100, 2 << 20, short).await,
            Err(SyncWaitError::NoSlave)
        ));
        // A wait dropped before it ends (its connection closed) is forgotten too.
        let abandoned = tokio::time::timeout(Duration::from_millis(5), m.wait(100, 100, long()));
        assert!(abandoned.await.is_err());
        assert!(m.waiters.lock().unwrap().pending.is_empty());
        m.remove(id);
        assert!(matches!(
            m.wait(100, 100, short).await,
            Err(SyncWaitError::NoSlave)
        ));
    }

    /// A socket that takes everything at once and keeps it.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<u8>>>);

    impl Recorder {
        fn len(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Starts streaming `store` from `from` into a recorder, on the test's runtime.
    fn start_stream(
        store: &Arc<MessageStore>,
        from: u64,
        pace: Pace,
    ) -> (
        Recorder,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), ReplicationError>>,
    ) {
        let (socket, stop) = (Recorder::default(), CancellationToken::new());
        let streaming = {
            let (store, stop, mut socket) = (store.clone(), stop.clone(), socket.clone());
            tokio::spawn(async move {
                let peer = "127.0.0.1:1".parse().unwrap();
                stream(&mut socket, peer, &store, from, pace, &stop).await
            })
        };
        (socket, stop, streaming)
    }

    /// Streams a log the slave has none of, one chunk per segment of distinct bytes, and
    /// returns how much was sent before another task first ran, and all that was sent.
    async fn catch_up(cold_after: u64) -> (u64, Vec<u8>) {
        const SEGMENT: u64 = 64 * 1024;
        const SEGMENTS: u64 = 8;
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path(), SEGMENT);
        for i in 0..SEGMENTS {
            store
                .replicate(i * SEGMENT, &[i as u8 + 1; SEGMENT as usize])
                .unwrap();
        }
        let total = SEGMENTS * (FRAME_HEAD as u64 + SEGMENT);
        let pace = Pace {
            cold_after,
            ..Pace::default()
        };
        let (socket, stop, streaming) = start_stream(&store, 0, pace);
        // Spawned after the stream on the same thread: it runs when the stream first yields.
        let seen = tokio::spawn({
            let socket = socket.clone();
            async move { socket.len() }
        });
        let seen = seen.await.unwrap();
        // A stream that failed ends early; its error is reported below.
        while socket.len() < total && !streaming.is_finished() {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        streaming.await.unwrap().unwrap();
        let sent = std::mem::take(&mut *socket.0.lock().unwrap());
        let mut expected = Vec::new();
        for i in 0..SEGMENTS {
            expected.extend_from_slice(&(i * SEGMENT).to_be_bytes());
            expected.extend_from_slice(&(SEGMENT as u32).to_be_bytes());
            expected.extend_from_slice(&[i as u8 + 1; SEGMENT as usize]);
        }
        assert!(sent == expected, "every chunk once, in order, framed");
        store.shutdown();
        (seen, sent)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slave_catching_up_lets_the_loops_other_tasks_run_between_chunks() {
        // Recent data, read on the loop: the stream yields after each chunk.
        let (seen, sent) = catch_up(u64::MAX).await;
        assert!(
            seen > 0 && seen < sent.len() as u64,
            "the stream sent {seen} of {} bytes before another task ran",
            sent.len()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slave_far_behind_has_its_chunks_read_off_the_loop() {
        // Every chunk counts as cold. Other tests may read cold chunks at the same time, so
        // the count can only be checked from below.
        let before = COLD_READS.load(Ordering::Relaxed);
        catch_up(0).await;
        let cold = COLD_READS.load(Ordering::Relaxed) - before;
        assert!(
            cold >= 8,
            "{cold} of 8 chunks were read on a blocking thread"
        );
    }

    #[tokio::test]
    async fn a_slave_at_the_end_of_the_log_gets_heartbeats() {
        const SEGMENT: u64 = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path(), SEGMENT);
        // First an empty log, then one that ends exactly where a segment ends: in both, no
        // segment holds the slave's next offset.
        for end in [0, SEGMENT] {
            if end > 0 {
                store.replicate(0, &[7u8; SEGMENT as usize]).unwrap();
            }
            let pace = Pace {
                heartbeat: Duration::from_millis(5),
                ..Pace::default()
            };
            let (socket, stop, streaming) = start_stream(&store, end, pace);
            let beats = 3 * FRAME_HEAD as u64;
            let beating = async {
                while socket.len() < beats && !streaming.is_finished() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            tokio::time::timeout(long(), beating)
                .await
                .expect("no heartbeats");
            stop.cancel();
            let ended = streaming.await.unwrap();
            assert!(ended.is_ok(), "log ending at {end}: {ended:?}");
            let sent = socket.0.lock().unwrap();
            assert!(sent.len() as u64 >= beats);
            for beat in sent.chunks(FRAME_HEAD) {
                assert_eq!(
                    beat[..8],
                    end.to_be_bytes(),
                    "heartbeats carry the slave's offset"
                );
                assert_eq!(beat[8..], [0u8; 4], "and no data");
            }
        }
        store.shutdown();
    }

    fn store_in(root: &std::path::Path, segment_size: u64) -> Arc<MessageStore> {
        use crate::store::{FlushDiskType, StoreConfig};
        MessageStore::open(StoreConfig {
            segment_size,
            prepare_ahead: false,
            ..StoreConfig::for_tests(root, FlushDiskType::Async)
        })
        .unwrap()
    }

    fn long() -> Duration {
        Duration::from_secs(30)
    }
}
