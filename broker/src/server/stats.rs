//! GET_TOPIC_STATS_INFO and GET_CONSUME_STATS: what Java's `mqadmin topicStatus` and
//! `consumerProgress` ask each broker. Their bodies are maps keyed by queues, which fastjson
//! writes with JSON objects as keys; Java's tools read only that form.

use serde::Serialize;

use crate::remoting::body::MessageQueue;
use crate::remoting::header::{ConsumeStatsRequestHeader, TopicStatsRequestHeader};
use crate::remoting::{RemotingCommand, ResponseCode};

use super::Broker;

/// One queue's offsets as `topicStatus` shows them (Java's `TopicOffset`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TopicOffset {
    last_update_timestamp: i64,
    max_offset: i64,
    min_offset: i64,
}

/// One queue's progress as `consumerProgress` shows it (Java's `OffsetWrapper`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OffsetWrapper {
    broker_offset: i64,
    consumer_offset: i64,
    last_timestamp: i64,
    pull_offset: i64,
}

/// `{<queue>:<value>,...}` with each queue written as a JSON object, as fastjson writes a
/// `Map<MessageQueue, V>`.
fn queue_keyed<V: Serialize>(entries: &[(MessageQueue, V)]) -> Result<String, serde_json::Error> {
    let mut out = String::from("{");
    for (i, (mq, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(mq)?);
        out.push(':');
        out.push_str(&serde_json::to_string(v)?);
    }
    out.push('}');
    Ok(out)
}

impl Broker {
    fn queue_of(&self, topic: &str, queue_id: i32) -> MessageQueue {
        MessageQueue {
            topic: topic.to_string(),
            broker_name: self.cfg().broker_name.clone(),
            queue_id,
        }
    }

    /// Handles GET_TOPIC_STATS_INFO: each write queue's offsets and its last message's store
    /// time.
    pub(super) fn topic_stats(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match TopicStatsRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let Some(topic) = self.store.topics.get(&h.topic) else {
            return req.error_to(
                ResponseCode::TopicNotExist,
                format!("topic[{}] not exist", h.topic),
            );
        };
        let mut table = Vec::new();
        for queue_id in 0..topic.write_queue_nums {
            let (min, max, last) = match self.store.queue(&h.topic, queue_id) {
                Some(cq) => {
                    let max = cq.max_offset();
                    // A last message whose segment retention deleted has no time: 0, as
                    // Java answers.
                    let last = max
                        .checked_sub(1)
                        .and_then(|i| self.store.store_time_at(&cq, i).ok().flatten())
                        .unwrap_or(0);
                    (cq.min_offset() as i64, max as i64, last)
                }
                None => (0, 0, 0),
            };
            let offset = TopicOffset {
                last_update_timestamp: last,
                max_offset: max,
                min_offset: min,
            };
            table.push((self.queue_of(&h.topic, queue_id), offset));
        }
        match queue_keyed(&table) {
            Ok(map) => req
                .response_to(ResponseCode::Success)
                .with_body(format!(r#"{{"offsetTable":{map}}}"#).into_bytes()),
            Err(e) => stats_failed(req, &e),
        }
    }

    /// Handles GET_CONSUME_STATS: for each read queue of the group's topics (or the one
    /// asked), the queue's end, the group's committed offset and the store time of the last
    /// message it consumed. `consumeTps` is not measured and reads 0.
    pub(super) fn consume_stats(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match ConsumeStatsRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        let group = &h.consumer_group;
        let topics: Vec<String> = match h.topic.filter(|t| !t.trim().is_empty()) {
            Some(t) => vec![t],
            None => self.store.offsets.of_group(group).into_keys().collect(),
        };
        // A group online that no longer subscribes to a topic it has offsets for: left
        // out, as Java leaves it out.
        let online = !self.consumers.client_ids(group).is_empty();
        let mut table = Vec::new();
        for topic in &topics {
            let Some(cfg) = self.store.topics.get(topic) else {
                continue;
            };
            if online && self.consumers.subscription(group, topic).is_none() {
                continue;
            }
            for queue_id in 0..cfg.read_queue_nums {
                let cq = self.store.queue(topic, queue_id);
                let broker_offset = cq.as_ref().map_or(0, |q| q.max_offset() as i64);
                let consumer_offset = self
                    .store
                    .offsets
                    .get(group, topic, queue_id)
                    .unwrap_or(0)
                    .max(0);
                // Consumed messages whose segment retention deleted have no time: 0.
                let last_timestamp = cq
                    .as_ref()
                    .zip((consumer_offset as u64).checked_sub(1))
                    .and_then(|(q, i)| self.store.store_time_at(q, i).ok().flatten())
                    .unwrap_or(0);
                let progress = OffsetWrapper {
                    broker_offset,
                    consumer_offset,
                    last_timestamp,
                    pull_offset: 0,
                };
                table.push((self.queue_of(topic, queue_id), progress));
            }
        }
        match queue_keyed(&table) {
            Ok(map) => req
                .response_to(ResponseCode::Success)
                .with_body(format!(r#"{{"consumeTps":0.0,"offsetTable":{map}}}"#).into_bytes()),
            Err(e) => stats_failed(req, &e),
        }
    }
}

fn stats_failed(req: &RemotingCommand, e: &dyn std::fmt::Display) -> RemotingCommand {
    req.error_to(
        ResponseCode::SystemError,
        format!("reading the stats failed: {e}"),
    )
}
