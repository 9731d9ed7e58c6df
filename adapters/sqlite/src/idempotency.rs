//! Idempotency keys of creates (see [`IdempotencyStore`]).

use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use session_lifecycle::{SessionId, Timestamp};
use session_lifecycle_store::rows::{KeyRow, duration_ms, millis as ms, stored_key};
use session_lifecycle_store::sql::statements;
use session_lifecycle_store::{
    BoxFuture, IdempotencyBegin, IdempotencyStore, IdempotentRequest, KeyDecision, StoreError,
    decide_key,
};

use crate::{SqliteStore, db};

impl IdempotencyStore for SqliteStore {
    fn begin_idempotent(
        &self,
        request: IdempotentRequest,
        candidate: SessionId,
        now: Timestamp,
        stale_after: Duration,
        keep_for: Duration,
    ) -> BoxFuture<'_, Result<IdempotencyBegin, StoreError>> {
        Box::pin(self.inner.conns.write(move |c| {
            let row: Option<KeyRow> = c
                .prepare_cached(statements::KEY_OF)
                .and_then(|mut s| {
                    s.query_row(params![request.tenant, request.key], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })
                    .optional()
                })
                .map_err(db)?;
            let found = row.map(stored_key).transpose()?;
            // One writer: what was read is what is written over.
            Ok(
                match decide_key(
                    found.as_ref(),
                    &request.request_hash,
                    now,
                    stale_after,
                    keep_for,
                ) {
                    KeyDecision::Answer(begin) => begin,
                    KeyDecision::Take => {
                        c.prepare_cached(statements::TAKE_KEY)
                            .and_then(|mut s| {
                                s.execute(params![
                                    request.tenant,
                                    request.key,
                                    request.request_hash,
                                    candidate.to_string(),
                                    ms(now),
                                    ms(now) - duration_ms(keep_for)
                                ])
                            })
                            .map_err(db)?;
                        IdempotencyBegin::Proceed {
                            session: candidate,
                            taken_over: false,
                        }
                    }
                    KeyDecision::TakeOver(session) => {
                        c.prepare_cached(statements::TAKE_OVER_KEY)
                            .and_then(|mut s| {
                                s.execute(params![
                                    request.tenant,
                                    request.key,
                                    ms(now),
                                    ms(now) - duration_ms(stale_after)
                                ])
                            })
                            .map_err(db)?;
                        IdempotencyBegin::Proceed {
                            session,
                            taken_over: true,
                        }
                    }
                },
            )
        }))
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
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(statements::FINISH_KEY)
                .and_then(|mut s| {
                    s.execute(params![
                        tenant,
                        key,
                        session.to_string(),
                        i64::from(status),
                        body
                    ])
                })
                .map_err(db)?;
            Ok(())
        }))
    }

    fn abandon_idempotent(
        &self,
        tenant: &str,
        key: &str,
        session: SessionId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let (tenant, key) = (tenant.to_owned(), key.to_owned());
        Box::pin(self.inner.conns.write(move |c| {
            c.prepare_cached(statements::ABANDON_KEY)
                .and_then(|mut s| s.execute(params![tenant, key, session.to_string()]))
                .map_err(db)?;
            Ok(())
        }))
    }
}
