//! Delayed delivery (RocketMQ's delay levels): a delayed message is stored first in
//! `SCHEDULE_TOPIC_XXXX`, queue `level - 1`, with its delivery time as the consume-queue tag
//! code; a background task moves each one to its real topic once due. Retries of
//! CONSUMER_SEND_MSG_BACK and producer messages with a `DELAY` property both go this way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::message::{format_properties, parse_properties, NewMessage, PROP_DELAY};
use crate::store::persist::{load_json, save_json};
use crate::store::topics::now_ms;
use crate::store::{MessageStore, StoreError};

pub use crate::store::message::{DELAY_LEVELS_MS as LEVELS_MS, SCHEDULE_TOPIC};
/// Property: the topic a delayed message goes to when due.
pub const PROP_REAL_TOPIC: &str = "REAL_TOPIC";
/// Property: the queue a delayed message goes to when due.
pub const PROP_REAL_QID: &str = "REAL_QID";

/// Level to use for a requested level (clamped to the table).
pub fn clamp_level(level: i32) -> i32 {
    level.clamp(1, LEVELS_MS.len() as i32)
}

/// Wraps a message for delayed delivery at `level`.
pub fn delay(msg: &NewMessage, level: i32) -> NewMessage {
    let level = clamp_level(level);
    let mut props = parse_properties(&msg.properties);
    props.insert(PROP_REAL_TOPIC.into(), msg.topic.clone());
    props.insert(PROP_REAL_QID.into(), msg.queue_id.to_string());
    props.insert(PROP_DELAY.into(), level.to_string());
    NewMessage {
        topic: SCHEDULE_TOPIC.into(),
        queue_id: level - 1,
        properties: format_properties(&props),
        // The consume-queue tag code of a scheduled message is its delivery time.
        tags_code: now_ms() + LEVELS_MS[(level - 1) as usize],
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

    /// Delivers every due message once; returns how many moved.
    ///
    /// Progress is kept in memory per message moved, so an error part-way (or a slow disk)
    /// repeats nothing in this process. It is saved at the end of each level's pass, before
    /// an error is returned, and every 1,024 messages, each time only once the log
    /// is durable, so a power loss cannot mark as delivered a message whose copy was lost;
    /// a crash repeats at most what was moved since the last save.
    pub async fn deliver_due(&self, store: &MessageStore) -> Result<usize, StoreError> {
        let mut moved = 0;
        let now = now_ms();
        for level in 1..=LEVELS_MS.len() as i32 {
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
                    .deliver_batch(store, &q, now, &mut next, &mut moved)
                    .await;
                self.set_progress(level, next);
                let pass_over = !matches!(batch, Ok(true));
                if next != last_saved.0 && (pass_over || moved - last_saved.1 >= SAVE_EVERY) {
                    self.save(store).await?;
                    last_saved = (next, moved);
                }
                match batch {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(moved)
    }

    fn progress(&self, level: i32) -> u64 {
        let offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        offsets.offset_table.get(&level).copied().unwrap_or(0)
    }

    fn set_progress(&self, level: i32, next: u64) {
        let mut offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        offsets.offset_table.insert(level, next);
    }

    /// Moves the due messages of one batch of up to 64 from `next` on, advancing it past
    /// each one moved; `Ok(true)` when there may be more due.
    async fn deliver_batch(
        &self,
        store: &MessageStore,
        q: &crate::store::consume_queue::ConsumeQueue,
        now: i64,
        next: &mut u64,
        moved: &mut usize,
    ) -> Result<bool, StoreError> {
        let entries = q.get(*next, 64)?;
        if entries.is_empty() {
            return Ok(false);
        }
        for e in entries {
            if e.tags_code > now {
                return Ok(false);
            }
            let m = store.commitlog().read_message(e.offset)?;
            let mut props = parse_properties(&m.properties);
            let topic = props.remove(PROP_REAL_TOPIC);
            let qid = props.remove(PROP_REAL_QID).and_then(|q| q.parse().ok());
            props.remove(PROP_DELAY);
            if let (Some(topic), Some(queue_id)) = (topic, qid) {
                let properties = format_properties(&props);
                let real = NewMessage {
                    topic,
                    queue_id,
                    flag: m.flag,
                    body: m.body.clone(),
                    tags_code: NewMessage::tags_code_of(&properties),
                    properties,
                    sys_flag: m.sys_flag
                        & !(crate::store::message::FLAG_BORN_V6
                            | crate::store::message::FLAG_STORE_V6),
                    born_timestamp: m.born_timestamp,
                    born_host: m.born_host,
                    reconsume_times: m.reconsume_times,
                };
                store.put(std::slice::from_ref(&real)).await?;
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
        store.put(&[delay(&msg, 1)]).await.unwrap();
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
    async fn an_error_part_way_repeats_no_message_already_moved() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sched) = open(dir.path());
        let msg = |i: u8| NewMessage {
            topic: "T".into(),
            queue_id: 0,
            flag: 0,
            body: bytes::Bytes::from(vec![i; 10]),
            properties: String::new(),
            sys_flag: 0,
            born_timestamp: 0,
            born_host: "127.0.0.1:2".parse().unwrap(),
            reconsume_times: 0,
            tags_code: 0,
        };
        let mut stored = Vec::new();
        for i in 0..5 {
            stored.push(store.put(&[delay(&msg(i), 1)]).await.unwrap().remove(0));
        }
        // The third cannot be read any more: its bytes in the log are damaged.
        let log = dir.path().join("commitlog").join(format!("{:020}", 0));
        let file = std::fs::OpenOptions::new().write(true).open(log).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xFF; 8], stored[2].physical_offset + 8)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..2 {
            assert!(sched.deliver_due(&store).await.is_err());
        }
        assert_eq!(
            store.queue("T", 0).unwrap().max_offset(),
            2,
            "the two before the damaged one were delivered again"
        );
        // The progress made is saved: a restarted scheduler does not repeat them either.
        let again = Scheduler::load(dir.path()).unwrap();
        assert!(again.deliver_due(&store).await.is_err());
        assert_eq!(store.queue("T", 0).unwrap().max_offset(), 2);
        store.shutdown();
    }

    #[test]
    fn requested_level_reads_the_delay_property() {
        assert_eq!(requested_level("DELAY\u{1}3\u{2}TAGS\u{1}A\u{2}"), 3);
        assert_eq!(requested_level("TAGS\u{1}A\u{2}"), 0);
        assert_eq!(clamp_level(99), 18);
    }
}
