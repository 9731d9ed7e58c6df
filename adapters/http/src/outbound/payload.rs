//! What a session event says, as webhooks and the event stream send it (see
//! [`session_lifecycle_api::events`]).

pub use session_lifecycle_api::events::*;
