//! HTTP tests against a real `sessiond` process on a loopback port, with a real HTTP
//! client (reqwest) and a real WebSocket client (tokio-tungstenite), covering every row of
//! CONTRACT.md's error table and every success path.
#![cfg(feature = "sessiond")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use session_lifecycle_http::tenants::hash_key;

const SESSIOND: &str = env!("CARGO_BIN_EXE_sessiond");
const REFERENCE_ID: &str = "sess_01H3Z8G9YR3K2N5M6P7Q8W4T";
/// base64 of "secret-key-for-daily", as Daily hands out webhook secrets.
const DAILY_SECRET: &str = "c2VjcmV0LWtleS1mb3ItZGFpbHk=";

fn fixture() -> PathBuf {
    let exe = PathBuf::from(SESSIOND);
    let path = exe.parent().unwrap().join("avatar-fixture");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

struct Server {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let tenants = dir.path().join("tenants.toml");
        std::fs::write(
            &tenants,
            format!(
                "[[tenants]]\nname = \"acme\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 3\nmax_session_secs = 600\n\n\
                 [[tenants]]\nname = \"beta\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 200\nmax_session_secs = 600\n\
                 livekit_api_key = \"lk-key\"\nlivekit_api_secret = \"lk-secret\"\ndaily_webhook_secret = \"{DAILY_SECRET}\"\n\n\
                 [[tenants]]\nname = \"gone\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 5\nmax_session_secs = 600\nrevoked = true\n",
                hash_key("key-acme"),
                hash_key("key-beta"),
                hash_key("key-gone")
            ),
        )
        .unwrap();
        let db = dir.path().join("sessiond.db");
        let mut child = Command::new(SESSIOND)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shutdown-mode",
                "end",
                "--database",
            ])
            .arg(&db)
            .arg("--tenants")
            .arg(&tenants)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let addr = first
            .strip_prefix("sessiond listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base: addr,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("sessiond.db")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let mut req = client().request(method, url);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let mut value: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    // Every answer names its request; an error body names it too (taken out here, so that
    // the tests compare what is left).
    let request_id = headers
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id: {text}"))
        .to_str()
        .unwrap()
        .to_owned();
    if let Some(error) = value.get_mut("error").and_then(Value::as_object_mut) {
        assert_eq!(
            error.remove("request_id"),
            Some(Value::from(request_id)),
            "{text}"
        );
    }
    (status, value, headers)
}

async fn create(s: &Server, key: &str, body: Option<&str>) -> Value {
    let (status, v, _) = call(
        reqwest::Method::POST,
        &s.url("/v1/sessions"),
        Some(key),
        body,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

fn error_code(v: &Value) -> &str {
    assert_eq!(v["success"], false, "{v}");
    v["error"]["code"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_end_and_end_again() {
    let s = Server::start(&[]);
    let created = create(&s, "key-acme", None).await;
    assert_eq!(created["success"], true);
    let session = &created["session"];
    let id = session["session_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sess_") && id.len() == 31, "{id}");
    assert_eq!(session["status"], "started");
    assert_eq!(session["ended_at"], Value::Null);
    assert!(created["client_token"].as_str().unwrap().starts_with("v1."));
    let started_at = session["started_at"].as_str().unwrap();
    assert!(
        started_at.ends_with('Z') && started_at.len() == 20,
        "second precision: {started_at}"
    );

    let (status, got, _) = call(
        reqwest::Method::GET,
        &s.url(&format!("/v1/sessions/{id}")),
        Some("key-acme"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["session"], *session);

    let (status, ended, _) = call(
        reqwest::Method::POST,
        &s.url(&format!("/v1/sessions/{id}/end")),
        Some("key-acme"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ended["success"], true);
    assert_eq!(ended["session"]["status"], "ended");
    assert_eq!(ended["session"]["end_reason"], "requested");
    assert!(ended["session"]["ended_at"].as_str().unwrap() >= started_at);
    // Exactly the reference's shape, plus extra fields.
    for field in ["session_id", "status", "started_at", "ended_at"] {
        assert!(ended["session"].get(field).is_some(), "{field}");
    }

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, again, _) = call(
        reqwest::Method::POST,
        &s.url(&format!("/v1/sessions/{id}/end")),
        Some("key-acme"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, ended, "ending again returns the identical body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_row_of_the_contract() {
    let s = Server::start(&["--max-body-bytes", "8192"]);
    let id = create(&s, "key-acme", None).await["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let end = |id: &str| s.url(&format!("/v1/sessions/{id}/end"));
    let post = reqwest::Method::POST;

    // 401: missing, unknown and revoked keys alike, and nothing changes.
    for key in [None, Some("wrong"), Some("key-gone"), Some("")] {
        let (status, v, _) = call(post.clone(), &end(&id), key, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(error_code(&v), "unauthorized");
        assert_eq!(v["error"]["message"], "missing or invalid API key");
    }
    let (_, v, _) = call(
        reqwest::Method::GET,
        &s.url(&format!("/v1/sessions/{id}")),
        Some("key-acme"),
        None,
    )
    .await;
    assert_eq!(v["session"]["status"], "started");

    // 400: malformed ids.
    for bad in [
        "bad",
        "sess_",
        "sess_01h3",
        "sess_IIII",
        "sess_0123456789ABCDEFGHJKMNPQRSTVWXYZ0123456789ABCDEFGHJKMNPQRSTVWXYZ0",
        "SESS_01",
    ] {
        let (status, v, _) = call(post.clone(), &end(bad), Some("key-acme"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_code(&v), "invalid_session_id");
    }

    // 404: unknown ids (the reference's own example is well-formed) and another tenant's.
    for (who, key) in [(REFERENCE_ID, "key-acme"), (id.as_str(), "key-beta")] {
        let (status, v, _) = call(post.clone(), &end(who), Some(key), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(error_code(&v), "session_not_found");
        let (status, v2, _) = call(
            reqwest::Method::GET,
            &s.url(&format!("/v1/sessions/{who}")),
            Some(key),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            v2, v,
            "another tenant's session answers exactly like an unknown one"
        );
    }
    let (_, v, _) = call(
        reqwest::Method::GET,
        &s.url(&format!("/v1/sessions/{id}")),
        Some("key-acme"),
        None,
    )
    .await;
    assert_eq!(
        v["session"]["status"], "started",
        "another tenant could not end it"
    );

    // 400: malformed JSON and invalid fields; nothing is created.
    for body in [
        "{",
        "[]",
        "{\"duration_secs\": -5}",
        "{\"duration_secs\": 0}",
        "{\"nope\": 1}",
        "{\"room\": {\"provider\": \"zoom\", \"name\": \"x\"}}",
        "{\"room\": {\"provider\": \"daily\", \"name\": \"\"}}",
        "{\"metadata\": 5}",
        "{\"gpu_memory_mib\": 0}",
        "{\"gpu_memory_mib\": 2097152}",
        "{\"gpu_memory_mib\": -1}",
        "{\"gpu_device\": 1024}",
    ] {
        let (status, v, _) = call(
            post.clone(),
            &s.url("/v1/sessions"),
            Some("key-acme"),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(&v), "invalid_request");
    }
    let big_metadata = format!("{{\"metadata\": {{\"k\": \"{}\"}}}}", "x".repeat(5000));
    let (status, v, _) = call(
        post.clone(),
        &s.url("/v1/sessions"),
        Some("key-acme"),
        Some(&big_metadata),
    )
    .await;
    assert_eq!(
        (status, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "metadata over 4 KiB"
    );

    // 413: body over the limit.
    let huge = format!("{{\"metadata\": {{\"k\": \"{}\"}}}}", "x".repeat(10_000));
    let (status, v, _) = call(
        post.clone(),
        &s.url("/v1/sessions"),
        Some("key-acme"),
        Some(&huge),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&v), "payload_too_large");

    // 429: the plan allows 3 concurrent sessions (one is running).
    create(
        &s,
        "key-acme",
        Some("{\"duration_secs\": 60, \"metadata\": {\"user\": \"ada\"}}"),
    )
    .await;
    create(
        &s,
        "key-acme",
        Some("{\"room\": {\"provider\": \"livekit\", \"name\": \"standup\"}}"),
    )
    .await;
    let (status, v, _) = call(post.clone(), &s.url("/v1/sessions"), Some("key-acme"), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&v), "plan_limit_reached");
    // Ending one frees a place.
    call(post.clone(), &end(&id), Some("key-acme"), None).await;
    create(&s, "key-acme", None).await;

    // 503 storage_unavailable with Retry-After: the database file's directory vanishes.
    std::fs::remove_dir_all(s.dir.path()).unwrap();
    let (status, v, headers) =
        call(post.clone(), &s.url("/v1/sessions"), Some("key-beta"), None).await;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(error_code(&v), "storage_unavailable");
        assert!(headers.get("retry-after").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_newest_first() {
    let s = Server::start(&[]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            create(&s, "key-beta", None).await["session"]["session_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    create(&s, "key-acme", None).await;
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => s.url(&format!("/v1/sessions?limit=2&cursor={c}")),
            None => s.url("/v1/sessions?limit=2"),
        };
        let (status, v, _) = call(reqwest::Method::GET, &url, Some("key-beta"), None).await;
        assert_eq!(status, StatusCode::OK);
        for sess in v["sessions"].as_array().unwrap() {
            seen.push(sess["session_id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen, ids,
        "all of this tenant's sessions, newest first, once"
    );
    call(
        reqwest::Method::POST,
        &s.url(&format!("/v1/sessions/{}/end", ids[0])),
        Some("key-beta"),
        None,
    )
    .await;
    let (_, v, _) = call(
        reqwest::Method::GET,
        &s.url("/v1/sessions?status=started&limit=100"),
        Some("key-beta"),
        None,
    )
    .await;
    assert_eq!(v["sessions"].as_array().unwrap().len(), 4);
    for bad in [
        "?status=weird",
        "?limit=0",
        "?limit=101",
        "?limit=x",
        "?cursor=nope",
    ] {
        let (status, v, _) = call(
            reqwest::Method::GET,
            &s.url(&format!("/v1/sessions{bad}")),
            Some("key-beta"),
            None,
        )
        .await;
        assert_eq!(
            (status, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_session_alive_and_its_absence_lets_the_sweeper_end_it() {
    let s = Server::start(&["--orphan-timeout-secs", "2", "--sweep-interval-secs", "1"]);
    let id = create(&s, "key-beta", None).await["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let hb = s.url(&format!("/v1/sessions/{id}/heartbeat"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let (status, v, _) = call(reqwest::Method::POST, &hb, Some("key-beta"), None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let get = s.url(&format!("/v1/sessions/{id}"));
    let (_, v, _) = call(reqwest::Method::GET, &get, Some("key-beta"), None).await;
    assert_eq!(
        v["session"]["status"], "started",
        "alive past the 2 s orphan timeout"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (_, v, _) = call(reqwest::Method::GET, &get, Some("key-beta"), None).await;
    assert_eq!(v["session"]["end_reason"], "orphaned");
    let (status, v, _) = call(reqwest::Method::POST, &hb, Some("key-beta"), None).await;
    assert_eq!(
        (status, error_code(&v)),
        (StatusCode::CONFLICT, "session_ended")
    );
}

async fn ws_connect(
    s: &Server,
    id: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "{}/v1/sessions/{id}/ws?token={token}",
        s.base.replace("http://", "ws://")
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

async fn wait_for_end(s: &Server, id: &str, key: &str) -> Value {
    let get = s.url(&format!("/v1/sessions/{id}"));
    for _ in 0..100 {
        let (_, v, _) = call(reqwest::Method::GET, &get, Some(key), None).await;
        if v["session"]["status"] == "ended" {
            return v["session"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_and_loss_end_the_session() {
    let s = Server::start(&[
        "--ws-ping-interval-ms",
        "200",
        "--ws-pong-timeout-ms",
        "800",
    ]);
    // Close: the session ends at once.
    let created = create(&s, "key-beta", None).await;
    let id = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = created["client_token"].as_str().unwrap().to_owned();
    let mut ws = ws_connect(&s, &id, &token).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, v, _) = call(
        reqwest::Method::GET,
        &s.url(&format!("/v1/sessions/{id}")),
        Some("key-beta"),
        None,
    )
    .await;
    assert_eq!(v["session"]["status"], "started");
    ws.close(None).await.unwrap();
    let ended = wait_for_end(&s, &id, "key-beta").await;
    assert_eq!(ended["end_reason"], "websocket_disconnected");

    // Loss: the client stops answering pings (it never reads the socket again).
    let created = create(&s, "key-beta", None).await;
    let id = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = created["client_token"].as_str().unwrap().to_owned();
    let silent = ws_connect(&s, &id, &token).await;
    let ended = wait_for_end(&s, &id, "key-beta").await;
    assert_eq!(ended["end_reason"], "websocket_disconnected");
    drop(silent);

    // A bad token, another session's token, or an ended session: refused.
    let other = create(&s, "key-beta", None).await;
    let other_id = other["session"]["session_id"].as_str().unwrap();
    let url = |id: &str, token: &str| {
        format!(
            "{}/v1/sessions/{id}/ws?token={token}",
            s.base.replace("http://", "ws://")
        )
    };
    assert!(
        tokio_tungstenite::connect_async(url(other_id, &token))
            .await
            .is_err()
    );
    assert!(
        tokio_tungstenite::connect_async(url(other_id, "v1.x.y.z"))
            .await
            .is_err()
    );
    assert!(
        tokio_tungstenite::connect_async(url(&id, &token))
            .await
            .is_err(),
        "ended"
    );
    // Without an upgrade, a JSON error.
    let (status, v, _) = call(
        reqwest::Method::GET,
        &s.url(&format!("/v1/sessions/{other_id}/ws")),
        Some("key-beta"),
        None,
    )
    .await;
    assert_eq!(
        (status, error_code(&v)),
        (StatusCode::UPGRADE_REQUIRED, "upgrade_required")
    );
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_ends_one_release() {
    let avatar = format!("{} behave", fixture().display());
    let s = Server::start(&["--avatar-command", &avatar, "--avatar-grace-secs", "5"]);
    let created = create(&s, "key-beta", None).await;
    let id = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = created["session"]["resources"][0]["handle"]
        .as_u64()
        .unwrap();
    assert_eq!(created["session"]["resources"][0]["kind"], "avatar_process");
    assert!(pid_alive(pid));
    let url = s.url(&format!("/v1/sessions/{id}/end"));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // A client of its own: its own connection.
            let resp = reqwest::Client::new()
                .post(&url)
                .header("x-api-key", "key-beta")
                .send()
                .await
                .unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }));
    }
    let mut ended_at = None;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let at = v["session"]["ended_at"].as_str().unwrap().to_owned();
        assert_eq!(ended_at.get_or_insert(at.clone()), &at);
    }
    let mut released = Value::Null;
    for _ in 0..100 {
        let (_, v, _) = call(
            reqwest::Method::GET,
            &s.url(&format!("/v1/sessions/{id}")),
            Some("key-beta"),
            None,
        )
        .await;
        released = v["session"]["resources"][0].clone();
        if released["release"] == "released" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(released["release"], "released");
    assert_eq!(released["note"], "sigterm", "stopped once, gracefully");
    assert!(!pid_alive(pid), "the avatar server is gone and reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_sessions_and_stops_avatar_servers() {
    let avatar = format!("{} behave", fixture().display());
    let mut s = Server::start(&["--avatar-command", &avatar]);
    let mut pids = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v = create(&s, "key-beta", None).await;
        pids.push(v["session"]["resources"][0]["handle"].as_u64().unwrap());
        ids.push(v["session"]["session_id"].as_str().unwrap().to_owned());
    }
    kill_term(s.child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sessiond did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!pid_alive(pid), "avatar server {pid} stopped: {stat}");
    }
    let store = session_lifecycle_sqlite::SqliteStore::open(s.db()).unwrap();
    use session_lifecycle_runtime::SessionStore;
    for id in ids {
        let r = store
            .get(session_lifecycle::SessionId::parse(&id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            r.session.end_reason(),
            Some(session_lifecycle::EndReason::Shutdown)
        );
        assert!(r.session.is_fully_released());
    }
}

fn kill_term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Every answer carries `x-request-id`: the caller's when reasonable (printable ASCII, at
/// most 128 bytes), else a new one; error bodies carry it too, and a route with another
/// method answers 405 with `Allow` and an error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made() {
    let s = Server::start(&[]);
    let send = |id: Option<&[u8]>, key: Option<&str>| {
        let mut req = client().get(s.url("/v1/sessions"));
        if let Some(id) = id {
            req = req.header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(id).unwrap(),
            );
        }
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        req.send()
    };
    let id_of =
        |resp: &reqwest::Response| resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let resp = send(Some(b"caller-id 42"), Some("key-acme")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(id_of(&resp), "caller-id 42");
    let resp = send(Some(b"caller-id 43"), None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&resp), "caller-id 43");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "caller-id 43");
    let long = [b'x'; 129];
    for unreasonable in [&long[..], b"tab\there", b"\xff\xfe"] {
        let resp = send(Some(unreasonable), Some("key-acme")).await.unwrap();
        let made = id_of(&resp);
        assert_eq!(made.len(), 32, "{made}");
        assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    }
    let a = id_of(&send(None, Some("key-acme")).await.unwrap());
    let b = id_of(&send(None, Some("key-acme")).await.unwrap());
    assert_ne!(a, b);

    let resp = client().delete(s.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = resp.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let id = id_of(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(body["error"]["request_id"], Value::from(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints() {
    let s = Server::start(&[]);
    let (status, v, _) = call(reqwest::Method::GET, &s.url("/healthz"), None, None).await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (status, _, _) = call(reqwest::Method::GET, &s.url("/readyz"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, doc, _) = call(reqwest::Method::GET, &s.url("/openapi.json"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/end",
        "/v1/sessions/{session_id}/heartbeat",
        "/v1/sessions/{session_id}/ws",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    let id = create(&s, "key-beta", None).await["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    call(
        reqwest::Method::POST,
        &s.url(&format!("/v1/sessions/{id}/end")),
        Some("key-beta"),
        None,
    )
    .await;
    let text = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("sessiond_sessions_started_total 1"), "{text}");
    assert!(text.contains("sessiond_sessions_ended_total{reason=\"requested\"} 1"));
    assert!(text.contains("sessiond_sessions_active 0"));
    assert!(text.contains("route=\"/v1/sessions/{session_id}/end\",status=\"200\""));
    let (status, v, _) = call(reqwest::Method::GET, &s.url("/nope"), None, None).await;
    assert_eq!(
        (status, error_code(&v)),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

/// The router mounted in-process (as another service would) over a store that can be
/// taken down: 503 `storage_unavailable` with `Retry-After`, nothing acknowledged that was
/// not committed, and service resumes when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_unreachable_answers_503_and_recovers() {
    use session_lifecycle_http::tenants::Tenants;
    use session_lifecycle_http::tokens::TokenSigner;
    use session_lifecycle_http::{AppState, HttpConfig, router};
    use session_lifecycle_runtime::faults::{FaultPlan, FaultyStore};
    use session_lifecycle_runtime::{Engine, EngineConfig, Plan, SystemClock};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let sqlite = session_lifecycle_sqlite::SqliteStore::open(dir.path().join("s.db")).unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(sqlite), FaultPlan::None));
    let engine = Engine::open(
        store.clone(),
        vec![],
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let plan = Plan::new(Some(10), Duration::from_secs(600));
    let state = AppState::new(
        engine,
        Tenants::single("default", "k", plan),
        TokenSigner::new([1; 32]),
        HttpConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum_serve(listener, router(state)).await });

    let (status, v, _) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/sessions"),
        Some("k"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = v["session"]["session_id"].as_str().unwrap().to_owned();

    store.take_down();
    for (method, path) in [
        (reqwest::Method::POST, "/v1/sessions".to_owned()),
        (reqwest::Method::POST, format!("/v1/sessions/{id}/end")),
        (reqwest::Method::GET, format!("/v1/sessions/{id}")),
        (reqwest::Method::GET, "/v1/sessions".to_owned()),
    ] {
        let (status, v, headers) = call(method, &format!("{base}{path}"), Some("k"), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(error_code(&v), "storage_unavailable");
        assert_eq!(headers.get("retry-after").unwrap(), "1");
    }
    let (status, _, _) = call(reqwest::Method::GET, &format!("{base}/readyz"), None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    store.restore();
    let (status, v, _) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/sessions/{id}"),
        Some("k"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v["session"]["status"], "started",
        "the failed end changed nothing"
    );
    let (status, v, _) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/sessions/{id}/end"),
        Some("k"),
        None,
    )
    .await;
    assert_eq!(
        (status, v["session"]["status"].as_str()),
        (StatusCode::OK, Some("ended"))
    );
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_websockets_and_exits() {
    let mut s = Server::start(&[]);
    let created = create(&s, "key-beta", None).await;
    let id = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = created["client_token"].as_str().unwrap().to_owned();
    let mut ws = ws_connect(&s, &id, &token).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill_term(s.child.id());
    // The server closes the socket rather than waiting on it.
    use futures_util::StreamExt;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(closed.is_ok(), "the socket was closed by the server");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "sessiond did not stop with a WebSocket open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    let store = session_lifecycle_sqlite::SqliteStore::open(s.db()).unwrap();
    use session_lifecycle_runtime::SessionStore;
    let r = store
        .get(session_lifecycle::SessionId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r.session.end_reason(),
        Some(session_lifecycle::EndReason::Shutdown)
    );
}

#[test]
fn without_a_gpu_sessiond_serves_and_says_so_once() {
    let gpu_here = session_lifecycle_cuda::NvmlGpu::discover().is_ok();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(SESSIOND)
        .args(["--listen", "127.0.0.1:0", "--api-key", "k", "--gpu", "auto"])
        .arg("--database")
        .arg(dir.path().join("s.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = 0;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        said += usize::from(line.contains("running without GPU resources"));
        if line.contains("serving") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        said,
        usize::from(!gpu_here),
        "said once, only without a GPU"
    );
}

/// Settings that cannot mean what they say stop `sessiond` at start with a message naming
/// them, before it listens: a tenant's key as the operator key (it would see every
/// tenant), a burst without a rate or of zero, a node id that would break logs and labels.
#[test]
fn contradictory_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"acme\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 1\nmax_session_secs = 60\n",
            session_lifecycle_http::tenants::hash_key("key-a")
        ),
    )
    .unwrap();
    let tenants = tenants.to_str().unwrap();
    for (flags, says) in [
        (
            vec!["--tenants", tenants, "--operator-key", "key-a"],
            "--operator-key",
        ),
        (
            vec!["--api-key", "k", "--operator-key", "k"],
            "--operator-key",
        ),
        (
            vec!["--api-key", "k", "--request-burst", "3"],
            "--request-burst",
        ),
        (
            vec![
                "--api-key",
                "k",
                "--requests-per-second",
                "5",
                "--request-burst",
                "0",
            ],
            "--request-burst",
        ),
        (vec!["--api-key", "k", "--node-id", "a\nb"], "--node-id"),
    ] {
        let out = Command::new(SESSIOND)
            .args(["--listen", "127.0.0.1:0", "--gpu", "off"])
            .arg("--database")
            .arg(dir.path().join("s.db"))
            .args(&flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} refused");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
}

/// Headers over the limit (too many fields, or too many bytes) are answered `431
/// headers_too_large` with the JSON error body and a request id, like every other error;
/// a request just under both limits is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_the_limit_get_a_json_431() {
    use session_lifecycle_http::input::{MAX_HEADER_BYTES, MAX_HEADERS};
    let s = Server::start(&[]);
    let send = |fields: usize, filler: usize| {
        let url = s.url("/v1/sessions");
        async move {
            let mut req = client().get(url).header("x-api-key", "key-acme");
            // reqwest adds host and accept: the count is of what the server sees.
            for i in 0..fields.saturating_sub(3) {
                req = req.header(format!("x-extra-{i}"), "v");
            }
            if filler > 0 {
                req = req.header("x-filler", "f".repeat(filler));
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let request_id = resp.headers().get("x-request-id").cloned();
            let text = resp.text().await.unwrap();
            (status, request_id, text)
        }
    };
    for (what, fields, filler) in [
        ("too many fields", MAX_HEADERS + 20, 0),
        ("too many bytes", 3, MAX_HEADER_BYTES + 1),
    ] {
        let (status, request_id, text) = send(fields, filler).await;
        assert_eq!(status.as_u16(), 431, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text:?}"));
        assert_eq!(error_code(&v), "headers_too_large", "{what}");
        let request_id = request_id.expect("x-request-id");
        assert_eq!(v["error"]["request_id"], request_id.to_str().unwrap());
    }
    let (status, _, text) = send(MAX_HEADERS - 10, MAX_HEADER_BYTES / 2).await;
    assert_eq!(status, StatusCode::OK, "under the limits: {text}");
}
