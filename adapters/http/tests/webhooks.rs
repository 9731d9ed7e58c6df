//! Room webhooks against a real `sessiond`: payloads shaped and signed as LiveKit and Daily
//! document them (LiveKit: an HS256 JWT in `Authorization` whose `sha256` claim is the
//! base64 SHA-256 of the body; Daily: base64 HMAC-SHA256 of `"{timestamp}.{body}"` under
//! the base64-decoded secret, in `X-Webhook-Signature` with `X-Webhook-Timestamp`).
#![cfg(feature = "sessiond")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use session_lifecycle_http::tenants::hash_key;
use sha2::{Digest, Sha256};

const SESSIOND: &str = env!("CARGO_BIN_EXE_sessiond");
const DAILY_SECRET: &str = "c2VjcmV0LWtleS1mb3ItZGFpbHk=";

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sessiond` on a fresh SQLite file with tenants `beta` (its sessions' WebSocket grace at
/// most 10 s) and `other`; with the room webhook secrets of `beta` or none.
fn start(with_secrets: bool, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    let secrets = if with_secrets {
        format!(
            "livekit_api_key = \"lk-key\"\nlivekit_api_secret = \"lk-secret\"\ndaily_webhook_secret = \"{DAILY_SECRET}\"\n"
        )
    } else {
        String::new()
    };
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"beta\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 50\nmax_session_secs = 600\nmax_websocket_grace_ms = 10000\n{secrets}\n\
             [[tenants]]\nname = \"other\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 50\nmax_session_secs = 600\n",
            hash_key("key-beta"),
            hash_key("key-other")
        ),
    )
    .unwrap();
    let mut child = Command::new(SESSIOND)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shutdown-mode",
            "end",
            "--database",
        ])
        .arg(dir.path().join("s.db"))
        .arg("--tenants")
        .arg(&tenants)
        .args(["--max-body-bytes", "4096"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first
        .strip_prefix("sessiond listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        base,
        _dir: dir,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// The `Authorization` token LiveKit sends: HS256 JWT, `iss` the API key, `sha256` the
/// base64 digest of the body.
fn livekit_token(api_key: &str, secret: &str, body: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({
        "iss": api_key,
        "nbf": now_secs() - 5,
        "exp": now_secs() + 600,
        "sha256": STANDARD.encode(Sha256::digest(body)),
        "video": {},
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let sig = URL_SAFE_NO_PAD.encode(hmac(secret.as_bytes(), &[signed.as_bytes()]));
    format!("{signed}.{sig}")
}

fn livekit_event(
    event: &str,
    room: &str,
    identity: Option<&str>,
    id: &str,
    created_at: u64,
) -> Vec<u8> {
    let mut v = json!({
        "event": event,
        "room": {"sid": "RM_abc", "name": room, "emptyTimeout": 300, "creationTime": "1700000000"},
        "id": id,
        "createdAt": created_at.to_string(),
    });
    if let Some(identity) = identity {
        v["participant"] =
            json!({"sid": format!("PA_{identity}"), "identity": identity, "state": "ACTIVE"});
    }
    v.to_string().into_bytes()
}

fn daily_event(kind: &str, room: &str, participant: Option<&str>, id: &str, ts: f64) -> Vec<u8> {
    let payload = match participant {
        Some(p) => {
            json!({"room": room, "session_id": p, "user_id": format!("user-{p}"), "user_name": p,
                          "joined_at": ts, "owner": false, "permissions": {"hasPresence": true}})
        }
        None => json!({"room": room, "meeting_id": "m-1", "start_ts": ts - 60.0, "end_ts": ts}),
    };
    json!({"version": "1.0.0", "type": kind, "id": id, "payload": payload, "event_ts": ts})
        .to_string()
        .into_bytes()
}

async fn post_livekit(s: &Server, auth: Option<&str>, body: &[u8]) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/webhooks/livekit", s.base))
        .header("content-type", "application/webhook+json")
        .body(body.to_vec());
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn post_daily(
    s: &Server,
    ts: u64,
    secret_b64: &str,
    body: &[u8],
    sent: &[u8],
) -> (StatusCode, Value) {
    let key = STANDARD.decode(secret_b64).unwrap();
    let sig = STANDARD.encode(hmac(&key, &[ts.to_string().as_bytes(), b".", body]));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/webhooks/daily", s.base))
        .header("content-type", "application/json")
        .header("x-webhook-signature", sig)
        .header("x-webhook-timestamp", ts.to_string())
        .body(sent.to_vec())
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn create_in_room(s: &Server, key: &str, provider: &str, room: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sessions", s.base))
        .header("x-api-key", key)
        .body(json!({"room": {"provider": provider, "name": room}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    v["session"]["session_id"].as_str().unwrap().to_owned()
}

async fn session(s: &Server, key: &str, id: &str) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/sessions/{id}", s.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    v["session"].clone()
}

async fn livekit(
    s: &Server,
    event: &str,
    room: &str,
    who: Option<&str>,
    id: &str,
    t: u64,
) -> Value {
    let body = livekit_event(event, room, who, id, t);
    let (status, v) =
        post_livekit(s, Some(&livekit_token("lk-key", "lk-secret", &body)), &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livekit_presence_ends_the_session_when_the_last_participant_leaves() {
    let s = start(true, &[]);
    let id = create_in_room(&s, "key-beta", "livekit", "standup").await;
    let t = now_secs();
    assert_eq!(
        livekit(
            &s,
            "participant_joined",
            "standup",
            Some("alice"),
            "EV_1",
            t
        )
        .await["outcome"],
        "applied"
    );
    assert_eq!(
        livekit(
            &s,
            "participant_joined",
            "standup",
            Some("avatar"),
            "EV_2",
            t
        )
        .await["outcome"],
        "ignored"
    );
    livekit(
        &s,
        "participant_joined",
        "standup",
        Some("bob"),
        "EV_3",
        t + 1,
    )
    .await;
    livekit(
        &s,
        "participant_left",
        "standup",
        Some("bob"),
        "EV_4",
        t + 2,
    )
    .await;
    assert_eq!(
        session(&s, "key-beta", &id).await["status"],
        "started",
        "alice is still in"
    );
    // Duplicates are applied once.
    assert_eq!(
        livekit(
            &s,
            "participant_joined",
            "standup",
            Some("alice"),
            "EV_1",
            t
        )
        .await["outcome"],
        "duplicate"
    );
    // The avatar leaving does not matter; alice leaving does.
    livekit(
        &s,
        "participant_left",
        "standup",
        Some("avatar"),
        "EV_5",
        t + 3,
    )
    .await;
    assert_eq!(session(&s, "key-beta", &id).await["status"], "started");
    livekit(
        &s,
        "participant_left",
        "standup",
        Some("alice"),
        "EV_6",
        t + 4,
    )
    .await;
    let ended = session(&s, "key-beta", &id).await;
    assert_eq!(ended["end_reason"], "room_empty");
    // Events for an ended session, or an unknown room, are acknowledged and ignored.
    livekit(
        &s,
        "participant_joined",
        "standup",
        Some("carol"),
        "EV_7",
        t + 5,
    )
    .await;
    livekit(
        &s,
        "participant_joined",
        "nowhere",
        Some("carol"),
        "EV_8",
        t + 5,
    )
    .await;
    assert_eq!(session(&s, "key-beta", &id).await, ended);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_deliveries_and_room_finished() {
    let s = start(true, &[]);
    let id = create_in_room(&s, "key-beta", "livekit", "reorder").await;
    let t = now_secs();
    livekit(
        &s,
        "participant_joined",
        "reorder",
        Some("alice"),
        "EV_a1",
        t,
    )
    .await;
    // Bob joined at t+1 and left at t+2, but the leave is delivered first.
    livekit(
        &s,
        "participant_left",
        "reorder",
        Some("bob"),
        "EV_b2",
        t + 2,
    )
    .await;
    livekit(
        &s,
        "participant_joined",
        "reorder",
        Some("bob"),
        "EV_b1",
        t + 1,
    )
    .await;
    assert_eq!(
        session(&s, "key-beta", &id).await["status"],
        "started",
        "alice only: the count is 1"
    );
    livekit(
        &s,
        "participant_left",
        "reorder",
        Some("alice"),
        "EV_a2",
        t + 3,
    )
    .await;
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );

    let id = create_in_room(&s, "key-beta", "livekit", "finishing").await;
    livekit(
        &s,
        "participant_joined",
        "finishing",
        Some("alice"),
        "EV_f1",
        t,
    )
    .await;
    livekit(&s, "room_finished", "finishing", None, "EV_f2", t + 1).await;
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livekit_refuses_unsigned_tampered_foreign_and_oversized_deliveries() {
    let s = start(true, &[]);
    let id = create_in_room(&s, "key-beta", "livekit", "guarded").await;
    let t = now_secs();
    livekit(
        &s,
        "participant_joined",
        "guarded",
        Some("alice"),
        "EV_g1",
        t,
    )
    .await;
    let leave = livekit_event("participant_left", "guarded", Some("alice"), "EV_g2", t + 1);
    let tampered = livekit_event("participant_left", "guarded", Some("alice"), "EV_g3", t + 1);
    for auth in [
        None,
        Some("not-a-jwt".to_owned()),
        Some(livekit_token("lk-key", "wrong-secret", &leave)),
        Some(livekit_token("unknown-key", "lk-secret", &leave)),
        Some(livekit_token("lk-key", "lk-secret", &tampered)),
    ] {
        let (status, v) = post_livekit(&s, auth.as_deref(), &leave).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    // Webhook bodies have their own limit (1 MiB by default; the API's is 4 KiB here).
    let huge = vec![b' '; (1 << 20) + 1];
    let (status, _) = post_livekit(
        &s,
        Some(&livekit_token("lk-key", "lk-secret", &huge)),
        &huge,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        session(&s, "key-beta", &id).await["status"],
        "started",
        "nothing changed"
    );

    // A tenant's key never reaches another tenant's sessions.
    let other = create_in_room(&s, "key-other", "livekit", "guarded-2").await;
    livekit(&s, "participant_joined", "guarded-2", Some("x"), "EV_o1", t).await;
    livekit(
        &s,
        "participant_left",
        "guarded-2",
        Some("x"),
        "EV_o2",
        t + 1,
    )
    .await;
    assert_eq!(session(&s, "key-other", &other).await["status"], "started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_presence_meeting_ended_and_signature_checks() {
    let s = start(true, &[]);
    let id = create_in_room(&s, "key-beta", "daily", "daily-room").await;
    let ts = now_secs();
    let tsf = ts as f64;
    let join = daily_event("participant.joined", "daily-room", Some("p-1"), "ev-1", tsf);
    let (status, v) = post_daily(&s, ts, DAILY_SECRET, &join, &join).await;
    assert_eq!(
        (status, v["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{v}"
    );
    let (_, v) = post_daily(&s, ts, DAILY_SECRET, &join, &join).await;
    assert_eq!(v["outcome"], "duplicate");

    let leave = daily_event(
        "participant.left",
        "daily-room",
        Some("p-1"),
        "ev-2",
        tsf + 1.0,
    );
    // Tampered body, wrong secret, stale timestamp (a replay): refused, nothing changes.
    let tampered = daily_event(
        "participant.left",
        "daily-room",
        Some("p-2"),
        "ev-2",
        tsf + 1.0,
    );
    let (status, _) = post_daily(&s, ts, DAILY_SECRET, &leave, &tampered).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post_daily(&s, ts, &STANDARD.encode("another secret"), &leave, &leave).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post_daily(&s, ts - 3600, DAILY_SECRET, &leave, &leave).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(session(&s, "key-beta", &id).await["status"], "started");

    let (status, _) = post_daily(&s, ts, DAILY_SECRET, &leave, &leave).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );

    let id = create_in_room(&s, "key-beta", "daily", "daily-2").await;
    let ended = daily_event("meeting.ended", "daily-2", None, "ev-3", tsf);
    let (status, _) = post_daily(&s, ts, DAILY_SECRET, &ended, &ended).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_secrets_every_delivery_is_refused() {
    let s = start(false, &[]);
    let body = livekit_event("participant_joined", "r", Some("a"), "EV_1", now_secs());
    let (status, _) = post_livekit(
        &s,
        Some(&livekit_token("lk-key", "lk-secret", &body)),
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body = daily_event(
        "participant.joined",
        "r",
        Some("a"),
        "ev-1",
        now_secs() as f64,
    );
    let (status, _) = post_daily(&s, now_secs(), DAILY_SECRET, &body, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_presence_keeps_a_session_alive_past_the_orphan_timeout() {
    let s = start(
        true,
        &["--orphan-timeout-secs", "2", "--sweep-interval-secs", "1"],
    );
    let present = create_in_room(&s, "key-beta", "livekit", "alive").await;
    let nobody = create_in_room(&s, "key-beta", "livekit", "empty").await;
    livekit(
        &s,
        "participant_joined",
        "alive",
        Some("alice"),
        "EV_l1",
        now_secs(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(
        session(&s, "key-beta", &present).await["status"],
        "started",
        "presence is liveness"
    );
    assert_eq!(
        session(&s, "key-beta", &nobody).await["end_reason"],
        "orphaned",
        "a room nobody joins ends as an orphan"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_grace_lets_someone_come_back() {
    let s = start(true, &["--room-grace-ms", "1000"]);
    let id = create_in_room(&s, "key-beta", "livekit", "graceful").await;
    let t = now_secs();
    livekit(
        &s,
        "participant_joined",
        "graceful",
        Some("alice"),
        "EV_r1",
        t,
    )
    .await;
    livekit(
        &s,
        "participant_left",
        "graceful",
        Some("alice"),
        "EV_r2",
        t + 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        session(&s, "key-beta", &id).await["status"],
        "started",
        "within the grace"
    );
    livekit(
        &s,
        "participant_joined",
        "graceful",
        Some("alice"),
        "EV_r3",
        t + 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        session(&s, "key-beta", &id).await["status"],
        "started",
        "she came back"
    );
    livekit(
        &s,
        "participant_left",
        "graceful",
        Some("alice"),
        "EV_r4",
        t + 3,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );
}

/// Every session of tenant `beta`, as the API lists them (a snapshot of the table).
async fn all_sessions(s: &Server) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/sessions?limit=100", s.base))
        .header("x-api-key", "key-beta")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Value>().await.unwrap()["sessions"].clone()
}

/// Daily checks an endpoint before it creates a webhook (and when it re-activates one): it
/// POSTs `{"test":"test"}` and creates the webhook only on a 200. Answered 200, signed or
/// not, with a secret configured or none yet, and nothing changes; anything else unsigned
/// is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_verification_request_is_answered_and_changes_nothing() {
    for with_secrets in [false, true] {
        let s = start(with_secrets, &[]);
        let id = create_in_room(&s, "key-beta", "daily", "verify-room").await;
        let before = all_sessions(&s).await;
        let test = br#"{"test":"test"}"#;
        let unsigned = reqwest::Client::new()
            .post(format!("{}/v1/webhooks/daily", s.base))
            .header("content-type", "application/json")
            .body(test.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(unsigned.status(), StatusCode::OK, "secrets: {with_secrets}");
        let v: Value = unsigned.json().await.unwrap();
        assert_eq!(v["outcome"], "verification");
        let (status, v) = post_daily(&s, now_secs(), DAILY_SECRET, test, test).await;
        assert_eq!(
            (status, &v["outcome"]),
            (StatusCode::OK, &json!("verification"))
        );
        assert_eq!(
            all_sessions(&s).await,
            before,
            "the session table is unchanged"
        );
        assert_eq!(session(&s, "key-beta", &id).await["status"], "started");

        for other in [
            &br#"{"test":"test","type":"meeting.ended"}"#[..],
            br#"{"test":"other"}"#,
            br#"[{"test":"test"}]"#,
        ] {
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/webhooks/daily", s.base))
                .body(other.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{other:?}");
        }
    }
}

/// The `Authorization` token for `body`, made by LiveKit's own server SDK (Python
/// `livekit-api`); `None` when it is not installed (`pip install livekit-api`), unless
/// SESSION_LIFECYCLE_REQUIRE_PROVIDER_SDKS=1 makes that a failure.
fn livekit_sdk_token(body: &[u8]) -> Option<String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/providers/livekit_sign.py"
    );
    let required = std::env::var("SESSION_LIFECYCLE_REQUIRE_PROVIDER_SDKS").as_deref() == Ok("1");
    let child = Command::new("python3")
        .args([script, "lk-key", "lk-secret"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if !required => {
            eprintln!("skipped: no python3 for LiveKit's SDK ({e})");
            return None;
        }
        Err(e) => panic!("python3: {e}"),
    };
    // A script that stops early (the SDK is not installed) stops reading: its exit status
    // says why, not the broken pipe.
    let _ = std::io::Write::write_all(&mut child.stdin.take().unwrap(), body);
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!required, "LiveKit's SDK could not sign: {err}");
        eprintln!("skipped: LiveKit's SDK is not installed (pip install livekit-api): {err}");
        return None;
    }
    Some(String::from_utf8(out.stdout).unwrap())
}

/// A leave whose participant carries 60 KiB of metadata (LiveKit allows 64 KiB), signed by
/// LiveKit's own SDK: over the API's body limit, within the webhooks' own, it ends its
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livekit_leave_with_60_kib_of_metadata_ends_its_session() {
    let s = start(true, &[]);
    let id = create_in_room(&s, "key-beta", "livekit", "big-room").await;
    let t = now_secs();
    let metadata = "m".repeat(60 * 1024);
    let event = |kind: &str, id: &str, at: u64| {
        json!({
            "event": kind,
            "room": {"sid": "RM_big", "name": "big-room", "metadata": metadata},
            "participant": {"sid": "PA_ada", "identity": "ada", "state": "ACTIVE",
                            "metadata": metadata, "name": "Ada"},
            "id": id,
            "createdAt": at.to_string(),
        })
        .to_string()
        .into_bytes()
    };
    let join = event("participant_joined", "EV_big1", t);
    let Some(token) = livekit_sdk_token(&join) else {
        return;
    };
    assert!(join.len() > 4096 * 2, "over the API's limit");
    let (status, v) = post_livekit(&s, Some(&token), &join).await;
    assert_eq!(
        (status, &v["outcome"]),
        (StatusCode::OK, &json!("applied")),
        "{v}"
    );
    let leave = event("participant_left", "EV_big2", t + 1);
    let token = livekit_sdk_token(&leave).unwrap();
    let (status, v) = post_livekit(&s, Some(&token), &leave).await;
    assert_eq!(
        (status, &v["outcome"]),
        (StatusCode::OK, &json!("applied")),
        "{v}"
    );
    assert_eq!(
        session(&s, "key-beta", &id).await["end_reason"],
        "room_empty"
    );
}

async fn create_with(s: &Server, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sessions", s.base))
        .header("x-api-key", "key-beta")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

/// Waits for `id` to end; how long after `from`, and why.
async fn ended_after(s: &Server, id: &str, from: std::time::Instant) -> (Duration, String) {
    loop {
        let v = session(s, "key-beta", id).await;
        if v["status"] == "ended" {
            return (from.elapsed(), v["end_reason"].as_str().unwrap().to_owned());
        }
        assert!(
            from.elapsed() < Duration::from_secs(10),
            "{id} did not end: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Per-session timeouts from the create body: a room nobody joins ends `nobody_joined`
/// after its allowance; the wait after the last leave counts from the final leave;
/// values over the plan are refused; the session shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_timeouts_from_the_create_body() {
    let s = start(true, &[]);
    let t0 = std::time::Instant::now();
    let (status, v) = create_with(
        &s,
        json!({"room": {"provider": "livekit", "name": "empty-room"},
               "timeouts": {"participant_absent_timeout_ms": 2000}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["session"]["timeouts"],
        json!({"participant_left_timeout_ms": 0, "participant_absent_timeout_ms": 2000,
               "websocket_grace_ms": 0}),
        "defaults filled in"
    );
    let lonely = v["session"]["session_id"].as_str().unwrap().to_owned();

    let (status, v) = create_with(
        &s,
        json!({"room": {"provider": "livekit", "name": "busy-room"},
               "timeouts": {"participant_left_timeout_ms": 3000}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let busy = v["session"]["session_id"].as_str().unwrap().to_owned();
    let t = now_secs();
    livekit(
        &s,
        "participant_joined",
        "busy-room",
        Some("ada"),
        "EV_b1",
        t,
    )
    .await;
    livekit(
        &s,
        "participant_left",
        "busy-room",
        Some("ada"),
        "EV_b2",
        t + 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    livekit(
        &s,
        "participant_joined",
        "busy-room",
        Some("ada"),
        "EV_b3",
        t + 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    livekit(
        &s,
        "participant_left",
        "busy-room",
        Some("ada"),
        "EV_b4",
        t + 3,
    )
    .await;
    let final_leave = std::time::Instant::now();

    let (took, why) = ended_after(&s, &lonely, t0).await;
    assert_eq!(why, "nobody_joined");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "nobody_joined {took:?} after creation"
    );
    let (took, why) = ended_after(&s, &busy, final_leave).await;
    assert_eq!(why, "room_empty");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(4),
        "ended {took:?} after the final leave"
    );

    // Over the plan (beta: WebSocket grace at most 10 s; the others at most its 600 s
    // sessions): 400, nothing created.
    let before = all_sessions(&s).await;
    for timeouts in [
        json!({"websocket_grace_ms": 10_001}),
        json!({"participant_left_timeout_ms": 600_001}),
        json!({"participant_absent_timeout_ms": 600_001}),
        json!({"websocket_grace_ms": -1}),
        json!({"websocket_grace": 5}),
    ] {
        let (status, v) = create_with(&s, json!({ "timeouts": timeouts })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{timeouts}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    assert_eq!(all_sessions(&s).await, before);
    let (status, v) = create_with(&s, json!({"timeouts": {"websocket_grace_ms": 10_000}})).await;
    assert_eq!(status, StatusCode::CREATED, "at the limit: {v}");
    assert_eq!(v["session"]["timeouts"]["websocket_grace_ms"], 10_000);
}
