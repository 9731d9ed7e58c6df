//! Support for tests that need a real PostgreSQL server, here and in crates that build on
//! this store: the server's URL from `SESSION_LIFECYCLE_PG_URL`, and a fresh database per
//! test so tests can run in parallel.
//!
//! Without the variable a test says it was skipped; with `SESSION_LIFECYCLE_REQUIRE_PG=1` a
//! missing server is a failure instead.

/// The server's URL, or `None` (after saying the test is skipped) when none is configured.
///
/// # Panics
/// When `SESSION_LIFECYCLE_REQUIRE_PG=1` and no URL is set.
pub fn pg_url() -> Option<String> {
    match std::env::var("SESSION_LIFECYCLE_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !pg_required(),
                "SESSION_LIFECYCLE_REQUIRE_PG=1 but SESSION_LIFECYCLE_PG_URL is not set"
            );
            eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
            None
        }
    }
}

/// Whether `SESSION_LIFECYCLE_REQUIRE_PG=1`: anything missing is a failure, never a skip.
pub fn pg_required() -> bool {
    std::env::var("SESSION_LIFECYCLE_REQUIRE_PG").as_deref() == Ok("1")
}

/// A client on `url`, its connection driven by a spawned task.
///
/// # Panics
/// When the server cannot be reached.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A database of one test's own, created on the server of `admin_url`; call
/// [`drop_db`](TestDb::drop_db) at the end.
pub struct TestDb {
    admin_url: String,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

impl TestDb {
    /// Creates a database with a random name.
    ///
    /// # Panics
    /// When the server cannot be reached or refuses.
    pub async fn create(admin_url: &str) -> TestDb {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("OS randomness");
        let name = format!("sl_test_{}", u64::from_le_bytes(bytes));
        connect(admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let mut config: tokio_postgres::Config = admin_url
            .parse()
            .expect("SESSION_LIFECYCLE_PG_URL is a URL");
        config.dbname(&name);
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let url = format!(
            "postgres://{}@{host}:{}/{name}",
            config.get_user().unwrap_or("postgres"),
            config.get_ports().first().copied().unwrap_or(5432)
        );
        TestDb {
            admin_url: admin_url.to_owned(),
            name,
            url,
        }
    }

    /// Drops the database, closing whatever is still connected to it.
    ///
    /// # Panics
    /// When the server cannot be reached.
    pub async fn drop_db(self) {
        connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap_or_else(|e| panic!("dropping database {}: {e}", self.name));
    }
}
