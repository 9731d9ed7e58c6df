//! A throwaway `sessiond` for this crate's examples and tests: a fresh SQLite file, a
//! random key, no GPU, no avatar servers. Not part of the client's API.
//!
//! It runs the `sessiond` binary named by `SESSIOND_BIN`, else the workspace's
//! `target/debug/sessiond` (built with `cargo build -p session-lifecycle-http` when it is
//! missing).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why a test server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestServerError {
    /// The binary could not be found or built.
    #[error("no sessiond binary: {0}")]
    NoBinary(String),
    /// It did not start serving.
    #[error("sessiond did not start: {0}")]
    NotServing(String),
}

/// A running `sessiond`, stopped (and its files removed) when dropped.
#[derive(Debug)]
pub struct TestServer {
    child: Child,
    url: String,
    api_key: String,
    operator_key: String,
    dir: PathBuf,
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn binary() -> Result<PathBuf, TestServerError> {
    if let Some(bin) = std::env::var_os("SESSIOND_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join("sessiond");
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "session-lifecycle-http",
                "--bin",
                "sessiond",
            ])
            .current_dir(&workspace)
            .status()
            .map_err(|e| TestServerError::NoBinary(e.to_string()))?;
        if !status.success() || !bin.exists() {
            return Err(TestServerError::NoBinary(format!(
                "cargo build of sessiond failed ({status})"
            )));
        }
    }
    Ok(bin)
}

impl TestServer {
    /// Starts one and waits until it serves.
    pub fn start() -> Result<TestServer, TestServerError> {
        TestServer::start_with(&[])
    }

    /// Starts one with extra `sessiond` flags.
    pub fn start_with(flags: &[&str]) -> Result<TestServer, TestServerError> {
        let bin = binary()?;
        let dir = std::env::temp_dir().join(format!("sessiond-client-{}", random_hex()));
        std::fs::create_dir_all(&dir).map_err(|e| TestServerError::NotServing(e.to_string()))?;
        let api_key = format!("sk_test_{}", random_hex());
        let operator_key = format!("op_test_{}", random_hex());
        let log = std::fs::File::create(dir.join("sessiond.log"))
            .map_err(|e| TestServerError::NotServing(e.to_string()))?;
        let database = dir.join("sessiond.db");
        let mut child = Command::new(&bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--gpu",
                "off",
                "--shutdown-mode",
                "end",
            ])
            .arg("--database")
            .arg(&database)
            .args(["--api-key", &api_key, "--operator-key", &operator_key])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| TestServerError::NotServing(format!("{}: {e}", bin.display())))?;
        // Its first line says where it listens; the rest of its output is read and dropped
        // (a closed pipe would fail its writes).
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut lines = BufReader::new(out).lines();
                let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
                lines.for_each(drop);
            });
        }
        let first = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_default();
        let Some(url) = first
            .strip_prefix("sessiond listening on ")
            .and_then(|rest| rest.split_whitespace().next())
        else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("sessiond.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(TestServerError::NotServing(format!(
                "first line {first:?}; its log:\n{log}"
            )));
        };
        Ok(TestServer {
            url: url.to_owned(),
            child,
            api_key,
            operator_key,
            dir,
        })
    }

    /// Its base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API key of its one tenant, `default`.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// Its operator key.
    pub fn operator_key(&self) -> &str {
        &self.operator_key
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
