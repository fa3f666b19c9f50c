//! A pull consumer: reads every queue of a topic from its group's committed offsets and
//! commits progress back, so a restarted consumer resumes where it stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Client, PullSpec};
use crate::remoting::body::TopicRouteData;
use crate::remoting::connection::ClientError;
use crate::remoting::ResponseCode;
use crate::store::message::StoredMessage;
use crate::store::topics::PERM_READ;

/// A message as the consumer hands it out.
#[derive(Debug, Clone)]
pub struct ConsumedMessage {
    /// Broker group it came from.
    pub broker_name: String,
    /// The stored message.
    pub message: StoredMessage,
}

/// One queue's position for a consumer group.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueProgress {
    /// Broker group.
    pub broker_name: String,
    /// Queue.
    pub queue_id: i32,
    /// Committed offset of the group (`None`: never committed).
    pub committed: Option<i64>,
    /// End of the queue.
    pub max_offset: i64,
}

impl QueueProgress {
    /// Messages not yet consumed.
    pub fn lag(&self) -> i64 {
        (self.max_offset - self.committed.unwrap_or(0)).max(0)
    }
}

#[derive(Debug, Clone)]
struct QueueState {
    broker_name: String,
    addrs: BTreeMap<i64, String>,
    queue_id: i32,
    next: i64,
    committed: i64,
}

/// Reads a topic for one consumer group (this consumer takes every queue).
pub struct PullConsumer {
    client: Arc<Client>,
    group: String,
    topic: String,
    queues: Vec<QueueState>,
    cursor: usize,
}

fn readable_queues(route: &TopicRouteData) -> Vec<(String, BTreeMap<i64, String>, i32)> {
    let mut out = Vec::new();
    for qd in &route.queue_datas {
        if qd.perm & PERM_READ == 0 {
            continue;
        }
        let Some(bd) = route
            .broker_datas
            .iter()
            .find(|b| b.broker_name == qd.broker_name)
        else {
            continue;
        };
        for q in 0..qd.read_queue_nums {
            out.push((qd.broker_name.clone(), bd.broker_addrs.clone(), q));
        }
    }
    out
}

fn pick_addr(addrs: &BTreeMap<i64, String>) -> Option<&String> {
    addrs.get(&0).or_else(|| addrs.values().next())
}

impl PullConsumer {
    /// Looks up the topic's queues and the group's committed offsets; queues without one
    /// start at their first message.
    pub async fn new(
        client: Arc<Client>,
        group: &str,
        topic: &str,
    ) -> Result<PullConsumer, ClientError> {
        let route = client.refresh_route(topic).await?;
        let mut queues = Vec::new();
        for (broker_name, addrs, queue_id) in readable_queues(&route) {
            let Some(addr) = pick_addr(&addrs) else {
                continue;
            };
            let start = match client
                .query_consumer_offset(addr, group, topic, queue_id)
                .await?
            {
                Some(o) => o,
                None => client.min_offset(addr, topic, queue_id).await?,
            };
            queues.push(QueueState {
                broker_name,
                addrs,
                queue_id,
                next: start,
                committed: start,
            });
        }
        Ok(PullConsumer {
            client,
            group: group.to_string(),
            topic: topic.to_string(),
            queues,
            cursor: 0,
        })
    }

    fn spec(&self, queue_id: i32, offset: i64, suspend: Duration) -> PullSpec<'_> {
        PullSpec {
            group: &self.group,
            topic: &self.topic,
            queue_id,
            offset,
            max: 256,
            suspend,
        }
    }

    /// Pulls queue `idx` once, moving its position; `Some` with the messages when found.
    async fn pull_queue(
        &mut self,
        idx: usize,
        wait: Duration,
    ) -> Result<Option<Vec<ConsumedMessage>>, ClientError> {
        let q = &self.queues[idx];
        let Some(addr) = pick_addr(&q.addrs).cloned() else {
            return Ok(None);
        };
        let r = self
            .client
            .pull(&addr, self.spec(q.queue_id, q.next, wait))
            .await?;
        let q = &mut self.queues[idx];
        let moved = [
            ResponseCode::Success,
            ResponseCode::PullOffsetMoved,
            ResponseCode::PullRetryImmediately,
        ];
        if moved.iter().any(|c| c.code() == r.code) {
            q.next = r.next_begin_offset;
        }
        if r.code != ResponseCode::Success.code() {
            return Ok(None);
        }
        let broker_name = &q.broker_name;
        Ok(Some(
            r.messages
                .into_iter()
                .map(|message| ConsumedMessage {
                    broker_name: broker_name.clone(),
                    message,
                })
                .collect(),
        ))
    }

    /// Pulls the next batch from the next queue with messages; waits up to `wait` for new
    /// ones when every queue is drained. Empty means nothing arrived in time.
    pub async fn poll(&mut self, wait: Duration) -> Result<Vec<ConsumedMessage>, ClientError> {
        let n = self.queues.len();
        if n == 0 {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        for i in 0..n {
            let idx = (self.cursor + i) % n;
            if let Some(msgs) = self.pull_queue(idx, Duration::ZERO).await? {
                self.cursor = (idx + 1) % n;
                return Ok(msgs);
            }
        }
        // Everything is drained: long-poll one queue so new messages wake us promptly.
        let idx = self.cursor % n;
        self.cursor = (idx + 1) % n;
        Ok(self.pull_queue(idx, wait).await?.unwrap_or_default())
    }

    /// Commits the consumed position of every queue that moved.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        for q in &mut self.queues {
            if q.next == q.committed {
                continue;
            }
            let Some(addr) = pick_addr(&q.addrs) else {
                continue;
            };
            self.client
                .update_consumer_offset(addr, &self.group, &self.topic, q.queue_id, q.next)
                .await?;
            q.committed = q.next;
        }
        Ok(())
    }

    /// Messages left to read on every queue (end minus position).
    pub async fn remaining(&self) -> Result<i64, ClientError> {
        let mut total = 0;
        for q in &self.queues {
            let Some(addr) = pick_addr(&q.addrs) else {
                continue;
            };
            let max = self
                .client
                .max_offset(addr, &self.topic, q.queue_id)
                .await?;
            total += (max - q.next).max(0);
        }
        Ok(total)
    }
}

impl Client {
    /// Per-queue progress of a consumer group on a topic.
    pub async fn consumer_progress(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<QueueProgress>, ClientError> {
        let route = self.refresh_route(topic).await?;
        let mut out = Vec::new();
        for (broker_name, addrs, queue_id) in readable_queues(&route) {
            let Some(addr) = pick_addr(&addrs) else {
                continue;
            };
            let committed = self
                .query_consumer_offset(addr, group, topic, queue_id)
                .await?;
            let max_offset = self.max_offset(addr, topic, queue_id).await?;
            out.push(QueueProgress {
                broker_name,
                queue_id,
                committed,
                max_offset,
            });
        }
        Ok(out)
    }
}
