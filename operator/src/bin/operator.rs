//! `operator`: runs ferromq clusters on Kubernetes.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::Api;
use operator::admin::BrokerAdmin;
use operator::controller::{self, Context};
use operator::crd::BrokerCluster;
use operator::lease::LeaseLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The ferromq Kubernetes operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the BrokerCluster CustomResourceDefinition (YAML).
    Crd,
    /// Print the RBAC rules the operator needs (JSON), for packaging checks.
    Rbac,
    /// Run a BrokerCluster file as local processes (the quick start); follows edits of FILE.
    Local {
        /// BrokerCluster YAML file.
        file: std::path::PathBuf,
        /// Data and logs (default: ./ferromq-local/<cluster name>).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// First name-server port.
        #[arg(long, default_value_t = 9876)]
        namesrv_port: u16,
        /// First broker port (members take steps of 10).
        #[arg(long, default_value_t = 10911)]
        broker_port: u16,
        /// Directory holding mqnamesrv and mqbroker (default: next to this binary).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Skip the produce/consume check after start.
        #[arg(long)]
        no_check: bool,
    },
    /// Watch BrokerClusters and reconcile them.
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Image for clusters whose spec names none.
        #[arg(long, env = "FERROMQ_IMAGE", default_value = "ferromq:latest")]
        image: String,
        /// Port of /healthz, /readyz and /metrics.
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Namespace of the leader-election Lease (default: the pod's, or "default").
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Disable leader election (a single replica only).
        #[arg(long)]
        no_leader_election: bool,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct Outcome {
    result: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    broker::logging::init("info");
    match Args::parse().cmd {
        Cmd::Crd => match operator::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("operator: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Rbac => {
            let rules = serde_json::json!({
                "rules": operator::rbac::RULES,
                "leaderElection": operator::rbac::LEADER_ELECTION_RULES,
            });
            println!("{rules:#}");
            ExitCode::SUCCESS
        }
        Cmd::Local {
            file,
            data_dir,
            namesrv_port,
            broker_port,
            bin_dir,
            no_check,
        } => {
            let name = operator::local::read_cluster(&file)
                .ok()
                .and_then(|bc| bc.metadata.name)
                .unwrap_or_else(|| "local".into());
            let exe_dir = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_default();
            let opts = operator::local::LocalOptions {
                file,
                data_dir: data_dir
                    .unwrap_or_else(|| std::path::PathBuf::from("ferromq-local").join(name)),
                namesrv_port,
                broker_port,
                bin_dir: bin_dir.unwrap_or(exe_dir),
            };
            match operator::local::run(opts, Arc::new(BrokerAdmin), !no_check).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("operator local: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run {
            namespace,
            image,
            http_port,
            lease_namespace,
            no_leader_election,
        } => {
            match run(
                namespace,
                image,
                http_port,
                lease_namespace,
                !no_leader_election,
            )
            .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("operator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(
    namespace: Option<String>,
    image: String,
    http_port: u16,
    lease_namespace: Option<String>,
    elect: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = kube::Client::try_default().await?;
    let mut registry = Registry::with_prefix("ferromq_operator");
    let reconciles = Family::<Outcome, Counter>::default();
    let durations = Histogram::new(exponential_buckets(0.001, 2.0, 14));
    registry.register("reconciles", "Reconciles, by result", reconciles.clone());
    registry.register(
        "reconcile_duration_seconds",
        "Time spent in reconcile",
        durations.clone(),
    );
    let health = broker::http::HealthState::new(registry, None);
    let shutdown = CancellationToken::new();
    let listener = broker::http::bind(SocketAddr::from((
        std::net::Ipv6Addr::UNSPECIFIED,
        http_port,
    )))
    .await?;
    tokio::spawn(broker::http::serve(
        listener,
        health.clone(),
        shutdown.clone(),
    ));

    // Alive and able to serve probes whether or not it leads: a standby replica is healthy.
    // Alive and able to serve probes whether or not it leads: a standby replica is healthy.
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    if elect {
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("operator-{}", std::process::id()));
        let ns = lease_namespace.unwrap_or_else(|| "default".into());
        let lock = Arc::new(LeaseLock::new(
            client.clone(),
            &ns,
            "ferromq-operator",
            &identity,
            Duration::from_secs(15),
        ));
        tracing::info!(%identity, lease_namespace = %ns, "waiting for leadership");
        while !lock.try_acquire_or_renew().await? {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        tracing::info!(%identity, "became leader");
        let lost = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                match lock.try_acquire_or_renew().await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        tracing::error!(
                            "lost the leader lease; stopping so another replica can lead"
                        );
                        lost.cancel();
                        return;
                    }
                }
            }
        });
    }

    let (bcs, sts): (Api<BrokerCluster>, Api<StatefulSet>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferromq-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        recorder,
        image,
        Arc::new(BrokerAdmin),
    ));
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let stop = shutdown.clone();
    let controller = Controller::new(bcs, watcher::Config::default())
        .owns(
            sts,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=ferromq-operator"),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            move |bc, ctx| {
                let (reconciles, durations) = (reconciles.clone(), durations.clone());
                async move {
                    let started = Instant::now();
                    let r = controller::reconcile_reporting(bc, ctx).await;
                    durations.observe(started.elapsed().as_secs_f64());
                    let result = match &r {
                        Ok(_) => "ok".to_string(),
                        Err(e) => e.category().to_string(),
                    };
                    reconciles.get_or_create(&Outcome { result }).inc();
                    r
                }
            },
            controller::error_policy,
            ctx,
        )
        .for_each(|res| async move {
            match res {
                Ok((obj, _action)) => tracing::debug!(cluster = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile error"),
            }
        });
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        broker::logging::shutdown_signal().await;
        on_signal.cancel();
    });
    // Runs until a signal or a lost lease cancels it; in-flight reconciles finish first.
    controller.await;
    if elect && !shutdown.is_cancelled() {
        return Err("controller stopped unexpectedly".into());
    }
    Ok(())
}
