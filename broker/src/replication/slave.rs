//! The slave side: follows the master's commit log, appending what it receives verbatim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ReplicationError, HEARTBEAT, HELLO_MAGIC, HELLO_VERSION, IDLE_TIMEOUT, MAX_CHUNK};
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
    hello.extend_from_slice(&log.max_offset().to_be_bytes());
    wr.write_all(&hello).await.map_err(e)?;
    tracing::info!(
        master = addr,
        offset = log.max_offset(),
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
            store.replicate(start, &buf[..size])?;
        }
        // Acknowledge once what has arrived is stored: a SYNC_MASTER waits for this, and one
        // acknowledgement covers every chunk of the same read. Indexing comes after, as on
        // Java's slaves, and happens even if the acknowledgement cannot be written.
        let more_buffered = !rd.buffer().is_empty();
        let mut acked = Ok(());
        if (size > 0 && !more_buffered) || last_report.elapsed() >= HEARTBEAT {
            acked = wr.write_all(&log.max_offset().to_be_bytes()).await;
            last_report = Instant::now();
        }
        if !more_buffered {
            store.dispatch_replicated()?;
        }
        acked.map_err(e)?;
    }
}

#[cfg(test)]
mod tests {
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
}
