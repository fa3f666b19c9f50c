//! The ferromq operator: the `BrokerCluster` resource, the pure plan every decision lives in,
//! and the builders that turn a plan into Kubernetes objects.

pub mod crd;
pub mod plan;
pub mod resources;

use kube::CustomResourceExt;

/// The CRD as YAML, as `operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd::BrokerCluster::crd())
}
pub mod admin;
pub mod controller;
pub mod lease;
pub mod local;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    broker::logging::shutdown_signal().await;
}
pub mod rbac;
pub mod rollout;
