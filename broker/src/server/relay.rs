//! Requests the broker carries to a client's connection and waits on: replies to request
//! messages (SEND_REPLY_MESSAGE, pushed to the producer that asked), and admin tools'
//! questions to one consumer client (GET_CONSUMER_RUNNING_INFO, CONSUME_MESSAGE_DIRECTLY).

use std::time::Duration;

use crate::remoting::command::FLAG_RESPONSE;
use crate::remoting::connection::{CallError, ClientLink, Peer};
use crate::remoting::header::{
    ConsumerClientRequestHeader, ReplyMessageRequestHeader, SendMessageResponseHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::store::message::{
    offset_msg_id, parse_offset_msg_id, property, set_property, NewMessage, FLAG_MULTI_TAGS,
};
use crate::store::topics::now_ms;

use super::send::Admitted;
use super::Broker;

/// How long the broker waits for a client to answer a request it carries (Java: 10 s; tests
/// do not wait that long for a client that stays silent).
const CLIENT_CALL_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};

/// What a cluster's reply topic is named after (Java's `MixAll.REPLY_TOPIC_POSTFIX`).
pub const REPLY_TOPIC_SUFFIX: &str = "_REPLY_TOPIC";

/// The property naming the client id a reply goes to.
const PROP_REPLY_TO_CLIENT: &str = "REPLY_TO_CLIENT";

/// The property a pushed reply carries: when the broker pushed it (ms).
const PROP_PUSH_REPLY_TIME: &str = "PUSH_REPLY_TIME";

/// The oldest client version that answers relayed requests (Java's `V3_1_8_SNAPSHOT`).
const MIN_RELAY_VERSION: i32 = 62;

/// The topic replies of `cluster` are sent to: every broker of the cluster has it.
pub fn reply_topic(cluster: &str) -> String {
    format!("{cluster}{REPLY_TOPIC_SUFFIX}")
}

impl Broker {
    /// Handles SEND_REPLY_MESSAGE(_V2): pushes the reply to the producer whose request it
    /// answers and, with `storeReplyMessageEnable`, stores it in its topic as well, both at
    /// once. The answer's code is the push's, as Java's: SUCCESS once the requester took the
    /// reply; a failed store is logged only.
    pub(super) async fn reply(&self, req: &RemotingCommand, peer: &Peer) -> RemotingCommand {
        let (admitted, too_large) = {
            let cfg = self.cfg();
            (
                self.admit_send(req, &cfg),
                super::send::refuse_body(req, req.body.len(), &cfg),
            )
        };
        let Admitted {
            mut h, queue_id, ..
        } = match admitted {
            Ok(a) => a,
            Err(refused) => return *refused,
        };
        if let Some(refused) = too_large {
            return refused;
        }
        let properties = h.properties.take().unwrap_or_default();
        let msg = NewMessage {
            topic: h.topic.clone(),
            queue_id,
            flag: h.flag.unwrap_or(0),
            tags_code: NewMessage::tags_code_of(&properties),
            body: req.body.clone(),
            properties,
            sys_flag: h.sys_flag.unwrap_or(0) & !FLAG_MULTI_TAGS,
            born_timestamp: h.born_timestamp.unwrap_or_else(now_ms),
            born_host: peer.addr,
            reconsume_times: h.reconsume_times.unwrap_or(0),
        };
        let mut pushed_props = msg.properties.clone();
        set_property(
            &mut pushed_props,
            PROP_PUSH_REPLY_TIME,
            &now_ms().to_string(),
        );
        let push = ReplyMessageRequestHeader {
            producer_group: h.producer_group.clone(),
            topic: h.topic.clone(),
            default_topic: h
                .default_topic
                .clone()
                .unwrap_or_else(|| crate::store::topics::AUTO_CREATE_TOPIC.into()),
            default_topic_queue_nums: h.default_topic_queue_nums.unwrap_or(4),
            queue_id: h.queue_id.unwrap_or(queue_id),
            sys_flag: msg.sys_flag,
            born_timestamp: msg.born_timestamp,
            flag: msg.flag,
            properties: Some(pushed_props),
            reconsume_times: h.reconsume_times,
            unit_mode: h.unit_mode,
            // `ip:port`, which every client parses (Java's `/ip:port` is not a socket
            // address to clients that parse it strictly).
            born_host: peer.addr.to_string(),
            store_host: self.store.config().store_host.to_string(),
            store_timestamp: now_ms(),
        };
        let to = property(&msg.properties, PROP_REPLY_TO_CLIENT).map(str::to_string);
        let body = msg.body.clone();
        let pushing = async {
            let Some(to) = to else {
                return Err(format!(
                    "reply message properties[{PROP_REPLY_TO_CLIENT}] is null"
                ));
            };
            let Some(client) = self.producers.client(&to) else {
                return Err(format!(
                    "push reply message fail, channel of <{to}> not found."
                ));
            };
            let cmd = RemotingCommand::request(
                RequestCode::PushReplyMessageToClient.code(),
                push.to_ext(),
            )
            .with_body(body);
            match client.link.call(cmd, CLIENT_CALL_TIMEOUT).await {
                Ok(r) if r.code == ResponseCode::Success.code() => Ok(()),
                Ok(r) => Err(format!(
                    "push reply message to {to} fail: the client answered code {} ({})",
                    r.code,
                    r.remark.unwrap_or_default()
                )),
                Err(e) => Err(format!("push reply message to {to} fail: {e}")),
            }
        };
        let storing = async {
            if !self.cfg().store_reply_message {
                return None;
            }
            match self.put(vec![msg], peer.others_in_flight()).await {
                Ok((results, _)) => results.into_iter().next(),
                Err(e) => {
                    tracing::warn!(topic = %h.topic, error = %e, "cannot store a reply");
                    None
                }
            }
        };
        let (pushed, stored) = tokio::join!(pushing, storing);
        tracing::debug!(topic = %h.topic, ?pushed, stored = stored.is_some(), "reply handled");
        let mut resp = match &pushed {
            Ok(()) => req.response_to(ResponseCode::Success),
            Err(remark) => {
                tracing::info!(topic = %h.topic, reason = %remark, "reply not delivered");
                req.error_to(ResponseCode::SystemError, remark.clone())
            }
        };
        // Where the reply was stored; a pushed reply that was not stored reads "0", which
        // clients decode without complaint (as Java answers).
        let header = match stored {
            Some(r) => Some(SendMessageResponseHeader {
                msg_id: offset_msg_id(&self.store.config().store_host, r.physical_offset as i64),
                queue_id,
                queue_offset: r.queue_offset as i64,
                transaction_id: None,
            }),
            None if pushed.is_ok() => Some(SendMessageResponseHeader {
                msg_id: "0".into(),
                queue_id,
                queue_offset: 0,
                transaction_id: None,
            }),
            None => None,
        };
        if let Some(header) = header {
            resp.ext_fields = header.to_ext();
        }
        super::send::add_region_fields(&mut resp);
        resp
    }

    /// Handles GET_CONSUMER_RUNNING_INFO and CONSUME_MESSAGE_DIRECTLY: hands the admin tool's
    /// request to the consumer client it names and its answer back, as it came.
    pub(super) async fn relay_to_consumer(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match ConsumerClientRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let (group, id) = (&h.consumer_group, &h.client_id);
        let Some(client) = self.consumers.client(group, id) else {
            return req.error_to(
                ResponseCode::SystemError,
                format!("The Consumer <{group}> <{id}> not online"),
            );
        };
        if client.version < MIN_RELAY_VERSION {
            return req.error_to(
                ResponseCode::SystemError,
                format!(
                    "The Consumer <{id}> Version <{}> too low to finish, please upgrade it to \
                     V3_1_8_SNAPSHOT",
                    client.version
                ),
            );
        }
        let mut call =
            RemotingCommand::request(req.code, req.ext_fields.clone()).with_body(req.body.clone());
        if req.code == RequestCode::ConsumeMessageDirectly.code() {
            match self.message_for_client(req) {
                Ok(raw) => call.body = raw,
                Err(remark) => return req.error_to(ResponseCode::SystemError, remark),
            }
            call.ext_fields
                .insert("brokerName", &self.cfg().broker_name);
        }
        relay(req, &client.link, call, group, id).await
    }

    /// The stored message CONSUME_MESSAGE_DIRECTLY names by its offset message id, as stored
    /// (clients decode that form).
    fn message_for_client(&self, req: &RemotingCommand) -> Result<bytes::Bytes, String> {
        let id = req.ext_fields.get("msgId").unwrap_or("");
        let offset = parse_offset_msg_id(id)
            .ok_or_else(|| format!("msgId {id:?} is not a message id this broker gave"))?;
        self.read_stored(offset as u64)
            .map_err(|e| format!("no message {id} on this broker: {e}"))
    }
}

/// Sends `call` to a consumer client and turns its answer into the answer to `req`.
async fn relay(
    req: &RemotingCommand,
    link: &ClientLink,
    call: RemotingCommand,
    group: &str,
    id: &str,
) -> RemotingCommand {
    match link.call(call, CLIENT_CALL_TIMEOUT).await {
        Ok(mut resp) => {
            resp.opaque = req.opaque;
            resp.flag = FLAG_RESPONSE;
            resp.serialize_type = req.serialize_type;
            resp
        }
        Err(e @ CallError::Timeout(_)) => req.error_to(
            ResponseCode::ConsumeMsgTimeout,
            format!("consumer <{group}> <{id}> Timeout: {e}"),
        ),
        Err(e) => req.error_to(
            ResponseCode::SystemError,
            format!("invoke consumer <{group}> <{id}> Exception: {e}"),
        ),
    }
}
