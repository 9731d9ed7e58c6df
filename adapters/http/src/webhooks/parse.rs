//! Parsing a verified delivery into a presence event, in the provider's terms. Pure.

use session_lifecycle::Timestamp;
use session_lifecycle_runtime::RoomEventKind;

/// Why a verified delivery is not a webhook body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON.
    #[error("invalid webhook body: {0}")]
    NotJson(String),
    /// A field every event of its kind has is missing (or empty).
    #[error("webhook has no {0}")]
    Missing(&'static str),
}

/// A room event in the provider's terms, before it is bound to a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// The room.
    pub room: String,
    /// The provider's event id.
    pub event_id: String,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: RoomEventKind,
    /// Every identity the participant goes by (matched against the avatar's).
    pub aliases: Vec<String>,
}

fn number_or_string(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn seconds(v: Option<&serde_json::Value>) -> Timestamp {
    let secs = v.and_then(number_or_string).unwrap_or(0.0).max(0.0);
    Timestamp::from_millis((secs * 1000.0) as u64)
}

fn text(v: &serde_json::Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Parses a verified LiveKit body: `None` for events that do not concern presence.
pub fn parse_livekit(body: &[u8]) -> Result<Option<ParsedEvent>, ParseError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let event = text(&v, "event").ok_or(ParseError::Missing("event"))?;
    let room = v.get("room").and_then(|r| text(r, "name"));
    let identity = v.get("participant").and_then(|p| text(p, "identity"));
    let kind = match (event.as_str(), &identity) {
        ("participant_joined", Some(p)) => RoomEventKind::Joined {
            participant: p.clone(),
        },
        ("participant_left", Some(p)) => RoomEventKind::Left {
            participant: p.clone(),
        },
        ("room_finished", _) => RoomEventKind::Finished,
        _ => return Ok(None),
    };
    let room = room.ok_or(ParseError::Missing("room name"))?;
    let event_id = text(&v, "id").ok_or(ParseError::Missing("id"))?;
    Ok(Some(ParsedEvent {
        room,
        event_id,
        at: seconds(v.get("createdAt")),
        kind,
        aliases: identity.into_iter().collect(),
    }))
}

/// Whether `body` is Daily's check of a webhook endpoint: exactly `{"test":"test"}` (any
/// JSON spacing). Daily sends it, signed or not, before it creates a webhook or re-activates
/// a failed one, and creates the webhook only if the answer is 200.
pub fn is_daily_verification(body: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(fields)) => {
            fields.len() == 1 && fields.get("test").and_then(|v| v.as_str()) == Some("test")
        }
        _ => false,
    }
}

/// Parses a verified Daily body: `None` for events that do not concern presence.
pub fn parse_daily(body: &[u8]) -> Result<Option<ParsedEvent>, ParseError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let kind_name = text(&v, "type").ok_or(ParseError::Missing("type"))?;
    let payload = v.get("payload").cloned().unwrap_or_default();
    // A participant is its session in the meeting; user id and name are aliases.
    let participant = text(&payload, "session_id").or_else(|| text(&payload, "user_id"));
    let aliases: Vec<String> = ["session_id", "user_id", "user_name"]
        .iter()
        .filter_map(|k| text(&payload, k))
        .collect();
    let kind = match (kind_name.as_str(), participant) {
        ("participant.joined", Some(p)) => RoomEventKind::Joined { participant: p },
        ("participant.left", Some(p)) => RoomEventKind::Left { participant: p },
        ("meeting.ended", _) => RoomEventKind::Finished,
        _ => return Ok(None),
    };
    let room = text(&payload, "room").ok_or(ParseError::Missing("room"))?;
    let event_id = text(&v, "id").ok_or(ParseError::Missing("id"))?;
    Ok(Some(ParsedEvent {
        room,
        event_id,
        at: seconds(v.get("event_ts")),
        kind,
        aliases,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_that_are_not_events_say_why() {
        assert!(matches!(
            parse_livekit(b"nope"),
            Err(ParseError::NotJson(_))
        ));
        assert_eq!(parse_livekit(b"{}"), Err(ParseError::Missing("event")));
        assert_eq!(parse_daily(b"{}"), Err(ParseError::Missing("type")));
        assert_eq!(
            parse_livekit(br#"{"event": "participant_joined", "participant": {"identity": "a"}}"#),
            Err(ParseError::Missing("room name"))
        );
        assert_eq!(parse_livekit(br#"{"event": "track_published"}"#), Ok(None));
        let joined = parse_daily(
            br#"{"type": "participant.joined", "id": "e1", "event_ts": 1708972302.5,
                 "payload": {"room": "standup", "session_id": "s1", "user_name": "ada"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(joined.room, "standup");
        assert_eq!(joined.at, Timestamp::from_millis(1_708_972_302_500));
        assert_eq!(joined.aliases, ["s1", "ada"]);
    }
}
