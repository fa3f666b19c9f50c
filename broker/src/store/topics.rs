//! Topic configurations of a broker, persisted in `config/topics.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::persist::JsonTable;
use super::StoreError;

/// Permission bit: the topic may be read.
pub const PERM_READ: i32 = 4;
/// Permission bit: the topic may be written.
pub const PERM_WRITE: i32 = 2;
/// Permission bit: the topic may serve as a template for auto-creation.
pub const PERM_INHERIT: i32 = 1;

/// The template topic producers name when their topic has no route yet.
pub const AUTO_CREATE_TOPIC: &str = "TBW102";

/// Whether `name` is one of RocketMQ's internal topics (the auto-creation template, the delay
/// queue, retry and dead-letter topics, and the `rmq_sys_`/`RMQ_SYS_` families; a cluster's
/// reply topic depends on the cluster's name, see `server::relay::reply_topic`), as opposed
/// to a topic a user created.
pub fn is_system_topic(name: &str) -> bool {
    const NAMES: &[&str] = &[
        AUTO_CREATE_TOPIC,
        crate::store::message::SCHEDULE_TOPIC,
        "SELF_TEST_TOPIC",
        "OFFSET_MOVED_EVENT",
        "TRANS_CHECK_MAX_TIME_TOPIC",
    ];
    const PREFIXES: &[&str] = &["%RETRY%", "%DLQ%", "rmq_sys_", "RMQ_SYS_"];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How a topic is laid out on this broker (RocketMQ's TopicConfig, same JSON names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicConfig {
    /// Topic name.
    pub topic_name: String,
    /// Queues consumers read.
    pub read_queue_nums: i32,
    /// Queues producers write.
    pub write_queue_nums: i32,
    /// Permission bits.
    pub perm: i32,
    /// Filter type (always SINGLE_TAG).
    #[serde(default = "single_tag")]
    pub topic_filter_type: String,
    /// Topic sysFlag.
    #[serde(default)]
    pub topic_sys_flag: i32,
    /// Whether the topic is ordered.
    #[serde(default)]
    pub order: bool,
}

fn single_tag() -> String {
    "SINGLE_TAG".to_string()
}

impl TopicConfig {
    /// A read-write topic with `queues` read and write queues.
    pub fn new(name: &str, queues: i32, perm: i32) -> Self {
        TopicConfig {
            topic_name: name.to_string(),
            read_queue_nums: queues,
            write_queue_nums: queues,
            perm,
            topic_filter_type: single_tag(),
            topic_sys_flag: 0,
            order: false,
        }
    }
}

/// RocketMQ's DataVersion: lets name servers skip unchanged registrations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVersion {
    /// When the table was last changed, ms.
    pub timestamp: i64,
    /// Change counter.
    pub counter: i64,
}

impl DataVersion {
    /// Marks a change of the table it versions.
    pub fn bump(&mut self) {
        self.counter += 1;
        self.timestamp = now_ms();
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TopicsFile {
    topic_config_table: BTreeMap<String, TopicConfig>,
    #[serde(default)]
    data_version: DataVersion,
}

/// The topic table, saved on every change (changes are rare).
#[derive(Debug)]
pub struct TopicTable(JsonTable<TopicsFile>);

impl TopicTable {
    /// Loads the table from `path`, or starts empty.
    pub fn load(path: PathBuf) -> Result<TopicTable, StoreError> {
        JsonTable::load(path).map(TopicTable)
    }

    /// The config of `topic`.
    pub fn get(&self, topic: &str) -> Option<TopicConfig> {
        self.0.read().topic_config_table.get(topic).cloned()
    }

    /// Every topic config, with the table version.
    pub fn snapshot(&self) -> (BTreeMap<String, TopicConfig>, DataVersion) {
        let t = self.0.read();
        (t.topic_config_table.clone(), t.data_version.clone())
    }

    /// Creates or replaces a topic and saves the table. Returns true if anything changed.
    pub fn put(&self, cfg: TopicConfig) -> Result<bool, StoreError> {
        self.change(|t| {
            if t.topic_config_table.get(&cfg.topic_name) == Some(&cfg) {
                return false;
            }
            t.topic_config_table.insert(cfg.topic_name.clone(), cfg);
            t.data_version.bump();
            true
        })
    }

    /// Removes a topic and saves the table; false when there was none.
    pub fn remove(&self, topic: &str) -> Result<bool, StoreError> {
        self.change(|t| {
            let removed = t.topic_config_table.remove(topic).is_some();
            if removed {
                t.data_version.bump();
            }
            removed
        })
    }

    /// Replaces the whole table with a master's (slaves); saves only when it differs.
    pub fn replace_all(
        &self,
        table: BTreeMap<String, TopicConfig>,
        version: DataVersion,
    ) -> Result<bool, StoreError> {
        self.change(|t| {
            if t.topic_config_table == table {
                return false;
            }
            t.topic_config_table = table;
            t.data_version = version;
            true
        })
    }

    /// Sets the permission of every topic (e.g. to drop write before a scale-in).
    pub fn set_all_perm(&self, perm: i32) -> Result<(), StoreError> {
        self.change(|t| {
            for cfg in t.topic_config_table.values_mut() {
                cfg.perm = perm;
            }
            t.data_version.bump();
            true
        })
        .map(drop)
    }

    fn change(&self, edit: impl FnOnce(&mut TopicsFile) -> bool) -> Result<bool, StoreError> {
        self.0.change(edit)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_whose_save_failed_is_not_kept_and_is_saved_when_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topics.json");
        let table = TopicTable::load(path.clone()).unwrap();
        // The save cannot create its temporary file.
        let blocker = path.with_extension("tmp");
        std::fs::create_dir(&blocker).unwrap();
        assert!(table.put(TopicConfig::new("T", 4, 6)).is_err());
        assert!(
            table.get("T").is_none(),
            "served a topic that was not saved"
        );
        std::fs::remove_dir(&blocker).unwrap();
        assert!(table.put(TopicConfig::new("T", 4, 6)).unwrap());
        let reloaded = TopicTable::load(path).unwrap();
        assert!(reloaded.get("T").is_some(), "the topic was never saved");
    }

    #[test]
    fn internal_topics_are_told_from_user_topics() {
        for t in [
            "TBW102",
            "SCHEDULE_TOPIC_XXXX",
            "%RETRY%g",
            "%DLQ%g",
            "rmq_sys_x",
            "RMQ_SYS_TRACE_TOPIC",
        ] {
            assert!(is_system_topic(t), "{t}");
        }
        for t in ["Orders", "TopicTest", "retry", "TBW1020"] {
            assert!(!is_system_topic(t), "{t}");
        }
    }
}
