//! Ends per second through the engine on PostgreSQL, next to a bare `tokio-postgres` loop
//! doing the same conditional update (and the same release-intent update) as one prepared
//! statement per end. Then ends with 8 and 64 in flight, and 64
//! in flight spread over 1, 2 and 4 engine instances (each with its own node id and pool,
//! as separate `sessiond` processes would have).
//!
//! Needs `SESSION_LIFECYCLE_PG_URL`; it works in a database of its own, dropped after.
//!
//! Run: `SESSION_LIFECYCLE_PG_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p session-lifecycle-benches --bench engine_postgres`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
#[path = "support.rs"]
mod support;
use session_lifecycle::EndReason;
use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_postgres::testing::{TestDb, connect};
use session_lifecycle_runtime::{Engine, EngineConfig, SystemClock};
use support::{created, end_concurrently, end_in_store, started};

async fn open_engine(url: &str, node: usize) -> Engine {
    let store = PostgresStore::connect(url).await.unwrap();
    Engine::open(
        Arc::new(store),
        vec![],
        Arc::new(SystemClock),
        EngineConfig {
            node: format!("bench-{node}"),
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap()
}

fn main() {
    let Ok(url) = std::env::var("SESSION_LIFECYCLE_PG_URL") else {
        eprintln!("skipped: SESSION_LIFECYCLE_PG_URL is not set");
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::create(&url));
    let engines: Vec<Engine> = rt.block_on(open_engines(&db.url, 4));

    let mut group = c.benchmark_group("postgres_end");
    group.throughput(Throughput::Elements(1));
    let bare = rt.block_on(connect(&db.url));
    // The same conditional update and release-intent update as the store's end, as one
    // prepared statement in its own transaction: the least a hand-written loop would do.
    let end = rt.block_on(async {
        bare.prepare(
            "WITH ended AS (
                UPDATE sessions SET status = 'ended', ended_at = GREATEST($2, started_at), end_reason = $3
                WHERE id = $1 AND status = 'started'
                RETURNING id)
             UPDATE resources SET state = 'pending', attempts = 0, retry_at = $2
             WHERE session_id IN (SELECT id FROM ended) AND state = 'held'",
        )
        .await
        .unwrap()
    });
    group.bench_function("sequential/bare_tokio_postgres", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let ids = started(&engines[..1], iters).await;
                let t = Instant::now();
                for (_, id) in ids {
                    let id = id.to_string();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64;
                    bare.execute(&end, &[&id, &now, &"requested"])
                        .await
                        .unwrap();
                }
                t.elapsed()
            })
        })
    });

    group.bench_function("sequential/engine", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let ids = started(&engines[..1], iters).await;
                let t = Instant::now();
                for (_, id) in ids {
                    engines[0]
                        .end(None, id, EndReason::Requested)
                        .await
                        .unwrap();
                }
                t.elapsed()
            })
        })
    });

    let store = rt.block_on(PostgresStore::connect(&db.url)).unwrap();
    group.bench_function("sequential/store_only", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // Created in the store alone: the engine's timers never see these.
                let ids = created(&store, "bench-store", iters).await;
                let t = Instant::now();
                end_in_store(&store, ids).await;
                t.elapsed()
            })
        })
    });

    let concurrent = |group: &mut criterion::BenchmarkGroup<'_, _>,
                      name: String,
                      engines: &[Engine],
                      in_flight: u64| {
        group.throughput(Throughput::Elements(in_flight));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let ids = started(engines, in_flight).await;
                        let t = Instant::now();
                        end_concurrently(engines, ids).await;
                        total += t.elapsed();
                    }
                    total
                })
            })
        });
    };
    concurrent(&mut group, "concurrent_8/engine".into(), &engines[..1], 8);
    for n in [1usize, 2, 4] {
        concurrent(
            &mut group,
            format!("concurrent_64/instances_{n}"),
            &engines[..n],
            64,
        );
    }
    group.finish();
    c.final_summary();
    drop(engines);
    rt.block_on(db.drop_db());
}

/// `n` engine instances on one database, each its own node.
async fn open_engines(url: &str, n: usize) -> Vec<Engine> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(open_engine(url, i).await);
    }
    out
}
