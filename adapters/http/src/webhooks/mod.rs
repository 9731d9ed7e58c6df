//! Video room webhooks, the pure part: LiveKit and Daily tell when participants join and
//! leave, and a session bound to a room ends with `room_empty` when its last participant
//! leaves (after someone had joined) or the room finishes. The HTTP receivers are in
//! `routes::webhooks`; nothing here knows HTTP.
//!
//! Every delivery is verified before its body is parsed ([`verify`]). LiveKit signs a JWT
//! (HS256 with the API secret) in `Authorization` whose `sha256` claim is the base64
//! SHA-256 of the raw body. Daily signs `"{X-Webhook-Timestamp}.{body}"` with HMAC-SHA256
//! under the base64-decoded webhook secret, base64 in `X-Webhook-Signature`; a timestamp
//! outside the tolerance window is refused (replays). With no secret configured for a
//! provider, every delivery is refused. Verified bodies are then parsed ([`parse`]).

pub mod parse;
pub mod secrets;
pub mod verify;

pub use parse::{ParseError, ParsedEvent, parse_daily, parse_livekit};
pub use secrets::{DailySecret, LivekitKey, WebhookConfig};
pub use verify::{VerifyError, verify_daily, verify_livekit};
