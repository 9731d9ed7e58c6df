//! The JSON bodies of the API, requests and answers, and how a session record becomes
//! the view an answer shows.
//!
//! Nothing here checks a request (the service does that) or reaches the engine: what a
//! view needs from it (what resources of a kind are called, a session's timeouts with the
//! service's defaults filled in) comes in as arguments.

use serde::{Deserialize, Serialize};
use session_lifecycle::{EndReason, ResourceKind, Status};
use utoipa::ToSchema;

/// What a session id matches: `sess_` + 1 to 64 Crockford base32 characters.
pub const SESSION_ID_PATTERN: &str = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$";
/// What every timestamp of an answer matches: RFC 3339 UTC, second precision.
pub const TIMESTAMP_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$";

/// A session, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// `sess_` + a 26-character ULID.
    #[schema(
        example = "sess_01HM6AQH20ZZHCK79E5QFWVW30",
        pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$"
    )]
    pub session_id: String,
    /// `started` until the session ends, then `ended` for good.
    pub status: StatusView,
    /// RFC 3339 UTC, second precision.
    #[schema(
        example = "2024-01-15T10:30:00Z",
        pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
    )]
    pub started_at: String,
    /// When it ended; `null` while started.
    #[schema(
        example = "2024-01-15T10:35:00Z",
        pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
    )]
    pub ended_at: Option<String>,
    /// Why it ended; `null` while started.
    pub end_reason: Option<EndReasonView>,
    /// When its avatar server reported it is ready to serve (`READY=1`); `null` until
    /// then (and for good if it never did). Billing can start here.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub ready_at: Option<String>,
    /// When it ends by itself: `started_at + min(requested duration, plan limit)`.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub expires_at: String,
    /// The latest liveness signal (WebSocket message, heartbeat).
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub last_seen_at: String,
    /// The video room it is bound to.
    pub room: Option<RoomView>,
    /// The client's metadata, as given.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Its own timeouts (as asked at its creation, or the service's defaults).
    pub timeouts: TimeoutsView,
    /// What it holds, and where each release stands. Present on create, get, list and
    /// heartbeat answers; left out of end answers, which are identical on every repeat
    /// while releases progress in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<ResourceView>>,
}

/// A session's own timeouts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimeoutsView {
    /// Wait after the last participant leaves its room before it ends `room_empty`;
    /// someone joining meanwhile keeps it.
    pub participant_left_timeout_ms: u64,
    /// Allowed after its creation for a first participant to join its room, after which it
    /// ends `nobody_joined`; `null`: no limit (the orphan timeout still applies).
    pub participant_absent_timeout_ms: Option<u64>,
    /// Wait after its last client WebSocket (on any instance) closes before it ends
    /// `websocket_disconnected`; a reconnect meanwhile, to any instance, keeps it.
    pub websocket_grace_ms: u64,
}

/// Session status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusView {
    /// Running.
    Started,
    /// Terminated.
    Ended,
}

impl From<Status> for StatusView {
    fn from(s: Status) -> Self {
        match s {
            Status::Started => StatusView::Started,
            Status::Ended => StatusView::Ended,
        }
    }
}

impl From<StatusView> for Status {
    fn from(s: StatusView) -> Self {
        match s {
            StatusView::Started => Status::Started,
            StatusView::Ended => Status::Ended,
        }
    }
}

/// Why a session ended. A client reads a reason this version does not know (one a newer
/// server added) as [`EndReasonView::Other`], with its wire name, instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReasonView {
    /// An explicit end call.
    Requested,
    /// The last client WebSocket closed or stopped answering pings.
    WebsocketDisconnected,
    /// The last participant left the video room.
    RoomEmpty,
    /// No participant joined its room in time.
    NobodyJoined,
    /// It reached `expires_at`.
    Expired,
    /// The safety sweeper found no liveness for the orphan timeout.
    Orphaned,
    /// The node running it died; another node ended it.
    NodeLost,
    /// The avatar server exited on its own.
    AvatarExited,
    /// Its resources could not be acquired.
    StartFailed,
    /// The service was stopped on purpose.
    Shutdown,
    /// A reason this version does not know, by its wire name. Never sent by this version.
    #[serde(untagged)]
    Other(String),
}

crate::wire::known_names_schema!(
    EndReasonView,
    "Why a session ended.",
    [
        Requested,
        WebsocketDisconnected,
        RoomEmpty,
        NobodyJoined,
        Expired,
        Orphaned,
        NodeLost,
        AvatarExited,
        StartFailed,
        Shutdown
    ]
);

impl From<EndReason> for EndReasonView {
    fn from(r: EndReason) -> Self {
        match r {
            EndReason::Requested => EndReasonView::Requested,
            EndReason::WebsocketDisconnected => EndReasonView::WebsocketDisconnected,
            EndReason::RoomEmpty => EndReasonView::RoomEmpty,
            EndReason::NobodyJoined => EndReasonView::NobodyJoined,
            EndReason::Expired => EndReasonView::Expired,
            EndReason::Orphaned => EndReasonView::Orphaned,
            EndReason::NodeLost => EndReasonView::NodeLost,
            EndReason::AvatarExited => EndReasonView::AvatarExited,
            EndReason::StartFailed => EndReasonView::StartFailed,
            EndReason::Shutdown => EndReasonView::Shutdown,
        }
    }
}

/// A room binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomView {
    /// The provider.
    pub provider: ProviderView,
    /// The room's name at the provider: 1 to 128 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F]*$"
    )]
    pub name: String,
}

/// A video room provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderView {
    /// LiveKit.
    Livekit,
    /// Daily.
    Daily,
}

/// A resource a session holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceView {
    /// What the backend that handed it out calls it (`avatar_process`, `gpu_assignment`,
    /// `gpu_reservation`), or `kind_<n>` for a kind no backend of this instance hands out.
    #[schema(example = "avatar_process")]
    pub kind: String,
    /// The adapter's handle (a process id, ...).
    pub handle: u64,
    /// `held`, `pending` or `released`.
    pub release: ReleaseView,
    /// Failed release attempts so far.
    pub release_attempts: u32,
    /// When a pending release is tried next (releases go one at a time, the last acquired
    /// first: a resource also waits for those acquired after it).
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub retry_at: Option<String>,
    /// Why the last attempt failed, while the resource is still held.
    pub release_error: Option<String>,
    /// When it was released.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
    pub released_at: Option<String>,
    /// How the release went (`sigterm`, `sigkill: cgroup.kill ...`, `freed`,
    /// `escalated: killed pids [...]`, `exited`, ...).
    pub note: Option<String>,
}

/// Where a resource's release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseView {
    /// Held by a started session.
    Held,
    /// Being released (retried until it succeeds).
    Pending,
    /// Given back.
    Released,
}

/// What resources of a kind are called (the engine knows, from its backends); `None` for
/// a kind no backend hands out.
pub type KindNames<'a> = &'a dyn Fn(ResourceKind) -> Option<&'static str>;

impl SessionView {
    /// The view of an ended session as every end answer shows it: only what never changes
    /// after the end.
    pub fn as_ended(mut self) -> SessionView {
        self.resources = None;
        self
    }
}

/// `{"success": true, "session": {...}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionResponse {
    /// Always `true`.
    pub success: bool,
    /// The session.
    pub session: SessionView,
}

/// The answer to a create: the session and its client token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedResponse {
    /// Always `true`.
    pub success: bool,
    /// The new session, `started`.
    pub session: SessionView,
    /// A signed, session-scoped token for the browser: open the session's WebSocket with
    /// `?token=<client_token>`. Valid until the session expires.
    pub client_token: String,
}

/// A page of sessions, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ListResponse {
    /// Always `true`.
    pub success: bool,
    /// The sessions of this page.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub next_cursor: Option<String>,
}

/// What a new session asks for. Every field is optional, and so is the body (absent,
/// empty or `null`: every default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// How long the session may run, in seconds (the plan's limit caps it).
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub duration_secs: Option<u64>,
    /// Bind the session to a video room: it ends when the last participant leaves.
    #[serde(
        default,
        deserialize_with = "json_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub room: Option<RoomView>,
    /// A small JSON object returned with the session: at most 4096 bytes once serialized
    /// (compact JSON, as the session shows it).
    #[schema(value_type = Option<Object>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// GPU memory for the session's avatar server, in MiB (the service's default when
    /// absent). A start fails with 503 `capacity_exhausted` when no GPU has room.
    #[schema(minimum = 1, maximum = 1048576)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu_memory_mib: Option<u64>,
    /// The GPU (its index) to run on; placement chooses when absent.
    #[schema(minimum = 0, maximum = 1023)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu_device: Option<u32>,
    /// The session's own timeouts, each within the tenant's plan (400 beyond); absent
    /// ones take the service's defaults.
    #[serde(
        default,
        deserialize_with = "json_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeouts: Option<TimeoutsRequest>,
    /// Where this session's events are also posted (signed with the tenant's callback
    /// secrets, Standard Webhooks). HTTPS to a public address; refused (400) when the
    /// tenant has no callback secrets, the host is not among its callback hosts, or the
    /// address is loopback, private, link-local or a metadata service.
    #[schema(max_length = 2048, example = "https://hooks.example.com/sessions")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// Timeouts a new session sets for itself, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsRequest {
    /// Wait after the last participant leaves its room before it ends `room_empty`.
    #[schema(minimum = 0, maximum = 604800000)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub participant_left_timeout_ms: Option<u64>,
    /// Allowed after its creation for a first participant to join its room, after which
    /// it ends `nobody_joined` (only for a session bound to a room).
    #[schema(minimum = 0, maximum = 604800000)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub participant_absent_timeout_ms: Option<u64>,
    /// Wait after its last client WebSocket closes before it ends
    /// `websocket_disconnected`.
    #[schema(minimum = 0, maximum = 604800000)]
    #[serde(
        default,
        deserialize_with = "json_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub websocket_grace_ms: Option<u64>,
}

/// An optional JSON object, and only an object: serde fills a struct from an array of its
/// fields in order too (`[60, null]`), which the schema does not allow. The struct still
/// reads the object itself, so its checks (unknown and duplicate fields) and the error's
/// position stand.
pub fn json_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectOrNull<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOrNull<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(
            self,
            deserializer: D2,
        ) -> Result<Option<T>, D2::Error> {
            deserializer.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Option<T>, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_option(ObjectOrNull(std::marker::PhantomData))
}

/// An optional JSON integer as JSON Schema counts them: `1041.0` and `1e3` are integers
/// too (a number with no fractional part), not only `1041`.
fn json_integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let value = match (number.as_u64(), number.as_f64()) {
        (Some(n), _) => n,
        // Below 2^64 and integral: exact in a u64.
        (None, Some(f)) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
            f as u64
        }
        _ => {
            return Err(D::Error::custom(format_args!(
                "invalid value: {number}, expected a non-negative integer"
            )));
        }
    };
    T::try_from(value)
        .map(Some)
        .map_err(|_| D::Error::custom(format_args!("invalid value: {number}, out of range")))
}

/// Whether the process is up, or can take sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or what is wrong.
    pub status: HealthStatus,
    /// Why, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a health or readiness answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Up (`/healthz`), or ready for sessions (`/readyz`).
    Ok,
    /// Draining or handing over: running sessions continue, new ones go elsewhere.
    Draining,
    /// No GPU has room for a session of the default size.
    NoCapacity,
    /// The session store is unreachable.
    StorageUnavailable,
}

/// The answer to an accepted webhook delivery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookResponse {
    /// Always `true`.
    pub success: bool,
    /// What became of it.
    pub outcome: WebhookOutcome,
}

/// What became of an accepted webhook delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookOutcome {
    /// Presence was updated (and the session may have ended).
    Applied,
    /// The provider's event id was seen before: applied once already.
    Duplicate,
    /// Not about presence, about the avatar itself, or no started session is bound to
    /// the room.
    Ignored,
    /// Daily's check of the endpoint (body `{"test":"test"}`, sent before it creates or
    /// re-activates a webhook): answered 200, nothing applied.
    Verification,
}
