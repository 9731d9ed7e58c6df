//! The conformance suite every [`Store`] implementation runs unchanged, as object_store's
//! `integration.rs` does for its backends: a new store is correct when this suite passes.
//!
//! Each function panics with a message on the first violation. They use fresh random ids,
//! so they can share one store and run in any order; [`run_all`] runs them all.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{
    EndReason, ReleaseState, Resource, ResourceKind, SessionId, Status, Timestamp, Transition,
};

use crate::store::{
    AttachOutcome, CreateOutcome, ListQuery, NewSession, SessionRecord, Store, StoreError,
    TouchOutcome,
};

/// 2024-01-15T10:30:00Z, the reference's start time.
const T0: u64 = 1_705_314_600_000;

fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

fn random() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("OS randomness");
    u128::from_le_bytes(b)
}

fn fresh_tenant() -> String {
    format!("tenant-{:x}", random() as u64)
}

/// The node the suite's sessions run on, unless a check says otherwise.
const NODE: &str = "a";

fn new_session(tenant: &str, started: Timestamp, lifetime: Duration) -> NewSession {
    NewSession {
        id: SessionId::from_ulid_parts(started, random()),
        tenant: tenant.to_owned(),
        started_at: started,
        expires_at: started.saturating_add(lifetime),
        metadata: None,
        room: None,
        max_concurrent: None,
        node: NODE.to_owned(),
    }
}

async fn create(store: &dyn Store, new: &NewSession) {
    let outcome = store.create(new.clone()).await.expect("create");
    assert_eq!(outcome, CreateOutcome::Created, "create {}", new.id);
}

async fn get(store: &dyn Store, id: SessionId) -> SessionRecord {
    store
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{id} not found"))
}

fn res(handle: u64) -> Resource {
    Resource {
        kind: ResourceKind(7),
        handle,
    }
}

/// Runs every check of the suite against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    create_and_get(&*store).await;
    duplicate_ids_are_refused(&*store).await;
    list_is_newest_first_tenant_scoped_and_paged(&*store).await;
    end_is_conditional_and_idempotent(&*store).await;
    end_records_release_intents(&*store).await;
    release_claims_follow_the_core(&*store).await;
    attach_is_refused_after_end(&*store).await;
    touch_moves_forward_only(&*store).await;
    due_finds_expired_and_orphaned(&*store).await;
    plan_limit_is_enforced(&*store).await;
    concurrent_ends_commit_once(Arc::clone(&store)).await;
    nodes_own_releases_and_dead_nodes_are_taken_over(&*store).await;
    room_events_track_presence(&*store).await;
    store.ping().await.expect("ping");
}

/// A created session reads back exactly, started, with nothing ended.
pub async fn create_and_get(store: &dyn Store) {
    let tenant = fresh_tenant();
    let mut new = new_session(&tenant, at(0), Duration::from_secs(600));
    new.metadata = Some(r#"{"user":"ada"}"#.to_owned());
    new.room = Some(crate::RoomBinding {
        provider: crate::RoomProvider::Livekit,
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
        .end(ids[2], at(10), EndReason::Requested)
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
        .end(new.id, at(160), EndReason::Requested)
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
            .end(new.id, when, reason)
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
        .end(late.id, at(400), EndReason::Expired)
        .await
        .expect("end")
        .expect("found");
    assert_eq!(r.session.ended_at(), Some(at(500)));

    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert!(
        store
            .end(unknown, at(1), EndReason::Requested)
            .await
            .expect("end")
            .is_none()
    );
}

/// Ending turns every held resource into a pending release due at the end, in the same
/// write, as the core's end does.
pub async fn end_records_release_intents(store: &dyn Store) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(store, &new).await;
    for h in [1, 2] {
        assert_eq!(
            store.attach(new.id, res(h)).await.expect("attach"),
            AttachOutcome::Attached
        );
    }
    let held = get(store, new.id).await;
    let states: Vec<_> = held
        .session
        .resources()
        .iter()
        .map(|r| (r.resource, r.release))
        .collect();
    assert_eq!(
        states,
        [(res(1), ReleaseState::Held), (res(2), ReleaseState::Held)]
    );

    let (r, _) = store
        .end(new.id, at(30), EndReason::Requested)
        .await
        .expect("end")
        .expect("found");
    for held in r.session.resources() {
        assert_eq!(
            held.release,
            ReleaseState::Pending {
                attempts: 0,
                retry_at: at(30)
            },
            "every held resource is due for release at the end"
        );
    }
    assert_eq!(r.session.resources().len(), 2);
    let mut core = held.session.clone();
    core.end(at(30), EndReason::Requested);
    assert_eq!(r.session, core, "the store's end is the core's end");
}

/// A unique node name, so that a check's claims see only its own sessions.
fn fresh_node() -> String {
    format!("node-{:x}", random() as u64)
}

/// Claims for `node` at `now`, keeping only the sessions in `ids`.
async fn claim(
    store: &dyn Store,
    node: &str,
    now: Timestamp,
    lease: Duration,
    ids: &[SessionId],
) -> Vec<SessionRecord> {
    store
        .claim_releases(node, now, lease, 10_000)
        .await
        .expect("claim")
        .into_iter()
        .filter(|r| ids.contains(r.session.id()))
        .collect()
}

/// Runs one release of a claimed session the way an engine does: asks the core for the
/// next resource, applies `outcome` at `now`, and records what the core decided (keeping
/// the claim when the next release is due at once). Returns the released resource and the
/// session as the core now sees it.
async fn release_one(
    store: &dyn Store,
    node: &str,
    session: &mut session_lifecycle::Session,
    now: Timestamp,
    outcome: session_lifecycle::ReleaseOutcome,
    note: &str,
    lease: Duration,
) -> Resource {
    use session_lifecycle::ReleaseStep;
    let policy = session_lifecycle::Policy::DEFAULT;
    let resource = session.poll_release(now).expect("a release is due");
    session
        .handle_release(now, resource, outcome, &policy)
        .expect("in flight");
    let release = session
        .resources()
        .iter()
        .find(|r| r.resource == resource)
        .expect("held")
        .release;
    let go_on = matches!(session.release_step(now), ReleaseStep::Due(_));
    store
        .record_release(
            node,
            crate::ReleaseProgress {
                session: *session.id(),
                attempt: Some(crate::ReleaseAttempt {
                    resource,
                    release,
                    note: note.to_owned(),
                }),
                next_release_at: session.next_release_at(),
                keep_claim_until: go_on.then(|| now.saturating_add(lease)),
            },
        )
        .await
        .expect("record");
    resource
}

/// Claims are per session and leased; a claimed session is not handed out again until
/// its claim is given up or lapses; a session is due when the core says its next release
/// is (in the core's order), not when any of its resources is; what the core decided is
/// what the store keeps.
pub async fn release_claims_follow_the_core(store: &dyn Store) {
    use session_lifecycle::ReleaseOutcome::{Failed, Released};
    let node = fresh_node();
    let mut new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    new.node = node.clone();
    create(store, &new).await;
    store.attach(new.id, res(10)).await.expect("attach");
    store.attach(new.id, res(11)).await.expect("attach");
    store
        .end(new.id, at(1), EndReason::Requested)
        .await
        .expect("end");
    let lease = Duration::from_secs(60);
    let ids = [new.id];

    let claimed = claim(store, &node, at(1), lease, &ids).await;
    assert_eq!(claimed.len(), 1, "the ended session is due at its end");
    assert!(
        claim(store, &node, at(2), lease, &ids).await.is_empty(),
        "a claimed session is not handed out again"
    );
    assert!(
        claim(store, "another-node", at(2), lease, &ids)
            .await
            .is_empty(),
        "another node never claims a release it cannot run"
    );

    // The core picks the last acquired resource first; it fails.
    let mut session = claimed[0].session.clone();
    let first = release_one(store, &node, &mut session, at(3), Failed, "busy", lease).await;
    assert_eq!(first, res(11), "the last acquired goes first");
    let retry = at(3).saturating_add(session_lifecycle::Policy::DEFAULT.release_backoff(1));
    let r = get(store, new.id).await;
    let state = |r: &SessionRecord, h| {
        r.session
            .resources()
            .iter()
            .find(|x| x.resource == res(h))
            .map(|x| x.release)
    };
    assert_eq!(
        state(&r, 11),
        Some(ReleaseState::Pending {
            attempts: 1,
            retry_at: retry
        })
    );
    assert_eq!(
        state(&r, 10),
        Some(ReleaseState::Pending {
            attempts: 0,
            retry_at: at(1)
        })
    );
    assert_eq!(r.release_errors, [(res(11), "busy".to_owned())]);

    // Resource 10 has been due since the end, but the core's next release is 11's retry:
    // the session is not handed out before it.
    assert!(
        claim(
            store,
            &node,
            Timestamp::from_millis(retry.as_millis() - 1),
            lease,
            &ids
        )
        .await
        .is_empty(),
        "not before the core's next release"
    );
    let claimed = claim(store, &node, retry, lease, &ids).await;
    assert_eq!(claimed.len(), 1);
    let mut session = claimed[0].session.clone();
    assert_eq!(
        session, r.session,
        "a claim hands out the session as recorded"
    );
    let second = release_one(
        store,
        &node,
        &mut session,
        retry,
        Released,
        "sigterm",
        lease,
    )
    .await;
    assert_eq!(second, res(11));
    // The worker goes on with 10 and keeps its claim meanwhile.
    assert!(
        claim(store, &node, retry, lease, &ids).await.is_empty(),
        "a kept claim holds"
    );
    let third = release_one(store, &node, &mut session, retry, Released, "freed", lease).await;
    assert_eq!(third, res(10));
    assert!(session.is_fully_released());

    let r = get(store, new.id).await;
    assert_eq!(r.session, session, "the store keeps what the core decided");
    assert_eq!(
        r.release_notes,
        [
            (res(10), "freed".to_owned()),
            (res(11), "sigterm".to_owned())
        ]
    );
    assert!(r.release_errors.is_empty());
    assert!(
        claim(store, &node, at(1000), lease, &ids).await.is_empty(),
        "released is final"
    );

    // A worker that dies mid-release: its claim lapses and the session is claimed again,
    // at the same resource.
    let mut other = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    other.node = node.clone();
    create(store, &other).await;
    store.attach(other.id, res(20)).await.expect("attach");
    store.attach(other.id, res(21)).await.expect("attach");
    store
        .end(other.id, at(5), EndReason::Orphaned)
        .await
        .expect("end");
    let ids = [other.id];
    assert_eq!(claim(store, &node, at(5), lease, &ids).await.len(), 1);
    assert!(claim(store, &node, at(64), lease, &ids).await.is_empty());
    let again = claim(store, &node, at(65), lease, &ids).await;
    assert_eq!(again.len(), 1, "a lapsed claim is taken over");
    let mut session = again[0].session.clone();
    assert_eq!(session.poll_release(at(65)), Some(res(21)));
    // Or the node restarts and drops its claims at once.
    store.drop_claims(&node).await.expect("drop");
    assert_eq!(claim(store, &node, at(66), lease, &ids).await.len(), 1);
}

/// A resource acquired after its session ended is refused, never kept.
pub async fn attach_is_refused_after_end(store: &dyn Store) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(store, &new).await;
    store
        .end(new.id, at(1), EndReason::Requested)
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
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(store, &new).await;
    assert_eq!(
        store.touch(new.id, at(50)).await.expect("touch"),
        TouchOutcome::Touched
    );
    assert_eq!(
        store.touch(new.id, at(20)).await.expect("touch"),
        TouchOutcome::Touched
    );
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(50));
    store
        .end(new.id, at(60), EndReason::Requested)
        .await
        .expect("end");
    assert_eq!(
        store.touch(new.id, at(70)).await.expect("touch"),
        TouchOutcome::Ended
    );
    let unknown = SessionId::from_ulid_parts(at(0), random());
    assert_eq!(
        store.touch(unknown, at(70)).await.expect("touch"),
        TouchOutcome::NotFound
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
        .end(ended.id, later(1), EndReason::Requested)
        .await
        .expect("end");
    store.touch(alive.id, later(50)).await.expect("touch");

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
        .end(first.expect("created"), at(1), EndReason::Requested)
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
        let reason = EndReason::ALL[(i % 8) as usize];
        tasks.push(tokio::spawn(async move {
            store
                .end(new.id, at(10 + i), reason)
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

/// Room events: applied once, unordered delivery tolerated, presence counts as liveness,
/// scoped to the tenant and to started sessions.
pub async fn room_events_track_presence(store: &dyn Store) {
    use crate::store::{RoomBinding, RoomEvent, RoomEventKind, RoomProvider};
    let tenant = fresh_tenant();
    let room = format!("room-{:x}", random() as u64);
    let mut new = new_session(&tenant, at(0), Duration::from_secs(3600));
    new.room = Some(RoomBinding {
        provider: RoomProvider::Livekit,
        name: room.clone(),
    });
    create(store, &new).await;
    let event = |id: &str, secs: u64, kind: RoomEventKind| RoomEvent {
        tenant: Some(tenant.clone()),
        provider: RoomProvider::Livekit,
        room: room.clone(),
        event_id: format!("{room}-{id}"),
        at: at(secs),
        kind,
    };
    let joined = |p: &str| RoomEventKind::Joined {
        participant: p.to_owned(),
    };
    let left = |p: &str| RoomEventKind::Left {
        participant: p.to_owned(),
    };

    let u = store
        .room_event(event("1", 10, joined("ada")), at(10))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u.len(), 1);
    assert_eq!(
        (u[0].session, u[0].present, u[0].ever_joined, u[0].finished),
        (new.id, 1, true, false)
    );
    assert_eq!(
        get(store, new.id).await.session.last_seen_at(),
        at(10),
        "a join is liveness"
    );
    // The same event again: applied once.
    assert!(
        store
            .room_event(event("1", 10, joined("ada")), at(11))
            .await
            .expect("event")
            .is_none()
    );
    // Bob's leave (t=30) arrives before his join (t=20): he ends up absent.
    let u = store
        .room_event(event("3", 30, left("bob")), at(12))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u[0].present, 1);
    let u = store
        .room_event(event("2", 20, joined("bob")), at(13))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u[0].present, 1, "an older join does not undo a newer leave");
    assert_eq!(store.room_presence(new.id).await.expect("presence"), 1);

    // Presence keeps the session alive.
    let touched = store.touch_present(at(500)).await.expect("touch");
    assert!(touched.contains(&new.id));
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(500));

    // Another tenant's events for the same room name do not reach it.
    let mut foreign = event("4", 40, left("ada"));
    foreign.tenant = Some(fresh_tenant());
    let u = store
        .room_event(foreign, at(14))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u.is_empty());

    let u = store
        .room_event(event("5", 50, left("ada")), at(15))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!((u[0].present, u[0].ever_joined), (0, true));
    let u = store
        .room_event(event("6", 60, RoomEventKind::Finished), at(16))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u[0].finished);

    // Ended sessions are not concerned; neither are unknown rooms.
    store
        .end(new.id, at(70), EndReason::RoomEmpty)
        .await
        .expect("end");
    let u = store
        .room_event(event("7", 70, joined("cy")), at(17))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u.is_empty());
    assert!(
        !store
            .touch_present(at(600))
            .await
            .expect("touch")
            .contains(&new.id)
    );
    let mut unknown = event("8", 80, joined("cy"));
    unknown.room = "no-such-room".to_owned();
    assert!(
        store
            .room_event(unknown, at(18))
            .await
            .expect("event")
            .expect("fresh")
            .is_empty()
    );
}

/// Releases run on the node that holds the resources; a node whose heartbeat lapsed has
/// its started sessions ended `orphaned` by another node, and its unreleased resources
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
        .end(s1.id, at(1), EndReason::Requested)
        .await
        .expect("end");
    assert!(
        claimed(nb.clone(), at(1), ids.clone()).await.is_empty(),
        "another node never claims a release it cannot run"
    );
    assert_eq!(claimed(na.clone(), at(1), ids.clone()).await, [s1.id]);
    store.drop_claims(&na).await.expect("drop");

    // na stops heartbeating; nb stays alive.
    store.node_alive(&nb, at(100)).await.expect("heartbeat");
    let timeout = Duration::from_secs(30);
    let ended = store
        .end_dead_nodes(&nb, at(20), timeout, 1000)
        .await
        .expect("takeover");
    assert!(
        !ended.iter().any(|id| ids.contains(id)),
        "not dead before the timeout"
    );
    let ended = store
        .end_dead_nodes(&nb, at(100), timeout, 1000)
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
    assert_eq!(r.session.end_reason(), Some(EndReason::Orphaned));
    assert_eq!(r.session.ended_at(), Some(at(100)));
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
            .end_dead_nodes(&nb, at(110), timeout, 1000)
            .await
            .expect("takeover")
            .iter()
            .all(|id| !ids.contains(id)),
        "a takeover happens once"
    );
    assert!(
        claimed(nb.clone(), at(110), ids.clone()).await.is_empty(),
        "lost resources cannot be freed from elsewhere"
    );

    // na returns with its id: it is alive again and settles what it owes.
    store.node_alive(&na, at(200)).await.expect("heartbeat");
    let owed = claim(store, &na, at(200), lease, &ids).await;
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
            at(201),
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
            .end_dead_nodes(&nb, at(210), timeout, 1000)
            .await
            .expect("takeover")
            .iter()
            .all(|id| !ids.contains(id)),
        "a returned node is alive"
    );
}
