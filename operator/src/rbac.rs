//! The API calls the operator makes, as RBAC rules: the Helm chart grants these (a chart test
//! checks it), and the reconcile tests check the controller makes no call outside them.

use serde::Serialize;

/// One rule: verbs on resources of an API group.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// API group ("" for core).
    pub api_group: &'static str,
    /// Resource (plural, or plural/subresource).
    pub resource: &'static str,
    /// Verbs.
    pub verbs: &'static [&'static str],
}

/// Calls on BrokerClusters and the objects they own (granted in the watched namespaces).
/// Objects are written by server-side apply, a `patch` that the API server also authorizes
/// as `create` when the object does not exist yet.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "ferromq.io",
        resource: "brokerclusters",
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_group: "ferromq.io",
        resource: "brokerclusters/status",
        verbs: &["get", "patch"],
    },
    Rule {
        api_group: "apps",
        resource: "statefulsets",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_group: "",
        resource: "services",
        verbs: &["get", "list", "create", "patch", "delete"],
    },
    Rule {
        api_group: "",
        resource: "configmaps",
        verbs: &["get", "list", "create", "patch", "delete"],
    },
    Rule {
        api_group: "",
        resource: "pods",
        verbs: &["list"],
    },
    Rule {
        api_group: "policy",
        resource: "poddisruptionbudgets",
        verbs: &["get", "list", "create", "patch", "delete"],
    },
    Rule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// Calls for leader election (granted in the operator's own namespace).
pub const LEADER_ELECTION_RULES: &[Rule] = &[Rule {
    api_group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "update"],
}];

/// Whether `verb` on `group`/`resource` is granted by `rules`.
pub fn allows(rules: &[Rule], group: &str, resource: &str, verb: &str) -> bool {
    rules
        .iter()
        .any(|r| r.api_group == group && r.resource == resource && r.verbs.contains(&verb))
}
