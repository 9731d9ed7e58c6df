//! The session WebSocket: client presence.
//!
//! An open socket is liveness for as long as it stays open: it is recorded once in the
//! store when this instance first holds a socket of the session, never per ping (see
//! [`Engine::hold_socket`](session_lifecycle_runtime::Engine::hold_socket)). The server
//! pings every `ping_interval` to find lost connections: a socket that closes, errors, or
//! sends nothing for `pong_timeout` is gone. When no instance holds a socket of the session
//! any more, after the session's WebSocket grace (none by default), it ends with
//! `websocket_disconnected`. When the session ends, by any means on any instance, its
//! sockets are closed within about a second with code 1000 and the end reason.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use session_lifecycle::{EndReason, SessionId, Status};
use session_lifecycle_runtime::EngineError;
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
        None => Some(api_key_tenant(&state.tenants, &headers)?.name.clone()),
    };
    let record = state.engine.get(tenant.as_deref(), id).await?;
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
    // The socket is held only once it exists: a handshake that fails holds nothing.
    Ok(upgrade
        .on_upgrade(move |socket| serve(socket, state, tenant, id))
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
    /// The session ended (anywhere); the socket was closed.
    SessionEnded,
    /// The service is stopping; the socket was closed.
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
            Gone::ShuttingDown => "service stopping",
        }
    }
}

/// Close code for a session that ended: a normal closure (RFC 6455, 1000).
const CLOSE_NORMAL: u16 = 1000;
/// Close code for a service that is stopping (RFC 6455, 1001: going away).
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a socket that could not be held (RFC 6455, 1011: unexpected condition).
const CLOSE_ERROR: u16 = 1011;

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// What a socket of an ended session is told: `session ended: <end reason>`.
fn ended_reason(reason: Option<EndReason>) -> &'static str {
    match reason {
        Some(EndReason::Requested) => "session ended: requested",
        Some(EndReason::WebsocketDisconnected) => "session ended: websocket_disconnected",
        Some(EndReason::RoomEmpty) => "session ended: room_empty",
        Some(EndReason::NobodyJoined) => "session ended: nobody_joined",
        Some(EndReason::Expired) => "session ended: expired",
        Some(EndReason::Orphaned) => "session ended: orphaned",
        Some(EndReason::NodeLost) => "session ended: node_lost",
        Some(EndReason::AvatarExited) => "session ended: avatar_exited",
        Some(EndReason::StartFailed) => "session ended: start_failed",
        Some(EndReason::Shutdown) => "session ended: shutdown",
        None => "session ended",
    }
}

async fn serve(mut socket: WebSocket, state: Arc<AppState>, tenant: Option<String>, id: SessionId) {
    let mut hold = match state.engine.hold_socket(tenant.as_deref(), id).await {
        Ok((hold, _)) => hold,
        Err(EngineError::SessionEnded) => {
            let _ = socket.send(close(CLOSE_NORMAL, "session ended")).await;
            return;
        }
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "holding a websocket failed");
            let _ = socket
                .send(close(CLOSE_ERROR, "cannot hold the session"))
                .await;
            return;
        }
    };
    let config = state.config.clone();
    let mut ping = tokio::time::interval(config.ws_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
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
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Close(_))) | None => break Gone::Closed,
                Some(Err(_)) => break Gone::Error,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            () = hold.ended() => {
                let reason = state
                    .engine
                    .get(None, id)
                    .await
                    .ok()
                    .and_then(|r| r.session.end_reason());
                let _ = socket.send(close(CLOSE_NORMAL, ended_reason(reason))).await;
                break Gone::SessionEnded;
            }
            _ = shutdown.changed() => {
                let _ = socket.send(close(CLOSE_GOING_AWAY, "service stopping")).await;
                break Gone::ShuttingDown;
            }
        }
    };
    tracing::info!(session = %id, why = gone.as_str(), "websocket gone");
    if gone == Gone::ShuttingDown {
        // What becomes of the session is the stop's business, not this socket's.
        hold.abandon();
    }
    // Otherwise dropping the hold closes it: the last one here starts the grace.
}
