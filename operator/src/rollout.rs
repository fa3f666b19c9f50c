//! Which broker groups may take a new pod template now. A template change (broker.conf, flush,
//! image, resources, an operator upgrade that renders pods differently) restarts every pod of
//! a group, slaves then master. Applied to every group in one pass it would restart every
//! master at once: no group would take writes until they are back, and under sync double write
//! every master would answer SLAVE_NOT_AVAILABLE. PodDisruptionBudgets do not help, since the
//! StatefulSet controller deletes pods directly. So serving groups roll one at a time.

use std::collections::HashSet;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;

use crate::controller::applied_hash;

/// StatefulSet annotation: hash of the pod template the operator last applied, which tells a
/// change that restarts pods from one that does not (replicas, labels).
pub const ANNOTATION_TEMPLATE_HASH: &str = "ferromq.io/template-hash";

/// Records on a rendered StatefulSet the hash of its pod template, so that a later pass can
/// tell whether applying a newer rendering restarts pods.
pub fn stamp_template_hash(sts: &mut StatefulSet) {
    let hash = applied_hash(&sts.spec.as_ref().map(|s| &s.template));
    sts.annotations_mut()
        .insert(ANNOTATION_TEMPLATE_HASH.into(), hash);
}

/// Why StatefulSet `name` does not yet run its current spec on `want` ready pods, or `None`
/// when it does: its controller has seen the latest generation, every pod is at the update
/// revision, and all are ready. Ready pods alone say nothing about a spec just edited, whose
/// pods have not rolled yet.
pub fn rollout_gap(name: &str, sts: Option<&StatefulSet>, want: i32) -> Option<String> {
    let Some(sts) = sts else {
        return Some(format!("{name} to be created"));
    };
    let st = sts.status.clone().unwrap_or_default();
    let updated = st.updated_replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    if !seen(sts) {
        return Some(format!("{name} to take its new spec"));
    }
    if st.replicas == want && updated == want && ready == want && !rolling_template(sts) {
        return None;
    }
    Some(format!(
        "{name} ({ready}/{want} ready, {updated}/{want} updated)"
    ))
}

/// Whether StatefulSet `sts` is rolling a pod template: its controller has not observed its
/// latest generation, or its pods are not all at the update revision (the controller makes the
/// current revision the update revision only once every pod is updated and ready). A group
/// short of ready pods at a settled revision (a slave Pending for want of room, a crashed pod)
/// is not rolling: making others wait for it could block the very change that fixes it.
fn rolling_template(sts: &StatefulSet) -> bool {
    let st = sts.status.as_ref();
    let revisions_differ = match st.map(|s| (&s.current_revision, &s.update_revision)) {
        Some((Some(current), Some(update))) => current != update,
        _ => false,
    };
    !seen(sts) || revisions_differ
}

/// Whether the StatefulSet controller has observed `sts`'s latest generation.
fn seen(sts: &StatefulSet) -> bool {
    let observed = sts.status.as_ref().and_then(|s| s.observed_generation);
    observed.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0)
}

/// Whether the live StatefulSet `live` has a pod template other than `desired`'s (stamped):
/// applying it restarts the group's pods.
pub fn takes_new_template(live: &StatefulSet, desired: &StatefulSet) -> bool {
    let applied = live.annotations().get(ANNOTATION_TEMPLATE_HASH);
    applied.is_none() || applied != desired.annotations().get(ANNOTATION_TEMPLATE_HASH)
}

/// Which existing broker groups' pod-template changes one reconcile pass applies, and which
/// wait their turn (their StatefulSet and ConfigMap are left as they are, applied-hash
/// included, so a later pass applies them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RolloutTurns {
    /// Groups whose new pod template is applied in this pass.
    pub now: Vec<String>,
    /// Groups whose new pod template waits until no other group is rolling.
    pub waiting: Vec<String>,
}

/// Decides which of the existing broker groups (`groups`, the plan's, in index order) take
/// their new pod template (`desired`, stamped) in this pass, given the `live` StatefulSets and
/// the groups whose pods this pass restarts for another reason (`restarting`).
///
/// - A group whose template is unchanged is not concerned: replicas alone (slavesPerMaster)
///   add or remove slaves, the highest ordinals, and never restart a master. New groups are
///   not concerned either: they do not exist yet.
/// - A group with no ready pod and none running (`running` lists the groups with a pod
///   whose container runs) serves nothing, so it loses nothing by rolling: it takes its
///   template at once. Otherwise a cluster whose every group is down (a bad image) could
///   never be fixed, each group waiting for the others. A group whose pods run but are not
///   ready (brokers are unready while no name server takes their registration) still holds
///   its data and clients, and waits its turn: a name-server outage during a change must not
///   restart every group at once.
/// - Of the serving groups, the first by index rolls, and only once no other existing group
///   is rolling a template (`rolling_template`, or restarted in this pass); the rest wait.
///   Groups short of ready pods at a settled revision do not hold the others. Groups being
///   drained are not counted: they take no writes and a stuck one must not stop rollouts.
///   The name servers roll on their own: brokers register with every name server, and
///   clients know several.
pub fn rollout_turns(
    groups: &[&str],
    desired: &[StatefulSet],
    live: &[StatefulSet],
    restarting: &HashSet<String>,
    running: &HashSet<String>,
) -> RolloutTurns {
    fn find<'a>(list: &'a [StatefulSet], name: &str) -> Option<&'a StatefulSet> {
        list.iter().find(|s| s.name_any() == name)
    }
    let existing: Vec<(&str, &StatefulSet)> = groups
        .iter()
        .filter_map(|g| find(live, g).map(|s| (*g, s)))
        .collect();
    let rolling: HashSet<&str> = existing
        .iter()
        .filter(|(g, s)| restarting.contains(*g) || rolling_template(s))
        .map(|(g, _)| *g)
        .collect();
    let mut turns = RolloutTurns::default();
    let mut serving_rolls = false;
    for (g, s) in &existing {
        let Some(new) = find(desired, g) else {
            continue;
        };
        if !takes_new_template(s, new) {
            continue;
        }
        let ready = s
            .status
            .as_ref()
            .and_then(|st| st.ready_replicas)
            .unwrap_or(0);
        let others_settled = rolling.iter().all(|u| u == g);
        let down = ready == 0 && !running.contains(*g);
        if down || (!serving_rolls && others_settled) {
            serving_rolls |= !down;
            turns.now.push(g.to_string());
        } else {
            turns.waiting.push(g.to_string());
        }
    }
    turns
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    /// A rendered StatefulSet whose pod template is told by `image`.
    fn rendered(name: &str, image: &str, replicas: i32) -> StatefulSet {
        let mut sts = StatefulSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some(BTreeMap::from([("image".into(), image.into())])),
                        ..Default::default()
                    }),
                    spec: None,
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        stamp_template_hash(&mut sts);
        sts
    }

    /// `rendered` as applied and rolled out (every pod at one revision), `ready` of its pods
    /// ready.
    fn live(name: &str, image: &str, replicas: i32, ready: i32) -> StatefulSet {
        let mut sts = rendered(name, image, replicas);
        sts.metadata.generation = Some(1);
        sts.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas,
            ready_replicas: Some(ready),
            updated_replicas: Some(replicas),
            current_revision: Some(format!("{name}-r1")),
            update_revision: Some(format!("{name}-r1")),
            ..Default::default()
        });
        sts
    }

    /// `rendered` as applied and still rolling it: the controller has seen it, and not every
    /// pod is updated and ready, so the current revision is still the previous one.
    fn rolling(name: &str, image: &str, replicas: i32, ready: i32) -> StatefulSet {
        let mut sts = live(name, image, replicas, ready);
        let st = sts.status.as_mut().unwrap();
        st.update_revision = Some(format!("{name}-r2"));
        st.updated_replicas = Some(1);
        sts
    }

    const GROUPS: &[&str] = &["b-0", "b-1", "b-2"];

    fn turns(desired: &[StatefulSet], live: &[StatefulSet]) -> (Vec<String>, Vec<String>) {
        let t = rollout_turns(GROUPS, desired, live, &HashSet::new(), &HashSet::new());
        (t.now, t.waiting)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serving_groups_take_a_new_template_one_at_a_time_in_index_order() {
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v2", 2)).collect();
        let mut live: Vec<_> = GROUPS.iter().map(|g| live(g, "v1", 2, 2)).collect();
        assert_eq!(
            turns(&desired, &live),
            (strings(&["b-0"]), strings(&["b-1", "b-2"]))
        );
        // b-0 applied, not yet seen by its controller: nobody else moves, not even b-0 again.
        live[0] = self::live("b-0", "v2", 2, 2);
        live[0].metadata.generation = Some(2);
        assert_eq!(turns(&desired, &live), (vec![], strings(&["b-1", "b-2"])));
        // Seen and rolling: still nobody, though every pod may be ready for a moment.
        live[0] = rolling("b-0", "v2", 2, 2);
        assert_eq!(turns(&desired, &live), (vec![], strings(&["b-1", "b-2"])));
        live[0] = self::live("b-0", "v2", 2, 2);
        assert_eq!(
            turns(&desired, &live),
            (strings(&["b-1"]), strings(&["b-2"]))
        );
    }

    #[test]
    fn replicas_alone_new_groups_and_unchanged_groups_never_wait() {
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v1", 3)).collect();
        let live = vec![live("b-0", "v1", 2, 2), live("b-1", "v1", 2, 1)];
        assert_eq!(turns(&desired, &live), (vec![], vec![]));
    }

    #[test]
    fn a_group_that_serves_nothing_rolls_at_once_and_holds_the_others_while_rolling() {
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v2", 2)).collect();
        // b-1 is down (a bad image): the fix reaches it at once, besides the one serving group
        // allowed to roll.
        let live: Vec<_> = vec![
            live("b-0", "v1", 2, 2),
            live("b-1", "v1", 2, 0),
            live("b-2", "v1", 2, 2),
        ];
        assert_eq!(
            turns(&desired, &live),
            (strings(&["b-0", "b-1"]), strings(&["b-2"]))
        );
        // b-1 rolling the fix: the serving groups wait until it is done.
        let live: Vec<_> = vec![
            self::live("b-0", "v1", 2, 2),
            rolling("b-1", "v2", 2, 0),
            self::live("b-2", "v1", 2, 2),
        ];
        assert_eq!(turns(&desired, &live), (vec![], strings(&["b-0", "b-2"])));
        // Every group down: all take the fix.
        let live: Vec<_> = GROUPS.iter().map(|g| self::live(g, "v1", 2, 0)).collect();
        assert_eq!(turns(&desired, &live), (strings(GROUPS), vec![]));
    }

    #[test]
    fn groups_running_but_unready_take_their_turn() {
        // A name-server outage: every broker runs, none is ready (none registered). They hold
        // their data and clients, so they roll one at a time; only b-2, whose pods do not run
        // at all (crash-looping), takes the change at once.
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v2", 2)).collect();
        let live: Vec<_> = GROUPS.iter().map(|g| live(g, "v1", 2, 0)).collect();
        let running = HashSet::from(["b-0".to_string(), "b-1".to_string()]);
        let t = rollout_turns(GROUPS, &desired, &live, &HashSet::new(), &running);
        assert_eq!(
            (t.now, t.waiting),
            (strings(&["b-0", "b-2"]), strings(&["b-1"]))
        );
    }

    #[test]
    fn groups_short_of_ready_pods_at_a_settled_revision_do_not_block_a_rollout() {
        // After a slavesPerMaster increase the cluster has no room for, each group has a
        // Pending slave; the change that makes them fit (resources) must still roll.
        let groups = ["b-0", "b-1"];
        let desired: Vec<_> = groups.iter().map(|g| rendered(g, "v2", 2)).collect();
        let live: Vec<_> = groups.iter().map(|g| live(g, "v1", 2, 1)).collect();
        let t = rollout_turns(&groups, &desired, &live, &HashSet::new(), &HashSet::new());
        assert_eq!((t.now, t.waiting), (strings(&["b-0"]), strings(&["b-1"])));
    }

    #[test]
    fn a_group_rolling_for_another_reason_holds_the_others() {
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v2", 2)).collect();
        let mut live: Vec<_> = GROUPS.iter().map(|g| live(g, "v1", 2, 2)).collect();
        // Half-rolled (pods on two revisions) though every pod is ready.
        live[2].status.as_mut().unwrap().current_revision = Some("r1".into());
        live[2].status.as_mut().unwrap().update_revision = Some("r2".into());
        assert_eq!(
            turns(&desired, &live),
            (strings(&["b-2"]), strings(&["b-0", "b-1"]))
        );
        // Restarted in this very pass (a cancelled drain).
        let live: Vec<_> = GROUPS.iter().map(|g| self::live(g, "v1", 2, 2)).collect();
        let restarting = HashSet::from(["b-1".to_string()]);
        let t = rollout_turns(GROUPS, &desired, &live, &restarting, &HashSet::new());
        assert_eq!(
            (t.now, t.waiting),
            (strings(&["b-1"]), strings(&["b-0", "b-2"]))
        );
    }

    #[test]
    fn a_stateful_set_applied_before_template_hashes_existed_counts_as_changed() {
        let desired: Vec<_> = GROUPS.iter().map(|g| rendered(g, "v1", 2)).collect();
        let live: Vec<_> = GROUPS
            .iter()
            .map(|g| {
                let mut s = live(g, "v1", 2, 2);
                s.annotations_mut().remove(ANNOTATION_TEMPLATE_HASH);
                s
            })
            .collect();
        assert_eq!(
            turns(&desired, &live),
            (strings(&["b-0"]), strings(&["b-1", "b-2"]))
        );
    }
}
