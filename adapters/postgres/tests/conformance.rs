//! The PostgreSQL store passes the runtime's conformance suite unchanged, on a database of
//! its own (created for the test, dropped after).
//!
//! Needs `SESSION_LIFECYCLE_PG_URL`; without it the tests say they were skipped, unless
//! `SESSION_LIFECYCLE_REQUIRE_PG=1`, under which a missing server is a failure.

use std::sync::Arc;

use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_runtime::conformance;

/// A fresh database for one test; dropped when the guard goes.
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

fn pg_url() -> Option<String> {
    match std::env::var("SESSION_LIFECYCLE_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("SESSION_LIFECYCLE_REQUIRE_PG").as_deref() != Ok("1"),
                "SESSION_LIFECYCLE_REQUIRE_PG=1 but SESSION_LIFECYCLE_PG_URL is not set"
            );
            eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
            None
        }
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
    tokio::spawn(connection);
    client
}

impl TestDb {
    async fn create(admin_url: &str) -> TestDb {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let name = format!("sl_test_{}", u64::from_le_bytes(bytes));
        admin(admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut config: tokio_postgres::Config = admin_url.parse().unwrap();
        config.dbname(&name);
        let url = format!(
            "postgres://{}@{}:{}/{name}",
            config.get_user().unwrap_or("postgres"),
            match &config.get_hosts()[0] {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[allow(unreachable_patterns)]
                _ => "127.0.0.1".to_owned(),
            },
            config.get_ports().first().copied().unwrap_or(5432)
        );
        TestDb {
            admin_url: admin_url.to_owned(),
            name,
            url,
        }
    }

    async fn drop_db(self) {
        admin(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
    }
}

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
    let version: i32 = admin(&db.url)
        .await
        .query_one("SELECT version FROM schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, session_lifecycle_postgres::SCHEMA_VERSION);
    db.drop_db().await;
}
