//! Queue locks for orderly consumption (LOCK_BATCH_MQ, UNLOCK_BATCH_MQ), kept as Java's
//! `RebalanceLockManager` keeps them. Orderly consumers (Java's `MessageListenerOrderly`, Go's
//! `ConsumeOrderly`) take a queue only once its lock here is theirs, and renew it every 20 s:
//! per consumer group and queue one client holds the lock, locking again renews it, and a lock
//! not renewed for `rebalanceLockMaxLiveTime` may be taken by another client (its holder died).
//!
//! As in Java, neither a disconnect nor UNREGISTER_CLIENT releases a lock: a shutting-down
//! consumer unlocks its queues itself (synchronously) before it unregisters, and a crashed one's
//! locks expire. Unlike Java, expired locks are dropped (when their group is next locked, and by
//! the broker's chores every second), so the table stays as small as the locks in use.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::remoting::body::{
    from_json, to_json, LockBatchResponseBody, MessageQueue, QueueLockRequestBody,
};
use crate::remoting::{RemotingCommand, ResponseCode};

use super::Broker;

/// Why a LOCK_BATCH_MQ or UNLOCK_BATCH_MQ body was refused.
#[derive(Debug, thiserror::Error)]
pub enum LockRequestError {
    /// Not the JSON Java's clients send.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A field every request needs is absent or empty.
    #[error("{0} is missing or empty")]
    Missing(&'static str),
}

/// The client holding one queue's lock, and when it last locked it.
#[derive(Debug)]
struct Holder {
    client_id: String,
    renewed: Instant,
}

/// Which client holds which queue of which consumer group; owned by the broker.
#[derive(Debug)]
pub struct QueueLocks {
    max_live: Duration,
    groups: Mutex<HashMap<String, HashMap<MessageQueue, Holder>>>,
}

impl QueueLocks {
    /// An empty table whose locks expire `max_live` after their last renewal.
    pub fn new(max_live: Duration) -> Self {
        QueueLocks {
            max_live,
            groups: Mutex::default(),
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, HashMap<MessageQueue, Holder>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self, h: &Holder, now: Instant) -> bool {
        now.saturating_duration_since(h.renewed) > self.max_live
    }

    /// Locks for `client_id` the `queues` of `group` that no other client holds (or whose lock
    /// expired), renews those it holds, and returns every queue of `queues` it now holds.
    pub fn lock(
        &self,
        group: &str,
        client_id: &str,
        queues: &[MessageQueue],
        now: Instant,
    ) -> Vec<MessageQueue> {
        // A set on the wire: each queue once, whatever the client sent.
        let mut queues = queues.to_vec();
        queues.sort();
        queues.dedup();
        let mut groups = self.table();
        let table = groups.entry(group.to_string()).or_default();
        let mut locked = Vec::with_capacity(queues.len());
        for q in queues {
            match table.get_mut(&q) {
                Some(h) if h.client_id == client_id => h.renewed = now,
                Some(h) if self.expired(h, now) => {
                    tracing::info!(
                        group, queue = ?q, old = %h.client_id, new = client_id,
                        "queue lock expired: another client takes it"
                    );
                    h.client_id = client_id.to_string();
                    h.renewed = now;
                }
                Some(h) => {
                    tracing::debug!(
                        group, queue = ?q, holder = %h.client_id, client = client_id,
                        "queue locked by another client"
                    );
                    continue;
                }
                None => {
                    tracing::debug!(group, queue = ?q, client = client_id, "queue locked");
                    let holder = Holder {
                        client_id: client_id.to_string(),
                        renewed: now,
                    };
                    table.insert(q.clone(), holder);
                }
            }
            locked.push(q);
        }
        table.retain(|_, h| !self.expired(h, now));
        if table.is_empty() {
            groups.remove(group);
        }
        locked
    }

    /// Releases the `queues` of `group` that `client_id` holds (expired or not); other
    /// clients' locks stay. Returns how many were released.
    pub fn unlock(&self, group: &str, client_id: &str, queues: &[MessageQueue]) -> usize {
        let mut groups = self.table();
        let Some(table) = groups.get_mut(group) else {
            return 0;
        };
        let mut released = 0;
        for q in queues {
            match table.get(q) {
                Some(h) if h.client_id == client_id => {
                    table.remove(q);
                    released += 1;
                    tracing::debug!(group, queue = ?q, client = client_id, "queue unlocked");
                }
                Some(h) => tracing::debug!(
                    group, queue = ?q, holder = %h.client_id, client = client_id,
                    "unlock of a queue another client holds ignored"
                ),
                None => {}
            }
        }
        if table.is_empty() {
            groups.remove(group);
        }
        released
    }

    /// Drops locks not renewed within the live time, and groups left without any.
    pub fn expire(&self, now: Instant) {
        let mut groups = self.table();
        for table in groups.values_mut() {
            table.retain(|_, h| !self.expired(h, now));
        }
        groups.retain(|_, t| !t.is_empty());
    }

    /// Locks in the table, expired ones not yet dropped included.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.table().values().map(HashMap::len).sum()
    }
}

/// A lock or unlock body, checked for what every request needs.
fn parse(body: &[u8]) -> Result<QueueLockRequestBody, LockRequestError> {
    let b: QueueLockRequestBody = from_json(body)?;
    if b.consumer_group.is_empty() {
        return Err(LockRequestError::Missing("consumerGroup"));
    }
    if b.client_id.is_empty() {
        return Err(LockRequestError::Missing("clientId"));
    }
    Ok(b)
}

/// The SYSTEM_ERROR answer to a body that could not be used.
fn refuse(req: &RemotingCommand, what: &str, e: &LockRequestError) -> RemotingCommand {
    tracing::warn!(code = req.code, error = %e, "bad {what} body");
    req.error_to(
        ResponseCode::SystemError,
        format!(
            "bad {what} body: {e} (expected consumerGroup, clientId and mqSet: \
             [{{topic, brokerName, queueId}}])"
        ),
    )
}

impl Broker {
    /// Handles LOCK_BATCH_MQ at time `now`: answers the queues the client holds afterwards.
    pub(super) fn lock_batch(&self, req: &RemotingCommand, now: Instant) -> RemotingCommand {
        let body = match parse(&req.body) {
            Ok(b) => b,
            Err(e) => return refuse(req, "LOCK_BATCH_MQ", &e),
        };
        let locked = self
            .locks
            .lock(&body.consumer_group, &body.client_id, &body.mq_set, now);
        req.response_to(ResponseCode::Success)
            .with_body(to_json(&LockBatchResponseBody {
                lock_ok_mq_set: locked,
            }))
    }

    /// Handles UNLOCK_BATCH_MQ (sent oneway or not; the connection drops oneway answers).
    pub(super) fn unlock_batch(&self, req: &RemotingCommand) -> RemotingCommand {
        match parse(&req.body) {
            Ok(b) => {
                self.locks
                    .unlock(&b.consumer_group, &b.client_id, &b.mq_set);
                req.response_to(ResponseCode::Success)
            }
            Err(e) => refuse(req, "UNLOCK_BATCH_MQ", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: Duration = Duration::from_secs(60);

    fn q(id: i32) -> MessageQueue {
        MessageQueue {
            topic: "T".into(),
            broker_name: "broker-a".into(),
            queue_id: id,
        }
    }

    #[test]
    fn a_lock_lives_for_its_live_time_after_its_last_renewal() {
        let locks = QueueLocks::new(LIVE);
        let t0 = Instant::now();
        assert_eq!(locks.lock("G", "a", &[q(0)], t0), [q(0)]);
        // Renewed at 50 s: still a's at 50 s + 60 s, another's just after.
        assert_eq!(
            locks.lock("G", "a", &[q(0)], t0 + Duration::from_secs(50)),
            [q(0)]
        );
        let renewed = t0 + Duration::from_secs(50);
        assert!(locks.lock("G", "b", &[q(0)], renewed + LIVE).is_empty());
        let later = renewed + LIVE + Duration::from_millis(1);
        assert_eq!(locks.lock("G", "b", &[q(0)], later), [q(0)]);
        assert!(locks.lock("G", "a", &[q(0)], later).is_empty());
    }

    #[test]
    fn groups_lock_independently_and_a_batch_gets_what_is_free() {
        let locks = QueueLocks::new(LIVE);
        let now = Instant::now();
        assert_eq!(locks.lock("G", "a", &[q(0), q(1)], now), [q(0), q(1)]);
        // Another group's lock on the same queue is another lock.
        assert_eq!(locks.lock("H", "b", &[q(0)], now), [q(0)]);
        // Each queue once, in any order: only the free one is b's.
        assert_eq!(locks.lock("G", "b", &[q(2), q(1), q(2)], now), [q(2)]);
        assert_eq!(locks.count(), 4);
    }

    #[test]
    fn only_the_holder_unlocks_and_empty_groups_are_dropped() {
        let locks = QueueLocks::new(LIVE);
        let now = Instant::now();
        locks.lock("G", "a", &[q(0), q(1)], now);
        assert_eq!(locks.unlock("G", "b", &[q(0), q(1)]), 0);
        assert_eq!(locks.unlock("G", "a", &[q(0), q(7)]), 1);
        assert_eq!(locks.lock("G", "b", &[q(0), q(1)], now), [q(0)]);
        assert_eq!(locks.unlock("G", "a", &[q(1)]), 1);
        assert_eq!(locks.unlock("G", "b", &[q(0)]), 1);
        assert!(locks.table().is_empty());
        assert_eq!(locks.unlock("nobody", "a", &[q(0)]), 0);
    }

    #[test]
    fn expired_locks_are_dropped_by_the_sweep_and_when_their_group_is_locked() {
        let locks = QueueLocks::new(LIVE);
        let t0 = Instant::now();
        locks.lock("G", "a", &[q(0), q(1)], t0);
        locks.lock("H", "a", &[q(0)], t0);
        let later = t0 + LIVE + Duration::from_secs(1);
        locks.lock("G", "b", &[q(2)], later);
        assert_eq!(locks.count(), 2, "G's expired locks stayed");
        locks.expire(later);
        assert_eq!(locks.count(), 1, "H's expired lock stayed");
        assert!(!locks.table().contains_key("H"));
        locks.expire(later + LIVE + Duration::from_secs(1));
        assert!(locks.table().is_empty());
    }

    #[test]
    fn bodies_without_group_or_client_are_refused() {
        let ok = br#"{"consumerGroup":"G","clientId":"c","mqSet":[]}"#;
        assert!(parse(ok).is_ok());
        for (body, missing) in [
            (&br#"{"clientId":"c","mqSet":[]}"#[..], "consumerGroup"),
            (
                br#"{"consumerGroup":"G","clientId":"","mqSet":[]}"#,
                "clientId",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.to_string().contains(missing), "{e}");
        }
        assert!(matches!(parse(b""), Err(LockRequestError::Json(_))));
    }
}
