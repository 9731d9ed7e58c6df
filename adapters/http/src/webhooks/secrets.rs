//! The secrets that sign room webhooks, per tenant (from the tenants file) or for every
//! tenant (flags), and the webhook settings. A leaf: the tenants file and the verifiers
//! both use these types.

use std::time::Duration;

/// A LiveKit API key and its secret, for one tenant (or any, when `tenant` is `None`).
#[derive(Debug, Clone)]
pub struct LivekitKey {
    /// The tenant whose sessions its events concern.
    pub tenant: Option<String>,
    /// The API key (the JWT's `iss`).
    pub api_key: String,
    /// The API secret.
    pub api_secret: String,
}

/// A Daily webhook secret (base64, as Daily gives it), for one tenant or any.
#[derive(Debug, Clone)]
pub struct DailySecret {
    /// The tenant whose sessions its events concern.
    pub tenant: Option<String>,
    /// The secret.
    pub secret: String,
}

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// LiveKit keys.
    pub livekit: Vec<LivekitKey>,
    /// Daily secrets.
    pub daily: Vec<DailySecret>,
    /// The identity of the avatar's own participant, which does not count as presence.
    pub avatar_identity: Option<String>,
    /// How far a signature's time may be from ours.
    pub tolerance: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            livekit: Vec::new(),
            daily: Vec::new(),
            avatar_identity: Some("avatar".to_owned()),
            tolerance: Duration::from_secs(300),
        }
    }
}
