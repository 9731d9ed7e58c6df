//! The engine's own tests, on the in-memory reference store and a manual clock: no
//! database, no real time, milliseconds each.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lifecycle::{
    Clock, EndReason, Policy, ReleaseState, Resource, ResourceKind, SessionId, Status, Timestamp,
};

use super::{Engine, EngineConfig, EngineError, Plan, StartRequest};
use crate::backend::{
    AcquireError, AcquireRequest, Acquired, EventSink, ReleaseError, ReleaseNote, ResourceBackend,
};
use crate::clock::ManualClock;
use session_lifecycle_store::MemoryStore;
use session_lifecycle_store::faults::{FaultPlan, FaultyStore};
use session_lifecycle_store::{BoxFuture, SessionStore, Store};

/// 2024-01-15T10:30:00Z.
fn t0() -> Timestamp {
    Timestamp::from_millis(1_705_314_600_000)
}

fn request() -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "t".into(),
        plan: Plan::new(None, Duration::from_secs(3600)),
        duration: None,
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

/// A backend whose releases finish at once, logged in one list shared by all backends.
struct Instant {
    kind: u16,
    next: AtomicU64,
    fail: AtomicBool,
    log: Arc<Mutex<Vec<(SessionId, u16)>>>,
}

impl Instant {
    fn new(kind: u16, log: &Arc<Mutex<Vec<(SessionId, u16)>>>) -> Arc<Instant> {
        Arc::new(Instant {
            kind,
            next: AtomicU64::new(1),
            fail: AtomicBool::new(false),
            log: Arc::clone(log),
        })
    }
}

impl ResourceBackend for Instant {
    fn kind(&self) -> ResourceKind {
        ResourceKind(self.kind)
    }
    fn name(&self) -> &'static str {
        "instant"
    }
    fn acquire<'a>(
        &'a self,
        _request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        let handle = self.next.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(Acquired {
                resource: Resource {
                    kind: ResourceKind(self.kind),
                    handle,
                },
                env: Vec::new(),
            })
        })
    }
    fn release(
        &self,
        session: SessionId,
        _resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            if self.fail.load(Ordering::SeqCst) {
                return Err(ReleaseError::transient("refused for the test"));
            }
            self.log.lock().unwrap().push((session, self.kind));
            Ok(ReleaseNote::Other("done".into()))
        })
    }
}

async fn engine(
    store: Arc<dyn Store>,
    backends: Vec<Arc<dyn ResourceBackend>>,
    clock: &ManualClock,
) -> Engine {
    Engine::open(
        store,
        backends,
        Arc::new(clock.clone()),
        EngineConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_api_end_and_a_heartbeat_are_one_store_call_each() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultPlan::None,
    ));
    let engine = engine(store.clone(), Vec::new(), &clock).await;
    let a = *engine.start(request()).await.unwrap().session.id();
    let b = *engine.start(request()).await.unwrap().session.id();

    let before = store.calls();
    let touched = engine.touch(Some("t"), a).await.unwrap();
    assert_eq!(touched.session.last_seen_at(), t0());
    assert_eq!(store.calls() - before, 1, "a heartbeat is one store call");

    let before = store.calls();
    let ended = engine
        .end(Some("t"), b, EndReason::Requested)
        .await
        .unwrap();
    assert_eq!(ended.session.status(), Status::Ended);
    assert_eq!(store.calls() - before, 1, "an API end is one store call");

    // Another tenant's session: one call too, and nothing happens.
    let before = store.calls();
    assert!(matches!(
        engine.end(Some("other"), a, EndReason::Requested).await,
        Err(EngineError::NotFound)
    ));
    assert!(matches!(
        engine.touch(Some("other"), a).await,
        Err(EngineError::NotFound)
    ));
    assert_eq!(store.calls() - before, 2);
    assert_eq!(
        engine.get(None, a).await.unwrap().session.status(),
        Status::Started
    );
}

#[tokio::test]
async fn releases_go_one_at_a_time_in_reverse_and_retry_on_the_injected_clock() {
    let clock = ManualClock::new(t0());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (gpu, process, extra) = (
        Instant::new(1, &log),
        Instant::new(2, &log),
        Instant::new(3, &log),
    );
    let engine = engine(
        Arc::new(MemoryStore::new()),
        vec![gpu.clone(), process.clone(), extra.clone()],
        &clock,
    )
    .await;
    let id = *engine.start(request()).await.unwrap().session.id();
    // The process release fails: the GPU waits for it.
    process.fail.store(true, Ordering::SeqCst);
    engine.end(None, id, EndReason::Requested).await.unwrap();
    let report = engine.run_due().await.unwrap();
    assert_eq!((report.released, report.release_failures), (1, 1));
    assert_eq!(*log.lock().unwrap(), [(id, 3)], "the last acquired first");
    let r = engine.get(None, id).await.unwrap();
    let retry_at = clock
        .now()
        .saturating_add(Policy::DEFAULT.release_backoff(1));
    assert_eq!(
        r.session.resources()[1].release,
        ReleaseState::Pending {
            attempts: 1,
            retry_at
        }
    );
    assert_eq!(r.release_errors.len(), 1);

    // Not before its backoff, on the engine's clock, however often it runs.
    process.fail.store(false, Ordering::SeqCst);
    engine.run_due().await.unwrap();
    assert_eq!(log.lock().unwrap().len(), 1);
    clock.set(retry_at);
    let report = engine.run_due().await.unwrap();
    assert_eq!(report.released, 2);
    assert_eq!(*log.lock().unwrap(), [(id, 3), (id, 2), (id, 1)]);
    assert!(
        engine
            .get(None, id)
            .await
            .unwrap()
            .session
            .is_fully_released()
    );
}

#[tokio::test]
async fn timers_end_expiries_and_orphans_on_the_injected_clock() {
    let clock = ManualClock::new(t0());
    let engine = engine(Arc::new(MemoryStore::new()), Vec::new(), &clock).await;
    let mut short = request();
    short.duration = Some(Duration::from_secs(30));
    let expiring = *engine.start(short).await.unwrap().session.id();
    let orphan = *engine.start(request()).await.unwrap().session.id();
    let alive = *engine.start(request()).await.unwrap().session.id();
    assert_eq!(
        engine.next_timer(),
        Some(t0().saturating_add(Duration::from_secs(30)))
    );
    clock.advance(Duration::from_secs(30));
    assert_eq!(engine.run_due().await.unwrap().expired, 1);
    clock.advance(Duration::from_secs(29));
    engine.touch(None, alive).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let report = engine.run_due().await.unwrap();
    assert_eq!(report.orphaned, 1);
    let reason = |id| {
        let engine = engine.clone();
        async move { engine.get(None, id).await.unwrap().session.end_reason() }
    };
    assert_eq!(reason(expiring).await, Some(EndReason::Expired));
    assert_eq!(reason(orphan).await, Some(EndReason::Orphaned));
    assert_eq!(reason(alive).await, None);
}

#[tokio::test]
async fn an_outage_is_not_silence() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultPlan::None,
    ));
    let engine = engine(store.clone(), Vec::new(), &clock).await;
    let id = *engine.start(request()).await.unwrap().session.id();
    // A signal, then the store goes away for twice the orphan timeout; a signal arrives
    // during the outage and is kept.
    clock.advance(Duration::from_secs(10));
    engine.touch(None, id).await.unwrap();
    store.take_down();
    clock.advance(Duration::from_secs(60));
    assert!(engine.touch(None, id).await.is_err());
    clock.advance(Duration::from_secs(60));
    assert!(engine.run_due().await.is_err());
    store.restore();
    // Back: the kept signal is written first, and nothing is judged while it settles.
    engine.run_due().await.unwrap();
    clock.advance(EngineConfig::default().outage_settle);
    let report = engine.run_due().await.unwrap();
    assert_eq!(report.orphaned, 0, "the outage ended nothing");
    let r = engine.get(None, id).await.unwrap();
    assert_eq!(r.session.status(), Status::Started);
    assert_eq!(
        r.session.last_seen_at(),
        t0().saturating_add(Duration::from_secs(70)),
        "the signal received during the outage was written"
    );
    // Silence after the outage still counts: it is an orphan once the timeout has passed
    // in reachable time.
    clock.advance(Duration::from_secs(61));
    assert_eq!(engine.run_due().await.unwrap().orphaned, 1);
}

/// Each store call of a start fails in turn (once, as a lost connection would): the
/// create answers with the session it recorded (resources included), or it fails and no
/// started session is left behind.
#[tokio::test]
async fn a_committed_create_is_answered_or_nothing_is_left() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backends: Vec<Arc<dyn ResourceBackend>> =
        vec![Instant::new(1, &log), Instant::new(2, &log)];
    // How many calls opening the engine makes: the start's come after them.
    let probe = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()),
        FaultPlan::None,
    ));
    let clock = ManualClock::new(t0());
    drop(engine(probe.clone(), backends.clone(), &clock).await);
    let opening = probe.calls();
    for k in opening + 1..=opening + 4 {
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone(), FaultPlan::Once(k)));
        let engine = engine(faulty, backends.clone(), &clock).await;
        match engine.start(request()).await {
            Ok(answer) => {
                let stored = memory.get(*answer.session.id()).await.unwrap().unwrap();
                assert_eq!(
                    answer.session, stored.session,
                    "call {k} failed: the answer is what was recorded"
                );
                assert_eq!(answer.session.resources().len(), 2);
            }
            Err(e) => {
                let started = memory
                    .list(session_lifecycle_store::ListQuery {
                        tenant: Some("t".into()),
                        status: Some(Status::Started),
                        limit: 100,
                        before: None,
                        node: None,
                    })
                    .await
                    .unwrap();
                assert!(
                    started.is_empty(),
                    "call {k} failed, answered {e}, but a started session is left: {started:?}"
                );
            }
        }
    }
}

/// An engine for `node` on `store`, with the WebSocket grace `grace`.
async fn node_engine(
    store: Arc<dyn Store>,
    clock: &ManualClock,
    node: &str,
    grace: Duration,
) -> Engine {
    let config = EngineConfig {
        node: node.to_owned(),
        websocket_grace: grace,
        ..EngineConfig::default()
    };
    Engine::open(store, Vec::new(), Arc::new(clock.clone()), config)
        .await
        .unwrap()
}

/// Lets the engines' tasks run until they wait again (the store is in memory: nothing
/// they do waits on anything else).
async fn settle() {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn status(engine: &Engine, id: SessionId) -> (Status, Option<EndReason>) {
    let s = engine.get(None, id).await.unwrap().session;
    (s.status(), s.end_reason())
}

#[tokio::test]
async fn a_session_lives_while_any_instance_holds_a_socket_of_it() {
    let clock = ManualClock::new(t0());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let grace = Duration::from_secs(3);
    let a = node_engine(Arc::clone(&store), &clock, "a", grace).await;
    let b = node_engine(Arc::clone(&store), &clock, "b", grace).await;
    let id = *a.start(request()).await.unwrap().session.id();
    let (on_a, _) = a.hold_socket(Some("t"), id).await.unwrap();
    let (on_b, _) = b.hold_socket(Some("t"), id).await.unwrap();
    drop(on_a);
    clock.advance(grace * 2);
    settle().await;
    assert_eq!(
        status(&a, id).await.0,
        Status::Started,
        "b still holds a socket"
    );
    drop(on_b);
    clock.advance(grace - Duration::from_millis(1));
    settle().await;
    assert_eq!(status(&a, id).await.0, Status::Started, "within the grace");
    clock.advance(Duration::from_millis(1));
    settle().await;
    assert_eq!(
        status(&a, id).await,
        (Status::Ended, Some(EndReason::WebsocketDisconnected))
    );
    // Held sockets never let the orphan timer fire meanwhile; nothing is written per
    // socket beyond a node's first hold and its letting go.
    assert_eq!(a.metrics().snapshot().presence_writes, 2);
    assert_eq!(b.metrics().snapshot().presence_writes, 2);
}

#[tokio::test]
async fn a_client_that_reconnects_elsewhere_within_the_grace_keeps_its_session() {
    let clock = ManualClock::new(t0());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let grace = Duration::from_secs(3);
    let a = node_engine(Arc::clone(&store), &clock, "a", grace).await;
    let b = node_engine(Arc::clone(&store), &clock, "b", grace).await;
    // Both nodes alive (heartbeats) and sweeping, on the manual clock.
    let _background = (a.spawn_background(), b.spawn_background());
    let id = *a.start(request()).await.unwrap().session.id();
    let (on_a, _) = a.hold_socket(Some("t"), id).await.unwrap();
    drop(on_a);
    clock.advance(Duration::from_millis(500));
    let (on_b, _) = b.hold_socket(Some("t"), id).await.unwrap();
    clock.advance(grace * 2);
    settle().await;
    assert_eq!(status(&a, id).await.0, Status::Started);
    // Held for longer than the orphan timeout: a held socket is liveness.
    for _ in 0..Policy::DEFAULT.orphan_timeout.as_secs() * 2 {
        clock.advance(Duration::from_secs(1));
        settle().await;
    }
    assert_eq!(
        status(&a, id).await.0,
        Status::Started,
        "no orphan while held"
    );
    drop(on_b);
    clock.advance(grace);
    settle().await;
    assert_eq!(
        status(&a, id).await,
        (Status::Ended, Some(EndReason::WebsocketDisconnected))
    );
    a.shutdown(Duration::from_secs(1)).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn an_end_reaches_every_socket_on_every_instance() {
    let clock = ManualClock::new(t0());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = node_engine(Arc::clone(&store), &clock, "a", Duration::ZERO).await;
    let b = node_engine(Arc::clone(&store), &clock, "b", Duration::ZERO).await;
    let _background = (a.spawn_background(), b.spawn_background());
    settle().await;
    let id = *a.start(request()).await.unwrap().session.id();
    let (mut on_a, _) = a.hold_socket(Some("t"), id).await.unwrap();
    let (mut on_b, _) = b.hold_socket(Some("t"), id).await.unwrap();
    a.end(Some("t"), id, EndReason::Requested).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), async {
        on_a.ended().await;
        on_b.ended().await;
    })
    .await
    .expect("both sockets heard of the end");
    // A refused socket (ended, unknown, another tenant's) holds nothing and ends nothing.
    assert!(matches!(
        b.hold_socket(Some("t"), id).await,
        Err(EngineError::SessionEnded)
    ));
    let other = *b.start(request()).await.unwrap().session.id();
    assert!(matches!(
        a.hold_socket(Some("intruder"), other).await,
        Err(EngineError::NotFound)
    ));
    settle().await;
    assert_eq!(status(&a, other).await.0, Status::Started);
    a.shutdown(Duration::from_secs(1)).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

fn in_room(timeouts: crate::SessionTimeouts) -> StartRequest {
    StartRequest {
        callback_url: None,
        room: Some(crate::RoomBinding {
            provider: crate::RoomProvider::Daily,
            name: "standup".into(),
        }),
        timeouts,
        ..request()
    }
}

fn room_event(id: &str, kind: crate::RoomEventKind) -> crate::RoomEvent {
    crate::RoomEvent {
        tenant: Some("t".into()),
        provider: crate::RoomProvider::Daily,
        room: "standup".into(),
        event_id: id.into(),
        at: t0(),
        kind,
    }
}

#[tokio::test]
async fn a_room_nobody_joins_ends_after_its_allowance() {
    let clock = ManualClock::new(t0());
    let engine = node_engine(Arc::new(MemoryStore::new()), &clock, "a", Duration::ZERO).await;
    let allowance = crate::SessionTimeouts {
        participant_absent: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let lonely = *engine.start(in_room(allowance)).await.unwrap().session.id();
    clock.advance(Duration::from_millis(1999));
    settle().await;
    assert_eq!(status(&engine, lonely).await.0, Status::Started);
    clock.advance(Duration::from_millis(1));
    settle().await;
    assert_eq!(
        status(&engine, lonely).await,
        (Status::Ended, Some(EndReason::NobodyJoined))
    );

    let joined = *engine.start(in_room(allowance)).await.unwrap().session.id();
    let ada = crate::RoomEventKind::Joined {
        participant: "ada".into(),
    };
    engine.room_event(room_event("j1", ada)).await.unwrap();
    clock.advance(Duration::from_secs(5));
    settle().await;
    assert_eq!(status(&engine, joined).await.0, Status::Started);
}

#[tokio::test]
async fn the_wait_after_the_last_leave_counts_from_the_final_leave() {
    let clock = ManualClock::new(t0());
    let engine = node_engine(Arc::new(MemoryStore::new()), &clock, "a", Duration::ZERO).await;
    let grace = crate::SessionTimeouts {
        participant_left: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let id = *engine.start(in_room(grace)).await.unwrap().session.id();
    let joined = |n: u8| crate::RoomEventKind::Joined {
        participant: format!("p{n}"),
    };
    let left = |n: u8| crate::RoomEventKind::Left {
        participant: format!("p{n}"),
    };
    engine.room_event(room_event("1", joined(1))).await.unwrap();
    engine.room_event(room_event("2", left(1))).await.unwrap();
    clock.advance(Duration::from_secs(1));
    engine.room_event(room_event("3", joined(2))).await.unwrap();
    clock.advance(Duration::from_secs(1));
    engine.room_event(room_event("4", left(2))).await.unwrap();
    // The first leave's wait is over: the room has not been empty that long.
    clock.advance(Duration::from_secs(1));
    settle().await;
    assert_eq!(status(&engine, id).await.0, Status::Started);
    clock.advance(Duration::from_millis(1999));
    settle().await;
    assert_eq!(status(&engine, id).await.0, Status::Started);
    clock.advance(Duration::from_millis(1));
    settle().await;
    assert_eq!(
        status(&engine, id).await,
        (Status::Ended, Some(EndReason::RoomEmpty))
    );
}

#[tokio::test]
async fn timeouts_over_the_plan_are_refused_and_defaults_are_recorded() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new());
    let engine = node_engine(store.clone(), &clock, "a", Duration::from_millis(1500)).await;
    let mut over = in_room(crate::SessionTimeouts {
        websocket_grace: Some(Duration::from_secs(3601)),
        ..Default::default()
    });
    over.plan = Plan::new(None, Duration::from_secs(3600));
    assert!(matches!(
        engine.start(over).await,
        Err(EngineError::TimeoutOverPlan {
            timeout: "websocket_grace_ms",
            ..
        })
    ));
    let none = store
        .list(session_lifecycle_store::ListQuery {
            tenant: None,
            status: None,
            limit: 10,
            before: None,
            node: None,
        })
        .await
        .unwrap();
    assert!(none.is_empty(), "nothing created");
    let record = engine.start(request()).await.unwrap();
    let stored = engine.get(None, *record.session.id()).await.unwrap();
    assert_eq!(stored.timeouts, record.timeouts);
    assert_eq!(
        stored.timeouts,
        crate::SessionTimeouts {
            participant_left: Some(Duration::ZERO),
            participant_absent: None,
            websocket_grace: Some(Duration::from_millis(1500)),
        }
    );
}

#[tokio::test]
async fn usage_period_that_does_not_divide_an_hour_in_whole_seconds_is_refused_at_open() {
    let clock = ManualClock::new(t0());
    for period in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(1500),
        Duration::from_secs(7),
        Duration::from_secs(7200),
    ] {
        let config = EngineConfig {
            usage_period: period,
            ..EngineConfig::default()
        };
        let opened = Engine::open(
            Arc::new(MemoryStore::new()),
            Vec::new(),
            Arc::new(clock.clone()),
            config,
        )
        .await;
        assert!(
            matches!(opened, Err(EngineError::InvalidUsagePeriod { period: p }) if p == period),
            "{period:?} was accepted"
        );
    }
    for period in [1, 60, 300, 3600].map(Duration::from_secs) {
        let config = EngineConfig {
            usage_period: period,
            ..EngineConfig::default()
        };
        Engine::open(
            Arc::new(MemoryStore::new()),
            Vec::new(),
            Arc::new(clock.clone()),
            config,
        )
        .await
        .unwrap();
    }
}
