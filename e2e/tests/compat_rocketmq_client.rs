//! Compatibility: the published `rocketmq-client-rust` 1.0 producer and push consumer against
//! mqnamesrv (a pair) + mqbroker, unchanged. Plus our own mqadmin round trip on the same cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{Broker, BrokerSpec, Error, NameServer};
use rocketmq_client_rust::{
    ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

const MESSAGES: usize = 10_000;

/// What a message carried, as sent and as received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    body: Vec<u8>,
    tags: Option<String>,
    keys: Option<Vec<String>>,
    color: Option<String>,
}

#[derive(Default)]
struct Collector {
    got: Mutex<HashMap<u64, Seen>>,
    deliveries: AtomicUsize,
}

struct Listener(Arc<Collector>);

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _ctx: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut got = self.0.got.lock().unwrap();
        for m in msgs {
            let inner = m.message_inner();
            let seq = inner
                .property("seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            got.insert(
                seq,
                Seen {
                    body: inner.body_slice().to_vec(),
                    tags: inner.tags().map(String::from),
                    keys: inner.keys(),
                    color: inner.property("color").map(String::from),
                },
            );
            self.0.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

struct Runtime {
    owner: RuntimeOwner,
    client: Arc<ClientRuntime>,
    _telemetry: rocketmq_observability::TelemetryRuntimeGuard,
}

fn runtime() -> Result<Runtime, Error> {
    let owner = RuntimeOwner::plan(RuntimeConfig {
        thread_name: "compat-client".into(),
        ..Default::default()
    })?
    .build()?;
    let telemetry = rocketmq_observability::install_global(
        &rocketmq_observability::TelemetryBootstrapConfig::default(),
    )?;
    let client = ClientRuntime::try_new(
        owner.root_context().component("client"),
        ClientRuntimeConfig::default(),
        telemetry.handle(),
    )?;
    Ok(Runtime {
        owner,
        client,
        _telemetry: telemetry,
    })
}

fn expected(seq: u64) -> Seen {
    Seen {
        body: format!("message {seq} {}", "z".repeat((seq % 300) as usize)).into_bytes(),
        tags: Some(
            if seq.is_multiple_of(2) {
                "TagA"
            } else {
                "TagB"
            }
            .to_string(),
        ),
        keys: Some(vec![format!("key-{seq}"), format!("order-{}", seq / 10)]),
        color: Some(["red", "green", "blue"][(seq % 3) as usize].to_string()),
    }
}

async fn consume_all(
    rt: &Runtime,
    namesrv: &str,
    group: &str,
    topic: &str,
) -> Result<Arc<Collector>, Error> {
    let collector = Arc::new(Collector::default());
    let mut consumer = DefaultMQPushConsumer::builder(rt.client.clone())
        .consumer_group(group.to_string())
        .name_server_addr(namesrv.to_string())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        // The client runs each listener call as a blocking task with bounded admission; with
        // one message per call a 10,000-message backlog overflows it (client-side
        // "runtime.capacity.exhausted"), so hand it batches.
        .consume_message_batch_max_size(32)
        .build();
    consumer.subscribe(topic, "*").await?;
    consumer.register_message_listener_concurrently(Listener(collector.clone()));
    consumer.start().await?;
    let start = Instant::now();
    let mut last = 0;
    let mut last_change = Instant::now();
    while collector.got.lock().unwrap().len() < MESSAGES {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = collector.got.lock().unwrap().len();
        if n != last {
            last = n;
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(60)
            || start.elapsed() > Duration::from_secs(300)
        {
            break;
        }
    }
    consumer.shutdown().await;
    Ok(collector)
}

fn check(collector: &Collector, group: &str) {
    let got = collector.got.lock().unwrap();
    let missing: Vec<u64> = (0..MESSAGES as u64)
        .filter(|s| !got.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{group}: {} of {MESSAGES} messages never arrived (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for seq in 0..MESSAGES as u64 {
        assert_eq!(
            got[&seq],
            expected(seq),
            "{group}: message {seq} differs from what was sent"
        );
    }
    let deliveries = collector.deliveries.load(Ordering::Relaxed);
    println!("{group}: {MESSAGES} messages, {deliveries} deliveries");
    assert_eq!(
        deliveries, MESSAGES,
        "{group}: messages were delivered more than once"
    );
}

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
    let topic = "CompatTopic";
    let rt = runtime()?;

    let mut producer = DefaultMQProducer::builder(rt.client.clone())
        .producer_group("compat_producer".to_string())
        .name_server_addr(namesrv.clone())
        .build();
    producer.start().await?;
    let mut per_queue: BTreeMap<i32, usize> = BTreeMap::new();
    for seq in 0..MESSAGES as u64 {
        let e = expected(seq);
        let msg = Message::builder()
            .topic(topic)
            .body(e.body.clone())
            .tags(e.tags.clone().unwrap_or_default())
            .keys(e.keys.clone().unwrap_or_default())
            .raw_property("seq", seq.to_string())?
            .raw_property("color", e.color.clone().unwrap_or_default())?
            .build()?;
        let r = producer.send_with_timeout(msg, 5_000).await?;
        let r = r.ok_or("send returned no result")?;
        *per_queue
            .entry(r.message_queue.as_ref().map_or(-1, |q| q.queue_id()))
            .or_default() += 1;
    }
    println!("sent {MESSAGES} messages across queues {per_queue:?}");
    producer.shutdown().await;

    let first = consume_all(&rt, &namesrv, "compat_group_1", topic).await?;
    check(&first, "compat_group_1");
    // A group started afterwards, from the first offset, also sees everything.
    let second = consume_all(&rt, &namesrv, "compat_group_2", topic).await?;
    check(&second, "compat_group_2");

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
    let _ = rt.client.shutdown().await;
    let _ = rt.owner.shutdown_tasks().await;
    Ok(())
}
