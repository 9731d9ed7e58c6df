//! Store faults: a realistic scenario runs with the k-th store call failing, for every k,
//! once and then until the store is restored. Every failure reaches a caller as an error
//! or is retried by the engine; after the store comes back, nothing acknowledged is lost
//! and every resource is released exactly once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FileBackend, assert_released_exactly_once};
use session_lifecycle::{EndReason, Policy, SessionId, Status, Timestamp};
use session_lifecycle_runtime::faults::{FaultPlan, FaultyStore};
use session_lifecycle_runtime::{
    Engine, EngineConfig, EngineError, ListQuery, ManualClock, Plan, SessionStore, StartRequest,
};
use session_lifecycle_sqlite::SqliteStore;

fn request(secs: u64) -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "t".into(),
        plan: Plan::new(Some(10), Duration::from_secs(3600)),
        duration: Some(Duration::from_secs(secs)),
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

/// What the scenario saw acknowledged.
#[derive(Default)]
struct Acked {
    started: Vec<SessionId>,
    ended: Vec<(SessionId, Timestamp)>,
    errors: u32,
}

impl Acked {
    fn note<T>(&mut self, r: Result<T, EngineError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(EngineError::Store(_)) => {
                self.errors += 1;
                None
            }
            // A failed start or a missing session is an honest answer after an earlier fault.
            Err(EngineError::NotFound | EngineError::SessionEnded) => None,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn start(
        &mut self,
        r: Result<session_lifecycle_runtime::SessionRecord, EngineError>,
    ) -> Option<SessionId> {
        let id = self.note(r).map(|rec| *rec.session.id());
        self.started.extend(id);
        id
    }

    fn end(&mut self, r: Result<session_lifecycle_runtime::SessionRecord, EngineError>) {
        if let Some(rec) = self.note(r) {
            self.ended
                .push((*rec.session.id(), rec.session.ended_at().unwrap()));
        }
    }
}

async fn scenario(engine: &Engine, clock: &ManualClock, acked: &mut Acked) {
    let a = acked.start(engine.start(request(3600)).await);
    let b = acked.start(engine.start(request(60)).await);
    if let Some(a) = a {
        acked.note(engine.touch(Some("t"), a).await);
        let r = engine.end(Some("t"), a, EndReason::Requested).await;
        acked.end(r);
        let r = engine.end(Some("t"), a, EndReason::Shutdown).await;
        acked.end(r);
    }
    clock.advance(Duration::from_secs(61));
    acked.note(engine.run_due().await);
    if let Some(b) = b {
        let r = engine.end(None, b, EndReason::Requested).await;
        acked.end(r);
    }
    let c = acked.start(engine.start(request(600)).await);
    if let Some(c) = c {
        let r = engine.end(None, c, EndReason::Shutdown).await;
        acked.end(r);
    }
    acked.note(engine.run_due().await);
}

/// Runs the scenario against a store failing per `plan`; returns the store calls made.
async fn run(plan: FaultPlan) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let clock = ManualClock::new(Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap());
    let sqlite = SqliteStore::open(dir.path().join("f.db")).unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(sqlite.clone()), plan));
    let open = |store: Arc<FaultyStore>| {
        let files = files.clone();
        let clock = clock.clone();
        async move {
            Engine::open(
                store,
                vec![files],
                Arc::new(clock),
                EngineConfig {
                    policy: Policy::DEFAULT,
                    ..EngineConfig::default()
                },
            )
            .await
        }
    };
    let engine = match open(Arc::clone(&faulty)).await {
        Ok(e) => e,
        // A service whose store is down at boot retries once it is back.
        Err(EngineError::Store(_)) => {
            faulty.restore();
            open(Arc::clone(&faulty)).await.unwrap()
        }
        Err(e) => panic!("open: {e}"),
    };
    let mut acked = Acked::default();
    scenario(&engine, &clock, &mut acked).await;
    let calls = faulty.calls();
    // Failed calls a scenario step saw as errors; the rest failed inside the engine's own
    // work (timers, releases), which retries them.
    assert!(acked.errors as u64 <= faulty.failures());

    // The store comes back; the service converges.
    faulty.restore();
    for r in engine
        .list(ListQuery {
            tenant: None,
            status: Some(Status::Started),
            limit: 100,
            before: None,
            node: None,
        })
        .await
        .unwrap()
    {
        engine
            .end(None, *r.session.id(), EndReason::Shutdown)
            .await
            .unwrap();
    }
    for _ in 0..20 {
        clock.advance(Policy::DEFAULT.release_backoff_max);
        engine.run_due().await.unwrap();
    }

    for id in &acked.started {
        assert!(
            sqlite.get(*id).await.unwrap().is_some(),
            "{plan:?}: acknowledged start of {id} lost"
        );
    }
    for (id, at) in &acked.ended {
        let r = sqlite.get(*id).await.unwrap().unwrap();
        assert_eq!(
            r.session.ended_at(),
            Some(*at),
            "{plan:?}: acknowledged end of {id} changed"
        );
    }
    for r in sqlite
        .list(ListQuery {
            tenant: None,
            status: None,
            limit: 100,
            before: None,
            node: None,
        })
        .await
        .unwrap()
    {
        assert!(
            r.session.is_fully_released(),
            "{plan:?}: {} not released",
            r.session.id()
        );
    }
    assert_released_exactly_once(&files);
    if plan == FaultPlan::None {
        assert_eq!(acked.errors, 0);
    } else {
        assert!(faulty.failures() > 0, "{plan:?}: no fault was injected");
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_call_can_fail_without_loss_or_double_release() {
    let clean = run(FaultPlan::None).await;
    assert!(clean > 20, "the scenario makes {clean} store calls");
    for k in 1..=clean {
        run(FaultPlan::Once(k)).await;
        run(FaultPlan::From(k)).await;
    }
}
