//! Store behaviour: appends across segments, reads with filters, crash recovery of torn tails
//! and lost consume queues, group commit.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use super::message::{format_properties, tag_hash, NewMessage, Properties, PROP_TAGS};
use super::*;

fn cfg(root: &Path, flush: FlushDiskType) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        segment_size: 64 * 1024,
        flush,
        flush_interval_ms: 20,
        flush_least_pages: 4,
        flush_thorough_interval_ms: 100,
        sync_flush_timeout_ms: 5_000,
        file_reserved_hours: 72,
        store_host: "127.0.0.1:10911".parse().unwrap(),
    }
}

fn msg(topic: &str, q: i32, seq: u64, tag: &str) -> NewMessage {
    let mut p = Properties::new();
    p.insert(PROP_TAGS.into(), tag.into());
    NewMessage {
        topic: topic.into(),
        queue_id: q,
        flag: 0,
        body: Bytes::from(format!("{seq:08}{}", "b".repeat(300))),
        properties: format_properties(&p),
        sys_flag: 0,
        born_timestamp: 1,
        born_host: "10.0.0.1:1".parse::<SocketAddr>().unwrap(),
        reconsume_times: 0,
        tags_code: tag_hash(tag),
    }
}

fn fill(store: &MessageStore, n: u64) -> Vec<PutResult> {
    (0..n)
        .map(|i| {
            store
                .append(&[msg(
                    "T",
                    (i % 2) as i32,
                    i,
                    if i % 3 == 0 { "A" } else { "B" },
                )])
                .unwrap()
                .remove(0)
        })
        .collect()
}

#[test]
fn appends_roll_over_segments_and_read_back_in_queue_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let results = fill(&store, 1000);
    assert!(
        store.commitlog().max_offset() > 4 * 64 * 1024,
        "should span several segments"
    );
    // Queue offsets are dense per queue.
    let q0: Vec<u64> = results
        .iter()
        .filter(|r| r.queue_id == 0)
        .map(|r| r.queue_offset)
        .collect();
    assert_eq!(q0, (0..500).collect::<Vec<_>>());
    let got = store.get("T", 0, 0, 1000, usize::MAX, |_| true).unwrap();
    assert_eq!(got.count, 500);
    let msgs = crate::client::decode_messages(&got.body).unwrap();
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.queue_offset, i as i64);
        assert_eq!(&m.body[..8], format!("{:08}", i * 2).as_bytes());
    }
    store.shutdown();
}

#[test]
fn tag_filter_skips_unmatched_messages_and_advances() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 60);
    let a = tag_hash("A");
    let got = store.get("T", 0, 0, 100, usize::MAX, |c| c == a).unwrap();
    let msgs = crate::client::decode_messages(&got.body).unwrap();
    assert!(msgs.iter().all(|m| m.properties_map()[PROP_TAGS] == "A"));
    assert_eq!(got.next_offset, 30);
    let none = store.get("T", 0, 0, 100, usize::MAX, |_| false).unwrap();
    assert_eq!(none.status, GetStatus::NoMatchedMessage);
    assert!(none.next_offset > 0);
    store.shutdown();
}

#[test]
fn out_of_range_offsets_report_where_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    assert_eq!(
        store
            .get("T", 0, 5, 10, usize::MAX, |_| true)
            .unwrap()
            .status,
        GetStatus::NoNewMessage
    );
    let over = store.get("T", 0, 99, 10, usize::MAX, |_| true).unwrap();
    assert_eq!(
        (over.status, over.next_offset),
        (GetStatus::OffsetOverflow, 5)
    );
    assert_eq!(
        store
            .get("X", 0, 0, 10, usize::MAX, |_| true)
            .unwrap()
            .status,
        GetStatus::NoMessageInQueue
    );
    store.shutdown();
}

#[test]
fn clean_restart_keeps_everything_without_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 300);
    let end = store.commitlog().max_offset();
    store.shutdown();
    drop(store);
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(
        store.recovery.messages, 0,
        "a clean restart must not rescan the log"
    );
    assert_eq!(store.commitlog().max_offset(), end);
    assert_eq!(store.queue("T", 1).unwrap().max_offset(), 150);
    store.shutdown();
}

#[test]
fn torn_tail_is_truncated_and_lost_queue_entries_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Sync)).unwrap();
    let results = fill(&store, 100);
    let end = store.commitlog().max_offset();
    // Simulate a crash: no clean checkpoint, a half-written message after the end, and
    // consume queues that never reached the disk.
    std::mem::forget(store);
    let checkpoint = dir.path().join("checkpoint");
    std::fs::write(
        &checkpoint,
        br#"{"consistentOffset":0,"cleanShutdown":false}"#,
    )
    .unwrap();
    let seg_base = end - end % (64 * 1024);
    let seg = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("commitlog").join(format!("{seg_base:020}")))
        .unwrap();
    let mut torn = Vec::new();
    torn.extend_from_slice(&400i32.to_be_bytes());
    torn.extend_from_slice(&super::message::MAGIC_V1.to_be_bytes());
    torn.extend_from_slice(&[0xAB; 100]);
    seg.write_all_at(&torn, end - seg_base).unwrap();
    drop(seg);
    std::fs::remove_dir_all(dir.path().join("consumequeue").join("T")).unwrap();

    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Sync)).unwrap();
    assert_eq!(
        store.commitlog().max_offset(),
        end,
        "the torn message must be cut off"
    );
    assert_eq!(store.recovery.messages, 100);
    assert!(store.recovery.truncated_bytes > 0);
    assert_eq!(store.queue("T", 0).unwrap().max_offset(), 50);
    let got = store.get("T", 1, 0, 100, usize::MAX, |_| true).unwrap();
    let msgs = crate::client::decode_messages(&got.body).unwrap();
    assert_eq!(msgs.len(), 50);
    assert_eq!(msgs[49].physical_offset as u64, results[99].physical_offset);
    // New appends continue right after the last valid message.
    let r = store.append(&[msg("T", 0, 1000, "A")]).unwrap();
    assert_eq!((r[0].physical_offset, r[0].queue_offset), (end, 50));
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_flush_acknowledges_only_durable_data_and_batches_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Sync)).unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = store.clone();
        tasks.push(tokio::spawn(
            async move { s.put(&[msg("T", 0, i, "A")]).await },
        ));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(store.commitlog().flushed_offset() >= r[0].end);
    }
    store.shutdown();
}

#[test]
fn search_by_timestamp_finds_the_first_message_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    let t = store.earliest_time("T", 0).unwrap().unwrap();
    assert_eq!(store.search_offset("T", 0, t).unwrap(), 0);
    assert_eq!(store.search_offset("T", 0, i64::MAX).unwrap(), 5);
    store.shutdown();
}

#[test]
fn oversized_batch_is_refused_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let big: Vec<NewMessage> = (0..400).map(|i| msg("T", 0, i, "A")).collect();
    assert!(matches!(
        store.append(&big),
        Err(StoreError::MessageTooLarge { .. })
    ));
    assert_eq!(store.commitlog().max_offset(), 0);
    store.shutdown();
}
