//! The CRD: `crds/` is current, and its CEL rules accept and refuse what they should, with the
//! message a user sees (evaluated by kube's client-side CEL support, no cluster needed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::core::ObjectMeta;
use operator::crd::{BrokerCluster, BrokerClusterSpec};

#[test]
fn committed_crd_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/brokercluster.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let current = operator::crd_yaml().unwrap();
    assert!(
        committed == current,
        "crds/brokercluster.yaml is stale: run `cargo run -p operator --bin operator -- crd > crds/brokercluster.yaml`"
    );
}

#[test]
fn chart_ships_the_same_crd() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let chart =
        std::fs::read_to_string(root.join("charts/ferromq-operator/crds/brokercluster.yaml"))
            .unwrap_or_default();
    assert!(
        chart == operator::crd_yaml().unwrap(),
        "charts/ferromq-operator/crds/brokercluster.yaml is stale: copy crds/brokercluster.yaml there"
    );
}

fn cluster(spec: serde_json::Value) -> BrokerCluster {
    named("demo", spec)
}

fn named(name: &str, spec: serde_json::Value) -> BrokerCluster {
    let spec: BrokerClusterSpec = serde_json::from_value(spec).unwrap();
    BrokerCluster {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

fn name_errors(name: &str) -> Vec<String> {
    match named(name, serde_json::json!({})).validate_cel() {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.message.clone()).collect(),
    }
}

#[test]
fn names_every_generated_name_can_carry_are_accepted() {
    for name in [
        "demo",
        "orders-2",
        "a",
        &"a".repeat(operator::plan::MAX_CLUSTER_NAME_LEN),
    ] {
        assert_eq!(name_errors(name), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn names_too_long_or_not_dns_labels_are_refused() {
    let long = "a".repeat(operator::plan::MAX_CLUSTER_NAME_LEN + 1);
    let e = name_errors(&long);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("metadata.name may have at most 41 characters"),
        "{e:?}"
    );
    for name in ["1demo", "demo-", "de.mo", "-demo"] {
        let e = name_errors(name);
        assert_eq!(e.len(), 1, "{name}: {e:?}");
        assert!(
            e[0].starts_with("metadata.name must be a DNS-1035 label"),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn more_masters_than_group_names_allow_are_refused() {
    assert_eq!(
        errors(serde_json::json!({"broker": {"masters": 1000}})),
        Vec::<String>::new()
    );
    let e = errors(serde_json::json!({"broker": {"masters": 1001}}));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("broker.masters may be at most 1000"),
        "{e:?}"
    );
}

#[test]
fn counts_a_typo_could_blow_up_and_negative_timeouts_are_refused() {
    for (spec, want) in [
        (
            serde_json::json!({"broker": {"slavesPerMaster": 17}}),
            "broker.slavesPerMaster may be at most 16",
        ),
        (
            serde_json::json!({"nameServer": {"replicas": 33}}),
            "nameServer.replicas may be at most 32",
        ),
        (
            serde_json::json!({"broker": {"drainTimeoutSeconds": -1}}),
            "broker.drainTimeoutSeconds may not be negative",
        ),
    ] {
        let e = errors(spec.clone());
        assert_eq!(e, vec![want.to_string()], "{spec}");
    }
    assert_eq!(
        errors(
            serde_json::json!({"broker": {"slavesPerMaster": 16}, "nameServer": {"replicas": 32}})
        ),
        Vec::<String>::new()
    );
}

fn errors(spec: serde_json::Value) -> Vec<String> {
    match cluster(spec).validate_cel() {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.message.clone()).collect(),
    }
}

#[test]
fn valid_specs_pass() {
    for spec in [
        serde_json::json!({}),
        serde_json::json!({"broker": {"masters": 2}}),
        serde_json::json!({"broker": {"masters": 2, "slavesPerMaster": 1, "replication": "Sync", "flush": "Sync"}}),
        serde_json::json!({"broker": {"config": {"fileReservedTime": "48"}}}),
    ] {
        assert_eq!(errors(spec.clone()), Vec::<String>::new(), "{spec}");
    }
}

#[test]
fn zero_masters_is_refused() {
    let e = errors(serde_json::json!({"broker": {"masters": 0}}));
    assert_eq!(e, vec!["broker.masters must be at least 1".to_string()]);
}

#[test]
fn sync_replication_without_slaves_is_refused() {
    let e = errors(serde_json::json!({"broker": {"replication": "Sync"}}));
    assert_eq!(
        e,
        vec!["replication: Sync (sync double write) needs slavesPerMaster >= 1".to_string()]
    );
}

#[test]
fn config_may_not_set_owned_keys() {
    for key in [
        "brokerName",
        "brokerId",
        "brokerRole",
        "flushDiskType",
        "namesrvAddr",
        "listenPort",
        "storePathRootDir",
        "haMasterAddress",
    ] {
        let e = errors(serde_json::json!({"broker": {"config": {key: "x"}}}));
        assert_eq!(e.len(), 1, "{key}: {e:?}");
        assert!(e[0].contains("keys the operator owns"), "{key}: {e:?}");
    }
}

#[test]
fn storage_class_is_immutable() {
    let old = cluster(serde_json::json!({"broker": {"storage": {"storageClassName": "fast"}}}));
    let same = cluster(
        serde_json::json!({"broker": {"masters": 2, "storage": {"storageClassName": "fast"}}}),
    );
    assert!(same.validate_cel_update(&old).is_ok());
    let changed = cluster(serde_json::json!({"broker": {"storage": {"storageClassName": "slow"}}}));
    let e: Vec<String> = changed
        .validate_cel_update(&old)
        .unwrap_err()
        .into_iter()
        .map(|e| e.message.clone())
        .collect();
    assert_eq!(
        e,
        vec!["broker.storage.storageClassName is immutable".to_string()]
    );
    let removed = cluster(serde_json::json!({"broker": {"storage": {}}}));
    assert!(removed.validate_cel_update(&old).is_err());
}

fn update_errors(old: serde_json::Value, new: serde_json::Value) -> Vec<String> {
    match cluster(new).validate_cel_update(&cluster(old)) {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.message.clone()).collect(),
    }
}

#[test]
fn the_commit_log_segment_size_is_immutable() {
    let sized =
        serde_json::json!({"broker": {"config": {"mappedFileSizeCommitLog": "1073741824"}}});
    let other = serde_json::json!({"broker": {"config": {"mappedFileSizeCommitLog": "104857600"}}});
    let unset = serde_json::json!({"broker": {"config": {"fileReservedTime": "48"}}});
    for (old, new) in [(&sized, &other), (&sized, &unset), (&unset, &other)] {
        let e = update_errors(old.clone(), new.clone());
        assert_eq!(e.len(), 1, "{old} -> {new}: {e:?}");
        assert!(
            e[0].starts_with("broker.config.mappedFileSizeCommitLog cannot change"),
            "{e:?}"
        );
    }
    // Other keys, and the same size, edit freely.
    let more = serde_json::json!({"broker": {"config": {"mappedFileSizeCommitLog": "1073741824", "fileReservedTime": "48"}}});
    assert_eq!(update_errors(sized.clone(), more), Vec::<String>::new());
    assert_eq!(
        update_errors(unset, serde_json::json!({"broker": {"masters": 2}})),
        Vec::<String>::new()
    );
}

#[test]
fn storage_size_is_immutable() {
    // The StatefulSet's volumeClaimTemplates cannot change: the apiserver would refuse every
    // reconcile after such an edit.
    let old = serde_json::json!({"broker": {"storage": {"size": "10Gi"}}});
    assert_eq!(
        update_errors(
            old.clone(),
            serde_json::json!({"broker": {"storage": {"size": "10Gi"}, "masters": 3}})
        ),
        Vec::<String>::new()
    );
    let e = update_errors(
        old,
        serde_json::json!({"broker": {"storage": {"size": "20Gi"}}}),
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("broker.storage.size is immutable"),
        "{e:?}"
    );
    assert!(e[0].contains("expand each PersistentVolumeClaim"), "{e:?}");
    let e = update_errors(
        serde_json::json!({}),
        serde_json::json!({"broker": {"storage": {"size": "1Ti"}}}),
    );
    assert_eq!(e.len(), 1, "a default size is fixed too: {e:?}");
}

#[test]
fn storage_ephemeral_is_immutable() {
    for (old, new) in [(false, true), (true, false)] {
        let e = update_errors(
            serde_json::json!({"broker": {"storage": {"ephemeral": old}}}),
            serde_json::json!({"broker": {"storage": {"ephemeral": new}}}),
        );
        assert_eq!(e.len(), 1, "{old} -> {new}: {e:?}");
        assert!(
            e[0].starts_with("broker.storage.ephemeral is immutable"),
            "{e:?}"
        );
        assert!(e[0].contains("create a new BrokerCluster"), "{e:?}");
    }
}

/// Validates an update of raw specs as the API server does, `null`s included (a typed
/// BrokerCluster cannot hold them): a `null` in a field that is not nullable is dropped, and
/// its default applied, before any rule runs; a `null` kept in a nullable field runs none of
/// that field's own rules. kube's client-side validator does neither, so both are done here.
fn admitted_update_errors(old: serde_json::Value, new: serde_json::Value) -> Vec<String> {
    fn admit(schema: &mut serde_json::Value, value: &mut serde_json::Value) {
        let (Some(props), Some(obj)) = (
            schema.get_mut("properties").and_then(|p| p.as_object_mut()),
            value.as_object_mut(),
        ) else {
            return;
        };
        let keys: Vec<String> = obj.keys().cloned().collect();
        for k in keys {
            let Some(prop) = props.get_mut(&k) else {
                continue;
            };
            if !obj[&k].is_null() {
                admit(prop, obj.get_mut(&k).unwrap());
            } else if prop["nullable"] == true {
                prop.as_object_mut()
                    .unwrap()
                    .remove("x-kubernetes-validations");
            } else {
                obj.remove(&k);
            }
        }
    }
    use kube::CustomResourceExt;
    let crd = BrokerCluster::crd();
    let mut schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let object = |spec| {
        serde_json::json!({"apiVersion": "ferromq.io/v1alpha1", "kind": "BrokerCluster",
            "metadata": {"name": "demo"}, "spec": spec})
    };
    let mut new = object(new);
    admit(&mut schema, &mut new);
    match kube::core::cel::Validator::new().validate(&schema, &new, Some(&object(old))) {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.message.clone()).collect(),
    }
}

#[test]
fn storage_size_cannot_be_changed_by_setting_it_to_null() {
    // The API server runs no rule on a null field: a nullable size with its own rule let
    // `size: null` through, and the operator could then not read the cluster.
    let old = serde_json::json!({"broker": {"storage": {"size": "20Gi"}}});
    assert_eq!(
        admitted_update_errors(old.clone(), old.clone()),
        Vec::<String>::new()
    );
    let e = admitted_update_errors(
        old,
        serde_json::json!({"broker": {"storage": {"size": null}}}),
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("broker.storage.size is immutable"),
        "{e:?}"
    );
}
