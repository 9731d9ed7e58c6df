//! Outbound webhooks: session events fanned out to the endpoints that want them, and
//! delivered, signed per Standard Webhooks, at least once.
//!
//! The store's outbox holds every event from the moment its cause committed (see
//! `session_lifecycle_runtime::EventOutbox`). The [`Outbound`] worker of each instance
//! fans new events out (one delivery per endpoint: the tenant's endpoints that want the
//! event's type, and the session's own callback URL) and delivers what is due, each
//! attempt claimed in the store so that it happens once across the cluster. A failed
//! attempt is retried when the core's
//! [`DeliveryPolicy`](session_lifecycle::DeliveryPolicy) says, until the retry period
//! ends; a session's deliveries to an endpoint go in the session's order, and nothing else
//! waits for a failing one. Deliveries are bounded per endpoint, so one slow receiver
//! cannot hold back another tenant's.

//!
//! Delivery (the HTTP client, reqwest with rustls) is behind the feature
//! `outbound-webhooks` (default). Without it the [`Outbound`] worker still fans events out
//! (the event stream serves them) and prunes; it refuses tenants that have webhook
//! endpoints or callback secrets, since nothing would send to them.

pub mod address;
pub mod endpoints;
pub mod payload;
pub mod sign;
mod worker;

use std::time::Duration;

use tokio::sync::Semaphore;

use crate::tenants::Tenant;
use address::AddressPolicy;
pub use endpoints::{CALLBACK_ENDPOINT, CallbackSettings, WebhookEndpoint};
pub use worker::{Outbound, OutboundConfig, OutboundError, OutboundStats};

/// The longest callback URL accepted.
pub const MAX_CALLBACK_URL: usize = 2048;

/// Checks a create's `callback_url` for `tenant`: allowed at all, a listed host, and an
/// allowed address (a literal one, or every address its name resolves to now; a name that
/// does not resolve yet is accepted, and checked again at each delivery).
pub async fn check_callback(
    addresses: &AddressPolicy,
    tenant: &Tenant,
    url: &str,
) -> Result<String, String> {
    let callback = tenant
        .callback
        .as_ref()
        .ok_or("callback_url is not enabled for this tenant (no callback secrets configured)")?;
    if url.len() > MAX_CALLBACK_URL {
        return Err(format!(
            "callback_url is longer than {MAX_CALLBACK_URL} bytes"
        ));
    }
    let parsed = addresses
        .check_url(url)
        .map_err(|e| format!("callback_url refused: {e}"))?;
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    if let Some(hosts) = &callback.hosts
        && !hosts.contains(&host)
    {
        return Err(format!(
            "callback_url refused: {}",
            address::UrlRefused::HostNotListed(host)
        ));
    }
    // Resolved here only while few lookups are under way: a lookup that times out keeps
    // its thread, and a tenant's slow name server must not take them all. Each delivery
    // checks every address again anyway.
    static LOOKUPS: Semaphore = Semaphore::const_new(16);
    if let (Some(url::Host::Domain(name)), Ok(_lookup)) = (parsed.host(), LOOKUPS.try_acquire()) {
        let port = parsed.port_or_known_default().unwrap_or(443);
        let lookup = tokio::net::lookup_host((name, port));
        if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(2), lookup).await {
            let found: Vec<_> = found.collect();
            if let Some(refused) = found.iter().find_map(|a| addresses.check_ip(a.ip()).err())
                && found.iter().all(|a| addresses.check_ip(a.ip()).is_err())
            {
                return Err(format!(
                    "callback_url refused: {name} resolves to {refused}"
                ));
            }
        }
    }
    Ok(parsed.to_string())
}
