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

use bytes::BytesMut;

use crate::remoting::command::FLAG_ONEWAY;
use crate::remoting::header::{CheckTransactionStateRequestHeader, EndTransactionRequestHeader};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::store::message::{
    format_properties, offset_msg_id, parse_properties, property, NewMessage, StoredMessage,
    PROP_TAGS, PROP_TRANSACTION_PREPARED, PROP_UNIQ_KEY,
};
use crate::store::topics::{now_ms, PERM_READ, PERM_WRITE};
use crate::store::{PutResult, StoreError};

use super::schedule::{PROP_REAL_QID, PROP_REAL_TOPIC};
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

/// sysFlag bits of the transaction type, and its values (Java's MessageSysFlag).
const TX_MASK: i32 = 0xC;
const TX_COMMIT: i32 = 0x8;
const TX_ROLLBACK: i32 = 0xC;
/// Tag of an op message that records a decision.
const REMOVE_TAG: &str = "d";
/// Half and op messages read per batch.
const BATCH: u64 = 64;

/// Whether a message's properties make it a transaction's half message.
pub fn is_half(properties: &str) -> bool {
    // The cheap test first: this runs for every message sent.
    properties.contains("TRAN_MSG\u{1}")
        && property(properties, PROP_TRANSACTION_PREPARED)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The half message to store for a transactional message: in the half queue, its real topic
/// and queue in its properties, its transaction type cleared (so it is indexed like any
/// message).
pub fn half(msg: NewMessage) -> NewMessage {
    let mut props = parse_properties(&msg.properties);
    props.insert(PROP_REAL_TOPIC.into(), msg.topic.clone());
    props.insert(PROP_REAL_QID.into(), msg.queue_id.to_string());
    NewMessage {
        topic: HALF_TOPIC.into(),
        queue_id: 0,
        properties: format_properties(&props),
        sys_flag: msg.sys_flag & !TX_MASK,
        ..msg
    }
}

/// The message a half message (or a copy of one) stands for, in its real topic and queue,
/// with transaction type `tx_type`; `None` when its properties do not name them.
/// `keep_route` leaves REAL_TOPIC/REAL_QID in its properties.
fn real(half: NewMessage, tx_type: i32, keep_route: bool) -> Option<NewMessage> {
    let mut props = parse_properties(&half.properties);
    let topic = props.get(PROP_REAL_TOPIC)?.clone();
    let queue_id = props.get(PROP_REAL_QID)?.parse().ok()?;
    if !keep_route {
        props.remove(PROP_REAL_TOPIC);
        props.remove(PROP_REAL_QID);
    }
    let properties = format_properties(&props);
    Some(NewMessage {
        topic,
        queue_id,
        tags_code: NewMessage::tags_code_of(&properties),
        properties,
        sys_flag: (half.sys_flag & !TX_MASK) | tx_type,
        ..half
    })
}

/// A copy of a stored message for another queue of the broker's own topics.
fn copy(m: &StoredMessage, topic: &str, properties: String) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        queue_id: 0,
        flag: m.flag,
        body: m.body.clone(),
        tags_code: NewMessage::tags_code_of(&properties),
        properties,
        sys_flag: m.sys_flag,
        born_timestamp: m.born_timestamp,
        born_host: m.born_host,
        reconsume_times: m.reconsume_times,
    }
}

/// The op message recording that the half message at `half_offset` was decided.
fn op(half_offset: u64, host: std::net::SocketAddr) -> NewMessage {
    let mut props = crate::store::message::Properties::new();
    props.insert(PROP_TAGS.into(), REMOVE_TAG.into());
    let properties = format_properties(&props);
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
            TX_COMMIT => true,
            TX_ROLLBACK => false,
            // Not decided yet (or not a value at all): the checks will ask again.
            other => {
                tracing::debug!(
                    group = %h.producer_group,
                    value = other,
                    from_check = h.from_transaction_check.unwrap_or(false),
                    "transaction not decided by its producer"
                );
                return None;
            }
        };
        Some(match self.decide(&h, commit) {
            Ok(()) => req.response_to(ResponseCode::Success),
            Err(remark) => {
                tracing::warn!(
                    group = %h.producer_group,
                    offset = h.commit_log_offset,
                    msg_id = h.msg_id.as_deref().unwrap_or(""),
                    commit,
                    error = %remark,
                    "END_TRANSACTION refused"
                );
                req.error_to(ResponseCode::SystemError, remark)
            }
        })
    }

    /// Stores a half message's real message (commit) and the op message that records the
    /// decision, in that order in one append: a crash never keeps the op without the message.
    fn decide(&self, h: &EndTransactionRequestHeader, commit: bool) -> Result<(), String> {
        let half = u64::try_from(h.commit_log_offset)
            .ok()
            .and_then(|o| self.store.commitlog().read_message(o).ok())
            .filter(|m| m.topic == HALF_TOPIC)
            .ok_or("Find prepared transaction message failed")?;
        if property(&half.properties, PROP_PRODUCER_GROUP) != Some(h.producer_group.as_str()) {
            return Err("The producer group wrong".into());
        }
        if half.queue_offset != h.tran_state_table_offset {
            return Err("The transaction state table offset wrong".into());
        }
        let host = self.store.config().store_host;
        let done = op(half.queue_offset as u64, host);
        let msgs = if commit {
            // TRAN_MSG stays, as Java's broker leaves it: Java consumers read it to fill in a
            // delivered message's transaction id.
            let msg = real(
                copy(&half, HALF_TOPIC, half.properties.clone()),
                TX_COMMIT,
                false,
            )
            .ok_or("the half message names no REAL_TOPIC/REAL_QID")?;
            vec![msg, done]
        } else {
            vec![done]
        };
        self.store
            .append(&msgs)
            .map(drop)
            .map_err(|e| format!("store failed: {e}"))
    }

    /// One round of checks: asks the producers of half messages older than
    /// `transactionTimeOut` and still undecided how their transactions ended, and sets aside
    /// those asked `transactionCheckMax` times. Returns how many were asked.
    ///
    /// Each one asked about is first copied to the end of the half queue, with its count of
    /// questions, and the question names the copy: an answer that never comes leaves the
    /// copy to be asked about again. The progress is saved only once the copies are durable.
    pub(super) async fn check_transactions(&self) -> Result<usize, StoreError> {
        let Some(halves) = self.store.queue(HALF_TOPIC, 0) else {
            return Ok(0);
        };
        let started = now_ms();
        let offsets = &self.store.offsets;
        let progress = |topic: &str, min: u64, max: u64| {
            let saved = offsets.get(CHECK_GROUP, topic, 0).unwrap_or(0).max(0) as u64;
            saved.clamp(min, max)
        };
        let first = progress(HALF_TOPIC, halves.min_offset(), halves.max_offset());
        // Decisions not yet passed by the checks: half offset to op offset.
        let mut done: BTreeMap<u64, u64> = BTreeMap::new();
        let ops = self.store.queue(OP_TOPIC, 0);
        let mut op_end = 0;
        if let Some(ops) = &ops {
            let mut at = progress(OP_TOPIC, ops.min_offset(), ops.max_offset());
            loop {
                let entries = ops.get(at, BATCH as usize)?;
                if entries.is_empty() {
                    break;
                }
                for e in entries {
                    if let Ok(m) = self.store.commitlog().read_message(e.offset) {
                        done.extend(decided(&m).filter(|&h| h >= first).map(|h| (h, at)));
                    }
                    at += 1;
                }
            }
            op_end = at;
        }
        let cfg = &self.cfg;
        let mut next = first;
        let mut asked = 0;
        let mut appended = false;
        let result = 'scan: loop {
            let entries = match halves.get(next, BATCH as usize) {
                Ok(e) if e.is_empty() => break Ok(()),
                Ok(e) => e,
                Err(e) => break Err(e),
            };
            for e in entries {
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
                // A copy made in this round (or a half message newer than the round).
                if m.store_timestamp >= started {
                    break 'scan Ok(());
                }
                let times: u32 = property(&m.properties, PROP_CHECK_TIMES)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                if times >= cfg.transaction_check_max {
                    if let Err(err) = self.set_aside(&m) {
                        break 'scan Err(err);
                    }
                    appended = true;
                    next += 1;
                    continue;
                }
                // A producer's immunity only lengthens the wait (as Java 5 floors it).
                let wait = property(&m.properties, PROP_CHECK_IMMUNITY_SECS)
                    .and_then(|s| s.parse::<i64>().ok())
                    .map_or(0, |s| s.saturating_mul(1000))
                    .max(cfg.transaction_timeout_ms as i64);
                let age = started - m.born_timestamp;
                if (0..wait).contains(&age) {
                    // Later half messages are younger still (copies keep their birth time,
                    // but are asked about at most once per round).
                    break 'scan Ok(());
                }
                let mut props = parse_properties(&m.properties);
                props.insert(PROP_CHECK_TIMES.into(), (times + 1).to_string());
                let again = copy(&m, HALF_TOPIC, format_properties(&props));
                let placed = match self.store.append(std::slice::from_ref(&again)) {
                    Ok(r) => r,
                    Err(err) => break 'scan Err(err),
                };
                appended = true;
                if let Some(r) = placed.first() {
                    self.ask_producer(&again, r);
                    asked += 1;
                }
                next += 1;
            }
        };
        if appended {
            self.store
                .wait_durable(self.store.commitlog().max_offset())
                .await?;
        }
        offsets.commit(CHECK_GROUP, HALF_TOPIC, 0, next as i64);
        if ops.is_some() {
            // Op messages of halves not yet passed stay ahead of the progress.
            let op_next = done.values().min().copied().unwrap_or(op_end);
            offsets.commit(CHECK_GROUP, OP_TOPIC, 0, op_next as i64);
        }
        result.map(|()| asked)
    }

    /// Sends CHECK_TRANSACTION_STATE about a half message's copy `again`, stored as `placed`,
    /// to one producer of its group (oneway, as Java's broker). No producer online: the copy
    /// is asked about in a later round.
    fn ask_producer(&self, again: &NewMessage, placed: &PutResult) {
        let Some(group) = property(&again.properties, PROP_PRODUCER_GROUP) else {
            tracing::warn!(
                offset = placed.physical_offset,
                "a half message names no producer group (PGROUP)"
            );
            return;
        };
        let Some(producer) = self.producers.channel(group) else {
            tracing::info!(
                group,
                "no producer of the group online to ask about its transaction"
            );
            return;
        };
        let host = self.store.config().store_host;
        // The body is the message as the producer sent it: its real topic and queue.
        let Some(msg) = real(again.clone(), again.sys_flag & TX_MASK, true) else {
            tracing::warn!(group, "a half message names no REAL_TOPIC/REAL_QID");
            return;
        };
        let mut body = BytesMut::new();
        msg.encode(
            &mut body,
            placed.queue_offset as i64,
            placed.physical_offset as i64,
            now_ms(),
            &host,
        );
        let uniq = property(&again.properties, PROP_UNIQ_KEY).map(str::to_string);
        let header = CheckTransactionStateRequestHeader {
            tran_state_table_offset: placed.queue_offset as i64,
            commit_log_offset: placed.physical_offset as i64,
            msg_id: uniq.clone(),
            transaction_id: uniq,
            offset_msg_id: Some(offset_msg_id(&host, placed.physical_offset as i64)),
        };
        let mut cmd =
            RemotingCommand::request(RequestCode::CheckTransactionState.code(), header.to_ext())
                .with_body(body.freeze());
        cmd.flag |= FLAG_ONEWAY;
        if producer.push.try_send(cmd).is_err() {
            tracing::info!(group, producer = %producer.addr, "producer busy or gone: asked again later");
        }
    }

    /// Stores a half message asked about too often in `TRANS_CHECK_MAX_TIME_TOPIC`, where it
    /// is never delivered or asked about again (an operator can read it there).
    fn set_aside(&self, m: &StoredMessage) -> Result<(), StoreError> {
        if let Err(e) = self.ensure_topic(CHECK_MAX_TOPIC, 1, PERM_READ | PERM_WRITE) {
            tracing::warn!(error = %e, "cannot create {CHECK_MAX_TOPIC}");
        }
        tracing::warn!(
            group = property(&m.properties, PROP_PRODUCER_GROUP).unwrap_or(""),
            msg_id = property(&m.properties, PROP_UNIQ_KEY).unwrap_or(""),
            "transaction never decided by its producer: half message set aside in {CHECK_MAX_TOPIC}"
        );
        self.store
            .append(&[copy(m, CHECK_MAX_TOPIC, m.properties.clone())])
            .map(drop)
    }
}
