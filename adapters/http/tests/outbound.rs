//! Outbound webhooks and the event stream, against real `sessiond` processes and a receiver
//! that verifies every delivery with the Standard Webhooks reference library
//! (`tests/providers/webhook_receiver.py`, `standardwebhooks` on PyPI).
#![cfg(feature = "sessiond")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, Node, client, json};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The endpoint's secrets: a rotation, new first. The receiver knows only the old one.
const NEW_SECRET: &str = "whsec_bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldy1zZWNyZXQ=";
const OLD_SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// Signs the sessions' own callbacks.
const CALLBACK_SECRET: &str = "whsec_Y2FsbGJhY2stc2VjcmV0LWNhbGxiYWNrLXNlY3JldA==";
const ACME: &str = "key-acme";
const GLOBEX: &str = "key-globex";

/// A receiver process; killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Starts one answering as `mode` says, verifying with `secrets`; `None` (skipped)
    /// when python3 or the reference library is missing, unless
    /// SESSION_LIFECYCLE_REQUIRE_PROVIDER_SDKS=1 makes that a failure.
    fn start(dir: &std::path::Path, name: &str, secrets: &[&str], mode: &str) -> Option<Receiver> {
        let required =
            std::env::var("SESSION_LIFECYCLE_REQUIRE_PROVIDER_SDKS").as_deref() == Ok("1");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/providers/webhook_receiver.py"
        );
        let log = dir.join(format!("{name}.jsonl"));
        let spawned = Command::new("python3")
            .args([script, log.to_str().unwrap(), &secrets.join(","), mode])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if !required => {
                eprintln!("skipped: no python3 for the Standard Webhooks library ({e})");
                return None;
            }
            Err(e) => panic!("python3: {e}"),
        };
        let mut first = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut first);
        let Some(port) = first
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
        else {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!required, "the receiver did not start: {err}");
            eprintln!("skipped: pip install standardwebhooks ({err})");
            return None;
        };
        Some(Receiver { child, port, log })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request received so far.
    fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(json)
            .collect()
    }

    /// Waits (up to `limit`) until `done` holds of what was received; returns it.
    async fn wait_for(&self, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let give_up = Instant::now() + limit;
        loop {
            let got = self.received();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < give_up,
                "not received within {limit:?}; got {} requests: {:?}",
                got.len(),
                got.iter().take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Accepted deliveries (answered 2xx) by (webhook-id, path).
fn accepted(received: &[Value]) -> Vec<&Value> {
    received
        .iter()
        .filter(|r| {
            r["answered"]
                .as_u64()
                .is_some_and(|s| (200..300).contains(&s))
        })
        .collect()
}

/// The tenants file: `acme` with an endpoint wanting every event (two secrets, a
/// rotation) at `hooks`, and callbacks allowed; `globex` with an endpoint that wants only
/// `session.ended` at `ended_only`.
fn tenants_file(
    dir: &std::path::Path,
    hooks: &str,
    ended_only: &str,
    hosts: Option<&str>,
) -> PathBuf {
    let hash = |k: &str| session_lifecycle_http::tenants::hash_key(k);
    let hosts = hosts.map_or(String::new(), |h| format!("callback_hosts = [\"{h}\"]\n"));
    let text = format!(
        "[[tenants]]\nname = \"acme\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 100000\nmax_session_secs = 3600\n\
         callback_secrets = [\"{CALLBACK_SECRET}\"]\n{hosts}\
         [[tenants.webhooks]]\nname = \"all\"\nurl = \"{hooks}\"\nsecrets = [\"{NEW_SECRET}\", \"{OLD_SECRET}\"]\n\n\
         [[tenants]]\nname = \"globex\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 100000\nmax_session_secs = 3600\n\
         [[tenants.webhooks]]\nname = \"ends\"\nurl = \"{ended_only}\"\nsecrets = [\"{OLD_SECRET}\"]\nevents = [\"session.ended\"]\n",
        hash(ACME),
        hash(GLOBEX)
    );
    let path = dir.join("tenants.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `cluster`'s nodes on the tenants file of [`tenants_file`].
fn with_tenants(cluster: &mut Cluster, hooks: &str, ended_only: &str, hosts: Option<&str>) {
    let path = tenants_file(cluster.dir.path(), hooks, ended_only, hosts);
    cluster.auth = vec!["--tenants".to_owned(), path.to_str().unwrap().to_owned()];
}

async fn call(
    node: &Node,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client()
        .request(method, node.url(path))
        .header("x-api-key", key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The Rust client of `node` with `key`.
fn api(node: &Node, key: &str) -> session_lifecycle_client::Client {
    session_lifecycle_client::Client::with_http(client(), &node.url(""), key).expect("client")
}

async fn create(node: &Node, key: &str, body: Value) -> String {
    let request = serde_json::from_value(body).expect("a create request");
    let created = api(node, key)
        .create_session(&request)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    created.session.session_id
}

async fn end(node: &Node, key: &str, id: &str) {
    api(node, key)
        .end_session(id)
        .await
        .unwrap_or_else(|e| panic!("end {id}: {e}"));
}

/// The events received for session `id` at `path` (accepted ones), by sequence.
fn events_of<'a>(received: &'a [Value], id: &str, path: &str) -> BTreeMap<u64, &'a Value> {
    accepted(received)
        .into_iter()
        .filter(|r| r["path"] == path && r["body"]["data"]["session_id"] == id)
        .map(|r| (r["body"]["data"]["sequence"].as_u64().unwrap(), r))
        .collect()
}

/// Every event of a session with an avatar server reaches the tenant's endpoint and the
/// session's callback, verified by the reference library with the old secret of a
/// rotation (and the callback secret), and says what the session says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_verified_and_says_what_the_session_says() {
    let mut cluster = Cluster::sqlite(&["--webhook-allow-loopback", "--webhook-backoff-ms", "200"]);
    let Some(receiver) = Receiver::start(
        cluster.dir.path(),
        "r",
        &[OLD_SECRET, CALLBACK_SECRET],
        "ok",
    ) else {
        return;
    };
    with_tenants(
        &mut cluster,
        &receiver.url("/hooks"),
        &receiver.url("/globex"),
        None,
    );
    let node = cluster.start("a");
    let id = create(
        &node,
        ACME,
        json!({"metadata": {"order": 7}, "callback_url": receiver.url("/cb")}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    end(&node, ACME, &id).await;
    let other = create(&node, GLOBEX, json!({})).await;
    end(&node, GLOBEX, &other).await;

    let got = receiver
        .wait_for(Duration::from_secs(30), |got| {
            events_of(got, &id, "/hooks").len() == 3 && events_of(got, &id, "/cb").len() == 3
        })
        .await;
    assert!(got.iter().all(|r| r["verified"] == true), "{got:?}");
    let (_, session) = call(
        &node,
        ACME,
        Method::GET,
        &format!("/v1/sessions/{id}"),
        None,
    )
    .await;
    let session = &session["session"];
    for path in ["/hooks", "/cb"] {
        let events = events_of(&got, &id, path);
        assert_eq!(
            events.keys().copied().collect::<Vec<_>>(),
            [1, 3, 4],
            "{path}"
        );
        let types: Vec<&str> = events
            .values()
            .map(|e| e["body"]["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["session.started", "session.ended", "session.released"]
        );
        for e in events.values() {
            let data = &e["body"]["data"];
            assert_eq!(data["started_at"], session["started_at"]);
            assert_eq!(data["metadata"], json!({"order": 7}));
        }
        let ended = &events[&3]["body"];
        assert_eq!(ended["data"]["ended_at"], session["ended_at"]);
        assert_eq!(ended["data"]["end_reason"], "requested");
        assert_eq!(ended["timestamp"], session["ended_at"]);
        assert!(ended["data"]["duration_secs"].is_u64());
        assert!(
            events[&1]["body"]["data"].get("ended_at").is_none(),
            "a start says nothing of the end"
        );
        let released = &events[&4]["body"]["data"]["releases"];
        let notes: Vec<&str> = released
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["note"].as_str().unwrap())
            .collect();
        assert_eq!(notes, ["sigterm"], "{released}");
        assert_eq!(
            events[&4]["signatures"],
            if path == "/hooks" { 2 } else { 1 }
        );
    }
    // One id per event, the same to every endpoint.
    let ids: BTreeSet<&str> = events_of(&got, &id, "/hooks")
        .values()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    let cb_ids: BTreeSet<&str> = events_of(&got, &id, "/cb")
        .values()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, cb_ids);
    // globex's endpoint wants only ends; acme's never hears of globex.
    let globex = receiver
        .wait_for(Duration::from_secs(10), |got| {
            !events_of(got, &other, "/globex").is_empty()
        })
        .await;
    assert_eq!(
        events_of(&globex, &other, "/globex")
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [3]
    );
    assert!(events_of(&globex, &other, "/hooks").is_empty());

    // The deliveries, as each tenant sees them. A worker records its attempts together,
    // a moment after the receiver answered them.
    let give_up = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (status, list) = call(
            &node,
            ACME,
            Method::GET,
            &format!("/v1/webhook-deliveries?session_id={id}&status=delivered"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let list = list["deliveries"].as_array().cloned().unwrap_or_default();
        if list.len() == 6 || Instant::now() >= give_up {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(list.len(), 6, "{list:?}");
    assert!(
        list.iter()
            .all(|d| d["attempts"] == 1 && d["last_status_code"] == 204)
    );
    let (_, theirs) = call(
        &node,
        GLOBEX,
        Method::GET,
        &format!("/v1/webhook-deliveries?session_id={id}"),
        None,
    )
    .await;
    assert_eq!(theirs["deliveries"], json!([]));
    let (status, _) = call(
        &node,
        GLOBEX,
        Method::POST,
        &format!("/v1/webhook-deliveries/{}/retry", list[0]["delivery_id"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's delivery");
    let (status, _) = call(
        &node,
        ACME,
        Method::GET,
        "/v1/webhook-deliveries?status=lost",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    cluster.finish().await;
}

/// A receiver that answers 500 for 30 s, then 200: everything arrives afterwards, each
/// session's events in order; one that always answers 500 is marked failed once the
/// retry period is over, and a retry by hand tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_30_s_gets_everything_in_order_and_one_down_for_good_fails() {
    let mut cluster = Cluster::sqlite(&[
        "--webhook-allow-loopback",
        "--webhook-backoff-ms",
        "500",
        "--webhook-retry-secs",
        "120",
    ]);
    let back_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 30.0;
    let Some(flaky) = Receiver::start(
        cluster.dir.path(),
        "flaky",
        &[OLD_SECRET],
        &format!("fail-until:{back_at}"),
    ) else {
        return;
    };
    let Some(down) = Receiver::start(cluster.dir.path(), "down", &[OLD_SECRET], "always:500")
    else {
        return;
    };
    with_tenants(&mut cluster, &flaky.url("/hooks"), &down.url("/ends"), None);
    let node = cluster.start_bare("a");
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = create(&node, ACME, json!({})).await;
        end(&node, ACME, &id).await;
        ids.push(id);
    }
    let doomed = create(&node, GLOBEX, json!({})).await;
    end(&node, GLOBEX, &doomed).await;

    let got = flaky
        .wait_for(Duration::from_secs(90), |got| {
            ids.iter().all(|id| events_of(got, id, "/hooks").len() == 3)
        })
        .await;
    assert!(
        got.iter().any(|r| r["answered"] == 500),
        "it was down first"
    );
    let first_ok = accepted(&got)
        .iter()
        .map(|r| r["received_at"].as_f64().unwrap())
        .fold(f64::MAX, f64::min);
    assert!(first_ok >= back_at, "nothing accepted while down");
    for id in &ids {
        // In the order accepted, a session's events come in sequence order.
        let order: Vec<u64> = accepted(&got)
            .into_iter()
            .filter(|r| r["body"]["data"]["session_id"] == id.as_str())
            .map(|r| r["body"]["data"]["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(order, [1, 3, 4], "{id}");
    }
    assert!(got.iter().all(|r| r["verified"] == true));
    drop(node);

    // The same always-failing endpoint, with a short retry period: failed, visibly.
    cluster.flags = vec![
        "--webhook-allow-loopback".into(),
        "--webhook-backoff-ms".into(),
        "200".into(),
        "--webhook-retry-secs".into(),
        "3".into(),
    ];
    let node = cluster.start_bare("a");
    // Its backoff has grown meanwhile: a retry by hand makes it due now, with a fresh
    // (3 s) retry period.
    let (_, list) = call(
        &node,
        GLOBEX,
        Method::GET,
        &format!("/v1/webhook-deliveries?session_id={doomed}"),
        None,
    )
    .await;
    let pending = &list["deliveries"][0];
    assert_eq!(pending["status"], "pending", "{list}");
    assert!(pending["attempts"].as_u64().unwrap() >= 2, "{list}");
    let (status, _) = call(
        &node,
        GLOBEX,
        Method::POST,
        &format!("/v1/webhook-deliveries/{}/retry", pending["delivery_id"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let give_up = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let (_, list) = call(
            &node,
            GLOBEX,
            Method::GET,
            "/v1/webhook-deliveries?status=failed",
            None,
        )
        .await;
        let list = list["deliveries"].as_array().cloned().unwrap_or_default();
        if !list.is_empty() {
            break list;
        }
        assert!(Instant::now() < give_up, "never marked failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(failed[0]["session_id"], doomed.as_str());
    assert_eq!(failed[0]["last_status_code"], 500);
    assert!(failed[0]["attempts"].as_u64().unwrap() >= 2);
    let metrics = client()
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sessiond_webhook_deliveries{status=\"failed\"} 1"),
        "{metrics}"
    );
    let tries = down.received().len();
    let (status, retried) = call(
        &node,
        GLOBEX,
        Method::POST,
        &format!("/v1/webhook-deliveries/{}/retry", failed[0]["delivery_id"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retried["delivery"]["status"], "pending");
    down.wait_for(Duration::from_secs(10), |got| got.len() > tries)
        .await;
    cluster.finish().await;
}

/// Callback URLs that would reach the cloud metadata service, a private network or this
/// machine are refused at create time with a clear 400; a receiver's redirect is not
/// followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_to_private_addresses_are_refused_and_redirects_not_followed() {
    let mut cluster = Cluster::sqlite(&["--webhook-backoff-ms", "200"]);
    with_tenants(
        &mut cluster,
        "https://hooks.example.com/x",
        "https://hooks.example.com/y",
        None,
    );
    let node = cluster.start_bare("strict");
    for url in [
        "https://169.254.169.254/latest/meta-data/",
        "http://169.254.169.254/",
        "https://10.0.0.1/hook",
        "https://[::1]/hook",
        "http://[::1]:9/hook",
        "https://localhost/hook",
        "http://hooks.example.com/plain",
        "https://[::ffff:10.0.0.1]/hook",
        "ftp://hooks.example.com/",
        "not a url",
    ] {
        let (status, answer) = call(
            &node,
            ACME,
            Method::POST,
            "/v1/sessions",
            Some(json!({"callback_url": url})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("callback_url"),
            "{answer}"
        );
    }
    // A tenant without callback secrets may not name one at all.
    let (status, answer) = call(
        &node,
        GLOBEX,
        Method::POST,
        "/v1/sessions",
        Some(json!({"callback_url": "https://hooks.example.com/cb"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (_, list) = call(&node, ACME, Method::GET, "/v1/sessions", None).await;
    assert_eq!(list["sessions"], json!([]), "nothing was started");
    drop(node);

    // With loopback allowed: a receiver that redirects to another is not followed.
    let Some(target) = Receiver::start(cluster.dir.path(), "target", &[CALLBACK_SECRET], "ok")
    else {
        return;
    };
    let Some(redirector) = Receiver::start(
        cluster.dir.path(),
        "redirector",
        &[CALLBACK_SECRET],
        &format!("redirect:{}", target.url("/stolen")),
    ) else {
        return;
    };
    cluster.flags = vec![
        "--webhook-allow-loopback".into(),
        "--webhook-backoff-ms".into(),
        "200".into(),
    ];
    let node = cluster.start_bare("loopback");
    let id = create(&node, ACME, json!({"callback_url": redirector.url("/cb")})).await;
    redirector
        .wait_for(Duration::from_secs(10), |got| got.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(target.received().is_empty(), "the redirect was followed");
    let (_, list) = call(
        &node,
        ACME,
        Method::GET,
        &format!("/v1/webhook-deliveries?session_id={id}"),
        None,
    )
    .await;
    let callback = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["endpoint"] == "callback")
        .cloned()
        .unwrap();
    assert_eq!(callback["last_status_code"], 307);
    assert_eq!(callback["status"], "pending");
    // A tenant's allowed callback hosts bind too.
    drop(node);
    with_tenants(
        &mut cluster,
        "https://hooks.example.com/x",
        "https://hooks.example.com/y",
        Some("hooks.example.com"),
    );
    let node = cluster.start_bare("hosts");
    let (status, answer) = call(
        &node,
        ACME,
        Method::POST,
        "/v1/sessions",
        Some(json!({"callback_url": "https://other.example.com/cb"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    cluster.finish().await;
}

/// The event stream: a tenant receives its own events (none of another's), and resumes
/// after a disconnect with `Last-Event-ID` without losing or repeating one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_is_the_tenants_own_and_resumes_without_loss() {
    let mut cluster = Cluster::sqlite(&[]);
    with_tenants(
        &mut cluster,
        "https://hooks.example.com/x",
        "https://hooks.example.com/y",
        None,
    );
    let node = cluster.start_bare("a");
    let mut stream = SseClient::connect(&node, ACME, None).await;
    let a1 = create(&node, ACME, json!({})).await;
    let b1 = create(&node, GLOBEX, json!({})).await;
    end(&node, ACME, &a1).await;
    end(&node, GLOBEX, &b1).await;
    let first = stream.next_events(3).await;
    let seen: Vec<(String, String)> = first
        .iter()
        .map(|(_, kind, data)| {
            (
                kind.clone(),
                data["data"]["session_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("session.started".to_owned(), a1.clone()),
            ("session.ended".to_owned(), a1.clone()),
            ("session.released".to_owned(), a1.clone()),
        ]
    );
    let last_id = first.last().unwrap().0.clone();
    drop(stream);
    // Meanwhile, more happens.
    let a2 = create(&node, ACME, json!({})).await;
    end(&node, ACME, &a2).await;
    create(&node, GLOBEX, json!({})).await;
    let mut resumed = SseClient::connect(&node, ACME, Some(&last_id)).await;
    let rest = resumed.next_events(3).await;
    let rest_sessions: Vec<&str> = rest
        .iter()
        .map(|(_, _, d)| d["data"]["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest_sessions,
        [a2.as_str(); 3],
        "exactly what came after, once"
    );
    let ids: Vec<u64> = first
        .iter()
        .chain(rest.iter())
        .map(|(id, _, _)| id.parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // globex's stream has its own.
    let mut theirs = SseClient::connect(&node, GLOBEX, None).await;
    let their = theirs.next_events(4).await;
    assert!(
        their
            .iter()
            .all(|(_, _, d)| d["data"]["session_id"] != a1.as_str()
                && d["data"]["session_id"] != a2.as_str())
    );
    // A session's client token streams that session's events only.
    let (status, created) = call(&node, ACME, Method::POST, "/v1/sessions", Some(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let a3 = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = created["client_token"].as_str().unwrap().to_owned();
    end(&node, ACME, &a3).await;
    let resp = reqwest::Client::new()
        .get(node.url(&format!("/v1/events?session_id={a3}&token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut own = SseClient {
        response: resp,
        buffer: String::new(),
    };
    let mine = own.next_events(3).await;
    assert!(
        mine.iter()
            .all(|(_, _, d)| d["data"]["session_id"] == a3.as_str()),
        "{mine:?}"
    );
    let resp = reqwest::Client::new()
        .get(node.url(&format!("/v1/events?session_id={a1}&token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "another session's token"
    );
    let (status, _) = call(&node, ACME, Method::GET, "/v1/events?after=x", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    cluster.finish().await;
}

/// A minimal Server-Sent Events reader.
struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    async fn connect(node: &Node, key: &str, last_id: Option<&str>) -> SseClient {
        let mut req = reqwest::Client::new()
            .get(node.url("/v1/events"))
            .header("x-api-key", key);
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.expect("stream");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseClient {
            response,
            buffer: String::new(),
        }
    }

    /// The next `n` messages: (id, event, data).
    async fn next_events(&mut self, n: usize) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(15);
        while out.len() < n {
            while out.len() < n
                && let Some(end) = self.buffer.find("\n\n")
            {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    out.push((id, event, json(&data)));
                }
            }
            if out.len() >= n {
                break;
            }
            let left = give_up.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} events: {out:?}", out.len()))
                .expect("stream")
                .expect("the stream ended");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
        out
    }
}

/// Every accepted event, checked: verified, one (session, type) per webhook-id with the
/// same body on every repeat; returns how often each id was accepted.
fn check_ids(received: &[Value]) -> BTreeMap<String, usize> {
    let mut bodies: BTreeMap<String, &Value> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for r in accepted(received) {
        assert_eq!(r["verified"], true, "{r}");
        let id = r["id"].as_str().unwrap().to_owned();
        if let Some(first) = bodies.get(&id) {
            assert_eq!(
                *first, &r["body"],
                "a webhook-id repeats only for the same event"
            );
        }
        bodies.insert(id.clone(), &r["body"]);
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Kill -9 while 500 sessions end: after a restart, every event of every session is
/// delivered at least once, and a webhook-id repeats only for the same event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_500_sessions_end_loses_no_event() {
    let mut cluster = Cluster::sqlite(&["--webhook-allow-loopback", "--webhook-backoff-ms", "200"]);
    let Some(receiver) = Receiver::start(cluster.dir.path(), "r", &[OLD_SECRET], "ok") else {
        return;
    };
    with_tenants(
        &mut cluster,
        &receiver.url("/hooks"),
        &receiver.url("/g"),
        None,
    );
    let node = cluster.start_bare("a");
    let mut ids = Vec::new();
    for _ in 0..500 {
        ids.push(create(&node, ACME, json!({})).await);
    }
    // End them all at once, 32 at a time; kill -9 once about half are answered.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let base = node.base.clone();
    let mut ends = tokio::task::JoinSet::new();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    for id in ids.clone() {
        let (answered, base, permits) = (answered.clone(), base.clone(), permits.clone());
        ends.spawn(async move {
            let _p = permits.acquire_owned().await.unwrap();
            let ok = reqwest::Client::new()
                .post(format!("{base}/v1/sessions/{id}/end"))
                .header("x-api-key", ACME)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ok {
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 250 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill_9();
    while ends.join_next().await.is_some() {}
    let before_restart = receiver.received().len();
    let node = cluster.start_bare("a");
    // The client retries the ends it did not see answered (repeats are idempotent).
    for id in &ids {
        end(&node, ACME, id).await;
    }
    let got = receiver
        .wait_for(Duration::from_secs(120), |got| {
            let ok = accepted(got);
            let mut seen: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
            for r in ok {
                if let (Some(s), Some(q)) = (
                    r["body"]["data"]["session_id"].as_str(),
                    r["body"]["data"]["sequence"].as_u64(),
                ) {
                    seen.entry(s).or_default().insert(q);
                }
            }
            ids.iter()
                .all(|id| seen.get(id.as_str()).is_some_and(|q| q.len() == 3))
        })
        .await;
    let counts = check_ids(&got);
    assert_eq!(
        counts.len(),
        1500,
        "three events per session, each with its own id"
    );
    let repeats = counts.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} requests before the restart, {} in all; {repeats} events delivered more than once",
        before_restart,
        got.len()
    );
    cluster.finish().await;
}

/// Two instances on PostgreSQL and one receiver: each event is delivered once (counted),
/// never zero times, whichever instance ended the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_deliver_each_event_once() {
    let Some(mut cluster) =
        Cluster::new(&["--webhook-allow-loopback", "--webhook-backoff-ms", "200"]).await
    else {
        eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
        return;
    };
    let Some(receiver) = Receiver::start(cluster.dir.path(), "r", &[OLD_SECRET], "ok") else {
        return;
    };
    with_tenants(
        &mut cluster,
        &receiver.url("/hooks"),
        &receiver.url("/g"),
        None,
    );
    let nodes = [cluster.start_bare("a"), cluster.start_bare("b")];
    let mut ids = Vec::new();
    for i in 0..100 {
        let id = create(&nodes[i % 2], ACME, json!({})).await;
        end(&nodes[(i / 2) % 2], ACME, &id).await;
        ids.push(id);
    }
    receiver
        .wait_for(Duration::from_secs(60), |got| accepted(got).len() >= 300)
        .await;
    // Anything more would arrive soon after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = receiver.received();
    let counts = check_ids(&got);
    assert_eq!(counts.len(), 300, "every event of every session");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(got.len(), 300, "no attempt was made twice");
    drop(nodes);
    cluster.finish().await;
}

/// An avatar server that sends `READY=1` after 300 ms: its session gets `ready_at` then
/// and a `session.ready` event; one that never does ends `start_failed` at the start
/// timeout, and gives back what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_recorded_and_a_server_never_ready_ends_start_failed() {
    let mut cluster = Cluster::sqlite(&["--webhook-allow-loopback", "--webhook-backoff-ms", "200"]);
    let Some(receiver) = Receiver::start(cluster.dir.path(), "r", &[OLD_SECRET], "ok") else {
        return;
    };
    with_tenants(
        &mut cluster,
        &receiver.url("/hooks"),
        &receiver.url("/g"),
        None,
    );
    let fixture = common::fixture();
    let notifying = format!("{} notify-after 300", fixture.display());
    let node = cluster.spawn(
        "ready",
        cluster.db_url(),
        &[
            "--avatar-command",
            &notifying,
            "--avatar-ready-timeout-ms",
            "5000",
            "--gpu",
            "off",
        ],
    );
    let id = create(&node, ACME, json!({})).await;
    let got = receiver
        .wait_for(Duration::from_secs(15), |got| {
            events_of(got, &id, "/hooks").contains_key(&2)
        })
        .await;
    let ready = events_of(&got, &id, "/hooks")[&2]["body"].clone();
    assert_eq!(ready["type"], "session.ready");
    let (_, session) = call(
        &node,
        ACME,
        Method::GET,
        &format!("/v1/sessions/{id}"),
        None,
    )
    .await;
    let session = &session["session"];
    assert_eq!(ready["data"]["ready_at"], session["ready_at"]);
    assert_eq!(ready["timestamp"], session["ready_at"]);
    let secs = |v: &Value| {
        session_lifecycle::Timestamp::parse_rfc3339(v.as_str().unwrap())
            .unwrap()
            .as_secs()
    };
    let waited = secs(&session["ready_at"]) - secs(&session["started_at"]);
    assert!(
        waited <= 1,
        "ready about 300 ms after the start (second precision): {session}"
    );
    assert_eq!(session["status"], "started");
    end(&node, ACME, &id).await;
    let got = receiver
        .wait_for(Duration::from_secs(15), |got| {
            events_of(got, &id, "/hooks").len() == 4
        })
        .await;
    assert_eq!(
        events_of(&got, &id, "/hooks")
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(
        events_of(&got, &id, "/hooks")[&3]["body"]["data"]["ready_at"],
        session["ready_at"]
    );
    drop(node);

    // A server that never reports: ended start_failed at the timeout, released.
    let silent = format!("{} behave", fixture.display());
    let node = cluster.spawn(
        "silent",
        cluster.db_url(),
        &[
            "--avatar-command",
            &silent,
            "--avatar-ready-timeout-ms",
            "800",
            "--gpu",
            "off",
        ],
    );
    let id = create(&node, ACME, json!({})).await;
    let got = receiver
        .wait_for(Duration::from_secs(15), |got| {
            events_of(got, &id, "/hooks").contains_key(&4)
        })
        .await;
    let events = events_of(&got, &id, "/hooks");
    assert_eq!(
        events.keys().copied().collect::<Vec<_>>(),
        [1, 3, 4],
        "never ready"
    );
    assert_eq!(events[&3]["body"]["data"]["end_reason"], "start_failed");
    let (_, session) = call(
        &node,
        ACME,
        Method::GET,
        &format!("/v1/sessions/{id}"),
        None,
    )
    .await;
    let session = &session["session"];
    assert_eq!(session["end_reason"], "start_failed");
    assert_eq!(session["ready_at"], Value::Null);
    assert!(
        session["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["release"] == "released")
    );
    cluster.finish().await;
}

/// The identifier a Stripe-shaped correction cancels, from its `adjustment` (the body of a
/// Stripe meter event adjustment); `None` for a first record, which carries none.
fn stripe_cancelled(body: &Value) -> Option<String> {
    let adjustment = body.get("adjustment")?;
    assert_eq!(adjustment["type"], "cancel", "{body}");
    assert_eq!(adjustment["event_name"], body["event_name"], "{body}");
    assert!(body["payload"].get("corrects").is_none(), "{body}");
    Some(adjustment["cancel"]["identifier"].as_str()?.to_owned())
}

/// The flags of the usage export tests' instances: usage periods of a second.
const USAGE_EXPORT_FLAGS: [&str; 5] = [
    "--webhook-allow-loopback",
    "--webhook-backoff-ms",
    "200",
    "--usage-period-secs",
    "1",
];

/// Usage export from two instances on PostgreSQL to a receiver that fails for its first
/// seconds: every usage record's `usage.recorded` event arrives at each endpoint that
/// exports usage (CloudEvents and Stripe shapes), verified with the Standard Webhooks
/// library, accepted once per identifier; taken as a billing system takes them (by
/// identifier, corrections replacing what they name) they add up, session by session, to
/// what `GET /v1/usage` answers; another tenant's endpoint hears of none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_from_two_instances_arrive_once_each_through_a_failing_receiver() {
    let Some(cluster) = Cluster::new(&USAGE_EXPORT_FLAGS).await else {
        eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
        return;
    };
    usage_export_through_a_failing_receiver(cluster, 2).await;
}

/// The same from one instance on SQLite, where an end's usage events are written when
/// its `ended` event is fanned out rather than in the end's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_from_sqlite_arrive_once_each_through_a_failing_receiver() {
    usage_export_through_a_failing_receiver(Cluster::sqlite(&USAGE_EXPORT_FLAGS), 1).await;
}

/// The usage export check on `cluster`, its sessions created and ended across `instances`
/// instances (see the PostgreSQL test above).
async fn usage_export_through_a_failing_receiver(mut cluster: Cluster, instances: usize) {
    let fail_until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 6.0;
    let Some(receiver) = Receiver::start(
        cluster.dir.path(),
        "r",
        &[OLD_SECRET],
        &format!("fail-until:{fail_until}"),
    ) else {
        return;
    };
    let hash = |k: &str| session_lifecycle_http::tenants::hash_key(k);
    let text = format!(
        "[[tenants]]\nname = \"acme\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 1000\nmax_session_secs = 3600\n\
         billing = {{ meter = \"started\", customer = \"cus_acme\" }}\n\
         [[tenants.webhooks]]\nname = \"ce\"\nurl = \"{}\"\nsecret = \"{OLD_SECRET}\"\nevents = []\nusage = \"cloudevents\"\n\
         [[tenants.webhooks]]\nname = \"stripe\"\nurl = \"{}\"\nsecret = \"{OLD_SECRET}\"\nevents = []\nusage = \"stripe\"\n\n\
         [[tenants]]\nname = \"globex\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 1000\nmax_session_secs = 3600\n\
         [[tenants.webhooks]]\nname = \"g\"\nurl = \"{}\"\nsecret = \"{OLD_SECRET}\"\nusage = \"cloudevents\"\n",
        hash(ACME),
        receiver.url("/ce"),
        receiver.url("/stripe"),
        hash(GLOBEX),
        receiver.url("/g"),
    );
    let path = cluster.dir.path().join("tenants.toml");
    std::fs::write(&path, text).unwrap();
    cluster.auth = vec!["--tenants".to_owned(), path.to_str().unwrap().to_owned()];
    let nodes: Vec<Node> = ["a", "b"][..instances]
        .iter()
        .map(|id| cluster.start_bare(id))
        .collect();
    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(create(&nodes[i % instances], ACME, json!({})).await);
    }
    // Several usage periods (1 s) close on their nodes while they run.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for (i, id) in ids.iter().enumerate() {
        end(&nodes[(i + 1) % instances], ACME, id).await;
        if i % 6 == 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }
    // What the store recorded, read from the database itself. Identifiers are derived,
    // not stored: `usage:<session>:<span start>[:r<revision>]`.
    let recorded_ids = "SELECT 'usage:' || session_id || ':' || span_from \
                 || CASE WHEN revision > 1 THEN ':r' || revision ELSE '' END \
             FROM usage_records WHERE tenant = 'acme'";
    let recorded: BTreeSet<String> = match &cluster.sqlite {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .prepare(recorded_ids)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap(),
        None => session_lifecycle_postgres::testing::connect(cluster.db_url())
            .await
            .query(recorded_ids, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    assert!(
        recorded.len() > ids.len(),
        "periods were closed: {recorded:?}"
    );
    let identifier = |r: &Value, path: &str| -> String {
        let body = &r["body"];
        if path == "/ce" {
            &body["id"]
        } else {
            &body["identifier"]
        }
        .as_str()
        .unwrap()
        .to_owned()
    };
    receiver
        .wait_for(Duration::from_secs(90), |got| {
            ["/ce", "/stripe"].iter().all(|path| {
                let seen: BTreeSet<String> = accepted(got)
                    .into_iter()
                    .filter(|r| r["path"] == *path)
                    .map(|r| identifier(r, path))
                    .collect();
                seen == recorded
            })
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = receiver.received();
    assert!(
        got.iter().any(|r| r["answered"] == 500),
        "the receiver failed at first"
    );
    let (_, usage) = call(
        &nodes[0],
        ACME,
        Method::GET,
        "/v1/usage?from=2020-01-01T00:00:00Z&to=2020-12-31T00:00:00Z&group_by=session",
        None,
    )
    .await;
    assert_eq!(usage["billable_ms"], 0, "a range before them all is empty");
    let now = session_lifecycle::Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 3_600_000,
    );
    let (status, usage) = call(
        &nodes[instances - 1],
        ACME,
        Method::GET,
        &format!("/v1/usage?from=2026-01-01T00:00:00Z&to={now}&group_by=session"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let want: BTreeMap<String, u64> = usage["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["session_id"].as_str().unwrap().to_owned(),
                g["billable_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(want.len(), ids.len(), "every session was billed");
    for path in ["/ce", "/stripe"] {
        // Each accepted once, verified; as a billing system takes them.
        let mut by_id: BTreeMap<String, (String, u64, Option<String>)> = BTreeMap::new();
        for r in accepted(&got).into_iter().filter(|r| r["path"] == path) {
            assert_eq!(r["verified"], true, "{r}");
            let id = identifier(r, path);
            let body = &r["body"];
            let (session, ms, corrects) = if path == "/ce" {
                assert_eq!(body["specversion"], "1.0");
                assert_eq!(body["type"], "usage.recorded");
                assert_eq!(body["source"], "/session-lifecycle/tenants/acme");
                (
                    body["data"]["session_id"].as_str().unwrap().to_owned(),
                    body["data"]["billable_ms"].as_u64().unwrap(),
                    body["data"]["corrects"].as_str().map(str::to_owned),
                )
            } else {
                assert_eq!(body["event_name"], "session_milliseconds");
                assert_eq!(body["payload"]["stripe_customer_id"], "cus_acme");
                let session = id.split(':').nth(1).unwrap().to_owned();
                // Stamped with its span's start, so it lands in the period it was used in.
                let span_start: u64 = id.split(':').nth(2).unwrap().parse().unwrap();
                assert_eq!(body["timestamp"], span_start / 1000, "{body}");
                (
                    session,
                    body["payload"]["value"].as_str().unwrap().parse().unwrap(),
                    stripe_cancelled(body),
                )
            };
            assert!(
                by_id.insert(id.clone(), (session, ms, corrects)).is_none(),
                "{path}: {id} accepted twice"
            );
        }
        let replaced: BTreeSet<String> = by_id.values().filter_map(|v| v.2.clone()).collect();
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for (id, (session, ms, _)) in &by_id {
            if !replaced.contains(id) {
                *sums.entry(session.clone()).or_default() += ms;
            }
        }
        sums.retain(|_, ms| *ms > 0);
        assert_eq!(
            sums, want,
            "{path}: exported usage adds up to GET /v1/usage"
        );
    }
    assert!(
        got.iter().all(|r| r["path"] != "/g"),
        "another tenant's endpoint heard of acme's usage"
    );
    drop(nodes);
    cluster.finish().await;
}
