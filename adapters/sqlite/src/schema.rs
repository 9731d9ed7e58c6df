//! The schema and its migrations, tracked in `schema_version`.

use rusqlite::Connection;
use session_lifecycle_store::StoreError;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: sessions and their resources' release states.
    "CREATE TABLE sessions (
        id           TEXT PRIMARY KEY,
        tenant       TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('started', 'ended')),
        started_at   INTEGER NOT NULL,
        ended_at     INTEGER,
        end_reason   TEXT,
        expires_at   INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        metadata     TEXT,
        CHECK ((status = 'started') = (ended_at IS NULL)),
        CHECK ((ended_at IS NULL) = (end_reason IS NULL)),
        CHECK (ended_at IS NULL OR ended_at >= started_at)
     );
     -- Listing a tenant's sessions newest first (ULID ids sort by time), and counting its
     -- started ones for the plan limit.
     CREATE INDEX sessions_by_tenant ON sessions (tenant, status, id);
     -- The sweeper's queries: started sessions by expiry and by last liveness.
     CREATE INDEX sessions_started_by_expiry ON sessions (expires_at) WHERE status = 'started';
     CREATE INDEX sessions_started_by_seen ON sessions (last_seen_at) WHERE status = 'started';

     CREATE TABLE resources (
        session_id    TEXT NOT NULL REFERENCES sessions (id),
        seq           INTEGER NOT NULL,
        kind          INTEGER NOT NULL,
        handle        INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('held', 'pending', 'released')),
        attempts      INTEGER NOT NULL DEFAULT 0,
        retry_at      INTEGER,
        released_at   INTEGER,
        claimed_by    TEXT,
        claimed_until INTEGER,
        note          TEXT,
        last_error    TEXT,
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, kind, handle),
        CHECK ((state = 'pending') = (retry_at IS NOT NULL)),
        CHECK ((state = 'released') = (released_at IS NOT NULL))
     );
     -- The release worker's query: pending intents by due time.
     CREATE INDEX resources_pending ON resources (retry_at) WHERE state = 'pending';
     CREATE INDEX resources_claimed ON resources (claimed_by) WHERE claimed_by IS NOT NULL;",
    // 2: the video room a session is bound to, found by provider and name.
    "ALTER TABLE sessions ADD COLUMN room_provider TEXT;
     ALTER TABLE sessions ADD COLUMN room_name TEXT;
     CREATE INDEX sessions_by_room ON sessions (room_provider, room_name)
        WHERE room_provider IS NOT NULL;",
    // 3: room webhooks: events applied (for deduplication) and participants per session.
    "CREATE TABLE room_events (
        provider    TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (provider, event_id)
     );
     CREATE TABLE room_participants (
        session_id    TEXT NOT NULL REFERENCES sessions (id),
        identity      TEXT NOT NULL,
        present       INTEGER NOT NULL CHECK (present IN (0, 1)),
        last_event_at INTEGER NOT NULL,
        PRIMARY KEY (session_id, identity)
     );
     CREATE INDEX room_participants_present ON room_participants (session_id) WHERE present = 1;
     ALTER TABLE sessions ADD COLUMN room_finished INTEGER NOT NULL DEFAULT 0;",
    // 4: nodes: which node runs each session and holds each resource, and their heartbeats.
    "ALTER TABLE sessions ADD COLUMN node TEXT NOT NULL DEFAULT 'local';
     ALTER TABLE resources ADD COLUMN node TEXT NOT NULL DEFAULT 'local';
     ALTER TABLE resources ADD COLUMN lost_at INTEGER;
     CREATE INDEX sessions_started_by_node ON sessions (node) WHERE status = 'started';
     CREATE INDEX resources_pending_by_node ON resources (node, retry_at) WHERE state = 'pending';
     CREATE TABLE nodes (
        id                TEXT PRIMARY KEY,
        last_heartbeat_at INTEGER NOT NULL
     );",
    // 5: releases are claimed per session, at the time the core says its next release is
    // due (`release_due_at`); resources no longer carry claims of their own. The session
    // row counts its resources, so that an end knows whether it has any to release.
    "ALTER TABLE sessions ADD COLUMN release_due_at INTEGER;
     ALTER TABLE sessions ADD COLUMN resource_count INTEGER NOT NULL DEFAULT 0;
     UPDATE sessions SET resource_count =
        (SELECT COUNT(*) FROM resources WHERE session_id = sessions.id);
     ALTER TABLE sessions ADD COLUMN release_claimed_by TEXT;
     ALTER TABLE sessions ADD COLUMN release_claimed_until INTEGER;
     UPDATE sessions SET release_due_at =
        (SELECT MIN(retry_at) FROM resources WHERE session_id = sessions.id AND state = 'pending')
      WHERE status = 'ended';
     CREATE INDEX sessions_release_due ON sessions (node, release_due_at)
        WHERE release_due_at IS NOT NULL;
     CREATE INDEX sessions_release_claimed ON sessions (release_claimed_by)
        WHERE release_claimed_by IS NOT NULL;
     DROP INDEX resources_claimed;
     ALTER TABLE resources DROP COLUMN claimed_by;
     ALTER TABLE resources DROP COLUMN claimed_until;",
    // 6: the nodes holding client sockets of each session (presence as liveness); each
    // session's own timeouts (NULL: the service's defaults, for sessions recorded before);
    // since when its room is empty.
    "ALTER TABLE sessions ADD COLUMN participant_left_ms INTEGER;
     ALTER TABLE sessions ADD COLUMN participant_absent_ms INTEGER;
     ALTER TABLE sessions ADD COLUMN websocket_grace_ms INTEGER;
     ALTER TABLE sessions ADD COLUMN room_emptied_at INTEGER;
     CREATE TABLE session_presence (
        session_id TEXT NOT NULL REFERENCES sessions (id),
        node       TEXT NOT NULL,
        PRIMARY KEY (session_id, node)
     );
     CREATE INDEX session_presence_by_node ON session_presence (node);",
    // 7: the event outbox: each session event written with its cause, its place in the
    // event stream once fanned out, and its deliveries to the endpoints that want it.
    "ALTER TABLE sessions ADD COLUMN callback_url TEXT;
     CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id  TEXT NOT NULL REFERENCES sessions (id),
        tenant      TEXT NOT NULL,
        session_seq INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        position    INTEGER,
        UNIQUE (session_id, session_seq)
     );
     CREATE INDEX events_undispatched ON events (id) WHERE position IS NULL;
     CREATE UNIQUE INDEX events_by_position ON events (position) WHERE position IS NOT NULL;
     CREATE INDEX events_by_tenant ON events (tenant, position) WHERE position IS NOT NULL;
     CREATE TABLE event_stream (last_position INTEGER NOT NULL);
     INSERT INTO event_stream (last_position) VALUES (0);
     CREATE TABLE deliveries (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id        INTEGER NOT NULL REFERENCES events (id),
        session_id      TEXT NOT NULL,
        session_seq     INTEGER NOT NULL,
        tenant          TEXT NOT NULL,
        event_at        INTEGER NOT NULL,
        endpoint        TEXT NOT NULL,
        url             TEXT NOT NULL,
        origin          TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        next_attempt_at INTEGER,
        last_attempt_at INTEGER,
        last_status     INTEGER,
        last_error      TEXT,
        claimed_by      TEXT,
        claimed_until   INTEGER,
        UNIQUE (event_id, endpoint),
        CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
     );
     CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
     CREATE INDEX deliveries_in_order ON deliveries (session_id, endpoint, session_seq)
        WHERE status = 'pending';
     CREATE INDEX deliveries_by_tenant ON deliveries (tenant, id);
     CREATE INDEX deliveries_done ON deliveries (created_at) WHERE status <> 'pending';
     CREATE INDEX events_by_time ON events (at) WHERE position IS NOT NULL;",
    // 8: idempotency keys of creates: the body hash and session each key is bound to,
    // and its answer once given; when each session's avatar server reported ready.
    "ALTER TABLE sessions ADD COLUMN ready_at INTEGER;
     CREATE TABLE idempotency_keys (
        tenant       TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        status       INTEGER,
        body         TEXT,
        created_at   INTEGER NOT NULL,
        claimed_at   INTEGER NOT NULL,
        PRIMARY KEY (tenant, key)
     );
     CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);",
    // 9: what each node last reported of itself (draining, room, GPUs) for the live page,
    // and ended sessions by the time they ended (its recent ends).
    "ALTER TABLE nodes ADD COLUMN report TEXT;
     CREATE INDEX sessions_ended_by_time ON sessions (ended_at) WHERE status = 'ended';",
    // 10: usage: each session's billing rule as of its creation, its lost node's last
    // heartbeat, how far its usage periods are closed, and its usage records (see
    // `session_lifecycle_store::usage`).
    "ALTER TABLE sessions ADD COLUMN bill_meter TEXT NOT NULL DEFAULT 'ready';
     ALTER TABLE sessions ADD COLUMN bill_rounding TEXT NOT NULL DEFAULT 'second';
     ALTER TABLE sessions ADD COLUMN node_last_seen_at INTEGER;
     ALTER TABLE sessions ADD COLUMN usage_closed_to INTEGER;
     CREATE TABLE usage_records (
         session_id    TEXT NOT NULL REFERENCES sessions (id),
         seq           INTEGER NOT NULL,
         id            TEXT NOT NULL,
         tenant        TEXT NOT NULL,
         span_from     INTEGER NOT NULL,
         span_to       INTEGER NOT NULL,
         from_ms       INTEGER NOT NULL,
         to_ms         INTEGER NOT NULL,
         millis        INTEGER NOT NULL,
         revision      INTEGER NOT NULL,
         corrects      TEXT,
         superseded_by TEXT,
         recorded_at   INTEGER NOT NULL,
         PRIMARY KEY (session_id, seq)
     ) WITHOUT ROWID;
     -- A tenant's latest records by where they start: none spans an hour boundary, so a
     -- range's records start at most an hour before it.
     CREATE INDEX usage_records_latest ON usage_records (tenant, from_ms)
         WHERE superseded_by IS NULL AND millis > 0;",
    // 11: usage records keep no identifiers (`usage::record_id` derives them from the
    // session, the span's start and the revision), only whether a correction replaced
    // them: smaller rows, on every end. And no foreign key: each is written from its
    // session's row in the step that reads it (sessions are never deleted), and the check
    // was a lookup of that row, and a statement journal, on every end.
    "CREATE TABLE usage_records_11 (
         session_id    TEXT NOT NULL,
         seq           INTEGER NOT NULL,
         tenant        TEXT NOT NULL,
         span_from     INTEGER NOT NULL,
         span_to       INTEGER NOT NULL,
         from_ms       INTEGER NOT NULL,
         to_ms         INTEGER NOT NULL,
         millis        INTEGER NOT NULL,
         revision      INTEGER NOT NULL,
         superseded    INTEGER NOT NULL,
         recorded_at   INTEGER NOT NULL,
         PRIMARY KEY (session_id, seq)
     ) WITHOUT ROWID;
     INSERT INTO usage_records_11
         SELECT session_id, seq, tenant, span_from, span_to, from_ms, to_ms, millis, revision,
                superseded_by IS NOT NULL, recorded_at
         FROM usage_records;
     DROP TABLE usage_records;
     ALTER TABLE usage_records_11 RENAME TO usage_records;
     CREATE INDEX usage_records_latest ON usage_records (tenant, from_ms)
         WHERE NOT superseded AND millis > 0;",
    // 12: an `ended` event names the first usage record its end wrote: those records'
    // `usage.recorded` events are written when it is fanned out, not in the end's commit
    // (see `outbox`), so an end writes one row less per record.
    "ALTER TABLE events ADD COLUMN usage_from INTEGER;",
];

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`], one transaction per migration. Refuses a
/// database written by a newer version.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let err = |e: rusqlite::Error| StoreError::unavailable(e);
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(err)?;
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let version: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[version as usize])
            .map_err(err)?;
        tx.execute("DELETE FROM schema_version", []).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version + 1],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
    }
}
