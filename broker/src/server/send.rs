//! SEND_MESSAGE, SEND_MESSAGE_V2, SEND_BATCH_MESSAGE and CONSUMER_SEND_MSG_BACK.

use std::net::SocketAddr;

use crate::config::{BrokerConfig, BrokerRole};
use crate::remoting::connection::Peer;
use crate::remoting::event_loop::StayAwake;
use crate::remoting::header::{
    ConsumerSendMsgBackRequestHeader, SendMessageRequestHeader, SendMessageResponseHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::replication::SyncWaitError;
use crate::store::message::{
    decode_batch, format_properties, offset_msg_id, parse_properties, set_property, NewMessage,
    PROP_CLUSTER, PROP_MAX_RECONSUME_TIMES, PROP_ORIGIN_MESSAGE_ID, PROP_RETRY_TOPIC,
};
use crate::store::topics::{now_ms, PERM_WRITE};
use crate::store::{FlushDiskType, PutResult, StoreError};

use super::timer::{self, TimerError, Timing};
use super::{schedule, transaction, Broker};

/// The fields Java's broker adds to every answer to a send (its region, whether it traces).
pub(super) fn add_region_fields(resp: &mut RemotingCommand) {
    resp.ext_fields.insert("MSG_REGION", "DefaultRegion");
    resp.ext_fields.insert("TRACE_ON", "true");
}

/// A send's header once its checks passed: where its messages go.
pub(super) struct Admitted {
    /// The request's header.
    pub(super) h: SendMessageRequestHeader,
    /// The dead-letter topic a retry send goes to instead, once the group's retries are spent.
    pub(super) dead_letter: Option<String>,
    /// The queue the messages go to.
    pub(super) queue_id: i32,
}

/// Retry attempts before a message goes to the dead-letter queue (RocketMQ default).
pub(super) const DEFAULT_MAX_RECONSUME_TIMES: i32 = 16;

/// Checks a topic name the way RocketMQ does (`[%|a-zA-Z0-9_-]`, at most 127 characters).
pub fn validate_topic(topic: &str) -> Result<(), String> {
    validate_name("topic", topic, 127)
}

/// Checks a name the way Java clients check topic and group names: not empty, at most `max`
/// characters, and only letters, digits, `%`, `|`, `_` and `-`.
fn validate_name(kind: &str, name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > max {
        return Err(format!(
            "{kind} name is {} characters; at most {max} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '_' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {c:?}; only letters, digits, %, |, _ and - are allowed"
        ));
    }
    Ok(())
}

/// The broker's own topics, which producers may not send to (Java's TopicValidator
/// NOT_ALLOWED_SEND_TOPIC_SET).
const NOT_ALLOWED_SEND_TOPICS: &[&str] = &[
    schedule::SCHEDULE_TOPIC,
    transaction::HALF_TOPIC,
    transaction::OP_TOPIC,
    transaction::CHECK_MAX_TOPIC,
    "SELF_TEST_TOPIC",
    "OFFSET_MOVED_EVENT",
    // Not in Java's list; a message sent there would be delivered to any REAL_TOPIC it names.
    crate::store::message::TIMER_TOPIC,
];

/// Longest consumer group name: its retry and dead-letter topics are directory names, which
/// ext4 and most file systems cap at 255 bytes.
const MAX_GROUP_LEN: usize = 255 - "%RETRY%".len();

/// Checks a consumer group name before it becomes part of a topic (and so of a path): the
/// characters Java clients allow, and a length that fits a file name.
pub fn validate_group(group: &str) -> Result<(), String> {
    validate_name("consumer group", group, MAX_GROUP_LEN)
}

/// Whether a send waits for the flush or the slave its broker promises: unless each of its
/// messages says WAIT=false (Java's isWaitStoreMsgOK: absent means true).
fn msgs_wait(msgs: &[NewMessage]) -> bool {
    msgs.iter().any(|m| {
        crate::store::message::property(&m.properties, "WAIT")
            .is_none_or(|v| v.eq_ignore_ascii_case("true"))
    })
}

/// The answer to a message whose body is larger than `maxMessageSize`.
pub(super) fn refuse_body(
    req: &RemotingCommand,
    len: usize,
    cfg: &BrokerConfig,
) -> Option<RemotingCommand> {
    (len as u64 > cfg.max_message_size).then(|| {
        req.error_to(
            ResponseCode::MessageIllegal,
            format!(
                "message body of {len} bytes exceeds maxMessageSize {}",
                cfg.max_message_size
            ),
        )
    })
}

fn store_error_response(req: &RemotingCommand, e: &StoreError) -> RemotingCommand {
    match e {
        StoreError::MessageTooLarge { .. } | StoreError::PropertiesTooLong { .. } => {
            req.error_to(ResponseCode::MessageIllegal, e.to_string())
        }
        StoreError::FlushTimeout(_) => req.error_to(ResponseCode::FlushDiskTimeout, e.to_string()),
        // Clients send elsewhere on this code, as they do for Java's "store not writable".
        StoreError::Shutdown | StoreError::WriteBackFailed(_) | StoreError::DiskFull(_) => {
            req.error_to(ResponseCode::ServiceNotAvailable, e.to_string())
        }
        _ => req.error_to(ResponseCode::SystemError, format!("store failed: {e}")),
    }
}

impl Broker {
    /// Handles the three send requests.
    pub(super) async fn send(&self, req: &RemotingCommand, peer: &Peer) -> RemotingCommand {
        let born = peer.addr;
        // One read of the settings for the whole send (they may change while it runs).
        let cfg = self.cfg();
        let Admitted {
            mut h,
            dead_letter,
            queue_id,
        } = match self.admit_send(req, &cfg) {
            Ok(a) => a,
            Err(refused) => return *refused,
        };
        let is_batch = req.code == RequestCode::SendBatchMessage.code() || h.batch;
        let items: Vec<(i32, bytes::Bytes, String)> = if is_batch {
            match decode_batch(&req.body) {
                Ok(items) if !items.is_empty() => items
                    .into_iter()
                    .map(|i| (i.flag, i.body, i.properties))
                    .collect(),
                Ok(_) => {
                    return req
                        .error_to(ResponseCode::MessageIllegal, "batch body holds no message")
                }
                Err(e) => {
                    return req
                        .error_to(ResponseCode::MessageIllegal, format!("bad batch body: {e}"))
                }
            }
        } else {
            vec![(
                h.flag.unwrap_or(0),
                req.body.clone(),
                h.properties.take().unwrap_or_default(),
            )]
        };
        if let Some(refused) = items
            .iter()
            .find_map(|(_, b, _)| refuse_body(req, b.len(), &cfg))
        {
            return refused;
        }
        let half = match self.transactional(&items, &h) {
            Ok(half) => half,
            Err(remark) => return req.error_to(ResponseCode::MessageIllegal, remark),
        };
        // A timer message stands alone: a batch's messages share one queue and one answer.
        if is_batch && items.iter().any(|(_, _, p)| timer::names_timer(p)) {
            return req.error_to(
                ResponseCode::MessageIllegal,
                "timer messages cannot be sent in a batch",
            );
        }
        let born_ts = h.born_timestamp.unwrap_or_else(now_ms);
        let topic_name = dead_letter.unwrap_or_else(|| h.topic.clone());
        let to_schedule = |mut m: NewMessage| -> Result<NewMessage, TimerError> {
            if half {
                // A transaction's message is delayed by nothing but its transaction (Java's
                // producer clears the delay; the broker ignores one). A timer runs from the
                // commit; it is checked now.
                timer::timing_now(&m.properties, &cfg.timer)?;
                return Ok(transaction::half(m));
            }
            match schedule::requested_level(&m.properties) {
                level if level > 0 && !m.topic.starts_with("%DLQ%") => {
                    // A delay level wins over a timer (as in Java).
                    if let Some(p) = timer::strip_timer(&m.properties) {
                        m.properties = p;
                    }
                    Ok(schedule::delay(
                        &m,
                        level,
                        &self.store.config().delay_levels_ms,
                    ))
                }
                _ => match timer::timing_now(&m.properties, &cfg.timer)? {
                    Timing::At(at) => Ok(timer::wrap(m, at)),
                    Timing::Now | Timing::None => Ok(m),
                },
            }
        };
        let msgs: Result<Vec<NewMessage>, TimerError> = items
            .into_iter()
            .map(|(flag, body, mut properties)| {
                // Every message sent names the cluster that stored it, as Java's broker does:
                // a consumer replying to a request message sends to that cluster's reply topic.
                set_property(&mut properties, PROP_CLUSTER, &cfg.cluster_name);
                (flag, body, properties)
            })
            .map(|(flag, body, properties)| NewMessage {
                topic: topic_name.clone(),
                queue_id,
                flag,
                tags_code: NewMessage::tags_code_of(&properties),
                body,
                properties,
                sys_flag: h.sys_flag.unwrap_or(0) & !crate::store::message::FLAG_MULTI_TAGS,
                born_timestamp: born_ts,
                born_host: born,
                reconsume_times: h.reconsume_times.unwrap_or(0),
            })
            .map(to_schedule)
            .collect();
        let msgs = match msgs {
            Ok(m) => m,
            Err(e @ TimerError::Disabled) => {
                return req.error_to(ResponseCode::SystemError, e.to_string())
            }
            Err(e) => return req.error_to(ResponseCode::MessageIllegal, e.to_string()),
        };
        drop(cfg);
        self.put_and_respond(req, msgs, queue_id, peer.others_in_flight())
            .await
    }

    /// Reads a send's header (sends and replies alike) and runs the checks every write
    /// passes: role, permissions, topic, queue.
    // Inlined: the header it returns is large, and moving it out cost a copy per send.
    #[inline(always)]
    pub(super) fn admit_send(
        &self,
        req: &RemotingCommand,
        cfg: &BrokerConfig,
    ) -> Result<Admitted, Box<RemotingCommand>> {
        // SEND_MESSAGE_V2, SEND_REPLY_MESSAGE_V2 and (from Java clients) SEND_BATCH_MESSAGE
        // carry one-letter keys.
        let short_keys = req.code == RequestCode::SendMessageV2.code()
            || req.code == RequestCode::SendReplyMessageV2.code()
            || (req.code == RequestCode::SendBatchMessage.code()
                && req.ext_fields.contains_key("b"));
        let h = if short_keys {
            SendMessageRequestHeader::from_v2(&req.ext_fields)
        } else {
            SendMessageRequestHeader::from_ext(&req.ext_fields)
        };
        let h = match h {
            Ok(h) => h,
            Err(e) => {
                return Err(Box::new(
                    req.error_to(ResponseCode::SystemError, e.to_string()),
                ))
            }
        };
        if cfg.role == BrokerRole::Slave {
            return Err(Box::new(req.error_to(
                ResponseCode::ServiceNotAvailable,
                format!(
                    "the broker {} is a slave and cannot accept messages",
                    cfg.broker_addr()
                ),
            )));
        }
        if let Some(refused) = self.refuse_writes(req, cfg) {
            return Err(Box::new(refused));
        }
        if let Err(e) = validate_topic(&h.topic) {
            return Err(Box::new(req.error_to(ResponseCode::SystemError, e)));
        }
        if NOT_ALLOWED_SEND_TOPICS.contains(&h.topic.as_str()) {
            // A message sent straight to the schedule topic carries a tag hash where its
            // delivery time belongs: it would be moved at once, to any REAL_TOPIC it names.
            return Err(Box::new(req.error_to(
                ResponseCode::NoPermission,
                format!("Sending message to topic[{}] is forbidden.", h.topic),
            )));
        }
        let topic = match self.topic_for_send(&h) {
            Ok(t) => t,
            Err(resp) => return Err(Box::new(resp(req))),
        };
        if topic.perm & PERM_WRITE == 0 {
            return Err(Box::new(req.error_to(
                ResponseCode::NoPermission,
                format!("the topic[{}] sending message is forbidden", h.topic),
            )));
        }
        let dead_letter = match self.dead_letter_of_retry(&h) {
            Ok(d) => d,
            Err(resp) => return Err(Box::new(resp(req))),
        };
        // Any queue below the larger of the two counts, as Java's msgCheck: a topic shrunk
        // with `updateTopic -w 4 -r 8` still takes the sends of producers whose route is not
        // yet refreshed (orderly ones do not retry elsewhere).
        let queues = topic.write_queue_nums.max(topic.read_queue_nums);
        let queue_id = match h.queue_id {
            _ if dead_letter.is_some() => 0,
            Some(q) if q >= 0 && q < queues => q,
            Some(q) if q >= queues => {
                return Err(Box::new(req.error_to(
                    ResponseCode::SystemError,
                    format!(
                        "queueId {q} is illegal: topic {} has {} write and {} read queues",
                        h.topic, topic.write_queue_nums, topic.read_queue_nums
                    ),
                )))
            }
            _ => self.pick_queue(topic.write_queue_nums),
        };
        Ok(Admitted {
            h,
            dead_letter,
            queue_id,
        })
    }

    /// Stores a send's messages and answers it; `queue_id` is the queue the producer sent to,
    /// which the answer names (as Java's does) even when the message waits in a delay level's
    /// queue of the schedule topic.
    pub(super) async fn put_and_respond(
        &self,
        req: &RemotingCommand,
        msgs: Vec<NewMessage>,
        queue_id: i32,
        company: bool,
    ) -> RemotingCommand {
        let started = std::time::Instant::now();
        let result = self.put(msgs, company).await;
        self.metrics
            .send_latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((results, status)) => self.send_response(req, &results, queue_id, status),
            Err(e) => {
                // A failed write-back refuses every send: the store logged it once.
                if !matches!(e, StoreError::WriteBackFailed(_)) {
                    tracing::warn!(error = %e, "send failed");
                }
                store_error_response(req, &e)
            }
        }
    }

    /// Stores messages and waits for what the flush policy and role promise: the disk under
    /// SYNC_FLUSH, a slave under SYNC_MASTER (both at once). The status is SUCCESS or one of
    /// the "stored, but" codes clients treat as a send status: FLUSH_DISK_TIMEOUT,
    /// FLUSH_SLAVE_TIMEOUT, SLAVE_NOT_AVAILABLE. With `company` (other requests are being
    /// handled), the append waits a scheduler turn so concurrent sends share one write.
    pub(super) async fn put(
        &self,
        msgs: Vec<NewMessage>,
        company: bool,
    ) -> Result<(Vec<PutResult>, ResponseCode), StoreError> {
        // Settings read only at start: taken once, not held across the waits.
        let (role, flush_type, slave_timeout_ms) = {
            let cfg = self.cfg();
            (cfg.role, cfg.flush, cfg.slave_timeout_ms)
        };
        let sync_master = self.replication.is_some() && role == BrokerRole::SyncMaster;
        // A producer may not want to wait (Java's Message.setWaitStoreMsgOK(false), the WAIT
        // property): answered once stored, as Java's broker answers it.
        let wait = (flush_type == FlushDiskType::Sync || sync_master) && msgs_wait(&msgs);
        let results = self.store.append_grouped(msgs, company).await?;
        self.metrics.messages_in.inc_by(results.len() as u64);
        self.metrics
            .bytes_in
            .inc_by(results.iter().map(|r| u64::from(r.size)).sum());
        let end = results.iter().map(|r| r.end).max().unwrap_or(0);
        let flush = async {
            if wait && flush_type == FlushDiskType::Sync {
                // The flush thread answers within about a disk write: the loop should be
                // running to take the answer up, not waking from sleep.
                let _awake = StayAwake::begin();
                self.store.wait_durable(end).await
            } else {
                Ok(())
            }
        };
        let replica = async {
            match (&self.replication, role) {
                (Some(r), BrokerRole::SyncMaster) if wait => {
                    // The slave answers within a round trip: the loop should be running to
                    // read its acknowledgement, not waking from sleep.
                    let _awake = StayAwake::begin();
                    let started = std::time::Instant::now();
                    let timeout = std::time::Duration::from_millis(slave_timeout_ms);
                    let res = r
                        .wait(end, self.store.commitlog().max_offset(), timeout)
                        .await;
                    self.metrics
                        .sync_wait
                        .observe(started.elapsed().as_secs_f64());
                    res.err()
                }
                _ => None,
            }
        };
        let (flushed, replicated) = tokio::join!(flush, replica);
        let status = match (flushed, replicated) {
            (Err(StoreError::FlushTimeout(_)), _) => ResponseCode::FlushDiskTimeout,
            (Err(e), _) => return Err(e),
            (Ok(()), Some(SyncWaitError::NoSlave)) => ResponseCode::SlaveNotAvailable,
            (Ok(()), Some(SyncWaitError::Timeout(_))) => ResponseCode::FlushSlaveTimeout,
            (Ok(()), None) => ResponseCode::Success,
        };
        Ok((results, status))
    }

    fn send_response(
        &self,
        req: &RemotingCommand,
        results: &[PutResult],
        queue_id: i32,
        status: ResponseCode,
    ) -> RemotingCommand {
        let Some(first) = results.first() else {
            return req.error_to(ResponseCode::SystemError, "nothing was stored");
        };
        let host = self.store.config().store_host;
        let msg_id = match results {
            [one] => offset_msg_id(&host, one.physical_offset as i64),
            _ => results
                .iter()
                .map(|r| offset_msg_id(&host, r.physical_offset as i64))
                .collect::<Vec<_>>()
                .join(","),
        };
        let mut resp = req.response_to(status);
        if status != ResponseCode::Success {
            resp.remark = Some(format!("message stored, but: {status:?}"));
        }
        resp.ext_fields = SendMessageResponseHeader {
            msg_id,
            queue_id,
            queue_offset: first.queue_offset as i64,
            transaction_id: None,
        }
        .to_ext();
        add_region_fields(&mut resp);
        resp
    }

    /// The answer to a request that would write, when this broker takes no writes: its
    /// permission lacks write, or it was made read-only to be drained (Java's NO_PERMISSION).
    fn refuse_writes(&self, req: &RemotingCommand, cfg: &BrokerConfig) -> Option<RemotingCommand> {
        (cfg.permission & PERM_WRITE == 0 || self.write_wiped()).then(|| {
            req.error_to(
                ResponseCode::NoPermission,
                format!(
                    "the broker[{}] sending message is forbidden",
                    cfg.broker_addr()
                ),
            )
        })
    }

    /// Where a send to a group's retry topic goes instead: its dead-letter topic once the
    /// message has used up its attempts (Java's handleRetryAndDLQ). Orderly consumers retry
    /// through their producer, and so do concurrent ones whose send-back failed; without this
    /// such a message came back every two hours forever.
    fn dead_letter_of_retry(
        &self,
        h: &SendMessageRequestHeader,
    ) -> Result<Option<String>, super::ErrorResponder> {
        let Some(group) = h.topic.strip_prefix("%RETRY%") else {
            return Ok(None);
        };
        let max = h
            .max_reconsume_times
            .unwrap_or_else(|| self.retry_max_times(group));
        if h.reconsume_times.unwrap_or(0) < max {
            return Ok(None);
        }
        self.dead_letter_topic(group)
            .map(Some)
            .map_err(|e| super::err_responder(ResponseCode::SystemError, e))
    }

    /// The group's dead-letter topic, created write-only as Java 4 creates it (an operator
    /// makes it readable with `updateTopic -p 6` to read what landed there).
    fn dead_letter_topic(&self, group: &str) -> Result<String, String> {
        let topic = format!("%DLQ%{group}");
        self.ensure_topic(&topic, 1, PERM_WRITE)
            .map_err(|e| format!("cannot create {topic}: {e}"))?;
        Ok(topic)
    }

    /// Whether a send carries a transaction's half message (stored where no consumer sees
    /// it until its producer commits: see `transaction`). A batch cannot: Java's producers
    /// send transactional messages one by one.
    pub(super) fn transactional(
        &self,
        items: &[(i32, bytes::Bytes, String)],
        h: &SendMessageRequestHeader,
    ) -> Result<bool, String> {
        if !items.iter().any(|(_, _, p)| transaction::is_half(p)) {
            return Ok(false);
        }
        // Java lets a retry of a transactional message through as a plain message (it is one
        // by then): reconsumed and delayed.
        let retry = h.reconsume_times.unwrap_or(0) > 0
            && items
                .iter()
                .all(|(_, _, p)| schedule::requested_level(p) > 0);
        if retry {
            return Ok(false);
        }
        if items.len() > 1 {
            return Err("a batch cannot carry transactional messages".into());
        }
        Ok(true)
    }

    /// Handles CONSUMER_SEND_MSG_BACK: the message goes to the group's retry topic, or to its
    /// dead-letter topic once it has been retried too often.
    pub(super) async fn send_back(
        &self,
        req: &RemotingCommand,
        born: SocketAddr,
    ) -> RemotingCommand {
        let h = match ConsumerSendMsgBackRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        if !self.is_master() {
            return req.error_to(
                ResponseCode::ServiceNotAvailable,
                "a slave cannot take messages back",
            );
        }
        // A read-only broker (draining before it is removed) takes nothing back either: the
        // consumer then sends the retry through its producer to a writable broker, as it does
        // against Java's.
        if let Some(refused) = self.refuse_writes(req, &self.cfg()) {
            return refused;
        }
        if let Err(e) = validate_group(&h.group) {
            return req.error_to(ResponseCode::SystemError, e);
        }
        // A group configured with no retry queues drops what its consumers give back, as
        // Java's broker does.
        if self
            .store
            .groups
            .get(&h.group)
            .is_some_and(|g| g.retry_queue_nums <= 0)
        {
            tracing::debug!(group = %h.group, offset = h.offset, "retryQueueNums is 0: message given back dropped");
            return req.response_to(ResponseCode::Success);
        }
        let orig = match self.store.commitlog().read_message(h.offset as u64) {
            Ok(m) => m,
            Err(e) => {
                return req.error_to(
                    ResponseCode::SystemError,
                    format!("look message by offset failed, {}: {e}", h.offset),
                )
            }
        };
        let max = h
            .max_reconsume_times
            .unwrap_or_else(|| self.retry_max_times(&h.group));
        let times = orig.reconsume_times + 1;
        let to_dlq = times > max || h.delay_level < 0;
        let topic = if to_dlq {
            self.dead_letter_topic(&h.group).map(|t| (t, 0))
        } else {
            match self.ensure_retry_topic(&h.group) {
                // An operator took write away (updateTopic -p 4): as Java, no retries.
                Ok(t) if t.perm & PERM_WRITE == 0 => {
                    return req.error_to(
                        ResponseCode::NoPermission,
                        format!("the topic[{}] sending message is forbidden", t.topic_name),
                    )
                }
                Ok(t) => Ok((t.topic_name, self.pick_queue(t.write_queue_nums))),
                Err(e) => Err(format!("cannot create %RETRY%{}: {e}", h.group)),
            }
        };
        let (topic, queue_id) = match topic {
            Ok(t) => t,
            Err(e) => return req.error_to(ResponseCode::SystemError, e),
        };
        let mut props = parse_properties(&orig.properties);
        props
            .entry(PROP_RETRY_TOPIC.into())
            .or_insert_with(|| orig.topic.clone());
        props
            .entry(PROP_ORIGIN_MESSAGE_ID.into())
            .or_insert_with(|| {
                h.origin_msg_id
                    .clone()
                    .unwrap_or_else(|| orig.offset_msg_id())
            });
        props.insert(PROP_MAX_RECONSUME_TIMES.into(), max.to_string());
        let properties = format_properties(&props);
        let msg = NewMessage {
            born_host: born,
            reconsume_times: times,
            ..NewMessage::restored(&orig, topic, queue_id, properties)
        };
        // Retries wait 10 s, 30 s, 1 min, ... (delay level 3 + attempts) unless the consumer
        // asked for a level.
        let msg = if to_dlq {
            msg
        } else {
            let level = if h.delay_level > 0 {
                h.delay_level
            } else {
                3 + orig.reconsume_times
            };
            schedule::delay(&msg, level, &self.store.config().delay_levels_ms)
        };
        match self.put(vec![msg], false).await {
            Ok((_, status)) => req.response_to(status),
            Err(e) => store_error_response(req, &e),
        }
    }
}
