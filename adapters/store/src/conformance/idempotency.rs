//! Idempotency keys: one request body per key, one session per key, the answer replayed.

use std::time::Duration;

use session_lifecycle::SessionId;

use super::support::{at, fresh_tenant, random};
use crate::idempotency::{IdempotencyBegin, IdempotentRequest};
use crate::store::Store;

fn candidate() -> SessionId {
    SessionId::from_ulid_parts(at(0), random())
}

/// A key is taken once; a second request with it waits (in progress), another body is
/// refused, a dead holder is taken over with its session, an answer is replayed, an
/// abandoned or expired key is free again, and keys are per tenant.
pub async fn idempotency_keys_bind_one_request(store: &dyn Store) {
    let tenant = fresh_tenant();
    let stale = Duration::from_secs(30);
    let keep = Duration::from_secs(24 * 3600);
    let req = |key: &str, hash: &str| IdempotentRequest {
        tenant: tenant.clone(),
        key: key.to_owned(),
        request_hash: hash.to_owned(),
    };
    let begin = |r: IdempotentRequest, c: SessionId, secs: u64| async move {
        store
            .begin_idempotent(r, c, at(secs), stale, keep)
            .await
            .expect("begin")
    };
    let first = candidate();
    assert_eq!(
        begin(req("k", "h1"), first, 0).await,
        IdempotencyBegin::Proceed {
            session: first,
            taken_over: false
        }
    );
    assert_eq!(
        begin(req("k", "h1"), candidate(), 1).await,
        IdempotencyBegin::InProgress
    );
    assert_eq!(
        begin(req("k", "h2"), candidate(), 1).await,
        IdempotencyBegin::Mismatch
    );
    assert_eq!(
        begin(req("k", "h1"), candidate(), 31).await,
        IdempotencyBegin::Proceed {
            session: first,
            taken_over: true
        },
        "a holder silent past the stale time is taken over, with its session"
    );
    assert_eq!(
        begin(req("k", "h1"), candidate(), 32).await,
        IdempotencyBegin::InProgress
    );
    store
        .finish_idempotent(&tenant, "k", candidate(), 500, "not mine".to_owned())
        .await
        .expect("finish");
    assert_eq!(
        begin(req("k", "h1"), candidate(), 33).await,
        IdempotencyBegin::InProgress
    );
    store
        .finish_idempotent(&tenant, "k", first, 201, "{\"answer\":1}".to_owned())
        .await
        .expect("finish");
    assert_eq!(
        begin(req("k", "h1"), candidate(), 34).await,
        IdempotencyBegin::Answered {
            status: 201,
            body: "{\"answer\":1}".to_owned()
        }
    );
    assert_eq!(
        begin(req("k", "h2"), candidate(), 34).await,
        IdempotencyBegin::Mismatch
    );
    // Per tenant.
    let other = IdempotentRequest {
        tenant: fresh_tenant(),
        key: "k".to_owned(),
        request_hash: "h9".to_owned(),
    };
    let theirs = candidate();
    assert_eq!(
        store
            .begin_idempotent(other, theirs, at(34), stale, keep)
            .await
            .expect("begin"),
        IdempotencyBegin::Proceed {
            session: theirs,
            taken_over: false
        }
    );
    // Abandoned: free again.
    let gone = candidate();
    assert!(matches!(
        begin(req("k2", "h1"), gone, 40).await,
        IdempotencyBegin::Proceed { .. }
    ));
    store
        .abandon_idempotent(&tenant, "k2", gone)
        .await
        .expect("abandon");
    let again = candidate();
    assert_eq!(
        begin(req("k2", "h2"), again, 41).await,
        IdempotencyBegin::Proceed {
            session: again,
            taken_over: false
        }
    );
    // Expired: free again, whatever it was.
    let later = candidate();
    assert_eq!(
        begin(req("k", "h3"), later, 24 * 3600 + 1).await,
        IdempotencyBegin::Proceed {
            session: later,
            taken_over: false
        }
    );
}
