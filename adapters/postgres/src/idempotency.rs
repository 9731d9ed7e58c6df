//! Idempotency keys of creates (see [`IdempotencyStore`]): the key's row is locked while
//! it is judged, and a key two instances take at once goes to the first insert; the other
//! reads it again and finds it held.

use std::time::Duration;

use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::rows::{duration_ms, millis as ms, stored_key};
use session_lifecycle_store::sql::{postgres as pg, statements};
use session_lifecycle_store::{
    BoxFuture, IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision, StoreError,
    decide_key,
};

use crate::{PostgresStore, col, unavailable};

impl IdempotencyStore for PostgresStore {
    fn begin_idempotent(
        &self,
        request: IdempotentRequest,
        candidate: SessionId,
        now: Timestamp,
        stale_after: Duration,
        keep_for: Duration,
    ) -> BoxFuture<'_, Result<IdempotencyBegin, StoreError>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            // At most twice: a first insert that lost to another instance's reads again.
            for _ in 0..2 {
                let tx = client.transaction().await.map_err(unavailable)?;
                let row = tx
                    .query_opt(
                        "SELECT request_hash, session_id, status, body, created_at, claimed_at
                         FROM idempotency_keys WHERE tenant = $1 AND key = $2 FOR UPDATE",
                        &[&request.tenant, &request.key],
                    )
                    .await
                    .map_err(unavailable)?;
                let found = match &row {
                    Some(r) => Some(stored_key((
                        col(r, 0)?,
                        col(r, 1)?,
                        col(r, 2)?,
                        col(r, 3)?,
                        col(r, 4)?,
                        col(r, 5)?,
                    ))?),
                    None => None,
                };
                let begin = match decide_key(
                    found.as_ref(),
                    &request.request_hash,
                    now,
                    stale_after,
                    keep_for,
                ) {
                    KeyDecision::Answer(begin) => begin,
                    KeyDecision::Take => {
                        let taken = tx
                            .execute(
                                pg(statements::TAKE_KEY),
                                &[
                                    &request.tenant,
                                    &request.key,
                                    &request.request_hash,
                                    &candidate.to_string(),
                                    &ms(now),
                                    &(ms(now) - duration_ms(keep_for)),
                                ],
                            )
                            .await
                            .map_err(unavailable)?;
                        if taken == 0 {
                            continue;
                        }
                        IdempotencyBegin::Proceed {
                            session: candidate,
                            taken_over: false,
                        }
                    }
                    KeyDecision::TakeOver(session) => {
                        tx.execute(
                            pg(statements::TAKE_OVER_KEY),
                            &[
                                &request.tenant,
                                &request.key,
                                &ms(now),
                                &(ms(now) - duration_ms(stale_after)),
                            ],
                        )
                        .await
                        .map_err(unavailable)?;
                        IdempotencyBegin::Proceed {
                            session,
                            taken_over: true,
                        }
                    }
                };
                tx.commit().await.map_err(unavailable)?;
                return Ok(begin);
            }
            Ok(IdempotencyBegin::InProgress)
        })
    }

    fn finish_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
        status: u16,
        body: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let (tenant, key) = (tenant.to_owned(), key.to_owned());
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    pg(statements::FINISH_KEY),
                    &[
                        &tenant,
                        &key,
                        &session.to_string(),
                        &i64::from(status),
                        &body,
                    ],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn abandon_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let (tenant, key) = (tenant.to_owned(), key.to_owned());
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    pg(statements::ABANDON_KEY),
                    &[&tenant, &key, &session.to_string()],
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}
