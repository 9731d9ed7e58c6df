//! Releases as ordered finalizers, driven by the engine on SQLite: one release of a session
//! at a time in reverse acquisition order, sessions in parallel; durable ends before
//! in-memory ones; and a shutdown after which nothing the engine started acts.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::FileBackend;
use session_lifecycle::{Clock, EndReason, Policy, Resource, ResourceKind, SessionId, Timestamp};
use session_lifecycle_runtime::faults::{FaultPlan, FaultyStore};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, Engine, EngineConfig, EventSink,
    ManualClock, Plan, ReleaseError, ReleaseNote, ResourceBackend, RoomBinding, RoomEvent,
    RoomEventKind, RoomProvider, StartRequest, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

fn request(room: Option<RoomBinding>) -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "t".into(),
        plan: Plan::new(None, Duration::from_secs(3600)),
        duration: None,
        metadata: None,
        room,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

/// One release as it happened: which session, which kind, when it started and ended.
#[derive(Debug, Clone, Copy)]
struct Span {
    session: SessionId,
    kind: u16,
    start: Instant,
    end: Instant,
}

/// A backend whose releases take `took` of real time, logged with their start and end.
struct Timed {
    kind: u16,
    took: Duration,
    log: Arc<Mutex<Vec<Span>>>,
    next: std::sync::atomic::AtomicU64,
}

impl ResourceBackend for Timed {
    fn kind(&self) -> ResourceKind {
        ResourceKind(self.kind)
    }
    fn name(&self) -> &'static str {
        "timed"
    }
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        // One resource per session and kind: the session's place in the test is enough.
        let handle = self.next.fetch_add(1, Ordering::SeqCst);
        let _ = request;
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
            let start = Instant::now();
            tokio::time::sleep(self.took).await;
            self.log.lock().unwrap().push(Span {
                session,
                kind: self.kind,
                start,
                end: Instant::now(),
            });
            Ok("done".into())
        })
    }
}

/// Many sessions with three resources each, ended at once: within a session the
/// releases run one at a time in reverse acquisition order; different sessions' releases
/// overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_order_is_reverse_acquisition_one_at_a_time_sessions_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let backends: Vec<Arc<dyn ResourceBackend>> = [(1, 30), (2, 20), (3, 40)]
        .into_iter()
        .map(|(kind, ms)| {
            Arc::new(Timed {
                kind,
                took: Duration::from_millis(ms),
                log: Arc::clone(&log),
                next: std::sync::atomic::AtomicU64::new(1),
            }) as Arc<dyn ResourceBackend>
        })
        .collect();
    let engine = Engine::open(
        Arc::new(SqliteStore::open(dir.path().join("order.db")).unwrap()),
        backends,
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(*engine.start(request(None)).await.unwrap().session.id());
    }
    let mut ends = Vec::new();
    for id in &ids {
        let engine = engine.clone();
        let id = *id;
        ends.push(tokio::spawn(async move {
            engine.end(None, id, EndReason::Requested).await.unwrap()
        }));
    }
    for end in ends {
        end.await.unwrap();
    }
    let started = Instant::now();
    engine.run_due().await.unwrap();
    let took = started.elapsed();

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), ids.len() * 3, "every resource released once");
    for id in &ids {
        let mut spans: Vec<Span> = log.iter().filter(|s| s.session == *id).copied().collect();
        spans.sort_by_key(|s| s.start);
        let kinds: Vec<u16> = spans.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [3, 2, 1], "{id}: reverse acquisition order");
        for pair in spans.windows(2) {
            assert!(
                pair[1].start >= pair[0].end,
                "{id}: kind {} started before kind {} ended",
                pair[1].kind,
                pair[0].kind
            );
        }
        assert!(
            engine
                .get(None, *id)
                .await
                .unwrap()
                .session
                .is_fully_released()
        );
    }
    let overlapping = log.iter().any(|a| {
        log.iter()
            .any(|b| a.session != b.session && a.start < b.end && b.start < a.end)
    });
    assert!(overlapping, "different sessions release in parallel");
    // 90 ms per session in sequence; 40 sessions in parallel take far less than 3.6 s.
    assert!(
        took < Duration::from_millis(90 * 40),
        "sessions did not release in parallel: {took:?}"
    );
}

/// A timer whose store end fails stays armed: the session is still tracked, its timer is
/// due again shortly, and it ends once the store is back and the outage has settled
/// (durable first, memory second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_end_leaves_the_timer_armed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap());
    let sqlite = SqliteStore::open(dir.path().join("armed.db")).unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(sqlite), FaultPlan::None));
    let engine = Engine::open(
        Arc::clone(&store) as _,
        Vec::new(),
        Arc::new(clock.clone()),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let id = *engine.start(request(None)).await.unwrap().session.id();
    let orphan_at = clock.now().saturating_add(Policy::DEFAULT.orphan_timeout);
    assert_eq!(engine.next_timer(), Some(orphan_at));

    clock.advance(Policy::DEFAULT.orphan_timeout);
    // The store answered a moment ago (a heartbeat would have), then goes away.
    engine.get(None, id).await.unwrap();
    store.take_down();
    assert!(engine.run_due().await.is_err(), "the store is down");
    assert_eq!(engine.active_sessions(), 1, "not ended in memory");
    let retry = engine.next_timer().expect("the timer is still armed");
    assert!(retry > orphan_at, "put back for a later try: {retry}");

    // Back: nothing is judged silent until the outage has settled (10 s by default).
    store.restore();
    clock.set(retry);
    assert_eq!(engine.run_due().await.unwrap().orphaned, 0, "settling");
    assert_eq!(engine.active_sessions(), 1);
    clock.advance(EngineConfig::default().outage_settle);
    let report = engine.run_due().await.unwrap();
    assert_eq!(report.orphaned, 1);
    assert_eq!(engine.active_sessions(), 0);
    let record = engine.get(None, id).await.unwrap();
    assert_eq!(record.session.end_reason(), Some(EndReason::Orphaned));
}

/// Shutdown with a room-grace wait and a failing release pending: once it returns, the
/// engine makes no store call and releases nothing, however long one waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_returns_nothing_acts() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let sqlite = SqliteStore::open(dir.path().join("shutdown.db")).unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(sqlite), FaultPlan::None));
    let engine = Engine::open(
        Arc::clone(&store) as _,
        vec![files.clone()],
        Arc::new(SystemClock),
        EngineConfig {
            room_grace: Duration::from_secs(2),
            release_poll: Duration::from_millis(100),
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();
    let background = engine.spawn_background();

    // A room that empties: its session's end waits out the 2 s grace.
    let room = RoomBinding {
        provider: RoomProvider::Livekit,
        name: "standup".into(),
    };
    let in_room = *engine
        .start(request(Some(room.clone())))
        .await
        .unwrap()
        .session
        .id();
    for (n, kind) in [
        RoomEventKind::Joined {
            participant: "ada".into(),
        },
        RoomEventKind::Left {
            participant: "ada".into(),
        },
    ]
    .into_iter()
    .enumerate()
    {
        engine
            .room_event(RoomEvent {
                tenant: Some("t".into()),
                provider: RoomProvider::Livekit,
                room: room.name.clone(),
                event_id: format!("e{n}"),
                at: engine.now(),
                kind,
            })
            .await
            .unwrap();
    }
    // A release that keeps failing: retried with backoff.
    files.fail_releases.store(true, Ordering::SeqCst);
    let failing = *engine.start(request(None)).await.unwrap().session.id();
    engine
        .end(None, failing, EndReason::Requested)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(engine.releases_failing() >= 1, "a release is failing");

    engine.shutdown(Duration::from_millis(500)).await.unwrap();
    background.join().await;
    let calls = store.calls();
    let released = files.released().len();
    // Past the room grace and several release backoffs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.calls(), calls, "a store call after shutdown returned");
    assert_eq!(files.released().len(), released, "a release after shutdown");
    let record = engine.get(None, in_room).await.unwrap();
    assert_eq!(
        record.session.end_reason(),
        Some(EndReason::Shutdown),
        "shutdown ended it; the grace wait never did"
    );
    // The failed releases are still owed and recorded so.
    let record = engine.get(None, failing).await.unwrap();
    assert!(!record.session.is_fully_released());
    assert!(!record.release_errors.is_empty());
}
