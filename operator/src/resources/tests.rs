//! The builders over the four deployment models x both flush policies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;
use crate::crd::{BrokerSpec, Flush, Replication};
use crate::plan::{plan, BROKER_HTTP_PORT};

fn owner() -> OwnerReference {
    OwnerReference {
        api_version: "ferromq.io/v1alpha1".into(),
        kind: "BrokerCluster".into(),
        name: "demo".into(),
        uid: "1234-5678".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn spec(masters: i32, slaves: i32, replication: Replication, flush: Flush) -> BrokerClusterSpec {
    BrokerClusterSpec {
        broker: BrokerSpec {
            masters,
            slaves_per_master: slaves,
            replication,
            flush,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn models() -> Vec<BrokerClusterSpec> {
    let mut v = Vec::new();
    for flush in [Flush::Async, Flush::Sync] {
        v.push(spec(1, 0, Replication::Async, flush));
        v.push(spec(2, 0, Replication::Async, flush));
        v.push(spec(2, 1, Replication::Async, flush));
        v.push(spec(2, 1, Replication::Sync, flush));
    }
    v
}

#[test]
fn every_model_renders_the_objects_it_needs_in_apply_order() {
    for s in models() {
        let p = plan("demo", "mq", &s, "ferromq:1").unwrap();
        let r = render(&p, &s, &owner());
        let groups = s.broker.masters as usize;
        assert_eq!(r.services.len(), 2 + groups);
        assert_eq!(r.config_maps.len(), groups);
        assert_eq!(r.pdbs.len(), 1 + groups);
        assert_eq!(r.stateful_sets.len(), 1 + groups);
        let ns = &r.stateful_sets[0];
        assert_eq!(ns.metadata.name.as_deref(), Some("demo-nameserver"));
        assert_eq!(ns.spec.as_ref().unwrap().replicas, Some(2));
        for (i, sts) in r.stateful_sets[1..].iter().enumerate() {
            let name = format!("demo-broker-{i}");
            assert_eq!(sts.metadata.name.as_deref(), Some(name.as_str()));
            let sp = sts.spec.as_ref().unwrap();
            assert_eq!(sp.replicas, Some(1 + s.broker.slaves_per_master));
            assert_eq!(sp.service_name.as_deref(), Some(name.as_str()));
            let conf = r.config_maps[i].data.as_ref().unwrap()["broker.conf"].clone();
            let parsed = ::broker::config::BrokerConfig::parse(&conf).unwrap();
            assert_eq!(parsed.broker_name, name);
            assert_eq!(
                parsed.broker_id, 0,
                "ordinal 0 is the master; slaves take their ordinal at start"
            );
            let role = match s.broker.replication {
                Replication::Async => "ASYNC_MASTER",
                Replication::Sync => "SYNC_MASTER",
            };
            assert!(conf.contains(&format!("brokerRole={role}\n")), "{conf}");
            let flush = match s.broker.flush {
                Flush::Async => "ASYNC_FLUSH",
                Flush::Sync => "SYNC_FLUSH",
            };
            assert!(conf.contains(&format!("flushDiskType={flush}\n")), "{conf}");
            // Slaves become slaves from their ordinal: simulate what mqbroker does in each pod.
            for ordinal in 0..=s.broker.slaves_per_master {
                let mut member = parsed.clone();
                member.apply_ordinal(&format!("{name}-{ordinal}")).unwrap();
                assert_eq!(member.broker_id, i64::from(ordinal));
                let want = if ordinal == 0 { role } else { "SLAVE" };
                assert_eq!(member.role.as_str(), want);
            }
        }
    }
}

#[test]
fn pods_are_locked_down_and_probed() {
    let s = spec(2, 1, Replication::Sync, Flush::Async);
    let p = plan("demo", "mq", &s, "ferromq:1").unwrap();
    let r = render(&p, &s, &owner());
    for sts in &r.stateful_sets {
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            let live = c
                .liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap();
            let ready = c
                .readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap();
            assert_eq!(live.path.as_deref(), Some("/healthz"));
            assert_eq!(ready.path.as_deref(), Some("/readyz"));
            assert_eq!(c.image.as_deref(), Some("ferromq:1"));
        }
    }
    // Brokers learn identity from the pod, not from a shell script.
    let broker = pod_of(&r, 1);
    let env: Vec<&str> = broker.containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(env, vec!["FERROMQ_POD_NAME", "FERROMQ_POD_IP"]);
    let live = broker.containers[0]
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.port, IntOrString::Int(i32::from(BROKER_HTTP_PORT)));
}

#[test]
fn objects_carry_labels_owner_and_group_wiring() {
    let s = spec(2, 1, Replication::Async, Flush::Async);
    let p = plan("demo", "mq", &s, "ferromq:1").unwrap();
    let r = render(&p, &s, &owner());
    let metas = r
        .services
        .iter()
        .map(|o| &o.metadata)
        .chain(r.config_maps.iter().map(|o| &o.metadata))
        .chain(r.pdbs.iter().map(|o| &o.metadata))
        .chain(r.stateful_sets.iter().map(|o| &o.metadata));
    for m in metas {
        let l = m.labels.as_ref().unwrap();
        assert_eq!(l["app.kubernetes.io/name"], "ferromq");
        assert_eq!(l[LABEL_INSTANCE], "demo");
        assert_eq!(l["app.kubernetes.io/managed-by"], FIELD_MANAGER);
        assert_eq!(m.namespace.as_deref(), Some("mq"));
        assert_eq!(m.owner_references.as_deref(), Some(&[owner()][..]));
    }
    let g1 = &r.stateful_sets[2];
    let sp = g1.spec.as_ref().unwrap();
    assert_eq!(
        sp.selector.match_labels.as_ref().unwrap()[LABEL_GROUP],
        "demo-broker-1"
    );
    let tmpl = sp.template.metadata.as_ref().unwrap();
    assert_eq!(
        tmpl.annotations.as_ref().unwrap()[ANNOTATION_CONFIG_HASH],
        p.groups[1].config_hash
    );
    let anti = affinity_of(sp).pod_anti_affinity.as_ref().unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        r.pdbs[2].spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    let claims = sp.volume_claim_templates.as_ref().unwrap();
    assert_eq!(
        claims[0]
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "10Gi"
    );
    let retention = sp
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
    let headless = &r.services[0];
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
}

#[test]
fn flush_change_changes_the_config_map_and_rolls_the_pods() {
    let a = spec(1, 1, Replication::Async, Flush::Async);
    let b = spec(1, 1, Replication::Async, Flush::Sync);
    let ra = render(&plan("d", "n", &a, "i").unwrap(), &a, &owner());
    let rb = render(&plan("d", "n", &b, "i").unwrap(), &b, &owner());
    assert_ne!(ra.config_maps[0].data, rb.config_maps[0].data);
    let hash = |r: &Resources| {
        r.stateful_sets[1]
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[ANNOTATION_CONFIG_HASH]
            .clone()
    };
    assert_ne!(hash(&ra), hash(&rb));
}

#[test]
fn ephemeral_storage_uses_an_empty_dir() {
    let mut s = spec(1, 0, Replication::Async, Flush::Async);
    s.broker.storage.ephemeral = true;
    let r = render(&plan("d", "n", &s, "i").unwrap(), &s, &owner());
    let sp = r.stateful_sets[1].spec.as_ref().unwrap();
    assert!(sp.volume_claim_templates.is_none());
    let vols = sp.template.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    assert!(vols.iter().any(|v| v.empty_dir.is_some()));
}

#[test]
fn volume_claim_labels_are_the_group_selector_only() {
    // An existing StatefulSet refuses any change to its volumeClaimTemplates, so their labels
    // must not follow the full label set when it grows.
    let s = spec(1, 0, Replication::Async, Flush::Async);
    let r = render(&plan("d", "n", &s, "i").unwrap(), &s, &owner());
    let sp = r.stateful_sets[1].spec.as_ref().unwrap();
    let claim = &sp.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(claim.metadata.labels, sp.selector.match_labels);
}

#[test]
fn name_servers_have_a_disruption_budget_and_spread_over_nodes() {
    let mut s = spec(1, 0, Replication::Async, Flush::Async);
    // The user's own affinity is kept, the operator's preference is added to it.
    let user = k8s_openapi::api::core::v1::Affinity {
        node_affinity: Some(Default::default()),
        ..Default::default()
    };
    s.name_server.scheduling.affinity = Some(user);
    let r = render(&plan("demo", "mq", &s, "i").unwrap(), &s, &owner());
    let want = selector("demo", "nameserver");
    let pdb = &r.pdbs[0];
    assert_eq!(pdb.metadata.name.as_deref(), Some("demo-nameserver"));
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb_spec.selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&want)
    );
    let sts = r.stateful_sets[0].spec.as_ref().unwrap();
    assert_eq!(sts.selector.match_labels.as_ref(), Some(&want));
    let affinity = affinity_of(sts);
    assert!(
        affinity.node_affinity.is_some(),
        "the user's affinity is kept"
    );
    let terms = affinity
        .pod_anti_affinity
        .as_ref()
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(terms.len(), 1);
    assert_eq!(
        terms[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        terms[0]
            .pod_affinity_term
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref(),
        Some(&want)
    );
}

/// The pod affinity a StatefulSet's template sets (the test fails if it sets none).
fn affinity_of(
    sts: &k8s_openapi::api::apps::v1::StatefulSetSpec,
) -> &k8s_openapi::api::core::v1::Affinity {
    sts.template
        .spec
        .as_ref()
        .and_then(|p| p.affinity.as_ref())
        .expect("the pod template sets an affinity")
}

#[test]
fn name_servers_copy_the_kv_config_from_each_other_through_their_headless_service() {
    let s = spec(1, 0, Replication::Async, Flush::Async);
    let r = render(&plan("demo", "mq", &s, "i").unwrap(), &s, &owner());
    let args = pod_of(&r, 0).containers[0].args.clone().unwrap_or_default();
    let at = args
        .iter()
        .position(|a| a == "--kv-peers")
        .expect("--kv-peers");
    assert_eq!(args[at + 1], "demo-nameserver-headless.mq.svc:9876");
}

/// The pod template of the `i`th StatefulSet rendered (0: the name servers).
fn pod_of(r: &Resources, i: usize) -> &k8s_openapi::api::core::v1::PodSpec {
    r.stateful_sets[i]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}
