//! The `BrokerCluster` custom resource: what users write (spec) and what the operator reports
//! (status). Validation lives in the schema, CEL rules included, so the apiserver rejects a bad
//! spec before the operator ever sees it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// broker.conf keys the operator sets itself; `spec.broker.config` may not override them.
pub const OWNED_CONFIG_KEYS: &[&str] = &[
    "brokerClusterName",
    "brokerName",
    "brokerId",
    "brokerRole",
    "flushDiskType",
    "namesrvAddr",
    "listenPort",
    "haListenPort",
    "httpPort",
    "brokerIP1",
    "storePathRootDir",
    // Slaves learn their own group's master from the name servers; one address here would
    // point the slaves of every group at one master.
    "haMasterAddress",
];

/// A ferromq cluster: name servers plus `masters` broker groups of `1 + slavesPerMaster`
/// members each.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferromq.io",
    version = "v1alpha1",
    kind = "BrokerCluster",
    namespaced,
    status = "BrokerClusterStatus",
    shortname = "bc",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit): it names the cluster's Services"),
    validation = Rule::new("size(self.metadata.name) <= 41")
        .message("metadata.name may have at most 41 characters: <name>-nameserver and <name>-broker-<index> name StatefulSets, which Kubernetes limits to 52 characters"),
    printcolumn = r#"{"name":"Masters","type":"integer","jsonPath":".spec.broker.masters"}"#,
    printcolumn = r#"{"name":"Slaves","type":"integer","jsonPath":".spec.broker.slavesPerMaster"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerClusterSpec {
    /// Container image holding mqnamesrv and mqbroker (default: the operator's own setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The name-server tier.
    #[serde(default)]
    pub name_server: NameServerSpec,
    /// The broker groups.
    #[serde(default)]
    pub broker: BrokerSpec,
    /// Stop reconciling (for maintenance); existing objects are left as they are.
    #[serde(default)]
    pub paused: bool,
}

/// When the kubelet pulls the image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Every start.
    Always,
    /// Only when missing on the node.
    IfNotPresent,
    /// Never (the image must be on the node).
    Never,
}

impl PullPolicy {
    /// Kubernetes' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Where pods may run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Affinity added to the operator's own anti-affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Topology spread constraints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

/// The name servers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NameServerSpec {
    /// Name-server pods (brokers register with every one).
    #[serde(default = "default_ns_replicas")]
    #[x_kube(
        validation = Rule::new("self >= 1").message("nameServer.replicas must be at least 1"),
        validation = Rule::new("self <= 32").message("nameServer.replicas may be at most 32")
    )]
    pub replicas: i32,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling.
    #[serde(default, flatten)]
    pub scheduling: Scheduling,
}

fn default_ns_replicas() -> i32 {
    2
}

impl Default for NameServerSpec {
    fn default() -> Self {
        NameServerSpec {
            replicas: default_ns_replicas(),
            resources: None,
            scheduling: Scheduling::default(),
        }
    }
}

/// How masters hand messages to their slaves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Replication {
    /// ASYNC_MASTER: acknowledge once the master has the message.
    #[default]
    Async,
    /// SYNC_MASTER: acknowledge once a slave has it too ("sync double write").
    Sync,
}

/// When a send is acknowledged relative to the disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Flush {
    /// ASYNC_FLUSH: from memory, flushed in the background.
    #[default]
    Async,
    /// SYNC_FLUSH: after fsync, group-committed.
    Sync,
}

/// The broker groups.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replication != 'Sync' || self.slavesPerMaster >= 1")
        .message("replication: Sync (sync double write) needs slavesPerMaster >= 1"),
    validation = Rule::new("!has(self.config) || self.config.all(k, !(k in ['brokerClusterName', 'brokerName', 'brokerId', 'brokerRole', 'flushDiskType', 'namesrvAddr', 'listenPort', 'haListenPort', 'httpPort', 'brokerIP1', 'storePathRootDir', 'haMasterAddress']))")
        .message("broker.config may not set keys the operator owns: brokerClusterName, brokerName, brokerId, brokerRole, flushDiskType, namesrvAddr, listenPort, haListenPort, httpPort, brokerIP1, storePathRootDir, haMasterAddress"),
    // The brokers' stored segments have the size they were created with, and a broker given
    // another refuses to start: the edit would crash-loop every group's pods in turn.
    validation = Rule::new("(has(self.config) && 'mappedFileSizeCommitLog' in self.config ? self.config['mappedFileSizeCommitLog'] : '') == (has(oldSelf.config) && 'mappedFileSizeCommitLog' in oldSelf.config ? oldSelf.config['mappedFileSizeCommitLog'] : '')")
        .message("broker.config.mappedFileSizeCommitLog cannot change (nor be set or removed) once the cluster exists: the brokers' commit-log segments keep the size they were created with")
)]
pub struct BrokerSpec {
    /// Broker groups (brokerNames), each with one master.
    #[serde(default = "one")]
    #[x_kube(
        validation = Rule::new("self >= 1").message("broker.masters must be at least 1"),
        validation = Rule::new("self <= 1000").message("broker.masters may be at most 1000 (group names, up to <name>-broker-999, must stay valid StatefulSet names)")
    )]
    pub masters: i32,
    /// Slaves per master; 0 runs multi-master without replication.
    #[serde(default)]
    #[x_kube(
        validation = Rule::new("self >= 0").message("broker.slavesPerMaster may not be negative"),
        validation = Rule::new("self <= 16").message("broker.slavesPerMaster may be at most 16")
    )]
    pub slaves_per_master: i32,
    /// Replication mode between a master and its slaves.
    #[serde(default)]
    pub replication: Replication,
    /// Flush policy of every broker.
    #[serde(default)]
    pub flush: Flush,
    /// Storage of each broker.
    #[serde(default)]
    pub storage: Storage,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling.
    #[serde(default, flatten)]
    pub scheduling: Scheduling,
    /// Extra broker.conf keys (RocketMQ names), e.g. `fileReservedTime: "48"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// How long scale-in waits for consumers to drain a group before reporting it stuck.
    #[serde(default = "default_drain_timeout")]
    #[x_kube(validation = Rule::new("self >= 0").message("broker.drainTimeoutSeconds may not be negative"))]
    pub drain_timeout_seconds: i64,
}

fn one() -> i32 {
    1
}

fn default_drain_timeout() -> i64 {
    600
}

impl Default for BrokerSpec {
    fn default() -> Self {
        BrokerSpec {
            masters: 1,
            slaves_per_master: 0,
            replication: Replication::Async,
            flush: Flush::Async,
            storage: Storage::default(),
            resources: None,
            scheduling: Scheduling::default(),
            config: BTreeMap::new(),
            drain_timeout_seconds: default_drain_timeout(),
        }
    }
}

/// Where a broker keeps its commit log.
// Every field is immutable, checked on this object rather than on each field: the API server
// runs no rule on a field whose value is `null`, so a field-level `self == oldSelf` would let
// `size: null` through.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.size) == has(oldSelf.size) && (!has(self.size) || self.size == oldSelf.size)")
        .message("broker.storage.size is immutable (StatefulSet volume claims cannot change): to grow volumes, expand each PersistentVolumeClaim data-<group>-<ordinal> instead")
        .field_path(".size"),
    validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)")
        .message("broker.storage.storageClassName is immutable")
        .field_path(".storageClassName"),
    validation = Rule::new("(has(self.ephemeral) && self.ephemeral) == (has(oldSelf.ephemeral) && oldSelf.ephemeral)")
        .message("broker.storage.ephemeral is immutable (StatefulSet volume claims cannot change): create a new BrokerCluster to switch storage")
        .field_path(".ephemeral")
)]
pub struct Storage {
    /// Volume size per broker. Immutable: a StatefulSet's volumeClaimTemplates cannot change.
    // Not nullable (kube marks optional int-or-string fields nullable), so that the API server
    // drops a `null` and applies the default before the rules run: a `null` kept would bypass
    // them and reach the operator, which needs a size.
    #[serde(default = "default_size")]
    #[schemars(extend("nullable" = false))]
    pub size: Quantity,
    /// Storage class (cluster default when unset). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Use an emptyDir instead of a PersistentVolumeClaim (data lost with the pod: tests only).
    /// Immutable: a StatefulSet's volumeClaimTemplates cannot change.
    #[serde(default)]
    pub ephemeral: bool,
}

fn default_size() -> Quantity {
    Quantity("10Gi".into())
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            size: default_size(),
            storage_class_name: None,
            ephemeral: false,
        }
    }
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The deployment model in words, e.g. "2 masters x 1 slave, sync double write, async flush".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Name-server pods ready.
    #[serde(default)]
    pub name_servers_ready: i32,
    /// Per broker group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupStatus>,
}

/// One broker group's state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// brokerName.
    pub name: String,
    /// Members wanted.
    pub replicas: i32,
    /// Members ready.
    pub ready_replicas: i32,
    /// Role of each member by brokerId, e.g. ["SYNC_MASTER", "SLAVE"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Draining before removal.
    #[serde(default)]
    pub draining: bool,
}
