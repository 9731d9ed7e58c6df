//! Runnable examples of linking session-lifecycle into a Rust service, each run by
//! `cargo run --example NAME` from the repository root and by this package's tests:
//!
//! - `embed_axum`: an axum service mounts the session API under `/avatar`, next to its
//!   own routes, behind its own authentication, on SQLite;
//! - `custom_backend`: a service brings its own [`ResourceBackend`] (a seat booked in an
//!   external pool) and starts and ends sessions from its own code, no HTTP;
//! - `engine_postgres`: two engines on one PostgreSQL database; one ends a session the
//!   other started, and the other releases it;
//! - `no_std_core`: the `no_std` core driven by a hand-written loop and a fake clock.
//!
//! [`ResourceBackend`]: session_lifecycle_runtime::ResourceBackend
