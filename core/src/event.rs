//! What the outside world is told about a session, and how hard it is told.
//!
//! Each session has at most one event of each [`EventKind`]; the kind's
//! [`sequence`](EventKind::sequence) orders a session's events for a receiver (gaps are
//! events that did not happen, such as `ready` for a session that failed to start). A
//! driver writes the event with the state change that causes it (see the kinds), and
//! delivers it at least once; [`DeliveryPolicy`] decides when a failed delivery is tried
//! again and when it is given up.

use core::time::Duration;

use crate::time::Timestamp;

/// A session event, in the order a session goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// The session was created (written with the create).
    Started,
    /// Its avatar server reported it is ready to serve.
    Ready,
    /// The session ended (written with the end).
    Ended,
    /// Every resource it held is given back: its GPU capacity is free again (written with
    /// the last release, or with the end of a session that held nothing).
    Released,
    /// A usage record of the session was written (with its cause: a closed usage period,
    /// the end, or a correction): the record's place among the session's usage records,
    /// from 1. Its own type, for billing systems; not one of [`EventKind::ALL`].
    UsageRecorded(u32),
}

/// Usage events are numbered after the session's own: sequence `USAGE_SEQUENCE_BASE + n`
/// is its `n`-th usage record.
pub const USAGE_SEQUENCE_BASE: u32 = 100;

impl EventKind {
    /// Every kind of the session's own lifecycle, in sequence order.
    pub const ALL: [EventKind; 4] = [
        EventKind::Started,
        EventKind::Ready,
        EventKind::Ended,
        EventKind::Released,
    ];

    /// The event's type on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "session.started",
            EventKind::Ready => "session.ready",
            EventKind::Ended => "session.ended",
            EventKind::Released => "session.released",
            EventKind::UsageRecorded(_) => "usage.recorded",
        }
    }

    /// The lifecycle kind whose wire type is `text` (one of [`EventKind::ALL`]).
    pub fn from_name(text: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Its place among the session's events (1 for `started`): the per-session sequence
    /// number a receiver orders by.
    pub const fn sequence(self) -> u32 {
        match self {
            EventKind::Started => 1,
            EventKind::Ready => 2,
            EventKind::Ended => 3,
            EventKind::Released => 4,
            EventKind::UsageRecorded(n) => USAGE_SEQUENCE_BASE.saturating_add(n),
        }
    }

    /// The kind with sequence number `sequence`.
    pub fn from_sequence(sequence: u32) -> Option<EventKind> {
        if sequence > USAGE_SEQUENCE_BASE {
            return Some(EventKind::UsageRecorded(sequence - USAGE_SEQUENCE_BASE));
        }
        EventKind::ALL
            .into_iter()
            .find(|k| k.sequence() == sequence)
    }
}

/// When a failed delivery is tried again: exponential backoff with jitter, for a bounded
/// time after the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// The wait after the first failure.
    pub backoff_initial: Duration,
    /// The longest wait between two attempts.
    pub backoff_max: Duration,
    /// How long after the event deliveries are tried; a delivery that has not succeeded
    /// by then is given up (failed).
    pub retry_for: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStep {
    /// Try again at this time.
    RetryAt(Timestamp),
    /// Give up: the delivery failed.
    GiveUp,
}

impl DeliveryPolicy {
    /// One second, doubling up to an hour, for 24 hours.
    pub const DEFAULT: DeliveryPolicy = DeliveryPolicy {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(3600),
        retry_for: Duration::from_secs(24 * 3600),
    };

    /// After the `attempts`-th failed attempt (1 for the first) at `now` of an event that
    /// happened at `created_at`: the next attempt, or give up. `jitter` (any value, drawn
    /// at random by the driver) spreads the wait over its upper half, so that receivers
    /// coming back are not met by every retry at once. The last retry is never later than
    /// `created_at + retry_for`.
    pub fn after_failure(
        &self,
        attempts: u32,
        created_at: Timestamp,
        now: Timestamp,
        jitter: u32,
    ) -> DeliveryStep {
        let deadline = created_at.saturating_add(self.retry_for);
        if now >= deadline {
            return DeliveryStep::GiveUp;
        }
        let doublings = attempts.saturating_sub(1).min(32);
        let full = self
            .backoff_initial
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max);
        // Half of the wait, plus a jittered share of the other half.
        let half = full / 2;
        let spread =
            (half.as_millis() as u64).saturating_mul(u64::from(jitter)) / u64::from(u32::MAX);
        let wait = half + Duration::from_millis(spread);
        DeliveryStep::RetryAt(now.saturating_add(wait).min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_order_by_sequence() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
            assert_eq!(EventKind::from_sequence(kind.sequence()), Some(kind));
        }
        assert!(
            EventKind::ALL
                .windows(2)
                .all(|w| w[0].sequence() < w[1].sequence())
        );
        assert_eq!(EventKind::from_name("session.paused"), None);
        let usage = EventKind::UsageRecorded(3);
        assert_eq!(EventKind::from_sequence(usage.sequence()), Some(usage));
        assert_eq!(EventKind::from_sequence(USAGE_SEQUENCE_BASE), None);
    }

    #[test]
    fn retries_back_off_within_their_jitter_and_stop_at_the_deadline() {
        let policy = DeliveryPolicy::DEFAULT;
        let t0 = Timestamp::from_millis(1_000_000);
        for (attempts, full_ms) in [(1u32, 1_000u64), (2, 2_000), (5, 16_000), (40, 3_600_000)] {
            for jitter in [0, u32::MAX / 2, u32::MAX] {
                let DeliveryStep::RetryAt(at) = policy.after_failure(attempts, t0, t0, jitter)
                else {
                    panic!("gave up too early")
                };
                let wait = at.as_millis() - t0.as_millis();
                assert!(
                    wait >= full_ms / 2 && wait <= full_ms,
                    "{attempts} {jitter} {wait}"
                );
            }
        }
        let late = t0.saturating_add(policy.retry_for);
        assert_eq!(policy.after_failure(3, t0, late, 0), DeliveryStep::GiveUp);
        let almost = late.saturating_sub(Duration::from_millis(10));
        assert_eq!(
            policy.after_failure(30, t0, almost, u32::MAX),
            DeliveryStep::RetryAt(late)
        );
    }
}
