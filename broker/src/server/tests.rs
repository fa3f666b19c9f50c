//! The broker assembled in-process: what shows only once its parts are wired together.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::remoting::ext::ExtFields;
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
    let ns = crate::nameserver::start(crate::nameserver::NameServerConfig {
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
    let h = start(cfg).await.unwrap();
    let mut answer = String::new();
    for _ in 0..200 {
        answer = get(h.http_addr, "/readyz").await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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
    let resp = h.broker.put_and_respond(&req, vec![message()], false).await;
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
