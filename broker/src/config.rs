//! broker.conf: RocketMQ's key names and values, parsed strictly (an unknown key or a bad
//! value is an error naming the key) so a typo never silently runs with a default.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::store::FlushDiskType;

/// Most event-loop threads a broker may be given: more than any machine it runs on has cores.
const MAX_IO_THREADS: usize = 256;

/// Longest an event loop may spin for a send's group commit or slave: past a few milliseconds
/// the disk or the network, not waking up, is what the send waits for.
const MAX_SYNC_WAIT_SPIN_US: u64 = 10_000;

/// Fewest key-index entries per file accepted: files of a few entries would seal (a slot table
/// written and synced) every few keys.
const MIN_INDEX_ENTRIES: u32 = 1_000;

/// Shortest queue-lock live time accepted. It refuses only the absurd (0 would let a lock
/// lapse a millisecond after it was taken): values under the clients' own lock lifetime (Java's
/// 30 s) stay allowed for clients set to renew faster; the README warns about them.
const MIN_REBALANCE_LOCK_LIVE_MS: u64 = 1_000;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A key ferromq does not know.
    #[error("line {line}: unknown key `{key}`")]
    UnknownKey {
        /// Key as written.
        key: String,
        /// 1-based line number.
        line: usize,
    },
    /// A value of the wrong type or out of range.
    #[error("`{key}` = {value:?}: expected {expected}")]
    BadValue {
        /// Key.
        key: String,
        /// Value as written.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A line that is not `key=value`.
    #[error("line {line}: expected `key=value`, found {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// Settings that contradict each other.
    #[error("{0}")]
    Inconsistent(String),
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        /// Cause, as text (keeps the error comparable in tests).
        reason: String,
    },
}

/// Parses Java-properties text (`key=value` or `key: value`, `#`/`!` comments) into pairs with
/// their line numbers.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String, usize)>, ConfigError> {
    let mut out = Vec::new();
    // A byte-order mark some editors put first would otherwise stick to the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let sep = line.find(['=', ':']).ok_or_else(|| ConfigError::Syntax {
            line: i + 1,
            text: raw.to_string(),
        })?;
        let key = line[..sep].trim();
        if key.is_empty() {
            return Err(ConfigError::Syntax {
                line: i + 1,
                text: raw.to_string(),
            });
        }
        out.push((key.to_string(), line[sep + 1..].trim().to_string(), i + 1));
    }
    Ok(out)
}

/// A master or slave role (`brokerRole`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerRole {
    /// Master acknowledging without waiting for slaves.
    AsyncMaster,
    /// Master acknowledging once a slave holds the message.
    SyncMaster,
    /// Read-only replica.
    Slave,
}

impl BrokerRole {
    /// RocketMQ's name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerRole::AsyncMaster => "ASYNC_MASTER",
            BrokerRole::SyncMaster => "SYNC_MASTER",
            BrokerRole::Slave => "SLAVE",
        }
    }
}

/// Everything `mqbroker` is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// `brokerClusterName`.
    pub cluster_name: String,
    /// `brokerName`: the group.
    pub broker_name: String,
    /// `brokerId`: 0 for the master.
    pub broker_id: i64,
    /// `brokerIP1`: the address advertised to clients.
    pub broker_ip: String,
    /// `listenPort`.
    pub listen_port: u16,
    /// `haListenPort`.
    pub ha_listen_port: u16,
    /// `httpPort` (ferromq): health and metrics.
    pub http_port: u16,
    /// `namesrvAddr`, split on `;`.
    pub namesrv_addrs: Vec<String>,
    /// `storePathRootDir`.
    pub store_root: PathBuf,
    /// `brokerRole`.
    pub role: BrokerRole,
    /// `flushDiskType`.
    pub flush: FlushDiskType,
    /// `flushIntervalCommitLog` (ms).
    pub flush_interval_ms: u64,
    /// `flushCommitLogLeastPages`.
    pub flush_least_pages: u64,
    /// `flushCommitLogThoroughInterval` (ms).
    pub flush_thorough_interval_ms: u64,
    /// `syncFlushTimeout` (ms).
    pub sync_flush_timeout_ms: u64,
    /// `mappedFileSizeCommitLog` (bytes).
    pub segment_size: u64,
    /// `fileReservedTime` (hours).
    pub file_reserved_hours: u64,
    /// `diskMaxUsedSpaceRatio` (percent): past it, expired segments are deleted at once
    /// rather than at the `deleteWhen` hour.
    pub disk_max_used_percent: u32,
    /// `diskSpaceWarningLevelRatio` (a share, kept in thousandths): past it, the broker takes
    /// no messages.
    pub disk_full_permille: u32,
    /// `messageDelayLevel`: the delay of each delay level, ms ("1s 5s 10s ... 2h").
    pub delay_levels_ms: Vec<i64>,
    /// `deleteWhen`: hours of day (UTC) expired segments are deleted in; Java's form
    /// `04;16` gives several.
    pub delete_when_hours: Vec<u32>,
    /// `maxMessageSize` (bytes).
    pub max_message_size: u64,
    /// `autoCreateTopicEnable`.
    pub auto_create_topic: bool,
    /// `defaultTopicQueueNums`.
    pub default_topic_queue_nums: i32,
    /// `brokerPermission`.
    pub permission: i32,
    /// `registerNameServerPeriod` (ms).
    pub register_period_ms: u64,
    /// `brokerNotActiveTimeoutMillis`: how long name servers keep us without a registration.
    pub heartbeat_timeout_ms: u64,
    /// `longPollingEnable`.
    pub long_polling: bool,
    /// `shortPollingTimeMills`: how long a pull that finds nothing is held without long
    /// polling.
    pub short_polling: std::time::Duration,
    /// `slaveReadEnable`.
    pub slave_read_enable: bool,
    /// `serverMaxFrameBytes` (ferromq): largest request frame accepted.
    pub max_frame_bytes: usize,
    /// `serverIoThreads` (ferromq): event-loop threads that serve client connections, each
    /// connection on one of them (default: the CPUs this process may use).
    pub io_threads: usize,
    /// `syncWaitSpinMicros` (ferromq): how long an event loop keeps running, instead of
    /// sleeping, for the next answer while sends on it wait for their group commit
    /// (SYNC_FLUSH) or their slave (SYNC_MASTER); 0: it sleeps at once.
    pub sync_wait_spin_us: u64,
    /// `haMasterAddress`: the master's HA address for a slave (otherwise learnt from the name
    /// servers).
    pub ha_master_address: Option<String>,
    /// `haAuthToken` (ferromq): shared secret slaves present to their master.
    pub ha_auth_token: Option<String>,
    /// `haMaxGapNotInSync`: bytes a slave may lag and still count for SYNC_MASTER.
    pub ha_max_gap: u64,
    /// `slaveTimeout` (ms): how long a SYNC_MASTER send waits for a slave.
    pub slave_timeout_ms: u64,
    /// `accessMessageInMemoryMaxRatio` (percent of RAM): a consumer further behind than this
    /// is told to read from a slave.
    pub access_message_in_memory_max_ratio: u64,
    /// `rebalanceLockMaxLiveTime` (ms): how long an orderly consumer's queue lock lasts
    /// without renewal before another client may take it (Java's
    /// `rocketmq.broker.rebalance.lockMaxLiveTime`).
    pub rebalance_lock_max_live_ms: u64,
    /// `transactionTimeOut` (ms): how old a transactional half message must be before the
    /// broker asks its producer whether to commit it.
    pub transaction_timeout_ms: u64,
    /// `transactionCheckMax`: how often a half message is asked about before it is given up
    /// (moved to `TRANS_CHECK_MAX_TIME_TOPIC`).
    pub transaction_check_max: u32,
    /// `transactionCheckInterval` (ms): how often undecided half messages are looked for.
    pub transaction_check_interval_ms: u64,
    /// `messageIndexEnable`: whether messages can be found by key (QUERY_MESSAGE).
    pub message_index: bool,
    /// `enablePropertyFilter`: whether consumers may select messages by SQL92 expressions
    /// over their properties (off by default, as in Java).
    pub property_filter: bool,
    /// `maxHashSlotNum`, `maxIndexNum`: the key index's slots and entries per file.
    pub index_size: crate::store::index::IndexSize,
    /// `timerWheelEnable`, `timerPrecisionMs`, `timerMaxDelaySec`: timer messages.
    pub timer: crate::server::timer::TimerConfig,
    /// `storeReplyMessageEnable`: whether replies to request messages are also stored in the
    /// cluster's reply topic, beside being pushed to the requester (Java: true).
    pub store_reply_message: bool,
    /// `bindAddress` (Java's NettyServerConfig key): the address the remoting, HA and HTTP
    /// ports listen on; unset, see [`BrokerConfig::listen_ip`].
    pub bind_address: Option<std::net::IpAddr>,
    /// The broker.conf these settings were read from (not a setting): changes made while the
    /// broker runs are saved there, so a restart keeps them.
    pub config_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
        BrokerConfig {
            cluster_name: "DefaultCluster".into(),
            broker_name: "broker-a".into(),
            broker_id: 0,
            broker_ip: "127.0.0.1".into(),
            listen_port: 10911,
            ha_listen_port: 10912,
            http_port: 10913,
            namesrv_addrs: Vec::new(),
            store_root: PathBuf::from(home).join("store"),
            role: BrokerRole::AsyncMaster,
            flush: FlushDiskType::Async,
            flush_interval_ms: 500,
            flush_least_pages: 4,
            flush_thorough_interval_ms: 10_000,
            sync_flush_timeout_ms: 5_000,
            segment_size: 1 << 30,
            file_reserved_hours: 72,
            delete_when_hours: vec![4],
            disk_max_used_percent: 75,
            disk_full_permille: 900,
            delay_levels_ms: crate::store::message::DELAY_LEVELS_MS.to_vec(),
            max_message_size: 4 << 20,
            auto_create_topic: true,
            default_topic_queue_nums: 8,
            permission: 6,
            register_period_ms: 30_000,
            heartbeat_timeout_ms: 120_000,
            long_polling: true,
            short_polling: std::time::Duration::from_secs(1),
            slave_read_enable: true,
            max_frame_bytes: 16 << 20,
            io_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            sync_wait_spin_us: 500,
            ha_master_address: None,
            ha_auth_token: None,
            ha_max_gap: 256 << 20,
            slave_timeout_ms: 3_000,
            access_message_in_memory_max_ratio: 40,
            rebalance_lock_max_live_ms: 60_000,
            transaction_timeout_ms: 6_000,
            transaction_check_max: 15,
            transaction_check_interval_ms: 60_000,
            message_index: true,
            store_reply_message: true,
            bind_address: None,
            config_file: None,
            timer: Default::default(),
            index_size: Default::default(),
            property_filter: false,
        }
    }
}

fn bad(key: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn num<T: std::str::FromStr>(key: &str, v: &str, expected: &str) -> Result<T, ConfigError> {
    v.parse().map_err(|_| bad(key, v, expected))
}

fn boolean(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, v, "true or false")),
    }
}

/// The settings UPDATE_BROKER_CONFIG (`mqadmin updateBrokerConfig`) may change while the
/// broker runs: each is read where it is used. The others are read once, at start.
pub const LIVE_SETTINGS: &[&str] = &[
    "brokerPermission",
    "namesrvAddr",
    "maxMessageSize",
    "autoCreateTopicEnable",
    "defaultTopicQueueNums",
    "fileReservedTime",
    "deleteWhen",
    "diskMaxUsedSpaceRatio",
    "longPollingEnable",
    "shortPollingTimeMills",
    "slaveReadEnable",
    "accessMessageInMemoryMaxRatio",
    "transactionTimeOut",
    "transactionCheckMax",
    "transactionCheckInterval",
    "enablePropertyFilter",
    "storeReplyMessageEnable",
    "timerWheelEnable",
    "timerPrecisionMs",
    "timerMaxDelaySec",
];

/// Splits a `namesrvAddr` value (`host:port;host:port`).
pub fn split_namesrv(v: &str) -> Vec<String> {
    v.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The setting a broker.conf key names, so a setting given under two of its names is refused
/// like one given twice: RocketMQ 4.x calls `haMaxGapNotInSync` `haSlaveFallbehindMax`.
pub(crate) fn setting(key: &str) -> &str {
    match key {
        "haSlaveFallbehindMax" => "haMaxGapNotInSync",
        other => other,
    }
}

impl BrokerConfig {
    /// Whether the store keeps zeroes written ahead of the commit log (see
    /// `StoreConfig::prepare_ahead`). They pay where a write's latency is waited on: a group
    /// commit's `fdatasync`, and a slave's write on SYNC_MASTER's round trip. On an ASYNC_FLUSH
    /// master they only double the bytes written, to memory and at the next flush to disk.
    pub fn prepares_ahead(&self) -> bool {
        self.flush == FlushDiskType::Sync || self.role == BrokerRole::Slave
    }

    /// How long an event loop spins for what its sends wait on: nothing where no send waits
    /// (a slave, or ASYNC_FLUSH without SYNC_MASTER).
    pub fn loop_awake_for(&self) -> Duration {
        let waits = self.flush == FlushDiskType::Sync || self.role == BrokerRole::SyncMaster;
        if waits && self.role != BrokerRole::Slave {
            Duration::from_micros(self.sync_wait_spin_us)
        } else {
            Duration::ZERO
        }
    }

    /// Parses broker.conf text.
    pub fn parse(text: &str) -> Result<BrokerConfig, ConfigError> {
        let mut c = BrokerConfig::default();
        let mut ha_set = false;
        let mut http_set = false;
        // Each setting, under the name it was first given, and where.
        let mut seen: HashMap<String, (String, usize)> = HashMap::new();
        for (key, v, line) in parse_properties(text)? {
            if let Some((first_key, first)) =
                seen.insert(setting(&key).to_string(), (key.clone(), line))
            {
                return Err(ConfigError::Inconsistent(if first_key == key {
                    format!("`{key}` is set twice (lines {first} and {line})")
                } else {
                    format!(
                        "`{first_key}` (line {first}) and `{key}` (line {line}) are one setting, \
                         set twice"
                    )
                }));
            }
            let v = v.as_str();
            let k = key.as_str();
            match setting(k) {
                "brokerClusterName" => c.cluster_name = non_empty(k, v)?,
                "brokerName" => c.broker_name = non_empty(k, v)?,
                "brokerId" => c.broker_id = num(k, v, "a non-negative integer")?,
                "brokerIP1" => c.broker_ip = non_empty(k, v)?,
                "listenPort" => c.listen_port = num(k, v, "a port number")?,
                "haListenPort" => {
                    c.ha_listen_port = num(k, v, "a port number")?;
                    ha_set = true;
                }
                "httpPort" => {
                    c.http_port = num(k, v, "a port number")?;
                    http_set = true;
                }
                "namesrvAddr" => c.namesrv_addrs = split_namesrv(v),
                "storePathRootDir" => c.store_root = PathBuf::from(non_empty(k, v)?),
                "brokerRole" => {
                    c.role = match v {
                        "ASYNC_MASTER" => BrokerRole::AsyncMaster,
                        "SYNC_MASTER" => BrokerRole::SyncMaster,
                        "SLAVE" => BrokerRole::Slave,
                        _ => return Err(bad(k, v, "ASYNC_MASTER, SYNC_MASTER or SLAVE")),
                    }
                }
                "flushDiskType" => {
                    c.flush = match v {
                        "ASYNC_FLUSH" => FlushDiskType::Async,
                        "SYNC_FLUSH" => FlushDiskType::Sync,
                        _ => return Err(bad(k, v, "ASYNC_FLUSH or SYNC_FLUSH")),
                    }
                }
                "flushIntervalCommitLog" => {
                    c.flush_interval_ms = num(k, v, "milliseconds")?;
                }
                "flushCommitLogLeastPages" => c.flush_least_pages = num(k, v, "a page count")?,
                "flushCommitLogThoroughInterval" => {
                    c.flush_thorough_interval_ms = num(k, v, "milliseconds")?;
                }
                "syncFlushTimeout" => c.sync_flush_timeout_ms = num(k, v, "milliseconds")?,
                "mappedFileSizeCommitLog" => c.segment_size = num(k, v, "a size in bytes")?,
                "fileReservedTime" => c.file_reserved_hours = num(k, v, "hours")?,
                "messageDelayLevel" => c.delay_levels_ms = delay_levels(k, v)?,
                // Java limits both rather than refusing them: 10-95% and 35-90%.
                "diskMaxUsedSpaceRatio" => {
                    c.disk_max_used_percent = num::<u32>(k, v, "a percentage")?.clamp(10, 95);
                }
                "diskSpaceWarningLevelRatio" => {
                    // Java 5 writes a whole percentage (90); the JVM property of Java 4 a share
                    // (0.90).
                    let v = v.trim();
                    let r = match (v.parse::<u32>(), v.parse::<f64>()) {
                        (Ok(percent), _) => f64::from(percent) / 100.0,
                        (_, Ok(r)) if (0.0..=1.0).contains(&r) => r,
                        _ => return Err(bad(k, v, "a percentage (90) or a share (0.90)")),
                    };
                    c.disk_full_permille = (r.clamp(0.35, 0.90) * 1000.0).round() as u32;
                }
                "deleteWhen" => {
                    let what = "hours of day, 0-23, separated by ';'";
                    c.delete_when_hours = v
                        .split(';')
                        .map(|h| match h.trim().parse::<u32>() {
                            Ok(h) if h <= 23 => Ok(h),
                            _ => Err(bad(k, v, what)),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "maxMessageSize" => c.max_message_size = num(k, v, "a size in bytes")?,
                "autoCreateTopicEnable" => c.auto_create_topic = boolean(k, v)?,
                "defaultTopicQueueNums" => {
                    c.default_topic_queue_nums = num(k, v, "a queue count")?;
                }
                "brokerPermission" => c.permission = num(k, v, "permission bits (6 = read+write)")?,
                "registerNameServerPeriod" => c.register_period_ms = num(k, v, "milliseconds")?,
                "brokerNotActiveTimeoutMillis" => {
                    c.heartbeat_timeout_ms = num(k, v, "milliseconds")?;
                }
                "longPollingEnable" => c.long_polling = boolean(k, v)?,
                "shortPollingTimeMills" => {
                    c.short_polling = std::time::Duration::from_millis(num(k, v, "milliseconds")?);
                }
                "slaveReadEnable" => c.slave_read_enable = boolean(k, v)?,
                "serverMaxFrameBytes" => c.max_frame_bytes = num(k, v, "a size in bytes")?,
                "serverIoThreads" => c.io_threads = num(k, v, "a thread count")?,
                "syncWaitSpinMicros" => {
                    let range = format!("microseconds, 0 to {MAX_SYNC_WAIT_SPIN_US}");
                    c.sync_wait_spin_us = num(k, v, &range)?;
                }
                "haMasterAddress" => c.ha_master_address = Some(non_empty(k, v)?),
                "haAuthToken" => c.ha_auth_token = Some(v.to_string()).filter(|t| !t.is_empty()),
                "haMaxGapNotInSync" => {
                    c.ha_max_gap = num(k, v, "a size in bytes")?;
                }
                "slaveTimeout" => c.slave_timeout_ms = num(k, v, "milliseconds")?,
                "accessMessageInMemoryMaxRatio" => {
                    c.access_message_in_memory_max_ratio = num(k, v, "a percentage, 0-100")?;
                    if c.access_message_in_memory_max_ratio > 100 {
                        return Err(bad(k, v, "a percentage, 0-100"));
                    }
                }
                "rebalanceLockMaxLiveTime" => {
                    c.rebalance_lock_max_live_ms = num(k, v, "milliseconds")?;
                }
                "transactionTimeOut" => c.transaction_timeout_ms = num(k, v, "milliseconds")?,
                "transactionCheckMax" => c.transaction_check_max = num(k, v, "a count")?,
                "messageIndexEnable" => c.message_index = boolean(k, v)?,
                "storeReplyMessageEnable" => c.store_reply_message = boolean(k, v)?,
                "timerWheelEnable" => c.timer.enabled = boolean(k, v)?,
                "timerPrecisionMs" => {
                    c.timer.precision_ms = num(k, v, "milliseconds, 1 to 60000")?;
                    if !(1..=60_000).contains(&c.timer.precision_ms) {
                        return Err(bad(k, v, "milliseconds, 1 to 60000"));
                    }
                }
                "timerMaxDelaySec" => {
                    c.timer.max_delay_sec = num(k, v, "seconds, at least 1")?;
                    if c.timer.max_delay_sec < 1 {
                        return Err(bad(k, v, "seconds, at least 1"));
                    }
                }
                "enablePropertyFilter" => c.property_filter = boolean(k, v)?,
                "bindAddress" => {
                    c.bind_address = crate::net::parse_ip(v)
                        .map(Some)
                        .ok_or_else(|| bad(k, v, "an IP address (`::` or `0.0.0.0`: every one)"))?;
                }
                "maxHashSlotNum" => c.index_size.slots = num(k, v, "a slot count")?,
                "maxIndexNum" => c.index_size.entries = num(k, v, "an entry count")?,
                "transactionCheckInterval" => {
                    c.transaction_check_interval_ms = num(k, v, "milliseconds, at least 1")?;
                }
                _ => return Err(ConfigError::UnknownKey { key, line }),
            }
        }
        if !ha_set {
            c.ha_listen_port = c.listen_port.wrapping_add(1);
        }
        if !http_set {
            c.http_port = c.listen_port.wrapping_add(2);
        }
        c.validate()?;
        Ok(c)
    }

    /// The settings in effect as broker.conf lines (what GET_BROKER_CONFIG answers, and what
    /// `parse` reads back to the same settings). `haAuthToken` is left out: it is a secret.
    pub fn to_properties(&self) -> String {
        fn delay(ms: i64) -> String {
            [
                (86_400_000, 'd'),
                (3_600_000, 'h'),
                (60_000, 'm'),
                (1_000, 's'),
            ]
            .iter()
            .find(|(unit, _)| ms % unit == 0)
            .map_or_else(
                || format!("{}s", ms / 1000),
                |(unit, c)| format!("{}{c}", ms / unit),
            )
        }
        fn join<T: ToString>(items: &[T], sep: &str) -> String {
            items.iter().map(T::to_string).collect::<Vec<_>>().join(sep)
        }
        let permille = self.disk_full_permille;
        let disk_full = if permille.is_multiple_of(10) {
            (permille / 10).to_string()
        } else {
            format!("0.{permille:03}")
        };
        let role = match self.role {
            BrokerRole::AsyncMaster => "ASYNC_MASTER",
            BrokerRole::SyncMaster => "SYNC_MASTER",
            BrokerRole::Slave => "SLAVE",
        };
        let flush = match self.flush {
            FlushDiskType::Async => "ASYNC_FLUSH",
            FlushDiskType::Sync => "SYNC_FLUSH",
        };
        let delays: Vec<String> = self.delay_levels_ms.iter().map(|d| delay(*d)).collect();
        let mut lines: Vec<(&str, String)> = vec![
            ("brokerClusterName", self.cluster_name.clone()),
            ("brokerName", self.broker_name.clone()),
            ("brokerId", self.broker_id.to_string()),
            ("brokerIP1", self.broker_ip.clone()),
            ("listenPort", self.listen_port.to_string()),
            ("haListenPort", self.ha_listen_port.to_string()),
            ("httpPort", self.http_port.to_string()),
            ("namesrvAddr", self.namesrv_addrs.join(";")),
            ("storePathRootDir", self.store_root.display().to_string()),
            ("brokerRole", role.into()),
            ("flushDiskType", flush.into()),
            ("flushIntervalCommitLog", self.flush_interval_ms.to_string()),
            (
                "flushCommitLogLeastPages",
                self.flush_least_pages.to_string(),
            ),
            (
                "flushCommitLogThoroughInterval",
                self.flush_thorough_interval_ms.to_string(),
            ),
            ("syncFlushTimeout", self.sync_flush_timeout_ms.to_string()),
            ("mappedFileSizeCommitLog", self.segment_size.to_string()),
            ("fileReservedTime", self.file_reserved_hours.to_string()),
            ("messageDelayLevel", delays.join(" ")),
            (
                "diskMaxUsedSpaceRatio",
                self.disk_max_used_percent.to_string(),
            ),
            ("diskSpaceWarningLevelRatio", disk_full),
            ("deleteWhen", join(&self.delete_when_hours, ";")),
            ("maxMessageSize", self.max_message_size.to_string()),
            ("autoCreateTopicEnable", self.auto_create_topic.to_string()),
            (
                "defaultTopicQueueNums",
                self.default_topic_queue_nums.to_string(),
            ),
            ("brokerPermission", self.permission.to_string()),
            (
                "registerNameServerPeriod",
                self.register_period_ms.to_string(),
            ),
            (
                "brokerNotActiveTimeoutMillis",
                self.heartbeat_timeout_ms.to_string(),
            ),
            ("longPollingEnable", self.long_polling.to_string()),
            (
                "shortPollingTimeMills",
                self.short_polling.as_millis().to_string(),
            ),
            ("slaveReadEnable", self.slave_read_enable.to_string()),
            ("serverMaxFrameBytes", self.max_frame_bytes.to_string()),
            ("serverIoThreads", self.io_threads.to_string()),
            ("syncWaitSpinMicros", self.sync_wait_spin_us.to_string()),
            ("haMaxGapNotInSync", self.ha_max_gap.to_string()),
            ("slaveTimeout", self.slave_timeout_ms.to_string()),
            (
                "accessMessageInMemoryMaxRatio",
                self.access_message_in_memory_max_ratio.to_string(),
            ),
            (
                "rebalanceLockMaxLiveTime",
                self.rebalance_lock_max_live_ms.to_string(),
            ),
            (
                "transactionTimeOut",
                self.transaction_timeout_ms.to_string(),
            ),
            (
                "transactionCheckMax",
                self.transaction_check_max.to_string(),
            ),
            (
                "transactionCheckInterval",
                self.transaction_check_interval_ms.to_string(),
            ),
            ("messageIndexEnable", self.message_index.to_string()),
            (
                "storeReplyMessageEnable",
                self.store_reply_message.to_string(),
            ),
            ("timerWheelEnable", self.timer.enabled.to_string()),
            ("timerPrecisionMs", self.timer.precision_ms.to_string()),
            ("timerMaxDelaySec", self.timer.max_delay_sec.to_string()),
            ("enablePropertyFilter", self.property_filter.to_string()),
            ("maxHashSlotNum", self.index_size.slots.to_string()),
            ("maxIndexNum", self.index_size.entries.to_string()),
        ];
        if let Some(ha) = &self.ha_master_address {
            lines.push(("haMasterAddress", ha.clone()));
        }
        if let Some(ip) = self.bind_address {
            lines.push(("bindAddress", ip.to_string()));
        }
        lines
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// Reads and parses a broker.conf file.
    pub fn load(path: &std::path::Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut c = BrokerConfig::parse(&text)?;
        c.config_file = Some(path.to_path_buf());
        Ok(c)
    }

    /// These settings with `updates` (broker.conf lines, as UPDATE_BROKER_CONFIG carries them)
    /// applied and checked as broker.conf is, with the settings that changed (each under its
    /// broker.conf key, with its new value). A change to a setting read only at start is
    /// refused: it would seem to take and do nothing.
    pub fn updated(
        &self,
        updates: &str,
    ) -> Result<(BrokerConfig, Vec<(String, String)>), ConfigError> {
        let updates = parse_properties(updates)?;
        if updates.is_empty() {
            return Err(ConfigError::Inconsistent("no setting to change".into()));
        }
        let before: Vec<(String, String)> = parse_properties(&self.to_properties())?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        let mut lines = before.clone();
        let restart_only = |key: &str| {
            ConfigError::Inconsistent(format!(
                "`{key}` is read only when the broker starts: change it in broker.conf and \
                 restart the broker (settings that can change while it runs: {})",
                LIVE_SETTINGS.join(", ")
            ))
        };
        for (key, value, line) in &updates {
            let name = setting(key);
            match lines.iter_mut().find(|(k, _)| k == name) {
                // Said first: checking the whole would often fail on it another way.
                Some(l) if l.1 != *value && !LIVE_SETTINGS.contains(&name) => {
                    return Err(restart_only(name))
                }
                Some(l) => l.1.clone_from(value),
                // Settings not listed: unknown, or without a value in effect (bindAddress,
                // haMasterAddress unset; haAuthToken is never shown), all read at start.
                None => {
                    return Err(match BrokerConfig::parse(&format!("{name}={value}\n")) {
                        Err(ConfigError::UnknownKey { .. }) => ConfigError::UnknownKey {
                            key: key.clone(),
                            line: *line,
                        },
                        _ => restart_only(name),
                    })
                }
            }
        }
        let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let mut next = BrokerConfig::parse(&text)?;
        if next.namesrv_addrs.is_empty() && !self.namesrv_addrs.is_empty() {
            return Err(ConfigError::Inconsistent(
                "namesrvAddr may not be empty: the broker would register with no name server"
                    .into(),
            ));
        }
        // What broker.conf lines do not carry.
        next.ha_auth_token.clone_from(&self.ha_auth_token);
        next.config_file.clone_from(&self.config_file);
        let changed: Vec<(String, String)> = parse_properties(&next.to_properties())?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .filter(|kv| !before.contains(kv))
            .collect();
        if let Some((key, _)) = changed
            .iter()
            .find(|(k, _)| !LIVE_SETTINGS.contains(&k.as_str()))
        {
            return Err(restart_only(key));
        }
        Ok((next, changed))
    }

    /// The time between registrations: `registerNameServerPeriod`, but at least a second.
    pub fn register_period(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.register_period_ms.max(1000))
    }

    /// Checks settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = self.broker_id.to_string();
        if self.broker_id < 0 {
            return Err(bad("brokerId", &id, "a non-negative integer"));
        }
        match (self.role, self.broker_id) {
            (BrokerRole::Slave, 0) => {
                return Err(ConfigError::Inconsistent(
                    "brokerRole=SLAVE needs a non-zero brokerId (0 is the master's)".into(),
                ))
            }
            (BrokerRole::AsyncMaster | BrokerRole::SyncMaster, n) if n != 0 => {
                return Err(ConfigError::Inconsistent(format!(
                    "brokerRole={} needs brokerId=0 (found {n}); slaves use non-zero ids",
                    self.role.as_str()
                )))
            }
            _ => {}
        }
        if self.register_period().as_millis() >= u128::from(self.heartbeat_timeout_ms) {
            // The name servers would drop the broker between two registrations.
            return Err(ConfigError::Inconsistent(format!(
                "registerNameServerPeriod ({} ms) must be shorter than \
                 brokerNotActiveTimeoutMillis ({} ms), or the name servers drop the broker \
                 between registrations",
                self.register_period_ms, self.heartbeat_timeout_ms
            )));
        }
        if self.segment_size < 64 * 1024 {
            return Err(bad(
                "mappedFileSizeCommitLog",
                &self.segment_size.to_string(),
                "at least 65536 bytes",
            ));
        }
        if self.max_message_size + 8 > self.segment_size {
            return Err(ConfigError::Inconsistent(format!(
                "maxMessageSize ({}) must be smaller than mappedFileSizeCommitLog ({}) - 8",
                self.max_message_size, self.segment_size
            )));
        }
        if !(1..=1024).contains(&self.default_topic_queue_nums) {
            return Err(bad(
                "defaultTopicQueueNums",
                &self.default_topic_queue_nums.to_string(),
                "1 to 1024",
            ));
        }
        if !(0..=7).contains(&self.permission) {
            return Err(bad(
                "brokerPermission",
                &self.permission.to_string(),
                "0 to 7",
            ));
        }
        if self.flush_interval_ms == 0 {
            return Err(bad("flushIntervalCommitLog", "0", "at least 1 ms"));
        }
        if self.transaction_check_interval_ms == 0 {
            return Err(bad("transactionCheckInterval", "0", "at least 1 ms"));
        }
        use crate::store::index::{IndexSize, MAX_ENTRIES, MAX_SLOTS};
        let IndexSize { slots, entries } = self.index_size;
        if !(1..=MAX_SLOTS).contains(&slots) {
            return Err(bad(
                "maxHashSlotNum",
                &slots.to_string(),
                &format!("1 to {MAX_SLOTS}"),
            ));
        }
        if !(MIN_INDEX_ENTRIES..=MAX_ENTRIES).contains(&entries) {
            return Err(bad(
                "maxIndexNum",
                &entries.to_string(),
                &format!("{MIN_INDEX_ENTRIES} to {MAX_ENTRIES}"),
            ));
        }
        if !(1..=MAX_IO_THREADS).contains(&self.io_threads) {
            return Err(bad(
                "serverIoThreads",
                &self.io_threads.to_string(),
                &format!("1 to {MAX_IO_THREADS}"),
            ));
        }
        if self.sync_wait_spin_us > MAX_SYNC_WAIT_SPIN_US {
            return Err(bad(
                "syncWaitSpinMicros",
                &self.sync_wait_spin_us.to_string(),
                &format!("0 to {MAX_SYNC_WAIT_SPIN_US}"),
            ));
        }
        if self.rebalance_lock_max_live_ms < MIN_REBALANCE_LOCK_LIVE_MS {
            return Err(bad(
                "rebalanceLockMaxLiveTime",
                &self.rebalance_lock_max_live_ms.to_string(),
                &format!("at least {MIN_REBALANCE_LOCK_LIVE_MS} ms"),
            ));
        }
        if self.max_frame_bytes < 1024 {
            return Err(bad(
                "serverMaxFrameBytes",
                &self.max_frame_bytes.to_string(),
                "at least 1024",
            ));
        }
        Ok(())
    }

    /// Takes brokerId from a StatefulSet pod name's ordinal (`name-3` -> 3); members other
    /// than ordinal 0 become slaves of the group's master.
    pub fn apply_ordinal(&mut self, pod_name: &str) -> Result<(), ConfigError> {
        let ordinal: i64 = pod_name
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse().ok())
            .ok_or_else(|| {
                bad(
                    "--pod-name",
                    pod_name,
                    "a StatefulSet pod name ending in -<ordinal>",
                )
            })?;
        self.broker_id = ordinal;
        if ordinal > 0 {
            self.role = BrokerRole::Slave;
        }
        self.validate()
    }

    /// The address clients use for this broker.
    pub fn broker_addr(&self) -> String {
        crate::net::host_port(&self.advertised_host(), self.listen_port)
    }

    /// The address the ports listen on: `bindAddress`, or every address of the family of
    /// `brokerIP1`: `0.0.0.0` for an IPv4 broker (as Java's), `::` for an IPv6 one, which
    /// takes IPv4 clients as well (a dual-stack socket; it costs IPv4 traffic a few percent,
    /// so IPv4 brokers keep IPv4 sockets).
    pub fn listen_ip(&self) -> std::net::IpAddr {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        self.bind_address
            .unwrap_or_else(|| match crate::net::parse_ip(&self.broker_ip) {
                Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            })
    }

    /// `brokerIP1` as advertised: an IP address in its usual short form (`fd00::5`, however
    /// written), so the address clients see matches the one message ids carry.
    fn advertised_host(&self) -> String {
        crate::net::parse_ip(&self.broker_ip)
            .map_or_else(|| self.broker_ip.clone(), |ip| ip.to_string())
    }

    /// The address slaves replicate from.
    pub fn ha_addr(&self) -> String {
        crate::net::host_port(&self.advertised_host(), self.ha_listen_port)
    }
}

fn non_empty(key: &str, v: &str) -> Result<String, ConfigError> {
    if v.is_empty() {
        Err(bad(key, v, "a non-empty value"))
    } else {
        Ok(v.to_string())
    }
}

/// Most delay levels `messageDelayLevel` may give (each is a queue of the schedule topic).
const MAX_DELAY_LEVELS: usize = 64;

/// Parses `messageDelayLevel` as Java does: delays separated by spaces, each a number with a
/// unit, `s`, `m`, `h` or `d`.
fn delay_levels(k: &str, v: &str) -> Result<Vec<i64>, ConfigError> {
    let what = "delays like \"1s 5s 10s 30s 1m 2h 1d\" (units s, m, h, d)";
    let levels = v
        .split_whitespace()
        .map(|d| {
            let mut chars = d.chars();
            let unit = chars.next_back();
            let n = chars.as_str();
            let ms = match unit {
                Some('s') => 1_000,
                Some('m') => 60_000,
                Some('h') => 3_600_000,
                Some('d') => 86_400_000,
                _ => return Err(bad(k, v, what)),
            };
            match n.parse::<i64>() {
                Ok(n) if n > 0 && n <= 365 * 86_400_000 / ms => Ok(n * ms),
                _ => Err(bad(k, v, what)),
            }
        })
        .collect::<Result<Vec<i64>, _>>()?;
    if levels.is_empty() || levels.len() > MAX_DELAY_LEVELS {
        return Err(bad(k, v, &format!("1 to {MAX_DELAY_LEVELS} {what}")));
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rocketmq_sample_config_parses() {
        let c = BrokerConfig::parse(
            "# comment\nbrokerClusterName = DefaultCluster\nbrokerName=broker-b\nbrokerId=0\n\
             deleteWhen=04\nfileReservedTime=48\nbrokerRole=ASYNC_MASTER\n\
             flushDiskType=SYNC_FLUSH\nnamesrvAddr=10.0.0.1:9876;10.0.0.2:9876\nlistenPort=20911\n",
        )
        .unwrap();
        assert_eq!(c.broker_name, "broker-b");
        assert_eq!(c.flush, FlushDiskType::Sync);
        assert_eq!(c.namesrv_addrs, vec!["10.0.0.1:9876", "10.0.0.2:9876"]);
        assert_eq!(c.ha_listen_port, 20912);
        assert_eq!(c.http_port, 20913);
        assert_eq!(c.delete_when_hours, [4]);
        let several = BrokerConfig::parse("deleteWhen=04;16").unwrap();
        assert_eq!(several.delete_when_hours, [4, 16]);
        assert!(BrokerConfig::parse("deleteWhen=04;24").is_err());
        assert!(BrokerConfig::parse("deleteWhen=").is_err());
        let bom = BrokerConfig::parse("\u{feff}brokerName=b\n").unwrap();
        assert_eq!(bom.broker_name, "b");
        assert_eq!(c.file_reserved_hours, 48);
    }

    #[test]
    fn zeroes_are_kept_ahead_under_sync_flush_and_on_slaves_only() {
        let prepares = |text: &str| BrokerConfig::parse(text).unwrap().prepares_ahead();
        assert!(!prepares(
            "brokerRole=ASYNC_MASTER\nflushDiskType=ASYNC_FLUSH"
        ));
        assert!(!prepares(
            "brokerRole=SYNC_MASTER\nflushDiskType=ASYNC_FLUSH"
        ));
        assert!(prepares(
            "brokerRole=ASYNC_MASTER\nflushDiskType=SYNC_FLUSH"
        ));
        assert!(prepares(
            "brokerId=1\nbrokerRole=SLAVE\nflushDiskType=ASYNC_FLUSH"
        ));
    }

    #[test]
    fn a_registration_period_the_name_servers_would_expire_is_refused() {
        let e =
            BrokerConfig::parse("registerNameServerPeriod=8000\nbrokerNotActiveTimeoutMillis=5000")
                .unwrap_err()
                .to_string();
        assert!(e.contains("registerNameServerPeriod"), "{e}");
        assert!(BrokerConfig::parse("registerNameServerPeriod=200000").is_err());
        assert!(BrokerConfig::parse("registerNameServerPeriod=2000").is_ok());
        // The period counts as at least a second.
        assert!(BrokerConfig::parse(
            "registerNameServerPeriod=500\nbrokerNotActiveTimeoutMillis=800"
        )
        .is_err());
    }

    #[test]
    fn disk_limits_are_read_and_bounded() {
        let c = BrokerConfig::parse("diskMaxUsedSpaceRatio=80\ndiskSpaceWarningLevelRatio=0.85")
            .unwrap();
        assert_eq!((c.disk_max_used_percent, c.disk_full_permille), (80, 850));
        // Java 5's percentage form, and Java's limits.
        let c =
            BrokerConfig::parse("diskMaxUsedSpaceRatio=99\ndiskSpaceWarningLevelRatio=95").unwrap();
        assert_eq!((c.disk_max_used_percent, c.disk_full_permille), (95, 900));
        let c =
            BrokerConfig::parse("diskMaxUsedSpaceRatio=5\ndiskSpaceWarningLevelRatio=20").unwrap();
        assert_eq!((c.disk_max_used_percent, c.disk_full_permille), (10, 350));
        // Whole numbers are percentages, as Java 5 reads them.
        let c = BrokerConfig::parse("diskSpaceWarningLevelRatio=1").unwrap();
        assert_eq!(c.disk_full_permille, 350);
        for bad in [
            "diskMaxUsedSpaceRatio=x",
            "diskSpaceWarningLevelRatio=x",
            "diskSpaceWarningLevelRatio=1.5",
        ] {
            assert!(BrokerConfig::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn settings_written_out_read_back_the_same() {
        let mut c = BrokerConfig::parse(
            "brokerName=b\nbrokerId=1\nbrokerRole=SLAVE\nflushDiskType=SYNC_FLUSH\n\
             namesrvAddr=a:1;b:2\nmessageDelayLevel=1s 90s 5m 2h 1d\ndeleteWhen=04;16\n\
             diskSpaceWarningLevelRatio=0.875\nhaMasterAddress=m:10912\nshortPollingTimeMills=250\n\
             transactionTimeOut=2000\ntransactionCheckMax=3\ntransactionCheckInterval=500\n\
             messageIndexEnable=false\nmaxHashSlotNum=1000\nmaxIndexNum=5000\n\
             enablePropertyFilter=true\nstoreReplyMessageEnable=false\n\
             timerWheelEnable=false\ntimerPrecisionMs=100\ntimerMaxDelaySec=60",
        )
        .unwrap();
        let text = c.to_properties();
        assert!(
            text.contains("messageDelayLevel=1s 90s 5m 2h 1d\n"),
            "{text}"
        );
        assert_eq!(BrokerConfig::parse(&text).unwrap(), c);
        assert_eq!(
            (
                c.transaction_timeout_ms,
                c.transaction_check_max,
                c.transaction_check_interval_ms
            ),
            (2000, 3, 500)
        );
        assert!(!c.message_index && c.property_filter && !c.store_reply_message);
        assert_eq!(
            c.timer,
            crate::server::timer::TimerConfig {
                enabled: false,
                precision_ms: 100,
                max_delay_sec: 60
            }
        );
        assert_eq!((c.index_size.slots, c.index_size.entries), (1000, 5000));
        for bad in [
            "maxHashSlotNum=0",
            "maxHashSlotNum=60000000",
            "maxIndexNum=10",
            "messageIndexEnable=yes",
            "transactionCheckInterval=0",
            "transactionCheckMax=-1",
            "transactionTimeOut=x",
            "timerPrecisionMs=0",
            "timerMaxDelaySec=0",
            "timerWheelEnable=maybe",
        ] {
            assert!(BrokerConfig::parse(bad).is_err(), "{bad} accepted");
        }
        // Defaults too, and the secret is not written out.
        c = BrokerConfig {
            ha_auth_token: Some("s3cret".into()),
            ..BrokerConfig::default()
        };
        let text = c.to_properties();
        assert!(!text.contains("s3cret") && !text.contains("haAuthToken"));
        c.ha_auth_token = None;
        assert_eq!(BrokerConfig::parse(&text).unwrap(), c);
    }

    #[test]
    fn delay_levels_are_read_as_java_writes_them() {
        let c = BrokerConfig::parse(
            "messageDelayLevel=1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h",
        )
        .unwrap();
        assert_eq!(c.delay_levels_ms, crate::store::message::DELAY_LEVELS_MS);
        let c = BrokerConfig::parse("messageDelayLevel=500s 1d").unwrap();
        assert_eq!(c.delay_levels_ms, [500_000, 86_400_000]);
        for bad in ["", "5", "5x", "0s", "-1s", "1.5s", "s", "5秒", "1µ", "µs"] {
            let e = BrokerConfig::parse(&format!("messageDelayLevel={bad}"));
            assert!(e.is_err(), "{bad:?} accepted");
        }
        assert!(BrokerConfig::parse(&format!("messageDelayLevel={}", "1s ".repeat(65))).is_err());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = BrokerConfig::parse("brokerName=a\nflushDiskTyp=SYNC_FLUSH\n").unwrap_err();
        assert_eq!(
            e,
            ConfigError::UnknownKey {
                key: "flushDiskTyp".into(),
                line: 2
            }
        );
        assert!(e.to_string().contains("flushDiskTyp"));
    }

    #[test]
    fn bad_values_name_the_key_and_what_is_expected() {
        let e = BrokerConfig::parse("flushDiskType=SOMETIMES").unwrap_err();
        assert!(e.to_string().contains("flushDiskType") && e.to_string().contains("SYNC_FLUSH"));
        let e = BrokerConfig::parse("listenPort=99999").unwrap_err();
        assert!(e.to_string().contains("listenPort"));
        let e = BrokerConfig::parse("autoCreateTopicEnable=yes").unwrap_err();
        assert!(e.to_string().contains("autoCreateTopicEnable"));
    }

    #[test]
    fn io_threads_default_to_the_cpus_and_are_bounded() {
        let c = BrokerConfig::parse("").unwrap();
        assert!(c.io_threads >= 1);
        assert_eq!(
            BrokerConfig::parse("serverIoThreads=3").unwrap().io_threads,
            3
        );
        for bad in [
            "serverIoThreads=0",
            "serverIoThreads=257",
            "serverIoThreads=two",
        ] {
            let e = BrokerConfig::parse(bad).unwrap_err();
            assert!(e.to_string().contains("serverIoThreads"), "{bad}: {e}");
        }
    }

    #[test]
    fn loops_spin_only_where_sends_wait_and_within_bounds() {
        let sync = BrokerConfig::parse("flushDiskType=SYNC_FLUSH").unwrap();
        assert_eq!(sync.loop_awake_for(), Duration::from_micros(500));
        let short = BrokerConfig::parse("flushDiskType=SYNC_FLUSH\nsyncWaitSpinMicros=80");
        assert_eq!(short.unwrap().loop_awake_for(), Duration::from_micros(80));
        let off = BrokerConfig::parse("flushDiskType=SYNC_FLUSH\nsyncWaitSpinMicros=0");
        assert_eq!(off.unwrap().loop_awake_for(), Duration::ZERO);
        let sync_master = BrokerConfig::parse("brokerRole=SYNC_MASTER\nsyncWaitSpinMicros=800");
        assert_eq!(
            sync_master.unwrap().loop_awake_for(),
            Duration::from_micros(800)
        );
        let not_sync = BrokerConfig::parse("syncWaitSpinMicros=800").unwrap();
        assert_eq!(not_sync.loop_awake_for(), Duration::ZERO);
        let slave =
            "brokerRole=SLAVE\nbrokerId=1\nflushDiskType=SYNC_FLUSH\nsyncWaitSpinMicros=800";
        let slave = BrokerConfig::parse(slave).unwrap();
        assert_eq!(slave.loop_awake_for(), Duration::ZERO);
        let most = BrokerConfig::parse("flushDiskType=SYNC_FLUSH\nsyncWaitSpinMicros=10000");
        assert_eq!(most.unwrap().loop_awake_for(), Duration::from_millis(10));
        for bad in ["syncWaitSpinMicros=10001", "syncWaitSpinMicros=-1"] {
            let e = BrokerConfig::parse(bad).unwrap_err();
            assert!(e.to_string().contains("syncWaitSpinMicros"), "{bad}: {e}");
        }
    }

    #[test]
    fn queue_locks_live_a_minute_unless_configured_and_at_least_a_second() {
        assert_eq!(
            BrokerConfig::parse("").unwrap().rebalance_lock_max_live_ms,
            60_000
        );
        let c = BrokerConfig::parse("rebalanceLockMaxLiveTime=90000").unwrap();
        assert_eq!(c.rebalance_lock_max_live_ms, 90_000);
        for bad in [
            "rebalanceLockMaxLiveTime=999",
            "rebalanceLockMaxLiveTime=0",
            "rebalanceLockMaxLiveTime=-1",
            "rebalanceLockMaxLiveTime=1m",
        ] {
            let e = BrokerConfig::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("rebalanceLockMaxLiveTime"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn role_and_id_must_agree() {
        assert!(BrokerConfig::parse("brokerRole=SLAVE\nbrokerId=0").is_err());
        assert!(BrokerConfig::parse("brokerRole=SYNC_MASTER\nbrokerId=2").is_err());
        assert!(BrokerConfig::parse("brokerRole=SLAVE\nbrokerId=1").is_ok());
    }

    #[test]
    fn pod_ordinal_sets_id_and_role() {
        let mut c = BrokerConfig::parse("brokerRole=SYNC_MASTER").unwrap();
        c.apply_ordinal("demo-broker-0-0").unwrap();
        assert_eq!((c.broker_id, c.role), (0, BrokerRole::SyncMaster));
        c.apply_ordinal("demo-broker-0-2").unwrap();
        assert_eq!((c.broker_id, c.role), (2, BrokerRole::Slave));
        assert!(c.apply_ordinal("no-ordinal-here").is_err());
    }

    #[test]
    fn the_4x_name_of_the_slave_gap_sets_the_same_setting() {
        let c = BrokerConfig::parse("haSlaveFallbehindMax=1048576").unwrap();
        assert_eq!(c.ha_max_gap, 1 << 20);
        let c = BrokerConfig::parse("haMaxGapNotInSync=2097152").unwrap();
        assert_eq!(c.ha_max_gap, 2 << 20);
        let both = BrokerConfig::parse("haMaxGapNotInSync=1\nhaSlaveFallbehindMax=2");
        assert!(
            matches!(&both, Err(ConfigError::Inconsistent(m)) if m.contains("haSlaveFallbehindMax")),
            "{both:?}"
        );
    }

    #[test]
    fn duplicate_keys_and_garbage_lines_are_refused() {
        assert!(BrokerConfig::parse("brokerId=0\nbrokerId=0").is_err());
        assert!(matches!(
            BrokerConfig::parse("just words"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
    }

    #[test]
    fn the_readme_marks_the_settings_that_change_while_the_broker_runs() {
        let readme = include_str!("../../README.md");
        let mut marked: Vec<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split_once("` ✎ |"))
            .map(|(k, _)| k)
            .collect();
        marked.sort_unstable();
        let mut live = LIVE_SETTINGS.to_vec();
        live.sort_unstable();
        assert_eq!(marked, live);
    }

    #[test]
    fn an_update_changes_live_settings_and_refuses_the_others() {
        let c = BrokerConfig {
            ha_auth_token: Some("secret".into()),
            ..BrokerConfig::default()
        };
        let (next, changed) = c
            .updated("fileReservedTime = 24\ndeleteWhen=01;13\n")
            .unwrap();
        assert_eq!(next.file_reserved_hours, 24);
        assert_eq!(next.delete_when_hours, vec![1, 13]);
        assert_eq!(
            next.ha_auth_token.as_deref(),
            Some("secret"),
            "kept, though not listed"
        );
        assert_eq!(
            changed,
            vec![
                ("fileReservedTime".to_string(), "24".to_string()),
                ("deleteWhen".to_string(), "1;13".to_string())
            ]
        );
        // The same value again changes nothing; a start-only setting given as it is passes.
        let (_, changed) = next
            .updated("fileReservedTime=24\nbrokerRole=ASYNC_MASTER")
            .unwrap();
        assert!(changed.is_empty());
        // A start-only setting under its other name is still that setting.
        for known in [
            "bindAddress=::",
            "haAuthToken=x",
            "haMasterAddress=10.0.0.1:10912",
        ] {
            let refused = c.updated(known).unwrap_err().to_string();
            assert!(
                refused.contains("read only when the broker starts"),
                "{refused}"
            );
        }
        let refused = c.updated("haSlaveFallbehindMax=1").unwrap_err().to_string();
        assert!(
            refused.contains("`haMaxGapNotInSync` is read only when the broker starts"),
            "{refused}"
        );
        let with_ns = BrokerConfig {
            namesrv_addrs: vec!["ns:9876".into()],
            ..BrokerConfig::default()
        };
        let refused = with_ns.updated("namesrvAddr=;").unwrap_err().to_string();
        assert!(
            refused.contains("namesrvAddr may not be empty"),
            "{refused}"
        );
        assert!(matches!(
            c.updated("fileReservedTime=1\nbogus=2"),
            Err(ConfigError::UnknownKey { line: 2, .. })
        ));
    }

    #[test]
    fn ipv6_hosts_are_advertised_in_short_form_and_the_bind_address_is_read() {
        let c = BrokerConfig::parse("brokerIP1=FD00:0:0:0:0:0:0:5\nbindAddress=0.0.0.0\n").unwrap();
        assert_eq!(c.broker_addr(), "[fd00::5]:10911");
        assert_eq!(c.ha_addr(), "[fd00::5]:10912");
        assert_eq!(c.listen_ip().to_string(), "0.0.0.0");
        assert_eq!(BrokerConfig::parse(&c.to_properties()).unwrap(), c);
        // Unset: the family of the advertised address.
        let d = BrokerConfig::default();
        assert_eq!(d.listen_ip().to_string(), "0.0.0.0");
        assert_eq!(d.broker_addr(), "127.0.0.1:10911");
        let v6 = BrokerConfig::parse("brokerIP1=fd00::5\n").unwrap();
        assert_eq!(v6.listen_ip().to_string(), "::");
        assert_eq!(BrokerConfig::parse(&v6.to_properties()).unwrap(), v6);
        let e = BrokerConfig::parse("bindAddress=everywhere\n").unwrap_err();
        assert!(e.to_string().contains("bindAddress"), "{e}");
    }
}
