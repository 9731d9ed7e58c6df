//! Rows read back into records: `record_columns!()` rows grouped by session, and one
//! column read without a panic.

use deadpool_postgres::GenericClient;
use session_lifecycle::Resource;
use session_lifecycle_store::rows::{ResourceRow, SessionRow};
use session_lifecycle_store::{SessionRecord, StoreError};
use tokio_postgres::Row;

use crate::error::unavailable;

/// Column `idx` of `row`: a type or NULL mismatch is a corrupt record, never a panic.
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|e| StoreError::Corrupt {
        id: row
            .try_get::<_, String>(0)
            .unwrap_or_else(|_| "(unknown)".to_owned()),
        detail: format!("column {idx}: {e}"),
    })
}

/// Groups rows of `record_columns!()` (ordered by session) into records.
pub(crate) fn records(rows: &[Row]) -> Result<Vec<SessionRecord>, StoreError> {
    let mut out = Vec::new();
    let mut current: Option<(SessionRow, Vec<ResourceRow>)> = None;
    for row in rows {
        let id: String = col(row, 0)?;
        if current.as_ref().is_none_or(|(s, _)| s.id != id) {
            if let Some((session, resources)) = current.take() {
                out.push(session.into_record(resources)?);
            }
            current = Some((
                SessionRow {
                    id,
                    tenant: col(row, 1)?,
                    status: col(row, 2)?,
                    started_at: col(row, 3)?,
                    ended_at: col(row, 4)?,
                    end_reason: col(row, 5)?,
                    expires_at: col(row, 6)?,
                    last_seen_at: col(row, 7)?,
                    metadata: col(row, 8)?,
                    room_provider: col(row, 9)?,
                    room_name: col(row, 10)?,
                    node: col(row, 11)?,
                    participant_left_ms: col(row, 21)?,
                    participant_absent_ms: col(row, 22)?,
                    websocket_grace_ms: col(row, 23)?,
                    ready_at: col(row, 24)?,
                },
                Vec::new(),
            ));
        }
        if let (Some((_, resources)), Some(seq)) = (current.as_mut(), row.get::<_, Option<i32>>(12))
        {
            resources.push(ResourceRow {
                seq: i64::from(seq),
                kind: i64::from(col::<i32>(row, 13)?),
                handle: col(row, 14)?,
                state: col(row, 15)?,
                attempts: i64::from(col::<i32>(row, 16)?),
                retry_at: col(row, 17)?,
                released_at: col(row, 18)?,
                note: col(row, 19)?,
                last_error: col(row, 20)?,
            });
        }
    }
    if let Some((session, resources)) = current {
        out.push(session.into_record(resources)?);
    }
    Ok(out)
}

pub(crate) async fn get_record<C: GenericClient>(
    c: &C,
    id: &str,
) -> Result<Option<SessionRecord>, StoreError> {
    let statement = c
        .prepare_cached(concat!(
            "SELECT ",
            record_columns!(),
            " FROM sessions s
             LEFT JOIN resources r ON r.session_id = s.id
             WHERE s.id = $1"
        ))
        .await
        .map_err(unavailable)?;
    let rows = c.query(&statement, &[&id]).await.map_err(unavailable)?;
    Ok(records(&rows)?.pop())
}

pub(crate) fn resource_key(r: &Resource) -> (i32, i64) {
    (i32::from(r.kind.0), r.handle as i64)
}
