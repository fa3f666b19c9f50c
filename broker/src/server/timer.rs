//! Timer messages (RocketMQ 5's `setDeliverTimeMs`, `setDelayTimeSec`, `setDelayTimeMs`):
//! delivery at any time up to `timerMaxDelaySec` ahead, not one of the delay levels. A timer
//! message is stored first in [`TIMER_TOPIC`], queue 0, with its delivery time as the
//! consume-queue tag code (and in `TIMER_OUT_MS`); the master keeps the entries not yet due
//! in memory, ordered by time, and appends each to its real topic once due.
//!
//! What is saved (`config/timerProgress.json`, once the copies it counts are durable): the
//! timer queue's offset from which entries may still be pending, the offset up to which
//! entries were read, and a time up to which everything due was delivered. A restart reads the
//! queue again from the first and skips, among the entries read before, those due by that
//! time: a crash repeats at most what was delivered since the last save (about a second).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::schedule::{put_route, take_route};
use crate::store::message::{
    format_properties, parse_properties, property, NewMessage, PROP_DELAY, PROP_TIMER_OUT_MS,
    TIMER_TOPIC,
};
use crate::store::persist::{load_json, save_json};
use crate::store::topics::now_ms;
use crate::store::{MessageStore, StoreError};

/// Property: deliver at this time (ms since the epoch).
pub const PROP_TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
/// Property: deliver this many seconds after the broker takes the message.
pub const PROP_TIMER_DELAY_SEC: &str = "TIMER_DELAY_SEC";
/// Property: deliver this many milliseconds after the broker takes the message.
pub const PROP_TIMER_DELAY_MS: &str = "TIMER_DELAY_MS";
/// Property: cancel the timer message with this key (not supported).
const PROP_TIMER_DEL_UNIQKEY: &str = "TIMER_DEL_UNIQKEY";
/// Property set on delivery: when the message left the timer topic (ms).
const PROP_TIMER_DEQUEUE_MS: &str = "TIMER_DEQUEUE_MS";
/// Property: how often a waiting timer message was stored anew (see [`Timers`]).
const PROP_TIMER_ROLL_TIMES: &str = "TIMER_ROLL_TIMES";

/// Entries held in memory at most (about 80 bytes each, in two orders); beyond, the timer
/// queue is read on as they are delivered.
const MAX_PENDING: usize = 2_000_000;

/// What a message's timer properties ask of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// No timer, or one already handled (delivered, or in the timer topic): stored as it is.
    None,
    /// Due now or already past: stored in its topic at once (as Java does).
    Now,
    /// Due at this time (ms since the epoch, rounded to the precision): wait in the timer topic.
    At(i64),
}

/// Why a timer message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    /// `timerWheelEnable=false`.
    #[error("accurate timer message is not enabled, timerWheelEnable is false")]
    Disabled,
    /// The delay is beyond `timerMaxDelaySec`, or a value does not parse.
    #[error(
        "timer message illegal, the delay time should not be bigger than the max delay {0}ms; \
         or if set del msg, the delay time should be bigger than the current time"
    )]
    Illegal(i64),
    /// A request to cancel a timer message.
    #[error("cancelling a timer message (TIMER_DEL_UNIQKEY) is not supported by this broker")]
    CancelUnsupported,
}

/// The broker's timer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// `timerWheelEnable`.
    pub enabled: bool,
    /// `timerPrecisionMs`: delivery times are rounded down to a multiple of it.
    pub precision_ms: i64,
    /// `timerMaxDelaySec`: the furthest ahead a message may be timed.
    pub max_delay_sec: i64,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            enabled: true,
            precision_ms: 1000,
            max_delay_sec: 3 * 24 * 3600,
        }
    }
}

/// What `properties` ask for at `now`, by Java's rules: `TIMER_DELAY_SEC`, else
/// `TIMER_DELAY_MS` (both from now), else `TIMER_DELIVER_MS`; a delay level wins over all
/// three (see [`strip_timer`]).
pub fn timing(properties: &str, cfg: &TimerConfig, now: i64) -> Result<Timing, TimerError> {
    if !names_timer(properties) {
        return Ok(Timing::None);
    }
    if !cfg.enabled {
        return Err(TimerError::Disabled);
    }
    let num = |key| property(properties, key).map(str::parse::<i64>);
    let illegal = || TimerError::Illegal(cfg.max_delay_sec.saturating_mul(1000));
    let deliver = match (
        num(PROP_TIMER_DELAY_SEC),
        num(PROP_TIMER_DELAY_MS),
        num(PROP_TIMER_DELIVER_MS),
    ) {
        (Some(s), _, _) => now.saturating_add(s.map_err(|_| illegal())?.saturating_mul(1000)),
        (None, Some(ms), _) => now.saturating_add(ms.map_err(|_| illegal())?),
        (None, None, Some(at)) => at.map_err(|_| illegal())?,
        (None, None, None) => return Ok(Timing::None), // not reached: names_timer
    };
    if property(properties, PROP_TIMER_DEL_UNIQKEY).is_some() {
        return Err(TimerError::CancelUnsupported);
    }
    if deliver <= now {
        return Ok(Timing::Now);
    }
    if deliver - now > cfg.max_delay_sec.saturating_mul(1000) {
        return Err(illegal());
    }
    // Java's rounding: down to the precision, and an exact multiple one step earlier (its
    // wheel fires a slot one step after the slot's time).
    let p = cfg.precision_ms.max(1);
    Ok(Timing::At(if deliver % p == 0 {
        deliver - p
    } else {
        deliver / p * p
    }))
}

/// Whether a message asks for a timer the broker has not handled yet (one delivered or
/// waiting in the timer topic carries `TIMER_OUT_MS`).
pub fn names_timer(properties: &str) -> bool {
    properties.contains("TIMER_")
        && property(properties, PROP_TIMER_OUT_MS).is_none()
        && [
            PROP_TIMER_DELAY_SEC,
            PROP_TIMER_DELAY_MS,
            PROP_TIMER_DELIVER_MS,
        ]
        .iter()
        .any(|k| property(properties, k).is_some())
}

/// [`timing`] as of now; the clock is read only for a message that names a timer (sends
/// check every message).
pub fn timing_now(properties: &str, cfg: &TimerConfig) -> Result<Timing, TimerError> {
    if !properties.contains("TIMER_") {
        return Ok(Timing::None);
    }
    timing(properties, cfg, now_ms())
}

/// Removes the timer properties of a message that also asks for a delay level, which wins
/// (as in Java).
pub fn strip_timer(properties: &str) -> Option<String> {
    if !properties.contains("TIMER_") || property(properties, PROP_DELAY).is_none() {
        return None;
    }
    let mut props = parse_properties(properties);
    for k in [
        PROP_TIMER_DELIVER_MS,
        PROP_TIMER_DELAY_SEC,
        PROP_TIMER_DELAY_MS,
    ] {
        props.remove(k);
    }
    Some(format_properties(&props))
}

/// Wraps a message to wait in the timer topic until `at`.
pub fn wrap(msg: NewMessage, at: i64) -> NewMessage {
    let mut props = parse_properties(&msg.properties);
    put_route(&mut props, &msg);
    props.insert(PROP_TIMER_OUT_MS.into(), at.to_string());
    NewMessage {
        topic: TIMER_TOPIC.into(),
        queue_id: 0,
        properties: format_properties(&props),
        tags_code: at,
        ..msg
    }
}

/// What a restart needs to go on without losing a timer message.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    /// Timer-queue offset from which entries may still be pending.
    oldest_pending: u64,
    /// Timer-queue offset up to which entries were read into memory.
    loaded: u64,
    /// Every entry read before `loaded` and due by this time (ms) was delivered.
    delivered_until: i64,
    /// The widest `timerPrecisionMs` and `timerMaxDelaySec` entries not yet delivered may
    /// have been timed under (0: none recorded): settings narrowed since, at run time or
    /// across a restart, must not bring them forward.
    #[serde(default)]
    precision_ms: i64,
    /// See `precision_ms`.
    #[serde(default)]
    max_delay_sec: i64,
}

/// Timer entries not yet due, and how far the timer queue was read.
#[derive(Debug, Default)]
struct State {
    /// (time, queue offset, commit-log offset), in time order: what is due next.
    by_time: BTreeSet<(i64, u64, u64)>,
    /// queue offset to (time, commit-log offset), in queue order: the oldest pending entry.
    by_offset: BTreeMap<u64, (i64, u64)>,
    /// Next queue offset to read.
    loaded: u64,
    /// The progress this run started from: entries before its `loaded` due by its time were
    /// delivered before the restart.
    restart: Progress,
    /// Whether anything changed since the last save.
    dirty: bool,
    /// Failed attempts to deliver the entry due next (queue offset, attempts).
    failing: Option<(u64, u32)>,
    /// Store time of the oldest pending entry's message (queue offset, ms), read once.
    oldest_stored: Option<(u64, i64)>,
    /// The widest settings waiting entries may have been timed under (see
    /// [`Progress::precision_ms`]).
    widest: Widest,
}

/// A precision and a longest delay: the widest the waiting entries were timed under.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Widest {
    precision_ms: i64,
    max_delay_sec: i64,
}

impl State {
    fn insert(&mut self, at: i64, queue_offset: u64, offset: u64) {
        self.by_time.insert((at, queue_offset, offset));
        self.by_offset.insert(queue_offset, (at, offset));
    }

    /// The queue offset before which no entry is pending.
    fn oldest_pending(&self) -> u64 {
        self.by_offset
            .first_key_value()
            .map_or(self.loaded, |(&q, _)| q)
    }

    fn remove(&mut self, at: i64, queue_offset: u64, offset: u64) {
        self.by_time.remove(&(at, queue_offset, offset));
        self.by_offset.remove(&queue_offset);
        self.dirty = true;
    }
}

/// Timer-queue entries read per pass at most, so a pass (a restart's catching up among them)
/// stays short.
const READ_PER_PASS: usize = 65_536;

/// Attempts to deliver one message before it is dropped (Java's put service tries 3 times).
const ATTEMPTS: u32 = 3;

/// Deliveries between two saves of the progress within one pass.
const SAVE_EVERY: usize = 1024;

/// What a pass is allowed: the broker's timer settings and how old a waiting message may
/// get before it is copied anew (so retention never takes it first).
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// The broker's timer settings.
    pub cfg: TimerConfig,
    /// A message waiting longer than this (ms) is stored again, as Java rolls its timers.
    pub roll_after_ms: i64,
}

/// Delivers timer messages when due (masters only).
pub struct Timers {
    path: PathBuf,
    state: Mutex<State>,
}

impl Timers {
    /// Loads the saved progress.
    pub fn load(root: &std::path::Path) -> Result<Timers, StoreError> {
        let path = root.join("config").join("timerProgress.json");
        let restart: Progress = load_json(&path)?.unwrap_or_default();
        Ok(Timers {
            path,
            state: Mutex::new(State {
                loaded: restart.oldest_pending,
                widest: Widest {
                    precision_ms: restart.precision_ms,
                    max_delay_sec: restart.max_delay_sec,
                },
                restart,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Timer messages waiting in memory.
    pub fn pending(&self) -> usize {
        self.lock().by_time.len()
    }

    /// The timer-queue offset before which every message was delivered (or stored anew
    /// further on): with the queue's end, what a drain waits on.
    pub fn delivered_before(&self) -> u64 {
        self.lock().oldest_pending()
    }

    /// Reads new timer entries, delivers every one due, stores anew those waiting too long,
    /// and saves the progress once the copies are durable; returns how many were delivered.
    /// An entry timed at `t` (rounded down to the precision, see [`timing`]) is due at
    /// `t + precision`: never before the time asked, at most one step after, as Java's wheel
    /// delivers. One further ahead than the longest delay allows is due at once: the clock
    /// went back.
    ///
    /// A message that can no longer be read (damaged) is logged and dropped; one that fails
    /// to be stored [`ATTEMPTS`] times in a row too, after which the others go on.
    pub async fn deliver_due(&self, store: &MessageStore, pass: Pass) -> Result<usize, StoreError> {
        let now = now_ms();
        self.read_new(store)?;
        let w = self.widen(store, &pass.cfg);
        let due_by = now.saturating_sub(w.precision_ms.max(1));
        let too_far = now.saturating_add(
            w.max_delay_sec
                .saturating_mul(1000)
                .saturating_add(w.precision_ms),
        );
        let mut moved = 0;
        let mut since_save = 0;
        let result = loop {
            let next = {
                let st = self.lock();
                match (st.by_time.first(), st.by_time.last()) {
                    (Some(&first), _) if first.0 <= due_by => Some(first),
                    (_, Some(&last)) if last.0 > too_far => Some(last),
                    _ => None,
                }
            };
            let Some((at, queue_offset, offset)) = next else {
                break Ok(());
            };
            match self.deliver_one(store, offset, now) {
                Ok(delivered) => {
                    moved += usize::from(delivered);
                    since_save += 1;
                    let mut st = self.lock();
                    st.failing = None;
                    st.remove(at, queue_offset, offset);
                }
                Err(e) => {
                    let mut st = self.lock();
                    let tries = match st.failing {
                        Some((q, n)) if q == queue_offset => n + 1,
                        _ => 1,
                    };
                    if tries < ATTEMPTS {
                        st.failing = Some((queue_offset, tries));
                        break Err(e);
                    }
                    tracing::error!(offset, error = %e, attempts = tries, "a timer message could not be delivered and is dropped");
                    st.failing = None;
                    st.remove(at, queue_offset, offset);
                }
            }
            if since_save >= SAVE_EVERY {
                self.save(store, due_by).await?;
                since_save = 0;
                tokio::task::yield_now().await;
            }
        };
        let rolled = self.roll(store, now, pass.roll_after_ms);
        self.save(store, due_by).await?;
        result.and(rolled).map(|()| moved)
    }

    /// The settings to deliver by: the current ones once nothing waits (every entry read and
    /// delivered), else the widest of them and those the waiting entries were timed under.
    /// An entry stored under a coarser precision is due a step of that precision after its
    /// time, and one timed under a longer limit is not "too far" under a shorter one: never
    /// early, at worst one coarse step late.
    fn widen(&self, store: &MessageStore, cfg: &TimerConfig) -> Widest {
        let end = store.queue(TIMER_TOPIC, 0).map_or(0, |q| q.max_offset());
        let mut st = self.lock();
        let current = Widest {
            precision_ms: cfg.precision_ms,
            max_delay_sec: cfg.max_delay_sec,
        };
        let w = if st.by_offset.is_empty() && st.loaded >= end {
            current
        } else {
            Widest {
                precision_ms: st.widest.precision_ms.max(current.precision_ms),
                max_delay_sec: st.widest.max_delay_sec.max(current.max_delay_sec),
            }
        };
        if w != st.widest {
            st.widest = w;
            st.dirty = true;
        }
        w
    }

    /// Reads the timer queue's new entries into memory, up to [`MAX_PENDING`] held and
    /// [`READ_PER_PASS`] read.
    fn read_new(&self, store: &MessageStore) -> Result<(), StoreError> {
        let Some(q) = store.queue(TIMER_TOPIC, 0) else {
            return Ok(());
        };
        let mut read = 0;
        while read < READ_PER_PASS {
            let from = {
                let mut st = self.lock();
                if st.by_time.len() >= MAX_PENDING {
                    break;
                }
                // Entries a power loss took after they were read: read again from the end.
                // Entries retention took: from the first left.
                st.loaded = st.loaded.max(q.min_offset()).min(q.max_offset());
                st.restart.loaded = st.restart.loaded.min(q.max_offset());
                st.loaded
            };
            // The consume queue is read without the lock (a file read).
            let entries = q.get(from, 1024)?;
            if entries.is_empty() {
                break;
            }
            read += entries.len();
            let mut st = self.lock();
            for (i, e) in entries.into_iter().enumerate() {
                let queue_offset = from + i as u64;
                st.loaded = queue_offset + 1;
                st.dirty = true;
                if e.is_empty() {
                    continue;
                }
                let before_restart = queue_offset < st.restart.loaded;
                if before_restart && e.tags_code <= st.restart.delivered_until {
                    continue; // delivered before the restart
                }
                st.insert(e.tags_code, queue_offset, e.offset);
            }
        }
        Ok(())
    }

    /// Appends the message at `offset` to its real topic; `Ok(false)` when it was dropped.
    fn deliver_one(&self, store: &MessageStore, offset: u64, now: i64) -> Result<bool, StoreError> {
        let m = match store.commitlog().read_message(offset) {
            Ok(m) => m,
            Err(err @ (StoreError::Corrupt(_) | StoreError::OutOfRange { .. })) => {
                tracing::error!(offset, error = %err, "a timer message cannot be read and is dropped");
                return Ok(false);
            }
            Err(err) => return Err(err),
        };
        let mut props = parse_properties(&m.properties);
        let Some((topic, queue_id)) = take_route(&mut props) else {
            tracing::warn!(offset, "timer message without REAL_TOPIC/REAL_QID dropped");
            return Ok(false);
        };
        if store.topics.get(&topic).is_none() {
            // Deleted since: storing it would bring back queues no topic owns.
            tracing::warn!(%topic, "a timer message's topic is gone: message dropped");
            return Ok(false);
        }
        // TIMER_OUT_MS stays, as in Java: the delivered message is not timed again.
        props.insert(PROP_TIMER_DEQUEUE_MS.into(), now.to_string());
        let real = NewMessage::restored(&m, topic, queue_id, format_properties(&props));
        // Not waiting for its own sync: the progress counting it is saved only once the log
        // is durable past it.
        store.append(std::slice::from_ref(&real))?;
        Ok(true)
    }

    /// Stores anew, at the timer queue's end, the waiting messages stored longer than
    /// `roll_after_ms` ago, oldest first: retention deletes segments by age, and a message
    /// may wait longer than that.
    fn roll(&self, store: &MessageStore, now: i64, roll_after_ms: i64) -> Result<(), StoreError> {
        for _ in 0..SAVE_EVERY {
            let Some((queue_offset, (at, offset))) = self
                .lock()
                .by_offset
                .first_key_value()
                .map(|(&q, &v)| (q, v))
            else {
                return Ok(());
            };
            let known = self
                .lock()
                .oldest_stored
                .filter(|&(q, _)| q == queue_offset);
            // The store time of the oldest is read once, and the message only again to roll.
            let (stored_at, read) = match known {
                Some((_, t)) => (t, None),
                None => match store.commitlog().read_message(offset) {
                    Ok(m) => {
                        self.lock().oldest_stored = Some((queue_offset, m.store_timestamp));
                        (m.store_timestamp, Some(m))
                    }
                    // Delivery drops it when due.
                    Err(_) => return Ok(()),
                },
            };
            if now.saturating_sub(stored_at) < roll_after_ms {
                return Ok(());
            }
            let m = match read {
                Some(m) => m,
                None => store.commitlog().read_message(offset)?,
            };
            let mut props = parse_properties(&m.properties);
            let times: u32 = props
                .get(PROP_TIMER_ROLL_TIMES)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            props.insert(PROP_TIMER_ROLL_TIMES.into(), (times + 1).to_string());
            let mut again =
                NewMessage::restored(&m, TIMER_TOPIC.into(), 0, format_properties(&props));
            again.tags_code = at;
            store.append(std::slice::from_ref(&again))?;
            self.lock().remove(at, queue_offset, offset);
        }
        Ok(())
    }

    /// Saves the progress if anything changed, once the copies it counts and the entries it
    /// counts as read are durable in the log.
    async fn save(&self, store: &MessageStore, due_by: i64) -> Result<(), StoreError> {
        let progress = {
            let st = self.lock();
            if !st.dirty {
                return Ok(());
            }
            Self::progress(&st, due_by)
        };
        store.wait_durable(store.commitlog().max_offset()).await?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || save_json(&path, &progress))
            .await
            .unwrap_or(Err(StoreError::Shutdown))?;
        // Changes made meanwhile are saved by the next pass.
        self.lock().dirty = false;
        Ok(())
    }

    /// The progress to save: pending entries start at the smallest queue offset among them,
    /// and every entry read so far that is timed before the next pending one (and by
    /// `due_by`) was delivered (entries not read yet are never skipped: they lie at `loaded`
    /// or after). A clock gone back lowers that time: more is delivered again after a
    /// crash, nothing is lost.
    fn progress(st: &State, due_by: i64) -> Progress {
        let next_due = st.by_time.first().map_or(i64::MAX, |&(at, _, _)| at);
        Progress {
            oldest_pending: st.oldest_pending(),
            loaded: st.loaded,
            delivered_until: due_by.min(next_due.saturating_sub(1)),
            precision_ms: st.widest.precision_ms,
            max_delay_sec: st.widest.max_delay_sec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FlushDiskType, StoreConfig};
    use std::time::Duration;

    const P: TimerConfig = TimerConfig {
        enabled: true,
        precision_ms: 1000,
        max_delay_sec: 3600,
    };

    /// Due at the time stored (precision 1 ms), stored anew after an hour.
    const PASS: Pass = Pass {
        cfg: TimerConfig {
            enabled: true,
            precision_ms: 1,
            max_delay_sec: 7200,
        },
        roll_after_ms: 3_600_000,
    };

    #[test]
    fn timers_read_as_java_reads_them() {
        let now = 1_000_500;
        let t = |p: &str| timing(p, &P, now);
        assert_eq!(t(""), Ok(Timing::None));
        assert_eq!(t("TAGS\u{1}a\u{2}"), Ok(Timing::None));
        // Seconds first, then milliseconds, then a time; rounded down to the precision.
        assert_eq!(
            t("TIMER_DELIVER_MS\u{1}5\u{2}TIMER_DELAY_SEC\u{1}10\u{2}"),
            Ok(Timing::At(1_010_000))
        );
        assert_eq!(
            t("TIMER_DELIVER_MS\u{1}5\u{2}TIMER_DELAY_MS\u{1}2600\u{2}"),
            Ok(Timing::At(1_003_000))
        );
        // An exact multiple goes one step earlier (Java's wheel fires a step late).
        assert_eq!(
            t("TIMER_DELIVER_MS\u{1}1005000\u{2}"),
            Ok(Timing::At(1_004_000))
        );
        // Past or now: due at once; already timed (delivered): nothing to do.
        assert_eq!(t("TIMER_DELIVER_MS\u{1}1000500\u{2}"), Ok(Timing::Now));
        assert_eq!(t("TIMER_DELAY_SEC\u{1}-5\u{2}"), Ok(Timing::Now));
        assert_eq!(
            t("TIMER_DELAY_SEC\u{1}10\u{2}TIMER_OUT_MS\u{1}9\u{2}"),
            Ok(Timing::None)
        );
        // Too far, unreadable, overflowing, a cancellation, or timers off.
        assert_eq!(
            t("TIMER_DELAY_SEC\u{1}3601\u{2}"),
            Err(TimerError::Illegal(3_600_000))
        );
        assert_eq!(
            t("TIMER_DELAY_SEC\u{1}3600\u{2}"),
            Ok(Timing::At(4_600_000))
        );
        assert!(t("TIMER_DELAY_MS\u{1}x\u{2}").is_err());
        assert!(t(&format!("TIMER_DELAY_SEC\u{1}{}\u{2}", i64::MAX)).is_err());
        assert_eq!(
            t("TIMER_DELAY_SEC\u{1}5\u{2}TIMER_DEL_UNIQKEY\u{1}k\u{2}"),
            Err(TimerError::CancelUnsupported)
        );
        let off = TimerConfig {
            enabled: false,
            ..P
        };
        assert_eq!(
            timing("TIMER_DELAY_SEC\u{1}5\u{2}", &off, now),
            Err(TimerError::Disabled)
        );
        assert_eq!(
            TimerError::Disabled.to_string(),
            "accurate timer message is not enabled, timerWheelEnable is false"
        );
        // A delay level wins: the timer's properties go.
        let kept = strip_timer("DELAY\u{1}3\u{2}TIMER_DELAY_SEC\u{1}5\u{2}a\u{1}b\u{2}").unwrap();
        assert_eq!(parse_properties(&kept).len(), 2);
        assert_eq!(strip_timer("TIMER_DELAY_SEC\u{1}5\u{2}"), None);
    }

    fn timed(i: u8, at: i64) -> NewMessage {
        wrap(
            NewMessage {
                topic: "T".into(),
                queue_id: 1,
                flag: 0,
                body: bytes::Bytes::from(vec![i; 8]),
                properties: format!("UNIQ_KEY\u{1}m{i}\u{2}"),
                sys_flag: 0,
                born_timestamp: 0,
                born_host: "127.0.0.1:2".parse().unwrap(),
                reconsume_times: 0,
                tags_code: 0,
            },
            at,
        )
    }

    /// A store with room for the tests' messages in one segment, holding topic `T`.
    fn store_with_t(dir: &std::path::Path) -> std::sync::Arc<MessageStore> {
        let store = MessageStore::open(StoreConfig {
            segment_size: 1 << 20,
            ..StoreConfig::for_tests(dir, FlushDiskType::Async)
        })
        .unwrap();
        store
            .topics
            .put(crate::store::topics::TopicConfig::new("T", 4, 6))
            .unwrap();
        store
    }

    fn delivered(store: &MessageStore) -> Vec<String> {
        let Some(q) = store.queue("T", 1) else {
            return Vec::new();
        };
        q.get(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| {
                let m = store.commitlog().read_message(e.offset).unwrap();
                m.properties_map()["UNIQ_KEY"].clone()
            })
            .collect()
    }

    #[tokio::test]
    async fn timer_messages_are_delivered_in_time_order_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(dir.path());
        let timers = Timers::load(dir.path()).unwrap();
        let now = now_ms();
        // Stored out of time order; the last one is far off. Spaced widely: a loaded machine's
        // passes come late, and must still find the same ones due.
        for (i, at) in [
            (0, now + 800),
            (1, now + 400),
            (2, now + 2_400),
            (3, now + 3_600_000),
        ] {
            store.put(&[timed(i, at)]).await.unwrap();
        }
        assert_eq!(timers.deliver_due(&store, PASS).await.unwrap(), 0);
        assert_eq!(timers.pending(), 4);
        let until = |t: i64| Duration::from_millis((t - now_ms()).max(0) as u64);
        tokio::time::sleep(until(now + 900)).await;
        assert_eq!(timers.deliver_due(&store, PASS).await.unwrap(), 2);
        assert_eq!(delivered(&store), ["m1", "m0"]);
        let m = store
            .commitlog()
            .read_message(store.queue("T", 1).unwrap().get(0, 1).unwrap()[0].offset)
            .unwrap();
        let props = m.properties_map();
        assert!(!props.contains_key("REAL_TOPIC") && !props.contains_key("REAL_QID"));
        assert!(props.contains_key("TIMER_OUT_MS") && props.contains_key("TIMER_DEQUEUE_MS"));

        // A restart delivers neither of them again, and still knows the two left.
        let again = Timers::load(dir.path()).unwrap();
        assert_eq!(again.deliver_due(&store, PASS).await.unwrap(), 0);
        assert_eq!(again.pending(), 2);
        tokio::time::sleep(until(now + 2_500)).await;
        assert_eq!(again.deliver_due(&store, PASS).await.unwrap(), 1);
        assert_eq!(delivered(&store), ["m1", "m0", "m2"]);
        // One stored after a restart, due before the far one.
        let at = now_ms() + 600;
        store.put(&[timed(4, at)]).await.unwrap();
        let third = Timers::load(dir.path()).unwrap();
        assert_eq!(third.deliver_due(&store, PASS).await.unwrap(), 0);
        assert_eq!(third.pending(), 2);
        tokio::time::sleep(until(at + 50)).await;
        assert_eq!(third.deliver_due(&store, PASS).await.unwrap(), 1);
        assert_eq!(delivered(&store), ["m1", "m0", "m2", "m4"]);
        assert_eq!(third.pending(), 1, "the far one still waits");
        store.shutdown();
    }

    #[tokio::test]
    async fn narrower_settings_never_bring_waiting_messages_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(dir.path());
        let wide = Pass {
            cfg: TimerConfig {
                precision_ms: 1_500,
                ..PASS.cfg
            },
            ..PASS
        };
        let timers = Timers::load(dir.path()).unwrap();
        let now = now_ms();
        // Timed under a precision of 1.5 s (due 1.5 s after its time) and a 2 h limit.
        store
            .put(&[timed(0, now), timed(1, now + 7_000_000)])
            .await
            .unwrap();
        assert_eq!(timers.deliver_due(&store, wide).await.unwrap(), 0);
        // Narrowed at run time: 1 ms, 1 h. Neither is due yet, nor "too far".
        let narrow = Pass {
            cfg: TimerConfig {
                precision_ms: 1,
                max_delay_sec: 3600,
                ..PASS.cfg
            },
            ..PASS
        };
        assert_eq!(timers.deliver_due(&store, narrow).await.unwrap(), 0);
        // Nor across a restart with the narrow settings.
        let again = Timers::load(dir.path()).unwrap();
        assert_eq!(again.deliver_due(&store, narrow).await.unwrap(), 0);
        assert_eq!(again.pending(), 2);
        tokio::time::sleep(Duration::from_millis((now + 1_600 - now_ms()).max(0) as u64)).await;
        assert_eq!(again.deliver_due(&store, narrow).await.unwrap(), 1);
        assert_eq!(delivered(&store), ["m0"]);
        assert_eq!(again.pending(), 1, "the far one still waits");
        store.shutdown();
    }

    #[tokio::test]
    async fn a_message_waiting_long_is_stored_anew_and_still_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(dir.path());
        // Rolled after a second: long enough that a loaded machine's passes, a moment apart,
        // never find the fresh copy old enough to roll again.
        let pass = Pass {
            roll_after_ms: 1_000,
            ..PASS
        };
        let timers = Timers::load(dir.path()).unwrap();
        let due = now_ms() + 2_500;
        store.put(&[timed(0, due)]).await.unwrap();
        // A message for a topic deleted meanwhile is dropped when due.
        let mut gone = timed(1, now_ms() + 50);
        gone.properties = gone
            .properties
            .replace("REAL_TOPIC\u{1}T", "REAL_TOPIC\u{1}Gone");
        store.put(&[gone]).await.unwrap();
        assert_eq!(timers.deliver_due(&store, pass).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(timers.deliver_due(&store, pass).await.unwrap(), 0);
        assert!(store.queue("Gone", 1).is_none());
        // Older than a second: stored again at the timer queue's end, once (the copy is new).
        let q = store.queue(TIMER_TOPIC, 0).unwrap();
        assert_eq!(q.max_offset(), 3);
        assert_eq!(timers.deliver_due(&store, pass).await.unwrap(), 0);
        assert_eq!(q.max_offset(), 3);
        let copy = store
            .commitlog()
            .read_message(q.get(2, 1).unwrap()[0].offset)
            .unwrap();
        assert_eq!(copy.properties_map()["TIMER_ROLL_TIMES"], "1");
        // A restart knows the copy, not the original.
        let again = Timers::load(dir.path()).unwrap();
        assert_eq!(again.deliver_due(&store, pass).await.unwrap(), 0);
        assert_eq!(again.pending(), 1);
        tokio::time::sleep(Duration::from_millis((due + 100 - now_ms()).max(0) as u64)).await;
        assert_eq!(again.deliver_due(&store, pass).await.unwrap(), 1);
        assert_eq!(delivered(&store), ["m0"]);
        assert_eq!(again.pending(), 0);
        store.shutdown();
    }

    #[tokio::test]
    async fn a_message_that_cannot_be_stored_is_tried_three_times_then_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(dir.path());
        store
            .topics
            .put(crate::store::topics::TopicConfig::new("Blocked", 4, 6))
            .unwrap();
        // Its queue directory cannot be made: a file stands in the way.
        let blocker = dir.path().join("consumequeue").join("Blocked");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        let timers = Timers::load(dir.path()).unwrap();
        let now = now_ms();
        let mut blocked = timed(0, now);
        blocked.properties = blocked
            .properties
            .replace("REAL_TOPIC\u{1}T", "REAL_TOPIC\u{1}Blocked");
        store.put(&[blocked, timed(1, now + 1)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(timers.deliver_due(&store, PASS).await.is_err());
        assert!(timers.deliver_due(&store, PASS).await.is_err());
        assert!(delivered(&store).is_empty(), "the later one waits its turn");
        assert_eq!(timers.deliver_due(&store, PASS).await.unwrap(), 1);
        assert_eq!(delivered(&store), ["m1"]);
        assert_eq!(timers.pending(), 0);
        store.shutdown();
    }
}
