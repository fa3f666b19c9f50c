//! Committed consumer offsets, persisted in `config/consumerOffset.json` (RocketMQ's layout:
//! `{"offsetTable": {"topic@group": {"queueId": offset}}}`) every few seconds and at shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::persist::{load_json, save_json};
use super::StoreError;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OffsetsFile {
    offset_table: BTreeMap<String, BTreeMap<i32, i64>>,
}

/// Offsets per `topic@group` and queue.
#[derive(Debug)]
pub struct ConsumerOffsets {
    path: PathBuf,
    table: Mutex<OffsetsFile>,
    dirty: AtomicBool,
}

fn key(topic: &str, group: &str) -> String {
    format!("{topic}@{group}")
}

impl ConsumerOffsets {
    /// Loads the offsets from `path`, or starts empty.
    pub fn load(path: PathBuf) -> Result<ConsumerOffsets, StoreError> {
        let table = load_json::<OffsetsFile>(&path)?.unwrap_or_default();
        Ok(ConsumerOffsets {
            path,
            table: Mutex::new(table),
            dirty: AtomicBool::new(false),
        })
    }

    /// The committed offset of a group's queue.
    pub fn get(&self, group: &str, topic: &str, queue_id: i32) -> Option<i64> {
        lock(&self.table)
            .offset_table
            .get(&key(topic, group))
            .and_then(|q| q.get(&queue_id).copied())
    }

    /// Commits an offset.
    pub fn commit(&self, group: &str, topic: &str, queue_id: i32, offset: i64) {
        lock(&self.table)
            .offset_table
            .entry(key(topic, group))
            .or_default()
            .insert(queue_id, offset);
        self.dirty.store(true, Ordering::Release);
    }

    /// Every offset of `group`, by topic and queue.
    pub fn of_group(&self, group: &str) -> BTreeMap<String, BTreeMap<i32, i64>> {
        lock(&self.table)
            .offset_table
            .iter()
            .filter_map(|(k, v)| {
                let (topic, g) = k.rsplit_once('@')?;
                (g == group).then(|| (topic.to_string(), v.clone()))
            })
            .collect()
    }

    /// Forgets every offset of `group` (DELETE_SUBSCRIPTIONGROUP with cleanOffset); returns
    /// how many topics it had offsets for.
    pub fn remove_group(&self, group: &str) -> usize {
        self.remove_where(|_, g| g == group)
    }

    /// Forgets every group's offsets of `topic` (a deleted topic); returns how many groups
    /// had some.
    pub fn remove_topic(&self, topic: &str) -> usize {
        self.remove_where(|t, _| t == topic)
    }

    /// Forgets the offsets of every (topic, group) `gone` picks; returns how many.
    fn remove_where(&self, gone: impl Fn(&str, &str) -> bool) -> usize {
        let mut t = lock(&self.table);
        let before = t.offset_table.len();
        t.offset_table
            .retain(|k, _| k.rsplit_once('@').is_none_or(|(t, g)| !gone(t, g)));
        let removed = before - t.offset_table.len();
        if removed > 0 {
            self.dirty.store(true, Ordering::Release);
        }
        removed
    }

    /// Every `(topic, group)` pair with a committed offset.
    pub fn groups(&self) -> Vec<(String, String)> {
        lock(&self.table)
            .offset_table
            .keys()
            .filter_map(|k| k.rsplit_once('@'))
            .map(|(t, g)| (t.to_string(), g.to_string()))
            .collect()
    }

    /// The whole table as RocketMQ's consumerOffset.json body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&*lock(&self.table)).unwrap_or_default()
    }

    /// Takes every offset of a master's table (a slave keeps offsets of groups the master
    /// does not know, e.g. commits made while the master was down).
    pub fn merge_json(&self, body: &[u8]) -> Result<usize, serde_json::Error> {
        let other: OffsetsFile = crate::remoting::body::from_json(body)?;
        let mut n = 0;
        let mut t = lock(&self.table);
        for (key, queues) in other.offset_table {
            let mine = t.offset_table.entry(key).or_default();
            for (q, off) in queues {
                if mine.insert(q, off) != Some(off) {
                    n += 1;
                }
            }
        }
        drop(t);
        if n > 0 {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(n)
    }

    /// Saves the table if it changed since the last save.
    pub fn persist(&self) -> Result<(), StoreError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = lock(&self.table).clone();
        save_json(&self.path, &snapshot).inspect_err(|_| self.dirty.store(true, Ordering::Release))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
