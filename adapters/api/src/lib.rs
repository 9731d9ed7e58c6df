//! The wire types of `sessiond`'s HTTP API, shared by the service (which serves them and
//! writes its OpenAPI document from them) and its Rust client (which reads them):
//!
//! - [`views`]: sessions as answers show them, what a create sends, health answers;
//! - [`events`]: session events (the webhook and event-stream envelope) and webhook
//!   deliveries;
//! - [`errors`]: the error body and every error code, each with its one HTTP status;
//! - [`overview`]: what the live page (`/ui`) shows, as `GET /v1/overview` answers it;
//! - [`usage`]: billable time, as `GET /v1/usage` answers it.
//!
//! ```
//! use session_lifecycle_api::errors::ErrorCode;
//!
//! let code = ErrorCode::from_name("session_not_found").unwrap();
//! assert_eq!((code, code.http_status()), (ErrorCode::SessionNotFound, 404));
//! ```

pub mod errors;
pub mod events;
pub mod overview;
pub mod usage;
pub mod views;
mod wire;
