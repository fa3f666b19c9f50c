//! The operator's group actions against a real broker and name server, in-process.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use broker::client::{Client, Message, Producer};
use broker::config::BrokerConfig;
use broker::nameserver::NameServerConfig;
use broker::store::topics::TopicConfig;
use operator::admin::BrokerAdmin;
use operator::controller::{GroupAdmin, GroupRef, SettingsApplied, SettingsError};

/// A name server and one broker (`cfg` adjusted by `tune`) in this process, the broker's
/// group registered with the name server, and its topic `T`.
async fn one_group(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut BrokerConfig),
) -> (
    broker::nameserver::NameServerHandle,
    broker::server::BrokerHandle,
    GroupRef,
    std::sync::Arc<Client>,
) {
    let ns = broker::nameserver::start(NameServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cfg = BrokerConfig {
        store_root: dir.to_path_buf(),
        listen_port: 0,
        http_port: 0,
        ha_listen_port: 0,
        namesrv_addrs: vec![ns.addr.to_string()],
        ..BrokerConfig::default()
    };
    tune(&mut cfg);
    let group = cfg.broker_name.clone();
    let b = broker::server::start(cfg).await.unwrap();
    let client = Client::new(vec![ns.addr.to_string()]);
    client
        .create_topic(&b.addr.to_string(), &TopicConfig::new("T", 1, 6))
        .await
        .unwrap();
    let g = GroupRef {
        cluster: "demo".into(),
        namespace: "default".into(),
        group,
        namesrv_addr: ns.addr.to_string(),
    };
    (ns, b, g, client)
}

/// Asks whether `g` is drained until it answers as `want` (up to 5 s); the last answer.
async fn drained_within(g: &GroupRef, want: bool) -> Result<bool, String> {
    let mut drained = Err(String::new());
    for _ in 0..200 {
        drained = BrokerAdmin.drained(g).await;
        if drained == Ok(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_delayed_messages_waiting_is_not_drained() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, b, g, client) = one_group(dir.path(), |_| {}).await;
    // Registered with the name server (the admin finds the master there).
    assert_eq!(
        drained_within(&g, true).await,
        Ok(true),
        "an empty group is drained"
    );

    // A message delayed by two hours waits in the schedule topic, consumed by nobody yet.
    let producer = Producer::new(client.clone(), "P");
    let msg = Message {
        topic: "T".into(),
        tags: None,
        keys: Vec::new(),
        properties: BTreeMap::from([("DELAY".to_string(), "18".to_string())]),
        body: "later".into(),
    };
    producer.send(&msg).await.unwrap();
    assert_eq!(BrokerAdmin.drained(&g).await, Ok(false));
    b.stop().await;
    ns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_undecided_transactions_is_not_drained() {
    let dir = tempfile::tempdir().unwrap();
    // Checks every 100 ms, of half messages an hour old: this one stays undecided.
    let (ns, b, g, client) = one_group(dir.path(), |c| {
        c.transaction_timeout_ms = 3_600_000;
        c.transaction_check_interval_ms = 100;
    })
    .await;
    assert_eq!(
        drained_within(&g, true).await,
        Ok(true),
        "an empty group is drained"
    );
    let producer = Producer::new(client.clone(), "P");
    let half = Message {
        topic: "T".into(),
        tags: None,
        keys: Vec::new(),
        properties: BTreeMap::from([
            ("TRAN_MSG".to_string(), "true".to_string()),
            ("PGROUP".to_string(), "P".to_string()),
        ]),
        body: "maybe".into(),
    };
    producer.send(&half).await.unwrap();
    // Before any round of checks has saved a progress, and after rounds have.
    assert_eq!(BrokerAdmin.drained(&g).await, Ok(false));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(BrokerAdmin.drained(&g).await, Ok(false));
    b.stop().await;
    ns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_brought_to_the_spec_on_a_running_broker_and_only_when_they_differ() {
    let dir = tempfile::tempdir().unwrap();
    // The broker runs the broker.conf the operator renders (a spec setting two live keys),
    // so the operator and the broker must agree on how every value reads: nothing to change.
    let spec: operator::crd::BrokerClusterSpec = serde_json::from_value(serde_json::json!({
        "broker": {"masters": 1, "config": {"deleteWhen": "04;16", "diskMaxUsedSpaceRatio": "99"}}
    }))
    .unwrap();
    let plan = operator::plan::plan("demo", "mq", &spec, "img").unwrap();
    let rendered = BrokerConfig::parse(&plan.groups[0].broker_conf).unwrap();
    let (ns, b, g, client) = one_group(dir.path(), |c| {
        *c = BrokerConfig {
            store_root: c.store_root.clone(),
            listen_port: 0,
            http_port: 0,
            ha_listen_port: 0,
            namesrv_addrs: c.namesrv_addrs.clone(),
            broker_ip: "127.0.0.1".into(),
            broker_name: c.broker_name.clone(),
            ..rendered.clone()
        };
    })
    .await;
    // As registered (the address the admin finds).
    let addr = format!("127.0.0.1:{}", b.addr.port());
    let mut wanted: Vec<(String, String)> = plan.groups[0]
        .live_settings
        .iter()
        .map(|(k, v)| match k.as_str() {
            // This test's name server, not the plan's Service.
            "namesrvAddr" => (k.clone(), g.namesrv_addr.clone()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    // Registered with the name server first (the admin finds the members there).
    let mut first = Err(SettingsError::NotYet(String::new()));
    for _ in 0..200 {
        first = BrokerAdmin.apply_settings(&g, &wanted).await;
        if first.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        first,
        Ok(SettingsApplied {
            checked: 1,
            changed: Vec::new()
        })
    );
    // A changed value is sent, and only it.
    for (k, v) in wanted.iter_mut() {
        if k == "fileReservedTime" {
            *v = "48".into();
        }
    }
    let done = BrokerAdmin.apply_settings(&g, &wanted).await.unwrap();
    assert_eq!(done.changed, vec![format!("{addr}: fileReservedTime=48")]);
    let have = client.broker_config(&addr).await.unwrap();
    assert_eq!(have["fileReservedTime"], "48");
    assert_eq!(
        BrokerAdmin
            .apply_settings(&g, &wanted)
            .await
            .unwrap()
            .changed,
        Vec::<String>::new()
    );
    // A value the broker refuses is a refusal, naming the broker.
    let bad = vec![("fileReservedTime".to_string(), "soon".to_string())];
    match BrokerAdmin.apply_settings(&g, &bad).await {
        Err(SettingsError::Refused(why)) => {
            assert!(
                why.contains(&addr) && why.contains("fileReservedTime"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    b.stop().await;
    ns.stop().await;
}
