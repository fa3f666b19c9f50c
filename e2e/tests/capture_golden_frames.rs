//! Regenerates `broker/tests/fixtures/frames/rocketmq-client-rust-1.0.bin`: the first request
//! of each code that the published `rocketmq-client-rust` client sends, captured on the wire
//! through a recording proxy. Run on purpose only:
//! `cargo test -p e2e --test capture_golden_frames -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::remoting::{FrameCodec, RemotingCommand, RequestCode};
use broker::store::topics::TopicConfig;
use bytes::BytesMut;
use e2e::{Broker, BrokerSpec, Error, NameServer};
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

type Captured = Arc<Mutex<BTreeMap<i32, Vec<u8>>>>;

/// Forwards connections to `upstream`, keeping the raw bytes of the first request per code.
async fn proxy(listener: TcpListener, upstream: String, captured: Captured) {
    while let Ok((mut client, _)) = listener.accept().await {
        let upstream = upstream.clone();
        let captured = captured.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            let up = async {
                let mut buf = BytesMut::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Cut whole frames off the front and keep the first of each code.
                    loop {
                        let before = buf.clone();
                        match FrameCodec::default().decode(&mut buf) {
                            Ok(Some(cmd)) => {
                                let used = before.len() - buf.len();
                                captured
                                    .lock()
                                    .unwrap()
                                    .entry(cmd.code)
                                    .or_insert_with(|| before[..used].to_vec());
                            }
                            _ => break,
                        }
                    }
                }
            };
            let down = tokio::io::copy(&mut sr, &mut cw);
            tokio::select! { _ = up => {}, _ = down => {} }
        });
    }
}

struct Ack;
impl MessageListenerConcurrently for Ack {
    fn consume_message(
        &self,
        _m: &[&MessageExt],
        _c: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "regenerates fixtures; run on purpose"]
async fn capture_rocketmq_client_rust_frames() -> Result<(), Error> {
    let dir = e2e::test_dir("capture")?;
    let ns = NameServer::start(dir.path(), 120_000)?;
    let broker = Broker::start(
        dir.path(),
        &BrokerSpec::master("broker-a", "ASYNC_FLUSH"),
        &[&ns.addr],
    )?;
    let captured: Captured = Arc::default();

    // The client finds the proxies through routes: one in front of the name server, one
    // registered as a second broker group that forwards to the real broker.
    let ns_proxy = TcpListener::bind("127.0.0.1:0").await?;
    let ns_proxy_addr = ns_proxy.local_addr()?.to_string();
    tokio::spawn(proxy(ns_proxy, ns.addr.clone(), captured.clone()));
    let b_proxy = TcpListener::bind("127.0.0.1:0").await?;
    let b_proxy_addr = b_proxy.local_addr()?.to_string();
    tokio::spawn(proxy(b_proxy, broker.addr.clone(), captured.clone()));

    let client = broker::client::Client::new(vec![ns.addr.clone()]);
    let topic = TopicConfig::new("CaptureTopic", 2, 6);
    client.create_topic(&broker.addr, &topic).await?;
    let mut body = broker::remoting::body::RegisterBrokerBody::default();
    body.topic_config_serialize_wrapper
        .topic_config_table
        .insert(topic.topic_name.clone(), topic.clone());
    let h = broker::remoting::header::RegisterBrokerRequestHeader {
        broker_name: "broker-proxy".into(),
        broker_addr: b_proxy_addr.clone(),
        cluster_name: "TestCluster".into(),
        ha_server_addr: None,
        broker_id: 0,
        heartbeat_timeout_millis: Some(600_000),
        compressed: false,
        body_crc32: None,
    };
    let reg = RemotingCommand::request(RequestCode::RegisterBroker.code(), h.to_ext())
        .with_body(broker::remoting::body::to_json(&body));
    client.call_ok(&ns.addr, reg).await?;

    let runtime = common::Runtime::new()?;
    let rt = runtime.client.clone();
    let mut producer = DefaultMQProducer::builder(rt.clone())
        .producer_group("capture_producer".to_string())
        .name_server_addr(ns_proxy_addr.clone())
        .build();
    producer.start().await?;
    for i in 0..20 {
        let msg = Message::builder()
            .topic("CaptureTopic")
            .body(format!("golden {i}").into_bytes())
            .tags("TagA")
            .keys(vec![format!("k{i}")])
            .raw_property("color", "blue")?
            .build()?;
        producer.send_with_timeout(msg, 5_000).await?;
    }
    let mut consumer = DefaultMQPushConsumer::builder(rt.clone())
        .consumer_group("capture_group".to_string())
        .name_server_addr(ns_proxy_addr)
        .build();
    consumer.subscribe("CaptureTopic", "TagA || TagB").await?;
    consumer.register_message_listener_concurrently(Ack);
    consumer.start().await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    consumer.shutdown().await;
    producer.shutdown().await;

    let frames = captured.lock().unwrap().clone();
    let wanted = [10, 11, 14, 34, 105];
    for code in wanted {
        assert!(
            frames.contains_key(&code),
            "no request with code {code} captured; got {:?}",
            frames.keys()
        );
    }
    let mut out = Vec::new();
    for bytes in frames.values() {
        out.extend_from_slice(bytes);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../broker/tests/fixtures/frames/rocketmq-client-rust-1.0.bin");
    std::fs::write(&path, &out)?;
    println!(
        "wrote {} frames ({:?}) to {}",
        frames.len(),
        frames.keys().collect::<Vec<_>>(),
        path.display()
    );
    Ok(())
}
