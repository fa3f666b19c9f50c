//! Typed request and response headers, flattened into a command's `extFields` as Java does.
//!
//! Parsing is lenient the way Java's is: numbers may carry spaces, booleans may be `0`/`1`,
//! unknown keys are ignored, and optional fields may be missing.

use super::ExtFields;

/// Why a header could not be read from `extFields`; the response remark shows it to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A required field is absent.
    #[error("header field `{0}` is missing")]
    Missing(&'static str),
    /// A field's value has the wrong type.
    #[error("header field `{key}` = {value:?} is not a valid {expected}")]
    Invalid {
        /// Field name.
        key: &'static str,
        /// Value as received.
        value: String,
        /// Type wanted.
        expected: &'static str,
    },
}

/// A value that can be read from and written to an `extFields` entry.
pub trait ExtValue: Sized {
    /// Parses the present field `key`, applying Java's leniency.
    fn parse(value: &str, key: &'static str) -> Result<Self, HeaderError>;
    /// The value of an absent field: an error unless the type says otherwise.
    fn absent(key: &'static str) -> Result<Self, HeaderError> {
        Err(HeaderError::Missing(key))
    }
    /// Reads the field `key` (one lookup).
    fn read(ext: &ExtFields, key: &'static str) -> Result<Self, HeaderError> {
        match ext.get(key) {
            Some(v) => Self::parse(v, key),
            None => Self::absent(key),
        }
    }
    /// Writes the field `key` (absent values are left out).
    fn write(&self, ext: &mut ExtFields, key: &'static str);
    /// Whether an empty string means "absent" for an optional field of this type.
    fn empty_is_absent() -> bool {
        true
    }
}

fn parse_num<T: std::str::FromStr>(
    v: &str,
    key: &'static str,
    expected: &'static str,
) -> Result<T, HeaderError> {
    v.trim().parse().map_err(|_| HeaderError::Invalid {
        key,
        value: v.to_string(),
        expected,
    })
}

impl ExtValue for String {
    fn parse(value: &str, _key: &'static str) -> Result<Self, HeaderError> {
        Ok(value.to_string())
    }
    fn write(&self, ext: &mut ExtFields, key: &'static str) {
        ext.insert(key, self);
    }
    fn empty_is_absent() -> bool {
        false
    }
}

macro_rules! num_ext_value {
    ($($t:ty => $name:literal),*) => {$(
        impl ExtValue for $t {
            fn parse(value: &str, key: &'static str) -> Result<Self, HeaderError> {
                parse_num(value, key, $name)
            }
            fn write(&self, ext: &mut ExtFields, key: &'static str) {
                ext.insert_int(key, *self);
            }
        }
    )*};
}
num_ext_value!(i32 => "32-bit integer", i64 => "64-bit integer");

impl ExtValue for bool {
    fn parse(value: &str, key: &'static str) -> Result<Self, HeaderError> {
        match value.trim() {
            v if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
            v if v.eq_ignore_ascii_case("false") || v == "0" || v.is_empty() => Ok(false),
            v => Err(HeaderError::Invalid {
                key,
                value: v.to_string(),
                expected: "boolean",
            }),
        }
    }
    /// A missing boolean is false, as in Java.
    fn absent(_key: &'static str) -> Result<Self, HeaderError> {
        Ok(false)
    }
    fn write(&self, ext: &mut ExtFields, key: &'static str) {
        ext.insert_display(key, self);
    }
}

impl<T: ExtValue> ExtValue for Option<T> {
    fn parse(value: &str, key: &'static str) -> Result<Self, HeaderError> {
        if value.is_empty() && T::empty_is_absent() {
            return Ok(None);
        }
        T::parse(value, key).map(Some)
    }
    fn absent(_key: &'static str) -> Result<Self, HeaderError> {
        Ok(None)
    }
    fn write(&self, ext: &mut ExtFields, key: &'static str) {
        if let Some(v) = self {
            v.write(ext, key);
        }
    }
}

/// Declares a header struct whose fields map one-to-one onto `extFields` keys.
macro_rules! ext_header {
    ($(#[$m:meta])* pub struct $name:ident { $( $(#[$fm:meta])* pub $f:ident : $t:ty => $key:literal ),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Default)]
        pub struct $name { $( $(#[$fm])* pub $f: $t ),* }

        impl $name {
            /// Reads the header from a command's `extFields`.
            pub fn from_ext(ext: &ExtFields) -> Result<Self, HeaderError> {
                Self::from_ext_keyed(ext, |k| k)
            }

            /// Flattens the header into `extFields`.
            pub fn to_ext(&self) -> ExtFields {
                self.to_ext_keyed(|k| k)
            }

            /// Reads the header where the wire uses other key names (`key_of` maps each
            /// field's name to the wire's), without building a renamed map.
            pub fn from_ext_keyed(
                ext: &ExtFields,
                key_of: impl Fn(&'static str) -> &'static str,
            ) -> Result<Self, HeaderError> {
                Ok($name { $( $f: <$t as ExtValue>::read(ext, key_of($key))? ),* })
            }

            /// Flattens the header under the wire's key names (see `from_ext_keyed`).
            pub fn to_ext_keyed(&self, key_of: impl Fn(&'static str) -> &'static str) -> ExtFields {
                let mut ext = ExtFields::with_capacity(16, 256);
                $( ExtValue::write(&self.$f, &mut ext, key_of($key)); )*
                ext
            }
        }
    };
}

ext_header! {
    /// SEND_MESSAGE / SEND_BATCH_MESSAGE request (long keys; V2 is read by [`SendMessageRequestHeader::from_v2`]).
    pub struct SendMessageRequestHeader {
        /// Producer group of the sender.
        pub producer_group: String => "producerGroup",
        /// Destination topic.
        pub topic: String => "topic",
        /// Template topic for auto-creation (TBW102).
        pub default_topic: Option<String> => "defaultTopic",
        /// Queue count for an auto-created topic.
        pub default_topic_queue_nums: Option<i32> => "defaultTopicQueueNums",
        /// Destination queue; negative lets the broker choose.
        pub queue_id: Option<i32> => "queueId",
        /// Message sysFlag bits.
        pub sys_flag: Option<i32> => "sysFlag",
        /// Producer-side creation time in ms.
        pub born_timestamp: Option<i64> => "bornTimestamp",
        /// User flag.
        pub flag: Option<i32> => "flag",
        /// Encoded message properties.
        pub properties: Option<String> => "properties",
        /// Delivery attempts so far (retry topic sends).
        pub reconsume_times: Option<i32> => "reconsumeTimes",
        /// Unit mode (unused by ferromq).
        pub unit_mode: bool => "unitMode",
        /// Retry limit before the DLQ.
        pub max_reconsume_times: Option<i32> => "maxReconsumeTimes",
        /// Whether the body is a batch.
        pub batch: bool => "batch",
        /// Broker the producer meant (informative).
        pub broker_name: Option<String> => "brokerName",
    }
}

/// Long key for each one-letter key of SEND_MESSAGE_V2.
const SEND_V2_KEYS: &[(&str, &str)] = &[
    ("a", "producerGroup"),
    ("b", "topic"),
    ("c", "defaultTopic"),
    ("d", "defaultTopicQueueNums"),
    ("e", "queueId"),
    ("f", "sysFlag"),
    ("g", "bornTimestamp"),
    ("h", "flag"),
    ("i", "properties"),
    ("j", "reconsumeTimes"),
    ("k", "unitMode"),
    ("l", "maxReconsumeTimes"),
    ("m", "batch"),
    ("n", "brokerName"),
];

/// SEND_MESSAGE_V2's one-letter key for a SEND_MESSAGE key (other keys pass through).
pub fn send_v2_key(long: &'static str) -> &'static str {
    SEND_V2_KEYS
        .iter()
        .find(|(_, l)| *l == long)
        .map_or(long, |(short, _)| short)
}

impl SendMessageRequestHeader {
    /// Reads a SEND_MESSAGE_V2 header (one-letter keys).
    pub fn from_v2(ext: &ExtFields) -> Result<Self, HeaderError> {
        Self::from_ext_keyed(ext, send_v2_key)
    }

    /// Flattens the header with SEND_MESSAGE_V2's one-letter keys.
    pub fn to_v2(&self) -> ExtFields {
        self.to_ext_keyed(send_v2_key)
    }
}

ext_header! {
    /// Answer to a send: where the message landed.
    pub struct SendMessageResponseHeader {
        /// Offset message id (store host + commit-log offset, hex).
        pub msg_id: String => "msgId",
        /// Queue the message went to.
        pub queue_id: i32 => "queueId",
        /// Position of the message in its queue.
        pub queue_offset: i64 => "queueOffset",
        /// Transaction id (unused, kept for clients that read it).
        pub transaction_id: Option<String> => "transactionId",
    }
}

/// Pull sysFlag bit: commit `commitOffset` along with the pull.
pub const PULL_COMMIT_OFFSET: i32 = 1;
/// Pull sysFlag bit: the broker may hold the pull until a message arrives.
pub const PULL_SUSPEND: i32 = 1 << 1;
/// Pull sysFlag bit: the request carries its subscription expression (brokers that know the
/// group only from heartbeats refuse a pull without it).
pub const PULL_SUBSCRIPTION: i32 = 1 << 2;

ext_header! {
    /// PULL_MESSAGE request.
    pub struct PullMessageRequestHeader {
        /// Consumer group pulling.
        pub consumer_group: String => "consumerGroup",
        /// Topic pulled.
        pub topic: String => "topic",
        /// Queue pulled.
        pub queue_id: i32 => "queueId",
        /// First queue offset wanted.
        pub queue_offset: i64 => "queueOffset",
        /// Most messages to return.
        pub max_msg_nums: i32 => "maxMsgNums",
        /// Pull flags (commit offset, suspend, subscription, ...).
        pub sys_flag: i32 => "sysFlag",
        /// Offset to commit along with the pull.
        pub commit_offset: Option<i64> => "commitOffset",
        /// How long the broker may hold a pull that finds nothing.
        pub suspend_timeout_millis: Option<i64> => "suspendTimeoutMillis",
        /// Subscription expression (tags).
        pub subscription: Option<String> => "subscription",
        /// Version of the subscription.
        pub sub_version: Option<i64> => "subVersion",
        /// Expression type, TAG or SQL92.
        pub expression_type: Option<String> => "expressionType",
        /// Upper bound of bytes wanted.
        pub max_msg_bytes: Option<i32> => "maxMsgBytes",
    }
}

ext_header! {
    /// Answer to a pull.
    pub struct PullMessageResponseHeader {
        /// Broker id the consumer should pull from next (0 = master).
        pub suggest_which_broker_id: i64 => "suggestWhichBrokerId",
        /// Queue offset of the next pull.
        pub next_begin_offset: i64 => "nextBeginOffset",
        /// Lowest queue offset stored.
        pub min_offset: i64 => "minOffset",
        /// Highest queue offset stored (exclusive).
        pub max_offset: i64 => "maxOffset",
    }
}

ext_header! {
    /// A request naming one consumer group's queue (QUERY_CONSUMER_OFFSET).
    pub struct QueryConsumerOffsetRequestHeader {
        /// Consumer group.
        pub consumer_group: String => "consumerGroup",
        /// Topic.
        pub topic: String => "topic",
        /// Queue.
        pub queue_id: i32 => "queueId",
        /// `false`: a group with no offset gets "not found" even where it would read from 0
        /// (RocketMQ 5 clients).
        pub set_zero_if_not_found: Option<bool> => "setZeroIfNotFound",
    }
}

ext_header! {
    /// UPDATE_CONSUMER_OFFSET request.
    pub struct UpdateConsumerOffsetRequestHeader {
        /// Consumer group.
        pub consumer_group: String => "consumerGroup",
        /// Topic.
        pub topic: String => "topic",
        /// Queue.
        pub queue_id: i32 => "queueId",
        /// Offset of the next message the group will consume.
        pub commit_offset: i64 => "commitOffset",
    }
}

ext_header! {
    /// A request naming one queue (GET_MAX_OFFSET, GET_MIN_OFFSET).
    pub struct QueueRequestHeader {
        /// Topic.
        pub topic: String => "topic",
        /// Queue.
        pub queue_id: i32 => "queueId",
    }
}

ext_header! {
    /// PUT_KV_CONFIG request.
    pub struct PutKvConfigRequestHeader {
        /// Namespace.
        pub namespace: String => "namespace",
        /// Key.
        pub key: String => "key",
        /// Value.
        pub value: String => "value",
    }
}

ext_header! {
    /// GET_KV_CONFIG and DELETE_KV_CONFIG request.
    pub struct KvConfigRequestHeader {
        /// Namespace.
        pub namespace: String => "namespace",
        /// Key.
        pub key: String => "key",
    }
}

ext_header! {
    /// GET_KV_CONFIG answer.
    pub struct KvConfigResponseHeader {
        /// The value.
        pub value: Option<String> => "value",
    }
}

ext_header! {
    /// GET_KVLIST_BY_NAMESPACE request.
    pub struct KvNamespaceRequestHeader {
        /// Namespace.
        pub namespace: String => "namespace",
    }
}

ext_header! {
    /// DELETE_SUBSCRIPTIONGROUP request.
    pub struct DeleteSubscriptionGroupRequestHeader {
        /// Group whose settings go.
        pub group_name: String => "groupName",
        /// Whether the group's committed offsets go too (`deleteSubGroup -r true`).
        pub clean_offset: bool => "cleanOffset",
    }
}

ext_header! {
    /// GET_TOPICS_BY_CLUSTER request (Java's `mqadmin topicList -c`).
    pub struct TopicsByClusterRequestHeader {
        /// Cluster name.
        pub cluster: String => "cluster",
    }
}

ext_header! {
    /// GET_TOPIC_STATS_INFO request (Java's `mqadmin topicStatus`).
    pub struct TopicStatsRequestHeader {
        /// Topic.
        pub topic: String => "topic",
    }
}

ext_header! {
    /// SEARCH_OFFSET_BY_TIMESTAMP request.
    pub struct SearchOffsetRequestHeader {
        /// Topic.
        pub topic: String => "topic",
        /// Queue.
        pub queue_id: i32 => "queueId",
        /// Store time in ms to search for.
        pub timestamp: i64 => "timestamp",
        /// `LOWER` (default) or `UPPER`: the first message at or after the time, or the last
        /// at or before it (RocketMQ 5).
        pub boundary_type: Option<String> => "boundaryType",
    }
}

ext_header! {
    /// A response carrying one offset.
    pub struct OffsetResponseHeader {
        /// The offset.
        pub offset: i64 => "offset",
    }
}

ext_header! {
    /// A request naming a consumer group (GET_CONSUMER_LIST_BY_GROUP).
    pub struct ConsumerGroupRequestHeader {
        /// Consumer group.
        pub consumer_group: String => "consumerGroup",
    }
}

ext_header! {
    /// UNREGISTER_CLIENT request.
    pub struct UnregisterClientRequestHeader {
        /// Client leaving.
        pub client_id: String => "clientID",
        /// Producer group it leaves, if any.
        pub producer_group: Option<String> => "producerGroup",
        /// Consumer group it leaves, if any.
        pub consumer_group: Option<String> => "consumerGroup",
    }
}

ext_header! {
    /// END_TRANSACTION request: a producer's decision on one half message.
    pub struct EndTransactionRequestHeader {
        /// The producer's group, which must be the half message's.
        pub producer_group: String => "producerGroup",
        /// Queue offset of the half message.
        pub tran_state_table_offset: i64 => "tranStateTableOffset",
        /// Commit-log offset of the half message.
        pub commit_log_offset: i64 => "commitLogOffset",
        /// 8 commit, 12 roll back, 0 not decided yet.
        pub commit_or_rollback: i32 => "commitOrRollback",
        /// Whether this answers a CHECK_TRANSACTION_STATE.
        pub from_transaction_check: Option<bool> => "fromTransactionCheck",
        /// The message's client id (`UNIQ_KEY`).
        pub msg_id: Option<String> => "msgId",
        /// The transaction's id.
        pub transaction_id: Option<String> => "transactionId",
    }
}

ext_header! {
    /// CHECK_TRANSACTION_STATE request, to a producer: which half message it is asked about.
    pub struct CheckTransactionStateRequestHeader {
        /// Queue offset of the half message (its latest copy).
        pub tran_state_table_offset: i64 => "tranStateTableOffset",
        /// Commit-log offset of the half message (its latest copy).
        pub commit_log_offset: i64 => "commitLogOffset",
        /// The message's client id (`UNIQ_KEY`).
        pub msg_id: Option<String> => "msgId",
        /// The transaction's id (the same `UNIQ_KEY`, as Java's broker sends it).
        pub transaction_id: Option<String> => "transactionId",
        /// Offset message id of the half message's copy.
        pub offset_msg_id: Option<String> => "offsetMsgId",
    }
}

ext_header! {
    /// CONSUMER_SEND_MSG_BACK request.
    pub struct ConsumerSendMsgBackRequestHeader {
        /// Commit-log offset of the message given back.
        pub offset: i64 => "offset",
        /// Consumer group giving it back.
        pub group: String => "group",
        /// Requested delay level (0 = broker decides).
        pub delay_level: i32 => "delayLevel",
        /// Original message id.
        pub origin_msg_id: Option<String> => "originMsgId",
        /// Original topic.
        pub origin_topic: Option<String> => "originTopic",
        /// Unit mode (unused).
        pub unit_mode: bool => "unitMode",
        /// Retry limit before the DLQ.
        pub max_reconsume_times: Option<i32> => "maxReconsumeTimes",
    }
}

ext_header! {
    /// UPDATE_AND_CREATE_TOPIC request.
    pub struct CreateTopicRequestHeader {
        /// Topic to create or update.
        pub topic: String => "topic",
        /// Template topic (informative).
        pub default_topic: Option<String> => "defaultTopic",
        /// Readable queue count.
        pub read_queue_nums: i32 => "readQueueNums",
        /// Writable queue count.
        pub write_queue_nums: i32 => "writeQueueNums",
        /// Permission bits (READ 4, WRITE 2, INHERIT 1).
        pub perm: i32 => "perm",
        /// Filter type name (informative).
        pub topic_filter_type: Option<String> => "topicFilterType",
        /// Topic sysFlag.
        pub topic_sys_flag: Option<i32> => "topicSysFlag",
        /// Whether the topic is ordered.
        pub order: bool => "order",
    }
}

ext_header! {
    /// A request naming one topic (GET_ROUTEINFO_BY_TOPIC, GET_CONSUME_STATS).
    pub struct TopicRequestHeader {
        /// Topic.
        pub topic: String => "topic",
    }
}

ext_header! {
    /// DELETE_TOPIC_IN_NAMESRV request: RocketMQ 5 names the cluster whose routes go.
    pub struct DeleteTopicFromNamesrvRequestHeader {
        /// Topic.
        pub topic: String => "topic",
        /// Only this cluster's groups lose the topic; all of them when absent.
        pub cluster_name: Option<String> => "clusterName",
    }
}

ext_header! {
    /// GET_CONSUME_STATS request.
    pub struct ConsumeStatsRequestHeader {
        /// Consumer group.
        pub consumer_group: String => "consumerGroup",
        /// Only this topic, if set.
        pub topic: Option<String> => "topic",
    }
}

ext_header! {
    /// REGISTER_BROKER request.
    pub struct RegisterBrokerRequestHeader {
        /// Group name.
        pub broker_name: String => "brokerName",
        /// Address clients reach the broker at.
        pub broker_addr: String => "brokerAddr",
        /// Cluster name.
        pub cluster_name: String => "clusterName",
        /// Address slaves replicate from.
        pub ha_server_addr: Option<String> => "haServerAddr",
        /// 0 for the master, otherwise a slave.
        pub broker_id: i64 => "brokerId",
        /// How long the name server keeps the broker without a new registration.
        pub heartbeat_timeout_millis: Option<i64> => "heartbeatTimeoutMillis",
        /// Whether the body is compressed (ferromq never compresses).
        pub compressed: bool => "compressed",
        /// CRC32 of the body (0 = unchecked).
        pub body_crc32: Option<i32> => "bodyCrc32",
    }
}

ext_header! {
    /// Answer to REGISTER_BROKER: how a slave finds its master.
    pub struct RegisterBrokerResponseHeader {
        /// Master's HA address, if a master is registered.
        pub ha_server_addr: Option<String> => "haServerAddr",
        /// Master's address, if a master is registered.
        pub master_addr: Option<String> => "masterAddr",
    }
}

ext_header! {
    /// UNREGISTER_BROKER request.
    pub struct UnregisterBrokerRequestHeader {
        /// Group name.
        pub broker_name: String => "brokerName",
        /// Broker address.
        pub broker_addr: String => "brokerAddr",
        /// Cluster name.
        pub cluster_name: String => "clusterName",
        /// Broker id.
        pub broker_id: i64 => "brokerId",
    }
}

ext_header! {
    /// WIPE_WRITE_PERM_OF_BROKER request (to a name server).
    pub struct WipeWritePermRequestHeader {
        /// Group to make read-only.
        pub broker_name: String => "brokerName",
    }
}

ext_header! {
    /// QUERY_MESSAGE request: messages of a topic by key, stored within a time range.
    pub struct QueryMessageRequestHeader {
        /// Topic of the messages.
        pub topic: String => "topic",
        /// A key (`KEYS`) or, with `_UNIQUE_KEY_QUERY`, a client message id (`UNIQ_KEY`).
        pub key: String => "key",
        /// Most messages wanted.
        pub max_num: i32 => "maxNum",
        /// Earliest store time (ms).
        pub begin_timestamp: i64 => "beginTimestamp",
        /// Latest store time (ms).
        pub end_timestamp: i64 => "endTimestamp",
        /// RocketMQ 5's kind of key: "K" (a key), "U" (a client message id), "T" (a tag).
        pub index_type: Option<String> => "indexType",
        /// "true" when `key` is a client message id (Java's `_UNIQUE_KEY_QUERY`).
        pub unique_key_query: Option<String> => "_UNIQUE_KEY_QUERY",
    }
}

ext_header! {
    /// QUERY_MESSAGE response: how far the broker's key index reaches.
    pub struct QueryMessageResponseHeader {
        /// Store time of the newest indexed key (ms).
        pub index_last_update_timestamp: i64 => "indexLastUpdateTimestamp",
        /// Commit-log offset before which every message is indexed.
        pub index_last_update_phyoffset: i64 => "indexLastUpdatePhyoffset",
    }
}

ext_header! {
    /// VIEW_MESSAGE_BY_ID request.
    pub struct ViewMessageRequestHeader {
        /// Commit-log offset of the message.
        pub offset: i64 => "offset",
    }
}

ext_header! {
    /// PUSH_REPLY_MESSAGE_TO_CLIENT request: a reply as the requesting producer reads it
    /// (Java's ReplyMessageRequestHeader).
    pub struct ReplyMessageRequestHeader {
        /// Producer group of the replier.
        pub producer_group: String => "producerGroup",
        /// The reply topic.
        pub topic: String => "topic",
        /// The replier's template topic.
        pub default_topic: String => "defaultTopic",
        /// The replier's queue count for auto-created topics.
        pub default_topic_queue_nums: i32 => "defaultTopicQueueNums",
        /// Queue the replier sent to.
        pub queue_id: i32 => "queueId",
        /// The reply's sysFlag (compression).
        pub sys_flag: i32 => "sysFlag",
        /// When the replier made the reply (ms).
        pub born_timestamp: i64 => "bornTimestamp",
        /// User flag.
        pub flag: i32 => "flag",
        /// The reply's encoded properties, with the push time.
        pub properties: Option<String> => "properties",
        /// As the replier sent it.
        pub reconsume_times: Option<i32> => "reconsumeTimes",
        /// As the replier sent it.
        pub unit_mode: bool => "unitMode",
        /// The replier's address, `ip:port`.
        pub born_host: String => "bornHost",
        /// This broker's address, `ip:port`.
        pub store_host: String => "storeHost",
        /// When the broker pushed the reply (ms).
        pub store_timestamp: i64 => "storeTimestamp",
    }
}

ext_header! {
    /// GET_CONSUMER_RUNNING_INFO and CONSUME_MESSAGE_DIRECTLY: the consumer client an admin
    /// tool's request is for (the rest of the header goes to the client as it came).
    pub struct ConsumerClientRequestHeader {
        /// The client's consumer group.
        pub consumer_group: String => "consumerGroup",
        /// The client's id.
        pub client_id: String => "clientId",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(pairs: &[(&str, &str)]) -> ExtFields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn v2_short_keys_read_as_the_long_header() {
        let v2 = ext(&[
            ("a", "pg"),
            ("b", "T"),
            ("e", "3"),
            ("k", "false"),
            ("m", "1"),
        ]);
        let h = SendMessageRequestHeader::from_v2(&v2).unwrap();
        assert_eq!(h.producer_group, "pg");
        assert_eq!(h.topic, "T");
        assert_eq!(h.queue_id, Some(3));
        assert!(h.batch);
        // Writing the short keys back gives one-letter keys only, and the long form reads the same.
        let back = h.to_v2();
        assert_eq!(back.get("b"), Some("T"));
        assert!(back.iter().all(|(k, _)| k.len() == 1));
        let long: ExtFields = back
            .iter()
            .map(|(k, v)| {
                let long = SEND_V2_KEYS.iter().find(|(s, _)| *s == k).map(|(_, l)| *l);
                (long.unwrap_or(k), v)
            })
            .collect();
        assert_eq!(SendMessageRequestHeader::from_ext(&long).unwrap(), h);
        assert!(matches!(
            SendMessageRequestHeader::from_v2(&ext(&[("a", "pg")])),
            Err(HeaderError::Missing("b"))
        ));
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = QueueRequestHeader::from_ext(&ext(&[("topic", "T")])).unwrap_err();
        assert_eq!(err, HeaderError::Missing("queueId"));
        assert!(err.to_string().contains("queueId"));
    }

    #[test]
    fn numbers_tolerate_spaces_and_bad_numbers_are_named() {
        let h = QueueRequestHeader::from_ext(&ext(&[("topic", "T"), ("queueId", " 7 ")])).unwrap();
        assert_eq!(h.queue_id, 7);
        let err = QueueRequestHeader::from_ext(&ext(&[("topic", "T"), ("queueId", "seven")]))
            .unwrap_err();
        assert!(matches!(err, HeaderError::Invalid { key: "queueId", .. }));
    }

    #[test]
    fn optional_numbers_may_be_empty_and_booleans_may_be_digits() {
        let h = PullMessageRequestHeader::from_ext(&ext(&[
            ("consumerGroup", "g"),
            ("topic", "T"),
            ("queueId", "0"),
            ("queueOffset", "0"),
            ("maxMsgNums", "32"),
            ("sysFlag", "2"),
            ("commitOffset", ""),
            ("expressionType", ""),
        ]))
        .unwrap();
        assert_eq!(h.commit_offset, None);
        assert_eq!(h.expression_type.as_deref(), Some(""));
        let c = ConsumerSendMsgBackRequestHeader::from_ext(&ext(&[
            ("offset", "1"),
            ("group", "g"),
            ("delayLevel", "0"),
            ("unitMode", "1"),
        ]))
        .unwrap();
        assert!(c.unit_mode);
        let base = [("offset", "1"), ("group", "g"), ("delayLevel", "0")];
        let absent = ConsumerSendMsgBackRequestHeader::from_ext(&ext(&base)).unwrap();
        assert!(!absent.unit_mode, "a missing boolean is false");
        assert_eq!(absent.max_reconsume_times, None);
        let bad = ConsumerSendMsgBackRequestHeader::from_ext(&ext(&[
            ("offset", "1"),
            ("group", "g"),
            ("delayLevel", "0"),
            ("unitMode", " maybe "),
        ]))
        .unwrap_err();
        assert_eq!(
            bad,
            HeaderError::Invalid {
                key: "unitMode",
                value: "maybe".into(),
                expected: "boolean"
            }
        );
    }
}
