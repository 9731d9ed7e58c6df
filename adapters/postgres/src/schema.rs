//! The schema and its migrations, safe to run from several instances at once.

use session_lifecycle_runtime::StoreError;
use tokio_postgres::Client;

/// Migration `i` takes the schema from version `i` to `i + 1`: 1, sessions, resources and
/// rooms; 2, nodes (which node runs each session and holds each resource, heartbeats); 3,
/// releases claimed per session at the time the core says the next one is due; the session
/// row counts its resources (an end, which waits for a concurrent attach's row lock, then
/// sees the count the attach left, where a read of `resources` would use an older snapshot).
const MIGRATIONS: &[&str] = &["
    CREATE TABLE sessions (
        id            TEXT PRIMARY KEY,
        tenant        TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('started', 'ended')),
        started_at    BIGINT NOT NULL,
        ended_at      BIGINT,
        end_reason    TEXT,
        expires_at    BIGINT NOT NULL,
        last_seen_at  BIGINT NOT NULL,
        metadata      TEXT,
        room_provider TEXT,
        room_name     TEXT,
        room_finished BOOLEAN NOT NULL DEFAULT FALSE,
        CHECK ((status = 'started') = (ended_at IS NULL)),
        CHECK ((ended_at IS NULL) = (end_reason IS NULL)),
        CHECK (ended_at IS NULL OR ended_at >= started_at)
    );
    CREATE INDEX sessions_by_tenant ON sessions (tenant, status, id);
    CREATE INDEX sessions_started_by_expiry ON sessions (expires_at) WHERE status = 'started';
    CREATE INDEX sessions_started_by_seen ON sessions (last_seen_at) WHERE status = 'started';
    CREATE INDEX sessions_by_room ON sessions (room_provider, room_name) WHERE room_provider IS NOT NULL;

    CREATE TABLE resources (
        session_id    TEXT NOT NULL REFERENCES sessions (id),
        seq           INTEGER NOT NULL,
        kind          INTEGER NOT NULL,
        handle        BIGINT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('held', 'pending', 'released')),
        attempts      INTEGER NOT NULL DEFAULT 0,
        retry_at      BIGINT,
        released_at   BIGINT,
        claimed_by    TEXT,
        claimed_until BIGINT,
        note          TEXT,
        last_error    TEXT,
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, kind, handle),
        CHECK ((state = 'pending') = (retry_at IS NOT NULL)),
        CHECK ((state = 'released') = (released_at IS NOT NULL))
    );
    CREATE INDEX resources_pending ON resources (retry_at) WHERE state = 'pending';
    CREATE INDEX resources_claimed ON resources (claimed_by) WHERE claimed_by IS NOT NULL;

    CREATE TABLE room_events (
        provider    TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        PRIMARY KEY (provider, event_id)
    );
    CREATE TABLE room_participants (
        session_id    TEXT NOT NULL REFERENCES sessions (id),
        identity      TEXT NOT NULL,
        present       BOOLEAN NOT NULL,
        last_event_at BIGINT NOT NULL,
        PRIMARY KEY (session_id, identity)
    );
    CREATE INDEX room_participants_present ON room_participants (session_id) WHERE present;
", "
    ALTER TABLE sessions ADD COLUMN node TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE resources ADD COLUMN node TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE resources ADD COLUMN lost_at BIGINT;
    CREATE INDEX sessions_started_by_node ON sessions (node) WHERE status = 'started';
    CREATE INDEX resources_pending_by_node ON resources (node, retry_at) WHERE state = 'pending';
    CREATE TABLE nodes (
        id                TEXT PRIMARY KEY,
        last_heartbeat_at BIGINT NOT NULL
    );
", "
    ALTER TABLE sessions ADD COLUMN release_due_at BIGINT;
    ALTER TABLE sessions ADD COLUMN resource_count INTEGER NOT NULL DEFAULT 0;
    UPDATE sessions SET resource_count =
        (SELECT COUNT(*) FROM resources WHERE session_id = sessions.id);
    ALTER TABLE sessions ADD COLUMN release_claimed_by TEXT;
    ALTER TABLE sessions ADD COLUMN release_claimed_until BIGINT;
    UPDATE sessions SET release_due_at =
        (SELECT MIN(retry_at) FROM resources WHERE session_id = sessions.id AND state = 'pending')
     WHERE status = 'ended';
    CREATE INDEX sessions_release_due ON sessions (node, release_due_at)
        WHERE release_due_at IS NOT NULL;
    CREATE INDEX sessions_release_claimed ON sessions (release_claimed_by)
        WHERE release_claimed_by IS NOT NULL;
    ALTER TABLE resources DROP COLUMN claimed_by;
    ALTER TABLE resources DROP COLUMN claimed_until;
",
// 4: the nodes holding client sockets of each session (presence as liveness); each
// session's own timeouts (NULL: the service's defaults, for sessions recorded before); since
// when its room is empty.
"
    ALTER TABLE sessions ADD COLUMN participant_left_ms BIGINT;
    ALTER TABLE sessions ADD COLUMN participant_absent_ms BIGINT;
    ALTER TABLE sessions ADD COLUMN websocket_grace_ms BIGINT;
    ALTER TABLE sessions ADD COLUMN room_emptied_at BIGINT;
    CREATE TABLE session_presence (
        session_id TEXT NOT NULL REFERENCES sessions (id),
        node       TEXT NOT NULL,
        PRIMARY KEY (session_id, node)
    );
    CREATE INDEX session_presence_by_node ON session_presence (node);
",
// 7: the event outbox: each session event written with its cause, its place in the event
// stream once fanned out, and its deliveries to the endpoints that want it.
"
    ALTER TABLE sessions ADD COLUMN callback_url TEXT;
    CREATE TABLE events (
        id          BIGSERIAL PRIMARY KEY,
        session_id  TEXT NOT NULL REFERENCES sessions (id),
        tenant      TEXT NOT NULL,
        session_seq BIGINT NOT NULL,
        at          BIGINT NOT NULL,
        position    BIGINT,
        UNIQUE (session_id, session_seq)
    );
    CREATE INDEX events_undispatched ON events (id) WHERE position IS NULL;
    CREATE UNIQUE INDEX events_by_position ON events (position) WHERE position IS NOT NULL;
    CREATE INDEX events_by_tenant ON events (tenant, position) WHERE position IS NOT NULL;
    CREATE TABLE event_stream (last_position BIGINT NOT NULL);
    INSERT INTO event_stream (last_position) VALUES (0);
    CREATE TABLE deliveries (
        id              BIGSERIAL PRIMARY KEY,
        event_id        BIGINT NOT NULL REFERENCES events (id),
        session_id      TEXT NOT NULL,
        session_seq     BIGINT NOT NULL,
        tenant          TEXT NOT NULL,
        event_at        BIGINT NOT NULL,
        endpoint        TEXT NOT NULL,
        url             TEXT NOT NULL,
        origin          TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        BIGINT NOT NULL DEFAULT 0,
        created_at      BIGINT NOT NULL,
        next_attempt_at BIGINT,
        last_attempt_at BIGINT,
        last_status     BIGINT,
        last_error      TEXT,
        claimed_by      TEXT,
        claimed_until   BIGINT,
        UNIQUE (event_id, endpoint),
        CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_in_order ON deliveries (session_id, endpoint, session_seq)
        WHERE status = 'pending';
    CREATE INDEX deliveries_by_tenant ON deliveries (tenant, id);
    CREATE INDEX deliveries_done ON deliveries (created_at) WHERE status <> 'pending';
    CREATE INDEX events_by_time ON events (at) WHERE position IS NOT NULL;
",
// 8: idempotency keys of creates: the body hash and session each key is bound to, and its
// answer once given; when each session's avatar server reported ready.
"
    ALTER TABLE sessions ADD COLUMN ready_at BIGINT;
    CREATE TABLE idempotency_keys (
        tenant       TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        status       BIGINT,
        body         TEXT,
        created_at   BIGINT NOT NULL,
        claimed_at   BIGINT NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
",
// 9: what each node last reported of itself (draining, room, GPUs) for the live page, and
// ended sessions by the time they ended (its recent ends).
"
    ALTER TABLE nodes ADD COLUMN report TEXT;
    CREATE INDEX sessions_ended_by_time ON sessions (ended_at) WHERE status = 'ended';
"];

/// The schema version this code writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// An arbitrary constant naming this schema's migration lock.
const MIGRATION_LOCK: i64 = 0x5e55_1011;

/// Brings the database to [`SCHEMA_VERSION`]. Instances starting together take turns on an
/// advisory lock; each migration commits with its version. Refuses a newer schema.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let err = crate::unavailable;
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .await
        .map_err(err)?;
    let row = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .map_err(err)?;
    let mut version: i32 = row.try_get(0).map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: i64::from(version),
            supported: i64::from(SCHEMA_VERSION),
        });
    }
    while version < SCHEMA_VERSION {
        tx.batch_execute(MIGRATIONS[version as usize])
            .await
            .map_err(err)?;
        version += 1;
    }
    tx.execute("DELETE FROM schema_version", &[])
        .await
        .map_err(err)?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES ($1)",
        &[&version],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)
}
