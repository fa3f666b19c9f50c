//! `operator local FILE`: the same plan the cluster runs, as local processes. Name servers and
//! every group member run on 127.0.0.1 with their own ports and data directories, are
//! restarted when they crash (like a StatefulSet), and follow edits of FILE: groups added,
//! drained then stopped, members added or removed, config changes rolled out slaves first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::process::{Child, Command};

use crate::controller::{GroupAdmin, GroupRef};
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
    /// First broker port (each member takes three: remoting, HA, HTTP, in steps of 10).
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

/// The local cluster: processes by key ("ns-0", "<group>-<ordinal>").
pub struct LocalCluster {
    opts: LocalOptions,
    procs: BTreeMap<String, Supervised>,
    /// Config hash each running member was started with.
    hashes: BTreeMap<String, String>,
    draining: BTreeMap<String, Instant>,
    /// Groups started by this runtime that have not yet been given the cluster's topics,
    /// with how often that failed (their master may still be starting).
    unshared: BTreeMap<String, u32>,
    namesrv: String,
    admin: Arc<dyn GroupAdmin>,
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
            draining: BTreeMap::new(),
            unshared: BTreeMap::new(),
            namesrv: String::new(),
            admin,
        }
    }

    /// The name-server list clients should use.
    pub fn namesrv_addr(&self) -> &str {
        &self.namesrv
    }

    fn member_ports(&self, group: i32, ordinal: i32) -> (u16, u16, u16) {
        let base = self.opts.broker_port + 10 * (group as u16 * 8 + ordinal as u16);
        (base, base + 1, base + 2)
    }

    /// Address of a member's remoting port.
    pub fn member_addr(&self, group: i32, ordinal: i32) -> String {
        format!("127.0.0.1:{}", self.member_ports(group, ordinal).0)
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

    /// Moves the running processes toward `plan`: starts what is missing, rolls changed
    /// config (slaves first), drains and stops groups that are gone.
    pub async fn apply(&mut self, plan: &ClusterPlan) -> Result<(), LocalError> {
        let logs = self.dir("logs")?;
        let ns_addrs: Vec<String> = (0..plan.name_server.replicas)
            .map(|i| format!("127.0.0.1:{}", self.opts.namesrv_port + 2 * i as u16))
            .collect();
        self.namesrv = ns_addrs.join(";");
        for i in 0..plan.name_server.replicas {
            let key = format!("{}-{i}", plan.name_server.name);
            if self.procs.contains_key(&key) {
                continue;
            }
            let port = self.opts.namesrv_port + 2 * i as u16;
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
            if let Some(mut p) = self.procs.remove(&key) {
                p.stop(Duration::from_secs(20)).await;
            }
        }
        let mut wanted = std::collections::BTreeSet::new();
        for g in &plan.groups {
            // Highest ordinal first: slaves restart before their master, as in a StatefulSet.
            for m in g.members.iter().rev() {
                let key = m.pod.clone();
                wanted.insert(key.clone());
                let (port, ha, http) = self.member_ports(g.index, m.ordinal);
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
                let conf_path = self.dir("conf")?.join(format!("{key}.conf"));
                // The name-server list is part of the config: brokers restart to learn a
                // changed one (a stopped name server would otherwise keep their registrations).
                let hash = format!("{}|{}", g.config_hash, self.namesrv);
                let fresh = self.hashes.get(&key) != Some(&hash);
                if fresh {
                    std::fs::write(&conf_path, &conf).map_err(|source| LocalError::Io {
                        path: conf_path.clone(),
                        source,
                    })?;
                }
                match self.procs.get_mut(&key) {
                    Some(_) if !fresh => continue,
                    Some(p) => {
                        tracing::info!(member = %key, "config changed; restarting");
                        p.stop(Duration::from_secs(20)).await;
                        p.spawn()?;
                    }
                    None => {
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
                    }
                }
                self.hashes.insert(key, hash);
            }
        }
        // Members no longer planned: slaves of kept groups just stop; whole groups drain first.
        let planned_groups: std::collections::BTreeSet<&str> =
            plan.groups.iter().map(|g| g.name.as_str()).collect();
        let gone: Vec<String> = self
            .procs
            .keys()
            .filter(|k| !k.starts_with(&plan.name_server.name) && !wanted.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let group = key
                .rsplit_once('-')
                .map(|(g, _)| g.to_string())
                .unwrap_or_default();
            if planned_groups.contains(group.as_str()) {
                tracing::info!(member = %key, "member removed; stopping");
                if let Some(mut p) = self.procs.remove(&key) {
                    p.stop(Duration::from_secs(20)).await;
                }
                self.hashes.remove(&key);
                continue;
            }
            self.drain_group(plan, &group).await;
        }
        Ok(())
    }

    async fn drain_group(&mut self, plan: &ClusterPlan, group: &str) {
        let gref = self.group_ref(plan, group);
        if !self.draining.contains_key(group) {
            match self.admin.make_read_only(&gref).await {
                Ok(()) => {
                    tracing::info!(
                        group,
                        "group is read-only; waiting for consumers before stopping it"
                    );
                    self.draining.insert(group.to_string(), Instant::now());
                    // A group on its way out takes no topics.
                    self.unshared.remove(group);
                }
                Err(e) => {
                    tracing::warn!(group, error = %e, "cannot make the group read-only yet");
                    return;
                }
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
                    if let Some(mut p) = self.procs.remove(key) {
                        p.stop(Duration::from_secs(20)).await;
                    }
                    self.hashes.remove(key);
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
                Err(e) => {
                    let failures = self.unshared.entry(group.clone()).or_insert(0);
                    *failures += 1;
                    // Every tick while the master starts; complain every 30 s or so.
                    if failures.is_multiple_of(60) {
                        tracing::warn!(group = %group, error = %e, "cannot give the new group its topics yet");
                    } else {
                        tracing::debug!(group = %group, error = %e, "new group not ready for topics");
                    }
                }
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
    let mut plan = plan_file(&opts.file)?;
    let mut cluster = LocalCluster::new(opts.clone(), admin);
    cluster.apply(&plan).await?;
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
                    cluster.member_addr(g.index, m.ordinal),
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
        match round_trip(cluster.namesrv_addr()).await {
            Ok(n) => println!("round trip OK: sent and received {n} messages"),
            Err(e) => println!("round trip failed: {e} (the cluster keeps running; see the logs)"),
        }
    }
    let mut mtime = modified(&opts.file);
    let stop = crate::wait_for_signal();
    tokio::pin!(stop);
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
        if changed || !cluster.draining().is_empty() {
            if let Err(e) = cluster.apply(&plan).await {
                eprintln!("applying {}: {e}", opts.file.display());
            }
        }
        cluster.share_topics(&plan).await; // nothing to do once every new group has them
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
    use futures::future::BoxFuture;

    struct NoAdmin;

    impl GroupAdmin for NoAdmin {
        fn make_read_only<'a>(&'a self, _: &'a GroupRef) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn drained<'a>(&'a self, _: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async { Ok(true) })
        }
        fn share_topics<'a>(
            &'a self,
            _: &'a GroupRef,
        ) -> BoxFuture<'a, Result<Vec<String>, String>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    fn cluster_file(dir: &Path, name_servers: i32) -> PathBuf {
        let file = dir.join("cluster.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: ferromq.io/v1alpha1\nkind: BrokerCluster\nmetadata: {{name: t}}\n\
                 spec:\n  nameServer: {{replicas: {name_servers}}}\n  broker: {{masters: 1}}\n"
            ),
        )
        .unwrap();
        file
    }

    #[tokio::test]
    async fn fewer_name_servers_in_the_file_stop_the_extra_ones() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Stand-ins for the real binaries: they only have to stay up.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for name in ["mqnamesrv", "mqbroker"] {
            let path = bin.join(name);
            std::fs::write(&path, "#!/bin/sh\nexec sleep 600\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let opts = LocalOptions {
            file: cluster_file(dir.path(), 3),
            data_dir: dir.path().join("data"),
            namesrv_port: 19_000,
            broker_port: 19_100,
            bin_dir: bin,
        };
        let mut cluster = LocalCluster::new(opts.clone(), Arc::new(NoAdmin));
        cluster
            .apply(&plan_file(&opts.file).unwrap())
            .await
            .unwrap();
        let name_servers = |c: &LocalCluster| {
            c.procs
                .keys()
                .filter(|k| k.contains("-nameserver-"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(name_servers(&cluster).len(), 3);
        let smaller = cluster_file(dir.path(), 1);
        cluster.apply(&plan_file(&smaller).unwrap()).await.unwrap();
        assert_eq!(name_servers(&cluster), vec!["t-nameserver-0".to_string()]);
        assert_eq!(cluster.namesrv_addr(), "127.0.0.1:19000");
        // The broker was restarted with a config naming only the remaining name server.
        let conf =
            std::fs::read_to_string(opts.data_dir.join("conf").join("t-broker-0-0.conf")).unwrap();
        assert!(conf.contains("namesrvAddr=127.0.0.1:19000\n"), "{conf}");
        cluster.stop().await;
    }
}
