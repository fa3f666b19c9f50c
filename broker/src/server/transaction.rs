//! Transactional messages, as Java's broker keeps them. A half message (`TRAN_MSG=true`) is
//! stored in `RMQ_SYS_TRANS_HALF_TOPIC` queue 0, its real topic and queue in its properties,
//! where no consumer sees it. The producer's END_TRANSACTION then stores the real message
//! (commit) or nothing (roll back), and records the decision as an op message in
//! `RMQ_SYS_TRANS_OP_HALF_TOPIC` (tag `d`, body: the half message's queue offset). A half
//! message still undecided after `transactionTimeOut` is copied to the end of the half queue
//! and its producer group asked about the copy (CHECK_TRANSACTION_STATE); after
//! `transactionCheckMax` questions it is set aside in `TRANS_CHECK_MAX_TIME_TOPIC`. How far
//! the checks have come is kept as the consumer offsets of group `CID_RMQ_SYS_TRANS`, so a
//! slave has it from its master.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::remoting::command::FLAG_ONEWAY;
use crate::remoting::header::{CheckTransactionStateRequestHeader, EndTransactionRequestHeader};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::store::message::{
    format_properties, offset_msg_id, parse_properties, property, NewMessage, StoredMessage,
    PROP_DELAY, PROP_TAGS, PROP_TRANSACTION_PREPARED, PROP_UNIQ_KEY, TX_COMMIT, TX_MASK,
    TX_ROLLBACK,
};
use crate::store::topics::{now_ms, PERM_READ, PERM_WRITE};
use crate::store::StoreError;

use super::schedule::{put_route, take_route};
use super::Broker;

/// Where half messages wait for their producer's decision.
pub const HALF_TOPIC: &str = "RMQ_SYS_TRANS_HALF_TOPIC";
/// Where decisions are recorded, one op message per half message decided.
pub const OP_TOPIC: &str = "RMQ_SYS_TRANS_OP_HALF_TOPIC";
/// Where half messages asked about `transactionCheckMax` times are set aside.
pub const CHECK_MAX_TOPIC: &str = "TRANS_CHECK_MAX_TIME_TOPIC";
/// The consumer group whose offsets of the half and op queues are the checks' progress.
pub const CHECK_GROUP: &str = "CID_RMQ_SYS_TRANS";
/// Property: the producer group of a transactional message.
pub const PROP_PRODUCER_GROUP: &str = "PGROUP";
/// Property: how often a half message has been asked about.
pub const PROP_CHECK_TIMES: &str = "TRANSACTION_CHECK_TIMES";
/// Property: seconds a producer asks the broker not to check its half message.
pub const PROP_CHECK_IMMUNITY_SECS: &str = "CHECK_IMMUNITY_TIME_IN_SECONDS";

/// Tag of an op message that records a decision.
const REMOVE_TAG: &str = "d";
/// Half and op messages read per batch.
const BATCH: usize = 64;

/// Whether a message's properties make it a transaction's half message.
pub fn is_half(properties: &str) -> bool {
    // The cheap test first: this runs for every message sent.
    properties.contains("TRAN_MSG\u{1}")
        && property(properties, PROP_TRANSACTION_PREPARED)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The half message to store for a transactional message: in the half queue, its real topic
/// and queue in its properties, its transaction type cleared (so it is indexed like any
/// message). A delay it asks for is dropped (Java's producers clear it): its transaction is
/// all it waits for.
pub fn half(msg: NewMessage) -> NewMessage {
    let mut props = parse_properties(&msg.properties);
    props.remove(PROP_DELAY);
    // The count of questions is the broker's to keep.
    props.remove(PROP_CHECK_TIMES);
    put_route(&mut props, &msg);
    let properties = format_properties(&props);
    NewMessage {
        topic: HALF_TOPIC.into(),
        queue_id: 0,
        tags_code: NewMessage::tags_code_of(&properties),
        properties,
        sys_flag: msg.sys_flag & !TX_MASK,
        ..msg
    }
}

/// The message a committed half message stands for, in its real topic and queue (its
/// transaction type, cleared when the half message was stored, now COMMIT); `None` when its
/// properties do not name them.
fn committed(half: &StoredMessage) -> Option<NewMessage> {
    let mut props = parse_properties(&half.properties);
    let (topic, queue_id) = take_route(&mut props)?;
    let mut msg = NewMessage::restored(half, topic, queue_id, format_properties(&props));
    msg.sys_flag |= TX_COMMIT;
    Some(msg)
}

/// The op message recording that the half message at `half_offset` was decided.
fn op(half_offset: u64, host: std::net::SocketAddr) -> NewMessage {
    let properties = format!("{PROP_TAGS}\u{1}{REMOVE_TAG}\u{2}");
    NewMessage {
        topic: OP_TOPIC.into(),
        queue_id: 0,
        flag: 0,
        body: half_offset.to_string().into_bytes().into(),
        tags_code: NewMessage::tags_code_of(&properties),
        properties,
        sys_flag: 0,
        born_timestamp: now_ms(),
        born_host: host,
        reconsume_times: 0,
    }
}

/// The half-queue offsets an op message records as decided (Java 5 joins several with `,`).
fn decided(op: &StoredMessage) -> impl Iterator<Item = u64> + '_ {
    let tagged = property(&op.properties, PROP_TAGS) == Some(REMOVE_TAG);
    std::str::from_utf8(&op.body)
        .ok()
        .filter(|_| tagged)
        .into_iter()
        .flat_map(|b| b.split(','))
        .filter_map(|o| o.trim().parse().ok())
}

/// Why an END_TRANSACTION is refused; the texts are Java's broker's remarks.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// No half message at the quoted offsets.
    #[error("Find prepared transaction message failed")]
    NotFound,
    /// The half message is another producer group's.
    #[error("The producer group wrong")]
    Group,
    /// The quoted queue offset is not the half message's.
    #[error("The transaction state table offset wrong")]
    QueueOffset,
    /// The quoted commit-log offset is not the half message's.
    #[error("The commit log offset wrong")]
    LogOffset,
    /// Neither commit (8), roll back (12) nor "not decided" (0).
    #[error("commitOrRollback field wrong")]
    Decision,
    /// The half message names no real topic and queue.
    #[error("the half message names no REAL_TOPIC/REAL_QID")]
    NoRoute,
    /// The store refused the write.
    #[error("store failed: {0}")]
    Store(#[from] StoreError),
}

/// Longest a producer's `CHECK_IMMUNITY_TIME_IN_SECONDS` holds its half message back: the
/// checks go in queue order, so it holds back every later one too.
const MAX_IMMUNITY_MS: i64 = 3_600_000;
/// Longest one round of checks runs (Java's MAX_PROCESS_TIME_LIMIT).
const ROUND_LIMIT: Duration = Duration::from_secs(60);
/// Longest a round waits for room in a producer connection's queue before it stops (and the
/// next round goes on from there).
const PUSH_WAIT: Duration = Duration::from_secs(3);

impl Broker {
    /// Handles END_TRANSACTION: commits or rolls back one half message. Producers send it
    /// oneway; what the broker answers matters only to a caller that waits.
    pub(super) fn end_transaction(&self, req: &RemotingCommand) -> Option<RemotingCommand> {
        if !self.is_master() {
            return Some(req.error_to(
                ResponseCode::SlaveNotAvailable,
                "the broker is a slave: transactions end on the master",
            ));
        }
        let h = match EndTransactionRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return Some(req.error_to(ResponseCode::SystemError, e.to_string())),
        };
        let commit = match h.commit_or_rollback {
            TX_COMMIT => Ok(true),
            TX_ROLLBACK => Ok(false),
            // Not decided yet: the checks will ask again.
            0 => {
                tracing::debug!(
                    group = %h.producer_group,
                    from_check = h.from_transaction_check.unwrap_or(false),
                    "transaction not decided by its producer"
                );
                return None;
            }
            _ => Err(EndError::Decision),
        };
        Some(match commit.and_then(|commit| self.decide(&h, commit)) {
            Ok(()) => req.response_to(ResponseCode::Success),
            Err(e) => {
                tracing::warn!(
                    group = %h.producer_group,
                    offset = h.commit_log_offset,
                    queue_offset = h.tran_state_table_offset,
                    msg_id = h.msg_id.as_deref().unwrap_or(""),
                    decision = h.commit_or_rollback,
                    error = %e,
                    "END_TRANSACTION refused"
                );
                req.error_to(ResponseCode::SystemError, e.to_string())
            }
        })
    }

    /// Stores a half message's real message (commit) and the op message that records the
    /// decision, in that order in one append: a crash never keeps the op without the message.
    fn decide(&self, h: &EndTransactionRequestHeader, commit: bool) -> Result<(), EndError> {
        let at = u64::try_from(h.commit_log_offset).map_err(|_| EndError::NotFound)?;
        let half = self
            .store
            .commitlog()
            .read_message(at)
            .ok()
            .filter(|m| m.topic == HALF_TOPIC)
            .ok_or(EndError::NotFound)?;
        if property(&half.properties, PROP_PRODUCER_GROUP) != Some(h.producer_group.as_str()) {
            return Err(EndError::Group);
        }
        let queue_offset = u64::try_from(half.queue_offset)
            .ok()
            .filter(|_| half.queue_offset == h.tran_state_table_offset)
            .ok_or(EndError::QueueOffset)?;
        // The half queue must say so too: an offset that merely decodes as a half message
        // (one written inside another message's body) is not one.
        let indexed = self
            .store
            .queue(HALF_TOPIC, 0)
            .and_then(|q| q.get(queue_offset, 1).ok())
            .and_then(|e| e.first().map(|e| e.offset));
        if indexed != Some(at) {
            return Err(EndError::LogOffset);
        }
        let done = op(queue_offset, self.store.config().store_host);
        let mut msgs = Vec::with_capacity(2);
        if commit {
            // TRAN_MSG stays, as Java's broker leaves it: Java consumers read it to fill in a
            // delivered message's transaction id.
            let msg = committed(&half).ok_or(EndError::NoRoute)?;
            if self.store.topics.get(&msg.topic).is_some() {
                // A timer (checked when the half message was sent) runs from the commit, as
                // in Java; one no longer acceptable now (timers turned off) is delivered at
                // once.
                let msg = match super::timer::timing_now(&msg.properties, &self.cfg().timer) {
                    Ok(super::timer::Timing::At(at)) => super::timer::wrap(msg, at),
                    Ok(_) => msg,
                    Err(e) => {
                        tracing::warn!(topic = %msg.topic, error = %e, "a committed message's timer is ignored");
                        msg
                    }
                };
                msgs.push(msg);
            } else {
                // Deleted since: storing it would bring back queues no topic owns.
                tracing::warn!(topic = %msg.topic, "a committed transaction's topic is gone: message dropped");
            }
        }
        msgs.push(done);
        self.store.append(&msgs)?;
        Ok(())
    }

    /// One round of checks: asks the producers of half messages older than
    /// `transactionTimeOut` and still undecided how their transactions ended, and sets aside
    /// those asked `transactionCheckMax` times. Returns how many were asked.
    ///
    /// Each one asked about is first copied to the end of the half queue, with its count of
    /// questions, and the question names the copy: an answer that never comes leaves the
    /// copy to be asked about again. The progress is saved only once what it passes over
    /// (copies, decisions) is durable.
    pub(super) async fn check_transactions(&self) -> Result<usize, StoreError> {
        let Some(halves) = self.store.queue(HALF_TOPIC, 0) else {
            return Ok(0);
        };
        let started = now_ms();
        let deadline = Instant::now() + ROUND_LIMIT;
        // Copies made in this round lie past it: they wait for the next.
        let end = halves.max_offset();
        let offsets = &self.store.offsets;
        // This process's own progress first: saved offsets lag it when a round could not make
        // what it passed durable, and starting from them would ask the same questions again.
        let held = *self.tx_progress.lock().unwrap_or_else(|p| p.into_inner());
        let progress = |topic: &str, mine: Option<u64>, min: u64, max: u64| {
            let saved = mine
                .unwrap_or_else(|| offsets.get(CHECK_GROUP, topic, 0).unwrap_or(0).max(0) as u64);
            saved.max(min).min(max)
        };
        let first = progress(HALF_TOPIC, held.map(|p| p.0), halves.min_offset(), end);
        // Decisions on half messages not yet passed: half offset to op offset.
        let mut ops = self.store.queue(OP_TOPIC, 0);
        let op_from = ops.as_ref().map_or(0, |q| {
            progress(OP_TOPIC, held.map(|p| p.1), q.min_offset(), q.max_offset())
        });
        let mut done = BTreeMap::new();
        let mut op_end = op_from;
        if let Some(ops) = &ops {
            op_end = self.decisions(ops, op_from, first, &mut done)?;
        }
        let mut next = first;
        let mut asked = 0;
        let mut unasked: BTreeMap<String, usize> = BTreeMap::new();
        let result = 'scan: loop {
            if next >= end || Instant::now() >= deadline {
                break Ok(());
            }
            let entries = match halves.get(next, BATCH.min((end - next) as usize)) {
                Ok(e) if e.is_empty() => break Ok(()),
                Ok(e) => e,
                Err(e) => break Err(e),
            };
            for e in entries {
                // Decisions that came in since the round began (a slow local transaction)
                // count too: asking now would get the message committed twice.
                // (Also the first decision ever, when there was no op queue yet.)
                if ops.is_none() {
                    ops = self.store.queue(OP_TOPIC, 0);
                }
                if let Some(ops) = ops.as_ref().filter(|q| q.max_offset() > op_end) {
                    match self.decisions(ops, op_end, first, &mut done) {
                        Ok(at) => op_end = at,
                        Err(err) => break 'scan Err(err),
                    }
                }
                if done.remove(&next).is_some() {
                    next += 1;
                    continue;
                }
                let m = match self.store.commitlog().read_message(e.offset) {
                    Ok(m) => m,
                    Err(err @ (StoreError::Corrupt(_) | StoreError::OutOfRange { .. })) => {
                        tracing::error!(queue_offset = next, offset = e.offset, error = %err,
                            "a half message cannot be read and is passed over");
                        next += 1;
                        continue;
                    }
                    Err(err) => break 'scan Err(err),
                };
                let times: u32 = property(&m.properties, PROP_CHECK_TIMES)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                if times >= self.cfg().transaction_check_max {
                    if let Err(err) = self.set_aside(&m) {
                        break 'scan Err(err);
                    }
                    next += 1;
                    continue;
                }
                // A copy was asked about in an earlier round: it is due in any later one. A
                // half message is due by its store time (the producer's clock may be off), at
                // the latest after the longest immunity allowed.
                if times == 0 {
                    let wait = property(&m.properties, PROP_CHECK_IMMUNITY_SECS)
                        .and_then(|s| s.parse::<i64>().ok())
                        .map_or(0, |s| s.saturating_mul(1000).min(MAX_IMMUNITY_MS))
                        .max(self.cfg().transaction_timeout_ms as i64);
                    if (0..wait).contains(&(started - m.store_timestamp)) {
                        // Later half messages were stored later still.
                        break 'scan Ok(());
                    }
                }
                let group = property(&m.properties, PROP_PRODUCER_GROUP).unwrap_or("");
                // Room in the producer's queue first: a question that cannot be sent must not
                // be counted as asked.
                let permit = match self.producers.channel(group) {
                    Some(p) => {
                        match tokio::time::timeout(PUSH_WAIT, p.link.push.reserve_owned()).await {
                            Ok(Ok(permit)) => Some(permit),
                            // Gone meanwhile: asked in a later round, like any producer offline.
                            Ok(Err(_)) => None,
                            // Too busy to take questions now: the next round goes on from here.
                            Err(_) => break 'scan Ok(()),
                        }
                    }
                    None => None,
                };
                let mut props = parse_properties(&m.properties);
                props.insert(PROP_CHECK_TIMES.into(), (times + 1).to_string());
                let again =
                    NewMessage::restored(&m, HALF_TOPIC.into(), 0, format_properties(&props));
                let placed = match self.store.append(std::slice::from_ref(&again)) {
                    Ok(r) => r,
                    // One more question's count does not fit (a message at the properties'
                    // limit): it could never be asked about, and would stop every round here.
                    Err(
                        StoreError::PropertiesTooLong { .. } | StoreError::MessageTooLarge { .. },
                    ) => {
                        if let Err(err) = self.set_aside(&m) {
                            break 'scan Err(err);
                        }
                        next += 1;
                        continue;
                    }
                    Err(err) => break 'scan Err(err),
                };
                next += 1;
                match (permit, placed.first()) {
                    (Some(permit), Some(r)) => {
                        permit.send(self.check_request(&again, r.queue_offset, r.physical_offset));
                        asked += 1;
                    }
                    _ => *unasked.entry(group.to_string()).or_default() += 1,
                }
            }
            // Other tasks of the runtime run between batches.
            tokio::task::yield_now().await;
        };
        for (group, n) in unasked {
            tracing::info!(
                group,
                half_messages = n,
                "no producer of the group online to ask about its transactions"
            );
        }
        // Op messages of halves not yet passed stay ahead of the progress.
        let op_next = done.values().min().copied().unwrap_or(op_end);
        *self.tx_progress.lock().unwrap_or_else(|p| p.into_inner()) = Some((next, op_next));
        let saved = |topic| offsets.get(CHECK_GROUP, topic, 0);
        if saved(HALF_TOPIC) != Some(next as i64)
            || (ops.is_some() && saved(OP_TOPIC) != Some(op_next as i64))
        {
            // Whatever this round passed over (copies, decisions, set-aside messages) must
            // outlive a crash before the progress that passes it is saved.
            self.store
                .wait_durable(self.store.commitlog().max_offset())
                .await?;
            offsets.commit(CHECK_GROUP, HALF_TOPIC, 0, next as i64);
            if ops.is_some() {
                offsets.commit(CHECK_GROUP, OP_TOPIC, 0, op_next as i64);
            }
        }
        result.map(|()| asked)
    }

    /// Adds to `done` the decisions recorded in the op queue from `from` on for half messages
    /// at or past `first` (half offset to op offset); returns where the op queue ends. An op
    /// message that cannot be read for any other reason than damage stops the reading there.
    fn decisions(
        &self,
        ops: &crate::store::consume_queue::ConsumeQueue,
        from: u64,
        first: u64,
        done: &mut BTreeMap<u64, u64>,
    ) -> Result<u64, StoreError> {
        let mut at = from;
        loop {
            let entries = ops.get(at, BATCH)?;
            if entries.is_empty() {
                return Ok(at);
            }
            for e in entries {
                match self.store.commitlog().read_message(e.offset) {
                    Ok(m) => done.extend(decided(&m).filter(|&h| h >= first).map(|h| (h, at))),
                    Err(err @ (StoreError::Corrupt(_) | StoreError::OutOfRange { .. })) => {
                        tracing::error!(op_offset = at, error = %err, "an op message cannot be read and is passed over");
                    }
                    Err(err) => return Err(err),
                }
                at += 1;
            }
        }
    }

    /// CHECK_TRANSACTION_STATE about a half message's copy `again`, stored at `queue_offset`
    /// and `offset` (oneway, as Java's broker sends it); the body is the message as the
    /// producer sent it, in its real topic and queue.
    fn check_request(&self, again: &NewMessage, queue_offset: u64, offset: u64) -> RemotingCommand {
        let host = self.store.config().store_host;
        let mut body = BytesMut::new();
        let mut msg = again.clone();
        if let Some((topic, queue_id)) = take_route(&mut parse_properties(&again.properties)) {
            (msg.topic, msg.queue_id) = (topic, queue_id);
        }
        msg.encode(
            &mut body,
            queue_offset as i64,
            offset as i64,
            now_ms(),
            &host,
        );
        let uniq = property(&again.properties, PROP_UNIQ_KEY).map(str::to_string);
        let header = CheckTransactionStateRequestHeader {
            tran_state_table_offset: queue_offset as i64,
            commit_log_offset: offset as i64,
            msg_id: uniq.clone(),
            transaction_id: uniq,
            offset_msg_id: Some(offset_msg_id(&host, offset as i64)),
        };
        let mut cmd =
            RemotingCommand::request(RequestCode::CheckTransactionState.code(), header.to_ext())
                .with_body(body.freeze());
        cmd.flag |= FLAG_ONEWAY;
        cmd
    }

    /// Stores a half message asked about too often in `TRANS_CHECK_MAX_TIME_TOPIC`, where it
    /// is never delivered or asked about again (an operator can read it there).
    fn set_aside(&self, m: &StoredMessage) -> Result<(), StoreError> {
        if let Err(e) = self.ensure_topic(CHECK_MAX_TOPIC, 1, PERM_READ | PERM_WRITE) {
            tracing::warn!(topic = CHECK_MAX_TOPIC, error = %e, "cannot create the topic");
        }
        tracing::warn!(
            group = property(&m.properties, PROP_PRODUCER_GROUP).unwrap_or(""),
            msg_id = property(&m.properties, PROP_UNIQ_KEY).unwrap_or(""),
            topic = CHECK_MAX_TOPIC,
            "transaction never decided by its producer: half message set aside"
        );
        let aside = NewMessage::restored(m, CHECK_MAX_TOPIC.into(), 0, m.properties.clone());
        self.store.append(&[aside]).map(drop)
    }
}
