//! The PostgreSQL store passes the runtime's conformance suite unchanged, on a database of
//! its own (created for the test, dropped after).
//!
//! Needs `SESSION_LIFECYCLE_PG_URL`; without it the tests say they were skipped, unless
//! `SESSION_LIFECYCLE_REQUIRE_PG=1`, under which a missing server is a failure.

use std::sync::Arc;

use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_postgres::testing::{TestDb, connect, pg_url};
use session_lifecycle_store::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    conformance::run_all(Arc::new(store)).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_from_several_instances_at_once() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            PostgresStore::connect(&url).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let version: i32 = connect(&db.url)
        .await
        .query_one("SELECT version FROM schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, session_lifecycle_postgres::SCHEMA_VERSION);
    db.drop_db().await;
}

/// A session whose usage row holds a value this release does not know never blocks its end
/// or the other sessions' usage periods (see the conformance check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_an_unreadable_session_never_blocks_its_end_or_the_others_periods() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    let raw = connect(&db.url).await;
    conformance::unreadable_usage_never_blocks_an_end_or_other_sessions(&store, |id| {
        let raw = &raw;
        async move {
            raw.execute(
                "UPDATE sessions SET bill_meter = 'future' WHERE id = $1",
                &[&id.to_string()],
            )
            .await
            .unwrap();
        }
    })
    .await;
    drop(raw);
    db.drop_db().await;
}
