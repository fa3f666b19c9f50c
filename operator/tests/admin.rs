//! The operator's group actions against a real broker and name server, in-process.

use std::collections::BTreeMap;
use std::time::Duration;

use broker::client::{Client, Message, Producer};
use broker::config::BrokerConfig;
use broker::nameserver::NameServerConfig;
use broker::store::topics::TopicConfig;
use operator::admin::BrokerAdmin;
use operator::controller::{GroupAdmin, GroupRef};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_delayed_messages_waiting_is_not_drained() {
    let dir = tempfile::tempdir().unwrap();
    let ns = broker::nameserver::start(NameServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = BrokerConfig {
        store_root: dir.path().to_path_buf(),
        listen_port: 0,
        http_port: 0,
        ha_listen_port: 0,
        namesrv_addrs: vec![ns.addr.to_string()],
        ..BrokerConfig::default()
    };
    let group = cfg.broker_name.clone();
    let b = broker::server::start(cfg).await.unwrap();
    let client = Client::new(vec![ns.addr.to_string()]);
    let broker_addr = b.addr.to_string();
    client
        .create_topic(&broker_addr, &TopicConfig::new("T", 1, 6))
        .await
        .unwrap();
    let g = GroupRef {
        cluster: "demo".into(),
        namespace: "default".into(),
        group,
        namesrv_addr: ns.addr.to_string(),
    };
    let admin = BrokerAdmin;
    // Registered with the name server (the admin finds the master there).
    let mut drained = Err(String::new());
    for _ in 0..200 {
        drained = admin.drained(&g).await;
        if drained.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(drained, Ok(true), "an empty group is drained");

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
    assert_eq!(admin.drained(&g).await, Ok(false));
    b.stop().await;
    ns.stop().await;
}
