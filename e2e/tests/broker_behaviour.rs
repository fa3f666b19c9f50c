//! The broker and name server as real processes, exercised request by request with ferromq's
//! client: long polling, batches, retries, tags, auto-creation, expiry, health, mqadmin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use broker::client::{Client, Message, Producer, PullSpec};
use broker::remoting::header::{ConsumerSendMsgBackRequestHeader, SendMessageRequestHeader};
use broker::remoting::{RemotingCommand, RequestCode, ResponseCode};
use broker::store::message::{encode_batch, BatchItem};
use broker::store::topics::TopicConfig;
use bytes::Bytes;
use e2e::{Broker, BrokerSpec, Error, NameServer};

struct Cluster {
    _dir: tempfile::TempDir,
    ns: Vec<NameServer>,
    broker: Broker,
    client: std::sync::Arc<Client>,
}

fn cluster(name_servers: usize, extra: &[&str], ns_timeout_ms: u64) -> Result<Cluster, Error> {
    let dir = e2e::test_dir("behaviour")?;
    let ns: Vec<NameServer> = (0..name_servers)
        .map(|_| NameServer::start(dir.path(), ns_timeout_ms))
        .collect::<Result<_, _>>()?;
    let mut spec = BrokerSpec::master("broker-a", "ASYNC_FLUSH");
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    let addrs: Vec<&str> = ns.iter().map(|n| n.addr.as_str()).collect();
    let broker = Broker::start(dir.path(), &spec, &addrs)?;
    let client = Client::new(ns.iter().map(|n| n.addr.clone()).collect());
    Ok(Cluster {
        _dir: dir,
        ns,
        broker,
        client,
    })
}

async fn topic(c: &Cluster, name: &str, queues: i32) -> Result<(), Error> {
    c.client
        .create_topic(&c.broker.addr, &TopicConfig::new(name, queues, 6))
        .await?;
    for _ in 0..100 {
        if c.client.refresh_route(name).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("no route for {name}").into())
}

fn send_header(topic: &str, queue: i32, props: &str) -> SendMessageRequestHeader {
    SendMessageRequestHeader {
        producer_group: "pg".into(),
        topic: topic.into(),
        default_topic: Some("TBW102".into()),
        default_topic_queue_nums: Some(4),
        queue_id: Some(queue),
        properties: Some(props.into()),
        ..Default::default()
    }
}

fn spec<'a>(topic: &'a str, queue_id: i32, offset: i64, suspend: Duration) -> PullSpec<'a> {
    PullSpec {
        group: "g",
        topic,
        queue_id,
        offset,
        max: 32,
        suspend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_with_nothing_new_is_held_until_a_message_arrives() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    topic(&c, "LongPoll", 1).await?;
    // Nothing arrives: the pull is held for its suspend time, then answers PULL_NOT_FOUND.
    let start = Instant::now();
    let r = c
        .client
        .pull(
            &c.broker.addr,
            spec("LongPoll", 0, 0, Duration::from_millis(1500)),
        )
        .await?;
    assert_eq!(r.code, ResponseCode::PullNotFound.code());
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "pull answered before its suspend time"
    );
    // A message arriving while the pull waits completes it.
    let client = c.client.clone();
    let addr = c.broker.addr.clone();
    let waiting = tokio::spawn(async move {
        client
            .pull(&addr, spec("LongPoll", 0, 0, Duration::from_secs(20)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = Producer::new(c.client.clone(), "pg");
    p.send(&Message {
        topic: "LongPoll".into(),
        body: Bytes::from_static(b"wake up"),
        ..Default::default()
    })
    .await?;
    let r = tokio::time::timeout(Duration::from_secs(10), waiting).await???;
    assert_eq!(r.code, ResponseCode::Success.code());
    assert_eq!(&r.messages[0].body[..], b"wake up");
    Ok(())
}

/// Bodies of up to 100 messages of a queue from `offset`, as text.
async fn pulled_bodies(
    c: &Cluster,
    topic: &str,
    queue_id: i32,
    offset: i64,
) -> Result<Vec<String>, Error> {
    let r = c
        .client
        .pull(
            &c.broker.addr,
            PullSpec {
                max: 100,
                ..spec(topic, queue_id, offset, Duration::ZERO)
            },
        )
        .await?;
    Ok(r.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_send_stores_every_message_in_order() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    topic(&c, "Batch", 2).await?;
    let items: Vec<BatchItem> = (0..50)
        .map(|i| BatchItem {
            flag: 0,
            body: Bytes::from(format!("b{i}")),
            properties: format!("UNIQ_KEY\u{1}id{i}\u{2}TAGS\u{1}T\u{2}"),
        })
        .collect();
    let mut h = send_header("Batch", 1, "");
    h.batch = true;
    let req = RemotingCommand::request(RequestCode::SendBatchMessage.code(), h.to_ext())
        .with_body(encode_batch(&items));
    let resp = c.client.call_ok(&c.broker.addr, req).await?;
    assert_eq!(
        resp.ext_fields
            .get("msgId")
            .unwrap_or_default()
            .split(',')
            .count(),
        50
    );
    let bodies = pulled_bodies(&c, "Batch", 1, 0).await?;
    assert_eq!(bodies, (0..50).map(|i| format!("b{i}")).collect::<Vec<_>>());

    // Java's producer sends batches with SEND_MESSAGE_V2's one-letter keys.
    let mut h = send_header("Batch", 0, "");
    h.batch = true;
    let req = RemotingCommand::request(RequestCode::SendBatchMessage.code(), h.to_v2())
        .with_body(encode_batch(&items[..10]));
    let resp = c.client.call_ok(&c.broker.addr, req).await?;
    assert_eq!(resp.ext_fields.get("queueId"), Some("0"));
    // And the client library's batch send lands all of its messages contiguously.
    let p = Producer::new(c.client.clone(), "pg");
    let msgs: Vec<Message> = (0..20)
        .map(|i| Message {
            topic: "Batch".into(),
            tags: Some("T".into()),
            body: Bytes::from(format!("p{i}")),
            ..Default::default()
        })
        .collect();
    let sent = p.send_batch(&msgs).await?;
    assert!(sent.is_ok());
    assert_eq!(sent.msg_id.split(',').count(), 20);
    let bodies = pulled_bodies(&c, "Batch", sent.queue_id, sent.queue_offset).await?;
    assert_eq!(
        bodies[..20],
        (0..20).map(|i| format!("p{i}")).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulls_only_return_subscribed_tags() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    topic(&c, "Tags", 1).await?;
    let p = Producer::new(c.client.clone(), "pg");
    for i in 0..30 {
        let tag = ["A", "B", "C"][i % 3];
        p.send(&Message {
            topic: "Tags".into(),
            tags: Some(tag.into()),
            body: Bytes::from(format!("{i}")),
            ..Default::default()
        })
        .await?;
    }
    let mut h = broker::remoting::header::PullMessageRequestHeader {
        consumer_group: "g".into(),
        topic: "Tags".into(),
        queue_id: 0,
        queue_offset: 0,
        max_msg_nums: 100,
        sys_flag: 4,
        subscription: Some("A || C".into()),
        ..Default::default()
    };
    h.expression_type = Some("TAG".into());
    let resp = c
        .client
        .call(
            &c.broker.addr,
            RemotingCommand::request(RequestCode::PullMessage.code(), h.to_ext()),
        )
        .await?;
    let msgs = broker::client::decode_messages(&resp.body)?;
    assert_eq!(msgs.len(), 20);
    assert!(msgs.iter().all(|m| m.properties_map()["TAGS"] != "B"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_given_back_returns_on_the_retry_topic_after_its_delay() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    topic(&c, "Retry", 1).await?;
    let p = Producer::new(c.client.clone(), "pg");
    p.send(&Message {
        topic: "Retry".into(),
        tags: Some("T".into()),
        body: Bytes::from_static(b"again"),
        ..Default::default()
    })
    .await?;
    let r = c
        .client
        .pull(&c.broker.addr, spec("Retry", 0, 0, Duration::ZERO))
        .await?;
    let m = &r.messages[0];
    let h = ConsumerSendMsgBackRequestHeader {
        offset: m.physical_offset,
        group: "g".into(),
        delay_level: 1, // 1 s
        origin_msg_id: Some(m.offset_msg_id()),
        origin_topic: Some("Retry".into()),
        unit_mode: false,
        max_reconsume_times: Some(16),
    };
    c.client
        .call_ok(
            &c.broker.addr,
            RemotingCommand::request(RequestCode::ConsumerSendMsgBack.code(), h.to_ext()),
        )
        .await?;
    let r = c
        .client
        .pull(
            &c.broker.addr,
            spec("%RETRY%g", 0, 0, Duration::from_secs(10)),
        )
        .await?;
    assert_eq!(r.code, ResponseCode::Success.code(), "retry never arrived");
    let retried = &r.messages[0];
    assert_eq!(&retried.body[..], b"again");
    assert_eq!(retried.reconsume_times, 1);
    assert_eq!(retried.properties_map()["RETRY_TOPIC"], "Retry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_topics_are_refused_when_auto_creation_is_off() -> Result<(), Error> {
    let c = cluster(1, &["autoCreateTopicEnable=false"], 120_000)?;
    let req = RemotingCommand::request(
        RequestCode::SendMessageV2.code(),
        send_header("NoSuchTopic", 0, "").to_v2(),
    )
    .with_body(Bytes::from_static(b"x"));
    let resp = c.client.call(&c.broker.addr, req).await?;
    assert_eq!(resp.code, ResponseCode::TopicNotExist.code());
    assert!(resp.remark.unwrap_or_default().contains("NoSuchTopic"));
    // With auto-creation (the default) the same send creates the topic with defaultTopicQueueNums.
    let c = cluster(1, &["defaultTopicQueueNums=3"], 120_000)?;
    let p = Producer::new(c.client.clone(), "pg");
    p.send(&Message {
        topic: "Fresh".into(),
        body: Bytes::from_static(b"x"),
        ..Default::default()
    })
    .await?;
    // The broker registers the new topic with the name server right after creating it, in
    // the background: wait for the route to appear.
    let deadline = Instant::now() + Duration::from_secs(10);
    let route = loop {
        match c.client.refresh_route("Fresh").await {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(route.queue_datas[0].write_queue_nums, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_request_codes_get_an_error_answer_not_a_closed_connection() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    let resp = c
        .client
        .call(
            &c.broker.addr,
            RemotingCommand::request(4242, Default::default()),
        )
        .await?;
    assert_eq!(resp.code, ResponseCode::RequestCodeNotSupported.code());
    let resp = c
        .client
        .call(
            &c.ns[0].addr,
            RemotingCommand::request(4242, Default::default()),
        )
        .await?;
    assert_eq!(resp.code, ResponseCode::RequestCodeNotSupported.code());
    // The connection still works.
    c.client.cluster_info().await?;
    Ok(())
}

/// Whether the name server at `ns` lists `broker-a`.
async fn listed(ns: &str) -> Result<bool, Error> {
    let one = Client::new(vec![ns.to_string()]);
    Ok(one
        .cluster_info()
        .await?
        .broker_addr_table
        .contains_key("broker-a"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_broker_is_dropped_at_once_not_after_its_timeout() -> Result<(), Error> {
    let mut c = cluster(1, &[], 120_000)?;
    assert!(listed(&c.ns[0].addr).await?);
    c.broker.kill9();
    // Its connections closed with it: the name server drops it then, as Java's does.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while listed(&c.ns[0].addr).await? {
        assert!(
            std::time::Instant::now() < deadline,
            "a dead broker kept for its 120 s timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hangup_stops_the_broker_cleanly() -> Result<(), Error> {
    let mut c = cluster(1, &[], 120_000)?;
    topic(&c, "Hup", 1).await?;
    let proc = c.broker.proc.as_mut().ok_or("broker not running")?;
    proc.signal("HUP")?;
    let status = proc.wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "exited with {status}");
    let checkpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.broker.store.join("checkpoint"))?)?;
    assert_eq!(checkpoint["cleanShutdown"], true, "{checkpoint}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_broker_is_dropped_by_every_name_server_after_the_timeout() -> Result<(), Error> {
    let extra = [
        "brokerNotActiveTimeoutMillis=1500",
        "registerNameServerPeriod=1000",
    ];
    let mut c = cluster(2, &extra, 120_000)?;
    topic(&c, "Expiry", 1).await?;
    for ns in &c.ns {
        assert!(listed(&ns.addr).await?);
    }
    // Stopped, not dead: its connections stay open, only its silence tells.
    c.broker
        .proc
        .as_ref()
        .ok_or("broker not running")?
        .signal("STOP")?;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    for ns in &c.ns {
        assert!(!listed(&ns.addr).await?, "{} kept a silent broker", ns.addr);
        let one = Client::new(vec![ns.addr.clone()]);
        assert!(one.refresh_route("Expiry").await.is_err());
    }
    c.broker.kill9();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_metrics_endpoints_answer() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    topic(&c, "Metrics", 1).await?;
    Producer::new(c.client.clone(), "pg")
        .send(&Message {
            topic: "Metrics".into(),
            body: Bytes::from_static(b"m"),
            ..Default::default()
        })
        .await?;
    assert!(e2e::http_ok(c.broker.http_port, "/healthz"));
    assert!(e2e::http_ok(c.broker.http_port, "/readyz"));
    let (code, body) = e2e::http_get(c.broker.http_port, "/metrics").ok_or("no metrics")?;
    assert_eq!(code, 200);
    assert!(
        body.contains("ferromq_broker_messages_stored_total 1"),
        "{body}"
    );
    // Requests are counted by code: the send (SEND_MESSAGE_V2, 310) is one of the codes
    // counted without a lookup.
    assert!(
        body.contains("ferromq_broker_requests_total{code=\"310\"} 1\n"),
        "{body}"
    );
    // Creating the topic (UPDATE_AND_CREATE_TOPIC, 17) is counted the same way.
    assert!(
        body.contains("ferromq_broker_requests_total{code=\"17\"} 1\n"),
        "{body}"
    );
    let ns_http: u16 = c.ns[0]
        .addr
        .rsplit(':')
        .next()
        .ok_or("port")?
        .parse::<u16>()?
        + 1;
    let (code, body) = e2e::http_get(ns_http, "/metrics").ok_or("no namesrv metrics")?;
    assert_eq!(code, 200);
    assert!(body.contains("ferromq_namesrv_requests_total"), "{body}");
    assert_eq!(
        e2e::http_get(c.broker.http_port, "/nope").map(|r| r.0),
        Some(404)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_broker_conf_stops_the_broker_with_the_key_named() -> Result<(), Error> {
    let dir = e2e::test_dir("badconf")?;
    let conf = dir.path().join("broker.conf");
    std::fs::write(&conf, "brokerName=a\nflushDiskTyp=SYNC_FLUSH\n")?;
    let out = Command::new(e2e::bin("mqbroker")?)
        .arg("-c")
        .arg(&conf)
        .arg("-n")
        .arg("127.0.0.1:1")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flushDiskTyp") && err.contains("line 2"),
        "{err}"
    );
    std::fs::write(&conf, "flushDiskType=SOMETIMES\n")?;
    let out = Command::new(e2e::bin("mqbroker")?)
        .arg("-c")
        .arg(&conf)
        .arg("-n")
        .arg("127.0.0.1:1")
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("SYNC_FLUSH"));
    Ok(())
}

fn mqadmin(c: &Cluster, args: &[&str]) -> Result<String, Error> {
    let ns: Vec<&str> = c.ns.iter().map(|n| n.addr.as_str()).collect();
    let out = Command::new(e2e::bin("mqadmin")?)
        .arg("-n")
        .arg(ns.join(";"))
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "mqadmin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqadmin_commands_work_against_a_cluster() -> Result<(), Error> {
    let c = cluster(2, &[], 120_000)?;
    let out = mqadmin(
        &c,
        &[
            "updateTopic",
            "-t",
            "AdminT",
            "-c",
            "TestCluster",
            "-r",
            "3",
            "-w",
            "3",
        ],
    )?;
    assert!(out.contains("success"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(mqadmin(&c, &["topicList"])?.lines().any(|l| l == "AdminT"));
    let route = mqadmin(&c, &["topicRoute", "-t", "AdminT"])?;
    assert!(route.contains("\"writeQueueNums\": 3"), "{route}");
    let clusters = mqadmin(&c, &["clusterList"])?;
    assert!(
        clusters.contains("broker-a")
            && clusters.contains(&c.broker.addr)
            && clusters.contains("MASTER"),
        "{clusters}"
    );
    mqadmin(&c, &["produce", "-t", "AdminT", "-c", "30"])?;
    let out = mqadmin(&c, &["consume", "-t", "AdminT", "-g", "ag", "-c", "30"])?;
    assert!(out.contains("consumed 30"), "{out}");
    let progress = mqadmin(&c, &["consumerProgress", "-g", "ag", "-t", "AdminT"])?;
    assert!(progress.contains("Total lag: 0"), "{progress}");
    let bench = mqadmin(
        &c,
        &[
            "bench",
            "-t",
            "AdminT",
            "-p",
            "2",
            "-s",
            "128",
            "-d",
            "1",
            "--consume",
            "--json",
        ],
    )?;
    let report: serde_json::Value = serde_json::from_str(&bench)?;
    assert!(report["sent"].as_u64().unwrap_or(0) > 0, "{bench}");
    assert_eq!(report["failed"].as_u64(), Some(0), "{bench}");
    assert!(
        report["consumed"].as_u64().unwrap_or(0) >= report["sent"].as_u64().unwrap_or(u64::MAX),
        "{bench}"
    );
    // Offsets by time: everything was stored before now.
    let now = broker::store::topics::now_ms();
    let h = broker::remoting::header::SearchOffsetRequestHeader {
        topic: "AdminT".into(),
        queue_id: 0,
        timestamp: now + 1000,
        boundary_type: None,
    };
    let resp = c
        .client
        .call_ok(
            &c.broker.addr,
            RemotingCommand::request(RequestCode::SearchOffsetByTimestamp.code(), h.to_ext()),
        )
        .await?;
    let max = c.client.max_offset(&c.broker.addr, "AdminT", 0).await?;
    assert_eq!(
        resp.ext_fields.get("offset"),
        Some(max.to_string().as_str())
    );
    let settings = mqadmin(&c, &["getBrokerConfig", "-b", &c.broker.addr])?;
    assert!(settings.contains("brokerName=broker-a\n"), "{settings}");
    // Deleted from the broker and from both name servers' routes.
    let out = mqadmin(&c, &["deleteTopic", "-t", "AdminT", "-c", "TestCluster"])?;
    assert!(out.contains("success"), "{out}");
    for ns in &c.ns {
        let only = Client::new(vec![ns.addr.clone()]);
        assert!(
            only.refresh_route("AdminT").await.is_err(),
            "{} still routes AdminT",
            ns.addr
        );
    }
    // The broker's next registration does not bring it back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!mqadmin(&c, &["topicList"])?.lines().any(|l| l == "AdminT"));
    let _ = BTreeMap::<i32, i32>::new();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_changed_with_mqadmin_take_effect_and_outlive_a_restart() -> Result<(), Error> {
    let mut c = cluster(1, &[], 120_000)?;
    topic(&c, "LiveT", 1).await?;
    mqadmin(&c, &["produce", "-t", "LiveT", "-c", "1"])?;
    let out = mqadmin(
        &c,
        &[
            "updateBrokerConfig",
            "-c",
            "TestCluster",
            "-k",
            "maxMessageSize",
            "-v",
            "16",
        ],
    )?;
    assert!(
        out.contains(&format!("update broker config success, {}", c.broker.addr)),
        "{out}"
    );
    // Bodies larger than 16 bytes are refused now (the produce command's are 128).
    assert!(mqadmin(&c, &["produce", "-t", "LiveT", "-c", "1"]).is_err());
    let refused = mqadmin(
        &c,
        &[
            "updateBrokerConfig",
            "-b",
            &c.broker.addr,
            "-k",
            "brokerRole",
            "-v",
            "SLAVE",
        ],
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        refused.contains("read only when the broker starts"),
        "{refused}"
    );
    // Saved: the restarted process reads it from its broker.conf.
    c.broker.stop()?;
    c.broker.restart()?;
    let settings = mqadmin(&c, &["getBrokerConfig", "-b", &c.broker.addr])?;
    assert!(settings.contains("maxMessageSize=16\n"), "{settings}");
    assert!(settings.contains("brokerRole=ASYNC_MASTER\n"), "{settings}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_on_ipv6_serves_clients_of_both_families() -> Result<(), Error> {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return Ok(());
    }
    let dir = e2e::test_dir("ipv6")?;
    let ns = NameServer::start_at(dir.path(), 120_000, "::1")?;
    let member = BrokerSpec::master("broker-v6", "ASYNC_FLUSH").with(&["brokerIP1=::1"]);
    let broker = Broker::start(dir.path(), &member, &[&ns.addr])?;
    assert!(broker.addr.starts_with("[::1]:"), "{}", broker.addr);
    let client = Client::new(vec![ns.addr.clone()]);
    client
        .create_topic(&broker.addr, &TopicConfig::new("V6", 1, 6))
        .await?;
    let mut routed = None;
    for _ in 0..100 {
        if let Ok(r) = client.refresh_route("V6").await {
            routed = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let route = routed.ok_or("no route for V6")?;
    assert_eq!(
        route.broker_datas[0].broker_addrs.get(&0),
        Some(&broker.addr),
        "the name server hands out the bracketed IPv6 address"
    );
    // A producer over IPv6, found through the name server.
    let sent = Producer::new(client.clone(), "pg")
        .send(&Message {
            topic: "V6".into(),
            body: Bytes::from_static(b"over v6"),
            ..Default::default()
        })
        .await?;
    assert!(sent.is_ok());
    assert_eq!(
        sent.offset_msg_id.len(),
        56,
        "an IPv6 store host: {}",
        sent.offset_msg_id
    );
    // The same broker over IPv4: its listener takes both families.
    let port = broker.addr.rsplit(':').next().unwrap_or_default();
    let req = RemotingCommand::request(
        RequestCode::SendMessage.code(),
        send_header("V6", 0, "").to_ext(),
    )
    .with_body(Bytes::from_static(b"over v4"));
    client.call_ok(&format!("127.0.0.1:{port}"), req).await?;
    let pulled = client
        .pull(&broker.addr, spec("V6", 0, 0, Duration::ZERO))
        .await?;
    let got: Vec<(String, String, String)> = pulled
        .messages
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(&m.body).into_owned(),
                m.born_host.ip().to_string(),
                m.store_host.ip().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("over v6".to_string(), "::1".to_string(), "::1".to_string()),
            // Seen as the IPv4 client it is, not as ::ffff:127.0.0.1.
            (
                "over v4".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string()
            ),
        ]
    );
    // Found again by its id, which carries the IPv6 host.
    let h = broker::remoting::header::ViewMessageRequestHeader {
        offset: broker::store::message::parse_offset_msg_id(&sent.offset_msg_id).ok_or("bad id")?,
    };
    let viewed = client
        .call_ok(
            &broker.addr,
            RemotingCommand::request(RequestCode::ViewMessageById.code(), h.to_ext()),
        )
        .await?;
    let viewed = broker::client::decode_messages(&viewed.body)?;
    assert_eq!(&viewed[0].body[..], b"over v6");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bench_whose_every_send_fails_exits_with_an_error() -> Result<(), Error> {
    let c = cluster(1, &[], 120_000)?;
    // Readable, not writable: every send is refused.
    c.client
        .create_topic(&c.broker.addr, &TopicConfig::new("ReadOnly", 1, 4))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = mqadmin(&c, &["bench", "-t", "ReadOnly", "-p", "1", "-c", "5"]);
    let e = failed
        .expect_err("a bench that sent nothing succeeded")
        .to_string();
    assert!(e.contains("every send failed"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_started_under_nohup_ignores_a_hangup() -> Result<(), Error> {
    let dir = e2e::test_dir("nohup")?;
    let port = e2e::free_ports(2);
    let mut child = Command::new("nohup")
        .arg(e2e::bin("mqnamesrv")?)
        .args(["--bind", "127.0.0.1", "-p", &port.to_string()])
        .args(["--http-port", &(port + 1).to_string()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    assert!(
        e2e::wait_tcp(port, Duration::from_secs(10)),
        "never listened"
    );
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()?;
    // Longer than a clean stop takes, and it still serves.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let alive = child.try_wait()?.is_none() && e2e::wait_tcp(port, Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    // As a JVM started under nohup: the hangup stays ignored.
    assert!(alive, "a process started under nohup stopped on SIGHUP");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_that_cannot_be_written_does_not_stop_the_process() -> Result<(), Error> {
    // The log's disk is full (here /dev/full, which fails every write with ENOSPC): the log
    // lines are lost, and the process serves on. Writing the log used to panic the thread
    // that logged, here the main one at start.
    let dir = e2e::test_dir("log-full")?;
    let port = e2e::free_ports(2);
    let mut child = Command::new(e2e::bin("mqnamesrv")?)
        .args(["--bind", "127.0.0.1", "-p", &port.to_string()])
        .args(["--http-port", &(port + 1).to_string()])
        .env("RUST_LOG", "debug")
        .current_dir(dir.path())
        .stdout(std::fs::File::create("/dev/full")?)
        .stderr(std::fs::File::create("/dev/full")?)
        .spawn()?;
    let listening = e2e::wait_tcp(port, Duration::from_secs(10));
    let client = Client::new(vec![format!("127.0.0.1:{port}")]);
    let answered = client.cluster_info().await.is_ok();
    let alive = child.try_wait()?.is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening && answered && alive,
        "listening {listening}, answered {answered}, alive {alive}"
    );
    Ok(())
}
