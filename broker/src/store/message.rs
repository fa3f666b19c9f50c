//! The stored message format (what the commit log holds and PULL bodies carry, back to back),
//! message properties, and batch bodies as producers send them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Magic of a stored message whose topic length is one byte.
pub const MAGIC_V1: i32 = 0xDAA320A7_u32 as i32;
/// Magic of a stored message whose topic length is two bytes.
pub const MAGIC_V2: i32 = 0xDAA320AB_u32 as i32;
/// Magic of the filler at the end of a commit-log segment.
pub const BLANK_MAGIC: i32 = 0xCBD43194_u32 as i32;

/// sysFlag bit: the born host is IPv6.
pub const FLAG_BORN_V6: i32 = 0x10;
/// sysFlag bit: the store host is IPv6.
pub const FLAG_STORE_V6: i32 = 0x20;
/// sysFlag bit: tags hold several values.
pub const FLAG_MULTI_TAGS: i32 = 0x2;

/// Offset of `queueOffset` within a stored message.
pub const POS_QUEUE_OFFSET: usize = 20;
/// Offset of `physicalOffset` within a stored message.
pub const POS_PHYSICAL_OFFSET: usize = 28;
/// Offset of `sysFlag` within a stored message.
pub const POS_SYS_FLAG: usize = 36;
/// Offset of `storeTimestamp` within a stored message whose born host is IPv4 (12 bytes later
/// when it is IPv6).
pub const POS_STORE_TIMESTAMP_V4: usize = 56;

/// Property key of the message tags.
pub const PROP_TAGS: &str = "TAGS";
/// Property key of the message keys (space separated).
pub const PROP_KEYS: &str = "KEYS";
/// Property key of the client-generated unique id.
pub const PROP_UNIQ_KEY: &str = "UNIQ_KEY";
/// Property key of the topic a retried message came from.
pub const PROP_RETRY_TOPIC: &str = "RETRY_TOPIC";
/// The cluster of the broker that stored a message sent to it (a reply names its topic).
pub const PROP_CLUSTER: &str = "CLUSTER";
/// Property key of the original message id of a retried message.
pub const PROP_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
/// Property key of the delay level requested.
pub const PROP_DELAY: &str = "DELAY";
/// Property key recording how many times a message was reconsumed.
pub const PROP_RECONSUME_TIME: &str = "RECONSUME_TIME";
/// Property key of the retry limit.
pub const PROP_MAX_RECONSUME_TIMES: &str = "MAX_RECONSUME_TIMES";
/// Property: "true" on the half message of a transactional send.
pub const PROP_TRANSACTION_PREPARED: &str = "TRAN_MSG";
/// sysFlag bits of a message's transaction type, and the types (Java's MessageSysFlag).
pub const TX_MASK: i32 = 0xC;
/// A committed transactional message.
pub const TX_COMMIT: i32 = 0x8;
/// A rolled-back transactional message.
pub const TX_ROLLBACK: i32 = 0xC;

/// The internal topic holding delayed messages until they are due.
pub const SCHEDULE_TOPIC: &str = "SCHEDULE_TOPIC_XXXX";
/// Topic where timer messages (RocketMQ 5's delivery at any time) wait, queue 0, with their
/// delivery time as the consume-queue tag code.
pub const TIMER_TOPIC: &str = "rmq_sys_wheel_timer";
/// Property: when a timer message is due (ms since the epoch), set by the broker.
pub const PROP_TIMER_OUT_MS: &str = "TIMER_OUT_MS";

/// Delay of each level, 1-based: `messageDelayLevel`'s default (1s 5s 10s 30s 1m ... 2h).
pub const DELAY_LEVELS_MS: [i64; 18] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000,
    480_000, 540_000, 600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];

const NAME_SEP: char = '\u{1}';
const PROP_SEP: char = '\u{2}';

/// Why stored or batch bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The bytes end inside a message.
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    /// The magic word is not a message magic.
    #[error("bad message magic {0:#x}")]
    BadMagic(i32),
    /// The body does not match its CRC.
    #[error("body CRC mismatch")]
    BadCrc,
    /// A length field is out of range.
    #[error("invalid {0} length")]
    BadLength(&'static str),
    /// Text is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// Message properties in wire order-insensitive form.
pub type Properties = BTreeMap<String, String>;

/// Parses `key\u0001value\u0002...`; malformed pairs are skipped, as Java does.
pub fn parse_properties(s: &str) -> Properties {
    s.split(PROP_SEP)
        .filter_map(|kv| kv.split_once(NAME_SEP))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One property of an encoded properties string, without building the map (sends and queue
/// dispatch need only the tags or the delay). As with [`parse_properties`], a repeated key's
/// last value wins.
pub fn property<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    // Each pair's start is tested for `key` and the separator: this runs for every message
    // sent, and searching each pair for its separator cost twice as much.
    s.split(PROP_SEP)
        .filter_map(|kv| kv.strip_prefix(key)?.strip_prefix(NAME_SEP))
        .next_back()
}

/// Sets one property of an encoded properties string (the broker's own, such as `CLUSTER`)
/// without parsing and re-encoding the others, which it keeps as they are.
pub fn set_property(s: &mut String, key: &str, value: &str) {
    // Most messages do not carry the key yet: one substring search tells.
    if s.contains(key) {
        if property(s, key) == Some(value) {
            return;
        }
        // Earlier values of the key go: a message passed on keeps one.
        let kept: Vec<&str> = s
            .split(PROP_SEP)
            .filter(|kv| !kv.is_empty() && kv.split_once(NAME_SEP).is_none_or(|(k, _)| k != key))
            .collect();
        let mut rest = String::with_capacity(s.len() + value.len() + 2);
        for kv in kept {
            rest.push_str(kv);
            rest.push(PROP_SEP);
        }
        *s = rest;
    }
    if !s.is_empty() && !s.ends_with(PROP_SEP) {
        s.push(PROP_SEP);
    }
    s.reserve(key.len() + value.len() + 2);
    s.push_str(key);
    s.push(NAME_SEP);
    s.push_str(value);
    s.push(PROP_SEP);
}

/// Encodes properties as `key\u0001value\u0002...`.
pub fn format_properties(p: &Properties) -> String {
    let mut s = String::new();
    for (k, v) in p {
        s.push_str(k);
        s.push(NAME_SEP);
        s.push_str(v);
        s.push(PROP_SEP);
    }
    s
}

/// Java's `String.hashCode`, which RocketMQ uses as the tag code in consume queues.
pub fn tag_hash(tag: &str) -> i64 {
    let mut h: i32 = 0;
    for unit in tag.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(i32::from(unit));
    }
    i64::from(h)
}

/// A message about to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Topic.
    pub topic: String,
    /// Queue within the topic.
    pub queue_id: i32,
    /// User flag.
    pub flag: i32,
    /// Payload.
    pub body: Bytes,
    /// Encoded properties string.
    pub properties: String,
    /// sysFlag bits (host-address bits are set by the encoder).
    pub sys_flag: i32,
    /// Producer-side creation time, ms.
    pub born_timestamp: i64,
    /// Producer address.
    pub born_host: SocketAddr,
    /// Delivery attempts so far.
    pub reconsume_times: i32,
    /// Tag code for the consume queue.
    pub tags_code: i64,
}

impl NewMessage {
    /// A stored message stored again by the broker itself (moved when due, retried, copied),
    /// in `topic`/`queue_id` with `properties`; its host-address flags are the encoder's to set.
    pub fn restored(
        m: &StoredMessage,
        topic: String,
        queue_id: i32,
        properties: String,
    ) -> NewMessage {
        NewMessage {
            topic,
            queue_id,
            flag: m.flag,
            body: m.body.clone(),
            tags_code: NewMessage::tags_code_of(&properties),
            properties,
            sys_flag: m.sys_flag & !(FLAG_BORN_V6 | FLAG_STORE_V6),
            born_timestamp: m.born_timestamp,
            born_host: m.born_host,
            reconsume_times: m.reconsume_times,
        }
    }

    /// Tag code of an encoded properties string (0 when untagged).
    pub fn tags_code_of(properties: &str) -> i64 {
        property(properties, PROP_TAGS).map_or(0, tag_hash)
    }

    /// Bytes the message takes in the commit log.
    pub fn stored_len(&self, store_host: &SocketAddr) -> usize {
        let born = if self.born_host.is_ipv6() { 20 } else { 8 };
        let store = if store_host.is_ipv6() { 20 } else { 8 };
        let topic_len_bytes = if self.topic.len() > 255 { 2 } else { 1 };
        4 + 4
            + 4
            + 4
            + 4
            + 8
            + 8
            + 4
            + 8
            + born
            + 8
            + store
            + 4
            + 8
            + 4
            + self.body.len()
            + topic_len_bytes
            + self.topic.len()
            + 2
            + self.properties.len()
    }

    /// Appends the stored form to `dst`.
    pub fn encode(
        &self,
        dst: &mut BytesMut,
        queue_offset: i64,
        physical_offset: i64,
        store_timestamp: i64,
        store_host: &SocketAddr,
    ) {
        let total = self.stored_len(store_host);
        let mut sys_flag = self.sys_flag & !(FLAG_BORN_V6 | FLAG_STORE_V6);
        if self.born_host.is_ipv6() {
            sys_flag |= FLAG_BORN_V6;
        }
        if store_host.is_ipv6() {
            sys_flag |= FLAG_STORE_V6;
        }
        dst.reserve(total);
        dst.put_i32(total as i32);
        dst.put_i32(if self.topic.len() > 255 {
            MAGIC_V2
        } else {
            MAGIC_V1
        });
        dst.put_i32(body_crc(&self.body));
        dst.put_i32(self.queue_id);
        dst.put_i32(self.flag);
        dst.put_i64(queue_offset);
        dst.put_i64(physical_offset);
        dst.put_i32(sys_flag);
        dst.put_i64(self.born_timestamp);
        put_host(dst, &self.born_host);
        dst.put_i64(store_timestamp);
        put_host(dst, store_host);
        dst.put_i32(self.reconsume_times);
        dst.put_i64(0); // prepared transaction offset
        dst.put_i32(self.body.len() as i32);
        dst.put_slice(&self.body);
        if self.topic.len() > 255 {
            dst.put_u16(self.topic.len() as u16);
        } else {
            dst.put_u8(self.topic.len() as u8);
        }
        dst.put_slice(self.topic.as_bytes());
        dst.put_i16(self.properties.len() as i16);
        dst.put_slice(self.properties.as_bytes());
    }
}

fn put_host(dst: &mut impl BufMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => dst.put_slice(&ip.octets()),
        IpAddr::V6(ip) => dst.put_slice(&ip.octets()),
    }
    dst.put_i32(i32::from(addr.port()));
}

/// A stored message, decoded; owned or borrowed, as the reader needs.
///
/// Owned ([`StoredMessage`]) for readers that keep it, borrowed from the bytes it was read
/// from ([`StoredRef`]) for indexing, which keeps nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<B, S> {
    /// Bytes the message takes in the commit log.
    pub total_size: i32,
    /// Queue within the topic.
    pub queue_id: i32,
    /// User flag.
    pub flag: i32,
    /// Position in its consume queue.
    pub queue_offset: i64,
    /// Position in the commit log.
    pub physical_offset: i64,
    /// sysFlag bits.
    pub sys_flag: i32,
    /// Producer-side creation time, ms.
    pub born_timestamp: i64,
    /// Producer address.
    pub born_host: SocketAddr,
    /// Broker-side store time, ms.
    pub store_timestamp: i64,
    /// Broker address.
    pub store_host: SocketAddr,
    /// Delivery attempts so far.
    pub reconsume_times: i32,
    /// Payload.
    pub body: B,
    /// Topic.
    pub topic: S,
    /// Encoded properties.
    pub properties: S,
}

/// A stored message that owns its parts: what pulls, lookups and clients hand on.
pub type StoredMessage = Stored<Bytes, String>;

/// A stored message borrowed from a buffer: what indexing (replication, recovery) reads.
pub type StoredRef<'a> = Stored<&'a [u8], &'a str>;

impl<B, S: AsRef<str>> Stored<B, S> {
    /// The consume-queue tag code, by which consumers filter and the scheduler waits.
    ///
    /// The tag hash, or for a delayed message its delivery time by the broker's delay levels,
    /// and for a timer message the time it is due (so the schedulers never read messages that
    /// are not due).
    pub fn queue_tags_code(&self, delay_levels_ms: &[i64]) -> i64 {
        let properties = self.properties.as_ref();
        if self.topic.as_ref() == TIMER_TOPIC {
            return property(properties, PROP_TIMER_OUT_MS)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
        }
        if self.topic.as_ref() == SCHEDULE_TOPIC {
            let level: usize = property(properties, PROP_DELAY)
                .and_then(|l| l.parse().ok())
                .unwrap_or(1);
            let idx = level.clamp(1, delay_levels_ms.len().max(1)) - 1;
            return self.store_timestamp + delay_levels_ms.get(idx).copied().unwrap_or(0);
        }
        property(properties, PROP_TAGS).map_or(0, tag_hash)
    }

    /// The same message with its body and strings converted (borrowed to owned).
    fn map<B2, S2>(self, body: impl FnOnce(B) -> B2, text: impl Fn(S) -> S2) -> Stored<B2, S2> {
        Stored {
            total_size: self.total_size,
            queue_id: self.queue_id,
            flag: self.flag,
            queue_offset: self.queue_offset,
            physical_offset: self.physical_offset,
            sys_flag: self.sys_flag,
            born_timestamp: self.born_timestamp,
            born_host: self.born_host,
            store_timestamp: self.store_timestamp,
            store_host: self.store_host,
            reconsume_times: self.reconsume_times,
            body: body(self.body),
            topic: text(self.topic),
            properties: text(self.properties),
        }
    }
}

impl StoredMessage {
    /// Properties as a map.
    pub fn properties_map(&self) -> Properties {
        parse_properties(&self.properties)
    }

    /// Offset message id: store host, port and commit-log offset in hex, as clients expect.
    pub fn offset_msg_id(&self) -> String {
        offset_msg_id(&self.store_host, self.physical_offset)
    }
}

/// Offset message id of a commit-log offset on a store host.
pub fn offset_msg_id(store_host: &SocketAddr, physical_offset: i64) -> String {
    // An IPv6 host, its port and the offset: 28 bytes at most, built on the stack.
    let mut raw = [0u8; 28];
    let mut rest = &mut raw[..];
    put_host(&mut rest, store_host);
    rest.put_i64(physical_offset);
    let unused = rest.len();
    hex_upper(&raw[..raw.len() - unused])
}

/// RocketMQ's CRC32 of a body (BODYCRC, REGISTER_BROKER's bodyCrc32): the IEEE CRC32 with
/// the top bit cleared, as Java's `UtilAll.crc32` computes it.
pub fn body_crc(body: &[u8]) -> i32 {
    masked_crc(crc32fast::hash(body))
}

/// Java's `UtilAll.crc32` form of a CRC32: the top bit cleared.
fn masked_crc(crc: u32) -> i32 {
    (crc & 0x7FFF_FFFF) as i32
}

/// Upper-case hex of `bytes`, the spelling of RocketMQ message ids (without `format!`, which
/// cost a visible share of every send).
pub fn hex_upper(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        s.push(char::from(HEX[usize::from(byte >> 4)]));
        s.push(char::from(HEX[usize::from(byte & 0xF)]));
    }
    s
}

/// Commit-log offset inside an offset message id, if it parses as one.
pub fn parse_offset_msg_id(id: &str) -> Option<i64> {
    if (id.len() != 32 && id.len() != 56) || !id.is_ascii() {
        return None;
    }
    let tail = &id[id.len() - 16..];
    u64::from_str_radix(tail, 16).ok().map(|v| v as i64)
}

fn need(buf: &impl Buf, n: usize, what: &'static str) -> Result<(), MessageError> {
    if buf.remaining() < n {
        Err(MessageError::Truncated(what))
    } else {
        Ok(())
    }
}

fn get_host(buf: &mut &[u8], v6: bool, what: &'static str) -> Result<SocketAddr, MessageError> {
    let ip = if v6 {
        need(buf, 20, what)?;
        let mut o = [0u8; 16];
        buf.copy_to_slice(&mut o);
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        need(buf, 8, what)?;
        let mut o = [0u8; 4];
        buf.copy_to_slice(&mut o);
        IpAddr::V4(Ipv4Addr::from(o))
    };
    let port = buf.get_i32();
    Ok(SocketAddr::new(ip, port as u16))
}

fn get_str<'a>(
    buf: &mut &'a [u8],
    len: usize,
    what: &'static str,
) -> Result<&'a str, MessageError> {
    need(buf, len, what)?;
    let (text, rest) = buf.split_at(len);
    *buf = rest;
    std::str::from_utf8(text).map_err(|_| MessageError::NotUtf8(what))
}

/// Decodes one stored message from the start of `buf`, checking its structure and body CRC.
pub fn decode_stored(buf: &Bytes) -> Result<StoredMessage, MessageError> {
    Ok(parse_stored(buf)?.map(|body| buf.slice_ref(body), str::to_owned))
}

/// Reads one stored message in place, checked like [`decode_stored`] but with nothing copied.
pub fn parse_stored(buf: &[u8]) -> Result<StoredRef<'_>, MessageError> {
    parse_stored_checking(buf, true)
}

/// Reads one stored message in place without checking its body CRC: indexing a slave's
/// replicated log reads no bodies, and indexes what its master indexed, as Java's reput
/// service does (it checks no CRC either).
pub fn parse_stored_for_index(buf: &[u8]) -> Result<StoredRef<'_>, MessageError> {
    parse_stored_checking(buf, false)
}

fn parse_stored_checking(buf: &[u8], check_crc: bool) -> Result<StoredRef<'_>, MessageError> {
    let mut b = buf;
    need(&b, 8, "header")?;
    let total_size = b.get_i32();
    let magic = b.get_i32();
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return Err(MessageError::BadMagic(magic));
    }
    if total_size < 8 || total_size as usize > buf.len() {
        return Err(MessageError::BadLength("total"));
    }
    let mut b = &buf[8..total_size as usize];
    need(&b, 4 + 4 + 4 + 8 + 8 + 4 + 8, "fixed fields")?;
    let stored_crc = b.get_i32();
    let queue_id = b.get_i32();
    let flag = b.get_i32();
    let queue_offset = b.get_i64();
    let physical_offset = b.get_i64();
    let sys_flag = b.get_i32();
    let born_timestamp = b.get_i64();
    let born_host = get_host(&mut b, sys_flag & FLAG_BORN_V6 != 0, "born host")?;
    need(&b, 8, "store timestamp")?;
    let store_timestamp = b.get_i64();
    let store_host = get_host(&mut b, sys_flag & FLAG_STORE_V6 != 0, "store host")?;
    need(&b, 4 + 8 + 4, "reconsume fields")?;
    let reconsume_times = b.get_i32();
    let _prepared = b.get_i64();
    let body_len = b.get_i32();
    if body_len < 0 || body_len as usize > b.remaining() {
        return Err(MessageError::BadLength("body"));
    }
    let (body, rest) = b.split_at(body_len as usize);
    b = rest;
    if check_crc {
        // Stores written before ferromq masked the top bit hold the plain CRC32: accept both.
        let crc = crc32fast::hash(body);
        if stored_crc != masked_crc(crc) && stored_crc != crc as i32 {
            return Err(MessageError::BadCrc);
        }
    }
    let topic_len = if magic == MAGIC_V2 {
        need(&b, 2, "topic length")?;
        b.get_u16() as usize
    } else {
        need(&b, 1, "topic length")?;
        b.get_u8() as usize
    };
    let topic = get_str(&mut b, topic_len, "topic")?;
    need(&b, 2, "properties length")?;
    let prop_len = b.get_i16();
    if prop_len < 0 {
        return Err(MessageError::BadLength("properties"));
    }
    let properties = get_str(&mut b, prop_len as usize, "properties")?;
    if b.has_remaining() {
        return Err(MessageError::BadLength("total"));
    }
    Ok(Stored {
        total_size,
        queue_id,
        flag,
        queue_offset,
        physical_offset,
        sys_flag,
        born_timestamp,
        born_host,
        store_timestamp,
        store_host,
        reconsume_times,
        body,
        topic,
        properties,
    })
}

/// One message of a batch body.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// User flag.
    pub flag: i32,
    /// Payload.
    pub body: Bytes,
    /// Encoded properties.
    pub properties: String,
}

/// Splits a SEND_BATCH_MESSAGE body into its messages.
pub fn decode_batch(body: &Bytes) -> Result<Vec<BatchItem>, MessageError> {
    let mut out = Vec::new();
    let mut b = body.clone();
    while b.has_remaining() {
        need(&b, 20, "batch item header")?;
        let total = b.get_i32();
        let _magic = b.get_i32();
        let _crc = b.get_i32();
        let flag = b.get_i32();
        let body_len = b.get_i32();
        if total < 22 || body_len < 0 || body_len as usize > b.remaining() {
            return Err(MessageError::BadLength("batch item"));
        }
        let item_body = b.split_to(body_len as usize);
        need(&b, 2, "batch properties length")?;
        let prop_len = b.get_i16();
        if prop_len < 0 {
            return Err(MessageError::BadLength("batch properties"));
        }
        let mut rest = b.chunk();
        let properties = get_str(&mut rest, prop_len as usize, "batch properties")?.to_owned();
        b.advance(prop_len as usize);
        if total as usize != 20 + body_len as usize + 2 + prop_len as usize {
            return Err(MessageError::BadLength("batch item total"));
        }
        out.push(BatchItem {
            flag,
            body: item_body,
            properties,
        });
    }
    Ok(out)
}

/// Encodes messages as a SEND_BATCH_MESSAGE body.
pub fn encode_batch(items: &[BatchItem]) -> Bytes {
    let mut b = BytesMut::new();
    for it in items {
        let total = 20 + it.body.len() + 2 + it.properties.len();
        b.put_i32(total as i32);
        b.put_i32(0);
        b.put_i32(body_crc(&it.body));
        b.put_i32(it.flag);
        b.put_i32(it.body.len() as i32);
        b.put_slice(&it.body);
        b.put_i16(it.properties.len() as i16);
        b.put_slice(it.properties.as_bytes());
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(topic: &str) -> NewMessage {
        let mut props = Properties::new();
        props.insert(PROP_TAGS.into(), "TagA".into());
        props.insert(PROP_KEYS.into(), "k1 k2".into());
        props.insert("color".into(), "blue".into());
        NewMessage {
            topic: topic.into(),
            queue_id: 3,
            flag: 7,
            body: Bytes::from_static(b"hello"),
            properties: format_properties(&props),
            sys_flag: 0,
            born_timestamp: 1_700_000_000_000,
            born_host: "10.1.2.3:5555".parse().unwrap(),
            reconsume_times: 2,
            tags_code: tag_hash("TagA"),
        }
    }

    #[test]
    fn a_set_property_keeps_the_others_and_leaves_one_value() {
        let mut s = String::from("a\u{1}1\u{2}");
        set_property(&mut s, "CLUSTER", "C");
        assert_eq!(s, "a\u{1}1\u{2}CLUSTER\u{1}C\u{2}");
        set_property(&mut s, "CLUSTER", "C");
        assert_eq!(s, "a\u{1}1\u{2}CLUSTER\u{1}C\u{2}", "already so");
        let mut s = String::from("CLUSTER\u{1}Old\u{2}b\u{1}CLUSTERS\u{2}CLUSTER\u{1}X");
        set_property(&mut s, "CLUSTER", "C");
        assert_eq!(s, "b\u{1}CLUSTERS\u{2}CLUSTER\u{1}C\u{2}");
        let mut s = String::from("no-separator-at-end\u{1}v");
        set_property(&mut s, "k", "v");
        assert_eq!(parse_properties(&s)["k"], "v");
        assert_eq!(parse_properties(&s)["no-separator-at-end"], "v");
    }

    #[test]
    fn property_reads_one_key_like_the_parsed_map() {
        let s = "TAGS\u{1}A\u{2}KEYS\u{1}k1 k2\u{2}junk\u{2}TAGS\u{1}B\u{2}";
        assert_eq!(property(s, PROP_TAGS), Some("B"));
        assert_eq!(
            property(s, PROP_TAGS),
            parse_properties(s).get(PROP_TAGS).map(String::as_str)
        );
        assert_eq!(property(s, PROP_KEYS), Some("k1 k2"));
        assert_eq!(property(s, "junk"), None);
        assert_eq!(property("", PROP_TAGS), None);
        assert_eq!(NewMessage::tags_code_of(s), tag_hash("B"));
        for s in [
            "TAGSX\u{1}1\u{2}",
            "XTAGS\u{1}1\u{2}TAGS",
            "TAGS\u{1}a\u{1}b\u{2}",
            "TAGS\u{1}\u{2}",
            "KEYS\u{1}k\u{2}TAGS\u{1}t",
        ] {
            assert_eq!(
                property(s, PROP_TAGS),
                parse_properties(s).get(PROP_TAGS).map(String::as_str),
                "{s:?}"
            );
        }
    }

    #[test]
    fn stored_message_round_trips() {
        let store: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let m = sample("TopicTest");
        let mut b = BytesMut::new();
        m.encode(&mut b, 42, 4096, 1_700_000_000_123, &store);
        assert_eq!(b.len(), m.stored_len(&store));
        let d = decode_stored(&b.freeze()).unwrap();
        assert_eq!(d.topic, "TopicTest");
        assert_eq!(d.queue_offset, 42);
        assert_eq!(d.physical_offset, 4096);
        assert_eq!(d.body, m.body);
        assert_eq!(d.born_host, m.born_host);
        assert_eq!(d.store_host, store);
        assert_eq!(
            d.properties_map().get("color").map(String::as_str),
            Some("blue")
        );
        assert_eq!(parse_offset_msg_id(&d.offset_msg_id()), Some(4096));
        // 127.0.0.1:10911, then offset 4096, as Java spells it.
        assert_eq!(d.offset_msg_id(), "7F00000100002A9F0000000000001000");
    }

    #[test]
    fn the_borrowed_read_agrees_with_the_owned_one() {
        let store: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let mut b = BytesMut::new();
        sample("TopicTest").encode(&mut b, 42, 4096, 1_700_000_000_123, &store);
        let bytes = b.freeze();
        let borrowed = parse_stored(&bytes).unwrap();
        let owned = decode_stored(&bytes).unwrap();
        assert_eq!(
            borrowed.clone().map(Bytes::copy_from_slice, str::to_owned),
            owned
        );
        // The owned body is a view of the bytes read, not a copy.
        assert!(bytes.as_ptr_range().contains(&owned.body.as_ptr()));
        assert_eq!(borrowed.queue_tags_code(&DELAY_LEVELS_MS), tag_hash("TagA"));
        assert_eq!(owned.queue_tags_code(&DELAY_LEVELS_MS), tag_hash("TagA"));

        // A delayed message's code is its delivery time: store time plus its level's delay.
        let mut delayed = sample(SCHEDULE_TOPIC);
        delayed.properties = format!("{PROP_DELAY}\u{1}3\u{2}{PROP_TAGS}\u{1}TagA\u{2}");
        let mut b = BytesMut::new();
        delayed.encode(&mut b, 0, 0, 1_700_000_000_000, &store);
        assert_eq!(
            parse_stored(&b).unwrap().queue_tags_code(&DELAY_LEVELS_MS),
            1_700_000_000_000 + DELAY_LEVELS_MS[2]
        );
        // A truncated message is refused, not read past its end.
        assert_eq!(
            parse_stored(&bytes[..bytes.len() - 1]),
            Err(MessageError::BadLength("total"))
        );
    }

    #[test]
    fn hex_is_upper_case_and_two_digits_per_byte() {
        assert_eq!(hex_upper(&[0x00, 0x0F, 0xA0, 0xFF]), "000FA0FF");
        assert_eq!(hex_upper(&[]), "");
    }

    #[test]
    fn ipv6_hosts_and_long_topics_round_trip() {
        let store: SocketAddr = "[::1]:10911".parse().unwrap();
        let mut m = sample(&"t".repeat(300));
        m.born_host = "[fe80::1]:1234".parse().unwrap();
        let mut b = BytesMut::new();
        m.encode(&mut b, 0, 0, 0, &store);
        let d = decode_stored(&b.freeze()).unwrap();
        assert_eq!(d.topic.len(), 300);
        assert_eq!(d.born_host, m.born_host);
        assert_eq!(
            d.sys_flag & (FLAG_BORN_V6 | FLAG_STORE_V6),
            FLAG_BORN_V6 | FLAG_STORE_V6
        );
        // An IPv6 store host makes the longest message id: 16 + 4 + 8 bytes.
        let id = offset_msg_id(&store, 0x1234);
        assert_eq!(
            id,
            format!("{}00002A9F0000000000001234", "0".repeat(30) + "01")
        );
        assert_eq!(parse_offset_msg_id(&id), Some(0x1234));
        // What a user types is not trusted to be hex, or even ASCII.
        assert_eq!(parse_offset_msg_id(&"é".repeat(16)), None);
        assert_eq!(parse_offset_msg_id(&"x".repeat(32)), None);
    }

    #[test]
    fn corrupted_body_fails_the_crc() {
        let store: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut b = BytesMut::new();
        sample("T").encode(&mut b, 0, 0, 0, &store);
        let body_at = b.len() - 2 - sample("T").properties.len() - 2 - 5;
        b[body_at] ^= 0xFF;
        assert_eq!(decode_stored(&b.freeze()), Err(MessageError::BadCrc));
    }

    #[test]
    fn body_crc_is_javas_masked_crc32_and_old_stores_still_read() {
        // CRC32("123456789") = 0xCBF43926; Java's UtilAll.crc32 clears the top bit.
        assert_eq!(body_crc(b"123456789"), 0x4BF4_3926);
        let store: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut m = sample("T");
        m.body = Bytes::from_static(b"123456789");
        let mut b = BytesMut::new();
        m.encode(&mut b, 0, 0, 0, &store);
        assert_eq!(&b[8..12], &0x4BF4_3926i32.to_be_bytes());
        // A record written with the unmasked CRC (earlier ferromq stores) still decodes.
        b[8..12].copy_from_slice(&(0xCBF4_3926u32 as i32).to_be_bytes());
        assert!(decode_stored(&b.freeze()).is_ok());
    }

    #[test]
    fn tag_hash_matches_java_string_hash_code() {
        assert_eq!(tag_hash("TagA"), 2_598_919);
        assert_eq!(tag_hash(""), 0);
        // "polygenelubricants".hashCode() == Integer.MIN_VALUE in Java.
        assert_eq!(tag_hash("polygenelubricants"), i64::from(i32::MIN));
    }

    #[test]
    fn batch_bodies_round_trip_and_reject_bad_lengths() {
        let items = vec![
            BatchItem {
                flag: 0,
                body: Bytes::from_static(b"a"),
                properties: "k\u{1}v\u{2}".into(),
            },
            BatchItem {
                flag: 1,
                body: Bytes::from_static(b"bb"),
                properties: String::new(),
            },
        ];
        let body = encode_batch(&items);
        assert_eq!(decode_batch(&body).unwrap(), items);
        let mut bad = BytesMut::from(&body[..]);
        bad[19] = 100; // body length beyond the buffer
        assert!(decode_batch(&bad.freeze()).is_err());
    }

    proptest::proptest! {
        /// Bytes from a slave's master, a damaged disk or a client are never trusted: any
        /// change to a valid stored message or batch body, or any cut, decodes to an error
        /// or to a message, never a panic.
        #[test]
        fn damaged_messages_and_batches_never_panic(
            edits in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 0..6),
            cut in 0usize..400,
            fix_total: bool,
        ) {
            let store: SocketAddr = "[::1]:10911".parse().unwrap();
            let mut m = sample("TopicTest");
            m.sys_flag = FLAG_BORN_V6;
            m.born_host = "[fe80::1]:5555".parse().unwrap();
            let mut stored = BytesMut::new();
            m.encode(&mut stored, 42, 4096, 1_700_000_000_123, &store);
            let batch = encode_batch(&[
                BatchItem { flag: 1, body: m.body.clone(), properties: m.properties.clone() },
                BatchItem { flag: 2, body: Bytes::new(), properties: String::new() },
            ]);
            for original in [stored.freeze(), batch] {
                let mut bytes = BytesMut::from(&original[..]);
                for &(at, byte) in &edits {
                    if let Some(b) = bytes.get_mut(at % original.len()) {
                        *b = byte;
                    }
                }
                bytes.truncate(cut.min(bytes.len()));
                if fix_total && bytes.len() >= 4 {
                    // A cut whose length field agrees with it gets past the first check.
                    let len = bytes.len() as i32;
                    bytes[..4].copy_from_slice(&len.to_be_bytes());
                }
                let bytes = bytes.freeze();
                if let Ok(msg) = decode_stored(&bytes) {
                    let _ = (msg.properties_map(), msg.offset_msg_id());
                }
                let _ = parse_stored(&bytes);
                let _ = decode_batch(&bytes);
                let _ = crate::client::decode_messages(&bytes);
            }
        }
    }
}
