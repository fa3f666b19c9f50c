//! Subscription group configurations (Java's `SubscriptionGroupConfig`), persisted in
//! `config/subscriptionGroup.json`. A group needs none to consume: these are the groups an
//! operator configured with `mqadmin updateSubGroup`, to pause one (`consumeEnable`) or set
//! its retries.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::persist::JsonTable;
use super::topics::DataVersion;
use super::StoreError;

/// One group's settings, with Java's JSON names; fields ferromq does not act on are kept as
/// they came, so a tool reading them back sees what it wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionGroupConfig {
    /// Group name.
    pub group_name: String,
    /// Whether the group may pull at all (false pauses it: pulls get NO_PERMISSION).
    #[serde(default = "yes")]
    pub consume_enable: bool,
    /// Queues of the group's retry topic when it is created.
    #[serde(default = "one")]
    pub retry_queue_nums: i32,
    /// Retries before a message goes to the dead-letter topic, for clients that do not send
    /// their own limit.
    #[serde(default = "sixteen")]
    pub retry_max_times: i32,
    /// Every other field Java's tools send (consumeBroadcastEnable, brokerId, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}

fn one() -> i32 {
    1
}

fn sixteen() -> i32 {
    16
}

impl SubscriptionGroupConfig {
    /// A group with Java's defaults.
    pub fn new(group: &str) -> Self {
        SubscriptionGroupConfig {
            group_name: group.to_string(),
            consume_enable: true,
            retry_queue_nums: 1,
            retry_max_times: 16,
            other: BTreeMap::new(),
        }
    }
}

/// GET_ALL_SUBSCRIPTIONGROUP_CONFIG's body and the file's content (Java's
/// `SubscriptionGroupWrapper`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupsFile {
    /// Groups by name.
    #[serde(default)]
    pub subscription_group_table: BTreeMap<String, SubscriptionGroupConfig>,
    /// Version of the table.
    #[serde(default)]
    pub data_version: DataVersion,
}

/// The configured subscription groups, saved on every change.
#[derive(Debug)]
pub struct GroupTable(JsonTable<GroupsFile>);

impl GroupTable {
    /// Loads the table from `path`, or starts empty.
    pub fn load(path: PathBuf) -> Result<GroupTable, StoreError> {
        JsonTable::load(path).map(GroupTable)
    }

    /// The settings of `group`, if an operator configured it.
    pub fn get(&self, group: &str) -> Option<SubscriptionGroupConfig> {
        self.0.read().subscription_group_table.get(group).cloned()
    }

    /// Whether `group` may pull (not paused with consumeEnable=false).
    pub fn consume_enabled(&self, group: &str) -> bool {
        self.0
            .read()
            .subscription_group_table
            .get(group)
            .is_none_or(|g| g.consume_enable)
    }

    /// The whole table, with its version.
    pub fn snapshot(&self) -> GroupsFile {
        self.0.read().clone()
    }

    /// Creates or replaces a group's settings; returns whether anything changed.
    pub fn put(&self, cfg: SubscriptionGroupConfig) -> Result<bool, StoreError> {
        self.0.change(|t| {
            if t.subscription_group_table.get(&cfg.group_name) == Some(&cfg) {
                return false;
            }
            t.subscription_group_table
                .insert(cfg.group_name.clone(), cfg);
            t.data_version.bump();
            true
        })
    }

    /// Forgets a group's settings; returns whether it had any.
    pub fn remove(&self, group: &str) -> Result<bool, StoreError> {
        self.0.change(|t| {
            let removed = t.subscription_group_table.remove(group).is_some();
            if removed {
                t.data_version.bump();
            }
            removed
        })
    }

    /// Takes a master's table (slaves); saves only when it differs.
    pub fn replace_all(&self, theirs: GroupsFile) -> Result<bool, StoreError> {
        self.0.change(|t| {
            if t.subscription_group_table == theirs.subscription_group_table {
                return false;
            }
            *t = theirs;
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_javas_fields_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subscriptionGroup.json");
        let t = GroupTable::load(path.clone()).unwrap();
        // As Java's updateSubGroup sends it.
        let sent = br#"{"groupName":"G","consumeEnable":false,"consumeFromMinEnable":true,"consumeBroadcastEnable":true,"retryQueueNums":2,"retryMaxTimes":5,"brokerId":0,"whichBrokerWhenConsumeSlowly":1,"notifyConsumerIdsChangedEnable":true}"#;
        let cfg: SubscriptionGroupConfig = serde_json::from_slice(sent).unwrap();
        assert!(t.put(cfg.clone()).unwrap());
        assert!(!t.put(cfg).unwrap(), "the same settings changed the table");
        let again = GroupTable::load(path).unwrap();
        let g = again.get("G").unwrap();
        assert!(!g.consume_enable);
        assert_eq!((g.retry_queue_nums, g.retry_max_times), (2, 5));
        assert_eq!(g.other["whichBrokerWhenConsumeSlowly"], 1);
        let json = serde_json::to_value(again.snapshot()).unwrap();
        assert_eq!(
            json["subscriptionGroupTable"]["G"]["notifyConsumerIdsChangedEnable"],
            true
        );
        assert!(again.remove("G").unwrap());
        assert!(again.get("G").is_none());
        // Defaults for what a tool leaves out.
        let sparse: SubscriptionGroupConfig =
            serde_json::from_slice(br#"{"groupName":"H"}"#).unwrap();
        assert_eq!(sparse, SubscriptionGroupConfig::new("H"));
    }
}
