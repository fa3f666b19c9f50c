//! PULL_MESSAGE with long polling, the offset queries consumers make, and QUERY_MESSAGE.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::remoting::header::{
    OffsetResponseHeader, PullMessageRequestHeader, PullMessageResponseHeader,
    QueryConsumerOffsetRequestHeader, QueryMessageRequestHeader, QueryMessageResponseHeader,
    QueueRequestHeader, SearchOffsetRequestHeader, UpdateConsumerOffsetRequestHeader,
};
use crate::remoting::{RemotingCommand, ResponseCode};
use crate::store::topics::{TopicConfig, PERM_READ};
use crate::store::{Boundary, GetResult, GetStatus, StoreError};

use super::clients::TagFilter;
use super::Broker;
use crate::filter::Selector;
use crate::store::message::parse_stored_for_index;

use crate::remoting::header::{PULL_COMMIT_OFFSET, PULL_SUBSCRIPTION, PULL_SUSPEND};

/// Longest a pull is held, whatever the client asks (clients time out at 30 s).
const MAX_SUSPEND: Duration = Duration::from_secs(20);
/// Bytes returned by one pull at most.
const MAX_PULL_BYTES: usize = 4 << 20;
/// Messages returned by one pull at most.
const MAX_PULL_MESSAGES: usize = 1024;
/// Entries a held pull passes over for want of a matching tag before it answers anyway, at
/// least (Java's `maxFilterMessageCount`, 16,000 bytes of 20-byte entries; more when the pull
/// asks for more messages).
const MAX_FILTERED: u64 = 800;
/// How many times a pull's `maxMsgNums` an SQL92 pull reads at once, keeping at most
/// `maxMsgNums` of them (Java reads on until it has that many).
const SQL_READ_FACTOR: usize = 8;
/// Most messages one QUERY_MESSAGE answers (Java's `maxMsgsNumBatch`).
const MAX_QUERY_MESSAGES: i32 = 64;
/// Messages a query by client message id answers (Java's `defaultQueryMaxNum`): ids repeat
/// only when a message was sent again.
const UNIQUE_QUERY_MESSAGES: usize = 32;

impl Broker {
    /// Handles PULL_MESSAGE.
    pub(super) async fn pull(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match PullMessageRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        if self.cfg().permission & PERM_READ == 0 {
            return req.error_to(
                ResponseCode::NoPermission,
                format!(
                    "the broker[{}] pulling message is forbidden",
                    self.cfg().broker_addr()
                ),
            );
        }
        if !self.store.groups.consume_enabled(&h.consumer_group) {
            // Paused by its operator (updateSubGroup with consumeEnable=false).
            return req.error_to(
                ResponseCode::NoPermission,
                format!("subscription group no permission, {}", h.consumer_group),
            );
        }
        if !self.is_master() && !self.cfg().slave_read_enable {
            // Reads from slaves are off: send the consumer back to the master.
            let mut resp = req.response_to(ResponseCode::PullRetryImmediately);
            resp.ext_fields = PullMessageResponseHeader {
                suggest_which_broker_id: 0,
                next_begin_offset: h.queue_offset,
                min_offset: 0,
                max_offset: 0,
            }
            .to_ext();
            return resp;
        }
        // A slave may hold replicated queues of a topic whose config it has not copied yet
        // (its master died first): serve what it holds.
        let topic = self.store.topics.get(&h.topic).or_else(|| {
            if self.is_master() {
                return None;
            }
            let queues = self.store.queue_count(&h.topic);
            (queues > 0).then(|| TopicConfig::new(&h.topic, queues, PERM_READ))
        });
        let Some(topic) = topic else {
            return req.error_to(
                ResponseCode::TopicNotExist,
                format!("topic[{}] not exist, apply first please!", h.topic),
            );
        };
        if topic.perm & PERM_READ == 0 {
            return req.error_to(
                ResponseCode::NoPermission,
                format!("the topic[{}] pulling message is forbidden", h.topic),
            );
        }
        if h.queue_id < 0 || h.queue_id >= topic.read_queue_nums.max(topic.write_queue_nums) {
            return req.error_to(
                ResponseCode::SystemError,
                format!(
                    "queueId[{}] is illegal, topic:[{}] topicConfig.readQueueNums:[{}]",
                    h.queue_id, h.topic, topic.read_queue_nums
                ),
            );
        }
        let (expr, expr_type) = if h.sys_flag & PULL_SUBSCRIPTION != 0 {
            (
                h.subscription.clone().unwrap_or_default(),
                h.expression_type.clone(),
            )
        } else {
            match self.consumers.subscription(&h.consumer_group, &h.topic) {
                // The client changed its subscription and this broker has not had the
                // heartbeat saying so: filtered by the old one, messages of the new tags would
                // be passed over and the group's offset moved beyond them. The client asks
                // again shortly (Java's broker answers the same).
                Some(s) if h.sub_version.is_some_and(|v| s.sub_version < v) => {
                    return req.error_to(
                        ResponseCode::SubscriptionNotLatest,
                        format!(
                            "the consumer's subscription not latest, group: {} topic: {}",
                            h.consumer_group, h.topic
                        ),
                    );
                }
                Some(s) => (s.sub_string, s.expression_type),
                None => Default::default(),
            }
        };
        let filter = match self.subscription_filter(&expr, expr_type.as_deref()) {
            Ok(f) => f,
            Err((code, why)) => {
                // Java's remarks: an expression sent with the pull, or one the heartbeat
                // registered (which Java's broker would not have kept).
                let remark = match code {
                    ResponseCode::SubscriptionParseFailed
                        if h.sys_flag & PULL_SUBSCRIPTION != 0 =>
                    {
                        format!("parse the consumer's subscription failed: {why}")
                    }
                    ResponseCode::SubscriptionParseFailed => {
                        return req.error_to(
                            ResponseCode::FilterDataNotExist,
                            format!(
                                "The broker's consumer filter data is not exist!Your expression may be wrong! ({why})"
                            ),
                        );
                    }
                    _ => why,
                };
                return req.error_to(code, remark);
            }
        };
        if h.sys_flag & PULL_COMMIT_OFFSET != 0 && self.is_master() {
            if let Some(off) = h.commit_offset.filter(|o| *o >= 0) {
                self.store
                    .offsets
                    .commit(&h.consumer_group, &h.topic, h.queue_id, off);
            }
        }
        let max = (h.max_msg_nums.max(1) as usize).min(MAX_PULL_MESSAGES);
        let max_bytes = h
            .max_msg_bytes
            .filter(|b| *b > 0)
            .map_or(MAX_PULL_BYTES, |b| (b as usize).min(MAX_PULL_BYTES));
        let mut offset = h.queue_offset.max(0) as u64;
        let first = offset;
        let suspend = if h.sys_flag & PULL_SUSPEND == 0 {
            Duration::ZERO
        } else if self.cfg().long_polling {
            Duration::from_millis(h.suspend_timeout_millis.unwrap_or(15_000).max(0) as u64)
                .min(MAX_SUSPEND)
        } else {
            // Clients pull again at once after "nothing new": without long polling they are
            // still held a short while, or every idle queue would be a busy loop.
            self.cfg().short_polling.min(MAX_SUSPEND)
        };
        // A slave may be behind its master. While the master answers, a consumer asking for
        // what the slave lacks is sent there at once (as Java's slave does); with no master to
        // send it to, the slave waits for what it lacks instead of moving the consumer, which
        // would otherwise come straight back (see `pull_response`).
        // Judged once per pull: the hold and the answer agree.
        let master_reachable = !self.is_master() && self.master_reachable();
        let slave = !self.is_master() && !master_reachable;
        let deadline = Instant::now() + suspend;
        let mut cq = self.store.queue(&h.topic, h.queue_id);
        loop {
            if cq.is_none() {
                cq = self.store.queue(&h.topic, h.queue_id);
            }
            // Register interest before reading so an arrival between the read and the wait
            // is not missed.
            let notified = cq.as_ref().map(|q| q.arrived.notified());
            tokio::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            // A selector keeps some of what is read: read more, keep at most `max`.
            let read_max = match filter.sql {
                Some(_) => (max * SQL_READ_FACTOR).min(MAX_PULL_MESSAGES),
                None => max,
            };
            let got = match self
                .read(
                    &h.topic,
                    h.queue_id,
                    offset,
                    read_max,
                    max_bytes,
                    &filter.tags,
                )
                .await
            {
                Ok(mut g) => {
                    if let Some(selector) = &filter.sql {
                        select(&mut g, selector, max);
                    }
                    g
                }
                Err(e) => {
                    return req.error_to(ResponseCode::SystemError, format!("read failed: {e}"))
                }
            };
            let waiting = match got.status {
                GetStatus::NoNewMessage => true,
                GetStatus::NoMessageInQueue => offset == 0 || slave,
                GetStatus::OffsetOverflow => slave,
                // Before what a slave holds, with no master to send the consumer to: it would
                // only come straight back, in a busy loop; held like a pull at the end.
                GetStatus::OffsetTooSmall => slave,
                _ => false,
            };
            let now = Instant::now();
            if got.status == GetStatus::NoMatchedMessage && now < deadline {
                // Nothing this consumer's tags select: pass over it and read or wait on. Java
                // wakes a held pull only for a message its filter matches; answering each
                // arrival of other tags would cost a round trip per message.
                offset = got.next_offset;
                if offset < got.max_offset {
                    if offset - first < MAX_FILTERED.max(max as u64) {
                        // Other connections on this loop go first: reads of data in memory
                        // never wait, so the pass over would hold the thread.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    return self.pull_response(req, offset, got, master_reachable);
                }
            } else if !waiting || now >= deadline {
                return self.pull_response(req, offset, got, master_reachable);
            }
            match notified.as_mut().as_pin_mut() {
                Some(n) => {
                    let _ = tokio::time::timeout(deadline - now, n).await;
                }
                None => {
                    // The queue does not exist yet: look again shortly.
                    tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
                }
            }
        }
    }

    /// Reads for a pull. Data probably no longer in memory is read on a blocking thread, as
    /// Java reads pulls on threads of their own: a consumer catching up from the disk must not
    /// hold up the sends of the event loop its connection shares.
    async fn read(
        &self,
        topic: &str,
        queue_id: i32,
        offset: u64,
        max: usize,
        max_bytes: usize,
        filter: &TagFilter,
    ) -> Result<GetResult, StoreError> {
        let cold = self
            .store
            .lag_at(topic, queue_id, offset)
            .ok()
            .flatten()
            .is_some_and(|lag| !self.in_memory(lag));
        if !cold {
            return self
                .store
                .get(topic, queue_id, offset, max, max_bytes, |c| {
                    filter.matches(c)
                });
        }
        self.metrics.cold_pulls.inc();
        let (store, topic, filter) = (self.store.clone(), topic.to_string(), filter.clone());
        tokio::task::spawn_blocking(move || {
            store.get(&topic, queue_id, offset, max, max_bytes, |c| {
                filter.matches(c)
            })
        })
        .await
        .unwrap_or(Err(StoreError::Shutdown))
    }

    fn pull_response(
        &self,
        req: &RemotingCommand,
        offset: u64,
        got: GetResult,
        master_reachable: bool,
    ) -> RemotingCommand {
        // A slave never moves a consumer's offset (Java's default, `offsetCheckInSlave`
        // false): it may lack what its master holds, and a consumer told to move commits the
        // new offset and re-reads or skips messages. It sends the consumer to the master.
        let slave = !self.is_master();
        let (code, next, to_master) = match got.status {
            GetStatus::Found => (ResponseCode::Success, got.next_offset, false),
            GetStatus::NoNewMessage => (ResponseCode::PullNotFound, got.next_offset, false),
            GetStatus::NoMatchedMessage => {
                (ResponseCode::PullRetryImmediately, got.next_offset, false)
            }
            GetStatus::NoMessageInQueue if offset == 0 => (ResponseCode::PullNotFound, 0, false),
            GetStatus::NoMessageInQueue | GetStatus::OffsetOverflow if master_reachable => {
                (ResponseCode::PullRetryImmediately, offset, true)
            }
            GetStatus::NoMessageInQueue | GetStatus::OffsetOverflow if slave => {
                (ResponseCode::PullNotFound, offset, true)
            }
            GetStatus::OffsetTooSmall if slave => {
                (ResponseCode::PullRetryImmediately, offset, true)
            }
            GetStatus::NoMessageInQueue => (ResponseCode::PullOffsetMoved, 0, false),
            GetStatus::OffsetTooSmall | GetStatus::OffsetOverflow => {
                (ResponseCode::PullOffsetMoved, got.next_offset, false)
            }
        };
        if code == ResponseCode::Success {
            self.metrics.messages_out.inc_by(got.count as u64);
        }
        let mut resp = req.response_to(code);
        resp.ext_fields = PullMessageResponseHeader {
            suggest_which_broker_id: match to_master {
                true => 0,
                false => self.suggest_broker(got.lag_bytes),
            },
            next_begin_offset: next as i64,
            min_offset: got.min_offset as i64,
            max_offset: got.max_offset as i64,
        }
        .to_ext();
        resp.body = got.body;
        resp
    }

    /// Which group member the consumer should pull from next: a consumer reading data that
    /// is probably no longer in memory is sent to a slave (RocketMQ's slave reads), everyone
    /// else to the master.
    fn suggest_broker(&self, lag_bytes: u64) -> i64 {
        if !self.cfg().slave_read_enable {
            return 0;
        }
        if self.in_memory(lag_bytes) {
            return 0;
        }
        match &self.replication {
            // A master suggests its first slave, as Java's whichBrokerWhenConsumeSlowly = 1,
            // but only when every connected slave has reported holding what the consumer reads
            // next: a slave still copying the log (new, or back from an outage) would hold the
            // pull and send the consumer back, one batch per round.
            Some(r) => {
                let next = self
                    .store
                    .commitlog()
                    .max_offset()
                    .saturating_sub(lag_bytes);
                i64::from(r.all_slaves_hold(next))
            }
            // A slave keeps a lagging consumer.
            None => self.cfg().broker_id,
        }
    }

    /// Whether data `lag_bytes` behind the commit log's end is probably still in memory
    /// (`accessMessageInMemoryMaxRatio` of the machine's memory, as Java reckons it).
    fn in_memory(&self, lag_bytes: u64) -> bool {
        lag_bytes <= self.total_memory / 100 * self.cfg().access_message_in_memory_max_ratio
    }

    /// Handles QUERY_CONSUMER_OFFSET.
    pub(super) fn query_consumer_offset(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match QueryConsumerOffsetRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let stored = self
            .store
            .offsets
            .get(&h.consumer_group, &h.topic, h.queue_id);
        // A new group reads a queue from its start while the queue still starts at 0 and its
        // first message is in memory, as Java does; otherwise the client decides where
        // (CONSUME_FROM_LAST_OFFSET: the end). A negative offset counts as none.
        let offset = match stored.filter(|o| *o >= 0) {
            Some(o) => o,
            None if h.set_zero_if_not_found != Some(false) && self.starts_in_memory(&h) => 0,
            None => {
                return req.error_to(
                    ResponseCode::QueryNotFound,
                    "Not found, maybe this group consumer boot first",
                )
            }
        };
        let mut resp = req.response_to(ResponseCode::Success);
        resp.ext_fields = OffsetResponseHeader { offset }.to_ext();
        resp
    }

    /// Whether the queue asked about still starts at 0 with its first message in memory (a
    /// queue with nothing in it yet does).
    fn starts_in_memory(&self, h: &QueryConsumerOffsetRequestHeader) -> bool {
        let queue = self.store.queue(&h.topic, h.queue_id);
        if queue.is_some_and(|q| q.min_offset() > 0) {
            return false;
        }
        match self.store.lag_at(&h.topic, h.queue_id, 0) {
            Ok(lag) => lag.is_none_or(|lag| self.in_memory(lag)),
            Err(e) => {
                tracing::warn!(topic = %h.topic, queue = h.queue_id, error = %e, "reading a queue's first entry failed");
                false
            }
        }
    }

    /// Handles UPDATE_CONSUMER_OFFSET.
    pub(super) fn update_consumer_offset(&self, req: &RemotingCommand) -> RemotingCommand {
        match UpdateConsumerOffsetRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => {
                self.store
                    .offsets
                    .commit(&h.consumer_group, &h.topic, h.queue_id, h.commit_offset);
                req.response_to(ResponseCode::Success)
            }
            Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
        }
    }

    /// Handles GET_MAX_OFFSET and GET_MIN_OFFSET.
    pub(super) fn queue_bound(&self, req: &RemotingCommand, max: bool) -> RemotingCommand {
        let h = match QueueRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let offset = self.store.queue(&h.topic, h.queue_id).map_or(0, |q| {
            if max {
                q.max_offset()
            } else {
                q.min_offset()
            }
        });
        let mut resp = req.response_to(ResponseCode::Success);
        resp.ext_fields = OffsetResponseHeader {
            offset: offset as i64,
        }
        .to_ext();
        resp
    }

    /// Handles GET_EARLIEST_MSG_STORETIME: -1 for a queue with no message, as Java answers.
    pub(super) fn earliest_store_time(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match QueueRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        match self.store.earliest_time(&h.topic, h.queue_id) {
            Ok(t) => req
                .response_to(ResponseCode::Success)
                .with_ext("timestamp", t.unwrap_or(-1)),
            Err(e) => req.error_to(ResponseCode::SystemError, format!("read failed: {e}")),
        }
    }

    /// Handles CHECK_CLIENT_CONFIG: tag subscriptions are served; any other expression type
    /// is refused with the remark Java's broker gives without property filtering, so the
    /// consumer fails at start rather than when it pulls.
    pub(super) fn check_client_config(&self, req: &RemotingCommand) -> RemotingCommand {
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase", default)]
        struct CheckClientRequestBody {
            subscription_data: Option<crate::remoting::body::SubscriptionData>,
        }
        let body: CheckClientRequestBody = match crate::remoting::body::from_json(&req.body) {
            Ok(b) => b,
            Err(e) => {
                return req.error_to(ResponseCode::SystemError, format!("bad request body: {e}"))
            }
        };
        let Some(sub) = body.subscription_data else {
            return req.response_to(ResponseCode::Success);
        };
        match self.subscription_filter(&sub.sub_string, sub.expression_type.as_deref()) {
            Ok(_) => req.response_to(ResponseCode::Success),
            Err((code, why)) => req.error_to(code, why),
        }
    }

    /// Handles QUERY_MESSAGE: the messages of a topic filed under a key or client message id
    /// in the key index, stored within the asked time range, in commit-log order. The index
    /// is read on a blocking thread (a query may read many messages from the disk).
    pub(super) async fn query_message(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match QueryMessageRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        if h.index_type.as_deref() == Some("T") {
            return req.error_to(
                ResponseCode::SystemError,
                "this broker finds messages by key and by client message id, not by tag \
                 (indexType T)",
            );
        }
        let max = if h.unique_key_query.as_deref() == Some("true") {
            UNIQUE_QUERY_MESSAGES
        } else {
            h.max_num.clamp(0, MAX_QUERY_MESSAGES) as usize
        };
        let store = self.store.clone();
        let (begin, end) = (h.begin_timestamp, h.end_timestamp);
        let found = tokio::task::spawn_blocking(move || {
            store.query_by_key(&h.topic, &h.key, max, begin, end)
        })
        .await;
        let q = match found {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                return req.error_to(ResponseCode::SystemError, format!("query failed: {e}"))
            }
            Err(e) => return req.error_to(ResponseCode::SystemError, format!("query failed: {e}")),
        };
        let mut resp = if q.messages.is_empty() {
            req.error_to(
                ResponseCode::QueryNotFound,
                "can not find message, maybe time range not correct",
            )
        } else {
            let mut body = BytesMut::with_capacity(q.messages.iter().map(|m| m.len()).sum());
            for m in &q.messages {
                body.extend_from_slice(m);
            }
            req.response_to(ResponseCode::Success)
                .with_body(body.freeze())
        };
        resp.ext_fields = QueryMessageResponseHeader {
            index_last_update_timestamp: q.last_time.max(0),
            index_last_update_phyoffset: q.indexed_through as i64,
        }
        .to_ext();
        resp
    }

    /// Handles SEARCH_OFFSET_BY_TIMESTAMP.
    pub(super) fn search_offset(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match SearchOffsetRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let boundary = match h.boundary_type.as_deref() {
            Some(b) if b.eq_ignore_ascii_case("upper") => Boundary::Upper,
            _ => Boundary::Lower,
        };
        match self
            .store
            .search_offset(&h.topic, h.queue_id, h.timestamp, boundary)
        {
            Ok(offset) => {
                let mut resp = req.response_to(ResponseCode::Success);
                resp.ext_fields = OffsetResponseHeader {
                    offset: offset as i64,
                }
                .to_ext();
                resp
            }
            Err(e) => req.error_to(ResponseCode::SystemError, format!("search failed: {e}")),
        }
    }
}

/// How a pull selects messages: by tag code in the consume queue, then, for an SQL92
/// subscription, by its selector over each message's properties.
struct MessageFilter {
    tags: TagFilter,
    sql: Option<Arc<Selector>>,
}

impl Broker {
    /// The filter of a subscription of `expression_type`, or the code and remark refusing it:
    /// SQL92 only with `enablePropertyFilter` (Java's remark otherwise) and only if it parses.
    fn subscription_filter(
        &self,
        expression: &str,
        expression_type: Option<&str>,
    ) -> Result<MessageFilter, (ResponseCode, String)> {
        match expression_type.filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("TAG")) {
            None => Ok(MessageFilter {
                tags: TagFilter::parse(expression),
                sql: None,
            }),
            Some(t) if !self.cfg().property_filter || !t.eq_ignore_ascii_case("SQL92") => Err((
                ResponseCode::SystemError,
                format!("The broker does not support consumer to filter message by {t}"),
            )),
            Some(_) => match self.selectors.get(expression) {
                Ok(selector) => Ok(MessageFilter {
                    tags: TagFilter::parse("*"),
                    sql: Some(selector),
                }),
                Err(e) => Err((ResponseCode::SubscriptionParseFailed, e.to_string())),
            },
        }
    }
}

/// Keeps the messages of a read that `selector` selects, at most `max` (the next read then
/// starts after the last one kept), their properties read in place; a read left with none
/// says so, and the pull reads on.
fn select(got: &mut GetResult, selector: &Selector, max: usize) {
    if got.count == 0 {
        return;
    }
    let mut kept = BytesMut::with_capacity(got.body.len());
    let mut count = 0;
    let mut rest = &got.body[..];
    while let Some(size) = rest
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    {
        let Some((msg, tail)) = usize::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .and_then(|s| (s <= rest.len()).then(|| rest.split_at(s)))
        else {
            break;
        };
        let parsed = parse_stored_for_index(msg);
        if count == max {
            if let Ok(m) = parsed {
                got.next_offset = m.queue_offset as u64;
            }
            break;
        }
        if parsed.is_ok_and(|m| selector.matches(m.properties)) {
            kept.extend_from_slice(msg);
            count += 1;
        }
        rest = tail;
    }
    got.body = kept.freeze();
    got.count = count;
    if count == 0 && got.status == GetStatus::Found {
        got.status = GetStatus::NoMatchedMessage;
    }
}
