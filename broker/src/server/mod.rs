//! The broker: request processors over the message store, registration with name servers,
//! and the background chores (client expiry, retention).

pub mod clients;
mod locks;
mod pull;
mod rates;
pub mod relay;
pub mod schedule;
mod send;
mod settings;
mod stats;
#[cfg(test)]
mod tests;
pub mod timer;
pub mod transaction;

pub use send::validate_topic;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, BrokerRole};
use crate::http::{self, HealthState};
use crate::remoting::body::{
    from_json, to_json, ConsumerListBody, HeartbeatData, RegisterBrokerBody, TopicConfigWrapper,
};
use crate::remoting::connection::{serve, ClientError, ConnectionPool, Peer, Processor};
use crate::remoting::event_loop::{EventLoops, Spin};
use crate::remoting::header::{
    ConsumerGroupRequestHeader, CreateTopicRequestHeader, DeleteSubscriptionGroupRequestHeader,
    RegisterBrokerRequestHeader, RegisterBrokerResponseHeader, SendMessageRequestHeader,
    UnregisterBrokerRequestHeader, UnregisterClientRequestHeader, ViewMessageRequestHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use crate::replication::master::{self, ReplicationMaster};
use crate::replication::slave::{self, SlaveIdentity};
use crate::store::groups::{GroupsFile, SubscriptionGroupConfig};
use crate::store::topics::{TopicConfig, AUTO_CREATE_TOPIC, PERM_INHERIT, PERM_READ, PERM_WRITE};
use crate::store::{MessageStore, StoreConfig, StoreError};
use std::collections::BTreeMap;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CodeLabel {
    code: i32,
}

struct Metrics {
    requests: Family<CodeLabel, Counter>,
    /// The counters of `requests` for the codes of the hot paths, taken from it once: counting
    /// those needs neither the family's lock nor a hash.
    hot_requests: Vec<(i32, Counter)>,
    messages_in: Counter,
    bytes_in: Counter,
    messages_out: Counter,
    /// Pulls of data probably no longer in memory, read off the event loops.
    cold_pulls: Counter,
    send_latency: Histogram,
    sync_wait: Histogram,
    slave_lag: Family<SlaveLabel, Gauge>,
    master_lag: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SlaveLabel {
    slave: String,
}

/// A broker: its configuration, store and client registry.
pub struct Broker {
    /// The settings in effect: those read at start, and the live ones as UPDATE_BROKER_CONFIG
    /// last set them (see [`crate::config::LIVE_SETTINGS`]).
    cfg: ArcSwap<BrokerConfig>,
    /// `brokerRole`, read only at start: asked on every request, so not through `cfg`.
    role: BrokerRole,
    /// Held while a settings update is made and saved, so two do not lose each other's; holds
    /// the changes not saved yet (broker.conf could not be written), tried again with the next.
    updating_cfg: tokio::sync::Mutex<Vec<(String, String)>>,
    /// Changes of `brokerPermission` so far: registrations carry a new data version for each,
    /// which name servers need to take the broker's topics again.
    perm_changes: std::sync::atomic::AtomicI64,
    store: Arc<MessageStore>,
    consumers: clients::ConsumerRegistry,
    /// SQL92 subscriptions' selectors, parsed once.
    selectors: crate::filter::SelectorCache,
    /// Producers by group, asked how their transactions ended.
    producers: clients::ProducerRegistry,
    /// Orderly consumers' queue locks.
    locks: locks::QueueLocks,
    /// Put and get rates and daily totals for the runtime info.
    rates: rates::Rates,
    metrics: Metrics,
    next_queue: AtomicUsize,
    /// Set when an operator wiped write permission (drain before scale-in).
    wiped: AtomicBool,
    /// Wakes the registration task after a topic change.
    topics_changed: Notify,
    pool: ConnectionPool,
    scheduler: schedule::Scheduler,
    /// Timer messages waiting for their time.
    timers: timer::Timers,
    /// How far the transaction checks have come (half queue, op queue) in this process,
    /// ahead of the saved offsets until what it passed is durable.
    tx_progress: std::sync::Mutex<Option<(u64, u64)>>,
    /// Masters: the slaves following this broker.
    replication: Option<Arc<ReplicationMaster>>,
    /// Slaves: the master's HA address, from config or the name servers.
    master_ha: watch::Sender<Option<String>>,
    /// Slaves: the master's remoting address, for topic and offset sync.
    master_addr: std::sync::Mutex<Option<String>>,
    /// Slaves: when the master last answered the topic sync (once a second while it lives).
    master_seen: std::sync::Mutex<Option<std::time::Instant>>,
    /// Physical memory, for the "consumer reads from disk" test behind slave reads.
    total_memory: u64,
    /// Endpoint state: not ready while a name server refuses our registration.
    health: Arc<HealthState>,
}

/// How long a slave counts its master as reachable after the master last answered its
/// once-a-second topic sync (whose calls time out after 3 s).
const MASTER_SEEN_FRESH: Duration = Duration::from_secs(5);

type ErrorResponder = Box<dyn FnOnce(&RemotingCommand) -> RemotingCommand + Send>;

impl Broker {
    /// The settings in effect now. Cheap; a caller that reads several takes it once.
    fn cfg(&self) -> arc_swap::Guard<Arc<BrokerConfig>> {
        self.cfg.load()
    }

    fn is_master(&self) -> bool {
        self.role != BrokerRole::Slave
    }

    /// Slaves: whether the master answered lately, so a consumer sent to it will be served.
    fn master_reachable(&self) -> bool {
        self.master_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < MASTER_SEEN_FRESH)
    }

    /// Slaves: records that the master answered just now.
    fn saw_master(&self) {
        *self.master_seen.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
    }

    fn write_wiped(&self) -> bool {
        self.wiped.load(Ordering::Acquire)
    }

    fn pick_queue(&self, n: i32) -> i32 {
        (self.next_queue.fetch_add(1, Ordering::Relaxed) % n.max(1) as usize) as i32
    }

    /// The topic a send goes to, auto-creating it from the template topic when allowed.
    fn topic_for_send(&self, h: &SendMessageRequestHeader) -> Result<TopicConfig, ErrorResponder> {
        if let Some(t) = self.store.topics.get(&h.topic) {
            return Ok(t);
        }
        if let Some(group) = h.topic.strip_prefix("%RETRY%") {
            return self
                .ensure_retry_topic(group)
                .map_err(|e| err_responder(ResponseCode::SystemError, e.to_string()));
        }
        let template = h
            .default_topic
            .clone()
            .unwrap_or_else(|| AUTO_CREATE_TOPIC.to_string());
        let tmpl = self
            .store
            .topics
            .get(&template)
            .filter(|t| t.perm & PERM_INHERIT != 0);
        let Some(tmpl) = tmpl.filter(|_| self.cfg().auto_create_topic) else {
            return Err(err_responder(
                ResponseCode::TopicNotExist,
                format!(
                    "topic[{}] not exist, apply first please! (autoCreateTopicEnable={})",
                    h.topic,
                    self.cfg().auto_create_topic
                ),
            ));
        };
        let queues = h
            .default_topic_queue_nums
            .filter(|n| *n > 0)
            .unwrap_or(self.cfg().default_topic_queue_nums)
            .min(tmpl.write_queue_nums);
        self.ensure_topic(&h.topic, queues, PERM_READ | PERM_WRITE)
            .map_err(|e| err_responder(ResponseCode::SystemError, e.to_string()))
    }

    /// Creates a topic unless it exists; announces new topics to the name servers.
    fn ensure_topic(&self, name: &str, queues: i32, perm: i32) -> Result<TopicConfig, StoreError> {
        if let Some(t) = self.store.topics.get(name) {
            return Ok(t);
        }
        let cfg = TopicConfig::new(name, queues, perm);
        if self.store.topics.put(cfg.clone())? {
            tracing::info!(topic = name, queues, "topic created");
            self.topics_changed.notify_one();
        }
        Ok(cfg)
    }

    /// Handles UPDATE_AND_CREATE_SUBSCRIPTIONGROUP: the body is the group's config as Java's
    /// tools send it.
    fn update_group(&self, req: &RemotingCommand) -> RemotingCommand {
        let cfg: SubscriptionGroupConfig = match from_json(&req.body) {
            Ok(c) => c,
            Err(e) => {
                return req.error_to(
                    ResponseCode::SystemError,
                    format!("bad subscription group body: {e}"),
                )
            }
        };
        if let Err(e) = send::validate_group(&cfg.group_name) {
            return req.error_to(ResponseCode::SystemError, e);
        }
        if !(0..=1024).contains(&cfg.retry_queue_nums) {
            return req.error_to(
                ResponseCode::SystemError,
                format!(
                    "retryQueueNums {} is not between 0 and 1024",
                    cfg.retry_queue_nums
                ),
            );
        }
        let group = cfg.group_name.clone();
        match self.store.groups.put(cfg) {
            Ok(changed) => {
                if changed {
                    tracing::info!(group = %group, "subscription group updated");
                }
                req.response_to(ResponseCode::Success)
            }
            Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
        }
    }

    /// Handles DELETE_SUBSCRIPTIONGROUP: the group's settings go, and with `cleanOffset` its
    /// committed offsets too.
    fn delete_group(&self, req: &RemotingCommand) -> RemotingCommand {
        let h = match DeleteSubscriptionGroupRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        if let Err(e) = self.store.groups.remove(&h.group_name) {
            return req.error_to(ResponseCode::SystemError, e.to_string());
        }
        if h.clean_offset {
            let n = self.store.offsets.remove_group(&h.group_name);
            tracing::info!(group = %h.group_name, topics = n, "consumer offsets of a deleted group removed");
        }
        req.response_to(ResponseCode::Success)
    }

    /// Handles DELETE_TOPIC_IN_BROKER (`mqadmin deleteTopic`): the topic's config, queues
    /// and offsets go, and the next registration takes it out of this group's routes.
    fn delete_topic(&self, req: &RemotingCommand) -> RemotingCommand {
        if !self.is_master() {
            return req.error_to(
                ResponseCode::NoPermission,
                "this broker is a slave: delete topics on its master, slaves copy them",
            );
        }
        let h = match crate::remoting::header::TopicRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        // Retry and dead-letter topics may go (clearing a DLQ); the broker's own may not.
        let consumer_topic = h.topic.starts_with("%RETRY%") || h.topic.starts_with("%DLQ%");
        let system = crate::store::topics::is_system_topic(&h.topic)
            || h.topic == relay::reply_topic(&self.cfg().cluster_name);
        if system && !consumer_topic {
            return req.error_to(
                ResponseCode::SystemError,
                format!("The topic[{}] is conflict with system topic.", h.topic),
            );
        }
        if let Err(e) = self.store.delete_topic(&h.topic) {
            return req.error_to(ResponseCode::SystemError, e.to_string());
        }
        tracing::info!(topic = %h.topic, "topic deleted");
        self.topics_changed.notify_one();
        req.response_to(ResponseCode::Success)
    }

    /// The retry limit of a group for a client that sent none: its configured
    /// `retryMaxTimes`, or RocketMQ's 16.
    fn retry_max_times(&self, group: &str) -> i32 {
        self.store
            .groups
            .get(group)
            .map_or(send::DEFAULT_MAX_RECONSUME_TIMES, |g| g.retry_max_times)
    }

    /// Creates a group's retry topic unless it exists, with the group's configured
    /// `retryQueueNums`.
    fn ensure_retry_topic(&self, group: &str) -> Result<TopicConfig, StoreError> {
        let topic = format!("%RETRY%{group}");
        // Every heartbeat asks: the group's settings are read only when the topic is new.
        if let Some(t) = self.store.topics.get(&topic) {
            return Ok(t);
        }
        let queues = self
            .store
            .groups
            .get(group)
            .map_or(1, |g| g.retry_queue_nums.max(1));
        self.ensure_topic(&topic, queues, PERM_READ | PERM_WRITE)
    }

    fn heartbeat(&self, req: &RemotingCommand, peer: &Peer) -> RemotingCommand {
        let hb: HeartbeatData = match from_json(&req.body) {
            Ok(h) => h,
            Err(e) => {
                return req.error_to(
                    ResponseCode::SystemError,
                    format!("bad heartbeat body: {e}"),
                )
            }
        };
        let from = clients::ClientConn {
            addr: peer.addr,
            link: peer.link(),
            language: crate::remoting::command::language_name(req.language),
            version: req.version,
        };
        for c in &hb.consumer_data_set {
            // A group whose name cannot name its retry topic (a directory) is left out; the
            // client's other groups are registered.
            if let Err(e) = send::validate_group(&c.group_name) {
                tracing::warn!(client = %hb.client_id, error = %e, "consumer group left out of a heartbeat");
                continue;
            }
            // Every consumer group gets its retry topic, as in RocketMQ (slaves copy topics
            // from their master instead).
            if self.is_master() {
                if let Err(e) = self.ensure_retry_topic(&c.group_name) {
                    tracing::warn!(error = %e, group = %c.group_name, "cannot create retry topic");
                }
            }
            self.consumers.heartbeat(&hb.client_id, c, &from);
        }
        for p in &hb.producer_data_set {
            self.producers
                .heartbeat(&hb.client_id, &p.group_name, &from);
        }
        req.response_to(ResponseCode::Success)
    }

    fn admin(&self, code: RequestCode, req: &RemotingCommand) -> RemotingCommand {
        match code {
            RequestCode::UnregisterClient => {
                match UnregisterClientRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        if let Some(g) = h.consumer_group.filter(|g| !g.is_empty()) {
                            self.consumers.unregister(&h.client_id, &g);
                        }
                        if let Some(g) = h.producer_group.filter(|g| !g.is_empty()) {
                            self.producers.unregister(&h.client_id, &g);
                        }
                        req.response_to(ResponseCode::Success)
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::GetConsumerConnectionList => {
                match ConsumerGroupRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => match self.consumers.connections(&h.consumer_group) {
                        Some(c) => req
                            .response_to(ResponseCode::Success)
                            .with_body(to_json(&c)),
                        None => req.error_to(
                            ResponseCode::ConsumerNotOnline,
                            format!("the consumer group[{}] not online", h.consumer_group),
                        ),
                    },
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::GetConsumerListByGroup => {
                match ConsumerGroupRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        let ids = self.consumers.client_ids(&h.consumer_group);
                        if ids.is_empty() {
                            return req.error_to(
                                ResponseCode::SystemError,
                                format!("no consumer for this group, {}", h.consumer_group),
                            );
                        }
                        req.response_to(ResponseCode::Success).with_body(to_json(
                            &ConsumerListBody {
                                consumer_id_list: ids,
                            },
                        ))
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::UpdateAndCreateSubscriptionGroup
            | RequestCode::DeleteSubscriptionGroup
                if !self.is_master() =>
            {
                req.error_to(
                    ResponseCode::NoPermission,
                    "this broker is a slave: configure groups on its master, slaves copy them",
                )
            }
            RequestCode::UpdateAndCreateSubscriptionGroup => self.update_group(req),
            RequestCode::DeleteSubscriptionGroup => self.delete_group(req),
            RequestCode::GetAllSubscriptionGroupConfig => req
                .response_to(ResponseCode::Success)
                .with_body(to_json(&self.store.groups.snapshot())),
            RequestCode::DeleteTopicInBroker => self.delete_topic(req),
            RequestCode::GetBrokerConfig => req
                .response_to(ResponseCode::Success)
                .with_body(self.cfg().to_properties().into_bytes()),
            RequestCode::UpdateAndCreateTopic if !self.is_master() => req.error_to(
                ResponseCode::NoPermission,
                "this broker is a slave: create topics on its master, slaves copy them",
            ),
            RequestCode::UpdateAndCreateTopic => {
                match CreateTopicRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        if let Err(e) = validate_topic(&h.topic) {
                            return req.error_to(ResponseCode::SystemError, e);
                        }
                        if h.topic == AUTO_CREATE_TOPIC {
                            return req.error_to(
                                ResponseCode::SystemError,
                                "TBW102 is a system topic and cannot be changed",
                            );
                        }
                        if h.topic == relay::reply_topic(&self.cfg().cluster_name) {
                            return req.error_to(
                                ResponseCode::SystemError,
                                format!("The topic[{}] is conflict with system topic.", h.topic),
                            );
                        }
                        if !(1..=1024).contains(&h.read_queue_nums)
                            || !(1..=1024).contains(&h.write_queue_nums)
                        {
                            return req.error_to(
                                ResponseCode::SystemError,
                                "queue counts must be between 1 and 1024",
                            );
                        }
                        let cfg = TopicConfig {
                            topic_name: h.topic.clone(),
                            read_queue_nums: h.read_queue_nums,
                            write_queue_nums: h.write_queue_nums,
                            perm: h.perm & 7,
                            topic_filter_type: h
                                .topic_filter_type
                                .unwrap_or_else(|| "SINGLE_TAG".into()),
                            topic_sys_flag: h.topic_sys_flag.unwrap_or(0),
                            order: h.order,
                        };
                        match self.store.topics.put(cfg) {
                            Ok(changed) => {
                                if changed {
                                    tracing::info!(topic = %h.topic, "topic created or updated");
                                    self.topics_changed.notify_one();
                                }
                                req.response_to(ResponseCode::Success)
                            }
                            Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                        }
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::GetAllTopicConfig => {
                let (table, version) = self.store.topics.snapshot();
                req.response_to(ResponseCode::Success)
                    .with_body(to_json(&TopicConfigWrapper {
                        topic_config_table: table,
                        data_version: version,
                    }))
            }
            RequestCode::ViewMessageById => {
                match ViewMessageRequestHeader::from_ext(&req.ext_fields) {
                    // Read once, checked as a message, answered as stored.
                    Ok(h) => match self.read_stored(h.offset as u64) {
                        Ok(raw) => req.response_to(ResponseCode::Success).with_body(raw),
                        Err(e) => req.error_to(
                            ResponseCode::SystemError,
                            format!("no message at offset {}: {e}", h.offset),
                        ),
                    },
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::GetAllConsumerOffset => req
                .response_to(ResponseCode::Success)
                .with_body(self.store.offsets.to_json()),
            RequestCode::GetBrokerRuntimeInfo => req
                .response_to(ResponseCode::Success)
                .with_body(to_json(&self.runtime_info())),
            RequestCode::GetAllDelayOffset => req
                .response_to(ResponseCode::Success)
                .with_body(self.scheduler.offsets_json()),
            RequestCode::WipeWritePermOfBroker => {
                self.wiped.store(true, Ordering::Release);
                tracing::warn!("write permission wiped: this broker now refuses sends");
                self.topics_changed.notify_one();
                req.response_to(ResponseCode::Success)
            }
            other => req.error_to(
                ResponseCode::RequestCodeNotSupported,
                format!("{other:?} ({}) is not supported by this broker", req.code),
            ),
        }
    }

    /// The message stored at `offset`, as stored, once checked to be one (admin tools and
    /// clients decode that form).
    fn read_stored(&self, offset: u64) -> Result<bytes::Bytes, StoreError> {
        let raw = self.store.commitlog().read_raw(offset)?;
        crate::store::message::parse_stored(&raw)
            .map_err(|e| StoreError::Corrupt(format!("message at {offset}: {e}")))?;
        Ok(raw)
    }

    /// Every name server's address, in this broker's address family where a name has both.
    async fn name_servers(&self) -> Vec<String> {
        let cfg = self.cfg.load_full();
        let v6 = crate::net::parse_ip(&cfg.broker_ip).is_some_and(|ip| ip.is_ipv6());
        resolve_preferring(&cfg.namesrv_addrs, v6).await
    }

    /// The registration body and header for the name servers.
    fn registration(&self) -> RemotingCommand {
        let cfg = self.cfg();
        let (mut table, mut version) = self.store.topics.snapshot();
        // A store that stopped (its log could not be written, or log and queues may disagree)
        // takes nothing more: routes say so, and clients send elsewhere, whatever way they
        // send (a refused send is retried elsewhere only by synchronous sends).
        let unwritable = self.store.commitlog().stopped().is_some();
        let mut perm = cfg.permission;
        if self.write_wiped() || unwritable {
            perm &= !PERM_WRITE;
        }
        // As Java's: a broker that is not both readable and writable lends its topics only
        // what it allows.
        if perm & (PERM_READ | PERM_WRITE) != PERM_READ | PERM_WRITE {
            for t in table.values_mut() {
                t.perm &= perm;
            }
            // A name server takes a broker's topics again only when their data version
            // changes (Java's does so): the same table without write permission is another.
            version.counter += 1;
        }
        // So is the table under each new brokerPermission (2 after 4, say).
        version.counter += 2 * self.perm_changes.load(Ordering::Acquire);
        let body = RegisterBrokerBody {
            topic_config_serialize_wrapper: TopicConfigWrapper {
                topic_config_table: table,
                data_version: version,
            },
            filter_server_list: Vec::new(),
        };
        let body = to_json(&body);
        let h = RegisterBrokerRequestHeader {
            broker_name: cfg.broker_name.clone(),
            broker_addr: cfg.broker_addr(),
            cluster_name: cfg.cluster_name.clone(),
            ha_server_addr: Some(cfg.ha_addr()),
            broker_id: cfg.broker_id,
            heartbeat_timeout_millis: Some(cfg.heartbeat_timeout_ms as i64),
            compressed: false,
            body_crc32: Some(crate::store::message::body_crc(&body)),
        };
        RemotingCommand::request(RequestCode::RegisterBroker.code(), h.to_ext()).with_body(body)
    }

    /// Registers with every address every configured name server resolves to, all at once
    /// (one that hangs does not hold up the others). The broker is ready when no name server
    /// refused it and at least one took it (or none is configured): a broker no name server
    /// lists is one no client finds. Returns the addresses that took it, and whether no name
    /// server answered at all (then the next round should come soon; a refusal waits for the
    /// period).
    async fn register_all(&self) -> (Vec<String>, bool) {
        let req = self.registration();
        let addrs = self.name_servers().await;
        let calls = addrs
            .iter()
            .map(|addr| self.pool.call_ok(addr, req.clone(), Duration::from_secs(6)));
        let answers = futures::future::join_all(calls).await;
        let (mut refused, mut accepted) = (false, Vec::new());
        for (addr, answer) in addrs.iter().zip(answers) {
            match answer {
                Ok(resp) => {
                    tracing::debug!(namesrv = %addr, "registered");
                    accepted.push(addr.clone());
                    if self.cfg().role == BrokerRole::Slave {
                        self.learn_master(&resp);
                    }
                }
                Err(ClientError::Response { remark, .. }) => {
                    // A conflict (e.g. a second master for this group) is a configuration
                    // error: say so loudly and stay unready until it clears.
                    tracing::error!(namesrv = %addr, reason = %remark, "name server refused the registration");
                    refused = true;
                }
                Err(e) => tracing::warn!(namesrv = %addr, error = %e, "registration failed"),
            }
        }
        let unheard = accepted.is_empty() && !refused && !self.cfg().namesrv_addrs.is_empty();
        self.health
            .ready
            .store(!refused && !unheard, Ordering::Release);
        (accepted, unheard)
    }

    /// A slave learns where its master is from a registration answer.
    fn learn_master(&self, resp: &RemotingCommand) {
        let Ok(h) = RegisterBrokerResponseHeader::from_ext(&resp.ext_fields) else {
            return;
        };
        let master = h.master_addr.filter(|a| !a.is_empty());
        if master.is_some() {
            *self.master_addr.lock().unwrap_or_else(|p| p.into_inner()) = master;
        }
        if self.cfg().ha_master_address.is_none() {
            let ha = h.ha_server_addr.filter(|a| !a.is_empty());
            // A master that vanished from the name servers keeps its last known address:
            // the follower keeps retrying it until another one is announced.
            if ha.is_some() {
                self.master_ha.send_if_modified(|cur| {
                    let changed = *cur != ha;
                    if changed {
                        tracing::info!(master_ha = ?ha, "master HA address learnt from the name server");
                        cur.clone_from(&ha);
                    }
                    changed
                });
            }
        }
    }

    /// Copies topics and consumer offsets from the master (slaves), and measures the lag.
    async fn sync_from_master(&self) {
        let Some(master) = self
            .master_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let req =
            RemotingCommand::request(RequestCode::GetAllTopicConfig.code(), Default::default());
        match self
            .pool
            .call_ok(&master, req, Duration::from_secs(3))
            .await
        {
            Ok(resp) => {
                match from_json::<TopicConfigWrapper>(&resp.body).inspect(|_| self.saw_master()) {
                    Ok(w) => match self
                        .store
                        .topics
                        .replace_all(w.topic_config_table, w.data_version)
                    {
                        Ok(true) => self.topics_changed.notify_one(),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "saving topics copied from the master failed")
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "master sent unreadable topic configs"),
                }
            }
            Err(e) => tracing::debug!(master = %master, error = %e, "topic sync failed"),
        }
        let req =
            RemotingCommand::request(RequestCode::GetAllConsumerOffset.code(), Default::default());
        if let Ok(resp) = self
            .pool
            .call_ok(&master, req, Duration::from_secs(3))
            .await
        {
            if let Err(e) = self.store.offsets.merge_json(&resp.body) {
                tracing::warn!(error = %e, "master sent unreadable consumer offsets");
            }
        }
        let req = RemotingCommand::request(
            RequestCode::GetAllSubscriptionGroupConfig.code(),
            Default::default(),
        );
        if let Ok(resp) = self
            .pool
            .call_ok(&master, req, Duration::from_secs(3))
            .await
        {
            match from_json::<GroupsFile>(&resp.body) {
                Ok(groups) => {
                    if let Err(e) = self.store.groups.replace_all(groups) {
                        tracing::warn!(error = %e, "saving groups copied from the master failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "master sent unreadable subscription groups"),
            }
        }
        let req =
            RemotingCommand::request(RequestCode::GetAllDelayOffset.code(), Default::default());
        if let Ok(resp) = self
            .pool
            .call_ok(&master, req, Duration::from_secs(3))
            .await
        {
            if let Err(e) = self.scheduler.adopt(&resp.body).await {
                tracing::warn!(error = %e, "taking the master's delay offsets failed");
            }
        }
        let req =
            RemotingCommand::request(RequestCode::GetBrokerRuntimeInfo.code(), Default::default());
        if let Ok(resp) = self
            .pool
            .call_ok(&master, req, Duration::from_secs(3))
            .await
        {
            if let Ok(info) = from_json::<RuntimeInfo>(&resp.body) {
                let master_max: u64 = info
                    .table
                    .get("commitLogMaxOffset")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let lag = master_max.saturating_sub(self.store.commitlog().max_offset());
                self.metrics.master_lag.set(lag as i64);
            }
        }
    }

    /// Role, offsets and replication facts, as GET_BROKER_RUNTIME_INFO's key/value table.
    pub fn runtime_info(&self) -> RuntimeInfo {
        let mut t = BTreeMap::new();
        let log = self.store.commitlog();
        let cfg = self.cfg();
        t.insert("brokerName".to_string(), cfg.broker_name.clone());
        t.insert("brokerId".to_string(), cfg.broker_id.to_string());
        t.insert("brokerRole".to_string(), cfg.role.as_str().to_string());
        t.insert("flushDiskType".to_string(), format!("{:?}", cfg.flush));
        t.insert(
            "commitLogMinOffset".to_string(),
            log.min_offset().to_string(),
        );
        t.insert(
            "commitLogMaxOffset".to_string(),
            log.max_offset().to_string(),
        );
        t.insert(
            "totalMessages".to_string(),
            self.store.total_messages().to_string(),
        );
        if let Some(r) = &self.replication {
            let slaves = r.slaves();
            t.insert("slaveCount".to_string(), slaves.len().to_string());
            let acked: Vec<String> = slaves
                .iter()
                .map(|s| format!("{}={}", s.addr, s.acked))
                .collect();
            t.insert("slaveAckedOffsets".to_string(), acked.join(";"));
        }
        if let Some(m) = self
            .master_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            t.insert("masterAddr".to_string(), m.clone());
        }
        t.insert(
            "brokerVersionDesc".to_string(),
            format!("ferromq {}", env!("CARGO_PKG_VERSION")),
        );
        if let Ok(Some(first)) = self.store.earliest_message_time() {
            t.insert("earliestMessageTimeStamp".to_string(), first.to_string());
        }
        let (puts, gets) = (
            self.metrics.messages_in.get(),
            self.metrics.messages_out.get(),
        );
        for (k, v) in self.rates.table(puts, gets) {
            t.insert(k.to_string(), v);
        }
        // Each delay level's progress against its queue's end, as Java's brokerStatus shows
        // it ("delivered,max"): what the operator's drain check waits on.
        for level in 1..=self.store.config().delay_levels_ms.len() as i32 {
            let max = self
                .store
                .queue(schedule::SCHEDULE_TOPIC, level - 1)
                .map_or(0, |q| q.max_offset());
            let delivered = self.scheduler.progress(level).min(max);
            t.insert(
                format!("{SCHEDULE_OFFSET_PREFIX}{level}"),
                format!("{delivered},{max}"),
            );
        }
        // Timer messages likewise: every one before the first offset was delivered.
        let max = self
            .store
            .queue(crate::store::message::TIMER_TOPIC, 0)
            .map_or(0, |q| q.max_offset());
        t.insert(
            TIMER_OFFSET_KEY.to_string(),
            format!("{},{max}", self.timers.delivered_before().min(max)),
        );
        RuntimeInfo { table: t }
    }

    async fn unregister_all(&self) {
        let cfg = self.cfg.load_full();
        let h = UnregisterBrokerRequestHeader {
            broker_name: cfg.broker_name.clone(),
            broker_addr: cfg.broker_addr(),
            cluster_name: cfg.cluster_name.clone(),
            broker_id: cfg.broker_id,
        };
        let req = RemotingCommand::request(RequestCode::UnregisterBroker.code(), h.to_ext());
        for addr in self.name_servers().await {
            if let Err(e) = self
                .pool
                .call_ok(&addr, req.clone(), Duration::from_secs(3))
                .await
            {
                tracing::warn!(namesrv = %addr, error = %e, "unregistration failed");
            }
        }
    }

    /// The store (for tests and tools embedding a broker).
    pub fn store(&self) -> &Arc<MessageStore> {
        &self.store
    }
}

/// GET_BROKER_RUNTIME_INFO's body (RocketMQ's KVTable).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RuntimeInfo {
    /// Facts by name.
    #[serde(default)]
    pub table: BTreeMap<String, String>,
}

fn err_responder(code: ResponseCode, remark: String) -> ErrorResponder {
    Box::new(move |req| req.error_to(code, remark))
}

/// Expands name-server entries: `host:port` names resolving to several addresses (a headless
/// Service) yield every one, re-resolved on each call. A name with addresses of both
/// families (a dual-stack Service, `localhost`) yields its IPv4 ones, so each name server is
/// called once; an IPv6-only one yields its IPv6 ones.
pub async fn resolve_all(entries: &[String]) -> Vec<String> {
    resolve_preferring(entries, false).await
}

/// [`resolve_all`], preferring IPv6 addresses where a name has both (`v6`: a broker on an
/// IPv6 address, whose host may reach no IPv4 one).
pub async fn resolve_preferring(entries: &[String], v6: bool) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries {
        match tokio::net::lookup_host(e.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                let has_preferred = addrs.iter().any(|a| a.is_ipv6() == v6);
                let family = if has_preferred { v6 } else { !v6 };
                for a in addrs.iter().filter(|a| a.is_ipv6() == family) {
                    let s = a.to_string();
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
            }
            Err(err) => tracing::warn!(namesrv = %e, error = %err, "cannot resolve name server"),
        }
    }
    out
}

impl Metrics {
    /// Counts one request under its code.
    fn count_request(&self, code: i32) {
        match self.hot_requests.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.inc(),
            None => self.requests.get_or_create(&CodeLabel { code }).inc(),
        };
    }
}

impl Processor for Broker {
    async fn process(&self, req: RemotingCommand, peer: &Peer) -> Option<RemotingCommand> {
        self.metrics.count_request(req.code);
        let Some(code) = RequestCode::from_code(req.code) else {
            tracing::debug!(code = req.code, peer = %peer.addr, "unsupported request code");
            return Some(req.error_to(
                ResponseCode::RequestCodeNotSupported,
                format!("request code {} is not supported by this broker", req.code),
            ));
        };
        let resp = match code {
            RequestCode::SendMessage
            | RequestCode::SendMessageV2
            | RequestCode::SendBatchMessage => self.send(&req, peer).await,
            RequestCode::SendReplyMessage | RequestCode::SendReplyMessageV2 => {
                self.reply(&req, peer).await
            }
            RequestCode::GetConsumerRunningInfo | RequestCode::ConsumeMessageDirectly => {
                self.relay_to_consumer(&req).await
            }
            RequestCode::PullMessage | RequestCode::LitePullMessage => self.pull(&req).await,
            RequestCode::QueryConsumerOffset => self.query_consumer_offset(&req),
            RequestCode::UpdateConsumerOffset => self.update_consumer_offset(&req),
            RequestCode::GetMaxOffset => self.queue_bound(&req, true),
            RequestCode::GetMinOffset => self.queue_bound(&req, false),
            RequestCode::GetEarliestMsgStoretime => self.earliest_store_time(&req),
            RequestCode::CheckClientConfig => self.check_client_config(&req),
            RequestCode::SearchOffsetByTimestamp => self.search_offset(&req),
            RequestCode::QueryMessage => self.query_message(&req).await,
            RequestCode::UpdateBrokerConfig => self.update_config(&req).await,
            RequestCode::GetTopicStatsInfo => self.topic_stats(&req),
            RequestCode::GetConsumeStats => self.consume_stats(&req),
            RequestCode::HeartBeat => self.heartbeat(&req, peer),
            RequestCode::LockBatchMq => self.lock_batch(&req, std::time::Instant::now()),
            RequestCode::UnlockBatchMq => self.unlock_batch(&req),
            RequestCode::ConsumerSendMsgBack => self.send_back(&req, peer.addr).await,
            RequestCode::EndTransaction => return self.end_transaction(&req),
            RequestCode::GetAllTopicConfig
            | RequestCode::GetAllConsumerOffset
            | RequestCode::GetAllDelayOffset => {
                // What a slave asks its master every second (Java slaves also ask for the
                // delay offsets): its connection is not a client's, and must not keep clients
                // off the loop replication runs on. An admin tool asking the same is not
                // counted either, which matters little: its connections are short-lived.
                peer.not_a_client();
                self.admin(code, &req)
            }
            other => self.admin(other, &req),
        };
        Some(resp)
    }

    fn disconnected(&self, peer: &Peer) {
        self.consumers.disconnected(peer.addr);
        self.producers.disconnected(peer.addr);
    }
}

/// Runtime-info key prefix of each delay level's progress (`scheduleMessageOffset_3`).
pub const SCHEDULE_OFFSET_PREFIX: &str = "scheduleMessageOffset_";

/// Runtime-info key of the timer messages' progress ("delivered,max" offsets of the timer
/// queue): what a drain waits on besides the delay levels.
pub const TIMER_OFFSET_KEY: &str = "timerMessageOffset";

/// Shuts a store down when dropped, unless disarmed: for starts that fail after opening it.
struct StoreCloser(Option<Arc<MessageStore>>);

impl StoreCloser {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StoreCloser {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The store could not be opened or recovered.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The configuration asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// brokerIP1 is not an IP address.
    #[error("brokerIP1 {0:?} is not an IP address")]
    BadIp(String),
    /// The threads that serve connections could not be started.
    #[error("cannot start {threads} event-loop threads (serverIoThreads): {source}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running broker.
pub struct BrokerHandle {
    /// Remoting address bound.
    pub addr: SocketAddr,
    /// HTTP address bound.
    pub http_addr: SocketAddr,
    /// The broker itself.
    pub broker: Arc<Broker>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BrokerHandle {
    /// Stops serving, unregisters from the name servers and closes the store cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.broker.unregister_all().await;
        let store = self.broker.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        tracing::info!("broker stopped");
    }
}

/// Opens the store, binds the ports, registers with the name servers and starts serving.
pub async fn start(mut cfg: BrokerConfig) -> Result<BrokerHandle, BrokerError> {
    let ip = crate::net::parse_ip(&cfg.broker_ip)
        .ok_or_else(|| BrokerError::BadIp(cfg.broker_ip.clone()))?;
    let listen = SocketAddr::new(cfg.listen_ip(), cfg.listen_port);
    let http_listen = SocketAddr::new(cfg.listen_ip(), cfg.http_port);
    let listener = crate::net::bind(listen)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
    let http_listener = http::bind(http_listen)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: http_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| BrokerError::Bind {
            addr: http_listen,
            source,
        })?;
    // Port 0 takes any free port: the one bound is the one to advertise.
    cfg.listen_port = addr.port();
    // Alive from here on, ready later: a recovery longer than the liveness probe's patience
    // must not get the broker killed and the recovery started over.
    let health = HealthState::starting();
    let shutdown = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(http_listener, health.clone(), shutdown.clone()));
    // A start that fails from here on stops what it started (HTTP, the remoting server, ...).
    let failed_start = shutdown.clone().drop_guard();

    let store_cfg = StoreConfig {
        root: cfg.store_root.clone(),
        segment_size: cfg.segment_size,
        flush: cfg.flush,
        flush_interval_ms: cfg.flush_interval_ms,
        flush_least_pages: cfg.flush_least_pages,
        flush_thorough_interval_ms: cfg.flush_thorough_interval_ms,
        sync_flush_timeout_ms: cfg.sync_flush_timeout_ms,
        store_host: SocketAddr::new(ip, cfg.listen_port),
        prepare_ahead: cfg.prepares_ahead(),
        delay_levels_ms: cfg.delay_levels_ms.clone().into(),
        disk_full_ratio: f64::from(cfg.disk_full_permille) / 1000.0,
        index: cfg.message_index.then_some(cfg.index_size),
    };
    let store = tokio::task::spawn_blocking(move || MessageStore::open(store_cfg))
        .await
        .map_err(|e| BrokerError::Unsupported(format!("store open task failed: {e}")))??;
    // A start that fails from here on closes the store again (its threads and its lock).
    let close_store = StoreCloser(Some(store.clone()));

    let scheduler = schedule::Scheduler::load(&cfg.store_root)?;
    let timers = timer::Timers::load(&cfg.store_root)?;
    let mut registry = Registry::with_prefix("ferromq_broker");
    let requests = Family::<CodeLabel, Counter>::default();
    let hot_requests = [
        RequestCode::SendMessage,
        RequestCode::SendMessageV2,
        RequestCode::SendBatchMessage,
        RequestCode::PullMessage,
        RequestCode::UpdateConsumerOffset,
        RequestCode::HeartBeat,
    ]
    .into_iter()
    .map(|c| {
        let code = c.code();
        (code, requests.get_or_create(&CodeLabel { code }).clone())
    })
    .collect();
    let metrics = Metrics {
        requests,
        hot_requests,
        messages_in: Counter::default(),
        bytes_in: Counter::default(),
        messages_out: Counter::default(),
        cold_pulls: Counter::default(),
        send_latency: Histogram::new(exponential_buckets(0.000_025, 2.0, 16)),
        sync_wait: Histogram::new(exponential_buckets(0.000_025, 2.0, 16)),
        slave_lag: Family::default(),
        master_lag: Gauge::default(),
    };
    registry.register(
        "replication_sync_wait_seconds",
        "Time SYNC_MASTER sends waited for a slave",
        metrics.sync_wait.clone(),
    );
    registry.register(
        "replication_slave_lag_bytes",
        "Commit-log bytes each connected slave is behind this master",
        metrics.slave_lag.clone(),
    );
    registry.register(
        "replication_master_lag_bytes",
        "Commit-log bytes this slave is behind its master",
        metrics.master_lag.clone(),
    );
    registry.register(
        "requests",
        "Requests served, by request code",
        metrics.requests.clone(),
    );
    registry.register(
        "messages_stored",
        "Messages stored",
        metrics.messages_in.clone(),
    );
    registry.register(
        "bytes_stored",
        "Bytes appended to the commit log",
        metrics.bytes_in.clone(),
    );
    registry.register(
        "messages_pulled",
        "Messages returned to pulls",
        metrics.messages_out.clone(),
    );
    registry.register(
        "pulls_cold",
        "Pulls of data beyond accessMessageInMemoryMaxRatio of the log's end, read on a blocking thread",
        metrics.cold_pulls.clone(),
    );
    registry.register(
        "send_latency_seconds",
        "Time from a send's arrival to its store acknowledgement (includes SYNC_FLUSH waits)",
        metrics.send_latency.clone(),
    );
    let commitlog_max = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let commitlog_flushed = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let commitlog_indexed = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let checkpoint = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let key_index = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let timers_pending = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let consumers_gauge = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    registry.register(
        "commitlog_max_offset",
        "End of the commit log",
        commitlog_max.clone(),
    );
    registry.register(
        "commitlog_flushed_offset",
        "End of the durable commit log",
        commitlog_flushed.clone(),
    );
    registry.register(
        "commitlog_indexed_offset",
        "End of the commit log consumers can read (indexed into queues): on a slave, far behind commitlog_max_offset means its indexing stopped",
        commitlog_indexed.clone(),
    );
    registry.register(
        "checkpoint_offset",
        "End of the commit log the last checkpoint counts; a crash recovers by rescanning from here, so one falling behind commitlog_max_offset means checkpoints stopped (a failed sync: see the log)",
        checkpoint.clone(),
    );
    registry.register(
        "key_index_offset",
        "End of the commit log the key index covers (QUERY_MESSAGE; -1 with messageIndexEnable=false): far behind commitlog_indexed_offset means it is being rebuilt or cannot be written (see the log)",
        key_index.clone(),
    );
    registry.register(
        "timer_messages_pending",
        "Timer messages read from the timer topic and not yet due (held in memory, about 80 bytes each; reading stops at 2,000,000)",
        timers_pending.clone(),
    );
    registry.register(
        "consumer_clients",
        "Live consumer clients",
        consumers_gauge.clone(),
    );
    let spin = Spin::new(cfg.loop_awake_for());
    registry.register(
        "loop_spin_seconds",
        "Time event loops spent spinning instead of sleeping while sends waited for their group commit or slave (syncWaitSpinMicros)",
        spin.spent.clone(),
    );
    // A broker whose commit log could not be written to disk takes no more messages until a
    // restart recovers the log: it says so here, so probes and rollouts see it.
    // Weak: an HTTP connection kept alive (a metrics scraper) must not keep the store, and
    // its lock, after the broker stopped.
    let fault_store = Arc::downgrade(&store);
    health.started(
        registry,
        Some(Box::new(move || {
            let fault_store = fault_store.upgrade()?;
            if let Some(e) = fault_store.commitlog().stopped() {
                return Some(format!(
                    "{e}; the store takes no more messages: restart the broker to recover its log"
                ));
            }
            fault_store
                .disk_full()
                .map(|used| StoreError::DiskFull(used).to_string())
        })),
    );

    let broker = Arc::new(Broker {
        cfg: ArcSwap::from_pointee(cfg.clone()),
        role: cfg.role,
        updating_cfg: tokio::sync::Mutex::new(Vec::new()),
        perm_changes: std::sync::atomic::AtomicI64::new(0),
        store,
        consumers: clients::ConsumerRegistry::default(),
        selectors: Default::default(),
        producers: clients::ProducerRegistry::default(),
        locks: locks::QueueLocks::new(Duration::from_millis(cfg.rebalance_lock_max_live_ms)),
        rates: rates::Rates::default(),
        metrics,
        next_queue: AtomicUsize::new(0),
        wiped: AtomicBool::new(false),
        topics_changed: Notify::new(),
        pool: ConnectionPool::default(),
        scheduler,
        timers,
        tx_progress: std::sync::Mutex::default(),
        replication: (cfg.role != BrokerRole::Slave).then(|| {
            ReplicationMaster::new(&cfg.broker_name, cfg.ha_auth_token.clone(), cfg.ha_max_gap)
        }),
        master_ha: watch::channel(cfg.ha_master_address.clone()).0,
        master_addr: std::sync::Mutex::new(None),
        master_seen: std::sync::Mutex::new(None),
        total_memory: total_memory(),
        health: health.clone(),
    });
    if cfg.auto_create_topic && cfg.role != BrokerRole::Slave {
        broker.ensure_topic(
            AUTO_CREATE_TOPIC,
            cfg.default_topic_queue_nums,
            PERM_INHERIT | PERM_READ | PERM_WRITE,
        )?;
    }
    if cfg.role != BrokerRole::Slave {
        // Where consumers send replies to request messages this cluster stored (Java creates
        // it on every broker; slaves copy it).
        broker.ensure_topic(
            &relay::reply_topic(&cfg.cluster_name),
            1,
            PERM_READ | PERM_WRITE,
        )?;
    }

    let loops =
        EventLoops::start("remoting", cfg.io_threads, spin, &shutdown).map_err(|source| {
            BrokerError::Threads {
                threads: cfg.io_threads,
                source,
            }
        })?;
    let first_loop = loops.first_loop();
    let mut tasks = vec![http_task];
    tasks.push(tokio::spawn(serve(
        listener,
        broker.clone(),
        cfg.max_frame_bytes,
        shutdown.clone(),
        loops,
    )));

    // Replication: masters serve their slaves, slaves follow their master.
    if let Some(state) = &broker.replication {
        let ha_listen = SocketAddr::new(cfg.listen_ip(), cfg.ha_listen_port);
        let ha = crate::net::bind(ha_listen)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: ha_listen,
                source,
            })?;
        tasks.push(tokio::spawn(master::serve(
            ha,
            broker.store.clone(),
            state.clone(),
            shutdown.clone(),
            first_loop,
        )));
    } else {
        let me = SlaveIdentity {
            group: cfg.broker_name.clone(),
            token: cfg.ha_auth_token.clone().unwrap_or_default(),
        };
        let rx = broker.master_ha.subscribe();
        tasks.push(tokio::spawn(slave::follow(
            broker.store.clone(),
            me,
            rx,
            shutdown.clone(),
        )));
        let b = broker.clone();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                b.sync_from_master().await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }));
    }

    // Registration: at start, on every topic change, and every registerNameServerPeriod.
    // While no name server answers, rounds come every second (name servers starting after
    // the broker, or back from an outage, should not leave it unready for a whole period).
    // A name server drops a broker whose connection to it closes (as Java's does): when one
    // that took the registration is no longer connected, the broker registers again at once
    // rather than staying out of its routes until the next period.
    let (mut took, mut unheard) = broker.register_all().await;
    let b = broker.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let period = b.cfg().register_period();
        loop {
            let next = tokio::time::Instant::now()
                + if unheard {
                    Duration::from_secs(1)
                } else {
                    period
                };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => break,
                    _ = b.topics_changed.notified() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if took.iter().any(|a| !b.pool.connected(a)) {
                            break;
                        }
                    }
                }
            }
            (took, unheard) = b.register_all().await;
        }
    }));

    // Chores: client and queue-lock expiry, metrics gauges, retention.
    let b = broker.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_retention = std::time::Instant::now();
        let mut unwritable = false;
        let mut ticks: u64 = 0;
        let mut disk_over = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !unwritable && b.store.commitlog().stopped().is_some() {
                // Register again at once, without write permission.
                unwritable = true;
                b.topics_changed.notify_one();
            }
            b.consumers.expire();
            b.producers.expire();
            b.locks.expire(std::time::Instant::now());
            b.rates.sample(
                std::time::Instant::now(),
                rates::utc_day(),
                b.metrics.messages_in.get(),
                b.metrics.messages_out.get(),
            );
            if let Some(r) = &b.replication {
                let end = b.store.commitlog().max_offset();
                b.metrics.slave_lag.clear();
                for s in r.slaves() {
                    b.metrics
                        .slave_lag
                        .get_or_create(&SlaveLabel {
                            slave: s.addr.to_string(),
                        })
                        .set(end.saturating_sub(s.acked) as i64);
                }
            }
            consumers_gauge.set(b.consumers.client_count() as i64);
            commitlog_max.set(b.store.commitlog().max_offset() as i64);
            commitlog_indexed.set(b.store.dispatched_offset() as i64);
            checkpoint.set(b.store.checkpoint_offset() as i64);
            key_index.set(b.store.key_index_offset().map_or(-1, |o| o as i64));
            timers_pending.set(b.timers.pending() as i64);
            commitlog_flushed.set(b.store.commitlog().flushed_offset() as i64);
            // How full the disk is, every 10 s (a statvfs call): past diskMaxUsedSpaceRatio
            // expired segments go at once; past diskSpaceWarningLevelRatio the store refuses
            // messages (the readiness check says why).
            if ticks.is_multiple_of(10) {
                let was_full = b.store.disk_full().is_some();
                match b.store.measure_disk() {
                    Ok(used) => {
                        disk_over = used * 100.0 > f64::from(b.cfg().disk_max_used_percent);
                        match (was_full, b.store.disk_full()) {
                            (false, Some(_)) => tracing::error!(used = format!("{:.1}%", used * 100.0), "the store's disk is full: messages are refused until space is freed"),
                            (true, None) => tracing::warn!(used = format!("{:.1}%", used * 100.0), "the store's disk has room again: messages are taken"),
                            _ => {}
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot measure the store's disk"),
                }
            }
            ticks += 1;
            // Segments are deleted in the deleteWhen hour, or whenever the disk is fuller
            // than diskMaxUsedSpaceRatio; a queue-minimum correction that failed then is
            // tried again every minute.
            let deleting = retention_hour(&b.cfg().delete_when_hours) || disk_over;
            if last_retention.elapsed() >= Duration::from_secs(60)
                && (deleting || b.store.queue_minimums_behind())
            {
                last_retention = std::time::Instant::now();
                let s = b.store.clone();
                let reserved = Duration::from_secs(b.cfg().file_reserved_hours.saturating_mul(3600));
                let run = move || match deleting {
                    true => s.delete_expired(reserved),
                    false => s.correct_queue_minimums(),
                };
                match tokio::task::spawn_blocking(run).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
                    Err(e) => tracing::error!(error = %e, "retention task failed"),
                    Ok(Ok(())) => {}
                }
            }
        }
    }));
    // Transaction checks (masters only, as Java's; slaves have the progress from their
    // master's consumer offsets).
    let b = broker.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if !b.is_master() {
            return;
        }
        loop {
            // Read each time: it may change while the broker runs.
            let every = Duration::from_millis(b.cfg().transaction_check_interval_ms);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if b.store.commitlog().stopped().is_some() || b.store.disk_full().is_some() {
                continue;
            }
            match b.check_transactions().await {
                Ok(0) => {}
                Ok(asked) => tracing::info!(asked, "producers asked about undecided transactions"),
                Err(e) => tracing::error!(error = %e, "transaction check failed"),
            }
        }
    }));
    // Delayed delivery (masters only: slaves receive the results through replication).
    let b = broker.clone();
    let stop = shutdown.clone();
    let is_master = broker.is_master();
    tasks.push(tokio::spawn(async move {
        if !is_master {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(schedule::TICK) => {}
            }
            // A store that stopped takes nothing: the due messages wait for the restart (the
            // store said why, once).
            if b.store.commitlog().stopped().is_some() || b.store.disk_full().is_some() {
                continue;
            }
            if let Err(e) = b.scheduler.deliver_due(&b.store).await {
                tracing::error!(error = %e, "delayed delivery failed");
            }
            // Also with timerWheelEnable=false: it refuses new timer messages, and those
            // already waiting are still delivered (and kept from retention).
            let pass = {
                let cfg = b.cfg();
                timer::Pass {
                    cfg: cfg.timer,
                    // Half the retention (at least 10 minutes): a waiting message's copy is
                    // never older than that, so retention never takes it first.
                    roll_after_ms: (cfg.file_reserved_hours.saturating_mul(1_800_000) as i64)
                        .max(600_000),
                }
            };
            if let Err(e) = b.timers.deliver_due(&b.store, pass).await {
                tracing::error!(error = %e, "timer delivery failed");
            }
        }
    }));
    tracing::info!(
        %addr,
        %http_addr,
        name = %cfg.broker_name,
        id = cfg.broker_id,
        role = cfg.role.as_str(),
        flush = ?cfg.flush,
        "broker started"
    );
    failed_start.disarm();
    close_store.disarm();
    Ok(BrokerHandle {
        addr,
        http_addr,
        broker,
        shutdown,
        tasks,
    })
}

/// Physical memory in bytes (Linux), or 8 GiB where it cannot be read.
fn total_memory() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    usable_memory(
        read("/proc/meminfo").as_deref(),
        &[
            read("/sys/fs/cgroup/memory.max"),
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        ],
    )
}

/// The machine's memory (`meminfo`), or the lowest cgroup limit when lower: in a pod the
/// limit is what the page cache can hold for the broker, as the JVM reckons it for Java's.
/// 8 GiB when the machine's cannot be read.
fn usable_memory(meminfo: Option<&str>, cgroup_limits: &[Option<String>]) -> u64 {
    let machine = meminfo
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024);
    cgroup_limits
        .iter()
        .flatten()
        // "max" (cgroup v2) and unparsable values set no limit.
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .filter(|l| *l > 0)
        .fold(machine, u64::min)
}

/// Whether it is now one of the configured `deleteWhen` hours (UTC).
fn retention_hour(hours: &[u32]) -> bool {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    hours.contains(&(((secs / 3600) % 24) as u32))
}
