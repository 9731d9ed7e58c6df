//! Fleet placement in the PostgreSQL store: the choice made in the create's transaction,
//! the last slot never given twice, claims, refusals placed again, and starts a dead node
//! never finished. Needs `SESSION_LIFECYCLE_PG_URL` (skipped without it, unless
//! `SESSION_LIFECYCLE_REQUIRE_PG=1`).

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Timestamp};
use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_postgres::testing::{TestDb, pg_url};
use session_lifecycle_store::{
    FleetPlacement, NewSession, NodeMembership, NodeReport, PlaceOutcome, PlacementAsk,
    PlacementPolicy, SessionStore, SessionTimeouts, StartState,
};

fn new_session(n: u128) -> NewSession {
    let now = Timestamp::from_millis(1_767_225_600_000);
    NewSession {
        id: SessionId::from_ulid_parts(now, n),
        tenant: "t".to_owned(),
        started_at: now,
        expires_at: now.saturating_add(Duration::from_secs(3600)),
        metadata: None,
        room: None,
        max_concurrent: None,
        node: "ignored".to_owned(),
        timeouts: SessionTimeouts::default(),
        callback_url: None,
        billing: Default::default(),
    }
}

fn ask(receiving: &str, has_room: bool) -> PlacementAsk {
    PlacementAsk {
        receiving: receiving.to_owned(),
        receiving_has_room: has_room,
        receiving_slots: Some(0),
        exclude: Vec::new(),
        gpu_memory: None,
        policy: PlacementPolicy::Spread,
        node_timeout: Duration::from_secs(30),
    }
}

async fn node(store: &PostgresStore, id: &str, slots: u64) {
    let now = Timestamp::from_millis(1_767_225_600_000);
    store.node_alive(id, now).await.unwrap();
    let report = NodeReport {
        slots: Some(slots),
        ..NodeReport::default()
    };
    store.report_node(id, &report.to_json()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_racing_creates_never_overcommit_a_node() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let store = Arc::new(PostgresStore::connect(&db.url).await.unwrap());
    node(&store, "router", 0).await;
    node(&store, "x", 3).await;
    node(&store, "y", 2).await;
    // 12 creates at once for 5 slots, from two pools of connections (two "instances").
    let other = Arc::new(PostgresStore::connect(&db.url).await.unwrap());
    let mut tasks = Vec::new();
    for n in 0..12u128 {
        let store = if n % 2 == 0 {
            Arc::clone(&store)
        } else {
            Arc::clone(&other)
        };
        tasks.push(tokio::spawn(async move {
            store
                .create_placed(new_session(n + 1), &ask("router", false), "gpu_memory=1")
                .await
                .unwrap()
        }));
    }
    let mut placed = std::collections::HashMap::<String, usize>::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            PlaceOutcome::Placed { node } => *placed.entry(node).or_default() += 1,
            PlaceOutcome::NoRoom => refused += 1,
            PlaceOutcome::LimitReached => panic!("no tenant limit here"),
        }
    }
    assert_eq!(placed.get("x"), Some(&3), "{placed:?}");
    assert_eq!(placed.get("y"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("router"), None);
    assert_eq!(refused, 7);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_claims_refusals_and_a_dead_node_s_unfinished_starts() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    node(&store, "router", 0).await;
    node(&store, "x", 1).await;
    node(&store, "y", 1).await;
    let first = new_session(1);
    let id = first.id;
    let PlaceOutcome::Placed { node: chosen } = store
        .create_placed(first, &ask("router", false), "gpu_memory=7")
        .await
        .unwrap()
    else {
        panic!("placed")
    };
    assert_eq!(chosen, "x", "a tie goes by id");
    let state = store.placed_state(id).await.unwrap().unwrap();
    assert_eq!(
        (state.node.as_str(), state.start),
        ("x", StartState::Assigned)
    );
    assert!(store.claim_starts("y", 10).await.unwrap().is_empty());

    // x claims it (once), then refuses it: placed again on y, never back on x.
    let claimed = store.claim_starts("x", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].request, "gpu_memory=7");
    assert!(store.claim_starts("x", 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .place_again(id, "x", &ask("router", false))
            .await
            .unwrap(),
        None,
        "a claimed start is not taken away"
    );
    assert!(store.finish_start(id, "x", Some("draining")).await.unwrap());
    assert_eq!(
        store.placed_state(id).await.unwrap().unwrap().start,
        StartState::Refused("draining".to_owned())
    );
    assert_eq!(
        store
            .place_again(id, "x", &ask("router", false))
            .await
            .unwrap(),
        Some(PlaceOutcome::Placed {
            node: "y".to_owned()
        })
    );
    // y claims and finishes it: started, and y's one slot is taken.
    assert_eq!(store.claim_starts("y", 10).await.unwrap().len(), 1);
    assert!(store.finish_start(id, "y", None).await.unwrap());
    assert_eq!(
        store.placed_state(id).await.unwrap().unwrap().start,
        StartState::Started
    );
    assert_eq!(store.get(id).await.unwrap().unwrap().node, "y");
    let mut only_x = ask("router", false);
    only_x.exclude = vec!["x".to_owned()];
    assert_eq!(
        store
            .create_placed(new_session(2), &only_x, "")
            .await
            .unwrap(),
        PlaceOutcome::NoRoom,
        "y is full, x excluded"
    );

    // A start x claimed and never finished: when x is dead, it ends `start_failed`.
    let second = new_session(3);
    let pending = second.id;
    let placed = store
        .create_placed(second, &ask("router", false), "")
        .await
        .unwrap();
    assert_eq!(
        placed,
        PlaceOutcome::Placed {
            node: "x".to_owned()
        }
    );
    assert_eq!(store.claim_starts("x", 10).await.unwrap().len(), 1);
    assert_eq!(store.interrupted_starts("x").await.unwrap(), vec![pending]);
    let later = Timestamp::from_millis(1_767_225_700_000);
    let ended = store
        .end_dead_nodes("router", later, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(ended.contains(&pending), "{ended:?}");
    let record = store.get(pending).await.unwrap().unwrap();
    assert_eq!(record.session.end_reason(), Some(EndReason::StartFailed));
    // The session that ran on y ended `node_lost` with its node, as any running one.
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.session.end_reason(), Some(EndReason::NodeLost));
    db.drop_db().await;
}
