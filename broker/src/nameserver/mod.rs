//! The name server: brokers register here, clients ask here where topics live.

pub mod kv;
pub mod route;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::http::{self, HealthState};
use crate::remoting::body::{from_json, to_json, RegisterBrokerBody, TopicList};
use crate::remoting::connection::{serve, Peer, Processor};
use crate::remoting::event_loop::EventLoops;
use crate::remoting::header::{
    DeleteTopicFromNamesrvRequestHeader, KvConfigRequestHeader, KvConfigResponseHeader,
    KvNamespaceRequestHeader, PutKvConfigRequestHeader, RegisterBrokerRequestHeader,
    RegisterBrokerResponseHeader, TopicRequestHeader, TopicsByClusterRequestHeader,
    UnregisterBrokerRequestHeader, WipeWritePermRequestHeader,
};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};
use route::{Registration, RouteTable};

/// Name server settings.
#[derive(Debug, Clone)]
pub struct NameServerConfig {
    /// Address of the remoting port (default every address, IPv6 and IPv4, port 9876).
    pub listen: SocketAddr,
    /// Address of the HTTP port.
    pub http: SocketAddr,
    /// Default broker expiry when a registration names none (RocketMQ: 120 s).
    pub broker_timeout: Duration,
    /// How often expired brokers are looked for.
    pub scan_interval: Duration,
    /// Largest request frame accepted.
    pub max_frame: usize,
    /// How long a broker registered under an id that another broker now claims has to
    /// accept a connection before the newcomer replaces it.
    pub probe_timeout: Duration,
    /// Where the KV config is saved (`kvConfig.json`); none keeps it in memory only.
    pub kv_config_path: Option<std::path::PathBuf>,
    /// Other name servers of the cluster (`host:port`, a name may resolve to several, itself
    /// among them): one starting without KV values copies theirs, so a rolling restart of
    /// name servers without files (on Kubernetes) keeps them.
    pub kv_peers: Vec<String>,
    /// Whether routes carry an ordered topic's queues from the KV config as
    /// `orderTopicConf` (Java's `orderMessageEnable`, off by default: clients then route by
    /// that string alone, ignoring write permission and brokers that are gone).
    pub order_message_enable: bool,
}

impl Default for NameServerConfig {
    fn default() -> Self {
        NameServerConfig {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 9876)),
            http: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 9877)),
            broker_timeout: Duration::from_secs(120),
            scan_interval: Duration::from_secs(1),
            max_frame: crate::remoting::frame::DEFAULT_MAX_FRAME,
            probe_timeout: Duration::from_secs(1),
            kv_config_path: None,
            kv_peers: Vec::new(),
            order_message_enable: false,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CodeLabel {
    code: i32,
}

struct Metrics {
    requests: Family<CodeLabel, Counter>,
    brokers: Gauge,
    expired: Counter,
}

/// Whether something accepts connections at `addr` within `timeout`.
async fn answers(addr: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Request processor of the name server.
pub struct NameServer {
    cfg: NameServerConfig,
    /// Tells this process apart when it asks its peers (a headless Service's names resolve
    /// to itself too).
    instance: String,
    routes: Mutex<RouteTable>,
    kv: kv::KvConfig,
    metrics: Metrics,
}

/// How long a name server starting without KV values keeps asking its peers for theirs
/// (they may be starting too).
const KV_COPY_FOR: Duration = Duration::from_secs(60);
/// How often it asks them again meanwhile.
const KV_COPY_EVERY: Duration = Duration::from_secs(2);

impl NameServer {
    /// Copies the KV values of the first peer that has any (values set here meanwhile win).
    /// Each name server keeps its own copy, as in Java (`mqadmin updateKvConfig` writes to
    /// every one): one restarted without a file would otherwise start with none, and route
    /// ordered topics by nothing. Gives up once every peer found answered without values
    /// (a new cluster), or after [`KV_COPY_FOR`].
    async fn copy_kv_from_peers(&self) {
        let pool = crate::remoting::connection::ConnectionPool::default();
        let deadline = Instant::now() + KV_COPY_FOR;
        while Instant::now() < deadline {
            let peers = crate::server::resolve_all(&self.cfg.kv_peers).await;
            let mut all_answered = !peers.is_empty();
            for peer in peers {
                match self.peer_kv(&pool, &peer).await {
                    Some(table) if !table.is_empty() => {
                        match self.kv.add_missing(&table) {
                            Ok(added) => {
                                tracing::info!(%peer, added, "KV config copied from a peer name server")
                            }
                            Err(e) => {
                                tracing::error!(%peer, error = %e, "saving the KV config copied from a peer failed")
                            }
                        }
                        return;
                    }
                    Some(_) => {}
                    None => all_answered = false,
                }
            }
            if all_answered {
                tracing::info!("no peer name server has KV config to copy");
                return;
            }
            tokio::time::sleep(KV_COPY_EVERY).await;
        }
        tracing::warn!("gave up copying the KV config: no peer name server answered");
    }

    /// A peer's KV values: empty when it has none (or is this name server), `None` when it
    /// did not answer. A name server too old for [`RequestCode::CopyKvConfig`], or Java's,
    /// is asked for the ordered topics' namespace (GET_KVLIST_BY_NAMESPACE) instead.
    async fn peer_kv(
        &self,
        pool: &crate::remoting::connection::ConnectionPool,
        peer: &str,
    ) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
        let timeout = Duration::from_secs(3);
        let mut req = RemotingCommand::request(
            RequestCode::CopyKvConfig.code(),
            crate::remoting::ExtFields::default(),
        );
        req.ext_fields.insert("instance", &self.instance);
        // Java 4's name server does not answer a code it does not know: silence on an open
        // connection is a name server too old for it, as is the code's refusal. Any other
        // error answer is this name server itself.
        match pool.call(peer, req, timeout).await {
            Ok(resp) if resp.code == ResponseCode::Success.code() => {
                return match serde_json::from_slice::<kv::KvFile>(&resp.body) {
                    Ok(t) => Some(t.config_table),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "a peer's KV config could not be read");
                        None
                    }
                };
            }
            Ok(resp) if resp.code != ResponseCode::RequestCodeNotSupported.code() => {
                return Some(BTreeMap::new())
            }
            Ok(_) | Err(crate::remoting::connection::ClientError::Timeout { .. }) => {}
            Err(_) => return None,
        }
        let h = KvNamespaceRequestHeader {
            namespace: kv::ORDER_TOPIC_CONFIG.into(),
        };
        let req = RemotingCommand::request(RequestCode::GetKvlistByNamespace.code(), h.to_ext());
        let resp = pool.call(peer, req, timeout).await.ok()?;
        let mut out = BTreeMap::new();
        if resp.code == ResponseCode::Success.code() {
            if let Ok(t) = serde_json::from_slice::<crate::server::RuntimeInfo>(&resp.body) {
                if !t.table.is_empty() {
                    out.insert(kv::ORDER_TOPIC_CONFIG.to_string(), t.table);
                }
            }
        }
        Some(out)
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, RouteTable> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn register(&self, req: &RemotingCommand, via: Option<SocketAddr>) -> RemotingCommand {
        let h = match RegisterBrokerRequestHeader::from_ext(&req.ext_fields) {
            Ok(h) => h,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        if h.compressed {
            return req.error_to(
                ResponseCode::SystemError,
                "compressed registration bodies are not supported; register uncompressed",
            );
        }
        let body: RegisterBrokerBody = if req.body.is_empty() {
            RegisterBrokerBody::default()
        } else {
            match from_json(&req.body) {
                Ok(b) => b,
                Err(e) => {
                    return req.error_to(
                        ResponseCode::SystemError,
                        format!("registration body is not valid JSON: {e}"),
                    )
                }
            }
        };
        let timeout = h
            .heartbeat_timeout_millis
            .filter(|t| *t > 0)
            .map_or(self.cfg.broker_timeout, |t| Duration::from_millis(t as u64));
        let registration = Registration {
            cluster: h.cluster_name.clone(),
            broker_name: h.broker_name.clone(),
            broker_addr: h.broker_addr.clone(),
            broker_id: h.broker_id,
            ha_addr: h.ha_server_addr,
            timeout,
            via,
            topics: body.topic_config_serialize_wrapper,
        };
        let mut outcome = self.routes().register(&registration, Instant::now());
        if let Err(refused) = &outcome {
            // The broker holding the id may be gone without a word (its pod replaced after
            // its node died): its entry would refuse the replacement, with a new address,
            // until it expires. Java's name server takes the newcomer; this one first checks
            // that the old broker no longer answers, so a second live master is still refused.
            let probed = Instant::now();
            if !answers(&refused.existing, self.cfg.probe_timeout).await {
                // Only if it still holds the id and did not register during the probe.
                let mut routes = self.routes();
                if routes.drop_silent(&h.broker_name, h.broker_id, &refused.existing, probed) {
                    tracing::warn!(old = %refused.existing, new = %h.broker_addr, name = %h.broker_name, id = h.broker_id, "the broker registered under this id does not answer; the new one replaces it");
                    outcome = routes.register(&registration, Instant::now());
                }
            }
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(refused) => {
                tracing::warn!(broker = %h.broker_addr, name = %h.broker_name, id = h.broker_id, conflict = %refused, "registration refused");
                return req.error_to(ResponseCode::SystemError, refused.reason);
            }
        };
        tracing::debug!(broker = %h.broker_addr, name = %h.broker_name, id = h.broker_id, "broker registered");
        let mut resp = req.response_to(ResponseCode::Success);
        resp.ext_fields = RegisterBrokerResponseHeader {
            ha_server_addr: outcome.ha_server_addr,
            master_addr: outcome.master_addr,
        }
        .to_ext();
        resp
    }

    async fn handle(&self, req: &RemotingCommand, peer: &Peer) -> RemotingCommand {
        let Some(code) = RequestCode::from_code(req.code) else {
            return req.error_to(
                ResponseCode::RequestCodeNotSupported,
                format!(
                    "request code {} is not supported by this name server",
                    req.code
                ),
            );
        };
        match code {
            RequestCode::RegisterBroker => self.register(req, Some(peer.addr)).await,
            RequestCode::UnregisterBroker => {
                match UnregisterBrokerRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        self.routes().unregister(&h.broker_name, &h.broker_addr);
                        tracing::info!(broker = %h.broker_addr, name = %h.broker_name, "broker unregistered");
                        req.response_to(ResponseCode::Success)
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::GetRouteinfoByTopic => match TopicRequestHeader::from_ext(&req.ext_fields)
            {
                Ok(h) => match self.routes().route(&h.topic) {
                    Some(mut r) => {
                        // A globally ordered topic's queues, as `updateTopic -o` recorded them.
                        if self.cfg.order_message_enable {
                            r.order_topic_conf = self.kv.get(kv::ORDER_TOPIC_CONFIG, &h.topic);
                        }
                        req.response_to(ResponseCode::Success)
                            .with_body(to_json(&r))
                    }
                    None => req.error_to(
                        ResponseCode::TopicNotExist,
                        format!(
                            "No topic route info in name server for the topic: {}",
                            h.topic
                        ),
                    ),
                },
                Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
            },
            RequestCode::PutKvConfig => match PutKvConfigRequestHeader::from_ext(&req.ext_fields) {
                Ok(h) => match self.kv.put(&h.namespace, &h.key, &h.value) {
                    Ok(()) => req.response_to(ResponseCode::Success),
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                },
                Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
            },
            RequestCode::GetKvConfig => match KvConfigRequestHeader::from_ext(&req.ext_fields) {
                Ok(h) => match self.kv.get(&h.namespace, &h.key) {
                    Some(value) => {
                        let mut resp = req.response_to(ResponseCode::Success);
                        resp.ext_fields = KvConfigResponseHeader { value: Some(value) }.to_ext();
                        resp
                    }
                    None => req.error_to(
                        ResponseCode::QueryNotFound,
                        format!("No config item, Namespace: {} Key: {}", h.namespace, h.key),
                    ),
                },
                Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
            },
            RequestCode::DeleteKvConfig => match KvConfigRequestHeader::from_ext(&req.ext_fields) {
                Ok(h) => match self.kv.delete(&h.namespace, &h.key) {
                    Ok(()) => req.response_to(ResponseCode::Success),
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                },
                Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
            },
            RequestCode::GetKvlistByNamespace => {
                match KvNamespaceRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => match self.kv.namespace(&h.namespace) {
                        Some(table) => req
                            .response_to(ResponseCode::Success)
                            .with_body(to_json(&crate::server::RuntimeInfo { table })),
                        None => req.error_to(
                            ResponseCode::QueryNotFound,
                            format!("No config item, Namespace: {}", h.namespace),
                        ),
                    },
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::CopyKvConfig => {
                if req.ext_fields.get("instance") == Some(self.instance.as_str()) {
                    return req.error_to(ResponseCode::SystemError, "asked itself");
                }
                req.response_to(ResponseCode::Success)
                    .with_body(to_json(&kv::KvFile {
                        config_table: self.kv.all(),
                    }))
            }
            RequestCode::GetBrokerClusterInfo => req
                .response_to(ResponseCode::Success)
                .with_body(to_json(&self.routes().cluster_info())),
            RequestCode::GetAllTopicListFromNameserver => {
                let list = TopicList {
                    topic_list: self.routes().topic_names(),
                };
                req.response_to(ResponseCode::Success)
                    .with_body(to_json(&list))
            }
            RequestCode::GetTopicsByCluster => {
                match TopicsByClusterRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        let list = TopicList {
                            topic_list: self.routes().topics_of_cluster(&h.cluster),
                        };
                        req.response_to(ResponseCode::Success)
                            .with_body(to_json(&list))
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::DeleteTopicInNamesrv => {
                match DeleteTopicFromNamesrvRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        let cluster = h.cluster_name.as_deref().filter(|c| !c.is_empty());
                        let n = self.routes().delete_topic(&h.topic, cluster);
                        tracing::info!(topic = %h.topic, ?cluster, groups = n, "topic deleted from the routes");
                        req.response_to(ResponseCode::Success)
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            RequestCode::WipeWritePermOfBroker => {
                match WipeWritePermRequestHeader::from_ext(&req.ext_fields) {
                    Ok(h) => {
                        let n = self.routes().wipe_write_perm(&h.broker_name);
                        tracing::info!(name = %h.broker_name, topics = n, "write permission wiped");
                        req.response_to(ResponseCode::Success)
                            .with_ext("wipeTopicCount", n)
                    }
                    Err(e) => req.error_to(ResponseCode::SystemError, e.to_string()),
                }
            }
            other => req.error_to(
                ResponseCode::RequestCodeNotSupported,
                format!("{other:?} is a broker request; this is a name server"),
            ),
        }
    }
}

impl Processor for NameServer {
    async fn process(&self, req: RemotingCommand, peer: &Peer) -> Option<RemotingCommand> {
        self.metrics
            .requests
            .get_or_create(&CodeLabel { code: req.code })
            .inc();
        Some(self.handle(&req, peer).await)
    }

    fn disconnected(&self, peer: &Peer) {
        let gone = self.routes().disconnected(peer.addr);
        for addr in gone {
            tracing::info!(broker = %addr, "broker connection closed; broker dropped");
        }
    }
}

/// A running name server.
pub struct NameServerHandle {
    /// Bound remoting address.
    pub addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NameServerHandle {
    /// Stops serving and waits for the accept loops to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Why the name server could not start.
#[derive(Debug, thiserror::Error)]
pub enum NameServerError {
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The KV config file could not be read.
    #[error("KV config: {0}")]
    KvConfig(#[from] crate::store::StoreError),
}

/// Binds the ports and starts serving.
pub async fn start(cfg: NameServerConfig) -> Result<NameServerHandle, NameServerError> {
    let listener = crate::net::bind(cfg.listen)
        .await
        .map_err(|source| NameServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let http_listener = http::bind(cfg.http)
        .await
        .map_err(|source| NameServerError::Bind {
            addr: cfg.http,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| NameServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| NameServerError::Bind {
            addr: cfg.http,
            source,
        })?;

    let mut registry = Registry::with_prefix("ferromq_namesrv");
    let metrics = Metrics {
        requests: Family::default(),
        brokers: Gauge::default(),
        expired: Counter::default(),
    };
    registry.register(
        "requests",
        "Requests served, by request code",
        metrics.requests.clone(),
    );
    registry.register(
        "brokers",
        "Brokers currently registered",
        metrics.brokers.clone(),
    );
    registry.register(
        "brokers_expired",
        "Brokers dropped for missing heartbeats",
        metrics.expired.clone(),
    );
    let health = HealthState::new(registry, None);

    let ns = Arc::new(NameServer {
        cfg: cfg.clone(),
        routes: Mutex::new(RouteTable::default()),
        kv: kv::KvConfig::open(cfg.kv_config_path.clone())?,
        metrics,
        instance: format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
    });
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    // Ready once it holds what its peers hold: a rolling restart then waits for the copy
    // before it stops the next name server, the one that may hold the only copy.
    let copying = ns.kv.is_empty() && !cfg.kv_peers.is_empty();
    if copying {
        let copier = ns.clone();
        let stop = shutdown.clone();
        let ready = health.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = copier.copy_kv_from_peers() => {
                    ready.ready.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }));
    }
    tasks.push(tokio::spawn(serve(
        listener,
        ns.clone(),
        cfg.max_frame,
        shutdown.clone(),
        // Name-server traffic is light: its connections share the process's runtime.
        EventLoops::current(),
    )));
    tasks.push(tokio::spawn(http::serve(
        http_listener,
        health.clone(),
        shutdown.clone(),
    )));
    let scanner = ns.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(scanner.cfg.scan_interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (dead, live) = {
                let mut r = scanner.routes();
                let dead = r.expire(Instant::now());
                let live: usize = r.cluster_info().broker_addr_table.values().map(|b| b.broker_addrs.len()).sum();
                (dead, live)
            };
            for addr in &dead {
                tracing::warn!(broker = %addr, "broker expired: no registration within its timeout");
                scanner.metrics.expired.inc();
            }
            scanner.metrics.brokers.set(live as i64);
        }
    }));
    if !copying {
        health
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
    }
    tracing::info!(%addr, %http_addr, "name server started");
    Ok(NameServerHandle {
        addr,
        http_addr,
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_server() -> NameServer {
        NameServer {
            cfg: NameServerConfig {
                probe_timeout: Duration::from_millis(500),
                ..NameServerConfig::default()
            },
            routes: Mutex::new(RouteTable::default()),
            kv: kv::KvConfig::open(None).unwrap(),
            metrics: Metrics {
                requests: Family::default(),
                brokers: Gauge::default(),
                expired: Counter::default(),
            },
            instance: "me".into(),
        }
    }

    #[tokio::test]
    async fn a_name_server_starting_without_kv_config_copies_a_peers() {
        let start = |peers: Vec<String>| {
            start(NameServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                http: "127.0.0.1:0".parse().unwrap(),
                kv_peers: peers,
                ..NameServerConfig::default()
            })
        };
        let a = start(Vec::new()).await.unwrap();
        let client = crate::client::Client::new(vec![a.addr.to_string()]);
        let put = |ns: &str, k: &str, v: &str| {
            let h = PutKvConfigRequestHeader {
                namespace: ns.into(),
                key: k.into(),
                value: v.into(),
            };
            RemotingCommand::request(RequestCode::PutKvConfig.code(), h.to_ext())
        };
        let a_addr = a.addr.to_string();
        client
            .call_ok(&a_addr, put(kv::ORDER_TOPIC_CONFIG, "T", "broker-a:4"))
            .await
            .unwrap();
        client.call_ok(&a_addr, put("NS", "k", "v")).await.unwrap();
        // A peer that is down is passed over.
        let b = start(vec!["127.0.0.1:1".into(), a_addr.clone()])
            .await
            .unwrap();
        let b_addr = b.addr.to_string();
        let get = |ns: &str, k: &str| {
            let h = KvConfigRequestHeader {
                namespace: ns.into(),
                key: k.into(),
            };
            RemotingCommand::request(RequestCode::GetKvConfig.code(), h.to_ext())
        };
        let mut copied = None;
        for _ in 0..200 {
            if let Ok(resp) = client
                .call_ok(&b_addr, get(kv::ORDER_TOPIC_CONFIG, "T"))
                .await
            {
                copied = resp.ext_fields.get("value").map(String::from);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(copied.as_deref(), Some("broker-a:4"));
        let other = client.call_ok(&b_addr, get("NS", "k")).await.unwrap();
        assert_eq!(other.ext_fields.get("value"), Some("v"));
        // Ready only once copied (a rolling restart waits for it): one whose peers do not
        // answer is not ready yet.
        async fn readyz(http: SocketAddr) -> String {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(http).await.unwrap();
            c.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        }
        let mut ready = String::new();
        for _ in 0..200 {
            ready = readyz(b.http_addr).await;
            if ready.lines().next().is_some_and(|l| l.contains(" 200 ")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            ready.lines().next().is_some_and(|l| l.contains(" 200 ")),
            "{ready}"
        );
        let c = start(vec!["127.0.0.1:1".into()]).await.unwrap();
        let not_ready = readyz(c.http_addr).await;
        assert!(
            not_ready
                .lines()
                .next()
                .is_some_and(|l| l.contains(" 503 ")),
            "{not_ready}"
        );
        c.stop().await;
        b.stop().await;
        a.stop().await;
        // A name server does not take its own (empty) table for a peer's.
        let ns = name_server();
        let mut ask =
            RemotingCommand::request(RequestCode::CopyKvConfig.code(), Default::default());
        ask.ext_fields.insert("instance", "me");
        let peer = Peer::detached("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            ns.handle(&ask, &peer).await.code,
            ResponseCode::SystemError.code()
        );
        ask.ext_fields.insert("instance", "another");
        assert_eq!(
            ns.handle(&ask, &peer).await.code,
            ResponseCode::Success.code()
        );
    }

    fn registration(addr: &str) -> RemotingCommand {
        let h = RegisterBrokerRequestHeader {
            broker_name: "a".into(),
            broker_addr: addr.into(),
            cluster_name: "C".into(),
            ha_server_addr: None,
            broker_id: 0,
            heartbeat_timeout_millis: Some(120_000),
            compressed: false,
            body_crc32: None,
        };
        RemotingCommand::request(RequestCode::RegisterBroker.code(), h.to_ext())
    }

    #[tokio::test]
    async fn kv_config_is_served_and_an_ordered_topic_is_routed_with_its_queues() {
        let ns = name_server();
        let peer = Peer::detached("127.0.0.1:1".parse().unwrap());
        let ok = ResponseCode::Success.code();
        let mut with_t = crate::remoting::body::RegisterBrokerBody::default();
        with_t
            .topic_config_serialize_wrapper
            .topic_config_table
            .insert(
                "T".into(),
                crate::store::topics::TopicConfig::new("T", 4, 6),
            );
        let reg = registration("127.0.0.1:2").with_body(to_json(&with_t));
        assert_eq!(ns.register(&reg, None).await.code, ok);
        // What `mqadmin updateTopic -t T -o true` sends every name server.
        let put = PutKvConfigRequestHeader {
            namespace: kv::ORDER_TOPIC_CONFIG.into(),
            key: "T".into(),
            value: "a:4".into(),
        };
        let req = RemotingCommand::request(RequestCode::PutKvConfig.code(), put.to_ext());
        assert_eq!(ns.handle(&req, &peer).await.code, ok);
        let key = KvConfigRequestHeader {
            namespace: kv::ORDER_TOPIC_CONFIG.into(),
            key: "T".into(),
        };
        let req = RemotingCommand::request(RequestCode::GetKvConfig.code(), key.to_ext());
        let resp = ns.handle(&req, &peer).await;
        assert_eq!(resp.ext_fields.get("value"), Some("a:4"));
        let route = RemotingCommand::request(
            RequestCode::GetRouteinfoByTopic.code(),
            TopicRequestHeader { topic: "T".into() }.to_ext(),
        );
        let r: crate::remoting::body::TopicRouteData =
            from_json(&ns.handle(&route, &peer).await.body).unwrap();
        assert_eq!(
            r.order_topic_conf, None,
            "orderMessageEnable is off by default"
        );
        let ns = NameServer {
            cfg: NameServerConfig {
                order_message_enable: true,
                ..NameServerConfig::default()
            },
            ..ns
        };
        let r: crate::remoting::body::TopicRouteData =
            from_json(&ns.handle(&route, &peer).await.body).unwrap();
        assert_eq!(r.order_topic_conf.as_deref(), Some("a:4"));
        let list = RemotingCommand::request(
            RequestCode::GetKvlistByNamespace.code(),
            KvNamespaceRequestHeader {
                namespace: kv::ORDER_TOPIC_CONFIG.into(),
            }
            .to_ext(),
        );
        let body: serde_json::Value =
            serde_json::from_slice(&ns.handle(&list, &peer).await.body).unwrap();
        assert_eq!(body["table"]["T"], "a:4");
        let req = RemotingCommand::request(RequestCode::DeleteKvConfig.code(), key.to_ext());
        assert_eq!(ns.handle(&req, &peer).await.code, ok);
        let req = RemotingCommand::request(RequestCode::GetKvConfig.code(), key.to_ext());
        assert_eq!(
            ns.handle(&req, &peer).await.code,
            ResponseCode::QueryNotFound.code()
        );
        assert_eq!(
            ns.handle(&list, &peer).await.code,
            ResponseCode::QueryNotFound.code()
        );
    }

    #[tokio::test]
    async fn a_master_that_no_longer_answers_is_replaced_but_a_live_one_is_not() {
        let ns = name_server();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone_addr = gone.local_addr().unwrap().to_string();
        drop(gone);
        let ok = ResponseCode::Success.code();

        // A live master keeps its id: a second one is refused.
        assert_eq!(ns.register(&registration(&live_addr), None).await.code, ok);
        let second = ns.register(&registration("127.0.0.1:1"), None).await;
        assert_eq!(second.code, ResponseCode::SystemError.code());
        assert!(format!("{:?}", second.remark).contains("already has a master"));
        assert_eq!(
            ns.routes().registered("a", 0),
            Some((live_addr.clone(), true)),
            "the live master lost its place"
        );

        // A master that went without a word (nothing listens at its address any more) is
        // replaced at once by its successor, not after it expires.
        let ns = name_server();
        assert_eq!(ns.register(&registration(&gone_addr), None).await.code, ok);
        assert_eq!(ns.register(&registration(&live_addr), None).await.code, ok);
        assert_eq!(ns.routes().registered("a", 0), Some((live_addr, true)));
        drop(live);
    }
}
