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
    /// The session event types it wants; `None`: all.
    pub events: Option<Vec<EventKind>>,
    /// Whether it receives `usage.recorded` events, and in which shape; `None`: it does
    /// not (usage goes only to endpoints that ask for it).
    pub usage: Option<UsageFormat>,
}

/// The shape of the `usage.recorded` events an endpoint receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    /// A Stripe meter event (`event_name`, `identifier`, `timestamp`, `payload`).
    Stripe,
    /// A CloudEvent in structured mode (`specversion` 1.0, `id`, `source`, `type`, ...).
    CloudEvents,
}

impl UsageFormat {
    /// The format named `name` in a tenants file (`stripe`, `cloudevents`).
    pub fn from_name(name: &str) -> Option<UsageFormat> {
        match name {
            "stripe" => Some(UsageFormat::Stripe),
            "cloudevents" => Some(UsageFormat::CloudEvents),
            _ => None,
        }
    }
}

impl WebhookEndpoint {
    /// Whether it wants events of `kind`.
    pub fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::UsageRecorded(_) => self.usage.is_some(),
            _ => self.events.as_ref().is_none_or(|e| e.contains(&kind)),
        }
    }
}

/// What a tenant's `usage.recorded` events name, from its `[tenants.billing]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageExport {
    /// Its customer at the billing system (`stripe_customer_id` of a Stripe meter event);
    /// the tenant's name by default.
    pub customer: String,
    /// The Stripe meter's event name (`session_milliseconds` by default).
    pub event_name: String,
}

/// How a tenant's sessions may name their own callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackSettings {
    /// Every secret signs each callback.
    pub secrets: Vec<SigningSecret>,
    /// The hosts callback URLs may name; `None`: any host the address policy allows.
    pub hosts: Option<Vec<String>>,
}
