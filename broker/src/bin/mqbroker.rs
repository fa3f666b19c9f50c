//! `mqbroker`: the ferromq broker.

/// mimalloc: the request path allocates many small, short-lived buffers, which glibc's
/// allocator serves markedly slower under two busy threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use broker::config::{split_namesrv, BrokerConfig};
use clap::Parser;

/// RocketMQ-compatible broker.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// broker.conf file (RocketMQ key names).
    #[arg(short = 'c', long = "configFile")]
    config: Option<PathBuf>,
    /// Name server list (`host:port;host:port`), overriding namesrvAddr.
    #[arg(short = 'n', long = "namesrvAddr", env = "NAMESRV_ADDR")]
    namesrv: Option<String>,
    /// StatefulSet pod name (`<set>-<ordinal>`): the ordinal becomes brokerId, and ordinals
    /// above 0 run as SLAVE. Lets one config serve every member of a group without a shell.
    #[arg(long = "pod-name", env = "FERROMQ_POD_NAME")]
    pod_name: Option<String>,
    /// Address to advertise (brokerIP1), e.g. the pod IP from the downward API.
    #[arg(long = "pod-ip", env = "FERROMQ_POD_IP")]
    pod_ip: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    broker::logging::init("info");
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(path) => match BrokerConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                broker::logging::say(format_args!("mqbroker: {}: {e}", path.display()));
                return ExitCode::FAILURE;
            }
        },
        None => BrokerConfig::default(),
    };
    if let Some(n) = &args.namesrv {
        cfg.namesrv_addrs = split_namesrv(n);
    }
    if let Some(ip) = &args.pod_ip {
        cfg.broker_ip = ip.clone();
    }
    if let Some(pod) = &args.pod_name {
        if let Err(e) = cfg.apply_ordinal(pod) {
            broker::logging::say(format_args!("mqbroker: {e}"));
            return ExitCode::FAILURE;
        }
    }
    if cfg.namesrv_addrs.is_empty() {
        broker::logging::say(format_args!(
            "mqbroker: no name server: set namesrvAddr in the config, -n, or NAMESRV_ADDR"
        ));
        return ExitCode::FAILURE;
    }
    let handle = match broker::server::start(cfg.clone()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "broker failed to start");
            broker::logging::say(format_args!("mqbroker: {e}"));
            return ExitCode::FAILURE;
        }
    };
    broker::logging::say(format_args!(
        "The broker[{}, {}] boot success. serializeType=JSON and name server is {}",
        cfg.broker_name,
        cfg.broker_addr(),
        cfg.namesrv_addrs.join(";")
    ));
    broker::logging::shutdown_signal().await;
    handle.stop().await;
    ExitCode::SUCCESS
}
