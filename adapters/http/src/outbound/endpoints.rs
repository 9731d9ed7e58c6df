//! Where a tenant's events go, as the tenants file configures it.

use session_lifecycle::EventKind;

use crate::outbound::sign::SigningSecret;

/// The endpoint name of a session's own callback URL (no configured endpoint may take it).
pub const CALLBACK_ENDPOINT: &str = "callback";

/// One of a tenant's webhook endpoints, from the tenants file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// Its name, unique within the tenant (deliveries name it).
    pub name: String,
    /// Where events are posted.
    pub url: String,
    /// Every secret signs each message (more than one during a rotation).
    pub secrets: Vec<SigningSecret>,
    /// The event types it wants; `None`: all.
    pub events: Option<Vec<EventKind>>,
}

impl WebhookEndpoint {
    /// Whether it wants events of `kind`.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.as_ref().is_none_or(|e| e.contains(&kind))
    }
}

/// How a tenant's sessions may name their own callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackSettings {
    /// Every secret signs each callback.
    pub secrets: Vec<SigningSecret>,
    /// The hosts callback URLs may name; `None`: any host the address policy allows.
    pub hosts: Option<Vec<String>>,
}
