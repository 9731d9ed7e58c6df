//! The PostgreSQL server restarts under load: requests meanwhile answer 503
//! `storage_unavailable` with `Retry-After`, no acknowledged end is lost, nothing is released
//! twice, and the instances recover without a restart of their own.
//!
//! It restarts the server the tests share, so it is a test binary of its own (cargo runs
//! test binaries one at a time). The restart command is `SESSION_LIFECYCLE_PG_RESTART` (a
//! shell command line) or, without it, `pg_ctlcluster` for the local cluster on the URL's
//! port. Skipped when neither works, unless `SESSION_LIFECYCLE_REQUIRE_PG=1`.
#![cfg(feature = "sessiond")]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, client, json, pg_control, send, wait_released};
use reqwest::{Method, StatusCode};
use session_lifecycle_postgres::testing::pg_required;
use tokio::sync::Mutex;

#[derive(Default)]
struct Outcomes {
    /// Sessions whose create was acknowledged (201), with the pid of the node that ran it.
    created: HashMap<String, u32>,
    /// Acknowledged ends: the body each answered.
    ended: HashMap<String, String>,
    /// 503 answers seen.
    unavailable: u32,
    /// Sessions created and ended after the restart finished.
    after_restart: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_under_load_loses_no_acknowledged_end() {
    let Some(cluster) = Cluster::new(&["--sweep-interval-secs", "1"]).await else {
        return;
    };
    let Some(restart) = pg_control(cluster.db_url(), "restart") else {
        assert!(
            !pg_required(),
            "SESSION_LIFECYCLE_REQUIRE_PG=1 but no way to restart PostgreSQL: set SESSION_LIFECYCLE_PG_RESTART"
        );
        eprintln!("skipped: no way to restart PostgreSQL (set SESSION_LIFECYCLE_PG_RESTART)");
        cluster.finish().await;
        return;
    };
    let nodes = Arc::new([cluster.start("node-0"), cluster.start("node-1")]);
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let client = client();

    let mut workers = Vec::new();
    for w in 0..8usize {
        let (nodes, outcomes, stop, restarted, client) = (
            Arc::clone(&nodes),
            Arc::clone(&outcomes),
            Arc::clone(&stop),
            Arc::clone(&restarted),
            client.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut to_end: Vec<String> = Vec::new();
            while !stop.load(Ordering::SeqCst) || !to_end.is_empty() {
                let after = restarted.load(Ordering::SeqCst);
                if !stop.load(Ordering::SeqCst) {
                    let node = &nodes[w % 2];
                    let (status, headers, body) =
                        send(&client, Method::POST, &node.url("/v1/sessions")).await;
                    match status {
                        StatusCode::CREATED => {
                            let id = json(&body)["session"]["session_id"]
                                .as_str()
                                .unwrap()
                                .to_owned();
                            outcomes.lock().await.created.insert(id.clone(), node.pid);
                            to_end.push(id);
                        }
                        _ => check_unavailable(status, &headers, &body, &outcomes).await,
                    }
                }
                // Ended through the other instance, a moment after its creation: the
                // avatar-fixture writes the ledger from its SIGTERM handler, which it
                // installs a moment after it starts; a stop before that stops it all the
                // same, but leaves no line to count.
                if let Some(id) = to_end.pop() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let url = nodes[(w + 1) % 2].url(&format!("/v1/sessions/{id}/end"));
                    let (status, headers, body) = send(&client, Method::POST, &url).await;
                    if status == StatusCode::OK {
                        let mut o = outcomes.lock().await;
                        o.ended.insert(id, body);
                        if after {
                            o.after_restart += 1;
                        }
                    } else {
                        check_unavailable(status, &headers, &body, &outcomes).await;
                        to_end.push(id);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let began = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&restart)
            .status()
    })
    .await
    .unwrap()
    .expect("run the restart command");
    assert!(status.success(), "restarting PostgreSQL failed: {status}");
    let restart_took = began.elapsed();
    restarted.store(true, Ordering::SeqCst);
    // The service recovers on its own: sessions start and end again.
    let recovering = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if outcomes.lock().await.after_restart >= 50 {
            break;
        }
        assert!(
            recovering.elapsed() < Duration::from_secs(60),
            "the instances did not recover within 60 s of the restart"
        );
    }
    let recovered_in = recovering.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let o = outcomes.lock().await;
    assert!(
        o.unavailable > 0,
        "no request met the restart: the test tested nothing"
    );
    // Every acknowledged end is in the store exactly as acknowledged.
    for (id, body) in &o.ended {
        let (status, _, now) = send(
            &client,
            Method::GET,
            &nodes[0].url(&format!("/v1/sessions/{id}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{now}");
        let (acked, now) = (json(body), json(&now));
        for field in ["status", "ended_at", "end_reason"] {
            assert_eq!(
                acked["session"][field], now["session"][field],
                "{id}: {field}"
            );
        }
    }
    let ids: Vec<String> = o.created.keys().cloned().collect();
    assert_eq!(o.ended.len(), ids.len(), "every created session was ended");
    wait_released(&client, &nodes[0], &ids, Duration::from_secs(60)).await;
    let ledger = cluster.ledger();
    for (id, senders) in &ledger {
        assert_eq!(senders.len(), 1, "{id} was stopped {} times", senders.len());
    }
    for (id, pid) in &o.created {
        assert_eq!(
            ledger.get(id).map(Vec::as_slice),
            Some(&[*pid][..]),
            "{id}: released once, on its node"
        );
    }
    eprintln!(
        "restart took {restart_took:?}; {} sessions, {} answers 503 storage_unavailable; serving again {recovered_in:?} after",
        ids.len(),
        o.unavailable
    );
    drop(o);
    drop(nodes);
    cluster.finish().await;
}

/// A failed request must be a 503 `storage_unavailable` with `Retry-After`.
async fn check_unavailable(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    outcomes: &Mutex<Outcomes>,
) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(json(body)["error"]["code"], "storage_unavailable", "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    outcomes.lock().await.unavailable += 1;
}
