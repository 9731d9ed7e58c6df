//! The SQLite store passes the runtime's conformance suite unchanged, and keeps what it
//! acknowledged across a reopen.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Timestamp};
use session_lifecycle_sqlite::SqliteStore;
use session_lifecycle_store::{NewSession, SessionStore, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    conformance::run_all(Arc::new(store.clone())).await;
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_reopen_and_schema_is_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
    let id = SessionId::from_ulid_parts(t0, 42);
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .create(NewSession {
                callback_url: None,
                billing: Default::default(),
                id,
                tenant: "t".into(),
                started_at: t0,
                expires_at: t0.saturating_add(Duration::from_secs(60)),
                metadata: None,
                room: None,
                max_concurrent: None,
                timeouts: Default::default(),
                node: "local".to_owned(),
            })
            .await
            .unwrap();
        store
            .end(id, None, t0, EndReason::Requested, None)
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let r = store.get(id).await.unwrap().unwrap();
    assert_eq!(r.session.status(), Status::Ended);
    assert_eq!(r.session.ended_at(), Some(t0));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, session_lifecycle_sqlite::SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    assert!(SqliteStore::open(&path).is_err());
}

/// A session whose usage row holds a value this release does not know never blocks its end
/// or the other sessions' usage periods (see the conformance check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_an_unreadable_session_never_blocks_its_end_or_the_others_periods() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = SqliteStore::open(&path).unwrap();
    conformance::unreadable_usage_never_blocks_an_end_or_other_sessions(&store, |id| {
        let path = path.clone();
        async move {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute(
                    "UPDATE sessions SET bill_meter = 'future' WHERE id = ?1",
                    [id.to_string()],
                )
                .unwrap();
        }
    })
    .await;
}
