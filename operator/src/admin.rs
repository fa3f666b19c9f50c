//! Day-2 actions on broker groups, through the broker crate's admin client (the same protocol
//! code mqadmin uses): before scale-in, wipe a group's write permission and wait until every
//! consumer group has consumed every queue it holds and no delayed message waits; after scale-out, give the new group the
//! topics the rest of the cluster serves, so producers' routes reach it.

use futures::future::BoxFuture;

use std::collections::BTreeMap;

use broker::client::Client;
use broker::remoting::body::ClusterInfo;
use broker::server::transaction::{CHECK_GROUP, HALF_TOPIC};
use broker::server::{SCHEDULE_OFFSET_PREFIX, TIMER_OFFSET_KEY};
use broker::store::message::{DELAY_LEVELS_MS, SCHEDULE_TOPIC};
use broker::store::topics::{is_system_topic, TopicConfig};

use crate::controller::{GroupAdmin, GroupRef, SettingsApplied, SettingsError};

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
            let mut offsets = client
                .consumer_offsets(&master)
                .await
                .map_err(|e| e.to_string())?;
            // Transactions not yet decided wait in the half queue, whose checks' progress is
            // group CID_RMQ_SYS_TRANS's offset; before the first round there is none (0).
            offsets
                .entry((HALF_TOPIC.to_string(), CHECK_GROUP.to_string()))
                .or_default()
                .entry(0)
                .or_insert(0);
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
            // "delivered,max"; a broker too old to report them is asked level by level for
            // the default table's 18.
            let info = client
                .runtime_info(&master)
                .await
                .map_err(|e| e.to_string())?;
            let levels = match delay_progress(&info)? {
                Some(levels) => levels,
                None => {
                    let delivered = client
                        .delay_offsets(&master)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut levels = Vec::new();
                    for level in 1..=DELAY_LEVELS_MS.len() as i32 {
                        let max = client
                            .max_offset(&master, SCHEDULE_TOPIC, level - 1)
                            .await
                            .map_err(|e| e.to_string())?;
                        let done = delivered.get(&level).copied().unwrap_or(0);
                        levels.push((level.to_string(), done.max(0) as u64, max.max(0) as u64));
                    }
                    levels
                }
            };
            for (level, done, max) in levels {
                if done < max {
                    tracing::info!(broker_group = %g.group, %level, waiting = max - done, "delayed messages still waiting");
                    return Ok(false);
                }
            }
            // Timer messages (up to timerMaxDelaySec ahead) the same way, when reported.
            if let Some((done, max)) = timer_progress(&info)? {
                if done < max {
                    tracing::info!(broker_group = %g.group, waiting = max - done, "timer messages still waiting");
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn apply_settings<'a>(
        &'a self,
        g: &'a GroupRef,
        wanted: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<SettingsApplied, SettingsError>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let info = client
                .cluster_info()
                .await
                .map_err(|e| SettingsError::NotYet(e.to_string()))?;
            let Some(members) = info.broker_addr_table.get(&g.group) else {
                return Err(SettingsError::NotYet(format!(
                    "{} has no member registered with the name servers",
                    g.group
                )));
            };
            let mut done = SettingsApplied::default();
            let mut failed: Option<SettingsError> = None;
            for addr in members.broker_addrs.values() {
                let change = match client.broker_config(addr).await {
                    Ok(have) => settings_to_change(&have, wanted),
                    Err(e) => {
                        let e = settings_error(format!("reading the settings of {addr}"), e);
                        failed = Some(worse(failed, e));
                        continue;
                    }
                };
                if !change.is_empty() {
                    // The broker cannot save them (its broker.conf is the ConfigMap, which
                    // already holds them): its warning says so, and is expected.
                    if let Err(e) = client.update_broker_config(addr, &change).await {
                        let e = settings_error(format!("changing the settings of {addr}"), e);
                        failed = Some(worse(failed, e));
                        continue;
                    }
                    done.changed
                        .extend(change.iter().map(|(k, v)| format!("{addr}: {k}={v}")));
                }
                done.checked += 1;
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(done),
            }
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

/// A failed call to a member, sorted: an answer refusing the request (a broker too old to
/// know it, or refusing a value) will not change by asking again; anything else may.
fn settings_error(what: String, e: broker::remoting::connection::ClientError) -> SettingsError {
    match e {
        broker::remoting::connection::ClientError::Response { .. } => {
            SettingsError::Refused(format!("{what}: {e}"))
        }
        _ => SettingsError::NotYet(format!("{what}: {e}")),
    }
}

/// The failure to report of two: a refusal (which needs someone to act) over a member not
/// answering yet.
fn worse(a: Option<SettingsError>, b: SettingsError) -> SettingsError {
    match (a, b) {
        (Some(a @ SettingsError::Refused(_)), _) => a,
        (_, b) => b,
    }
}

/// The settings of `wanted` a broker whose settings are `have` differs on.
fn settings_to_change(
    have: &BTreeMap<String, String>,
    wanted: &[(String, String)],
) -> Vec<(String, String)> {
    wanted
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .cloned()
        .collect()
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

/// One delay level's progress: (level, messages delivered, its queue's end).
type LevelProgress = (String, u64, u64);

/// Each delay level's (level, delivered, queue end) from a broker's runtime info
/// (`scheduleMessageOffset_N` = "delivered,max"); none when the broker reports none.
fn delay_progress(
    info: &std::collections::BTreeMap<String, String>,
) -> Result<Option<Vec<LevelProgress>>, String> {
    let mut levels = Vec::new();
    for (key, value) in info {
        let Some(level) = key.strip_prefix(SCHEDULE_OFFSET_PREFIX) else {
            continue;
        };
        let (done, max) = delivered_max(key, value)?;
        levels.push((level.to_string(), done, max));
    }
    Ok((!levels.is_empty()).then_some(levels))
}

/// The timer queue's (delivered, end) offsets from a broker's runtime info
/// (`timerMessageOffset` = "delivered,max"); none when the broker reports none.
fn timer_progress(
    info: &std::collections::BTreeMap<String, String>,
) -> Result<Option<(u64, u64)>, String> {
    info.get(TIMER_OFFSET_KEY)
        .map(|value| delivered_max(TIMER_OFFSET_KEY, value))
        .transpose()
}

/// A runtime-info value of the form "delivered,max".
fn delivered_max(key: &str, value: &str) -> Result<(u64, u64), String> {
    value
        .split_once(',')
        .and_then(|(d, m)| Some((d.parse::<u64>().ok()?, m.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("the broker reported {key}={value:?}, not \"delivered,max\""))
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

    #[test]
    fn delay_progress_is_read_from_runtime_info_and_absent_from_an_older_broker() {
        let mut info = BTreeMap::new();
        info.insert("brokerRole".to_string(), "ASYNC_MASTER".to_string());
        // A broker from before these entries: the caller asks level by level instead.
        assert_eq!(delay_progress(&info).unwrap(), None);
        info.insert("scheduleMessageOffset_3".to_string(), "4,9".to_string());
        assert_eq!(
            delay_progress(&info).unwrap(),
            Some(vec![("3".to_string(), 4, 9)])
        );
        info.insert("scheduleMessageOffset_4".to_string(), "x".to_string());
        assert!(delay_progress(&info).is_err());
        // Timer messages: absent from an older broker, read like a level.
        assert_eq!(timer_progress(&info).unwrap(), None);
        info.insert("timerMessageOffset".to_string(), "7,12".to_string());
        assert_eq!(timer_progress(&info).unwrap(), Some((7, 12)));
        info.insert("timerMessageOffset".to_string(), "7".to_string());
        assert!(timer_progress(&info).is_err());
    }
}
