//! The reconcile loop: plan, render, apply in order (Services, ConfigMaps, PDBs,
//! StatefulSets), drain groups before deleting them, delete what the plan no longer holds, and
//! report status. Objects are applied with server-side apply under one field manager, and only
//! when they differ from what was last applied: a no-op reconcile only reads. Broker groups
//! take a new pod template one at a time (see [`crate::rollout`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{BrokerCluster, BrokerClusterStatus, GroupStatus};
use crate::plan::{plan, ClusterPlan};
use crate::resources::{
    managed_selector, render, BROKER_CONTAINER, FIELD_MANAGER, LABEL_COMPONENT, LABEL_GROUP,
};
use crate::rollout::{rollout_gap, rollout_turns, stamp_template_hash, takes_new_template};

/// See [`Context::full_apply_every`]: the resync period of a cluster that is at rest.
pub const FULL_APPLY_EVERY: Duration = Duration::from_secs(300);

/// Annotation holding a hash of what the operator last applied to an object.
pub const ANNOTATION_APPLIED: &str = "ferromq.io/applied-hash";
/// Annotation on a BrokerCluster: delete draining groups whose drain cannot finish (broker
/// unreachable, or past `drainTimeoutSeconds`) without waiting for consumers.
pub const ANNOTATION_FORCE_DRAIN: &str = "ferromq.io/force-drain";
/// Annotation on a group's StatefulSet: the group has been given the cluster's topics.
pub const ANNOTATION_TOPICS_SHARED: &str = "ferromq.io/topics-shared";
/// Annotation on a group's StatefulSet: when its drain started (RFC 3339).
pub const ANNOTATION_DRAIN_STARTED: &str = "ferromq.io/drain-started";
/// Annotation on a group's StatefulSet: since when its drain has failed without a break
/// (RFC 3339); removed at the first pass that reaches the broker again.
pub const ANNOTATION_DRAIN_FAILING_SINCE: &str = "ferromq.io/drain-failing-since";
/// How long a drain must have failed without a break before `force-drain` removes the group:
/// one failed call (a name server restarting, a timeout) must not make an annotation left on
/// the cluster drop a group that still holds unconsumed messages.
pub const FORCE_AFTER_FAILING_SECS: i64 = 60;
/// Pod-template annotation of a group's StatefulSet: when a cancelled drain restarted its pods
/// (RFC 3339), the only way to give a broker its write permission back.
pub const ANNOTATION_WRITES_RESTORED: &str = "ferromq.io/writes-restored-at";

/// Why a reconcile failed; the variant name becomes the event reason and metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks what the operator needs (namespace, uid).
    #[error("BrokerCluster is missing {0}")]
    Incomplete(&'static str),
    /// A draining group's broker could not be asked (reconcile keeps the group, reports this
    /// in status and goes on).
    #[error("cannot drain {group}: {reason}")]
    Drain {
        /// Group.
        group: String,
        /// Cause.
        reason: String,
    },
}

impl Error {
    /// Short label for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Incomplete(_) => "Incomplete",
            Error::Drain { .. } => "DrainFailed",
        }
    }
}

/// A broker group the operator wants to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    /// BrokerCluster name.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// brokerName (and StatefulSet name).
    pub group: String,
    /// `namesrvAddr` of the cluster.
    pub namesrv_addr: String,
}

/// Day-2 actions on a broker group, through the broker admin protocol.
pub trait GroupAdmin: Send + Sync {
    /// Makes the group read-only (RocketMQ's wipe-write-permission).
    fn make_read_only<'a>(&'a self, group: &'a GroupRef) -> BoxFuture<'a, Result<(), String>>;
    /// Whether every consumer group has consumed every queue of the group.
    fn drained<'a>(&'a self, group: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>>;
    /// Creates on a group's master every user topic the other groups of the cluster hold and
    /// it lacks (ordered topics excepted), and returns the topics created. Callers ask this
    /// once per new group, so topics later placed on chosen groups stay where they are.
    fn share_topics<'a>(
        &'a self,
        group: &'a GroupRef,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;
    /// Brings the settings brokers change while they run to `wanted` on every member of the
    /// group registered with the name servers, without a restart; goes on past a member that
    /// fails, and reports the first failure after trying the others.
    fn apply_settings<'a>(
        &'a self,
        group: &'a GroupRef,
        wanted: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<SettingsApplied, SettingsError>>;
}

/// What [`GroupAdmin::apply_settings`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsApplied {
    /// Members found registered and checked.
    pub checked: usize,
    /// What changed, as `member: key=value` (nothing when every member had them).
    pub changed: Vec<String>,
}

/// Why a group's settings could not be brought to the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Not yet: the name servers or a member did not answer (tried again soon).
    #[error("{0}")]
    NotYet(String),
    /// A member refused them: a broker too old to change settings while it runs, or a value
    /// it does not take. Tried again at the next reconcile (at least every 5 minutes); the
    /// group's pods get the values when they restart (the ConfigMap holds them).
    #[error("{0}")]
    Refused(String),
}

/// What reconcile needs.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Publishes events.
    pub recorder: Recorder,
    /// Image used when a spec names none.
    pub default_image: String,
    /// Drains groups before scale-in and gives new groups the cluster's topics.
    pub admin: Arc<dyn GroupAdmin>,
    /// Consecutive failures per cluster, for the retry backoff.
    pub failures: std::sync::Mutex<BTreeMap<String, u32>>,
    /// How often every object is applied again whatever its applied-hash says, so that a
    /// hand edit of an object the operator owns (a StatefulSet scaled with kubectl, an edited
    /// ConfigMap) is undone; between those passes only objects whose rendering changed are.
    pub full_apply_every: Duration,
    /// When each cluster last had every object applied.
    full_applies: std::sync::Mutex<BTreeMap<String, std::time::Instant>>,
    /// The live settings last brought to every member of each group (`namespace/group` to
    /// [`crate::plan::BrokerGroupPlan::live_hash`]); kept in memory, so a restarted operator
    /// compares each group once more.
    settings_applied: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Context {
    /// A context with no failure history.
    pub fn new(
        client: kube::Client,
        recorder: Recorder,
        default_image: String,
        admin: Arc<dyn GroupAdmin>,
    ) -> Context {
        Context {
            client,
            recorder,
            default_image,
            admin,
            failures: std::sync::Mutex::new(BTreeMap::new()),
            full_apply_every: FULL_APPLY_EVERY,
            full_applies: std::sync::Mutex::new(BTreeMap::new()),
            settings_applied: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The live settings hash last brought to every member of `group`, if any.
    fn settings_applied(&self, group: &str) -> Option<String> {
        let applied = self
            .settings_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        applied.get(group).cloned()
    }

    /// Records that every member of `group` has the live settings hashed `hash`.
    fn settings_done(&self, group: &str, hash: &str) {
        let mut applied = self
            .settings_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        applied.insert(group.to_string(), hash.to_string());
    }

    /// Whether this pass of `cluster` applies every object; counted from the first pass seen.
    fn full_apply_due(&self, cluster: &str) -> bool {
        let mut last = self.full_applies.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match last.get(cluster) {
            Some(t) => now.duration_since(*t) >= self.full_apply_every,
            None => {
                last.insert(cluster.to_string(), now);
                false
            }
        }
    }

    /// Records that every object of `cluster` was just applied.
    fn full_apply_done(&self, cluster: &str) {
        self.full_applies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cluster.to_string(), std::time::Instant::now());
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Short hash of an object as rendered: what `ANNOTATION_APPLIED` records, and the pod-template
/// hash the rollout order compares.
pub(crate) fn applied_hash<K: Serialize>(obj: &K) -> String {
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the BrokerCluster with `uid` is the controller of `obj`: the only objects reconcile
/// deletes, whatever labels others (a Helm release, an Argo CD app) put on theirs.
fn controlled_by<K: Resource>(obj: &K, uid: &str) -> bool {
    obj.owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// Applies `desired` objects of one kind that changed since the last apply, and deletes
/// objects of that kind labelled for the cluster and controlled by it (`owner_uid`) that are
/// neither desired nor kept. Before an object that exists is applied, `keep_live` copies into
/// it what must stay as the live object has it (fields the API server refuses to change); the
/// applied hash is that of the object as rendered, so server-side defaults in those fields do
/// not make a no-op pass write. Returns how many writes it made.
async fn sync_kind<K>(
    api: &Api<K>,
    selector: &str,
    owner_uid: &str,
    desired: Vec<K>,
    keep: &HashSet<String>,
    keep_live: fn(&K, &mut K),
    all: bool,
) -> Result<usize, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let live = api.list(&ListParams::default().labels(selector)).await?;
    let live_hashes: BTreeMap<String, Option<String>> = live
        .items
        .iter()
        .map(|o| {
            (
                o.name_any(),
                o.annotations().get(ANNOTATION_APPLIED).cloned(),
            )
        })
        .collect();
    let mut writes = 0;
    let mut wanted = HashSet::new();
    for mut obj in desired {
        let name = obj.name_any();
        let hash = applied_hash(&obj);
        wanted.insert(name.clone());
        if !all && live_hashes.get(&name).and_then(|h| h.as_deref()) == Some(hash.as_str()) {
            continue;
        }
        let live = live.items.iter().find(|o| o.name_any() == name);
        if let Some(live) = live {
            keep_live(live, &mut obj);
        }
        obj.annotations_mut()
            .insert(ANNOTATION_APPLIED.into(), hash);
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await?;
        // An apply that changed nothing leaves the resource version as it was.
        if live.and_then(|l| l.resource_version()) != applied.resource_version() {
            writes += 1;
        }
    }
    for obj in &live.items {
        let name = obj.name_any();
        if wanted.contains(&name) || keep.contains(&name) {
            continue;
        }
        if !controlled_by(obj, owner_uid) {
            tracing::debug!(object = %name, "not controlled by this BrokerCluster: left alone");
            continue;
        }
        api.delete(&name, &DeleteParams::default()).await?;
        writes += 1;
    }
    Ok(writes)
}

/// For [`sync_kind`]: nothing of the live object is kept.
fn keep_nothing<K>(_live: &K, _desired: &mut K) {}

/// For [`sync_kind`]: a StatefulSet keeps the volumeClaimTemplates it was created with.
/// Kubernetes refuses any change to them, and an older operator rendered them differently (the
/// full label set), so applying this version's rendering would fail on every pass.
fn keep_claim_templates(live: &StatefulSet, desired: &mut StatefulSet) {
    if let Some(spec) = desired.spec.as_mut() {
        spec.volume_claim_templates = live
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.clone());
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    old: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // Keep the transition time while the status stays the same.
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// What `build_status` needs from the cluster.
#[derive(Default)]
struct Observed {
    ns_ready: i32,
    groups: Vec<GroupStatus>,
    /// StatefulSets (name servers, wanted groups) not yet running their current spec on every
    /// pod, described for the Progressing message.
    rolling: Vec<String>,
    /// Serving broker groups whose new pod template waits until no other group is rolling.
    waiting: Vec<String>,
    draining: Vec<String>,
    stuck: Vec<String>,
    /// Draining groups whose broker could not be asked, with the cause.
    drain_failed: Vec<String>,
}

/// `why` a drain cannot go on, and how to remove the group anyway.
fn force_drain_hint(why: &str) -> String {
    format!(
        "{why}; set annotation {ANNOTATION_FORCE_DRAIN}=true to remove the group without draining"
    )
}

/// What keeps a BrokerCluster from being applied at all: the condition reason and message.
type Blocked = Option<(&'static str, String)>;

fn build_status(
    bc: &BrokerCluster,
    plan: &ClusterPlan,
    obs: &Observed,
    invalid: Blocked,
) -> BrokerClusterStatus {
    let old = bc
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = bc.metadata.generation;
    let ready = invalid.is_none()
        && obs.rolling.is_empty()
        && obs.waiting.is_empty()
        && obs.draining.is_empty();
    let progressing = !ready && invalid.is_none();
    let (degraded, degraded_reason, degraded_msg) = match (&invalid, obs.stuck.is_empty()) {
        (Some((reason, msg)), _) => (true, *reason, msg.clone()),
        (None, _) if !obs.drain_failed.is_empty() => (
            true,
            "DrainFailed",
            force_drain_hint(&obs.drain_failed.join("; ")),
        ),
        (None, false) => (
            true,
            "DrainTimeout",
            format!(
                "groups not drained within drainTimeoutSeconds: {}",
                obs.stuck.join(", ")
            ),
        ),
        (None, true) => (false, "AsPlanned", "no problem observed".to_string()),
    };
    let mut progress = Vec::new();
    if !obs.draining.is_empty() {
        progress.push(format!("draining {}", obs.draining.join(", ")));
    } else if !obs.rolling.is_empty() {
        progress.push(format!("waiting for {}", obs.rolling.join("; ")));
    }
    if !obs.waiting.is_empty() {
        progress.push(format!(
            "groups waiting their turn to roll (one at a time): {}",
            obs.waiting.join(", ")
        ));
    }
    let progress_msg = progress.join("; ");
    BrokerClusterStatus {
        observed_generation: generation,
        conditions: vec![
            condition(
                "Ready",
                ready,
                if ready { "AllMembersReady" } else { "NotReady" },
                if ready {
                    plan.mode.clone()
                } else {
                    progress_msg.clone()
                },
                generation,
                &old,
            ),
            condition(
                "Progressing",
                progressing,
                if progressing { "Reconciling" } else { "Idle" },
                if progressing {
                    progress_msg
                } else {
                    String::new()
                },
                generation,
                &old,
            ),
            condition(
                "Degraded",
                degraded,
                degraded_reason,
                degraded_msg,
                generation,
                &old,
            ),
        ],
        mode: Some(plan.mode.clone()),
        name_servers_ready: obs.ns_ready,
        groups: obs.groups.clone(),
    }
}

async fn publish(ctx: &Context, bc: &BrokerCluster, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &bc.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

async fn patch_status(
    api: &Api<BrokerCluster>,
    bc: &BrokerCluster,
    status: BrokerClusterStatus,
) -> Result<bool, Error> {
    if bc.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let body = serde_json::json!({
        "apiVersion": "ferromq.io/v1alpha1",
        "kind": "BrokerCluster",
        "status": status,
    });
    api.patch_status(
        &bc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(true)
}

/// One pass of draining `group`: on the first pass (`start`) marks its StatefulSet and records
/// an event; on every pass makes the group read-only, then tells whether consumers have caught
/// up. The wipe is asserted again each pass because the broker holds it in memory only: a
/// master restarted mid-drain (eviction, OOM) would take writes again, and the group could be
/// deleted with messages nobody consumed. A broker that cannot be asked is an
/// [`Error::Drain`]; the caller keeps the group and goes on.
async fn drain_step(
    ctx: &Context,
    bc: &BrokerCluster,
    sts_api: &Api<StatefulSet>,
    group: &GroupRef,
    start: bool,
) -> Result<bool, Error> {
    let name = &group.group;
    let drain_error = |reason| Error::Drain {
        group: name.clone(),
        reason,
    };
    if start {
        // Marked before the first wipe, so that a wipe which got halfway (the broker, not the
        // name servers) is undone as well if the scale-in is reverted.
        let mark = serde_json::json!({"metadata": {"annotations": {ANNOTATION_DRAIN_STARTED: k8s_openapi::jiff::Timestamp::now().to_string()}}});
        sts_api
            .patch(name, &PatchParams::default(), &Patch::Merge(&mark))
            .await?;
        publish(
            ctx,
            bc,
            EventType::Normal,
            "Draining",
            format!("making {name} read-only; it is removed once consumers have caught up"),
        )
        .await;
    }
    ctx.admin.make_read_only(group).await.map_err(drain_error)?;
    ctx.admin.drained(group).await.map_err(drain_error)
}

/// Broker groups with a pod whose broker container runs, asked only when a group about to
/// take a new pod template has no ready pod: ready or not, such a group still holds its data
/// and clients (see `rollout_turns`).
async fn running_groups(
    client: &kube::Client,
    ns: &str,
    cluster: &str,
    live: &[StatefulSet],
    desired: &[StatefulSet],
) -> HashSet<String> {
    let unready_and_changing = live.iter().any(|s| {
        let ready = s
            .status
            .as_ref()
            .and_then(|st| st.ready_replicas)
            .unwrap_or(0);
        ready == 0
            && desired
                .iter()
                .find(|d| d.name_any() == s.name_any())
                .is_some_and(|d| takes_new_template(s, d))
    });
    if !unready_and_changing {
        return HashSet::new();
    }
    let selector = crate::resources::selector(cluster, "broker")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(p) => p,
        Err(e) => {
            // An installation whose RBAC predates this (no `list pods`) must still apply a
            // fixed spec to a group that is down: every unready group counts as down, as
            // before.
            tracing::warn!(error = %e, "listing broker pods failed; unready groups count as down");
            return HashSet::new();
        }
    };
    pods.items
        .iter()
        .filter(|p| {
            // The broker's own container: a sidecar running beside a crash-looping broker
            // does not make the group serve.
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.name == BROKER_CONTAINER
                            && c.state.as_ref().is_some_and(|st| st.running.is_some())
                    })
                })
        })
        .filter_map(|p| p.labels().get(LABEL_GROUP).cloned())
        .collect()
}

/// Seconds since the RFC 3339 time of an annotation; 0 when it is missing or unreadable.
fn age_secs(annotation: Option<&str>) -> i64 {
    annotation
        .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t)
                .as_secs()
        })
        .unwrap_or(0)
}

/// Marks a draining group's drain as failing since now (`failing`), or clears the mark.
async fn mark_drain_failing(
    sts_api: &Api<StatefulSet>,
    group: &str,
    failing: bool,
) -> Result<(), Error> {
    let since = failing.then(|| k8s_openapi::jiff::Timestamp::now().to_string());
    let patch =
        serde_json::json!({"metadata": {"annotations": {ANNOTATION_DRAIN_FAILING_SINCE: since}}});
    sts_api
        .patch(group, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Gives write permission back to a group whose drain started but which the plan wants again
/// (a scale-in reverted before it finished). The broker keeps the wipe in memory only and has
/// no call to undo it, so the group's pods are rolled through a pod-template annotation: they
/// restart writable, and their registrations give the name servers write permission back.
async fn cancel_drain(
    ctx: &Context,
    bc: &BrokerCluster,
    sts_api: &Api<StatefulSet>,
    group: &str,
) -> Result<(), Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {ANNOTATION_DRAIN_STARTED: null, ANNOTATION_DRAIN_FAILING_SINCE: null}},
        "spec": {"template": {"metadata": {"annotations": {ANNOTATION_WRITES_RESTORED: now}}}},
    });
    sts_api
        .patch(group, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(cluster = %bc.name_any(), %group, "scale-in reverted: restarting the group to make it writable");
    publish(
        ctx,
        bc,
        EventType::Normal,
        "DrainCancelled",
        format!("{group} is wanted again: restarting its pods to make it writable"),
    )
    .await;
    Ok(())
}

/// One reconcile of a BrokerCluster.
pub async fn reconcile(bc: Arc<BrokerCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    if bc.spec.paused {
        return Ok(Action::await_change());
    }
    let ns = bc.namespace().ok_or(Error::Incomplete("a namespace"))?;
    let name = bc.name_any();
    let client = ctx.client.clone();
    let bcs: Api<BrokerCluster> = Api::namespaced(client.clone(), &ns);
    let plan = match plan(&name, &ns, &bc.spec, &ctx.default_image) {
        Ok(p) => p,
        Err(e) => {
            // A spec the schema let through but the plan refuses: say so and wait for an edit.
            let empty = ClusterPlan {
                cluster: name.clone(),
                namespace: ns.clone(),
                image: String::new(),
                name_server: crate::plan::NameServerPlan {
                    name: String::new(),
                    headless_service: String::new(),
                    service: String::new(),
                    replicas: 0,
                },
                namesrv_addr: String::new(),
                groups: Vec::new(),
                mode: crate::plan::describe(&bc.spec),
            };
            let obs = Observed::default();
            if patch_status(
                &bcs,
                &bc,
                build_status(&bc, &empty, &obs, Some(("InvalidSpec", e.to_string()))),
            )
            .await?
            {
                publish(&ctx, &bc, EventType::Warning, "InvalidSpec", e.to_string()).await;
            }
            return Ok(Action::await_change());
        }
    };
    let owner = bc
        .controller_owner_ref(&())
        .ok_or(Error::Incomplete("a uid"))?;
    let mut desired = render(&plan, &bc.spec, &owner);
    desired
        .stateful_sets
        .iter_mut()
        .for_each(stamp_template_hash);
    let selector = managed_selector(&name);

    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let live_sts = sts_api
        .list(&ListParams::default().labels(&selector))
        .await?;
    let wanted: HashSet<String> = plan.groups.iter().map(|g| g.name.clone()).collect();
    let group_ref = |group: &str| GroupRef {
        cluster: name.clone(),
        namespace: ns.clone(),
        group: group.to_string(),
        namesrv_addr: plan.namesrv_addr.clone(),
    };

    // Scale-in: groups no longer planned are drained (read-only, consumers caught up) before
    // their objects go. A group whose broker cannot be asked is kept and reported, and the
    // rest of the cluster is reconciled all the same.
    let mut keep = HashSet::new();
    let mut draining = Vec::new();
    let mut stuck = Vec::new();
    let mut drain_failed = Vec::new();
    // Groups whose pods this pass restarts outside the rollout order (a cancelled drain).
    let mut restarting = HashSet::new();
    let force = bc
        .annotations()
        .get(ANNOTATION_FORCE_DRAIN)
        .is_some_and(|v| v == "true");
    for sts in &live_sts.items {
        let labels = sts.labels();
        let Some(group) = labels.get(LABEL_GROUP).cloned() else {
            continue;
        };
        if labels.get(LABEL_COMPONENT).map(String::as_str) != Some("broker")
            || !controlled_by(sts, &owner.uid)
        {
            continue;
        }
        if wanted.contains(&group) {
            if sts.annotations().contains_key(ANNOTATION_DRAIN_STARTED) {
                cancel_drain(&ctx, &bc, &sts_api, &group).await?;
                restarting.insert(group);
            }
            continue;
        }
        let started = sts.annotations().get(ANNOTATION_DRAIN_STARTED).cloned();
        let timed_out = age_secs(started.as_deref()) > bc.spec.broker.drain_timeout_seconds;
        let failing_since = sts.annotations().get(ANNOTATION_DRAIN_FAILING_SINCE);
        let failed =
            match drain_step(&ctx, &bc, &sts_api, &group_ref(&group), started.is_none()).await {
                Ok(true) => {
                    publish(
                        &ctx,
                        &bc,
                        EventType::Normal,
                        "ScaledIn",
                        format!("{group} drained; removing it"),
                    )
                    .await;
                    continue; // not kept: deleted below with the other unwanted objects
                }
                Ok(false) => {
                    if failing_since.is_some() {
                        mark_drain_failing(&sts_api, &group, false).await?;
                    }
                    None
                }
                Err(e @ Error::Drain { .. }) => {
                    if failing_since.is_none() {
                        mark_drain_failing(&sts_api, &group, true).await?;
                    }
                    Some(e.to_string())
                }
                Err(e) => return Err(e),
            };
        // Force applies only to a drain that cannot finish (its broker has not answered for
        // FORCE_AFTER_FAILING_SECS, or the drain has run past its timeout): an annotation left
        // behind must not skip the drain of a group removed weeks later, nor one failed call.
        let failing_long = failed.is_some()
            && age_secs(failing_since.map(String::as_str)) >= FORCE_AFTER_FAILING_SECS;
        if force && (failing_long || timed_out) {
            let why = failed.unwrap_or_else(|| {
                format!(
                    "not drained within drainTimeoutSeconds ({}s)",
                    bc.spec.broker.drain_timeout_seconds
                )
            });
            tracing::warn!(cluster = %name, %group, reason = %why, "removing the group without draining ({ANNOTATION_FORCE_DRAIN})");
            publish(
                &ctx,
                &bc,
                EventType::Normal,
                "ScaledIn",
                format!("{group} removed without draining ({ANNOTATION_FORCE_DRAIN}): {why}"),
            )
            .await;
            continue; // not kept: deleted below with the other unwanted objects
        }
        if let Some(e) = failed {
            tracing::warn!(cluster = %name, %group, error = %e, "cannot drain the group; keeping it");
            drain_failed.push(e);
        }
        if timed_out {
            stuck.push(group.clone());
        }
        draining.push(group.clone());
        keep.insert(group);
    }

    // Broker groups take a new pod template one at a time. A waiting group's ConfigMap waits
    // with its StatefulSet: pods read broker.conf only when they start, so a pod restarting
    // early for another reason (eviction, OOM) would otherwise run the new config out of turn.
    let group_names: Vec<&str> = plan.groups.iter().map(|g| g.name.as_str()).collect();
    let running =
        running_groups(&client, &ns, &name, &live_sts.items, &desired.stateful_sets).await;
    let turns = rollout_turns(
        &group_names,
        &desired.stateful_sets,
        &live_sts.items,
        &restarting,
        &running,
    );
    if !turns.waiting.is_empty() {
        tracing::info!(cluster = %name, rolling = ?turns.now, waiting = ?turns.waiting, "broker groups roll one at a time");
    }
    let waiting: HashSet<String> = turns.waiting.iter().cloned().collect();
    desired
        .config_maps
        .retain(|c| !waiting.contains(&c.name_any()));
    desired
        .stateful_sets
        .retain(|s| !waiting.contains(&s.name_any()));
    let keep: HashSet<String> = keep.union(&waiting).cloned().collect();

    let cluster_key = failure_key(&bc);
    let all = ctx.full_apply_due(&cluster_key);
    let applied = async {
        Ok::<usize, Error>(
            sync_kind(
                &Api::<Service>::namespaced(client.clone(), &ns),
                &selector,
                &owner.uid,
                desired.services,
                &keep,
                keep_nothing,
                all,
            )
            .await?
                + sync_kind(
                    &Api::<ConfigMap>::namespaced(client.clone(), &ns),
                    &selector,
                    &owner.uid,
                    desired.config_maps,
                    &keep,
                    keep_nothing,
                    all,
                )
                .await?
                + sync_kind(
                    &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
                    &selector,
                    &owner.uid,
                    desired.pdbs,
                    &keep,
                    keep_nothing,
                    all,
                )
                .await?
                + sync_kind(
                    &sts_api,
                    &selector,
                    &owner.uid,
                    desired.stateful_sets,
                    &keep,
                    keep_claim_templates,
                    all,
                )
                .await?,
        )
    }
    .await;
    let writes = match applied {
        Ok(w) => {
            if all {
                ctx.full_apply_done(&cluster_key);
            }
            w
        }
        Err(Error::Kube(kube::Error::Api(ae))) if ae.code == 422 || ae.code == 400 => {
            // The API server refused what the spec renders into (say requests above limits):
            // the last generation's Ready must not stand. Other refusals (a conflict, being
            // throttled, RBAC) say nothing of the spec: retried with the backoff.
            let why = format!(
                "the API server refused an object of this spec: {}",
                ae.message
            );
            let old = bc.status.clone().unwrap_or_default();
            let obs = Observed {
                ns_ready: old.name_servers_ready,
                groups: old.groups,
                ..Default::default()
            };
            patch_status(
                &bcs,
                &bc,
                build_status(&bc, &plan, &obs, Some(("ApplyFailed", why))),
            )
            .await?;
            return Err(Error::Kube(kube::Error::Api(ae)));
        }
        Err(e) => return Err(e),
    };
    if writes > 0 {
        tracing::info!(cluster = %name, namespace = %ns, writes, "applied changes");
        publish(
            &ctx,
            &bc,
            EventType::Normal,
            "Applied",
            format!(
                "{writes} object(s) created, updated or deleted for {}",
                plan.mode
            ),
        )
        .await;
    }

    // Status from what the StatefulSets report.
    let live_sts = sts_api
        .list(&ListParams::default().labels(&selector))
        .await?;
    let find = |n: &str| live_sts.items.iter().find(|s| s.name_any() == n);
    let ready_of = |n: &str| {
        find(n)
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    };
    let rolling: Vec<String> = std::iter::once((&plan.name_server.name, plan.name_server.replicas))
        .chain(plan.groups.iter().map(|g| (&g.name, g.replicas())))
        .filter_map(|(n, want)| rollout_gap(n, find(n), want))
        .collect();
    let groups = plan
        .groups
        .iter()
        .map(|g| GroupStatus {
            name: g.name.clone(),
            replicas: g.replicas(),
            ready_replicas: ready_of(&g.name),
            roles: g
                .members
                .iter()
                .map(|m| m.role.as_str().to_string())
                .collect(),
            draining: false,
        })
        .chain(draining.iter().map(|d| GroupStatus {
            name: d.clone(),
            draining: true,
            ..Default::default()
        }))
        .collect();
    let obs = Observed {
        ns_ready: ready_of(&plan.name_server.name),
        groups,
        rolling,
        waiting: turns.waiting,
        draining,
        stuck,
        drain_failed,
    };
    let status = build_status(&bc, &plan, &obs, None);
    let was_ready = bc.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    let now_ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if patch_status(&bcs, &bc, status).await? && now_ready && !was_ready {
        publish(&ctx, &bc, EventType::Normal, "Ready", plan.mode.clone()).await;
    }
    // New groups get the topics the rest of the cluster serves once their master is up, so
    // scaling out spreads load without `mqadmin updateTopic -c`.
    let mut topics_pending = false;
    let shared =
        |n: &str| find(n).is_some_and(|s| s.annotations().contains_key(ANNOTATION_TOPICS_SHARED));
    for g in plan
        .groups
        .iter()
        .filter(|g| ready_of(&g.name) > 0 && !shared(&g.name))
    {
        let gref = group_ref(&g.name);
        match ctx.admin.share_topics(&gref).await {
            Ok(created) => {
                let mark = serde_json::json!({"metadata": {"annotations": {ANNOTATION_TOPICS_SHARED: "true"}}});
                sts_api
                    .patch(&g.name, &PatchParams::default(), &Patch::Merge(&mark))
                    .await?;
                if !created.is_empty() {
                    publish(
                        &ctx,
                        &bc,
                        EventType::Normal,
                        "TopicsShared",
                        format!("{} now serves {}", g.name, created.join(", ")),
                    )
                    .await;
                }
            }
            Err(reason) => {
                tracing::warn!(cluster = %name, group = %g.name, %reason, "cannot give the group the cluster's topics yet");
                topics_pending = true;
            }
        }
    }
    // Settings brokers change while running reach them without a restart (the ConfigMap,
    // which a restart reads, holds them too) once the spec changes them. Pushed only then,
    // so a value changed by hand on one broker (an emergency `brokerPermission=4`) stays
    // until the spec's live settings change; and only to a group settled on its template
    // (one rolling or waiting its turn gets them from the ConfigMap as it restarts).
    let mut settings_pending = false;
    let settled = |g: &crate::plan::BrokerGroupPlan| {
        ready_of(&g.name) > 0
            && !waiting.contains(&g.name)
            && rollout_gap(&g.name, find(&g.name), g.replicas()).is_none()
    };
    let key = |g: &str| format!("{ns}/{g}");
    for g in plan.groups.iter().filter(|g| {
        settled(g) && ctx.settings_applied(&key(&g.name)).as_deref() != Some(g.live_hash.as_str())
    }) {
        match ctx
            .admin
            .apply_settings(&group_ref(&g.name), &g.live_settings)
            .await
        {
            Ok(done) if done.checked < g.replicas() as usize => settings_pending = true,
            Ok(done) => {
                ctx.settings_done(&key(&g.name), &g.live_hash);
                if !done.changed.is_empty() {
                    publish(
                        &ctx,
                        &bc,
                        EventType::Normal,
                        "SettingsApplied",
                        format!("{} without a restart: {}", g.name, done.changed.join(", ")),
                    )
                    .await;
                }
            }
            Err(SettingsError::NotYet(reason)) => {
                tracing::warn!(cluster = %name, group = %g.name, %reason, "cannot bring the group's settings to the spec yet");
                settings_pending = true;
            }
            Err(SettingsError::Refused(reason)) => {
                publish(
                    &ctx,
                    &bc,
                    EventType::Warning,
                    "SettingsRefused",
                    format!(
                        "{}: {reason}; its pods take the settings when they restart",
                        g.name
                    ),
                )
                .await;
            }
        }
    }
    for s in &obs.stuck {
        publish(&ctx, &bc, EventType::Warning, "DrainTimeout", format!("{s} still has unconsumed messages; set annotation {ANNOTATION_FORCE_DRAIN}=true to remove it anyway")).await;
    }
    for f in &obs.drain_failed {
        publish(
            &ctx,
            &bc,
            EventType::Warning,
            "DrainFailed",
            force_drain_hint(f),
        )
        .await;
    }
    if obs.draining.is_empty() && now_ready && !topics_pending && !settings_pending {
        Ok(Action::requeue(FULL_APPLY_EVERY))
    } else {
        Ok(Action::requeue(Duration::from_secs(10)))
    }
}

/// Reconciles, and records a failure as a Warning event on the BrokerCluster so
/// `kubectl describe` shows it. Only a reconcile that succeeded to the end resets the backoff.
pub async fn reconcile_reporting(
    bc: Arc<BrokerCluster>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let result = reconcile(bc.clone(), ctx.clone()).await;
    match &result {
        Ok(_) => {
            ctx.failures().remove(&failure_key(&bc));
        }
        Err(e) => publish(&ctx, &bc, EventType::Warning, e.category(), e.to_string()).await,
    }
    result
}

fn failure_key(bc: &BrokerCluster) -> String {
    format!("{}/{}", bc.namespace().unwrap_or_default(), bc.name_any())
}

/// Requeue after an error with an exponential backoff per cluster (5 s doubling to 5 min);
/// one failing object never stops the others.
pub fn error_policy(bc: Arc<BrokerCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures();
        let n = f.entry(failure_key(&bc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(cluster = %bc.name_any(), category = err.category(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << n.saturating_sub(1).min(6))
            .min(300),
    )
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(6), Duration::from_secs(160));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(100), Duration::from_secs(300));
    }
}
