//! `mqadmin`: admin, produce/consume and benchmark tool for ferromq (and RocketMQ) clusters.

/// mimalloc: the request path allocates many small, short-lived buffers, which glibc's
/// allocator serves markedly slower under two busy threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::client::{Client, Message, Producer, PullConsumer};
use broker::config::split_namesrv;
use broker::remoting::connection::ClientError;
use broker::remoting::header::QueryMessageRequestHeader;
use broker::remoting::{RemotingCommand, RequestCode, SerializeType};
use broker::store::index::has_key;
use broker::store::message::{property, PROP_UNIQ_KEY};
use broker::store::topics::TopicConfig;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

/// Admin and benchmark tool for ferromq clusters.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Name server list (`host:port;host:port`).
    #[arg(
        short = 'n',
        long = "namesrvAddr",
        env = "NAMESRV_ADDR",
        default_value = "127.0.0.1:9876",
        global = true
    )]
    namesrv: String,
    /// How request headers are encoded: `json` (what Java clients send by default) or
    /// `rocketmq` (RocketMQ's binary form, cheaper to read and write).
    #[arg(long, value_enum, default_value_t = Headers::Json, global = true)]
    headers: Headers,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Header encodings a user can pick.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Headers {
    Json,
    Rocketmq,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or update a topic on every master of a cluster (or one broker).
    #[command(name = "updateTopic")]
    UpdateTopic {
        /// Topic name.
        #[arg(short = 't', long)]
        topic: String,
        /// Cluster whose masters get the topic.
        #[arg(short = 'c', long, conflicts_with = "broker")]
        cluster: Option<String>,
        /// One broker address instead of a cluster.
        #[arg(short = 'b', long)]
        broker: Option<String>,
        /// Read queues.
        #[arg(short = 'r', long = "readQueueNums", default_value_t = 8)]
        read: i32,
        /// Write queues.
        #[arg(short = 'w', long = "writeQueueNums", default_value_t = 8)]
        write: i32,
        /// Permission (6 = read+write).
        #[arg(short = 'p', long, default_value_t = 6)]
        perm: i32,
    },
    /// Delete a topic from every master of a cluster and from the name servers' routes.
    #[command(name = "deleteTopic")]
    DeleteTopic {
        /// Topic name.
        #[arg(short = 't', long)]
        topic: String,
        /// Cluster whose masters hold the topic.
        #[arg(short = 'c', long)]
        cluster: String,
    },
    /// Print a broker's settings in effect, as broker.conf lines.
    #[command(name = "getBrokerConfig")]
    GetBrokerConfig {
        /// Broker address.
        #[arg(short = 'b', long)]
        broker: String,
    },
    /// Change a setting of running brokers (one of those README's broker.conf table marks as
    /// changeable while the broker runs); each saves it to its broker.conf.
    #[command(name = "updateBrokerConfig")]
    UpdateBrokerConfig {
        /// Broker address.
        #[arg(
            short = 'b',
            long,
            required_unless_present = "cluster",
            conflicts_with = "cluster"
        )]
        broker: Option<String>,
        /// Every master of this cluster (with -a, its slaves too).
        #[arg(short = 'c', long)]
        cluster: Option<String>,
        /// With -c: slaves as well (`-a` or, as Java's tool takes it, `-a true`).
        #[arg(
            short = 'a',
            long = "all",
            requires = "cluster",
            num_args = 0..=1,
            default_missing_value = "true",
            default_value = "false"
        )]
        all: bool,
        /// Setting, as broker.conf names it.
        #[arg(short = 'k', long)]
        key: String,
        /// New value.
        #[arg(short = 'v', long)]
        value: String,
    },
    /// List every topic.
    #[command(name = "topicList")]
    TopicList,
    /// Show a topic's route.
    #[command(name = "topicRoute")]
    TopicRoute {
        /// Topic name.
        #[arg(short = 't', long)]
        topic: String,
    },
    /// Show clusters, broker groups and their members.
    #[command(name = "clusterList")]
    ClusterList,
    /// Show a consumer group's committed offsets and lag per queue.
    #[command(name = "consumerProgress")]
    ConsumerProgress {
        /// Consumer group.
        #[arg(short = 'g', long)]
        group: String,
        /// Topic.
        #[arg(short = 't', long)]
        topic: String,
    },
    /// Find a topic's messages by key (`KEYS`) on every broker group that has the topic.
    #[command(name = "queryMsgByKey")]
    QueryMsgByKey {
        /// Topic.
        #[arg(short = 't', long)]
        topic: String,
        /// Key.
        #[arg(short = 'k', long = "msgKey")]
        key: String,
        /// Earliest store time, ms since the epoch.
        #[arg(short = 'b', long = "beginTimestamp", default_value_t = 0)]
        begin: i64,
        /// Latest store time, ms since the epoch.
        #[arg(short = 'e', long = "endTimestamp", default_value_t = i64::MAX)]
        end: i64,
        /// Most messages per broker group (a broker answers 64 at most).
        #[arg(short = 'm', long = "maxNum", default_value_t = 64)]
        max: i32,
    },
    /// Show a message of a topic by the message id its producer was given (`UNIQ_KEY`).
    #[command(name = "queryMsgByUniqueKey")]
    QueryMsgByUniqueKey {
        /// Topic.
        #[arg(short = 't', long)]
        topic: String,
        /// Message id.
        #[arg(short = 'i', long = "msgId")]
        id: String,
    },
    /// A consumer group's clients as they see themselves (subscriptions, queues held, offsets
    /// and rates), asked through a broker of the group.
    #[command(name = "consumerStatus")]
    ConsumerStatus {
        /// Consumer group.
        #[arg(short = 'g', long = "consumerGroup")]
        group: String,
        /// One client id (default: every client of the group).
        #[arg(short = 'i', long = "clientId")]
        client_id: Option<String>,
        /// Include the client's thread stacks.
        #[arg(short = 's', long = "jstack")]
        jstack: bool,
    },
    /// Send messages.
    #[command(name = "produce")]
    Produce {
        /// Topic.
        #[arg(short = 't', long)]
        topic: String,
        /// Messages to send.
        #[arg(short = 'c', long, default_value_t = 10)]
        count: u64,
        /// Body size in bytes (bodies carry a sequence number).
        #[arg(short = 's', long, default_value_t = 128)]
        size: usize,
        /// Tag of every message.
        #[arg(long)]
        tags: Option<String>,
        /// Producer group.
        #[arg(short = 'g', long, default_value = "mqadmin_producer")]
        group: String,
    },
    /// Consume messages of a topic for a consumer group, committing offsets.
    #[command(name = "consume")]
    Consume {
        /// Topic.
        #[arg(short = 't', long)]
        topic: String,
        /// Consumer group.
        #[arg(short = 'g', long, default_value = "mqadmin_consumer")]
        group: String,
        /// Stop after this many messages (0 = until idle).
        #[arg(short = 'c', long, default_value_t = 0)]
        count: u64,
        /// Stop after this long without a new message (seconds).
        #[arg(long = "idle-secs", default_value_t = 5)]
        idle_secs: u64,
        /// Print each message (body as UTF-8 where possible).
        #[arg(long)]
        print: bool,
    },
    /// Measure send and consume throughput and latency.
    #[command(name = "bench")]
    Bench(BenchArgs),
}

/// How bench producers send.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum BenchMode {
    /// Each producer waits for one send's answer before the next (RocketMQ's sync send).
    Sync,
    /// Each producer keeps `--inflight` sends outstanding (RocketMQ's async send).
    Async,
    /// Each producer sends `--batch` messages per request (SEND_BATCH_MESSAGE), one at a time.
    Batch,
}

/// `mqadmin bench` options.
#[derive(clap::Args, Debug, Clone)]
struct BenchArgs {
    /// Topic (created on every master if missing).
    #[arg(short = 't', long, default_value = "BenchmarkTest")]
    topic: String,
    /// Concurrent producers.
    #[arg(short = 'p', long, default_value_t = 4)]
    producers: usize,
    /// Body size in bytes.
    #[arg(short = 's', long, default_value_t = 1024)]
    size: usize,
    /// Seconds to send for (ignored when --count is set).
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Send exactly this many messages instead of sending for --duration.
    #[arg(short = 'c', long, default_value_t = 0)]
    count: u64,
    /// sync, async or batch.
    #[arg(short = 'm', long, value_enum, default_value_t = BenchMode::Sync)]
    mode: BenchMode,
    /// Outstanding sends per producer in async mode.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Messages per request in batch mode.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Queues of the topic when the bench creates it.
    #[arg(long, default_value_t = 8)]
    queues: i32,
    /// Also drain what was sent with a consumer and report its rate.
    #[arg(long)]
    consume: bool,
    /// Only drain the topic's backlog with a new consumer group (no sending).
    #[arg(long, conflicts_with = "consume")]
    consume_only: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Threads driving the producers. One thread needs the least CPU per message and leaves
    /// the other cores to the broker when both share a host; raise it on bigger machines.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("mqadmin: {e}");
    ExitCode::FAILURE
}

/// A query's exit: finding nothing is a failure, as for Java's tools.
fn queried(found: Result<usize, ClientError>, what: &str) -> ExitCode {
    match found {
        Ok(0) => fail(format!("no message found by {what}")),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    broker::logging::init("warn");
    let args = Args::parse();
    // Admin commands are a few requests: one thread serves them. Bench picks its own.
    let threads = match &args.cmd {
        Cmd::Bench(b) => b.threads.max(1),
        _ => 1,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => fail(format!("cannot start the async runtime: {e}")),
    }
}

async fn run(args: Args) -> ExitCode {
    let headers = match args.headers {
        Headers::Json => SerializeType::Json,
        Headers::Rocketmq => SerializeType::RocketMq,
    };
    let client = Client::with_headers(split_namesrv(&args.namesrv), headers);
    let result = match args.cmd {
        Cmd::UpdateTopic {
            topic,
            cluster,
            broker,
            read,
            write,
            perm,
        } => update_topic(&client, &topic, cluster, broker, read, write, perm).await,
        Cmd::DeleteTopic { topic, cluster } => match masters(&client, Some(&cluster)).await {
            Ok(targets) if targets.is_empty() => Err(ClientError::BadResponse {
                addr: client.namesrv().join(";"),
                detail: format!("no master of cluster {cluster} is registered (check -n and -c)"),
            }),
            Ok(targets) => {
                let addrs: Vec<String> = targets.into_iter().map(|(_, a)| a).collect();
                client
                    .delete_topic(&topic, &addrs, Some(&cluster))
                    .await
                    .map(|()| println!("delete topic [{topic}] from cluster [{cluster}] success."))
            }
            Err(e) => Err(e),
        },
        Cmd::GetBrokerConfig { broker } => {
            let req =
                RemotingCommand::request(RequestCode::GetBrokerConfig.code(), Default::default());
            client
                .call_ok(&broker, req)
                .await
                .map(|resp| print!("{}", String::from_utf8_lossy(&resp.body)))
        }
        Cmd::UpdateBrokerConfig {
            broker,
            cluster,
            all,
            key,
            value,
        } => update_broker_config(&client, broker, cluster, all, &key, &value).await,
        Cmd::TopicList => client.topic_list().await.map(|l| {
            for t in l.topic_list {
                println!("{t}");
            }
        }),
        Cmd::TopicRoute { topic } => client.refresh_route(&topic).await.map(|r| {
            println!("{}", serde_json::to_string_pretty(&*r).unwrap_or_default());
        }),
        Cmd::ClusterList => cluster_list(&client).await,
        Cmd::ConsumerProgress { group, topic } => consumer_progress(&client, &group, &topic).await,
        Cmd::QueryMsgByKey {
            topic,
            key,
            begin,
            end,
            max,
        } => {
            let q = QueryMessageRequestHeader {
                topic,
                key,
                max_num: max,
                begin_timestamp: begin,
                end_timestamp: end,
                index_type: Some("K".into()),
                unique_key_query: None,
            };
            let what = format!("key {} in topic {}", q.key, q.topic);
            return queried(query_messages(&client, q).await, &what);
        }
        Cmd::QueryMsgByUniqueKey { topic, id } => {
            let q = QueryMessageRequestHeader {
                topic,
                key: id,
                max_num: 32,
                begin_timestamp: 0,
                end_timestamp: i64::MAX,
                index_type: Some("U".into()),
                unique_key_query: Some("true".into()),
            };
            let what = format!("message id {} in topic {}", q.key, q.topic);
            return queried(query_messages(&client, q).await, &what);
        }
        Cmd::ConsumerStatus {
            group,
            client_id,
            jstack,
        } => consumer_status(&client, &group, client_id, jstack).await,
        Cmd::Produce {
            topic,
            count,
            size,
            tags,
            group,
        } => produce(client.clone(), &topic, count, size, tags, &group).await,
        Cmd::Consume {
            topic,
            group,
            count,
            idle_secs,
            print,
        } => {
            consume(
                client.clone(),
                &topic,
                &group,
                count,
                Duration::from_secs(idle_secs),
                print,
            )
            .await
        }
        Cmd::Bench(b) => bench(client.clone(), b).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn masters(
    client: &Client,
    cluster: Option<&str>,
) -> Result<Vec<(String, String)>, ClientError> {
    let info = client.cluster_info().await?;
    let mut out = Vec::new();
    for (name, bd) in &info.broker_addr_table {
        if cluster.is_some_and(|c| c != bd.cluster) {
            continue;
        }
        if let Some(m) = bd.master_addr() {
            out.push((name.clone(), m.to_string()));
        }
    }
    Ok(out)
}

/// Sends one setting to a broker, or to each broker of a cluster (masters; with `all`,
/// slaves too), going on past a broker that refuses it; any refusal fails the command.
async fn update_broker_config(
    client: &Client,
    broker: Option<String>,
    cluster: Option<String>,
    all: bool,
    key: &str,
    value: &str,
) -> Result<(), ClientError> {
    if key.trim().is_empty() || key.contains(['=', ':', '\n']) || value.contains('\n') {
        return Err(ClientError::BadResponse {
            addr: "input".into(),
            detail: "-k names one setting (no '=', ':' or line break) and -v is one line".into(),
        });
    }
    let targets: Vec<String> = match (broker, cluster) {
        (Some(b), _) => vec![b],
        (None, Some(c)) => {
            let info = client.cluster_info().await?;
            let targets: Vec<String> = info
                .broker_addr_table
                .values()
                .filter(|bd| bd.cluster == c)
                .flat_map(|bd| {
                    bd.broker_addrs
                        .iter()
                        .filter(|(id, _)| all || **id == 0)
                        .map(|(_, a)| a.clone())
                })
                .collect();
            if targets.is_empty() {
                return Err(ClientError::BadResponse {
                    addr: client.namesrv().join(";"),
                    detail: format!("no broker of cluster {c} is registered (check -n and -c)"),
                });
            }
            targets
        }
        (None, None) => {
            return Err(ClientError::BadResponse {
                addr: "input".into(),
                detail: "give a broker (-b ADDR) or a cluster (-c NAME)".into(),
            })
        }
    };
    let setting = [(key.to_string(), value.to_string())];
    let mut failed = None;
    for addr in &targets {
        match client.update_broker_config(addr, &setting).await {
            Ok(warning) => {
                println!("update broker config success, {addr}");
                if let Some(warning) = warning {
                    eprintln!("warning: {addr}: {warning}");
                }
            }
            Err(e) => {
                eprintln!("update broker config failed, {addr}: {e}");
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

async fn update_topic(
    client: &Client,
    topic: &str,
    cluster: Option<String>,
    broker: Option<String>,
    read: i32,
    write: i32,
    perm: i32,
) -> Result<(), ClientError> {
    if let Err(e) = broker::server::validate_topic(topic) {
        return Err(ClientError::BadResponse {
            addr: "input".into(),
            detail: e,
        });
    }
    let cfg = TopicConfig {
        read_queue_nums: read,
        write_queue_nums: write,
        ..TopicConfig::new(topic, write, perm)
    };
    let targets = match broker {
        Some(b) => vec![(b.clone(), b)],
        None => masters(client, cluster.as_deref()).await?,
    };
    if targets.is_empty() {
        return Err(ClientError::BadResponse {
            addr: client.namesrv().join(";"),
            detail: "no master broker registered (check -n and -c)".into(),
        });
    }
    for (name, addr) in targets {
        client.create_topic(&addr, &cfg).await?;
        println!("create topic {topic} to {name} ({addr}) success: read={read} write={write} perm={perm}");
    }
    Ok(())
}

async fn cluster_list(client: &Client) -> Result<(), ClientError> {
    let info = client.cluster_info().await?;
    println!(
        "{:<16} {:<16} {:>4} {:<22} {:<13} {:>14} {:>12} {:>10}",
        "#Cluster", "#Broker", "#Id", "#Addr", "#Role", "#MaxOffset", "#LagBytes", "#LagMsgs"
    );
    let num = |t: &BTreeMap<String, String>, k: &str| t.get(k).and_then(|v| v.parse::<i64>().ok());
    for (cluster, names) in &info.cluster_addr_table {
        for name in names {
            let Some(bd) = info.broker_addr_table.get(name) else {
                continue;
            };
            let mut master: Option<BTreeMap<String, String>> = None;
            for (id, addr) in &bd.broker_addrs {
                let rt = client.runtime_info(addr).await.ok();
                let role = rt
                    .as_ref()
                    .and_then(|t| t.get("brokerRole").cloned())
                    .unwrap_or_else(|| {
                        if *id == 0 {
                            "MASTER".into()
                        } else {
                            "SLAVE".into()
                        }
                    });
                let max = rt.as_ref().and_then(|t| num(t, "commitLogMaxOffset"));
                let (lag_bytes, lag_msgs) = match (&master, &rt) {
                    (Some(m), Some(t)) if *id != 0 => (
                        num(m, "commitLogMaxOffset")
                            .zip(max)
                            .map(|(a, b)| (a - b).max(0)),
                        num(m, "totalMessages")
                            .zip(num(t, "totalMessages"))
                            .map(|(a, b)| (a - b).max(0)),
                    ),
                    _ => (None, None),
                };
                let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
                println!(
                    "{cluster:<16} {name:<16} {id:>4} {addr:<22} {role:<13} {:>14} {:>12} {:>10}",
                    show(max),
                    show(lag_bytes),
                    show(lag_msgs)
                );
                if *id == 0 {
                    master = rt;
                }
            }
        }
    }
    Ok(())
}

async fn consumer_progress(client: &Client, group: &str, topic: &str) -> Result<(), ClientError> {
    let progress = client.consumer_progress(group, topic).await?;
    println!(
        "{:<20} {:>6} {:>14} {:>14} {:>10}",
        "#Broker", "#Queue", "#Committed", "#MaxOffset", "#Lag"
    );
    let mut total = 0;
    for p in &progress {
        let committed = p.committed.map_or("-".to_string(), |c| c.to_string());
        println!(
            "{:<20} {:>6} {:>14} {:>14} {:>10}",
            p.broker_name,
            p.queue_id,
            committed,
            p.max_offset,
            p.lag()
        );
        total += p.lag();
    }
    println!("Total lag: {total}");
    Ok(())
}

/// Asks a broker of `group` (one its clients heartbeat to) for each client's running info,
/// which the broker relays to the client, and prints it.
async fn consumer_status(
    client: &Client,
    group: &str,
    client_id: Option<String>,
    jstack: bool,
) -> Result<(), ClientError> {
    let route = client.refresh_route(&format!("%RETRY%{group}")).await?;
    let Some(addr) = route.broker_datas.iter().find_map(|bd| {
        bd.master_addr()
            .or(bd.broker_addrs.values().next().map(String::as_str))
    }) else {
        return Err(ClientError::BadResponse {
            addr: client.namesrv().join(";"),
            detail: format!("no broker serves consumer group {group}"),
        });
    };
    let ids = match client_id {
        Some(id) => vec![id],
        None => {
            let req = RemotingCommand::request(
                RequestCode::GetConsumerConnectionList.code(),
                Default::default(),
            )
            .with_ext("consumerGroup", group);
            let resp = client.call_ok(addr, req).await?;
            let list: serde_json::Value =
                serde_json::from_slice(&resp.body).map_err(|e| ClientError::BadResponse {
                    addr: addr.to_string(),
                    detail: format!("consumer connection list: {e}"),
                })?;
            list["connectionSet"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["clientId"].as_str().map(str::to_string))
                .collect()
        }
    };
    // One client that cannot answer does not hide the others; the first failure is returned
    // once all were asked.
    let mut failed = None;
    for id in ids {
        let req = RemotingCommand::request(
            RequestCode::GetConsumerRunningInfo.code(),
            Default::default(),
        )
        .with_ext("consumerGroup", group)
        .with_ext("clientId", &id)
        .with_ext("jstackEnable", jstack);
        // The broker waits up to 10 s for the client (Java's tools allow 15 s).
        let resp = match client
            .call_with_timeout(addr, req, Duration::from_secs(15))
            .await
        {
            Ok(r) if r.code == 0 => r,
            Ok(r) => {
                let e = ClientError::Response {
                    addr: addr.to_string(),
                    code: r.code,
                    remark: r.remark.unwrap_or_default(),
                };
                eprintln!("mqadmin: client {id}: {e}");
                failed.get_or_insert(e);
                continue;
            }
            Err(e) => {
                eprintln!("mqadmin: client {id}: {e}");
                failed.get_or_insert(e);
                continue;
            }
        };
        println!("#ClientId: {id}");
        // Clients answer with fastjson's text, which is not always JSON (maps keyed by
        // objects): shown as sent when it does not parse.
        match serde_json::from_slice::<serde_json::Value>(&resp.body) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(_) => println!("{}", String::from_utf8_lossy(&resp.body)),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Asks each broker group that has the topic (its master, or a slave while the master is
/// away) for the messages `q` finds, and prints them: one line each by key, in full by id.
/// Returns how many there were.
async fn query_messages(
    client: &Client,
    q: QueryMessageRequestHeader,
) -> Result<usize, ClientError> {
    let route = client.refresh_route(&q.topic).await?;
    let unique = q.unique_key_query.is_some();
    let mut found = Vec::new();
    for bd in &route.broker_datas {
        let Some(addr) = bd
            .master_addr()
            .or(bd.broker_addrs.values().next().map(String::as_str))
        else {
            continue;
        };
        // One group that cannot answer does not hide what the others hold (as Java's tools).
        let messages = match client.query_message(addr, &q).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("mqadmin: {} ({addr}): {e}", bd.broker_name);
                continue;
            }
        };
        // The index files keys by hash: keep only what carries the key itself.
        let matching = messages
            .into_iter()
            .filter(|m| m.topic == q.topic && has_key(&m.properties, &q.key));
        found.extend(matching.map(|m| (bd.broker_name.clone(), m)));
    }
    if !unique {
        println!(
            "{:<34} {:<16} {:>6} {:>12} {:<24}",
            "#Message ID", "#Broker", "#Queue", "#Offset", "#Stored"
        );
    }
    for (broker, m) in &found {
        let id = property(&m.properties, PROP_UNIQ_KEY)
            .map_or_else(|| m.offset_msg_id(), str::to_string);
        let stored = ms_to_utc(m.store_timestamp);
        if unique {
            println!("Message ID:        {id}");
            println!("Offset message ID: {}", m.offset_msg_id());
            println!("Topic:             {}", m.topic);
            println!(
                "Broker:            {broker} (queue {}, offset {})",
                m.queue_id, m.queue_offset
            );
            println!(
                "Born:              {} from {}",
                ms_to_utc(m.born_timestamp),
                m.born_host
            );
            println!("Stored:            {stored} on {}", m.store_host);
            println!("Reconsumed:        {} times", m.reconsume_times);
            println!("Properties:        {:?}", m.properties_map());
            println!("Body:              {}", String::from_utf8_lossy(&m.body));
            println!();
        } else {
            println!(
                "{id:<34} {broker:<16} {:>6} {:>12} {stored:<24}",
                m.queue_id, m.queue_offset
            );
        }
    }
    Ok(found.len())
}

/// A time in ms since the epoch, as RFC 3339 in UTC (the number itself if out of range).
fn ms_to_utc(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

fn body_of(seq: u64, size: usize) -> Bytes {
    let mut b = format!("{seq:016}").into_bytes();
    b.resize(size.max(16), b'x');
    Bytes::from(b)
}

/// Prints a progress line to stderr every second while `f` runs.
fn spawn_progress(label: &'static str, done: Arc<AtomicU64>, target: u64, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let start = Instant::now();
        while !stop.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if stop.load(Ordering::Acquire) {
                break;
            }
            let n = done.load(Ordering::Relaxed);
            let rate = n as f64 / start.elapsed().as_secs_f64();
            if target > 0 {
                eprintln!("{label}: {n}/{target} ({rate:.0} msg/s)");
            } else {
                eprintln!("{label}: {n} ({rate:.0} msg/s)");
            }
        }
    });
}

async fn produce(
    client: Arc<Client>,
    topic: &str,
    count: u64,
    size: usize,
    tags: Option<String>,
    group: &str,
) -> Result<(), ClientError> {
    let producer = Producer::new(client, group);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    spawn_progress("produce", done.clone(), count, stop.clone());
    let result = async {
        for seq in 0..count {
            let msg = Message {
                topic: topic.to_string(),
                tags: tags.clone(),
                keys: vec![format!("key-{seq}")],
                properties: BTreeMap::from([("seq".to_string(), seq.to_string())]),
                body: body_of(seq, size),
            };
            let r = producer.send(&msg).await?;
            if count <= 20 {
                println!(
                    "sent {seq}: msgId={} broker={} queue={} offset={}",
                    r.msg_id, r.broker_name, r.queue_id, r.queue_offset
                );
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<(), ClientError>(())
    }
    .await;
    stop.store(true, Ordering::Release);
    result?;
    println!("sent {count} messages to {topic}");
    Ok(())
}

async fn consume(
    client: Arc<Client>,
    topic: &str,
    group: &str,
    count: u64,
    idle: Duration,
    print: bool,
) -> Result<(), ClientError> {
    let mut consumer = PullConsumer::new(client, group, topic).await?;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    spawn_progress("consume", done.clone(), count, stop.clone());
    let mut last = Instant::now();
    let result = async {
        loop {
            if count > 0 && done.load(Ordering::Relaxed) >= count {
                break;
            }
            let batch = consumer.poll(Duration::from_millis(500)).await?;
            if batch.is_empty() {
                if last.elapsed() >= idle {
                    break;
                }
                continue;
            }
            last = Instant::now();
            for m in &batch {
                if print {
                    let p = m.message.properties_map();
                    println!(
                        "{} queue={} offset={} tags={} keys={} body={}",
                        m.broker_name,
                        m.message.queue_id,
                        m.message.queue_offset,
                        p.get("TAGS").map_or("", String::as_str),
                        p.get("KEYS").map_or("", String::as_str),
                        String::from_utf8_lossy(&m.message.body)
                    );
                }
            }
            done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            consumer.commit().await?;
        }
        consumer.commit().await
    }
    .await;
    stop.store(true, Ordering::Release);
    result?;
    println!(
        "consumed {} messages from {topic} as {group}",
        done.load(Ordering::Relaxed)
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct BenchReport {
    mode: BenchMode,
    producers: usize,
    size: usize,
    /// Messages per request (batch mode) or outstanding sends per producer (async mode).
    depth: usize,
    seconds: f64,
    sent: u64,
    failed: u64,
    send_msgs_per_sec: f64,
    send_mb_per_sec: f64,
    /// Latency of one send request (a whole batch in batch mode), microseconds.
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    consumed: Option<u64>,
    consume_msgs_per_sec: Option<f64>,
    consume_mb_per_sec: Option<f64>,
}

fn histogram() -> Result<Histogram<u64>, ClientError> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| ClientError::BadResponse {
        addr: "bench".into(),
        detail: e.to_string(),
    })
}

/// What one bench producer shares with the others: counters, the stop condition, latencies.
struct BenchShared {
    sent: Arc<AtomicU64>,
    failed: AtomicU64,
    /// Messages claimed so far (count mode).
    claimed: AtomicU64,
    count: u64,
    deadline: Instant,
    hist: Mutex<Histogram<u64>>,
}

impl BenchShared {
    /// Claims `n` more messages to send; false once the bench is over.
    fn claim(&self, n: u64) -> bool {
        if self.count > 0 {
            self.claimed.fetch_add(n, Ordering::Relaxed) < self.count
        } else {
            Instant::now() < self.deadline
        }
    }

    fn record(
        &self,
        local: &mut Histogram<u64>,
        started: Instant,
        result: Result<u64, ClientError>,
    ) {
        match result {
            Ok(n) => {
                let _ = local.record(started.elapsed().as_micros().max(1) as u64);
                self.sent.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "bench send failed");
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn bench_producer(
    producer: Producer,
    shared: Arc<BenchShared>,
    args: BenchArgs,
    seed: u64,
) -> Result<(), ClientError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut local = histogram()?;
    let msg = Message {
        topic: args.topic.clone(),
        body: body_of(seed, args.size),
        ..Default::default()
    };
    match args.mode {
        BenchMode::Sync => {
            while shared.claim(1) {
                let t = Instant::now();
                let r = producer.send(&msg).await.map(|_| 1);
                shared.record(&mut local, t, r);
            }
        }
        BenchMode::Batch => {
            let n = args.batch.max(1);
            let batch = vec![msg; n];
            while shared.claim(n as u64) {
                let t = Instant::now();
                let r = producer.send_batch(&batch).await.map(|_| n as u64);
                shared.record(&mut local, t, r);
            }
        }
        BenchMode::Async => {
            let mut outstanding = FuturesUnordered::new();
            let mut open = true;
            loop {
                while open && outstanding.len() < args.inflight.max(1) {
                    open = shared.claim(1);
                    if open {
                        let (producer, msg) = (&producer, &msg);
                        outstanding.push(async move {
                            let t = Instant::now();
                            (t, producer.send(msg).await.map(|_| 1))
                        });
                    }
                }
                match outstanding.next().await {
                    Some((t, r)) => shared.record(&mut local, t, r),
                    None => break,
                }
            }
        }
    }
    let _ = shared
        .hist
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add(&local);
    Ok(())
}

async fn bench(client: Arc<Client>, args: BenchArgs) -> Result<(), ClientError> {
    let depth = match args.mode {
        BenchMode::Sync => 1,
        BenchMode::Async => args.inflight.max(1),
        BenchMode::Batch => args.batch.max(1),
    };
    let mut report = BenchReport {
        mode: args.mode,
        producers: args.producers,
        size: args.size,
        depth,
        seconds: 0.0,
        sent: 0,
        failed: 0,
        send_msgs_per_sec: 0.0,
        send_mb_per_sec: 0.0,
        p50_us: 0,
        p99_us: 0,
        p999_us: 0,
        max_us: 0,
        consumed: None,
        consume_msgs_per_sec: None,
        consume_mb_per_sec: None,
    };
    if client.route(&args.topic).await.is_err() {
        if args.consume_only {
            return Err(ClientError::BadResponse {
                addr: "name server".into(),
                detail: format!("topic {} does not exist: nothing to consume", args.topic),
            });
        }
        update_topic(
            &client,
            &args.topic,
            None,
            None,
            args.queues,
            args.queues,
            6,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if !args.consume_only {
        let shared = Arc::new(BenchShared {
            sent: Arc::default(),
            failed: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            count: args.count,
            deadline: Instant::now() + Duration::from_secs(args.duration),
            hist: Mutex::new(histogram()?),
        });
        let stop = Arc::new(AtomicBool::new(false));
        spawn_progress("bench send", shared.sent.clone(), args.count, stop.clone());
        let start = Instant::now();
        let tasks: Vec<_> = (0..args.producers.max(1))
            .map(|p| {
                let producer = Producer::new(client.clone(), "bench_producer");
                tokio::spawn(bench_producer(
                    producer,
                    shared.clone(),
                    args.clone(),
                    p as u64,
                ))
            })
            .collect();
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                stop.store(true, Ordering::Release);
                return Err(e);
            }
        }
        stop.store(true, Ordering::Release);
        let secs = start.elapsed().as_secs_f64();
        let n = shared.sent.load(Ordering::Relaxed);
        let h = shared
            .hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        report.seconds = secs;
        report.sent = n;
        report.failed = shared.failed.load(Ordering::Relaxed);
        report.send_msgs_per_sec = n as f64 / secs;
        report.send_mb_per_sec = n as f64 * args.size as f64 / secs / 1e6;
        report.p50_us = h.value_at_quantile(0.5);
        report.p99_us = h.value_at_quantile(0.99);
        report.p999_us = h.value_at_quantile(0.999);
        report.max_us = h.max();
    }
    if args.consume || args.consume_only {
        let group = format!("bench_consumer_{}", std::process::id());
        let mut c = PullConsumer::new(client.clone(), &group, &args.topic).await?;
        let target = c.remaining().await?;
        let got = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        spawn_progress("bench consume", got.clone(), target as u64, stop.clone());
        let t = Instant::now();
        let mut bytes = 0u64;
        let mut idle_since: Option<Instant> = None;
        while (got.load(Ordering::Relaxed) as i64) < target {
            let batch = c.poll(Duration::from_millis(200)).await?;
            if batch.is_empty() {
                // Messages the consumer cannot see (e.g. a failed group) must not hang it.
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(10) {
                    break;
                }
                continue;
            }
            idle_since = None;
            bytes += batch
                .iter()
                .map(|m| m.message.body.len() as u64)
                .sum::<u64>();
            got.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Release);
        let secs = t.elapsed().as_secs_f64();
        let g = got.load(Ordering::Relaxed);
        report.consumed = Some(g);
        report.consume_msgs_per_sec = Some(g as f64 / secs);
        report.consume_mb_per_sec = Some(bytes as f64 / secs / 1e6);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        if !args.consume_only {
            println!(
                "send ({:?}, {} producers, depth {}): {} msgs in {:.1}s, {:.0} msgs/s, {:.1} MB/s, failed {}; latency p50 {} us, p99 {} us, p999 {} us, max {} us",
                report.mode, report.producers, report.depth, report.sent, report.seconds,
                report.send_msgs_per_sec, report.send_mb_per_sec, report.failed,
                report.p50_us, report.p99_us, report.p999_us, report.max_us
            );
        }
        if let (Some(c), Some(r), Some(mb)) = (
            report.consumed,
            report.consume_msgs_per_sec,
            report.consume_mb_per_sec,
        ) {
            println!("consume: {c} msgs, {r:.0} msgs/s, {mb:.1} MB/s");
        }
    }
    if !args.consume_only && report.sent == 0 && report.failed > 0 {
        return Err(ClientError::BadResponse {
            addr: "bench".into(),
            detail: format!(
                "every send failed ({}); RUST_LOG=debug shows why",
                report.failed
            ),
        });
    }
    Ok(())
}
