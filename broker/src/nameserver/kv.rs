//! The name server's KV config (Java's `KVConfigManager`): values by namespace and key, set with
//! PUT_KV_CONFIG (`mqadmin updateKvConfig`, and `updateTopic -o true`, which records a
//! globally ordered topic's queues under `ORDER_TOPIC_CONFIG`), saved to `kvConfig.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::persist::JsonTable;
use crate::store::StoreError;

/// The namespace whose values routes carry as `orderTopicConf`.
pub const ORDER_TOPIC_CONFIG: &str = "ORDER_TOPIC_CONFIG";

/// The file's content, in Java's layout.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvFile {
    /// Values by namespace, then key.
    #[serde(default)]
    pub config_table: BTreeMap<String, BTreeMap<String, String>>,
}

/// KV values, saved on every change when the name server has a file for them.
#[derive(Debug)]
pub struct KvConfig(JsonTable<KvFile>);

impl KvConfig {
    /// Loads the values from `path` (creating its directory), or keeps them in memory only.
    pub fn open(path: Option<PathBuf>) -> Result<KvConfig, StoreError> {
        let Some(path) = path else {
            return Ok(KvConfig(JsonTable::in_memory()));
        };
        if let Some(dir) = path.parent() {
            crate::store::commitlog::create_dir_durable(dir)?;
        }
        JsonTable::load(path).map(KvConfig)
    }

    /// The value of `key` in `namespace`.
    pub fn get(&self, namespace: &str, key: &str) -> Option<String> {
        self.0
            .read()
            .config_table
            .get(namespace)
            .and_then(|n| n.get(key).cloned())
    }

    /// Every value of `namespace` (none when it has none).
    pub fn namespace(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.0
            .read()
            .config_table
            .get(namespace)
            .filter(|n| !n.is_empty())
            .cloned()
    }

    /// Every value, by namespace.
    pub fn all(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.0.read().config_table.clone()
    }

    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.read().config_table.is_empty()
    }

    /// Adds the values of `table` not set here (a value set here meanwhile wins); returns
    /// how many were added.
    pub fn add_missing(
        &self,
        table: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<usize, StoreError> {
        let mut added = 0;
        self.0.change(|t| {
            for (namespace, values) in table {
                let ns = t.config_table.entry(namespace.clone()).or_default();
                for (k, v) in values {
                    if !ns.contains_key(k) {
                        ns.insert(k.clone(), v.clone());
                        added += 1;
                    }
                }
            }
            t.config_table.retain(|_, ns| !ns.is_empty());
            added > 0
        })?;
        Ok(added)
    }

    /// Sets a value.
    pub fn put(&self, namespace: &str, key: &str, value: &str) -> Result<(), StoreError> {
        self.0
            .change(|t| {
                let ns = t.config_table.entry(namespace.to_string()).or_default();
                ns.insert(key.to_string(), value.to_string()) != Some(value.to_string())
            })
            .map(drop)
    }

    /// Removes a value (and its namespace once empty).
    pub fn delete(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
        self.0
            .change(|t| {
                let Some(ns) = t.config_table.get_mut(namespace) else {
                    return false;
                };
                let removed = ns.remove(key).is_some();
                if ns.is_empty() {
                    t.config_table.remove(namespace);
                }
                removed
            })
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_by_namespace_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namesrv").join("kvConfig.json");
        let kv = KvConfig::open(Some(path.clone())).unwrap();
        kv.put(ORDER_TOPIC_CONFIG, "T", "broker-a:4").unwrap();
        kv.put("NS", "k", "v").unwrap();
        kv.delete("NS", "k").unwrap();
        let again = KvConfig::open(Some(path.clone())).unwrap();
        assert_eq!(
            again.get(ORDER_TOPIC_CONFIG, "T").as_deref(),
            Some("broker-a:4")
        );
        assert_eq!(again.namespace("NS"), None);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["configTable"][ORDER_TOPIC_CONFIG]["T"], "broker-a:4");
        // Without a file: kept in memory.
        let mem = KvConfig::open(None).unwrap();
        mem.put("NS", "k", "v").unwrap();
        assert_eq!(mem.get("NS", "k").as_deref(), Some("v"));
    }
}
