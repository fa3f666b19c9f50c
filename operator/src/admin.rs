//! Day-2 actions on broker groups, through the broker crate's admin client (the same protocol
//! code mqadmin uses): before scale-in, wipe a group's write permission and wait until every
//! consumer group has consumed every queue it holds and no delayed message waits; after scale-out, give the new group the
//! topics the rest of the cluster serves, so producers' routes reach it.

use futures::future::BoxFuture;

use std::collections::BTreeMap;

use broker::client::Client;
use broker::remoting::body::ClusterInfo;
use broker::server::SCHEDULE_OFFSET_PREFIX;
use broker::store::topics::{is_system_topic, TopicConfig};

use crate::controller::{GroupAdmin, GroupRef};

/// The real actions, talking to the cluster's name servers and brokers.
#[derive(Default)]
pub struct BrokerAdmin;

async fn master_of(client: &Client, g: &GroupRef) -> Result<String, String> {
    let info = client.cluster_info().await.map_err(|e| e.to_string())?;
    master_in(&info, g)
}

/// The group's master address in cluster info already fetched.
fn master_in(info: &ClusterInfo, g: &GroupRef) -> Result<String, String> {
    info.broker_addr_table
        .get(&g.group)
        .and_then(|b| b.master_addr().map(String::from))
        .ok_or_else(|| format!("{} has no master registered with the name servers", g.group))
}

impl GroupAdmin for BrokerAdmin {
    fn make_read_only<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let master = master_of(&client, g).await?;
            client
                .wipe_write_perm(&g.group, &master)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn drained<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let master = master_of(&client, g).await?;
            let offsets = client
                .consumer_offsets(&master)
                .await
                .map_err(|e| e.to_string())?;
            for ((topic, group), queues) in offsets {
                for (queue, committed) in queues {
                    let max = client
                        .max_offset(&master, &topic, queue)
                        .await
                        .map_err(|e| e.to_string())?;
                    if committed < max {
                        tracing::info!(broker_group = %g.group, %topic, consumer_group = %group, queue, committed, max, "still draining");
                        return Ok(false);
                    }
                }
            }
            // Delayed messages and consumers' retries wait in the schedule topic until due;
            // once delivered they are in their topics, which the check above covers. The
            // broker reports each of its delay levels (its own messageDelayLevel's) as
            // "delivered,max".
            let info = client
                .runtime_info(&master)
                .await
                .map_err(|e| e.to_string())?;
            for (key, value) in &info {
                let Some(level) = key.strip_prefix(SCHEDULE_OFFSET_PREFIX) else {
                    continue;
                };
                let parsed = value
                    .split_once(',')
                    .and_then(|(d, m)| Some((d.parse::<u64>().ok()?, m.parse::<u64>().ok()?)));
                let Some((done, max)) = parsed else {
                    return Err(format!(
                        "the broker reported {key}={value:?}, not \"delivered,max\""
                    ));
                };
                if done < max {
                    tracing::info!(broker_group = %g.group, level, waiting = max - done, "delayed messages still waiting");
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn share_topics<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let info = client.cluster_info().await.map_err(|e| e.to_string())?;
            let master = master_in(&info, g)?;
            let held = client
                .broker_topics(&master)
                .await
                .map_err(|e| e.to_string())?;
            // A sync-double-write master answers SLAVE_NOT_AVAILABLE until a slave connects:
            // routes should reach the group only once it can keep its promise.
            let facts = client
                .runtime_info(&master)
                .await
                .map_err(|e| e.to_string())?;
            let role = facts.get("brokerRole").map(String::as_str);
            let slaves = facts.get("slaveCount").map(String::as_str);
            if role == Some("SYNC_MASTER") && slaves == Some("0") {
                return Err(format!(
                    "{} is a SYNC_MASTER with no slave connected yet",
                    g.group
                ));
            }
            let mut wanted: BTreeMap<String, TopicConfig> = BTreeMap::new();
            for (group, data) in &info.broker_addr_table {
                let Some(addr) = data.master_addr() else {
                    continue;
                };
                if *group == g.group {
                    continue;
                }
                let topics = client
                    .broker_topics(addr)
                    .await
                    .map_err(|e| format!("reading topics of {group}: {e}"))?;
                for (name, cfg) in topics.topic_config_table {
                    // Ordered topics keep the groups they were placed on: more queues elsewhere
                    // would reorder them.
                    if is_system_topic(&name) || cfg.order {
                        continue;
                    }
                    merge_topic(&mut wanted, cfg);
                }
            }
            let mut created = Vec::new();
            for cfg in wanted.into_values() {
                if held.topic_config_table.contains_key(&cfg.topic_name) {
                    continue; // already there (auto-created, or an earlier attempt got this far)
                }
                client
                    .create_topic(&master, &cfg)
                    .await
                    .map_err(|e| format!("creating {} on {}: {e}", cfg.topic_name, g.group))?;
                created.push(cfg.topic_name);
            }
            Ok(created)
        })
    }
}

/// Adds `cfg` to the topics a new group should get. When groups disagree, the most permissive
/// copy wins: a group being drained holds its topics read-only, which a new group must not
/// inherit.
pub fn merge_topic(wanted: &mut BTreeMap<String, TopicConfig>, cfg: TopicConfig) {
    match wanted.get(&cfg.topic_name) {
        Some(have) if have.perm >= cfg.perm => {}
        _ => {
            wanted.insert(cfg.topic_name.clone(), cfg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writable_copy_of_a_topic_wins_over_a_drained_one() {
        let mut wanted = BTreeMap::new();
        merge_topic(&mut wanted, TopicConfig::new("Orders", 8, 4));
        merge_topic(&mut wanted, TopicConfig::new("Orders", 4, 6));
        merge_topic(&mut wanted, TopicConfig::new("Orders", 2, 4));
        merge_topic(&mut wanted, TopicConfig::new("Audit", 1, 6));
        assert_eq!(wanted["Orders"].perm, 6);
        assert_eq!(wanted["Orders"].write_queue_nums, 4);
        assert_eq!(wanted.len(), 2);
    }
}
