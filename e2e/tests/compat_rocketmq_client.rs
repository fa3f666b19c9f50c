//! Compatibility: the published `rocketmq-client-rust` 1.0 producer and push consumer against
//! mqnamesrv (a pair) + mqbroker, unchanged, including its queries by key and message id. Plus
//! our own mqadmin round trip and queries on the same cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use e2e::{Broker, BrokerSpec, Error, NameServer};
use rocketmq_client_rust::MQPushConsumer;
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_single::Message;

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

    // The client's own queries (QUERY_MESSAGE): by key, and by the id a send returned.
    let by_key = producer
        .query_message(topic, "order-42", 32, 0, i64::MAX as u64)
        .await?;
    let mut seqs: Vec<u64> = by_key
        .message_list()
        .iter()
        .map(|m| seq_of(m.message_inner().property("seq")))
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (420..430).collect::<Vec<_>>(),
        "found by key order-42"
    );
    let sent = producer
        .send_with_timeout(common::message("CompatQueryTopic", 7)?, 5_000)
        .await?
        .ok_or("send returned no result")?;
    let id = sent.msg_id.clone().ok_or("no message id")?;
    // The key index is built behind the log: a moment after the send.
    let mut viewed = producer.view_message("CompatQueryTopic", id.as_str()).await;
    for _ in 0..50 {
        if viewed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        viewed = producer.view_message("CompatQueryTopic", id.as_str()).await;
    }
    let viewed = viewed?;
    assert_eq!(seq_of(viewed.message_inner().property("seq")), 7);
    assert_eq!(
        viewed.message_inner().property("UNIQ_KEY"),
        Some(id.as_str())
    );
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
    let query = |args: &[&str]| {
        std::process::Command::new(&admin)
            .args(["-n", &namesrv])
            .args(args)
            .output()
    };
    let out = query(&["queryMsgByKey", "-t", topic, "-k", "key-9999"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        2,
        "a heading and one message: {stdout}"
    );
    let out = query(&[
        "queryMsgByUniqueKey",
        "-t",
        "CompatQueryTopic",
        "-i",
        id.as_str(),
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("Message ID:        {id}")),
        "{stdout}"
    );
    let out = query(&["queryMsgByKey", "-t", topic, "-k", "no-such-key"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message found by key no-such-key"));

    drop(broker);
    rt.shutdown().await;
    Ok(())
}

/// Decides each transaction by its message's sequence number: multiples of 3 commit at once,
/// the next ones roll back, the rest say "unknown". Asked by the broker, it commits whatever
/// it is asked about, so a question about a decided message would show as a rolled-back
/// message delivered or one delivered twice (and is counted).
#[derive(Default)]
struct ThirdsListener {
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    asked_decided: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn seq_of(value: Option<impl ToString>) -> u64 {
    value
        .and_then(|v| v.to_string().parse().ok())
        .unwrap_or(u64::MAX)
}

impl rocketmq_client_rust::TransactionListener for ThirdsListener {
    fn execute_local_transaction(
        &self,
        msg: &dyn rocketmq_model::common::message::MessageTrait,
        _arg: Option<&(dyn std::any::Any + Send + Sync)>,
    ) -> rocketmq_client_rust::LocalTransactionState {
        use rocketmq_client_rust::LocalTransactionState as S;
        match seq_of(msg.property(&"seq".into())) % 3 {
            0 => S::CommitMessage,
            1 => S::RollbackMessage,
            _ => S::Unknown,
        }
    }

    fn check_local_transaction(
        &self,
        msg: &rocketmq_model::common::message::message_ext::MessageExt,
    ) -> rocketmq_client_rust::LocalTransactionState {
        use rocketmq_client_rust::LocalTransactionState as S;
        let counter = match seq_of(msg.message_inner().property("seq")) % 3 {
            2 => &self.asked,
            _ => &self.asked_decided,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        S::CommitMessage
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rocketmq_client_rust_transactions_commit_roll_back_and_answer_checks() -> Result<(), Error>
{
    const SENT: u64 = 30;
    let dir = e2e::test_dir("compat-tx")?;
    let ns = NameServer::start(dir.path(), 120_000)?;
    // Undecided transactions are looked for every 2 s once a second old.
    let spec = BrokerSpec::master("broker-a", "SYNC_FLUSH")
        .with(&["transactionTimeOut=1000", "transactionCheckInterval=2000"]);
    let broker = Broker::start(dir.path(), &spec, &[&ns.addr])?;
    let topic = "TxTopic";
    let rt = common::Runtime::new()?;
    let listener = ThirdsListener::default();
    let (asked, asked_decided) = (listener.asked.clone(), listener.asked_decided.clone());
    let mut producer = rocketmq_client_rust::TransactionMQProducer::builder(rt.client.clone())
        .client_config(common::client_config(&ns.addr))
        .producer_group("tx_producer")
        .topics(vec![topic])
        .transaction_listener(listener)
        .build();
    producer.start().await?;
    for seq in 0..SENT {
        producer
            .send_message_in_transaction::<(), _>(common::message(topic, seq)?, None)
            .await?;
    }

    // Committed at once, and the "unknown" ones once checked: every seq but the rolled back.
    let (mut consumer, got) = common::push_consumer(&rt, &ns.addr, "tx_group", topic).await?;
    let wanted = (0..SENT).filter(|s| s % 3 != 1).count();
    common::wait_for(&got, wanted, Duration::from_secs(30)).await;
    // Anything rolled back or delivered twice would show by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    consumer.shutdown().await;
    producer.shutdown().await;
    let seen: Vec<u64> = {
        let mut s: Vec<u64> = got.got.lock().unwrap().keys().copied().collect();
        s.sort_unstable();
        s
    };
    let expected: Vec<u64> = (0..SENT).filter(|s| s % 3 != 1).collect();
    assert_eq!(seen, expected, "delivered transactional messages");
    for seq in &seen {
        assert_eq!(
            got.got.lock().unwrap()[seq],
            common::expected(*seq),
            "message {seq}"
        );
    }
    let deliveries = got.deliveries.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(deliveries, wanted, "a message was delivered twice");
    let asked = asked.load(std::sync::atomic::Ordering::Relaxed);
    // Each undecided one once: a second question would have been answered with a second
    // commit, a message delivered twice (checked above).
    let undecided = (0..SENT).filter(|s| s % 3 == 2).count();
    assert_eq!(asked, undecided, "questions about undecided transactions");
    let asked_decided = asked_decided.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(asked_decided, 0, "asked about decided transactions");
    println!(
        "{wanted} of {SENT} transactional messages delivered; the producer answered {asked} checks"
    );

    drop(broker);
    rt.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rocketmq_client_rust_consumes_by_sql92_selector() -> Result<(), Error> {
    const SENT: u64 = 90;
    let dir = e2e::test_dir("compat-sql")?;
    let ns = NameServer::start(dir.path(), 120_000)?;
    let spec = BrokerSpec::master("broker-a", "ASYNC_FLUSH").with(&["enablePropertyFilter=true"]);
    let broker = Broker::start(dir.path(), &spec, &[&ns.addr])?;
    let topic = "SqlTopic";
    let rt = common::Runtime::new()?;
    let mut producer = common::producer(&rt, &ns.addr, "sql_producer").await?;
    common::send_range(&producer, topic, 0..SENT).await?;
    producer.shutdown().await;

    // Every message carries `seq` and `color` (red, green, blue by seq % 3) properties, and
    // tag TagA when seq is even.
    let selector = rocketmq_client_rust::MessageSelector::by_sql(
        "color = 'red' AND seq >= 30 AND TAGS IN ('TagA', 'TagC')",
    );
    let (mut consumer, got) =
        common::push_consumer_selecting(&rt, &ns.addr, "sql_group", topic, Some(selector)).await?;
    let wanted: Vec<u64> = (30..SENT).filter(|s| s % 6 == 0).collect();
    common::wait_for(&got, wanted.len(), Duration::from_secs(30)).await;
    // Anything the selector should have passed over would show by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer.shutdown().await;
    let mut seen: Vec<u64> = got.got.lock().unwrap().keys().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, wanted, "messages the selector selected");
    for seq in &seen {
        assert_eq!(
            got.got.lock().unwrap()[seq],
            common::expected(*seq),
            "message {seq}"
        );
    }

    // A selector the broker cannot parse stops the consumer at its start (CHECK_CLIENT_CONFIG).
    let bad = rocketmq_client_rust::MessageSelector::by_sql("seq > 'x'");
    let refused = common::push_consumer_selecting(&rt, &ns.addr, "sql_bad", topic, Some(bad)).await;
    assert!(
        refused.is_err(),
        "a consumer with an unparsable selector started"
    );

    drop(broker);
    rt.shutdown().await;
    Ok(())
}

/// A name server and one ASYNC_FLUSH master, in a directory of their own.
fn lone_master(name: &str) -> Result<(tempfile::TempDir, NameServer, Broker), Error> {
    let dir = e2e::test_dir(name)?;
    let ns = NameServer::start(dir.path(), 120_000)?;
    let spec = BrokerSpec::master("broker-a", "ASYNC_FLUSH");
    let broker = Broker::start(dir.path(), &spec, &[&ns.addr])?;
    Ok((dir, ns, broker))
}

/// Hands each request message a consumer receives to the task that replies to it.
struct Forward(tokio::sync::mpsc::UnboundedSender<Message>);

impl rocketmq_client_rust::MessageListenerConcurrently for Forward {
    fn consume_message(
        &self,
        msgs: &[&rocketmq_model::common::message::message_ext::MessageExt],
        _ctx: &rocketmq_client_rust::ConsumeConcurrentlyContext,
    ) -> rocketmq_client_rust::ClientResult<rocketmq_client_rust::ConsumeConcurrentlyStatus> {
        for m in msgs {
            let _ = self.0.send(m.message_inner().clone());
        }
        Ok(rocketmq_client_rust::ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rocketmq_client_rust_requests_get_replies_and_consumers_answer_for_themselves(
) -> Result<(), Error> {
    use rocketmq_model::common::message::MessageTrait;
    let (_dir, ns, broker) = lone_master("compat-reply")?;
    let topic = "RequestTopic";
    let rt = common::Runtime::new()?;
    let mut requester = common::producer(&rt, &ns.addr, "request_producer").await?;
    // The topic exists before the consumer looks up its route.
    common::send_range(&requester, topic, 0..1).await?;

    // The responder: a push consumer whose requests a task answers with a producer of its own.
    let (tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    let mut consumer = rocketmq_client_rust::DefaultMQPushConsumer::builder(rt.client.clone())
        .client_config(common::client_config(&ns.addr))
        .consumer_group("responder".to_string())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(topic, "*").await?;
    consumer.register_message_listener_concurrently(Forward(tx));
    consumer.start().await?;
    let mut replier = common::producer(&rt, &ns.addr, "reply_producer").await?;
    let responder = tokio::spawn(async move {
        let mut replied = 0;
        while replied < 3 {
            let Some(req) = requests.recv().await else {
                break;
            };
            let cluster = req.property("CLUSTER").map(|c| c.to_string());
            if req.property("CORRELATION_ID").is_none() {
                // The plain message that made the topic: it names the cluster all the same.
                assert_eq!(cluster.as_deref(), Some("TestCluster"));
                continue;
            }
            let body = req.get_body().map(|b| b.to_vec()).unwrap_or_default();
            let answer = [b"re:".as_slice(), &body].concat();
            let reply = rocketmq_client_rust::MessageUtil::create_reply_message(&req, &answer)
                .expect("the request names its cluster");
            replier.send(reply).await.expect("reply accepted");
            replied += 1;
        }
        replier.shutdown().await;
        replied
    });

    for i in 0..3 {
        let ask = Message::builder()
            .topic(topic)
            .body(format!("ask-{i}").into_bytes())
            .build()?;
        let reply = match requester.request(ask, 30_000).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("broker log:\n{}", broker.log_text());
                return Err(e.into());
            }
        };
        let body = reply.get_body().map(|b| b.to_vec()).unwrap_or_default();
        assert_eq!(body, format!("re:ask-{i}").into_bytes(), "reply {i}");
        assert_eq!(
            reply.property(&"MSG_TYPE".into()).as_deref(),
            Some("reply"),
            "reply {i}"
        );
    }
    // The responder as it sees itself, asked through the broker (GET_CONSUMER_RUNNING_INFO).
    let out = std::process::Command::new(e2e::bin("mqadmin")?)
        .args(["-n", &ns.addr, "consumerStatus", "-g", "responder"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mqadmin consumerStatus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("#ClientId: "), "{stdout}");
    assert!(stdout.contains(topic), "its subscription: {stdout}");
    let out = std::process::Command::new(e2e::bin("mqadmin")?)
        .args([
            "-n",
            &ns.addr,
            "consumerStatus",
            "-g",
            "responder",
            "-i",
            "nobody@1",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not online"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    requester.shutdown().await;
    consumer.shutdown().await;
    let replied = responder.await?;
    assert_eq!(replied, 3);
    drop(broker);
    rt.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rocketmq_client_rust_timer_messages_arrive_when_due() -> Result<(), Error> {
    use rocketmq_model::common::message::MessageTrait;
    let (_dir, ns, broker) = lone_master("compat-timer")?;
    let topic = "TimerTopic";
    let rt = common::Runtime::new()?;
    let mut producer = common::producer(&rt, &ns.addr, "timer_producer").await?;
    // One plain message makes the topic, and tells when the consumer is reading.
    common::send_range(&producer, topic, 0..1).await?;
    let (mut consumer, got) = common::push_consumer(&rt, &ns.addr, "timer_group", topic).await?;
    common::wait_for(&got, 1, Duration::from_secs(30)).await;
    assert_eq!(got.got.lock().unwrap().len(), 1);

    // Each of RocketMQ 5's three ways to time a message.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut by_ms = common::message(topic, 1)?;
    by_ms.set_delay_time_ms(2_500);
    let mut by_sec = common::message(topic, 2)?;
    by_sec.set_delay_time_sec(2);
    let mut at = common::message(topic, 3)?;
    at.set_deliver_time_ms(now_ms + 2_000);
    for m in [by_ms, by_sec, at] {
        producer.send_with_timeout(m, 5_000).await?;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        got.got.lock().unwrap().len(),
        1,
        "a timer message came early"
    );
    common::wait_for(&got, 4, Duration::from_secs(10)).await;
    consumer.shutdown().await;
    producer.shutdown().await;
    let seen = got.got.lock().unwrap().clone();
    for seq in 0..4 {
        assert_eq!(
            seen.get(&seq),
            Some(&common::expected(seq)),
            "message {seq}"
        );
    }
    assert_eq!(
        got.deliveries.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "each delivered once"
    );
    drop(broker);
    rt.shutdown().await;
    Ok(())
}
