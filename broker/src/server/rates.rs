//! Message rates and daily totals for the runtime info (GET_BROKER_RUNTIME_INFO) that Java's
//! `mqadmin clusterList` and `brokerStatus` read: `putTps` and `getTransferedTps` as "10 s,
//! 1 min, 10 min" rates, and the put and get totals at the start of today and yesterday
//! (UTC), from which the tool prints yesterday's and today's counts.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Seconds of samples kept: the longest rate window.
const WINDOW: usize = 600;

/// Samples of the broker's put and get totals, one a second.
#[derive(Default)]
pub struct Rates {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (when, puts, gets), oldest first.
    samples: VecDeque<(Instant, u64, u64)>,
    /// The UTC day of the latest sample (days since the epoch).
    day: Option<u64>,
    /// Totals at the start of today and of yesterday (before the broker started: 0).
    today_morning: (u64, u64),
    yesterday_morning: (u64, u64),
}

impl Rates {
    /// Records the totals at `now`, on UTC day `day`.
    pub fn sample(&self, now: Instant, day: u64, puts: u64, gets: u64) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match i.day {
            Some(d) if d < day => {
                // The totals at the last sample of the day before stand for midnight.
                let last = i.samples.back().map_or((0, 0), |s| (s.1, s.2));
                i.yesterday_morning = if d + 1 == day { i.today_morning } else { last };
                i.today_morning = last;
            }
            _ => {}
        }
        i.day = Some(day);
        i.samples.push_back((now, puts, gets));
        while i.samples.len() > WINDOW + 1 {
            i.samples.pop_front();
        }
    }

    /// The runtime-info entries, with the totals as they are now.
    pub fn table(&self, puts: u64, gets: u64) -> Vec<(&'static str, String)> {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let rate = |secs: usize, pick: fn(&(Instant, u64, u64)) -> u64| -> String {
            let Some(last) = i.samples.back() else {
                return "0.00".into();
            };
            let first = &i.samples[i.samples.len().saturating_sub(secs + 1)];
            let elapsed = last.0.duration_since(first.0).as_secs_f64();
            let n = pick(last).saturating_sub(pick(first)) as f64;
            format!("{:.2}", if elapsed > 0.0 { n / elapsed } else { 0.0 })
        };
        let tps = |pick: fn(&(Instant, u64, u64)) -> u64| {
            format!(
                "{} {} {}",
                rate(10, pick),
                rate(60, pick),
                rate(WINDOW, pick)
            )
        };
        let gets_tps = tps(|s| s.2);
        vec![
            ("putTps", tps(|s| s.1)),
            // Java 4's spelling, and Java 5's.
            ("getTransferedTps", gets_tps.clone()),
            ("getTransferredTps", gets_tps),
            ("msgPutTotalTodayNow", puts.to_string()),
            ("msgGetTotalTodayNow", gets.to_string()),
            ("msgPutTotalTodayMorning", i.today_morning.0.to_string()),
            ("msgGetTotalTodayMorning", i.today_morning.1.to_string()),
            (
                "msgPutTotalYesterdayMorning",
                i.yesterday_morning.0.to_string(),
            ),
            (
                "msgGetTotalYesterdayMorning",
                i.yesterday_morning.1.to_string(),
            ),
        ]
    }
}

/// Today's UTC day number.
pub fn utc_day() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(t: &[(&'static str, String)], key: &str) -> String {
        t.iter().find(|(k, _)| *k == key).unwrap().1.clone()
    }

    #[test]
    fn rates_cover_their_windows_and_totals_roll_over_at_midnight() {
        let r = Rates::default();
        let t0 = Instant::now();
        assert_eq!(entry(&r.table(0, 0), "putTps"), "0.00 0.00 0.00");
        // 100 puts a second for 20 s, then 1,000 a second for 10 s; 50 gets a second.
        let mut puts = 0;
        r.sample(t0, 7, 0, 0);
        for s in 1..=30u64 {
            puts += if s <= 20 { 100 } else { 1000 };
            r.sample(t0 + Duration::from_secs(s), 7, puts, 50 * s);
        }
        let t = r.table(puts, 1500);
        assert_eq!(entry(&t, "putTps"), "1000.00 400.00 400.00");
        assert_eq!(entry(&t, "getTransferedTps"), "50.00 50.00 50.00");
        assert_eq!(entry(&t, "getTransferredTps"), "50.00 50.00 50.00");
        assert_eq!(entry(&t, "msgPutTotalTodayMorning"), "0");
        assert_eq!(entry(&t, "msgPutTotalTodayNow"), puts.to_string());
        // The next day: this morning is the last total of yesterday.
        r.sample(t0 + Duration::from_secs(31), 8, puts + 5, 1550);
        let t = r.table(puts + 5, 1550);
        assert_eq!(entry(&t, "msgPutTotalTodayMorning"), puts.to_string());
        assert_eq!(entry(&t, "msgGetTotalTodayMorning"), "1500");
        assert_eq!(entry(&t, "msgPutTotalYesterdayMorning"), "0");
        // A day later still.
        r.sample(t0 + Duration::from_secs(32), 9, puts + 9, 1600);
        let t = r.table(puts + 9, 1600);
        assert_eq!(entry(&t, "msgPutTotalYesterdayMorning"), puts.to_string());
        assert_eq!(entry(&t, "msgPutTotalTodayMorning"), (puts + 5).to_string());
        // Only the last ten minutes count.
        for s in 33..=700u64 {
            r.sample(t0 + Duration::from_secs(s), 9, puts + 9, 1600);
        }
        assert_eq!(entry(&r.table(0, 0), "putTps"), "0.00 0.00 0.00");
    }
}
