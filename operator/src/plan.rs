//! `plan(spec) -> ClusterPlan`: every decision about a cluster, made once and purely. The
//! Kubernetes builders and the local runtime both render this plan, so what the quick start
//! runs is what the cluster runs.

use broker::config::{BrokerConfig, LIVE_SETTINGS};
use sha2::{Digest, Sha256};

use crate::crd::{BrokerClusterSpec, Flush, Replication, OWNED_CONFIG_KEYS};

/// Remoting port of every name server.
pub const NAMESRV_PORT: u16 = 9876;
/// HTTP port of every name server.
pub const NAMESRV_HTTP_PORT: u16 = 9877;
/// Remoting port of every broker.
pub const BROKER_PORT: u16 = 10911;
/// Replication port of every broker.
pub const BROKER_HA_PORT: u16 = 10912;
/// HTTP port of every broker.
pub const BROKER_HTTP_PORT: u16 = 10913;
/// Where the broker's volume is mounted.
pub const STORE_PATH: &str = "/data/store";
/// Where broker.conf is mounted.
pub const CONFIG_DIR: &str = "/etc/ferromq";

/// Longest BrokerCluster name: `<name>-nameserver` and `<name>-broker-999` name StatefulSets,
/// which must fit 52 characters (their pods carry a `controller-revision-hash` label of the
/// StatefulSet name plus an 11-character suffix, and label values fit 63). The CRD refuses
/// longer names; the plan checks again for objects created before that rule.
pub const MAX_CLUSTER_NAME_LEN: usize = 41;
/// Most broker groups a cluster may have: group indices stay within three digits, which
/// [`MAX_CLUSTER_NAME_LEN`] is computed for.
pub const MAX_MASTERS: i32 = 1000;
/// Most slaves a master may have: a typo of a few digits must be refused, not planned as
/// millions of pods (which took the operator down for every cluster it serves).
pub const MAX_SLAVES_PER_MASTER: i32 = 16;
/// Most name servers a cluster may have, for the same reason (every broker registers with
/// each of them).
pub const MAX_NAME_SERVERS: i32 = 32;
/// Longest StatefulSet name whose pods Kubernetes can create.
pub const MAX_STATEFULSET_NAME_LEN: usize = 52;

/// Whether `name` is a DNS-1035 label (what Service names must be): lowercase letters, digits
/// and '-', starting with a letter, ending with a letter or digit, at most 63 characters.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last() != Some(&b'-')
}

/// Why a spec cannot be planned (the schema catches most of these first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A count out of range.
    #[error("{field} = {value}: {why}")]
    Invalid {
        /// Spec field.
        field: &'static str,
        /// Value given.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `broker.config` sets a key the operator owns.
    #[error("broker.config may not set {0}: the operator sets it")]
    OwnedKey(String),
    /// The rendered broker.conf does not parse (e.g. an unknown key in `broker.config`).
    #[error("broker.config: {0}")]
    BrokerConfig(String),
}

/// Role of a group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Master acknowledging without waiting for slaves.
    AsyncMaster,
    /// Master acknowledging once a slave has the message.
    SyncMaster,
    /// Read-only replica.
    Slave,
}

impl Role {
    /// broker.conf spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::AsyncMaster => "ASYNC_MASTER",
            Role::SyncMaster => "SYNC_MASTER",
            Role::Slave => "SLAVE",
        }
    }
}

/// One member of a broker group (one StatefulSet pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPlan {
    /// StatefulSet ordinal; also the brokerId.
    pub ordinal: i32,
    /// Role.
    pub role: Role,
    /// Pod name.
    pub pod: String,
}

/// One broker group: a StatefulSet, its ConfigMap, headless Service and PDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerGroupPlan {
    /// Group index (0-based).
    pub index: i32,
    /// brokerName, also the StatefulSet, Service and ConfigMap name.
    pub name: String,
    /// Members, ordinal 0 first (the master).
    pub members: Vec<MemberPlan>,
    /// broker.conf shared by the members (brokerId and role of slaves come from the ordinal).
    pub broker_conf: String,
    /// Hash of everything that should restart the pods when it changes: the image and the
    /// settings a broker reads only at start.
    pub config_hash: String,
    /// The settings brokers change while they run ([`broker::config::LIVE_SETTINGS`]), each
    /// as its broker.conf line reads in effect (defaults included): pushed to the members
    /// instead of restarting them.
    pub live_settings: Vec<(String, String)>,
    /// Hash of `live_settings`, compared with the one last pushed to the group (kept in
    /// memory by the controller).
    pub live_hash: String,
}

impl BrokerGroupPlan {
    /// Pods wanted.
    pub fn replicas(&self) -> i32 {
        self.members.len() as i32
    }
}

/// The name-server tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameServerPlan {
    /// StatefulSet name.
    pub name: String,
    /// Headless Service (brokers resolve it to every pod).
    pub headless_service: String,
    /// Client Service.
    pub service: String,
    /// Pods.
    pub replicas: i32,
}

/// Everything the operator will create for one BrokerCluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    /// BrokerCluster name.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Image of every pod.
    pub image: String,
    /// Name servers.
    pub name_server: NameServerPlan,
    /// `namesrvAddr` brokers and clients use.
    pub namesrv_addr: String,
    /// Broker groups, in index order.
    pub groups: Vec<BrokerGroupPlan>,
    /// The deployment model in words.
    pub mode: String,
}

impl ClusterPlan {
    /// Every broker pod the plan holds, group by group: what runs, here or as local processes.
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .flat_map(|g| g.members.iter().map(|m| m.pod.as_str()))
    }
}

/// The deployment model in words, e.g. "2 masters x 1 slave, sync double write, async flush".
pub fn describe(spec: &BrokerClusterSpec) -> String {
    let b = &spec.broker;
    let masters = if b.masters == 1 {
        "1 master".to_string()
    } else {
        format!("{} masters", b.masters)
    };
    let flush = match b.flush {
        Flush::Async => "async flush",
        Flush::Sync => "sync flush",
    };
    if b.slaves_per_master == 0 {
        return format!("{masters}, {flush}");
    }
    let slaves = if b.slaves_per_master == 1 {
        "1 slave".to_string()
    } else {
        format!("{} slaves", b.slaves_per_master)
    };
    let repl = match b.replication {
        Replication::Async => "async replication",
        Replication::Sync => "sync double write",
    };
    format!("{masters} x {slaves}, {repl}, {flush}")
}

/// The live settings of `cfg`, as broker.conf lines write them (what GET_BROKER_CONFIG
/// answers, so a broker's answer compares line by line).
fn live_settings(cfg: &BrokerConfig) -> Vec<(String, String)> {
    cfg.to_properties()
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| LIVE_SETTINGS.contains(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Name of the name servers' StatefulSet (and client Service).
pub fn name_server_name(cluster: &str) -> String {
    format!("{cluster}-nameserver")
}

/// Name of group `i`'s StatefulSet (and brokerName).
pub fn group_name(cluster: &str, i: i32) -> String {
    format!("{cluster}-broker-{i}")
}

/// Plans the cluster `name` in `namespace`; `default_image` applies when the spec names none.
pub fn plan(
    name: &str,
    namespace: &str,
    spec: &BrokerClusterSpec,
    default_image: &str,
) -> Result<ClusterPlan, PlanError> {
    if !is_dns_label(name) || name.len() > MAX_CLUSTER_NAME_LEN {
        return Err(PlanError::Invalid {
            field: "metadata.name",
            value: name.to_string(),
            why: "must be a DNS-1035 label of at most 41 characters (it prefixes every StatefulSet and Service name)",
        });
    }
    let b = &spec.broker;
    if b.masters > MAX_MASTERS {
        return Err(PlanError::Invalid {
            field: "broker.masters",
            value: b.masters.to_string(),
            why: "at most 1000 masters",
        });
    }
    if b.masters < 1 {
        return Err(PlanError::Invalid {
            field: "broker.masters",
            value: b.masters.to_string(),
            why: "at least 1 master is needed",
        });
    }
    if b.slaves_per_master < 0 {
        return Err(PlanError::Invalid {
            field: "broker.slavesPerMaster",
            value: b.slaves_per_master.to_string(),
            why: "may not be negative",
        });
    }
    if b.slaves_per_master > MAX_SLAVES_PER_MASTER {
        return Err(PlanError::Invalid {
            field: "broker.slavesPerMaster",
            value: b.slaves_per_master.to_string(),
            why: "at most 16 slaves per master",
        });
    }
    if b.drain_timeout_seconds < 0 {
        return Err(PlanError::Invalid {
            field: "broker.drainTimeoutSeconds",
            value: b.drain_timeout_seconds.to_string(),
            why:
                "may not be negative (a negative timeout would count every drain as stuck at once)",
        });
    }
    if b.replication == Replication::Sync && b.slaves_per_master < 1 {
        return Err(PlanError::Invalid {
            field: "broker.slavesPerMaster",
            value: b.slaves_per_master.to_string(),
            why: "replication: Sync needs at least 1 slave per master",
        });
    }
    if spec.name_server.replicas < 1 {
        return Err(PlanError::Invalid {
            field: "nameServer.replicas",
            value: spec.name_server.replicas.to_string(),
            why: "at least 1 name server is needed",
        });
    }
    if spec.name_server.replicas > MAX_NAME_SERVERS {
        return Err(PlanError::Invalid {
            field: "nameServer.replicas",
            value: spec.name_server.replicas.to_string(),
            why: "at most 32 name servers",
        });
    }
    if let Some(k) = b
        .config
        .keys()
        .find(|k| OWNED_CONFIG_KEYS.contains(&k.as_str()))
    {
        return Err(PlanError::OwnedKey(k.clone()));
    }
    let ns_name = name_server_name(name);
    let name_server = NameServerPlan {
        headless_service: format!("{ns_name}-headless"),
        service: ns_name.clone(),
        name: ns_name,
        replicas: spec.name_server.replicas,
    };
    // One DNS name resolving to every name-server pod: brokers register with each address and
    // re-resolve on every heartbeat, so scaling name servers needs no broker restart.
    let namesrv_addr = format!(
        "{}.{namespace}.svc:{NAMESRV_PORT}",
        name_server.headless_service
    );
    let master_role = match b.replication {
        Replication::Async => Role::AsyncMaster,
        Replication::Sync => Role::SyncMaster,
    };
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string());
    let mut groups = Vec::new();
    for i in 0..b.masters {
        let gname = group_name(name, i);
        let mut conf = String::new();
        let mut line = |k: &str, v: &str| {
            conf.push_str(k);
            conf.push('=');
            conf.push_str(v);
            conf.push('\n');
        };
        line("brokerClusterName", name);
        line("brokerName", &gname);
        line("brokerId", "0");
        line("brokerRole", master_role.as_str());
        line(
            "flushDiskType",
            match b.flush {
                Flush::Async => "ASYNC_FLUSH",
                Flush::Sync => "SYNC_FLUSH",
            },
        );
        line("namesrvAddr", &namesrv_addr);
        line("listenPort", &BROKER_PORT.to_string());
        line("haListenPort", &BROKER_HA_PORT.to_string());
        line("httpPort", &BROKER_HTTP_PORT.to_string());
        line("storePathRootDir", STORE_PATH);
        for (k, v) in &b.config {
            line(k, v);
        }
        // The broker's own parser checks the result, so a bad key fails here, named, rather
        // than in a crash-looping pod.
        let parsed =
            BrokerConfig::parse(&conf).map_err(|e| PlanError::BrokerConfig(e.to_string()))?;
        let live_settings = live_settings(&parsed);
        let members = (0..=b.slaves_per_master)
            .map(|o| MemberPlan {
                ordinal: o,
                role: if o == 0 { master_role } else { Role::Slave },
                pod: format!("{gname}-{o}"),
            })
            .collect();
        // Settings brokers take while running do not restart them (see live_settings).
        let restart_only: String = conf
            .lines()
            .filter(|l| {
                l.split_once('=')
                    .is_none_or(|(k, _)| !LIVE_SETTINGS.contains(&k.trim()))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config_hash = hash(&[&restart_only, &image]);
        let live_lines: Vec<String> = live_settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let live_hash = hash(&live_lines.iter().map(String::as_str).collect::<Vec<_>>());
        groups.push(BrokerGroupPlan {
            index: i,
            name: gname,
            members,
            broker_conf: conf,
            config_hash,
            live_settings,
            live_hash,
        });
    }
    Ok(ClusterPlan {
        cluster: name.to_string(),
        namespace: namespace.to_string(),
        image,
        name_server,
        namesrv_addr,
        groups,
        mode: describe(spec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BrokerSpec;

    fn spec(masters: i32, slaves: i32, repl: Replication, flush: Flush) -> BrokerClusterSpec {
        BrokerClusterSpec {
            broker: BrokerSpec {
                masters,
                slaves_per_master: slaves,
                replication: repl,
                flush,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The four models of the deployment guide, each with both flush policies.
    fn models() -> Vec<(&'static str, BrokerClusterSpec)> {
        let mut out = Vec::new();
        for flush in [Flush::Async, Flush::Sync] {
            out.push(("single master", spec(1, 0, Replication::Async, flush)));
            out.push(("multi-master", spec(3, 0, Replication::Async, flush)));
            out.push(("async replication", spec(2, 1, Replication::Async, flush)));
            out.push(("sync double write", spec(2, 2, Replication::Sync, flush)));
        }
        out
    }

    #[test]
    fn every_model_plans_names_ids_roles_and_conf() {
        for (label, s) in models() {
            let p = plan("demo", "mq", &s, "ferromq:test").unwrap();
            assert_eq!(p.groups.len(), s.broker.masters as usize, "{label}");
            assert_eq!(p.name_server.name, "demo-nameserver");
            assert_eq!(p.namesrv_addr, "demo-nameserver-headless.mq.svc:9876");
            for (i, g) in p.groups.iter().enumerate() {
                assert_eq!(g.name, format!("demo-broker-{i}"), "{label}");
                assert_eq!(g.replicas(), 1 + s.broker.slaves_per_master, "{label}");
                let master = match s.broker.replication {
                    Replication::Async => Role::AsyncMaster,
                    Replication::Sync => Role::SyncMaster,
                };
                assert_eq!(g.members[0].role, master, "{label}");
                assert!(
                    g.members[1..].iter().all(|m| m.role == Role::Slave),
                    "{label}"
                );
                assert_eq!(
                    g.members.last().map(|m| m.ordinal),
                    Some(s.broker.slaves_per_master)
                );
                let conf = BrokerConfig::parse(&g.broker_conf).unwrap();
                assert_eq!(conf.broker_name, g.name);
                assert_eq!(conf.role.as_str(), master.as_str());
                let want_flush = match s.broker.flush {
                    Flush::Async => broker::store::FlushDiskType::Async,
                    Flush::Sync => broker::store::FlushDiskType::Sync,
                };
                assert_eq!(conf.flush, want_flush, "{label}");
                assert_eq!(conf.namesrv_addrs, vec![p.namesrv_addr.clone()]);
                assert_eq!(conf.store_root.to_str(), Some(STORE_PATH));
                assert_eq!(conf.listen_port, BROKER_PORT);
            }
        }
    }

    /// Every name the plan and the builders derive from the cluster name, with what
    /// Kubernetes allows for it.
    fn generated_names(p: &ClusterPlan) -> Vec<(String, usize)> {
        let mut names = vec![
            (p.name_server.name.clone(), MAX_STATEFULSET_NAME_LEN),
            (p.name_server.service.clone(), 63),
            (p.name_server.headless_service.clone(), 63),
        ];
        for g in &p.groups {
            names.push((g.name.clone(), MAX_STATEFULSET_NAME_LEN));
            // Pod names are their hostnames.
            names.extend(g.members.iter().map(|m| (m.pod.clone(), 63)));
        }
        names
    }

    #[test]
    fn the_longest_cluster_name_keeps_every_generated_name_valid() {
        let longest = "a".repeat(MAX_CLUSTER_NAME_LEN);
        let s = spec(MAX_MASTERS, 2, Replication::Async, Flush::Async);
        let p = plan(&longest, "n", &s, "i").unwrap();
        for (name, max) in generated_names(&p) {
            assert!(name.len() <= max, "{name} is longer than {max}");
            assert!(is_dns_label(&name), "{name}");
        }
        // The bound is tight, for both StatefulSet kinds: one more character is too many.
        let longer = "a".repeat(MAX_CLUSTER_NAME_LEN + 1);
        assert!(name_server_name(&longer).len() > MAX_STATEFULSET_NAME_LEN);
        assert!(group_name(&longer, MAX_MASTERS - 1).len() > MAX_STATEFULSET_NAME_LEN);
    }

    #[test]
    fn names_that_cannot_prefix_kubernetes_names_are_refused() {
        let s = spec(1, 0, Replication::Async, Flush::Async);
        for bad in [
            "a".repeat(MAX_CLUSTER_NAME_LEN + 1),
            "1demo".to_string(),
            "Demo".to_string(),
            "demo-".to_string(),
            "de.mo".to_string(),
            String::new(),
        ] {
            let e = plan(&bad, "n", &s, "i").unwrap_err();
            assert!(e.to_string().contains("metadata.name"), "{bad}: {e}");
        }
        assert!(plan("demo-2", "n", &s, "i").is_ok());
        let many = spec(MAX_MASTERS + 1, 0, Replication::Async, Flush::Async);
        let e = plan("demo", "n", &many, "i").unwrap_err();
        assert!(e.to_string().contains("broker.masters"), "{e}");
        // Refused before anything is planned per member (this one would need 64 GiB).
        let slaves = spec(1, i32::MAX, Replication::Async, Flush::Async);
        let e = plan("demo", "n", &slaves, "i").unwrap_err();
        assert!(e.to_string().contains("broker.slavesPerMaster"), "{e}");
        assert!(plan(
            "demo",
            "n",
            &spec(1, MAX_SLAVES_PER_MASTER, Replication::Async, Flush::Async),
            "i"
        )
        .is_ok());
        let mut name_servers = spec(1, 0, Replication::Async, Flush::Async);
        name_servers.name_server.replicas = i32::MAX;
        let e = plan("demo", "n", &name_servers, "i").unwrap_err();
        assert!(e.to_string().contains("nameServer.replicas"), "{e}");
        let mut timeout = spec(1, 0, Replication::Async, Flush::Async);
        timeout.broker.drain_timeout_seconds = -1;
        let e = plan("demo", "n", &timeout, "i").unwrap_err();
        assert!(e.to_string().contains("broker.drainTimeoutSeconds"), "{e}");
    }

    #[test]
    fn mode_is_described_in_words() {
        assert_eq!(
            describe(&spec(1, 0, Replication::Async, Flush::Async)),
            "1 master, async flush"
        );
        assert_eq!(
            describe(&spec(2, 1, Replication::Sync, Flush::Async)),
            "2 masters x 1 slave, sync double write, async flush"
        );
        assert_eq!(
            describe(&spec(3, 2, Replication::Async, Flush::Sync)),
            "3 masters x 2 slaves, async replication, sync flush"
        );
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field_named() {
        let e = plan("d", "n", &spec(0, 0, Replication::Async, Flush::Async), "i").unwrap_err();
        assert!(e.to_string().contains("broker.masters"));
        let e = plan("d", "n", &spec(1, 0, Replication::Sync, Flush::Async), "i").unwrap_err();
        assert!(e.to_string().contains("Sync"));
        let mut s = spec(1, 0, Replication::Async, Flush::Async);
        s.broker.config.insert("brokerRole".into(), "SLAVE".into());
        assert_eq!(
            plan("d", "n", &s, "i").unwrap_err(),
            PlanError::OwnedKey("brokerRole".into())
        );
        let mut s = spec(1, 0, Replication::Async, Flush::Async);
        s.broker.config.insert("fileReservedTme".into(), "1".into());
        let e = plan("d", "n", &s, "i").unwrap_err();
        assert!(e.to_string().contains("fileReservedTme"), "{e}");
    }

    #[test]
    fn config_changes_change_the_hash_and_nothing_else_does() {
        let s = spec(2, 1, Replication::Async, Flush::Async);
        let a = plan("d", "n", &s, "img").unwrap();
        assert_eq!(
            a,
            plan("d", "n", &s, "img").unwrap(),
            "plan must be deterministic"
        );
        let mut s2 = s.clone();
        s2.broker.flush = Flush::Sync;
        let b = plan("d", "n", &s2, "img").unwrap();
        assert_ne!(a.groups[0].config_hash, b.groups[0].config_hash);
        let mut s3 = s.clone();
        s3.broker
            .config
            .insert("flushIntervalCommitLog".into(), "100".into());
        assert_ne!(
            a.groups[0].config_hash,
            plan("d", "n", &s3, "img").unwrap().groups[0].config_hash
        );
        // A setting brokers change while running restarts nothing: it is pushed to them.
        let mut s4 = s.clone();
        s4.broker
            .config
            .insert("fileReservedTime".into(), "24".into());
        let live = plan("d", "n", &s4, "img").unwrap();
        assert_eq!(a.groups[0].config_hash, live.groups[0].config_hash);
        assert_ne!(a.groups[0].broker_conf, live.groups[0].broker_conf);
        let wanted = |p: &ClusterPlan, k: &str| {
            p.groups[0]
                .live_settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(wanted(&live, "fileReservedTime").as_deref(), Some("24"));
        // Every live setting is wanted, defaults included (one removed from the spec goes
        // back to its default on the brokers).
        assert_eq!(wanted(&a, "fileReservedTime").as_deref(), Some("72"));
        assert_eq!(a.groups[0].live_settings.len(), LIVE_SETTINGS.len());
        assert_ne!(
            a.groups[0].config_hash,
            plan("d", "n", &s, "img2").unwrap().groups[0].config_hash
        );
    }
}
