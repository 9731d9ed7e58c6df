//! Billable time: the rule a tenant's bill is cut by, as arithmetic over the instants a
//! session's record keeps. Drivers compute usage with it when they record it and when
//! they reconcile, so both agree by construction.
//!
//! A session's billable interval runs from its meter start to its billable end:
//!
//! - the meter starts at `ready_at` ([`MeterStart::Ready`], the default) or `started_at`
//!   ([`MeterStart::Started`]); a session with no readiness report (no `ready_at`) is
//!   metered from `started_at` under either rule;
//! - it ends at `ended_at`, except where our side failed: a session ended `start_failed`
//!   is never billed, and one ended `node_lost` is billed only up to when its node was
//!   last heard from (`shutdown` ends at the moment of the stop, which is `ended_at`);
//! - a session still running is billed up to `now`;
//! - under [`Rounding::Minute`] an ended session's interval is extended to whole minutes,
//!   except after our failures (`node_lost`, `shutdown`): never billed past that moment.
//!
//! ```
//! use session_lifecycle::{EndReason, Timestamp};
//! use session_lifecycle::usage::{BillingRule, MeterStart, MeteredSession, Rounding};
//!
//! let at = |s: u64| Timestamp::from_millis(s * 1000);
//! let session = MeteredSession {
//!     started_at: at(100),
//!     ready_at: Some(at(104)),
//!     ended: Some((at(190), EndReason::Requested)),
//!     node_last_seen: None,
//! };
//! let rule = BillingRule { meter: MeterStart::Ready, rounding: Rounding::Minute };
//! let interval = rule.interval(&session, at(500)).unwrap();
//! // 86 s from readiness to the end, rounded up to whole minutes once it has ended.
//! assert_eq!((interval.from(), interval.to()), (at(104), at(224)));
//! assert_eq!(rule.billable_millis(&session, at(500)), 120_000);
//! // The part of it inside a range, cut at the range's edges.
//! assert_eq!(interval.millis_within(at(150), at(160)), 10_000);
//! ```

use crate::session::EndReason;
use crate::time::Timestamp;

/// Milliseconds in a minute.
const MINUTE_MS: u64 = 60_000;

/// What starts a session's meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeterStart {
    /// The session's start (`started_at`).
    Started,
    /// Its readiness report (`ready_at`); `started_at` for a session without one.
    #[default]
    Ready,
}

/// How a session's billable time is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Exact milliseconds, for a billing system that bills by the second.
    #[default]
    Second,
    /// Up to the next whole minute per session, once it has ended.
    Minute,
}

impl MeterStart {
    /// Its name in configuration and in the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            MeterStart::Started => "started",
            MeterStart::Ready => "ready",
        }
    }

    /// The meter start named `name`.
    pub fn from_name(name: &str) -> Option<MeterStart> {
        [MeterStart::Started, MeterStart::Ready]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

impl Rounding {
    /// Its name in configuration and in the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rounding::Second => "second",
            Rounding::Minute => "minute",
        }
    }

    /// The rounding named `name`.
    pub fn from_name(name: &str) -> Option<Rounding> {
        [Rounding::Second, Rounding::Minute]
            .into_iter()
            .find(|r| r.as_str() == name)
    }
}

/// A tenant's billing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BillingRule {
    /// What starts the meter.
    pub meter: MeterStart,
    /// How an ended session's total is rounded.
    pub rounding: Rounding,
}

/// The instants of a session that its bill depends on, as its record keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeteredSession {
    /// When it started.
    pub started_at: Timestamp,
    /// When its avatar server reported ready, if it did.
    pub ready_at: Option<Timestamp>,
    /// When and why it ended, if it has.
    pub ended: Option<(Timestamp, EndReason)>,
    /// For a session ended `node_lost`: when its node was last heard from.
    pub node_last_seen: Option<Timestamp>,
}

/// A half-open span of billable time, `[from, to)`, never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    from: Timestamp,
    to: Timestamp,
}

impl Interval {
    /// `[from, to)`, or `None` when it would be empty.
    pub fn new(from: Timestamp, to: Timestamp) -> Option<Interval> {
        (from < to).then_some(Interval { from, to })
    }

    /// The part of it inside `[from, to)`, if any.
    pub fn within(&self, from: Timestamp, to: Timestamp) -> Option<Interval> {
        Interval::new(self.from.max(from), self.to.min(to))
    }

    /// Where it starts.
    pub const fn from(&self) -> Timestamp {
        self.from
    }

    /// Where it ends (exclusive).
    pub const fn to(&self) -> Timestamp {
        self.to
    }

    /// Its length in milliseconds.
    pub const fn millis(&self) -> u64 {
        self.to.as_millis() - self.from.as_millis()
    }

    /// The milliseconds of it inside `[from, to)` (0 for a range it misses or an empty
    /// range).
    pub fn millis_within(&self, from: Timestamp, to: Timestamp) -> u64 {
        let start = self.from.max(from).as_millis();
        let end = self.to.min(to).as_millis();
        end.saturating_sub(start)
    }
}

impl BillingRule {
    /// The session's billable interval as of `now` (`None`: nothing billable). A running
    /// session's interval ends at `now`. Under [`Rounding::Minute`], an ended session's
    /// interval is extended to a whole number of minutes, unless it ended through our
    /// failure ([`EndReason::NodeLost`], [`EndReason::Shutdown`]): those are never billed
    /// past the moment our side failed.
    pub fn interval(&self, session: &MeteredSession, now: Timestamp) -> Option<Interval> {
        let from = match self.meter {
            MeterStart::Started => session.started_at,
            MeterStart::Ready => session.ready_at.unwrap_or(session.started_at),
        };
        let (to, rounds_up) = match session.ended {
            None => (now, false),
            Some((_, EndReason::StartFailed)) => return None,
            Some((at, EndReason::NodeLost)) => {
                (session.node_last_seen.map_or(at, |s| s.min(at)), false)
            }
            Some((at, EndReason::Shutdown)) => (at, false),
            Some((at, _)) => (at, self.rounding == Rounding::Minute),
        };
        let exact = Interval::new(from, to)?;
        if !rounds_up {
            return Some(exact);
        }
        let rounded = exact.millis().div_ceil(MINUTE_MS) * MINUTE_MS;
        Interval::new(from, Timestamp::from_millis(from.as_millis() + rounded))
    }

    /// The session's billable milliseconds as of `now`: the length of its
    /// [`interval`](Self::interval).
    pub fn billable_millis(&self, session: &MeteredSession, now: Timestamp) -> u64 {
        self.interval(session, now).map_or(0, |i| i.millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    fn ended(reason: EndReason) -> MeteredSession {
        MeteredSession {
            started_at: at(10),
            ready_at: Some(at(12)),
            ended: Some((at(70), reason)),
            node_last_seen: Some(at(40)),
        }
    }

    #[test]
    fn the_meter_starts_at_readiness_or_at_the_start_without_a_report() {
        let rule = BillingRule::default();
        assert_eq!(
            rule.billable_millis(&ended(EndReason::Requested), at(0)),
            58_000
        );
        let never_ready = MeteredSession {
            ready_at: None,
            ..ended(EndReason::Requested)
        };
        assert_eq!(rule.billable_millis(&never_ready, at(0)), 60_000);
        let from_start = BillingRule {
            meter: MeterStart::Started,
            ..rule
        };
        assert_eq!(
            from_start.billable_millis(&ended(EndReason::Requested), at(0)),
            60_000
        );
    }

    #[test]
    fn our_failures_are_not_billed_past_the_moment_they_happened() {
        let rule = BillingRule::default();
        assert_eq!(
            rule.billable_millis(&ended(EndReason::StartFailed), at(0)),
            0
        );
        assert_eq!(
            rule.billable_millis(&ended(EndReason::NodeLost), at(0)),
            28_000
        );
        let unseen = MeteredSession {
            node_last_seen: None,
            ..ended(EndReason::NodeLost)
        };
        assert_eq!(rule.billable_millis(&unseen, at(0)), 58_000);
        assert_eq!(
            rule.billable_millis(&ended(EndReason::Shutdown), at(0)),
            58_000
        );
        let minute = BillingRule {
            rounding: Rounding::Minute,
            ..rule
        };
        assert_eq!(
            minute.billable_millis(&ended(EndReason::Shutdown), at(0)),
            58_000,
            "our failures are not rounded up past the moment"
        );
        assert_eq!(
            minute.billable_millis(&ended(EndReason::NodeLost), at(0)),
            28_000
        );
    }

    #[test]
    fn a_running_session_is_billed_up_to_now_and_rounded_only_once_ended() {
        let rule = BillingRule {
            rounding: Rounding::Minute,
            ..BillingRule::default()
        };
        let running = MeteredSession {
            ended: None,
            ..ended(EndReason::Requested)
        };
        assert_eq!(rule.billable_millis(&running, at(20)), 8_000);
        assert_eq!(rule.billable_millis(&running, at(11)), 0);
        assert_eq!(
            rule.billable_millis(&ended(EndReason::Requested), at(0)),
            60_000
        );
        assert_eq!(
            rule.billable_millis(&ended(EndReason::StartFailed), at(0)),
            0
        );
    }

    #[test]
    fn an_interval_is_cut_at_a_range_edges() {
        let interval = Interval::new(at(10), at(20)).unwrap();
        assert_eq!(interval.millis_within(at(0), at(100)), 10_000);
        assert_eq!(interval.millis_within(at(15), at(100)), 5_000);
        assert_eq!(interval.millis_within(at(0), at(12)), 2_000);
        assert_eq!(interval.millis_within(at(20), at(30)), 0);
        assert_eq!(interval.millis_within(at(30), at(0)), 0);
        assert_eq!(Interval::new(at(5), at(5)), None);
    }
}
