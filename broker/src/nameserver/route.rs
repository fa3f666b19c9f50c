//! The name server's route table: which groups exist, which brokers are alive, and where each
//! topic's queues are. Pure state; the processor and the expiry timer drive it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::remoting::body::{
    BrokerData, ClusterInfo, QueueData, TopicConfigWrapper, TopicRouteData,
};
use crate::store::topics::PERM_WRITE;

#[derive(Debug, Clone)]
struct LiveBroker {
    last_seen: Instant,
    /// The connection its latest registration came on: when that closes, the broker is
    /// gone (as Java's name server drops it on channel close).
    via: Option<SocketAddr>,
    timeout: Duration,
    ha_addr: Option<String>,
    cluster: String,
    broker_name: String,
    broker_id: i64,
    /// Version of the topic table its last registration carried.
    data_version: crate::store::topics::DataVersion,
}

/// What a registration tells the registering broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterOutcome {
    /// The group master's HA address (for slaves).
    pub ha_server_addr: Option<String>,
    /// The group master's address (for slaves).
    pub master_addr: Option<String>,
}

#[cfg(test)]
impl RouteTable {
    /// The address registered as `broker_id` of group `broker_name`, and whether it counts as
    /// alive (tests).
    pub(crate) fn registered(&self, broker_name: &str, broker_id: i64) -> Option<(String, bool)> {
        let addr = self
            .brokers
            .get(broker_name)?
            .broker_addrs
            .get(&broker_id)?;
        Some((addr.clone(), self.live.contains_key(addr)))
    }
}

/// Why a registration was refused: another live broker holds the same brokerId of the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// Address of the broker registered under that id.
    pub existing: String,
    /// What the refused broker is told.
    pub reason: String,
}

/// Every route the name server knows.
#[derive(Debug, Default)]
pub struct RouteTable {
    brokers: BTreeMap<String, BrokerData>,
    clusters: BTreeMap<String, BTreeSet<String>>,
    topics: BTreeMap<String, BTreeMap<String, QueueData>>,
    live: HashMap<String, LiveBroker>,
}

/// A registration, as REGISTER_BROKER carries it.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Cluster name.
    pub cluster: String,
    /// Group name.
    pub broker_name: String,
    /// Broker address.
    pub broker_addr: String,
    /// 0 for the master.
    pub broker_id: i64,
    /// HA address (masters).
    pub ha_addr: Option<String>,
    /// How long to keep the broker without a new registration.
    pub timeout: Duration,
    /// The connection the registration came on (none for registrations made in-process).
    pub via: Option<SocketAddr>,
    /// The broker's topics.
    pub topics: TopicConfigWrapper,
}

impl RouteTable {
    /// Records a broker's registration (or heartbeat) at `now`.
    pub fn register(&mut self, r: &Registration, now: Instant) -> Result<RegisterOutcome, Refused> {
        // One address per brokerId in a group: a second master (or a second slave with the
        // same id) is refused while the first is alive.
        if let Some(existing) = self
            .brokers
            .get(&r.broker_name)
            .and_then(|b| b.broker_addrs.get(&r.broker_id))
        {
            let alive = self
                .live
                .get(existing)
                .is_some_and(|l| now.duration_since(l.last_seen) <= l.timeout);
            if *existing != r.broker_addr && alive {
                let what = if r.broker_id == 0 {
                    "a master".to_string()
                } else {
                    format!("brokerId {}", r.broker_id)
                };
                return Err(Refused {
                    existing: existing.clone(),
                    reason: format!(
                        "group {} already has {what} at {existing}; {} cannot register as \
                         brokerId {} (check brokerName/brokerId, or wait until the old broker \
                         expires)",
                        r.broker_name, r.broker_addr, r.broker_id
                    ),
                });
            }
        }
        // The address was another group's: that broker is gone and something new listens
        // there (a pod IP reused). Its entry would otherwise be kept alive by the newcomer's
        // registrations and route its topics to the wrong group for good.
        if let Some(old) = self
            .live
            .get(&r.broker_addr)
            .filter(|l| l.broker_name != r.broker_name || l.cluster != r.cluster)
            .map(|l| l.broker_name.clone())
        {
            tracing::warn!(addr = %r.broker_addr, old = %old, new = %r.broker_name, "a broker of another group now registers at this address; the old one is dropped");
            self.unregister(&old, &r.broker_addr);
        }
        self.clusters
            .entry(r.cluster.clone())
            .or_default()
            .insert(r.broker_name.clone());
        let bd = self
            .brokers
            .entry(r.broker_name.clone())
            .or_insert_with(|| BrokerData {
                cluster: r.cluster.clone(),
                broker_name: r.broker_name.clone(),
                ..Default::default()
            });
        // A broker that moved to another id (e.g. a restarted pod) must not stay listed twice.
        bd.broker_addrs
            .retain(|id, addr| *id == r.broker_id || *addr != r.broker_addr);
        bd.broker_addrs.insert(r.broker_id, r.broker_addr.clone());
        bd.cluster = r.cluster.clone();
        // As Java's name server: a registration whose topic table has the version of the
        // last one (the periodic re-registration) leaves the queues as they are, so a
        // `wipeWritePerm` made on the name servers alone lasts until the broker's topics
        // change, instead of being undone within 30 s.
        let table_changed = self
            .live
            .get(&r.broker_addr)
            .is_none_or(|l| l.data_version != r.topics.data_version);
        if r.broker_id == 0 && table_changed {
            // Only the master's registration defines the topic's queues (as in RocketMQ).
            let mut present = BTreeSet::new();
            for (name, cfg) in &r.topics.topic_config_table {
                present.insert(name.clone());
                self.topics.entry(name.clone()).or_default().insert(
                    r.broker_name.clone(),
                    QueueData {
                        broker_name: r.broker_name.clone(),
                        read_queue_nums: cfg.read_queue_nums,
                        write_queue_nums: cfg.write_queue_nums,
                        perm: cfg.perm,
                        topic_sys_flag: cfg.topic_sys_flag,
                    },
                );
            }
            // Topics the master no longer has are gone from this group.
            for (topic, groups) in self.topics.iter_mut() {
                if !present.contains(topic) {
                    groups.remove(&r.broker_name);
                }
            }
            self.topics.retain(|_, g| !g.is_empty());
        }
        self.live.insert(
            r.broker_addr.clone(),
            LiveBroker {
                last_seen: now,
                via: r.via,
                timeout: r.timeout,
                ha_addr: r.ha_addr.clone(),
                cluster: r.cluster.clone(),
                broker_name: r.broker_name.clone(),
                broker_id: r.broker_id,
                data_version: r.topics.data_version.clone(),
            },
        );
        if r.broker_id == 0 {
            return Ok(RegisterOutcome::default());
        }
        let master = self
            .brokers
            .get(&r.broker_name)
            .and_then(|b| b.master_addr().map(String::from));
        Ok(RegisterOutcome {
            ha_server_addr: master
                .as_ref()
                .and_then(|m| self.live.get(m))
                .and_then(|l| l.ha_addr.clone()),
            master_addr: master,
        })
    }

    /// Drops `addr` from `broker_id` of group `broker_name` if it still holds that id and has
    /// not registered since `since` (when it was found not to answer); returns whether it did.
    pub fn drop_silent(
        &mut self,
        broker_name: &str,
        broker_id: i64,
        addr: &str,
        since: Instant,
    ) -> bool {
        let holds = self
            .brokers
            .get(broker_name)
            .and_then(|b| b.broker_addrs.get(&broker_id))
            .is_some_and(|a| a == addr);
        let heard = self.live.get(addr).is_some_and(|l| l.last_seen >= since);
        if !holds || heard {
            return false;
        }
        self.unregister(broker_name, addr);
        true
    }

    /// Removes a broker (on UNREGISTER_BROKER, expiry, or when it stopped answering).
    pub fn unregister(&mut self, broker_name: &str, broker_addr: &str) {
        self.live.remove(broker_addr);
        let mut group_empty = false;
        let mut cluster = None;
        if let Some(bd) = self.brokers.get_mut(broker_name) {
            bd.broker_addrs.retain(|_, a| a != broker_addr);
            group_empty = bd.broker_addrs.is_empty();
            cluster = Some(bd.cluster.clone());
        }
        if group_empty {
            self.brokers.remove(broker_name);
            if let Some(c) = cluster {
                if let Some(names) = self.clusters.get_mut(&c) {
                    names.remove(broker_name);
                    if names.is_empty() {
                        self.clusters.remove(&c);
                    }
                }
            }
            for groups in self.topics.values_mut() {
                groups.remove(broker_name);
            }
            self.topics.retain(|_, g| !g.is_empty());
        }
    }

    /// Drops the brokers whose latest registration came on the connection from `via`, which
    /// just closed; returns their addresses.
    pub fn disconnected(&mut self, via: SocketAddr) -> Vec<String> {
        let gone: Vec<(String, String)> = self
            .live
            .iter()
            .filter(|(_, l)| l.via == Some(via))
            .map(|(a, l)| (l.broker_name.clone(), a.clone()))
            .collect();
        for (name, addr) in &gone {
            self.unregister(name, addr);
        }
        gone.into_iter().map(|(_, a)| a).collect()
    }

    /// Drops brokers whose last registration is older than their timeout; returns their
    /// addresses.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let dead: Vec<(String, String)> = self
            .live
            .iter()
            .filter(|(_, l)| now.duration_since(l.last_seen) > l.timeout)
            .map(|(a, l)| (l.broker_name.clone(), a.clone()))
            .collect();
        for (name, addr) in &dead {
            self.unregister(name, addr);
        }
        dead.into_iter().map(|(_, a)| a).collect()
    }

    /// The route of `topic`, if any group holds it.
    pub fn route(&self, topic: &str) -> Option<TopicRouteData> {
        let groups = self.topics.get(topic)?;
        let mut route = TopicRouteData::default();
        for (name, qd) in groups {
            route.queue_datas.push(qd.clone());
            if let Some(bd) = self.brokers.get(name) {
                route.broker_datas.push(bd.clone());
            }
        }
        Some(route)
    }

    /// Every cluster and group.
    pub fn cluster_info(&self) -> ClusterInfo {
        ClusterInfo {
            broker_addr_table: self.brokers.clone(),
            cluster_addr_table: self.clusters.clone(),
        }
    }

    /// Every topic name.
    pub fn topic_names(&self) -> BTreeSet<String> {
        self.topics.keys().cloned().collect()
    }

    /// Topics with queues on some broker group of `cluster` (GET_TOPICS_BY_CLUSTER).
    pub fn topics_of_cluster(&self, cluster: &str) -> BTreeSet<String> {
        let Some(groups) = self.clusters.get(cluster) else {
            return BTreeSet::new();
        };
        self.topics
            .iter()
            .filter(|(_, queues)| queues.keys().any(|g| groups.contains(g)))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Forgets a topic's queues (DELETE_TOPIC_IN_NAMESRV): those of `cluster`'s groups, or of
    /// every group; returns how many groups lost it.
    pub fn delete_topic(&mut self, topic: &str, cluster: Option<&str>) -> usize {
        let Some(groups) = self.topics.get_mut(topic) else {
            return 0;
        };
        let before = groups.len();
        match cluster.and_then(|c| self.clusters.get(c)) {
            Some(names) => groups.retain(|name, _| !names.contains(name)),
            None if cluster.is_some() => {}
            None => groups.clear(),
        }
        let removed = before - groups.len();
        if groups.is_empty() {
            self.topics.remove(topic);
        }
        removed
    }

    /// Removes write permission from every topic of a group; returns how many topics changed.
    pub fn wipe_write_perm(&mut self, broker_name: &str) -> usize {
        let mut n = 0;
        for groups in self.topics.values_mut() {
            if let Some(qd) = groups.get_mut(broker_name) {
                qd.perm &= !PERM_WRITE;
                n += 1;
            }
        }
        n
    }

    /// Role facts of a registered broker: (cluster, brokerName, brokerId).
    pub fn broker_identity(&self, addr: &str) -> Option<(String, String, i64)> {
        self.live
            .get(addr)
            .map(|l| (l.cluster.clone(), l.broker_name.clone(), l.broker_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::topics::TopicConfig;

    /// A registration whose topic table has a version of its own, as a broker whose topics
    /// changed sends.
    fn reg(name: &str, addr: &str, id: i64, topics: &[&str]) -> Registration {
        static VERSION: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
        let mut w = TopicConfigWrapper::default();
        w.data_version.counter = VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for t in topics {
            w.topic_config_table
                .insert(t.to_string(), TopicConfig::new(t, 4, 6));
        }
        Registration {
            cluster: "c".into(),
            broker_name: name.into(),
            broker_addr: addr.into(),
            broker_id: id,
            ha_addr: Some(format!("{addr}-ha")),
            timeout: Duration::from_secs(120),
            via: None,
            topics: w,
        }
    }

    #[test]
    fn route_lists_every_group_holding_the_topic() {
        let mut t = RouteTable::default();
        let now = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), now).unwrap();
        t.register(&reg("b", "h2:1", 0, &["T", "U"]), now).unwrap();
        let r = t.route("T").unwrap();
        assert_eq!(r.queue_datas.len(), 2);
        assert_eq!(r.broker_datas.len(), 2);
        assert_eq!(t.route("U").unwrap().broker_datas[0].broker_name, "b");
        assert!(t.route("V").is_none());
    }

    #[test]
    fn an_address_another_group_now_registers_at_drops_the_old_group() {
        let mut t = RouteTable::default();
        let now = Instant::now();
        t.register(&reg("a", "h:1", 0, &["TopicOfA"]), now).unwrap();
        // a died; b's pod got its IP and port.
        for i in 0..3 {
            let at = now + Duration::from_secs(60 * i);
            t.register(&reg("b", "h:1", 0, &["TopicOfB"]), at).unwrap();
        }
        assert!(
            t.route("TopicOfA").is_none(),
            "a's topics still routed to h:1"
        );
        assert!(!t.cluster_info().broker_addr_table.contains_key("a"));
        // A new master of a comes up elsewhere and is taken.
        t.register(&reg("a", "h:2", 0, &["TopicOfA"]), now).unwrap();
        let r = t.route("TopicOfA").unwrap();
        assert_eq!(r.broker_datas[0].broker_addrs[&0], "h:2");
    }

    #[test]
    fn a_broker_is_dropped_when_the_connection_it_registered_on_closes() {
        let mut t = RouteTable::default();
        let now = Instant::now();
        let (c1, c2): (SocketAddr, SocketAddr) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.1:40001".parse().unwrap(),
        );
        let mut a = reg("a", "h:1", 0, &["T"]);
        a.via = Some(c1);
        t.register(&a, now).unwrap();
        let mut b = reg("b", "h:2", 0, &["T"]);
        b.via = Some(c1);
        t.register(&b, now).unwrap();
        // b registers again on a new connection: the old one closing no longer concerns it.
        b.via = Some(c2);
        t.register(&b, now).unwrap();
        assert_eq!(t.disconnected(c1), vec!["h:1".to_string()]);
        let r = t.route("T").unwrap();
        assert_eq!(r.broker_datas.len(), 1);
        assert_eq!(r.broker_datas[0].broker_name, "b");
        assert!(t.disconnected(c1).is_empty());
    }

    #[test]
    fn topics_of_a_cluster_are_those_on_its_groups() {
        let mut t = RouteTable::default();
        let now = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), now).unwrap();
        let mut other = reg("b", "h2:1", 0, &["U"]);
        other.cluster = "d".into();
        t.register(&other, now).unwrap();
        assert_eq!(t.topics_of_cluster("c"), BTreeSet::from(["T".to_string()]));
        assert_eq!(t.topics_of_cluster("d"), BTreeSet::from(["U".to_string()]));
        assert!(t.topics_of_cluster("nope").is_empty());
    }

    #[test]
    fn slave_learns_its_master_and_is_listed_by_id() {
        let mut t = RouteTable::default();
        let now = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), now).unwrap();
        let out = t.register(&reg("a", "h2:1", 1, &[]), now).unwrap();
        assert_eq!(out.master_addr.as_deref(), Some("h1:1"));
        assert_eq!(out.ha_server_addr.as_deref(), Some("h1:1-ha"));
        let bd = &t.route("T").unwrap().broker_datas[0];
        assert_eq!(bd.broker_addrs.len(), 2);
        assert_eq!(bd.broker_addrs[&1], "h2:1");
    }

    #[test]
    fn silent_broker_expires_and_its_topics_go_with_its_group() {
        let mut t = RouteTable::default();
        let start = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), start).unwrap();
        t.register(
            &reg("b", "h2:1", 0, &["T"]),
            start + Duration::from_secs(100),
        )
        .unwrap();
        let dead = t.expire(start + Duration::from_secs(121));
        assert_eq!(dead, vec!["h1:1".to_string()]);
        let r = t.route("T").unwrap();
        assert_eq!(r.broker_datas.len(), 1);
        assert_eq!(r.broker_datas[0].broker_name, "b");
        assert!(!t.cluster_info().cluster_addr_table["c"].contains("a"));
    }

    #[test]
    fn a_silent_broker_is_dropped_only_if_it_holds_the_id_and_was_not_heard_since() {
        let mut t = RouteTable::default();
        let start = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), start).unwrap();
        let later = start + Duration::from_secs(1);
        // It registered after the probe began: still alive.
        assert!(!t.drop_silent("a", 0, "h1:1", start));
        // Another address, or another id, is not the one probed.
        assert!(!t.drop_silent("a", 0, "h2:1", later));
        assert!(!t.drop_silent("a", 1, "h1:1", later));
        assert!(t.registered("a", 0).is_some());
        assert!(t.drop_silent("a", 0, "h1:1", later));
        assert_eq!(t.registered("a", 0), None);
    }

    #[test]
    fn second_master_of_a_group_is_refused_while_the_first_lives() {
        let mut t = RouteTable::default();
        let start = Instant::now();
        t.register(&reg("a", "h1:1", 0, &["T"]), start).unwrap();
        let err = t.register(&reg("a", "h9:1", 0, &["T"]), start).unwrap_err();
        assert!(err.reason.contains("already has a master at h1:1"), "{err}");
        assert_eq!(err.existing, "h1:1");
        // Re-registering the same master is a heartbeat, not a conflict.
        t.register(&reg("a", "h1:1", 0, &["T"]), start).unwrap();
        // Once the first expires, the new one may take over.
        t.register(
            &reg("a", "h9:1", 0, &["T"]),
            start + Duration::from_secs(121),
        )
        .unwrap();
        assert_eq!(
            t.route("T").unwrap().broker_datas[0].broker_addrs[&0],
            "h9:1"
        );
    }

    #[test]
    fn a_deleted_topic_leaves_the_routes_of_the_named_cluster_or_of_all() {
        let mut t = RouteTable::default();
        t.register(&reg("a", "h1:1", 0, &["T", "U"]), Instant::now())
            .unwrap();
        let mut other = reg("b", "h2:1", 0, &["T"]);
        other.cluster = "d".into();
        t.register(&other, Instant::now()).unwrap();
        // Only cluster d's group loses T.
        assert_eq!(t.delete_topic("T", Some("d")), 1);
        let route = t.route("T").unwrap();
        assert_eq!(route.queue_datas.len(), 1);
        assert_eq!(route.queue_datas[0].broker_name, "a");
        // An unknown cluster: nothing. No cluster: every group.
        assert_eq!(t.delete_topic("T", Some("nope")), 0);
        assert_eq!(t.delete_topic("T", None), 1);
        assert!(t.route("T").is_none());
        assert!(t.route("U").is_some());
        assert_eq!(t.delete_topic("T", None), 0);
    }

    #[test]
    fn wipe_write_perm_leaves_read_and_lasts_until_the_brokers_topics_change() {
        let mut t = RouteTable::default();
        let first = reg("a", "h1:1", 0, &["T", "U"]);
        t.register(&first, Instant::now()).unwrap();
        assert_eq!(t.wipe_write_perm("a"), 2);
        assert_eq!(t.route("T").unwrap().queue_datas[0].perm, 4);
        // The periodic re-registration (same table version) does not undo the wipe.
        t.register(&first, Instant::now()).unwrap();
        assert_eq!(t.route("T").unwrap().queue_datas[0].perm, 4);
        // A changed table is taken as the broker sends it.
        t.register(&reg("a", "h1:1", 0, &["T", "U"]), Instant::now())
            .unwrap();
        assert_eq!(t.route("T").unwrap().queue_datas[0].perm, 6);
    }
}
