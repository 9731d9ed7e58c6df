//! The JSON bodies of the API (see [`session_lifecycle_api::views`]).

pub use session_lifecycle_api::views::*;
