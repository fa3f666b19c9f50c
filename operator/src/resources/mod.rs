//! Plan -> Kubernetes objects, as pure functions: labels, owner references, security
//! contexts, and the objects of the name-server tier and of each broker group.

mod broker;
mod nameserver;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    Probe, SeccompProfile, SecurityContext, Service, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::BrokerClusterSpec;
use crate::plan::ClusterPlan;

/// Label every object carries: the cluster it belongs to (used to find objects to delete).
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label every object carries: the application (`ferromq`).
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label every object carries: who manages it, so a Helm release or Argo CD app that shares
/// the cluster's instance name is not mistaken for the operator's.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label: which tier (nameserver or broker).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Name of the broker's container in its pods.
pub const BROKER_CONTAINER: &str = "mqbroker";
/// Label: the broker group (brokerName).
pub const LABEL_GROUP: &str = "ferromq.io/broker-group";
/// Pod-template annotation whose change rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "ferromq.io/config-hash";
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "ferromq-operator";
/// Non-root user the images run as.
pub const RUN_AS_USER: i64 = 65532;

/// Every object of a cluster, in the order they are applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// Services (name-server headless and client, one headless per broker group).
    pub services: Vec<Service>,
    /// broker.conf per group.
    pub config_maps: Vec<ConfigMap>,
    /// Name servers first, then one per broker group.
    pub pdbs: Vec<PodDisruptionBudget>,
    /// Name servers first, then one per broker group.
    pub stateful_sets: Vec<StatefulSet>,
}

/// Recommended labels of a cluster's objects.
pub fn labels(cluster: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "ferromq".to_string()),
        (LABEL_INSTANCE.to_string(), cluster.to_string()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "ferromq".to_string(),
        ),
        (LABEL_MANAGED_BY.to_string(), FIELD_MANAGER.to_string()),
    ])
}

/// Label selector of every object the operator manages for a cluster (what it lists before
/// deleting what the plan no longer holds; ownership is checked as well).
pub fn managed_selector(cluster: &str) -> String {
    format!("{LABEL_NAME}=ferromq,{LABEL_INSTANCE}={cluster},{LABEL_MANAGED_BY}={FIELD_MANAGER}")
}

/// Labels that select a component's pods (a stable subset of [`labels`]).
pub fn selector(cluster: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "ferromq".to_string()),
        (LABEL_INSTANCE.to_string(), cluster.to_string()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
    ])
}

fn meta(
    name: &str,
    plan: &ClusterPlan,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// Pod-level security: non-root, RuntimeDefault seccomp.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level security: read-only root, no privilege escalation, no capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn port(name: &str, p: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(p),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one pod of `selector` voluntarily evicted at a time (node drains, upgrades): a
/// group keeps its master or a slave, the name-server tier keeps answering.
fn pdb(metadata: ObjectMeta, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The user's affinity plus a preferred anti-affinity spreading the pods of `selector` over
/// nodes, so one node failure takes few of them. Preferred only: a small cluster still runs
/// them all, and the user's own terms, required ones included, are kept as written.
fn spread_over_nodes(selector: BTreeMap<String, String>, user: Option<&Affinity>) -> Affinity {
    let mut a = user.cloned().unwrap_or_default();
    let term = WeightedPodAffinityTerm {
        weight: 100,
        pod_affinity_term: PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            topology_key: "kubernetes.io/hostname".into(),
            ..Default::default()
        },
    };
    a.pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default)
        .preferred_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new)
        .push(term);
    a
}

fn base_container(name: &str, plan: &ClusterPlan, spec: &BrokerClusterSpec) -> Container {
    Container {
        name: name.to_string(),
        image: Some(plan.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        security_context: Some(container_security()),
        ..Default::default()
    }
}

/// Builds every object of `plan`, owned by the BrokerCluster `owner`.
pub fn render(plan: &ClusterPlan, spec: &BrokerClusterSpec, owner: &OwnerReference) -> Resources {
    let mut r = Resources::default();
    nameserver::render(plan, spec, owner, &mut r);
    for g in &plan.groups {
        broker::render(plan, g, spec, owner, &mut r);
    }
    r
}

#[cfg(test)]
mod tests;
