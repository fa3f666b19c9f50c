//! `operator local FILE`: the same plan the cluster runs, as local processes. Name servers and
//! every group member run on 127.0.0.1 with their own ports and data directories, are
//! restarted when they crash (like a StatefulSet), and follow edits of FILE: groups added,
//! drained then stopped, members added or removed, config changes rolled out one ready member
//! at a time (slaves first, group after group), as the operator does in a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::controller::{GroupAdmin, GroupRef, SettingsError};
use crate::crd::BrokerCluster;
use crate::plan::{plan, ClusterPlan};

/// Why the local runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// FILE could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A process could not be started.
    #[error("cannot start {what}: {reason}")]
    Spawn {
        /// Which process.
        what: String,
        /// Cause.
        reason: String,
    },
    /// A directory or config file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The members' ports do not fit: past 65535, or over the name servers' ports.
    #[error("cannot lay out ports: {0}")]
    Ports(String),
    /// A member restarted by a rollout was not ready in time; the rollout stops there and
    /// goes on once it is (or once its config changes again).
    #[error("{member} not ready {waited:?} after its restart (see its log); the rollout waits for it before restarting another member")]
    NotReady {
        /// The member.
        member: String,
        /// How long the rollout waited.
        waited: Duration,
    },
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// BrokerCluster file.
    pub file: PathBuf,
    /// Data and logs.
    pub data_dir: PathBuf,
    /// First name-server port (each takes two: remoting, HTTP).
    pub namesrv_port: u16,
    /// First broker port (each member takes three: remoting, HA, HTTP, in steps of 10; a
    /// member keeps its ports while it runs, a new one takes the lowest free step).
    pub broker_port: u16,
    /// Directory holding mqnamesrv and mqbroker.
    pub bin_dir: PathBuf,
}

/// Reads and parses a BrokerCluster file.
pub fn read_cluster(path: &Path) -> Result<BrokerCluster, LocalError> {
    let text = std::fs::read_to_string(path).map_err(|e| LocalError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    serde_yaml::from_str(&text).map_err(|e| LocalError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Plans a BrokerCluster file for the local runtime.
pub fn plan_file(path: &Path) -> Result<ClusterPlan, LocalError> {
    let bc = read_cluster(path)?;
    let name = bc.metadata.name.clone().unwrap_or_else(|| "local".into());
    plan(&name, "local", &bc.spec, "local").map_err(|e| LocalError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// A process the runtime keeps alive.
struct Supervised {
    what: String,
    cmd: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    restarts: u32,
    next_start: Instant,
}

impl Supervised {
    fn spawn(&mut self) -> Result<(), LocalError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| LocalError::Io {
                path: self.log.clone(),
                source,
            })?;
        let err = log.try_clone().map_err(|source| LocalError::Io {
            path: self.log.clone(),
            source,
        })?;
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| LocalError::Spawn {
                what: self.what.clone(),
                reason: format!("{}: {e}", self.cmd[0]),
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Restarts the process if it exited, with a growing delay between crashes.
    fn check(&mut self) {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            Some(Ok(None)) => None,
            None => Some("not running".into()),
        };
        let Some(why) = exited else { return };
        if Instant::now() < self.next_start {
            return;
        }
        self.restarts += 1;
        tracing::warn!(process = %self.what, reason = %why, restarts = self.restarts, log = %self.log.display(), "process exited; restarting");
        self.next_start =
            Instant::now() + Duration::from_millis(500 * u64::from(self.restarts.min(10)));
        if let Err(e) = self.spawn() {
            tracing::error!(process = %self.what, error = %e, "restart failed");
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

/// Ports between one broker member's first port and the next one's (it uses three: remoting,
/// HA, HTTP).
const PORTS_PER_MEMBER: u32 = 10;
/// How long a rollout waits for a restarted member's `/readyz` before it stops and reports it.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a rollout asks a restarted member whether it is ready.
const READY_POLL: Duration = Duration::from_millis(200);

/// Tells whether a member serves again: a rollout restarts the next member only then, as a
/// StatefulSet waits for the restarted pod to be Ready.
trait Readiness: Send + Sync {
    /// Whether `member`, with its HTTP port at `http_port`, is ready.
    fn ready<'a>(&'a self, member: &'a str, http_port: u16) -> BoxFuture<'a, bool>;
}

/// Asks the member's `/readyz`, as a broker pod's readiness probe does.
struct HttpReadiness;

impl Readiness for HttpReadiness {
    fn ready<'a>(&'a self, _member: &'a str, http_port: u16) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let ask = async {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await?;
                s.write_all(
                    b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )
                .await?;
                let mut answer = Vec::new();
                s.take(1024).read_to_end(&mut answer).await?;
                Ok::<_, std::io::Error>(answer.split(|b| *b == b' ').nth(1) == Some(b"200"))
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(2), ask).await,
                Ok(Ok(true))
            )
        })
    }
}

/// Gives every wanted member a port slot (`PORTS_PER_MEMBER` ports each from the first broker
/// port): a member holding one keeps it, so a running broker never changes ports when the
/// spec changes, and a new member takes the lowest slot nobody holds (members still draining
/// or about to stop included). One slot per member whatever slavesPerMaster is, so no two
/// members share a port; a fresh start lays the members out in plan order.
fn assign_slots(held: &BTreeMap<String, u32>, wanted: &[String]) -> BTreeMap<String, u32> {
    let taken: BTreeSet<u32> = held.values().copied().collect();
    let mut slots = held.clone();
    let mut next = 0;
    for member in wanted {
        if slots.contains_key(member) {
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        slots.insert(member.clone(), next);
        next += 1;
    }
    slots
}

/// First port of `slot`, which may lie past 65535.
fn slot_base(first: u16, slot: u32) -> u64 {
    u64::from(first) + u64::from(slot) * u64::from(PORTS_PER_MEMBER)
}

/// Remoting, HA and HTTP ports of `slot`, or `None` past port 65535.
fn slot_ports(first: u16, slot: u32) -> Option<[u16; 3]> {
    let last = u16::try_from(slot_base(first, slot) + 2).ok()?;
    Some([last - 2, last - 1, last])
}

/// First port of each name server (each takes two: remoting, HTTP), refused past 65535.
fn name_server_ports(first: u16, replicas: i32) -> Result<Vec<u16>, LocalError> {
    (0..replicas.max(0))
        .map(|i| {
            let port = u64::from(first) + 2 * u64::from(i.unsigned_abs());
            u16::try_from(port + 1).map(|http| http - 1).map_err(|_| {
                LocalError::Ports(format!(
                    "name server {i} would need ports {port}-{}, past 65535: use a lower --namesrv-port",
                    port + 1
                ))
            })
        })
        .collect()
}

/// The local cluster: processes by key ("ns-0", "<group>-<ordinal>").
pub struct LocalCluster {
    opts: LocalOptions,
    procs: BTreeMap<String, Supervised>,
    /// Config hash each running member was started with.
    hashes: BTreeMap<String, String>,
    /// Port slot of each member (see [`assign_slots`]).
    slots: BTreeMap<String, u32>,
    /// Groups being drained, and whether their write wipe has succeeded yet.
    draining: BTreeMap<String, bool>,
    /// Members a rollout restarted that were not ready in time: no other member restarts
    /// before they are.
    unready: BTreeSet<String>,
    /// Groups started by this runtime that have not yet been given the cluster's topics,
    /// with how often that failed (their master may still be starting).
    unshared: BTreeMap<String, u32>,
    /// Groups whose settings changeable at run time are to be pushed to their members, with
    /// how often that failed (they may still be starting).
    settings_pending: BTreeMap<String, u32>,
    /// What each group's members were last brought to (see `live_key`).
    settings_pushed: BTreeMap<String, String>,
    namesrv: String,
    admin: Arc<dyn GroupAdmin>,
    readiness: Arc<dyn Readiness>,
    ready_timeout: Duration,
}

/// Counts a failed attempt of a per-group action tried every tick while the group starts
/// (its master may not be registered yet): logged as `what` every 30 s or so, quietly between.
fn retry_later(pending: &mut BTreeMap<String, u32>, group: &str, e: &str, what: &str) {
    let failures = pending.entry(group.to_string()).or_insert(0);
    *failures += 1;
    if failures.is_multiple_of(60) {
        tracing::warn!(group, error = %e, "{what}");
    } else {
        tracing::debug!(group, error = %e, "{what}");
    }
}

fn set_key(conf: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut found = false;
    for line in conf.lines() {
        if line.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            out.push_str(&format!("{key}={value}\n"));
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&format!("{key}={value}\n"));
    }
    out
}

impl LocalCluster {
    /// A runtime for `opts` (nothing runs until [`LocalCluster::apply`]).
    pub fn new(opts: LocalOptions, admin: Arc<dyn GroupAdmin>) -> LocalCluster {
        LocalCluster {
            opts,
            procs: BTreeMap::new(),
            hashes: BTreeMap::new(),
            slots: BTreeMap::new(),
            draining: BTreeMap::new(),
            unready: BTreeSet::new(),
            unshared: BTreeMap::new(),
            settings_pending: BTreeMap::new(),
            settings_pushed: BTreeMap::new(),
            namesrv: String::new(),
            admin,
            readiness: Arc::new(HttpReadiness),
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// The name-server list clients should use.
    pub fn namesrv_addr(&self) -> &str {
        &self.namesrv
    }

    fn member_ports(&self, member: &str) -> Result<[u16; 3], LocalError> {
        self.slots
            .get(member)
            .and_then(|s| slot_ports(self.opts.broker_port, *s))
            .ok_or_else(|| LocalError::Ports(format!("{member} has no ports")))
    }

    /// Address of a member's remoting port (`None` for a member not laid out).
    pub fn member_addr(&self, member: &str) -> Option<String> {
        let [port, _, _] = self.member_ports(member).ok()?;
        Some(format!("127.0.0.1:{port}"))
    }

    fn bin(&self, name: &str) -> String {
        self.opts.bin_dir.join(name).to_string_lossy().into_owned()
    }

    fn dir(&self, sub: &str) -> Result<PathBuf, LocalError> {
        let d = self.opts.data_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|source| LocalError::Io {
            path: d.clone(),
            source,
        })?;
        Ok(d)
    }

    /// Port slots once `plan` applies: members that run keep theirs, new ones get free ones.
    /// Refuses a layout past port 65535 or over the name servers' ports (`ns_ports`).
    fn layout(
        &self,
        plan: &ClusterPlan,
        ns_ports: &[u16],
    ) -> Result<BTreeMap<String, u32>, LocalError> {
        let held: BTreeMap<String, u32> = self
            .slots
            .iter()
            .filter(|(k, _)| self.procs.contains_key(*k))
            .map(|(k, s)| (k.clone(), *s))
            .collect();
        let wanted: Vec<String> = plan.pods().map(String::from).collect();
        let slots = assign_slots(&held, &wanted);
        let first = self.opts.broker_port;
        for (member, slot) in &slots {
            let Some(ports) = slot_ports(first, *slot) else {
                let base = slot_base(first, *slot);
                return Err(LocalError::Ports(format!(
                    "{member} would need ports {base}-{}, past 65535 ({} broker members take {PORTS_PER_MEMBER} ports each from --broker-port {first}): use a lower --broker-port or fewer members",
                    base + 2,
                    slots.len()
                )));
            };
            if let Some(port) = ports
                .iter()
                .find(|p| ns_ports.iter().any(|n| **p == *n || **p == *n + 1))
            {
                return Err(LocalError::Ports(format!(
                    "{member}'s port {port} is a name server's: choose --broker-port and --namesrv-port further apart"
                )));
            }
        }
        Ok(slots)
    }

    /// Moves the running processes toward `plan`: starts what is missing, rolls changed
    /// config (see [`LocalCluster::roll_groups`]), drains and stops groups that are gone. A
    /// plan whose ports do not fit changes nothing.
    pub async fn apply(&mut self, plan: &ClusterPlan) -> Result<(), LocalError> {
        let ns_ports = name_server_ports(self.opts.namesrv_port, plan.name_server.replicas)?;
        self.slots = self.layout(plan, &ns_ports)?;
        let logs = self.dir("logs")?;
        self.namesrv = ns_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(";");
        for (i, port) in ns_ports.iter().enumerate() {
            let key = format!("{}-{i}", plan.name_server.name);
            if self.procs.contains_key(&key) {
                continue;
            }
            let mut p = Supervised {
                what: key.clone(),
                cmd: vec![
                    self.bin("mqnamesrv"),
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                    "--http-port".into(),
                    (port + 1).to_string(),
                    "--kv-peers".into(),
                    self.namesrv.clone(),
                ],
                log: logs.join(format!("{key}.log")),
                child: None,
                restarts: 0,
                next_start: Instant::now(),
            };
            p.spawn()?;
            self.procs.insert(key, p);
        }
        // Name servers past the planned count stop; brokers restart below with the new list.
        let ns_prefix = format!("{}-", plan.name_server.name);
        let extra_ns: Vec<String> = self
            .procs
            .keys()
            .filter(|k| {
                k.strip_prefix(&ns_prefix)
                    .and_then(|i| i.parse::<i32>().ok())
                    .is_some_and(|i| i >= plan.name_server.replicas)
            })
            .cloned()
            .collect();
        for key in extra_ns {
            tracing::info!(member = %key, "name server removed; stopping");
            self.forget(&key).await;
        }
        // A rollout that stopped (a member not ready in time) still lets drains go on.
        let rolled = self.roll_groups(plan, &logs).await;
        // Members no longer planned: slaves of kept groups just stop; whole groups drain first.
        let planned_groups: BTreeSet<&str> = plan.groups.iter().map(|g| g.name.as_str()).collect();
        let wanted: BTreeSet<&str> = plan.pods().collect();
        let gone: Vec<String> = self
            .procs
            .keys()
            .filter(|k| !k.starts_with(&plan.name_server.name) && !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        let mut gone_groups = BTreeSet::new();
        for key in gone {
            let group = key
                .rsplit_once('-')
                .map(|(g, _)| g.to_string())
                .unwrap_or_default();
            if planned_groups.contains(group.as_str()) {
                tracing::info!(member = %key, "member removed; stopping");
                self.forget(&key).await;
            } else {
                gone_groups.insert(group);
            }
        }
        for group in gone_groups {
            self.drain_group(plan, &group).await;
        }
        rolled
    }

    /// Starts missing members and restarts those whose config changed, group after group and
    /// slaves before their master, each restart waiting for the member's `/readyz` before the
    /// next one, as the cluster's StatefulSets and rollout order do (a config change never
    /// takes a whole group, or every master, down at once). A group whose scale-in was
    /// reverted before its drain finished restarts the same way: the broker keeps the write
    /// wipe in memory and has no call to undo it, so only a restart makes it writable again.
    async fn roll_groups(&mut self, plan: &ClusterPlan, logs: &Path) -> Result<(), LocalError> {
        for g in &plan.groups {
            if self.draining.remove(&g.name).is_some() {
                tracing::info!(group = %g.name, "scale-in reverted: restarting the group to make it writable");
                for m in &g.members {
                    self.hashes.remove(&m.pod);
                }
            }
        }
        // The name-server list is part of the config: brokers restart to learn a changed one
        // (a stopped name server would otherwise keep their registrations).
        let current: BTreeMap<String, String> = plan
            .groups
            .iter()
            .flat_map(|g| {
                let hash = format!("{}|{}", g.config_hash, self.namesrv);
                g.members.iter().map(move |m| (m.pod.clone(), hash.clone()))
            })
            .collect();
        for g in &plan.groups {
            // Highest ordinal first: slaves restart before their master, as in a StatefulSet.
            for m in g.members.iter().rev() {
                let key = m.pod.clone();
                let hash = format!("{}|{}", g.config_hash, self.namesrv);
                let running = self.procs.contains_key(&key);
                if running && self.hashes.get(&key) == Some(&hash) {
                    continue;
                }
                if running {
                    self.wait_for_unready(&current).await?;
                }
                let [port, ha, http] = self.member_ports(&key)?;
                let store = self.dir(&format!("store/{key}"))?;
                let mut conf = g.broker_conf.clone();
                for (k, v) in [
                    ("listenPort", port.to_string()),
                    ("haListenPort", ha.to_string()),
                    ("httpPort", http.to_string()),
                    ("namesrvAddr", self.namesrv.clone()),
                    ("storePathRootDir", store.to_string_lossy().into_owned()),
                    ("brokerIP1", "127.0.0.1".to_string()),
                    ("registerNameServerPeriod", "5000".to_string()),
                    ("brokerNotActiveTimeoutMillis", "15000".to_string()),
                ] {
                    conf = set_key(&conf, k, &v);
                }
                // Written only when the member's turn comes: a member crashing before then
                // restarts with the config it had, not the new one out of turn.
                let conf_path = self.dir("conf")?.join(format!("{key}.conf"));
                std::fs::write(&conf_path, &conf).map_err(|source| LocalError::Io {
                    path: conf_path.clone(),
                    source,
                })?;
                if let Some(p) = self.procs.get_mut(&key) {
                    tracing::info!(member = %key, "config changed; restarting");
                    p.stop(Duration::from_secs(20)).await;
                    p.spawn()?;
                    self.hashes.insert(key.clone(), hash);
                    self.unready.insert(key.clone());
                    self.wait_ready(&key).await?;
                    continue;
                }
                let mut p = Supervised {
                    what: key.clone(),
                    cmd: vec![
                        self.bin("mqbroker"),
                        "-c".into(),
                        conf_path.to_string_lossy().into_owned(),
                        "--pod-name".into(),
                        key.clone(),
                        "--pod-ip".into(),
                        "127.0.0.1".into(),
                    ],
                    log: logs.join(format!("{key}.log")),
                    child: None,
                    restarts: 0,
                    next_start: Instant::now(),
                };
                p.spawn()?;
                self.procs.insert(key.clone(), p);
                if m.ordinal == 0 {
                    self.unshared.insert(g.name.clone(), 0);
                }
                self.hashes.insert(key, hash);
            }
        }
        // Settings brokers take while running are pushed to them rather than restarting
        // them (see push_settings), to a group whose file's values changed since the last
        // push (a value changed by hand on a broker stays until then).
        for g in &plan.groups {
            if self.settings_pushed.get(&g.name) != Some(&self.live_key(g)) {
                self.settings_pending.entry(g.name.clone()).or_insert(0);
            }
        }
        Ok(())
    }

    /// What a group's pushed settings depend on: the file's values and the name servers.
    fn live_key(&self, g: &crate::plan::BrokerGroupPlan) -> String {
        format!("{}|{}", g.live_hash, self.namesrv)
    }

    /// Brings the settings brokers change while running to the file's on the members of the
    /// groups an apply marked, once they are registered (a broker saves them to its own
    /// broker.conf, so a restart keeps them).
    pub async fn push_settings(&mut self, plan: &ClusterPlan) {
        let pending: Vec<String> = self.settings_pending.keys().cloned().collect();
        for group in pending {
            let Some(g) = plan.groups.iter().find(|g| g.name == group) else {
                self.settings_pending.remove(&group);
                continue;
            };
            // The members run with this runtime's name servers, not the plan's Service.
            let wanted: Vec<(String, String)> = g
                .live_settings
                .iter()
                .map(|(k, v)| match k.as_str() {
                    "namesrvAddr" => (k.clone(), self.namesrv.clone()),
                    _ => (k.clone(), v.clone()),
                })
                .collect();
            let gref = self.group_ref(plan, &group);
            match self.admin.apply_settings(&gref, &wanted).await {
                Ok(done) => {
                    if !done.changed.is_empty() {
                        tracing::info!(group = %group, changed = ?done.changed, "settings changed without a restart");
                    }
                    // A member not registered (restarting, say) is checked at the next tick.
                    if done.checked >= g.members.len() {
                        self.settings_pending.remove(&group);
                        let key = self.live_key(g);
                        self.settings_pushed.insert(group.clone(), key);
                    }
                }
                Err(SettingsError::NotYet(e)) => retry_later(
                    &mut self.settings_pending,
                    &group,
                    &e,
                    "cannot change the group's settings yet",
                ),
                Err(SettingsError::Refused(e)) => {
                    // Not asked again until the next edit; a restart takes the file's.
                    tracing::warn!(group = %group, error = %e, "settings refused; members take them when they restart");
                    self.settings_pending.remove(&group);
                    let key = self.live_key(g);
                    self.settings_pushed.insert(group.clone(), key);
                }
            }
        }
    }

    /// Before a rollout restarts another member: waits for the members earlier restarts left
    /// unready, except those that restart again anyway (their config changed since, perhaps
    /// to fix what kept them unready) or no longer run.
    async fn wait_for_unready(
        &mut self,
        current: &BTreeMap<String, String>,
    ) -> Result<(), LocalError> {
        let pending: Vec<String> = self.unready.iter().cloned().collect();
        for key in pending {
            if !self.procs.contains_key(&key) {
                self.unready.remove(&key);
            } else if current
                .get(&key)
                .is_some_and(|h| self.hashes.get(&key) == Some(h))
            {
                self.wait_ready(&key).await?;
            }
        }
        Ok(())
    }

    /// Waits until `member` is ready, restarting crashed processes meanwhile; reports a member
    /// still not ready after the timeout instead of waiting for ever.
    async fn wait_ready(&mut self, member: &str) -> Result<(), LocalError> {
        let [_, _, http] = self.member_ports(member)?;
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if self.readiness.ready(member, http).await {
                tracing::info!(member, "restarted member is ready");
                self.unready.remove(member);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let e = LocalError::NotReady {
                    member: member.to_string(),
                    waited: self.ready_timeout,
                };
                tracing::warn!(member, error = %e, "rollout stopped");
                return Err(e);
            }
            tokio::time::sleep(READY_POLL).await;
            self.supervise();
        }
    }

    /// Stops a process and forgets everything about it.
    async fn forget(&mut self, key: &str) {
        if let Some(mut p) = self.procs.remove(key) {
            p.stop(Duration::from_secs(20)).await;
        }
        self.hashes.remove(key);
        self.slots.remove(key);
        self.unready.remove(key);
    }

    /// One pass of draining `group`: makes it read-only on every pass, then stops it once
    /// consumers have caught up. The wipe is asserted again each pass because the broker
    /// holds it in memory only: a member restarted mid-drain would take writes again, and the
    /// group could be stopped with messages nobody consumed.
    async fn drain_group(&mut self, plan: &ClusterPlan, group: &str) {
        let gref = self.group_ref(plan, group);
        // Marked before the first wipe, so that a wipe which got halfway (the broker, not the
        // name servers) is undone as well if the scale-in is reverted.
        let wiped_before = *self.draining.entry(group.to_string()).or_insert_with(|| {
            tracing::info!(group, "group removed from the plan; draining it");
            false
        });
        // A group on its way out takes no topics.
        self.unshared.remove(group);
        match self.admin.make_read_only(&gref).await {
            Ok(()) if !wiped_before => {
                tracing::info!(
                    group,
                    "group is read-only; waiting for consumers before stopping it"
                );
                self.draining.insert(group.to_string(), true);
            }
            Ok(()) => tracing::debug!(group, "write wipe asserted again"),
            Err(e) => {
                tracing::warn!(group, error = %e, "cannot make the group read-only");
                return;
            }
        }
        match self.admin.drained(&gref).await {
            Ok(true) => {
                tracing::info!(group, "group drained; stopping it");
                let members: Vec<String> = self
                    .procs
                    .keys()
                    .filter(|k| k.rsplit_once('-').is_some_and(|(g, _)| g == group))
                    .cloned()
                    .collect();
                // Slaves first, then the master.
                for key in members.iter().rev() {
                    self.forget(key).await;
                }
                self.draining.remove(group);
            }
            Ok(false) => tracing::debug!(group, "still draining"),
            Err(e) => tracing::warn!(group, error = %e, "drain check failed"),
        }
    }

    /// How the admin actions name one of this runtime's groups.
    fn group_ref(&self, plan: &ClusterPlan, group: &str) -> GroupRef {
        GroupRef {
            cluster: plan.cluster.clone(),
            namespace: "local".into(),
            group: group.to_string(),
            namesrv_addr: self.namesrv.clone(),
        }
    }

    /// Gives newly started groups the topics the rest of the cluster serves (what
    /// `mqadmin updateTopic -c` would do), once their masters have registered.
    pub async fn share_topics(&mut self, plan: &ClusterPlan) {
        let pending: Vec<String> = self.unshared.keys().cloned().collect();
        for group in pending {
            let gref = self.group_ref(plan, &group);
            match self.admin.share_topics(&gref).await {
                Ok(created) => {
                    if !created.is_empty() {
                        tracing::info!(group = %group, topics = ?created, "new group got the cluster's topics");
                    }
                    self.unshared.remove(&group);
                }
                Err(e) => retry_later(
                    &mut self.unshared,
                    &group,
                    &e,
                    "cannot give the new group its topics yet",
                ),
            }
        }
    }

    /// Restarts crashed processes.
    pub fn supervise(&mut self) {
        for p in self.procs.values_mut() {
            p.check();
        }
    }

    /// Groups waiting for their consumers before they stop.
    pub fn draining(&self) -> Vec<String> {
        self.draining.keys().cloned().collect()
    }

    /// Stops every process: brokers (slaves first), then name servers.
    pub async fn stop(&mut self) {
        let keys: Vec<String> = self.procs.keys().rev().cloned().collect();
        let (ns, brokers): (Vec<String>, Vec<String>) =
            keys.into_iter().partition(|k| k.contains("-nameserver-"));
        for key in brokers.into_iter().chain(ns) {
            if let Some(mut p) = self.procs.remove(&key) {
                p.stop(Duration::from_secs(20)).await;
            }
        }
    }
}

/// Runs FILE until Ctrl-C, following its edits.
pub async fn run(
    opts: LocalOptions,
    admin: Arc<dyn GroupAdmin>,
    check: bool,
) -> Result<(), LocalError> {
    // Listened for from the start: starting the cluster and the round trip take up to a
    // minute, and a signal then must still stop what was started (the processes outlived
    // an operator stopped during its start and held the ports of the next run).
    let stop = crate::wait_for_signal();
    tokio::pin!(stop);
    let mut plan = plan_file(&opts.file)?;
    let mut cluster = LocalCluster::new(opts.clone(), admin);
    let started = tokio::select! {
        // First: its first poll installs the handlers, before the start spawns anything.
        biased;
        _ = &mut stop => None,
        started = cluster.apply(&plan) => Some(started),
    };
    match started {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            cluster.stop().await;
            return Err(e);
        }
        None => {
            println!("stopping...");
            cluster.stop().await;
            return Ok(());
        }
    }
    println!(
        "ferromq cluster {:?} running locally: {}",
        plan.cluster, plan.mode
    );
    println!("  name servers: {}", cluster.namesrv_addr());
    for g in &plan.groups {
        let members: Vec<String> = g
            .members
            .iter()
            .map(|m| {
                format!(
                    "{} {}",
                    cluster.member_addr(&m.pod).unwrap_or_default(),
                    m.role.as_str()
                )
            })
            .collect();
        println!("  {}: {}", g.name, members.join(", "));
    }
    println!("  data and logs: {}", opts.data_dir.display());
    println!(
        "  edit {} to scale; Ctrl-C stops everything",
        opts.file.display()
    );
    if check {
        let checked = tokio::select! {
            _ = &mut stop => None,
            checked = round_trip(cluster.namesrv_addr()) => Some(checked),
        };
        match checked {
            Some(Ok(n)) => println!("round trip OK: sent and received {n} messages"),
            Some(Err(e)) => {
                println!("round trip failed: {e} (the cluster keeps running; see the logs)")
            }
            None => {
                println!("stopping...");
                cluster.stop().await;
                return Ok(());
            }
        }
    }
    let mut mtime = modified(&opts.file);
    // A rollout that stopped at a member not ready in time is taken up again next tick (other
    // errors wait for the next edit, so that a bad file is not reported twice a second).
    let mut retry = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        cluster.supervise();
        let now = modified(&opts.file);
        let changed = now != mtime;
        if changed {
            mtime = now;
            match plan_file(&opts.file) {
                Ok(p) => {
                    if p != plan {
                        println!("{} changed: {}", opts.file.display(), p.mode);
                    }
                    plan = p;
                }
                Err(e) => {
                    eprintln!("{e}; keeping the previous plan");
                    continue;
                }
            }
        }
        if changed || retry || !cluster.draining().is_empty() {
            // A rollout may wait a while for a member: Ctrl-C must not.
            let applied = tokio::select! {
                _ = &mut stop => break,
                applied = cluster.apply(&plan) => applied,
            };
            retry = matches!(applied, Err(LocalError::NotReady { .. }));
            if let Err(e) = applied {
                eprintln!("applying {}: {e}", opts.file.display());
            }
        }
        cluster.share_topics(&plan).await; // nothing to do once every new group has them
        cluster.push_settings(&plan).await; // nor once the members have the file's settings
    }
    println!("stopping...");
    cluster.stop().await;
    Ok(())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Sends a few messages through the cluster and reads every one of them back.
async fn round_trip(namesrv: &str) -> Result<usize, String> {
    use broker::client::{Client, Message, Producer, PullConsumer};
    let client = Client::new(broker::config::split_namesrv(namesrv));
    let topic = "ferromq-local-check";
    let producer = Producer::new(client.clone(), "ferromq-local");
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = broker::store::topics::now_ms();
    let mut sent = std::collections::BTreeSet::new();
    // Brokers register (and slaves connect) within moments of starting: retry until a send
    // is fully acknowledged.
    while sent.len() < 10 {
        let body = format!("hello {run} {}", sent.len());
        let msg = Message {
            topic: topic.into(),
            body: body.clone().into_bytes().into(),
            ..Default::default()
        };
        match producer.send(&msg).await {
            Ok(r) if r.is_ok() => {
                sent.insert(body);
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Ok(r) => return Err(format!("send answered status {}", r.status)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut consumer = PullConsumer::new(client, "ferromq-local-check", topic)
        .await
        .map_err(|e| e.to_string())?;
    let mut missing = sent.clone();
    while !missing.is_empty() && Instant::now() < deadline + Duration::from_secs(10) {
        for m in consumer
            .poll(Duration::from_millis(300))
            .await
            .map_err(|e| e.to_string())?
        {
            missing.remove(String::from_utf8_lossy(&m.message.body).as_ref());
        }
    }
    consumer.commit().await.map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        return Err(format!(
            "{} of {} messages never came back",
            missing.len(),
            sent.len()
        ));
    }
    Ok(sent.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::SettingsApplied;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// Drains that never finish unless told, counting the write wipes.
    #[derive(Default)]
    struct FakeAdmin {
        wipes: AtomicU32,
        drained: AtomicBool,
        settings_pushes: AtomicU32,
        last_wanted: std::sync::Mutex<Vec<(String, String)>>,
    }

    impl GroupAdmin for FakeAdmin {
        fn make_read_only<'a>(&'a self, _: &'a GroupRef) -> BoxFuture<'a, Result<(), String>> {
            self.wipes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn drained<'a>(&'a self, _: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>> {
            let drained = self.drained.load(Ordering::SeqCst);
            Box::pin(async move { Ok(drained) })
        }
        fn share_topics<'a>(
            &'a self,
            _: &'a GroupRef,
        ) -> BoxFuture<'a, Result<Vec<String>, String>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn apply_settings<'a>(
            &'a self,
            _: &'a GroupRef,
            wanted: &'a [(String, String)],
        ) -> BoxFuture<'a, Result<SettingsApplied, SettingsError>> {
            self.settings_pushes.fetch_add(1, Ordering::SeqCst);
            *self.last_wanted.lock().unwrap() = wanted.to_vec();
            // Two members a group in these tests.
            Box::pin(async {
                Ok(SettingsApplied {
                    checked: 2,
                    changed: Vec::new(),
                })
            })
        }
    }

    /// A member is ready once the stand-in broker has recorded a start since the last time it
    /// was found ready; each answer that finds it ready is recorded too ("ready <member>").
    struct FakeReadiness {
        events: PathBuf,
        never: bool,
    }

    impl Readiness for FakeReadiness {
        fn ready<'a>(&'a self, member: &'a str, _: u16) -> BoxFuture<'a, bool> {
            Box::pin(async move {
                if self.never {
                    return false;
                }
                let text = std::fs::read_to_string(&self.events).unwrap_or_default();
                let (start, ready) = (format!("start {member}"), format!("ready {member}"));
                let started = text
                    .lines()
                    .rev()
                    .take_while(|l| *l != ready)
                    .any(|l| l == start);
                if started {
                    append(&self.events, &ready);
                }
                started
            })
        }
    }

    fn append(path: &Path, line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    fn recorded(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Waits until the stand-in brokers have recorded `n` starts, then clears the record.
    async fn settle(path: &Path, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while recorded(path)
            .iter()
            .filter(|l| l.starts_with("start "))
            .count()
            < n
        {
            assert!(Instant::now() < deadline, "{:?}", recorded(path));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(path, "").unwrap();
    }

    /// A plan of cluster `t` with `spec` (YAML under `spec:`), as `operator local` reads it.
    fn plan_of(dir: &Path, spec: &str) -> ClusterPlan {
        let file = dir.join("cluster.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: ferromq.io/v1alpha1\nkind: BrokerCluster\nmetadata: {{name: t}}\n\
                 spec:\n{spec}"
            ),
        )
        .unwrap();
        plan_file(&file).unwrap()
    }

    /// A runtime whose binaries are stand-ins that stay up (the broker records each start in
    /// the returned events file), with a fake readiness reading that file.
    fn local(dir: &Path, admin: Arc<FakeAdmin>) -> (LocalCluster, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let events = dir.join("events");
        for (name, script) in [
            ("mqnamesrv", "#!/bin/sh\nexec sleep 600\n".to_string()),
            (
                "mqbroker",
                // Arguments: -c CONF --pod-name MEMBER --pod-ip IP.
                format!(
                    "#!/bin/sh\necho \"start $4\" >> {}\nexec sleep 600\n",
                    events.display()
                ),
            ),
        ] {
            let path = bin.join(name);
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let opts = LocalOptions {
            file: dir.join("cluster.yaml"),
            data_dir: dir.join("data"),
            namesrv_port: 19_000,
            broker_port: 19_100,
            bin_dir: bin,
        };
        let mut cluster = LocalCluster::new(opts, admin);
        cluster.readiness = Arc::new(FakeReadiness {
            events: events.clone(),
            never: false,
        });
        (cluster, events)
    }

    const TWO_BY_ONE: &str =
        "  nameServer: {replicas: 1}\n  broker: {masters: 2, slavesPerMaster: 1}\n";
    const ONE_BY_ONE: &str =
        "  nameServer: {replicas: 1}\n  broker: {masters: 1, slavesPerMaster: 1}\n";

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn fewer_name_servers_in_the_file_stop_the_extra_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cluster, _) = local(dir.path(), Arc::default());
        let three = "  nameServer: {replicas: 3}\n  broker: {masters: 1}\n";
        cluster.apply(&plan_of(dir.path(), three)).await.unwrap();
        let name_servers = |c: &LocalCluster| {
            c.procs
                .keys()
                .filter(|k| k.contains("-nameserver-"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(name_servers(&cluster).len(), 3);
        let one = "  nameServer: {replicas: 1}\n  broker: {masters: 1}\n";
        cluster.apply(&plan_of(dir.path(), one)).await.unwrap();
        assert_eq!(name_servers(&cluster), vec!["t-nameserver-0".to_string()]);
        assert_eq!(cluster.namesrv_addr(), "127.0.0.1:19000");
        // The broker was restarted with a config naming only the remaining name server.
        let conf = std::fs::read_to_string(dir.path().join("data/conf/t-broker-0-0.conf")).unwrap();
        assert!(conf.contains("namesrvAddr=127.0.0.1:19000\n"), "{conf}");
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_drain_makes_the_group_read_only_again_on_every_pass() {
        let dir = tempfile::tempdir().unwrap();
        let admin = Arc::new(FakeAdmin::default());
        let (mut cluster, _) = local(dir.path(), admin.clone());
        cluster
            .apply(&plan_of(dir.path(), TWO_BY_ONE))
            .await
            .unwrap();
        let smaller = plan_of(dir.path(), ONE_BY_ONE);
        for _ in 0..3 {
            cluster.apply(&smaller).await.unwrap();
        }
        // A member restarted mid-drain forgets the wipe: every pass asserts it again.
        assert_eq!(admin.wipes.load(Ordering::SeqCst), 3);
        assert_eq!(cluster.draining(), vec!["t-broker-1".to_string()]);
        admin.drained.store(true, Ordering::SeqCst);
        cluster.apply(&smaller).await.unwrap();
        assert!(cluster.draining().is_empty());
        assert!(!cluster.procs.contains_key("t-broker-1-0"));
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_reverted_scale_in_restarts_the_group_slaves_first_so_it_takes_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cluster, events) = local(dir.path(), Arc::default());
        let full = plan_of(dir.path(), TWO_BY_ONE);
        cluster.apply(&full).await.unwrap();
        settle(&events, 4).await;
        cluster
            .apply(&plan_of(dir.path(), ONE_BY_ONE))
            .await
            .unwrap();
        assert_eq!(cluster.draining(), vec!["t-broker-1".to_string()]);
        cluster.apply(&full).await.unwrap();
        assert!(cluster.draining().is_empty());
        assert_eq!(
            recorded(&events),
            lines(&[
                "start t-broker-1-1",
                "ready t-broker-1-1",
                "start t-broker-1-0",
                "ready t-broker-1-0",
            ])
        );
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_config_change_restarts_one_member_at_a_time_slaves_first_group_after_group() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cluster, events) = local(dir.path(), Arc::default());
        cluster
            .apply(&plan_of(dir.path(), TWO_BY_ONE))
            .await
            .unwrap();
        settle(&events, 4).await;
        let changed = "  nameServer: {replicas: 1}\n  broker: {masters: 2, slavesPerMaster: 1, config: {flushIntervalCommitLog: \"200\"}}\n";
        cluster.apply(&plan_of(dir.path(), changed)).await.unwrap();
        // Each member restarts only once the one before it is ready.
        assert_eq!(
            recorded(&events),
            lines(&[
                "start t-broker-0-1",
                "ready t-broker-0-1",
                "start t-broker-0-0",
                "ready t-broker-0-0",
                "start t-broker-1-1",
                "ready t-broker-1-1",
                "start t-broker-1-0",
                "ready t-broker-1-0",
            ])
        );
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_setting_brokers_change_while_running_is_pushed_to_them_not_restarted_for() {
        let dir = tempfile::tempdir().unwrap();
        let admin = Arc::new(FakeAdmin::default());
        let (mut cluster, events) = local(dir.path(), admin.clone());
        let first = plan_of(dir.path(), TWO_BY_ONE);
        cluster.apply(&first).await.unwrap();
        settle(&events, 4).await;
        cluster.push_settings(&first).await;
        assert_eq!(
            admin.settings_pushes.load(Ordering::SeqCst),
            2,
            "once per group"
        );
        cluster.push_settings(&first).await;
        assert_eq!(
            admin.settings_pushes.load(Ordering::SeqCst),
            2,
            "nothing pending"
        );
        // Applying the same file again (a drain or a retry does every tick) pushes nothing.
        cluster.apply(&first).await.unwrap();
        cluster.push_settings(&first).await;
        assert_eq!(
            admin.settings_pushes.load(Ordering::SeqCst),
            2,
            "pushed again"
        );
        let live = plan_of(
            dir.path(),
            "  nameServer: {replicas: 1}\n  broker: {masters: 2, slavesPerMaster: 1, config: {fileReservedTime: \"48\"}}\n",
        );
        cluster.apply(&live).await.unwrap();
        cluster.push_settings(&live).await;
        assert_eq!(admin.settings_pushes.load(Ordering::SeqCst), 4);
        // The file's value, and this runtime's name servers rather than the plan's Service.
        let wanted = admin.last_wanted.lock().unwrap().clone();
        let value = |k: &str| {
            wanted
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(value("fileReservedTime").as_deref(), Some("48"));
        assert_eq!(value("namesrvAddr").as_deref(), Some("127.0.0.1:19000"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(recorded(&events).is_empty(), "{:?}", recorded(&events));
        cluster.stop().await;
    }

    #[tokio::test]
    async fn a_member_not_ready_in_time_stops_the_rollout_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cluster, events) = local(dir.path(), Arc::default());
        cluster
            .apply(&plan_of(dir.path(), TWO_BY_ONE))
            .await
            .unwrap();
        settle(&events, 4).await;
        cluster.readiness = Arc::new(FakeReadiness {
            events: events.clone(),
            never: true,
        });
        cluster.ready_timeout = Duration::from_millis(300);
        let changed = plan_of(
            dir.path(),
            "  nameServer: {replicas: 1}\n  broker: {masters: 2, slavesPerMaster: 1, config: {flushIntervalCommitLog: \"200\"}}\n",
        );
        for _ in 0..2 {
            let err = cluster.apply(&changed).await.unwrap_err();
            assert!(
                matches!(&err, LocalError::NotReady { member, .. } if member == "t-broker-0-1"),
                "{err}"
            );
        }
        // Neither pass restarted the master (or anything else) while the slave is not ready.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(recorded(&events), lines(&["start t-broker-0-1"]));
        cluster.stop().await;
    }

    #[tokio::test]
    async fn the_http_probe_takes_only_a_200_from_readyz_as_ready() {
        async fn serving(answer: &'static str) -> u16 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let mut request = [0u8; 256];
                    let _ = s.read(&mut request).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            });
            port
        }
        let ready = serving("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n").await;
        let unready =
            serving("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nnot ready\n")
                .await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // dropped: nothing listens there any more
        assert!(HttpReadiness.ready("m", ready).await);
        assert!(!HttpReadiness.ready("m", unready).await);
        assert!(!HttpReadiness.ready("m", closed).await);
    }

    fn all_ports(cluster: &LocalCluster, slots: &BTreeMap<String, u32>) -> Vec<u16> {
        slots
            .values()
            .flat_map(|s| slot_ports(cluster.opts.broker_port, *s).unwrap())
            .collect()
    }

    #[test]
    fn no_two_members_share_a_port_whatever_slaves_per_master() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, _) = local(dir.path(), Arc::default());
        let plan = plan_of(
            dir.path(),
            "  nameServer: {replicas: 2}\n  broker: {masters: 3, slavesPerMaster: 9}\n",
        );
        let slots = cluster.layout(&plan, &[19_000, 19_002]).unwrap();
        assert_eq!(slots.len(), 30);
        let ports = all_ports(&cluster, &slots);
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 90);
        // A fresh start lays members out in plan order, one step of ten each.
        assert_eq!(slots.get("t-broker-1-0"), Some(&10));
        assert_eq!(slot_ports(19_100, 10), Some([19_200, 19_201, 19_202]));
    }

    #[test]
    fn members_keep_their_ports_when_slaves_are_added_and_new_ones_take_free_ports() {
        let members = |masters: i32, slaves: i32| -> Vec<String> {
            (0..masters)
                .flat_map(|g| (0..=slaves).map(move |o| format!("t-broker-{g}-{o}")))
                .collect()
        };
        let before = assign_slots(&BTreeMap::new(), &members(2, 1));
        let after = assign_slots(&before, &members(3, 2));
        for (member, slot) in &before {
            assert_eq!(after.get(member), Some(slot), "{member} moved");
        }
        let distinct: BTreeSet<u32> = after.values().copied().collect();
        assert_eq!(distinct.len(), after.len());
        assert_eq!(after.len(), 9);
    }

    #[tokio::test]
    async fn ports_past_65535_or_over_the_name_servers_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cluster, _) = local(dir.path(), Arc::default());
        let huge = plan_of(
            dir.path(),
            "  nameServer: {replicas: 1}\n  broker: {masters: 1000, slavesPerMaster: 6}\n",
        );
        let err = cluster.apply(&huge).await.unwrap_err();
        assert!(
            matches!(&err, LocalError::Ports(why) if why.contains("past 65535")),
            "{err}"
        );
        assert!(cluster.procs.is_empty());
        cluster.opts.namesrv_port = 19_100;
        let err = cluster
            .apply(&plan_of(dir.path(), ONE_BY_ONE))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LocalError::Ports(why) if why.contains("name server")),
            "{err}"
        );
        assert!(cluster.procs.is_empty());
        cluster.opts.namesrv_port = 65_535;
        assert!(matches!(
            cluster.apply(&plan_of(dir.path(), ONE_BY_ONE)).await,
            Err(LocalError::Ports(_))
        ));
        assert!(cluster.procs.is_empty());
    }
}
