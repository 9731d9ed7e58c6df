//! Fleet placement: three `sessiond` on one PostgreSQL database with different session
//! slots (`--max-node-sessions`), real avatar servers, every create sent to one instance.
//! Needs `SESSION_LIFECYCLE_PG_URL` (skipped without it, unless
//! `SESSION_LIFECYCLE_REQUIRE_PG=1`). `cargo test --workspace placement` runs them.
#![cfg(feature = "sessiond")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Cluster, Node, api, client, json, send};
use reqwest::{Method, StatusCode};

/// The tests here run one at a time: each starts several servers on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fast heartbeats, so that reports and deaths are seen within a test's patience.
const FLAGS: &[&str] = &["--node-heartbeat-ms", "200", "--node-timeout-secs", "4"];

fn start(cluster: &Cluster, id: &str, slots: u32) -> Node {
    cluster.start_with(id, &["--max-node-sessions", &slots.to_string()])
}

/// Waits until `via` sees every node of `slots` alive with its slots reported.
async fn wait_for_reports(via: &Node, slots: &[(&str, u64)]) {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = api(&client(), via)
            .overview()
            .await
            .unwrap()
            .nodes
            .expect("the operator sees nodes");
        let reported = slots.iter().all(|(id, n)| {
            nodes
                .iter()
                .any(|v| v.node == *id && v.alive && v.slots == Some(*n) && !v.draining)
        });
        if reported {
            return;
        }
        assert!(Instant::now() < give_up, "nodes never reported: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A create on `node`: its status, `Retry-After`, and body.
async fn create_on(node: &Node) -> (StatusCode, Option<String>, serde_json::Value) {
    let (status, headers, text) = send(&client(), Method::POST, &node.url("/v1/sessions")).await;
    let retry = headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, json(&text))
}

/// The node each started session is recorded on, as the operator's overview shows it.
async fn recorded_nodes(via: &Node) -> HashMap<String, String> {
    let overview = api(&client(), via).overview().await.unwrap();
    assert!(!overview.sessions_truncated);
    overview
        .sessions
        .into_iter()
        .map(|p| (p.session.session_id, p.node))
        .collect()
}

/// The parent process of the avatar server of session `id` (found by the session id in
/// its environment), if one runs.
fn avatar_parent(id: &str) -> Option<u32> {
    let needle = format!("SESSION_LIFECYCLE_SESSION_ID={id}");
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(environ) = std::fs::read(path.join("environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        return fields.get(1)?.parse().ok();
    }
    None
}

async fn end_on(node: &Node, id: &str) {
    let (status, _, text) = send(
        &client(),
        Method::POST,
        &node.url(&format!("/v1/sessions/{id}/end")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

/// All 10 creates go to the node with 2 slots: every one succeeds, no node holds more than
/// its slots, each avatar server runs under the sessiond of the node its record names, the
/// 11th answers 503 `capacity_exhausted` with `Retry-After`, and after 3 ends 3 more
/// creates succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_fills_the_fleet_from_one_instance_and_refuses_only_when_all_are_full() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let nodes = [
        start(&cluster, "a", 2),
        start(&cluster, "b", 3),
        start(&cluster, "c", 5),
    ];
    let pid: HashMap<String, u32> = nodes.iter().map(|n| (n.id.clone(), n.pid)).collect();
    let slots: HashMap<&str, usize> = [("a", 2), ("b", 3), ("c", 5)].into();
    let a = &nodes[0];
    wait_for_reports(a, &[("a", 2), ("b", 3), ("c", 5)]).await;

    // Ten at once, racing for the slots.
    let mut creates = Vec::new();
    for _ in 0..10 {
        let url = a.url("/v1/sessions");
        creates.push(tokio::spawn(async move {
            let (status, _, text) = send(&client(), Method::POST, &url).await;
            assert_eq!(status, StatusCode::CREATED, "{text}");
            let v = json(&text);
            assert_eq!(v["session"]["status"], "started", "{v}");
            v["session"]["session_id"].as_str().unwrap().to_owned()
        }));
    }
    let mut ids = Vec::new();
    for c in creates {
        ids.push(c.await.unwrap());
    }
    let mut placed = recorded_nodes(a).await;
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        let node = placed
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not started"));
        *per_node.entry(node.as_str()).or_default() += 1;
        assert_eq!(
            avatar_parent(id),
            Some(pid[node]),
            "{id}: its avatar server runs under the sessiond of {node}"
        );
    }
    for (node, count) in &per_node {
        assert!(count <= &slots[node], "{node} holds {count}: {per_node:?}");
    }
    assert_eq!(per_node.values().sum::<usize>(), 10);

    let (status, retry, body) = create_on(a).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "capacity_exhausted", "{body}");
    assert!(retry.is_some(), "a full fleet says when to retry");

    // Three ends free three slots, wherever they were.
    for id in &ids[..3] {
        end_on(&nodes[1], id).await;
    }
    for _ in 0..3 {
        let (status, _, body) = create_on(a).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.push(body["session"]["session_id"].as_str().unwrap().to_owned());
    }
    let (status, _, body) = create_on(a).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    placed.extend(recorded_nodes(a).await);
    for id in &ids[3..] {
        let node = &placed[id];
        assert_eq!(avatar_parent(id), Some(pid[node]), "{id} on {node}");
    }

    // Every avatar server is stopped once, by the node that runs it.
    for id in &ids[3..] {
        end_on(a, id).await;
    }
    common::wait_released(&client(), a, &ids, Duration::from_secs(60)).await;
    let ledger = cluster.ledger();
    for id in &ids {
        let node = &placed[id];
        let senders = &ledger[id];
        assert_eq!(senders.len(), 1, "{id}: {senders:?}");
        assert_eq!(senders[0], pid[node], "{id} was stopped by {node}");
    }
    drop(nodes);
    cluster.finish().await;
}

/// A node chosen for a session is killed (-9) after the assignment and before it starts
/// the session: it was stopped (SIGSTOP) with its heartbeat still fresh, so spread chose
/// it, and the kill comes once the record names it. The create places the session again
/// on a live node within the node timeout and answers 201 there; the dead node never ran
/// an avatar server for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_moves_a_session_off_a_node_killed_between_assignment_and_start() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    // The receiving node has no slot of its own: every session goes elsewhere.
    let a = start(&cluster, "a", 0);
    let b = start(&cluster, "b", 5);
    let dying = start(&cluster, "dying", 50);
    wait_for_reports(&a, &[("a", 0), ("b", 5), ("dying", 50)]).await;
    // A first session goes to b (a tie, broken by id): b is then less free than `dying`.
    let (status, _, body) = create_on(&a).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = body["session"]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(recorded_nodes(&a).await[&first], "b");
    // Stopped, `dying` claims nothing, while its last heartbeat keeps it alive for the
    // node timeout: spread takes it, the freest node.
    signal(dying.pid, "-STOP");
    let started = Instant::now();
    let create = tokio::spawn({
        let a_url = a.url("/v1/sessions");
        async move { send(&client(), Method::POST, &a_url).await }
    });
    let give_up = Instant::now() + Duration::from_secs(3);
    while !recorded_nodes(&a).await.values().any(|n| n == "dying") {
        assert!(
            Instant::now() < give_up,
            "the session was never assigned to `dying`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dying.kill_9();
    let (status, _, text) = create.await.unwrap();
    let took = started.elapsed();
    let body = json(&text);
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["session"]["session_id"].as_str().unwrap().to_owned();
    let placed = recorded_nodes(&a).await;
    assert_eq!(placed[&id], "b", "placed again on the live node");
    assert_eq!(avatar_parent(&id), Some(b.pid));
    assert!(
        took < Duration::from_secs(4),
        "within the node timeout: {took:?}"
    );
    eprintln!("a create whose node was killed after the assignment answered 201 in {took:?}");
    for id in [&first, &id] {
        end_on(&a, id).await;
    }
    common::wait_released(&client(), &a, &[first, id], Duration::from_secs(30)).await;
    drop((a, b));
    cluster.finish().await;
}

/// Sends `sig` (as `kill` spells it) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// A chosen node that cannot start the session (its avatar command cannot be spawned)
/// reports back, and the create is placed again on another node, once: it answers 201
/// there. When no other node has room, the create fails clearly (503
/// `capacity_exhausted`, naming the spawn failure) and leaves no started session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_retries_a_start_that_failed_on_its_node_once_then_fails_clearly() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let a = start(&cluster, "a", 0);
    let good = start(&cluster, "good", 1);
    // Chosen first: as free as `good`, and first by id.
    let bad = cluster.spawn(
        "bad",
        cluster.db_url(),
        &[
            "--avatar-command",
            "/nonexistent/avatar-server",
            "--max-node-sessions",
            "50",
        ],
    );
    wait_for_reports(&a, &[("a", 0), ("good", 1), ("bad", 50)]).await;
    let (status, _, body) = create_on(&a).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["session"]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(recorded_nodes(&a).await[&id], "good");
    assert_eq!(avatar_parent(&id), Some(good.pid));
    // `good` is full now: the only node with room cannot start it.
    let (status, retry, body) = create_on(&a).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "capacity_exhausted", "{body}");
    assert!(retry.is_some(), "Retry-After");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("avatar"), "names the failure: {message}");
    let started = recorded_nodes(&a).await;
    assert_eq!(started.len(), 1, "only the first session runs: {started:?}");
    // Both creates were tried on `bad` first, and it said why it gave them back.
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(cluster.log_path("bad")).unwrap_or_default();
        let refusals = log.matches("refusing a session placed here").count();
        if refusals >= 2 && log.contains(&id) {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "bad refused {refusals} starts:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    end_on(&a, &id).await;
    common::wait_released(&client(), &a, &[id], Duration::from_secs(30)).await;
    drop((a, good, bad));
    cluster.finish().await;
}

/// A node that drains (SIGTERM, `--shutdown-mode drain`) takes no new sessions: the
/// creates sent to it go to the others, and none fails while they have room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_sends_no_create_to_a_draining_node_and_fails_none() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let a = start(&cluster, "a", 4);
    let b = start(&cluster, "b", 4);
    let draining = cluster.start_with(
        "draining",
        &["--max-node-sessions", "4", "--shutdown-mode", "drain"],
    );
    wait_for_reports(&a, &[("a", 4), ("b", 4), ("draining", 4)]).await;
    // One session keeps the draining node running (a drain waits for its sessions).
    let (status, _, body) = create_on(&draining).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let kept = body["session"]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(recorded_nodes(&a).await[&kept], "draining");
    draining.terminate();
    // Creates to every instance, the draining one included, right after the signal.
    let mut ids = Vec::new();
    for i in 0..8 {
        let via = [&draining, &a, &b][i % 3];
        let (status, _, body) = create_on(via).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "create {i} via {}: {body}",
            via.id
        );
        ids.push(body["session"]["session_id"].as_str().unwrap().to_owned());
    }
    let placed = recorded_nodes(&a).await;
    for id in &ids {
        assert_ne!(placed[id], "draining", "{id} went to the draining node");
    }
    // The others are full now (4 + 4): the fleet says so.
    let (status, _, body) = create_on(&draining).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "capacity_exhausted", "{body}");
    for id in ids.iter().chain([&kept]) {
        end_on(&a, id).await;
    }
    drop((a, b, draining));
    cluster.finish().await;
}

/// On one machine (SQLite) the slots bound the node itself: of creates racing for 2
/// slots, 2 succeed and the others answer 503 `capacity_exhausted` with `Retry-After`;
/// an end frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_on_sqlite_bounds_the_node_by_its_slots() {
    let cluster = Cluster::sqlite(&[]);
    let node = start(&cluster, "solo", 2);
    let mut creates = Vec::new();
    for _ in 0..6 {
        let url = node.url("/v1/sessions");
        creates.push(tokio::spawn(async move {
            let (status, headers, text) = send(&client(), Method::POST, &url).await;
            (status, headers.contains_key("retry-after"), json(&text))
        }));
    }
    let mut ids = Vec::new();
    for c in creates {
        let (status, retry, body) = c.await.unwrap();
        if status == StatusCode::CREATED {
            ids.push(body["session"]["session_id"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert_eq!(body["error"]["code"], "capacity_exhausted", "{body}");
            assert!(retry);
        }
    }
    assert_eq!(ids.len(), 2, "two slots, two sessions");
    end_on(&node, &ids[0]).await;
    let (status, _, body) = create_on(&node).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    drop(node);
    cluster.finish().await;
}

/// A create with an `Idempotency-Key` placed on another node, retried on another
/// instance, is one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_keeps_an_idempotent_create_one_session_across_instances() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(FLAGS).await else {
        return;
    };
    let a = start(&cluster, "a", 0);
    let b = start(&cluster, "b", 3);
    wait_for_reports(&a, &[("a", 0), ("b", 3)]).await;
    let request = Default::default();
    let first = api(&client(), &a)
        .create_session_idempotent(&request, "placed-once")
        .await
        .unwrap();
    let again = api(&client(), &b)
        .create_session_idempotent(&request, "placed-once")
        .await
        .unwrap();
    assert_eq!(first.session.session_id, again.session.session_id);
    let placed = recorded_nodes(&a).await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert_eq!(placed[&first.session.session_id], "b");
    end_on(&a, &first.session.session_id).await;
    drop((a, b));
    cluster.finish().await;
}
