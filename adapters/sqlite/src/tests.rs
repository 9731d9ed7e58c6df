use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

fn sqlite_error(code: i32) -> StoreError {
    db(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(code),
        None,
    ))
}

/// A read that meets a lock runs again (off the workers, waiting for the lock); any
/// other failure is answered as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_meets_a_lock_runs_again_and_others_fail_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    for (first, runs, answered) in [
        (rusqlite::ffi::SQLITE_BUSY, 2, true),
        (rusqlite::ffi::SQLITE_LOCKED, 2, true),
        (rusqlite::ffi::SQLITE_IOERR, 1, false),
    ] {
        let calls = Arc::new(AtomicU32::new(0));
        let answer = store
            .inner
            .conns
            .read({
                let calls = Arc::clone(&calls);
                move |c| match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(sqlite_error(first)),
                    _ => c
                        .query_row("SELECT count(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                        .map_err(db),
                }
            })
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), runs, "code {first}");
        assert_eq!(answer.is_ok(), answered, "code {first}: {answer:?}");
        if answered {
            assert_eq!(answer.unwrap(), 0);
        }
    }
    // The connection came back to the pool with its zero busy timeout, and works.
    let count = store
        .inner
        .conns
        .read(|c| {
            c.query_row("SELECT count(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                .map_err(db)
        })
        .await
        .unwrap();
    assert_eq!(count, 0);
}

/// An end's usage events are written when its `ended` event is fanned out, not in the
/// end's commit; until then they are read as undispatched all the same; each is fanned out
/// once, also when a batch's limit falls between the end and them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ends_usage_events_come_with_its_fan_out_once() {
    use session_lifecycle_store::{Dispatch, EventOutbox, usage::UsageLedger};

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    let t0 = Timestamp::from_millis(1_705_314_600_000);
    let id = SessionId::from_ulid_parts(t0, 7);
    let mut new = NewSession {
        id,
        tenant: "acme".to_owned(),
        started_at: t0,
        expires_at: t0.saturating_add(Duration::from_secs(3 * 3600)),
        metadata: None,
        room: None,
        max_concurrent: None,
        node: "a".to_owned(),
        timeouts: Default::default(),
        callback_url: None,
        billing: Default::default(),
    };
    new.billing.meter = session_lifecycle::usage::MeterStart::Started;
    assert_eq!(store.create(new).await.unwrap(), CreateOutcome::Created);
    // Across two hour boundaries: three records, all written by the end.
    let end = t0.saturating_add(Duration::from_secs(2 * 3600 + 60));
    store
        .end(id, None, end, EndReason::Requested, None)
        .await
        .unwrap()
        .unwrap();
    let records = store.session_usage(id).await.unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    let usage_rows = |store: SqliteStore| async move {
        store
            .inner
            .conns
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM events WHERE session_seq > 100",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(db)
            })
            .await
            .unwrap()
    };
    assert_eq!(
        usage_rows(store.clone()).await,
        0,
        "none in the end's commit"
    );
    let kinds: Vec<EventKind> = store
        .undispatched_events(100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::Started,
            EventKind::Ended,
            EventKind::UsageRecorded(1),
            EventKind::UsageRecorded(2),
            EventKind::UsageRecorded(3),
            EventKind::Released,
        ]
    );

    // Fanned out two at a time: the first batch ends with the end itself.
    let mut fanned = Vec::new();
    for _ in 0..10 {
        let batch = store.undispatched_events(2).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 2);
        let dispatch: Vec<Dispatch> = batch
            .iter()
            .map(|e| Dispatch {
                session: e.session,
                kind: e.kind,
                to: Vec::new(),
            })
            .collect();
        let placed = store.dispatch_events(dispatch, end).await.unwrap();
        assert_eq!(placed as usize, batch.len());
        fanned.extend(batch.into_iter().map(|e| (e.kind, e.at)));
    }
    assert_eq!(usage_rows(store.clone()).await, 3);
    let mut usage: Vec<_> = fanned
        .iter()
        .filter_map(|(k, at)| match k {
            EventKind::UsageRecorded(seq) => Some((*seq, *at)),
            _ => None,
        })
        .collect();
    usage.sort();
    assert_eq!(
        usage,
        records
            .iter()
            .map(|r| (r.seq, r.recorded_at))
            .collect::<Vec<_>>(),
        "each record's event, once"
    );
    assert_eq!(fanned.len(), 6);
    assert!(store.undispatched_events(100).await.unwrap().is_empty());
}
