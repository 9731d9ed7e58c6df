//! The event outbox: events written with their causes, fanned out once, delivered in each
//! session's order, claimed once at a time.

use std::time::Duration;

use session_lifecycle::{EndReason, EventKind, ReleaseOutcome, SessionId};

use super::releases::{fresh_node, release_one};
use super::support::{at, create, fresh_tenant, get, new_session, res};
use crate::outbox::{
    Delivery, DeliveryAttempt, DeliveryNext, DeliveryQuery, DeliveryStatus, Dispatch, Fanout,
    SessionEvent,
};
use crate::record::{AttachOutcome, ReleaseClaim};
use crate::store::Store;

/// The lifecycle events of `tenant` not fanned out yet (its usage events are left out:
/// the usage suite's concern, written with their records in an order of their own).
async fn undispatched(store: &dyn Store, tenant: &str) -> Vec<(SessionId, EventKind)> {
    store
        .undispatched_events(100_000)
        .await
        .expect("undispatched")
        .into_iter()
        .filter(|e| e.tenant == tenant && !matches!(e.kind, EventKind::UsageRecorded(_)))
        .map(|e| (e.session, e.kind))
        .collect()
}

async fn claim_of(store: &dyn Store, node: &str, secs: u64, tenant: &str) -> Vec<Delivery> {
    store
        .claim_deliveries(
            node,
            at(secs),
            Duration::from_secs(30),
            10_000,
            10_000,
            vec![],
        )
        .await
        .expect("claim deliveries")
        .into_iter()
        .filter(|d| d.tenant == tenant)
        .collect()
}

fn attempt(d: &Delivery, secs: u64, code: u16, next: DeliveryNext) -> DeliveryAttempt {
    DeliveryAttempt {
        id: d.id,
        at: at(secs),
        status_code: Some(code),
        error: (code >= 300).then(|| format!("answered {code}")),
        next,
    }
}

/// Each state change writes its event in the same step, once: `started` with the create,
/// `ended` with the end (and `released` with the end of a session that held nothing),
/// `released` with the last release. Fanning out is once per event and gives stream
/// positions in order; a session's deliveries to an endpoint go in its order, claimed once
/// at a time, and a failed one does not hold the next back.
pub async fn outbox_follows_the_session_and_delivers_in_order(store: &dyn Store) {
    let tenant = fresh_tenant();
    let node = fresh_node();
    let mut a = new_session(&tenant, at(0), Duration::from_secs(600));
    a.node = node.clone();
    a.callback_url = Some("https://hooks.example/a".to_owned());
    let b = new_session(&tenant, at(1), Duration::from_secs(600));
    create(store, &a).await;
    create(store, &b).await;
    assert_eq!(
        store.attach(a.id, res(1)).await.expect("attach"),
        AttachOutcome::Attached
    );
    let started: Vec<SessionEvent> = store
        .undispatched_events(100_000)
        .await
        .expect("undispatched")
        .into_iter()
        .filter(|e| e.tenant == tenant)
        .collect();
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(
        (started[0].session, started[0].kind, started[0].at),
        (a.id, EventKind::Started, at(0))
    );
    assert_eq!(
        started[0].callback_url.as_deref(),
        Some("https://hooks.example/a")
    );
    assert_eq!(started[0].position, None);
    assert_eq!(started[1].callback_url, None);

    store
        .end(b.id, None, at(10), EndReason::Requested, None)
        .await
        .expect("end b");
    let claim_a = ReleaseClaim {
        node: node.clone(),
        until: at(50),
    };
    store
        .end(a.id, None, at(20), EndReason::Expired, Some(claim_a))
        .await
        .expect("end a");
    // Ending again writes nothing more.
    store
        .end(a.id, None, at(21), EndReason::Requested, None)
        .await
        .expect("end a again");
    let mut session = get(store, a.id).await.session;
    release_one(
        store,
        &node,
        &mut session,
        at(25),
        ReleaseOutcome::Released,
        "freed",
        Duration::from_secs(30),
    )
    .await;
    let written = undispatched(store, &tenant).await;
    assert_eq!(
        written,
        [
            (a.id, EventKind::Started),
            (b.id, EventKind::Started),
            (b.id, EventKind::Ended),
            (b.id, EventKind::Released),
            (a.id, EventKind::Ended),
            (a.id, EventKind::Released),
        ],
        "events in the order their causes were written"
    );
    let events = store.undispatched_events(100_000).await.expect("events");
    let at_of = |id: SessionId, kind: EventKind| {
        events
            .iter()
            .find(|e| e.session == id && e.kind == kind)
            .map(|e| e.at)
    };
    assert_eq!(at_of(b.id, EventKind::Released), Some(at(10)));
    assert_eq!(at_of(a.id, EventKind::Ended), Some(at(20)));
    assert_eq!(at_of(a.id, EventKind::Released), Some(at(25)));

    // Fan out, once each, to one endpoint.
    let hook = || {
        vec![Fanout {
            endpoint: "hook".to_owned(),
            url: "https://hooks.example/all".to_owned(),
            origin: "https://hooks.example".to_owned(),
        }]
    };
    let dispatch = |list: &[(SessionId, EventKind)]| {
        list.iter()
            .map(|(session, kind)| Dispatch {
                session: *session,
                kind: *kind,
                to: hook(),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store
            .dispatch_events(dispatch(&written[..2]), at(30))
            .await
            .expect("dispatch"),
        2
    );
    assert_eq!(
        store
            .dispatch_events(dispatch(&written), at(30))
            .await
            .expect("dispatch"),
        4,
        "each event fanned out once"
    );
    assert_eq!(
        store
            .dispatch_events(dispatch(&written), at(30))
            .await
            .expect("again"),
        0
    );
    assert!(undispatched(store, &tenant).await.is_empty());
    let stream = store
        .events_after(Some(&tenant), None, 0, 1000)
        .await
        .expect("stream");
    let order: Vec<(SessionId, EventKind)> = stream.iter().map(|e| (e.session, e.kind)).collect();
    assert_eq!(order, written, "the stream is in fan-out order");
    assert!(
        stream.windows(2).all(|w| w[0].position < w[1].position),
        "positions increase: {stream:?}"
    );
    let third = stream[2].position.expect("position");
    let rest = store
        .events_after(Some(&tenant), None, third, 1000)
        .await
        .expect("rest");
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[0].position, stream[3].position);
    let other = store
        .events_after(Some(&fresh_tenant()), None, 0, 1000)
        .await
        .expect("other tenant");
    assert!(other.is_empty(), "another tenant's stream is its own");
    let of_b: Vec<(SessionId, EventKind)> = store
        .events_after(Some(&tenant), Some(b.id), 0, 1000)
        .await
        .expect("one session's")
        .iter()
        .map(|e| (e.session, e.kind))
        .collect();
    assert_eq!(
        of_b,
        [
            (b.id, EventKind::Started),
            (b.id, EventKind::Ended),
            (b.id, EventKind::Released)
        ]
    );

    // Only each session's first pending event is claimable, once.
    let first = claim_of(store, "n1", 31, &tenant).await;
    let kinds: Vec<(SessionId, EventKind)> = first.iter().map(|d| (d.session, d.kind)).collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(
        kinds.contains(&(a.id, EventKind::Started)) && kinds.contains(&(b.id, EventKind::Started))
    );
    assert!(
        claim_of(store, "n2", 31, &tenant).await.is_empty(),
        "claimed once"
    );
    let a_started = first.iter().find(|d| d.session == a.id).expect("a").clone();
    let b_started = first.iter().find(|d| d.session == b.id).expect("b").clone();
    assert_eq!(
        (a_started.url.as_str(), a_started.endpoint.as_str()),
        ("https://hooks.example/all", "hook")
    );
    assert_eq!(a_started.event_at, at(0));

    // Another node's word on a claim is not taken.
    store
        .record_deliveries(
            "n2",
            vec![attempt(&b_started, 32, 200, DeliveryNext::Delivered)],
        )
        .await
        .expect("record");
    store
        .record_deliveries(
            "n1",
            vec![attempt(&a_started, 32, 500, DeliveryNext::RetryAt(at(200)))],
        )
        .await
        .expect("record");
    assert!(
        claim_of(store, "n2", 33, &tenant).await.is_empty(),
        "b's claim holds"
    );
    store
        .record_deliveries(
            "n1",
            vec![attempt(&b_started, 33, 204, DeliveryNext::Delivered)],
        )
        .await
        .expect("record");
    let next = claim_of(store, "n2", 34, &tenant).await;
    assert_eq!(
        next.iter().map(|d| (d.session, d.kind)).collect::<Vec<_>>(),
        [(b.id, EventKind::Ended)],
        "a waits for its retry; b goes on in order"
    );
    store
        .record_deliveries("n2", vec![attempt(&next[0], 35, 410, DeliveryNext::Failed)])
        .await
        .expect("record");
    let after_failure = claim_of(store, "n2", 36, &tenant).await;
    assert_eq!(
        after_failure
            .iter()
            .map(|d| (d.session, d.kind))
            .collect::<Vec<_>>(),
        [(b.id, EventKind::Released)],
        "a failed delivery does not hold the next back"
    );
    store
        .unclaim_delivery("n2", after_failure[0].id)
        .await
        .expect("unclaim");
    assert_eq!(
        claim_of(store, "n3", 36, &tenant).await.len(),
        1,
        "given up at once"
    );

    let failed = store
        .deliveries(DeliveryQuery {
            tenant: Some(tenant.clone()),
            session: Some(b.id),
            status: Some(DeliveryStatus::Failed),
            limit: 10,
        })
        .await
        .expect("deliveries");
    assert_eq!(failed.len(), 1);
    let f = &failed[0];
    assert_eq!(
        (f.kind, f.attempts, f.last_status_code),
        (EventKind::Ended, 1, Some(410))
    );
    assert_eq!(f.last_attempt_at, Some(at(35)));
    assert_eq!(f.next_attempt_at, None);
    let a_retrying = store
        .deliveries(DeliveryQuery {
            tenant: Some(tenant.clone()),
            session: Some(a.id),
            status: None,
            limit: 10,
        })
        .await
        .expect("deliveries");
    assert_eq!(a_retrying.len(), 3, "newest first: {a_retrying:?}");
    assert_eq!(a_retrying[2].kind, EventKind::Started);
    assert_eq!(a_retrying[2].next_attempt_at, Some(at(200)));
    assert_eq!(a_retrying[2].last_error.as_deref(), Some("answered 500"));
    assert!(a_retrying[0].id > a_retrying[2].id);

    // A retry by hand: in scope only, fresh period, due now; a delivered one stays.
    assert_eq!(
        store
            .retry_delivery(Some(&fresh_tenant()), f.id, at(300))
            .await
            .expect("retry"),
        None
    );
    let again = store
        .retry_delivery(Some(&tenant), f.id, at(300))
        .await
        .expect("retry")
        .expect("found");
    assert_eq!(again.status, DeliveryStatus::Pending);
    assert_eq!(
        (again.created_at, again.next_attempt_at),
        (at(300), Some(at(300)))
    );
    let done = store
        .retry_delivery(None, b_started.id, at(300))
        .await
        .expect("retry")
        .expect("found");
    assert_eq!(done.status, DeliveryStatus::Delivered);

    let counts = store.delivery_counts().await.expect("counts");
    assert!(counts.delivered >= 1 && counts.retrying >= 1 && counts.pending >= 1);
    assert!(counts.oldest_pending_at.is_some());
}

/// A claim takes at most so many deliveries to one origin (whatever their paths), and
/// none to a busy one.
pub async fn claims_are_bounded_per_origin(store: &dyn Store) {
    let tenant = fresh_tenant();
    let mut sessions = Vec::new();
    for i in 0..3 {
        let new = new_session(&tenant, at(i), Duration::from_secs(600));
        create(store, &new).await;
        sessions.push(new.id);
    }
    let slow = |path: String| Fanout {
        endpoint: "hook".to_owned(),
        url: format!("https://slow.example/{path}"),
        origin: "https://slow.example".to_owned(),
    };
    let mut batch = Vec::new();
    for (i, id) in sessions.iter().enumerate() {
        let mut to = vec![slow(format!("session/{i}"))];
        if i == 0 {
            to.push(Fanout {
                endpoint: "other".to_owned(),
                url: "https://fast.example/hook".to_owned(),
                origin: "https://fast.example".to_owned(),
            });
        }
        batch.push(Dispatch {
            session: *id,
            kind: EventKind::Started,
            to,
        });
    }
    assert_eq!(
        store.dispatch_events(batch, at(5)).await.expect("dispatch"),
        3
    );
    let busy = store
        .claim_deliveries(
            "n",
            at(6),
            Duration::from_secs(30),
            10_000,
            2,
            vec![
                "https://slow.example".to_owned(),
                "https://fast.example".to_owned(),
            ],
        )
        .await
        .expect("claim");
    assert!(
        busy.iter().all(|d| d.tenant != tenant),
        "busy origins are left alone: {busy:?}"
    );
    let claimed: Vec<Delivery> = store
        .claim_deliveries("n", at(6), Duration::from_secs(30), 10_000, 2, vec![])
        .await
        .expect("claim")
        .into_iter()
        .filter(|d| d.tenant == tenant)
        .collect();
    let to_slow = claimed
        .iter()
        .filter(|d| d.url.starts_with("https://slow.example/"))
        .count();
    assert_eq!(
        to_slow, 2,
        "two to one origin, whatever the paths: {claimed:?}"
    );
    assert_eq!(
        claimed.len(),
        3,
        "the other origin is not held back: {claimed:?}"
    );
}

/// A started session is ready once: `ready_at` and its `session.ready` event in one step;
/// again, or after its end, nothing is written.
pub async fn readiness_is_recorded_once(store: &dyn Store) {
    let tenant = fresh_tenant();
    let new = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &new).await;
    assert!(store.record_ready(new.id, at(2)).await.expect("ready"));
    assert!(!store.record_ready(new.id, at(3)).await.expect("again"));
    assert_eq!(get(store, new.id).await.ready_at, Some(at(2)));
    let ready: Vec<_> = store
        .undispatched_events(100_000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.session == new.id && e.kind == EventKind::Ready)
        .map(|e| e.at)
        .collect();
    assert_eq!(ready, [at(2)]);
    let late = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &late).await;
    store
        .end(late.id, None, at(1), EndReason::StartFailed, None)
        .await
        .expect("end");
    assert!(!store.record_ready(late.id, at(2)).await.expect("ended"));
    assert_eq!(get(store, late.id).await.ready_at, None);
    assert!(
        !store
            .record_ready(new_session(&tenant, at(0), Duration::ZERO).id, at(2))
            .await
            .expect("unknown")
    );
}

/// Pruning forgets deliveries that are done and events with no delivery left, and old
/// idempotency keys; never a pending delivery or its event.
pub async fn pruning_forgets_only_what_is_done(store: &dyn Store) {
    let tenant = fresh_tenant();
    let new = new_session(&tenant, at(0), Duration::from_secs(600));
    create(store, &new).await;
    store
        .end(new.id, None, at(1), EndReason::Requested, None)
        .await
        .expect("end");
    let to = || {
        vec![Fanout {
            endpoint: "hook".to_owned(),
            url: "https://prune.example/hook".to_owned(),
            origin: "https://prune.example".to_owned(),
        }]
    };
    let batch = [EventKind::Started, EventKind::Ended, EventKind::Released]
        .into_iter()
        .map(|kind| Dispatch {
            session: new.id,
            kind,
            to: to(),
        })
        .collect();
    assert_eq!(
        store.dispatch_events(batch, at(2)).await.expect("dispatch"),
        3
    );
    let started = claim_of(store, "p", 3, &tenant).await;
    assert_eq!(started.len(), 1);
    store
        .record_deliveries(
            "p",
            vec![attempt(&started[0], 3, 204, DeliveryNext::Delivered)],
        )
        .await
        .expect("record");
    store
        .begin_idempotent(
            crate::idempotency::IdempotentRequest {
                tenant: tenant.clone(),
                key: "old".to_owned(),
                request_hash: "h".to_owned(),
            },
            new.id,
            at(0),
            Duration::from_secs(30),
            Duration::from_secs(3600),
        )
        .await
        .expect("key");
    let gone = store
        .prune_outbox(at(100), at(1), 100_000)
        .await
        .expect("prune");
    assert!(gone >= 3, "a delivery, its event and a key: {gone}");
    let left: Vec<EventKind> = store
        .events_after(Some(&tenant), None, 0, 100)
        .await
        .expect("events")
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        left,
        [EventKind::Ended, EventKind::Released],
        "pending ones stay"
    );
    let deliveries = store
        .deliveries(DeliveryQuery {
            tenant: Some(tenant.clone()),
            session: None,
            status: None,
            limit: 10,
        })
        .await
        .expect("deliveries");
    assert_eq!(deliveries.len(), 2);
    assert!(
        deliveries
            .iter()
            .all(|d| d.status == DeliveryStatus::Pending)
    );
    assert!(
        matches!(
            store
                .begin_idempotent(
                    crate::idempotency::IdempotentRequest {
                        tenant: tenant.clone(),
                        key: "old".to_owned(),
                        request_hash: "other".to_owned(),
                    },
                    new.id,
                    at(2),
                    Duration::from_secs(30),
                    Duration::from_secs(3600),
                )
                .await
                .expect("key"),
            crate::idempotency::IdempotencyBegin::Proceed { .. }
        ),
        "the pruned key is free"
    );
}
