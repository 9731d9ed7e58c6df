//! Sessions end only for a reason, tried with real `sessiond` processes on one PostgreSQL
//! database, real avatar servers and client WebSockets answering pings:
//!
//! - the database stops for longer than the node and orphan timeouts and starts again:
//!   no session ends; then a node killed with SIGKILL has its sessions taken over
//!   (`node_lost`) while the other node's stay;
//! - one node reaches the database through a proxy the test cuts: it takes no creates, the
//!   other node takes its sessions over (`node_lost`), and when the cut node reconnects it
//!   stops their avatar servers, the record keeping both times.
//!
//! It stops the server the tests share, so it is a test binary of its own, and its tests
//! take turns. The stop and start commands are `SESSION_LIFECYCLE_PG_STOP` and
//! `SESSION_LIFECYCLE_PG_START`, or `pg_ctlcluster` for the local cluster.
#![cfg(feature = "sessiond")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, Node, client, json, pg_control, send, shell};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use session_lifecycle_postgres::testing::pg_required;

/// The tests of this binary take turns: one stops the shared server.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Created {
    id: String,
    token: String,
}

async fn create(client: &reqwest::Client, node: &Node) -> Created {
    let (status, _, text) = send(client, Method::POST, &node.url("/v1/sessions")).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let v = json(&text);
    Created {
        id: v["session"]["session_id"].as_str().unwrap().to_owned(),
        token: v["client_token"].as_str().unwrap().to_owned(),
    }
}

/// A client WebSocket on `node` that answers pings until the server closes it.
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
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

/// The session as `node` reports it, retrying while the store is unavailable.
async fn session(client: &reqwest::Client, node: &Node, id: &str) -> serde_json::Value {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, text) = send(
            client,
            Method::GET,
            &node.url(&format!("/v1/sessions/{id}")),
        )
        .await;
        if status == StatusCode::OK {
            return json(&text)["session"].clone();
        }
        assert!(Instant::now() < give_up, "{id}: {status} {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `node` answers creates again (the database is back).
async fn wait_serving(client: &reqwest::Client, node: &Node) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, _) = send(client, Method::GET, &node.url("/v1/sessions?limit=1")).await;
        if status == StatusCode::OK {
            return;
        }
        assert!(Instant::now() < give_up, "{} never came back", node.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FLAGS: &[&str] = &[
    "--node-heartbeat-ms",
    "1000",
    "--node-timeout-secs",
    "5",
    "--orphan-timeout-secs",
    "10",
    "--sweep-interval-secs",
    "1",
    "--ws-ping-interval-ms",
    "500",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_ends_nothing_and_a_dead_node_is_still_taken_over() {
    let _turn = TURN.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let (Some(stop), Some(start)) = (
        pg_control(cluster.db_url(), "stop"),
        pg_control(cluster.db_url(), "start"),
    ) else {
        assert!(
            !pg_required(),
            "SESSION_LIFECYCLE_REQUIRE_PG=1 but no way to stop PostgreSQL: set SESSION_LIFECYCLE_PG_STOP and _START"
        );
        eprintln!("skipped: no way to stop and start PostgreSQL");
        cluster.finish().await;
        return;
    };
    let a = cluster.start("outage-a");
    let b = cluster.start("outage-b");
    let client = client();
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let s = create(&client, &a).await;
        sockets.push(socket(&a, &s).await);
        on_a.push(s);
        let s = create(&client, &b).await;
        sockets.push(socket(&b, &s).await);
        on_b.push(s);
    }

    // Longer than both the node timeout (5 s) and the orphan timeout (10 s).
    let stopped = Instant::now();
    shell(&stop);
    tokio::time::sleep(Duration::from_secs(20)).await;
    shell(&start);
    eprintln!("database down for {:?}", stopped.elapsed());
    wait_serving(&client, &a).await;
    wait_serving(&client, &b).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    for s in on_a.iter().chain(&on_b) {
        let v = session(&client, &b, &s.id).await;
        assert_eq!(v["status"], "started", "ended by the outage: {v}");
    }
    assert!(
        sockets.iter().all(|w| !w.is_finished()),
        "sockets stayed up"
    );

    // Now a node really dies: its sessions are taken over within the bound, the other's
    // stay.
    let killed = Instant::now();
    a.kill_9();
    for s in &on_a {
        loop {
            let v = session(&client, &b, &s.id).await;
            if v["status"] == "ended" {
                assert_eq!(v["end_reason"], "node_lost", "{v}");
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "{} not taken over",
                s.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("taken over {:?} after the kill", killed.elapsed());
    for s in &on_b {
        assert_eq!(session(&client, &b, &s.id).await["status"], "started");
    }
    // The dead node returns and stops what it still runs.
    let a = cluster.start("outage-a");
    for s in &on_a {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let v = session(&client, &a, &s.id).await;
            let released = v["resources"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["release"] == "released"));
            if released {
                break;
            }
            assert!(Instant::now() < give_up, "{} not released: {v}", s.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop((a, b));
    cluster.finish().await;
}

/// A TCP proxy on loopback to the database that the test can cut: existing connections
/// drop and new ones are refused until it is restored.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn to(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, list) = (Arc::clone(&cut), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let upstream = upstream.clone();
                list.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_stops_taking_creates_and_stops_what_was_taken_over() {
    let _turn = TURN.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let direct: tokio_postgres::Config = cluster.db_url().parse().unwrap();
    let port = direct.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::to(format!("127.0.0.1:{port}")).await;
    let via_proxy =
        cluster
            .db_url()
            .replacen(&format!(":{port}/"), &format!(":{}/", proxy.port), 1);
    assert_ne!(via_proxy, cluster.db_url(), "the URL names its port");
    let cut_node = cluster.start_on("partitioned", &via_proxy);
    let other = cluster.start("other");
    let client = client();
    let mut sessions = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let s = create(&client, &cut_node).await;
        sockets.push(socket(&cut_node, &s).await);
        sessions.push(s);
    }

    proxy.cut();
    let cut_at = Instant::now();
    // The cut node takes no creates.
    let (status, _, text) = send(&client, Method::POST, &cut_node.url("/v1/sessions")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    // The other node takes its sessions over.
    for s in &sessions {
        loop {
            let v = session(&client, &other, &s.id).await;
            if v["status"] == "ended" {
                assert_eq!(v["end_reason"], "node_lost", "{v}");
                break;
            }
            assert!(
                cut_at.elapsed() < Duration::from_secs(30),
                "{} not taken over",
                s.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let taken_over = cut_at.elapsed();
    eprintln!("taken over {taken_over:?} after the cut");
    // Still cut: the avatar servers run (nobody else can stop them).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cluster.ledger().is_empty(), "stopped while unreachable");

    proxy.restore();
    let restored = Instant::now();
    for s in &sessions {
        loop {
            let v = session(&client, &other, &s.id).await;
            let resources = v["resources"].as_array().unwrap().clone();
            if resources.iter().all(|r| r["release"] == "released") {
                let ended_at = v["ended_at"].as_str().unwrap().to_owned();
                for r in &resources {
                    let released_at = r["released_at"].as_str().unwrap();
                    assert!(released_at >= ended_at.as_str(), "{v}");
                    let note = r["note"].as_str().unwrap();
                    assert!(
                        note.starts_with(
                            "lost with node partitioned; released when the node returned: "
                        ),
                        "{note}"
                    );
                }
                break;
            }
            assert!(
                restored.elapsed() < Duration::from_secs(30),
                "{} not released after the reconnect: {v}",
                s.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("released {:?} after the reconnect", restored.elapsed());
    let ledger = cluster.ledger();
    for s in &sessions {
        assert_eq!(
            ledger.get(&s.id),
            Some(&vec![cut_node.pid]),
            "{} stopped once, by its own node",
            s.id
        );
    }
    drop((cut_node, other));
    cluster.finish().await;
}
