//! Whether this instance can reach its store, and since when: the memory of outages that
//! keeps liveness judgements honest.
//!
//! A store outage silences every liveness signal this instance would write (WebSocket
//! pings, heartbeats, room presence) while clients are still there. So no judgement of
//! silence (an orphan timer, the sweep, taking over a dead node) counts time during which
//! this instance could not reach the store: an outage counts from the last call that
//! succeeded before it to the first that succeeded after it. After an outage, nothing is
//! judged until the liveness received meanwhile is written and other nodes have had time
//! to report again (the settle time).

use std::collections::VecDeque;
use std::time::Duration;

use session_lifecycle::Timestamp;

/// Outages remembered: older ones no longer matter to any judgement.
const REMEMBERED: usize = 256;

/// What the engine knows of its store's reachability.
#[derive(Debug)]
pub(crate) struct Reachability {
    /// The last call that succeeded.
    last_ok: Timestamp,
    /// While unreachable: when the outage began (the last success before it).
    down_since: Option<Timestamp>,
    /// Ended outages, oldest first: (start, end).
    outages: VecDeque<(Timestamp, Timestamp)>,
    /// When the store came back last, if it ever went away.
    recovered_at: Option<Timestamp>,
    /// The store came back and the engine has not yet done what a recovery calls for
    /// (write the liveness it kept, look at its sessions again).
    recovery_due: bool,
}

impl Reachability {
    pub(crate) fn new(now: Timestamp) -> Reachability {
        Reachability {
            last_ok: now,
            down_since: None,
            outages: VecDeque::new(),
            recovered_at: None,
            recovery_due: false,
        }
    }

    /// Records a store call's outcome at `now`: `reachable` unless the store could not be
    /// reached.
    pub(crate) fn observe(&mut self, reachable: bool, now: Timestamp) {
        if reachable {
            if let Some(start) = self.down_since.take() {
                if self.outages.len() == REMEMBERED {
                    self.outages.pop_front();
                }
                self.outages.push_back((start, now.max(start)));
                self.recovered_at = Some(now);
                self.recovery_due = true;
            }
            self.last_ok = self.last_ok.max(now);
        } else if self.down_since.is_none() {
            self.down_since = Some(self.last_ok);
        }
    }

    /// Whether the store is unreachable now (the last call failed).
    pub(crate) fn is_down(&self) -> bool {
        self.down_since.is_some()
    }

    /// Takes the flag that a recovery's work is due.
    pub(crate) fn take_recovery(&mut self) -> bool {
        std::mem::take(&mut self.recovery_due)
    }

    /// Whether judging silence is allowed at `now`: the store is reachable, and `settle`
    /// has passed since it came back.
    pub(crate) fn may_judge(&self, now: Timestamp, settle: Duration) -> bool {
        !self.is_down()
            && self
                .recovered_at
                .is_none_or(|at| now >= at.saturating_add(settle))
    }

    /// The time within `from..to` during which the store was unreachable.
    pub(crate) fn unreachable_within(&self, from: Timestamp, to: Timestamp) -> Duration {
        self.intervals(to)
            .map(|(s, e)| e.min(to).saturating_duration_since(s.max(from)))
            .fold(Duration::ZERO, |a, b| a.saturating_add(b))
    }

    /// How far back from `now` one must go to cover `silence` of time during which the
    /// store was reachable: a session silent since before `now - cover(silence)` has been
    /// silent for `silence` of reachable time. At least `silence`.
    pub(crate) fn cover(&self, now: Timestamp, silence: Duration) -> Duration {
        let mut left = silence;
        let mut at = now;
        let mut intervals: Vec<(Timestamp, Timestamp)> = self.intervals(now).collect();
        intervals.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
        for (start, end) in intervals {
            let end = end.min(at);
            if end <= start {
                continue;
            }
            let reachable = at.saturating_duration_since(end);
            if reachable >= left {
                break;
            }
            left -= reachable;
            at = start.min(at);
        }
        let back = now.saturating_duration_since(at).saturating_add(left);
        back.max(silence)
    }

    /// Ended outages and the ongoing one (up to `now`).
    fn intervals(&self, now: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        self.outages
            .iter()
            .copied()
            .chain(self.down_since.map(|s| (s, now.max(s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_millis(1_000_000_000 + secs * 1000)
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn an_outage_runs_from_the_last_success_to_the_first_after_it() {
        let mut h = Reachability::new(t(0));
        h.observe(true, t(10));
        h.observe(false, t(14));
        h.observe(false, t(20));
        assert!(h.is_down());
        assert!(!h.may_judge(t(20), s(5)));
        assert_eq!(h.unreachable_within(t(0), t(20)), s(10), "ongoing, from 10");
        h.observe(true, t(30));
        assert!(!h.is_down());
        assert!(h.take_recovery());
        assert!(!h.take_recovery());
        assert_eq!(h.unreachable_within(t(0), t(100)), s(20));
        assert_eq!(h.unreachable_within(t(25), t(100)), s(5));
        assert!(!h.may_judge(t(34), s(5)), "settling");
        assert!(h.may_judge(t(35), s(5)));
    }

    #[test]
    fn cover_skips_outage_time() {
        let mut h = Reachability::new(t(0));
        assert_eq!(
            h.cover(t(100), s(60)),
            s(60),
            "no outage: the silence itself"
        );
        h.observe(true, t(50));
        h.observe(false, t(55));
        h.observe(true, t(70));
        // Reachable from 70 to 100 (30 s), then before 50: 30 s more reaches back to 20.
        assert_eq!(h.cover(t(100), s(60)), s(80));
        assert_eq!(h.unreachable_within(t(20), t(100)), s(20));
        // An outage older than the window changes nothing.
        assert_eq!(h.cover(t(200), s(60)), s(60));
    }
}
