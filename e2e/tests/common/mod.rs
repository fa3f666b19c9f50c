//! Driving a cluster with the published `rocketmq-client-rust` 1.0 client: producer, push
//! consumer, and what every message carried, for the tests that need a real RocketMQ client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::Error;
use rocketmq_client_rust::{
    ClientConfig, ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently, MessageSelector,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

/// What a message carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub body: Vec<u8>,
    pub tags: Option<String>,
    pub keys: Option<Vec<String>>,
    pub color: Option<String>,
}

/// Where a delivered message was stored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    pub broker: String,
    pub queue: i32,
    pub offset: i64,
}

/// Everything a push consumer received.
#[derive(Default)]
pub struct Collector {
    pub got: Mutex<HashMap<u64, Seen>>,
    pub places: Mutex<Vec<(Place, u64)>>,
    pub deliveries: AtomicUsize,
}

struct Listener(Arc<Collector>);

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _ctx: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut got = self.0.got.lock().unwrap();
        let mut places = self.0.places.lock().unwrap();
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
            places.push((
                Place {
                    broker: m.broker_name().to_string(),
                    queue: m.queue_id(),
                    offset: m.queue_offset(),
                },
                seq,
            ));
            self.0.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

/// The client's runtime.
pub struct Runtime {
    pub owner: RuntimeOwner,
    pub client: Arc<ClientRuntime>,
    _telemetry: rocketmq_observability::TelemetryRuntimeGuard,
}

impl Runtime {
    pub fn new() -> Result<Runtime, Error> {
        let owner = RuntimeOwner::plan(RuntimeConfig {
            thread_name: "rmq-client".into(),
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

    pub async fn shutdown(self) {
        let _ = self.client.shutdown().await;
        let _ = self.owner.shutdown_tasks().await;
    }
}

/// Client settings: the fastest route polling the client allows (10 s), so tests see topology
/// changes quickly.
pub fn client_config(namesrv: &str) -> ClientConfig {
    ClientConfig {
        namesrv_addr: Some(namesrv.to_string().into()),
        poll_name_server_interval: 10_000,
        heartbeat_broker_interval: 10_000,
        ..Default::default()
    }
}

/// The message with sequence number `seq`.
pub fn expected(seq: u64) -> Seen {
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

pub fn message(topic: &str, seq: u64) -> Result<Message, Error> {
    let e = expected(seq);
    Ok(Message::builder()
        .topic(topic)
        .body(e.body.clone())
        .tags(e.tags.clone().unwrap_or_default())
        .keys(e.keys.clone().unwrap_or_default())
        .raw_property("seq", seq.to_string())?
        .raw_property("color", e.color.clone().unwrap_or_default())?
        .build()?)
}

/// The same message as [`message`], for ferromq's own producer.
pub fn ferromq_message(topic: &str, seq: u64) -> broker::client::Message {
    let e = expected(seq);
    broker::client::Message {
        topic: topic.to_string(),
        tags: e.tags,
        keys: e.keys.unwrap_or_default(),
        properties: BTreeMap::from([
            ("seq".to_string(), seq.to_string()),
            ("color".to_string(), e.color.unwrap_or_default()),
        ]),
        body: e.body.into(),
    }
}

/// A started producer.
pub async fn producer(
    rt: &Runtime,
    namesrv: &str,
    group: &str,
) -> Result<DefaultMQProducer, Error> {
    let mut p = DefaultMQProducer::builder(rt.client.clone())
        .client_config(client_config(namesrv))
        .producer_group(group.to_string())
        .build();
    p.start().await?;
    Ok(p)
}

/// Sends messages `range` one by one; returns how many each broker group got.
pub async fn send_range(
    p: &DefaultMQProducer,
    topic: &str,
    range: std::ops::Range<u64>,
) -> Result<BTreeMap<String, usize>, Error> {
    let mut per_broker = BTreeMap::new();
    for seq in range {
        let r = p
            .send_with_timeout(message(topic, seq)?, 5_000)
            .await?
            .ok_or("send returned no result")?;
        let broker = r
            .message_queue
            .as_ref()
            .map_or("?".to_string(), |q| q.broker_name().to_string());
        *per_broker.entry(broker).or_default() += 1;
    }
    Ok(per_broker)
}

/// A started push consumer of `topic` in `group`, from the first offset.
pub async fn push_consumer(
    rt: &Runtime,
    namesrv: &str,
    group: &str,
    topic: &str,
) -> Result<(DefaultMQPushConsumer, Arc<Collector>), Error> {
    push_consumer_selecting(rt, namesrv, group, topic, None).await
}

/// A started push consumer of the messages of `topic` that `selector` selects (all without
/// one), in `group`, from the first offset.
pub async fn push_consumer_selecting(
    rt: &Runtime,
    namesrv: &str,
    group: &str,
    topic: &str,
    selector: Option<MessageSelector>,
) -> Result<(DefaultMQPushConsumer, Arc<Collector>), Error> {
    let collector = Arc::new(Collector::default());
    let mut consumer = DefaultMQPushConsumer::builder(rt.client.clone())
        .client_config(client_config(namesrv))
        .consumer_group(group.to_string())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        // The client runs each listener call as a blocking task with bounded admission (on
        // two cores: 4 running, 16 queued); with one message per call a 10,000-message
        // backlog overflows it (client-side "runtime.capacity.exhausted"), so hand it batches.
        // A batch refused there is retried through the group's retry topic, which the order
        // checks would read as a gap or a duplicate. Batches of 32 still overflowed it with
        // eight queues and the default 1,000 messages cached per queue: a queue now pulls
        // again only once its last batch is consumed.
        .consume_message_batch_max_size(32)
        .pull_threshold_for_queue(16)
        .build();
    consumer.subscribe_with_selector(topic, selector).await?;
    consumer.register_message_listener_concurrently(Listener(collector.clone()));
    consumer.start().await?;
    Ok((consumer, collector))
}

/// Waits until `collector` holds `n` distinct messages, or nothing new came for `idle`.
pub async fn wait_for(collector: &Collector, n: usize, idle: Duration) {
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        let have = collector.got.lock().unwrap().len();
        if have >= n {
            return;
        }
        if have != last {
            last = have;
            last_change = Instant::now();
        }
        if last_change.elapsed() > idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message `0..n` arrived exactly as sent.
pub fn check_all(collector: &Collector, n: u64, label: &str) {
    let got = collector.got.lock().unwrap();
    let missing: Vec<u64> = (0..n).filter(|s| !got.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{label}: {} of {n} messages never arrived (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for seq in 0..n {
        assert_eq!(
            got[&seq],
            expected(seq),
            "{label}: message {seq} differs from what was sent"
        );
    }
}

/// Each queue holds its messages at dense offsets from 0, in the order they were sent, and
/// nothing was delivered twice.
pub fn check_once_in_order(collector: &Collector, label: &str) {
    let places = collector.places.lock().unwrap();
    let mut per_queue: BTreeMap<(String, i32), Vec<(i64, u64)>> = BTreeMap::new();
    for (p, seq) in places.iter() {
        per_queue
            .entry((p.broker.clone(), p.queue))
            .or_default()
            .push((p.offset, *seq));
    }
    for ((broker, queue), mut v) in per_queue {
        v.sort();
        for (i, (off, _)) in v.iter().enumerate() {
            assert_eq!(*off, i as i64, "{label}: {broker}/{queue} delivered offset {off} at position {i} (gap or duplicate)");
        }
        for w in v.windows(2) {
            assert!(
                w[0].1 < w[1].1,
                "{label}: {broker}/{queue} stored message {} after {}",
                w[1].1,
                w[0].1
            );
        }
    }
    let deliveries = collector.deliveries.load(Ordering::Relaxed);
    assert_eq!(deliveries, places.len());
}
