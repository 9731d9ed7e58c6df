//! The engine on the SQLite store with real resources: files (see `common`) and avatar
//! server processes (the `avatar-fixture` program of the process adapter).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FileBackend, assert_released_exactly_once};
use session_lifecycle::{Clock, EndReason, Policy, ReleaseState, SessionId, Status, Timestamp};
use session_lifecycle_runtime::{
    Engine, EngineConfig, EngineError, ListQuery, ManualClock, NewSession, Plan, ResourceBackend,
    RuntimeClock, SessionStore, StartRequest, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

const T0: &str = "2024-01-15T10:30:00Z";

fn plan() -> Plan {
    Plan::new(None, Duration::from_secs(3600))
}

fn request(tenant: &str) -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: tenant.into(),
        plan: plan(),
        duration: None,
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::parse_rfc3339(T0).unwrap())
}

async fn engine_with(
    dir: &Path,
    backends: Vec<Arc<dyn ResourceBackend>>,
    clock: Arc<dyn RuntimeClock>,
    policy: Policy,
) -> Engine {
    let store = SqliteStore::open(dir.join("engine.db")).unwrap();
    Engine::open(
        Arc::new(store),
        backends,
        clock,
        EngineConfig {
            policy,
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap()
}

fn fixture() -> std::path::PathBuf {
    // The process adapter's test program, built by this workspace.
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    target.join("avatar-fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_end_and_release_with_idempotent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let clock = clock();
    let engine = engine_with(
        dir.path(),
        vec![files.clone()],
        Arc::new(clock.clone()),
        Policy::DEFAULT,
    )
    .await;

    let started = engine.start(request("acme")).await.unwrap();
    let id = *started.session.id();
    assert_eq!(started.session.status(), Status::Started);
    assert_eq!(started.session.resources().len(), 1);
    assert_eq!(
        started.session.expires_at(),
        clock.now().saturating_add(Duration::from_secs(3600))
    );

    // Another tenant sees nothing and can change nothing.
    assert!(matches!(
        engine.get(Some("other"), id).await,
        Err(EngineError::NotFound)
    ));
    assert!(matches!(
        engine.end(Some("other"), id, EndReason::Requested).await,
        Err(EngineError::NotFound)
    ));
    assert_eq!(
        engine.get(Some("acme"), id).await.unwrap().session.status(),
        Status::Started
    );

    clock.advance(Duration::from_secs(300));
    let ended = engine
        .end(Some("acme"), id, EndReason::Requested)
        .await
        .unwrap();
    assert_eq!(ended.session.ended_at(), Some(clock.now()));
    clock.advance(Duration::from_secs(60));
    let again = engine
        .end(Some("acme"), id, EndReason::WebsocketDisconnected)
        .await
        .unwrap();
    assert_eq!(
        again.session.ending(),
        ended.session.ending(),
        "a repeated end is identical"
    );
    assert!(matches!(
        engine.touch(Some("acme"), id).await,
        Err(EngineError::SessionEnded)
    ));

    let report = engine.run_due().await.unwrap();
    assert_eq!(report.released, 1);
    let record = engine.get(None, id).await.unwrap();
    assert!(record.session.is_fully_released());
    assert_eq!(record.release_notes[0].1, "deleted");
    assert_released_exactly_once(&files);
    // A second pass has nothing left to do.
    assert_eq!(engine.run_due().await.unwrap().released, 0);
    assert_eq!(engine.metrics().snapshot().started, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_limits_and_durations() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let engine = engine_with(dir.path(), vec![], Arc::new(clock.clone()), Policy::DEFAULT).await;
    let limited = Plan::new(Some(1), Duration::from_secs(600));
    let first = engine
        .start(StartRequest {
            callback_url: None,
            tenant: "t".into(),
            plan: limited,
            duration: Some(Duration::from_secs(7200)),
            metadata: None,
            room: None,
            timeouts: Default::default(),
            resources: Default::default(),
        })
        .await
        .unwrap();
    // The plan caps the requested duration.
    assert_eq!(
        first.session.expires_at(),
        clock.now().saturating_add(Duration::from_secs(600))
    );
    let second = engine
        .start(StartRequest {
            callback_url: None,
            tenant: "t".into(),
            plan: limited,
            duration: Some(Duration::from_secs(60)),
            metadata: None,
            room: None,
            timeouts: Default::default(),
            resources: Default::default(),
        })
        .await;
    assert!(matches!(second, Err(EngineError::PlanLimit(1))));
    engine
        .end(None, *first.session.id(), EndReason::Requested)
        .await
        .unwrap();
    let third = engine
        .start(StartRequest {
            callback_url: None,
            tenant: "t".into(),
            plan: limited,
            duration: Some(Duration::from_secs(60)),
            metadata: None,
            room: None,
            timeouts: Default::default(),
            resources: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(
        third.session.expires_at(),
        clock.now().saturating_add(Duration::from_secs(60))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_acquire_ends_start_failed_and_releases_what_was_acquired() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let broken = session_lifecycle_process::ProcessBackend::new(
        session_lifecycle_process::ProcessConfig::new(["/nonexistent/avatar"]),
    )
    .unwrap();
    let clock = clock();
    let engine = engine_with(
        dir.path(),
        vec![files.clone(), Arc::new(broken)],
        Arc::new(clock.clone()),
        Policy::DEFAULT,
    )
    .await;
    let err = engine.start(request("t")).await.unwrap_err();
    assert!(
        matches!(err, EngineError::StartFailed(ref m) if m.contains("cannot start")),
        "{err}"
    );
    let list = engine
        .list(ListQuery {
            tenant: Some("t".into()),
            status: None,
            limit: 10,
            before: None,
            node: None,
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].session.end_reason(), Some(EndReason::StartFailed));
    engine.run_due().await.unwrap();
    assert_released_exactly_once(&files);
    assert_eq!(files.acquired().len(), 1);

    // No capacity: the session ends start_failed and the caller hears "capacity".
    files.exhausted.store(true, Ordering::SeqCst);
    let err = engine.start(request("t")).await.unwrap_err();
    assert!(matches!(err, EngineError::CapacityExhausted(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avatar_server_exit_ends_the_session_and_end_stops_servers() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |mode: &str| {
        let mut config = session_lifecycle_process::ProcessConfig::new([
            fixture().into_os_string(),
            mode.into(),
        ]);
        config.grace = Duration::from_millis(500);
        Arc::new(session_lifecycle_process::ProcessBackend::new(config).unwrap())
            as Arc<dyn ResourceBackend>
    };
    let exiting = engine_with(
        dir.path(),
        vec![mk("exit-now")],
        Arc::new(SystemClock),
        Policy::DEFAULT,
    )
    .await;
    let background = exiting.spawn_background();
    let s = exiting.start(request("t")).await.unwrap();
    let id = *s.session.id();
    let pid = s.session.resources()[0].resource.handle;
    let mut status = Status::Started;
    for _ in 0..200 {
        status = exiting.get(None, id).await.unwrap().session.status();
        if status == Status::Ended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, Status::Ended);
    let record = exiting.get(None, id).await.unwrap();
    assert_eq!(record.session.end_reason(), Some(EndReason::AvatarExited));
    exiting.shutdown(Duration::from_secs(5)).await.unwrap();
    background.join().await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "no zombie left"
    );

    let dir2 = tempfile::tempdir().unwrap();
    let stubborn = engine_with(
        dir2.path(),
        vec![mk("ignore-term")],
        Arc::new(SystemClock),
        Policy::DEFAULT,
    )
    .await;
    let s = stubborn.start(request("t")).await.unwrap();
    let id = *s.session.id();
    let pid = s.session.resources()[0].resource.handle;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stubborn.end(None, id, EndReason::Requested).await.unwrap();
    stubborn.run_due().await.unwrap();
    let record = stubborn.get(None, id).await.unwrap();
    assert!(record.session.is_fully_released());
    assert!(
        record.release_notes[0].1.starts_with("sigkill"),
        "SIGTERM ignored: killed after the grace period: {}",
        record.release_notes[0].1
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "no zombie left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_releases_are_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let clock = clock();
    let engine = engine_with(
        dir.path(),
        vec![files.clone()],
        Arc::new(clock.clone()),
        Policy::DEFAULT,
    )
    .await;
    let s = engine.start(request("t")).await.unwrap();
    let id = *s.session.id();
    files.fail_releases.store(true, Ordering::SeqCst);
    engine.end(None, id, EndReason::Requested).await.unwrap();
    assert_eq!(engine.run_due().await.unwrap().release_failures, 1);
    let r = engine.get(None, id).await.unwrap();
    assert!(matches!(
        r.session.resources()[0].release,
        ReleaseState::Pending { attempts: 1, .. }
    ));
    // Not retried before its backoff.
    assert_eq!(engine.run_due().await.unwrap().release_failures, 0);
    clock.advance(Policy::DEFAULT.release_backoff(1));
    assert_eq!(engine.run_due().await.unwrap().release_failures, 1);
    files.fail_releases.store(false, Ordering::SeqCst);
    clock.advance(Policy::DEFAULT.release_backoff(2));
    assert_eq!(engine.run_due().await.unwrap().released, 1);
    assert_released_exactly_once(&files);
    assert_eq!(engine.metrics().snapshot().release_failures, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_ends_a_thousand_times() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let engine = engine_with(
        dir.path(),
        vec![files.clone()],
        Arc::new(SystemClock),
        Policy::DEFAULT,
    )
    .await;
    let rounds: usize = std::env::var("CONCURRENT_END_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for round in 0..rounds {
        let id = *engine.start(request("t")).await.unwrap().session.id();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let engine = engine.clone();
            let reason = EndReason::ALL[i % EndReason::ALL.len()];
            tasks.push(tokio::spawn(async move {
                engine.end(Some("t"), id, reason).await.unwrap()
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        // Every answer names the same ending; release progress may move between them
        // (the HTTP end answer leaves it out for that reason).
        assert!(
            answers
                .windows(2)
                .all(|w| w[0].session.ending() == w[1].session.ending()
                    && w[0].session.id() == w[1].session.id()),
            "round {round}: answers differ"
        );
        engine.run_due().await.unwrap();
    }
    let ended: u64 = engine
        .metrics()
        .snapshot()
        .ended
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(ended, rounds as u64, "one transition per session");
    assert_released_exactly_once(&files);
    assert_eq!(files.acquired().len(), rounds);
}

/// 10,000 sessions, half started through the engine and half written by "another
/// process" (straight into the store, so no timer knows them), expire or are orphaned;
/// a simulated clock advances one sweep interval at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_ends_and_releases_ten_thousand_orphans_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let clock = clock();
    let t0 = clock.now();
    let policy = Policy::DEFAULT;
    let store = SqliteStore::open(dir.path().join("engine.db")).unwrap();
    let engine = Engine::open(
        Arc::new(store.clone()),
        vec![files.clone()],
        Arc::new(clock.clone()),
        EngineConfig {
            policy,
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();
    let n = 10_000u32;
    let mut tasks = Vec::new();
    for i in 0..n {
        let engine = engine.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Even: expire within 10 minutes (touched, so never orphaned first);
            // odd: never touched, orphaned after the orphan timeout.
            let lifetime = if i % 2 == 0 {
                Duration::from_secs(u64::from(i % 600) + 1)
            } else {
                Duration::from_secs(3600)
            };
            if i % 4 < 2 {
                engine
                    .start(StartRequest {
                        callback_url: None,
                        tenant: "t".into(),
                        plan: plan(),
                        duration: Some(lifetime),
                        metadata: None,
                        room: None,
                        timeouts: Default::default(),
                        resources: Default::default(),
                    })
                    .await
                    .unwrap();
            } else {
                let id = SessionId::from_ulid_parts(t0, u128::from(i) << 40);
                store
                    .create(NewSession {
                        callback_url: None,
                        billing: Default::default(),
                        id,
                        tenant: "t".into(),
                        started_at: t0,
                        expires_at: t0.saturating_add(lifetime),
                        metadata: None,
                        room: None,
                        max_concurrent: None,
                        timeouts: Default::default(),
                        node: "local".to_owned(),
                    })
                    .await
                    .unwrap();
            }
        }));
        if tasks.len() == 256 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut elapsed = Duration::ZERO;
    let mut step = 0;
    while elapsed < Duration::from_secs(720) {
        clock.advance(policy.sweep_interval);
        elapsed += policy.sweep_interval;
        step += 1;
        // Keep the expiring ones alive (every 45 s, within the 60 s orphan timeout) so
        // that they end by expiry, not as orphans.
        if step % 3 != 0 {
            engine.run_due().await.unwrap();
            continue;
        }
        for r in engine
            .list(ListQuery {
                tenant: None,
                status: Some(Status::Started),
                limit: 20_000,
                before: None,
                node: None,
            })
            .await
            .unwrap()
        {
            if r.session.expires_at() < t0.saturating_add(Duration::from_secs(3600)) {
                engine.touch(None, *r.session.id()).await.unwrap();
            }
        }
        engine.run_due().await.unwrap();
    }
    let all = engine
        .list(ListQuery {
            tenant: None,
            status: None,
            limit: 20_000,
            before: None,
            node: None,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), n as usize);
    let bound = session_lifecycle::CONTRACT_ORPHAN_BOUND;
    for r in &all {
        let s = &r.session;
        assert_eq!(s.status(), Status::Ended, "{} not ended", s.id());
        let due_at = match s.end_reason() {
            Some(EndReason::Expired) => s.expires_at(),
            Some(EndReason::Orphaned) => s.last_seen_at().saturating_add(policy.orphan_timeout),
            other => panic!("{} ended with {other:?}", s.id()),
        };
        let ended_at = s.ended_at().unwrap();
        assert!(ended_at >= due_at, "{} ended early", s.id());
        assert!(
            ended_at.saturating_duration_since(due_at) <= policy.sweep_interval,
            "{} ended late",
            s.id()
        );
        for held in s.resources() {
            let ReleaseState::Released { at } = held.release else {
                panic!("{} not released", s.id())
            };
            assert!(
                at.saturating_duration_since(due_at) <= bound,
                "{} released late",
                s.id()
            );
        }
    }
    assert_released_exactly_once(&files);
    let snap = engine.metrics().snapshot();
    assert_eq!(snap.orphans_found, u64::from(n / 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clock_timers_end_expired_and_orphaned_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBackend::new(dir.path());
    let policy = Policy {
        orphan_timeout: Duration::from_millis(800),
        sweep_interval: Duration::from_millis(200),
        ..Policy::DEFAULT
    };
    let engine = engine_with(
        dir.path(),
        vec![files.clone()],
        Arc::new(SystemClock),
        policy,
    )
    .await;
    let background = engine.spawn_background();
    let expiring = *engine
        .start(StartRequest {
            callback_url: None,
            tenant: "t".into(),
            plan: plan(),
            duration: Some(Duration::from_millis(300)),
            metadata: None,
            room: None,
            timeouts: Default::default(),
            resources: Default::default(),
        })
        .await
        .unwrap()
        .session
        .id();
    let orphan = *engine.start(request("t")).await.unwrap().session.id();
    let alive = *engine.start(request("t")).await.unwrap().session.id();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        engine.touch(Some("t"), alive).await.unwrap();
    }
    // 2 s in: the first two ended by their timers, the heartbeat kept the third alive.
    let get = |id| {
        let engine = engine.clone();
        async move { engine.get(None, id).await.unwrap().session }
    };
    assert_eq!(get(expiring).await.end_reason(), Some(EndReason::Expired));
    assert_eq!(get(orphan).await.end_reason(), Some(EndReason::Orphaned));
    assert_eq!(get(alive).await.status(), Status::Started);
    // Heartbeats stop: it is orphaned within the timeout plus a sweep.
    tokio::time::sleep(policy.orphan_timeout + policy.sweep_interval * 2).await;
    assert_eq!(get(alive).await.end_reason(), Some(EndReason::Orphaned));
    for _ in 0..100 {
        if files.still_held().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_released_exactly_once(&files);
    engine.shutdown(Duration::from_secs(2)).await.unwrap();
    background.join().await;
}
