//! Every example in deploy/examples parses as a BrokerCluster, passes the CRD's CEL rules and
//! plans, and together they cover the four models of the deployment guide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use operator::crd::{BrokerCluster, Replication};

fn examples() -> Vec<(String, BrokerCluster)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut out: Vec<(String, BrokerCluster)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let bc: BrokerCluster =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), bc)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_example_is_a_valid_broker_cluster() {
    let all = examples();
    assert_eq!(
        all.len(),
        4,
        "{:?}",
        all.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    for (file, bc) in &all {
        bc.validate_cel()
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        operator::plan::plan(
            &bc.metadata.name.clone().unwrap(),
            "default",
            &bc.spec,
            "ferromq:test",
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn examples_cover_the_four_models() {
    let by_name: std::collections::BTreeMap<String, BrokerCluster> =
        examples().into_iter().collect();
    let b = |f: &str| by_name[f].spec.broker.clone();
    assert_eq!(
        (
            b("single-master.yaml").masters,
            b("single-master.yaml").slaves_per_master
        ),
        (1, 0)
    );
    assert!(b("multi-master.yaml").masters >= 2 && b("multi-master.yaml").slaves_per_master == 0);
    let a = b("async-replication.yaml");
    assert!(a.masters >= 2 && a.slaves_per_master >= 1 && a.replication == Replication::Async);
    let s = b("sync-double-write.yaml");
    assert!(s.masters >= 2 && s.slaves_per_master >= 1 && s.replication == Replication::Sync);
}
