//! Sessions: create, get, list, end, attach, liveness, the sweep query, plan limits.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Timestamp, Transition};

use super::support::{T0, at, create, fresh_tenant, get, new_session, random, res};
use crate::error::StoreError;
use crate::record::{AttachOutcome, CreateOutcome, ListQuery, TouchOutcome};
use crate::store::Store;

/// A created session reads back exactly, started, with nothing ended.
pub async fn create_and_get(store: &dyn Store) {
    let tenant = fresh_tenant();
    let mut new = new_session(&tenant, at(0), Duration::from_secs(600));
    new.metadata = Some(r#"{"user":"ada"}"#.to_owned());
    new.room = Some(crate::record::RoomBinding {
        provider: crate::record::RoomProvider::Livekit,
        name: "room-1".to_owned(),
    });
    create(store, &new).await;
    let r = get(store, new.id).await;
    assert_eq!(r.tenant, tenant);
    assert_eq!(r.metadata.as_deref(), Some(r#"{"user":"ada"}"#));
    assert_eq!(r.room, new.room);
    let s = &r.session;
    assert_eq!(*s.id(), new.id);
    assert_eq!(s.status(), Status::Started);
    assert_eq!(s.started_at(), at(0));
    assert_eq!(s.expires_at(), at(600));
    assert_eq!(s.last_seen_at(), at(0));
    assert_eq!(s.ended_at(), None);
    assert_eq!(s.end_reason(), None);
    assert!(s.resources().is_empty());
    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert!(store.get(unknown).await.expect("get unknown").is_none());
    // Millisecond precision survives.
    let precise = new_session(
        &tenant,
        Timestamp::from_millis(T0 + 1234),
        Duration::from_millis(5),
    );
    create(store, &precise).await;
    let r = get(store, precise.id).await;
    assert_eq!(r.session.started_at().as_millis(), T0 + 1234);
    assert_eq!(r.session.expires_at().as_millis(), T0 + 1239);
}

/// A second create with the same id fails and leaves the first untouched.
pub async fn duplicate_ids_are_refused(store: &dyn Store) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(60));
    create(store, &new).await;
    let mut again = new.clone();
    again.tenant = fresh_tenant();
    match store.create(again).await {
        Err(StoreError::DuplicateId(id)) => assert_eq!(id, new.id),
        other => panic!("duplicate create: {other:?}"),
    }
    assert_eq!(get(store, new.id).await.tenant, new.tenant);
}

/// Listing: newest first, only the asked tenant, filtered by status, paged by id.
pub async fn list_is_newest_first_tenant_scoped_and_paged(store: &dyn Store) {
    let tenant = fresh_tenant();
    let other = fresh_tenant();
    let mut ids = Vec::new();
    for i in 0..7 {
        let new = new_session(&tenant, at(i), Duration::from_secs(600));
        create(store, &new).await;
        ids.push(new.id);
    }
    create(store, &new_session(&other, at(3), Duration::from_secs(600))).await;
    store
        .end(ids[2], None, at(10), EndReason::Requested, None)
        .await
        .expect("end");
    ids.reverse(); // newest first

    let query = |status, limit, before| ListQuery {
        tenant: Some(tenant.clone()),
        status,
        limit,
        before,
        node: None,
    };
    let all = store.list(query(None, 100, None)).await.expect("list");
    let got: Vec<SessionId> = all.iter().map(|r| *r.session.id()).collect();
    assert_eq!(got, ids, "newest first, this tenant only");

    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store.list(query(None, 3, before)).await.expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        before = Some(*last.session.id());
        paged.extend(page.iter().map(|r| *r.session.id()));
    }
    assert_eq!(paged, ids, "pages cover everything once, in order");

    let started = store
        .list(query(Some(Status::Started), 100, None))
        .await
        .expect("list");
    assert_eq!(started.len(), 6);
    assert!(
        started
            .iter()
            .all(|r| r.session.status() == Status::Started)
    );
    let ended = store
        .list(query(Some(Status::Ended), 100, None))
        .await
        .expect("list");
    assert_eq!(ended.len(), 1);
    assert_eq!(*ended[0].session.id(), ids[4]);
}

/// Only a started session can be ended; the first ending stands; `ended_at` is never
/// before `started_at`.
pub async fn end_is_conditional_and_idempotent(store: &dyn Store) {
    let tenant = fresh_tenant();
    let new = new_session(&tenant, at(100), Duration::from_secs(600));
    create(store, &new).await;
    let (first, t) = store
        .end(new.id, None, at(160), EndReason::Requested, None)
        .await
        .expect("end")
        .expect("found");
    assert_eq!(t, Transition::Committed);
    assert_eq!(first.session.status(), Status::Ended);
    assert_eq!(first.session.ended_at(), Some(at(160)));
    assert_eq!(first.session.end_reason(), Some(EndReason::Requested));

    for (when, reason) in [
        (at(170), EndReason::Orphaned),
        (at(150), EndReason::Shutdown),
    ] {
        let (again, t) = store
            .end(new.id, None, when, reason, None)
            .await
            .expect("end")
            .expect("found");
        assert_eq!(t, Transition::AlreadyEnded);
        assert_eq!(
            again, first,
            "a repeated end returns the first ending unchanged"
        );
    }

    // A clock that stepped back ends at started_at, not before.
    let late = new_session(&tenant, at(500), Duration::from_secs(600));
    create(store, &late).await;
    let (r, _) = store
        .end(late.id, None, at(400), EndReason::Expired, None)
        .await
        .expect("end")
        .expect("found");
    assert_eq!(r.session.ended_at(), Some(at(500)));

    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert!(
        store
            .end(unknown, None, at(1), EndReason::Requested, None)
            .await
            .expect("end")
            .is_none()
    );
}

/// A resource acquired after its session ended is refused, never kept.
pub async fn attach_is_refused_after_end(store: &dyn Store) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(store, &new).await;
    store
        .end(new.id, None, at(1), EndReason::Requested, None)
        .await
        .expect("end");
    assert_eq!(
        store.attach(new.id, res(3)).await.expect("attach"),
        AttachOutcome::Refused
    );
    assert!(get(store, new.id).await.session.resources().is_empty());
    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert_eq!(
        store.attach(unknown, res(3)).await.expect("attach"),
        AttachOutcome::Refused
    );
}

/// Liveness moves `last_seen_at` forward only, and only on started sessions.
pub async fn touch_moves_forward_only(store: &dyn Store) {
    let tenant = fresh_tenant();
    let new = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &new).await;
    let touched = |outcome: TouchOutcome| match outcome {
        TouchOutcome::Touched(record) => record,
        other => panic!("expected touched, got {other:?}"),
    };
    let r = touched(store.touch(new.id, None, at(50)).await.expect("touch"));
    assert_eq!(
        r.session.last_seen_at(),
        at(50),
        "the answer is the touched record"
    );
    let r = touched(
        store
            .touch(new.id, Some(&tenant), at(20))
            .await
            .expect("touch"),
    );
    assert_eq!(r.session.last_seen_at(), at(50), "never backwards");
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(50));
    // Another tenant's session is an unknown one, and stays untouched.
    assert_eq!(
        store
            .touch(new.id, Some("someone-else"), at(55))
            .await
            .expect("touch"),
        TouchOutcome::NotFound
    );
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(50));
    store
        .end(new.id, None, at(60), EndReason::Requested, None)
        .await
        .expect("end");
    match store.touch(new.id, None, at(70)).await.expect("touch") {
        TouchOutcome::Ended(r) => assert_eq!(r.session.ended_at(), Some(at(60))),
        other => panic!("expected ended, got {other:?}"),
    }
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(50));
    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert_eq!(
        store.touch(unknown, None, at(70)).await.expect("touch"),
        TouchOutcome::NotFound
    );
}

/// An end scoped to a tenant never touches another tenant's session: it answers like an
/// unknown one.
pub async fn end_is_scoped_to_its_tenant(store: &dyn Store) {
    let tenant = fresh_tenant();
    let new = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &new).await;
    assert!(
        store
            .end(
                new.id,
                Some("someone-else"),
                at(5),
                EndReason::Requested,
                None
            )
            .await
            .expect("end")
            .is_none()
    );
    assert_eq!(get(store, new.id).await.session.status(), Status::Started);
    let (r, t) = store
        .end(new.id, Some(&tenant), at(6), EndReason::Requested, None)
        .await
        .expect("end")
        .expect("found");
    assert_eq!(
        (t, r.session.ended_at()),
        (Transition::Committed, Some(at(6)))
    );
    assert!(
        store
            .end(
                new.id,
                Some("someone-else"),
                at(7),
                EndReason::Requested,
                None
            )
            .await
            .expect("end")
            .is_none(),
        "an ended session of another tenant is unknown too"
    );
}

/// The sweep query finds expired and orphaned started sessions, and nothing else.
pub async fn due_finds_expired_and_orphaned(store: &dyn Store) {
    let tenant = fresh_tenant();
    // Far in the past of every other test's sessions: only ours can be due at these times.
    let base = Timestamp::from_millis(T0 - 10_000_000_000);
    let later = |s: u64| base.saturating_add(Duration::from_secs(s));
    let orphan_timeout = Duration::from_secs(60);
    let expiring = new_session(&tenant, base, Duration::from_secs(30));
    let orphan = new_session(&tenant, base, Duration::from_secs(3600));
    let alive = new_session(&tenant, base, Duration::from_secs(3600));
    let tie = new_session(&tenant, base, Duration::from_secs(60));
    let ended = new_session(&tenant, base, Duration::from_secs(10));
    for n in [&expiring, &orphan, &alive, &tie, &ended] {
        create(store, n).await;
    }
    store
        .end(ended.id, None, later(1), EndReason::Requested, None)
        .await
        .expect("end");
    store.touch(alive.id, None, later(50)).await.expect("touch");

    let ours = |v: Vec<(SessionId, EndReason)>| -> Vec<(SessionId, EndReason)> {
        let mut v: Vec<_> = v
            .into_iter()
            .filter(|(id, _)| [expiring.id, orphan.id, alive.id, tie.id, ended.id].contains(id))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    };
    let d = ours(
        store
            .due(later(29), orphan_timeout, 1000)
            .await
            .expect("due"),
    );
    assert!(d.is_empty(), "nothing due yet: {d:?}");
    let d = ours(
        store
            .due(later(30), orphan_timeout, 1000)
            .await
            .expect("due"),
    );
    assert_eq!(d, [(expiring.id, EndReason::Expired)]);
    let mut want = vec![
        (expiring.id, EndReason::Expired),
        (orphan.id, EndReason::Orphaned),
        (tie.id, EndReason::Expired),
    ];
    want.sort_by_key(|(id, _)| *id);
    let d = ours(
        store
            .due(later(60), orphan_timeout, 1000)
            .await
            .expect("due"),
    );
    assert_eq!(
        d, want,
        "a tie between expiry and orphan timeout is an expiry"
    );
    let d = store.due(later(60), orphan_timeout, 1).await.expect("due");
    assert_eq!(d.len(), 1, "the limit holds");
}

/// The sweep gets the most overdue sessions first (by the earlier of their two deadlines),
/// and no more than its limit: with a full batch, the oldest orphans are never starved.
pub async fn due_is_most_overdue_first_within_its_limit(store: &dyn Store) {
    let tenant = fresh_tenant();
    // Before every other check's sessions: only these can be due at these times.
    let base = Timestamp::from_millis(T0 - 20_000_000_000);
    let later = |s: u64| base.saturating_add(Duration::from_secs(s));
    let orphan_timeout = Duration::from_secs(60);
    let mut by_deadline = Vec::new();
    // Created in an order unrelated to their deadlines.
    for (lifetime, seen) in [(50, 0), (3600, 5), (10, 0), (3600, 0), (30, 0)] {
        let new = new_session(&tenant, base, Duration::from_secs(lifetime));
        create(store, &new).await;
        if seen > 0 {
            store.touch(new.id, None, later(seen)).await.expect("touch");
        }
        let deadline = lifetime.min(seen + 60);
        by_deadline.push((deadline, new.id));
    }
    by_deadline.sort();
    let want: Vec<SessionId> = by_deadline.iter().map(|(_, id)| *id).collect();
    let got: Vec<SessionId> = store
        .due(later(100), orphan_timeout, 3)
        .await
        .expect("due")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, want[..3], "the three most overdue, most overdue first");
    let got: Vec<SessionId> = store
        .due(later(100), orphan_timeout, 10)
        .await
        .expect("due")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, want, "all five, most overdue first");
}

/// A node waiting on `watch_releases` is woken when another instance ends one of its
/// sessions that has something to release.
pub async fn watch_releases_wakes_a_waiting_node(store: &dyn Store) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let node = format!("node-{:x}", random() as u64);
    let woken = AtomicU32::new(0);
    let wake = || {
        woken.fetch_add(1, Ordering::SeqCst);
    };
    let mut new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    new.node = node.clone();
    create(store, &new).await;
    store.attach(new.id, res(1)).await.expect("attach");
    let check = async {
        // Let the watcher start listening (a store that pushes wakes once when it does).
        for _ in 0..100 {
            if woken.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        woken.store(0, Ordering::SeqCst);
        store
            .end(new.id, None, at(5), EndReason::Requested, None)
            .await
            .expect("end");
        for _ in 0..500 {
            if woken.load(Ordering::SeqCst) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the node was not woken");
    };
    tokio::select! {
        _ = store.watch_releases(&node, &wake) => panic!("watch_releases returned"),
        _ = check => {}
    }
}

/// A tenant never exceeds its concurrency limit; ended sessions free their place.
pub async fn plan_limit_is_enforced(store: &dyn Store) {
    let tenant = fresh_tenant();
    let mut first = None;
    for _ in 0..2 {
        let mut n = new_session(&tenant, at(0), Duration::from_secs(600));
        n.max_concurrent = Some(2);
        assert_eq!(
            store.create(n.clone()).await.expect("create"),
            CreateOutcome::Created
        );
        first.get_or_insert(n.id);
    }
    let mut third = new_session(&tenant, at(0), Duration::from_secs(600));
    third.max_concurrent = Some(2);
    assert_eq!(
        store.create(third.clone()).await.expect("create"),
        CreateOutcome::LimitReached
    );
    assert!(
        store.get(third.id).await.expect("get").is_none(),
        "a refused create writes nothing"
    );
    // Another tenant is not affected.
    let mut other = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    other.max_concurrent = Some(2);
    assert_eq!(
        store.create(other).await.expect("create"),
        CreateOutcome::Created
    );
    store
        .end(
            first.expect("created"),
            None,
            at(1),
            EndReason::Requested,
            None,
        )
        .await
        .expect("end");
    assert_eq!(
        store.create(third).await.expect("create"),
        CreateOutcome::Created
    );
}

/// 64 concurrent ends of one session: one commits, all see the same ending.
pub async fn concurrent_ends_commit_once(store: Arc<dyn Store>) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(&*store, &new).await;
    store.attach(new.id, res(1)).await.expect("attach");
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = Arc::clone(&store);
        let reason = EndReason::ALL[i as usize % EndReason::ALL.len()];
        tasks.push(tokio::spawn(async move {
            store
                .end(new.id, None, at(10 + i), reason, None)
                .await
                .expect("end")
                .expect("found")
        }));
    }
    let mut committed = 0;
    let mut first = None;
    for t in tasks {
        let (record, transition) = t.await.expect("task");
        if transition == Transition::Committed {
            committed += 1;
        }
        let first = first.get_or_insert_with(|| record.clone());
        assert_eq!(record.session.ending(), first.session.ending());
    }
    assert_eq!(committed, 1, "exactly one end commits");
    let r = get(&*store, new.id).await;
    assert_eq!(r.session.resources().len(), 1, "one intent per resource");
}
