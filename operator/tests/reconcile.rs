//! Reconcile against an in-memory API server: create, no-op, scale out, drain-then-scale-in,
//! config changes (broker groups rolled one at a time), status, paused, invalid specs, objects the cluster does not control,
//! unreachable drains, StatefulSet fields the API server refuses to change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fake::FakeApi;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use operator::controller::{
    reconcile, Context, GroupAdmin, GroupRef, SettingsApplied, SettingsError,
    ANNOTATION_DRAIN_FAILING_SINCE, ANNOTATION_DRAIN_STARTED, ANNOTATION_WRITES_RESTORED,
};
use operator::crd::BrokerCluster;
use serde_json::json;

const NS: &str = "mq";

#[derive(Default)]
struct FakeAdmin {
    broken: AtomicBool,
    /// Whether only the wipe fails (e.g. the name servers refuse it).
    wipe_fails: AtomicBool,
    read_only: std::sync::Mutex<Vec<String>>,
    drained: AtomicBool,
    checks: AtomicUsize,
    /// Groups asked to take the cluster's topics.
    shared: std::sync::Mutex<Vec<String>>,
    /// Whether sharing topics fails (the new master is not registered yet).
    share_fails: AtomicBool,
    /// Settings pushed to groups: (group, key=value...).
    applied: std::sync::Mutex<Vec<(String, Vec<String>)>>,
    /// Whether the brokers refuse settings (too old to change them while running).
    settings_refused: AtomicBool,
}

impl GroupAdmin for FakeAdmin {
    fn make_read_only<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<(), String>> {
        self.read_only.lock().unwrap().push(g.group.clone());
        let broken = self.broken.load(Ordering::Relaxed) || self.wipe_fails.load(Ordering::Relaxed);
        Box::pin(async move {
            if broken {
                Err("broker unreachable".to_string())
            } else {
                Ok(())
            }
        })
    }
    fn drained<'a>(&'a self, _g: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let d = self.drained.load(Ordering::Relaxed);
        let broken = self.broken.load(Ordering::Relaxed);
        Box::pin(async move {
            if broken {
                Err("broker unreachable".to_string())
            } else {
                Ok(d)
            }
        })
    }
    fn apply_settings<'a>(
        &'a self,
        g: &'a GroupRef,
        wanted: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<SettingsApplied, SettingsError>> {
        let lines: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.applied
            .lock()
            .unwrap()
            .push((g.group.clone(), lines.clone()));
        let refused = self.settings_refused.load(Ordering::Relaxed);
        Box::pin(async move {
            if refused {
                return Err(SettingsError::Refused(
                    "changing the settings of 10.0.0.1:10911: request code 25 not supported".into(),
                ));
            }
            Ok(SettingsApplied {
                // Every member of any group these tests plan.
                checked: 64,
                changed: vec![format!("10.0.0.1:10911: {}", lines[0])],
            })
        })
    }
    fn share_topics<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<Vec<String>, String>> {
        self.shared.lock().unwrap().push(g.group.clone());
        let fails = self.share_fails.load(Ordering::Relaxed);
        Box::pin(async move {
            if fails {
                Err("demo-broker-2 has no master registered with the name servers".to_string())
            } else {
                Ok(vec!["Orders".to_string()])
            }
        })
    }
}

struct Harness {
    api: FakeApi,
    ctx: Arc<Context>,
    drain: Arc<FakeAdmin>,
}

fn harness(spec: serde_json::Value) -> Harness {
    let api = FakeApi::default();
    api.insert(
        "brokerclusters",
        NS,
        json!({"apiVersion": "ferromq.io/v1alpha1", "kind": "BrokerCluster", "metadata": {"name": "demo"}, "spec": spec}),
    );
    let client = api.client();
    let drain = Arc::new(FakeAdmin::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(
            client,
            Reporter {
                controller: "ferromq-operator".into(),
                instance: None,
            },
        ),
        "ferromq:test".into(),
        drain.clone(),
    ));
    Harness { api, ctx, drain }
}

impl Harness {
    async fn reconcile(&self) -> Vec<String> {
        self.reconcile_all()
            .await
            .into_iter()
            .filter(|w| !w.contains("events/"))
            .collect()
    }

    /// Every write of one reconcile, events included.
    async fn reconcile_all(&self) -> Vec<String> {
        let bcs: Api<BrokerCluster> = Api::namespaced(self.ctx.client.clone(), NS);
        let bc = bcs.get("demo").await.unwrap();
        self.api.take_writes();
        reconcile(Arc::new(bc), self.ctx.clone()).await.unwrap();
        // Events are informative, not state: leave them out of the write log.
        self.api
            .take_writes()
            .into_iter()
            .filter(|w| !w.contains("events/"))
            .collect()
    }

    fn status(&self) -> serde_json::Value {
        self.api.get("brokerclusters", NS, "demo").unwrap()["status"].clone()
    }

    fn condition(&self, t: &str) -> (String, String) {
        let c = self.condition_of(t);
        (
            c["status"].as_str().unwrap().to_string(),
            c["reason"].as_str().unwrap().to_string(),
        )
    }

    /// The message of condition `t`.
    fn message(&self, t: &str) -> String {
        self.condition_of(t)["message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn condition_of(&self, t: &str) -> serde_json::Value {
        self.status()["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
            .clone()
    }

    /// Every StatefulSet has rolled out its current spec: the controller saw its generation,
    /// and every pod is at the update revision and ready.
    fn mark_ready(&self) {
        for name in self.api.names("statefulsets") {
            self.mark_rolled(&name);
        }
    }

    /// StatefulSet `name` has rolled out its current spec (see [`Harness::mark_ready`]).
    fn mark_rolled(&self, name: &str) {
        let sts = self.api.get("statefulsets", NS, name).unwrap();
        self.mark_rolled_with_ready(name, sts["spec"]["replicas"].as_i64().unwrap_or(1));
    }

    /// The StatefulSet controller has seen `name`'s spec and updated its pods, of which
    /// `ready` are ready (the others Pending or crashing). As the real controller does, the
    /// update revision follows the pod template, and becomes the current revision only once
    /// every pod is updated and ready: a template change with a pod not ready stays rolling.
    fn mark_rolled_with_ready(&self, name: &str, ready: i64) {
        use std::hash::{Hash, Hasher};
        let sts = self.api.get("statefulsets", NS, name).unwrap();
        let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(1);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sts["spec"]["template"].to_string().hash(&mut hasher);
        let update = format!("{name}-{:x}", hasher.finish());
        let current = match sts["status"]["currentRevision"].as_str() {
            Some(current) if ready < replicas => current.to_string(),
            _ => update.clone(),
        };
        self.api.edit(
            "statefulsets",
            NS,
            name,
            json!({"status": {"observedGeneration": sts["metadata"]["generation"],
                "replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
                "currentReplicas": if current == update { replicas } else { 0 },
                "currentRevision": current, "updateRevision": update}}),
        );
    }

    /// The ConfigMap and StatefulSet writes of one reconcile (what restarts pods), sorted and
    /// once each: the API double drops, on a server-side apply, the topics-shared mark that a
    /// merge patch set (the API server keeps fields another manager owns), so an applied group
    /// is marked again in the same pass.
    async fn reconcile_pods(&self) -> Vec<String> {
        let mut writes: Vec<String> = self
            .reconcile()
            .await
            .into_iter()
            .filter(|w| w.contains("configmaps/") || w.contains("statefulsets/"))
            .collect();
        writes.sort();
        writes.dedup();
        writes
    }

    /// The requeue a reconcile asks for.
    async fn requeue(&self) -> Action {
        let bcs: Api<BrokerCluster> = Api::namespaced(self.ctx.client.clone(), NS);
        let bc = bcs.get("demo").await.unwrap();
        reconcile(Arc::new(bc), self.ctx.clone()).await.unwrap()
    }

    fn edit_spec(&self, broker: serde_json::Value) {
        self.api.edit(
            "brokerclusters",
            NS,
            "demo",
            json!({"spec": {"broker": broker}}),
        );
    }
}

fn sync_double_write() -> serde_json::Value {
    json!({"broker": {"masters": 2, "slavesPerMaster": 1, "replication": "Sync", "flush": "Async"}})
}

#[tokio::test]
async fn create_applies_every_object_in_order_and_reports_progress() {
    let h = harness(sync_double_write());
    let writes = h.reconcile().await;
    let kinds: Vec<&str> = writes
        .iter()
        .map(|w| w.split(['/', ' ']).nth(1).unwrap())
        .collect();
    // Services, ConfigMaps, PDBs, StatefulSets (last), then status.
    let order = [
        "services",
        "configmaps",
        "poddisruptionbudgets",
        "statefulsets",
        "brokerclusters",
    ];
    let mut last = 0;
    for k in &kinds {
        let pos = order.iter().position(|o| o == k).unwrap();
        assert!(pos >= last, "out of order: {writes:?}");
        last = pos;
    }
    let mut sts = h.api.names("statefulsets");
    sts.sort();
    assert_eq!(
        sts,
        vec!["demo-broker-0", "demo-broker-1", "demo-nameserver"]
    );
    assert_eq!(h.api.names("configmaps").len(), 2);
    let mut pdbs = h.api.names("poddisruptionbudgets");
    pdbs.sort();
    assert_eq!(
        pdbs,
        vec!["demo-broker-0", "demo-broker-1", "demo-nameserver"]
    );
    assert_eq!(h.api.names("services").len(), 4);
    let broker0 = h.api.get("statefulsets", NS, "demo-broker-0").unwrap();
    assert_eq!(broker0["spec"]["replicas"], 2);
    assert_eq!(broker0["metadata"]["ownerReferences"][0]["uid"], "uid-demo");
    assert_eq!(
        h.status()["mode"],
        "2 masters x 1 slave, sync double write, async flush"
    );
    assert_eq!(h.status()["observedGeneration"], 1);
    assert_eq!(h.condition("Ready").0, "False");
    assert_eq!(h.condition("Progressing").0, "True");
    assert_eq!(
        h.status()["groups"][0]["roles"],
        json!(["SYNC_MASTER", "SLAVE"])
    );
}

#[tokio::test]
async fn second_reconcile_with_nothing_changed_writes_nothing() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    assert_eq!(
        h.reconcile_all().await,
        Vec::<String>::new(),
        "not even an event"
    );
}

#[tokio::test]
async fn ready_members_make_the_cluster_ready() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    h.mark_ready();
    let mut writes = h.reconcile().await;
    writes.sort();
    assert_eq!(
        writes,
        vec![
            "PATCH brokerclusters/demo/status".to_string(),
            // Each group, once ready, has been given the cluster's topics.
            "PATCH statefulsets/demo-broker-0".to_string(),
            "PATCH statefulsets/demo-broker-1".to_string(),
        ]
    );
    assert_eq!(
        h.reconcile().await,
        Vec::<String>::new(),
        "then nothing to do"
    );
    assert_eq!(
        h.condition("Ready"),
        ("True".into(), "AllMembersReady".into())
    );
    assert_eq!(h.condition("Progressing").0, "False");
    assert_eq!(h.condition("Degraded").0, "False");
    assert_eq!(h.status()["groups"][1]["readyReplicas"], 2);
}

#[tokio::test]
async fn a_spec_change_is_not_ready_until_every_pod_has_rolled() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(h.condition("Ready").0, "True");
    h.edit_spec(json!({"flush": "Sync"}));
    h.reconcile().await;
    // Every pod is still ready, on the old broker.conf.
    assert_eq!(h.status()["groups"][0]["readyReplicas"], 2);
    assert_eq!(h.condition("Ready"), ("False".into(), "NotReady".into()));
    assert_eq!(h.condition("Progressing").0, "True");
    assert!(
        h.message("Ready").contains("demo-broker-0"),
        "{}",
        h.message("Ready")
    );
    // Groups roll one at a time: demo-broker-1 takes its new spec once demo-broker-0 is done.
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(h.condition("Ready").0, "False");
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(
        h.condition("Ready"),
        ("True".into(), "AllMembersReady".into())
    );
    assert_eq!(h.condition("Progressing").0, "False");
    // A pod template changed again: until the pods are on the update revision, not ready.
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-1",
        json!({"status": {"updateRevision": "demo-broker-1-next"}}),
    );
    h.reconcile().await;
    assert_eq!(h.condition("Ready").0, "False");
    assert!(
        h.message("Ready").contains("demo-broker-1"),
        "{}",
        h.message("Ready")
    );
}

#[tokio::test]
async fn scaling_masters_out_creates_exactly_one_group() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    h.edit_spec(json!({"masters": 3}));
    let mut writes = h.reconcile().await;
    writes.sort();
    assert_eq!(
        writes,
        vec![
            "PATCH brokerclusters/demo/status",
            "PATCH configmaps/demo-broker-2",
            "PATCH poddisruptionbudgets/demo-broker-2",
            "PATCH services/demo-broker-2",
            "PATCH statefulsets/demo-broker-2",
        ]
    );
}

#[tokio::test]
async fn scaling_masters_in_drains_the_group_before_deleting_it() {
    let h = harness(json!({"broker": {"masters": 3}}));
    h.reconcile().await;
    h.edit_spec(json!({"masters": 2}));
    // Not drained yet: the group is made read-only and kept.
    let writes = h.reconcile().await;
    assert_eq!(
        *h.drain.read_only.lock().unwrap(),
        vec!["demo-broker-2".to_string()]
    );
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-2").is_some());
    let sts = h.api.get("statefulsets", NS, "demo-broker-2").unwrap();
    assert!(sts["metadata"]["annotations"][ANNOTATION_DRAIN_STARTED].is_string());
    assert!(h.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "demo-broker-2" && g["draining"] == true));
    // Still not drained: read-only is asserted again on every pass, since a broker restarted
    // mid-drain forgets it and would take writes again.
    h.reconcile().await;
    h.reconcile().await;
    assert_eq!(
        *h.drain.read_only.lock().unwrap(),
        vec!["demo-broker-2".to_string(); 3]
    );
    assert_eq!(h.drain.checks.load(Ordering::Relaxed), 3);
    // Consumers caught up: everything of the group goes.
    h.drain.drained.store(true, Ordering::Relaxed);
    let mut writes = h.reconcile().await;
    writes.retain(|w| w.starts_with("DELETE"));
    writes.sort();
    assert_eq!(
        writes,
        vec![
            "DELETE configmaps/demo-broker-2",
            "DELETE poddisruptionbudgets/demo-broker-2",
            "DELETE services/demo-broker-2",
            "DELETE statefulsets/demo-broker-2",
        ]
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-2").is_none());
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_some());
}

#[tokio::test]
async fn a_draining_group_that_cannot_be_made_read_only_again_is_kept_and_reported() {
    let h = harness(json!({"broker": {"masters": 3}}));
    h.reconcile().await;
    h.edit_spec(json!({"masters": 2}));
    h.reconcile().await;
    // Its master restarted writable and the wipe fails this time: whatever the consumers'
    // offsets say, new messages may be arriving, so the group stays.
    h.drain.wipe_fails.store(true, Ordering::Relaxed);
    h.drain.drained.store(true, Ordering::Relaxed);
    h.reconcile().await;
    assert!(h.api.get("statefulsets", NS, "demo-broker-2").is_some());
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "DrainFailed".into())
    );
}

#[tokio::test]
async fn reverting_a_scale_in_makes_the_group_writable_again() {
    let h = harness(json!({"broker": {"masters": 3}}));
    h.reconcile().await;
    h.edit_spec(json!({"masters": 2}));
    h.reconcile().await;
    let restored = |h: &Harness| {
        h.api.get("statefulsets", NS, "demo-broker-2").unwrap()["spec"]["template"]["metadata"]
            ["annotations"][ANNOTATION_WRITES_RESTORED]
            .clone()
    };
    assert!(restored(&h).is_null());
    // Back to three masters before consumers caught up.
    h.edit_spec(json!({"masters": 3}));
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-2".to_string()),
        "{writes:?}"
    );
    let sts = h.api.get("statefulsets", NS, "demo-broker-2").unwrap();
    assert!(
        sts["metadata"]["annotations"][ANNOTATION_DRAIN_STARTED].is_null(),
        "{sts:#}"
    );
    // The broker keeps the wipe in memory only: its pods restart to become writable.
    assert!(restored(&h).is_string(), "{sts:#}");
    assert_eq!(h.drain.read_only.lock().unwrap().len(), 1);
    assert!(h.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["draining"] == false));
    assert_eq!(h.condition("Progressing").0, "True");
    // Done once: the group is not restarted again.
    let before = restored(&h);
    h.reconcile().await;
    assert_eq!(restored(&h), before);
}

#[tokio::test]
async fn a_drain_past_its_timeout_is_reported_degraded() {
    let h = harness(json!({"broker": {"masters": 2, "drainTimeoutSeconds": 60}}));
    h.reconcile().await;
    h.edit_spec(json!({"masters": 1}));
    h.reconcile().await;
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-1",
        json!({"metadata": {"annotations": {ANNOTATION_DRAIN_STARTED: "2020-01-01T00:00:00Z"}}}),
    );
    h.reconcile().await;
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "DrainTimeout".into())
    );
    assert!(
        h.api.get("statefulsets", NS, "demo-broker-1").is_some(),
        "a stuck group must not be deleted without force"
    );
    // The force annotation removes it anyway.
    h.api.edit(
        "brokerclusters",
        NS,
        "demo",
        json!({"metadata": {"annotations": {"ferromq.io/force-drain": "true"}}}),
    );
    h.reconcile().await;
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_none());
}

#[tokio::test]
async fn changing_flush_updates_the_config_map_and_rolls_the_pods() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    let before = h.api.get("statefulsets", NS, "demo-broker-0").unwrap();
    h.edit_spec(json!({"flush": "Sync"}));
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH configmaps/demo-broker-0".to_string()),
        "{writes:?}"
    );
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string()),
        "{writes:?}"
    );
    let cm = h.api.get("configmaps", NS, "demo-broker-0").unwrap();
    assert!(cm["data"]["broker.conf"]
        .as_str()
        .unwrap()
        .contains("flushDiskType=SYNC_FLUSH"));
    let after = h.api.get("statefulsets", NS, "demo-broker-0").unwrap();
    let hash = |s: &serde_json::Value| {
        s["spec"]["template"]["metadata"]["annotations"]["ferromq.io/config-hash"].clone()
    };
    assert_ne!(hash(&before), hash(&after));
    assert_eq!(
        h.status()["mode"],
        "2 masters x 1 slave, sync double write, sync flush"
    );
    assert_eq!(h.status()["observedGeneration"], 2);
}

/// A serving cluster of three sync double-write groups, Ready.
async fn three_ready_groups() -> Harness {
    let h = harness(
        json!({"broker": {"masters": 3, "slavesPerMaster": 1, "replication": "Sync", "flush": "Async"}}),
    );
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(h.condition("Ready").0, "True");
    h
}

fn applied(group: &str) -> Vec<String> {
    vec![
        format!("PATCH configmaps/{group}"),
        format!("PATCH statefulsets/{group}"),
    ]
}

fn flush_of(h: &Harness, group: &str) -> String {
    let cm = h.api.get("configmaps", NS, group).unwrap();
    let conf = cm["data"]["broker.conf"].as_str().unwrap().to_string();
    conf.lines()
        .find_map(|l| l.strip_prefix("flushDiskType="))
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_pod_template_change_rolls_broker_groups_one_at_a_time() {
    let h = three_ready_groups().await;
    h.edit_spec(json!({"flush": "Sync"}));
    // Only the first group: every master restarting at once would leave no group taking writes.
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-0"));
    // The others' broker.conf waits with their pods: a pod restarted early for another reason
    // (eviction, OOM) must not run the new config out of turn.
    assert_eq!(flush_of(&h, "demo-broker-0"), "SYNC_FLUSH");
    assert_eq!(flush_of(&h, "demo-broker-1"), "ASYNC_FLUSH");
    assert_eq!(flush_of(&h, "demo-broker-2"), "ASYNC_FLUSH");
    assert_eq!(h.condition("Ready").0, "False");
    assert_eq!(h.condition("Progressing").0, "True");
    let msg = h.message("Progressing");
    assert!(msg.contains("demo-broker-1, demo-broker-2"), "{msg}");
    // Still rolling: the next group waits, and the operator looks again soon.
    assert_eq!(h.requeue().await, Action::requeue(Duration::from_secs(10)));
    assert_eq!(h.reconcile_pods().await, Vec::<String>::new());
    h.mark_rolled("demo-broker-0");
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-1"));
    let msg = h.message("Progressing");
    assert!(
        msg.contains("demo-broker-2") && !msg.contains("demo-broker-0"),
        "{msg}"
    );
    assert_eq!(h.reconcile_pods().await, Vec::<String>::new());
    h.mark_rolled("demo-broker-1");
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-2"));
    assert_eq!(h.condition("Ready").0, "False");
    h.mark_rolled("demo-broker-2");
    assert_eq!(h.reconcile_pods().await, Vec::<String>::new());
    assert_eq!(
        h.condition("Ready"),
        ("True".into(), "AllMembersReady".into())
    );
    assert_eq!(h.condition("Progressing").0, "False");
    assert_eq!(h.requeue().await, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn a_scale_out_during_a_rollout_creates_the_new_group_at_once() {
    let h = three_ready_groups().await;
    h.edit_spec(json!({"flush": "Sync"}));
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-0"));
    h.edit_spec(json!({"masters": 4}));
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-3"));
    assert!(h
        .api
        .get("poddisruptionbudgets", NS, "demo-broker-3")
        .is_some());
    assert!(h.api.get("services", NS, "demo-broker-3").is_some());
    // Until its StatefulSet controller has seen the new group, it counts as rolling: the next
    // existing group waits for it.
    h.mark_rolled("demo-broker-0");
    assert_eq!(h.reconcile_pods().await, Vec::<String>::new());
    h.mark_rolled("demo-broker-3");
    let mut writes = h.reconcile_pods().await;
    writes.retain(|w| !w.ends_with("demo-broker-3")); // marked topics-shared
    assert_eq!(writes, applied("demo-broker-1"));
}

#[tokio::test]
async fn a_slave_count_change_alone_applies_everywhere_at_once_but_waits_with_a_template_change() {
    let h = three_ready_groups().await;
    // More slaves: new pods at higher ordinals, no master restarts, nothing to wait for.
    h.edit_spec(json!({"slavesPerMaster": 2}));
    let sts: Vec<String> = ["demo-broker-0", "demo-broker-1", "demo-broker-2"]
        .iter()
        .map(|g| format!("PATCH statefulsets/{g}"))
        .collect();
    assert_eq!(h.reconcile_pods().await, sts);
    h.mark_ready();
    h.reconcile().await;
    // Replicas and the template together: a template change, one group at a time.
    h.edit_spec(json!({"slavesPerMaster": 1, "flush": "Sync"}));
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-0"));
    let replicas = |g: &str| h.api.get("statefulsets", NS, g).unwrap()["spec"]["replicas"].clone();
    assert_eq!(replicas("demo-broker-0"), 2);
    assert_eq!(replicas("demo-broker-1"), 3);
}

#[tokio::test]
async fn slaves_that_cannot_be_scheduled_do_not_block_the_change_that_makes_them_fit() {
    let h = three_ready_groups().await;
    h.edit_spec(json!({"slavesPerMaster": 2}));
    h.reconcile().await;
    // The cluster has no room for the new slaves: each group serves with one Pending pod.
    for g in ["demo-broker-0", "demo-broker-1", "demo-broker-2"] {
        h.mark_rolled_with_ready(g, 2);
    }
    h.reconcile().await;
    // Smaller requests make them fit: the groups take it one at a time, as any template change.
    h.edit_spec(json!({"resources": {"requests": {"memory": "512Mi"}}}));
    assert_eq!(
        h.reconcile_pods().await,
        vec!["PATCH statefulsets/demo-broker-0".to_string()]
    );
    // demo-broker-0 rolls until all its pods are updated and ready: the next group waits.
    h.mark_rolled_with_ready("demo-broker-0", 2);
    assert_eq!(h.reconcile_pods().await, Vec::<String>::new());
    h.mark_rolled("demo-broker-0");
    assert_eq!(
        h.reconcile_pods().await,
        vec!["PATCH statefulsets/demo-broker-1".to_string()]
    );
}

#[tokio::test]
async fn paused_cluster_is_left_alone() {
    let h = harness(json!({"paused": true, "broker": {"masters": 2}}));
    assert_eq!(h.reconcile().await, Vec::<String>::new());
    assert!(h.api.names("statefulsets").is_empty());
}

#[tokio::test]
async fn invalid_spec_is_reported_not_applied() {
    let h = harness(json!({"broker": {"config": {"fileReservedTme": "1"}}}));
    let writes = h.reconcile().await;
    assert_eq!(writes, vec!["PATCH brokerclusters/demo/status".to_string()]);
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "InvalidSpec".into())
    );
    let msg = h.message("Degraded");
    assert!(msg.contains("fileReservedTme"), "{msg}");
    assert!(h.api.names("statefulsets").is_empty());
}

#[tokio::test]
async fn every_api_call_is_covered_by_the_rbac_rules() {
    let h = harness(json!({"broker": {"masters": 3, "slavesPerMaster": 1}}));
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    h.edit_spec(json!({"masters": 2}));
    h.reconcile().await;
    h.drain.drained.store(true, Ordering::Relaxed);
    h.reconcile().await;
    let calls = h.api.calls();
    assert!(
        calls.iter().any(|c| c.2 == "delete"),
        "the scenario should delete something"
    );
    for (group, resource, verb) in calls {
        assert!(
            operator::rbac::allows(operator::rbac::RULES, &group, &resource, &verb),
            "{verb} {group}/{resource} is not in operator::rbac::RULES (and so not granted by the chart)"
        );
    }
}

#[tokio::test]
async fn a_failed_reconcile_is_reported_as_an_event_and_retried_with_backoff() {
    let h = harness(json!({"broker": {"masters": 2}}));
    h.api.fail("PATCH brokerclusters/demo/status");
    let bcs: Api<BrokerCluster> = Api::namespaced(h.ctx.client.clone(), NS);
    let bc = Arc::new(bcs.get("demo").await.unwrap());
    let run = || operator::controller::reconcile_reporting(bc.clone(), h.ctx.clone());
    let err = run().await.unwrap_err();
    assert_eq!(err.category(), "KubeApi");
    let events: Vec<serde_json::Value> = h
        .api
        .names("events")
        .iter()
        .map(|n| h.api.get("events", NS, n).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "KubeApi" && e["type"] == "Warning"),
        "{events:#?}"
    );
    let first = operator::controller::error_policy(bc.clone(), &err, h.ctx.clone());
    // Applying the objects succeeds this time, the status patch fails again: still a failure,
    // so the backoff keeps growing.
    let err = run().await.unwrap_err();
    let second = operator::controller::error_policy(bc.clone(), &err, h.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(
        second,
        Action::requeue(Duration::from_secs(10)),
        "retries should back off"
    );
    // A reconcile that succeeds to the end starts the backoff over.
    h.api.heal();
    run().await.unwrap();
    assert_eq!(
        operator::controller::error_policy(bc.clone(), &err, h.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn objects_the_operator_does_not_control_are_never_deleted() {
    let h = harness(json!({"broker": {"masters": 2}}));
    h.reconcile().await;
    // A Helm release named like the cluster: same instance label, no owner.
    let helm = json!({"app.kubernetes.io/instance": "demo"});
    h.api.insert(
        "configmaps",
        NS,
        json!({"metadata": {"name": "demo-dashboards", "labels": helm}, "data": {}}),
    );
    h.api.insert(
        "statefulsets",
        NS,
        json!({"metadata": {"name": "demo-exporter", "labels": helm}, "spec": {"replicas": 1}}),
    );
    // Objects carrying every label the operator sets, but not controlled by this BrokerCluster.
    let lookalike = json!({
        "app.kubernetes.io/name": "ferromq",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/managed-by": "ferromq-operator",
        "app.kubernetes.io/component": "broker",
        "ferromq.io/broker-group": "demo-broker-9",
    });
    h.api.insert(
        "configmaps",
        NS,
        json!({"metadata": {"name": "demo-broker-9", "labels": lookalike}, "data": {}}),
    );
    h.api.insert(
        "statefulsets",
        NS,
        json!({"metadata": {"name": "demo-broker-9", "labels": lookalike, "ownerReferences": [
            {"apiVersion": "ferromq.io/v1alpha1", "kind": "BrokerCluster", "name": "demo",
             "uid": "uid-of-another-demo", "controller": true}]},
            "spec": {"replicas": 1}}),
    );
    // Scale in, consumers caught up: the removed group goes, nothing else does.
    h.edit_spec(json!({"masters": 1}));
    h.drain.drained.store(true, Ordering::Relaxed);
    let mut deletes = h.reconcile().await;
    deletes.retain(|w| w.starts_with("DELETE"));
    deletes.sort();
    assert_eq!(
        deletes,
        vec![
            "DELETE configmaps/demo-broker-1",
            "DELETE poddisruptionbudgets/demo-broker-1",
            "DELETE services/demo-broker-1",
            "DELETE statefulsets/demo-broker-1",
        ]
    );
    for (plural, name) in [
        ("configmaps", "demo-dashboards"),
        ("statefulsets", "demo-exporter"),
        ("configmaps", "demo-broker-9"),
        ("statefulsets", "demo-broker-9"),
    ] {
        assert!(
            h.api.get(plural, NS, name).is_some(),
            "{plural}/{name} was deleted"
        );
    }
    assert_eq!(
        *h.drain.read_only.lock().unwrap(),
        vec!["demo-broker-1".to_string()],
        "only the operator's own group is drained"
    );
}

fn force_drain(h: &Harness) {
    h.api.edit(
        "brokerclusters",
        NS,
        "demo",
        json!({"metadata": {"annotations": {"ferromq.io/force-drain": "true"}}}),
    );
}

#[tokio::test]
async fn force_drain_removes_a_group_whose_broker_is_unreachable() {
    let h = harness(json!({"broker": {"masters": 2}}));
    h.reconcile().await;
    h.edit_spec(json!({"masters": 1}));
    h.drain.broken.store(true, Ordering::Relaxed);
    force_drain(&h);
    // The first failure only starts the count: one failed call is not "cannot finish".
    let writes = h.reconcile().await;
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    let sts = h.api.get("statefulsets", NS, "demo-broker-1").unwrap();
    assert!(sts["metadata"]["annotations"][ANNOTATION_DRAIN_FAILING_SINCE].is_string());
    // Failing for longer than FORCE_AFTER_FAILING_SECS: removed.
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-1",
        json!({"metadata": {"annotations": {ANNOTATION_DRAIN_FAILING_SINCE: "2020-01-01T00:00:00Z"}}}),
    );
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"DELETE statefulsets/demo-broker-1".to_string()),
        "{writes:?}"
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_none());
    assert_eq!(h.condition("Degraded").0, "False");
}

#[tokio::test]
async fn force_drain_does_not_remove_a_group_after_a_failure_that_passed() {
    // The annotation stays on the cluster; a drain fails once (a name server restarting) and
    // then reaches its broker again: the failure count starts over.
    let h = harness(json!({"broker": {"masters": 2}}));
    h.reconcile().await;
    force_drain(&h);
    h.edit_spec(json!({"masters": 1}));
    h.drain.broken.store(true, Ordering::Relaxed);
    h.reconcile().await;
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-1",
        json!({"metadata": {"annotations": {ANNOTATION_DRAIN_FAILING_SINCE: "2020-01-01T00:00:00Z"}}}),
    );
    h.drain.broken.store(false, Ordering::Relaxed);
    let writes = h.reconcile().await;
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    let sts = h.api.get("statefulsets", NS, "demo-broker-1").unwrap();
    assert!(
        sts["metadata"]["annotations"][ANNOTATION_DRAIN_FAILING_SINCE].is_null(),
        "{sts}"
    );
    // It fails again: a new count, so not removed at once.
    h.drain.broken.store(true, Ordering::Relaxed);
    let writes = h.reconcile().await;
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_some());
}

#[tokio::test]
async fn force_drain_left_set_does_not_skip_the_drain_of_a_reachable_group() {
    // The annotation stays on the cluster after the scale-in it was set for: a later scale-in
    // drains as usual while the broker answers and the timeout has not passed.
    let h = harness(json!({"broker": {"masters": 3}}));
    h.reconcile().await;
    force_drain(&h);
    h.edit_spec(json!({"masters": 2}));
    let writes = h.reconcile().await;
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-2").is_some());
    assert_eq!(
        *h.drain.read_only.lock().unwrap(),
        vec!["demo-broker-2".to_string()]
    );
    assert!(h.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "demo-broker-2" && g["draining"] == true));
    // Past drainTimeoutSeconds the drain cannot be waited for any longer: force removes it.
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-2",
        json!({"metadata": {"annotations": {ANNOTATION_DRAIN_STARTED: "2020-01-01T00:00:00Z"}}}),
    );
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"DELETE statefulsets/demo-broker-2".to_string()),
        "{writes:?}"
    );
    assert_eq!(h.condition("Degraded").0, "False");
}

#[tokio::test]
async fn an_unreachable_draining_group_is_kept_and_reported_while_the_rest_applies() {
    let h = harness(json!({"broker": {"masters": 2}}));
    h.reconcile().await;
    h.drain.broken.store(true, Ordering::Relaxed);
    h.edit_spec(json!({"masters": 1, "flush": "Sync"}));
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH configmaps/demo-broker-0".to_string()),
        "the other groups' changes apply: {writes:?}"
    );
    assert!(
        writes.iter().all(|w| !w.starts_with("DELETE")),
        "{writes:?}"
    );
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_some());
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "DrainFailed".into())
    );
    let s = h.status();
    let degraded = h.message("Degraded");
    assert!(
        degraded.contains("demo-broker-1") && degraded.contains("broker unreachable"),
        "{degraded}"
    );
    assert!(degraded.contains("ferromq.io/force-drain"), "{degraded}");
    assert!(s["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "demo-broker-1" && g["draining"] == true));
    assert_eq!(s["observedGeneration"], 2);
    // The broker is back and consumers caught up: the group goes and the cluster recovers.
    h.drain.broken.store(false, Ordering::Relaxed);
    h.drain.drained.store(true, Ordering::Relaxed);
    h.reconcile().await;
    assert!(h.api.get("statefulsets", NS, "demo-broker-1").is_none());
    assert_eq!(h.condition("Degraded").0, "False");
}

#[tokio::test]
async fn ready_groups_are_given_the_clusters_topics_and_failures_retry_soon() {
    let h = harness(sync_double_write());
    let run = || async {
        let bcs: Api<BrokerCluster> = Api::namespaced(h.ctx.client.clone(), NS);
        let bc = bcs.get("demo").await.unwrap();
        reconcile(Arc::new(bc), h.ctx.clone()).await.unwrap()
    };
    run().await;
    assert!(
        h.drain.shared.lock().unwrap().is_empty(),
        "no group is asked before its pods are ready"
    );
    h.mark_ready();
    h.api.take_writes();
    assert_eq!(run().await, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        *h.drain.shared.lock().unwrap(),
        vec!["demo-broker-0".to_string(), "demo-broker-1".to_string()]
    );
    assert!(
        h.api.take_writes().iter().any(|w| w.contains("events/")),
        "created topics are reported as an event"
    );
    // Groups are asked once: their StatefulSets now say so.
    assert_eq!(run().await, Action::requeue(Duration::from_secs(300)));
    assert_eq!(h.drain.shared.lock().unwrap().len(), 2);
    // A new group whose master cannot take topics yet keeps the cluster on the short requeue,
    // and is asked again.
    h.drain.share_fails.store(true, Ordering::Relaxed);
    h.edit_spec(json!({"masters": 3}));
    run().await;
    h.mark_ready();
    assert_eq!(run().await, Action::requeue(Duration::from_secs(10)));
    assert_eq!(run().await, Action::requeue(Duration::from_secs(10)));
    let asked = h.drain.shared.lock().unwrap().clone();
    assert_eq!(
        asked[2..],
        ["demo-broker-2".to_string(), "demo-broker-2".to_string()]
    );
}

#[tokio::test]
async fn spec_edits_the_crd_allows_never_touch_what_a_stateful_set_cannot_change() {
    // The API double refuses, as the API server does, an update of a StatefulSet's
    // volumeClaimTemplates, selector, serviceName or podManagementPolicy.
    let h = harness(json!({"nameServer": {"replicas": 1}, "broker": {"masters": 1}}));
    h.reconcile().await;
    h.edit_spec(
        json!({"masters": 2, "slavesPerMaster": 1, "replication": "Sync", "flush": "Sync",
        "config": {"fileReservedTime": "48"}, "drainTimeoutSeconds": 60,
        "resources": {"requests": {"memory": "1Gi"}},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "nodeSelector": {"disk": "ssd"}}),
    );
    h.api.edit(
        "brokerclusters",
        NS,
        "demo",
        json!({"spec": {"image": "ferromq:2", "imagePullPolicy": "Always",
            "imagePullSecrets": [{"name": "registry"}], "nameServer": {"replicas": 3}}}),
    );
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string())
            && writes.contains(&"PATCH statefulsets/demo-nameserver".to_string()),
        "{writes:?}"
    );
    // Even a storage edit (which the CRD refuses) leaves the claim templates as created.
    let claims = |h: &Harness| {
        h.api.get("statefulsets", NS, "demo-broker-0").unwrap()["spec"]["volumeClaimTemplates"]
            .clone()
    };
    let before = claims(&h);
    h.edit_spec(json!({"storage": {"size": "20Gi"}}));
    h.reconcile().await;
    assert_eq!(claims(&h), before);
    // The API double does refuse a change of them, so a test that changed them would fail
    // rather than pass against an API server more lenient than the real one.
    let sts_api: Api<StatefulSet> = Api::namespaced(h.ctx.client.clone(), NS);
    let mut sts = sts_api.get("demo-broker-0").await.unwrap();
    sts.metadata.managed_fields = None;
    sts.spec
        .as_mut()
        .unwrap()
        .volume_claim_templates
        .as_mut()
        .unwrap()[0]
        .metadata
        .labels = None;
    let err = sts_api
        .patch(
            "demo-broker-0",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&sts),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Forbidden"), "{err}");
}

#[tokio::test]
async fn stateful_sets_created_by_an_older_operator_keep_their_claim_templates() {
    let h = harness(sync_double_write());
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    // As an older operator left them: claim templates carrying the full label set (this
    // version renders the selector labels only), and the hash of another rendering.
    let claims = |h: &Harness, g: &str| {
        h.api.get("statefulsets", NS, g).unwrap()["spec"]["volumeClaimTemplates"].clone()
    };
    for g in ["demo-broker-0", "demo-broker-1"] {
        let mut sts = h.api.get("statefulsets", NS, g).unwrap();
        let labels = sts["metadata"]["labels"].clone();
        assert_ne!(labels, sts["spec"]["selector"]["matchLabels"]);
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"] = labels;
        sts["metadata"]["annotations"]["ferromq.io/applied-hash"] = json!("older-operator");
        h.api.insert("statefulsets", NS, sts);
    }
    let before = [claims(&h, "demo-broker-0"), claims(&h, "demo-broker-1")];
    // The API double refuses (422) any change of claim templates: the reconcile succeeding
    // shows none was made.
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string())
            && writes.contains(&"PATCH statefulsets/demo-broker-1".to_string()),
        "{writes:?}"
    );
    assert_eq!(
        [claims(&h, "demo-broker-0"), claims(&h, "demo-broker-1")],
        before
    );
    assert_eq!(h.condition("Ready").0, "True");
    // Later spec changes apply as usual.
    h.edit_spec(json!({"config": {"flushIntervalCommitLog": "200"}}));
    assert_eq!(h.reconcile_pods().await, applied("demo-broker-0"));
    assert_eq!(claims(&h, "demo-broker-0"), before[0]);
}

#[tokio::test]
async fn a_setting_brokers_change_while_running_reaches_them_without_a_rollout() {
    let h = harness(json!({"broker": {"masters": 2}}));
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    let pushed = |h: &Harness, key: &str| -> Vec<(String, String)> {
        h.drain
            .applied
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(g, lines)| {
                lines
                    .iter()
                    .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                    .map(|v| (g.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // Every settled group is told the settings the spec gives (defaults included), once.
    let first = pushed(&h, "fileReservedTime");
    assert_eq!(
        first,
        vec![
            ("demo-broker-0".to_string(), "72".to_string()),
            ("demo-broker-1".to_string(), "72".to_string())
        ]
    );
    h.reconcile().await;
    assert_eq!(
        pushed(&h, "fileReservedTime").len(),
        2,
        "pushed again unchanged"
    );
    h.drain.applied.lock().unwrap().clear();
    let template = |h: &Harness, g: &str| {
        h.api.get("statefulsets", NS, g).unwrap()["spec"]["template"].clone()
    };
    let before = [template(&h, "demo-broker-0"), template(&h, "demo-broker-1")];
    h.edit_spec(json!({"masters": 2, "config": {"fileReservedTime": "48"}}));
    // The ConfigMaps change (a restart reads them); the pods do not roll: the StatefulSets'
    // templates stay as they were.
    let writes = h.reconcile_pods().await;
    assert!(
        writes.contains(&"PATCH configmaps/demo-broker-0".to_string())
            && writes.contains(&"PATCH configmaps/demo-broker-1".to_string()),
        "{writes:?}"
    );
    assert_eq!(
        [template(&h, "demo-broker-0"), template(&h, "demo-broker-1")],
        before
    );
    assert_eq!(
        pushed(&h, "fileReservedTime"),
        vec![
            ("demo-broker-0".to_string(), "48".to_string()),
            ("demo-broker-1".to_string(), "48".to_string())
        ]
    );
    let reasons = |h: &Harness| -> Vec<String> {
        h.api
            .names("events")
            .iter()
            .filter_map(|n| h.api.get("events", NS, n))
            .map(|e| format!("{} {}", e["type"], e["reason"]))
            .collect()
    };
    assert!(
        reasons(&h).iter().any(|r| r.contains("SettingsApplied")),
        "{:?}",
        reasons(&h)
    );
    // Brokers that refuse them (too old): a Warning, and no retry every 10 s.
    h.drain.settings_refused.store(true, Ordering::Relaxed);
    h.edit_spec(json!({"masters": 2, "config": {"fileReservedTime": "24"}}));
    h.reconcile().await;
    assert!(
        reasons(&h)
            .iter()
            .any(|r| r.contains("Warning") && r.contains("SettingsRefused")),
        "{:?}",
        reasons(&h)
    );
    assert_eq!(h.requeue().await, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn a_spec_the_api_server_refuses_turns_ready_false_and_degraded() {
    // Requests above limits pass the CRD schema but not the StatefulSet's validation: the last
    // generation's Ready=True must not stand while nothing of the new one can be applied.
    let h = harness(json!({"broker": {"masters": 1}}));
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(h.condition("Ready").0, "True");
    h.edit_spec(json!({"flush": "Sync"}));
    h.api.refuse("PATCH statefulsets/demo-broker-0");
    let bcs: Api<BrokerCluster> = Api::namespaced(h.ctx.client.clone(), NS);
    let bc = Arc::new(bcs.get("demo").await.unwrap());
    let err = reconcile(bc, h.ctx.clone()).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(h.condition("Ready").0, "False");
    assert_eq!(
        h.condition("Degraded"),
        ("True".to_string(), "ApplyFailed".to_string())
    );
    assert!(
        h.message("Degraded").contains("demo-broker-0"),
        "{}",
        h.message("Degraded")
    );
    // The groups reported before stay reported.
    assert_eq!(h.status()["groups"].as_array().unwrap().len(), 1);
    // A transient failure (500) leaves the status as it is, for the retry.
    h.api.heal();
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    assert_eq!(h.condition("Degraded").0, "False");
    h.edit_spec(json!({"flush": "Async"}));
    h.api.fail("PATCH statefulsets/demo-broker-0");
    let bc = Arc::new(bcs.get("demo").await.unwrap());
    reconcile(bc, h.ctx.clone()).await.unwrap_err();
    assert_eq!(h.condition("Degraded").0, "False");
}

#[tokio::test]
async fn hand_edits_of_owned_objects_are_undone_at_the_periodic_full_apply() {
    let mut h = harness(json!({"broker": {"masters": 1, "slavesPerMaster": 1}}));
    // Every pass after the first is due a full apply.
    Arc::get_mut(&mut h.ctx).unwrap().full_apply_every = Duration::ZERO;
    h.reconcile().await;
    // Someone drops the slave by hand, and edits broker.conf.
    h.api.edit(
        "statefulsets",
        NS,
        "demo-broker-0",
        json!({"spec": {"replicas": 1}}),
    );
    h.api.edit(
        "configmaps",
        NS,
        "demo-broker-0",
        json!({"data": {"broker.conf": "edited"}}),
    );
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string()),
        "{writes:?}"
    );
    let sts = h.api.get("statefulsets", NS, "demo-broker-0").unwrap();
    assert_eq!(sts["spec"]["replicas"], 2);
    let cm = h.api.get("configmaps", NS, "demo-broker-0").unwrap();
    assert!(
        cm["data"]["broker.conf"]
            .as_str()
            .unwrap()
            .contains("brokerName=demo-broker-0"),
        "{cm}"
    );
    // A full apply that finds nothing to undo changes nothing, and says nothing.
    let applied_events = |h: &Harness| {
        h.api
            .names("events")
            .iter()
            .filter(|n| h.api.get("events", NS, n).unwrap()["reason"] == "Applied")
            .count()
    };
    let versions = |h: &Harness| -> Vec<serde_json::Value> {
        [
            "statefulsets",
            "configmaps",
            "services",
            "poddisruptionbudgets",
        ]
        .iter()
        .flat_map(|kind| {
            h.api
                .names(kind)
                .into_iter()
                .map(|n| h.api.get(kind, NS, &n).unwrap()["metadata"]["resourceVersion"].clone())
        })
        .collect()
    };
    let (before, events) = (versions(&h), applied_events(&h));
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string()),
        "the pass should have applied everything: {writes:?}"
    );
    assert_eq!(versions(&h), before);
    assert_eq!(applied_events(&h), events);
}

#[tokio::test]
async fn a_name_server_outage_during_a_change_rolls_the_groups_one_at_a_time() {
    let h = harness(json!({"broker": {"masters": 3}}));
    h.reconcile().await;
    h.mark_ready();
    h.reconcile().await;
    // No name server answers: every broker runs, none is ready (brokers are ready only once
    // a name server took their registration).
    for g in 0..3 {
        h.mark_rolled_with_ready(&format!("demo-broker-{g}"), 0);
        h.api.insert(
            "pods",
            NS,
            json!({"metadata": {"name": format!("demo-broker-{g}-0"), "labels": {
                    "app.kubernetes.io/name": "ferromq", "app.kubernetes.io/instance": "demo",
                    "app.kubernetes.io/component": "broker", "ferromq.io/broker-group": format!("demo-broker-{g}")}},
                "status": {"containerStatuses": [{"name": "mqbroker", "ready": false, "restartCount": 0,
                    "image": "i", "imageID": "", "state": {"running": {}}}]}}),
        );
    }
    h.edit_spec(json!({"flush": "Sync"}));
    let writes = h.reconcile().await;
    assert!(
        writes.contains(&"PATCH statefulsets/demo-broker-0".to_string()),
        "{writes:?}"
    );
    for g in [1, 2] {
        assert!(
            !writes.contains(&format!("PATCH statefulsets/demo-broker-{g}")),
            "group {g} rolled with the first: {writes:?}"
        );
    }
    assert!(h.api.calls().iter().any(|c| c.1 == "pods" && c.2 == "list"));
}
