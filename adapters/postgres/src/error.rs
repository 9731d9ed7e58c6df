//! What a failure of the database becomes: a [`StoreError`] with the server's own message.

use session_lifecycle_store::StoreError;

/// A failure to reach or use the database: its error as the source, displayed with the
/// server's own message and the rest of its chain (tokio-postgres alone shows only "db
/// error").
#[derive(Debug)]
pub(crate) struct PgError(pub(crate) tokio_postgres::Error);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

pub(crate) fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::unavailable(PgError(e))
}

/// A failure of the connection pool (no connection could be had).
pub(crate) fn pool_unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable(e)
}
