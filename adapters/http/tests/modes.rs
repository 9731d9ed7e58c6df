//! What SIGTERM does, against real `sessiond` processes on SQLite with real avatar servers
//! (the `avatar-fixture` in ledger mode: one line per SIGTERM, naming the session and the
//! sender) and client WebSockets: a drain keeps calls running, a handover keeps the avatar
//! servers across a restart.
#![cfg(feature = "sessiond")]

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, KEY, Node, client, json, send};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use session_lifecycle::{EndReason, SessionId};
use session_lifecycle_runtime::SessionStore;

/// A session the test created: its id, client token and avatar server pid.
struct Created {
    id: String,
    token: String,
    pid: u32,
}

async fn create(client: &reqwest::Client, node: &Node) -> Created {
    let (status, _, text) = send(client, Method::POST, &node.url("/v1/sessions")).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let v = json(&text);
    Created {
        id: v["session"]["session_id"].as_str().unwrap().to_owned(),
        token: v["client_token"].as_str().unwrap().to_owned(),
        pid: v["session"]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "avatar_process")
            .and_then(|r| r["handle"].as_u64())
            .unwrap() as u32,
    }
}

/// A client WebSocket that answers pings until the server closes it; the handle finishes
/// then.
async fn socket(node: &Node, s: &Created) -> tokio::task::JoinHandle<()> {
    let url = format!(
        "{}/v1/sessions/{}/ws?token={}",
        node.base.replace("http://", "ws://"),
        s.id,
        s.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket");
    // Reading answers the server's pings.
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

async fn wait_gone(pid: u32, limit: Duration) {
    let give_up = Instant::now() + limit;
    while alive(pid) {
        assert!(Instant::now() < give_up, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(client: &reqwest::Client, node: &Node, id: &str) -> serde_json::Value {
    let (status, _, text) = send(
        client,
        Method::GET,
        &node.url(&format!("/v1/sessions/{id}")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    json(&text)["session"].clone()
}

/// SIGTERM in drain mode (the default): not ready at once, creates refused, running
/// sessions continue and end and release as usual; at the drain timeout the rest end
/// `shutdown` and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_calls_running_until_they_end_or_the_timeout() {
    let cluster = Cluster::sqlite(&[
        "--shutdown-mode",
        "drain",
        "--drain-timeout-secs",
        "6",
        "--ws-ping-interval-ms",
        "500",
    ]);
    let mut node = cluster.start("drain-node");
    let client = client();
    let mut sessions = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let s = create(&client, &node).await;
        sockets.push(socket(&node, &s).await);
        sessions.push(s);
    }

    let signalled = Instant::now();
    node.terminate();
    loop {
        let (status, _, text) = send(&client, Method::GET, &node.url("/readyz")).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(json(&text)["status"], "draining");
            break;
        }
        assert!(signalled.elapsed() < Duration::from_secs(2), "still ready");
    }
    let not_ready_after = signalled.elapsed();
    assert!(
        not_ready_after < Duration::from_millis(100),
        "not ready {not_ready_after:?} after SIGTERM"
    );
    let (status, headers, text) = send(&client, Method::POST, &node.url("/v1/sessions")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(json(&text)["error"]["code"], "draining");
    assert!(headers.contains_key("retry-after"));

    // Running calls continue: sessions started, avatar servers up, sockets open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for s in &sessions {
        assert_eq!(status_of(&client, &node, &s.id).await["status"], "started");
        assert!(
            alive(s.pid),
            "{} avatar server stopped during the drain",
            s.id
        );
    }
    assert!(
        sockets.iter().all(|w| !w.is_finished()),
        "sockets stay open"
    );
    // Calls that end during the drain release as usual.
    for s in &sessions[..5] {
        let (status, _, text) = send(
            &client,
            Method::POST,
            &node.url(&format!("/v1/sessions/{}/end", s.id)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        wait_gone(s.pid, Duration::from_secs(5)).await;
    }

    let status = node.exited(Duration::from_secs(20)).await;
    assert!(status.success(), "exit 0 after the drain: {status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(6),
        "left before the drain timeout"
    );
    let store = session_lifecycle_sqlite::SqliteStore::open(cluster.db_url()).unwrap();
    for (i, s) in sessions.iter().enumerate() {
        let record = store
            .get(SessionId::parse(&s.id).unwrap())
            .await
            .unwrap()
            .unwrap();
        let want = if i < 5 {
            EndReason::Requested
        } else {
            EndReason::Shutdown
        };
        assert_eq!(record.session.end_reason(), Some(want), "{}", s.id);
        assert!(record.session.is_fully_released(), "{}", s.id);
        assert!(!alive(s.pid));
    }
    let ledger = cluster.ledger();
    for s in &sessions {
        assert_eq!(
            ledger.get(&s.id).map(Vec::len),
            Some(1),
            "{} stopped once",
            s.id
        );
    }
    for w in sockets {
        w.await.unwrap();
    }
    cluster.finish().await;
}

/// SIGTERM in handover mode: `sessiond` exits leaving the avatar servers running; started
/// again with the same node id, it takes them back (same pids, no session ended), clients
/// reconnect their sockets, and ending each session afterwards stops its own server once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_keeps_avatar_servers_across_a_restart() {
    let cluster = Cluster::sqlite(&[
        "--shutdown-mode",
        "handover",
        "--token-secret",
        "handover-test-secret",
        "--ws-grace-ms",
        "10000",
    ]);
    let mut old = cluster.start("handover-node");
    let client = client();
    let mut sessions = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let s = create(&client, &old).await;
        sockets.push(socket(&old, &s).await);
        sessions.push(s);
    }
    old.terminate();
    let status = old.exited(Duration::from_secs(20)).await;
    assert!(status.success(), "exit 0 on handover: {status:?}");
    for w in sockets {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("the server closed the socket")
            .unwrap();
    }
    for s in &sessions {
        assert!(
            alive(s.pid),
            "{}'s avatar server survived the handover",
            s.id
        );
    }

    let new = cluster.start("handover-node");
    let mut sockets = Vec::new();
    for s in &sessions {
        let v = status_of(&client, &new, &s.id).await;
        assert_eq!(v["status"], "started", "{v}");
        let handle = v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "avatar_process")
            .and_then(|r| r["handle"].as_u64())
            .unwrap();
        assert_eq!(handle as u32, s.pid, "the same avatar server");
        assert!(alive(s.pid));
        sockets.push(socket(&new, s).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        sockets.iter().all(|w| !w.is_finished()),
        "sockets reconnected"
    );
    assert!(cluster.ledger().is_empty(), "nothing was stopped");

    for s in &sessions {
        let (status, _, text) = send(
            &client,
            Method::POST,
            &new.url(&format!("/v1/sessions/{}/end", s.id)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(json(&text)["session"]["end_reason"], "requested");
    }
    for s in &sessions {
        wait_gone(s.pid, Duration::from_secs(10)).await;
    }
    let ledger = cluster.ledger();
    for s in &sessions {
        assert_eq!(
            ledger.get(&s.id),
            Some(&vec![new.pid]),
            "{} stopped once, by the restarted node",
            s.id
        );
    }
    for w in sockets {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("sockets close when their session ends")
            .unwrap();
    }
    drop(new);
    let _ = KEY;
    cluster.finish().await;
}

/// An avatar server not ready yet when its node hands over reports readiness to the next
/// run: the restarted node binds its notify socket again (the fixture's `READY=1` goes to
/// the path in its environment, made by the earlier run, and it fails if nobody listens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_adopted_before_it_was_ready_reports_readiness_to_the_next_run() {
    let cluster = Cluster::sqlite(&["--shutdown-mode", "handover"]);
    let avatar = format!("{} notify-after 4000", common::fixture().display());
    let flags = [
        "--avatar-command",
        avatar.as_str(),
        "--avatar-grace-secs",
        "5",
    ];
    let mut old = cluster.spawn("ready-node", cluster.db_url(), &flags);
    let client = client();
    let (status, _, text) = send(&client, Method::POST, &old.url("/v1/sessions")).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let created = json(&text);
    let id = created["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(created["session"]["ready_at"].is_null(), "{created}");
    old.terminate();
    let exit = old.exited(Duration::from_secs(20)).await;
    assert!(exit.success(), "exit 0 on handover: {exit:?}");

    let new = cluster.spawn("ready-node", cluster.db_url(), &flags);
    let limit = Instant::now() + Duration::from_secs(15);
    let session = loop {
        let v = status_of(&client, &new, &id).await;
        if !v["ready_at"].is_null() || v["status"] == "ended" || Instant::now() > limit {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(session["status"], "started", "{session}");
    assert!(
        !session["ready_at"].is_null(),
        "readiness reported after the handover: {session}"
    );
    let pid = session["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "avatar_process")
        .and_then(|r| r["handle"].as_u64())
        .unwrap() as u32;
    assert!(alive(pid), "the same avatar server runs");
    let (status, _, text) = send(
        &client,
        Method::POST,
        &new.url(&format!("/v1/sessions/{id}/end")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    wait_gone(pid, Duration::from_secs(10)).await;
    cluster.finish().await;
}
