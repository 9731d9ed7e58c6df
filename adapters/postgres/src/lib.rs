//! The PostgreSQL store of `session-lifecycle`: several `sessiond` instances share one
//! database. Every method is one transaction; ending is one conditional `UPDATE` (row
//! locks make concurrent ends from any instance resolve to one), release intents are
//! claimed with `FOR UPDATE SKIP LOCKED` and a lease, and migrations run under an
//! advisory lock so instances can start together.
//!
//! ```no_run
//! # async fn demo() -> Result<(), session_lifecycle_store::StoreError> {
//! let store = session_lifecycle_postgres::PostgresStore::connect("postgres://postgres@127.0.0.1/test").await?;
//! # Ok(()) }
//! ```

mod schema;
pub mod testing;
mod usage;

use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use session_lifecycle::{EndReason, EventKind, Resource, SessionId, Status, Timestamp, Transition};
use session_lifecycle_store::rows::{
    duration_ms, end_count, event_sequence, millis as ms, parse_id, timeout_columns,
};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{
    AttachOutcome, BoxFuture, CreateOutcome, EndCount, ListQuery, NewSession, ReleaseClaim,
    SessionRecord, SessionStore, StoreError, StoreHealth, TenantScope, TouchOutcome,
};
use session_lifecycle_store::{
    sql_count_ends, sql_ended_at, sql_ended_since, sql_later, sql_release_due_at,
};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

pub use schema::SCHEMA_VERSION;

/// A session store in a PostgreSQL database, through a connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the dedicated `LISTEN` connection, outside the pool.
    config: tokio_postgres::Config,
}

/// The channel on which an end notifies the nodes that hold its resources (payload: the
/// node id).
const RELEASES_CHANNEL: &str = "session_lifecycle_releases";

/// The channel on which every end is announced, for every instance to close the sockets
/// of the session (payload: the session id).
const ENDS_CHANNEL: &str = "session_lifecycle_ends";
/// The channel a fan-out notifies when it placed events in the stream.
const EVENTS_CHANNEL: &str = "session_lifecycle_events";
/// The channel on which a placement wakes the node it assigned a session to (payload: the
/// node id).
const STARTS_CHANNEL: &str = "session_lifecycle_starts";
/// The channel on which a node reports that a placed session's start finished or was
/// refused (payload: the session id).
const PLACED_CHANNEL: &str = "session_lifecycle_placed";

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL) with a pool, and migrates the schema.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::InvalidConfig(Box::new(PgError(e))))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            // The most recently used connection first: sequential calls keep one server
            // process warm instead of cycling through all of them (FIFO cost a third more
            // per end on a small machine).
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::InvalidConfig(Box::new(e)))?;
        let store = PostgresStore { pool, config };
        let mut client = store.pool.get().await.map_err(pool_unavailable)?;
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_unavailable)
    }

    /// Listens on one connection to `channel`, calling `heard` with each payload, until
    /// the connection fails; `listening` is called once `LISTEN` took effect.
    async fn listen(
        &self,
        channel: &str,
        heard: &(dyn Fn(&str) + Send + Sync),
        listening: &(dyn Fn() + Send + Sync),
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        // A bounded channel of payloads: a listener that falls behind misses some (every
        // watcher is best effort, see the traits), the connection never waits on it.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        // The connection is driven on its own; its notifications come back over a channel
        // that closes when the connection ends. The driver is aborted with this future, so
        // nothing of it outlives the engine that listens.
        let mut driver = AbortOnDrop(tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                            tx.try_send(n.payload().to_owned())
                        {
                            return Ok(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        }));
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        listening();
        while let Some(payload) = rx.recv().await {
            heard(&payload);
        }
        drop(client);
        match (&mut driver.0).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The columns of a session and of one of its resources (NULL when it has none), as
/// [`records`] reads them: one statement, so one snapshot, whatever commits meanwhile. A
/// macro, so that the statements using it are `&'static str` built at compile time.
macro_rules! record_columns {
    () => {
        "s.id, s.tenant, s.status, s.started_at, s.ended_at, s.end_reason, \
     s.expires_at, s.last_seen_at, s.metadata, s.room_provider, s.room_name, s.node, \
     r.seq, r.kind, r.handle, r.state, r.attempts, r.retry_at, r.released_at, r.note, \
     r.last_error, s.participant_left_ms, s.participant_absent_ms, s.websocket_grace_ms, \
     s.ready_at"
    };
}

/// How many columns `record_columns!()` has: what a statement selects after them starts
/// here.
const RECORD_COLUMNS: usize = 25;

/// The database's clock, in milliseconds since the epoch.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

/// When the database server last started, in milliseconds since the epoch.
macro_rules! db_start_ms {
    () => {
        "(extract(epoch FROM pg_postmaster_start_time()) * 1000)::BIGINT"
    };
}

/// Node row `n` alive for the node timeout `$timeout` (ms), judged as [`NodeMembership`] judges
/// here: on the database's clock, counting only time the database was up.
macro_rules! node_alive {
    ($timeout:literal) => {
        concat!(
            "GREATEST(n.last_heartbeat_at, ",
            db_start_ms!(),
            ") > ",
            db_now_ms!(),
            " - ",
            $timeout,
            "::BIGINT"
        )
    };
}

// After the SQL macros above, which they use.
mod error;
mod idempotency;
mod nodes;
mod outbox;
mod placement;
mod presence;
mod releases;
mod rooms;
mod rows;

use error::{PgError, pool_unavailable, unavailable};
use rows::{col, get_record, records, resource_key};

/// Whether the tenant of `new` is at its limit of started sessions, judged in `tx`: creates
/// of one tenant take turns (an advisory lock held until `tx` ends), whichever instance
/// serves them.
async fn tenant_at_limit(
    tx: &tokio_postgres::Transaction<'_>,
    new: &NewSession,
) -> Result<bool, StoreError> {
    let Some(max) = new.max_concurrent else {
        return Ok(false);
    };
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&new.tenant])
        .await
        .map_err(unavailable)?;
    let running: i64 = col(
        &tx.query_one(pg(statements::COUNT_STARTED), &[&new.tenant])
            .await
            .map_err(unavailable)?,
        0,
    )?;
    Ok(running >= i64::from(max))
}

/// Inserts `new` and its `started` event in `tx`; an id taken already is
/// [`StoreError::DuplicateId`].
async fn insert_session(
    tx: &tokio_postgres::Transaction<'_>,
    new: &NewSession,
) -> Result<(), StoreError> {
    let (left, absent, grace) = timeout_columns(&new.timeouts);
    let inserted = tx
        .execute(
            pg(statements::INSERT_SESSION),
            &[
                &new.id.to_string(),
                &new.tenant,
                &ms(new.started_at),
                &ms(new.expires_at.max(new.started_at)),
                &new.metadata,
                &new.room.as_ref().map(|r| r.provider.as_str()),
                &new.room.as_ref().map(|r| r.name.as_str()),
                &new.node,
                &left,
                &absent,
                &grace,
                &new.callback_url,
                &new.billing.meter.as_str(),
                &new.billing.rounding.as_str(),
            ],
        )
        .await;
    match inserted {
        Ok(_) => {}
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(StoreError::DuplicateId(new.id));
        }
        Err(e) => return Err(unavailable(e)),
    }
    tx.execute(
        pg(statements::INSERT_EVENT),
        &[
            &new.id.to_string(),
            &new.tenant,
            &event_sequence(EventKind::Started),
            &ms(new.started_at),
        ],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

impl SessionStore for PostgresStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            if tenant_at_limit(&tx, &new).await? {
                return Ok(CreateOutcome::LimitReached);
            }
            insert_session(&tx, &new).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(CreateOutcome::Created)
        })
    }

    fn attach(
        &self,
        id: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<AttachOutcome, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let id_text = id.to_string();
            // Lock the started session: an end waits for this attach, or refuses it.
            let started = tx
                .query_opt(
                    "SELECT node FROM sessions WHERE id = $1 AND status = 'started' FOR UPDATE",
                    &[&id_text],
                )
                .await
                .map_err(unavailable)?;
            let Some(started) = started else {
                return Ok(AttachOutcome::Refused);
            };
            let node: String = col(&started, 0)?;
            let (kind, handle) = resource_key(&resource);
            let n = tx
                .execute(
                    "INSERT INTO resources (session_id, seq, kind, handle, state, node)
                     SELECT $1, COALESCE((SELECT MAX(seq) + 1 FROM resources WHERE session_id = $1), 0), $2, $3, 'held', $5
                     WHERE (SELECT COUNT(*) FROM resources WHERE session_id = $1) < $4
                       AND NOT EXISTS (SELECT 1 FROM resources WHERE session_id = $1 AND kind = $2 AND handle = $3)",
                    &[&id_text, &kind, &handle, &(session_lifecycle::MAX_RESOURCES as i64), &node],
                )
                .await
                .map_err(unavailable)?;
            if n == 1 {
                tx.execute(pg(statements::COUNT_ATTACHED), &[&id_text])
                    .await
                    .map_err(unavailable)?;
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(if n == 1 {
                AttachOutcome::Attached
            } else {
                AttachOutcome::Refused
            })
        })
    }

    fn end<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
        reason: EndReason,
        claim: Option<ReleaseClaim>,
    ) -> BoxFuture<'a, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let id_text = id.to_string();
            let tx = client.transaction().await.map_err(unavailable)?;
            // One statement: the conditional update, the release intents, the owning
            // nodes' notification (sent when it commits) and the record as ended, built
            // from what the updates return; then the usage it settles, in the same
            // transaction.
            let statement = tx
                .prepare_cached(concat!(
                    "WITH ended AS (
                        UPDATE sessions SET status = 'ended', end_reason = $3, ended_at = ",
                    sql_ended_at!("$2"),
                    ", release_due_at = ",
                    sql_release_due_at!(sql_ended_at!("$2")),
                    ", release_claimed_by = CASE WHEN resource_count > 0
                                                                 AND node = $5 THEN $5 END,
                                            release_claimed_until = CASE WHEN resource_count > 0
                                                                    AND node = $5 THEN $6::BIGINT END
                        WHERE id = $1 AND status = 'started' AND ($7::TEXT IS NULL OR tenant = $7)
                        RETURNING *),
                     due AS (
                        UPDATE resources SET state = 'pending', attempts = 0,
                                             retry_at = (SELECT ended_at FROM ended)
                        WHERE session_id IN (SELECT id FROM ended) AND state = 'held'
                        RETURNING *),
                     ended_events AS (
                        INSERT INTO events (session_id, tenant, session_seq, at)
                        SELECT id, tenant, $9::BIGINT, ended_at FROM ended
                        UNION ALL
                        SELECT id, tenant, $10::BIGINT, ended_at FROM ended WHERE resource_count = 0),
                     notified AS (
                        SELECT pg_notify($4, node)
                        FROM (SELECT DISTINCT node FROM due WHERE node IS DISTINCT FROM $5) AS nodes
                        UNION ALL
                        SELECT pg_notify($8, id) FROM ended)
                     SELECT ",
                    record_columns!(),
                    ", (SELECT COUNT(*) FROM notified)
                     FROM ended s
                     LEFT JOIN (SELECT * FROM due
                                UNION ALL
                                SELECT * FROM resources WHERE session_id = $1 AND state <> 'held') r
                       ON r.session_id = s.id"
                ))
                .await
                .map_err(unavailable)?;
            let rows = tx
                .query(
                    &statement,
                    &[
                        &id_text,
                        &ms(now),
                        &reason.as_str(),
                        &RELEASES_CHANNEL,
                        &claim.as_ref().map(|c| c.node.as_str()),
                        &claim.as_ref().map(|c| ms(c.until)),
                        &tenant,
                        &ENDS_CHANNEL,
                        &event_sequence(EventKind::Ended),
                        &event_sequence(EventKind::Released),
                    ],
                )
                .await
                .map_err(unavailable)?;
            if let Some(record) = records(&rows)?.pop() {
                usage::settle_usage(&tx, &id_text, None, now).await?;
                tx.commit().await.map_err(unavailable)?;
                return Ok(Some((record, Transition::Committed)));
            }
            tx.rollback().await.map_err(unavailable)?;
            // Already ended, unknown or out of scope. A fresh statement, whose snapshot
            // includes the end that a concurrent call committed while this one waited on its
            // row lock.
            let record = get_record(&client, &id_text)
                .await?
                .filter(|r| tenant.is_none_or(|t| t == r.tenant));
            Ok(record.map(|r| (r, Transition::AlreadyEnded)))
        })
    }

    fn get(&self, id: SessionId) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            get_record(&client, &id.to_string()).await
        })
    }

    fn list(&self, query: ListQuery) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let status = query.status.map(|s| match s {
                Status::Started => "started",
                Status::Ended => "ended",
            });
            let statement = client
                .prepare_cached(concat!(
                    "WITH page AS (
                            SELECT id FROM sessions
                            WHERE ($1::TEXT IS NULL OR tenant = $1)
                              AND ($2::TEXT IS NULL OR status = $2)
                              AND ($3::TEXT IS NULL OR id < $3)
                              AND ($5::TEXT IS NULL OR node = $5)
                            ORDER BY id DESC LIMIT $4)
                     SELECT ",
                    record_columns!(),
                    " FROM page
                     JOIN sessions s ON s.id = page.id
                     LEFT JOIN resources r ON r.session_id = s.id
                     ORDER BY s.id DESC"
                ))
                .await
                .map_err(unavailable)?;
            let rows = client
                .query(
                    &statement,
                    &[
                        &query.tenant,
                        &status,
                        &query.before.map(|b| b.to_string()),
                        &i64::from(query.limit),
                        &query.node,
                    ],
                )
                .await
                .map_err(unavailable)?;
            records(&rows)
        })
    }

    fn ended_since(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(concat!(
                    "WITH page AS (",
                    sql_ended_since!("$1::TEXT IS NULL OR tenant = $1", "$2", "$3"),
                    ") SELECT ",
                    record_columns!(),
                    " FROM page
                     JOIN sessions s ON s.id = page.id
                     LEFT JOIN resources r ON r.session_id = s.id
                     ORDER BY (s.release_due_at IS NULL), s.ended_at DESC, s.id DESC"
                ))
                .await
                .map_err(unavailable)?;
            let rows = client
                .query(&statement, &[&tenant, &ms(since), &i64::from(limit)])
                .await
                .map_err(unavailable)?;
            records(&rows)
        })
    }

    fn count_ends(
        &self,
        tenant: Option<String>,
        since: Timestamp,
        until: Timestamp,
        bucket: Duration,
    ) -> BoxFuture<'_, Result<Vec<EndCount>, StoreError>> {
        let width = duration_ms(bucket).max(1);
        Box::pin(async move {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(sql_count_ends!(
                    "$1::TEXT IS NULL OR tenant = $1",
                    "$2",
                    "$3",
                    "$4"
                ))
                .await
                .map_err(unavailable)?;
            let rows = client
                .query(&statement, &[&tenant, &ms(since), &ms(until), &width])
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|row| end_count(col(row, 0)?, &col::<String>(row, 1)?, col(row, 2)?))
                .collect()
        })
    }

    fn touch<'a>(
        &'a self,
        id: SessionId,
        tenant: TenantScope<'a>,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<TouchOutcome, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            // One statement: the conditional touch and the record after it (its resources
            // joined), with whether the touch applied.
            let statement = client
                .prepare_cached(concat!(
                    "WITH touched AS (
                        UPDATE sessions SET last_seen_at = ",
                    sql_later!("last_seen_at", "$2"),
                    " WHERE id = $1 AND status = 'started' AND ($3::TEXT IS NULL OR tenant = $3)
                        RETURNING *),
                     current AS (
                        SELECT * FROM touched
                        UNION ALL
                        SELECT * FROM sessions
                        WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM touched)
                          AND ($3::TEXT IS NULL OR tenant = $3))
                     SELECT ",
                    record_columns!(),
                    ", EXISTS (SELECT 1 FROM touched)
                     FROM current s
                     LEFT JOIN resources r ON r.session_id = s.id"
                ))
                .await
                .map_err(unavailable)?;
            let rows = client
                .query(&statement, &[&id.to_string(), &ms(now), &tenant])
                .await
                .map_err(unavailable)?;
            let touched = match rows.first() {
                Some(row) => col::<bool>(row, RECORD_COLUMNS)?,
                None => return Ok(TouchOutcome::NotFound),
            };
            let record = records(&rows)?.pop().ok_or_else(|| StoreError::Corrupt {
                id: id.to_string(),
                detail: "a touched session without a record".to_owned(),
            })?;
            Ok(if touched {
                TouchOutcome::Touched(record)
            } else {
                TouchOutcome::Ended(record)
            })
        })
    }

    fn due(
        &self,
        now: Timestamp,
        orphan_timeout: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(SessionId, EndReason)>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    pg(statements::DUE),
                    &[&ms(now), &duration_ms(orphan_timeout), &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    let reason = if col::<bool>(r, 1)? {
                        EndReason::Expired
                    } else {
                        EndReason::Orphaned
                    };
                    Ok((parse_id(&col::<String>(r, 0)?)?, reason))
                })
                .collect()
        })
    }
}

impl StoreHealth for PostgresStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .query_one("SELECT 1", &[])
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}
