//! Client presence across instances: the live nodes holding sockets of a session, as
//! liveness, and the word that a session ended.

use std::sync::Mutex;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId};

use super::support::{at, create, fresh_tenant, new_session, random};
use crate::store::Store;

fn wall() -> session_lifecycle::Timestamp {
    super::support::wall_now()
}

/// Nodes record holding sockets and letting go; only live nodes count as holders (node
/// death is judged on the store's clock, so this runs on the wall clock with a short
/// timeout); a held socket keeps its session from being swept as an orphan until its node
/// lets go, or is taken over, and the session was live until then.
pub async fn presence_counts_live_nodes_only(store: &dyn Store) {
    let (a, b) = (
        format!("node-{:x}", random() as u64),
        format!("node-{:x}", random() as u64),
    );
    let timeout = Duration::from_millis(800);
    store.node_alive(&a, wall()).await.expect("heartbeat");
    store.node_alive(&b, wall()).await.expect("heartbeat");
    // Silent since long ago: an orphan unless a socket says otherwise.
    let new = new_session(
        &fresh_tenant(),
        at(0),
        Duration::from_secs(10 * 365 * 24 * 3600),
    );
    create(store, &new).await;
    let holders = || async {
        store
            .presence(new.id, wall(), timeout)
            .await
            .expect("presence")
    };
    let orphaned = || async {
        store
            .due(wall(), Duration::from_secs(60), 100_000)
            .await
            .expect("due")
            .contains(&(new.id, EndReason::Orphaned))
    };
    assert!(holders().await.is_empty());
    assert!(orphaned().await, "no socket: an orphan");

    store
        .set_presence(new.id, &a, true, wall())
        .await
        .expect("set");
    store
        .set_presence(new.id, &b, true, wall())
        .await
        .expect("set");
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(holders().await, both);
    assert!(
        !orphaned().await,
        "a socket held by a live node is liveness"
    );
    store
        .set_presence(new.id, &a, false, wall())
        .await
        .expect("set");
    store
        .set_presence(new.id, &a, false, wall())
        .await
        .expect("set twice");
    assert_eq!(holders().await, std::slice::from_ref(&b));

    // b stops heartbeating: its socket no longer counts once it is dead, and its hold is
    // let go when it is taken over, the session live until then.
    tokio::time::sleep(timeout + Duration::from_millis(200)).await;
    store.node_alive(&a, wall()).await.expect("heartbeat");
    assert!(
        holders().await.is_empty(),
        "a dead node's sockets do not count"
    );
    assert!(!orphaned().await, "held until taken over");
    store
        .end_dead_nodes(&a, wall(), timeout, 0)
        .await
        .expect("take over");
    assert!(!orphaned().await, "live until the takeover");
    let orphaned_later = store
        .due(
            wall().saturating_add(Duration::from_secs(61)),
            Duration::from_secs(60),
            100_000,
        )
        .await
        .expect("due");
    assert!(
        orphaned_later.contains(&(new.id, EndReason::Orphaned)),
        "then an orphan"
    );

    // Letting go is liveness until then, too.
    store
        .set_presence(new.id, &a, true, wall())
        .await
        .expect("set");
    store
        .set_presence(new.id, &a, false, wall())
        .await
        .expect("set");
    assert!(!orphaned().await);

    // A held socket is liveness, not immortality: the plan's expiry still ends it.
    store.node_alive(&a, wall()).await.expect("heartbeat");
    let expiring = new_session(&fresh_tenant(), at(0), Duration::from_secs(1));
    create(store, &expiring).await;
    store
        .set_presence(expiring.id, &a, true, wall())
        .await
        .expect("set");
    let due = store
        .due(wall(), Duration::from_secs(60), 100_000)
        .await
        .expect("due");
    assert!(due.contains(&(expiring.id, EndReason::Expired)), "{due:?}");

    // A restarted node holds nothing; an ended session's presence is pruned with its rooms.
    store.clear_presence(&a, wall()).await.expect("clear");
    assert!(
        store
            .presence(expiring.id, wall(), timeout)
            .await
            .expect("presence")
            .is_empty()
    );
    store
        .set_presence(expiring.id, &a, true, wall())
        .await
        .expect("set");
    store
        .end(expiring.id, None, at(2), EndReason::Expired, None)
        .await
        .expect("end");
    store.prune_rooms(at(3), 1000).await.expect("prune");
    store.node_alive(&a, wall()).await.expect("heartbeat");
    assert!(
        store
            .presence(expiring.id, wall(), timeout)
            .await
            .expect("presence")
            .is_empty(),
        "pruned with the ended session"
    );
}

/// An instance watching ends hears of every session ended anywhere, including a dead
/// node's sessions taken over.
pub async fn watch_ends_hears_every_end(store: &dyn Store) {
    let heard: Mutex<Vec<SessionId>> = Mutex::new(Vec::new());
    let ended = |id| crate::sync::lock(&heard).push(id);
    let tenant = fresh_tenant();
    let first = new_session(&tenant, at(0), Duration::from_secs(600));
    let second = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &first).await;
    create(store, &second).await;
    let check = async {
        // Let the watcher start listening.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in [first.id, second.id] {
            store
                .end(id, None, at(5), EndReason::Requested, None)
                .await
                .expect("end");
        }
        for _ in 0..500 {
            let got = crate::sync::lock(&heard).clone();
            if got.contains(&first.id) && got.contains(&second.id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("ends not heard: {:?}", crate::sync::lock(&heard));
    };
    tokio::select! {
        _ = store.watch_ends(&ended) => panic!("watch_ends returned"),
        _ = check => {}
    }
}
