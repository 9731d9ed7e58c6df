//! Ends per second through the engine on SQLite, next to a bare `rusqlite` loop doing the
//! same conditional update (and the same release-intent update) with the same pragmas:
//! WAL, `synchronous=FULL`, one transaction per end.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench engine_sqlite`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
#[path = "support.rs"]
mod support;
use rusqlite::{Connection, params};
use session_lifecycle::EndReason;
use session_lifecycle_runtime::{Engine, EngineConfig, SystemClock};
use session_lifecycle_sqlite::SqliteStore;
use support::{created, end_concurrently, end_in_store, started};

fn bare_connection(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = SqliteStore::open(&path).unwrap();
    let engine = rt
        .block_on(Engine::open(
            Arc::new(store.clone()),
            vec![],
            Arc::new(SystemClock),
            EngineConfig::default(),
        ))
        .unwrap();

    let mut group = c.benchmark_group("sqlite_end");
    group.throughput(Throughput::Elements(1));
    let bare = bare_connection(&path);
    group.bench_function("sequential/bare_rusqlite", |b| {
        b.iter_custom(|iters| {
            let ids = rt.block_on(created(&store, "local", iters));
            let mut end = bare
                .prepare(
                    "UPDATE sessions SET status = 'ended', ended_at = MAX(?2, started_at), end_reason = ?3
                     WHERE id = ?1 AND status = 'started'",
                )
                .unwrap();
            let mut intents = bare
                .prepare(
                    "UPDATE resources SET state = 'pending', attempts = 0, retry_at = ?2
                     WHERE session_id = ?1 AND state = 'held'",
                )
                .unwrap();
            let t = Instant::now();
            for id in ids {
                let id = id.to_string();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                bare.execute_batch("BEGIN IMMEDIATE").unwrap();
                let n = end.execute(params![id, now, "requested"]).unwrap();
                if n == 1 {
                    intents.execute(params![id, now]).unwrap();
                }
                bare.execute_batch("COMMIT").unwrap();
            }
            t.elapsed()
        })
    });

    group.bench_function("sequential/engine", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let ids = started(std::slice::from_ref(&engine), iters).await;
                let t = Instant::now();
                for (_, id) in ids {
                    engine.end(None, id, EndReason::Requested).await.unwrap();
                }
                t.elapsed()
            })
        })
    });

    group.bench_function("sequential/store_only", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let ids = created(&store, "local", iters).await;
                let t = Instant::now();
                end_in_store(&store, ids).await;
                t.elapsed()
            })
        })
    });

    for concurrency in [8u64, 64] {
        group.throughput(Throughput::Elements(concurrency));
        group.bench_function(format!("concurrent_{concurrency}/engine"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let ids = started(std::slice::from_ref(&engine), concurrency).await;
                        let t = Instant::now();
                        end_concurrently(std::slice::from_ref(&engine), ids).await;
                        total += t.elapsed();
                    }
                    total
                })
            })
        });
    }
    group.finish();
    c.final_summary();
}
