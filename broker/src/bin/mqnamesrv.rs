//! `mqnamesrv`: the ferromq name server.

/// mimalloc: the request path allocates many small, short-lived buffers, which glibc's
/// allocator serves markedly slower under two busy threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use broker::nameserver::{self, NameServerConfig};
use clap::Parser;

/// RocketMQ-compatible name server.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Remoting port.
    #[arg(
        long = "listen-port",
        short = 'p',
        default_value_t = 9876,
        env = "NAMESRV_LISTEN_PORT"
    )]
    listen_port: u16,
    /// HTTP port for /healthz, /readyz and /metrics.
    #[arg(long = "http-port", default_value_t = 9877, env = "NAMESRV_HTTP_PORT")]
    http_port: u16,
    /// Address to bind (`::`, the default, is every IPv6 and IPv4 address where the host has
    /// IPv6, and every IPv4 address where it has not).
    #[arg(long, default_value = "::")]
    bind: std::net::IpAddr,
    /// Drop a broker that has not registered for this long (ms).
    #[arg(long = "broker-timeout-ms", default_value_t = 120_000)]
    broker_timeout_ms: u64,
    /// Where the KV config (`mqadmin updateKvConfig`, ordered topics' queues) is saved, as
    /// Java's ~/namesrv/kvConfig.json; without it the values live in memory only (name servers
    /// are stateless by default: on Kubernetes they run on a read-only file system).
    #[arg(long = "kv-config-path", env = "NAMESRV_KV_CONFIG_PATH")]
    kv_config_path: Option<PathBuf>,
    /// Other name servers (`host:port;...`, a name resolving to several, itself among them, as
    /// a headless Service does): starting without KV config, this one copies a peer's.
    #[arg(long = "kv-peers", env = "NAMESRV_KV_PEERS")]
    kv_peers: Option<String>,
    /// Give routes an ordered topic's queues from the KV config (`orderTopicConf`, set by
    /// `updateTopic -o true`), as Java's `orderMessageEnable`; clients then route that topic by
    /// it alone.
    #[arg(long = "order-message-enable")]
    order_message_enable: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    broker::logging::init("info");
    let args = Args::parse();
    let cfg = NameServerConfig {
        listen: SocketAddr::new(args.bind, args.listen_port),
        http: SocketAddr::new(args.bind, args.http_port),
        broker_timeout: Duration::from_millis(args.broker_timeout_ms),
        scan_interval: Duration::from_secs(1),
        kv_config_path: args.kv_config_path,
        kv_peers: args
            .kv_peers
            .as_deref()
            .map(broker::config::split_namesrv)
            .unwrap_or_default(),
        order_message_enable: args.order_message_enable,
        ..Default::default()
    };
    let handle = match nameserver::start(cfg).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "name server failed to start");
            broker::logging::say(format_args!("mqnamesrv: {e}"));
            return ExitCode::FAILURE;
        }
    };
    broker::logging::say(format_args!(
        "The Name Server boot success. serializeType=JSON, address {}",
        handle.addr
    ));
    broker::logging::shutdown_signal().await;
    handle.stop().await;
    ExitCode::SUCCESS
}
