//! Master -> slave commit-log shipping.
//!
//! A slave connects to its master's HA port, introduces itself (brokerName and an optional
//! shared token: Java has no authentication here), then reports the end of its commit log
//! (an 8-byte big-endian offset) at connect, after the chunks of each read (at least every few
//! MiB while catching up) and every few seconds, even while a chunk is arriving. The master
//! streams `[i64 startOffset][i32 size][bytes]` chunks from that offset; an empty chunk is a
//! heartbeat. The slave appends the bytes verbatim, so its log is byte-identical to the
//! master's, and indexes the messages they complete.
//!
//! SYNC_MASTER sends wait until a slave has reported an offset at or past the message's end.

pub mod master;
pub mod slave;

use std::time::Duration;

/// Magic of the slave's hello ("FMQH").
pub const HELLO_MAGIC: u32 = 0x464D_5148;
/// Version of the HA protocol spoken here.
pub const HELLO_VERSION: u16 = 1;
/// Largest chunk the master sends at once.
pub const MAX_CHUNK: u64 = 256 * 1024;
/// How often an idle side speaks (master heartbeat, slave offset report).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which a side drops the connection (on a slave, counted from the last byte
/// received, wherever in a chunk it waits).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why replication could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed.
    #[error("replication I/O with {peer}: {source}")]
    Io {
        /// Other side.
        peer: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The other side is not who it should be.
    #[error("replication handshake refused: {0}")]
    Handshake(String),
    /// The two logs disagree; merging them would corrupt data.
    #[error("replication stopped: {0}")]
    Diverged(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A blocking read of the log for a slave died (a bug); the slave is dropped and
    /// reconnects.
    #[error("reading the commit log for a slave panicked: {0}")]
    ReadPanicked(String),
}

/// Why a SYNC_MASTER send could not be confirmed by a slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SyncWaitError {
    /// No slave is connected (or none is close enough to catch up in time).
    #[error("no slave available to replicate to")]
    NoSlave,
    /// No slave confirmed within the timeout.
    #[error("no slave confirmed the message within {0:?}")]
    Timeout(Duration),
}
