//! Compatibility: the published `rocketmq-client-rust` 1.0 producer and push consumer against
//! mqnamesrv (a pair) + mqbroker, unchanged. Plus our own mqadmin round trip on the same cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use e2e::{Broker, BrokerSpec, Error, NameServer};

const MESSAGES: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rocketmq_client_rust_produces_and_push_consumes_through_ferromq() -> Result<(), Error> {
    let dir = e2e::test_dir("compat")?;
    let ns1 = NameServer::start(dir.path(), 120_000)?;
    let ns2 = NameServer::start(dir.path(), 120_000)?;
    let broker = Broker::start(
        dir.path(),
        &BrokerSpec::master("broker-a", "ASYNC_FLUSH"),
        &[&ns1.addr, &ns2.addr],
    )?;
    let namesrv = format!("{};{}", ns1.addr, ns2.addr);
    // A new topic: the producer's first send goes through TBW102 and auto-creates it.
    let topic = "CompatTopic";
    let rt = common::Runtime::new()?;

    let mut producer = common::producer(&rt, &namesrv, "compat_producer").await?;
    let per_broker = common::send_range(&producer, topic, 0..MESSAGES).await?;
    println!("sent {MESSAGES} messages: {per_broker:?}");
    producer.shutdown().await;

    for group in ["compat_group_1", "compat_group_2"] {
        // The second group starts after the first finished, from the first offset.
        let (mut consumer, got) = common::push_consumer(&rt, &namesrv, group, topic).await?;
        common::wait_for(&got, MESSAGES as usize, Duration::from_secs(60)).await;
        consumer.shutdown().await;
        common::check_all(&got, MESSAGES, group);
        common::check_once_in_order(&got, group);
        println!("{group}: all {MESSAGES} messages arrived once, as sent");
    }

    // Our own tools against the same cluster.
    let admin = e2e::bin("mqadmin")?;
    let out = std::process::Command::new(&admin)
        .args([
            "-n",
            &namesrv,
            "produce",
            "-t",
            "AdminTopic",
            "-c",
            "200",
            "--tags",
            "T",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "mqadmin produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(&admin)
        .args([
            "-n",
            &namesrv,
            "consume",
            "-t",
            "AdminTopic",
            "-g",
            "admin_group",
            "--idle-secs",
            "2",
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mqadmin consume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("consumed 200 messages"), "{stdout}");

    drop(broker);
    rt.shutdown().await;
    Ok(())
}
