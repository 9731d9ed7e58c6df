//! `/readyz` says "full": with NVML faked, it answers 503 `no_capacity` once no GPU has
//! room for a session of the default size, and 200 again when a release gives room back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use session_lifecycle_cuda::{
    AssignmentBackend, AssignmentConfig, DeviceMemory, GpuError, GpuInfo, GpuProcess,
};
use session_lifecycle_http::tenants::Tenants;
use session_lifecycle_http::tokens::TokenSigner;
use session_lifecycle_http::{AppState, HttpConfig, router};
use session_lifecycle_runtime::{Engine, EngineConfig, Plan, ResourceBackend, SystemClock};

const GIB: u64 = 1 << 30;

/// One 10 GiB GPU on which nothing runs: room is what is not promised.
struct OneGpu {
    free: Mutex<u64>,
}

impl GpuInfo for OneGpu {
    fn devices(&self) -> Result<Vec<DeviceMemory>, GpuError> {
        Ok(vec![DeviceMemory {
            index: 0,
            uuid: "GPU-fake-0".into(),
            name: "fake".into(),
            total: 10 * GIB,
            free: *self.free.lock().unwrap(),
        }])
    }
    fn processes(&self, _: u32) -> Result<Vec<GpuProcess>, GpuError> {
        Ok(Vec::new())
    }
}

async fn readyz(base: &str) -> (StatusCode, serde_json::Value) {
    let resp = reqwest::get(format!("{base}/readyz")).await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_no_capacity_when_no_gpu_has_room_and_ready_again_when_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = Arc::new(OneGpu {
        free: Mutex::new(10 * GIB),
    });
    let shares = AssignmentBackend::new(
        Arc::clone(&gpu) as Arc<dyn GpuInfo>,
        AssignmentConfig {
            default_memory: 4 * GIB,
            ..AssignmentConfig::default()
        },
    );
    let engine = Engine::open(
        Arc::new(session_lifecycle_sqlite::SqliteStore::open(dir.path().join("r.db")).unwrap()),
        vec![Arc::new(shares) as Arc<dyn ResourceBackend>],
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let background = engine.spawn_background();
    let plan = Plan::new(None, Duration::from_secs(600));
    let state = AppState::new(
        engine.clone(),
        Tenants::single("default", "k", plan),
        TokenSigner::new([7; 32]),
        HttpConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let client = reqwest::Client::new();
    let create = || async {
        let resp = client
            .post(format!("{base}/v1/sessions"))
            .header("x-api-key", "k")
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json::<serde_json::Value>().await.unwrap())
    };

    assert_eq!(readyz(&base).await.0, StatusCode::OK);
    // Two 4 GiB shares promised: 2 GiB left, less than a session of the default size.
    let (status, first) = create().await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(readyz(&base).await.0, StatusCode::OK, "4 GiB still free");
    assert_eq!(create().await.0, StatusCode::CREATED);
    let (status, v) = readyz(&base).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["status"], "no_capacity", "{v}");
    let (status, v) = create().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "capacity_exhausted");

    // One session ends; once its share is released there is room again.
    let id = first["session"]["session_id"].as_str().unwrap();
    let resp = client
        .post(format!("{base}/v1/sessions/{id}/end"))
        .header("x-api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut ready = false;
    for _ in 0..100 {
        if readyz(&base).await.0 == StatusCode::OK {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "ready again once the share came back");

    // Room taken by something else on the GPU counts as well.
    *gpu.free.lock().unwrap() = 5 * GIB;
    assert_eq!(readyz(&base).await.1["status"], "no_capacity");
    *gpu.free.lock().unwrap() = 10 * GIB;
    assert_eq!(readyz(&base).await.0, StatusCode::OK);

    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    background.join().await;
}
