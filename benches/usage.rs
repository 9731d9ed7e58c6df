//! Usage: what recording it costs an end, and what `GET /v1/usage` costs as a tenant's
//! history grows.
//!
//! - `usage_end`: ends per second through the engine on SQLite, with usage recording on
//!   (the final record rides on the end's own commit; its `usage.recorded` event is
//!   written when the end is fanned out, and no dispatcher runs here) and
//!   off (`SqliteStore::set_usage_records(false)`). Target: on/off >= 0.9. Criterion
//!   measures each apart; `usage_end/paired` measures the ratio in alternating pairs of
//!   batches, which cancels the drift of a shared machine between the two.
//! - `usage_get`: `GET /v1/usage` over HTTP (the router in-process) for a tenant with
//!   10,000, 100,000 and 1,000,000 ended sessions, over a range that holds all of them
//!   (a month's bill), total only and by day.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench usage`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
// This bench uses only the engine helpers of the shared setup.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_http::tenants::{Tenants, hash_key};
use session_lifecycle_http::tokens::TokenSigner;
use session_lifecycle_http::{AppState, HttpConfig, router};
use session_lifecycle_runtime::{Engine, EngineConfig, SystemClock};
use session_lifecycle_sqlite::SqliteStore;
use support::{end_concurrently, started};

/// 2026-11-01T00:00:00Z: the bench's month starts here.
const MONTH: u64 = 1_761_955_200_000;

async fn engine_on(store: SqliteStore) -> Engine {
    Engine::open(
        Arc::new(store),
        vec![],
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap()
}

/// Writes `n` ended sessions of tenant `bench` spread over the month, each with its final
/// usage record, straight into the file (as the store would have, in bulk).
fn fill(path: &std::path::Path, n: u64) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch("BEGIN").unwrap();
    {
        let mut session = db
            .prepare(
                "INSERT INTO sessions (id, tenant, status, started_at, ended_at, end_reason,
                                       expires_at, last_seen_at)
                 VALUES (?1, 'bench', 'ended', ?2, ?3, 'requested', ?3, ?3)",
            )
            .unwrap();
        let mut record = db
            .prepare(
                "INSERT INTO usage_records (session_id, tenant, seq, span_from, span_to,
                        from_ms, to_ms, millis, revision, superseded, recorded_at)
                 VALUES (?1, 'bench', 1, ?2, ?3, ?2, ?3, ?4, 1, 0, ?3)",
            )
            .unwrap();
        let spacing = 29 * 86_400_000 / n;
        for i in 0..n {
            let start = MONTH + i * spacing;
            // As the store writes them: no record across an hour boundary.
            let length = (60_000 + (i * 7919) % 1_800_000).min(3_600_000 - start % 3_600_000);
            let id = SessionId::from_ulid_parts(Timestamp::from_millis(start), u128::from(i) + 1)
                .to_string();
            let (s, e) = (start as i64, (start + length) as i64);
            session.execute(rusqlite::params![id, s, e]).unwrap();
            record
                .execute(rusqlite::params![id, s, e, length as i64])
                .unwrap();
        }
    }
    db.execute_batch("COMMIT").unwrap();
}

/// Serves the router over the store at `path`; its base URL.
async fn serve(path: &std::path::Path) -> String {
    let engine = engine_on(SqliteStore::open(path).unwrap()).await;
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"bench\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 10\nmax_session_secs = 3600\n",
        hash_key("bench")
    ))
    .unwrap();
    let state = AppState::new(
        engine,
        tenants,
        TokenSigner::new([5; 32]),
        HttpConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    base
}

/// Whether this run's filter (criterion's first free argument) selects bench `name`.
fn wanted(name: &str) -> bool {
    let filter = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .find(|a| a.parse::<f64>().is_err());
    filter.is_none_or(|f| name.contains(&f))
}

/// Ends per second with recording on over off, measured in pairs: each round ends a
/// batch on one engine and then on the other (alternating which goes first), so the
/// machine's drift between two criterion runs (seconds apart, on a shared host) cancels
/// out; the median of the rounds' ratios is printed and written to
/// `target/criterion/usage_end/paired.json`.
fn paired_ratio(rt: &tokio::runtime::Runtime, engines: &[Engine]) {
    const ROUNDS: usize = 31;
    const BATCH: u64 = 2_000;
    let mut ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let times = rt.block_on(async {
            let mut ids = Vec::new();
            for engine in engines {
                ids.push(started(std::slice::from_ref(engine), BATCH).await);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut times = [Duration::ZERO; 2];
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let batch = std::mem::take(&mut ids[k]);
                let t = Instant::now();
                end_concurrently(std::slice::from_ref(&engines[k]), batch).await;
                times[k] = t.elapsed();
            }
            times
        });
        // Ends/s on over ends/s off = time off over time on.
        ratios.push(times[1].as_secs_f64() / times[0].as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ROUNDS / 2];
    println!(
        "usage_end/paired: ends/s recording on / off = {median:.3} (median of {ROUNDS} rounds of {BATCH} ends each; range {:.3}..{:.3})",
        ratios[0],
        ratios[ROUNDS - 1]
    );
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion/usage_end");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(
            out.join("paired.json"),
            format!(
                "{{\"median_ratio\": {median}, \"rounds\": {ROUNDS}, \"batch\": {BATCH}, \"min\": {}, \"max\": {}}}\n",
                ratios[0],
                ratios[ROUNDS - 1]
            ),
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut group = c.benchmark_group("usage_end");
    group.throughput(Throughput::Elements(1));
    let mut engines = Vec::new();
    for (name, on) in [
        ("concurrent/recording_on", true),
        ("concurrent/recording_off", false),
    ] {
        let store =
            SqliteStore::open(dir.path().join(format!("{name}.db").replace('/', "_"))).unwrap();
        store.set_usage_records(on);
        let engine = rt.block_on(engine_on(store));
        engines.push(engine.clone());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let ids = started(std::slice::from_ref(&engine), iters).await;
                    // Each has billable time to record.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let t = Instant::now();
                    end_concurrently(std::slice::from_ref(&engine), ids).await;
                    t.elapsed()
                })
            })
        });
    }
    group.finish();
    if wanted("usage_end/paired") {
        paired_ratio(&rt, &engines);
    }

    let mut group = c.benchmark_group("usage_get");
    group.sample_size(10);
    let client = reqwest::Client::new();
    let to = Timestamp::from_millis(MONTH + 30 * 86_400_000);
    let query = format!("from={}&to={to}", Timestamp::from_millis(MONTH));
    for n in [10_000u64, 100_000, 1_000_000] {
        let path = dir.path().join(format!("get_{n}.db"));
        drop(SqliteStore::open(&path).unwrap()); // the schema
        fill(&path, n);
        let base = rt.block_on(serve(&path));
        for grouping in ["", "&group_by=day"] {
            let url = format!("{base}/v1/usage?{query}{grouping}");
            let label = if grouping.is_empty() {
                "total"
            } else {
                "by_day"
            };
            group.bench_function(format!("{label}/{n}_sessions"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let response = client
                            .get(&url)
                            .header("x-api-key", "bench")
                            .send()
                            .await
                            .unwrap();
                        assert!(response.status().is_success());
                        response.bytes().await.unwrap()
                    })
                })
            });
        }
    }
    group.finish();
    c.final_summary();
}
