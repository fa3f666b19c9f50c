//! One broker group: its ConfigMap (broker.conf), headless Service, PodDisruptionBudget and
//! StatefulSet. Ordinal 0 is the master; StatefulSet rolling updates go from the highest
//! ordinal down, so slaves restart before their master.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, EmptyDirVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use super::{
    base_container, field_env, http_probe, labels, meta, pdb, pod_security, port, selector,
    spread_over_nodes, Resources, ANNOTATION_CONFIG_HASH, LABEL_GROUP,
};
use crate::crd::BrokerClusterSpec;
use crate::plan::{
    BrokerGroupPlan, ClusterPlan, BROKER_HA_PORT, BROKER_HTTP_PORT, BROKER_PORT, CONFIG_DIR,
    STORE_PATH,
};

const COMPONENT: &str = "broker";
const DATA_VOLUME: &str = "data";
const CONFIG_VOLUME: &str = "config";

fn group_labels(plan: &ClusterPlan, g: &BrokerGroupPlan) -> BTreeMap<String, String> {
    let mut l = labels(&plan.cluster, COMPONENT);
    l.insert(LABEL_GROUP.into(), g.name.clone());
    l
}

fn group_selector(plan: &ClusterPlan, g: &BrokerGroupPlan) -> BTreeMap<String, String> {
    let mut l = selector(&plan.cluster, COMPONENT);
    l.insert(LABEL_GROUP.into(), g.name.clone());
    l
}

pub(super) fn render(
    plan: &ClusterPlan,
    g: &BrokerGroupPlan,
    spec: &BrokerClusterSpec,
    owner: &OwnerReference,
    r: &mut Resources,
) {
    let l = group_labels(plan, g);
    r.config_maps.push(ConfigMap {
        metadata: meta(&g.name, plan, l.clone(), owner),
        data: Some(BTreeMap::from([(
            "broker.conf".to_string(),
            g.broker_conf.clone(),
        )])),
        ..Default::default()
    });
    r.services.push(Service {
        metadata: meta(&g.name, plan, l.clone(), owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(group_selector(plan, g)),
            ports: Some(vec![
                ServicePort {
                    name: Some("remoting".into()),
                    port: i32::from(BROKER_PORT),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("ha".into()),
                    port: i32::from(BROKER_HA_PORT),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    });
    r.pdbs.push(pdb(
        meta(&g.name, plan, l.clone(), owner),
        group_selector(plan, g),
    ));

    let b = &spec.broker;
    let mut c = base_container(super::BROKER_CONTAINER, plan, spec);
    c.command = Some(vec!["/usr/local/bin/mqbroker".into()]);
    c.args = Some(vec!["-c".into(), format!("{CONFIG_DIR}/broker.conf")]);
    // Identity from the pod itself (no shell in the image): the ordinal is the brokerId,
    // ordinals above 0 run as slaves, and the pod IP is advertised.
    c.env = Some(vec![
        field_env("FERROMQ_POD_NAME", "metadata.name"),
        field_env("FERROMQ_POD_IP", "status.podIP"),
    ]);
    c.ports = Some(vec![
        port("remoting", BROKER_PORT),
        port("ha", BROKER_HA_PORT),
        port("http", BROKER_HTTP_PORT),
    ]);
    c.liveness_probe = Some(http_probe("/healthz", BROKER_HTTP_PORT, 10, 3));
    c.readiness_probe = Some(http_probe("/readyz", BROKER_HTTP_PORT, 5, 2));
    c.resources = b.resources.clone();
    c.volume_mounts = Some(vec![
        VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: STORE_PATH.into(),
            ..Default::default()
        },
        VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ]);
    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: g.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let claims = if b.storage.ephemeral {
        volumes.push(Volume {
            name: DATA_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        None
    } else {
        Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_VOLUME.into()),
                // volumeClaimTemplates cannot change on an existing StatefulSet: only the
                // selector's labels, which cannot change either, never the full set.
                labels: Some(group_selector(plan, g)),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: b.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        b.storage.size.clone(),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }])
    };
    let sched = &b.scheduling;
    let pod = PodSpec {
        containers: vec![c],
        volumes: Some(volumes),
        security_context: Some(pod_security()),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.clone()),
        // Prefer spreading a group's members over nodes, so a master and its slaves rarely
        // share one.
        affinity: Some(spread_over_nodes(
            group_selector(plan, g),
            sched.affinity.as_ref(),
        )),
        tolerations: (!sched.tolerations.is_empty()).then(|| sched.tolerations.clone()),
        node_selector: (!sched.node_selector.is_empty()).then(|| sched.node_selector.clone()),
        topology_spread_constraints: (!sched.topology_spread_constraints.is_empty())
            .then(|| sched.topology_spread_constraints.clone()),
        automount_service_account_token: Some(false),
        // Give a clean shutdown (flush, checkpoint, unregister) time to finish.
        termination_grace_period_seconds: Some(60),
        ..Default::default()
    };
    r.stateful_sets.push(StatefulSet {
        metadata: meta(&g.name, plan, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(g.replicas()),
            service_name: Some(g.name.clone()),
            selector: LabelSelector {
                match_labels: Some(group_selector(plan, g)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(l),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_CONFIG_HASH.to_string(),
                        g.config_hash.clone(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: claims,
            // Data outlives scale-down and deletion unless an admin removes the claims: a
            // broker's commit log is not something to lose by editing a number.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    });
}
