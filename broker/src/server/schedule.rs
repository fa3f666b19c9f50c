//! Delayed delivery (RocketMQ's delay levels): a delayed message is stored first in
//! `SCHEDULE_TOPIC_XXXX`, queue `level - 1`, with its delivery time as the consume-queue tag
//! code; a background task moves each one to its real topic once due. Retries of
//! CONSUMER_SEND_MSG_BACK and producer messages with a `DELAY` property both go this way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::message::{
    format_properties, parse_properties, NewMessage, Properties, PROP_DELAY,
};
use crate::store::persist::{load_json, save_json};
use crate::store::topics::now_ms;
use crate::store::{MessageStore, StoreError};

pub use crate::store::message::SCHEDULE_TOPIC;
/// Property: the topic a delayed message goes to when due.
pub const PROP_REAL_TOPIC: &str = "REAL_TOPIC";
/// Property: the queue a delayed message goes to when due.
pub const PROP_REAL_QID: &str = "REAL_QID";

/// Records in its properties the real topic and queue of a message the broker stores first
/// in one of its own topics (see [`take_route`]).
pub fn put_route(props: &mut Properties, msg: &NewMessage) {
    props.insert(PROP_REAL_TOPIC.into(), msg.topic.clone());
    props.insert(PROP_REAL_QID.into(), msg.queue_id.to_string());
}

/// Takes the real topic and queue a message of the broker's own topics is meant for out of
/// its properties (a delayed message's, a transaction's half message's).
pub fn take_route(props: &mut Properties) -> Option<(String, i32)> {
    let topic = props.remove(PROP_REAL_TOPIC);
    let queue_id = props.remove(PROP_REAL_QID).and_then(|q| q.parse().ok());
    topic.zip(queue_id)
}

/// Level to use for a requested level (clamped to the broker's table).
pub fn clamp_level(level: i32, levels_ms: &[i64]) -> i32 {
    level.clamp(1, levels_ms.len().max(1) as i32)
}

/// Wraps a message for delayed delivery at `level` of the broker's delay levels.
pub fn delay(msg: &NewMessage, level: i32, levels_ms: &[i64]) -> NewMessage {
    let level = clamp_level(level, levels_ms);
    let mut props = parse_properties(&msg.properties);
    put_route(&mut props, msg);
    props.insert(PROP_DELAY.into(), level.to_string());
    NewMessage {
        topic: SCHEDULE_TOPIC.into(),
        queue_id: level - 1,
        properties: format_properties(&props),
        // The consume-queue tag code of a scheduled message is its delivery time.
        tags_code: now_ms() + levels_ms.get((level - 1) as usize).copied().unwrap_or(0),
        ..msg.clone()
    }
}

/// The delay level a message's properties ask for (0 = none).
pub fn requested_level(properties: &str) -> i32 {
    if !properties.contains("DELAY\u{1}") {
        return 0;
    }
    crate::store::message::property(properties, PROP_DELAY)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DelayOffsets {
    offset_table: BTreeMap<i32, u64>,
}

/// Moves due messages from the schedule topic to their real topics.
pub struct Scheduler {
    path: PathBuf,
    offsets: Mutex<DelayOffsets>,
}

impl Scheduler {
    /// Loads the delivery progress of each level.
    pub fn load(root: &std::path::Path) -> Result<Scheduler, StoreError> {
        let path = root.join("config").join("delayOffset.json");
        let offsets = load_json(&path)?.unwrap_or_default();
        Ok(Scheduler {
            path,
            offsets: Mutex::new(offsets),
        })
    }

    /// Delivery progress per level, RocketMQ's delayOffset.json body.
    pub fn offsets_json(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.offsets.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default()
    }

    /// Takes a master's progress (GET_ALL_DELAY_OFFSET's body) on a slave and saves it
    /// if it changed, as Java's SlaveSynchronize does: a slave restarted as a master then
    /// goes on from where its master was instead of delivering again every delayed message
    /// and retry still stored. Returns whether it changed.
    pub async fn adopt(&self, body: &[u8]) -> Result<bool, StoreError> {
        let theirs: DelayOffsets = crate::remoting::body::from_json(body).map_err(|e| {
            StoreError::Corrupt(format!("unreadable delay offsets from the master: {e}"))
        })?;
        {
            let mut ours = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
            if ours.offset_table == theirs.offset_table {
                return Ok(false);
            }
            *ours = theirs;
        }
        self.write_progress().await?;
        Ok(true)
    }

    /// Delivers every due message once; returns how many moved.
    ///
    /// Progress is kept in memory per message moved, so an error part-way (or a slow disk)
    /// repeats nothing in this process. It is saved at the end of each level's pass, before
    /// an error is returned, and every 1,024 messages, each time only once the log
    /// is durable, so a power loss cannot mark as delivered a message whose copy was lost;
    /// a crash repeats at most what was moved since the last save.
    /// A level that fails does not hold up the others: the first error is returned after
    /// every level has had its pass.
    pub async fn deliver_due(&self, store: &MessageStore) -> Result<usize, StoreError> {
        let mut moved = 0;
        let mut failed = None;
        let now = now_ms();
        let levels = store.config().delay_levels_ms.clone();
        for level in 1..=levels.len() as i32 {
            let Some(q) = store.queue(SCHEDULE_TOPIC, level - 1) else {
                continue;
            };
            let saved = self.progress(level);
            // Past the queue's end only if a power loss took entries the progress file had
            // already counted: the offsets are handed out again, to messages not delivered.
            let mut next = saved.max(q.min_offset()).min(q.max_offset());
            let mut last_saved = (saved, moved);
            loop {
                let batch = self
                    .deliver_batch(
                        store,
                        &q,
                        levels[(level - 1) as usize],
                        now,
                        &mut next,
                        &mut moved,
                    )
                    .await;
                self.set_progress(level, next);
                let pass_over = !matches!(batch, Ok(true));
                if next != last_saved.0 && (pass_over || moved - last_saved.1 >= SAVE_EVERY) {
                    if let Err(e) = self.save(store).await {
                        // This level waits for the next pass; the others go on.
                        failed.get_or_insert(e);
                        break;
                    }
                    last_saved = (next, moved);
                }
                match batch {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        failed.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        failed.map_or(Ok(moved), Err)
    }

    pub(super) fn progress(&self, level: i32) -> u64 {
        let offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        offsets.offset_table.get(&level).copied().unwrap_or(0)
    }

    pub(super) fn set_progress(&self, level: i32, next: u64) {
        let mut offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        offsets.offset_table.insert(level, next);
    }

    /// Moves the due messages of one batch of up to 64 from `next` on, advancing it past
    /// each one moved; `Ok(true)` when there may be more due.
    ///
    /// A message that can no longer be read (damaged, or its segment deleted by retention)
    /// is logged and passed over, as Java's scheduler drops it: waiting for it would hold up
    /// every later message of its level for good. Any other error (a failed write) is
    /// returned, and the message is tried again at the next pass.
    async fn deliver_batch(
        &self,
        store: &MessageStore,
        q: &crate::store::consume_queue::ConsumeQueue,
        level_ms: i64,
        now: i64,
        next: &mut u64,
        moved: &mut usize,
    ) -> Result<bool, StoreError> {
        let entries = q.get(*next, 64)?;
        if entries.is_empty() {
            return Ok(false);
        }
        // A delivery time further off than the level's delay: the clock went back since the
        // message was stored. It is due now (Java's correctDeliverTimestamp), not after the
        // clock catches up.
        let latest = now + level_ms;
        for e in entries {
            if e.tags_code > now && e.tags_code <= latest {
                return Ok(false);
            }
            let m = match store.commitlog().read_message(e.offset) {
                Ok(m) => m,
                Err(err @ (StoreError::Corrupt(_) | StoreError::OutOfRange { .. })) => {
                    tracing::error!(
                        delay_ms = level_ms,
                        queue_offset = *next,
                        offset = e.offset,
                        error = %err,
                        "a delayed message cannot be read and is dropped"
                    );
                    *next += 1;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let mut props = parse_properties(&m.properties);
            props.remove(PROP_DELAY);
            if let Some((topic, queue_id)) = take_route(&mut props) {
                let real = NewMessage::restored(&m, topic, queue_id, format_properties(&props));
                // Appended without waiting for its own sync: the progress counting it is saved
                // only once the log is durable past it (`save`), so under SYNC_FLUSH one group
                // commit serves the whole pass instead of one per message (about 500 a second).
                store.append(std::slice::from_ref(&real))?;
                *moved += 1;
            } else {
                tracing::warn!(
                    offset = e.offset,
                    "scheduled message without REAL_TOPIC/REAL_QID dropped"
                );
            }
            *next += 1;
        }
        Ok(true)
    }

    /// Saves the progress in memory once everything in the log so far is durable: the
    /// messages it counts as delivered have their copies there. The file's sync runs on a
    /// blocking thread, not the runtime's.
    async fn save(&self, store: &MessageStore) -> Result<(), StoreError> {
        store.wait_durable(store.commitlog().max_offset()).await?;
        self.write_progress().await
    }

    /// Writes the progress in memory to its file, on a blocking thread.
    async fn write_progress(&self) -> Result<(), StoreError> {
        let snapshot = self
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || save_json(&path, &snapshot))
            .await
            .unwrap_or(Err(StoreError::Shutdown))
    }
}

/// Messages moved between two saves of the progress within one pass.
const SAVE_EVERY: usize = 1024;

/// How often due messages are looked for.
pub const TICK: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::message::DELAY_LEVELS_MS;
    use crate::store::{FlushDiskType, StoreConfig};

    /// A store with room for the tests' messages in one segment, and its scheduler.
    fn open(root: &std::path::Path) -> (std::sync::Arc<MessageStore>, Scheduler) {
        let store = MessageStore::open(StoreConfig {
            segment_size: 1 << 20,
            ..StoreConfig::for_tests(root, FlushDiskType::Async)
        })
        .unwrap();
        (store, Scheduler::load(root).unwrap())
    }

    #[tokio::test]
    async fn delayed_message_reaches_its_topic_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        let msg = NewMessage {
            topic: "%RETRY%g".into(),
            queue_id: 0,
            flag: 0,
            body: bytes::Bytes::from_static(b"later"),
            properties: "TAGS\u{1}A\u{2}".into(),
            sys_flag: 0,
            born_timestamp: 0,
            born_host: "127.0.0.1:2".parse().unwrap(),
            reconsume_times: 1,
            tags_code: 0,
        };
        store
            .put(&[delay(&msg, 1, &DELAY_LEVELS_MS)])
            .await
            .unwrap();
        assert_eq!(
            sched.deliver_due(&store).await.unwrap(),
            0,
            "delivered before its time"
        );
        assert!(store.queue("%RETRY%g", 0).is_none());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 1);
        assert_eq!(
            sched.deliver_due(&store).await.unwrap(),
            0,
            "delivered twice"
        );
        let got = store
            .get("%RETRY%g", 0, 0, 10, usize::MAX, |_| true)
            .unwrap();
        let m = &crate::client::decode_messages(&got.body).unwrap()[0];
        assert_eq!(&m.body[..], b"later");
        let props = m.properties_map();
        assert!(!props.contains_key(PROP_DELAY) && !props.contains_key(PROP_REAL_TOPIC));
        assert_eq!(props["TAGS"], "A");
        assert_eq!(m.reconsume_times, 1);
        // Progress survives a restart of the scheduler.
        let again = Scheduler::load(dir.path()).unwrap();
        assert_eq!(again.deliver_due(&store).await.unwrap(), 0);
        store.shutdown();
    }

    #[tokio::test]
    async fn under_sync_flush_moved_messages_are_durable_before_their_progress_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = MessageStore::open(StoreConfig {
            segment_size: 1 << 20,
            ..StoreConfig::for_tests(dir.path(), FlushDiskType::Sync)
        })
        .unwrap();
        let sched = Scheduler::load(dir.path()).unwrap();
        let due: Vec<NewMessage> = (0..200u8)
            .map(|i| delay(&plain(i, "T"), 1, &DELAY_LEVELS_MS))
            .collect();
        store.put(&due).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 200);
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 200);
        // The saved progress counts all 200, and the log is durable past every copy.
        let saved = Scheduler::load(dir.path()).unwrap();
        assert_eq!(saved.progress(1), 200);
        assert!(store.commitlog().flushed_offset() >= store.commitlog().max_offset());
        store.shutdown();
    }

    fn plain(i: u8, topic: &str) -> NewMessage {
        NewMessage {
            topic: topic.into(),
            queue_id: 0,
            flag: 0,
            body: bytes::Bytes::from(vec![i; 10]),
            properties: String::new(),
            sys_flag: 0,
            born_timestamp: 0,
            born_host: "127.0.0.1:2".parse().unwrap(),
            reconsume_times: 0,
            tags_code: 0,
        }
    }

    #[tokio::test]
    async fn an_error_part_way_repeats_no_message_already_moved() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        // The third goes to a topic whose queue directory cannot be made (a file stands in
        // its way): its delivery fails until that is fixed.
        for i in 0..5 {
            let topic = if i == 2 { "Blocked" } else { "T" };
            store
                .put(&[delay(&plain(i, topic), 1, &DELAY_LEVELS_MS)])
                .await
                .unwrap();
        }
        let blocker = dir.path().join("consumequeue").join("Blocked");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..2 {
            assert!(sched.deliver_due(&store).await.is_err());
        }
        assert_eq!(
            store.queue("T", 0).unwrap().max_offset(),
            2,
            "the two before the failing one were delivered again"
        );
        // The progress made is saved: a restarted scheduler does not repeat them either, and
        // once the failure is gone, it goes on from the failed message.
        let again = Scheduler::load(dir.path()).unwrap();
        assert!(again.deliver_due(&store).await.is_err());
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 2);
        std::fs::remove_file(&blocker).unwrap();
        assert_eq!(again.deliver_due(&store).await.unwrap(), 3);
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 4);
        assert_eq!(store.queue("Blocked", 0).unwrap().max_offset(), 1);
        store.shutdown();
    }

    #[tokio::test]
    async fn an_unreadable_message_is_dropped_and_the_rest_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        let mut stored = Vec::new();
        for i in 0..3 {
            stored.push(
                store
                    .put(&[delay(&plain(i, "T"), 1, &DELAY_LEVELS_MS)])
                    .await
                    .unwrap()
                    .remove(0),
            );
        }
        // The second cannot be read any more: its bytes in the log are damaged.
        let log = dir.path().join("commitlog").join(format!("{:020}", 0));
        let file = std::fs::OpenOptions::new().write(true).open(log).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xFF; 8], stored[1].physical_offset + 8)
            .unwrap();
        assert!(store
            .commitlog()
            .read_message(stored[1].physical_offset)
            .is_err());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 2);
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 2);
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 0);
        store.shutdown();
    }

    #[tokio::test]
    async fn a_level_that_fails_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        let mut first = delay(&plain(1, "Blocked"), 1, &DELAY_LEVELS_MS);
        let mut second = delay(&plain(2, "T"), 2, &DELAY_LEVELS_MS);
        first.tags_code = now_ms() - 1;
        second.tags_code = now_ms() - 1;
        store.put(&[first]).await.unwrap();
        store.put(&[second]).await.unwrap();
        let blocker = dir.path().join("consumequeue").join("Blocked");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        assert!(sched.deliver_due(&store).await.is_err());
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 1);
        store.shutdown();
    }

    #[tokio::test]
    async fn a_delivery_time_past_the_levels_delay_means_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        let mut m = delay(&plain(1, "T"), 1, &DELAY_LEVELS_MS);
        // Stored when the clock read a day ahead of now.
        m.tags_code = now_ms() + 86_400_000;
        store.put(&[m]).await.unwrap();
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 1);
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 1);
        store.shutdown();
    }

    #[tokio::test]
    async fn a_slave_adopts_and_saves_its_masters_progress() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        let sched = Scheduler::load(dir.path()).unwrap();
        // fastjson writes the levels as bare integer keys.
        assert!(sched.adopt(br#"{"offsetTable":{1:7,3:2}}"#).await.unwrap());
        assert!(!sched
            .adopt(br#"{"offsetTable":{"1":7,"3":2}}"#)
            .await
            .unwrap());
        assert_eq!((sched.progress(1), sched.progress(3)), (7, 2));
        let reloaded = Scheduler::load(dir.path()).unwrap();
        assert_eq!((reloaded.progress(1), reloaded.progress(3)), (7, 2));
        assert!(sched.adopt(b"{not json").await.is_err());
        assert_eq!(sched.progress(1), 7);
    }

    #[tokio::test]
    async fn a_broker_with_its_own_delay_levels_uses_them_through_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let levels: std::sync::Arc<[i64]> = vec![100, 300].into();
        let open = || {
            MessageStore::open(StoreConfig {
                segment_size: 1 << 20,
                delay_levels_ms: levels.clone(),
                ..StoreConfig::for_tests(dir.path(), FlushDiskType::Async)
            })
            .unwrap()
        };
        let store = open();
        let sched = Scheduler::load(dir.path()).unwrap();
        // Level 9 does not exist here: the last level, 300 ms.
        let m = delay(&plain(1, "T"), 9, &store.config().delay_levels_ms);
        assert_eq!(m.queue_id, 1);
        store.put(&[m]).await.unwrap();
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 0);
        // As after a crash: recovery rebuilds the entry, its delivery time by the same table.
        store.shutdown();
        drop(store);
        std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
        std::fs::write(
            dir.path().join("checkpoint"),
            br#"{"consistentOffset":0,"cleanShutdown":false}"#,
        )
        .unwrap();
        let store = open();
        assert_eq!(
            sched.deliver_due(&store).await.unwrap(),
            0,
            "delivered early"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(sched.deliver_due(&store).await.unwrap(), 1);
        store.shutdown();
    }

    #[test]
    fn requested_level_reads_the_delay_property() {
        assert_eq!(requested_level("DELAY\u{1}3\u{2}TAGS\u{1}A\u{2}"), 3);
        assert_eq!(requested_level("TAGS\u{1}A\u{2}"), 0);
        assert_eq!(clamp_level(99, &DELAY_LEVELS_MS), 18);
        assert_eq!(clamp_level(0, &[1_000, 2_000]), 1);
    }
}
