//! A producer: finds a writable queue through the name servers, sends, and on failure retries
//! on a queue of another broker group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::Client;
use crate::remoting::body::TopicRouteData;
use crate::remoting::connection::ClientError;
use crate::remoting::header::{SendMessageRequestHeader, SendMessageResponseHeader};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::store::message::{encode_batch, BatchItem, PROP_KEYS, PROP_TAGS, PROP_UNIQ_KEY};
use crate::store::topics::{now_ms, AUTO_CREATE_TOPIC, PERM_WRITE};

/// A message to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Tag, for consumer-side filtering.
    pub tags: Option<String>,
    /// Keys, for lookups.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: BTreeMap<String, String>,
    /// Payload.
    pub body: Bytes,
}

/// Where a sent message landed.
#[derive(Debug, Clone, PartialEq)]
pub struct SendResult {
    /// Client-side unique id (UNIQ_KEY).
    pub msg_id: String,
    /// Broker-side offset id.
    pub offset_msg_id: String,
    /// Broker group.
    pub broker_name: String,
    /// Queue.
    pub queue_id: i32,
    /// Position in the queue.
    pub queue_offset: i64,
    /// SUCCESS (0), or the "stored, but" code: FLUSH_DISK_TIMEOUT (10), SLAVE_NOT_AVAILABLE
    /// (11), FLUSH_SLAVE_TIMEOUT (12).
    pub status: i32,
}

impl SendResult {
    /// Whether the message is as durable as the cluster promises (status SUCCESS).
    pub fn is_ok(&self) -> bool {
        self.status == ResponseCode::Success.code()
    }
}

/// Sends messages of one producer group.
pub struct Producer {
    client: Arc<Client>,
    group: String,
    next: AtomicUsize,
    /// Attempts per message (1 + retries), as `retryTimesWhenSendFailed` + 1.
    attempts: usize,
    /// Writable queues per topic, valid while the client hands out the same route.
    targets: Mutex<HashMap<String, (Arc<TopicRouteData>, Targets)>>,
}

static UNIQ_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A 32-hex-digit unique message id (process, time, counter).
pub fn new_uniq_id() -> String {
    // getpid is a system call each time (glibc no longer caches it): read it once.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = UNIQ_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&pid.to_be_bytes());
    id[4..12].copy_from_slice(&nanos.to_be_bytes());
    id[12..].copy_from_slice(&n.to_be_bytes());
    crate::store::message::hex_upper(&id)
}

/// The properties string of a message as sent: the user's properties plus the unique id,
/// tags, keys and WAIT, in key order (what `format_properties` of the merged map gives).
fn encode_send_properties(msg: &Message, uniq: &str) -> String {
    let keys = (!msg.keys.is_empty()).then(|| msg.keys.join(" "));
    let system = [
        (PROP_KEYS, keys.as_deref()),
        (PROP_TAGS, msg.tags.as_deref()),
        (PROP_UNIQ_KEY, Some(uniq)),
        ("WAIT", Some("true")),
    ];
    let mut merged: Vec<(&str, &str)> = msg
        .properties
        .iter()
        .filter(|(k, _)| !system.iter().any(|(s, v)| v.is_some() && s == k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(system.iter().filter_map(|(k, v)| v.map(|v| (*k, v))))
        .collect();
    merged.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut s = String::with_capacity(merged.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (k, v) in merged {
        s.push_str(k);
        s.push('\u{1}');
        s.push_str(v);
        s.push('\u{2}');
    }
    s
}

#[derive(Debug, Clone)]
struct Target {
    broker_name: Arc<str>,
    addr: Arc<str>,
    queue_id: i32,
}

/// Writable queues of a route, computed once per route the client fetches.
type Targets = Arc<[Target]>;

fn writable_queues(route: &TopicRouteData) -> Targets {
    let mut out = Vec::new();
    for qd in &route.queue_datas {
        if qd.perm & PERM_WRITE == 0 {
            continue;
        }
        let Some(addr) = route
            .broker_datas
            .iter()
            .find(|b| b.broker_name == qd.broker_name)
            .and_then(|b| b.master_addr())
        else {
            continue;
        };
        let (broker_name, addr): (Arc<str>, Arc<str>) =
            (qd.broker_name.as_str().into(), addr.into());
        for q in 0..qd.write_queue_nums {
            out.push(Target {
                broker_name: broker_name.clone(),
                addr: addr.clone(),
                queue_id: q,
            });
        }
    }
    out.into()
}

impl Producer {
    /// A producer in `group`, retrying a failed send twice on other brokers.
    pub fn new(client: Arc<Client>, group: &str) -> Producer {
        Producer {
            client,
            group: group.to_string(),
            next: AtomicUsize::new(0),
            attempts: 3,
            targets: Mutex::default(),
        }
    }

    /// Sets how many times a message is tried (1 = no retry).
    pub fn with_attempts(mut self, attempts: usize) -> Producer {
        self.attempts = attempts.max(1);
        self
    }

    async fn targets(&self, topic: &str) -> Result<(Targets, bool), ClientError> {
        match self.client.route(topic).await {
            Ok(r) => Ok((self.cached_targets(topic, r), false)),
            Err(ClientError::Response { code, .. })
                if code == ResponseCode::TopicNotExist.code() =>
            {
                // No route yet: send through the template topic so the broker creates it.
                let r = self.client.route(AUTO_CREATE_TOPIC).await?;
                let t: Vec<Target> = writable_queues(&r)
                    .iter()
                    .filter(|t| t.queue_id < 4)
                    .cloned()
                    .collect();
                Ok((t.into(), true))
            }
            Err(e) => Err(e),
        }
    }

    fn cached_targets(&self, topic: &str, route: Arc<TopicRouteData>) -> Targets {
        let mut cache = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, t)) = cache.get(topic) {
            if Arc::ptr_eq(r, &route) {
                return t.clone();
            }
        }
        let t = writable_queues(&route);
        cache.insert(topic.to_string(), (route, t.clone()));
        t
    }

    /// Sends one message; on failure tries queues of other broker groups.
    pub async fn send(&self, msg: &Message) -> Result<SendResult, ClientError> {
        let uniq = new_uniq_id();
        let properties = encode_send_properties(msg, &uniq);
        let payload = Payload::One {
            body: msg.body.clone(),
            properties,
        };
        self.send_payload(&msg.topic, payload, uniq).await
    }

    /// Sends messages of one topic as one SEND_BATCH_MESSAGE: they land contiguously in one
    /// queue, all or none. The result's `msg_id` lists every message's unique id, comma
    /// separated, as RocketMQ's batch send result does.
    pub async fn send_batch(&self, msgs: &[Message]) -> Result<SendResult, ClientError> {
        let Some(first) = msgs.first() else {
            return Err(ClientError::BadResponse {
                addr: "producer".into(),
                detail: "a batch needs at least one message".into(),
            });
        };
        if let Some(other) = msgs.iter().find(|m| m.topic != first.topic) {
            return Err(ClientError::BadResponse {
                addr: "producer".into(),
                detail: format!(
                    "a batch goes to one topic, but holds {} and {}",
                    first.topic, other.topic
                ),
            });
        }
        let mut ids = Vec::with_capacity(msgs.len());
        let items: Vec<BatchItem> = msgs
            .iter()
            .map(|m| {
                let uniq = new_uniq_id();
                let properties = encode_send_properties(m, &uniq);
                ids.push(uniq);
                BatchItem {
                    flag: 0,
                    body: m.body.clone(),
                    properties,
                }
            })
            .collect();
        let payload = Payload::Batch(encode_batch(&items));
        self.send_payload(&first.topic, payload, ids.join(","))
            .await
    }

    async fn send_payload(
        &self,
        topic: &str,
        payload: Payload,
        uniq: String,
    ) -> Result<SendResult, ClientError> {
        let mut last_err = None;
        let mut failed_brokers: Vec<Arc<str>> = Vec::new();
        for attempt in 0..self.attempts {
            let (targets, via_template) = match self.targets(topic).await {
                Ok(t) => t,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            if targets.is_empty() {
                last_err = Some(ClientError::BadResponse {
                    addr: "name server".into(),
                    detail: format!("topic {topic} has no writable queue"),
                });
                let _ = self.client.refresh_route(topic).await;
                continue;
            }
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let target = (0..targets.len())
                .map(|i| &targets[(start + i) % targets.len()])
                .find(|t| !failed_brokers.contains(&t.broker_name))
                .unwrap_or(&targets[start % targets.len()]);
            let (code, body, properties, batch) = match &payload {
                Payload::One { body, properties } => (
                    RequestCode::SendMessageV2,
                    body.clone(),
                    Some(properties.clone()),
                    false,
                ),
                Payload::Batch(body) => (RequestCode::SendBatchMessage, body.clone(), None, true),
            };
            let h = SendMessageRequestHeader {
                producer_group: self.group.clone(),
                topic: topic.to_string(),
                default_topic: Some(AUTO_CREATE_TOPIC.into()),
                default_topic_queue_nums: Some(4),
                queue_id: Some(target.queue_id),
                sys_flag: Some(0),
                born_timestamp: Some(now_ms()),
                flag: Some(0),
                properties,
                reconsume_times: Some(0),
                unit_mode: false,
                max_reconsume_times: None,
                batch,
                broker_name: Some(target.broker_name.to_string()),
            };
            // Both carry SEND_MESSAGE_V2's one-letter keys, as Java's producer sends them.
            let req = RemotingCommand::request(code.code(), h.to_v2()).with_body(body);
            // FLUSH_DISK_TIMEOUT, SLAVE_NOT_AVAILABLE and FLUSH_SLAVE_TIMEOUT mean "stored, but
            // not as durable as asked": a result with that status, never a retry (which
            // would store the message twice).
            let stored_but = [
                ResponseCode::FlushDiskTimeout.code(),
                ResponseCode::SlaveNotAvailable.code(),
                ResponseCode::FlushSlaveTimeout.code(),
            ];
            let outcome = match self.client.call(&target.addr, req).await {
                Ok(resp)
                    if resp.code == ResponseCode::Success.code()
                        || stored_but.contains(&resp.code) =>
                {
                    Ok(resp)
                }
                Ok(resp) => Err(ClientError::Response {
                    addr: target.addr.to_string(),
                    code: resp.code,
                    remark: resp.remark.unwrap_or_default(),
                }),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(resp) => {
                    if via_template {
                        let _ = self.client.refresh_route(topic).await;
                    }
                    let h = SendMessageResponseHeader::from_ext(&resp.ext_fields).map_err(|e| {
                        ClientError::BadResponse {
                            addr: target.addr.to_string(),
                            detail: e.to_string(),
                        }
                    })?;
                    return Ok(SendResult {
                        msg_id: uniq,
                        offset_msg_id: h.msg_id,
                        broker_name: target.broker_name.to_string(),
                        queue_id: h.queue_id,
                        queue_offset: h.queue_offset,
                        status: resp.code,
                    });
                }
                Err(e) => {
                    tracing::debug!(attempt, broker = %target.addr, error = %e, "send failed; retrying elsewhere");
                    failed_brokers.push(target.broker_name.clone());
                    let _ = self.client.refresh_route(topic).await;
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Closed("no attempt made".into())))
    }
}

/// What a send carries: one message, or an encoded batch.
enum Payload {
    One { body: Bytes, properties: String },
    Batch(Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::message::{format_properties, Properties};

    #[test]
    fn unique_ids_carry_the_pid_and_a_counter() {
        let (a, b) = (new_uniq_id(), new_uniq_id());
        assert_eq!(a.len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        assert_eq!(&a[..8], format!("{:08X}", std::process::id()));
        assert_ne!(a, b);
        let n = |id: &str| u32::from_str_radix(&id[24..], 16).unwrap();
        assert_eq!(n(&b), n(&a).wrapping_add(1));
    }

    #[test]
    fn send_properties_match_the_merged_map() {
        let mut msg = Message {
            topic: "T".into(),
            tags: Some("TagA".into()),
            keys: vec!["k1".into(), "k2".into()],
            ..Default::default()
        };
        msg.properties.insert("zeta".into(), "1".into());
        msg.properties.insert("TAGS".into(), "overridden".into());
        msg.properties.insert("A".into(), "2".into());
        let mut want = Properties::new();
        want.extend(msg.properties.clone());
        want.insert(PROP_UNIQ_KEY.into(), "U1".into());
        want.insert(PROP_TAGS.into(), "TagA".into());
        want.insert(PROP_KEYS.into(), "k1 k2".into());
        want.insert("WAIT".into(), "true".into());
        assert_eq!(encode_send_properties(&msg, "U1"), format_properties(&want));
        // Without tags or keys, user properties of those names stay.
        let plain = Message {
            properties: [("KEYS".to_string(), "mine".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            encode_send_properties(&plain, "U2"),
            "KEYS\u{1}mine\u{2}UNIQ_KEY\u{1}U2\u{2}WAIT\u{1}true\u{2}"
        );
    }
}
