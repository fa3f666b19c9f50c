//! Which clients are in which consumer group, and what they subscribe to: fed by heartbeats,
//! trimmed by disconnects and silence, and announced to the group when it changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::remoting::body::{ConsumerData, SubscriptionData};
use crate::remoting::connection::ClientLink;
use crate::remoting::{RemotingCommand, RequestCode};

/// How long a client stays registered without a heartbeat (RocketMQ: 120 s).
pub const CLIENT_EXPIRY: Duration = Duration::from_secs(120);

/// Where a heartbeat came from: the client's connection, and what its requests say of it.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// Remote address of the connection.
    pub addr: SocketAddr,
    /// Pushes and calls to the client (NOTIFY_CONSUMER_IDS_CHANGED, CHECK_TRANSACTION_STATE,
    /// relayed admin requests, replies).
    pub link: ClientLink,
    /// The client's language (JAVA, GO, CPP, ...), from its request header.
    pub language: &'static str,
    /// The client's version, from its request header.
    pub version: i32,
}

#[derive(Debug)]
struct ClientEntry {
    conn: ClientConn,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Group {
    clients: BTreeMap<String, ClientEntry>,
    subscriptions: HashMap<String, SubscriptionData>,
    consume_from_where: Option<serde_json::Value>,
    consume_type: Option<serde_json::Value>,
    message_model: Option<serde_json::Value>,
}

/// What GET_CONSUMER_CONNECTION_LIST answers: a group's clients and subscriptions (Java's
/// `ConsumerConnection`, which `mqadmin consumerConnection` and dashboards read).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerConnection {
    /// Each client of the group.
    pub connection_set: Vec<Connection>,
    /// Topic to subscription.
    pub subscription_table: BTreeMap<String, SubscriptionData>,
    /// As the clients' heartbeats say.
    pub consume_type: serde_json::Value,
    /// As the clients' heartbeats say.
    pub message_model: serde_json::Value,
    /// As the clients' heartbeats say.
    pub consume_from_where: serde_json::Value,
}

/// One client of a group, as Java's `Connection` names its fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The client's id.
    pub client_id: String,
    /// `host:port` of its connection.
    pub client_addr: String,
    /// Its language.
    pub language: &'static str,
    /// Its version.
    pub version: i32,
}

/// Consumer groups known to this broker.
#[derive(Debug, Default)]
pub struct ConsumerRegistry {
    groups: Mutex<HashMap<String, Group>>,
}

impl ConsumerRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat of `client_id` for one consumer group; tells the group if its
    /// membership changed.
    pub fn heartbeat(&self, client_id: &str, data: &ConsumerData, from: &ClientConn) {
        let changed = {
            let mut groups = self.lock();
            let g = groups.entry(data.group_name.clone()).or_default();
            // As Java's ConsumerGroupInfo: a subscription is replaced only by a newer version
            // (clients stamp it with the time it was made), so during a rolling change of
            // tags an older client's heartbeat does not swing the group's filter back and
            // forth; and topics the heartbeat no longer names are dropped.
            // A topic added or dropped changes which queues the group's clients share out, so
            // the group is told, as for a client joining (Java's updateSubscription).
            let mut topics_changed = false;
            for s in &data.subscription_data_set {
                match g.subscriptions.get(&s.topic) {
                    Some(old) if old.sub_version > s.sub_version => {}
                    old => {
                        topics_changed |= old.is_none();
                        g.subscriptions.insert(s.topic.clone(), s.clone());
                    }
                }
            }
            let before = g.subscriptions.len();
            g.subscriptions
                .retain(|topic, _| data.subscription_data_set.iter().any(|s| &s.topic == topic));
            topics_changed |= g.subscriptions.len() != before;
            g.consume_from_where = Some(data.consume_from_where.clone());
            g.consume_type = Some(data.consume_type.clone());
            g.message_model = Some(data.message_model.clone());
            let entry = ClientEntry {
                conn: from.clone(),
                last_seen: Instant::now(),
            };
            let joined = g.clients.insert(client_id.to_string(), entry).is_none();
            if joined {
                tracing::info!(group = %data.group_name, client = client_id, "consumer joined");
            } else if topics_changed {
                tracing::info!(group = %data.group_name, client = client_id, "consumer group's topics changed");
            }
            joined || topics_changed
        };
        if changed {
            self.notify(&data.group_name);
        }
    }

    /// Removes a client from a group (UNREGISTER_CLIENT).
    pub fn unregister(&self, client_id: &str, group: &str) {
        let removed = self
            .lock()
            .get_mut(group)
            .is_some_and(|g| g.clients.remove(client_id).is_some());
        if removed {
            tracing::info!(group, client = client_id, "consumer left");
            self.notify(group);
        }
    }

    /// Removes every client that was on a closed connection.
    pub fn disconnected(&self, addr: SocketAddr) {
        let mut changed = Vec::new();
        for (name, g) in self.lock().iter_mut() {
            let before = g.clients.len();
            g.clients.retain(|_, c| c.conn.addr != addr);
            if g.clients.len() != before {
                changed.push(name.clone());
            }
        }
        for g in changed {
            tracing::info!(group = %g, peer = %addr, "consumer connection closed");
            self.notify(&g);
        }
    }

    /// Drops clients silent for longer than [`CLIENT_EXPIRY`].
    pub fn expire(&self) {
        let mut changed = Vec::new();
        for (name, g) in self.lock().iter_mut() {
            let before = g.clients.len();
            g.clients
                .retain(|_, c| c.last_seen.elapsed() < CLIENT_EXPIRY);
            if g.clients.len() != before {
                changed.push(name.clone());
            }
        }
        for g in changed {
            self.notify(&g);
        }
    }

    /// One client of a group, to relay an admin tool's request to (Java's `findChannel`).
    pub fn client(&self, group: &str, client_id: &str) -> Option<ClientConn> {
        self.lock()
            .get(group)?
            .clients
            .get(client_id)
            .filter(|c| !c.conn.link.is_closed())
            .map(|c| c.conn.clone())
    }

    /// Client ids of a group.
    pub fn client_ids(&self, group: &str) -> Vec<String> {
        self.lock()
            .get(group)
            .map(|g| g.clients.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A group's clients and subscriptions; `None` when no client of it is online.
    pub fn connections(&self, group: &str) -> Option<ConsumerConnection> {
        let groups = self.lock();
        let g = groups.get(group).filter(|g| !g.clients.is_empty())?;
        Some(ConsumerConnection {
            connection_set: g
                .clients
                .iter()
                .map(|(id, c)| Connection {
                    client_id: id.clone(),
                    client_addr: c.conn.addr.to_string(),
                    language: c.conn.language,
                    version: c.conn.version,
                })
                .collect(),
            subscription_table: g
                .subscriptions
                .iter()
                .map(|(t, s)| (t.clone(), s.clone()))
                .collect(),
            consume_type: g.consume_type.clone().unwrap_or_default(),
            message_model: g.message_model.clone().unwrap_or_default(),
            consume_from_where: g.consume_from_where.clone().unwrap_or_default(),
        })
    }

    /// A group's subscription of `topic`, from its heartbeats.
    pub fn subscription(&self, group: &str, topic: &str) -> Option<SubscriptionData> {
        self.lock()
            .get(group)
            .and_then(|g| g.subscriptions.get(topic).cloned())
    }

    /// Groups with at least one live client.
    pub fn groups(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, g)| !g.clients.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Total live consumer clients.
    pub fn client_count(&self) -> usize {
        self.lock().values().map(|g| g.clients.len()).sum()
    }

    /// Pushes NOTIFY_CONSUMER_IDS_CHANGED to every client of a group so they rebalance now.
    fn notify(&self, group: &str) {
        let targets: Vec<mpsc::Sender<RemotingCommand>> = self
            .lock()
            .get(group)
            .map(|g| {
                g.clients
                    .values()
                    .map(|c| c.conn.link.push.clone())
                    .collect()
            })
            .unwrap_or_default();
        for t in targets {
            let mut cmd = RemotingCommand::request(
                RequestCode::NotifyConsumerIdsChanged.code(),
                Default::default(),
            )
            .with_ext("consumerGroup", group);
            cmd.flag |= crate::remoting::command::FLAG_ONEWAY;
            // Best effort: a full queue means the client is busy and will rebalance on its timer.
            let _ = t.try_send(cmd);
        }
    }
}

/// Producer groups known to this broker, from heartbeats: whom to ask how a transaction
/// ended (CHECK_TRANSACTION_STATE).
#[derive(Debug, Default)]
pub struct ProducerRegistry {
    groups: Mutex<HashMap<String, BTreeMap<String, ClientEntry>>>,
    /// Spreads the checks over a group's producers.
    turn: std::sync::atomic::AtomicUsize,
}

impl ProducerRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<String, ClientEntry>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat of `client_id` for one producer group.
    pub fn heartbeat(&self, client_id: &str, group: &str, from: &ClientConn) {
        let entry = ClientEntry {
            conn: from.clone(),
            last_seen: Instant::now(),
        };
        let mut groups = self.lock();
        let clients = groups.entry(group.to_string()).or_default();
        if clients.insert(client_id.to_string(), entry).is_none() {
            tracing::info!(group, client = client_id, "producer joined");
        }
    }

    /// Removes a client from a group (UNREGISTER_CLIENT).
    pub fn unregister(&self, client_id: &str, group: &str) {
        let mut groups = self.lock();
        if let Some(clients) = groups.get_mut(group) {
            clients.remove(client_id);
            if clients.is_empty() {
                groups.remove(group);
            }
        }
    }

    /// Removes every client that was on a closed connection.
    pub fn disconnected(&self, addr: SocketAddr) {
        self.retain(|c| c.conn.addr != addr);
    }

    /// Drops clients silent for longer than [`CLIENT_EXPIRY`].
    pub fn expire(&self) {
        self.retain(|c| c.last_seen.elapsed() < CLIENT_EXPIRY);
    }

    fn retain(&self, keep: impl Fn(&ClientEntry) -> bool) {
        let mut groups = self.lock();
        for clients in groups.values_mut() {
            clients.retain(|_, c| keep(c));
        }
        groups.retain(|_, clients| !clients.is_empty());
    }

    /// The connection of the producer client `client_id`, whatever its group: where a reply
    /// to its request goes (Java keys this by client id alone).
    pub fn client(&self, client_id: &str) -> Option<ClientConn> {
        self.lock()
            .values()
            .filter_map(|clients| clients.get(client_id))
            .find(|c| !c.conn.link.is_closed())
            .map(|c| c.conn.clone())
    }

    /// A connection to one of the group's producers, in turn (Java's getAvailableChannel);
    /// `None` when none is online.
    pub fn channel(&self, group: &str) -> Option<ClientConn> {
        let groups = self.lock();
        let clients = groups.get(group)?;
        let open: Vec<&ClientEntry> = clients
            .values()
            .filter(|c| !c.conn.link.is_closed())
            .collect();
        if open.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(open[turn % open.len()].conn.clone())
    }
}

/// A parsed tag expression: `None` matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagFilter(Option<Vec<i64>>);

impl TagFilter {
    /// Parses `*`, empty, or `TagA || TagB`.
    pub fn parse(expr: &str) -> TagFilter {
        let e = expr.trim();
        if e.is_empty() || e == "*" {
            return TagFilter(None);
        }
        let codes = e
            .split("||")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(crate::store::message::tag_hash)
            .collect::<Vec<_>>();
        if codes.is_empty() {
            TagFilter(None)
        } else {
            TagFilter(Some(codes))
        }
    }

    /// Whether a consume-queue tag code may match (clients re-check the tag string).
    pub fn matches(&self, code: i64) -> bool {
        match &self.0 {
            None => true,
            Some(codes) => codes.contains(&code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::message::tag_hash;

    #[test]
    fn tag_filter_matches_listed_tags_only() {
        let f = TagFilter::parse("TagA || TagB");
        assert!(f.matches(tag_hash("TagA")));
        assert!(f.matches(tag_hash("TagB")));
        assert!(!f.matches(tag_hash("TagC")));
        assert!(TagFilter::parse("*").matches(12345));
        assert!(TagFilter::parse("").matches(0));
    }

    fn conn(addr: SocketAddr, push: &mpsc::Sender<RemotingCommand>) -> ClientConn {
        let mut peer = crate::remoting::connection::Peer::detached(addr);
        peer.push = push.clone();
        ClientConn {
            addr,
            link: peer.link(),
            language: "JAVA",
            version: 317,
        }
    }

    #[test]
    fn an_older_subscription_never_replaces_a_newer_one() {
        let reg = ConsumerRegistry::default();
        let (tx, _rx) = mpsc::channel(1);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let beat = |client: &str, subs: &[(&str, &str, i64)]| {
            let data = ConsumerData {
                group_name: "G".into(),
                subscription_data_set: subs
                    .iter()
                    .map(|(topic, expr, version)| SubscriptionData {
                        topic: topic.to_string(),
                        sub_string: expr.to_string(),
                        sub_version: *version,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            reg.heartbeat(client, &data, &conn(addr, &tx));
        };
        let expr = |topic: &str| reg.subscription("G", topic).map(|s| s.sub_string);
        beat("new", &[("T", "A || B", 2), ("U", "*", 1)]);
        // A client still on the old expression, mid-rollout.
        beat("old", &[("T", "A", 1), ("U", "*", 1)]);
        assert_eq!(expr("T").as_deref(), Some("A || B"));
        beat("new", &[("T", "B", 3), ("U", "*", 1)]);
        assert_eq!(expr("T").as_deref(), Some("B"));
        // Clients that stamp no version: the latest heartbeat counts.
        beat("new", &[("T", "C", 3), ("U", "*", 1)]);
        assert_eq!(expr("T").as_deref(), Some("C"));
        // A topic no longer named is dropped.
        beat("new", &[("T", "C", 3)]);
        assert_eq!(expr("U"), None);
    }

    #[test]
    fn the_group_is_told_when_a_client_joins_or_its_topics_change() {
        let reg = ConsumerRegistry::default();
        let (tx, mut rx) = mpsc::channel(16);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let beat = |topics: &[&str], expr: &str| {
            let data = ConsumerData {
                group_name: "G".into(),
                subscription_data_set: topics
                    .iter()
                    .map(|t| SubscriptionData {
                        topic: t.to_string(),
                        sub_string: expr.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            reg.heartbeat("c1", &data, &conn(addr, &tx));
        };
        let mut notified = || {
            let mut n = 0;
            while rx.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        beat(&["T"], "*");
        assert_eq!(notified(), 1, "joined");
        beat(&["T"], "*");
        assert_eq!(notified(), 0, "nothing changed");
        beat(&["T"], "A");
        assert_eq!(
            notified(),
            0,
            "a new expression shares no queues differently"
        );
        beat(&["T", "U"], "*");
        assert_eq!(notified(), 1, "topic added");
        beat(&["U"], "*");
        assert_eq!(notified(), 1, "topic dropped");
    }
}
