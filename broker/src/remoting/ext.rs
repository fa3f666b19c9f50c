//! `ExtFields`: a command's header fields, kept in one text buffer.
//!
//! Every request and response carries ten to twenty short string fields. A map of owned
//! strings costs two allocations per field plus hashing, which was the largest single cost of
//! the send path on both ends of the wire. Here all keys and values of one command live back to
//! back in one `String`, indexed by a small vector of spans: two allocations per command. A
//! small open-addressing table inside the value finds a key in about one probe; scanning the
//! vector instead cost about a hundred instructions per lookup, and a send looks up some forty
//! keys (decoding checks each for a duplicate, the typed header reads each).

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Most fields a received header may carry. Real headers have about twenty; the limit keeps
/// decoding linear for a hostile frame (each field is checked against the earlier ones).
pub const MAX_FIELDS: usize = 256;

/// Byte range of one key or value inside the text buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// One field: a short hash of the key (so a lookup compares bytes only on a likely match),
/// and where its key and value sit in the buffer.
#[derive(Debug, Clone, Copy)]
struct Entry {
    tag: u32,
    key: Span,
    value: Span,
}

/// FNV-1a over the key: keys are a few bytes, so this is a handful of multiplications.
fn tag_of(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Slots of the lookup table: a power of two, above the twenty-odd fields of a send.
const SLOTS: usize = 32;

/// Most fields the table indexes (three quarters full); past this, lookups scan the entries.
/// Only hostile or unusual headers get there.
const INDEXED_MAX: usize = SLOTS * 3 / 4;

/// Header fields of a command (Java's `extFields`), in arrival or insertion order.
///
/// A key appears at most once: inserting an existing key replaces its value, as a map would.
#[derive(Clone)]
pub struct ExtFields {
    text: String,
    entries: Vec<Entry>,
    /// Open addressing by tag, linear probing: each slot holds an entry's index plus one, or 0
    /// when empty. Kept while there are at most `INDEXED_MAX` entries.
    slots: [u8; SLOTS],
}

impl Default for ExtFields {
    fn default() -> Self {
        ExtFields {
            text: String::new(),
            entries: Vec::new(),
            slots: [0; SLOTS],
        }
    }
}

impl ExtFields {
    /// An empty set of fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `fields` entries holding `text` bytes of keys and values together.
    pub fn with_capacity(fields: usize, text: usize) -> Self {
        ExtFields {
            text: String::with_capacity(text),
            entries: Vec::with_capacity(fields),
            slots: [0; SLOTS],
        }
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn str_at(&self, span: Span) -> &str {
        // Spans are only ever made at char boundaries of pushed `&str`s.
        &self.text[span.range()]
    }

    fn is_entry(&self, i: usize, tag: u32, key: &str) -> bool {
        let e = &self.entries[i];
        e.tag == tag && self.str_at(e.key) == key
    }

    fn position_tagged(&self, tag: u32, key: &str) -> Option<usize> {
        if self.entries.len() > INDEXED_MAX {
            return (0..self.entries.len()).find(|&i| self.is_entry(i, tag, key));
        }
        let mut slot = tag as usize % SLOTS;
        loop {
            // The table is never full, so an empty slot ends every probe.
            let i = usize::from(self.slots[slot]).checked_sub(1)?;
            if self.is_entry(i, tag, key) {
                return Some(i);
            }
            slot = (slot + 1) % SLOTS;
        }
    }

    /// Appends an entry for a key not present yet, and indexes it while the table has room.
    fn push_entry(&mut self, entry: Entry) {
        self.entries.push(entry);
        if self.entries.len() <= INDEXED_MAX {
            self.index(self.entries.len() - 1);
        }
    }

    /// Puts entry `i` (below `INDEXED_MAX`) into the first free slot of its probe sequence.
    fn index(&mut self, i: usize) {
        let mut slot = self.entries[i].tag as usize % SLOTS;
        while self.slots[slot] != 0 {
            slot = (slot + 1) % SLOTS;
        }
        // i < INDEXED_MAX < 255
        self.slots[slot] = (i + 1) as u8;
    }

    /// Indexes the entries afresh (after a removal moved them).
    fn reindex(&mut self) {
        self.slots = [0; SLOTS];
        if self.entries.len() <= INDEXED_MAX {
            for i in 0..self.entries.len() {
                self.index(i);
            }
        }
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.position_tagged(tag_of(key), key)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key)
            .map(|i| self.str_at(self.entries[i].value))
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// The fields as `(key, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries
            .iter()
            .map(|e| (self.str_at(e.key), self.str_at(e.value)))
    }

    /// Appends with `write` and returns the span of what it appended.
    fn push_with(&mut self, write: impl FnOnce(&mut String)) -> Span {
        let start = self.text.len();
        write(&mut self.text);
        Span {
            start,
            end: self.text.len(),
        }
    }

    fn push_str(&mut self, s: &str) -> Span {
        self.push_with(|t| t.push_str(s))
    }

    fn push_display(&mut self, v: impl fmt::Display) -> Span {
        // Writing into a String cannot fail.
        self.push_with(|t| {
            let _ = write!(t, "{v}");
        })
    }

    /// Records `key` (already in the buffer) with `value`, replacing an earlier value.
    fn set(&mut self, key: Span, value: Span) {
        let k = self.str_at(key);
        let tag = tag_of(k);
        match self.position_tagged(tag, k) {
            // The key's new copy stays in the buffer unused; it goes with the command.
            Some(i) => self.entries[i].value = value,
            None => self.push_entry(Entry { tag, key, value }),
        }
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: &str, value: &str) {
        let k = self.push_str(key);
        let v = self.push_str(value);
        self.set(k, v);
    }

    /// Sets `key` to the decimal text of an integer (cheaper than formatting it).
    pub fn insert_int(&mut self, key: &str, value: impl itoa::Integer) {
        self.insert(key, itoa::Buffer::new().format(value));
    }

    /// Sets `key` to the text of `value` (numbers, booleans) without an intermediate String.
    pub fn insert_display(&mut self, key: &str, value: impl fmt::Display) {
        let k = self.push_str(key);
        let v = self.push_display(value);
        self.set(k, v);
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.position(key)?;
        let e = self.entries.remove(i);
        self.reindex();
        Some(self.str_at(e.value).to_string())
    }
}

impl PartialEq for ExtFields {
    /// Equal when both hold the same keys with the same values, in any order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl fmt::Debug for ExtFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for ExtFields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut out = ExtFields::new();
        out.extend(iter);
        out
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for ExtFields {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k.as_ref(), v.as_ref());
        }
    }
}

impl Serialize for ExtFields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Reads a JSON `extFields` value (an object or null) the way Java does: values may be strings,
/// numbers or booleans, which become their text; null values are left out.
pub(crate) struct ExtFieldsSeed {
    /// Expected bytes of keys and values (the header's length is a good bound).
    pub text_hint: usize,
}

impl<'de> DeserializeSeed<'de> for ExtFieldsSeed {
    type Value = ExtFields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ExtFields, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ExtFieldsSeed {
    type Value = ExtFields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of header fields or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<ExtFields, E> {
        Ok(ExtFields::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<ExtFields, E> {
        Ok(ExtFields::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExtFields, A::Error> {
        let mut out = ExtFields::with_capacity(map.size_hint().unwrap_or(16), self.text_hint);
        // Counted as read, duplicates and nulls included, so no frame can make this slow.
        let mut fields = 0usize;
        while let Some(key) = map.next_key_seed(TextSeed {
            ext: &mut out,
            keep_null: true,
        })? {
            fields += 1;
            if fields > MAX_FIELDS {
                return Err(de::Error::custom(format_args!(
                    "a header carries more than {MAX_FIELDS} fields"
                )));
            }
            let value = map.next_value_seed(TextSeed {
                ext: &mut out,
                keep_null: false,
            })?;
            match (key, value) {
                (Some(k), Some(v)) => out.set(k, v),
                // A null value: the field is absent, as Java's map would have it.
                (Some(k), None) => out.text.truncate(k.start),
                (None, _) => {}
            }
        }
        Ok(out)
    }
}

/// Appends one JSON scalar's text to the buffer; `None` for null.
struct TextSeed<'a> {
    ext: &'a mut ExtFields,
    keep_null: bool,
}

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Option<Span>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Span>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Option<Span>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, boolean or null")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Span>, E> {
        Ok(Some(self.ext.push_str(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<Span>, E> {
        Ok(Some(self.ext.push_str(itoa::Buffer::new().format(v))))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<Span>, E> {
        Ok(Some(self.ext.push_str(itoa::Buffer::new().format(v))))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<Span>, E> {
        Ok(Some(self.ext.push_display(v)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<Span>, E> {
        Ok(Some(self.ext.push_display(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Span>, E> {
        if self.keep_null {
            // serde_json never yields a null key; treat it as the text "null" if one comes.
            return Ok(Some(self.ext.push_str("null")));
        }
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<Span>, E> {
        self.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_and_lookup_finds_the_latest_value() {
        let mut e = ExtFields::new();
        e.insert("topic", "A");
        e.insert_display("queueId", 3);
        e.insert("topic", "B");
        assert_eq!(e.len(), 2);
        assert_eq!(e.get("topic"), Some("B"));
        assert_eq!(e.get("queueId"), Some("3"));
        assert_eq!(e.get("queue"), None);
        assert_eq!(
            e.iter().collect::<Vec<_>>(),
            [("topic", "B"), ("queueId", "3")]
        );
        assert_eq!(e.remove("topic").as_deref(), Some("B"));
        assert!(!e.contains_key("topic"));
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn every_key_is_found_below_and_above_the_indexed_size() {
        let key = |i: usize| format!("k{i}");
        for n in [1, INDEXED_MAX - 1, INDEXED_MAX, INDEXED_MAX + 1, 3 * SLOTS] {
            let mut e = ExtFields::new();
            for i in 0..n {
                e.insert(&key(i), "first");
            }
            for i in 0..n {
                e.insert_display(&key(i), i);
            }
            assert_eq!(e.len(), n, "replacing a value adds no field");
            for i in 0..n {
                assert_eq!(e.get(&key(i)), Some(i.to_string().as_str()), "{n} fields");
            }
            assert!(!e.contains_key("absent"));
            // Removing moves the later entries; every key left is still found.
            for i in (0..n).step_by(3) {
                assert_eq!(e.remove(&key(i)), Some(i.to_string()));
            }
            for i in 0..n {
                assert_eq!(e.contains_key(&key(i)), i % 3 != 0, "{n} fields, key {i}");
            }
            e.insert("k0", "back");
            assert_eq!(e.get("k0"), Some("back"));
        }
    }

    #[test]
    fn equality_ignores_order() {
        let a: ExtFields = [("a", "1"), ("b", "2")].into_iter().collect();
        let b: ExtFields = [("b", "2"), ("a", "1")].into_iter().collect();
        let c: ExtFields = [("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, ExtFields::new());
    }

    fn from_json(s: &str) -> ExtFields {
        let mut d = serde_json::Deserializer::from_str(s);
        ExtFieldsSeed { text_hint: 0 }.deserialize(&mut d).unwrap()
    }

    #[test]
    fn json_scalars_become_text_and_nulls_are_absent() {
        let e = from_json(
            r#"{"s":"x\u0001y","i":-3,"u":18446744073709551615,"f":1.5,"b":true,"n":null,"s2":"z"}"#,
        );
        assert_eq!(e.get("s"), Some("x\u{1}y"));
        assert_eq!(e.get("i"), Some("-3"));
        assert_eq!(e.get("u"), Some("18446744073709551615"));
        assert_eq!(e.get("f"), Some("1.5"));
        assert_eq!(e.get("b"), Some("true"));
        assert!(!e.contains_key("n"));
        assert_eq!(e.get("s2"), Some("z"));
        assert_eq!(e.len(), 6);
        assert!(from_json("null").is_empty());
    }

    #[test]
    fn duplicate_json_keys_keep_the_last_value() {
        let e = from_json(r#"{"k":"1","k":"2"}"#);
        assert_eq!(e.len(), 1);
        assert_eq!(e.get("k"), Some("2"));
    }

    #[test]
    fn too_many_json_fields_are_refused() {
        let fields: Vec<String> = (0..=MAX_FIELDS)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect();
        let json = format!("{{{}}}", fields.join(","));
        let mut d = serde_json::Deserializer::from_str(&json);
        let err = ExtFieldsSeed { text_hint: 0 }
            .deserialize(&mut d)
            .unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let ok = format!("{{{}}}", fields[..MAX_FIELDS].join(","));
        assert_eq!(from_json(&ok).len(), MAX_FIELDS);
    }

    #[test]
    fn serializes_as_a_json_object() {
        let e: ExtFields = [("a", "1"), ("b", "\u{2}")].into_iter().collect();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"a":"1","b":"\u0002"}"#
        );
    }
}
