//! Safe retries of creates with `Idempotency-Key`, against real `sessiond` processes.
#![cfg(feature = "sessiond")]

mod common;

use std::time::Duration;

use common::{Cluster, KEY, Node, client, json};
use reqwest::StatusCode;
use serde_json::Value;

/// A create with `key` and `body`: status, the replay header, and the body as text.
async fn create(
    node: &Node,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, Option<String>, String) {
    let mut req = client()
        .post(node.url("/v1/sessions"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let resp = req.send().await.expect("create");
    let status = resp.status();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, resp.text().await.unwrap())
}

async fn sessions(node: &Node) -> Vec<Value> {
    let resp = client()
        .get(node.url("/v1/sessions?limit=100"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    json(&resp.text().await.unwrap())["sessions"]
        .as_array()
        .unwrap()
        .clone()
}

/// A retry with the same key and body answers the same session, byte for byte; another
/// body with the key is refused (422); a bad key is a 400; keys never start a second
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_key_answers_the_same_session() {
    let cluster = Cluster::sqlite(&[]);
    let node = cluster.start_bare("a");
    let body = r#"{"metadata": {"order": 1}, "duration_secs": 600}"#;
    let (status, replayed, first) = create(&node, Some("order-1"), body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(replayed, None);
    // The same body, spaced and ordered otherwise.
    let (status, replayed, again) = create(
        &node,
        Some("order-1"),
        r#"{"duration_secs":600,"metadata":{"order":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(again, first, "the same answer");
    let (status, _, other) = create(&node, Some("order-1"), r#"{"duration_secs": 60}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{other}");
    assert_eq!(json(&other)["error"]["code"], "idempotency_key_reused");
    for bad in ["", &"k".repeat(256), "caf\u{e9}"] {
        let resp = client()
            .post(node.url("/v1/sessions"))
            .header("x-api-key", KEY)
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert_eq!(sessions(&node).await.len(), 1, "one session started");
    // Without a key, each create is its own.
    create(&node, None, body).await;
    create(&node, None, body).await;
    assert_eq!(sessions(&node).await.len(), 3);
    // Across a restart.
    drop(node);
    let node = cluster.start_bare("a");
    let (status, replayed, after) = create(&node, Some("order-1"), body).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::CREATED, Some("true"))
    );
    assert_eq!(after, first);
    cluster.finish().await;
}

/// 16 concurrent creates with one key over two instances start one session and one
/// avatar server (the others get the same answer or 409); after a kill -9 of the instance
/// that answered, a retry at the other returns the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_key_over_two_instances_start_one_session() {
    let Some(cluster) = Cluster::new(&[]).await else {
        eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
        return;
    };
    let nodes = [cluster.start("a"), cluster.start("b")];
    let body = r#"{"metadata": {"order": 16}}"#;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let url = nodes[i % 2].url("/v1/sessions");
        tasks.spawn(async move {
            let resp = client()
                .post(url)
                .header("x-api-key", KEY)
                .header("idempotency-key", "sixteen")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.text().await.unwrap())
        });
    }
    let mut created = Vec::new();
    let mut in_use = 0;
    while let Some(answer) = tasks.join_next().await {
        let (status, text) = answer.unwrap();
        match status {
            StatusCode::CREATED => created.push(text),
            StatusCode::CONFLICT => {
                assert_eq!(json(&text)["error"]["code"], "idempotency_key_in_use");
                in_use += 1;
            }
            other => panic!("{other}: {text}"),
        }
    }
    assert!(!created.is_empty());
    assert!(created.iter().all(|c| *c == created[0]), "one answer");
    eprintln!("{} answered 201, {in_use} answered 409", created.len());
    let id = json(&created[0])["session"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let all = sessions(&nodes[0]).await;
    assert_eq!(all.len(), 1, "one session: {all:?}");
    // Its one avatar server, stopped once when it ends.
    let resp = client()
        .post(nodes[1].url(&format!("/v1/sessions/{id}/end")))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.ledger().is_empty() {
        assert!(
            std::time::Instant::now() < give_up,
            "its avatar server never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = cluster.ledger();
    assert_eq!(ledger.len(), 1, "one avatar server: {ledger:?}");
    assert_eq!(ledger[&id].len(), 1);

    // The instance that answered dies; a retry at the other returns the same session.
    let [a, b] = nodes;
    let (status, _, answered) = create(&a, Some("after-kill"), body).await;
    assert_eq!(status, StatusCode::CREATED);
    a.kill_9();
    let (status, replayed, again) = create(&b, Some("after-kill"), body).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::CREATED, Some("true"))
    );
    assert_eq!(again, answered);
    drop(b);
    // The killed instance comes back and, stopping, ends what it ran: no server left over.
    drop(cluster.start("a"));
    cluster.finish().await;
}
