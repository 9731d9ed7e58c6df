//! What every check of the suite shares: the reference time, fresh ids and tenants, and
//! sessions created and read back.

use std::time::Duration;

use session_lifecycle::{Resource, ResourceKind, SessionId, Timestamp};

use crate::record::{CreateOutcome, NewSession, SessionRecord, SessionTimeouts};
use crate::store::Store;

/// 2024-01-15T10:30:00Z, the reference's start time.
pub(super) const T0: u64 = 1_705_314_600_000;

pub(super) fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

/// The wall clock's time, for checks that need the present (node heartbeats, presence).
pub(super) fn wall_now() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(millis)
}

pub(super) fn random() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("OS randomness");
    u128::from_le_bytes(b)
}

pub(super) fn fresh_tenant() -> String {
    format!("tenant-{:x}", random() as u64)
}

/// The node the suite's sessions run on, unless a check says otherwise.
pub(super) const NODE: &str = "a";

pub(super) fn new_session(tenant: &str, started: Timestamp, lifetime: Duration) -> NewSession {
    NewSession {
        id: SessionId::from_ulid_parts(started, random()),
        tenant: tenant.to_owned(),
        started_at: started,
        expires_at: started.saturating_add(lifetime),
        metadata: None,
        room: None,
        max_concurrent: None,
        node: NODE.to_owned(),
        timeouts: SessionTimeouts::default(),
        callback_url: None,
        billing: Default::default(),
    }
}

pub(super) async fn create(store: &dyn Store, new: &NewSession) {
    let outcome = store.create(new.clone()).await.expect("create");
    assert_eq!(outcome, CreateOutcome::Created, "create {}", new.id);
}

pub(super) async fn get(store: &dyn Store, id: SessionId) -> SessionRecord {
    store
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{id} not found"))
}

pub(super) fn res(handle: u64) -> Resource {
    Resource {
        kind: ResourceKind(7),
        handle,
    }
}
