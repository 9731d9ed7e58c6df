//! The reference store's idempotency keys.

use std::time::Duration;

use session_lifecycle::{SessionId, Timestamp};

use super::{MemoryStore, ready};
use crate::error::{BoxFuture, StoreError};
use crate::idempotency::{
    IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision, StoredKey, decide_key,
};

impl IdempotencyStore for MemoryStore {
    fn begin_idempotent(
        &self,
        request: IdempotentRequest,
        candidate: SessionId,
        now: Timestamp,
        stale_after: Duration,
        keep_for: Duration,
    ) -> BoxFuture<'_, Result<IdempotencyBegin, StoreError>> {
        let mut state = self.state();
        let slot = (request.tenant, request.key);
        let found = state.idempotency.get(&slot);
        let begin = match decide_key(found, &request.request_hash, now, stale_after, keep_for) {
            KeyDecision::Answer(begin) => begin,
            KeyDecision::Take => {
                state.idempotency.insert(
                    slot,
                    StoredKey {
                        request_hash: request.request_hash,
                        session: candidate,
                        answer: None,
                        created_at: now,
                        claimed_at: now,
                    },
                );
                IdempotencyBegin::Proceed {
                    session: candidate,
                    taken_over: false,
                }
            }
            KeyDecision::TakeOver(session) => {
                if let Some(key) = state.idempotency.get_mut(&slot) {
                    key.claimed_at = now;
                }
                IdempotencyBegin::Proceed {
                    session,
                    taken_over: true,
                }
            }
        };
        ready(Ok(begin))
    }

    fn finish_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
        status: u16,
        body: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        if let Some(k) = state
            .idempotency
            .get_mut(&(tenant.to_owned(), key.to_owned()))
            .filter(|k| k.session == session && k.answer.is_none())
        {
            k.answer = Some((status, body));
        }
        ready(Ok(()))
    }

    fn abandon_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state();
        let slot = (tenant.to_owned(), key.to_owned());
        if state
            .idempotency
            .get(&slot)
            .is_some_and(|k| k.session == session && k.answer.is_none())
        {
            state.idempotency.remove(&slot);
        }
        ready(Ok(()))
    }
}
