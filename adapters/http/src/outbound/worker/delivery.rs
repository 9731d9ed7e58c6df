//! Delivery: due deliveries claimed in the store, each sent once per claim, signed per
//! Standard Webhooks, to an address the policy allows (checked again at connection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use session_lifecycle::{DeliveryStep, EventKind, Timestamp};
use session_lifecycle_runtime::{
    Delivery, DeliveryAttempt, DeliveryNext, SessionEvent, StoreError,
};
use tokio::sync::Semaphore;

use super::{Outbound, OutboundConfig, origin};
use crate::outbound::CALLBACK_ENDPOINT;
use crate::outbound::address::AddressPolicy;
use crate::outbound::payload::{self, message_id};
use crate::outbound::sign::signature_header;

/// The most bytes of a receiver's answer read (the rest is dropped unread).
pub const MAX_ANSWER_BYTES: usize = 4096;

/// The HTTP client and the slots of attempts in flight.
pub(super) struct Delivering {
    client: reqwest::Client,
    all: Arc<Semaphore>,
    per_endpoint: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Delivering {
    pub(super) fn new(config: &OutboundConfig) -> Result<Delivering, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .dns_resolver(CheckedResolver::new(config.addresses))
            .user_agent(concat!("session-lifecycle/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Delivering {
            client,
            all: Arc::new(Semaphore::new(config.concurrency.max(1))),
            per_endpoint: std::sync::Mutex::new(HashMap::new()),
        })
    }
}

/// The attempts under way, and those finished but not recorded yet: recorded together at
/// the next step, so the worker's own writes stay few whatever the rate of deliveries (its
/// claim outlives the wait).
pub(super) struct InFlight {
    attempts: tokio::task::JoinSet<()>,
    done: tokio::sync::mpsc::UnboundedSender<DeliveryAttempt>,
    finished: tokio::sync::mpsc::UnboundedReceiver<DeliveryAttempt>,
}

impl InFlight {
    pub(super) fn new() -> InFlight {
        let (done, finished) = tokio::sync::mpsc::unbounded_channel();
        InFlight {
            attempts: tokio::task::JoinSet::new(),
            done,
            finished,
        }
    }
}

impl Outbound {
    /// One step: records what finished, claims what is due and starts its attempts.
    pub(super) async fn deliver_due(self: &Arc<Self>, in_flight: &mut InFlight) {
        // Together: on SQLite they commit as one (group commit). A next event of a
        // session just recorded is claimed at the next step.
        let (_, claimed) = tokio::join!(self.record(&mut in_flight.finished), self.claim());
        match claimed {
            Ok(claimed) => {
                for (delivery, permits) in claimed {
                    let this = Arc::clone(self);
                    let done = in_flight.done.clone();
                    in_flight.attempts.spawn(async move {
                        let _ = done.send(this.attempt(&delivery).await);
                        drop(permits);
                        // Its slot is free: look for the next soon.
                        this.wake.notify_one();
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming webhook deliveries failed; retrying")
            }
        }
        while in_flight.attempts.try_join_next().is_some() {}
    }

    /// Waits for the attempts under way, and records them.
    pub(super) async fn finish(&self, mut in_flight: InFlight) {
        while in_flight.attempts.join_next().await.is_some() {}
        self.record(&mut in_flight.finished).await;
    }

    /// Records the attempts finished so far, in one write. One that is not recorded (the
    /// store failed) is made again once its claim runs out: at least once, never lost.
    async fn record(&self, finished: &mut tokio::sync::mpsc::UnboundedReceiver<DeliveryAttempt>) {
        let mut attempts = Vec::new();
        while let Ok(attempt) = finished.try_recv() {
            attempts.push(attempt);
        }
        if attempts.is_empty() {
            return;
        }
        if let Err(e) = self
            .engine
            .store()
            .record_deliveries(&self.config.node, attempts)
            .await
        {
            tracing::warn!(error = %e, "recording webhook attempts failed");
        }
    }

    /// Claims as many due deliveries as there are free slots, none to an origin with no
    /// free slot; each with its slots.
    async fn claim(&self) -> Result<Vec<(Delivery, Slots)>, StoreError> {
        let free = self.delivering.all.available_permits();
        if free == 0 {
            return Ok(Vec::new());
        }
        let busy: Vec<String> = {
            let mut slots = session_lifecycle_runtime::lock(&self.delivering.per_endpoint);
            // Origins with nothing in flight are forgotten (tenants name many hosts).
            if slots.len() > 1024 {
                let idle = self.config.per_endpoint.max(1);
                slots.retain(|_, s| s.available_permits() < idle);
            }
            slots
                .iter()
                .filter(|(_, s)| s.available_permits() == 0)
                .map(|(origin, _)| origin.clone())
                .collect()
        };
        let store = self.engine.store();
        let lease = self.config.timeout + self.config.connect_timeout + Duration::from_secs(30);
        let claimed = store
            .claim_deliveries(
                &self.config.node,
                self.engine.now(),
                lease,
                free as u32,
                self.config.per_endpoint as u32,
                busy,
            )
            .await?;
        let mut ready = Vec::new();
        for delivery in claimed {
            let slot = Arc::clone(&self.delivering.all).try_acquire_owned();
            let endpoint_slot = self.endpoint_slots(&delivery.url).try_acquire_owned();
            match (slot, endpoint_slot) {
                (Ok(a), Ok(b)) => ready.push((delivery, (a, b))),
                // Its origin filled up meanwhile: let another look, later.
                _ => {
                    store
                        .unclaim_delivery(&self.config.node, delivery.id)
                        .await?
                }
            }
        }
        Ok(ready)
    }

    fn endpoint_slots(&self, url: &str) -> Arc<Semaphore> {
        let mut slots = session_lifecycle_runtime::lock(&self.delivering.per_endpoint);
        Arc::clone(
            slots
                .entry(origin(url))
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.per_endpoint.max(1)))),
        )
    }

    /// One attempt of a claimed delivery: what it came to, and what comes next.
    async fn attempt(&self, delivery: &Delivery) -> DeliveryAttempt {
        let (status_code, error) = match self.send(delivery).await {
            Ok(code) if (200..300).contains(&code) => (Some(code), None),
            Ok(code) => (Some(code), Some(format!("answered {code}"))),
            Err(e) => (None, Some(e)),
        };
        let now = self.engine.now();
        let next = match &error {
            None => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                DeliveryNext::Delivered
            }
            Some(why) => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                let attempts = delivery.attempts.saturating_add(1);
                match self
                    .config
                    .policy
                    .after_failure(attempts, delivery.created_at, now, jitter())
                {
                    DeliveryStep::RetryAt(at) => DeliveryNext::RetryAt(at),
                    DeliveryStep::GiveUp => {
                        self.stats.given_up.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(delivery = delivery.id, session = %delivery.session,
                            endpoint = %delivery.endpoint, error = %why, "webhook delivery failed for good");
                        DeliveryNext::Failed
                    }
                }
            }
        };
        DeliveryAttempt {
            id: delivery.id,
            at: now,
            status_code,
            error,
            next,
        }
    }

    /// Sends `delivery` once: the answer's status, or why there was none.
    async fn send(&self, delivery: &Delivery) -> Result<u16, String> {
        let tenant = self
            .tenants
            .by_name(&delivery.tenant)
            .ok_or("the tenant is no longer configured")?;
        let (url, secrets, usage) = if delivery.endpoint == CALLBACK_ENDPOINT {
            let callback = tenant
                .callback
                .as_ref()
                .ok_or("the tenant no longer signs callbacks")?;
            (delivery.url.as_str(), &callback.secrets, None)
        } else {
            let endpoint = tenant
                .webhooks
                .iter()
                .find(|e| e.name == delivery.endpoint)
                .ok_or("the endpoint is no longer configured")?;
            (endpoint.url.as_str(), &endpoint.secrets, endpoint.usage)
        };
        let url = self
            .config
            .addresses
            .check_url(url)
            .map_err(|e| e.to_string())?;
        let store = self.engine.store();
        let (content_type, body) = if let EventKind::UsageRecorded(seq) = delivery.kind {
            let format = usage.ok_or("the endpoint no longer exports usage")?;
            let record = store
                .usage_record(delivery.session, seq)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the usage record is gone")?;
            payload::usage_body(&record, format, &tenant.name, &tenant.usage_export)
        } else {
            let record = store
                .get(delivery.session)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the session is gone")?;
            let event = SessionEvent {
                position: None,
                session: delivery.session,
                tenant: delivery.tenant.clone(),
                kind: delivery.kind,
                at: delivery.event_at,
                callback_url: None,
            };
            let kind_name = |k| self.engine.kind_name(k);
            let body = payload::envelope(&event, &record, &kind_name).to_bytes();
            ("application/json", body)
        };
        let id = message_id(&delivery.session, delivery.kind);
        let timestamp = unix_secs(self.engine.now());
        let response = self
            .delivering
            .client
            .post(url)
            .header("content-type", content_type)
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature_header(secrets, &id, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status().as_u16();
        // Read a little of the answer, so the connection can be reused, and no more.
        let mut response = response;
        let mut read = 0;
        while read < MAX_ANSWER_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        Ok(status)
    }
}

/// A delivery's two slots: one of all in flight, one of its origin's.
type Slots = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

fn unix_secs(t: Timestamp) -> u64 {
    t.as_secs()
}

/// A random jitter for the retry policy.
fn jitter() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_or(u32::MAX / 2, |()| u32::from_le_bytes(b))
}

/// A client error with its causes (reqwest's own message names only the outermost).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Resolves names for the webhook client, keeping only addresses the policy allows: the
/// connection goes to one of those, never to an address that was not checked.
pub struct CheckedResolver {
    policy: AddressPolicy,
}

impl CheckedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: AddressPolicy) -> Arc<CheckedResolver> {
        Arc::new(CheckedResolver { policy })
    }
}

/// No allowed address for a name.
#[derive(Debug, thiserror::Error)]
#[error("{name} resolves to no allowed address ({refused})")]
struct NoAllowedAddress {
    name: String,
    refused: String,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = Vec::new();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.push(e.to_string());
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let refused = if refused.is_empty() {
                    "no addresses".to_owned()
                } else {
                    refused.join("; ")
                };
                return Err(Box::new(NoAllowedAddress {
                    name: host,
                    refused,
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
