//! Every example runs as a user runs it: the binary `cargo run --example NAME` builds
//! (`cargo test` builds the examples first), with its output checked. The two that serve
//! or need a database are driven from here: `embed_axum` is called over HTTP and stopped
//! with Ctrl-C; `engine_postgres` gets a database of its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use session_lifecycle_postgres::testing::{TestDb, pg_url};

/// The built example `name`, beside this test's own binary (`target/debug/examples`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is built (cargo test builds examples)",
        path.display()
    );
    path
}

fn run(name: &str, args: &[&str]) -> (Output, String) {
    let output = Command::new(example(name))
        .args(args)
        .output()
        .expect("the example runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    (output, stdout)
}

#[test]
fn custom_backend_prints_the_session_s_start_end_and_release_and_exits_0() {
    let (_, out) = run("custom_backend", &[]);
    for line in [
        "acquired: seat 0",
        "started: sess_",
        "refused: every seat is booked",
        "ended: sess_",
        "released: seat 0",
        "free seats: 1",
        "shutdown: 1 session(s) ended, free seats: 2",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    // The first session's seat goes back once, though it was ended twice.
    assert_eq!(out.matches("released: seat 0").count(), 1, "{out}");
}

#[test]
fn no_std_core_ends_releases_and_evicts_every_session() {
    let (_, out) = run("no_std_core", &[]);
    for line in [
        ": expired",
        ": orphaned",
        "Failed",
        "every session ended, released and evicted",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    // The process is released before the GPU under it.
    let process = out.find("release process 1000").unwrap();
    let gpu = out.find("release gpu 0").unwrap();
    assert!(process < gpu, "{out}");
}

/// A child process that does not outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request to `addr`: the status and the body.
fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the example listens");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn embed_axum_serves_the_session_api_under_avatar_behind_the_service_s_auth() {
    let dir = std::env::temp_dir().join(format!("embed-axum-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("embed.db");
    let mut child = KillOnDrop(
        Command::new(example("embed_axum"))
            .args(["127.0.0.1:0", db.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("listening on http://")
        .expect(&first)
        .to_owned();
    let user = "authorization: Bearer demo-user";

    assert_eq!(
        http(&addr, "GET", "/", &[]),
        (200, "the service's own home page\n".into())
    );
    // Not signed in to the service: its own 401, even with the session API's key.
    let (status, body) = http(
        &addr,
        "POST",
        "/avatar/v1/sessions",
        &["x-api-key: app-internal-key"],
    );
    assert_eq!(
        (status, body.as_str()),
        (401, "sign in to the service first")
    );

    let (status, created) = http(&addr, "POST", "/avatar/v1/sessions", &[user]);
    assert_eq!(status, 201, "{created}");
    assert!(created.contains(r#""status":"started""#), "{created}");
    let id = created
        .split(r#""session_id":""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap();
    // The WebSocket and the provider webhooks authenticate themselves: the session
    // API answers them, not the service's sign-in.
    for (method, path) in [
        ("GET", format!("/avatar/v1/sessions/{id}/ws")),
        ("POST", "/avatar/v1/webhooks/livekit".to_owned()),
    ] {
        let (status, body) = http(&addr, method, &path, &[]);
        assert!(status >= 400, "{path}: {status} {body}");
        assert!(!body.contains("sign in to the service"), "{path}: {body}");
        assert!(
            body.contains(r#""code""#),
            "{path}: the API's own error: {body}"
        );
    }
    let (status, ended) = http(
        &addr,
        "POST",
        &format!("/avatar/v1/sessions/{id}/end"),
        &[user],
    );
    assert_eq!(status, 200, "{ended}");
    assert!(
        ended.contains(r#""status":"ended""#) && ended.contains(r#""end_reason":"requested""#),
        "{ended}"
    );
    let (status, missing) = http(
        &addr,
        "GET",
        "/avatar/v1/sessions/sess_01H3Z8G9YR3K2N5M6P7Q8W4T",
        &[user],
    );
    assert_eq!(status, 404, "{missing}");
    assert!(missing.contains("session_not_found"), "{missing}");

    // SIGTERM (a deploy): the service stops serving, then ends what still runs.
    let (_, running) = http(&addr, "POST", "/avatar/v1/sessions", &[user]);
    assert!(running.contains("started"), "{running}");
    let terminated = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let status = child.0.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status}: {rest:?}");
    assert_eq!(rest, ["stopped; 1 session(s) ended"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_postgres_ends_on_one_engine_what_the_other_started_and_releases_it_there() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let db_url = db.url.clone();
    let (_, out) = tokio::task::spawn_blocking(move || run("engine_postgres", &[&db_url]))
        .await
        .unwrap();
    for line in [
        "node a: acquired a ticket",
        "node a: started sess_",
        "node b: ended sess_",
        "node a: released the ticket of sess_",
        "released on node a",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    assert!(!out.contains("node b: released"), "{out}");
    db.drop_db().await;
}
