//! What a failure of the database file becomes: an unavailable store, its cause kept.

use session_lifecycle_store::StoreError;

/// The store could not be used because of `e`.
pub(crate) fn unavailable(e: impl Into<session_lifecycle_store::BoxError>) -> StoreError {
    StoreError::unavailable(e)
}

/// A failed SQLite call: the store could not be used.
pub(crate) fn db(e: rusqlite::Error) -> StoreError {
    unavailable(e)
}
