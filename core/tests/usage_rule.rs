//! The billing rule's properties, over random sessions and ranges: what a bill relies on
//! when usage is cut into periods and ranges. `PROPTEST_CASES` sets the number of cases.

use proptest::prelude::*;
use session_lifecycle::usage::{BillingRule, MeterStart, MeteredSession, Rounding};
use session_lifecycle::{EndReason, Timestamp};

fn ms(m: u64) -> Timestamp {
    Timestamp::from_millis(m)
}

fn rule() -> impl Strategy<Value = BillingRule> {
    (any::<bool>(), any::<bool>()).prop_map(|(ready, minute)| BillingRule {
        meter: if ready {
            MeterStart::Ready
        } else {
            MeterStart::Started
        },
        rounding: if minute {
            Rounding::Minute
        } else {
            Rounding::Second
        },
    })
}

/// A session with instants in order: started, then maybe ready, then maybe ended (for any
/// reason), its node last seen somewhere in between.
fn session() -> impl Strategy<Value = MeteredSession> {
    (
        0u64..1_000_000,
        proptest::option::of(0u64..100_000),
        proptest::option::of((0u64..1_000_000, 0..EndReason::ALL.len())),
        0u64..1_000_000,
    )
        .prop_map(|(start, ready, end, seen)| {
            let ended = end.map(|(after, r)| (ms(start + after), EndReason::ALL[r]));
            MeteredSession {
                started_at: ms(start),
                ready_at: ready.map(|r| ms(start + r)),
                ended,
                node_last_seen: Some(ms(start + seen)),
            }
        })
}

proptest! {
    /// Cutting a range at any point splits its billable time exactly: nothing lost, nothing
    /// counted twice, so period records and day or hour groups add up to the range's total.
    #[test]
    fn usage_ranges_split_without_loss(
        rule in rule(),
        s in session(),
        a in 0u64..3_000_000,
        b in 0u64..3_000_000,
        c in 0u64..3_000_000,
    ) {
        let mut cuts = [a, b, c];
        cuts.sort();
        let now = ms(3_000_000);
        let whole = rule.interval(&s, now).map_or(0, |i| i.millis_within(ms(cuts[0]), ms(cuts[2])));
        let parts = rule.interval(&s, now).map_or(0, |i| {
            i.millis_within(ms(cuts[0]), ms(cuts[1])) + i.millis_within(ms(cuts[1]), ms(cuts[2]))
        });
        prop_assert_eq!(whole, parts);
    }

    /// A session is never billed outside its life, never for a failed start, never past the
    /// last sight of a lost node; rounding only adds, and less than a minute.
    #[test]
    fn usage_stays_inside_what_the_session_lived(rule in rule(), s in session()) {
        let now = ms(3_000_000);
        let exact_rule = BillingRule { rounding: Rounding::Second, ..rule };
        let billed = rule.billable_millis(&s, now);
        let lived_until = s.ended.map_or(now, |(at, _)| at);
        let lived = lived_until.as_millis() - s.started_at.as_millis();
        match s.ended {
            Some((_, EndReason::StartFailed)) => prop_assert_eq!(billed, 0),
            Some((at, EndReason::NodeLost)) => {
                let seen = s.node_last_seen.unwrap().min(at);
                prop_assert!(billed <= seen.as_millis().saturating_sub(s.started_at.as_millis()));
            }
            _ => {}
        }
        let exact = exact_rule.billable_millis(&s, now);
        prop_assert!(exact <= lived);
        prop_assert!(billed >= exact && billed - exact < 60_000);
        if let Some(i) = exact_rule.interval(&s, now) {
            prop_assert!(i.from() >= s.started_at && i.to() <= lived_until);
        }
        if matches!(s.ended, Some((_, EndReason::Shutdown | EndReason::NodeLost))) {
            prop_assert_eq!(billed, exact, "our failures are never rounded up");
        }
    }
}
