//! The PostgreSQL store of `session-lifecycle`: several `sessiond` instances share one
//! database. Every method is one transaction; ending is one conditional `UPDATE` (row
//! locks make concurrent ends from any instance resolve to one), release intents are
//! claimed with `FOR UPDATE SKIP LOCKED` and a lease, and migrations run under an
//! advisory lock so instances can start together.
//!
//! ```no_run
//! # async fn demo() -> Result<(), session_lifecycle_runtime::StoreError> {
//! let store = session_lifecycle_postgres::PostgresStore::connect("postgres://postgres@127.0.0.1/test").await?;
//! # Ok(()) }
//! ```

mod schema;

use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use session_lifecycle::{EndReason, Resource, SessionId, Status, Timestamp, Transition};
use session_lifecycle_runtime::rows::{
    ResourceRow, SessionRow, millis as ms, parse_id, release_intent,
};
use session_lifecycle_runtime::{
    AttachOutcome, BoxFuture, CreateOutcome, ListQuery, NewSession, ReleaseIntent, RoomEvent,
    RoomEventKind, RoomUpdate, SessionRecord, Store, StoreError, TouchOutcome,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

pub use schema::SCHEMA_VERSION;

/// A session store in a PostgreSQL database, through a connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

const SESSION_COLUMNS: &str = "id, tenant, status, started_at, ended_at, end_reason, expires_at, \
     last_seen_at, metadata, room_provider, room_name";

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL) with a pool, and migrates the schema.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(unavailable)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let store = PostgresStore { pool };
        let mut client = store.pool.get().await.map_err(unavailable)?;
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }
}

async fn load_record<C: GenericClient>(c: &C, row: &Row) -> Result<SessionRecord, StoreError> {
    let session = SessionRow {
        id: row.get(0),
        tenant: row.get(1),
        status: row.get(2),
        started_at: row.get(3),
        ended_at: row.get(4),
        end_reason: row.get(5),
        expires_at: row.get(6),
        last_seen_at: row.get(7),
        metadata: row.get(8),
        room_provider: row.get(9),
        room_name: row.get(10),
    };
    let resources = c
        .query(
            "SELECT seq, kind, handle, state, attempts, retry_at, released_at, note
             FROM resources WHERE session_id = $1",
            &[&session.id],
        )
        .await
        .map_err(unavailable)?
        .iter()
        .map(|r| ResourceRow {
            seq: i64::from(r.get::<_, i32>(0)),
            kind: i64::from(r.get::<_, i32>(1)),
            handle: r.get(2),
            state: r.get(3),
            attempts: i64::from(r.get::<_, i32>(4)),
            retry_at: r.get(5),
            released_at: r.get(6),
            note: r.get(7),
        })
        .collect();
    session.into_record(resources)
}

async fn get_record<C: GenericClient>(
    c: &C,
    id: &str,
) -> Result<Option<SessionRecord>, StoreError> {
    let row = c
        .query_opt(
            &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(unavailable)?;
    match row {
        Some(row) => load_record(c, &row).await.map(Some),
        None => Ok(None),
    }
}

fn resource_key(r: &Resource) -> (i32, i64) {
    (i32::from(r.kind.0), r.handle as i64)
}

impl Store for PostgresStore {
    fn create(&self, new: NewSession) -> BoxFuture<'_, Result<CreateOutcome, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            if let Some(max) = new.max_concurrent {
                // Creates of one tenant take turns, whichever instance serves them.
                tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&new.tenant])
                    .await
                    .map_err(unavailable)?;
                let running: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM sessions WHERE tenant = $1 AND status = 'started'",
                        &[&new.tenant],
                    )
                    .await
                    .map_err(unavailable)?
                    .get(0);
                if running >= i64::from(max) {
                    return Ok(CreateOutcome::LimitReached);
                }
            }
            let inserted = tx
                .execute(
                    "INSERT INTO sessions (id, tenant, status, started_at, expires_at, last_seen_at,
                                           metadata, room_provider, room_name)
                     VALUES ($1, $2, 'started', $3, $4, $3, $5, $6, $7)",
                    &[
                        &new.id.to_string(),
                        &new.tenant,
                        &ms(new.started_at),
                        &ms(new.expires_at.max(new.started_at)),
                        &new.metadata,
                        &new.room.as_ref().map(|r| r.provider.as_str()),
                        &new.room.as_ref().map(|r| r.name.as_str()),
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
                    "SELECT 1 FROM sessions WHERE id = $1 AND status = 'started' FOR UPDATE",
                    &[&id_text],
                )
                .await
                .map_err(unavailable)?;
            if started.is_none() {
                return Ok(AttachOutcome::Refused);
            }
            let (kind, handle) = resource_key(&resource);
            let n = tx
                .execute(
                    "INSERT INTO resources (session_id, seq, kind, handle, state)
                     SELECT $1, COALESCE((SELECT MAX(seq) + 1 FROM resources WHERE session_id = $1), 0), $2, $3, 'held'
                     WHERE (SELECT COUNT(*) FROM resources WHERE session_id = $1) < $4
                       AND NOT EXISTS (SELECT 1 FROM resources WHERE session_id = $1 AND kind = $2 AND handle = $3)",
                    &[&id_text, &kind, &handle, &(session_lifecycle::MAX_RESOURCES as i64)],
                )
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok(if n == 1 {
                AttachOutcome::Attached
            } else {
                AttachOutcome::Refused
            })
        })
    }

    fn end(
        &self,
        id: SessionId,
        now: Timestamp,
        reason: EndReason,
    ) -> BoxFuture<'_, Result<Option<(SessionRecord, Transition)>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let id_text = id.to_string();
            let n = tx
                .execute(
                    "UPDATE sessions SET status = 'ended', ended_at = GREATEST($2, started_at), end_reason = $3
                     WHERE id = $1 AND status = 'started'",
                    &[&id_text, &ms(now), &reason.as_str()],
                )
                .await
                .map_err(unavailable)?;
            let transition = if n == 1 {
                tx.execute(
                    "UPDATE resources SET state = 'pending', attempts = 0, retry_at = $2
                     WHERE session_id = $1 AND state = 'held'",
                    &[&id_text, &ms(now)],
                )
                .await
                .map_err(unavailable)?;
                Transition::Committed
            } else {
                Transition::AlreadyEnded
            };
            let record = get_record(&tx, &id_text).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(record.map(|r| (r, transition)))
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
            let rows = client
                .query(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions
                         WHERE ($1::TEXT IS NULL OR tenant = $1)
                           AND ($2::TEXT IS NULL OR status = $2)
                           AND ($3::TEXT IS NULL OR id < $3)
                         ORDER BY id DESC LIMIT $4"
                    ),
                    &[
                        &query.tenant,
                        &status,
                        &query.before.map(|b| b.to_string()),
                        &i64::from(query.limit),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(load_record(&client, row).await?);
            }
            Ok(out)
        })
    }

    fn touch(
        &self,
        id: SessionId,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<TouchOutcome, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let id_text = id.to_string();
            let n = client
                .execute(
                    "UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $2)
                     WHERE id = $1 AND status = 'started'",
                    &[&id_text, &ms(now)],
                )
                .await
                .map_err(unavailable)?;
            if n == 1 {
                return Ok(TouchOutcome::Touched);
            }
            let exists = client
                .query_opt("SELECT 1 FROM sessions WHERE id = $1", &[&id_text])
                .await
                .map_err(unavailable)?;
            Ok(if exists.is_some() {
                TouchOutcome::Ended
            } else {
                TouchOutcome::NotFound
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
                    "SELECT id, expires_at <= last_seen_at + $2 FROM sessions
                     WHERE status = 'started' AND (expires_at <= $1 OR last_seen_at <= $1 - $2)
                     ORDER BY LEAST(expires_at, last_seen_at + $2) LIMIT $3",
                    &[&ms(now), &duration_ms(orphan_timeout), &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    let reason = if r.get::<_, bool>(1) {
                        EndReason::Expired
                    } else {
                        EndReason::Orphaned
                    };
                    Ok((parse_id(r.get(0))?, reason))
                })
                .collect()
        })
    }

    fn claim_releases(
        &self,
        owner: &str,
        now: Timestamp,
        lease: Duration,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ReleaseIntent>, StoreError>> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "UPDATE resources SET claimed_by = $2, claimed_until = $1 + $3
                     WHERE (session_id, seq) IN (
                        SELECT session_id, seq FROM resources
                        WHERE state = 'pending' AND retry_at <= $1
                          AND (claimed_until IS NULL OR claimed_until <= $1)
                        ORDER BY retry_at LIMIT $4
                        FOR UPDATE SKIP LOCKED)
                     RETURNING session_id, kind, handle, attempts",
                    &[&ms(now), &owner, &duration_ms(lease), &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    release_intent(
                        r.get(0),
                        i64::from(r.get::<_, i32>(1)),
                        r.get(2),
                        i64::from(r.get::<_, i32>(3)),
                    )
                })
                .collect()
        })
    }

    fn complete_release(
        &self,
        intent: ReleaseIntent,
        now: Timestamp,
        note: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let (kind, handle) = resource_key(&intent.resource);
            client
                .execute(
                    "UPDATE resources SET state = 'released', released_at = $4, note = $5,
                            retry_at = NULL, claimed_by = NULL, claimed_until = NULL
                     WHERE session_id = $1 AND kind = $2 AND handle = $3 AND state = 'pending'",
                    &[&intent.session.to_string(), &kind, &handle, &ms(now), &note],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn fail_release(
        &self,
        intent: ReleaseIntent,
        retry_at: Timestamp,
        error: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let (kind, handle) = resource_key(&intent.resource);
            client
                .execute(
                    "UPDATE resources SET attempts = attempts + 1, retry_at = $4, last_error = $5,
                            claimed_by = NULL, claimed_until = NULL
                     WHERE session_id = $1 AND kind = $2 AND handle = $3 AND state = 'pending'",
                    &[
                        &intent.session.to_string(),
                        &kind,
                        &handle,
                        &ms(retry_at),
                        &error,
                    ],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn drop_claims(&self, owner: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE resources SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1",
                    &[&owner],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn room_event(
        &self,
        event: RoomEvent,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<Vec<RoomUpdate>>, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let fresh = tx
                .execute(
                    "INSERT INTO room_events (provider, event_id, received_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&event.provider.as_str(), &event.event_id, &ms(now)],
                )
                .await
                .map_err(unavailable)?;
            if fresh == 0 {
                return Ok(None);
            }
            let sessions = tx
                .query(
                    "SELECT id FROM sessions
                     WHERE room_provider = $1 AND room_name = $2 AND status = 'started'
                       AND ($3::TEXT IS NULL OR tenant = $3)
                     FOR UPDATE",
                    &[&event.provider.as_str(), &event.room, &event.tenant],
                )
                .await
                .map_err(unavailable)?;
            let mut updates = Vec::with_capacity(sessions.len());
            for row in sessions {
                let id: String = row.get(0);
                match &event.kind {
                    RoomEventKind::Joined { participant } | RoomEventKind::Left { participant } => {
                        let present = matches!(event.kind, RoomEventKind::Joined { .. });
                        // The latest event by provider time wins, whatever the arrival order.
                        tx.execute(
                            "INSERT INTO room_participants (session_id, identity, present, last_event_at)
                             VALUES ($1, $2, $3, $4)
                             ON CONFLICT (session_id, identity) DO UPDATE
                             SET present = excluded.present, last_event_at = excluded.last_event_at
                             WHERE excluded.last_event_at >= room_participants.last_event_at",
                            &[&id, participant, &present, &ms(event.at)],
                        )
                        .await
                        .map_err(unavailable)?;
                        if present {
                            tx.execute(
                                "UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $2) WHERE id = $1",
                                &[&id, &ms(now)],
                            )
                            .await
                            .map_err(unavailable)?;
                        }
                    }
                    RoomEventKind::Finished => {
                        tx.execute(
                            "UPDATE sessions SET room_finished = TRUE WHERE id = $1",
                            &[&id],
                        )
                        .await
                        .map_err(unavailable)?;
                    }
                }
                let state = tx
                    .query_one(
                        "SELECT (SELECT COUNT(*) FROM room_participants WHERE session_id = $1 AND present),
                                (SELECT COUNT(*) FROM room_participants WHERE session_id = $1),
                                room_finished
                         FROM sessions WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(unavailable)?;
                updates.push(RoomUpdate {
                    session: parse_id(&id)?,
                    present: u32::try_from(state.get::<_, i64>(0)).unwrap_or(u32::MAX),
                    // A leave implies a join, even one delivered later.
                    ever_joined: state.get::<_, i64>(1) > 0,
                    finished: state.get(2),
                });
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(updates))
        })
    }

    fn room_presence(&self, id: SessionId) -> BoxFuture<'_, Result<u32, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let n: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM room_participants WHERE session_id = $1 AND present",
                    &[&id.to_string()],
                )
                .await
                .map_err(unavailable)?
                .get(0);
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    fn touch_present(&self, now: Timestamp) -> BoxFuture<'_, Result<Vec<SessionId>, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $1)
                     WHERE status = 'started'
                       AND id IN (SELECT session_id FROM room_participants WHERE present)
                     RETURNING id",
                    &[&ms(now)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter().map(|r| parse_id(r.get(0))).collect()
        })
    }

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
