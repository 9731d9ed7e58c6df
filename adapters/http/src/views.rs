//! The JSON bodies of the API (the types are [`session_lifecycle_api::views`], shared with
//! the client), and how the engine's records become them.

use session_lifecycle::ReleaseState;
use session_lifecycle_runtime::{RoomProvider, SessionRecord, SessionTimeouts};

pub use session_lifecycle_api::views::*;

/// The view of `record` in full, resource kinds named by `kind_name`, with its `timeouts`
/// (the service's defaults filled in).
pub fn session_view(
    r: &SessionRecord,
    kind_name: KindNames<'_>,
    timeouts: &SessionTimeouts,
) -> SessionView {
    let s = &r.session;
    let find = |list: &[(session_lifecycle::Resource, String)], res| {
        list.iter()
            .find(|(held, _)| *held == res)
            .map(|(_, text)| text.clone())
    };
    let resources = s
        .resources()
        .iter()
        .map(|held| {
            let (release, release_attempts, retry_at, released_at) = match held.release {
                ReleaseState::Held => (ReleaseView::Held, 0, None, None),
                ReleaseState::Pending { attempts, retry_at } => (
                    ReleaseView::Pending,
                    attempts,
                    Some(retry_at.to_string()),
                    None,
                ),
                ReleaseState::Released { at } => {
                    (ReleaseView::Released, 0, None, Some(at.to_string()))
                }
            };
            let kind = held.resource.kind;
            ResourceView {
                kind: kind_name(kind).map_or_else(|| format!("kind_{}", kind.0), str::to_owned),
                handle: held.resource.handle,
                release,
                release_attempts,
                retry_at,
                release_error: find(&r.release_errors, held.resource),
                released_at,
                note: find(&r.release_notes, held.resource),
            }
        })
        .collect();
    SessionView {
        session_id: s.id().to_string(),
        status: s.status().into(),
        started_at: s.started_at().to_string(),
        ended_at: s.ended_at().map(|t| t.to_string()),
        end_reason: s.end_reason().map(Into::into),
        ready_at: r.ready_at.map(|t| t.to_string()),
        expires_at: s.expires_at().to_string(),
        last_seen_at: s.last_seen_at().to_string(),
        room: r.room.as_ref().map(|room| RoomView {
            provider: provider_view(room.provider),
            name: room.name.clone(),
        }),
        metadata: r
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
        timeouts: timeouts_view(timeouts),
        resources: Some(resources),
    }
}

/// The view of `timeouts` (absent values show as 0).
pub fn timeouts_view(timeouts: &SessionTimeouts) -> TimeoutsView {
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    TimeoutsView {
        participant_left_timeout_ms: timeouts.participant_left.map_or(0, ms),
        participant_absent_timeout_ms: timeouts.participant_absent.map(ms),
        websocket_grace_ms: timeouts.websocket_grace.map_or(0, ms),
    }
}

/// The timeouts a create asks for.
pub fn requested_timeouts(request: &TimeoutsRequest) -> SessionTimeouts {
    let ms = |v: Option<u64>| v.map(std::time::Duration::from_millis);
    SessionTimeouts {
        participant_left: ms(request.participant_left_timeout_ms),
        participant_absent: ms(request.participant_absent_timeout_ms),
        websocket_grace: ms(request.websocket_grace_ms),
    }
}

/// The engine's name of a provider.
pub fn room_provider(p: ProviderView) -> RoomProvider {
    match p {
        ProviderView::Livekit => RoomProvider::Livekit,
        ProviderView::Daily => RoomProvider::Daily,
    }
}

/// The API's name of a provider.
pub fn provider_view(p: RoomProvider) -> ProviderView {
    match p {
        RoomProvider::Livekit => ProviderView::Livekit,
        RoomProvider::Daily => ProviderView::Daily,
    }
}
