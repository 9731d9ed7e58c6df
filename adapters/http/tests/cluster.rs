//! Several `sessiond` instances on one PostgreSQL database: ends from any instance, releases
//! on the owning node, and a node that dies and comes back. Needs `SESSION_LIFECYCLE_PG_URL`
//! (skipped without it, unless `SESSION_LIFECYCLE_REQUIRE_PG=1`).
#![cfg(feature = "sessiond")]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Cluster, client, create, get, send, wait_released};
use reqwest::{Method, StatusCode};

/// The tests here run one at a time: each starts several servers on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SESSIONS: usize = 1000;
const ENDS_PER_SESSION: usize = 16;
const WAVE: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_end_each_session_once_and_release_on_the_owning_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::new(&["--sweep-interval-secs", "1"]).await else {
        return;
    };
    let nodes: Vec<_> = (0..4)
        .map(|i| cluster.start(&format!("node-{i}")))
        .collect();
    let client = client();
    let mut owner_pid = std::collections::HashMap::new();
    let mut all = Vec::with_capacity(SESSIONS);
    let started = Instant::now();
    for wave in 0..SESSIONS / WAVE {
        // Sessions start on every instance in turn; each one's resources live there.
        let mut creates = Vec::new();
        for i in 0..WAVE {
            let node = &nodes[(wave * WAVE + i) % nodes.len()];
            let (client, url, pid) = (client.clone(), node.url(""), node.pid);
            creates.push(tokio::spawn(async move {
                let (status, _, text) =
                    send(&client, Method::POST, &format!("{url}/v1/sessions")).await;
                assert_eq!(status, StatusCode::CREATED, "{text}");
                let v = common::json(&text);
                (v["session"]["session_id"].as_str().unwrap().to_owned(), pid)
            }));
        }
        let mut ids = Vec::new();
        for c in creates {
            let (id, pid) = c.await.unwrap();
            owner_pid.insert(id.clone(), pid);
            ids.push(id);
        }
        // Each session ended by 16 concurrent requests spread over all instances.
        let mut ends = Vec::new();
        for id in &ids {
            for j in 0..ENDS_PER_SESSION {
                let url = nodes[j % nodes.len()].url(&format!("/v1/sessions/{id}/end"));
                let client = client.clone();
                let id = id.clone();
                ends.push(tokio::spawn(async move {
                    let (status, _, body) = send(&client, Method::POST, &url).await;
                    (id, status, body)
                }));
            }
        }
        let mut bodies: std::collections::HashMap<String, String> = Default::default();
        for e in ends {
            let (id, status, body) = e.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{id}: {body}");
            let first = bodies.entry(id.clone()).or_insert_with(|| body.clone());
            assert_eq!(*first, body, "{id}: every end answers the same body");
        }
        for (id, body) in &bodies {
            let v = common::json(body);
            assert_eq!(v["session"]["status"], "ended", "{id}");
            assert_eq!(v["session"]["end_reason"], "requested", "{id}");
        }
        all.extend(ids);
    }
    let ended_in = started.elapsed();

    let sessions = wait_released(&client, &nodes[1], &all, Duration::from_secs(120)).await;
    for s in &sessions {
        assert_eq!(s["resources"][0]["note"], "sigterm", "{s}");
    }
    // The ledger, written by the avatar servers themselves: one SIGTERM per session, sent
    // by the sessiond that started it.
    let ledger = cluster.ledger();
    assert_eq!(ledger.len(), SESSIONS, "every avatar server was stopped");
    for id in &all {
        let senders = &ledger[id];
        assert_eq!(senders.len(), 1, "{id} stopped {} times", senders.len());
        assert_eq!(
            senders[0], owner_pid[id],
            "{id} was stopped by its owning node"
        );
    }
    eprintln!(
        "{SESSIONS} sessions x {ENDS_PER_SESSION} ends over 4 instances: created and ended in {ended_in:?}"
    );
    drop(nodes);
    cluster.finish().await;
}

/// Whether `pid` runs (a zombie, exited and waiting for a reaper, does not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_taken_over_and_settles_what_it_owes_when_it_returns() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // A short node timeout and sweep keep the test short; with the defaults (30 s, 15 s) the
    // takeover comes within 45 s, inside the contract's 3 minutes. The orphan timeout is long,
    // so only the takeover can end these sessions here.
    let flags = [
        "--sweep-interval-secs",
        "1",
        "--node-heartbeat-ms",
        "200",
        "--node-timeout-secs",
        "2",
        "--orphan-timeout-secs",
        "600",
    ];
    let Some(cluster) = Cluster::new(&flags).await else {
        return;
    };
    let doomed = cluster.start("node-doomed");
    let survivor = cluster.start("node-survivor");
    let client = client();
    let mut lost = Vec::new();
    for _ in 0..20 {
        lost.push(create(&client, &doomed).await);
    }
    let mut kept = Vec::new();
    for _ in 0..5 {
        kept.push(create(&client, &survivor).await);
    }
    let avatar_pids: Vec<u64> = {
        let mut pids = Vec::new();
        for id in &lost {
            let s = get(&client, &survivor, id).await;
            pids.push(s["resources"][0]["handle"].as_u64().unwrap());
        }
        pids
    };

    let killed_at = Instant::now();
    doomed.kill_9();
    let bound = Duration::from_secs(180);
    let mut pending: HashSet<&String> = lost.iter().collect();
    while !pending.is_empty() {
        assert!(
            killed_at.elapsed() < bound,
            "not taken over within the contract's bound"
        );
        let mut still = HashSet::new();
        for id in pending {
            if get(&client, &survivor, id).await["status"] != "ended" {
                still.insert(id);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken_over_in = killed_at.elapsed();
    for id in &lost {
        let s = get(&client, &survivor, id).await;
        assert_eq!(s["end_reason"], "node_lost", "{s}");
        let r = &s["resources"][0];
        assert_eq!(r["release"], "pending", "{s}");
        assert!(
            r["note"]
                .as_str()
                .is_some_and(|n| n.contains("lost with node node-doomed")),
            "recorded as lost with its node: {s}"
        );
    }
    for id in &kept {
        assert_eq!(
            get(&client, &survivor, id).await["status"],
            "started",
            "a live node's sessions are untouched"
        );
    }
    assert!(
        cluster.ledger().is_empty(),
        "nobody else can stop the dead node's avatar servers"
    );
    for pid in &avatar_pids {
        assert!(running(*pid), "avatar server {pid} outlived its node");
    }

    // The node comes back with its id and settles what it owes before it serves.
    let back = cluster.start("node-doomed");
    let ledger = cluster.ledger();
    for id in &lost {
        assert_eq!(
            ledger.get(id).map(Vec::as_slice),
            Some(&[back.pid][..]),
            "{id}: stopped once, by the returned node, before it served"
        );
    }
    let sessions = wait_released(&client, &back, &lost, Duration::from_secs(30)).await;
    for s in &sessions {
        let note = s["resources"][0]["note"].as_str().unwrap_or_default();
        assert!(
            note.contains("lost with node") && note.ends_with("sigterm"),
            "{s}"
        );
    }
    for pid in &avatar_pids {
        assert!(!running(*pid), "avatar server {pid} stopped");
    }
    // Nothing doubled: the survivor's sessions end and release once each, on the survivor.
    for id in &kept {
        let (status, _, body) = send(
            &client,
            Method::POST,
            &back.url(&format!("/v1/sessions/{id}/end")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    wait_released(&client, &back, &kept, Duration::from_secs(30)).await;
    let ledger = cluster.ledger();
    assert_eq!(ledger.len(), lost.len() + kept.len());
    for id in &kept {
        assert_eq!(ledger[id], [survivor.pid]);
    }
    eprintln!("dead node taken over in {taken_over_in:?} (node timeout 2 s, sweep 1 s)");
    drop((back, survivor));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_sent_to_another_instance_keeps_a_session_alive() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(cluster) =
        Cluster::new(&["--sweep-interval-secs", "1", "--orphan-timeout-secs", "3"]).await
    else {
        return;
    };
    let (owner, other) = (cluster.start("node-owner"), cluster.start("node-other"));
    let client = client();
    let id = create(&client, &owner).await;
    // Heartbeats reach only the other instance; the owner's orphan timer must not end the
    // session on its own stale view.
    let heartbeat = other.url(&format!("/v1/sessions/{id}/heartbeat"));
    for _ in 0..8 {
        let (status, _, body) = send(&client, Method::POST, &heartbeat).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(get(&client, &owner, &id).await["status"], "started");
    // Without liveness it ends as an orphan within the timeout plus a sweep.
    let quiet = Instant::now();
    while get(&client, &owner, &id).await["status"] != "ended" {
        assert!(quiet.elapsed() < Duration::from_secs(30), "never orphaned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&client, &other, &id).await["end_reason"], "orphaned");
    let released = wait_released(
        &client,
        &other,
        std::slice::from_ref(&id),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(released[0]["resources"][0]["note"], "sigterm");
    assert_eq!(cluster.ledger()[&id], [owner.pid], "released on its node");
    drop((owner, other));
    cluster.finish().await;
}
