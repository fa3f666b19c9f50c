//! The slave side: follows the master's commit log, appending what it receives verbatim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
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
        if let Some(why) = store.commitlog().write_back_failure() {
            // Every replicated write would be refused: stop asking the master for them.
            tracing::error!(error = why, "replication stopped: this slave's commit log cannot be written to disk; restart it to recover");
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
            r = follow_once(&store, &me, &addr) => r,
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

async fn follow_once(
    store: &MessageStore,
    me: &SlaveIdentity,
    addr: &str,
) -> Result<(), ReplicationError> {
    let e = |source| ReplicationError::Io {
        peer: addr.to_string(),
        source,
    };
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
    let log = store.commitlog();
    let mut overlap = Overlap::new(log);
    hello.extend_from_slice(&overlap.checked.to_be_bytes());
    wr.write_all(&hello).await.map_err(e)?;
    tracing::info!(
        master = addr,
        offset = overlap.end,
        check_from = overlap.checked,
        "replicating from master"
    );

    // Buffered: a chunk header and its data usually arrive in one read, and several chunks
    // that arrived together are stored before one acknowledgement.
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    let mut last_report = Instant::now();
    loop {
        let start = match tokio::time::timeout(IDLE_TIMEOUT, rd.read_u64()).await {
            Ok(r) => r.map_err(e)?,
            Err(_) => {
                return Err(ReplicationError::Handshake(format!(
                    "master {addr} went silent"
                )))
            }
        };
        let size = rd.read_u32().await.map_err(e)? as usize;
        if size as u64 > MAX_CHUNK {
            return Err(ReplicationError::Handshake(format!(
                "master {addr} sent an oversized chunk ({size} bytes)"
            )));
        }
        rd.read_exact(&mut buf[..size]).await.map_err(e)?;
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
        }
        // Acknowledge once what has arrived is stored: a SYNC_MASTER waits for this, and one
        // acknowledgement covers every chunk of the same read. Indexing comes after, as on
        // Java's slaves, and happens even if the acknowledgement cannot be written.
        let more_buffered = !rd.buffer().is_empty();
        let mut acked = Ok(());
        if (size > 0 && !more_buffered) || check_done || last_report.elapsed() >= HEARTBEAT {
            acked = wr.write_all(&overlap.holds(log).to_be_bytes()).await;
            last_report = Instant::now();
        }
        if !more_buffered {
            store.dispatch_replicated()?;
        }
        acked.map_err(e)?;
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

#[cfg(test)]
mod tests {
    use super::super::HELLO_MAGIC;
    use super::*;
    use crate::store::{FlushDiskType, StoreConfig};
    use tokio::net::TcpListener;

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
            assert_eq!(socket.read_u32().await.unwrap(), HELLO_MAGIC);
            socket.read_u16().await.unwrap();
            for _ in 0..2 {
                let n = socket.read_u16().await.unwrap() as usize;
                socket.read_exact(&mut vec![0u8; n]).await.unwrap();
            }
            let from = socket.read_u64().await.unwrap();
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
        let old: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        store.replicate(0, &old).unwrap();
        let short = Duration::from_millis(300);

        // The master lost its tail and has since grown past the slave with other bytes.
        let mut forked = old[..6_000].to_vec();
        forked.extend((0..8_000u32).map(|i| (i % 13) as u8));
        let (addr, master) = fake_master(forked.clone(), forked.len(), short).await;
        let followed = follow_once(&store, &me, &addr).await;
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
        let _ = tokio::time::timeout(listen, follow_once(&store, &me, &addr)).await;
        let (_, reported) = master.await.unwrap();
        assert!(!reported.is_empty(), "no heartbeat report");
        assert!(
            reported.iter().all(|&off| off <= 8_000),
            "the slave reported bytes it had not compared: {reported:?}"
        );

        // The whole range compared and equal: reported at once, not at the next heartbeat.
        let (addr, master) = fake_master(old.clone(), old.len(), short).await;
        let _ = tokio::time::timeout(short, follow_once(&store, &me, &addr)).await;
        let (_, reported) = master.await.unwrap();
        assert_eq!(reported.first(), Some(&10_000));

        // A master whose log continues the slave's: the rest lands after the compared bytes.
        let mut longer = old.clone();
        longer.extend([9u8; 500]);
        let (addr, master) = fake_master(longer.clone(), longer.len(), short).await;
        let _ = tokio::time::timeout(short, follow_once(&store, &me, &addr)).await;
        let (_, reported) = master.await.unwrap();
        assert_eq!(reported.last(), Some(&10_500));
        let mut all = vec![0u8; 10_500];
        store.commitlog().read_into(0, &mut all).unwrap();
        assert_eq!(all, longer);
        store.shutdown();
    }
}
