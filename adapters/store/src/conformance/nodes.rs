//! Node ownership of releases, heartbeats and dead-node takeover.

use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Timestamp};

use super::releases::{claim, release_one};
use super::support::{at, create, fresh_tenant, get, new_session, random, res};
use crate::record::{AttachOutcome, ListQuery};
use crate::store::Store;

/// Releases run on the node that holds the resources; a node whose heartbeat lapsed has
/// its started sessions ended `node_lost` by another node, and its unreleased resources
/// recorded as lost with it, still owed by it; when it returns it claims them.
pub async fn nodes_own_releases_and_dead_nodes_are_taken_over(store: &dyn Store) {
    let (na, nb) = (
        format!("node-{:x}", random() as u64),
        format!("node-{:x}", random() as u64),
    );
    let tenant = fresh_tenant();
    let on = |node: &str, handle: u64| {
        let mut new = new_session(&tenant, at(0), Duration::from_secs(3600));
        new.node = node.to_owned();
        (new, res(handle))
    };
    let lease = Duration::from_secs(60);
    let claimed = |node: String, t: Timestamp, ids: Vec<SessionId>| async move {
        let mut got: Vec<SessionId> = claim(store, &node, t, lease, &ids)
            .await
            .iter()
            .map(|r| *r.session.id())
            .collect();
        got.sort();
        got
    };
    store.node_alive(&na, at(0)).await.expect("heartbeat");
    store.node_alive(&nb, at(0)).await.expect("heartbeat");
    let (s1, r1) = on(&na, 1);
    let (s2, r2) = on(&na, 2);
    let (s3, r3) = on(&nb, 3);
    for (s, r) in [(&s1, r1), (&s2, r2), (&s3, r3)] {
        create(store, s).await;
        assert_eq!(
            store.attach(s.id, r).await.expect("attach"),
            AttachOutcome::Attached
        );
    }
    let ids = vec![s1.id, s2.id, s3.id];

    // Listing by node.
    let listed: Vec<SessionId> = store
        .list(ListQuery {
            tenant: Some(tenant.clone()),
            status: Some(Status::Started),
            limit: 10,
            before: None,
            node: Some(na.clone()),
        })
        .await
        .expect("list")
        .iter()
        .map(|r| *r.session.id())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&s1.id) && listed.contains(&s2.id));

    // Any instance ends s1; only its node claims the release.
    store
        .end(s1.id, None, at(1), EndReason::Requested, None)
        .await
        .expect("end");
    assert!(
        claimed(nb.clone(), at(1), ids.clone()).await.is_empty(),
        "another node never claims a release it cannot run"
    );
    assert_eq!(claimed(na.clone(), at(1), ids.clone()).await, [s1.id]);
    store.drop_claims(&na).await.expect("drop");

    // na stops heartbeating; nb stays alive. Node death is judged on the store's clock
    // (a shared store's own), so this part runs on the wall clock with a short timeout.
    let wall = || super::support::wall_now();
    let timeout = Duration::from_millis(800);
    store.node_alive(&na, wall()).await.expect("heartbeat");
    store.node_alive(&nb, wall()).await.expect("heartbeat");
    let ended = store
        .end_dead_nodes(&nb, wall(), timeout, 1000)
        .await
        .expect("takeover");
    assert!(
        !ended.iter().any(|id| ids.contains(id)),
        "not dead before the timeout"
    );
    let live_before = store.live_nodes(wall(), timeout).await.expect("live nodes");
    assert!(live_before >= 2, "both nodes are alive: {live_before}");
    tokio::time::sleep(timeout + Duration::from_millis(200)).await;
    store.node_alive(&nb, wall()).await.expect("heartbeat");
    let live_after = store.live_nodes(wall(), timeout).await.expect("live nodes");
    assert!(
        live_after >= 1 && live_after < live_before,
        "a silent node is not alive: {live_before} then {live_after}"
    );
    let taken_at = wall();
    let ended = store
        .end_dead_nodes(&nb, taken_at, timeout, 1000)
        .await
        .expect("takeover");
    assert_eq!(
        ended.iter().filter(|id| ids.contains(id)).count(),
        1,
        "the dead node's started session, once"
    );
    assert!(ended.contains(&s2.id));
    let r = get(store, s2.id).await;
    assert_eq!(r.session.status(), Status::Ended);
    assert_eq!(r.session.end_reason(), Some(EndReason::NodeLost));
    assert_eq!(r.session.ended_at(), Some(taken_at));
    let ended_event = store
        .undispatched_events(100_000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.session == s2.id && e.kind == session_lifecycle::EventKind::Ended)
        .map(|e| e.at)
        .collect::<Vec<_>>();
    assert_eq!(ended_event, [taken_at], "a takeover writes the end's event");
    assert!(
        r.release_notes
            .iter()
            .any(|(res, note)| *res == r2 && note.contains("lost with node")),
        "the dead node's resource is recorded as lost: {:?}",
        r.release_notes
    );
    let r = get(store, s1.id).await;
    assert!(
        r.release_notes.iter().any(|(res, _)| *res == r1),
        "an unreleased resource of an ended session is lost too"
    );
    assert_eq!(
        get(store, s3.id).await.session.status(),
        Status::Started,
        "a live node keeps its sessions"
    );
    assert!(
        store
            .end_dead_nodes(&nb, wall(), timeout, 1000)
            .await
            .expect("takeover")
            .iter()
            .all(|id| !ids.contains(id)),
        "a takeover happens once"
    );
    assert!(
        claimed(nb.clone(), wall(), ids.clone()).await.is_empty(),
        "lost resources cannot be freed from elsewhere"
    );

    // na returns with its id: it is alive again and settles what it owes.
    store.node_alive(&na, wall()).await.expect("heartbeat");
    let owed = claim(store, &na, wall(), lease, &ids).await;
    let mut want = vec![s1.id, s2.id];
    want.sort();
    let mut got: Vec<SessionId> = owed.iter().map(|r| *r.session.id()).collect();
    got.sort();
    assert_eq!(got, want);
    for record in owed {
        let mut session = record.session;
        release_one(
            store,
            &na,
            &mut session,
            wall(),
            session_lifecycle::ReleaseOutcome::Released,
            "sigterm",
            lease,
        )
        .await;
    }
    let r = get(store, s2.id).await;
    assert!(r.session.is_fully_released());
    assert!(
        r.release_notes
            .iter()
            .any(|(_, note)| note.contains("lost with node") && note.contains("sigterm")),
        "{:?}",
        r.release_notes
    );
    assert!(
        store
            .end_dead_nodes(&nb, wall(), timeout, 1000)
            .await
            .expect("takeover")
            .iter()
            .all(|id| !ids.contains(id)),
        "a returned node is alive"
    );
}

/// A node's report of itself is kept as given, the latest one, and listed with whether the
/// node is alive; recent ends list the sessions that ended since a time and those still
/// owing releases (those first, then by the latest end), scoped to a tenant.
pub async fn node_reports_and_recent_ends_are_listed(store: &dyn Store) {
    let wall = || super::support::wall_now();
    let node = format!("node-{:x}", random() as u64);
    store.node_alive(&node, wall()).await.expect("heartbeat");
    store
        .report_node(&node, r#"{"draining":false}"#)
        .await
        .expect("report");
    store
        .report_node(&node, r#"{"draining":true}"#)
        .await
        .expect("report");
    let window = Duration::from_secs(3600);
    let nodes = store
        .nodes(wall(), Duration::from_secs(60), window)
        .await
        .expect("nodes");
    let row = nodes
        .iter()
        .find(|n| n.node == node)
        .expect("a node with a recent heartbeat is listed");
    assert!(row.alive, "{row:?}");
    assert_eq!(row.report.as_deref(), Some(r#"{"draining":true}"#));

    let tenant = fresh_tenant();
    let session = || new_session(&tenant, at(0), Duration::from_secs(3600));
    let (early, middle, late, running) = (session(), session(), session(), session());
    let other = new_session(&fresh_tenant(), at(0), Duration::from_secs(3600));
    for s in [&early, &middle, &late, &running, &other] {
        create(store, s).await;
    }
    // Ended before `since`, but still owing its resource's release.
    assert_eq!(
        store.attach(early.id, res(41)).await.expect("attach"),
        AttachOutcome::Attached
    );
    for (s, t, reason) in [
        (&early, 5, EndReason::Requested),
        (&middle, 10, EndReason::Expired),
        (&late, 20, EndReason::Requested),
        (&other, 20, EndReason::Requested),
    ] {
        store
            .end(s.id, None, at(t), reason, None)
            .await
            .expect("end");
    }
    let ids = |records: Vec<crate::record::SessionRecord>| -> Vec<SessionId> {
        records.iter().map(|r| *r.session.id()).collect()
    };
    let recent = store
        .ended_since(Some(tenant.clone()), at(8), 10)
        .await
        .expect("ended since");
    assert_eq!(ids(recent), vec![early.id, late.id, middle.id]);
    // A limit cuts recent ends, never those owing releases.
    let first = store
        .ended_since(Some(tenant.clone()), at(8), 2)
        .await
        .expect("ended since");
    assert_eq!(ids(first), vec![early.id, late.id]);
    let after = store
        .ended_since(Some(tenant.clone()), at(15), 10)
        .await
        .expect("ended since");
    assert_eq!(ids(after), vec![early.id, late.id]);

    // Counted by 10-second span from `since` and by reason, both ends of the range in;
    // owing releases does not count an end outside the range.
    let count = |bucket, reason, count| crate::record::EndCount {
        bucket,
        reason,
        count,
    };
    let counts = store
        .count_ends(Some(tenant.clone()), at(5), at(20), Duration::from_secs(10))
        .await
        .expect("count ends");
    assert_eq!(
        counts,
        vec![
            count(0, EndReason::Expired, 1),
            count(0, EndReason::Requested, 1),
            count(1, EndReason::Requested, 1),
        ]
    );
    let later = store
        .count_ends(Some(tenant.clone()), at(6), at(19), Duration::from_secs(10))
        .await
        .expect("count ends");
    assert_eq!(later, vec![count(0, EndReason::Expired, 1)]);
    let everyone = store
        .count_ends(None, at(20), at(20), Duration::from_secs(10))
        .await
        .expect("count ends");
    let at_20: u64 = everyone
        .iter()
        .filter(|c| c.bucket == 0 && c.reason == EndReason::Requested)
        .map(|c| c.count)
        .sum();
    assert!(at_20 >= 2, "both tenants' ends at 20 s: {everyone:?}");
}
