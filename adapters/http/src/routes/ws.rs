//! The session WebSocket: client presence.
//!
//! The server pings every `ping_interval`; anything the client sends (pongs included)
//! counts as liveness. A socket that closes, errors, or sends nothing for `pong_timeout`
//! is gone; when a session's last socket on this instance is gone (and stays gone for the
//! grace period, none by default) the session ends with `websocket_disconnected`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use session_lifecycle::{EndReason, SessionId, Status};
use tokio::time::Instant;
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{SessionPath, api_key_tenant};
use crate::state::AppState;

/// WebSocket query: the client token.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsParams {
    /// The `client_token` from the create answer (or send `x-api-key` instead).
    pub token: Option<String>,
}

/// Open the session's presence WebSocket.
///
/// A WebSocket handshake (RFC 6455): `GET` with `Connection: Upgrade`, `Upgrade: websocket`,
/// `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`, authenticated by the session's
/// `client_token` (query `token`) or its tenant's `x-api-key`. The answer is 101 and the
/// socket is open; a request that is not a handshake gets 426 with `Upgrade: websocket`.
#[utoipa::path(
    get, path = "/v1/sessions/{session_id}/ws", tag = "sessions",
    params(SessionPath, WsParams),
    responses(
        (status = 101, description = "Switching protocols: the socket is open",
            headers(
                ("Upgrade" = String, description = "`websocket`"),
                ("Connection" = String, description = "`upgrade`"),
                ("Sec-WebSocket-Accept" = String, description = "The handshake's answer to `Sec-WebSocket-Key`"),
            )),
        (status = 400, description = "Malformed session id (`invalid_session_id`)", body = ErrorBody),
        (status = 401, description = "No valid client token or API key (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown session, or another tenant's (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "The session has ended (`session_ended`)", body = ErrorBody),
        (status = 426, description = "Not a WebSocket handshake (`upgrade_required`)", body = ErrorBody,
            headers(
                ("Upgrade" = String, description = "`websocket`: the protocol this route takes"),
            )),
        (status = 503, description = "Storage unavailable or overloaded", body = ErrorBody),
    ),
    security(("api_key" = []), ("client_token" = []))
)]
pub async fn session_ws(
    State(state): State<Arc<AppState>>,
    SessionPath(id): SessionPath,
    headers: HeaderMap,
    query: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = query.ok().and_then(|Query(q)| q.token);
    // A client token for this session, or an API key of its tenant.
    let tenant = match token {
        Some(token) => {
            state
                .tokens
                .verify(&token, id, state.engine.now())
                .map_err(|_| ApiError::unauthorized())?;
            None
        }
        None => Some(api_key_tenant(&state.tenants, &headers)?),
    };
    let record = state
        .engine
        .get(tenant.as_ref().map(|t| t.name.as_str()), id)
        .await?;
    if record.session.status() == Status::Ended {
        return Err(ApiError::new(
            ErrorCode::SessionEnded,
            "the session has ended",
        ));
    }
    let upgrade = upgrade.map_err(|_| {
        ApiError::new(
            ErrorCode::UpgradeRequired,
            "this endpoint takes a WebSocket upgrade",
        )
    })?;
    // Counted before the upgrade completes, so a quick close-and-reopen never looks
    // like "no sockets left".
    state.presence.join(id);
    state.engine.touch(None, id).await.ok();
    let st = Arc::clone(&state);
    Ok(upgrade
        .on_failed_upgrade(move |_| {
            st.presence.leave(id);
        })
        .on_upgrade(move |socket| serve(socket, state, id))
        .into_response())
}

/// Why a socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// The client closed it (or the connection ended cleanly).
    Closed,
    /// Nothing heard from the client for the pong timeout.
    Silent,
    /// A ping could not be sent.
    SendFailed,
    /// The connection failed.
    Error,
    /// The session ended by other means; the socket was closed.
    SessionEnded,
    /// The service is shutting down; the socket was closed.
    ShuttingDown,
}

impl Gone {
    /// What the log says.
    fn as_str(self) -> &'static str {
        match self {
            Gone::Closed => "closed",
            Gone::Silent => "lost (no pong)",
            Gone::SendFailed => "lost (send failed)",
            Gone::Error => "lost (error)",
            Gone::SessionEnded => "session ended",
            Gone::ShuttingDown => "service shutting down",
        }
    }

    /// Whether the session ends (`websocket_disconnected`) when this was its last socket.
    fn ends_session(self) -> bool {
        match self {
            // The client went away: presence is what this socket measured.
            Gone::Closed | Gone::Silent | Gone::SendFailed | Gone::Error => true,
            // Already ended: nothing to end.
            Gone::SessionEnded => false,
            // The service's shutdown decides what becomes of its sessions, not the socket.
            Gone::ShuttingDown => false,
        }
    }
}

async fn serve(mut socket: WebSocket, state: Arc<AppState>, id: SessionId) {
    let config = state.config.clone();
    let mut ping = tokio::time::interval(config.ws_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut last_touch = Instant::now();
    let mut shutdown = state.shutdown.subscribe();
    let gone = loop {
        tokio::select! {
            _ = ping.tick() => {
                if last_heard.elapsed() > config.ws_pong_timeout {
                    break Gone::Silent;
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break Gone::SendFailed;
                }
                // A session ended by other means closes its sockets.
                if let Ok(r) = state.engine.get(None, id).await
                    && r.session.status() == Status::Ended
                {
                    let _ = socket.send(Message::Close(None)).await;
                    break Gone::SessionEnded;
                }
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Close(_))) | None => break Gone::Closed,
                Some(Err(_)) => break Gone::Error,
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    if last_touch.elapsed() >= config.ws_ping_interval {
                        last_touch = Instant::now();
                        let _ = state.engine.touch(None, id).await;
                    }
                }
            },
            _ = shutdown.changed() => {
                let _ = socket.send(Message::Close(None)).await;
                break Gone::ShuttingDown;
            }
        }
    };
    tracing::info!(session = %id, why = gone.as_str(), "websocket gone");
    if state.presence.leave(id) > 0 || !gone.ends_session() {
        return;
    }
    if !config.ws_grace.is_zero() {
        tokio::time::sleep(config.ws_grace).await;
        if state.presence.count(id) > 0 {
            return;
        }
    }
    if let Err(e) = state
        .engine
        .end(None, id, EndReason::WebsocketDisconnected)
        .await
    {
        tracing::warn!(session = %id, error = %e, "ending after the last websocket failed");
    }
}
