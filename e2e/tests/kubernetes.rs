//! End to end on a real cluster (kind, k3d or any other), not run in CI here (no cluster on
//! these machines). Run with:
//!
//! ```sh
//! E2E_KUBECONFIG=$HOME/.kube/config E2E_IMAGE=ferromq:0.1.0 \
//!   cargo test -p e2e --test kubernetes -- --ignored --test-threads=1
//! ```
//!
//! It installs the CRD and the operator from deploy/operator.yaml, applies every example,
//! waits for Ready, produces and consumes from inside a broker pod, scales masters out and in,
//! deletes the cluster and checks that everything it owned is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, AttachParams, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Discovery;
use kube::{Client, Config, ResourceExt};
use operator::crd::BrokerCluster;

type Error = Box<dyn std::error::Error + Send + Sync>;
const MANAGER: &str = "ferromq-e2e";

async fn client() -> Result<Client, Error> {
    let path = std::env::var("E2E_KUBECONFIG").map_err(|_| {
        "E2E_KUBECONFIG is not set: these tests need a cluster (see the module docs)"
    })?;
    let kc = Kubeconfig::read_from(&path)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn apply_yaml(client: &Client, text: &str, namespace: Option<&str>) -> Result<(), Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut obj: DynamicObject = match serde::Deserialize::deserialize(doc) {
            Ok(o) => o,
            Err(_) => continue,
        };
        let Some(types) = obj.types.clone() else {
            continue;
        };
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .ok_or(format!("unknown kind {gvk:?}"))?;
        if let (Ok(image), "Deployment") = (std::env::var("E2E_IMAGE"), types.kind.as_str()) {
            let c = &mut obj.data["spec"]["template"]["spec"]["containers"][0];
            c["image"] = serde_json::json!(image);
            for env in c["env"].as_array_mut().into_iter().flatten() {
                if env["name"] == "FERROMQ_IMAGE" {
                    env["value"] = serde_json::json!(image);
                }
            }
        }
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            let ns = namespace
                .map(String::from)
                .or_else(|| obj.namespace())
                .unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    Ok(())
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let start = Instant::now();
    loop {
        if f().await.unwrap_or(false) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

async fn install_operator(client: &Client) -> Result<(), Error> {
    apply_yaml(
        client,
        &std::fs::read_to_string(root().join("deploy/operator.yaml"))?,
        None,
    )
    .await?;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "ferromq-system");
    wait("the operator Deployment", Duration::from_secs(180), || {
        let deps = deps.clone();
        async move {
            let d = deps.get("ferromq-ferromq-operator").await?;
            Ok(d.status.and_then(|s| s.available_replicas).unwrap_or(0) >= 1)
        }
    })
    .await
}

async fn ready(bcs: &Api<BrokerCluster>, name: &str, groups: usize) -> Result<bool, Error> {
    let bc = bcs.get(name).await?;
    let Some(status) = bc.status else {
        return Ok(false);
    };
    let is_ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(is_ready && status.groups.iter().filter(|g| !g.draining).count() == groups)
}

async fn mqadmin(client: &Client, ns: &str, pod: &str, args: &[&str]) -> Result<String, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut cmd = vec!["/usr/local/bin/mqadmin"];
    cmd.extend_from_slice(args);
    let mut proc = pods
        .exec(pod, cmd, &AttachParams::default().stderr(false))
        .await?;
    let mut out = String::new();
    if let Some(mut stdout) = proc.stdout() {
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out).await?;
    }
    proc.join().await?;
    Ok(out)
}

async fn run_example(client: &Client, file: &str) -> Result<(), Error> {
    let text = std::fs::read_to_string(root().join("deploy/examples").join(file))?;
    let bc: BrokerCluster = serde_yaml::from_str(&text)?;
    let name = bc.metadata.name.clone().unwrap();
    let ns = format!("e2e-{name}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns_obj =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
    namespaces
        .patch(&ns, &PatchParams::apply(MANAGER), &Patch::Apply(&ns_obj))
        .await?;
    apply_yaml(client, &text, Some(&ns)).await?;
    let bcs: Api<BrokerCluster> = Api::namespaced(client.clone(), &ns);
    let masters = bc.spec.broker.masters as usize;
    wait(&format!("{name} Ready"), Duration::from_secs(600), || {
        let bcs = bcs.clone();
        let name = name.clone();
        async move { ready(&bcs, &name, masters).await }
    })
    .await?;

    // Produce and consume from inside the cluster, through the name-server Service.
    let namesrv = format!("{name}-nameserver.{ns}.svc:9876");
    let pod = format!("{name}-broker-0-0");
    let out = mqadmin(
        client,
        &ns,
        &pod,
        &["-n", &namesrv, "produce", "-t", "E2E", "-c", "100"],
    )
    .await?;
    assert!(out.contains("sent 100 messages"), "{out}");
    let out = mqadmin(
        client,
        &ns,
        &pod,
        &[
            "-n", &namesrv, "consume", "-t", "E2E", "-g", "e2e", "-c", "100",
        ],
    )
    .await?;
    assert!(out.contains("consumed 100 messages"), "{out}");

    // Scale masters out, then back in (drained before removal).
    let scale = |n: usize| serde_json::json!({"spec": {"broker": {"masters": n}}});
    bcs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&scale(masters + 1)),
    )
    .await?;
    wait(
        &format!("{name} scaled out"),
        Duration::from_secs(600),
        || {
            let (bcs, name) = (bcs.clone(), name.clone());
            async move { ready(&bcs, &name, masters + 1).await }
        },
    )
    .await?;
    bcs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&scale(masters)),
    )
    .await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let removed = format!("{name}-broker-{masters}");
    wait(
        &format!("{removed} removed"),
        Duration::from_secs(900),
        || {
            let (sts, removed) = (sts.clone(), removed.clone());
            async move { Ok(sts.get_opt(&removed).await?.is_none()) }
        },
    )
    .await?;

    // Deleting the cluster removes everything it owned.
    bcs.delete(&name, &DeleteParams::foreground()).await?;
    wait(
        &format!("{name} cleaned up"),
        Duration::from_secs(300),
        || {
            let sts = sts.clone();
            let selector = format!("app.kubernetes.io/instance={name}");
            async move {
                Ok(sts
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .is_empty())
            }
        },
    )
    .await?;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    println!("{file}: ready, produced and consumed 100 messages, scaled out and in, cleaned up");
    Ok(())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set E2E_KUBECONFIG and run with --ignored (see README)"]
async fn every_example_runs_scales_and_cleans_up_on_a_real_cluster() -> Result<(), Error> {
    let client = client().await?;
    install_operator(&client).await?;
    for file in [
        "single-master.yaml",
        "multi-master.yaml",
        "async-replication.yaml",
        "sync-double-write.yaml",
    ] {
        run_example(&client, file).await?;
    }
    Ok(())
}
