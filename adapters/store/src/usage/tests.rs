//! settle()'s rules, case by case.

use super::sql::UsageRow;
use super::*;
use session_lifecycle::EndReason;
use session_lifecycle::usage::{MeterStart, Rounding};

const PERIOD: Duration = Duration::from_secs(300);
/// 2026-12-01T10:00:00Z, on an hour boundary.
const T0: u64 = 1_764_583_200_000;

fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

fn state(ready: Option<u64>, ended: Option<(u64, EndReason)>) -> UsageState {
    UsageState {
        session: SessionId::from_ulid_parts(at(0), 7),
        tenant: "acme".into(),
        rule: BillingRule {
            meter: MeterStart::Ready,
            rounding: Rounding::Second,
        },
        metered: MeteredSession {
            started_at: at(10),
            ready_at: ready.map(at),
            ended: ended.map(|(s, r)| (at(s), r)),
            node_last_seen: None,
        },
        closed_to: None,
    }
}

/// Settles `state` with `records`, then applies the settlement as a store would:
/// the session's records afterwards.
fn apply(
    state: &mut UsageState,
    records: &mut Vec<UsageRecord>,
    close: Option<Timestamp>,
    now: Timestamp,
) -> Settlement {
    let settled = settle(state, records, close.map(|b| (b, PERIOD)), now);
    for (seq, by) in &settled.superseded {
        let old = records.iter_mut().find(|r| r.seq == *seq).unwrap();
        assert!(old.superseded_by.is_none(), "superseded twice");
        old.superseded_by = Some(by.clone());
    }
    records.extend(settled.records.iter().cloned());
    if let Some(to) = settled.closed_to {
        state.closed_to = Some(to);
    }
    settled
}

fn latest_ms(records: &[UsageRecord]) -> u64 {
    totals(records, at(0), at(100_000), None, SessionPage::ALL).total_ms
}

#[test]
fn an_ended_session_is_recorded_once_in_pieces_that_never_cross_an_hour() {
    // Ready 10:00:20, ended 11:00:30: 3610 s, across one hour boundary.
    let mut s = state(Some(20), Some((3630, EndReason::Requested)));
    let mut records = Vec::new();
    let first = apply(&mut s, &mut records, None, at(3630));
    assert_eq!(first.records.len(), 2);
    assert_eq!(latest_ms(&records), 3_610_000);
    assert_eq!(
        first.records[0].id,
        format!("usage:{}:{}", s.session, T0 + 20_000)
    );
    assert_eq!(first.records[1].span.0, at(3600));
    assert!(first.closed_to.is_none(), "an end closes no period");
    // Settling again (a retried step) writes nothing.
    assert_eq!(
        apply(&mut s, &mut records, None, at(3700)),
        Settlement::default()
    );
}

#[test]
fn closed_periods_and_the_end_add_up_to_the_billable_interval() {
    let mut s = state(Some(20), None);
    let mut records = Vec::new();
    // Closes at 10:05 and 10:10; closing 10:10 again writes nothing.
    apply(&mut s, &mut records, Some(at(300)), at(301));
    apply(&mut s, &mut records, Some(at(600)), at(601));
    assert_eq!(
        apply(&mut s, &mut records, Some(at(600)), at(602)),
        Settlement::default()
    );
    assert_eq!(s.closed_to, Some(at(600)));
    assert_eq!(latest_ms(&records), 580_000);
    s.metered.ended = Some((at(700), EndReason::Requested));
    let end = apply(&mut s, &mut records, None, at(700));
    assert_eq!(end.records.len(), 1, "only the rest after the last close");
    assert_eq!(end.records[0].span, (at(600), at(700)));
    assert_eq!(latest_ms(&records), 680_000);
    assert!(records.iter().all(|r| r.corrects.is_none()));
}

#[test]
fn a_node_lost_before_a_closed_boundary_corrects_the_record_it_overran() {
    let mut s = state(Some(20), None);
    let mut records = Vec::new();
    apply(&mut s, &mut records, Some(at(600)), at(601));
    // Its node was last heard of at 10:07, after which a period to 10:10 was closed.
    s.metered.ended = Some((at(900), EndReason::NodeLost));
    s.metered.node_last_seen = Some(at(420));
    let end = apply(&mut s, &mut records, None, at(900));
    assert_eq!(end.superseded.len(), 1);
    let correction = &end.records[0];
    let replaced = records
        .iter()
        .find(|r| r.seq == end.superseded[0].0)
        .unwrap();
    assert_eq!(correction.corrects.as_ref(), Some(&replaced.id));
    assert_eq!(correction.id, format!("{}:r2", replaced.id));
    assert_eq!(correction.revision, 2);
    assert_eq!(correction.span, replaced.span);
    assert_eq!(
        latest_ms(&records),
        400_000,
        "billed to the last heartbeat only"
    );
}

#[test]
fn a_late_readiness_report_corrects_the_periods_metered_from_the_start() {
    let mut s = state(None, None);
    let mut records = Vec::new();
    apply(&mut s, &mut records, Some(at(300)), at(301));
    assert_eq!(
        latest_ms(&records),
        290_000,
        "metered from its start meanwhile"
    );
    s.metered.ready_at = Some(at(100));
    let ready = apply(&mut s, &mut records, None, at(302));
    assert_eq!(ready.records.len(), 1);
    assert_eq!(latest_ms(&records), 200_000);
}

#[test]
fn a_start_failure_is_never_billed_and_zeroes_what_was_closed() {
    let mut s = state(None, None);
    let mut records = Vec::new();
    apply(&mut s, &mut records, Some(at(300)), at(301));
    s.metered.ended = Some((at(310), EndReason::StartFailed));
    let end = apply(&mut s, &mut records, None, at(310));
    assert_eq!(end.records.len(), 1);
    assert_eq!(end.records[0].billable, None, "a correction to zero");
    assert_eq!(latest_ms(&records), 0);
}

#[test]
fn a_stored_row_gives_back_the_record_with_its_identifiers() {
    let mut s = state(Some(20), None);
    let mut records = Vec::new();
    apply(&mut s, &mut records, Some(at(600)), at(601));
    s.metered.ended = Some((at(650), EndReason::NodeLost));
    s.metered.node_last_seen = Some(at(500));
    apply(&mut s, &mut records, None, at(650));
    assert!(records.iter().any(|r| r.superseded_by.is_some()));
    for record in &records {
        let back = UsageRow::of(record).into_record().unwrap();
        assert_eq!(&back, record);
    }
}
