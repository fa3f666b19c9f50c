//! A producer: finds a writable queue through the name servers, sends, and on failure retries
//! on a queue of another broker group.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::Client;
use crate::remoting::body::TopicRouteData;
use crate::remoting::connection::ClientError;
use crate::remoting::header::{send_v1_to_v2, SendMessageRequestHeader, SendMessageResponseHeader};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::store::message::{format_properties, Properties, PROP_KEYS, PROP_TAGS, PROP_UNIQ_KEY};
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
}

static UNIQ_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A 32-hex-digit unique message id (process, time, counter).
pub fn new_uniq_id() -> String {
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = UNIQ_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{pid:08X}{nanos:016X}{n:08X}")
}

#[derive(Debug, Clone)]
struct Target {
    broker_name: String,
    addr: String,
    queue_id: i32,
}

fn writable_queues(route: &TopicRouteData) -> Vec<Target> {
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
        for q in 0..qd.write_queue_nums {
            out.push(Target {
                broker_name: qd.broker_name.clone(),
                addr: addr.to_string(),
                queue_id: q,
            });
        }
    }
    out
}

impl Producer {
    /// A producer in `group`, retrying a failed send twice on other brokers.
    pub fn new(client: Arc<Client>, group: &str) -> Producer {
        Producer {
            client,
            group: group.to_string(),
            next: AtomicUsize::new(0),
            attempts: 3,
        }
    }

    /// Sets how many times a message is tried (1 = no retry).
    pub fn with_attempts(mut self, attempts: usize) -> Producer {
        self.attempts = attempts.max(1);
        self
    }

    async fn targets(&self, topic: &str) -> Result<(Vec<Target>, bool), ClientError> {
        match self.client.route(topic).await {
            Ok(r) => Ok((writable_queues(&r), false)),
            Err(ClientError::Response { code, .. })
                if code == ResponseCode::TopicNotExist.code() =>
            {
                // No route yet: send through the template topic so the broker creates it.
                let r = self.client.route(AUTO_CREATE_TOPIC).await?;
                let mut t = writable_queues(&r);
                t.retain(|t| t.queue_id < 4);
                Ok((t, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one message; on failure tries queues of other broker groups.
    pub async fn send(&self, msg: &Message) -> Result<SendResult, ClientError> {
        let mut props: Properties = msg.properties.clone();
        let uniq = new_uniq_id();
        props.insert(PROP_UNIQ_KEY.into(), uniq.clone());
        if let Some(t) = &msg.tags {
            props.insert(PROP_TAGS.into(), t.clone());
        }
        if !msg.keys.is_empty() {
            props.insert(PROP_KEYS.into(), msg.keys.join(" "));
        }
        props.insert("WAIT".into(), "true".into());
        let properties = format_properties(&props);
        let mut last_err = None;
        let mut failed_brokers: Vec<String> = Vec::new();
        for attempt in 0..self.attempts {
            let (targets, via_template) = match self.targets(&msg.topic).await {
                Ok(t) => t,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            if targets.is_empty() {
                last_err = Some(ClientError::BadResponse {
                    addr: "name server".into(),
                    detail: format!("topic {} has no writable queue", msg.topic),
                });
                let _ = self.client.refresh_route(&msg.topic).await;
                continue;
            }
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let target = (0..targets.len())
                .map(|i| &targets[(start + i) % targets.len()])
                .find(|t| !failed_brokers.contains(&t.broker_name))
                .unwrap_or(&targets[start % targets.len()]);
            let h = SendMessageRequestHeader {
                producer_group: self.group.clone(),
                topic: msg.topic.clone(),
                default_topic: Some(AUTO_CREATE_TOPIC.into()),
                default_topic_queue_nums: Some(4),
                queue_id: Some(target.queue_id),
                sys_flag: Some(0),
                born_timestamp: Some(now_ms()),
                flag: Some(0),
                properties: Some(properties.clone()),
                reconsume_times: Some(0),
                unit_mode: false,
                max_reconsume_times: None,
                batch: false,
                broker_name: Some(target.broker_name.clone()),
            };
            let req = RemotingCommand::request(
                RequestCode::SendMessageV2.code(),
                send_v1_to_v2(&h.to_ext()),
            )
            .with_body(msg.body.clone());
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
                    addr: target.addr.clone(),
                    code: resp.code,
                    remark: resp.remark.unwrap_or_default(),
                }),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(resp) => {
                    if via_template {
                        let _ = self.client.refresh_route(&msg.topic).await;
                    }
                    let h = SendMessageResponseHeader::from_ext(&resp.ext_fields).map_err(|e| {
                        ClientError::BadResponse {
                            addr: target.addr.clone(),
                            detail: e.to_string(),
                        }
                    })?;
                    return Ok(SendResult {
                        msg_id: uniq,
                        offset_msg_id: h.msg_id,
                        broker_name: target.broker_name.clone(),
                        queue_id: h.queue_id,
                        queue_offset: h.queue_offset,
                        status: resp.code,
                    });
                }
                Err(e) => {
                    tracing::debug!(attempt, broker = %target.addr, error = %e, "send failed; retrying elsewhere");
                    failed_brokers.push(target.broker_name.clone());
                    let _ = self.client.refresh_route(&msg.topic).await;
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Closed("no attempt made".into())))
    }
}
