//! The four deployment models of the RocketMQ guide, each with a name-server pair, driven by
//! the published `rocketmq-client-rust` client: 10,000 messages produced and push-consumed,
//! each exactly once and in order per queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use e2e::{Broker, BrokerSpec, Error, NameServer};

const MESSAGES: u64 = 10_000;

/// `masters` groups, each with `slaves` slaves in `role`, all with `flush`.
async fn run_model(
    label: &str,
    masters: usize,
    slaves: usize,
    role: &str,
    flush: &str,
) -> Result<(), Error> {
    let dir = e2e::test_dir(label)?;
    let ns1 = NameServer::start(dir.path(), 120_000)?;
    let ns2 = NameServer::start(dir.path(), 120_000)?;
    let ns = [ns1.addr.as_str(), ns2.addr.as_str()];
    let mut brokers = Vec::new();
    for m in 0..masters {
        let name = format!("broker-{}", (b'a' + m as u8) as char);
        brokers.push(Broker::start(
            dir.path(),
            &BrokerSpec::member(&name, 0, role, flush),
            &ns,
        )?);
        for s in 1..=slaves {
            brokers.push(Broker::start(
                dir.path(),
                &BrokerSpec::member(&name, s as i64, "SLAVE", flush),
                &ns,
            )?);
        }
    }
    let namesrv = ns.join(";");
    let topic = format!("{label}_topic");
    // Create the topic on every master (as `mqadmin updateTopic -c` does) so sends spread.
    let client = broker::client::Client::new(ns.iter().map(|s| s.to_string()).collect());
    for b in brokers.iter().step_by(slaves + 1) {
        client
            .create_topic(
                &b.addr,
                &broker::store::topics::TopicConfig::new(&topic, 4, 6),
            )
            .await?;
    }
    for _ in 0..100 {
        if client
            .refresh_route(&topic)
            .await
            .map(|r| r.queue_datas.len())
            .unwrap_or(0)
            == masters
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SYNC_MASTER needs its slave connected before sends are acknowledged.
    if slaves > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let rt = common::Runtime::new()?;
    let mut producer = common::producer(&rt, &namesrv, &format!("{label}_producer")).await?;
    let per_broker = common::send_range(&producer, &topic, 0..MESSAGES).await?;
    producer.shutdown().await;
    assert_eq!(
        per_broker.len(),
        masters,
        "{label}: sends did not reach every master: {per_broker:?}"
    );

    let (mut consumer, got) =
        common::push_consumer(&rt, &namesrv, &format!("{label}_group"), &topic).await?;
    common::wait_for(&got, MESSAGES as usize, Duration::from_secs(60)).await;
    consumer.shutdown().await;
    common::check_all(&got, MESSAGES, label);
    common::check_once_in_order(&got, label);

    // Every slave caught up with its master, byte for byte.
    for group in brokers.chunks(slaves + 1) {
        let master = client.runtime_info(&group[0].addr).await?;
        for s in &group[1..] {
            let mut same = false;
            for _ in 0..50 {
                let slave = client.runtime_info(&s.addr).await?;
                if slave["commitLogMaxOffset"] == master["commitLogMaxOffset"] {
                    same = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(same, "{label}: slave {} did not catch up", s.addr);
        }
    }
    println!("{label}: {MESSAGES} messages over {masters} master(s) x {slaves} slave(s) [{role}, {flush}]: {per_broker:?}");
    rt.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_master() -> Result<(), Error> {
    run_model("single_master", 1, 0, "ASYNC_MASTER", "ASYNC_FLUSH").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_masters() -> Result<(), Error> {
    run_model("two_masters", 2, 0, "ASYNC_MASTER", "SYNC_FLUSH").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_masters_one_slave_each_async_replication() -> Result<(), Error> {
    run_model("async_replication", 2, 1, "ASYNC_MASTER", "ASYNC_FLUSH").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_masters_one_slave_each_sync_double_write() -> Result<(), Error> {
    run_model("sync_double_write", 2, 1, "SYNC_MASTER", "ASYNC_FLUSH").await
}
