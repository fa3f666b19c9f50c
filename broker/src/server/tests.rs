//! The broker assembled in-process: what shows only once its parts are wired together.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::remoting::ext::ExtFields;
use crate::remoting::header::{
    PullMessageRequestHeader, PullMessageResponseHeader, QueryMessageResponseHeader,
    PULL_SUBSCRIPTION,
};
use crate::store::message::NewMessage;

/// One HTTP/1.1 GET; the whole answer, status line first.
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer
}

/// A broker config for tests: the store in `dir`, every port chosen by the system, no name
/// server.
fn local_config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        store_root: dir.to_path_buf(),
        listen_port: 0,
        http_port: 0,
        ha_listen_port: 0,
        ..BrokerConfig::default()
    }
}

/// A name server in this process on `listen` (port 0: any), its HTTP port any.
async fn name_server_at(listen: SocketAddr) -> crate::nameserver::NameServerHandle {
    crate::nameserver::start(crate::nameserver::NameServerConfig {
        listen,
        http: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Polls `/readyz` at `http` for up to 5 s until it answers 200; its last answer.
async fn wait_ready(http: SocketAddr) -> String {
    let mut answer = String::new();
    for _ in 0..100 {
        answer = get(http, "/readyz").await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    answer
}

/// A client connection for requests handed straight to the broker.
fn test_peer() -> crate::remoting::connection::Peer {
    crate::remoting::connection::Peer::detached("127.0.0.1:1".parse().unwrap())
}

fn message() -> NewMessage {
    NewMessage {
        topic: "T".into(),
        queue_id: 0,
        flag: 0,
        tags_code: 0,
        body: Bytes::from_static(b"hello"),
        properties: String::new(),
        sys_flag: 0,
        born_timestamp: 0,
        born_host: "127.0.0.1:1".parse().unwrap(),
        reconsume_times: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_log_cannot_reach_the_disk_is_unready_and_turns_sends_away() {
    let dir = tempfile::tempdir().unwrap();
    let ns = name_server_at("127.0.0.1:0".parse().unwrap()).await;
    let cfg = BrokerConfig {
        namesrv_addrs: vec![ns.addr.to_string()],
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    let answer = wait_ready(h.http_addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "never ready: {answer}");

    let store = &h.broker.store;
    let log = store.commitlog();
    store.append(&[message()]).unwrap();
    log.flush().unwrap();
    let version = |b: &Broker| {
        let body: serde_json::Value = serde_json::from_slice(&b.registration().body).unwrap();
        body["topicConfigSerializeWrapper"]["dataVersion"].clone()
    };
    let writable_version = version(&h.broker);
    // Broken before the next message, so whichever flush takes it first (the test's, the
    // background one or a checkpoint) fails.
    log.break_syncing(0);
    store.append(&[message()]).unwrap();
    assert!(log.flush().is_err());

    let answer = get(h.http_addr, "/readyz").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("restart the broker"), "{answer}");
    assert!(answer.contains("Invalid argument"), "{answer}");
    let alive = get(h.http_addr, "/healthz").await;
    assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");

    // A send is turned away with the code clients answer by sending to another broker.
    let end = log.max_offset();
    let req = RemotingCommand::request(RequestCode::SendMessageV2.code(), ExtFields::default());
    let resp = h
        .broker
        .put_and_respond(&req, vec![message()], 0, false)
        .await;
    assert_eq!(
        resp.code,
        ResponseCode::ServiceNotAvailable.code(),
        "{resp:?}"
    );
    assert_eq!(log.max_offset(), end, "the refused send was written");

    // Routes stop offering it for sends, at once (not at the next registration, in 30 s).
    let client = crate::client::Client::new(vec![ns.addr.to_string()]);
    let mut perm = PERM_WRITE;
    for _ in 0..200 {
        let route = client.refresh_route(AUTO_CREATE_TOPIC).await.unwrap();
        perm = route.queue_datas.iter().fold(0, |p, q| p | q.perm);
        if perm & PERM_WRITE == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        perm & PERM_WRITE,
        0,
        "the name server still offers it for sends"
    );
    // Java's name server takes a broker's topics again only under a new data version.
    assert_ne!(version(&h.broker), writable_version);
    h.stop().await;
    ns.stop().await;
}

/// A broker with no name server, in `role` (a slave gets brokerId 1), with topic `T` of four
/// queues.
async fn lone_broker(dir: &std::path::Path, role: BrokerRole) -> BrokerHandle {
    let cfg = BrokerConfig {
        broker_id: if role == BrokerRole::Slave { 1 } else { 0 },
        role,
        ..local_config(dir)
    };
    broker_with_t(cfg).await
}

/// A broker started with `cfg`, holding topic `T` (4 queues).
async fn broker_with_t(cfg: BrokerConfig) -> BrokerHandle {
    let h = start(cfg).await.unwrap();
    h.broker
        .store
        .topics
        .put(TopicConfig::new("T", 4, PERM_READ | PERM_WRITE))
        .unwrap();
    h
}

/// `n` messages with tag `tag` on queue `queue_id` of `T`.
fn tagged(queue_id: i32, tag: &str, n: usize) -> Vec<NewMessage> {
    let mut m = message();
    m.queue_id = queue_id;
    m.tags_code = crate::store::message::tag_hash(tag);
    m.properties = format!("TAGS\u{1}{tag}\u{2}");
    vec![m; n]
}

/// PULL_MESSAGE of `T`/`queue_id` from `offset` for tags `tags`, held up to `suspend_ms`:
/// the answer's code and header.
async fn pull_at(
    b: &Broker,
    queue_id: i32,
    offset: i64,
    suspend_ms: i64,
    tags: &str,
) -> (i32, PullMessageResponseHeader) {
    use crate::remoting::header::PULL_SUSPEND;
    let suspend = if suspend_ms > 0 { PULL_SUSPEND } else { 0 };
    let h = pull_header("G", queue_id, offset, suspend, suspend_ms, tags);
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), h.to_ext());
    let resp = b.pull(&req).await;
    let header = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap_or_default();
    (resp.code, header)
}

/// A pull header of `group` for `T`/`queue_id` from `offset`, with its subscription (`tags`)
/// and the `flags` besides that, held up to `suspend_ms`.
fn pull_header(
    group: &str,
    queue_id: i32,
    offset: i64,
    flags: i32,
    suspend_ms: i64,
    tags: &str,
) -> PullMessageRequestHeader {
    PullMessageRequestHeader {
        consumer_group: group.into(),
        topic: "T".into(),
        queue_id,
        queue_offset: offset,
        max_msg_nums: 32,
        sys_flag: crate::remoting::header::PULL_SUBSCRIPTION | flags,
        commit_offset: None,
        suspend_timeout_millis: Some(suspend_ms),
        subscription: Some(tags.into()),
        sub_version: Some(0),
        expression_type: Some("TAG".into()),
        max_msg_bytes: None,
    }
}

/// A pull of `T`/0 from `offset` for `tags`, held up to 10 s: `first` runs while it is held,
/// the pull must still be held 200 ms later, then `then` runs and the answer is returned.
async fn held_pull(
    h: &BrokerHandle,
    offset: i64,
    tags: &'static str,
    first: impl FnOnce(),
    then: impl FnOnce(),
) -> (i32, PullMessageResponseHeader) {
    let broker = h.broker.clone();
    let held = tokio::spawn(async move { pull_at(&broker, 0, offset, 10_000, tags).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !held.is_finished(),
        "the pull was answered before its message came"
    );
    then();
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held pull was not woken")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_connections_are_listed_as_java_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let peer = Peer::detached("10.0.0.7:40123".parse().unwrap());
    let ask = |group: &str| {
        RemotingCommand::request(
            RequestCode::GetConsumerConnectionList.code(),
            Default::default(),
        )
        .with_ext("consumerGroup", group)
    };
    let resp = h.broker.process(ask("G"), &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::ConsumerNotOnline.code());
    // A Go client's heartbeat (language GO, version 400).
    let body = r#"{"clientID":"10.0.0.7@1","producerDataSet":[],"consumerDataSet":[{"groupName":"G","consumeType":"CONSUME_PASSIVELY","messageModel":"CLUSTERING","consumeFromWhere":"CONSUME_FROM_LAST_OFFSET","subscriptionDataSet":[{"topic":"T","subString":"*","tagsSet":[],"codeSet":[],"subVersion":1}],"unitMode":false}]}"#;
    let mut beat = RemotingCommand::request(RequestCode::HeartBeat.code(), Default::default())
        .with_body(body.as_bytes().to_vec());
    beat.language = crate::remoting::command::language_from_name("GO");
    beat.version = 400;
    let resp = h.broker.process(beat, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    let resp = h.broker.process(ask("G"), &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    let got: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        got["connectionSet"],
        serde_json::json!([{"clientId": "10.0.0.7@1", "clientAddr": "10.0.0.7:40123", "language": "GO", "version": 400}])
    );
    assert_eq!(got["subscriptionTable"]["T"]["subString"], "*");
    assert_eq!(got["consumeType"], "CONSUME_PASSIVELY");
    assert_eq!(got["messageModel"], "CLUSTERING");
    assert_eq!(got["consumeFromWhere"], "CONSUME_FROM_LAST_OFFSET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earliest_store_time_and_client_config_checks_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let results = h.broker.store.append(&tagged(0, "A", 2)).unwrap();
    let ask = |queue: i32| {
        let req = RemotingCommand::request(
            RequestCode::GetEarliestMsgStoretime.code(),
            Default::default(),
        )
        .with_ext("topic", "T")
        .with_ext("queueId", queue);
        let b = h.broker.clone();
        async move { b.earliest_store_time(&req) }
    };
    let resp = ask(0).await;
    assert_eq!(resp.code, ResponseCode::Success.code());
    // The first message's own store time, read from the log.
    let stored = h
        .broker
        .store
        .commitlog()
        .read_message(results[0].physical_offset)
        .unwrap()
        .store_timestamp;
    assert!(stored > 0);
    assert_eq!(
        resp.ext_fields.get("timestamp"),
        Some(stored.to_string().as_str())
    );
    assert_eq!(ask(1).await.ext_fields.get("timestamp"), Some("-1"));

    let check = |body: &str| {
        RemotingCommand::request(RequestCode::CheckClientConfig.code(), Default::default())
            .with_body(body.as_bytes().to_vec())
    };
    let tag = r#"{"clientId":"c","group":"G","subscriptionData":{"topic":"T","subString":"A","expressionType":"TAG"}}"#;
    assert_eq!(
        h.broker.check_client_config(&check(tag)).code,
        ResponseCode::Success.code()
    );
    let sql = r#"{"clientId":"c","group":"G","subscriptionData":{"topic":"T","subString":"a > 1","expressionType":"SQL92"}}"#;
    let resp = h.broker.check_client_config(&check(sql));
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(resp.remark.unwrap().contains("SQL92"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_newer_than_the_subscription_the_broker_holds_is_refused_not_misfiltered() {
    use crate::remoting::body::{ConsumerData, SubscriptionData};
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    h.broker.store.append(&tagged(0, "B", 3)).unwrap();
    let data = ConsumerData {
        group_name: "G".into(),
        subscription_data_set: vec![SubscriptionData {
            topic: "T".into(),
            sub_string: "A".into(),
            sub_version: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let from = clients::ClientConn {
        addr: "127.0.0.1:1".parse().unwrap(),
        link: test_peer().link(),
        language: "JAVA",
        version: 0,
    };
    h.broker.consumers.heartbeat("c1", &data, &from);
    // Pulls without their subscription (Java's push consumer) are filtered by the one the
    // heartbeat left, unless the client has a newer one: then it is told to ask again.
    let pull = |version: i64| {
        let mut h = pull_header("G", 0, 0, 0, 0, "");
        h.sys_flag = 0;
        h.subscription = None;
        h.sub_version = Some(version);
        RemotingCommand::request(RequestCode::PullMessage.code(), h.to_ext())
    };
    let resp = h.broker.pull(&pull(2)).await;
    assert_eq!(resp.code, ResponseCode::SubscriptionNotLatest.code());
    let resp = h.broker.pull(&pull(1)).await;
    let got = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    // Tag A selects none of the three B messages: passed over, as the group asked.
    assert_eq!(
        (resp.code, got.next_begin_offset),
        (ResponseCode::PullRetryImmediately.code(), 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_consumer_is_sent_to_a_slave_only_once_the_slave_holds_what_it_reads_next() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        // Nothing counts as in memory: every consumer with messages left behind it lags.
        access_message_in_memory_max_ratio: 0,
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    h.broker
        .store
        .topics
        .put(TopicConfig::new("T", 4, PERM_READ | PERM_WRITE))
        .unwrap();
    h.broker.store.append(&tagged(0, "A", 100)).unwrap();
    let end = h.broker.store.commitlog().max_offset();
    async fn suggested(b: &Broker) -> i64 {
        pull_at(b, 0, 0, 0, "*").await.1.suggest_which_broker_id
    }
    // No slave: the master.
    assert_eq!(suggested(&h.broker).await, 0);
    let repl = h.broker.replication.clone().unwrap();
    // A slave copying the log from its start (asked from 0, reported nothing yet), then one
    // that has reported holding only the first bytes: neither holds message 32.
    let slave = repl.add_slave(0, false);
    assert_eq!(suggested(&h.broker).await, 0, "slave has reported nothing");
    repl.set_slave(slave, 100);
    assert_eq!(suggested(&h.broker).await, 0, "slave is far behind");
    // Once it holds the log to its end, the lagging consumer goes there.
    repl.set_slave(slave, end);
    assert_eq!(suggested(&h.broker).await, 1);
    // A second slave, still copying: the consumer stays, whichever slave it would pick.
    repl.add_slave(0, true);
    assert_eq!(suggested(&h.broker).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_whose_master_answers_sends_a_consumer_past_its_end_there_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::Slave).await;
    h.broker.store.append(&tagged(0, "A", 5)).unwrap();
    h.broker.saw_master();
    // Past the slave's end (it is behind its master), and a queue it does not hold yet: not
    // held for the suspend time, but sent to the master at once with the offset kept.
    let retry = ResponseCode::PullRetryImmediately.code();
    for queue in [0, 1] {
        let t = std::time::Instant::now();
        let (code, got) = pull_at(&h.broker, queue, 8, 10_000, "*").await;
        assert!(t.elapsed() < Duration::from_secs(5), "queue {queue}: held");
        assert_eq!(
            (code, got.next_begin_offset, got.suggest_which_broker_id),
            (retry, 8, 0),
            "queue {queue}"
        );
    }
    // At its end, a pull is held as usual (what comes next comes by replication).
    let (code, got) = held_pull(
        &h,
        5,
        "*",
        || {},
        || {
            h.broker.store.append(&tagged(0, "A", 1)).unwrap();
        },
    )
    .await;
    assert_eq!(
        (code, got.next_begin_offset),
        (ResponseCode::Success.code(), 6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_never_moves_a_consumers_offset_and_waits_for_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::Slave).await;
    let store = h.broker.store.clone();
    store.append(&tagged(0, "A", 5)).unwrap();
    let results = store.append(&tagged(2, "A", 3)).unwrap();
    // Queue 2 now starts at its third entry (as after retention).
    store
        .queue("T", 2)
        .unwrap()
        .correct_min_offset(results[2].physical_offset)
        .unwrap();
    let not_found = ResponseCode::PullNotFound.code();
    let retry = ResponseCode::PullRetryImmediately.code();

    // Past the slave's end of a queue, or in a queue it does not hold yet: its master may
    // have it. The offset stays, and the consumer is sent to the master.
    let (code, got) = pull_at(&h.broker, 0, 8, 0, "*").await;
    assert_eq!(
        (code, got.next_begin_offset, got.suggest_which_broker_id),
        (not_found, 8, 0)
    );
    let (code, got) = pull_at(&h.broker, 1, 8, 0, "*").await;
    assert_eq!(
        (code, got.next_begin_offset, got.suggest_which_broker_id),
        (not_found, 8, 0)
    );
    // Before what the slave still holds: the master may have it.
    let (code, got) = pull_at(&h.broker, 2, 0, 0, "*").await;
    assert_eq!(
        (code, got.next_begin_offset, got.suggest_which_broker_id),
        (retry, 0, 0)
    );
    // With no master answering, a suspended pull there is held (the consumer, which has only
    // the slave to ask, would otherwise ask again at once, in a loop) and then answered the
    // same way.
    let broker = h.broker.clone();
    let held = tokio::spawn(async move { pull_at(&broker, 2, 0, 1_000, "*").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "answered at once");
    let (code, got) = held.await.unwrap();
    assert_eq!((code, got.next_begin_offset), (retry, 0));

    // A held pull past the end is answered when replication brings the message.
    let (code, got) = held_pull(
        &h,
        6,
        "*",
        || {},
        || {
            store.append(&tagged(0, "A", 2)).unwrap();
        },
    )
    .await;
    assert_eq!(
        (code, got.next_begin_offset),
        (ResponseCode::Success.code(), 7)
    );
    h.stop().await;

    // A master does move it, as Java's does.
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    h.broker.store.append(&tagged(0, "A", 5)).unwrap();
    let (code, got) = pull_at(&h.broker, 0, 8, 0, "*").await;
    assert_eq!(
        (code, got.next_begin_offset),
        (ResponseCode::PullOffsetMoved.code(), 5)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_pull_passes_over_other_tags_and_answers_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let store = h.broker.store.clone();
    // Messages of another tag arrive first: the pull stays held until its own comes.
    let (code, got) = held_pull(
        &h,
        0,
        "A",
        || {
            store.append(&tagged(0, "B", 3)).unwrap();
        },
        || {
            store.append(&tagged(0, "A", 1)).unwrap();
        },
    )
    .await;
    assert_eq!(
        (code, got.next_begin_offset),
        (ResponseCode::Success.code(), 4)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_held_briefly_without_long_polling_and_sql92_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        long_polling: false,
        short_polling: Duration::from_millis(300),
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    h.broker
        .store
        .topics
        .put(TopicConfig::new("T", 4, PERM_READ | PERM_WRITE))
        .unwrap();
    let started = std::time::Instant::now();
    let (code, _) = pull_at(&h.broker, 0, 0, 15_000, "*").await;
    assert_eq!(code, ResponseCode::PullNotFound.code());
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(250) && held < Duration::from_secs(10),
        "held {held:?}, not the short polling time"
    );

    let mut req_header = PullMessageRequestHeader {
        consumer_group: "G".into(),
        topic: "T".into(),
        queue_id: 0,
        queue_offset: 0,
        max_msg_nums: 32,
        sys_flag: crate::remoting::header::PULL_SUBSCRIPTION,
        commit_offset: None,
        suspend_timeout_millis: None,
        subscription: Some("a > 5".into()),
        sub_version: Some(0),
        expression_type: Some("SQL92".into()),
        max_msg_bytes: None,
    };
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), req_header.to_ext());
    let resp = h.broker.pull(&req).await;
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(format!("{:?}", resp.remark).contains("SQL92"), "{resp:?}");
    req_header.expression_type = Some("tag".into());
    req_header.subscription = Some("*".into());
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), req_header.to_ext());
    assert_eq!(
        h.broker.pull(&req).await.code,
        ResponseCode::PullNotFound.code()
    );
    h.stop().await;
}

/// QUERY_CONSUMER_OFFSET of group `G` for `T`/0: the offset, or the answer's code.
fn query_offset(b: &Broker, zero_if_not_found: Option<bool>) -> Result<i64, i32> {
    use crate::remoting::header::{OffsetResponseHeader, QueryConsumerOffsetRequestHeader};
    let h = QueryConsumerOffsetRequestHeader {
        consumer_group: "G".into(),
        topic: "T".into(),
        queue_id: 0,
        set_zero_if_not_found: zero_if_not_found,
    };
    let req = RemotingCommand::request(RequestCode::QueryConsumerOffset.code(), h.to_ext());
    let resp = b.query_consumer_offset(&req);
    if resp.code != ResponseCode::Success.code() {
        return Err(resp.code);
    }
    Ok(OffsetResponseHeader::from_ext(&resp.ext_fields)
        .unwrap()
        .offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_reads_from_the_start_only_while_the_start_is_in_memory() {
    let not_found = Err(ResponseCode::QueryNotFound.code());
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    // An empty queue, then one whose start is in memory: from 0, unless told not to.
    assert_eq!(query_offset(&h.broker, None), Ok(0));
    h.broker.store.append(&tagged(0, "A", 2)).unwrap();
    assert_eq!(query_offset(&h.broker, None), Ok(0));
    assert_eq!(query_offset(&h.broker, Some(false)), not_found);
    // A stored offset is answered; a negative one counts as none.
    h.broker.store.offsets.commit("G", "T", 0, 1);
    assert_eq!(query_offset(&h.broker, Some(false)), Ok(1));
    h.broker.store.offsets.commit("G", "T", 0, -1);
    assert_eq!(query_offset(&h.broker, None), Ok(0));
    h.stop().await;

    // With no memory counted for messages, the start is never in memory: the client decides
    // (CONSUME_FROM_LAST_OFFSET starts at the end instead of replaying the queue).
    let dir = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        access_message_in_memory_max_ratio: 0,
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    h.broker.store.append(&tagged(0, "A", 2)).unwrap();
    assert_eq!(query_offset(&h.broker, None), not_found);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_of_data_no_longer_in_memory_are_read_off_the_event_loop() {
    for (ratio, cold) in [(40, 0), (0, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let h = broker_with_t(BrokerConfig {
            access_message_in_memory_max_ratio: ratio,
            ..local_config(dir.path())
        })
        .await;
        h.broker.store.append(&tagged(0, "A", 3)).unwrap();
        let (code, got) = pull_at(&h.broker, 0, 0, 0, "*").await;
        assert_eq!(
            (code, got.next_begin_offset),
            (ResponseCode::Success.code(), 3)
        );
        assert_eq!(h.broker.metrics.cold_pulls.get(), cold, "ratio {ratio}");
        h.stop().await;
    }
}

/// CONSUMER_SEND_MSG_BACK of the message at commit-log `offset` (from topic `T`) for
/// `group`, at `delay_level`, with no retry limit of the client's own.
fn send_back_request(offset: i64, group: &str, delay_level: i32) -> RemotingCommand {
    use crate::remoting::header::ConsumerSendMsgBackRequestHeader;
    let back = ConsumerSendMsgBackRequestHeader {
        offset,
        group: group.into(),
        delay_level,
        origin_msg_id: None,
        origin_topic: Some("T".into()),
        unit_mode: false,
        max_reconsume_times: None,
    };
    RemotingCommand::request(RequestCode::ConsumerSendMsgBack.code(), back.to_ext())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_broker_takes_no_message_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let stored = h.broker.store.append(&tagged(0, "A", 1)).unwrap();
    let req = send_back_request(stored[0].physical_offset as i64, "G", 0);
    let born: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert_eq!(
        h.broker.send_back(&req, born).await.code,
        ResponseCode::Success.code()
    );
    // Draining before scale-in: write permission wiped.
    h.broker.wiped.store(true, Ordering::Release);
    let end = h.broker.store.commitlog().max_offset();
    let resp = h.broker.send_back(&req, born).await;
    assert_eq!(resp.code, ResponseCode::NoPermission.code(), "{resp:?}");
    assert_eq!(
        h.broker.store.commitlog().max_offset(),
        end,
        "stored anyway"
    );
    h.stop().await;
}

#[test]
fn memory_is_the_machines_or_a_lower_cgroup_limit() {
    let meminfo = Some("MemTotal:       24576000 kB\nMemFree: 1 kB\n");
    let machine = 24_576_000 * 1024;
    assert_eq!(usable_memory(meminfo, &[]), machine);
    assert_eq!(
        usable_memory(meminfo, &[Some("max\n".into()), None]),
        machine
    );
    assert_eq!(
        usable_memory(meminfo, &[Some("4294967296\n".into())]),
        4 << 30
    );
    // cgroup v1 reports no limit as a huge number.
    assert_eq!(
        usable_memory(meminfo, &[None, Some("9223372036854771712\n".into())]),
        machine
    );
    assert_eq!(usable_memory(None, &[Some("garbage".into())]), 8 << 30);
    assert_eq!(usable_memory(None, &[Some("1073741824".into())]), 1 << 30);
}

/// SEND_MESSAGE_V2 of one message to `topic` with `properties`, as a Java producer sends it,
/// through the broker's request dispatch.
async fn send_v2(
    b: &Broker,
    topic: &str,
    properties: String,
    reconsume: Option<(i32, i32)>,
) -> RemotingCommand {
    send_v2_to(b, topic, 0, properties, reconsume).await
}

/// [`send_v2`] to queue `queue_id`.
async fn send_v2_to(
    b: &Broker,
    topic: &str,
    queue_id: i32,
    properties: String,
    reconsume: Option<(i32, i32)>,
) -> RemotingCommand {
    use crate::remoting::header::SendMessageRequestHeader;
    let h = SendMessageRequestHeader {
        producer_group: "P".into(),
        topic: topic.into(),
        default_topic: Some("TBW102".into()),
        default_topic_queue_nums: Some(4),
        queue_id: Some(queue_id),
        sys_flag: Some(0),
        born_timestamp: Some(1),
        flag: Some(0),
        properties: Some(properties),
        reconsume_times: reconsume.map(|r| r.0),
        unit_mode: false,
        max_reconsume_times: reconsume.map(|r| r.1),
        batch: false,
        broker_name: None,
    };
    let req = RemotingCommand::request(RequestCode::SendMessageV2.code(), h.to_v2())
        .with_body(Bytes::from_static(b"body"));
    let peer = test_peer();
    b.process(req, &peer).await.unwrap()
}

/// The first message stored in `topic`/`queue_id`.
fn first_in(b: &Broker, topic: &str, queue_id: i32) -> crate::store::message::StoredMessage {
    let q = b.store.queue(topic, queue_id).unwrap();
    let at = q.get(q.min_offset(), 1).unwrap()[0].offset;
    b.store.commitlog().read_message(at).unwrap()
}

/// Messages stored so far in `topic`/`queue_id`.
fn stored_in(b: &Broker, topic: &str, queue_id: i32) -> u64 {
    b.store.queue(topic, queue_id).map_or(0, |q| q.max_offset())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_no_reader_could_decode_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let end = b.store.commitlog().max_offset();
    // The stored form gives properties a 16-bit length.
    let long = format!("K\u{1}{}\u{2}", "v".repeat(40_000));
    let resp = send_v2(b, "T", long, None).await;
    assert_eq!(resp.code, ResponseCode::MessageIllegal.code(), "{resp:?}");
    // Short enough alone, too long once the delay's properties are added.
    let near = format!("K\u{1}{}\u{2}DELAY\u{1}1\u{2}", "v".repeat(32_750));
    let resp = send_v2(b, "T", near, None).await;
    assert_eq!(resp.code, ResponseCode::MessageIllegal.code(), "{resp:?}");
    let resp = send_v2(
        b,
        "SCHEDULE_TOPIC_XXXX",
        "REAL_TOPIC\u{1}T\u{2}".into(),
        None,
    )
    .await;
    assert_eq!(resp.code, ResponseCode::NoPermission.code(), "{resp:?}");
    assert_eq!(b.store.commitlog().max_offset(), end, "stored anyway");
    // What fits is stored and readable.
    let fits = format!("K\u{1}{}\u{2}", "v".repeat(32_000));
    let resp = send_v2(b, "T", fits, None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let (code, _) = pull_at(b, 0, 0, 0, "*").await;
    assert_eq!(code, ResponseCode::Success.code());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_config_is_answered_as_properties_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let req = RemotingCommand::request(RequestCode::GetBrokerConfig.code(), Default::default());
    let resp = h.broker.process(req, &test_peer()).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    let text = String::from_utf8(resp.body.to_vec()).unwrap();
    assert!(text.contains("brokerRole=ASYNC_MASTER\n"), "{text}");
    assert_eq!(BrokerConfig::parse(&text).unwrap(), **h.broker.cfg());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_loses_its_config_queues_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    b.store.append(&tagged(0, "A", 3)).unwrap();
    b.store.offsets.commit("G", "T", 0, 2);
    // Another topic, written before (a store whose every queue is gone rebuilds them all).
    b.store
        .topics
        .put(TopicConfig::new("Kept", 1, PERM_READ | PERM_WRITE))
        .unwrap();
    let mut kept = message();
    kept.topic = "Kept".into();
    b.store.append(&[kept]).unwrap();
    b.store.append(&tagged(0, "A", 1)).unwrap();
    let delete = |topic: &str| {
        RemotingCommand::request(RequestCode::DeleteTopicInBroker.code(), Default::default())
            .with_ext("topic", topic)
    };
    let peer = test_peer();
    let resp = b.process(delete("T"), &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    assert!(b.store.topics.get("T").is_none());
    assert!(b.store.queue("T", 0).is_none());
    assert_eq!(b.store.offsets.get("G", "T", 0), None);
    assert!(!dir.path().join("consumequeue").join("T").exists());
    // The broker's own topics stay; a dead-letter topic may go.
    for system in ["TBW102", "SCHEDULE_TOPIC_XXXX"] {
        let resp = b.process(delete(system), &peer).await.unwrap();
        assert_eq!(resp.code, ResponseCode::SystemError.code(), "{system}");
    }
    assert!(b.store.topics.get("TBW102").is_some(), "TBW102 deleted");
    let resp = b.process(delete("%DLQ%G"), &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    h.stop().await;
    // Gone for good: not back after a restart.
    let h = start(local_config(dir.path())).await.unwrap();
    assert!(h.broker.store.topics.get("T").is_none());
    assert!(h.broker.store.queue("T", 0).is_none());
    assert_eq!(h.broker.store.queue("Kept", 0).unwrap().max_offset(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_messages_wait_for_their_time_and_queues_are_checked_against_both_counts() {
    use crate::store::message::{SCHEDULE_TOPIC, TIMER_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = local_config(dir.path());
    cfg.timer.precision_ms = 100;
    let h = broker_with_t(cfg).await;
    let b = &h.broker;
    // RocketMQ 5 timer messages wait in the timer topic, then reach their queue.
    let resp = send_v2(
        b,
        "T",
        "TIMER_DELAY_MS\u{1}700\u{2}UNIQ_KEY\u{1}U1\u{2}".into(),
        None,
    )
    .await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(resp.ext_fields.get("queueId"), Some("0"));
    assert_eq!(stored_in(b, TIMER_TOPIC, 0), 1);
    assert_eq!(stored_in(b, "T", 0), 0, "delivered at once");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stored_in(b, "T", 0) == 0 {
        assert!(std::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = first_in(b, "T", 0);
    let props = m.properties_map();
    // Timed 700 ms after it was sent, rounded down to the precision, and delivered a step
    // after that time: never before the 700 ms.
    let out: i64 = props["TIMER_OUT_MS"].parse().unwrap();
    let sent_at = first_in(b, TIMER_TOPIC, 0).store_timestamp;
    assert!(
        out >= sent_at + 590 && out <= sent_at + 700,
        "{out} {sent_at}"
    );
    assert!(m.store_timestamp >= out + 100, "delivered early");
    assert_eq!(props["UNIQ_KEY"], "U1", "the same message id");
    assert!(props.contains_key("TIMER_OUT_MS") && !props.contains_key("REAL_TOPIC"));
    // Too far ahead, unreadable, or a cancellation: refused. Due already: stored at once.
    for (timer, code) in [
        (
            "TIMER_DELAY_SEC\u{1}999999\u{2}",
            ResponseCode::MessageIllegal,
        ),
        ("TIMER_DELAY_MS\u{1}soon\u{2}", ResponseCode::MessageIllegal),
        (
            "TIMER_DELAY_SEC\u{1}5\u{2}TIMER_DEL_UNIQKEY\u{1}x\u{2}",
            ResponseCode::MessageIllegal,
        ),
    ] {
        let resp = send_v2_to(b, "T", 1, timer.into(), None).await;
        assert_eq!(resp.code, code.code(), "{timer:?}: {resp:?}");
        assert!(
            resp.remark.as_deref().unwrap_or("").contains("timer"),
            "{resp:?}"
        );
    }
    let resp = send_v2_to(b, "T", 1, "TIMER_DELIVER_MS\u{1}1000\u{2}".into(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 1), 1, "a time past is due now");
    // A delay level wins over a timer, whose properties go.
    let resp = send_v2_to(
        b,
        "T",
        2,
        "DELAY\u{1}2\u{2}TIMER_DELAY_SEC\u{1}60\u{2}".into(),
        None,
    )
    .await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, SCHEDULE_TOPIC, 1), 1);
    assert!(!first_in(b, SCHEDULE_TOPIC, 1)
        .properties_map()
        .contains_key("TIMER_DELAY_SEC"));
    // Nobody sends to the timer topic itself.
    let resp = send_v2(b, TIMER_TOPIC, String::new(), None).await;
    assert_eq!(resp.code, ResponseCode::NoPermission.code());
    // A topic shrunk to 2 write queues of 4 read ones still takes sends to queue 3.
    b.store
        .topics
        .put(TopicConfig {
            write_queue_nums: 2,
            ..TopicConfig::new("Shrunk", 4, PERM_READ | PERM_WRITE)
        })
        .unwrap();
    let resp = send_v2_to(b, "Shrunk", 3, String::new(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "Shrunk", 3), 1);
    let resp = send_v2_to(b, "Shrunk", 4, String::new(), None).await;
    assert_eq!(resp.code, ResponseCode::SystemError.code(), "{resp:?}");
    // A delayed message's answer names the queue it was sent to, not its level's.
    let resp = send_v2_to(b, "T", 1, "DELAY\u{1}3\u{2}".into(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, SCHEDULE_TOPIC, 2), 1);
    assert_eq!(resp.ext_fields.get("queueId"), Some("1"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sent_through_the_producer_goes_to_the_dead_letter_queue_once_used_up() {
    use crate::store::message::SCHEDULE_TOPIC;
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    // An orderly consumer's retry: through its producer, with a delay of 3 + attempts.
    let resp = send_v2(b, "%RETRY%G", "DELAY\u{1}5\u{2}".into(), Some((2, 16))).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(
        stored_in(b, SCHEDULE_TOPIC, 4),
        1,
        "a retry left is delayed"
    );
    let resp = send_v2(b, "%RETRY%G", "DELAY\u{1}19\u{2}".into(), Some((16, 16))).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "%DLQ%G", 0), 1, "used up: dead letter");
    assert_eq!(stored_in(b, SCHEDULE_TOPIC, 17), 0, "scheduled anyway");
    let dlq = b.store.topics.get("%DLQ%G").unwrap();
    assert_eq!(dlq.perm, PERM_WRITE);
    // maxReconsumeTimes 0 (Java's -1 and 0 alike): the first failure is final.
    let resp = send_v2(b, "%RETRY%G", String::new(), Some((0, 0))).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "%DLQ%G", 0), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lite_pull_is_answered_as_a_pull() {
    use crate::remoting::header::PULL_SUSPEND;
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    h.broker.store.append(&tagged(0, "A", 3)).unwrap();
    // RocketMQ 5's DefaultLitePullConsumer: subscription, suspend and the lite-pull bit.
    let header = pull_header("G", 0, 0, PULL_SUSPEND | 0x10, 1000, "*");
    let req = RemotingCommand::request(RequestCode::LitePullMessage.code(), header.to_ext());
    let peer = test_peer();
    let resp = h.broker.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let got = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(got.next_begin_offset, 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_names_that_cannot_name_a_topic_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let peer = test_peer();
    let bad = "x/../../../escaped";
    let body = format!(
        r#"{{"clientID":"c","consumerDataSet":[{{"groupName":"{bad}","subscriptionDataSet":[]}}]}}"#
    );
    let req = RemotingCommand::request(RequestCode::HeartBeat.code(), ExtFields::default())
        .with_body(Bytes::from(body));
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert!(
        b.consumers.client_ids(bad).is_empty(),
        "a bad group registered"
    );
    let stored = b.store.append(&tagged(0, "A", 1)).unwrap();
    let req = send_back_request(stored[0].physical_offset as i64, bad, 0);
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code(), "{resp:?}");
    assert!(b.store.topics.get(&format!("%RETRY%{bad}")).is_none());
    assert!(!dir.path().join("escaped").exists());
    // A valid group still gets its retry topic.
    let body = r#"{"clientID":"c","consumerDataSet":[{"groupName":"ns%G_1-a|b","subscriptionDataSet":[]}]}"#;
    let req = RemotingCommand::request(RequestCode::HeartBeat.code(), ExtFields::default())
        .with_body(Bytes::from_static(body.as_bytes()));
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert!(b.store.topics.get("%RETRY%ns%G_1-a|b").is_some());
    h.stop().await;
}

/// A LOCK_BATCH_MQ or UNLOCK_BATCH_MQ request of group `G` from `client` for queues `ids` of
/// `T` on `broker-a`, its body as Java's fastjson writes it.
fn lock_request(code: RequestCode, client: &str, ids: &[i32]) -> RemotingCommand {
    let mqs: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"brokerName":"broker-a","queueId":{id},"topic":"T"}}"#))
        .collect();
    let body = format!(
        r#"{{"clientId":"{client}","consumerGroup":"G","mqSet":[{}],"onlyThisBroker":false}}"#,
        mqs.join(",")
    );
    RemotingCommand::request(code.code(), ExtFields::default()).with_body(body.into_bytes())
}

/// LOCK_BATCH_MQ of `ids` by `client` at `now`: the queue ids it holds afterwards.
fn lock_at(b: &Broker, client: &str, ids: &[i32], now: std::time::Instant) -> Vec<i32> {
    let resp = b.lock_batch(&lock_request(RequestCode::LockBatchMq, client, ids), now);
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let body: crate::remoting::body::LockBatchResponseBody = from_json(&resp.body).unwrap();
    let mut ids: Vec<i32> = body.lock_ok_mq_set.iter().map(|q| q.queue_id).collect();
    ids.sort_unstable();
    ids
}

fn unlock(b: &Broker, client: &str, ids: &[i32]) {
    let resp = b.unlock_batch(&lock_request(RequestCode::UnlockBatchMq, client, ids));
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_at_a_time_holds_a_queue_until_it_unlocks_it() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let now = std::time::Instant::now();
    assert_eq!(lock_at(b, "a", &[0, 1], now), [0, 1]);
    // The second client gets only what the first does not hold.
    assert_eq!(lock_at(b, "b", &[1, 2], now), [2]);
    // The holder locks again (renews).
    assert_eq!(lock_at(b, "a", &[0, 1], now), [0, 1]);
    // An unlock by a client that does not hold the queue changes nothing.
    unlock(b, "b", &[0, 1]);
    assert_eq!(lock_at(b, "b", &[0, 1], now), Vec::<i32>::new());
    // Once the holder unlocks, the other client gets it.
    unlock(b, "a", &[1]);
    assert_eq!(lock_at(b, "b", &[0, 1], now), [1]);
    assert_eq!(lock_at(b, "a", &[0, 1], now), [0]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_keeps_its_masters_delay_progress_and_groups() {
    let (mdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = lone_broker(mdir.path(), BrokerRole::AsyncMaster).await;
    let slave = lone_broker(sdir.path(), BrokerRole::Slave).await;
    master.broker.scheduler.set_progress(3, 42);
    let mut paused = crate::store::groups::SubscriptionGroupConfig::new("G");
    paused.consume_enable = false;
    master.broker.store.groups.put(paused.clone()).unwrap();
    *slave.broker.master_addr.lock().unwrap() = Some(master.addr.to_string());
    slave.broker.sync_from_master().await;
    assert_eq!(slave.broker.scheduler.progress(3), 42);
    // Subscription groups too: a group paused on the master is paused on its slave.
    assert_eq!(slave.broker.store.groups.get("G"), Some(paused));
    let update = RemotingCommand::request(
        RequestCode::UpdateAndCreateSubscriptionGroup.code(),
        ExtFields::default(),
    )
    .with_body(Bytes::from_static(br#"{"groupName":"H"}"#));
    let peer = test_peer();
    let resp = slave.broker.process(update, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::NoPermission.code());
    let saved = std::fs::read_to_string(sdir.path().join("config").join("delayOffset.json"));
    assert!(saved.unwrap().contains("42"));
    slave.stop().await;
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_not_renewed_within_its_live_time_goes_to_the_next_client() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BrokerConfig {
        rebalance_lock_max_live_ms: 10_000,
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    let b = &h.broker;
    let t0 = std::time::Instant::now();
    assert_eq!(lock_at(b, "a", &[0], t0), [0]);
    let live = Duration::from_secs(10);
    // Renewed at 5 s: still a's 10 s later, b's just after.
    assert_eq!(lock_at(b, "a", &[0], t0 + Duration::from_secs(5)), [0]);
    let renewed = t0 + Duration::from_secs(5);
    assert!(lock_at(b, "b", &[0], renewed + live).is_empty());
    let expired = renewed + live + Duration::from_millis(1);
    assert_eq!(lock_at(b, "b", &[0], expired), [0]);
    assert!(lock_at(b, "a", &[0], expired).is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_locks_are_answered_over_the_wire_and_bad_bodies_get_a_system_error() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let pool = ConnectionPool::default();
    let addr = h.addr.to_string();
    let call = |req: RemotingCommand| pool.call(&addr, req, Duration::from_secs(5));

    let resp = call(lock_request(RequestCode::LockBatchMq, "a", &[3]))
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"lockOKMQSet":[{"topic":"T","brokerName":"broker-a","queueId":3}]})
    );
    let resp = call(lock_request(RequestCode::UnlockBatchMq, "a", &[3]))
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert!(resp.body.is_empty());
    assert_eq!(
        lock_at(&h.broker, "b", &[3], std::time::Instant::now()),
        [3]
    );

    for code in [RequestCode::LockBatchMq, RequestCode::UnlockBatchMq] {
        for (body, says) in [
            (&b"{\"consumerGroup\":"[..], "EOF"),
            (b"", "EOF"),
            (
                br#"{"consumerGroup":"G","clientId":"a","mqSet":{"topic":"T"}}"#,
                "sequence",
            ),
            (
                br#"{"clientId":"a","mqSet":[]}"#,
                "consumerGroup is missing",
            ),
            (
                br#"{"consumerGroup":"G","mqSet":[]}"#,
                "clientId is missing",
            ),
        ] {
            let req = RemotingCommand::request(code.code(), ExtFields::default())
                .with_body(body.to_vec());
            let resp = call(req).await.unwrap();
            assert_eq!(resp.code, ResponseCode::SystemError.code(), "{resp:?}");
            let remark = resp.remark.unwrap_or_default();
            assert!(remark.contains("body") && remark.contains(says), "{remark}");
        }
    }
    h.stop().await;
}

/// The value fastjson would read for the queue `T`/`queue_id` key of a queue-keyed stats body.
fn stats_entry(body: &[u8], broker: &str, queue_id: i32) -> serde_json::Value {
    let body = std::str::from_utf8(body).unwrap();
    let key = format!(r#"{{"topic":"T","brokerName":"{broker}","queueId":{queue_id}}}:"#);
    let at = body
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {body}"))
        + key.len();
    let end = at + body[at..].find('}').unwrap() + 1;
    serde_json::from_str(&body[at..end]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javas_topic_status_and_consumer_progress_are_answered() {
    use crate::remoting::header::{ConsumeStatsRequestHeader, TopicStatsRequestHeader};
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let name = b.cfg().broker_name.clone();
    b.store.append(&tagged(0, "A", 3)).unwrap();
    b.store.offsets.commit("G", "T", 0, 2);
    let peer = test_peer();

    let ask = TopicStatsRequestHeader { topic: "T".into() };
    let req = RemotingCommand::request(RequestCode::GetTopicStatsInfo.code(), ask.to_ext());
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert!(resp.body.starts_with(br#"{"offsetTable":{{"#));
    let q0 = stats_entry(&resp.body, &name, 0);
    assert_eq!(
        (q0["minOffset"].as_i64(), q0["maxOffset"].as_i64()),
        (Some(0), Some(3))
    );
    assert!(q0["lastUpdateTimestamp"].as_i64().unwrap() > 0);
    let q3 = stats_entry(&resp.body, &name, 3);
    assert_eq!(q3["maxOffset"].as_i64(), Some(0));
    let ask = TopicStatsRequestHeader {
        topic: "Nope".into(),
    };
    let req = RemotingCommand::request(RequestCode::GetTopicStatsInfo.code(), ask.to_ext());
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::TopicNotExist.code());

    let ask = ConsumeStatsRequestHeader {
        consumer_group: "G".into(),
        topic: None,
    };
    let req = RemotingCommand::request(RequestCode::GetConsumeStats.code(), ask.to_ext());
    let resp = b.process(req, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert!(resp
        .body
        .starts_with(br#"{"consumeTps":0.0,"offsetTable":{{"#));
    let q0 = stats_entry(&resp.body, &name, 0);
    assert_eq!(q0["brokerOffset"].as_i64(), Some(3));
    assert_eq!(q0["consumerOffset"].as_i64(), Some(2));
    assert!(q0["lastTimestamp"].as_i64().unwrap() > 0);
    let q1 = stats_entry(&resp.body, &name, 1);
    assert_eq!(
        (q1["consumerOffset"].as_i64(), q1["lastTimestamp"].as_i64()),
        (Some(0), Some(0))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_info_has_what_javas_cluster_list_reads() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    h.broker.store.append(&tagged(0, "A", 1)).unwrap();
    let info = h.broker.runtime_info().table;
    // Java's clusterList splits these and parses each part, and its daily totals, as numbers.
    for key in ["putTps", "getTransferedTps", "getTransferredTps"] {
        let parts: Vec<f64> = info[key].split(' ').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 3, "{key}");
    }
    for key in [
        "msgPutTotalTodayNow",
        "msgGetTotalTodayNow",
        "msgPutTotalTodayMorning",
        "msgGetTotalTodayMorning",
        "msgPutTotalYesterdayMorning",
        "msgGetTotalYesterdayMorning",
        "earliestMessageTimeStamp",
    ] {
        let n: i64 = info[key].parse().unwrap();
        assert!(n >= 0, "{key}");
    }
    assert!(info["brokerVersionDesc"].starts_with("ferromq"));
    // Each delay level's progress, "delivered,max", as Java's brokerStatus shows it.
    assert_eq!(info["scheduleMessageOffset_18"], "0,0");
    assert!(!info.contains_key("scheduleMessageOffset_19"));
    let later = crate::server::schedule::delay(
        &tagged(0, "A", 1)[0],
        2,
        &h.broker.store.config().delay_levels_ms,
    );
    h.broker.store.append(&[later]).unwrap();
    assert_eq!(
        h.broker.runtime_info().table["scheduleMessageOffset_2"],
        "0,1"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_does_not_want_to_wait_is_answered_once_stored() {
    let dir = tempfile::tempdir().unwrap();
    // A SYNC_MASTER without a slave answers SLAVE_NOT_AVAILABLE to whoever waits for one.
    let h = lone_broker(dir.path(), BrokerRole::SyncMaster).await;
    let resp = send_v2(&h.broker, "T", "WAIT\u{1}true\u{2}".into(), None).await;
    assert_eq!(
        resp.code,
        ResponseCode::SlaveNotAvailable.code(),
        "{resp:?}"
    );
    let resp = send_v2(&h.broker, "T", "WAIT\u{1}false\u{2}".into(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(&h.broker, "T", 0), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_no_name_server_took_is_unready_until_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ns_addr = spot.local_addr().unwrap();
    drop(spot);
    let cfg = BrokerConfig {
        namesrv_addrs: vec![ns_addr.to_string()],
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    let answer = get(h.http_addr, "/readyz").await;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "ready unlisted: {answer}"
    );
    // The name server comes up late: the broker registers within a second or two, not a
    // whole registerNameServerPeriod (30 s) later.
    let ns = name_server_at(ns_addr).await;
    let answer = wait_ready(h.http_addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "never ready: {answer}");
    h.stop().await;
    ns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_recovering_its_store_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    // The checkpoint is a FIFO: opening the store blocks on it until the test writes one,
    // as a long recovery would hold the start.
    let fifo = dir.path().join("checkpoint");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipped: mkfifo is not available");
        return;
    }
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = spot.local_addr().unwrap().port();
    drop(spot);
    let cfg = BrokerConfig {
        http_port,
        ..local_config(dir.path())
    };
    let starting = tokio::spawn(start(cfg));
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    for _ in 0..250 {
        if TcpStream::connect(http).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = tokio::time::timeout(Duration::from_secs(2), get(http, "/healthz"))
        .await
        .unwrap_or_default();
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "not alive while starting: {health}"
    );
    let ready = get(http, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503"),
        "ready while starting: {ready}"
    );
    assert!(!starting.is_finished());
    let write = tokio::task::spawn_blocking(move || {
        std::fs::write(&fifo, br#"{"consistentOffset":0,"cleanShutdown":true}"#)
    });
    write.await.unwrap().unwrap();
    let h = tokio::time::timeout(Duration::from_secs(10), starting)
        .await
        .expect("the start did not finish")
        .unwrap()
        .unwrap();
    let ready = wait_ready(h.http_addr).await;
    assert!(ready.starts_with("HTTP/1.1 200"), "never ready: {ready}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_groups_an_operator_configures_are_kept_and_honoured() {
    use crate::remoting::header::DeleteSubscriptionGroupRequestHeader;
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let peer = test_peer();
    let call = |code: RequestCode, ext: ExtFields, body: &'static str| {
        let req = RemotingCommand::request(code.code(), ext)
            .with_body(Bytes::from_static(body.as_bytes()));
        b.process(req, &peer)
    };
    // As Java's `mqadmin updateSubGroup -g G -s false -q 3 -r 2` sends it.
    let body = r#"{"groupName":"G","consumeEnable":false,"consumeBroadcastEnable":true,"retryQueueNums":3,"retryMaxTimes":2,"brokerId":0,"whichBrokerWhenConsumeSlowly":1}"#;
    let resp = call(
        RequestCode::UpdateAndCreateSubscriptionGroup,
        ExtFields::default(),
        body,
    )
    .await
    .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let bad = r#"{"groupName":"x/y"}"#;
    let resp = call(
        RequestCode::UpdateAndCreateSubscriptionGroup,
        ExtFields::default(),
        bad,
    )
    .await
    .unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());

    // Paused: its pulls are refused, other groups' are not.
    b.store.append(&tagged(0, "A", 1)).unwrap();
    let pull = |group: &str| {
        let header = pull_header(group, 0, 0, 0, 0, "*");
        RemotingCommand::request(RequestCode::PullMessage.code(), header.to_ext())
    };
    assert_eq!(
        b.pull(&pull("G")).await.code,
        ResponseCode::NoPermission.code()
    );
    assert_eq!(
        b.pull(&pull("Other")).await.code,
        ResponseCode::Success.code()
    );

    // Its retry topic takes its queue count, and its retry limit applies to clients that
    // send none.
    let hb = r#"{"clientID":"c","consumerDataSet":[{"groupName":"G","subscriptionDataSet":[]}]}"#;
    let resp = call(RequestCode::HeartBeat, ExtFields::default(), hb)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    assert_eq!(b.store.topics.get("%RETRY%G").unwrap().write_queue_nums, 3);
    let mut tired = tagged(0, "A", 1);
    tired[0].reconsume_times = 2;
    let stored = b.store.append(&tired).unwrap();
    let req = send_back_request(stored[0].physical_offset as i64, "G", 0);
    assert_eq!(
        b.process(req, &peer).await.unwrap().code,
        ResponseCode::Success.code()
    );
    assert_eq!(stored_in(b, "%DLQ%G", 0), 1, "retryMaxTimes 2 not applied");

    // A retry topic made read-only takes no retries.
    let mut ro = b.store.topics.get("%RETRY%G").unwrap();
    ro.perm = PERM_READ;
    b.store.topics.put(ro).unwrap();
    let mut fresh = tagged(0, "A", 1);
    fresh[0].reconsume_times = 0;
    let stored = b.store.append(&fresh).unwrap();
    let req = send_back_request(stored[0].physical_offset as i64, "G", 0);
    assert_eq!(
        b.process(req, &peer).await.unwrap().code,
        ResponseCode::NoPermission.code()
    );

    // Given back twice, retries spread over the retry topic's queues.
    let mut writable = b.store.topics.get("%RETRY%G").unwrap();
    writable.perm = PERM_READ | PERM_WRITE;
    b.store.topics.put(writable).unwrap();
    let mut real_queues = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let stored = b.store.append(&tagged(0, "A", 1)).unwrap();
        let req = send_back_request(stored[0].physical_offset as i64, "G", 1);
        assert_eq!(
            b.process(req, &peer).await.unwrap().code,
            ResponseCode::Success.code()
        );
        let end = b.store.commitlog().max_offset();
        let q = b
            .store
            .queue(crate::store::message::SCHEDULE_TOPIC, 0)
            .unwrap();
        let e = q.get(q.max_offset() - 1, 1).unwrap()[0];
        assert!(e.offset < end);
        let m = b.store.commitlog().read_message(e.offset).unwrap();
        real_queues
            .insert(crate::store::message::property(&m.properties, "REAL_QID").map(str::to_owned));
    }
    assert_eq!(
        real_queues.len(),
        2,
        "every retry went to one queue: {real_queues:?}"
    );
    // retryQueueNums 0: what the consumers give back is dropped (Java's rule).
    let none = r#"{"groupName":"G","retryQueueNums":0}"#;
    let resp = call(
        RequestCode::UpdateAndCreateSubscriptionGroup,
        ExtFields::default(),
        none,
    )
    .await
    .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    let end = b.store.commitlog().max_offset();
    let req = send_back_request(stored[0].physical_offset as i64, "G", 1);
    assert_eq!(
        b.process(req, &peer).await.unwrap().code,
        ResponseCode::Success.code()
    );
    assert_eq!(
        b.store.commitlog().max_offset(),
        end,
        "stored despite retryQueueNums 0"
    );

    // Listed as Java's tools read it, and forgotten on delete.
    let resp = call(
        RequestCode::GetAllSubscriptionGroupConfig,
        ExtFields::default(),
        "",
    )
    .await
    .unwrap();
    let all: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(all["subscriptionGroupTable"]["G"]["retryQueueNums"], 0);
    b.store.offsets.commit("G", "T", 0, 1);
    b.store.offsets.commit("Other", "T", 0, 1);
    let del = DeleteSubscriptionGroupRequestHeader {
        group_name: "G".into(),
        clean_offset: false,
    };
    let resp = call(RequestCode::DeleteSubscriptionGroup, del.to_ext(), "")
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    assert_eq!(b.pull(&pull("G")).await.code, ResponseCode::Success.code());
    assert_eq!(b.store.offsets.get("G", "T", 0), Some(1));
    // `deleteSubGroup -r true`: its offsets go too, no other group's.
    let del = DeleteSubscriptionGroupRequestHeader {
        group_name: "G".into(),
        clean_offset: true,
    };
    let resp = call(RequestCode::DeleteSubscriptionGroup, del.to_ext(), "")
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    assert_eq!(b.store.offsets.get("G", "T", 0), None);
    assert_eq!(b.store.offsets.get("Other", "T", 0), Some(1));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_a_full_disk_turns_sends_away_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    // Past diskSpaceWarningLevelRatio (90%). Recorded again until it sticks: the broker's
    // own first measurement, at its start, may come after the test's.
    let (mut resp, mut ready) = (None, String::new());
    for _ in 0..50 {
        h.broker.store.record_disk_usage(0.93);
        resp = Some(send_v2(&h.broker, "T", String::new(), None).await);
        ready = get(h.http_addr, "/readyz").await;
        if ready.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What Java answers: producers retry on another broker.
    let resp = resp.unwrap();
    assert_eq!(
        resp.code,
        ResponseCode::ServiceNotAvailable.code(),
        "{resp:?}"
    );
    assert!(ready.contains("full"), "{ready}");
    h.broker.store.record_disk_usage(0.2);
    let resp = send_v2(&h.broker, "T", String::new(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_registers_again_at_once_with_a_name_server_that_lost_it() {
    let dir = tempfile::tempdir().unwrap();
    let ns = name_server_at("127.0.0.1:0".parse().unwrap()).await;
    let ns_addr = ns.addr;
    let cfg = BrokerConfig {
        namesrv_addrs: vec![ns_addr.to_string()],
        ..local_config(dir.path())
    };
    let h = start(cfg).await.unwrap();
    let listed = |at: SocketAddr| async move {
        let c = crate::client::Client::new(vec![at.to_string()]);
        c.cluster_info()
            .await
            .is_ok_and(|i| i.broker_addr_table.contains_key("broker-a"))
    };
    assert!(listed(ns_addr).await);
    // The name server restarts (its routes are gone, the broker's connection closed); the
    // next period is 30 s away.
    ns.stop().await;
    let ns = name_server_at(ns_addr).await;
    let mut back = false;
    for _ in 0..100 {
        if listed(ns_addr).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "the broker waited for its next period to register again"
    );
    h.stop().await;
    ns.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_frees_its_store_even_with_a_scraper_connected() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    // A metrics scraper keeps its connection open between scrapes.
    let mut scraper = TcpStream::connect(h.http_addr).await.unwrap();
    scraper
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = scraper.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    h.stop().await;
    let cfg = crate::store::StoreConfig::for_tests(dir.path(), crate::store::FlushDiskType::Async);
    let again = crate::store::MessageStore::open(cfg);
    assert!(again.is_ok(), "the store stayed locked: {:?}", again.err());
    again.unwrap().shutdown();
    drop(scraper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_how_far_the_log_is_indexed_and_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    h.broker.store.append(&tagged(0, "A", 3)).unwrap();
    let end = h.broker.store.commitlog().max_offset();
    // The checkpoint follows within a second or two (the flush thread's).
    let want = [
        format!("ferromq_broker_commitlog_indexed_offset {end}"),
        format!("ferromq_broker_checkpoint_offset {end}"),
        format!("ferromq_broker_key_index_offset {end}"),
    ];
    let mut metrics = String::new();
    for _ in 0..60 {
        metrics = get(h.http_addr, "/metrics").await;
        if want.iter().all(|w| metrics.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &want {
        assert!(metrics.contains(w), "{w} missing from {metrics}");
    }
    h.stop().await;
}

/// REGISTER_BROKER requests a name server has answered, from its /metrics.
async fn registrations(ns_http: SocketAddr) -> u64 {
    let metrics = get(ns_http, "/metrics").await;
    metrics
        .lines()
        .find(|l| l.starts_with("ferromq_namesrv_requests_total{code=\"103\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("no REGISTER_BROKER count in the name server's /metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_broker_tries_again_at_its_period_not_every_second() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ns = name_server_at("127.0.0.1:0".parse().unwrap()).await;
    let with_ns = |d: &tempfile::TempDir| BrokerConfig {
        namesrv_addrs: vec![ns.addr.to_string()],
        ..local_config(d.path())
    };
    let first = start(with_ns(&d1)).await.unwrap();
    // A second master for the same group: refused while the first lives.
    let second = start(with_ns(&d2)).await.unwrap();
    assert!(get(second.http_addr, "/readyz")
        .await
        .starts_with("HTTP/1.1 503"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = registrations(ns.http_addr).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let after = registrations(ns.http_addr).await;
    assert!(
        after - before <= 1,
        "{} registrations in 3 s",
        after - before
    );
    second.stop().await;
    first.stop().await;
    ns.stop().await;
}

/// END_TRANSACTION as a producer sends it (oneway) for the half message `sent` answered.
fn end_transaction(
    group: &str,
    sent: &RemotingCommand,
    commit_or_rollback: i32,
) -> RemotingCommand {
    let h = crate::remoting::header::EndTransactionRequestHeader {
        producer_group: group.into(),
        tran_state_table_offset: sent.ext_fields.get("queueOffset").unwrap().parse().unwrap(),
        commit_log_offset: crate::store::message::parse_offset_msg_id(
            sent.ext_fields.get("msgId").unwrap(),
        )
        .unwrap(),
        commit_or_rollback,
        from_transaction_check: Some(false),
        msg_id: Some("UNIQ".into()),
        transaction_id: None,
    };
    let mut req = RemotingCommand::request(RequestCode::EndTransaction.code(), h.to_ext());
    req.flag |= crate::remoting::command::FLAG_ONEWAY;
    req
}

/// The same request, asking for an answer (to see what the broker made of it).
fn answered(mut req: RemotingCommand) -> RemotingCommand {
    req.flag &= !crate::remoting::command::FLAG_ONEWAY;
    req
}

/// Properties of a transactional message of producer group `P`.
fn half_properties(uniq: &str) -> String {
    format!("TRAN_MSG\u{1}true\u{2}PGROUP\u{1}P\u{2}UNIQ_KEY\u{1}{uniq}\u{2}TAGS\u{1}A\u{2}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_message_is_delivered_only_once_its_producer_commits() {
    use super::transaction::{HALF_TOPIC, OP_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let peer = test_peer();

    let sent = send_v2_to(b, "T", 2, half_properties("U1"), None).await;
    assert_eq!(sent.code, ResponseCode::Success.code(), "{sent:?}");
    // Answered for the queue it was sent to, at the half message's place.
    assert_eq!(sent.ext_fields.get("queueId"), Some("2"));
    assert_eq!(sent.ext_fields.get("queueOffset"), Some("0"));
    assert_eq!(stored_in(b, "T", 2), 0, "a half message reached its topic");
    assert_eq!(stored_in(b, HALF_TOPIC, 0), 1);

    // Refused: another group's, or the wrong queue offset; the message stays undecided.
    let wrong = answered(end_transaction("Q", &sent, 8));
    let resp = b.process(wrong, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code(), "{resp:?}");
    assert_eq!(resp.remark.as_deref(), Some("The producer group wrong"));
    let mut moved = answered(end_transaction("P", &sent, 8));
    moved.ext_fields.insert("tranStateTableOffset", "5");
    let resp = b.process(moved, &peer).await.unwrap();
    assert_eq!(
        resp.remark.as_deref(),
        Some("The transaction state table offset wrong")
    );
    // Not decided yet: nothing happens, nothing is answered.
    assert!(b
        .process(answered(end_transaction("P", &sent, 0)), &peer)
        .await
        .is_none());
    assert_eq!(stored_in(b, "T", 2), 0);
    assert_eq!(stored_in(b, OP_TOPIC, 0), 0);

    // Committed: the message is in its queue, as sent.
    let resp = b
        .process(end_transaction("P", &sent, 8), &peer)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 2), 1);
    let m = first_in(b, "T", 2);
    assert_eq!(&m.body[..], b"body");
    let props = m.properties_map();
    assert_eq!(props.get("UNIQ_KEY").map(String::as_str), Some("U1"));
    assert_eq!(props.get("TRAN_MSG").map(String::as_str), Some("true"));
    assert!(
        !props.contains_key("REAL_TOPIC") && !props.contains_key("REAL_QID"),
        "{props:?}"
    );
    assert_eq!(m.sys_flag & 0xC, 0x8, "not marked committed");
    assert_eq!(
        b.store.queue("T", 2).unwrap().get(0, 1).unwrap()[0].tags_code,
        NewMessage::tags_code_of(&m.properties)
    );
    assert_eq!(stored_in(b, OP_TOPIC, 0), 1, "the decision is not recorded");

    // Rolled back: never delivered, the decision recorded.
    let sent = send_v2_to(b, "T", 2, half_properties("U2"), None).await;
    assert_eq!(sent.ext_fields.get("queueOffset"), Some("1"));
    let resp = b
        .process(end_transaction("P", &sent, 12), &peer)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 2), 1);
    assert_eq!(stored_in(b, OP_TOPIC, 0), 2);

    // A batch cannot carry one; a slave takes no decision.
    assert!(b
        .transactional(
            &[
                (0, Bytes::new(), half_properties("a")),
                (0, Bytes::new(), String::new())
            ],
            &Default::default()
        )
        .is_err());
    h.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let slave = lone_broker(dir.path(), BrokerRole::Slave).await;
    let resp = slave
        .broker
        .process(answered(end_transaction("P", &sent, 8)), &peer)
        .await;
    assert_eq!(resp.unwrap().code, ResponseCode::SlaveNotAvailable.code());
    slave.stop().await;
}

/// A producer of group `P` registered with `b` by heartbeat; what the broker pushes to it.
async fn producer_of_p(b: &Broker, addr: &str) -> tokio::sync::mpsc::Receiver<RemotingCommand> {
    producer_of_p_holding(b, addr, 16).await
}

/// [`producer_of_p`] whose connection queues at most `room` requests.
async fn producer_of_p_holding(
    b: &Broker,
    addr: &str,
    room: usize,
) -> tokio::sync::mpsc::Receiver<RemotingCommand> {
    let (tx, rx) = tokio::sync::mpsc::channel(room);
    let mut peer = Peer::detached(addr.parse().unwrap());
    peer.push = tx;
    let body = format!(
        r#"{{"clientID":"{addr}@1","producerDataSet":[{{"groupName":"P"}}],"consumerDataSet":[]}}"#
    );
    let beat = RemotingCommand::request(RequestCode::HeartBeat.code(), Default::default())
        .with_body(body.into_bytes());
    let resp = b.process(beat, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code());
    rx
}

/// A master whose transaction checks the test runs itself: half messages due after
/// `timeout_ms`, asked about at most `check_max` times.
async fn tx_broker(dir: &std::path::Path, timeout_ms: u64, check_max: u32) -> BrokerHandle {
    let cfg = BrokerConfig {
        transaction_timeout_ms: timeout_ms,
        transaction_check_max: check_max,
        transaction_check_interval_ms: 3_600_000,
        ..local_config(dir)
    };
    let h = start(cfg).await.unwrap();
    h.broker
        .store
        .topics
        .put(TopicConfig::new("T", 4, PERM_READ | PERM_WRITE))
        .unwrap();
    h
}

/// The CHECK_TRANSACTION_STATE header of a pushed request.
fn check_header(
    cmd: &RemotingCommand,
) -> crate::remoting::header::CheckTransactionStateRequestHeader {
    assert_eq!(cmd.code, RequestCode::CheckTransactionState.code());
    assert!(cmd.is_oneway());
    crate::remoting::header::CheckTransactionStateRequestHeader::from_ext(&cmd.ext_fields).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_half_message_is_asked_about_until_its_producer_answers() {
    use super::transaction::{CHECK_GROUP, CHECK_MAX_TOPIC, HALF_TOPIC, OP_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 0, 2).await;
    let b = &h.broker;
    let decided = send_v2_to(b, "T", 1, half_properties("D"), None).await;
    let sent = send_v2_to(b, "T", 3, half_properties("U"), None).await;
    assert_eq!(sent.code, ResponseCode::Success.code(), "{sent:?}");
    let peer = test_peer();
    let resp = b
        .process(end_transaction("P", &decided, 8), &peer)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");

    // No producer online: the message is copied all the same (one question counted), and
    // asked about in a later round; the decided one is passed over.
    assert_eq!(b.check_transactions().await.unwrap(), 0);
    assert_eq!(stored_in(b, HALF_TOPIC, 0), 3);
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(2));
    assert_eq!(b.store.offsets.get(CHECK_GROUP, OP_TOPIC, 0), Some(1));
    let mut pushed = producer_of_p(b, "10.0.0.9:5000").await;
    assert_eq!(b.check_transactions().await.unwrap(), 1);
    let check = pushed.try_recv().expect("the producer was not asked");
    let ask = check_header(&check);
    // About the latest copy, the fourth message of the half queue.
    assert_eq!(ask.tran_state_table_offset, 3);
    assert_eq!(ask.msg_id.as_deref(), Some("U"));
    assert_eq!(ask.transaction_id.as_deref(), Some("U"));
    let copy = b
        .store
        .commitlog()
        .read_message(ask.commit_log_offset as u64)
        .unwrap();
    assert_eq!(copy.topic, HALF_TOPIC);
    assert_eq!(copy.queue_offset, 3);
    assert_eq!(
        ask.offset_msg_id.as_deref(),
        Some(copy.offset_msg_id().as_str())
    );
    // The body is the message as sent, in its own topic and queue, as Java clients decode it.
    // (The first copy had no one to ask: this is its second question.)
    let m = crate::store::message::decode_stored(&check.body).unwrap();
    assert_eq!(
        (m.topic.as_str(), m.queue_id, &m.body[..]),
        ("T", 3, &b"body"[..])
    );
    assert_eq!(
        m.properties_map()
            .get("TRANSACTION_CHECK_TIMES")
            .map(String::as_str),
        Some("2")
    );
    assert_eq!(
        (m.physical_offset, m.queue_offset),
        (ask.commit_log_offset, 3)
    );

    // Asked too often: set aside, never asked about again.
    assert_eq!(b.check_transactions().await.unwrap(), 0);
    assert_eq!(stored_in(b, CHECK_MAX_TOPIC, 0), 1);
    assert!(pushed.try_recv().is_err());
    assert_eq!(b.check_transactions().await.unwrap(), 0);
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(4));

    // A producer's answer to a question ends the checks; its commit delivers the message.
    let sent = send_v2_to(b, "T", 0, half_properties("V"), None).await;
    assert_eq!(sent.code, ResponseCode::Success.code());
    assert_eq!(b.check_transactions().await.unwrap(), 1);
    let ask = check_header(&pushed.try_recv().unwrap());
    let answer = crate::remoting::header::EndTransactionRequestHeader {
        producer_group: "P".into(),
        tran_state_table_offset: ask.tran_state_table_offset,
        commit_log_offset: ask.commit_log_offset,
        commit_or_rollback: 8,
        from_transaction_check: Some(true),
        msg_id: ask.msg_id.clone(),
        transaction_id: ask.transaction_id.clone(),
    };
    let end = RemotingCommand::request(RequestCode::EndTransaction.code(), answer.to_ext());
    let resp = b.process(end, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 0), 1);
    assert_eq!(b.check_transactions().await.unwrap(), 0);
    assert!(pushed.try_recv().is_err(), "asked again after its answer");
    // Every decision passed over: the op queue's progress is at its end.
    assert_eq!(
        b.store.offsets.get(CHECK_GROUP, OP_TOPIC, 0),
        Some(stored_in(b, OP_TOPIC, 0) as i64)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_messages_wait_their_timeout_or_immunity_and_checks_survive_a_restart() {
    use super::transaction::{CHECK_GROUP, HALF_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 3_600_000, 15).await;
    let b = &h.broker;
    let decided = send_v2_to(b, "T", 0, half_properties("D"), None).await;
    send_v2_to(b, "T", 0, half_properties("U"), None).await;
    let resp = b
        .process(end_transaction("P", &decided, 12), &test_peer())
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let mut pushed = producer_of_p(b, "10.0.0.9:5000").await;
    // Too young to ask about: the round stops there, nothing copied.
    assert_eq!(b.check_transactions().await.unwrap(), 0);
    assert_eq!(stored_in(b, HALF_TOPIC, 0), 2);
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(1));
    h.stop().await;

    // After a restart with a short timeout: the decided one is not asked about (the progress
    // past it was kept), the other is.
    let h = tx_broker(dir.path(), 0, 15).await;
    let b = &h.broker;
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(1));
    let mut pushed_again = producer_of_p(b, "10.0.0.9:5001").await;
    // A producer's immunity holds its message back (and, the checks going in order, those
    // behind it).
    let immune = format!(
        "{}CHECK_IMMUNITY_TIME_IN_SECONDS\u{1}60\u{2}",
        half_properties("I")
    );
    send_v2_to(b, "T", 0, immune, None).await;
    send_v2_to(b, "T", 0, half_properties("W"), None).await;
    assert_eq!(b.check_transactions().await.unwrap(), 1);
    let ask = check_header(&pushed_again.try_recv().unwrap());
    assert_eq!(ask.msg_id.as_deref(), Some("U"));
    assert!(
        pushed_again.try_recv().is_err(),
        "the immune message was asked about"
    );
    assert!(pushed.try_recv().is_err());
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_stops_at_a_producer_too_busy_to_be_asked() {
    use super::transaction::{CHECK_GROUP, HALF_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 0, 15).await;
    let b = &h.broker;
    send_v2_to(b, "T", 0, half_properties("A"), None).await;
    send_v2_to(b, "T", 0, half_properties("B"), None).await;
    // A connection whose queue holds one request, not read.
    let mut rx = producer_of_p_holding(b, "10.0.0.9:5000", 1).await;
    // The second question finds no room: the round ends before copying it.
    assert_eq!(b.check_transactions().await.unwrap(), 1);
    assert_eq!(stored_in(b, HALF_TOPIC, 0), 3);
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(1));
    assert_eq!(
        check_header(&rx.try_recv().unwrap()).msg_id.as_deref(),
        Some("A")
    );
    // Room again: the next round goes on from there.
    assert_eq!(b.check_transactions().await.unwrap(), 1);
    assert_eq!(
        check_header(&rx.try_recv().unwrap()).msg_id.as_deref(),
        Some("B")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_transaction_takes_only_a_half_message_at_the_quoted_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 3_600_000, 15).await;
    let b = &h.broker;
    let peer = test_peer();
    let sent = send_v2_to(b, "T", 0, half_properties("H"), None).await;
    let plain = send_v2_to(b, "T", 1, String::new(), None).await;
    let plain_offset =
        crate::store::message::parse_offset_msg_id(plain.ext_fields.get("msgId").unwrap()).unwrap();
    // A message whose body is a stored half message of group P at queue offset 0, as a
    // producer could send it: at its body's offset it decodes as that half message.
    let log = b.store.commitlog();
    let at = log.max_offset();
    let body_at = at + 88; // the fixed fields of an IPv4 message before its body
    let mut forged = bytes::BytesMut::new();
    super::transaction::half(NewMessage {
        properties: half_properties("F"),
        ..message()
    })
    .encode(
        &mut forged,
        0,
        body_at as i64,
        0,
        &b.store.config().store_host,
    );
    b.store
        .append(&[NewMessage {
            queue_id: 3,
            body: forged.freeze(),
            ..message()
        }])
        .unwrap();
    assert_eq!(
        log.read_message(body_at).unwrap().topic,
        "RMQ_SYS_TRANS_HALF_TOPIC"
    );
    let change = |key: &str, value: &str| {
        let mut req = answered(end_transaction("P", &sent, 8));
        req.ext_fields.insert(key, value);
        req
    };
    for (req, remark) in [
        (
            change("commitLogOffset", &plain_offset.to_string()),
            "Find prepared transaction message failed",
        ),
        (
            change("commitLogOffset", &body_at.to_string()),
            "The commit log offset wrong",
        ),
        (
            change("commitLogOffset", "-1"),
            "Find prepared transaction message failed",
        ),
        (
            change("tranStateTableOffset", "9"),
            "The transaction state table offset wrong",
        ),
        (
            change("commitOrRollback", "5"),
            "commitOrRollback field wrong",
        ),
    ] {
        let resp = b.process(req, &peer).await.unwrap();
        assert_eq!(resp.code, ResponseCode::SystemError.code(), "{resp:?}");
        assert_eq!(resp.remark.as_deref(), Some(remark));
    }
    assert_eq!(stored_in(b, "T", 0), 0);

    // A commit after its topic was deleted records the decision only.
    b.store
        .topics
        .put(TopicConfig::new("Gone", 1, PERM_READ | PERM_WRITE))
        .unwrap();
    let gone = send_v2_to(b, "Gone", 0, half_properties("G"), None).await;
    assert_eq!(gone.code, ResponseCode::Success.code(), "{gone:?}");
    b.store.topics.remove("Gone").unwrap();
    let ops = stored_in(b, super::transaction::OP_TOPIC, 0);
    let resp = b
        .process(answered(end_transaction("P", &gone, 8)), &peer)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "Gone", 0), 0);
    assert_eq!(stored_in(b, super::transaction::OP_TOPIC, 0), ops + 1);

    // A delay asked of a transactional message is dropped: committed, it is delivered at
    // once, not scheduled.
    let delayed = send_v2_to(
        b,
        "T",
        2,
        format!("{}DELAY\u{1}3\u{2}", half_properties("L")),
        None,
    )
    .await;
    assert_eq!(stored_in(b, schedule::SCHEDULE_TOPIC, 2), 0);
    let resp = b
        .process(answered(end_transaction("P", &delayed, 8)), &peer)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 2), 1);
    let m = first_in(b, "T", 2);
    assert!(
        !m.properties_map().contains_key("DELAY"),
        "{:?}",
        m.properties
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_decision_on_a_passed_half_message_does_not_hold_the_op_progress() {
    use super::transaction::{CHECK_GROUP, CHECK_MAX_TOPIC, HALF_TOPIC, OP_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 0, 1).await;
    let b = &h.broker;
    let sent = send_v2_to(b, "T", 0, half_properties("A"), None).await;
    // Copied once with no one to ask, then set aside.
    b.check_transactions().await.unwrap();
    b.check_transactions().await.unwrap();
    assert_eq!(stored_in(b, CHECK_MAX_TOPIC, 0), 1);
    assert_eq!(b.store.offsets.get(CHECK_GROUP, HALF_TOPIC, 0), Some(2));
    // The producer's own commit arrives at last: delivered (Java's rule), and its op passed
    // over although no half message is left to pass (a drain waits for this offset).
    let resp = b
        .process(answered(end_transaction("P", &sent, 8)), &test_peer())
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 0), 1);
    b.check_transactions().await.unwrap();
    assert_eq!(b.store.offsets.get(CHECK_GROUP, OP_TOPIC, 0), Some(1));
    assert_eq!(stored_in(b, OP_TOPIC, 0), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_message_too_large_to_count_another_question_is_set_aside() {
    use super::transaction::{CHECK_MAX_TOPIC, HALF_TOPIC};
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 0, 15).await;
    let b = &h.broker;
    // A count of questions sent by the producer is not the broker's: dropped.
    let counted = format!(
        "{}TRANSACTION_CHECK_TIMES\u{1}99\u{2}",
        half_properties("C")
    );
    send_v2_to(b, "T", 0, counted, None).await;
    let m = first_in(b, HALF_TOPIC, 0);
    assert!(!m.properties_map().contains_key("TRANSACTION_CHECK_TIMES"));
    // Properties a few bytes short of the limit once CLUSTER, REAL_TOPIC and REAL_QID are
    // added: stored, but a copy with its count of questions would not fit.
    let base = half_properties("Big");
    let room = 32_767
        - base.len()
        - "CLUSTER\u{1}DefaultCluster\u{2}REAL_TOPIC\u{1}T\u{2}REAL_QID\u{1}0\u{2}".len();
    let big = format!("{base}K\u{1}{}\u{2}", "v".repeat(room - 8));
    let resp = send_v2_to(b, "T", 0, big, None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    send_v2_to(b, "T", 0, half_properties("After"), None).await;
    let mut pushed = producer_of_p(b, "10.0.0.9:5000").await;
    // C is asked about; the large one is set aside; the one behind it is asked about.
    assert_eq!(b.check_transactions().await.unwrap(), 2);
    assert_eq!(stored_in(b, CHECK_MAX_TOPIC, 0), 1);
    let asked: Vec<_> = std::iter::from_fn(|| pushed.try_recv().ok())
        .map(|c| check_header(&c).msg_id.unwrap())
        .collect();
    assert_eq!(asked, ["C", "After"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_message_answers_messages_by_key_and_client_id_as_java_clients_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let sent: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage {
            properties: format!("KEYS\u{1}order-{} all\u{2}UNIQ_KEY\u{1}ID{i}\u{2}", i % 4),
            body: Bytes::from(format!("m{i}")),
            ..message()
        })
        .collect();
    let results = h.broker.store.append(&sent).unwrap();
    let ask = |key: &str, max: i32, unique: bool, index_type: Option<&str>| {
        let mut req =
            RemotingCommand::request(RequestCode::QueryMessage.code(), Default::default())
                .with_ext("topic", "T")
                .with_ext("key", key)
                .with_ext("maxNum", max)
                .with_ext("beginTimestamp", 0)
                .with_ext("endTimestamp", i64::MAX);
        if unique {
            req = req.with_ext("_UNIQUE_KEY_QUERY", "true");
        }
        if let Some(t) = index_type {
            req = req.with_ext("indexType", t);
        }
        let b = h.broker.clone();
        async move { b.process(req, &test_peer()).await.unwrap() }
    };
    // The index is built behind the log.
    let mut resp = ask("order-1", 64, false, None).await;
    for _ in 0..200 {
        if resp.code == ResponseCode::Success.code() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        resp = ask("order-1", 64, false, None).await;
    }
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    let header = QueryMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(
        header.index_last_update_phyoffset as u64,
        results.last().unwrap().end
    );
    assert!(header.index_last_update_timestamp > 0);
    let bodies: Vec<String> = crate::client::decode_messages(&resp.body)
        .unwrap()
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (0..40)
        .filter(|i| i % 4 == 1)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(bodies, expected, "in log order");
    // maxNum counts: the newest ones.
    let resp = ask("all", 3, false, None).await;
    let got = crate::client::decode_messages(&resp.body).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(&got[0].body[..], b"m37");
    // A client id: one message, whatever maxNum says.
    let resp = ask("ID5", 0, true, Some("U")).await;
    let got = crate::client::decode_messages(&resp.body).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"m5");
    // Nothing found: Java's code and remark, with the index's reach still in the header.
    let resp = ask("order-9", 64, false, Some("K")).await;
    assert_eq!(resp.code, ResponseCode::QueryNotFound.code());
    assert!(resp.remark.unwrap().contains("can not find message"));
    assert!(QueryMessageResponseHeader::from_ext(&resp.ext_fields).is_ok());
    // Tags are not indexed: refused rather than answered empty.
    let resp = ask("order-1", 64, false, Some("T")).await;
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(resp.remark.unwrap().contains("tag"));
    // A request without its required fields says which.
    let bad = RemotingCommand::request(RequestCode::QueryMessage.code(), Default::default())
        .with_ext("topic", "T");
    let resp = h.broker.process(bad, &test_peer()).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(resp.remark.unwrap().contains("key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql92_subscriptions_select_by_properties_with_enable_property_filter() {
    use crate::remoting::body::{ConsumerData, SubscriptionData};
    let dir = tempfile::tempdir().unwrap();
    let h = broker_with_t(BrokerConfig {
        property_filter: true,
        ..local_config(dir.path())
    })
    .await;
    let sent: Vec<NewMessage> = (0..10)
        .map(|i| NewMessage {
            properties: format!("TAGS\u{1}t{}\u{2}a\u{1}{i}\u{2}", i % 2),
            body: Bytes::from(format!("m{i}")),
            ..message()
        })
        .collect();
    h.broker.store.append(&sent).unwrap();
    let bodies = |resp: &RemotingCommand| -> Vec<String> {
        crate::client::decode_messages(&resp.body)
            .unwrap()
            .iter()
            .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
            .collect()
    };
    // With the pull (a lite-pull consumer's way).
    let pull = |sql: &str, flags: i32| {
        let mut p = pull_header("G", 0, 0, 0, 0, sql);
        p.expression_type = Some("SQL92".into());
        p.sys_flag = flags;
        RemotingCommand::request(RequestCode::PullMessage.code(), p.to_ext())
    };
    let resp = h
        .broker
        .pull(&pull("a > 5 AND TAGS = 't1'", PULL_SUBSCRIPTION))
        .await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    assert_eq!(bodies(&resp), ["m7", "m9"]);
    let header = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(
        header.next_begin_offset, 10,
        "past what the selector passed over"
    );
    // maxMsgNums counts the messages selected: the next pull starts after the last one.
    let mut two = pull_header("G", 0, 0, 0, 0, "a >= 3");
    two.expression_type = Some("SQL92".into());
    two.max_msg_nums = 2;
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), two.to_ext());
    let resp = h.broker.pull(&req).await;
    assert_eq!(bodies(&resp), ["m3", "m4"]);
    let header = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(header.next_begin_offset, 5);
    // None selected: read on, then told to pull again from past them.
    let resp = h.broker.pull(&pull("a > 100", PULL_SUBSCRIPTION)).await;
    let header = PullMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(
        (resp.code, header.next_begin_offset),
        (ResponseCode::PullRetryImmediately.code(), 10)
    );
    let resp = h.broker.pull(&pull("a >", PULL_SUBSCRIPTION)).await;
    assert_eq!(resp.code, ResponseCode::SubscriptionParseFailed.code());
    assert!(resp
        .remark
        .unwrap()
        .contains("parse the consumer's subscription failed"));
    // A held pull passes over arrivals the selector does not select and answers with the
    // first it does.
    let mut held = pull_header("G", 0, 10, 0, 10_000, "a >= 100");
    held.expression_type = Some("SQL92".into());
    held.sys_flag = PULL_SUBSCRIPTION | crate::remoting::header::PULL_SUSPEND;
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), held.to_ext());
    let broker = h.broker.clone();
    let waiting = tokio::spawn(async move { broker.pull(&req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let arrive = |a: u32| NewMessage {
        properties: format!("a\u{1}{a}\u{2}"),
        body: Bytes::from(format!("m{a}")),
        ..message()
    };
    h.broker.store.append(&[arrive(5)]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "answered with a message not selected"
    );
    h.broker.store.append(&[arrive(200)]).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bodies(&resp), ["m200"]);

    // From the heartbeat (a push consumer's way): its expression, or Java's answer when it
    // does not parse.
    let from = clients::ClientConn {
        addr: "127.0.0.1:1".parse().unwrap(),
        link: test_peer().link(),
        language: "JAVA",
        version: 0,
    };
    for (group, sql) in [("G", "a BETWEEN 2 AND 3"), ("Bad", "a >")] {
        let data = ConsumerData {
            group_name: group.into(),
            subscription_data_set: vec![SubscriptionData {
                topic: "T".into(),
                sub_string: sql.into(),
                expression_type: Some("SQL92".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        h.broker.consumers.heartbeat("c1", &data, &from);
    }
    let resp = h.broker.pull(&pull("", 0)).await;
    assert_eq!(bodies(&resp), ["m2", "m3"]);
    let mut bad = pull_header("Bad", 0, 0, 0, 0, "");
    bad.sys_flag = 0;
    bad.expression_type = Some("SQL92".into());
    let req = RemotingCommand::request(RequestCode::PullMessage.code(), bad.to_ext());
    let resp = h.broker.pull(&req).await;
    assert_eq!(resp.code, ResponseCode::FilterDataNotExist.code());

    // A consumer's check at start: refused with where the expression went wrong.
    let check = |sql: &str| {
        let body = format!(
            r#"{{"clientId":"c","group":"G","subscriptionData":{{"topic":"T","subString":"{sql}","expressionType":"SQL92"}}}}"#
        );
        RemotingCommand::request(RequestCode::CheckClientConfig.code(), Default::default())
            .with_body(body.into_bytes())
    };
    assert_eq!(
        h.broker.check_client_config(&check("a > 5")).code,
        ResponseCode::Success.code()
    );
    let resp = h.broker.check_client_config(&check("a > 'x'"));
    assert_eq!(resp.code, ResponseCode::SubscriptionParseFailed.code());
    assert!(resp.remark.unwrap().contains("character 4"));
    h.stop().await;
}

/// A client on `addr` that said in a heartbeat it is producer `P` and consumer of group `G`
/// (client id `<addr>@1`, version `version`): its peer, and what the broker sends it.
async fn client_of(
    b: &Broker,
    addr: &str,
    version: i32,
) -> (Peer, tokio::sync::mpsc::Receiver<RemotingCommand>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut peer = Peer::detached(addr.parse().unwrap());
    peer.push = tx;
    let body = format!(
        r#"{{"clientID":"{addr}@1","producerDataSet":[{{"groupName":"P"}}],"consumerDataSet":[{{"groupName":"G","consumeType":"CONSUME_PASSIVELY","messageModel":"CLUSTERING","consumeFromWhere":"CONSUME_FROM_LAST_OFFSET","subscriptionDataSet":[],"unitMode":false}}]}}"#
    );
    let mut beat = RemotingCommand::request(RequestCode::HeartBeat.code(), Default::default())
        .with_body(body.into_bytes());
    beat.version = version;
    let resp = b.process(beat, &peer).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    // The group is told of its new member (NOTIFY_CONSUMER_IDS_CHANGED).
    while rx.try_recv().is_ok() {}
    (peer, rx)
}

/// SEND_REPLY_MESSAGE_V2 of a reply with `properties` to the cluster's reply topic.
fn reply_request(properties: &str) -> RemotingCommand {
    use crate::remoting::header::SendMessageRequestHeader;
    let h = SendMessageRequestHeader {
        producer_group: "R".into(),
        topic: "DefaultCluster_REPLY_TOPIC".into(),
        default_topic: Some("TBW102".into()),
        default_topic_queue_nums: Some(4),
        queue_id: Some(0),
        sys_flag: Some(0),
        born_timestamp: Some(7),
        flag: Some(3),
        properties: Some(properties.into()),
        ..Default::default()
    };
    RemotingCommand::request(RequestCode::SendReplyMessageV2.code(), h.to_v2())
        .with_body(Bytes::from_static(b"the answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_sent_names_the_cluster_that_stored_it() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    send_v2(b, "T", "a\u{1}1\u{2}".into(), None).await;
    let m = first_in(b, "T", 0);
    assert_eq!(m.properties, "a\u{1}1\u{2}CLUSTER\u{1}DefaultCluster\u{2}");
    // Another cluster's name (a message sent on from elsewhere) is overridden.
    send_v2_to(b, "T", 1, "CLUSTER\u{1}Other\u{2}".into(), None).await;
    let m = first_in(b, "T", 1);
    assert_eq!(m.properties_map()["CLUSTER"], "DefaultCluster");
    // Every message of a batch.
    let items: Vec<crate::store::message::BatchItem> = (0..2)
        .map(|i| crate::store::message::BatchItem {
            flag: 0,
            body: Bytes::from_static(b"b"),
            properties: format!("i\u{1}{i}\u{2}"),
        })
        .collect();
    let body = crate::store::message::encode_batch(&items);
    use crate::remoting::header::SendMessageRequestHeader;
    let hdr = SendMessageRequestHeader {
        producer_group: "P".into(),
        topic: "T".into(),
        queue_id: Some(2),
        batch: true,
        ..Default::default()
    };
    let req = RemotingCommand::request(RequestCode::SendBatchMessage.code(), hdr.to_ext())
        .with_body(body);
    let resp = b.process(req, &test_peer()).await.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    let q = b.store.queue("T", 2).unwrap();
    for e in q.get(0, 2).unwrap() {
        let m = b.store.commitlog().read_message(e.offset).unwrap();
        assert_eq!(m.properties_map()["CLUSTER"], "DefaultCluster");
    }
    // Replies go to the cluster's reply topic, which every master has and no one may change.
    let reply_topic = b.store.topics.get("DefaultCluster_REPLY_TOPIC").unwrap();
    assert_eq!(
        (reply_topic.read_queue_nums, reply_topic.write_queue_nums),
        (1, 1)
    );
    let change = RemotingCommand::request(
        RequestCode::UpdateAndCreateTopic.code(),
        crate::remoting::header::CreateTopicRequestHeader {
            topic: "DefaultCluster_REPLY_TOPIC".into(),
            read_queue_nums: 8,
            write_queue_nums: 8,
            perm: 6,
            ..Default::default()
        }
        .to_ext(),
    );
    let resp = b.process(change, &test_peer()).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    let delete =
        RemotingCommand::request(RequestCode::DeleteTopicInBroker.code(), Default::default())
            .with_ext("topic", "DefaultCluster_REPLY_TOPIC");
    let resp = b.process(delete, &test_peer()).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(b.store.topics.get("DefaultCluster_REPLY_TOPIC").is_some());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_pushed_to_the_producer_that_asked_and_stored() {
    use crate::remoting::header::{ReplyMessageRequestHeader, SendMessageResponseHeader};
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let (requester, mut pushed) = client_of(b, "10.0.0.9:5000", 400).await;
    let props = "CORRELATION_ID\u{1}c-1\u{2}REPLY_TO_CLIENT\u{1}10.0.0.9:5000@1\u{2}MSG_TYPE\u{1}reply\u{2}";
    let replier = Peer::detached("10.0.0.8:6000".parse().unwrap());
    let client = async {
        let push = pushed.recv().await.unwrap();
        assert_eq!(push.code, RequestCode::PushReplyMessageToClient.code());
        assert!(!push.is_oneway(), "a push the broker waits on");
        let hdr = ReplyMessageRequestHeader::from_ext(&push.ext_fields).unwrap();
        assert_eq!(hdr.topic, "DefaultCluster_REPLY_TOPIC");
        assert_eq!(hdr.producer_group, "R");
        assert_eq!((hdr.queue_id, hdr.flag, hdr.born_timestamp), (0, 3, 7));
        assert_eq!(hdr.born_host, "10.0.0.8:6000");
        let p = crate::store::message::parse_properties(hdr.properties.as_deref().unwrap());
        assert_eq!(p["CORRELATION_ID"], "c-1");
        assert!(p.contains_key("PUSH_REPLY_TIME"), "{p:?}");
        assert_eq!(&push.body[..], b"the answer");
        requester.answered(push.response_to(ResponseCode::Success));
    };
    let (resp, ()) = tokio::join!(b.process(reply_request(props), &replier), client);
    let resp = resp.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    // Stored too, and the answer says where.
    let stored = first_in(b, "DefaultCluster_REPLY_TOPIC", 0);
    assert_eq!(&stored.body[..], b"the answer");
    assert_eq!(stored.properties, props, "stored as the replier sent it");
    let hdr = SendMessageResponseHeader::from_ext(&resp.ext_fields).unwrap();
    assert_eq!(hdr.msg_id, stored.offset_msg_id());

    // A requester that does not take it, one that is gone, and a reply naming no one: not
    // delivered, said so, stored all the same.
    let client = async {
        let push = pushed.recv().await.unwrap();
        requester.answered(push.error_to(ResponseCode::SystemError, "process reply message fail"));
    };
    let (resp, ()) = tokio::join!(b.process(reply_request(props), &replier), client);
    let resp = resp.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(
        resp.remark
            .as_deref()
            .unwrap()
            .contains("process reply message fail"),
        "{:?}",
        resp.remark
    );
    let gone = props.replace("10.0.0.9:5000@1", "10.0.0.1:1@1");
    let resp = b.process(reply_request(&gone), &replier).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert_eq!(
        resp.remark.as_deref(),
        Some("push reply message fail, channel of <10.0.0.1:1@1> not found.")
    );
    let resp = b
        .process(reply_request("CORRELATION_ID\u{1}c-2\u{2}"), &replier)
        .await
        .unwrap();
    assert_eq!(
        resp.remark.as_deref(),
        Some("reply message properties[REPLY_TO_CLIENT] is null")
    );
    assert_eq!(stored_in(b, "DefaultCluster_REPLY_TOPIC", 0), 4);
    // The requester's connection closing ends a push waiting for it.
    drop(pushed);
    let resp = b.process(reply_request(props), &replier).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    h.stop().await;

    // storeReplyMessageEnable=false: pushed only.
    let dir = tempfile::tempdir().unwrap();
    let h = broker_with_t(BrokerConfig {
        store_reply_message: false,
        ..local_config(dir.path())
    })
    .await;
    let b = &h.broker;
    let (requester, mut pushed) = client_of(b, "10.0.0.9:5000", 400).await;
    let client = async {
        let push = pushed.recv().await.unwrap();
        requester.answered(push.response_to(ResponseCode::Success));
    };
    let (resp, ()) = tokio::join!(b.process(reply_request(props), &replier), client);
    let resp = resp.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    assert_eq!(resp.ext_fields.get("msgId"), Some("0"));
    assert_eq!(stored_in(b, "DefaultCluster_REPLY_TOPIC", 0), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_for_a_consumer_are_relayed_to_it_and_its_answer_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let b = &h.broker;
    let (consumer, mut pushed) = client_of(b, "10.0.0.9:5000", 400).await;
    let admin = Peer::detached("10.0.0.2:7000".parse().unwrap());
    let ask = |group: &str, client: &str| {
        let mut r = RemotingCommand::request(
            RequestCode::GetConsumerRunningInfo.code(),
            Default::default(),
        )
        .with_ext("consumerGroup", group)
        .with_ext("clientId", client)
        .with_ext("jstackEnable", "false");
        r.opaque = 77;
        r
    };
    let client = async {
        let call = pushed.recv().await.unwrap();
        assert_eq!(call.code, RequestCode::GetConsumerRunningInfo.code());
        assert_eq!(call.ext_fields.get("jstackEnable"), Some("false"));
        consumer.answered(
            call.response_to(ResponseCode::Success)
                .with_body(&b"{\"properties\":{}}"[..]),
        );
    };
    let (resp, ()) = tokio::join!(b.process(ask("G", "10.0.0.9:5000@1"), &admin), client);
    let resp = resp.unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{:?}", resp.remark);
    assert_eq!((resp.opaque, resp.is_response()), (77, true));
    assert_eq!(&resp.body[..], b"{\"properties\":{}}");

    let resp = b.process(ask("G", "nobody@1"), &admin).await.unwrap();
    assert_eq!(
        resp.remark.as_deref(),
        Some("The Consumer <G> <nobody@1> not online")
    );
    // A client too old to answer (before 3.1.8) is not asked.
    let (_old, _old_rx) = client_of(b, "10.0.0.10:5000", 61).await;
    while pushed.try_recv().is_ok() {} // told of the newcomer
    let resp = b
        .process(ask("G", "10.0.0.10:5000@1"), &admin)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(resp.remark.unwrap().contains("too low"));

    // CONSUME_MESSAGE_DIRECTLY: the client gets the message as stored and this broker's name.
    send_v2(b, "T", String::new(), None).await;
    let stored = first_in(b, "T", 0);
    let direct = RemotingCommand::request(
        RequestCode::ConsumeMessageDirectly.code(),
        Default::default(),
    )
    .with_ext("consumerGroup", "G")
    .with_ext("clientId", "10.0.0.9:5000@1")
    .with_ext("msgId", stored.offset_msg_id());
    let client = async {
        let call = pushed.recv().await.unwrap();
        assert_eq!(call.ext_fields.get("brokerName"), Some("broker-a"));
        let m = crate::store::message::parse_stored(&call.body).unwrap();
        assert_eq!(m.physical_offset, stored.physical_offset);
        consumer.answered(call.response_to(ResponseCode::Success));
    };
    let (resp, ()) = tokio::join!(b.process(direct.clone(), &admin), client);
    assert_eq!(resp.unwrap().code, ResponseCode::Success.code());
    let unknown = direct.with_ext("msgId", "nonsense");
    let resp = b.process(unknown, &admin).await.unwrap();
    assert_eq!(resp.code, ResponseCode::SystemError.code());
    assert!(resp.remark.unwrap().contains("nonsense"));
    // A client that does not answer: CONSUME_MSG_TIMEOUT once the wait is over.
    let resp = b
        .process(ask("G", "10.0.0.9:5000@1"), &admin)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::ConsumeMsgTimeout.code());
    assert!(
        resp.remark
            .as_deref()
            .unwrap()
            .starts_with("consumer <G> <10.0.0.9:5000@1> Timeout"),
        "{:?}",
        resp.remark
    );
    // Nor is one whose connection is gone asked.
    drop(pushed);
    let resp = b
        .process(ask("G", "10.0.0.9:5000@1"), &admin)
        .await
        .unwrap();
    assert!(resp.remark.unwrap().contains("not online"));
    h.stop().await;

    // A slave takes no reply (clients send them to masters).
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::Slave).await;
    let resp = h
        .broker
        .process(reply_request("REPLY_TO_CLIENT\u{1}x@1\u{2}"), &admin)
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::ServiceNotAvailable.code());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transactions_timer_runs_from_the_commit() {
    use crate::store::message::TIMER_TOPIC;
    let dir = tempfile::tempdir().unwrap();
    let h = tx_broker(dir.path(), 3_600_000, 15).await;
    let b = &h.broker;
    // Checked when sent: one too far ahead is refused at once.
    let far = format!("{}TIMER_DELAY_SEC\u{1}999999\u{2}", half_properties("F"));
    let resp = send_v2_to(b, "T", 0, far, None).await;
    assert_eq!(resp.code, ResponseCode::MessageIllegal.code(), "{resp:?}");
    let timed = format!("{}TIMER_DELAY_SEC\u{1}60\u{2}", half_properties("A"));
    let sent = send_v2_to(b, "T", 0, timed, None).await;
    assert_eq!(sent.code, ResponseCode::Success.code(), "{sent:?}");
    assert_eq!(stored_in(b, TIMER_TOPIC, 0), 0, "timed before its commit");
    // Committed 1.5 s later: timed from the send, it would be due 1.5 s earlier.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = crate::store::topics::now_ms();
    let resp = b
        .process(answered(end_transaction("P", &sent, 8)), &test_peer())
        .await
        .unwrap();
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(stored_in(b, "T", 0), 0, "delivered before its time");
    let m = first_in(b, TIMER_TOPIC, 0);
    let props = m.properties_map();
    let out: i64 = props["TIMER_OUT_MS"].parse().unwrap();
    assert!(
        out >= before + 59_000,
        "timed from the send, not the commit: {out} {before}"
    );
    assert_eq!(props["REAL_TOPIC"], "T");
    h.stop().await;
}

/// UPDATE_BROKER_CONFIG carrying `body`.
async fn update_config(b: &Broker, body: &str) -> RemotingCommand {
    let req = RemotingCommand::request(RequestCode::UpdateBrokerConfig.code(), Default::default())
        .with_body(Bytes::from(body.to_string()));
    b.process(req, &test_peer()).await.unwrap()
}

/// The union of the permissions a name server's route for `topic` gives, once it is `want`
/// (or what it last was after 5 s).
async fn route_perm(client: &crate::client::Client, topic: &str, want: i32) -> i32 {
    let mut perm = -1;
    for _ in 0..200 {
        // Not routed yet: the broker registers it at its next round.
        if let Ok(route) = client.refresh_route(topic).await {
            perm = route.queue_datas.iter().fold(0, |p, q| p | q.perm);
        }
        if perm == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    perm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_change_while_the_broker_runs_and_are_saved_to_its_broker_conf() {
    let dir = tempfile::tempdir().unwrap();
    let ns = name_server_at("127.0.0.1:0".parse().unwrap()).await;
    let conf = dir.path().join("broker.conf");
    std::fs::write(&conf, "# kept\nmaxMessageSize = 4194304\n").unwrap();
    let cfg = BrokerConfig {
        namesrv_addrs: vec![ns.addr.to_string()],
        config_file: Some(conf.clone()),
        ..local_config(dir.path())
    };
    let h = broker_with_t(cfg).await;
    let b = &h.broker;
    let ok = send_v2(b, "T", String::new(), None).await;
    assert_eq!(ok.code, ResponseCode::Success.code(), "{ok:?}");

    // A smaller maxMessageSize refuses the body it took a moment ago.
    let resp = update_config(b, "maxMessageSize=3\nfileReservedTime=24\n").await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(resp.remark, None);
    let refused = send_v2(b, "T", String::new(), None).await;
    assert_eq!(
        refused.code,
        ResponseCode::MessageIllegal.code(),
        "{refused:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "# kept\nmaxMessageSize=3\nfileReservedTime=24\n"
    );
    let req = RemotingCommand::request(RequestCode::GetBrokerConfig.code(), Default::default());
    let shown = b.process(req, &test_peer()).await.unwrap();
    let shown = String::from_utf8(shown.body.to_vec()).unwrap();
    assert!(shown.contains("maxMessageSize=3\n") && shown.contains("fileReservedTime=24\n"));

    // Refused whole, nothing changed: a setting read only at start, an unknown key, a bad
    // value, settings that contradict each other.
    for (body, says) in [
        (
            "maxMessageSize=1000\nbrokerRole=SLAVE\n",
            "`brokerRole` is read only when the broker starts",
        ),
        (
            "maxMessageSize=1000\nnoSuchKey=1\n",
            "unknown key `noSuchKey`",
        ),
        (
            "maxMessageSize=1000\nfileReservedTime=soon\n",
            "fileReservedTime",
        ),
        ("maxMessageSize=2000000000\n", "mappedFileSizeCommitLog"),
        ("", "no setting"),
    ] {
        let resp = update_config(b, body).await;
        assert_eq!(
            resp.code,
            ResponseCode::SystemError.code(),
            "{body}: {resp:?}"
        );
        let remark = resp.remark.unwrap_or_default();
        assert!(remark.contains(says), "{body}: {remark}");
    }
    assert_eq!(b.cfg().max_message_size, 3);
    assert!(std::fs::read_to_string(&conf)
        .unwrap()
        .contains("maxMessageSize=3\n"));
    update_config(b, "maxMessageSize=4194304").await;

    // brokerPermission: routes stop offering the broker for sends at once, sends are
    // refused, and both come back.
    let client = crate::client::Client::new(vec![ns.addr.to_string()]);
    b.topics_changed.notify_one();
    let rw = PERM_READ | PERM_WRITE;
    assert_eq!(route_perm(&client, "T", rw).await, rw);
    let resp = update_config(b, "brokerPermission=4").await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    assert_eq!(route_perm(&client, "T", PERM_READ).await, PERM_READ);
    let refused = send_v2(b, "T", String::new(), None).await;
    assert_eq!(
        refused.code,
        ResponseCode::NoPermission.code(),
        "{refused:?}"
    );
    // Each change reaches the name server, not only the first away from read-write.
    update_config(b, "brokerPermission=2").await;
    assert_eq!(route_perm(&client, "T", PERM_WRITE).await, PERM_WRITE);
    update_config(b, "brokerPermission=6").await;
    assert_eq!(route_perm(&client, "T", rw).await, rw);
    let ok = send_v2(b, "T", String::new(), None).await;
    assert_eq!(ok.code, ResponseCode::Success.code(), "{ok:?}");
    h.stop().await;
    ns.stop().await;

    // A restart reads what was saved.
    let again = BrokerConfig::load(&conf).unwrap();
    assert_eq!(again.file_reserved_hours, 24);
    assert_eq!(again.permission, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_cannot_be_saved_is_applied_and_the_answer_says_it_will_not_last() {
    let dir = tempfile::tempdir().unwrap();
    let h = lone_broker(dir.path(), BrokerRole::AsyncMaster).await;
    let resp = update_config(&h.broker, "timerWheelEnable=false").await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let remark = resp.remark.unwrap_or_default();
    assert!(
        remark.contains("only until the broker restarts"),
        "{remark}"
    );
    assert!(!h.broker.cfg().timer.enabled);
    h.stop().await;

    // A broker.conf gone for a moment (a full disk, say): the next update saves both.
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let conf = etc.join("broker.conf");
    std::fs::write(&conf, "brokerName=broker-a\n").unwrap();
    let cfg = BrokerConfig {
        config_file: Some(conf.clone()),
        ..local_config(dir.path())
    };
    let h = broker_with_t(cfg).await;
    let away = dir.path().join("away");
    std::fs::rename(&etc, &away).unwrap();
    let resp = update_config(&h.broker, "timerWheelEnable=false").await;
    assert!(resp
        .remark
        .unwrap_or_default()
        .contains("only until the broker restarts"));
    std::fs::rename(&away, &etc).unwrap();
    let resp = update_config(&h.broker, "timerWheelEnable=false\nfileReservedTime=12").await;
    assert_eq!(resp.remark, None, "{resp:?}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "brokerName=broker-a\ntimerWheelEnable=false\nfileReservedTime=12\n"
    );
    h.stop().await;
}

#[tokio::test]
async fn name_servers_are_reached_on_ipv6_when_they_have_no_ipv4_address() {
    let one = |e: &str| vec![e.to_string()];
    assert_eq!(resolve_all(&one("[::1]:9876")).await, one("[::1]:9876"));
    assert_eq!(
        resolve_all(&one("127.0.0.1:9876")).await,
        one("127.0.0.1:9876")
    );
    // A name of both families is called once, on IPv4.
    let local = resolve_all(&one("localhost:9876")).await;
    assert!(local.contains(&"127.0.0.1:9876".to_string()), "{local:?}");
    assert!(!local.iter().any(|a| a.starts_with('[')), "{local:?}");
    // A broker on an IPv6 address prefers that family, when the name has it.
    let v6 = resolve_preferring(&one("localhost:9876"), true).await;
    if local.len()
        < std::net::ToSocketAddrs::to_socket_addrs("localhost:9876")
            .unwrap()
            .count()
    {
        assert_eq!(v6, one("[::1]:9876"));
    }
    assert_eq!(
        resolve_preferring(&one("127.0.0.1:9876"), true).await,
        one("127.0.0.1:9876")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_turned_off_refuse_new_timer_messages_and_deliver_those_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let h = broker_with_t(local_config(dir.path())).await;
    let b = &h.broker;
    let timed = "TIMER_DELAY_MS\u{1}1500\u{2}".to_string();
    let resp = send_v2(b, "T", timed.clone(), None).await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let resp = update_config(b, "timerWheelEnable=false").await;
    assert_eq!(resp.code, ResponseCode::Success.code(), "{resp:?}");
    let refused = send_v2(b, "T", timed, None).await;
    assert_eq!(
        refused.code,
        ResponseCode::SystemError.code(),
        "{refused:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stored_in(b, "T", 0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting one was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}
