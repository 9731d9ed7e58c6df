//! Fleet placement over HTTP, with real `sessiond` processes on one PostgreSQL database:
//!
//! 1. create latency (p50/p99) of a session placed on the receiving node, and of one
//!    placed on another node (the receiving node has no slot of its own, so every create
//!    it receives goes to the other), both landing on the same node with a real avatar
//!    server (`avatar-fixture behave`);
//! 2. creates per second across three instances (no avatar servers) from 32 concurrent
//!    clients: sent round-robin to nodes without slots (each session stays where it was
//!    received), and all sent to one instance of nodes with 1,000 slots each (two in
//!    three are placed on another node).
//!
//! `cargo build --release -p session-lifecycle-http --bin sessiond -p session-lifecycle-process --bin avatar-fixture`
//! then `SESSION_LIFECYCLE_PG_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p
//! session-lifecycle-benches --bench placement`. Without the URL it says so and exits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use session_lifecycle_client::{Client, CreateRequest};
use session_lifecycle_postgres::testing::{TestDb, pg_url};

const KEY: &str = "bench-placement-key";
const LATENCY_CREATES: usize = 200;
const THROUGHPUT_CREATES: usize = 3000;
const CLIENTS: usize = 32;

/// One `sessiond`, stopped when dropped.
struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = dir.join("release").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (see this file's docs)",
        path.display()
    );
    path
}

fn start(db: &str, id: &str, extra: &[&str]) -> Node {
    let mut child = Command::new(binary("sessiond"))
        .args(["--listen", "127.0.0.1:0", "--database", db, "--node-id", id])
        .args(["--api-key", KEY, "--max-concurrent-sessions", "100000000"])
        .args(["--shutdown-mode", "end", "--node-heartbeat-ms", "500"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sessiond");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines
        .next()
        .expect("sessiond printed nothing")
        .expect("utf-8");
    let base = first
        .strip_prefix("sessiond listening on ")
        .and_then(|r| r.split_whitespace().next())
        .expect("the listening line")
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    Node { child, base }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Create-then-end pairs sent to `via`, one at a time: the creates' latencies, sorted.
async fn create_latencies(via: &Client) -> Vec<Duration> {
    let mut out = Vec::with_capacity(LATENCY_CREATES);
    for _ in 0..LATENCY_CREATES {
        let started = Instant::now();
        let created = via
            .create_session(&CreateRequest::default())
            .await
            .expect("create");
        out.push(started.elapsed());
        via.end_session(&created.session.session_id)
            .await
            .expect("end");
    }
    out.sort();
    out
}

async fn wait_alive(via: &Client, nodes: usize) {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let alive = via
            .overview()
            .await
            .ok()
            .and_then(|o| o.nodes)
            .map_or(0, |n| n.iter().filter(|n| n.alive).count());
        if alive >= nodes {
            return;
        }
        assert!(Instant::now() < give_up, "the nodes never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(url) = pg_url() else {
        eprintln!("placement bench skipped: set SESSION_LIFECYCLE_PG_URL");
        return;
    };
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and friends: nothing to list.
        return;
    }
    let avatar = format!("{} behave", binary("avatar-fixture").display());
    let avatar_flags = ["--avatar-command", avatar.as_str(), "--gpu", "off"];

    // 1. Latency: `receiver` has no slot, `runner` runs every session.
    let db = TestDb::create(&url).await;
    let runner = start(&db.url, "runner", &avatar_flags);
    let receiver_flags = [&avatar_flags[..], &["--max-node-sessions", "0"]].concat();
    let receiver = start(&db.url, "receiver", &receiver_flags);
    let to_runner = Client::new(&runner.base, KEY).expect("client");
    let to_receiver = Client::new(&receiver.base, KEY).expect("client");
    wait_alive(&to_runner, 2).await;
    // Warm both paths (connections, prepared statements).
    for via in [&to_runner, &to_receiver] {
        let created = via
            .create_session(&CreateRequest::default())
            .await
            .expect("warm");
        via.end_session(&created.session.session_id)
            .await
            .expect("end");
    }
    let here = create_latencies(&to_runner).await;
    let elsewhere = create_latencies(&to_receiver).await;
    println!(
        "create latency over HTTP, {LATENCY_CREATES} creates each, one at a time, with an avatar server:"
    );
    for (name, runs) in [
        ("placed on the receiving node", &here),
        ("placed on another node", &elsewhere),
    ] {
        println!(
            "  {name:<30} p50 {:>8.2?}  p99 {:>8.2?}",
            percentile(runs, 0.5),
            percentile(runs, 0.99)
        );
    }
    drop((runner, receiver));
    db.drop_db().await;

    // 2. Throughput across three instances: round-robin with no slots (each session stays
    // where it was received), then every create sent to one instance with slots for all
    // (two in three are placed on another node).
    let spread = creates_per_second(&url, None, false).await;
    println!(
        "creates per second across 3 instances ({THROUGHPUT_CREATES} creates, {CLIENTS} clients, no avatar servers):"
    );
    println!("  sent round-robin, each kept where received   {spread:>6.0}");
    let slots = u32::try_from(THROUGHPUT_CREATES / 3).expect("slots");
    let one = creates_per_second(&url, Some(slots), true).await;
    println!("  all sent to one, {slots} slots per node        {one:>6.0}");
}

/// Creates per second of `THROUGHPUT_CREATES` creates from `CLIENTS` concurrent clients
/// over three instances (`slots` each, unlimited without), sent round-robin or all to the
/// first.
async fn creates_per_second(url: &str, slots: Option<u32>, all_to_first: bool) -> f64 {
    let db = TestDb::create(url).await;
    let slot_flag = slots.map(|n| n.to_string());
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut flags = vec!["--gpu", "off"];
            if let Some(n) = &slot_flag {
                flags.extend(["--max-node-sessions", n.as_str()]);
            }
            start(&db.url, &format!("node-{i}"), &flags)
        })
        .collect();
    let clients: Vec<Client> = nodes
        .iter()
        .map(|n| Client::new(&n.base, KEY).expect("client"))
        .collect();
    wait_alive(&clients[0], 3).await;
    let clients = Arc::new(clients);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        let (clients, next) = (Arc::clone(&clients), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= THROUGHPUT_CREATES {
                    return;
                }
                let to = if all_to_first { 0 } else { i % clients.len() };
                clients[to]
                    .create_session(&CreateRequest::default())
                    .await
                    .expect("create");
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let took = started.elapsed();
    drop(nodes);
    db.drop_db().await;
    THROUGHPUT_CREATES as f64 / took.as_secs_f64()
}
