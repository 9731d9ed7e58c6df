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
use crate::faults::{FaultPlan, FaultyStore};
use crate::memory::MemoryStore;
use crate::store::{BoxFuture, SessionStore, Store};

/// 2024-01-15T10:30:00Z.
fn t0() -> Timestamp {
    Timestamp::from_millis(1_705_314_600_000)
}

fn request() -> StartRequest {
    StartRequest {
        tenant: "t".into(),
        plan: Plan {
            max_concurrent_sessions: None,
            max_session: Duration::from_secs(3600),
        },
        duration: None,
        metadata: None,
        room: None,
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
                    .list(crate::store::ListQuery {
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
