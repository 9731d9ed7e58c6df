//! Several real `sessiond` processes sharing one PostgreSQL database (a fresh one per
//! test), each running avatar servers that write an outside ledger: one line per SIGTERM,
//! naming the session and the process that sent the signal.

#![allow(dead_code)] // Each test binary uses part of this.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use session_lifecycle_postgres::testing::{TestDb, pg_url};

pub const SESSIOND: &str = env!("CARGO_BIN_EXE_sessiond");
pub const KEY: &str = "key-cluster";

pub fn fixture() -> PathBuf {
    let path = PathBuf::from(SESSIOND)
        .parent()
        .expect("target dir")
        .join("avatar-fixture");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// One `sessiond` process.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its node id.
    pub id: String,
    /// Its process id (the sender of the SIGTERMs it sends).
    pub pid: u32,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Kills it with SIGKILL: no shutdown, no releases, its avatar servers left running.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends it SIGTERM (what it then does depends on its `--shutdown-mode`).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (up to `limit`) for it to exit; its exit status.
    pub async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let give_up = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "{} did not exit within {limit:?}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    /// A graceful stop (SIGTERM: it ends its sessions and stops their avatar servers), so
    /// that a test leaves no process behind, even sessions it never learned of (a create
    /// answered 503 after its commit); SIGKILL if that takes over 30 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            while let Ok(None) = self.child.try_wait() {
                if std::time::Instant::now() >= give_up {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
    }
}

/// Instances on one fresh database, with one ledger.
pub struct Cluster {
    pub db: Option<TestDb>,
    /// A SQLite file instead of PostgreSQL (one machine).
    pub sqlite: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    pub ledger: PathBuf,
    /// Flags every node gets (timeouts).
    pub flags: Vec<String>,
    /// Who may call: `--api-key KEY` unless a test gives a tenants file.
    pub auth: Vec<String>,
}

impl Cluster {
    /// A fresh database, or `None` when the test is skipped (no PostgreSQL configured).
    pub async fn new(flags: &[&str]) -> Option<Cluster> {
        let url = pg_url()?;
        let db = TestDb::create(&url).await;
        // SESSION_LIFECYCLE_KEEP_TEST_DIRS=1 keeps the nodes' logs and the ledger.
        let dir = tempfile::Builder::new()
            .prefix("sessiond-cluster")
            .disable_cleanup(std::env::var_os("SESSION_LIFECYCLE_KEEP_TEST_DIRS").is_some())
            .tempdir()
            .expect("temp dir");
        eprintln!("cluster files in {}", dir.path().display());
        let ledger = dir.path().join("ledger");
        Some(Cluster {
            db: Some(db),
            sqlite: None,
            dir,
            ledger,
            flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            auth: vec!["--api-key".to_owned(), KEY.to_owned()],
        })
    }

    /// One machine's instances (one at a time) on a SQLite file.
    pub fn sqlite(flags: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sessiond-sqlite")
            .disable_cleanup(std::env::var_os("SESSION_LIFECYCLE_KEEP_TEST_DIRS").is_some())
            .tempdir()
            .expect("temp dir");
        eprintln!("sessiond files in {}", dir.path().display());
        Cluster {
            db: None,
            sqlite: Some(dir.path().join("sessiond.db")),
            ledger: dir.path().join("ledger"),
            dir,
            flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            auth: vec!["--api-key".to_owned(), KEY.to_owned()],
        }
    }

    pub fn db_url(&self) -> &str {
        match &self.sqlite {
            Some(path) => path.to_str().expect("utf-8 path"),
            None => &self.db.as_ref().expect("database").url,
        }
    }

    /// Starts node `id` and waits until it serves (after settling what it owes).
    pub fn start(&self, id: &str) -> Node {
        self.start_on(id, self.db_url())
    }

    /// Starts node `id` on database `url` (the cluster's, reached another way: through a
    /// proxy).
    pub fn start_on(&self, id: &str, url: &str) -> Node {
        let avatar = format!("{} ledger {}", fixture().display(), self.ledger.display());
        self.spawn(
            id,
            url,
            &["--avatar-command", &avatar, "--avatar-grace-secs", "5"],
        )
    }

    /// Starts node `id` with avatar servers and `extra` flags of its own.
    pub fn start_with(&self, id: &str, extra: &[&str]) -> Node {
        let avatar = format!("{} ledger {}", fixture().display(), self.ledger.display());
        let mut flags = vec!["--avatar-command", &avatar, "--avatar-grace-secs", "5"];
        flags.extend_from_slice(extra);
        self.spawn(id, self.db_url(), &flags)
    }

    /// Starts node `id` with no avatar servers (sessions hold nothing): for many sessions.
    pub fn start_bare(&self, id: &str) -> Node {
        self.spawn(id, self.db_url(), &["--gpu", "off"])
    }

    pub fn spawn(&self, id: &str, url: &str, resources: &[&str]) -> Node {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).expect("log");
        let mut child = Command::new(SESSIOND)
            .args(["--listen", "127.0.0.1:0", "--database", url])
            .args(["--node-id", id, "--shutdown-mode", "end"])
            .args(&self.auth)
            .args(["--max-concurrent-sessions", "100000"])
            .args(resources)
            .args(&self.flags)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn sessiond");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = match lines.next() {
            Some(Ok(line)) => line,
            _ => panic!(
                "{id} exited before serving; see {}",
                self.log_path(id).display()
            ),
        };
        let base = first
            .strip_prefix("sessiond listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        std::thread::spawn(move || for _ in lines {});
        Node {
            pid: child.id(),
            child,
            base,
            id: id.to_owned(),
        }
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    /// The ledger: for each session, the pids that sent its avatar server SIGTERM.
    pub fn ledger(&self) -> HashMap<String, Vec<u32>> {
        read_ledger(&self.ledger)
    }

    pub async fn finish(mut self) {
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

pub fn read_ledger(path: &Path) -> HashMap<String, Vec<u32>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: HashMap<String, Vec<u32>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(id), Some(pid)) = (parts.next(), parts.next()) {
            out.entry(id.to_owned())
                .or_default()
                .push(pid.parse().unwrap_or(0));
        }
    }
    out
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A request's status, headers and body (as text: the exact bytes a client sees).
pub async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let resp = client
        .request(method, url)
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (status, headers, text)
}

pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

/// The Rust client of `node`, over `client`, with the cluster's key.
pub fn api(client: &reqwest::Client, node: &Node) -> session_lifecycle_client::Client {
    session_lifecycle_client::Client::with_http(client.clone(), &node.url(""), KEY).expect("client")
}

/// Creates a session on `node`; its id.
pub async fn create(client: &reqwest::Client, node: &Node) -> String {
    api(client, node)
        .create_session(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
        .session
        .session_id
}

/// The session as `node` reports it.
pub async fn get(client: &reqwest::Client, node: &Node, id: &str) -> Value {
    let session = api(client, node)
        .get_session(id)
        .await
        .unwrap_or_else(|e| panic!("get {id}: {e}"));
    serde_json::to_value(session).expect("a session serializes")
}

/// Waits (up to `limit`) until every resource of each session is released, as `node`
/// reports; returns the sessions as they stand then.
pub async fn wait_released(
    client: &reqwest::Client,
    node: &Node,
    ids: &[String],
    limit: Duration,
) -> Vec<Value> {
    let give_up = std::time::Instant::now() + limit;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        loop {
            let s = get(client, node, id).await;
            let released = s["resources"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["release"] == "released"));
            if released {
                out.push(s);
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "{id} not released in time: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// The shell command that does `action` (`stop`, `start`, `restart`) to the PostgreSQL
/// server of `url`: `SESSION_LIFECYCLE_PG_<ACTION>` if set, else `pg_ctlcluster` for the
/// local cluster on the URL's port. `None` when neither is known.
pub fn pg_control(url: &str, action: &str) -> Option<String> {
    if let Ok(cmd) = std::env::var(format!("SESSION_LIFECYCLE_PG_{}", action.to_uppercase())) {
        return Some(cmd);
    }
    let port = url
        .parse::<tokio_postgres::Config>()
        .ok()?
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432);
    let out = Command::new("pg_lsclusters").arg("-h").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 4 && f[2] == port.to_string()).then(|| {
                format!(
                    "pg_ctlcluster --skip-systemctl-redirect {} {} {action}",
                    f[0], f[1]
                )
            })
        })
}

/// Runs a shell command line, asserting it succeeds.
pub fn shell(cmd: &str) {
    let status = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(status.success(), "{cmd}: {status:?}");
}
