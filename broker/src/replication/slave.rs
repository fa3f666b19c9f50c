//! The slave side: follows the master's commit log, appending what it receives verbatim.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::{ReplicationError, HEARTBEAT, HELLO_MAGIC, HELLO_VERSION, IDLE_TIMEOUT, MAX_CHUNK};
use crate::store::commitlog::CommitLog;
use crate::store::MessageStore;

/// Who this slave is and how it proves it.
#[derive(Debug, Clone)]
pub struct SlaveIdentity {
    /// The group (brokerName) it belongs to.
    pub group: String,
    /// Shared secret (haAuthToken), empty when none is configured.
    pub token: String,
}

/// Follows the master whose HA address `master` currently holds, reconnecting as needed,
/// until `shutdown`.
pub async fn follow(
    store: Arc<MessageStore>,
    me: SlaveIdentity,
    mut master: watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Some(why) = store.commitlog().stopped() {
            // Every replicated write would be refused: stop asking the master for them.
            tracing::error!(
                error = why,
                "replication stopped: this slave's store takes no more data; restart it to recover"
            );
            shutdown.cancelled().await;
            return;
        }
        let addr = master.borrow_and_update().clone();
        let Some(addr) = addr else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = master.changed() => continue,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow_once(&store, &me, &addr, Pace::default()) => r,
            _ = master.changed() => Ok(()),
        };
        // A session that ended between storing replicated bytes and indexing them (a failed
        // acknowledgement, a new master) leaves them stored but unindexed: index them now, so
        // consumers of this slave see them without waiting for another master.
        if let Err(e) = store.dispatch_replicated() {
            tracing::error!(error = %e, "indexing replicated messages failed");
        }
        match result {
            Ok(()) => tracing::info!(master = %addr, "replication connection closed"),
            Err(e @ ReplicationError::Diverged(_)) => {
                tracing::error!(master = %addr, error = %e, "replication diverged; retrying later");
            }
            Err(e) => tracing::warn!(master = %addr, error = %e, "replication interrupted"),
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

/// How a slave paces a session; tests shorten it.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Silence from the master, counted from the last byte received, after which the slave
    /// drops the connection (Java's haHousekeepingInterval): a master whose host died sends
    /// no FIN, and a chunk that keeps arriving, however slowly, is never cut.
    idle: Duration,
    /// Longest time between two offset reports, sent even while a chunk is still arriving
    /// (Java's haSendHeartbeatInterval), so the master's own idle timeout never drops a slave
    /// on a slow link.
    heartbeat: Duration,
    /// Bytes received since the last indexing after which the slave indexes and reports even
    /// though more has already arrived: a slave catching up always has more, and would hold
    /// it all in memory unindexed until the catch-up ends.
    dispatch_every: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            idle: IDLE_TIMEOUT,
            heartbeat: HEARTBEAT,
            dispatch_every: DISPATCH_EVERY,
        }
    }
}

/// See [`Pace::dispatch_every`]: large enough that a SYNC_MASTER slave indexes once per read
/// of its socket, as before, small enough to bound what waits in memory.
const DISPATCH_EVERY: u64 = 4 << 20;

async fn follow_once(
    store: &MessageStore,
    me: &SlaveIdentity,
    addr: &str,
    pace: Pace,
) -> Result<(), ReplicationError> {
    let e = io_error(addr);
    let socket = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| ReplicationError::Io {
            peer: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
        .map_err(e)?;
    let _ = socket.set_nodelay(true);
    let (rd, mut wr) = socket.into_split();
    let mut hello = Vec::new();
    hello.extend_from_slice(&HELLO_MAGIC.to_be_bytes());
    hello.extend_from_slice(&HELLO_VERSION.to_be_bytes());
    for s in [&me.group, &me.token] {
        hello.extend_from_slice(&(s.len() as u16).to_be_bytes());
        hello.extend_from_slice(s.as_bytes());
    }
    let overlap = Overlap::new(store.commitlog());
    hello.extend_from_slice(&overlap.checked.to_be_bytes());
    wr.write_all(&hello).await.map_err(e)?;
    tracing::info!(
        master = addr,
        offset = overlap.end,
        check_from = overlap.checked,
        "replicating from master"
    );
    session(store, addr, rd, wr, overlap, pace).await
}

/// Stores the chunks the master sends on `rd`, reporting on `wr` what this slave holds, until
/// the connection fails or the master falls silent.
async fn session(
    store: &MessageStore,
    addr: &str,
    rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    mut overlap: Overlap,
    pace: Pace,
) -> Result<(), ReplicationError> {
    let e = io_error(addr);
    let log = store.commitlog();
    // Buffered: a chunk header and its data usually arrive in one read, and several chunks
    // that arrived together are stored before one acknowledgement.
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, Idle::new(rd, pace.idle));
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    let beat = tokio::time::sleep(pace.heartbeat);
    tokio::pin!(beat);
    let mut since_dispatch = 0u64;
    loop {
        let (start, size) = {
            let chunk = read_chunk(&mut rd, &mut buf, addr);
            tokio::pin!(chunk);
            loop {
                tokio::select! {
                    biased;
                    r = &mut chunk => break r?,
                    _ = &mut beat => {
                        // Still waiting for (the rest of) a chunk: tell the master this slave
                        // is alive, and what it holds.
                        report(&mut wr, overlap.holds(log), pace.idle).await.map_err(e)?;
                        beat.as_mut().reset(Instant::now() + pace.heartbeat);
                    }
                }
            }
        };
        let (start, data, check_done) = overlap.compare(addr, log, start, &buf[..size])?;
        let size = data.len();
        let end = log.max_offset();
        if start != end {
            if end == 0 && log.min_offset() == 0 && size > 0 {
                // An empty slave joining a master whose first segments were deleted.
                store.reset_start(start)?;
            } else if size > 0 || start > end {
                return Err(ReplicationError::Diverged(format!(
                    "master {addr} sends from offset {start} but this slave's log ends at {end}"
                )));
            }
        }
        if size > 0 {
            store.replicate(start, data)?;
            since_dispatch += size as u64;
        }
        // Acknowledge once what has arrived is stored: a SYNC_MASTER waits for this, and one
        // acknowledgement covers every chunk of the same read. Indexing comes after, as on
        // Java's slaves, and happens even if the acknowledgement cannot be written. A slave
        // catching up, whose socket always holds more, does both every `dispatch_every` bytes.
        let batch_done = rd.buffer().is_empty() || since_dispatch >= pace.dispatch_every;
        let mut acked = Ok(());
        if (size > 0 && batch_done) || check_done || Instant::now() >= beat.deadline() {
            acked = report(&mut wr, overlap.holds(log), pace.idle).await;
            beat.as_mut().reset(Instant::now() + pace.heartbeat);
        }
        if batch_done {
            store.dispatch_replicated()?;
            since_dispatch = 0;
        }
        acked.map_err(e)?;
    }
}

/// Reads one chunk into `buf`; returns its start offset and size.
async fn read_chunk(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    addr: &str,
) -> Result<(u64, usize), ReplicationError> {
    let e = io_error(addr);
    let start = rd.read_u64().await.map_err(e)?;
    let size = rd.read_u32().await.map_err(e)? as usize;
    if size > buf.len() {
        return Err(ReplicationError::Handshake(format!(
            "master {addr} sent an oversized chunk ({size} bytes)"
        )));
    }
    rd.read_exact(&mut buf[..size]).await.map_err(e)?;
    Ok((start, size))
}

/// Writes this slave's offset report, failing if the master takes none for `within`.
async fn report(
    wr: &mut (impl AsyncWrite + Unpin),
    offset: u64,
    within: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(within, wr.write_all(&offset.to_be_bytes())).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the master took no report for {within:?}"),
        )),
    }
}

/// A reader that fails once nothing has arrived for `idle`, wherever in a chunk it waits.
struct Idle<R> {
    inner: R,
    idle: Duration,
    /// When bytes last arrived.
    last: Instant,
    /// Fires at or before `last + idle`; moved on lazily, when it fires early.
    deadline: Pin<Box<Sleep>>,
}

impl<R> Idle<R> {
    fn new(inner: R, idle: Duration) -> Idle<R> {
        Idle {
            inner,
            idle,
            last: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Idle<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.last = Instant::now();
            }
            return Poll::Ready(read);
        }
        loop {
            if this.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = this.last + this.idle;
            if Instant::now() >= due {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the master sent nothing for {:?}", this.idle),
                )));
            }
            this.deadline.as_mut().reset(due);
        }
    }
}

/// Bytes before the log's end a slave asks to be sent again and compares with its own.
const OVERLAP: u64 = 4096;

/// The end of this slave's log, asked for again: the master's bytes there must be this log's
/// own, or the two logs have forked (a master that lost its tail, a store replaced) and
/// appending the master's later bytes would merge them. Until they are compared, the slave
/// reports only what it has compared, so no SYNC_MASTER send counts bytes it holds but the
/// master may not.
struct Overlap {
    /// Compared up to here; the offset asked from, at first.
    checked: u64,
    /// The log's end when the session started.
    end: u64,
}

impl Overlap {
    /// Up to [`OVERLAP`] bytes before the log's end, within the last segment that holds data
    /// and not before the log's start.
    fn new(log: &CommitLog) -> Overlap {
        let end = log.max_offset();
        let checked = if end == 0 || !log.holds(end - 1) {
            // Nothing stored to compare (an empty log, or one just moved to a master's start).
            end
        } else {
            let last_byte = end - 1;
            let segment_start = last_byte - last_byte % log.segment_size();
            end - OVERLAP.min(end - segment_start.max(log.min_offset()))
        };
        Overlap { checked, end }
    }

    /// Compares the part of a chunk from `start` that falls in the overlap with this log;
    /// returns where the rest starts, the rest, and whether the comparison just ended (to be
    /// reported at once: until then the master counts nothing this slave holds).
    fn compare<'a>(
        &mut self,
        addr: &str,
        log: &CommitLog,
        start: u64,
        data: &'a [u8],
    ) -> Result<(u64, &'a [u8], bool), ReplicationError> {
        if self.checked >= self.end {
            return Ok((start, data, false));
        }
        if start > self.checked && start <= self.end {
            // The master no longer has the start of the range (retention deleted it): what it
            // still has is compared.
            self.checked = start;
        }
        if start != self.checked {
            return Err(ReplicationError::Diverged(format!(
                "master {addr} sends from offset {start} but this slave asked from {}",
                self.checked
            )));
        }
        let n = data.len().min((self.end - start) as usize);
        let mut mine = vec![0u8; n];
        log.read_into(start, &mut mine)?;
        if mine != data[..n] {
            return Err(ReplicationError::Diverged(format!(
                "master {addr} holds other bytes than this slave at offset {start} (this \
                 slave's log ends at {}): the logs have forked, and this slave will not merge \
                 them; rebuild it from an empty store",
                self.end
            )));
        }
        self.checked += n as u64;
        Ok((self.checked, &data[n..], self.checked == self.end))
    }

    /// The offset this slave reports holding.
    fn holds(&self, log: &CommitLog) -> u64 {
        if self.checked < self.end {
            self.checked
        } else {
            log.max_offset()
        }
    }
}

/// Turns an I/O error on the connection to `addr` into a replication error naming it.
fn io_error(addr: &str) -> impl Fn(std::io::Error) -> ReplicationError + Copy + '_ {
    move |source| ReplicationError::Io {
        peer: addr.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::super::HELLO_MAGIC;
    use super::*;
    use crate::store::message::NewMessage;
    use crate::store::{FlushDiskType, StoreConfig};
    use tokio::net::TcpListener;

    fn empty_store(root: &std::path::Path) -> Arc<MessageStore> {
        MessageStore::open(StoreConfig::for_tests(root, FlushDiskType::Async)).unwrap()
    }

    /// The commit log of a master that stored `n` messages: segments, fillers and all.
    fn master_log(root: &std::path::Path, n: usize) -> Vec<u8> {
        let master = empty_store(root);
        for i in 0..n {
            let m = NewMessage {
                topic: "T".into(),
                queue_id: (i % 4) as i32,
                flag: 0,
                body: bytes::Bytes::from(vec![i as u8; 400]),
                properties: String::new(),
                sys_flag: 0,
                born_timestamp: 1,
                born_host: "10.0.0.1:1".parse().unwrap(),
                reconsume_times: 0,
                tags_code: 0,
            };
            master.append(&[m]).unwrap();
        }
        let log = master.commitlog();
        let mut bytes = vec![0u8; log.max_offset() as usize];
        let mut at = 0;
        while at < bytes.len() {
            let len = log.chunk_len(at as u64, u64::MAX) as usize;
            log.read_into(at as u64, &mut bytes[at..at + len]).unwrap();
            at += len;
        }
        master.shutdown();
        bytes
    }

    /// `log` framed as a master sends it, in chunks of at most `max` bytes within a segment.
    fn frames(log: &[u8], segment: u64, max: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut next = 0u64;
        while next < log.len() as u64 {
            let len = max
                .min(segment - next % segment)
                .min(log.len() as u64 - next);
            out.extend_from_slice(&next.to_be_bytes());
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend_from_slice(&log[next as usize..(next + len) as usize]);
            next += len;
        }
        out
    }

    fn short_pace() -> Pace {
        Pace {
            idle: Duration::from_millis(400),
            heartbeat: Duration::from_millis(100),
            ..Pace::default()
        }
    }

    fn me() -> SlaveIdentity {
        SlaveIdentity {
            group: "g".into(),
            token: String::new(),
        }
    }

    /// A master that answers the slave's hello by sending `pieces` with `gap` between them,
    /// then keeps the connection open and silent; returns what the slave reported, once it
    /// hangs up.
    async fn trickling_master(
        pieces: Vec<Vec<u8>>,
        gap: Duration,
    ) -> (String, tokio::task::JoinHandle<Vec<u64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serving = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            assert_eq!(read_hello(&mut socket).await, 0);
            let (mut rd, mut wr) = socket.into_split();
            let reports = tokio::spawn(async move {
                let mut reported = Vec::new();
                while let Ok(off) = rd.read_u64().await {
                    reported.push(off);
                }
                reported
            });
            for piece in pieces {
                wr.write_all(&piece).await.unwrap();
                tokio::time::sleep(gap).await;
            }
            let reported = reports.await.unwrap();
            drop(wr);
            reported
        });
        (addr, serving)
    }

    #[tokio::test]
    async fn a_master_that_falls_silent_mid_chunk_is_dropped_and_told_the_slave_lives_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = empty_store(dir.path());
        // A chunk of 1,000 bytes of which 10 arrive: the master's host lost power, and no FIN
        // will come.
        let mut head = 0u64.to_be_bytes().to_vec();
        head.extend_from_slice(&1000u32.to_be_bytes());
        head.extend_from_slice(&[0u8; 10]);
        let (addr, master) = trickling_master(vec![head], Duration::ZERO).await;
        let pace = short_pace();
        let followed = tokio::time::timeout(
            Duration::from_secs(5),
            follow_once(&store, &me(), &addr, pace),
        )
        .await
        .expect("the slave still waits for the rest of the chunk");
        assert!(
            matches!(&followed, Err(ReplicationError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::TimedOut),
            "{followed:?}"
        );
        let reported = master.await.unwrap();
        assert!(
            reported.len() >= 2 && reported.iter().all(|&off| off == 0),
            "reports while the chunk was due: {reported:?}"
        );
        store.shutdown();
    }

    #[tokio::test]
    async fn a_chunk_that_arrives_slowly_but_steadily_is_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = master_log(&dir.path().join("m"), 4);
        let store = empty_store(&dir.path().join("s"));
        // The whole log in one chunk, in 8 pieces a fifth of the idle timeout apart: longer
        // than the timeout in all.
        let chunk = frames(&log, 64 * 1024, MAX_CHUNK);
        let pace = Pace {
            idle: Duration::from_secs(1),
            ..short_pace()
        };
        let pieces: Vec<Vec<u8>> = chunk
            .chunks(chunk.len() / 8 + 1)
            .map(<[u8]>::to_vec)
            .collect();
        let (addr, master) = trickling_master(pieces, pace.idle / 5).await;
        let followed = tokio::time::timeout(
            Duration::from_secs(10),
            follow_once(&store, &me(), &addr, pace),
        )
        .await
        .expect("the slave never dropped a silent master");
        // It stored the chunk, and only then found its master silent.
        assert!(
            matches!(&followed, Err(ReplicationError::Io { .. })),
            "{followed:?}"
        );
        assert_eq!(store.commitlog().max_offset(), log.len() as u64);
        assert_eq!(store.dispatched_offset(), log.len() as u64);
        let reported = master.await.unwrap();
        assert_eq!(reported.last(), Some(&(log.len() as u64)));
        store.shutdown();
    }

    /// A socket holding `data` and nothing after it, which notes what the store held in
    /// memory and had indexed at each read.
    struct Watched<'a> {
        data: &'a [u8],
        store: &'a MessageStore,
        /// Most unindexed bytes seen held.
        held: usize,
        /// Indexed offset seen at the last read.
        dispatched: u64,
    }

    impl AsyncRead for Watched<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = &mut *self;
            this.held = this.held.max(this.store.unindexed_bytes());
            this.dispatched = this.store.dispatched_offset();
            let n = buf.remaining().min(this.data.len());
            buf.put_slice(&this.data[..n]);
            this.data = &this.data[n..];
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_slave_catching_up_indexes_and_reports_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        // About a megabyte of messages, in chunks whose ends never meet a read's end, and
        // the start of one more chunk: the slave always has more buffered.
        let log = master_log(&dir.path().join("m"), 2500);
        const FRAME: u64 = 40_000;
        let mut stream = frames(&log, 64 * 1024, FRAME);
        stream.extend_from_slice(&(log.len() as u64).to_be_bytes());
        stream.extend_from_slice(&1000u32.to_be_bytes());
        stream.extend_from_slice(&[0u8; 10]);
        let store = empty_store(&dir.path().join("s"));
        let pace = Pace {
            dispatch_every: 128 * 1024,
            ..Pace::default()
        };
        assert!(log.len() as u64 > 6 * pace.dispatch_every);
        let mut socket = Watched {
            data: &stream,
            store: &store,
            held: 0,
            dispatched: 0,
        };
        let mut reported = Vec::new();
        let overlap = Overlap::new(store.commitlog());
        let ended = session(&store, "master", &mut socket, &mut reported, overlap, pace).await;
        assert!(
            matches!(ended, Err(ReplicationError::Io { .. })),
            "{ended:?}"
        );
        let end = log.len() as u64;
        let (held, last) = (socket.held, socket.dispatched);
        assert!(
            held as u64 <= pace.dispatch_every + 2 * FRAME,
            "{held} bytes held unindexed"
        );
        assert!(
            last + pace.dispatch_every + 2 * FRAME >= end,
            "indexed up to {last} of {end} bytes"
        );
        let reports: Vec<u64> = reported
            .chunks(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
            .collect();
        assert!(
            reports.len() >= 5 && reports.windows(2).all(|w| w[0] < w[1]),
            "reports: {reports:?}"
        );
        store.shutdown();
    }

    #[tokio::test]
    async fn a_slave_whose_log_cannot_reach_the_disk_stops_following() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            MessageStore::open(StoreConfig::for_tests(dir.path(), FlushDiskType::Async)).unwrap();
        let log = store.commitlog();
        log.append(&[1u8; 100]).unwrap();
        log.flush().unwrap();
        // Broken before the next write, so whichever flush takes it first fails.
        log.break_syncing(0);
        log.append(&[2u8; 100]).unwrap();
        assert!(log.flush().is_err());

        let master = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = master.local_addr().unwrap().to_string();
        let (_tx, rx) = watch::channel(Some(addr));
        let shutdown = CancellationToken::new();
        let me = SlaveIdentity {
            group: "g".into(),
            token: String::new(),
        };
        let following = tokio::spawn(follow(store.clone(), me, rx, shutdown.clone()));
        let connected = tokio::time::timeout(Duration::from_millis(500), master.accept()).await;
        assert!(connected.is_err(), "the slave still connects to its master");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), following)
            .await
            .expect("follow ends on shutdown")
            .unwrap();
        store.shutdown();
    }

    /// Reads a slave's hello; returns the offset it asks from.
    async fn read_hello(socket: &mut TcpStream) -> u64 {
        assert_eq!(socket.read_u32().await.unwrap(), HELLO_MAGIC);
        socket.read_u16().await.unwrap();
        for _ in 0..2 {
            let n = socket.read_u16().await.unwrap() as usize;
            socket.read_exact(&mut vec![0u8; n]).await.unwrap();
        }
        socket.read_u64().await.unwrap()
    }

    /// A master that answers a slave's hello with `log[from..upto]` in one chunk, then sends
    /// heartbeats and listens for `listen`; returns the offset the slave asked from and every
    /// offset it reported.
    async fn fake_master(
        log: Vec<u8>,
        upto: usize,
        listen: Duration,
    ) -> (String, tokio::task::JoinHandle<(u64, Vec<u64>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serving = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let from = read_hello(&mut socket).await;
            let data = &log[from as usize..upto];
            socket.write_u64(from).await.unwrap();
            socket.write_u32(data.len() as u32).await.unwrap();
            socket.write_all(data).await.unwrap();
            // Then heartbeats, as a master with nothing new sends.
            let (mut rd, mut wr) = socket.into_split();
            let beats = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let beat = [&(upto as u64).to_be_bytes()[..], &[0u8; 4]].concat();
                    if wr.write_all(&beat).await.is_err() {
                        return;
                    }
                }
            });
            let mut reported = Vec::new();
            let until = tokio::time::Instant::now() + listen;
            while let Ok(Ok(off)) = tokio::time::timeout_at(until, rd.read_u64()).await {
                reported.push(off);
            }
            beats.abort();
            (from, reported)
        });
        (addr, serving)
    }

    #[tokio::test]
    async fn a_slave_ahead_of_its_master_merges_nothing_once_the_master_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            MessageStore::open(StoreConfig::for_tests(dir.path(), FlushDiskType::Async)).unwrap();
        let me = SlaveIdentity {
            group: "g".into(),
            token: String::new(),
        };
        // The slave holds 10,000 bytes of an earlier life of the master's log.
        let earlier = tempfile::tempdir().unwrap();
        let old = master_log(earlier.path(), 30)[..10_000].to_vec();
        store.replicate(0, &old).unwrap();
        let short = Duration::from_millis(300);

        // The master lost its tail and has since grown past the slave with other bytes.
        let mut forked = old[..6_000].to_vec();
        forked.extend((0..8_000u32).map(|i| (i % 13) as u8));
        let (addr, master) = fake_master(forked.clone(), forked.len(), short).await;
        let followed = follow_once(&store, &me, &addr, Pace::default()).await;
        assert!(
            matches!(followed, Err(ReplicationError::Diverged(_))),
            "{followed:?}"
        );
        let (from, _) = master.await.unwrap();
        assert!(
            from < 6_000,
            "asked from {from}: the forked bytes would not be compared"
        );
        let mut kept = vec![0u8; 10_000];
        store.commitlog().read_into(0, &mut kept).unwrap();
        assert_eq!(kept, old, "the slave's log was changed");
        assert_eq!(store.commitlog().max_offset(), 10_000);

        // A master with only part of what the slave asked to compare (it is behind, and
        // quiet): the slave reports no more than it compared, heartbeats included.
        let listen = HEARTBEAT + Duration::from_millis(500);
        let (addr, master) = fake_master(old.clone(), 8_000, listen).await;
        let _ =
            tokio::time::timeout(listen, follow_once(&store, &me, &addr, Pace::default())).await;
        let (_, reported) = master.await.unwrap();
        assert!(!reported.is_empty(), "no heartbeat report");
        assert!(
            reported.iter().all(|&off| off <= 8_000),
            "the slave reported bytes it had not compared: {reported:?}"
        );

        // The whole range compared and equal: reported at once, not at the next heartbeat.
        let (addr, master) = fake_master(old.clone(), old.len(), short).await;
        let _ = tokio::time::timeout(short, follow_once(&store, &me, &addr, Pace::default())).await;
        let (_, reported) = master.await.unwrap();
        assert_eq!(reported.first(), Some(&10_000));

        // A master whose log continues the slave's: the rest lands after the compared bytes.
        let mut longer = old.clone();
        longer.extend([9u8; 500]);
        let (addr, master) = fake_master(longer.clone(), longer.len(), short).await;
        let _ = tokio::time::timeout(short, follow_once(&store, &me, &addr, Pace::default())).await;
        let (_, reported) = master.await.unwrap();
        assert_eq!(reported.last(), Some(&10_500));
        let mut all = vec![0u8; 10_500];
        store.commitlog().read_into(0, &mut all).unwrap();
        assert_eq!(all, longer);
        store.shutdown();
    }
}
