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
    /// The last reading of the clock and of its monotonic counterpart, to tell a step of
    /// the wall clock from time passing.
    last_reading: Option<(Timestamp, Duration)>,
}

/// A wall clock running ahead of the monotonic clock by more than this has stepped.
const STEP_TOLERANCE: Duration = Duration::from_secs(1);

impl Reachability {
    /// What an engine starting at `now` knows: nothing from before. Whatever happened
    /// while this instance was not running (a crash, a restart, a clock step meanwhile)
    /// was heard by no one here, so it counts like an outage that ends now: a session of a
    /// node that was down gets the whole orphan timeout from the restart to report again,
    /// and another node is taken for dead only after a whole node timeout of silence seen
    /// from here.
    pub(crate) fn starting(now: Timestamp) -> Reachability {
        let mut reachability = Reachability::new(now);
        reachability
            .outages
            .push_back((Timestamp::from_millis(0), now));
        reachability
    }

    pub(crate) fn new(now: Timestamp) -> Reachability {
        Reachability {
            last_ok: now,
            down_since: None,
            outages: VecDeque::new(),
            recovered_at: None,
            recovery_due: false,
            last_reading: None,
        }
    }

    /// Records a reading of the clock (`now`) and of its monotonic counterpart (`mono`, if
    /// the clock has one). A wall clock that stepped forward skipped time in which no
    /// liveness could arrive: that time counts like an outage, and nothing is judged until
    /// it has settled. A step back only delays judgements.
    pub(crate) fn observe_clock(&mut self, now: Timestamp, mono: Option<Duration>) {
        let Some(mono) = mono else { return };
        if let Some((wall, at)) = self.last_reading {
            let expected = wall.saturating_add(mono.saturating_sub(at));
            if now > expected.saturating_add(STEP_TOLERANCE) {
                if self.outages.len() == REMEMBERED {
                    self.outages.pop_front();
                }
                self.outages.push_back((expected, now));
                self.recovered_at = Some(now);
            }
        }
        self.last_reading = Some((now, mono));
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
            .into_iter()
            .map(|(s, e)| e.min(to).saturating_duration_since(s.max(from)))
            .fold(Duration::ZERO, |a, b| a.saturating_add(b))
    }

    /// How far back from `now` one must go to cover `silence` of time during which the
    /// store was reachable: a session silent since before `now - cover(silence)` has been
    /// silent for `silence` of reachable time. At least `silence`.
    pub(crate) fn cover(&self, now: Timestamp, silence: Duration) -> Duration {
        let mut left = silence;
        let mut at = now;
        for (start, end) in self.intervals(now).into_iter().rev() {
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

    /// Ended outages and the ongoing one (up to `now`), merged where they overlap (a clock
    /// stepped back records later outages with earlier times), in order.
    fn intervals(&self, now: Timestamp) -> Vec<(Timestamp, Timestamp)> {
        let mut all: Vec<(Timestamp, Timestamp)> = self
            .outages
            .iter()
            .copied()
            .chain(self.down_since.map(|s| (s, now.max(s))))
            .collect();
        all.sort_unstable();
        let mut merged: Vec<(Timestamp, Timestamp)> = Vec::with_capacity(all.len());
        for (start, end) in all {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
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
    fn a_forward_step_of_the_clock_counts_like_an_outage() {
        let mut h = Reachability::new(t(0));
        h.observe_clock(t(10), Some(s(10)));
        // 5 s pass, the wall clock shows 125 s more.
        h.observe_clock(t(140), Some(s(15)));
        assert_eq!(h.unreachable_within(t(0), t(140)), s(125));
        assert!(!h.may_judge(t(145), s(10)), "settling after the step");
        assert!(h.may_judge(t(150), s(10)));
        // Reachable 15 s before the step and 20 s after it: 60 s of silence reaches back
        // over the skipped time.
        assert_eq!(h.cover(t(160), s(60)), s(185));
        // A step back, and time passing as it should, are no outage.
        h.observe_clock(t(100), Some(s(35)));
        h.observe_clock(t(130), Some(s(65)));
        assert_eq!(h.unreachable_within(t(0), t(200)), s(125));
        // A clock without a monotonic reading tells nothing.
        h.observe_clock(t(900), None);
        assert_eq!(h.unreachable_within(t(0), t(1000)), s(125));
    }

    #[test]
    fn outages_recorded_out_of_order_are_merged() {
        let mut h = Reachability::new(t(0));
        h.observe(true, t(100));
        h.observe_clock(t(100), Some(s(100)));
        // A short outage; the clock steps back 50 s; another; then it steps forward.
        h.observe(false, t(101));
        h.observe(true, t(103));
        h.observe_clock(t(55), Some(s(105)));
        h.observe(false, t(60));
        h.observe(true, t(62));
        h.observe_clock(t(190), Some(s(115)));
        // The forward step skipped 65..190, which holds the outages recorded before: one
        // span. 60 s of silence at 220: 30 s after it, 30 s before it.
        assert_eq!(h.cover(t(220), s(60)), s(185));
        assert_eq!(h.unreachable_within(t(0), t(250)), s(125));
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
