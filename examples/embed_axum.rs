//! An existing axum service adds AI-avatar sessions: it mounts the session API under
//! `/avatar`, next to its own routes, behind its own authentication, on an embedded
//! SQLite file.
//!
//! The service's users never see an API key of the session API: the service's own layer
//! checks its users' credentials (here, one bearer token) and calls the session API as
//! its tenant `app`.
//!
//! `cargo run --example embed_axum -- 127.0.0.1:3000 embed_axum.db`, then
//! `curl -X POST localhost:3000/avatar/v1/sessions -H 'authorization: Bearer demo-user'`.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let database = args.next().unwrap_or_else(|| "embed_axum.db".to_owned());

    // The engine: a store and resource backends (none here; sessiond adds avatar server
    // processes and GPUs the same way).
    let store = std::sync::Arc::new(SqliteStore::open(&database)?);
    let config = EngineConfig::default();
    let engine = Engine::open(store, Vec::new(), std::sync::Arc::new(SystemClock), config).await?;
    let background = engine.spawn_background();

    let plan = Plan::new(Some(100), Duration::from_secs(3600));
    let tenants = Tenants::single("app", TENANT_KEY, plan);
    // Signs the client tokens of session WebSockets; share the secret between instances.
    let secret = std::env::var("TOKEN_SECRET")
        .unwrap_or_else(|_| format!("{:?}", std::time::SystemTime::now()));
    let tokens = TokenSigner::from_secret(&secret);
    let state = AppState::new(engine.clone(), tenants, tokens, HttpConfig::default());

    let avatar = session_lifecycle_http::router(state).layer(middleware::from_fn(service_auth));
    let app = Router::new()
        .route("/", get(|| async { "the service's own home page\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .nest("/avatar", avatar);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    session_lifecycle_http::serve(listener, app, stop).await?;

    // Stopping: sessions still running end `shutdown` and release what they hold.
    let ended = engine.shutdown(Duration::from_secs(10)).await?;
    background.join().await;
    println!("stopped; {ended} session(s) ended");
    Ok(())
}
