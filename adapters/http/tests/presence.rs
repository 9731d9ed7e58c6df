//! Client presence across instances: two real `sessiond` processes on one PostgreSQL
//! database, as behind a load balancer. A session lives while any instance holds a socket
//! of it; a client may reconnect to the other instance within the grace; an end anywhere
//! closes every socket of the session within a second; and holding sockets costs no store
//! writes while nothing changes.
#![cfg(feature = "sessiond")]

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, KEY, Node, client, create, get};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket of session `id` on `node`, authenticated by the tenant's API key.
async fn open(node: &Node, id: &str) -> Socket {
    let url = format!(
        "{}/v1/sessions/{id}/ws",
        node.base.replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("x-api-key", HeaderValue::from_static(KEY));
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket handshake");
    socket
}

/// Keeps `socket` answering pings until `stop` resolves, then closes it.
fn keep(mut socket: Socket) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => {
                    let _ = socket.close(None).await;
                    // Read until the server's close arrives.
                    while let Some(Ok(_)) = socket.next().await {}
                    return;
                }
                message = socket.next() => if !matches!(message, Some(Ok(_))) {
                    return;
                },
            }
        }
    });
    stop
}

async fn status(node: &Node, id: &str) -> (String, Option<String>) {
    let s = get(&client(), node, id).await;
    (
        s["status"].as_str().unwrap_or_default().to_owned(),
        s["end_reason"].as_str().map(str::to_owned),
    )
}

/// Waits up to `limit` for `id` to end; when it did (since `from`) and why.
async fn ended_within(node: &Node, id: &str, from: Instant, limit: Duration) -> (Duration, String) {
    loop {
        let (state, reason) = status(node, id).await;
        if state == "ended" {
            return (from.elapsed(), reason.unwrap_or_default());
        }
        assert!(from.elapsed() < limit, "{id} still {state} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const GRACE: Duration = Duration::from_secs(3);

async fn cluster() -> Option<Cluster> {
    Cluster::new(&["--ws-grace-ms", "3000", "--ws-ping-interval-ms", "500"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_sockets_on_two_instances_ends_only_when_both_close() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let (a, b) = (cluster.start_bare("node-a"), cluster.start_bare("node-b"));
    let id = create(&client(), &a).await;
    let on_a = keep(open(&a, &id).await);
    let on_b = keep(open(&b, &id).await);
    on_a.send(()).unwrap();
    tokio::time::sleep(GRACE + Duration::from_secs(2)).await;
    assert_eq!(status(&a, &id).await.0, "started", "B still holds a socket");
    on_b.send(()).unwrap();
    let (took, why) = ended_within(&a, &id, Instant::now(), GRACE + Duration::from_secs(2)).await;
    assert_eq!(why, "websocket_disconnected");
    assert!(
        took >= GRACE - Duration::from_millis(100),
        "ended after {took:?}, before the grace"
    );
    drop((a, b));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_to_the_other_instance_within_the_grace_keeps_its_session() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let (a, b) = (cluster.start_bare("node-a"), cluster.start_bare("node-b"));
    let id = create(&client(), &a).await;
    let on_a = keep(open(&a, &id).await);
    on_a.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_b = keep(open(&b, &id).await);
    tokio::time::sleep(GRACE + Duration::from_secs(2)).await;
    assert_eq!(status(&a, &id).await.0, "started", "reconnected in time");
    on_b.send(()).unwrap();
    let (_, why) = ended_within(&b, &id, Instant::now(), GRACE + Duration::from_secs(2)).await;
    assert_eq!(why, "websocket_disconnected");
    drop((a, b));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_on_one_instance_closes_a_socket_on_the_other_within_a_second() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let (a, b) = (cluster.start_bare("node-a"), cluster.start_bare("node-b"));
    let http = client();
    let id = create(&http, &a).await;
    let mut on_b = open(&b, &id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (code, _, text) = common::send(
        &http,
        Method::POST,
        &a.url(&format!("/v1/sessions/{id}/end")),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{text}");
    let frame = loop {
        match tokio::time::timeout(Duration::from_secs(5), on_b.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame on B: {other:?}"),
        }
    };
    let took = t0.elapsed();
    eprintln!("the end on A reached the socket on B in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let frame = frame.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "session ended: requested");
    drop((a, b));
    cluster.finish().await;
}

/// A node's presence writes and the store's own row counts, read before and after an idle
/// window with 1,000 sockets open over two instances: presence costs no write while
/// nothing changes (only each node's heartbeat writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_sockets_cost_no_store_writes() {
    let Some(cluster) = Cluster::new(&["--ws-ping-interval-ms", "1000"]).await else {
        return;
    };
    let idle = Duration::from_secs(
        std::env::var("SESSION_LIFECYCLE_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let (a, b) = (cluster.start_bare("node-a"), cluster.start_bare("node-b"));
    let http = client();
    let mut stops = Vec::new();
    for i in 0..1000 {
        let node = if i % 2 == 0 { &a } else { &b };
        let id = create(&http, node).await;
        // Each socket on the instance that did not create the session, for half of them.
        let holder = if i % 4 < 2 {
            node
        } else if i % 2 == 0 {
            &b
        } else {
            &a
        };
        stops.push(keep(open(holder, &id).await));
    }
    // Writes are counted by the instances and by PostgreSQL itself.
    let writes = || async {
        let mut total = 0;
        for node in [&a, &b] {
            total += presence_writes(node).await;
        }
        total
    };
    let db = tokio_postgres_connect(cluster.db_url()).await;
    // PostgreSQL publishes its counters within a few seconds of idleness.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (instances_before, store_before) = (writes().await, table_writes(&db).await);
    assert_eq!(
        instances_before, 1000,
        "one write per session held, however many pings"
    );
    tokio::time::sleep(idle).await;
    let (instances_after, store_after) = (writes().await, table_writes(&db).await);
    let heartbeats = store_after.nodes - store_before.nodes;
    eprintln!(
        "over {idle:?} with 1000 sockets: {} presence writes, {} session_presence row changes, \
         {} session row changes, {heartbeats} node heartbeats",
        instances_after - instances_before,
        store_after.presence - store_before.presence,
        store_after.sessions - store_before.sessions,
    );
    assert_eq!(
        instances_after, instances_before,
        "no presence write while idle"
    );
    assert_eq!(store_after.presence, store_before.presence);
    // No touch per ping. A session row changes at most once: when a usage period
    // (300 s, from the epoch) closes inside the idle minute, each session is marked
    // recorded up to it, once per period, whatever the pings.
    assert!(
        store_after.sessions - store_before.sessions <= 1000,
        "no touch per ping: {} session row changes",
        store_after.sessions - store_before.sessions
    );
    // About one heartbeat per node per interval (5 s): nothing per socket.
    let expected = 2 * idle.as_secs() as i64 / 5;
    assert!(heartbeats <= expected + 6, "{heartbeats} heartbeats");
    for stop in stops {
        let _ = stop.send(());
    }
    drop((a, b));
    cluster.finish().await;
}

async fn presence_writes(node: &Node) -> u64 {
    let text = client()
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("sessiond_presence_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("sessiond_presence_writes_total")
}

struct TableWrites {
    presence: i64,
    sessions: i64,
    nodes: i64,
}

async fn tokio_postgres_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Rows inserted, updated and deleted per table, as PostgreSQL counts them.
async fn table_writes(db: &tokio_postgres::Client) -> TableWrites {
    // A fresh snapshot of the counters in this transaction.
    db.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .expect("snapshot");
    let rows = db
        .query(
            "SELECT relname::TEXT, (n_tup_ins + n_tup_upd + n_tup_del)::BIGINT
             FROM pg_stat_user_tables
             WHERE relname IN ('session_presence', 'sessions', 'nodes')",
            &[],
        )
        .await
        .expect("pg_stat_user_tables");
    let of = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map_or(0, |r| r.get::<_, i64>(1))
    };
    TableWrites {
        presence: of("session_presence"),
        sessions: of("sessions"),
        nodes: of("nodes"),
    }
}
