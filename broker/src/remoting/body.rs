//! JSON bodies of requests and responses (routes, cluster info, heartbeats, registrations),
//! with RocketMQ's field names. Decoding ignores unknown fields and tolerates missing ones.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::Scalar;

use crate::store::topics::{DataVersion, TopicConfig};

/// One broker group as routes list it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BrokerData {
    /// Cluster the group belongs to.
    pub cluster: String,
    /// Group name.
    pub broker_name: String,
    /// Addresses by brokerId (0 = master). Keys are decimal strings on the wire.
    pub broker_addrs: BTreeMap<i64, String>,
    /// Zone (unused, kept for clients that read it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone_name: Option<String>,
    /// RocketMQ 5 slave-acting-master mode; always false here, but some clients require the
    /// field.
    pub enable_acting_master: bool,
}

impl BrokerData {
    /// The master's address, if the master is registered.
    pub fn master_addr(&self) -> Option<&str> {
        self.broker_addrs.get(&0).map(String::as_str)
    }
}

/// A topic's queues on one broker group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QueueData {
    /// Group name.
    pub broker_name: String,
    /// Readable queues.
    pub read_queue_nums: i32,
    /// Writable queues.
    pub write_queue_nums: i32,
    /// Permission bits.
    pub perm: i32,
    /// Topic sysFlag.
    pub topic_sys_flag: i32,
}

/// Where a topic lives: GET_ROUTEINFO_BY_TOPIC's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopicRouteData {
    /// Order config (unused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_topic_conf: Option<String>,
    /// Queues per group.
    pub queue_datas: Vec<QueueData>,
    /// Groups holding the topic.
    pub broker_datas: Vec<BrokerData>,
    /// Filter servers (always empty).
    pub filter_server_table: BTreeMap<String, Vec<String>>,
}

/// GET_BROKER_CLUSTER_INFO's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterInfo {
    /// Groups by name.
    pub broker_addr_table: BTreeMap<String, BrokerData>,
    /// Group names by cluster.
    pub cluster_addr_table: BTreeMap<String, BTreeSet<String>>,
}

/// A list of topic names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopicList {
    /// Topic names.
    pub topic_list: BTreeSet<String>,
}

/// Topic configs with their version, as a broker registers them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TopicConfigWrapper {
    /// Topics by name.
    pub topic_config_table: BTreeMap<String, TopicConfig>,
    /// Version of the table.
    pub data_version: DataVersion,
}

/// REGISTER_BROKER's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RegisterBrokerBody {
    /// The broker's topics.
    pub topic_config_serialize_wrapper: TopicConfigWrapper,
    /// Filter servers (always empty).
    pub filter_server_list: Vec<String>,
}

/// One subscription of a consumer group, from its heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SubscriptionData {
    /// Topic.
    pub topic: String,
    /// Expression (`*` or `TagA || TagB`).
    pub sub_string: String,
    /// Tags of the expression.
    pub tags_set: BTreeSet<String>,
    /// Tag codes of the expression.
    #[serde(deserialize_with = "longs_or_text")]
    pub code_set: BTreeSet<i64>,
    /// Version of the subscription.
    #[serde(deserialize_with = "long_or_text")]
    pub sub_version: i64,
    /// TAG or SQL92.
    pub expression_type: Option<String>,
}

/// A consumer group as one client reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsumerData {
    /// Group name.
    pub group_name: String,
    /// CONSUME_ACTIVELY or CONSUME_PASSIVELY (name or ordinal).
    pub consume_type: serde_json::Value,
    /// CLUSTERING or BROADCASTING (name or ordinal).
    pub message_model: serde_json::Value,
    /// Where a new group starts (name or ordinal).
    pub consume_from_where: serde_json::Value,
    /// Subscriptions.
    pub subscription_data_set: Vec<SubscriptionData>,
    /// Unit mode (unused).
    pub unit_mode: bool,
}

/// A producer group as one client reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProducerData {
    /// Group name.
    pub group_name: String,
}

/// HEART_BEAT's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HeartbeatData {
    /// Client id.
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Producer groups of the client.
    pub producer_data_set: Vec<ProducerData>,
    /// Consumer groups of the client.
    pub consumer_data_set: Vec<ConsumerData>,
}

/// GET_CONSUMER_LIST_BY_GROUP's response body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsumerListBody {
    /// Client ids of the group's live consumers.
    pub consumer_id_list: Vec<String>,
}

/// A JSON long as Java clients write it (a number), as the C++ and Go clients write it (a
/// decimal string), or null (0), read through the header decoder's scalar.
fn long_of<E: serde::de::Error>(v: Scalar<'_>) -> Result<i64, E> {
    match v {
        Scalar::Int(n) => Ok(n),
        Scalar::Str(t) => t
            .trim()
            .parse()
            .map_err(|_| E::custom(format!("expected a long, found {t:?}"))),
        Scalar::Null => Ok(0),
        _ => Err(E::custom("expected a long")),
    }
}

fn long_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    long_of(Scalar::deserialize(d)?)
}

fn longs_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeSet<i64>, D::Error> {
    Option::<Vec<Scalar<'de>>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(long_of)
        .collect()
}

/// One queue of a topic on one broker group, as clients name it (Java's `MessageQueue`): the
/// key of orderly consumption's queue locks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MessageQueue {
    /// Topic.
    pub topic: String,
    /// Broker group holding the queue.
    pub broker_name: String,
    /// Queue number within the topic (a number, or a string holding one).
    #[serde(deserialize_with = "lenient_int")]
    pub queue_id: i32,
}

/// LOCK_BATCH_MQ's and UNLOCK_BATCH_MQ's body (Java's `LockBatchRequestBody` and
/// `UnlockBatchRequestBody`, which have the same fields). `onlyThisBroker` only matters to
/// Java's `lockInStrictMode`, which ferromq does not have, and is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QueueLockRequestBody {
    /// Consumer group the locks belong to.
    pub consumer_group: String,
    /// Client asking (holder of the locks it gets).
    pub client_id: String,
    /// Queues to lock or unlock.
    pub mq_set: Vec<MessageQueue>,
}

/// LOCK_BATCH_MQ's response body: the queues the client now holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockBatchResponseBody {
    /// Queues locked for the client (Java reads `lockOKMQSet`).
    #[serde(rename = "lockOKMQSet")]
    pub lock_ok_mq_set: Vec<MessageQueue>,
}

/// Reads a 32-bit integer written as a JSON number or as a string holding one, as fastjson
/// does.
fn lenient_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    use serde::de::Error;
    match Scalar::deserialize(d)? {
        Scalar::Null => Err(D::Error::custom("null is not an integer")),
        v => {
            let n = long_of::<D::Error>(v)?;
            i32::try_from(n).map_err(|_| D::Error::custom(format!("{n} is not a 32-bit integer")))
        }
    }
}

/// Parses a JSON body, tolerating unquoted integer map keys as fastjson writes them.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(first) => {
            let fixed = quote_bare_int_keys(body);
            serde_json::from_slice(&fixed).map_err(|_| first)
        }
    }
}

/// Rewrites `{0:"a",1:"b"}` as `{"0":"a","1":"b"}` outside strings.
fn quote_bare_int_keys(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            out.push(c);
            i += 1;
            continue;
        }
        if c == b'{' || c == b',' {
            out.push(c);
            i += 1;
            while i < body.len() && body[i].is_ascii_whitespace() {
                out.push(body[i]);
                i += 1;
            }
            let start = i;
            while i < body.len() && (body[i].is_ascii_digit() || body[i] == b'-') {
                i += 1;
            }
            if i > start && i < body.len() && body[i] == b':' {
                out.push(b'"');
                out.extend_from_slice(&body[start..i]);
                out.push(b'"');
            } else {
                out.extend_from_slice(&body[start..i]);
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Serializes a body as JSON.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Our body types hold only strings, numbers and maps with string-like keys.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_data_round_trips_with_quoted_broker_ids() {
        let mut bd = BrokerData {
            cluster: "c".into(),
            broker_name: "b".into(),
            ..Default::default()
        };
        bd.broker_addrs.insert(0, "127.0.0.1:10911".into());
        let r = TopicRouteData {
            broker_datas: vec![bd],
            ..Default::default()
        };
        let json = String::from_utf8(to_json(&r)).unwrap();
        assert!(
            json.contains(r#""brokerAddrs":{"0":"127.0.0.1:10911"}"#),
            "{json}"
        );
        assert_eq!(from_json::<TopicRouteData>(json.as_bytes()).unwrap(), r);
    }

    #[test]
    fn fastjson_bare_integer_keys_are_accepted() {
        let json = br#"{"brokerAddrTable":{"b":{"cluster":"c","brokerName":"b","brokerAddrs":{0:"x:1", 1:"y:2"}}},"clusterAddrTable":{"c":["b"]}}"#;
        let ci: ClusterInfo = from_json(json).unwrap();
        assert_eq!(ci.broker_addr_table["b"].broker_addrs[&1], "y:2");
    }

    #[test]
    fn lock_bodies_carry_the_field_names_java_reads_and_writes() {
        let resp = LockBatchResponseBody {
            lock_ok_mq_set: vec![MessageQueue {
                topic: "T".into(),
                broker_name: "broker-a".into(),
                queue_id: 3,
            }],
        };
        let json: serde_json::Value = serde_json::from_slice(&to_json(&resp)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"lockOKMQSet":[{"topic":"T","brokerName":"broker-a","queueId":3}]})
        );
        // As fastjson writes it: keys sorted, onlyThisBroker present, an int possibly quoted.
        let req: QueueLockRequestBody = from_json(
            br#"{"clientId":"10.0.0.1@1","consumerGroup":"G","mqSet":[{"brokerName":"broker-a","queueId":0,"topic":"T"},{"brokerName":"broker-a","queueId":"1","topic":"T"}],"onlyThisBroker":false}"#,
        )
        .unwrap();
        assert_eq!(
            (req.consumer_group.as_str(), req.client_id.as_str()),
            ("G", "10.0.0.1@1")
        );
        let ids: Vec<i32> = req.mq_set.iter().map(|q| q.queue_id).collect();
        assert_eq!(ids, [0, 1]);
        assert_eq!(req.mq_set[1].broker_name, "broker-a");
        for bad in [
            r#"{"mqSet":[{"queueId":"x"}]}"#,
            r#"{"mqSet":[{"queueId":4294967296}]}"#,
        ] {
            assert!(
                from_json::<QueueLockRequestBody>(bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn heartbeat_accepts_enum_names_or_ordinals_and_unknown_fields() {
        let json = br#"{"clientID":"c1","producerDataSet":[],"consumerDataSet":[{"groupName":"g","consumeType":1,"messageModel":"CLUSTERING","consumeFromWhere":"CONSUME_FROM_FIRST_OFFSET","subscriptionDataSet":[{"topic":"T","subString":"*","tagsSet":[],"codeSet":[],"subVersion":1,"expressionType":"TAG","classFilterMode":false}],"unitMode":false}],"heartbeatFingerprint":0}"#;
        let hb: HeartbeatData = from_json(json).unwrap();
        assert_eq!(hb.consumer_data_set[0].subscription_data_set[0].topic, "T");
    }

    #[test]
    fn heartbeat_longs_may_come_as_text_as_the_cpp_and_go_clients_send_them() {
        // rocketmq-client-cpp writes subVersion as a string; rocketmq-client-go quotes the
        // tag codes of codeSet.
        let json = br#"{"clientID":"c1","consumerDataSet":[{"groupName":"g","subscriptionDataSet":[{"topic":"T","subString":"A || B","tagsSet":["A","B"],"codeSet":["65","-66"],"subVersion":"1700000000000"},{"topic":"U","subString":"*","codeSet":null,"subVersion":null}]}]}"#;
        let hb: HeartbeatData = from_json(json).unwrap();
        let subs = &hb.consumer_data_set[0].subscription_data_set;
        assert_eq!(subs[0].sub_version, 1_700_000_000_000);
        assert_eq!(subs[0].code_set, BTreeSet::from([65, -66]));
        assert_eq!((subs[1].sub_version, subs[1].code_set.len()), (0, 0));
        let bad = br#"{"consumerDataSet":[{"subscriptionDataSet":[{"subVersion":"soon"}]}]}"#;
        let e = from_json::<HeartbeatData>(bad).unwrap_err().to_string();
        assert!(e.contains("expected a long"), "{e}");
    }
}
