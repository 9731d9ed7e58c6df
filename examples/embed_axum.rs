//! An existing axum service adds AI-avatar sessions: it mounts the session API under
//! `/avatar`, next to its own routes, behind its own authentication, on an embedded
//! SQLite file.
//!
//! The service's users never see an API key of the session API: the service's own layer
//! checks its users' credentials (here, one bearer token) and calls the session API as
//! its one tenant `app`, so every signed-in user sees every session of the service (a
//! service with several customers configures one tenant per customer instead). The
//! session WebSocket and the provider webhooks authenticate themselves (a client token,
//! a provider signature) and pass the service's layer untouched.
//!
//! `cargo run --example embed_axum -- 127.0.0.1:3000 embed_axum.db`, then
//! `curl -X POST localhost:3000/avatar/v1/sessions -H 'authorization: Bearer demo-user'`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use session_lifecycle_http::outbound::{Outbound, OutboundConfig};
use session_lifecycle_http::tenants::Tenants;
use session_lifecycle_http::tokens::TokenSigner;
use session_lifecycle_http::{AppState, HttpConfig};
use session_lifecycle_runtime::{Engine, EngineConfig, Plan, SystemClock};
use session_lifecycle_sqlite::SqliteStore;

/// What the service's users send (a real service checks a session cookie or a JWT).
const USER_CREDENTIAL: &str = "Bearer demo-user";

/// The service's own key to the session API, known to this process only.
const TENANT_KEY: &str = "app-internal-key";

/// The service's authentication in front of the session API: a user who is not signed
/// in gets the service's own 401; a signed-in user's request goes on as tenant `app`.
async fn service_auth(mut request: Request, next: Next) -> Response {
    // Inside the nest the path is the session API's own (`/v1/...`).
    let path = request.uri().path();
    let self_authenticated = path.starts_with("/v1/webhooks/")
        || (path.starts_with("/v1/sessions/") && path.ends_with("/ws"));
    if self_authenticated {
        return next.run(request).await;
    }
    let signed_in = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v == USER_CREDENTIAL);
    if !signed_in {
        return (StatusCode::UNAUTHORIZED, "sign in to the service first").into_response();
    }
    request
        .headers_mut()
        .insert("x-api-key", HeaderValue::from_static(TENANT_KEY));
    next.run(request).await
}

/// Ctrl-C or SIGTERM (what a deploy sends).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => drop(tokio::signal::ctrl_c().await),
        }
    }
    #[cfg(not(unix))]
    drop(tokio::signal::ctrl_c().await);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let database = args.next().unwrap_or_else(|| "embed_axum.db".to_owned());

    // The engine: a store and resource backends (none here; sessiond adds avatar server
    // processes and GPUs the same way).
    let store = Arc::new(SqliteStore::open(&database)?);
    let config = EngineConfig::default();
    let engine = Engine::open(store, Vec::new(), Arc::new(SystemClock), config).await?;
    let background = engine.spawn_background();

    let plan = Plan::new(Some(100), Duration::from_secs(3600));
    let tenants = Tenants::single("app", TENANT_KEY, plan);
    // Signs the client tokens of session WebSockets: set TOKEN_SECRET to the same value
    // on every instance, else tokens are valid on this process only.
    let secret = match std::env::var("TOKEN_SECRET") {
        Ok(secret) => secret,
        Err(_) => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let tokens = TokenSigner::from_secret(&secret);
    let state = AppState::new(
        engine.clone(),
        tenants.clone(),
        tokens,
        HttpConfig::default(),
    );

    // The outbox worker: fans recorded events out to the event stream (`/v1/events`) and
    // forgets old events and idempotency keys. Without it the stream stays silent.
    let outbound = Outbound::new(engine.clone(), tenants, OutboundConfig::new("embed_axum"))?;
    let _ = state.outbound.set(Arc::clone(&outbound));
    let (stop_outbound, outbound_stop) = tokio::sync::watch::channel(false);
    let outbound_task = tokio::spawn(outbound.run(outbound_stop));

    let avatar = session_lifecycle_http::router(state).layer(middleware::from_fn(service_auth));
    let app = Router::new()
        .route("/", get(|| async { "the service's own home page\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .nest("/avatar", avatar);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    session_lifecycle_http::serve(listener, app, stop_signal()).await?;

    // Stopping: sessions still running end `shutdown` and release what they hold; their
    // events are in the store before the worker stops.
    let ended = engine.shutdown(Duration::from_secs(10)).await?;
    background.join().await;
    let _ = stop_outbound.send(true);
    outbound_task.await?;
    println!("stopped; {ended} session(s) ended");
    Ok(())
}
