//! Ends per second through the engine on SQLite, next to a bare `rusqlite` loop doing the
//! same conditional update (and the same release-intent update) with the same pragmas:
//! WAL, `synchronous=FULL`, one transaction per end.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench engine_sqlite`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use rusqlite::{Connection, params};
use session_lifecycle::{Clock, EndReason, SessionId};
use session_lifecycle_runtime::{
    Engine, EngineConfig, NewSession, Plan, StartRequest, Store, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

fn request() -> StartRequest {
    StartRequest {
        tenant: "bench".into(),
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

/// Starts `n` sessions (untimed), concurrently so that setup is quick.
async fn started(engine: &Engine, n: u64) -> Vec<SessionId> {
    let mut ids = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let batch = left.min(256);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let engine = engine.clone();
                tokio::spawn(async move { *engine.start(request()).await.unwrap().session.id() })
            })
            .collect();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        left -= batch;
    }
    ids
}

/// Creates `n` started sessions straight in the store (untimed), for the bare loop: the
/// engine never tracks them.
async fn created(store: &SqliteStore, n: u64) -> Vec<SessionId> {
    let now = SystemClock.now();
    let mut ids = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let batch = left.min(256);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let store = store.clone();
                let id = SessionId::from_ulid_parts(now, rand_u128());
                tokio::spawn(async move {
                    store
                        .create(NewSession {
                            id,
                            tenant: "bare".into(),
                            started_at: now,
                            expires_at: now.saturating_add(Duration::from_secs(3600)),
                            metadata: None,
                            room: None,
                            max_concurrent: None,
                            node: "local".to_owned(),
                        })
                        .await
                        .unwrap();
                    id
                })
            })
            .collect();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        left -= batch;
    }
    ids
}

fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    u128::from(NEXT.fetch_add(1, Ordering::Relaxed)) << 16 | u128::from(std::process::id() as u16)
}

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
            let ids = rt.block_on(created(&store, iters));
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
                let ids = started(&engine, iters).await;
                let t = Instant::now();
                for id in ids {
                    engine.end(None, id, EndReason::Requested).await.unwrap();
                }
                t.elapsed()
            })
        })
    });

    group.bench_function("sequential/store_only", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let ids = created(&store, iters).await;
                let t = Instant::now();
                for id in ids {
                    store
                        .end(id, SystemClock.now(), EndReason::Requested)
                        .await
                        .unwrap();
                }
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
                        let ids = started(&engine, concurrency).await;
                        let t = Instant::now();
                        let tasks: Vec<_> = ids
                            .into_iter()
                            .map(|id| {
                                let engine = engine.clone();
                                tokio::spawn(async move {
                                    engine.end(None, id, EndReason::Requested).await.unwrap()
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.unwrap();
                        }
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
