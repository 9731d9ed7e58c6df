//! Usage: the durable records a bill is cut from, written by the store in the same step as
//! their cause, and the arithmetic every store shares to write, total and reconcile them.
//!
//! A session's billable interval is the core's
//! [`BillingRule::interval`](session_lifecycle::usage::BillingRule::interval), under the
//! rule its tenant had when it was created (kept with the session). The store records it
//! in pieces that never overlap:
//!
//! - while the session runs, one **period record** per closed period (periods are
//!   `period`-long spans counted from the epoch, closed by [`UsageLedger::close_usage`]):
//!   the billable part of that period;
//! - when it ends, in the end's own step, the rest: its billable interval from the end of
//!   the last closed period on (one record per hour it spans, usually one);
//! - when a later cause moves a boundary already recorded (a readiness report after
//!   periods were closed from the start, an end of ours before the end of a closed period),
//!   a **correction** of each record it changes, in that cause's step: a new record with
//!   a new identifier that names the one it replaces. Nothing recorded is ever changed in
//!   place; the replaced record is marked superseded.
//!
//! No record spans an hour boundary, so a range's hour or day groups are sums of whole
//! records. So the latest records of a session add up, to the millisecond, to its billable interval
//! (of an ended session), or to its billable part up to its last closed period (of a
//! running one), however the range is cut. [`settle`] is that arithmetic, written once.

use std::collections::BTreeMap;
use std::time::Duration;

use session_lifecycle::usage::{BillingRule, Interval, MeteredSession};
use session_lifecycle::{SessionId, Timestamp};

use crate::error::{BoxFuture, StoreError};

/// One usage record: billable time of one session within one span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Its identifier, stable on every retry and on every instance (a billing system
    /// deduplicates by it): `usage:<session>:<span start ms>`, with `:r<revision>`
    /// appended for a correction.
    pub id: String,
    /// The session.
    pub session: SessionId,
    /// Its tenant.
    pub tenant: String,
    /// Its place among the session's records (1 for the first written).
    pub seq: u32,
    /// The span it accounts for: a period, or a part of one (never across an hour
    /// boundary).
    pub span: (Timestamp, Timestamp),
    /// The billable interval inside the span (`None`: nothing, as a correction to zero).
    pub billable: Option<Interval>,
    /// 1 for a first record, one more for each correction of it.
    pub revision: u32,
    /// The identifier of the record it corrects, if it is a correction.
    pub corrects: Option<String>,
    /// The identifier of the correction that replaced it, if one did.
    pub superseded_by: Option<String>,
    /// When it was written (the clock of the step that wrote it).
    pub recorded_at: Timestamp,
}

impl UsageRecord {
    /// Its billable milliseconds.
    pub fn millis(&self) -> u64 {
        self.billable.map_or(0, |i| i.millis())
    }

    /// Its billable milliseconds inside `[from, to)`.
    pub fn millis_within(&self, from: Timestamp, to: Timestamp) -> u64 {
        self.billable.map_or(0, |i| i.millis_within(from, to))
    }
}

/// What a session's usage depends on, as its row keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageState {
    /// The session.
    pub session: SessionId,
    /// Its tenant.
    pub tenant: String,
    /// Its tenant's billing rule when it was created.
    pub rule: BillingRule,
    /// Its instants.
    pub metered: MeteredSession,
    /// The end of its last closed usage period, if one was closed (kept after its end).
    pub closed_to: Option<Timestamp>,
}

impl UsageState {
    /// What its latest records must add up to: the billable interval of an ended
    /// session; of a running one, the billable part up to `horizon`.
    pub fn target(&self, horizon: Option<Timestamp>) -> Option<Interval> {
        match self.metered.ended {
            Some(_) => self.rule.interval(&self.metered, Timestamp::from_millis(0)),
            None => {
                let to = horizon?;
                self.rule.interval(&self.metered, to)
            }
        }
    }
}

/// The writes one settling of a session's usage makes, in its cause's step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Records to insert.
    pub records: Vec<UsageRecord>,
    /// `(seq, by)`: the session's records (by their `seq`) a correction replaces, and
    /// the correction's identifier.
    pub superseded: Vec<(u32, String)>,
    /// The session's new `closed_to`, if a close moved it.
    pub closed_to: Option<Timestamp>,
}

/// The identifier of revision `revision` of the record of `session` whose span starts at
/// `span_from`: `usage:<session>:<span start ms>`, with `:r<revision>` after the first.
/// A session's spans never overlap, so the span's start names the record and the
/// revision its correction; stores keep neither identifier, they derive it.
pub fn record_id(session: SessionId, span_from: Timestamp, revision: u32) -> String {
    let ms = span_from.as_millis();
    if revision > 1 {
        format!("usage:{session}:{ms}:r{revision}")
    } else {
        format!("usage:{session}:{ms}")
    }
}

/// Milliseconds in an hour: no record spans an hour boundary, so every record lies in one
/// UTC hour and one UTC day (and a range's groups are sums of whole records).
pub const HOUR_MS: u64 = 3_600_000;

/// The end of the last usage period (`period` long, counted from the epoch) that ended at
/// or before `now`: how far [`UsageLedger::close_usage`] closes.
pub fn period_boundary(now: Timestamp, period: Duration) -> Timestamp {
    let period_ms = (period.as_millis() as u64).max(1);
    Timestamp::from_millis(now.as_millis() / period_ms * period_ms)
}

/// The spans `[from, to)` is cut into: at every multiple of `step` (a period), and at
/// every hour boundary.
fn spans(from: u64, to: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = step.max(1);
    let mut start = from;
    std::iter::from_fn(move || {
        if start >= to {
            return None;
        }
        let next_step = (start / step + 1).saturating_mul(step);
        let next_hour = (start / HOUR_MS + 1).saturating_mul(HOUR_MS);
        let end = next_step.min(next_hour).min(to);
        let span = (start, end);
        start = end;
        Some(span)
    })
}

/// Settles a session's usage after its cause: corrects every latest record the session's
/// state no longer agrees with; closes the periods up to `close` (`(boundary, period)`,
/// for a running session); records the rest of an ended one, from the end of what is
/// recorded up to its billable end, after which it is settled for good (settling again
/// writes nothing). Every record spans at most one period and one hour. `records` are
/// every record the session has (in any order), `now` the cause's time.
///
/// A session has records only once a period of it was closed (`closed_to` is set) or it
/// ended: a store settling a cause of a session that was running before it (every cause
/// is one) reads its records only if `closed_to` is set.
pub fn settle(
    state: &UsageState,
    records: &[UsageRecord],
    close: Option<(Timestamp, Duration)>,
    now: Timestamp,
) -> Settlement {
    let mut out = Settlement::default();
    let ended = state.metered.ended.is_some();
    let mut next_seq = records.iter().map(|r| r.seq).max().unwrap_or(0) + 1;
    let boundary = close
        .map(|(b, _)| b)
        .filter(|b| !ended && state.closed_to < Some(*b));
    let horizon = boundary.or(state.closed_to);
    let target = state.target(horizon);
    let part = |from: Timestamp, to: Timestamp| target.and_then(|t| t.within(from, to));
    let mut latest: Vec<&UsageRecord> = records
        .iter()
        .filter(|r| r.superseded_by.is_none())
        .collect();
    latest.sort_by_key(|r| r.seq);
    for old in latest {
        let billable = part(old.span.0, old.span.1);
        if billable == old.billable {
            continue;
        }
        let revision = old.revision + 1;
        let id = record_id(state.session, old.span.0, revision);
        out.superseded.push((old.seq, id.clone()));
        out.records.push(UsageRecord {
            id,
            session: state.session,
            tenant: state.tenant.clone(),
            seq: next_seq,
            span: old.span,
            billable,
            revision,
            corrects: Some(old.id.clone()),
            superseded_by: None,
            recorded_at: now,
        });
        next_seq += 1;
    }
    // New records: `[from, to)` cut into spans, each with its billable part.
    let (from, to, step) = match (ended, boundary, close, target) {
        (false, Some(b), Some((_, period)), _) => {
            let period = (period.as_millis() as u64).max(1);
            let first = match (state.closed_to, target) {
                (Some(c), _) => c.as_millis(),
                (None, Some(t)) => t.from().as_millis() / period * period,
                (None, None) => b.as_millis(),
            };
            out.closed_to = Some(b);
            (first, b.as_millis(), period)
        }
        (true, _, _, Some(t)) => {
            // What is recorded already: its closed periods, and whatever an earlier
            // settling of its end recorded (so settling again writes nothing).
            let recorded = records.iter().map(|r| r.span.1).max();
            let first = state
                .closed_to
                .max(recorded)
                .map_or(t.from(), |c| c.max(t.from()));
            (first.as_millis(), t.to().as_millis(), HOUR_MS)
        }
        _ => (0, 0, 1),
    };
    for (start, end) in spans(from, to, step) {
        let span = (Timestamp::from_millis(start), Timestamp::from_millis(end));
        if let Some(billable) = part(span.0, span.1) {
            out.records.push(UsageRecord {
                id: record_id(state.session, span.0, 1),
                session: state.session,
                tenant: state.tenant.clone(),
                seq: next_seq,
                span,
                billable: Some(billable),
                revision: 1,
                corrects: None,
                superseded_by: None,
                recorded_at: now,
            });
            next_seq += 1;
        }
    }
    out
}

/// How [`UsageLedger::usage_totals`] groups a range's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    /// By UTC day.
    Day,
    /// By UTC hour.
    Hour,
    /// By session.
    Session,
}

impl UsageGrouping {
    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageGrouping::Day => "day",
            UsageGrouping::Hour => "hour",
            UsageGrouping::Session => "session",
        }
    }

    /// The grouping named `name`.
    pub fn from_name(name: &str) -> Option<UsageGrouping> {
        [
            UsageGrouping::Day,
            UsageGrouping::Hour,
            UsageGrouping::Session,
        ]
        .into_iter()
        .find(|g| g.as_str() == name)
    }
}

/// Which session groups a [`UsageGrouping::Session`] answer holds: those after `after` (by
/// id), at most `limit`. The total is always the whole range's. Other groupings ignore it
/// (a year has at most 8,784 hours; a tenant can have millions of sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPage {
    /// The last session of the previous page, if any.
    pub after: Option<SessionId>,
    /// The most groups to answer.
    pub limit: u32,
}

impl SessionPage {
    /// Every session group.
    pub const ALL: SessionPage = SessionPage {
        after: None,
        limit: u32::MAX,
    };
}

/// One group of a usage total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageGroup {
    /// A UTC day or hour starting here.
    Time(Timestamp),
    /// A session, of this tenant.
    Session(SessionId, String),
}

/// A range's usage: its total, and its groups with any billable time, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Billable milliseconds inside the range.
    pub total_ms: u64,
    /// Per group, in order (time, or session id), only those with billable time.
    pub groups: Vec<(UsageGroup, u64)>,
}

/// The usage of `records` inside `[from, to)`, cut at the range's edges, by `grouping`.
/// Only latest records count (superseded ones are skipped).
pub fn totals<'a>(
    records: impl IntoIterator<Item = &'a UsageRecord>,
    from: Timestamp,
    to: Timestamp,
    grouping: Option<UsageGrouping>,
    page: SessionPage,
) -> UsageTotals {
    let bucket_ms: u64 = match grouping {
        Some(UsageGrouping::Day) => 86_400_000,
        Some(UsageGrouping::Hour) => 3_600_000,
        _ => 0,
    };
    let mut by_time: BTreeMap<u64, u64> = BTreeMap::new();
    let mut by_session: BTreeMap<SessionId, (String, u64)> = BTreeMap::new();
    let mut total_ms = 0;
    for r in records {
        if r.superseded_by.is_some() {
            continue;
        }
        let Some(part) = r.billable.and_then(|b| b.within(from, to)) else {
            continue;
        };
        total_ms += part.millis();
        match grouping {
            Some(UsageGrouping::Session) => {
                let entry = by_session
                    .entry(r.session)
                    .or_insert_with(|| (r.tenant.clone(), 0));
                entry.1 += part.millis();
            }
            Some(_) => {
                let mut start = part.from().as_millis();
                while start < part.to().as_millis() {
                    let bucket = start / bucket_ms * bucket_ms;
                    let end = (bucket + bucket_ms).min(part.to().as_millis());
                    *by_time.entry(bucket).or_default() += end - start;
                    start = end;
                }
            }
            None => {}
        }
    }
    let mut groups: Vec<(UsageGroup, u64)> = by_time
        .into_iter()
        .map(|(b, ms)| (UsageGroup::Time(Timestamp::from_millis(b)), ms))
        .collect();
    groups.extend(
        by_session
            .into_iter()
            .filter(|(id, _)| page.after.is_none_or(|a| *id > a))
            .take(page.limit as usize)
            .map(|(id, (tenant, ms))| (UsageGroup::Session(id, tenant), ms)),
    );
    UsageTotals { total_ms, groups }
}

/// One session whose recorded usage disagrees with what its record says it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDifference {
    /// The session.
    pub session: SessionId,
    /// Its tenant.
    pub tenant: String,
    /// Billable milliseconds inside the range its record gives (see [`UsageState::target`]).
    pub expected_ms: u64,
    /// Billable milliseconds inside the range its latest usage records add up to.
    pub recorded_ms: u64,
    /// What disagrees, in words.
    pub problem: String,
}

/// Checks one session's records against its state, inside `[from, to)`: that its latest
/// records add up to its billable time there, that they do not overlap, and that an ended
/// session has been settled (none of its periods left after its end). `None`: they agree.
pub fn reconcile_session(
    state: &UsageState,
    records: &[UsageRecord],
    from: Timestamp,
    to: Timestamp,
) -> Option<UsageDifference> {
    let target = state.target(state.closed_to);
    let expected_ms = target.map_or(0, |t| t.millis_within(from, to));
    let misplaced = records.iter().any(|r| {
        let (from, to) = (r.span.0.as_millis(), r.span.1.as_millis());
        let across_hour = to > from && (to - 1) / HOUR_MS != from / HOUR_MS;
        let outside_span = r
            .billable
            .is_some_and(|b| b.from() < r.span.0 || b.to() > r.span.1);
        across_hour || outside_span
    });
    let mut latest: Vec<Interval> = records
        .iter()
        .filter(|r| r.superseded_by.is_none())
        .filter_map(|r| r.billable)
        .collect();
    latest.sort_by_key(|i| i.from());
    let recorded_ms: u64 = latest.iter().map(|i| i.millis_within(from, to)).sum();
    let overlap = latest.windows(2).any(|w| w[1].from() < w[0].to());
    let outside = latest
        .iter()
        .any(|i| target.is_none_or(|t| i.from() < t.from() || i.to() > t.to()));
    let problem = if misplaced {
        "a record crosses an hour boundary or lies outside its span"
    } else if overlap {
        "latest records overlap"
    } else if outside {
        "a record lies outside the billable interval"
    } else if expected_ms != recorded_ms {
        "recorded usage differs from the session record"
    } else {
        return None;
    };
    Some(UsageDifference {
        session: state.session,
        tenant: state.tenant.clone(),
        expected_ms,
        recorded_ms,
        problem: problem.to_owned(),
    })
}

/// Usage records: closing periods of running sessions, and reading what was recorded.
/// Records of ready and end are written by those steps themselves
/// (`EventOutbox::record_ready`, `SessionStore::end`, `NodeMembership::end_dead_nodes`).
pub trait UsageLedger: Send + Sync + 'static {
    /// Closes the usage periods (`period` long, counted from the epoch) that ended at or
    /// before `now` of up to `limit` started sessions that `node` runs: each gets its
    /// period records up to the last boundary, once (closing again writes nothing).
    /// Returns how many sessions it closed periods of.
    fn close_usage<'a>(
        &'a self,
        node: &'a str,
        now: Timestamp,
        period: Duration,
        limit: u32,
    ) -> BoxFuture<'a, Result<u32, StoreError>>;

    /// The usage of `tenant` (`None`: every tenant's) inside `[from, to)`, each record cut
    /// at the range's edges, in total and by `grouping` (as [`totals`] adds up the latest
    /// records); session groups only those `page` names. Total and groups are read in one
    /// snapshot.
    fn usage_totals(
        &self,
        tenant: Option<String>,
        from: Timestamp,
        to: Timestamp,
        grouping: Option<UsageGrouping>,
        page: SessionPage,
    ) -> BoxFuture<'_, Result<UsageTotals, StoreError>>;

    /// Every usage record of `session`, superseded ones too, in the order written.
    fn session_usage(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<UsageRecord>, StoreError>>;

    /// The usage record `seq` of `session` (what its `usage.recorded` event reports), if
    /// there is one: one row, however many periods the session has run.
    fn usage_record(
        &self,
        session: SessionId,
        seq: u32,
    ) -> BoxFuture<'_, Result<Option<UsageRecord>, StoreError>>;

    /// The usage state of up to `limit` sessions whose life overlaps `[from, to)` (started
    /// before `to`, not ended a minute or more before `from`: rounding may bill up to a
    /// minute past an end), by id, after `after`, each with its records: all read in one
    /// snapshot, so that a cause committing meanwhile cannot make a state and its records
    /// disagree (what [`reconcile_session`] checks on a live store).
    fn usage_states(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<SessionId>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionUsage>, StoreError>>;
}

/// A session's usage state and its usage records, read together
/// (see [`UsageLedger::usage_states`]).
#[derive(Debug)]
pub struct SessionUsage {
    /// The session.
    pub session: SessionId,
    /// Its tenant.
    pub tenant: String,
    /// Its usage state; an error when its row cannot be read as one (a corrupt value, or
    /// one a newer release wrote): a difference to report, like an unreadable record.
    pub state: Result<UsageState, StoreError>,
    /// Every one of its usage records, superseded ones too, in the order written; an error
    /// when one cannot be read (a corrupt row): a difference to report, not a reason to
    /// stop reading the others.
    pub records: Result<Vec<UsageRecord>, StoreError>,
}

pub mod sql;
#[cfg(test)]
mod tests;
