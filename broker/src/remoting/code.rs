//! Request and response codes of the RocketMQ remoting protocol (RequestCode.java, ResponseCode.java).

/// Request codes ferromq understands; anything else is answered with `REQUEST_CODE_NOT_SUPPORTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum RequestCode {
    /// Send one message (long header keys).
    SendMessage = 10,
    /// Pull messages of one queue, optionally long-polling.
    PullMessage = 11,
    /// Look up messages by key.
    QueryMessage = 12,
    /// Read a consumer group's committed offset of one queue.
    QueryConsumerOffset = 14,
    /// Commit a consumer group's offset of one queue.
    UpdateConsumerOffset = 15,
    /// Create or update a topic on a broker.
    UpdateAndCreateTopic = 17,
    /// Dump every topic config of a broker.
    GetAllTopicConfig = 21,
    /// Find the first queue offset stored at or after a timestamp.
    SearchOffsetByTimestamp = 29,
    /// Highest queue offset (exclusive) of a queue.
    GetMaxOffset = 30,
    /// Lowest queue offset still stored of a queue.
    GetMinOffset = 31,
    /// Changes settings of a running broker, sent as properties text (`mqadmin
    /// updateBrokerConfig`).
    UpdateBrokerConfig = 25,
    /// The broker's settings as properties text (`mqadmin getBrokerConfig`).
    GetBrokerConfig = 26,
    /// Store time of a queue's oldest message (Java's `earliestMsgStoreTime`).
    GetEarliestMsgStoretime = 32,
    /// Read one message by its offset message id.
    ViewMessageById = 33,
    /// Whether the broker can filter by a subscription's expression type (Java consumers ask
    /// at start; an SQL92 one then fails with the broker's remark).
    CheckClientConfig = 46,
    /// Client liveness and subscriptions.
    HeartBeat = 34,
    /// A client leaves its groups.
    UnregisterClient = 35,
    /// A consumer gives a message back for a later retry.
    ConsumerSendMsgBack = 36,
    /// A producer commits or rolls back a transactional half message (oneway).
    EndTransaction = 37,
    /// Client ids of a consumer group, for rebalancing.
    GetConsumerListByGroup = 38,
    /// Broker asks a producer how a half message's transaction ended (oneway).
    CheckTransactionState = 39,
    /// Broker tells consumers that their group changed (oneway).
    NotifyConsumerIdsChanged = 40,
    /// Lock queues for orderly consumption.
    LockBatchMq = 41,
    /// Unlock queues after orderly consumption.
    UnlockBatchMq = 42,
    /// Every committed consumer offset of a broker.
    GetAllConsumerOffset = 43,
    /// Every delay-level offset of a broker.
    GetAllDelayOffset = 45,
    /// Set a value of the name server's KV config.
    PutKvConfig = 100,
    /// Read a value of the name server's KV config.
    GetKvConfig = 101,
    /// Remove a value of the name server's KV config.
    DeleteKvConfig = 102,
    /// Every value of one namespace of the name server's KV config.
    GetKvlistByNamespace = 219,
    /// ferromq's own: the name server's whole KV config, for a peer name server that
    /// starts without it (no Java client sends it).
    CopyKvConfig = 40_001,
    /// Broker joins the name server (and heartbeats).
    RegisterBroker = 103,
    /// Broker leaves the name server.
    UnregisterBroker = 104,
    /// Route (queues and brokers) of a topic.
    GetRouteinfoByTopic = 105,
    /// Every cluster and broker the name server knows.
    GetBrokerClusterInfo = 106,
    /// Create or update a subscription group's settings (Java's `mqadmin updateSubGroup`).
    UpdateAndCreateSubscriptionGroup = 200,
    /// Every subscription group config of a broker.
    GetAllSubscriptionGroupConfig = 201,
    /// Forget a subscription group's settings (Java's `mqadmin deleteSubGroup`).
    DeleteSubscriptionGroup = 207,
    /// Every topic the name server knows.
    GetAllTopicListFromNameserver = 206,
    /// Remove write permission from a broker (drain before scale-in).
    WipeWritePermOfBroker = 205,
    /// Topic names of one cluster.
    GetTopicsByCluster = 224,
    /// Consumption progress of a consumer group on one broker.
    GetConsumeStats = 208,
    /// A consumer group's clients and subscriptions (`mqadmin consumerConnection`).
    GetConsumerConnectionList = 203,
    /// Deletes a topic from a broker (`mqadmin deleteTopic`, first step).
    DeleteTopicInBroker = 215,
    /// Deletes a topic's routes from a name server (`mqadmin deleteTopic`, second step).
    DeleteTopicInNamesrv = 216,
    /// Offsets and last store time of each queue of a topic on one broker.
    GetTopicStatsInfo = 202,
    /// Runtime figures of a broker (`mqadmin brokerStatus`).
    GetBrokerRuntimeInfo = 28,
    /// Send one message (single-letter header keys).
    SendMessageV2 = 310,
    /// Send several messages in one request.
    SendBatchMessage = 320,
    /// An admin tool asks a consumer client, through its broker, for its internal state
    /// (`mqadmin consumerStatus`); the broker relays it.
    GetConsumerRunningInfo = 307,
    /// An admin tool has a consumer client consume one stored message, through the broker
    /// (`mqadmin queryMsgById -g -d`); the broker relays it with the message.
    ConsumeMessageDirectly = 309,
    /// A consumer's reply to a request message (long header keys): stored, and pushed to the
    /// requester.
    SendReplyMessage = 324,
    /// A consumer's reply to a request message (one-letter header keys).
    SendReplyMessageV2 = 325,
    /// The broker hands a reply to the producer that sent the request.
    PushReplyMessageToClient = 326,
    /// A pull from a lite-pull consumer (RocketMQ 5's DefaultLitePullConsumer): a pull like
    /// any other.
    LitePullMessage = 361,
}

impl RequestCode {
    /// Every code in this enum, for lookups and tests.
    pub const ALL: &'static [RequestCode] = &[
        Self::SendMessage,
        Self::PullMessage,
        Self::QueryMessage,
        Self::QueryConsumerOffset,
        Self::UpdateConsumerOffset,
        Self::UpdateAndCreateTopic,
        Self::GetAllTopicConfig,
        Self::SearchOffsetByTimestamp,
        Self::GetMaxOffset,
        Self::GetMinOffset,
        Self::UpdateBrokerConfig,
        Self::GetBrokerConfig,
        Self::GetEarliestMsgStoretime,
        Self::CheckClientConfig,
        Self::ViewMessageById,
        Self::HeartBeat,
        Self::UnregisterClient,
        Self::ConsumerSendMsgBack,
        Self::EndTransaction,
        Self::GetConsumerListByGroup,
        Self::CheckTransactionState,
        Self::NotifyConsumerIdsChanged,
        Self::LockBatchMq,
        Self::UnlockBatchMq,
        Self::GetAllConsumerOffset,
        Self::GetAllDelayOffset,
        Self::PutKvConfig,
        Self::GetKvConfig,
        Self::DeleteKvConfig,
        Self::GetKvlistByNamespace,
        Self::CopyKvConfig,
        Self::RegisterBroker,
        Self::UnregisterBroker,
        Self::GetRouteinfoByTopic,
        Self::GetBrokerClusterInfo,
        Self::UpdateAndCreateSubscriptionGroup,
        Self::GetAllSubscriptionGroupConfig,
        Self::DeleteSubscriptionGroup,
        Self::GetAllTopicListFromNameserver,
        Self::WipeWritePermOfBroker,
        Self::GetTopicsByCluster,
        Self::GetConsumeStats,
        Self::GetConsumerConnectionList,
        Self::DeleteTopicInBroker,
        Self::DeleteTopicInNamesrv,
        Self::GetTopicStatsInfo,
        Self::GetBrokerRuntimeInfo,
        Self::SendMessageV2,
        Self::SendBatchMessage,
        Self::GetConsumerRunningInfo,
        Self::ConsumeMessageDirectly,
        Self::SendReplyMessage,
        Self::SendReplyMessageV2,
        Self::PushReplyMessageToClient,
        Self::LitePullMessage,
    ];

    /// The code as it travels on the wire.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The enum for a wire code, `None` for codes ferromq does not implement.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.code() == code)
    }
}

/// Response codes ferromq answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ResponseCode {
    /// The request succeeded (also PULL "FOUND").
    Success = 0,
    /// Something failed on the server; the remark says what.
    SystemError = 1,
    /// The server is overloaded; retry later.
    SystemBusy = 2,
    /// The request code is not implemented.
    RequestCodeNotSupported = 3,
    /// SYNC_FLUSH could not make the message durable in time.
    FlushDiskTimeout = 10,
    /// SYNC_MASTER has no slave to replicate to.
    SlaveNotAvailable = 11,
    /// SYNC_MASTER's slave did not confirm in time.
    FlushSlaveTimeout = 12,
    /// The message is malformed or too large.
    MessageIllegal = 13,
    /// The broker cannot take this request in its current role or state.
    ServiceNotAvailable = 14,
    /// The broker or topic forbids this operation.
    NoPermission = 16,
    /// The topic does not exist and may not be created.
    TopicNotExist = 17,
    /// A pull found nothing new.
    PullNotFound = 19,
    /// A pull should be retried at once.
    PullRetryImmediately = 20,
    /// The pull offset is out of range; the response says where to go.
    PullOffsetMoved = 21,
    /// A query found nothing.
    QueryNotFound = 22,
    /// A subscription's expression cannot be parsed.
    SubscriptionParseFailed = 23,
    /// The consumer's subscription is unknown to the broker.
    SubscriptionNotExist = 24,
    /// The consumer's subscription is older than the broker's.
    SubscriptionNotLatest = 25,
    /// The consumer group does not exist.
    SubscriptionGroupNotExist = 26,
    /// The broker holds no usable filter for the consumer's SQL92 subscription (its heartbeat
    /// carried an expression that does not parse).
    FilterDataNotExist = 27,
    /// No client of the consumer group is connected.
    ConsumerNotOnline = 206,
    /// A consumer client did not answer a relayed request in time.
    ConsumeMsgTimeout = 207,
}

impl ResponseCode {
    /// The code as it travels on the wire.
    pub fn code(self) -> i32 {
        self as i32
    }
}
