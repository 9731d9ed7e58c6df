//! Usage as SQL stores keep it: the totals query, and records and usage states row by row.

use session_lifecycle::usage::{BillingRule, Interval, MeterStart, MeteredSession, Rounding};
use session_lifecycle::{EndReason, Timestamp};

use super::{HOUR_MS, UsageGroup, UsageGrouping, UsageRecord, UsageState, UsageTotals, record_id};
use crate::error::StoreError;
use crate::rows::{corrupt, parse_id, timestamp};

/// The query SQL stores total usage with (see [`super::UsageLedger::usage_totals`]): rows of
/// (time bucket index, session id, tenant, billable ms), as [`totals_of_rows`] reads them.
/// `?1` tenant (NULL: all), `?2` from, `?3` to, and for [`UsageGrouping::Session`] the
/// page: `?4` the session after which it starts (`''` from the first), `?5` its limit
/// (the total then needs `totals_query(None, ..)` besides); `scoped` when `?1` names a tenant. Two
/// statements, not one with `?1 IS NULL OR tenant = ?1`: a planner cannot range over the
/// `(tenant, from_ms)` index with that, and a tenant's query would read every tenant's
/// records. Records never span an hour boundary, so a record's start names its hour and
/// day, and a range needs only records that start less than an hour before it.
pub fn totals_query(grouping: Option<UsageGrouping>, scoped: bool, postgres: bool) -> String {
    let bucket = match grouping {
        Some(UsageGrouping::Day) => "from_ms / 86400000",
        Some(UsageGrouping::Hour) => "from_ms / 3600000",
        _ => "0",
    };
    let session = match grouping {
        Some(UsageGrouping::Session) => "session_id",
        _ => "CAST(NULL AS TEXT)",
    };
    let (least, greatest, tenant) = match (postgres, scoped) {
        (true, true) => ("LEAST", "GREATEST", "tenant = $1"),
        (true, false) => ("LEAST", "GREATEST", "$1::TEXT IS NULL"),
        (false, true) => ("MIN", "MAX", "tenant = ?1"),
        (false, false) => ("MIN", "MAX", "?1 IS NULL"),
    };
    let (from, to) = if postgres { ("$2", "$3") } else { ("?2", "?3") };
    let (after, limit) = match (grouping, postgres) {
        (Some(UsageGrouping::Session), true) => (" AND session_id > $4", " LIMIT $5"),
        (Some(UsageGrouping::Session), false) => (" AND session_id > ?4", " LIMIT ?5"),
        _ => ("", ""),
    };
    // PostgreSQL still marks a replaced record by `superseded_by` (see its adapter).
    let latest = if postgres {
        "superseded_by IS NULL"
    } else {
        "NOT superseded"
    };
    format!(
        "SELECT CAST({bucket} AS BIGINT), {session}, MIN(tenant),
                CAST(SUM({least}(to_ms, {to}) - {greatest}(from_ms, {from})) AS BIGINT)
         FROM usage_records
         WHERE {latest} AND millis > 0 AND ({tenant})
           AND from_ms >= CAST({from} AS BIGINT) - {HOUR_MS} AND from_ms < {to} AND to_ms > {from}{after}
         GROUP BY 1, 2 ORDER BY 1, 2{limit}"
    )
}

/// The totals of [`totals_query`]'s rows for `grouping`.
pub fn totals_of_rows(
    rows: Vec<(i64, Option<String>, String, i64)>,
    grouping: Option<UsageGrouping>,
) -> Result<UsageTotals, StoreError> {
    let bucket_ms: u64 = match grouping {
        Some(UsageGrouping::Day) => 86_400_000,
        _ => HOUR_MS,
    };
    let mut out = UsageTotals::default();
    for (bucket, session, tenant, ms) in rows {
        let ms = u64::try_from(ms).unwrap_or(0);
        if ms == 0 {
            continue;
        }
        out.total_ms += ms;
        match (grouping, session) {
            (Some(UsageGrouping::Session), Some(id)) => {
                out.groups
                    .push((UsageGroup::Session(parse_id(&id)?, tenant), ms));
            }
            (Some(UsageGrouping::Day | UsageGrouping::Hour), _) => {
                let start = u64::try_from(bucket).unwrap_or(0) * bucket_ms;
                out.groups
                    .push((UsageGroup::Time(Timestamp::from_millis(start)), ms));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A usage record as SQL stores keep it, column by column. Identifiers are not kept:
/// [`record_id`] derives them.
#[derive(Debug, Clone)]
pub struct UsageRow {
    /// `session_id`.
    pub session_id: String,
    /// `tenant`.
    pub tenant: String,
    /// `seq`.
    pub seq: i64,
    /// `span_from`.
    pub span_from: i64,
    /// `span_to`.
    pub span_to: i64,
    /// `from_ms`.
    pub from_ms: i64,
    /// `to_ms`.
    pub to_ms: i64,
    /// `revision`.
    pub revision: i64,
    /// `superseded`: a correction replaced it.
    pub superseded: bool,
    /// `recorded_at`.
    pub recorded_at: i64,
}

impl UsageRow {
    /// The columns of a record, in the order this row lists them (its insert binds them in
    /// that order too, with `millis` last).
    pub const COLUMNS: &'static str = "session_id, tenant, seq, span_from, span_to, from_ms, to_ms, revision, superseded, recorded_at";

    /// The row of `record`.
    pub fn of(record: &UsageRecord) -> UsageRow {
        let m = |t: Timestamp| t.as_millis() as i64;
        let (from_ms, to_ms) = record
            .billable
            .map_or((m(record.span.0), m(record.span.0)), |b| {
                (m(b.from()), m(b.to()))
            });
        UsageRow {
            session_id: record.session.to_string(),
            tenant: record.tenant.clone(),
            seq: i64::from(record.seq),
            span_from: m(record.span.0),
            span_to: m(record.span.1),
            from_ms,
            to_ms,
            revision: i64::from(record.revision),
            superseded: record.superseded_by.is_some(),
            recorded_at: m(record.recorded_at),
        }
    }

    /// The record it keeps.
    pub fn into_record(self) -> Result<UsageRecord, StoreError> {
        let count = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| corrupt(&self.session_id, format!("usage {what} {v}")))
        };
        let session = parse_id(&self.session_id)?;
        let revision = count(self.revision, "revision")?;
        if revision == 0 {
            return Err(corrupt(&self.session_id, "usage revision 0".to_owned()));
        }
        let span = (timestamp(self.span_from), timestamp(self.span_to));
        Ok(UsageRecord {
            id: record_id(session, span.0, revision),
            session,
            tenant: self.tenant,
            seq: count(self.seq, "seq")?,
            span,
            billable: Interval::new(timestamp(self.from_ms), timestamp(self.to_ms)),
            revision,
            corrects: (revision > 1).then(|| record_id(session, span.0, revision - 1)),
            superseded_by: self
                .superseded
                .then(|| record_id(session, span.0, revision + 1)),
            recorded_at: timestamp(self.recorded_at),
        })
    }
}

/// A session's usage state as SQL stores keep it (see `sql::statements::USAGE_STATE`).
#[derive(Debug, Clone)]
pub struct UsageStateRow {
    /// `id`.
    pub id: String,
    /// `tenant`.
    pub tenant: String,
    /// `started_at`.
    pub started_at: i64,
    /// `ready_at`.
    pub ready_at: Option<i64>,
    /// `ended_at`.
    pub ended_at: Option<i64>,
    /// `end_reason`.
    pub end_reason: Option<String>,
    /// `node_last_seen_at`.
    pub node_last_seen_at: Option<i64>,
    /// `bill_meter`.
    pub bill_meter: String,
    /// `bill_rounding`.
    pub bill_rounding: String,
    /// `usage_closed_to`.
    pub usage_closed_to: Option<i64>,
}

impl UsageStateRow {
    /// The state it keeps.
    pub fn into_state(self) -> Result<UsageState, StoreError> {
        let meter = MeterStart::from_name(&self.bill_meter)
            .ok_or_else(|| corrupt(&self.id, format!("bill_meter {:?}", self.bill_meter)))?;
        let rounding = Rounding::from_name(&self.bill_rounding)
            .ok_or_else(|| corrupt(&self.id, format!("bill_rounding {:?}", self.bill_rounding)))?;
        let ended = match (self.ended_at, self.end_reason.as_deref()) {
            (Some(at), Some(reason)) => Some((
                timestamp(at),
                EndReason::from_name(reason)
                    .ok_or_else(|| corrupt(&self.id, format!("end_reason {reason:?}")))?,
            )),
            _ => None,
        };
        Ok(UsageState {
            session: parse_id(&self.id)?,
            tenant: self.tenant,
            rule: BillingRule { meter, rounding },
            metered: MeteredSession {
                started_at: timestamp(self.started_at),
                ready_at: self.ready_at.map(timestamp),
                ended,
                node_last_seen: self.node_last_seen_at.map(timestamp),
            },
            closed_to: self.usage_closed_to.map(timestamp),
        })
    }
}
