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
