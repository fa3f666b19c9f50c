//! Store behaviour: appends across segments, reads with filters, crash recovery of torn tails
//! and lost consume queues, group commit.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use super::message::{format_properties, tag_hash, NewMessage, Properties, PROP_TAGS};
use super::*;

fn cfg(root: &Path, flush: FlushDiskType) -> StoreConfig {
    StoreConfig::for_tests(root, flush)
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
fn a_store_another_broker_has_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    let end = store.commitlog().max_offset();
    match MessageStore::open(cfg(dir.path(), FlushDiskType::Async)) {
        Err(e @ StoreError::Locked(_)) => {
            assert!(e.to_string().contains("storePathRootDir"), "{e}")
        }
        other => panic!("a second store opened over the first: {other:?}"),
    }
    assert_eq!(store.commitlog().max_offset(), end);
    store.shutdown();
    drop(store);
    // Closed, the store is free again.
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.commitlog().max_offset(), end);
    store.shutdown();
}

#[test]
fn a_store_time_read_from_the_header_alone_is_the_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let mut v6 = msg("T", 0, 2, "A");
    v6.born_host = "[2001:db8::1]:9".parse().unwrap();
    let stored = store.append(&[msg("T", 0, 1, "A"), v6]).unwrap();
    for r in &stored {
        let whole = store.commitlog().read_message(r.physical_offset).unwrap();
        assert_eq!(
            store
                .commitlog()
                .read_store_timestamp(r.physical_offset)
                .unwrap(),
            whole.store_timestamp
        );
    }
    store.shutdown();
}

#[test]
fn a_full_disk_refuses_appends_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let used = store.measure_disk().unwrap();
    assert!((0.0..=1.0).contains(&used), "{used}");
    store.record_disk_usage(0.95);
    let end = store.commitlog().max_offset();
    match store.append(&[msg("T", 0, 1, "A")]) {
        Err(StoreError::DiskFull(u)) => assert!(u > 0.9),
        other => panic!("appended to a full disk: {other:?}"),
    }
    assert_eq!(store.commitlog().max_offset(), end);
    store.record_disk_usage(0.5);
    assert!(store.append(&[msg("T", 0, 1, "A")]).is_ok());
    store.shutdown();
}

#[test]
fn a_queue_write_failing_after_the_log_took_the_message_stops_the_store_until_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    store.queue("T", 0).unwrap().break_writes();
    // Queue entries are written out in blocks: sends go on until one fills.
    let mut sent = 10;
    let why = loop {
        let end = store.commitlog().max_offset();
        match store.append(&[msg("T", 0, sent, "A")]) {
            Ok(_) => sent += 1,
            Err(StoreError::WriteBackFailed(why)) => {
                assert!(
                    store.commitlog().max_offset() > end,
                    "the failing send's message should be in the log"
                );
                break why;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 1_000, "the broken queue was never written");
    };
    assert!(why.contains("consume queue T/0"), "{why}");
    // No other queue takes a message either: the log and the queues would drift apart.
    let end = store.commitlog().max_offset();
    assert!(matches!(
        store.append(&[msg("T", 1, 0, "A")]),
        Err(StoreError::WriteBackFailed(_))
    ));
    assert_eq!(store.commitlog().max_offset(), end);
    // What the log took is still made durable (a SYNC_FLUSH send of an earlier group waits
    // for it, and acknowledged ASYNC_FLUSH data should reach the disk).
    assert_eq!(store.commitlog().flush().unwrap(), end);
    store.shutdown();
    drop(store);
    // The restart recovers from the last checkpoint: every message the log holds is in its
    // queue once, the unacknowledged one too, and no queue offset is handed out twice.
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let q0 = (0..10).filter(|i| i % 2 == 0).count() as u64 + (sent + 1 - 10);
    assert_eq!(store.queue("T", 0).unwrap().max_offset(), q0);
    let got = store.get("T", 0, 0, 10_000, usize::MAX, |_| true).unwrap();
    let msgs = crate::client::decode_messages(&got.body).unwrap();
    assert_eq!(msgs.len() as u64, q0);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.queue_offset, i as i64);
    }
    assert_eq!(
        &msgs.last().unwrap().body[..8],
        format!("{sent:08}").as_bytes()
    );
    let next = store.append(&[msg("T", 0, 0, "A")]).unwrap();
    assert_eq!(next[0].queue_offset, q0);
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

/// Flips a byte at commit-log offset `at` in the segment files under `root`.
fn damage_log(root: &Path, segment: u64, at: u64) {
    let base = at - at % segment;
    let path = root.join("commitlog").join(format!("{base:020}"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at - base).unwrap();
    f.write_all_at(&[b[0] ^ 0xFF], at - base).unwrap();
}

#[test]
fn a_rebuild_passes_over_old_damage_instead_of_cutting_the_log_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let sent = fill(&store, 600);
    let (end, segment) = (
        store.commitlog().max_offset(),
        store.commitlog().segment_size(),
    );
    assert!(end > 2 * segment, "the test wants several segments: {end}");
    store.shutdown();
    drop(store);
    // Message 10's body is damaged (its CRC fails), in the first segment.
    damage_log(
        dir.path(),
        segment,
        sent[10].physical_offset + u64::from(sent[10].size) - 5,
    );
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.commitlog().max_offset(), end, "the log was cut");
    assert_eq!((store.recovery.messages, store.recovery.skipped), (599, 1));
    assert_eq!(store.queue("T", 0).unwrap().max_offset(), 300);
    store.shutdown();
    drop(store);
    // A header damaged so that no message can be found after it: nothing is cut, the store
    // refuses to open and says where.
    damage_log(dir.path(), segment, sent[20].physical_offset);
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let Err(err) = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)) else {
        panic!("opened over damage it would have cut at");
    };
    assert!(
        err.to_string()
            .contains(&sent[20].physical_offset.to_string()),
        "{err}"
    );
    // The segments are all still there.
    let segments = std::fs::read_dir(dir.path().join("commitlog"))
        .unwrap()
        .count() as u64;
    assert!(segments >= end.div_ceil(segment), "{segments} segments");
}

#[test]
fn a_damaged_checkpoint_means_a_full_recovery_not_a_refusal_to_start() {
    for damage in ["", "{\"consistentOff", "\u{0}\u{0}\u{0}"] {
        let dir = tempfile::tempdir().unwrap();
        let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
        fill(&store, 100);
        store.shutdown();
        drop(store);
        std::fs::write(dir.path().join("checkpoint"), damage).unwrap();
        let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
        assert_eq!(store.recovery.messages, 100, "{damage:?}");
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 50);
        store.shutdown();
    }
}

#[test]
fn deleted_consume_queues_are_rebuilt_and_their_offsets_not_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 300);
    store.shutdown();
    drop(store);
    // An operator deletes the queues to have them rebuilt, as with Java's broker.
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.recovery.messages, 300);
    for q in 0..2 {
        assert_eq!(store.queue("T", q).unwrap().max_offset(), 150);
    }
    let next = store.append(&[msg("T", 0, 300, "A")]).unwrap();
    assert_eq!(next[0].queue_offset, 150);
    store.shutdown();
    drop(store);
    // A clean restart after that reads nothing again.
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.recovery.messages, 0);
    store.shutdown();
}

#[test]
fn entries_rebuilt_by_recovery_survive_a_crash_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let unclean = || {
        std::fs::write(
            dir.path().join("checkpoint"),
            br#"{"consistentOffset":0,"cleanShutdown":false}"#,
        )
        .unwrap()
    };
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 100);
    store.crash();
    drop(store);
    unclean();
    std::fs::remove_dir_all(dir.path().join("consumequeue").join("T")).unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.recovery.messages, 100);
    // Killed again before any checkpoint of its own: the start's checkpoint covers the
    // rebuilt entries, so they must already be on disk.
    store.crash();
    drop(store);
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    for q in 0..2 {
        assert_eq!(store.queue("T", q).unwrap().max_offset(), 50, "queue {q}");
    }
    store.shutdown();
}

/// The checkpoint file's content.
fn checkpoint_of(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("checkpoint")).unwrap()).unwrap()
}

/// Waits up to 10 s for a checkpoint at `end`.
fn wait_checkpoint(dir: &Path, end: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while checkpoint_of(dir)["consistentOffset"] != end {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint at {end}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn after_a_failed_sync_for_a_checkpoint_no_later_one_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    let end = store.commitlog().max_offset();
    wait_checkpoint(dir.path(), end);
    // A new queue whose topic directory cannot be synced: the next checkpoint's sync fails.
    store.append(&[msg("New", 0, 1, "A")]).unwrap();
    let away = dir.path().join("away");
    std::fs::rename(dir.path().join("consumequeue").join("New"), &away).unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    // Tried again, it would succeed now; none may be tried, not even at a clean stop.
    std::fs::rename(&away, dir.path().join("consumequeue").join("New")).unwrap();
    fill(&store, 10);
    std::thread::sleep(Duration::from_millis(2_500));
    store.shutdown();
    assert_eq!(checkpoint_of(dir.path())["consistentOffset"], end);
    assert_eq!(checkpoint_of(dir.path())["cleanShutdown"], false);
}

#[test]
fn a_checkpoint_file_that_could_not_be_written_is_written_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 10);
    let end = store.commitlog().max_offset();
    wait_checkpoint(dir.path(), end);
    // The next checkpoint file cannot be written (its temporary file cannot be made, as on
    // a full disk); the data it counts is synced, so it is only tried again.
    let blocker = dir.path().join("checkpoint.tmp");
    std::fs::create_dir(&blocker).unwrap();
    fill(&store, 10);
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(checkpoint_of(dir.path())["consistentOffset"], end);
    std::fs::remove_dir(&blocker).unwrap();
    let later = store.commitlog().max_offset();
    wait_checkpoint(dir.path(), later);
    store.shutdown();
    assert_eq!(checkpoint_of(dir.path())["cleanShutdown"], true);
}

#[test]
fn recovery_reads_the_log_past_the_checkpoint_from_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    // Bytes this thread had read from a disk. After a failed write-back the page cache can
    // hold what the disk does not: recovery must not trust it.
    let disk_reads = || -> Option<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        let line = io.lines().find(|l| l.starts_with("read_bytes:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let fs = file_system(dir.path());
    // Where there is no disk behind the files (tmpfs) or reads are not counted, nothing shows.
    // Not btrfs: with compression it counts compressed bytes read.
    let on_disk = matches!(fs.as_deref(), Some("ext2/ext3" | "xfs"));
    if !on_disk || disk_reads().is_none() {
        eprintln!("skipped: {fs:?} or /proc/thread-self/io cannot show reads from a disk");
        return;
    }
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 2_000);
    let end = store.commitlog().max_offset();
    // On the disk, and still in the page cache.
    store.commitlog().flush().unwrap();
    store.crash();
    drop(store);
    std::fs::write(
        dir.path().join("checkpoint"),
        br#"{"consistentOffset":0,"cleanShutdown":false}"#,
    )
    .unwrap();

    let before = disk_reads().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let read = disk_reads().unwrap() - before;
    assert_eq!(store.recovery.messages, 2_000);
    assert_eq!(store.commitlog().max_offset(), end);
    assert!(
        read >= end,
        "recovery read {read} bytes from the disk for a log of {end}: the rest came from the page cache"
    );
    store.shutdown();
}

#[test]
fn torn_tail_is_truncated_and_lost_queue_entries_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    // Without zeroes prepared ahead, by this store or the recovering one: they would fill the
    // hole this test needs, and zero the stale bytes whether or not recovery does.
    let no_zeroes = |flush| StoreConfig {
        prepare_ahead: false,
        ..cfg(dir.path(), flush)
    };
    let store = MessageStore::open(no_zeroes(FlushDiskType::Async)).unwrap();
    let results = fill(&store, 100);
    let end = store.commitlog().max_offset();
    // Simulate a crash: no clean checkpoint, a half-written message after the end, and
    // consume queues that never reached the disk.
    store.crash();
    drop(store);
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
    // Stale bytes further on, past a hole of the sparse segment file, must go too.
    let far = 60 * 1024;
    assert!(
        end - seg_base + 8 * 1024 < far,
        "a hole must separate the two"
    );
    seg.write_all_at(&[0xCD; 256], far).unwrap();
    drop(seg);
    std::fs::remove_dir_all(dir.path().join("consumequeue").join("T")).unwrap();

    let store = MessageStore::open(no_zeroes(FlushDiskType::Sync)).unwrap();
    assert_eq!(
        store.commitlog().max_offset(),
        end,
        "the torn message must be cut off"
    );
    assert_eq!(store.recovery.messages, 100);
    assert!(store.recovery.truncated_bytes >= 256 + 100);
    let mut stale = [0xFFu8; 256];
    std::fs::File::open(dir.path().join("commitlog").join(format!("{seg_base:020}")))
        .unwrap()
        .read_exact_at(&mut stale, far)
        .unwrap();
    assert_eq!(stale, [0u8; 256], "stale bytes past the hole are zeroed");
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
    assert_eq!(store.search_offset("T", 0, t, Boundary::Lower).unwrap(), 0);
    assert_eq!(
        store
            .search_offset("T", 0, i64::MAX, Boundary::Lower)
            .unwrap(),
        5
    );
    store.shutdown();
}

#[test]
fn search_by_timestamp_upper_finds_the_last_message_at_or_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // Queue offsets 0 and 1 stored at one time, 2 and 3 at a later one.
    let mut times = Vec::new();
    for pair in 0..2 {
        let stored = store
            .append(&[msg("T", 0, pair * 2, "A"), msg("T", 0, pair * 2 + 1, "A")])
            .unwrap();
        let m = store
            .commitlog()
            .read_message(stored[0].physical_offset)
            .unwrap();
        times.push(m.store_timestamp);
        std::thread::sleep(Duration::from_millis(5));
    }
    let (t1, t2) = (times[0], times[1]);
    let search = |t, b| store.search_offset("T", 0, t, b).unwrap();
    assert_eq!(search(t1 - 1, Boundary::Upper), 0, "none before: the first");
    assert_eq!(search(t1, Boundary::Upper), 1);
    assert_eq!(search(t1 + 1, Boundary::Upper), 1);
    assert_eq!(search(t2, Boundary::Upper), 3);
    assert_eq!(search(i64::MAX, Boundary::Upper), 3);
    assert_eq!(search(t1 + 1, Boundary::Lower), 2);
    assert_eq!(search(t1, Boundary::Lower), 0);
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

/// Each send's results are contiguous, and queue offsets are dense and unique.
fn check_sends(sends: &[Vec<PutResult>]) {
    for r in sends {
        for w in r.windows(2) {
            assert_eq!(
                w[1].physical_offset, w[0].end,
                "a send's messages are contiguous"
            );
        }
    }
    for q in 0..2 {
        let mut offs: Vec<u64> = sends
            .iter()
            .flatten()
            .filter(|r| r.queue_id == q)
            .map(|r| r.queue_offset)
            .collect();
        offs.sort_unstable();
        assert_eq!(offs, (0..offs.len() as u64).collect::<Vec<_>>());
    }
}

#[test]
fn one_write_carries_several_sends_across_a_segment_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // 300 sends of about 400 bytes: the 64 KiB segment fills and the group rolls over.
    let sends: Vec<Vec<NewMessage>> = (0..300)
        .map(|i| vec![msg("T", (i % 2) as i32, i, "A")])
        .collect();
    let mut batches: Vec<&[NewMessage]> = sends.iter().map(|s| &s[..]).collect();
    // A send too large for a segment fails alone, in the middle of the group.
    let big: Vec<NewMessage> = (0..400).map(|i| msg("T", 0, i, "A")).collect();
    batches.insert(150, &big);
    let results = store.append_many(&batches);
    assert!(matches!(
        results[150],
        Err(StoreError::MessageTooLarge { .. })
    ));
    let ok: Vec<Vec<PutResult>> = results.into_iter().filter_map(Result::ok).collect();
    assert_eq!(ok.len(), 300);
    check_sends(&ok);
    assert!(
        ok.last().unwrap()[0].physical_offset >= 64 * 1024,
        "crossed into segment 2"
    );
    let got = store.get("T", 0, 0, 1000, usize::MAX, |_| true).unwrap();
    let msgs = crate::client::decode_messages(&got.body).unwrap();
    assert_eq!(msgs.len(), 150);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(&m.body[..8], format!("{:08}", i * 2).as_bytes());
    }
    store.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grouped_sends_land_whole_and_in_queue_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let tasks: Vec<_> = (0..400u64)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                let n = 1 + i % 3;
                let batch = (0..n)
                    .map(|j| msg("T", (i % 2) as i32, i * 10 + j, "A"))
                    .collect();
                s.append_grouped(batch, true).await
            })
        })
        .collect();
    let mut sends = Vec::new();
    for t in tasks {
        sends.push(t.await.unwrap().unwrap());
    }
    check_sends(&sends);
    // Every acknowledged message is readable at its queue offset.
    for r in sends.iter().flatten() {
        let got = store
            .get("T", r.queue_id, r.queue_offset, 1, usize::MAX, |_| true)
            .unwrap();
        let m = &crate::client::decode_messages(&got.body).unwrap()[0];
        assert_eq!(m.physical_offset as u64, r.physical_offset);
    }
    store.shutdown();
}

#[tokio::test]
async fn a_cancelled_group_leader_still_writes_its_followers() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let mut leader = Box::pin(store.append_grouped(vec![msg("T", 0, 0, "A")], true));
    assert!(
        leader.as_mut().now_or_never().is_none(),
        "the leader yields first"
    );
    let mut follower = Box::pin(store.append_grouped(vec![msg("T", 0, 1, "A")], true));
    assert!(
        follower.as_mut().now_or_never().is_none(),
        "the follower waits for the leader"
    );
    drop(leader);
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
        .await
        .expect("the follower was left waiting")
        .unwrap();
    assert_eq!(
        r[0].queue_offset, 1,
        "the cancelled leader's message was written first"
    );
    assert_eq!(
        store
            .get("T", 0, 0, 10, usize::MAX, |_| true)
            .unwrap()
            .count,
        2
    );
    store.shutdown();
}

#[test]
fn a_handed_off_group_write_survives_its_runtime_going_away() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut leader = Box::pin(store.append_grouped(vec![msg("T", 0, 0, "A")], true));
        assert!(
            leader.as_mut().now_or_never().is_none(),
            "the leader yields"
        );
        assert!(
            leader.as_mut().now_or_never().is_none(),
            "then hands the write to a task and waits for it"
        );
    });
    // The writing task never ran: the runtime drops it.
    drop(rt);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                store.append_grouped(vec![msg("T", 0, 1, "A")], false),
            )
            .await
        })
        .expect("a later send waited for a group leader that was gone")
        .unwrap();
    assert_eq!(
        r[0].queue_offset, 1,
        "the dropped task still wrote its group"
    );
    store.shutdown();
}

/// How many messages of topic `T` queue `queue` holds, read back through the store.
fn messages_in_queue(store: &MessageStore, queue: i32) -> usize {
    store
        .get("T", queue, 0, 32, usize::MAX, |_| true)
        .unwrap()
        .count
}

#[test]
fn write_back_starts_on_written_ranges_and_skips_missing_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Sync)).unwrap();
    let r = fill(&store, 3);
    let log = store.commitlog();
    let (start, end) = (r[0].physical_offset, r[2].end);
    // The system call accepts what the store passes it (bad flags or ranges are errors).
    log.start_writeback(start, end - start).unwrap();
    log.start_writeback(end - 1, 1).unwrap();
    // No segment there yet: nothing to write, not an error.
    log.start_writeback(10 * 64 * 1024, 4096).unwrap();
    // Write-back is only a start: the data still reads back, and the flush still covers it.
    assert_eq!(log.flush().unwrap(), end);
    // Messages 0 and 2 went to queue 0.
    assert_eq!(messages_in_queue(&store, 0), 2);
    store.shutdown();
}

#[test]
fn the_next_segment_is_created_ahead_and_a_restart_drops_it_unused() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // Past the middle of the first 64 KiB segment.
    fill(&store, 100);
    let end = store.commitlog().max_offset();
    assert!(end > 32 * 1024 && end < 64 * 1024, "log ends at {end}");
    let next = dir
        .path()
        .join("commitlog")
        .join(format!("{:020}", 64 * 1024));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !next.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        next.exists(),
        "the flush thread did not create the next segment"
    );
    store.shutdown();
    drop(store);
    // It holds no data: the restart removes it and keeps everything else. (The new flush
    // thread soon creates it again: the data is still past the middle.)
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    assert_eq!(store.recovery.segments_removed, 1);
    assert_eq!(store.commitlog().max_offset(), end);
    // Appends cross into the next segments as before.
    fill(&store, 400);
    assert!(store.commitlog().max_offset() > 2 * 64 * 1024);
    assert_eq!(store.queue("T", 0).unwrap().max_offset(), 250);
    store.shutdown();
}

#[test]
fn zeroes_are_prepared_ahead_under_async_flush_too() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    store.append(&[msg("T", 0, 0, "A")]).unwrap();
    // The segment is created sparse; the preparer fills the rest of it (64 KiB here) with
    // zeroes, which gives it blocks.
    let seg = dir.path().join("commitlog").join(format!("{:020}", 0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let allocated = || std::fs::metadata(&seg).unwrap().blocks() * 512;
    while allocated() < 64 * 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(allocated() >= 64 * 1024, "{} bytes allocated", allocated());
    assert_eq!(messages_in_queue(&store, 0), 1);
    store.shutdown();
}

/// A store whose zeroes ahead are written by the test, by hand: no preparing thread.
/// What a command printed, if it ran and succeeded.
fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The type of the file system holding `path`, as `stat -f` names it ("ext2/ext3", "xfs").
fn file_system(path: &Path) -> Option<String> {
    let out = run(
        "stat",
        &[
            "-f".as_ref(),
            "-c".as_ref(),
            "%T".as_ref(),
            path.as_os_str(),
        ],
    )?;
    Some(out.trim().to_string())
}

fn without_preparer(root: &Path, flush: FlushDiskType) -> Arc<MessageStore> {
    MessageStore::open(StoreConfig {
        prepare_ahead: false,
        ..cfg(root, flush)
    })
    .unwrap()
}

#[tokio::test]
async fn no_send_is_acknowledged_as_durable_after_a_failed_write_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = without_preparer(dir.path(), FlushDiskType::Sync);
    store.put(&[msg("T", 0, 0, "A")]).await.unwrap();
    let log = store.commitlog();
    assert!(log
        .write_out(&commitlog::ZeroRun::unwritable(log).unwrap())
        .is_err());
    for i in 1..3 {
        match store.put(&[msg("T", 0, i, "A")]).await {
            Err(e) => assert!(matches!(e, StoreError::WriteBackFailed(_)), "{e}"),
            Ok(_) => panic!("send {i} acknowledged after the write-out failed"),
        }
    }
    store.shutdown();
}

#[tokio::test]
async fn a_failed_flush_refuses_every_later_message() {
    for flush in [FlushDiskType::Sync, FlushDiskType::Async] {
        let dir = tempfile::tempdir().unwrap();
        let store = without_preparer(dir.path(), flush);
        store.put(&[msg("T", 0, 0, "A")]).await.unwrap();
        let log = store.commitlog();
        // Flushed first, so the background flush has nothing to fail on before message 1.
        log.flush().unwrap();
        log.break_syncing(0);
        // The send whose group commit fails is not acknowledged (SYNC_FLUSH); under
        // ASYNC_FLUSH it was, as that policy allows, and the background flush fails.
        match store.put(&[msg("T", 0, 1, "A")]).await {
            Err(StoreError::WriteBackFailed(_)) => assert_eq!(flush, FlushDiskType::Sync),
            Ok(_) => {
                assert_eq!(flush, FlushDiskType::Async);
                assert!(log.flush().is_err());
            }
            Err(e) => panic!("{flush:?}: {e}"),
        }
        let end = log.max_offset();
        match store.put(&[msg("T", 0, 2, "A")]).await {
            Err(StoreError::WriteBackFailed(why)) => {
                assert!(why.contains("Invalid argument"), "{why}")
            }
            other => panic!("{flush:?}: a message was taken after a failed flush: {other:?}"),
        }
        assert_eq!(
            log.max_offset(),
            end,
            "{flush:?}: the refused message was written"
        );
        assert!(store.commitlog().stopped().is_some());
        store.shutdown();
    }
}

#[test]
fn zeroes_written_out_have_their_blocks_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let store = without_preparer(dir.path(), FlushDiskType::Sync);
    let log = store.commitlog();
    // Into the second segment, so an offset in the log taken for one in the file shows.
    let segment = log.segment_size();
    let mut i = 0;
    while log.max_offset() < segment + 4096 {
        store.append(&[msg("T", 0, i, "A")]).unwrap();
        i += 1;
    }
    log.flush().unwrap();
    let zeroes = log
        .prepare_ahead(32 * 1024, true)
        .unwrap()
        .expect("zeroes to write");
    // filefrag (e2fsprogs) lists the file's extents and marks those still waiting for blocks
    // "delalloc". Checked on ext4 and XFS only, where a waited-for write-back allocates: on
    // others (btrfs with compression, tmpfs) there may be nothing to see, or it may differ.
    let seg = dir.path().join("commitlog").join(format!("{segment:020}"));
    let extents = || run("filefrag", &["-v".as_ref(), seg.as_os_str()]);
    match (file_system(&seg).as_deref(), extents()) {
        (Some("ext2/ext3" | "xfs"), Some(before)) if before.contains("delalloc") => {
            log.write_out(&zeroes).unwrap();
            let after = extents().unwrap();
            assert!(!after.contains("delalloc"), "{after}");
        }
        other => eprintln!("no delayed allocation to see here: {other:?}"),
    }
    store.shutdown();
}

#[test]
fn zeroes_prepared_ahead_never_touch_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = without_preparer(dir.path(), FlushDiskType::Async);
    let log = store.commitlog();
    let first = store.append(&[msg("T", 0, 0, "A")]).unwrap();
    let end = log.max_offset();
    let seg_path = dir.path().join("commitlog").join(format!("{:020}", 0));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg_path)
        .unwrap();
    // Stale bytes past the end, in the range the preparation covers.
    file.write_all_at(&[0xEE; 64], 8192).unwrap();
    let ahead = 16 * 1024;
    let mut runs = 0;
    while log.prepare_ahead(ahead, runs > 0).unwrap().is_some() {
        runs += 1;
    }
    assert!(runs > 0);
    let page_end = end.next_multiple_of(4096);
    let mut zeroes = vec![0xFFu8; (end + ahead - page_end) as usize];
    file.read_exact_at(&mut zeroes, page_end).unwrap();
    assert!(
        zeroes.iter().all(|b| *b == 0),
        "the prepared range is zeroed"
    );
    assert_eq!(
        log.read_message(first[0].physical_offset)
            .unwrap()
            .queue_offset,
        0,
        "the data before it is intact"
    );
    // Enough headroom left: nothing to do until half of it is used.
    assert!(log.prepare_ahead(ahead, false).unwrap().is_none());
    let more: Vec<_> = (1..40)
        .map(|i| store.append(&[msg("T", 0, i, "A")]).unwrap().remove(0))
        .collect();
    while log.prepare_ahead(ahead, false).unwrap().is_some() {}
    for r in &more {
        assert_eq!(
            log.read_message(r.physical_offset).unwrap().queue_offset as u64,
            r.queue_offset
        );
    }
    // Preparation stays within existing segments: it never creates the next one.
    let segments = std::fs::read_dir(dir.path().join("commitlog"))
        .unwrap()
        .count();
    for _ in 0..8 {
        while log.prepare_ahead(1 << 30, true).unwrap().is_some() {}
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("commitlog"))
            .unwrap()
            .count(),
        segments
    );
    store.shutdown();
}

#[test]
fn a_slave_log_that_starts_past_zero_indexes_at_the_right_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let master = MessageStore::open(cfg(&dir.path().join("m"), FlushDiskType::Async)).unwrap();
    let results = fill(&master, 300);
    let seg = 64 * 1024;
    let end = master.commitlog().max_offset();
    assert!(
        end > seg && end < 2 * seg,
        "the log must end in its second segment"
    );
    // A slave joining after the master's first segment was deleted gets the second one.
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    slave.reset_start(seg).unwrap();
    let bytes = master.commitlog().read(seg, (end - seg) as usize).unwrap();
    slave.replicate(seg, &bytes).unwrap();
    slave.dispatch_replicated().unwrap();
    assert_eq!(slave.dispatched_offset(), end);
    let last = results.last().unwrap();
    let got = slave
        .get("T", last.queue_id, last.queue_offset, 1, usize::MAX, |_| {
            true
        })
        .unwrap();
    let m = &crate::client::decode_messages(&got.body).unwrap()[0];
    assert_eq!(m.physical_offset as u64, last.physical_offset);
    master.shutdown();
    slave.shutdown();
}

#[test]
fn sends_queued_while_a_group_is_written_let_the_loop_run_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // Holding the write lock stops the group's write where it starts.
    let writing = lock(&store.write_lock);
    let loop_thread = {
        let store = store.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                // Ready before the group is written: another task of this event loop (a
                // connection with answers to write, say).
                let other = {
                    let store = store.clone();
                    tokio::spawn(async move { lock(&store.group).sends.len() })
                };
                store
                    .append_grouped(vec![msg("T", 0, 0, "A")], false)
                    .await
                    .unwrap();
                other.await.unwrap()
            })
        })
    };
    // Once the leader has taken its group, another loop's send queues behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !{
        let g = lock(&store.group);
        g.leading && g.sends.is_empty()
    } {
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never took its group"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (done, queued) = oneshot::channel();
    lock(&store.group).sends.push(GroupedSend {
        msgs: vec![msg("T", 0, 1, "A")],
        done,
    });
    drop(writing);
    let waiting_when_the_other_task_ran = loop_thread.join().unwrap();
    assert_eq!(
        waiting_when_the_other_task_ran, 1,
        "the loop's other task waited until the queued send was written too"
    );
    // And the queued send is written all the same.
    let written = queued.blocking_recv().unwrap().unwrap();
    assert_eq!(written[0].queue_offset, 1);
    store.shutdown();
}

#[test]
fn retention_moves_queue_minimums_and_reads_never_fail_on_deleted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    fill(&store, 1000);
    // The log drops its old segments before the queues learn of it: a pull in between passes
    // over the entries whose data is gone (it used to fail with a read error).
    let log_min = store.commitlog().delete_expired(Duration::ZERO).unwrap();
    assert!(log_min > 0, "nothing was deleted");
    assert_eq!(store.queue("T", 0).unwrap().min_offset(), 0);
    let mut offset = 0;
    let got = loop {
        let got = store.get("T", 0, offset, 32, usize::MAX, |_| true).unwrap();
        if got.status != GetStatus::NoMatchedMessage {
            break got;
        }
        assert!(got.next_offset > offset, "no progress past deleted entries");
        offset = got.next_offset;
    };
    assert_eq!(got.status, GetStatus::Found);
    // The first message served is the queue's first one left.
    let first = &crate::client::decode_messages(&got.body).unwrap()[0];
    let first_left = first.queue_offset as u64;
    assert!(first.physical_offset as u64 >= log_min);
    let q0 = store.queue("T", 0).unwrap();
    assert!(q0.get(first_left - 1, 1).unwrap()[0].offset < log_min);

    // A search by time meanwhile passes over them too (it used to fail reading them).
    assert_eq!(
        store.search_offset("T", 0, 0, Boundary::Lower).unwrap(),
        first_left
    );

    // The store sees its queues' minimums are behind, and moves every one to the first
    // message left (what retention does after deleting, and what is retried if it fails).
    assert!(store.queue_minimums_behind());
    store.correct_queue_minimums().unwrap();
    assert!(!store.queue_minimums_behind());
    store.delete_expired(Duration::ZERO).unwrap();
    assert_eq!(q0.min_offset(), first_left);
    let got = store.get("T", 0, 0, 32, usize::MAX, |_| true).unwrap();
    assert_eq!(
        (got.status, got.next_offset),
        (GetStatus::OffsetTooSmall, first_left)
    );
    store.shutdown();
}

/// A master's log of `n` messages in queue 0 of topic T, with where each landed.
fn master_log(root: &Path, n: u64) -> (Vec<u8>, Vec<PutResult>) {
    let master = MessageStore::open(cfg(root, FlushDiskType::Async)).unwrap();
    let results: Vec<PutResult> = (0..n)
        .map(|i| master.append(&[msg("T", 0, i, "A")]).unwrap().remove(0))
        .collect();
    let end = master.commitlog().max_offset();
    let bytes = master.commitlog().read(0, end as usize).unwrap().to_vec();
    master.shutdown();
    (bytes, results)
}

/// The physical offset of the message a slave's queue 0 of T holds at `index`, if any.
fn indexed_at(slave: &MessageStore, index: u64) -> Option<u64> {
    let entries = slave.queue("T", 0)?.get(index, 1).unwrap();
    entries.first().map(|e| e.offset)
}

#[test]
fn a_replicated_message_that_cannot_be_read_is_skipped_and_the_rest_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bytes, results) = master_log(&dir.path().join("m"), 3);
    // The second message's properties length is negative (a 4.x-era store wrapped lengths
    // past 32767); its total size is intact.
    let second = &results[1];
    let props = msg("T", 0, 1, "A").properties.len() as u64;
    let at = (second.physical_offset + u64::from(second.size) - props - 2) as usize;
    bytes[at..at + 2].copy_from_slice(&(-1i16).to_be_bytes());
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    slave.replicate(0, &bytes).unwrap();
    slave.dispatch_replicated().unwrap();
    assert_eq!(slave.dispatched_offset(), bytes.len() as u64);
    assert_eq!(slave.unindexed_bytes(), 0);
    assert_eq!(indexed_at(&slave, 0), Some(results[0].physical_offset));
    assert_eq!(indexed_at(&slave, 2), Some(results[2].physical_offset));
    // The skipped one's place is empty: a pull passes over it, and it has no store time.
    let got = slave.get("T", 0, 0, 32, usize::MAX, |_| true).unwrap();
    assert_eq!((got.count, got.next_offset), (2, 3));
    let cq = slave.queue("T", 0).unwrap();
    assert_eq!(slave.store_time_at(&cq, 1).unwrap(), None);
    slave.shutdown();
}

#[test]
fn a_search_by_time_steps_over_an_empty_entry() {
    let dir = tempfile::tempdir().unwrap();
    let master = MessageStore::open(cfg(&dir.path().join("m"), FlushDiskType::Async)).unwrap();
    // Five messages stored milliseconds apart, so each has a time of its own.
    let results: Vec<PutResult> = (0..5)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(3));
            master.append(&[msg("T", 0, i, "A")]).unwrap().remove(0)
        })
        .collect();
    let times: Vec<i64> = results
        .iter()
        .map(|r| {
            master
                .commitlog()
                .read_store_timestamp(r.physical_offset)
                .unwrap()
        })
        .collect();
    let end = master.commitlog().max_offset();
    let mut bytes = master.commitlog().read(0, end as usize).unwrap().to_vec();
    master.shutdown();
    // The middle one cannot be read on the slave: its queue entry is empty.
    let third = &results[2];
    let props = msg("T", 0, 2, "A").properties.len() as u64;
    let at = (third.physical_offset + u64::from(third.size) - props - 2) as usize;
    bytes[at..at + 2].copy_from_slice(&(-1i16).to_be_bytes());
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    slave.replicate(0, &bytes).unwrap();
    slave.dispatch_replicated().unwrap();
    // The first stored at or after the second's time is the second, not one past the gap.
    let found = slave
        .search_offset("T", 0, times[1], Boundary::Lower)
        .unwrap();
    assert_eq!(found, 1);
    let found = slave
        .search_offset("T", 0, times[3], Boundary::Lower)
        .unwrap();
    assert!((2..=3).contains(&found), "{found}");
    assert_eq!(slave.lag_at("T", 0, 2).unwrap(), None);
    slave.shutdown();
}

#[test]
fn replicated_messages_are_indexed_without_checking_their_body_crc() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bytes, results) = master_log(&dir.path().join("m"), 3);
    // A body byte of the second message changed: its master indexed it when it was sent, and
    // its slave indexes it too (consumers check CRCs, as Java's do).
    let second = &results[1];
    let range = second.physical_offset as usize..(second.physical_offset + 200) as usize;
    let body = bytes[range.clone()]
        .windows(8)
        .position(|w| w == b"00000001")
        .unwrap();
    bytes[range.start + body + 8] ^= 0xFF;
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    slave.replicate(0, &bytes).unwrap();
    slave.dispatch_replicated().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(indexed_at(&slave, i as u64), Some(r.physical_offset));
    }
    slave.shutdown();
}

#[test]
fn replicated_data_of_untrusted_size_stops_indexing_once_and_is_no_longer_held() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bytes, results) = master_log(&dir.path().join("m"), 5);
    // The third message's size runs past its segment.
    let third = results[2].physical_offset as usize;
    bytes[third..third + 4].copy_from_slice(&i32::MAX.to_be_bytes());
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    let split = results[3].physical_offset as usize;
    slave.replicate(0, &bytes[..split]).unwrap();
    let stopped = slave.dispatch_replicated();
    assert!(
        matches!(stopped, Err(StoreError::Corrupt(_))),
        "{stopped:?}"
    );
    assert_eq!(slave.dispatched_offset(), third as u64);
    assert_eq!(indexed_at(&slave, 1), Some(results[1].physical_offset));
    // Replication goes on (the log stays the master's), but nothing is kept for indexing.
    slave.replicate(split as u64, &bytes[split..]).unwrap();
    assert_eq!(slave.unindexed_bytes(), 0);
    slave.dispatch_replicated().unwrap();
    assert_eq!(slave.dispatched_offset(), third as u64);
    assert_eq!(slave.commitlog().max_offset(), bytes.len() as u64);
    slave.shutdown();
}

/// A message of topic `topic` with a client id `id-<seq>` and the keys `keys`.
fn keyed(topic: &str, seq: u64, keys: &str) -> NewMessage {
    let mut m = msg(topic, (seq % 2) as i32, seq, "A");
    m.properties = format!(
        "{}KEYS\u{1}{keys}\u{2}UNIQ_KEY\u{1}id-{seq}\u{2}",
        m.properties
    );
    m
}

/// Waits until the key index has caught up with the log.
fn wait_indexed(store: &MessageStore) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.key_index_offset().unwrap() < store.dispatched_offset() {
        assert!(Instant::now() < deadline, "the key index never caught up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sequence numbers (body prefixes) of the messages `key` finds in topic T.
fn found(store: &MessageStore, key: &str, max: usize) -> Vec<u64> {
    let q = store.query_by_key("T", key, max, 0, i64::MAX).unwrap();
    q.messages
        .iter()
        .map(|b| {
            let m = message::decode_stored(b).unwrap();
            std::str::from_utf8(&m.body[..8]).unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn messages_are_found_by_key_and_client_id_once_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    for i in 0..400 {
        store
            .append(&[keyed("T", i, &format!("k{i} {}", i % 3))])
            .unwrap();
    }
    // The same key in another topic, and a rolled-back message: neither is found in T.
    store.append(&[keyed("U", 1_000, "k7")]).unwrap();
    let mut rolled = keyed("T", 1_001, "k7");
    rolled.sys_flag = message::TX_ROLLBACK;
    store.append(&[rolled]).unwrap();
    assert!(
        store.commitlog().max_offset() > 2 * 64 * 1024,
        "several segments"
    );
    wait_indexed(&store);
    assert_eq!(found(&store, "k7", 64), [7]);
    assert_eq!(found(&store, "id-399", 64), [399]);
    assert_eq!(found(&store, "nothing", 64), Vec::<u64>::new());
    // The newest `max` of a key, in log order; more than a file of entries back.
    let zero: Vec<u64> = (0..400).filter(|i| i % 3 == 0).collect();
    assert_eq!(found(&store, "0", 10), zero[zero.len() - 10..]);
    assert_eq!(found(&store, "0", 1_000), zero);
    // Only what was stored within the time range.
    let q = store.query_by_key("T", "k7", 64, 0, 1).unwrap();
    assert!(q.messages.is_empty());
    assert!(q.last_time > 0);
    store.shutdown();
}

#[test]
fn a_crash_keeps_the_index_and_what_came_after_its_checkpoint_is_indexed_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    for i in 0..300 {
        store.append(&[keyed("T", i, "all")]).unwrap();
    }
    wait_indexed(&store);
    // Once the index's checkpoint counts them, more come, and the broker dies at once.
    let path = dir.path().join("index").join("checkpoint.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while load_json::<serde_json::Value>(&path)
        .unwrap()
        .is_none_or(|c| c["through"].as_u64() != Some(store.dispatched_offset()))
    {
        assert!(Instant::now() < deadline, "no index checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 300..320 {
        store.append(&[keyed("T", i, "all")]).unwrap();
    }
    store.crash();
    drop(store);
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // New messages come while the index reads the log past its checkpoint: their keys are
    // handed over and wait until the log before them is read.
    for i in 320..340 {
        store.append(&[keyed("T", i, "all")]).unwrap();
    }
    wait_indexed(&store);
    assert_eq!(found(&store, "all", 1_000), (0..340).collect::<Vec<_>>());
    assert_eq!(found(&store, "id-310", 64), [310]);
    store.shutdown();
}

#[test]
fn a_deleted_index_is_built_again_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    for i in 0..100 {
        store.append(&[keyed("T", i, "all")]).unwrap();
    }
    store.shutdown();
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    wait_indexed(&store);
    assert_eq!(found(&store, "all", 1_000), (0..100).collect::<Vec<_>>());
    store.shutdown();
}

#[test]
fn without_an_index_nothing_is_found_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), FlushDiskType::Async);
    c.index = None;
    let store = MessageStore::open(c).unwrap();
    store.append(&[keyed("T", 1, "k")]).unwrap();
    let q = store.query_by_key("T", "k", 64, 0, i64::MAX).unwrap();
    assert!(q.messages.is_empty());
    assert!(!dir.path().join("index").exists());
    store.shutdown();
}

#[test]
fn a_slave_indexes_its_replicated_messages_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let master = MessageStore::open(cfg(&dir.path().join("m"), FlushDiskType::Async)).unwrap();
    for i in 0..50 {
        master.append(&[keyed("T", i, "all")]).unwrap();
    }
    let end = master.commitlog().max_offset();
    let bytes = master.commitlog().read(0, end as usize).unwrap();
    master.shutdown();
    let slave = MessageStore::open(cfg(&dir.path().join("s"), FlushDiskType::Async)).unwrap();
    slave.replicate(0, &bytes).unwrap();
    slave.dispatch_replicated().unwrap();
    wait_indexed(&slave);
    assert_eq!(found(&slave, "all", 1_000), (0..50).collect::<Vec<_>>());
    assert_eq!(found(&slave, "id-20", 64), [20]);
    slave.shutdown();
}

#[test]
fn retention_deletes_index_files_with_the_log_they_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // Two keys a message: 128 messages fill a file of 256 entries.
    for i in 0..700 {
        store.append(&[keyed("T", i, "all")]).unwrap();
    }
    wait_indexed(&store);
    let files = || std::fs::read_dir(dir.path().join("index")).unwrap().count();
    let before = files();
    store.delete_expired(Duration::ZERO).unwrap();
    assert!(store.commitlog().min_offset() > 0, "segments deleted");
    assert!(files() < before, "{} index files, {before} before", files());
    // What the log still holds is still found.
    let left = found(&store, "all", 1_000);
    assert_eq!(left.last(), Some(&699));
    assert!(left.len() < 700);
    store.shutdown();
}

#[test]
fn an_index_entry_pointing_inside_other_data_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(cfg(dir.path(), FlushDiskType::Async)).unwrap();
    // A body whose first bytes read as a size that runs past the segment's end, but not
    // past the log's.
    let mut decoy = keyed("T", 0, "k");
    decoy.body = Bytes::from([&65_400i32.to_be_bytes()[..], &[b'x'; 600][..]].concat());
    store.append(&[keyed("T", 1, "k")]).unwrap();
    let at = store.append(&[decoy]).unwrap()[0].physical_offset;
    for i in 2..300 {
        store.append(&[keyed("T", i, "other")]).unwrap();
    }
    wait_indexed(&store);
    // An entry left by a message a power cut took, whose offset now lies inside the decoy's
    // body (88 bytes of header before it).
    let index = store.index.as_ref().unwrap();
    let stale = IndexEntry {
        hash: index::key_hash("T", "k"),
        offset: at + 88,
        store_time: topics::now_ms(),
    };
    index.add(&[stale], store.dispatched_offset()).unwrap();
    let q = store.query_by_key("T", "k", 64, 0, i64::MAX).unwrap();
    assert_eq!(q.messages.len(), 2, "the two messages, not an error");
    store.shutdown();
}
