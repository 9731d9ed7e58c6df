//! The embedded default store of `session-lifecycle`: one SQLite file.
//!
//! - WAL mode with `synchronous=FULL`: a write is acknowledged only after its commit is
//!   fsynced, so an acknowledged end survives `kill -9` and power loss.
//! - Group commit: whoever holds the write connection commits every queued write in one
//!   transaction (each in its own savepoint), on its own thread. Alone, a call commits
//!   just its own write with no thread hop; under concurrent load many ends share one
//!   fsync. Reads use separate connections and never see uncommitted writes.
//! - The schema is created and migrated by [`SqliteStore::open`] (a `schema_version`
//!   table), with partial indexes for the sweeper's queries.
//!
//! ```no_run
//! # async fn demo() -> Result<(), session_lifecycle_store::StoreError> {
//! use session_lifecycle_sqlite::SqliteStore;
//! let store = SqliteStore::open("sessiond.db")?;
//! # Ok(()) }
//! ```

mod connections;
mod error;
mod idempotency;
mod nodes;
mod outbox;
mod presence;
mod releases;
mod rooms;
mod schema;
mod usage;

pub use schema::SCHEMA_VERSION;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connections::Connections;
use error::db;
use rusqlite::{Connection, OptionalExtension, params};
use session_lifecycle::{EndReason, EventKind, Resource, SessionId, Status, Timestamp, Transition};
use session_lifecycle_store::rows::{
    RELEASED_ON_RETURN, ResourceRow, SessionRow, duration_ms, end_count, event_sequence,
    millis as ms, parse_id, release_columns, timeout_columns,
};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::usage::sql::UsageStateRow;
use session_lifecycle_store::{
    AttachOutcome, BoxFuture, CreateOutcome, EndCount, ListQuery, NewSession, ReleaseClaim,
    ReleaseProgress, ReleaseQueue, SessionRecord, SessionStore, StoreError, StoreHealth,
    TenantScope, TouchOutcome,
};
use session_lifecycle_store::{
    sql_count_ends, sql_ended_at, sql_ended_since, sql_later, sql_release_due_at,
    sql_usage_state_columns,
};

/// A session store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Connections,
    /// Nodes whose releases may have become due (an end of their session here): one
    /// process, so an in-process broadcast (bounded: a waiter that lags is woken).
    releases_due: tokio::sync::broadcast::Sender<String>,
    /// Sessions ended here, for [`PresenceStore::watch_ends`] (one process: an in-process
    /// broadcast).
    ended: tokio::sync::broadcast::Sender<SessionId>,
    /// Whether usage records are written (see [`SqliteStore::set_usage_records`]).
    usage: std::sync::atomic::AtomicBool,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, and migrates its schema.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conns: Connections::open(path.as_ref())?,
                releases_due: tokio::sync::broadcast::channel(1024).0,
                ended: tokio::sync::broadcast::channel(1024).0,
                usage: std::sync::atomic::AtomicBool::new(true),
            }),
        })
    }

    /// Turns the writing of usage records (and their `usage.recorded` events) on (the
    /// default) or off, for a deployment that does not bill, and to measure what
    /// recording costs. Sessions ended while it is off have no usage records.
    pub fn set_usage_records(&self, on: bool) {
        self.inner
            .usage
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn usage_on(&self) -> bool {
        self.inner.usage.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        self.inner.conns.path()
    }

    /// Runs `PRAGMA integrity_check` and returns its verdict (`ok` when sound).
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        self.inner.conns.integrity_check().await
    }
}

/// The columns of a session row, in the order [`session_row`] reads them: a macro, so that
/// statements are literals (no SQL formatted per call).
macro_rules! session_columns {
    () => {
        "id, tenant, status, started_at, ended_at, end_reason, expires_at, last_seen_at, \
         metadata, room_provider, room_name, node, participant_left_ms, participant_absent_ms, \
         websocket_grace_ms, ready_at"
    };
}

/// The session row at `row` (its columns first, as [`session_columns`] lists them).
fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: row.get(0)?,
        tenant: row.get(1)?,
        status: row.get(2)?,
        started_at: row.get(3)?,
        ended_at: row.get(4)?,
        end_reason: row.get(5)?,
        expires_at: row.get(6)?,
        last_seen_at: row.get(7)?,
        metadata: row.get(8)?,
        room_provider: row.get(9)?,
        room_name: row.get(10)?,
        node: row.get(11)?,
        participant_left_ms: row.get(12)?,
        participant_absent_ms: row.get(13)?,
        websocket_grace_ms: row.get(14)?,
        ready_at: row.get(15)?,
    })
}

/// The resource row at `row` (columns as [`RESOURCES_OF_SESSION`] selects them).
fn resource_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ResourceRow> {
    Ok(ResourceRow {
        seq: row.get(0)?,
        kind: row.get(1)?,
        handle: row.get(2)?,
        state: row.get(3)?,
        attempts: row.get(4)?,
        retry_at: row.get(5)?,
        released_at: row.get(6)?,
        note: row.get(7)?,
        last_error: row.get(8)?,
    })
}

/// The resources of session `?1`, columns as [`resource_row`] reads them. No ORDER BY: it
/// costs a sorter even for no rows; the decoder sorts by seq.
const RESOURCES_OF_SESSION: &str =
    "SELECT seq, kind, handle, state, attempts, retry_at, released_at, note, last_error
     FROM resources WHERE session_id = ?1";

/// Reads the session row at `row` (columns as [`session_columns`] lists them) and its
/// resources.
fn load_record(conn: &Connection, row: &rusqlite::Row<'_>) -> Result<SessionRecord, StoreError> {
    let session = session_row(row).map_err(db)?;
    let mut stmt = conn.prepare_cached(RESOURCES_OF_SESSION).map_err(db)?;
    let resources = stmt
        .query_map([&session.id], resource_row)
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(db)?;
    session.into_record(resources)
}

fn get_record(conn: &Connection, id: &str) -> Result<Option<SessionRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = ?1"
        ))
        .map_err(db)?;
    let mut rows = stmt.query([id]).map_err(db)?;
    match rows.next().map_err(db)? {
        Some(row) => load_record(conn, row).map(Some),
        None => Ok(None),
    }
}

/// What the core's end does to a session's resources, in the same transaction as the end:
/// every held one becomes a pending release due at the end.
fn mark_resources_due(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE resources SET state = 'pending', attempts = 0,
                retry_at = (SELECT ended_at FROM sessions WHERE id = ?1)
         WHERE session_id = ?1 AND state = 'held'",
    )
    .and_then(|mut s| s.execute([id]))
    .map_err(db)?;
    Ok(())
}

/// Session `id` just ended at `now`: its usage (of its usage state after the end, if it
/// is recorded), its `ended` event, and `released` if it holds nothing to release.
fn ended_events(
    c: &Connection,
    id: &str,
    now: Timestamp,
    usage: Option<UsageStateRow>,
) -> Result<(), StoreError> {
    let usage_from = match usage {
        Some(row) => usage::settle_row(c, row, None, now, usage::UsageEvents::WithEnded)?.first_new,
        None => None,
    };
    c.prepare_cached(statements::EVENT_ENDED)
        .and_then(|mut s| {
            s.execute(params![
                id,
                event_sequence(EventKind::Ended),
                usage_from.map(i64::from)
            ])
        })
        .map_err(db)?;
    released_event(c, id, now)
}

/// Session `id` has released everything (if it has): its `released` event at `at`.
fn released_event(c: &Connection, id: &str, at: Timestamp) -> Result<(), StoreError> {
    c.prepare_cached(statements::EVENT_RELEASED)
        .and_then(|mut s| s.execute(params![id, event_sequence(EventKind::Released), ms(at)]))
        .map_err(db)?;
    Ok(())
}

fn resource_key(r: &Resource) -> (i64, i64) {
    (i64::from(r.kind.0), r.handle as i64)
}

impl SessionStore for SqliteStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            if let Some(max) = new.max_concurrent {
                let running: i64 = c
                    .prepare_cached(statements::COUNT_STARTED)
                    .and_then(|mut s| s.query_row([&new.tenant], |r| r.get(0)))
                    .map_err(db)?;
                if running >= i64::from(max) {
                    return Ok(CreateOutcome::LimitReached);
                }
            }
            let (left, absent, grace) = timeout_columns(&new.timeouts);
            let inserted = c
                .prepare_cached(statements::INSERT_SESSION)
                .and_then(|mut s| {
                    s.execute(params![
                        new.id.to_string(),
                        new.tenant,
                        ms(new.started_at),
                        ms(new.expires_at.max(new.started_at)),
                        new.metadata,
                        new.room.as_ref().map(|r| r.provider.as_str()),
                        new.room.as_ref().map(|r| r.name.as_str()),
                        new.node,
                        left,
                        absent,
                        grace,
                        new.callback_url,
                        new.billing.meter.as_str(),
                        new.billing.rounding.as_str()
                    ])
                });
            match inserted {
                Ok(_) => {
                    c.prepare_cached(statements::INSERT_EVENT)
                        .and_then(|mut s| {
                            s.execute(params![
                                new.id.to_string(),
                                new.tenant,
                                event_sequence(EventKind::Started),
                                ms(new.started_at)
                            ])
                        })
                        .map_err(db)?;
                    Ok(CreateOutcome::Created)
                }
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::DuplicateId(new.id))
                }
                Err(e) => Err(db(e)),
            }
        }))
    }

    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let (kind, handle) = resource_key(&resource);
            let n = c
                .prepare_cached(
                    "INSERT INTO resources (session_id, seq, kind, handle, state, node)
                     SELECT ?1, COALESCE((SELECT MAX(seq) + 1 FROM resources WHERE session_id = ?1), 0),
                            ?2, ?3, 'held', (SELECT node FROM sessions WHERE id = ?1)
                     WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1 AND status = 'started')
                       AND (SELECT COUNT(*) FROM resources WHERE session_id = ?1) < ?4
                       AND NOT EXISTS (SELECT 1 FROM resources
                                       WHERE session_id = ?1 AND kind = ?2 AND handle = ?3)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id.to_string(),
                        kind,
                        handle,
                        session_lifecycle::MAX_RESOURCES as i64
                    ])
                })
                .map_err(db)?;
            if n == 1 {
                c.prepare_cached(statements::COUNT_ATTACHED)
                .and_then(|mut s| s.execute([id.to_string()]))
                .map_err(db)?;
            }
            Ok(if n == 1 {
                AttachOutcome::Attached
            } else {
                AttachOutcome::Refused
            })
        }))
    }

    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        let tenant = tenant.map(str::to_owned);
        let claimed = claim.clone();
        let usage = self.usage_on();
        Box::pin(async move {
            let ended = self
                .inner
                .conns
                .write(move |c| {
                    let id_text = id.to_string();
                    let (claim_node, claim_until) = match &claimed {
                        Some(claim) => (Some(claim.node.as_str()), Some(ms(claim.until))),
                        None => (None, None),
                    };
                    // One statement for the session row: the end, its next release due at
                    // the end if it holds anything, and the claim of the node ending its
                    // own session; it answers the session's usage state after the end.
                    let ended = c
                        .prepare_cached(concat!(
                            "UPDATE sessions SET status = 'ended', end_reason = ?3, ended_at = ",
                            sql_ended_at!("?2"),
                            ", release_due_at = ",
                            sql_release_due_at!(sql_ended_at!("?2")),
                            ", release_claimed_by = CASE WHEN resource_count > 0 AND node = ?4 THEN ?4 END,
                               release_claimed_until = CASE WHEN resource_count > 0 AND node = ?4 THEN ?5 END
                             WHERE id = ?1 AND status = 'started' AND (?6 IS NULL OR tenant = ?6)
                             RETURNING ",
                            sql_usage_state_columns!()
                        ))
                        .and_then(|mut s| {
                            s.query_row(
                                params![
                                    id_text,
                                    ms(now),
                                    reason.as_str(),
                                    claim_node,
                                    claim_until,
                                    tenant
                                ],
                                usage::state_row,
                            )
                            .optional()
                        })
                        .map_err(db)?;
                    let transition = match ended {
                        Some(row) => {
                            mark_resources_due(c, &id_text)?;
                            ended_events(c, &id_text, now, Some(row).filter(|_| usage))?;
                            Transition::Committed
                        }
                        None => Transition::AlreadyEnded,
                    };
                    let record = get_record(c, &id_text)?
                        .filter(|r| tenant.as_ref().is_none_or(|t| *t == r.tenant));
                    Ok(record.map(|r| (r, transition)))
                })
                .await?;
            // The owning node hears of releases it did not claim with the end itself.
            if let Some((record, Transition::Committed)) = &ended
                && record.session.next_release_at().is_some()
                && claim.as_ref().is_none_or(|c| c.node != record.node)
            {
                let _ = self.inner.releases_due.send(record.node.clone());
            }
            if let Some((_, Transition::Committed)) = &ended {
                let _ = self.inner.ended.send(id);
            }
            Ok(ended)
        })
    }

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        Box::pin(
            self.inner
                .conns
                .read(move |c| get_record(c, &id.to_string())),
        )
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            let status = query.status.map(|s| match s {
                Status::Started => "started",
                Status::Ended => "ended",
            });
            let mut stmt = c
                .prepare_cached(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions
                     WHERE (?1 IS NULL OR tenant = ?1)
                       AND (?2 IS NULL OR status = ?2)
                       AND (?3 IS NULL OR id < ?3)
                       AND (?5 IS NULL OR node = ?5)
                     ORDER BY id DESC LIMIT ?4"
                ))
                .map_err(db)?;
            let mut rows = stmt
                .query(params![
                    query.tenant,
                    status,
                    query.before.map(|b| b.to_string()),
                    i64::from(query.limit),
                    query.node
                ])
                .map_err(db)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(db)? {
                out.push(load_record(c, row)?);
            }
            Ok(out)
        }))
    }

    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            let mut stmt = c
                .prepare_cached(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id IN (",
                    sql_ended_since!("?1 IS NULL OR tenant = ?1", "?2", "?3"),
                    ") ORDER BY (release_due_at IS NULL), ended_at DESC, id DESC"
                ))
                .map_err(db)?;
            let mut rows = stmt
                .query(params![tenant, ms(since), i64::from(limit)])
                .map_err(db)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(db)? {
                out.push(load_record(c, row)?);
            }
            Ok(out)
        }))
    }

    fn count_ends(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        until: Timestamp,
        bucket: Duration,
    ) -> BoxFuture<'_, Result<Vec<EndCount>, StoreError>> {
        let width = duration_ms(bucket).max(1);
        Box::pin(self.inner.conns.read(move |c| {
            let mut stmt = c
                .prepare_cached(sql_count_ends!(
                    "?1 IS NULL OR tenant = ?1",
                    "?2",
                    "?3",
                    "?4"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(params![tenant, ms(since), ms(until), width], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(db)?;
            rows.iter()
                .map(|(span, reason, count)| end_count(*span, reason, *count))
                .collect()
        }))
    }

    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        let tenant = tenant.map(str::to_owned);
        Box::pin(self.inner.conns.write(move |c| {
            let id_text = id.to_string();
            let n = c
                .prepare_cached(concat!(
                    "UPDATE sessions SET last_seen_at = ",
                    sql_later!("last_seen_at", "?2"),
                    " WHERE id = ?1 AND status = 'started' AND (?3 IS NULL OR tenant = ?3)"
                ))
                .and_then(|mut s| s.execute(params![id_text, ms(now), tenant]))
                .map_err(db)?;
            let record =
                get_record(c, &id_text)?.filter(|r| tenant.as_ref().is_none_or(|t| *t == r.tenant));
            Ok(match record {
                None => TouchOutcome::NotFound,
                Some(record) if n == 1 => TouchOutcome::Touched(record),
                Some(record) => TouchOutcome::Ended(record),
            })
        }))
    }

    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        Box::pin(self.inner.conns.read(move |c| {
            let mut stmt = c.prepare_cached(statements::DUE).map_err(db)?;
            let mut rows = stmt
                .query(params![
                    ms(now),
                    duration_ms(orphan_timeout),
                    i64::from(limit)
                ])
                .map_err(db)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db)? {
                let id: String = r.get(0).map_err(db)?;
                let expired: bool = r.get(1).map_err(db)?;
                let reason = if expired {
                    EndReason::Expired
                } else {
                    EndReason::Orphaned
                };
                out.push((parse_id(&id)?, reason));
            }
            Ok(out)
        }))
    }
}

/// One machine: every session runs where it was created.
impl session_lifecycle_store::FleetPlacement for SqliteStore {}

impl StoreHealth for SqliteStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(
            self.inner
                .conns
                .read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db)),
        )
    }
}

#[cfg(test)]
mod tests;
