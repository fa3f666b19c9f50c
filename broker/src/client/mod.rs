//! The ferromq client: name-server lookups, admin calls, a producer that retries on another
//! broker, and a pull consumer with stored offsets. `mqadmin`, the operator and the tests use
//! this one implementation.

mod consumer;
mod producer;

pub use consumer::{ConsumedMessage, PullConsumer, QueueProgress};
pub use producer::{Message, Producer, SendResult};

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::remoting::body::{
    from_json, ClusterInfo, TopicConfigWrapper, TopicList, TopicRouteData,
};
use crate::remoting::connection::{ClientError, ConnectionPool};
use crate::remoting::header::{
    CreateTopicRequestHeader, OffsetResponseHeader, PullMessageRequestHeader,
    PullMessageResponseHeader, QueryConsumerOffsetRequestHeader, QueryMessageRequestHeader,
    QueueRequestHeader, TopicRequestHeader, UpdateConsumerOffsetRequestHeader,
    WipeWritePermRequestHeader, PULL_SUBSCRIPTION, PULL_SUSPEND,
};
use crate::remoting::{ExtFields, RemotingCommand, RequestCode, ResponseCode, SerializeType};
use crate::store::message::{decode_stored, StoredMessage};
use crate::store::topics::TopicConfig;

/// How long cached routes are trusted (clients poll every 30 s, like RocketMQ's).
const ROUTE_TTL: Duration = Duration::from_secs(30);

/// Shared plumbing of every client role: connections, name servers, cached routes.
pub struct Client {
    namesrv: Vec<String>,
    pool: ConnectionPool,
    timeout: Duration,
    routes: Mutex<HashMap<String, (Instant, Arc<TopicRouteData>)>>,
}

/// What one pull asks for.
#[derive(Debug, Clone, Copy)]
pub struct PullSpec<'a> {
    /// Consumer group.
    pub group: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Queue.
    pub queue_id: i32,
    /// First offset wanted.
    pub offset: i64,
    /// Most messages wanted.
    pub max: i32,
    /// How long the broker may hold the pull when nothing is new.
    pub suspend: Duration,
}

/// Outcome of one pull.
#[derive(Debug, Clone)]
pub struct PullResult {
    /// Response code (SUCCESS = found, 19 = nothing new, 20 = retry, 21 = offset moved).
    pub code: i32,
    /// Where the next pull starts.
    pub next_begin_offset: i64,
    /// Lowest offset of the queue.
    pub min_offset: i64,
    /// End of the queue.
    pub max_offset: i64,
    /// Broker the next pull should go to (0 = master).
    pub suggest_broker_id: i64,
    /// Messages returned.
    pub messages: Vec<StoredMessage>,
}

fn bad(addr: &str, detail: impl Into<String>) -> ClientError {
    ClientError::BadResponse {
        addr: addr.to_string(),
        detail: detail.into(),
    }
}

/// Splits a PULL body into its stored messages.
pub fn decode_messages(body: &Bytes) -> Result<Vec<StoredMessage>, String> {
    let mut out = Vec::new();
    let mut rest = body.clone();
    while rest.len() >= 4 {
        let m = decode_stored(&rest).map_err(|e| e.to_string())?;
        let n = m.total_size as usize;
        out.push(m);
        rest = rest.slice(n..);
    }
    Ok(out)
}

impl Client {
    /// A client for the given name servers (`host:port`).
    pub fn new(namesrv: Vec<String>) -> Arc<Client> {
        Self::with_headers(namesrv, SerializeType::Json)
    }

    /// A client whose requests carry `headers`-encoded headers (JSON is what Java clients send
    /// by default; the binary ROCKETMQ form is cheaper for both ends).
    pub fn with_headers(namesrv: Vec<String>, headers: SerializeType) -> Arc<Client> {
        Arc::new(Client {
            namesrv,
            pool: ConnectionPool::with_headers(headers),
            timeout: Duration::from_secs(5),
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// Name servers this client asks.
    pub fn namesrv(&self) -> &[String] {
        &self.namesrv
    }

    /// Sends a request to a broker and returns its response, whatever the code.
    pub async fn call(
        &self,
        addr: &str,
        req: RemotingCommand,
    ) -> Result<RemotingCommand, ClientError> {
        self.pool.call(addr, req, self.timeout).await
    }

    /// Like [`Client::call`], with a specific timeout (long polls).
    pub async fn call_with_timeout(
        &self,
        addr: &str,
        req: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, ClientError> {
        self.pool.call(addr, req, timeout).await
    }

    /// Sends a request to a broker and fails unless it answers SUCCESS.
    pub async fn call_ok(
        &self,
        addr: &str,
        req: RemotingCommand,
    ) -> Result<RemotingCommand, ClientError> {
        self.pool.call_ok(addr, req, self.timeout).await
    }

    /// Asks the name servers in turn until one answers (any code).
    pub async fn namesrv_call(&self, req: RemotingCommand) -> Result<RemotingCommand, ClientError> {
        let mut last = None;
        for addr in crate::server::resolve_all(&self.namesrv).await {
            match self.pool.call(&addr, req.clone(), self.timeout).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Closed("no name server configured".into())))
    }

    async fn namesrv_ok(&self, req: RemotingCommand) -> Result<RemotingCommand, ClientError> {
        let r = self.namesrv_call(req).await?;
        if r.code != ResponseCode::Success.code() {
            return Err(ClientError::Response {
                addr: self.namesrv.join(";"),
                code: r.code,
                remark: r.remark.unwrap_or_default(),
            });
        }
        Ok(r)
    }

    /// The route of `topic` from the name servers (cached for a while).
    pub async fn route(&self, topic: &str) -> Result<Arc<TopicRouteData>, ClientError> {
        if let Some((at, r)) = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            if at.elapsed() < ROUTE_TTL {
                return Ok(r.clone());
            }
        }
        self.refresh_route(topic).await
    }

    /// The route of `topic`, bypassing the cache.
    pub async fn refresh_route(&self, topic: &str) -> Result<Arc<TopicRouteData>, ClientError> {
        let req = RemotingCommand::request(
            RequestCode::GetRouteinfoByTopic.code(),
            TopicRequestHeader {
                topic: topic.to_string(),
            }
            .to_ext(),
        );
        let resp = self.namesrv_ok(req).await?;
        let route: Arc<TopicRouteData> =
            Arc::new(from_json(&resp.body).map_err(|e| bad("name server", format!("route: {e}")))?);
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), (Instant::now(), route.clone()));
        Ok(route)
    }

    /// Every cluster and broker group.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, ClientError> {
        let req = RemotingCommand::request(
            RequestCode::GetBrokerClusterInfo.code(),
            ExtFields::default(),
        );
        let resp = self.namesrv_ok(req).await?;
        from_json(&resp.body).map_err(|e| bad("name server", format!("cluster info: {e}")))
    }

    /// Every topic the name servers know.
    pub async fn topic_list(&self) -> Result<TopicList, ClientError> {
        let req = RemotingCommand::request(
            RequestCode::GetAllTopicListFromNameserver.code(),
            ExtFields::default(),
        );
        let resp = self.namesrv_ok(req).await?;
        from_json(&resp.body).map_err(|e| bad("name server", format!("topic list: {e}")))
    }

    /// Drops the cached route of `topic`, which the next send fetches again.
    fn forget_route(&self, topic: &str) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Deletes `topic` as Java's `mqadmin deleteTopic` does: from each master in `brokers`,
    /// then from every name server's routes (of `cluster`'s groups only, when given).
    pub async fn delete_topic(
        &self,
        topic: &str,
        brokers: &[String],
        cluster: Option<&str>,
    ) -> Result<(), ClientError> {
        for broker in brokers {
            let req = RemotingCommand::request(
                RequestCode::DeleteTopicInBroker.code(),
                Default::default(),
            )
            .with_ext("topic", topic);
            self.call_ok(broker, req).await?;
        }
        for ns in &self.namesrv {
            let mut req = RemotingCommand::request(
                RequestCode::DeleteTopicInNamesrv.code(),
                Default::default(),
            )
            .with_ext("topic", topic);
            if let Some(c) = cluster {
                req = req.with_ext("clusterName", c);
            }
            self.call_ok(ns, req).await?;
        }
        self.forget_route(topic);
        Ok(())
    }

    /// Creates or updates a topic on one broker.
    pub async fn create_topic(&self, broker: &str, cfg: &TopicConfig) -> Result<(), ClientError> {
        let h = CreateTopicRequestHeader {
            topic: cfg.topic_name.clone(),
            default_topic: Some("TBW102".into()),
            read_queue_nums: cfg.read_queue_nums,
            write_queue_nums: cfg.write_queue_nums,
            perm: cfg.perm,
            topic_filter_type: Some(cfg.topic_filter_type.clone()),
            topic_sys_flag: Some(cfg.topic_sys_flag),
            order: cfg.order,
        };
        let req = RemotingCommand::request(RequestCode::UpdateAndCreateTopic.code(), h.to_ext());
        self.call_ok(broker, req).await?;
        self.forget_route(&cfg.topic_name);
        Ok(())
    }

    /// Every committed consumer offset of a broker: (topic, group) -> queue -> offset.
    pub async fn consumer_offsets(
        &self,
        broker: &str,
    ) -> Result<BTreeMap<(String, String), BTreeMap<i32, i64>>, ClientError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Table {
            #[serde(default)]
            offset_table: BTreeMap<String, BTreeMap<i32, i64>>,
        }
        let req = RemotingCommand::request(
            RequestCode::GetAllConsumerOffset.code(),
            ExtFields::default(),
        );
        let resp = self.call_ok(broker, req).await?;
        let t: Table =
            from_json(&resp.body).map_err(|e| bad(broker, format!("consumer offsets: {e}")))?;
        Ok(t.offset_table
            .into_iter()
            .filter_map(|(k, v)| {
                k.rsplit_once('@')
                    .map(|(t, g)| ((t.to_string(), g.to_string()), v))
            })
            .collect())
    }

    /// A broker's runtime facts (role, offsets, replication).
    pub async fn runtime_info(
        &self,
        broker: &str,
    ) -> Result<BTreeMap<String, String>, ClientError> {
        let req = RemotingCommand::request(
            RequestCode::GetBrokerRuntimeInfo.code(),
            ExtFields::default(),
        );
        let resp = self.call_ok(broker, req).await?;
        from_json::<crate::server::RuntimeInfo>(&resp.body)
            .map(|i| i.table)
            .map_err(|e| bad(broker, format!("runtime info: {e}")))
    }

    /// A broker's settings in effect (GET_BROKER_CONFIG), by broker.conf key.
    pub async fn broker_config(
        &self,
        broker: &str,
    ) -> Result<BTreeMap<String, String>, ClientError> {
        let req =
            RemotingCommand::request(RequestCode::GetBrokerConfig.code(), ExtFields::default());
        let resp = self.call_ok(broker, req).await?;
        let text = std::str::from_utf8(&resp.body)
            .map_err(|_| bad(broker, "broker config: not UTF-8 text"))?;
        crate::config::parse_properties(text)
            .map(|pairs| pairs.into_iter().map(|(k, v, _)| (k, v)).collect())
            .map_err(|e| bad(broker, format!("broker config: {e}")))
    }

    /// Changes settings of a running broker (UPDATE_BROKER_CONFIG). `Ok(Some(warning))` when
    /// the broker applied them but could not save them (they last until it restarts).
    pub async fn update_broker_config(
        &self,
        broker: &str,
        settings: &[(String, String)],
    ) -> Result<Option<String>, ClientError> {
        let body: String = settings.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let req =
            RemotingCommand::request(RequestCode::UpdateBrokerConfig.code(), ExtFields::default())
                .with_body(body.into_bytes());
        let resp = self.call_ok(broker, req).await?;
        Ok(resp.remark.filter(|r| !r.is_empty()))
    }

    /// Every topic config of one broker.
    pub async fn broker_topics(&self, broker: &str) -> Result<TopicConfigWrapper, ClientError> {
        let req =
            RemotingCommand::request(RequestCode::GetAllTopicConfig.code(), ExtFields::default());
        let resp = self.call_ok(broker, req).await?;
        from_json(&resp.body).map_err(|e| bad(broker, format!("topic configs: {e}")))
    }

    /// Makes a broker group read-only: the broker refuses sends and the name servers drop
    /// write permission from its routes.
    pub async fn wipe_write_perm(
        &self,
        broker_name: &str,
        broker_addr: &str,
    ) -> Result<(), ClientError> {
        let h = WipeWritePermRequestHeader {
            broker_name: broker_name.to_string(),
        }
        .to_ext();
        self.call_ok(
            broker_addr,
            RemotingCommand::request(RequestCode::WipeWritePermOfBroker.code(), h.clone()),
        )
        .await?;
        for ns in crate::server::resolve_all(&self.namesrv).await {
            let req =
                RemotingCommand::request(RequestCode::WipeWritePermOfBroker.code(), h.clone());
            self.pool.call_ok(&ns, req, self.timeout).await?;
        }
        Ok(())
    }

    async fn offset_call(
        &self,
        broker: &str,
        code: RequestCode,
        ext: ExtFields,
    ) -> Result<i64, ClientError> {
        let resp = self
            .call_ok(broker, RemotingCommand::request(code.code(), ext))
            .await?;
        OffsetResponseHeader::from_ext(&resp.ext_fields)
            .map(|h| h.offset)
            .map_err(|e| bad(broker, e.to_string()))
    }

    /// How far a broker's scheduler has delivered each delay level (`SCHEDULE_TOPIC_XXXX`
    /// queue `level - 1`): delayed messages past these offsets are still waiting.
    pub async fn delay_offsets(&self, broker: &str) -> Result<BTreeMap<i32, i64>, ClientError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Table {
            #[serde(default)]
            offset_table: BTreeMap<i32, i64>,
        }
        let req =
            RemotingCommand::request(RequestCode::GetAllDelayOffset.code(), ExtFields::default());
        let resp = self.call_ok(broker, req).await?;
        let t: Table =
            from_json(&resp.body).map_err(|e| bad(broker, format!("delay offsets: {e}")))?;
        Ok(t.offset_table)
    }

    /// End of a queue.
    pub async fn max_offset(
        &self,
        broker: &str,
        topic: &str,
        queue_id: i32,
    ) -> Result<i64, ClientError> {
        let ext = QueueRequestHeader {
            topic: topic.into(),
            queue_id,
        }
        .to_ext();
        self.offset_call(broker, RequestCode::GetMaxOffset, ext)
            .await
    }

    /// First stored offset of a queue.
    pub async fn min_offset(
        &self,
        broker: &str,
        topic: &str,
        queue_id: i32,
    ) -> Result<i64, ClientError> {
        let ext = QueueRequestHeader {
            topic: topic.into(),
            queue_id,
        }
        .to_ext();
        self.offset_call(broker, RequestCode::GetMinOffset, ext)
            .await
    }

    /// A group's committed offset of a queue; `None` if it has none.
    pub async fn query_consumer_offset(
        &self,
        broker: &str,
        group: &str,
        topic: &str,
        queue_id: i32,
    ) -> Result<Option<i64>, ClientError> {
        let ext = QueryConsumerOffsetRequestHeader {
            consumer_group: group.into(),
            topic: topic.into(),
            queue_id,
            set_zero_if_not_found: None,
        }
        .to_ext();
        match self
            .offset_call(broker, RequestCode::QueryConsumerOffset, ext)
            .await
        {
            Ok(o) => Ok(Some(o)),
            Err(ClientError::Response { code, .. })
                if code == ResponseCode::QueryNotFound.code() =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Commits a group's offset of a queue.
    pub async fn update_consumer_offset(
        &self,
        broker: &str,
        group: &str,
        topic: &str,
        queue_id: i32,
        offset: i64,
    ) -> Result<(), ClientError> {
        let ext = UpdateConsumerOffsetRequestHeader {
            consumer_group: group.into(),
            topic: topic.into(),
            queue_id,
            commit_offset: offset,
        }
        .to_ext();
        self.call_ok(
            broker,
            RemotingCommand::request(RequestCode::UpdateConsumerOffset.code(), ext),
        )
        .await
        .map(|_| ())
    }

    /// Messages of `topic` a broker finds by `key` (a client message id with `unique`) among
    /// those stored within `[begin, end]` (ms), at most `max`: QUERY_MESSAGE. None found is
    /// an empty list, not an error.
    pub async fn query_message(
        &self,
        broker: &str,
        query: &QueryMessageRequestHeader,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        let req = RemotingCommand::request(RequestCode::QueryMessage.code(), query.to_ext());
        let resp = self.call(broker, req).await?;
        if resp.code == ResponseCode::QueryNotFound.code() {
            return Ok(Vec::new());
        }
        if resp.code != ResponseCode::Success.code() {
            return Err(ClientError::Response {
                addr: broker.to_string(),
                code: resp.code,
                remark: resp.remark.unwrap_or_default(),
            });
        }
        decode_messages(&resp.body).map_err(|e| bad(broker, format!("queried messages: {e}")))
    }

    /// Pulls from a queue (no long polling unless `spec.suspend` is non-zero).
    pub async fn pull(&self, broker: &str, spec: PullSpec<'_>) -> Result<PullResult, ClientError> {
        let suspend = spec.suspend;
        let h = pull_header(&spec);
        let req = RemotingCommand::request(RequestCode::PullMessage.code(), h.to_ext());
        let resp = self
            .call_with_timeout(broker, req, suspend + self.timeout)
            .await?;
        let code = resp.code;
        let known = [
            ResponseCode::Success,
            ResponseCode::PullNotFound,
            ResponseCode::PullRetryImmediately,
            ResponseCode::PullOffsetMoved,
        ];
        if !known.iter().any(|c| c.code() == code) {
            return Err(ClientError::Response {
                addr: broker.to_string(),
                code,
                remark: resp.remark.unwrap_or_default(),
            });
        }
        let h = PullMessageResponseHeader::from_ext(&resp.ext_fields)
            .map_err(|e| bad(broker, e.to_string()))?;
        let messages = if code == ResponseCode::Success.code() {
            decode_messages(&resp.body).map_err(|e| bad(broker, format!("pulled messages: {e}")))?
        } else {
            Vec::new()
        };
        Ok(PullResult {
            code,
            next_begin_offset: h.next_begin_offset,
            min_offset: h.min_offset,
            max_offset: h.max_offset,
            suggest_broker_id: h.suggest_which_broker_id,
            messages,
        })
    }
}

/// The PULL_MESSAGE header for `spec`. It carries the subscription expression and sets the
/// subscription flag: brokers that know the group only from heartbeats (Java, the peer) refuse
/// a pull without the flag with SUBSCRIPTION_NOT_EXIST.
fn pull_header(spec: &PullSpec<'_>) -> PullMessageRequestHeader {
    PullMessageRequestHeader {
        consumer_group: spec.group.into(),
        topic: spec.topic.into(),
        queue_id: spec.queue_id,
        queue_offset: spec.offset,
        max_msg_nums: spec.max,
        sys_flag: PULL_SUBSCRIPTION
            | if spec.suspend.is_zero() {
                0
            } else {
                PULL_SUSPEND
            },
        commit_offset: Some(0),
        suspend_timeout_millis: Some(spec.suspend.as_millis() as i64),
        subscription: Some("*".into()),
        sub_version: Some(0),
        expression_type: Some("TAG".into()),
        max_msg_bytes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_carry_their_subscription_and_say_so() {
        let spec = |suspend| PullSpec {
            group: "g",
            topic: "T",
            queue_id: 2,
            offset: 7,
            max: 32,
            suspend,
        };
        let quick = pull_header(&spec(Duration::ZERO));
        assert_eq!(quick.sys_flag, PULL_SUBSCRIPTION);
        assert_eq!(quick.subscription.as_deref(), Some("*"));
        let long = pull_header(&spec(Duration::from_secs(15)));
        assert_eq!(long.sys_flag, PULL_SUBSCRIPTION | PULL_SUSPEND);
        assert_eq!(long.suspend_timeout_millis, Some(15_000));
        assert_eq!(
            (long.queue_id, long.queue_offset, long.max_msg_nums),
            (2, 7, 32)
        );
    }
}
