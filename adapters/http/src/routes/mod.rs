//! The handlers, by area. Each takes the shared [`AppState`](crate::state::AppState) and
//! the extractors of [`crate::extract`], and answers views of [`crate::views`] or an
//! [`ApiError`](crate::error::ApiError).

pub mod events;
pub mod operations;
pub mod overview;
#[cfg(feature = "live-page")]
pub mod page;
pub mod sessions;
pub mod usage;
pub mod webhooks;
pub mod ws;
