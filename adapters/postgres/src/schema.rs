//! The schema and its migrations, safe to run from several instances at once.

use session_lifecycle_store::StoreError;
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
// ended sessions by the time they ended (its recent ends: `sessions_ended_by_time` in
// `CONCURRENT_INDEXES`, built without blocking writes to a large table).
"
    ALTER TABLE nodes ADD COLUMN report TEXT;
",
// 10: fleet placement: a session placed on another node than the one that received its
// create waits there, `assigned`, then `starting`, then started (NULL), or `refused` with
// a note; what its create asked of its resources, for that node. The started sessions of
// a node are found by `sessions_started_by_node`.
"
    ALTER TABLE sessions ADD COLUMN start_state TEXT;
    ALTER TABLE sessions ADD COLUMN start_request TEXT;
    ALTER TABLE sessions ADD COLUMN start_note TEXT;
",
// 11: usage: each session's billing rule as of its creation, its lost node's last
// heartbeat, how far its usage periods are closed, and its usage records (see
// `session_lifecycle_store::usage`).
"
    ALTER TABLE sessions ADD COLUMN bill_meter TEXT NOT NULL DEFAULT 'ready';
    ALTER TABLE sessions ADD COLUMN bill_rounding TEXT NOT NULL DEFAULT 'second';
    ALTER TABLE sessions ADD COLUMN node_last_seen_at BIGINT;
    ALTER TABLE sessions ADD COLUMN usage_closed_to BIGINT;
    CREATE TABLE usage_records (
        session_id    TEXT NOT NULL REFERENCES sessions (id),
        seq           BIGINT NOT NULL,
        id            TEXT NOT NULL,
        tenant        TEXT NOT NULL,
        span_from     BIGINT NOT NULL,
        span_to       BIGINT NOT NULL,
        from_ms       BIGINT NOT NULL,
        to_ms         BIGINT NOT NULL,
        millis        BIGINT NOT NULL,
        revision      BIGINT NOT NULL,
        corrects      TEXT,
        superseded_by TEXT,
        recorded_at   BIGINT NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    -- A tenant's latest records by where they start: none spans an hour boundary, so a
    -- range's records start at most an hour before it.
    CREATE INDEX usage_records_latest ON usage_records (tenant, from_ms)
        WHERE superseded_by IS NULL AND millis > 0;
"];

/// An index built with `CREATE INDEX CONCURRENTLY`, which does not block writes to its table
/// while it is built but cannot run inside a transaction: it is built after the migrations'
/// transaction commits, and checked on every start, so one left out or left `INVALID` by a
/// crash (or a cancel) during its build is dropped and built again.
struct ConcurrentIndex {
    /// The schema version from which the index belongs to the schema.
    from_version: i32,
    name: &'static str,
    /// One statement: `CREATE INDEX CONCURRENTLY IF NOT EXISTS <name> ...`.
    create: &'static str,
}

/// The indexes built outside a transaction, in the order they are built. One is only ever
/// dropped from the schema by removing it from here as well.
const CONCURRENT_INDEXES: &[ConcurrentIndex] = &[ConcurrentIndex {
    // The entry numbered 9 above is the seventh migration: the schema it writes is version 7.
    from_version: 7,
    name: "sessions_ended_by_time",
    create: "CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_ended_by_time \
             ON sessions (ended_at) WHERE status = 'ended'",
}];

/// The schema version this code writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// An arbitrary constant naming this schema's migration lock.
const MIGRATION_LOCK: i64 = 0x5e55_1011;

/// How long an instance waits between tries of the migration lock.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Brings the database to [`SCHEMA_VERSION`]. Instances starting together take turns on an
/// advisory lock; the migrations commit with their version in one transaction, then the
/// concurrent indexes are built (or rebuilt when left invalid). Refuses a newer schema.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    migrate_to(client, SCHEMA_VERSION).await
}

/// [`migrate`], up to version `target` (tests build older schemas with it).
async fn migrate_to(client: &mut Client, target: i32) -> Result<(), StoreError> {
    let err = crate::error::unavailable;
    // A session lock, held across the transaction and the concurrent builds after it, and
    // taken by polling: `CREATE INDEX CONCURRENTLY` waits for every transaction with an older
    // snapshot, so an instance blocked in `pg_advisory_lock` behind the builder would
    // deadlock with it, where a short try does not.
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(err)?;
        if row.try_get::<_, bool>(0).map_err(err)? {
            break;
        }
        tokio::time::sleep(LOCK_RETRY).await;
    }
    let migrated = migrate_locked(client, target).await;
    // The connection goes back to a pool: the lock is let go whatever happened (a broken
    // connection lets go of it on its own).
    let unlocked = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err);
    migrated?;
    unlocked.map(|_| ())
}

async fn migrate_locked(client: &mut Client, target: i32) -> Result<(), StoreError> {
    let err = crate::error::unavailable;
    let tx = client.transaction().await.map_err(err)?;
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
    if version < target {
        while version < target {
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
    }
    tx.commit().await.map_err(err)?;
    for index in CONCURRENT_INDEXES {
        if index.from_version <= version {
            ensure_index(client, index).await?;
        }
    }
    Ok(())
}

/// Builds `index` unless it is there and valid; one left invalid (its build crashed or was
/// cancelled) is dropped first. Each statement runs alone, outside any transaction.
async fn ensure_index(client: &Client, index: &ConcurrentIndex) -> Result<(), StoreError> {
    let err = crate::error::unavailable;
    let valid: Option<bool> = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
            &[&index.name],
        )
        .await
        .map_err(err)?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(err)?;
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::warn!(index = index.name, "rebuilding an index left invalid");
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.name))
                .await
                .map_err(err)?;
        }
        None => {}
    }
    client.batch_execute(index.create).await.map_err(err)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{TestDb, connect, pg_url};

    async fn version(client: &Client) -> i32 {
        client
            .query_one("SELECT version FROM schema_version", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Whether `name` is an index and valid (`None`: no such index).
    async fn index_valid(client: &Client, name: &str) -> Option<bool> {
        client
            .query_opt(
                "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
                &[&name],
            )
            .await
            .unwrap()
            .map(|row| row.get(0))
    }

    /// Waits until another backend of this database runs a statement like `pattern` and
    /// waits on a lock.
    async fn wait_for_lock_wait(client: &Client, pattern: &str) {
        for _ in 0..200 {
            let waiting: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND pid <> pg_backend_pid() \
                        AND query LIKE $1 AND wait_event_type = 'Lock'",
                    &[&pattern],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no statement like {pattern} came to wait on a lock");
    }

    const INSERT_SESSION: &str = "INSERT INTO sessions \
        (id, tenant, status, started_at, ended_at, end_reason, expires_at, last_seen_at) \
        VALUES ($1, 't', 'ended', 0, 1, 'ended_by_api', 100, 0)";

    /// The schema version from which `sessions_ended_by_time` belongs to the schema.
    const ENDED_INDEX_FROM: i32 = 7;

    #[test]
    fn the_ended_sessions_index_is_built_concurrently_and_alone() {
        assert!(
            MIGRATIONS
                .iter()
                .all(|m| !m.contains("sessions_ended_by_time"))
        );
        let index = CONCURRENT_INDEXES
            .iter()
            .find(|i| i.name == "sessions_ended_by_time")
            .unwrap();
        assert!(
            index
                .create
                .starts_with("CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_ended_by_time ")
        );
        assert!(!index.create.contains(';'), "one statement, never a batch");
        assert_eq!(index.from_version, ENDED_INDEX_FROM);
    }

    /// Migration 9 on a table being written: while the index build waits for a writer's
    /// open transaction, another connection's insert into the table goes through (a plain
    /// `CREATE INDEX` queues every writer behind it; checked first, so the test can tell).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn building_the_index_of_migration_9_does_not_block_writes() {
        let Some(url) = pg_url() else { return };
        let db = TestDb::create(&url).await;
        let mut migrating = connect(&db.url).await;
        migrate_to(&mut migrating, ENDED_INDEX_FROM - 1)
            .await
            .unwrap();
        let mut writer = connect(&db.url).await;
        let other = connect(&db.url).await;
        other
            .batch_execute("SET lock_timeout = '1s'")
            .await
            .unwrap();
        let watcher = connect(&db.url).await;

        // The control: a plain build behind an open writer blocks the next writer.
        let tx = writer.transaction().await.unwrap();
        tx.execute(INSERT_SESSION, &[&"open-1"]).await.unwrap();
        let plain = connect(&db.url).await;
        let build = tokio::spawn(async move {
            plain
                .batch_execute("CREATE INDEX plain_control ON sessions (started_at)")
                .await
        });
        wait_for_lock_wait(&watcher, "CREATE INDEX plain_control%").await;
        let blocked = other.execute(INSERT_SESSION, &[&"during-plain"]).await;
        assert_eq!(
            blocked.unwrap_err().code(),
            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
            "a plain CREATE INDEX blocks writers"
        );
        tx.commit().await.unwrap();
        build.await.unwrap().unwrap();
        other
            .batch_execute("DROP INDEX plain_control")
            .await
            .unwrap();

        // The migration, behind an open writer in the same way.
        let tx = writer.transaction().await.unwrap();
        tx.execute(INSERT_SESSION, &[&"open-2"]).await.unwrap();
        let migration = tokio::spawn(async move {
            // Up to the index's version only: a later migration's `ALTER TABLE` waits for
            // the open writer like any DDL, which is not what this test is about.
            let done = migrate_to(&mut migrating, ENDED_INDEX_FROM).await;
            (done, migrating)
        });
        wait_for_lock_wait(
            &watcher,
            "CREATE INDEX CONCURRENTLY%sessions_ended_by_time%",
        )
        .await;
        // The migration's own transaction (the version) has committed before the build.
        assert_eq!(version(&watcher).await, ENDED_INDEX_FROM);
        other
            .execute(INSERT_SESSION, &[&"during-migration"])
            .await
            .expect("an insert during the index build is not blocked");
        assert!(!migration.is_finished());
        tx.commit().await.unwrap();
        let (done, migrating) = migration.await.unwrap();
        done.unwrap();
        assert_eq!(
            index_valid(&watcher, "sessions_ended_by_time").await,
            Some(true)
        );
        // The migration lock was let go: another instance takes it at once.
        let got: bool = watcher
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .unwrap()
            .get(0);
        assert!(got);
        drop(migrating);
        db.drop_db().await;
    }

    /// A fresh database, one migrated already, one whose index build crashed (the version
    /// written, the index left `INVALID`) and one whose index is missing all migrate to the
    /// full schema with a valid index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_migrated_and_crashed_databases_all_migrate() {
        let Some(url) = pg_url() else { return };
        let db = TestDb::create(&url).await;
        let mut client = connect(&db.url).await;
        migrate(&mut client).await.unwrap();
        assert_eq!(version(&client).await, SCHEMA_VERSION);
        assert_eq!(
            index_valid(&client, "sessions_ended_by_time").await,
            Some(true)
        );
        migrate(&mut client).await.unwrap();
        assert_eq!(version(&client).await, SCHEMA_VERSION);
        assert_eq!(
            index_valid(&client, "sessions_ended_by_time").await,
            Some(true)
        );

        // A crash during the build: an open writer holds the build back, and the building
        // backend is killed, which leaves the index INVALID.
        client
            .batch_execute("DROP INDEX sessions_ended_by_time")
            .await
            .unwrap();
        let mut writer = connect(&db.url).await;
        let tx = writer.transaction().await.unwrap();
        tx.execute(INSERT_SESSION, &[&"open"]).await.unwrap();
        let mut crashing = connect(&db.url).await;
        let build = tokio::spawn(async move { migrate(&mut crashing).await });
        wait_for_lock_wait(&client, "CREATE INDEX CONCURRENTLY%sessions_ended_by_time%").await;
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                  WHERE datname = current_database() \
                    AND query LIKE 'CREATE INDEX CONCURRENTLY%'",
                &[],
            )
            .await
            .unwrap();
        assert!(build.await.unwrap().is_err());
        tx.commit().await.unwrap();
        assert_eq!(
            index_valid(&client, "sessions_ended_by_time").await,
            Some(false)
        );
        assert_eq!(version(&client).await, SCHEMA_VERSION);
        migrate(&mut client).await.unwrap();
        assert_eq!(
            index_valid(&client, "sessions_ended_by_time").await,
            Some(true)
        );

        // A crash before the build: the version written, no index.
        client
            .batch_execute("DROP INDEX sessions_ended_by_time")
            .await
            .unwrap();
        migrate(&mut client).await.unwrap();
        assert_eq!(
            index_valid(&client, "sessions_ended_by_time").await,
            Some(true)
        );
        drop(client);
        drop(writer);
        db.drop_db().await;
    }
}
