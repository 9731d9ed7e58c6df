//! The session WebSocket: client presence.
//!
//! The server pings every `ping_interval`; anything the client sends (pongs included)
//! counts as liveness. A socket that closes, errors, or sends nothing for `pong_timeout`
//! is gone; when a session's last socket is gone (and stays gone for the grace period,
//! none by default) the session ends with `websocket_disconnected`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use session_lifecycle::{EndReason, SessionId, Status};
use tokio::time::Instant;
use utoipa::IntoParams;

use crate::AppState;
use crate::api::{ApiError, session_id};

/// Open sockets per session.
#[derive(Default)]
pub struct Presence {
    open: Mutex<HashMap<SessionId, usize>>,
}

impl Presence {
    fn join(&self, id: SessionId) {
        *self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default() += 1;
    }

    /// Returns how many sockets the session still has.
    fn leave(&self, id: SessionId) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let left = open.get(&id).map_or(0, |n| n.saturating_sub(1));
        if left == 0 {
            open.remove(&id);
        } else {
            open.insert(id, left);
        }
        left
    }

    fn count(&self, id: SessionId) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
}

/// WebSocket query: the client token.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsParams {
    /// The `client_token` from the create answer (or send `x-api-key` instead).
    pub token: Option<String>,
}

/// Open the session's presence WebSocket.
#[utoipa::path(
    get, path = "/v1/sessions/{session_id}/ws", tag = "sessions",
    params(("session_id" = String, Path, description = "The session id"), WsParams),
    responses(
        (status = 101, description = "Switching protocols: the socket is open"),
        (status = 400, description = "Malformed session id", body = crate::api::ErrorBody),
        (status = 401, description = "No valid client token or API key", body = crate::api::ErrorBody),
        (status = 404, description = "Unknown session (or another tenant's)", body = crate::api::ErrorBody),
        (status = 409, description = "The session has ended", body = crate::api::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade request", body = crate::api::ErrorBody),
        (status = 503, description = "Storage unavailable or overloaded", body = crate::api::ErrorBody),
    )
)]
pub async fn session_ws(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
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
        None => Some(crate::api::tenant(&state, &headers)?.name.clone()),
    };
    let record = state.engine.get(tenant.as_deref(), id).await?;
    if record.session.status() == Status::Ended {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_ended",
            "the session has ended",
        ));
    }
    let upgrade = upgrade.map_err(|_| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
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

async fn serve(mut socket: WebSocket, state: Arc<AppState>, id: SessionId) {
    let config = state.config.clone();
    let mut ping = tokio::time::interval(config.ws_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut last_touch = Instant::now();
    let mut shutdown = state.shutdown.subscribe();
    let why = loop {
        tokio::select! {
            _ = ping.tick() => {
                if last_heard.elapsed() > config.ws_pong_timeout {
                    break "lost (no pong)";
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break "lost (send failed)";
                }
                // A session ended by other means closes its sockets.
                if let Ok(r) = state.engine.get(None, id).await
                    && r.session.status() == Status::Ended
                {
                    let _ = socket.send(Message::Close(None)).await;
                    break "session ended";
                }
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Close(_))) | None => break "closed",
                Some(Err(_)) => break "lost (error)",
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
                break "service shutting down";
            }
        }
    };
    tracing::info!(session = %id, why, "websocket gone");
    if state.presence.leave(id) > 0 || why == "service shutting down" || why == "session ended" {
        return;
    }
    if !config.ws_grace.is_zero() {
        tokio::time::sleep(config.ws_grace).await;
        if state.presence.count(id) > 0 {
            return;
        }
    }
    match state
        .engine
        .end(None, id, EndReason::WebsocketDisconnected)
        .await
    {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "ending after the last websocket failed")
        }
    }
}
