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
//! # async fn demo() -> Result<(), session_lifecycle_runtime::StoreError> {
//! use session_lifecycle_sqlite::SqliteStore;
//! let store = SqliteStore::open("sessiond.db")?;
//! # Ok(()) }
//! ```

mod schema;

pub use schema::SCHEMA_VERSION;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use session_lifecycle::{EndReason, Resource, SessionId, Status, Timestamp, Transition};
use session_lifecycle_runtime::lock;
use session_lifecycle_runtime::rows::{
    LOST_WITH_NODE, RELEASED_ON_RETURN, ResourceRow, SessionRow, duration_ms, millis as ms,
    parse_id, release_columns, stored_duration, timeout_columns, timestamp,
};
use session_lifecycle_runtime::sql::statements;
use session_lifecycle_runtime::{
    AttachOutcome, BoxFuture, CreateOutcome, ListQuery, NewSession, NodeMembership, PresenceStore,
    ReleaseClaim, ReleaseProgress, ReleaseQueue, RoomEvent, RoomEventKind, RoomState, RoomStore,
    SessionRecord, SessionStore, StoreError, StoreHealth, TenantScope, TouchOutcome,
};
use session_lifecycle_runtime::{sql_ended_at, sql_later, sql_release_due_at};
use tokio::sync::oneshot;

/// The most calls committed in one transaction.
const MAX_BATCH: usize = 512;

/// A write: runs its statements inside a savepoint, says whether they succeeded, and
/// hands back what to do once the whole transaction committed (or not). A job given `Err`
/// must not run, only report the error.
type Job = Box<dyn FnOnce(Result<&Connection, &str>) -> (bool, Finish) + Send>;
type Finish = Box<dyn FnOnce(Option<&str>) + Send>;

/// How long a connection waits for another's lock before it reports SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections kept for reuse (one per worker thread reading at once suffices).
const READ_POOL: usize = 8;

/// A session store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The write connection. Whoever holds it commits every queued job in one
    /// transaction (group commit): alone, a caller commits its own job on its own thread;
    /// under load, one fsync covers everything that queued up meanwhile.
    writer: tokio::sync::Mutex<Connection>,
    queue: Mutex<Vec<Job>>,
    /// Read-only connections, idle. Beside the writer: reads never wait for a commit's
    /// fsync (WAL readers and the writer do not block each other).
    readers: Mutex<Vec<Connection>>,
    /// Nodes whose releases may have become due (an end of their session here): one
    /// process, so an in-process broadcast (bounded: a waiter that lags is woken).
    releases_due: tokio::sync::broadcast::Sender<String>,
    /// Sessions ended here, for [`PresenceStore::watch_ends`] (one process: an in-process
    /// broadcast).
    ended: tokio::sync::broadcast::Sender<SessionId>,
}

/// The live holders of session `?1` at `?2` for the node timeout `?3` (ms), on the
/// caller's clock (which wrote the heartbeats).
const HOLDERS: &str = session_lifecycle_runtime::sql_holders!("n.last_heartbeat_at > ?2 - ?3");

fn unavailable(e: impl Into<session_lifecycle_runtime::BoxError>) -> StoreError {
    StoreError::unavailable(e)
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)?;
    // FULL: each commit is fsynced before it is acknowledged (NORMAL in WAL mode may lose
    // the last commits on power loss).
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, and migrates its schema.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut conn = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::unavailable(format!(
                "{} cannot use WAL mode (got {mode})",
                path.display()
            )));
        }
        schema::migrate(&mut conn)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer: tokio::sync::Mutex::new(conn),
                queue: Mutex::new(Vec::new()),
                readers: Mutex::new(Vec::new()),
                releases_due: tokio::sync::broadcast::channel(1024).0,
                ended: tokio::sync::broadcast::channel(1024).0,
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer thread, inside the current batch's transaction; the answer
    /// comes only after that transaction committed.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => f(conn),
                Err(msg) => Err(unavailable(msg)),
            };
            let ok = result.is_ok();
            let finish: Finish = Box::new(move |commit_error| {
                let answer = match (result, commit_error) {
                    (Ok(v), None) => Ok(v),
                    (Ok(_), Some(e)) => Err(StoreError::unavailable(format!("commit failed: {e}"))),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(answer);
            });
            (ok, finish)
        });
        let mut rx = rx;
        lock(&self.inner.queue).push(job);
        let conn = self.inner.writer.lock().await;
        // An earlier holder may have committed our job with its batch.
        if let Ok(answer) = rx.try_recv() {
            return answer;
        }
        let jobs = std::mem::take(&mut *lock(&self.inner.queue));
        blocking(|| commit_batch(&conn, jobs));
        drop(conn);
        rx.await.map_err(|_| unavailable("a write was dropped"))?
    }

    /// Runs `f` on a read connection, in one snapshot.
    ///
    /// At once, on this thread: a WAL read waits for no lock the writer holds and reads
    /// a few pages, usually from the page cache or the OS's, which costs less than
    /// handing it to another thread (a cold read from disk stalls this worker meanwhile).
    /// Its connection does not wait for locks (busy timeout 0); when one is held (a
    /// checkpoint resetting the log, a recovery), the read runs again off the async
    /// workers, waiting up to the busy timeout.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(&Connection) -> Result<T, StoreError>,
    {
        let pooled = lock(&self.inner.readers).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.inner.path)?,
        };
        let result = match snapshot(&conn, &f) {
            Err(e) if is_busy(&e) => blocking(|| {
                conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
                let result = snapshot(&conn, &f);
                conn.busy_timeout(Duration::ZERO).map_err(db)?;
                result
            }),
            other => other,
        };
        // A connection left inside a transaction (its COMMIT failed) is not reused.
        let mut idle = lock(&self.inner.readers);
        if idle.len() < READ_POOL && conn.is_autocommit() {
            idle.push(conn);
        }
        result
    }

    /// Runs `PRAGMA integrity_check` and returns its verdict (`ok` when sound).
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        // It reads the whole file: off the async workers.
        blocking(|| {
            let conn = open_connection(
                &self.inner.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .map_err(unavailable)
        })
    }
}

/// Runs blocking SQLite work on the current thread, telling a multi-threaded tokio
/// runtime to move its other tasks away meanwhile (no hop to another thread; on a
/// current-thread runtime it simply runs).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A read-only connection to `path` that never waits for a lock (see [`SqliteStore::read`]).
/// Opening it reads nothing: the pragmas a writer sets (`synchronous` reads the schema)
/// mean nothing to a reader.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db)?;
    conn.busy_timeout(Duration::ZERO).map_err(db)?;
    conn.pragma_update(None, "query_only", "ON").map_err(db)?;
    Ok(conn)
}

/// Runs `f` in one snapshot: a session row and its resources' rows are read by separate
/// statements, and a write committed between them must not show half of itself.
fn snapshot<T>(
    conn: &Connection,
    f: &impl Fn(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let run = |sql| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(db)
    };
    run("BEGIN")?;
    let result = f(conn);
    // Ends the snapshot whatever `f` answered (a read-only transaction: nothing to undo);
    // `f`'s own error comes first.
    let commit = run("COMMIT");
    let value = result?;
    commit?;
    Ok(value)
}

/// Whether `e` is SQLite reporting a lock held by another connection.
fn is_busy(e: &StoreError) -> bool {
    let StoreError::Unavailable(source) = e else {
        return false;
    };
    source
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
        .is_some_and(|code| {
            matches!(
                code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        })
}

/// Commits `jobs` in one transaction, each in its own savepoint (so that one failing
/// job does not undo the others), then gives every job its answer.
fn commit_batch(conn: &Connection, jobs: Vec<Job>) {
    for chunk in chunks(jobs, MAX_BATCH) {
        commit_chunk(conn, chunk);
    }
}

fn chunks(mut jobs: Vec<Job>, size: usize) -> Vec<Vec<Job>> {
    let mut out = Vec::new();
    while jobs.len() > size {
        let rest = jobs.split_off(size);
        out.push(jobs);
        jobs = rest;
    }
    out.push(jobs);
    out
}

fn commit_chunk(conn: &Connection, jobs: Vec<Job>) {
    {
        if jobs.is_empty() {
            return;
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for job in jobs {
                let (_, finish) = job(Err(&msg));
                finish(Some(&msg));
            }
            return;
        }
        let mut finishes = Vec::with_capacity(jobs.len());
        if jobs.len() == 1 {
            // Alone in its transaction: no savepoint needed, a failure rolls back the lot.
            for job in jobs {
                let (ok, finish) = job(Ok(conn));
                if !ok {
                    let _ = conn.execute_batch("ROLLBACK");
                    finish(None);
                    return;
                }
                finishes.push((finish, None));
            }
        } else {
            for job in jobs {
                if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                    let msg = e.to_string();
                    let (_, finish) = job(Err(&msg));
                    finishes.push((finish, Some(msg)));
                    continue;
                }
                let (ok, finish) = job(Ok(conn));
                let undo = if ok {
                    conn.execute_batch("RELEASE job")
                } else {
                    conn.execute_batch("ROLLBACK TO job; RELEASE job")
                };
                finishes.push((finish, undo.err().map(|e| e.to_string())));
            }
        }
        let commit_error = conn.execute_batch("COMMIT").err().map(|e| e.to_string());
        if commit_error.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for (finish, own_error) in finishes {
            finish(commit_error.as_deref().or(own_error.as_deref()));
        }
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    unavailable(e)
}

/// The columns of a session row, in the order [`session_row`] reads them: a macro, so that
/// statements are literals (no SQL formatted per call).
macro_rules! session_columns {
    () => {
        "id, tenant, status, started_at, ended_at, end_reason, expires_at, last_seen_at, \
         metadata, room_provider, room_name, node, participant_left_ms, participant_absent_ms, \
         websocket_grace_ms"
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

/// `node` holds no client sockets from `now` on; they were liveness until then.
fn let_go_of(c: &Connection, node: &str, now: Timestamp) -> Result<(), StoreError> {
    c.prepare_cached(statements::SEEN_HELD_BY)
        .and_then(|mut s| s.execute(params![node, ms(now)]))
        .map_err(db)?;
    c.prepare_cached(statements::CLEAR_PRESENCE)
        .and_then(|mut s| s.execute([node]))
        .map_err(db)?;
    Ok(())
}

/// Where the room of session `id` stands.
fn room_state(c: &Connection, id: &str) -> Result<Option<RoomState>, StoreError> {
    let session = parse_id(id)?;
    c.prepare_cached(statements::ROOM_STATE)
        .and_then(|mut s| {
            s.query_row(params![id, true], |r| {
                let present: i64 = r.get(0)?;
                let ever: i64 = r.get(1)?;
                Ok(RoomState {
                    session,
                    present: u32::try_from(present).unwrap_or(u32::MAX),
                    // A leave implies a join, even one delivered later.
                    ever_joined: ever > 0,
                    finished: r.get(2)?,
                    emptied_at: r.get::<_, Option<i64>>(3)?.map(timestamp),
                    participant_left: r.get::<_, Option<i64>>(4)?.map(stored_duration),
                })
            })
            .optional()
        })
        .map_err(db)
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

fn resource_key(r: &Resource) -> (i64, i64) {
    (i64::from(r.kind.0), r.handle as i64)
}

impl SessionStore for SqliteStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        Box::pin(self.write(move |c| {
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
                        grace
                    ])
                });
            match inserted {
                Ok(_) => Ok(CreateOutcome::Created),
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
        Box::pin(self.write(move |c| {
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
        Box::pin(async move {
            let ended = self
                .write(move |c| {
                    let id_text = id.to_string();
                    let (claim_node, claim_until) = match &claimed {
                        Some(claim) => (Some(claim.node.as_str()), Some(ms(claim.until))),
                        None => (None, None),
                    };
                    // One statement for the session row: the end, its next release due at
                    // the end if it holds anything, and the claim of the node ending its
                    // own session.
                    let n = c
                        .prepare_cached(concat!(
                            "UPDATE sessions SET status = 'ended', end_reason = ?3, ended_at = ",
                            sql_ended_at!("?2"),
                            ", release_due_at = ",
                            sql_release_due_at!(sql_ended_at!("?2")),
                            ", release_claimed_by = CASE WHEN resource_count > 0 AND node = ?4 THEN ?4 END,
                               release_claimed_until = CASE WHEN resource_count > 0 AND node = ?4 THEN ?5 END
                             WHERE id = ?1 AND status = 'started' AND (?6 IS NULL OR tenant = ?6)"
                        ))
                        .and_then(|mut s| {
                            s.execute(params![
                                id_text,
                                ms(now),
                                reason.as_str(),
                                claim_node,
                                claim_until,
                                tenant
                            ])
                        })
                        .map_err(db)?;
                    let transition = if n == 1 {
                        mark_resources_due(c, &id_text)?;
                        Transition::Committed
                    } else {
                        Transition::AlreadyEnded
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
        Box::pin(self.read(move |c| get_record(c, &id.to_string())))
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(self.read(move |c| {
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

    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        let tenant = tenant.map(str::to_owned);
        Box::pin(self.write(move |c| {
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
        Box::pin(self.read(move |c| {
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

impl ReleaseQueue for SqliteStore {
    fn claim_releases(
        &self,
        node: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| {
            let lease_ms = duration_ms(lease);
            let ids: Vec<String> = c
                .prepare_cached(
                    "UPDATE sessions SET release_claimed_by = ?2, release_claimed_until = ?1 + ?3
                     WHERE id IN (
                        SELECT id FROM sessions
                        WHERE node = ?2 AND release_due_at <= ?1
                          AND (release_claimed_until IS NULL OR release_claimed_until <= ?1)
                        ORDER BY release_due_at LIMIT ?4)
                     RETURNING id",
                )
                .and_then(|mut s| {
                    s.query_map(params![ms(now), node, lease_ms, i64::from(limit)], |r| {
                        r.get(0)
                    })?
                    .collect()
                })
                .map_err(db)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(record) = get_record(c, &id)? {
                    out.push(record);
                }
            }
            Ok(out)
        }))
    }

    fn record_release(
        &self,
        node: &str,
        progress: ReleaseProgress,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| {
            let id = progress.session.to_string();
            if let Some(attempt) = &progress.attempt {
                let (kind, handle) = resource_key(&attempt.resource);
                let (state, attempts, retry_at, released_at) = release_columns(attempt.release);
                let released = state == "released";
                c.prepare_cached(statements::RECORD_ATTEMPT)
                    .and_then(|mut s| {
                        s.execute(params![
                            id,
                            kind,
                            handle,
                            state,
                            attempts,
                            retry_at,
                            released_at,
                            released,
                            attempt.note,
                            RELEASED_ON_RETURN,
                        ])
                    })
                    .map_err(db)?;
            }
            let claimed_until = progress.keep_claim_until.map(ms);
            c.prepare_cached(statements::RECORD_SESSION)
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        node,
                        progress.next_release_at.map(ms),
                        claimed_until
                    ])
                })
                .map_err(db)?;
            Ok(())
        }))
    }

    fn watch_releases<'a>(
        &'a self,
        node: &'a str,
        wake: &'a (dyn Fn() + Send + Sync),
    ) -> BoxFuture<'a, ()> {
        let mut due = self.inner.releases_due.subscribe();
        Box::pin(async move {
            loop {
                match due.recv().await {
                    Ok(due_node) if due_node == node => wake(),
                    Ok(_) => {}
                    // Missed some: one of them may have been ours.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => wake(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
    }

    fn drop_claims(&self, node: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| {
            c.prepare_cached(statements::DROP_CLAIMS)
                .and_then(|mut s| s.execute([node]))
                .map_err(db)?;
            Ok(())
        }))
    }
}

impl NodeMembership for SqliteStore {
    fn node_alive(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| {
            c.prepare_cached(concat!(
                "INSERT INTO nodes (id, last_heartbeat_at) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = ",
                sql_later!("nodes.last_heartbeat_at", "excluded.last_heartbeat_at")
            ))
            .and_then(|mut s| s.execute(params![node, ms(now)]))
            .map_err(db)?;
            Ok(())
        }))
    }

    fn end_dead_nodes(
        &self,
        except: &str,
        now: Timestamp,
        node_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        let except = except.to_owned();
        let timeout_ms = duration_ms(node_timeout);
        Box::pin(async move {
            let ended = self.write(move |c| {
            let dead: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM nodes WHERE id <> ?1 AND last_heartbeat_at <= ?2 - ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![except, ms(now), timeout_ms], |r| r.get(0))?
                        .collect()
                })
                .map_err(db)?;
            let mut ended = Vec::new();
            for node in dead {
                let room = i64::from(limit).saturating_sub(ended.len() as i64);
                let ids: Vec<String> = c
                    .prepare_cached(
                        concat!(
                            "UPDATE sessions SET status = 'ended', end_reason = 'node_lost', ended_at = ",
                            sql_ended_at!("?2"),
                            ", release_due_at = ",
                            sql_release_due_at!(sql_ended_at!("?2")),
                            " WHERE id IN (SELECT id FROM sessions
                                      WHERE node = ?1 AND status = 'started' LIMIT ?3)
                         RETURNING id"
                        ),
                    )
                    .and_then(|mut s| {
                        s.query_map(params![node, ms(now), room], |r| r.get(0))?
                            .collect()
                    })
                    .map_err(db)?;
                for id in &ids {
                    mark_resources_due(c, id)?;
                    ended.push(parse_id(id)?);
                }
                c.prepare_cached(statements::MARK_LOST)
                    .and_then(|mut s| s.execute(params![node, ms(now), LOST_WITH_NODE]))
                    .map_err(db)?;
                let_go_of(c, &node, now)?;
            }
            Ok(ended)
            })
            .await?;
            for id in &ended {
                let _ = self.inner.ended.send(*id);
            }
            Ok(ended)
        })
    }
}

impl RoomStore for SqliteStore {
    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomState>>, StoreError>> {
        Box::pin(self.write(move |c| {
            let fresh = c
                .prepare_cached(statements::INSERT_ROOM_EVENT)
                .and_then(|mut s| {
                    s.execute(params![event.provider.as_str(), event.event_id, ms(now)])
                })
                .map_err(db)?;
            if fresh == 0 {
                return Ok(None);
            }
            let sessions: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM sessions
                     WHERE room_provider = ?1 AND room_name = ?2 AND status = 'started'
                       AND (?3 IS NULL OR tenant = ?3)",
                )
                .and_then(|mut s| {
                    s.query_map(
                        params![event.provider.as_str(), event.room, event.tenant],
                        |r| r.get(0),
                    )?
                    .collect()
                })
                .map_err(db)?;
            let mut updates = Vec::with_capacity(sessions.len());
            for id in sessions {
                match &event.kind {
                    RoomEventKind::Joined { participant } | RoomEventKind::Left { participant } => {
                        let present = matches!(event.kind, RoomEventKind::Joined { .. });
                        c.prepare_cached(statements::UPSERT_PARTICIPANT)
                            .and_then(|mut s| {
                                s.execute(params![id, participant, present, ms(event.at)])
                            })
                            .map_err(db)?;
                        if present {
                            c.prepare_cached(statements::SEEN)
                                .and_then(|mut s| s.execute(params![id, ms(now)]))
                                .map_err(db)?;
                        }
                    }
                    RoomEventKind::Finished => {
                        c.prepare_cached(statements::ROOM_FINISHED)
                            .and_then(|mut s| s.execute(params![id, true]))
                            .map_err(db)?;
                    }
                }
                c.prepare_cached(statements::ROOM_EMPTIED)
                    .and_then(|mut s| s.execute(params![id, ms(now), true]))
                    .map_err(db)?;
                if let Some(room) = room_state(c, &id)? {
                    updates.push(room);
                }
            }
            Ok(Some(updates))
        }))
    }

    fn room_state(&self, id: SessionId) -> BoxFuture<'_, Result<Option<RoomState>, StoreError>> {
        Box::pin(self.read(move |c| room_state(c, &id.to_string())))
    }

    fn prune_rooms(
        &self,
        ended_before: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(self.write(move |c| {
            let pruned = c
                .prepare_cached(statements::PRUNE_PARTICIPANTS)
                .and_then(|mut s| s.execute(params![ms(ended_before), i64::from(limit)]))
                .map_err(db)?;
            c.prepare_cached(statements::PRUNE_ROOM_EVENTS)
                .and_then(|mut s| s.execute([ms(ended_before)]))
                .map_err(db)?;
            c.prepare_cached(statements::PRUNE_PRESENCE)
                .and_then(|mut s| s.execute([ms(ended_before)]))
                .map_err(db)?;
            Ok(u32::try_from(pruned).unwrap_or(u32::MAX))
        }))
    }

    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        Box::pin(self.write(move |c| {
            let ids: Vec<String> = c
                .prepare_cached(statements::TOUCH_PRESENT)
                .and_then(|mut s| s.query_map(params![ms(now), true], |r| r.get(0))?.collect())
                .map_err(db)?;
            ids.iter().map(|id| parse_id(id)).collect()
        }))
    }
}

impl PresenceStore for SqliteStore {
    fn set_presence(
        &self,
        session: SessionId,
        node: &str,
        holds: bool,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| {
            let id = session.to_string();
            if holds {
                c.prepare_cached(statements::HOLD)
                    .and_then(|mut s| s.execute(params![id, node]))
                    .map_err(db)?;
            } else {
                c.prepare_cached(statements::SEEN)
                    .and_then(|mut s| s.execute(params![id, ms(now)]))
                    .map_err(db)?;
                c.prepare_cached(statements::LET_GO)
                    .and_then(|mut s| s.execute(params![id, node]))
                    .map_err(db)?;
            }
            Ok(())
        }))
    }

    fn clear_presence(&self, node: &str, now: Timestamp) -> BoxFuture<'_, Result<(), StoreError>> {
        let node = node.to_owned();
        Box::pin(self.write(move |c| let_go_of(c, &node, now)))
    }

    fn presence(
        &self,
        session: SessionId,
        now: Timestamp,
        node_timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(self.read(move |c| {
            c.prepare_cached(HOLDERS)
                .and_then(|mut s| {
                    s.query_map(
                        params![session.to_string(), ms(now), duration_ms(node_timeout)],
                        |r| r.get(0),
                    )?
                    .collect()
                })
                .map_err(db)
        }))
    }

    fn watch_ends<'a>(&'a self, ended: &'a (dyn Fn(SessionId) + Send + Sync)) -> BoxFuture<'a, ()> {
        let mut ends = self.inner.ended.subscribe();
        Box::pin(async move {
            loop {
                match ends.recv().await {
                    Ok(id) => ended(id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
    }
}

impl StoreHealth for SqliteStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn sqlite_error(code: i32) -> StoreError {
        db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    /// A read that meets a lock runs again (off the workers, waiting for the lock); any
    /// other failure is answered as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_meets_a_lock_runs_again_and_others_fail_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
        for (first, runs, answered) in [
            (rusqlite::ffi::SQLITE_BUSY, 2, true),
            (rusqlite::ffi::SQLITE_LOCKED, 2, true),
            (rusqlite::ffi::SQLITE_IOERR, 1, false),
        ] {
            let calls = Arc::new(AtomicU32::new(0));
            let answer = store
                .read({
                    let calls = Arc::clone(&calls);
                    move |c| match calls.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(sqlite_error(first)),
                        _ => c
                            .query_row("SELECT count(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                            .map_err(db),
                    }
                })
                .await;
            assert_eq!(calls.load(Ordering::SeqCst), runs, "code {first}");
            assert_eq!(answer.is_ok(), answered, "code {first}: {answer:?}");
            if answered {
                assert_eq!(answer.unwrap(), 0);
            }
        }
        // The connection came back to the pool with its zero busy timeout, and works.
        let count = store
            .read(|c| {
                c.query_row("SELECT count(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                    .map_err(db)
            })
            .await
            .unwrap();
        assert_eq!(count, 0);
    }
}
