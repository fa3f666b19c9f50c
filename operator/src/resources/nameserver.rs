//! The name-server tier: a StatefulSet, a headless Service brokers resolve to every pod, a
//! client Service and a PodDisruptionBudget.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    base_container, http_probe, labels, meta, pdb, pod_security, port, selector, spread_over_nodes,
    Resources,
};
use crate::crd::BrokerClusterSpec;
use crate::plan::{ClusterPlan, NAMESRV_HTTP_PORT, NAMESRV_PORT};

const COMPONENT: &str = "nameserver";

fn service(name: &str, headless: bool, plan: &ClusterPlan, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(name, plan, labels(&plan.cluster, COMPONENT), owner),
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".to_string()),
            // Brokers must find name servers that are starting, too.
            publish_not_ready_addresses: headless.then_some(true),
            selector: Some(selector(&plan.cluster, COMPONENT)),
            ports: Some(vec![ServicePort {
                name: Some("remoting".into()),
                port: i32::from(NAMESRV_PORT),
                target_port: Some(IntOrString::Int(i32::from(NAMESRV_PORT))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn render(
    plan: &ClusterPlan,
    spec: &BrokerClusterSpec,
    owner: &OwnerReference,
    r: &mut Resources,
) {
    let ns = &plan.name_server;
    r.services
        .push(service(&ns.headless_service, true, plan, owner));
    r.services.push(service(&ns.service, false, plan, owner));
    let mut c = base_container("mqnamesrv", plan, spec);
    c.command = Some(vec!["/usr/local/bin/mqnamesrv".into()]);
    c.args = Some(vec![
        "--listen-port".into(),
        NAMESRV_PORT.to_string(),
        "--http-port".into(),
        NAMESRV_HTTP_PORT.to_string(),
        // Each name server keeps the KV config in memory (a read-only file system): one
        // restarted copies it from the others (a rolling restart keeps it).
        "--kv-peers".into(),
        plan.namesrv_addr.clone(),
    ]);
    c.ports = Some(vec![
        port("remoting", NAMESRV_PORT),
        port("http", NAMESRV_HTTP_PORT),
    ]);
    c.liveness_probe = Some(http_probe("/healthz", NAMESRV_HTTP_PORT, 10, 3));
    c.readiness_probe = Some(http_probe("/readyz", NAMESRV_HTTP_PORT, 5, 2));
    c.resources = spec.name_server.resources.clone();
    r.pdbs.push(pdb(
        meta(&ns.name, plan, labels(&plan.cluster, COMPONENT), owner),
        selector(&plan.cluster, COMPONENT),
    ));
    let sched = &spec.name_server.scheduling;
    let pod = PodSpec {
        containers: vec![c],
        security_context: Some(pod_security()),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.clone()),
        // Name servers on different nodes: one node failure leaves clients and brokers one
        // to talk to.
        affinity: Some(spread_over_nodes(
            selector(&plan.cluster, COMPONENT),
            sched.affinity.as_ref(),
        )),
        tolerations: (!sched.tolerations.is_empty()).then(|| sched.tolerations.clone()),
        node_selector: (!sched.node_selector.is_empty()).then(|| sched.node_selector.clone()),
        topology_spread_constraints: (!sched.topology_spread_constraints.is_empty())
            .then(|| sched.topology_spread_constraints.clone()),
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    r.stateful_sets.push(StatefulSet {
        metadata: meta(&ns.name, plan, labels(&plan.cluster, COMPONENT), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(ns.replicas),
            service_name: Some(ns.headless_service.clone()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(&plan.cluster, COMPONENT)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&plan.cluster, COMPONENT)),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    });
}
