//! Leader election: one holder at a time, renewal by the holder, takeover after expiry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake;

use std::time::Duration;

use fake::FakeApi;
use operator::lease::LeaseLock;
use serde_json::json;

#[tokio::test]
async fn only_one_replica_leads_until_its_lease_expires() {
    let api = FakeApi::default();
    let a = LeaseLock::new(
        api.client(),
        "ops",
        "ferromq-operator",
        "replica-a",
        Duration::from_secs(1),
    );
    let b = LeaseLock::new(
        api.client(),
        "ops",
        "ferromq-operator",
        "replica-b",
        Duration::from_secs(1),
    );
    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "first candidate takes a free lease"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "second candidate must wait"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "holder renews");
    // The holder's clock is years behind b's: its renewals still count, as b judges expiry
    // by how long the lease goes unrenewed on its own clock.
    api.edit(
        "leases",
        "ops",
        "ferromq-operator",
        json!({"spec": {"renewTime": "2020-01-01T00:00:00.000000Z"}}),
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "a lease renewed just now was taken over because of its holder's clock"
    );
    // The holder stops renewing: once b has seen the lease unchanged for its duration, b
    // takes over.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "expired lease is taken over"
    );
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "old holder no longer leads"
    );
    let lease = api.get("leases", "ops", "ferromq-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    for (group, resource, verb) in api.calls() {
        assert!(
            operator::rbac::allows(
                operator::rbac::LEADER_ELECTION_RULES,
                &group,
                &resource,
                &verb
            ),
            "{verb} {group}/{resource}"
        );
    }
}
