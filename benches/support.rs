//! Setup shared by the engine benches (untimed): sessions started through an engine, or
//! created straight in a store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use session_lifecycle::{Clock, EndReason, SessionId};
use session_lifecycle_runtime::{Engine, NewSession, Plan, StartRequest, Store, SystemClock};

/// A session with no plan limit, no room and no GPU.
pub fn request() -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "bench".into(),
        plan: Plan::new(None, Duration::from_secs(3600)),
        duration: None,
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

/// Starts `n` sessions, spread over `engines` in turn, 256 at a time; each with the index of
/// its engine.
pub async fn started(engines: &[Engine], n: u64) -> Vec<(usize, SessionId)> {
    let mut ids = Vec::with_capacity(n as usize);
    let mut next = 0usize;
    let mut left = n;
    while left > 0 {
        let batch = left.min(256);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let k = next % engines.len();
                next += 1;
                let engine = engines[k].clone();
                tokio::spawn(
                    async move { (k, *engine.start(request()).await.unwrap().session.id()) },
                )
            })
            .collect();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        left -= batch;
    }
    ids
}

/// Distinct ids within one millisecond.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Creates `n` started sessions of `node` straight in `store`, 256 at a time: no engine
/// tracks them.
pub async fn created<S: Store + Clone>(store: &S, node: &str, n: u64) -> Vec<SessionId> {
    let now = SystemClock.now();
    let mut ids = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let batch = left.min(256);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let store = store.clone();
                let node = node.to_owned();
                let id = SessionId::from_ulid_parts(
                    now,
                    u128::from(NEXT.fetch_add(1, Ordering::Relaxed)) << 16
                        | u128::from(std::process::id() as u16),
                );
                tokio::spawn(async move {
                    store
                        .create(NewSession {
                            callback_url: None,
                            billing: Default::default(),
                            id,
                            tenant: "bare".into(),
                            started_at: now,
                            expires_at: now.saturating_add(Duration::from_secs(3600)),
                            metadata: None,
                            room: None,
                            max_concurrent: None,
                            timeouts: Default::default(),
                            node,
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

/// Ends `ids` all at once, each through the engine that started it; returns when every
/// end is acknowledged.
pub async fn end_concurrently(engines: &[Engine], ids: Vec<(usize, SessionId)>) {
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|(k, id)| {
            let engine = engines[k].clone();
            tokio::spawn(async move { engine.end(None, id, EndReason::Requested).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Ends `ids` one after another straight in `store`.
pub async fn end_in_store<S: Store>(store: &S, ids: Vec<SessionId>) {
    for id in ids {
        store
            .end(id, None, SystemClock.now(), EndReason::Requested, None)
            .await
            .unwrap();
    }
}
