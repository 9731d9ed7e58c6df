//! Ends per second through the engine on SQLite with the outbound webhook worker running,
//! with one endpoint configured (every event fanned out to a local receiver and delivered)
//! and with none (events are still written, with the end, and placed in the event stream).
//! The outbox row rides on the end's own commit: the target is 0.9x or better.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench outbox_sqlite`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
// This bench uses only the engine helpers of the shared setup.
#[allow(dead_code)]
#[path = "support.rs"]
mod support;
use session_lifecycle::EndReason;
use session_lifecycle_http::outbound::address::AddressPolicy;
use session_lifecycle_http::outbound::{Outbound, OutboundConfig};
use session_lifecycle_http::tenants::{Tenants, hash_key};
use session_lifecycle_runtime::{Engine, EngineConfig, SystemClock};
use session_lifecycle_sqlite::SqliteStore;
use support::{end_concurrently, started};

const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// An engine on a fresh SQLite file with a running delivery worker; `endpoint`: the
/// tenant's one webhook endpoint, if any.
async fn setup(
    dir: &std::path::Path,
    name: &str,
    endpoint: Option<&str>,
) -> (Engine, tokio::sync::watch::Sender<bool>) {
    let store = SqliteStore::open(dir.join(format!("{name}.db"))).unwrap();
    let engine = Engine::open(
        Arc::new(store),
        vec![],
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let hook = endpoint.map_or(String::new(), |url| {
        format!("[[tenants.webhooks]]\nname = \"all\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n")
    });
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"bench\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 100000000\nmax_session_secs = 3600\n{hook}",
        hash_key("bench")
    ))
    .unwrap();
    let outbound = Outbound::new(
        engine.clone(),
        tenants,
        OutboundConfig {
            addresses: AddressPolicy {
                allow_loopback: true,
                ..AddressPolicy::default()
            },
            ..OutboundConfig::new("local")
        },
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(outbound.run(stopped));
    (engine, stop)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ((without, _stop_without), (with, _stop_with)) = rt.block_on(async {
        let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", receiver.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(|| async { axum::http::StatusCode::NO_CONTENT }),
        );
        tokio::spawn(async move { axum::serve(receiver, app).await });
        (
            setup(dir.path(), "without", None).await,
            setup(dir.path(), "with", Some(&url)).await,
        )
    });

    let mut group = c.benchmark_group("sqlite_end_with_outbox");
    group.throughput(Throughput::Elements(1));
    for (name, engine) in [("no_endpoint", &without), ("one_endpoint", &with)] {
        group.bench_function(format!("sequential/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let ids = started(std::slice::from_ref(engine), iters).await;
                    let t = Instant::now();
                    for (_, id) in ids {
                        engine.end(None, id, EndReason::Requested).await.unwrap();
                    }
                    t.elapsed()
                })
            })
        });
    }
    group.throughput(Throughput::Elements(8));
    for (name, engine) in [("no_endpoint", &without), ("one_endpoint", &with)] {
        group.bench_function(format!("concurrent_8/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let ids = started(std::slice::from_ref(engine), 8).await;
                        let t = Instant::now();
                        end_concurrently(std::slice::from_ref(engine), ids).await;
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
