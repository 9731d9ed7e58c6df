//! Outbound webhooks: session events fanned out to the endpoints that want them, and
//! delivered, signed per Standard Webhooks, at least once.
//!
//! The store's outbox holds every event from the moment its cause committed (see
//! `session_lifecycle_runtime::EventOutbox`). The [`Outbound`] worker of each instance
//! fans new events out (one delivery per endpoint: the tenant's endpoints that want the
//! event's type, and the session's own callback URL) and delivers what is due, each
//! attempt claimed in the store so that it happens once across the cluster. A failed
//! attempt is retried when the core's [`DeliveryPolicy`] says, until the retry period
//! ends; a session's deliveries to an endpoint go in the session's order, and nothing else
//! waits for a failing one. Deliveries are bounded per endpoint, so one slow receiver
//! cannot hold back another tenant's.

pub mod address;
pub mod endpoints;
pub mod payload;
pub mod sign;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use session_lifecycle::{DeliveryPolicy, DeliveryStep, Timestamp};
use session_lifecycle_runtime::{
    Delivery, DeliveryAttempt, DeliveryNext, Dispatch, Engine, Fanout, SessionEvent, StoreError,
};
use tokio::sync::{Notify, Semaphore};

use crate::tenants::{Tenant, Tenants};
use address::{AddressPolicy, CheckedResolver};
pub use endpoints::{CallbackSettings, WebhookEndpoint};
use payload::message_id;
use sign::signature_header;

pub use endpoints::CALLBACK_ENDPOINT;

/// The most bytes of a receiver's answer read (the rest is dropped unread).
pub const MAX_ANSWER_BYTES: usize = 4096;

/// How the worker delivers.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// This instance's node name (claims are taken in it).
    pub node: String,
    /// Where webhooks may go.
    pub addresses: AddressPolicy,
    /// When failed deliveries are retried, and for how long.
    pub policy: DeliveryPolicy,
    /// The longest wait for a connection.
    pub connect_timeout: Duration,
    /// The longest an attempt may take, connection and answer included.
    pub timeout: Duration,
    /// Deliveries in flight at once per origin (scheme, host and port).
    pub per_endpoint: usize,
    /// Deliveries in flight at once in all.
    pub concurrency: usize,
    /// How often the worker looks for new events and due deliveries.
    pub poll: Duration,
    /// How long events and finished deliveries are kept (the event stream resumes within
    /// it); idempotency keys are kept a day.
    pub retention: Duration,
}

impl OutboundConfig {
    /// The defaults, for node `node`: HTTPS to public addresses only, retried for 24 h.
    pub fn new(node: &str) -> OutboundConfig {
        OutboundConfig {
            node: node.to_owned(),
            addresses: AddressPolicy::default(),
            policy: DeliveryPolicy::DEFAULT,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            per_endpoint: 8,
            concurrency: 64,
            poll: Duration::from_millis(250),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Counts of this instance's attempts, for metrics.
#[derive(Debug, Default)]
pub struct OutboundStats {
    /// Attempts answered 2xx.
    pub delivered: AtomicU64,
    /// Attempts that failed (to be retried or given up).
    pub failed_attempts: AtomicU64,
    /// Deliveries given up after the retry period.
    pub given_up: AtomicU64,
}

/// The delivery worker of one instance.
pub struct Outbound {
    config: OutboundConfig,
    client: reqwest::Client,
    engine: Engine,
    tenants: Tenants,
    all: Arc<Semaphore>,
    per_endpoint: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    wake: Notify,
    /// Counts this instance's fan-outs: event streams wake on it.
    fanned_out: tokio::sync::watch::Sender<u64>,
    /// Attempt counts.
    pub stats: OutboundStats,
}

/// Why the worker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The HTTP client could not be built (TLS roots, ...).
    #[error("cannot build the webhook client: {0}")]
    Client(#[from] reqwest::Error),
    /// A configured endpoint's URL is refused by the address policy.
    #[error("tenant {tenant:?}, webhook {name:?}: {problem}")]
    Endpoint {
        /// The tenant.
        tenant: String,
        /// The endpoint.
        name: String,
        /// What is wrong.
        problem: address::UrlRefused,
    },
}

impl Outbound {
    /// A worker for `engine`'s store, delivering to `tenants`' endpoints. Every configured
    /// endpoint's URL must pass the address policy.
    pub fn new(
        engine: Engine,
        tenants: Tenants,
        config: OutboundConfig,
    ) -> Result<Arc<Outbound>, OutboundError> {
        for tenant in tenants.all() {
            for endpoint in &tenant.webhooks {
                config
                    .addresses
                    .check_url(&endpoint.url)
                    .map_err(|problem| OutboundError::Endpoint {
                        tenant: tenant.name.clone(),
                        name: endpoint.name.clone(),
                        problem,
                    })?;
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .dns_resolver(CheckedResolver::new(config.addresses))
            .user_agent(concat!("session-lifecycle/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Outbound {
            all: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config,
            client,
            engine,
            tenants,
            per_endpoint: std::sync::Mutex::new(HashMap::new()),
            wake: Notify::new(),
            fanned_out: tokio::sync::watch::channel(0).0,
            stats: OutboundStats::default(),
        }))
    }

    /// Changes whenever this instance fans events out (their stream places are new).
    pub fn fanned_out(&self) -> tokio::sync::watch::Receiver<u64> {
        self.fanned_out.subscribe()
    }

    /// Looks for work at once (an event was just written here).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs until `stop` turns true: fans out new events and delivers due ones. In-flight
    /// attempts finish (within the attempt timeout) before it returns.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut in_flight = tokio::task::JoinSet::new();
        let watcher = {
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                // Another instance fanned out: this worker looks for work, and this
                // instance's event streams read what was placed.
                let wake = || {
                    this.wake.notify_one();
                    this.fanned_out.send_modify(|n| *n = n.wrapping_add(1));
                };
                this.engine.store().watch_events(&wake).await;
            })
        };
        // Finished attempts, recorded together at the next step: the worker's own writes
        // stay few, whatever the rate of deliveries (its claim outlives the wait).
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel::<DeliveryAttempt>();
        let mut pruned_at: Option<tokio::time::Instant> = None;
        while !*stop.borrow() {
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                pruned_at = Some(tokio::time::Instant::now());
                self.prune().await;
            }
            if let Err(e) = self.dispatch().await {
                tracing::warn!(error = %e, "fanning out session events failed; retrying");
            }
            // Together: on SQLite they commit as one (group commit). A next event of a
            // session just recorded is claimed at the next step.
            let (_, claimed) = tokio::join!(self.record(&mut finished), self.claim());
            match claimed {
                Ok(claimed) => {
                    for (delivery, permits) in claimed {
                        let this = Arc::clone(&self);
                        let done = done.clone();
                        in_flight.spawn(async move {
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
            while in_flight.try_join_next().is_some() {}
            tokio::select! {
                biased;
                _ = stop.changed() => {}
                _ = self.wake.notified() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
        watcher.abort();
        while in_flight.join_next().await.is_some() {}
        self.record(&mut finished).await;
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

    /// Forgets what is past the retention, a batch at a time.
    async fn prune(&self) {
        let now = self.engine.now();
        let events_before = now.saturating_sub(self.config.retention);
        let keys_before = now.saturating_sub(session_lifecycle_runtime::IDEMPOTENCY_KEEP);
        loop {
            match self
                .engine
                .store()
                .prune_outbox(events_before, keys_before, PRUNE_BATCH)
                .await
            {
                Ok(gone) if gone >= PRUNE_BATCH => continue,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the event log failed; retrying later");
                    return;
                }
            }
        }
    }

    /// Fans out every event not fanned out yet, a batch per step.
    async fn dispatch(&self) -> Result<(), StoreError> {
        const BATCH: u32 = 256;
        let store = self.engine.store();
        loop {
            let events = store.undispatched_events(BATCH).await?;
            let full = events.len() == BATCH as usize;
            if events.is_empty() {
                return Ok(());
            }
            let batch = events
                .iter()
                .map(|event| Dispatch {
                    session: event.session,
                    kind: event.kind,
                    to: self.fanout(event),
                })
                .collect();
            if store.dispatch_events(batch, self.engine.now()).await? > 0 {
                self.fanned_out.send_modify(|n| *n = n.wrapping_add(1));
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Where `event` goes: its tenant's endpoints that want it, and its session's callback.
    fn fanout(&self, event: &SessionEvent) -> Vec<Fanout> {
        let Some(tenant) = self.tenants.by_name(&event.tenant) else {
            return Vec::new();
        };
        let fanout = |endpoint: &str, url: &str| Fanout {
            endpoint: endpoint.to_owned(),
            url: url.to_owned(),
            origin: origin(url),
        };
        let mut to: Vec<Fanout> = tenant
            .webhooks
            .iter()
            .filter(|e| e.wants(event.kind))
            .map(|e| fanout(&e.name, &e.url))
            .collect();
        if let (Some(url), Some(_)) = (&event.callback_url, &tenant.callback) {
            to.push(fanout(CALLBACK_ENDPOINT, url));
        }
        to
    }

    /// Claims as many due deliveries as there are free slots, none to an origin with no
    /// free slot; each with its slots.
    async fn claim(&self) -> Result<Vec<(Delivery, Slots)>, StoreError> {
        let free = self.all.available_permits();
        if free == 0 {
            return Ok(Vec::new());
        }
        let busy: Vec<String> = {
            let mut slots = session_lifecycle_runtime::lock(&self.per_endpoint);
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
            let slot = Arc::clone(&self.all).try_acquire_owned();
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
        let mut slots = session_lifecycle_runtime::lock(&self.per_endpoint);
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
        let (url, secrets) = if delivery.endpoint == CALLBACK_ENDPOINT {
            let callback = tenant
                .callback
                .as_ref()
                .ok_or("the tenant no longer signs callbacks")?;
            (delivery.url.as_str(), &callback.secrets)
        } else {
            let endpoint = tenant
                .webhooks
                .iter()
                .find(|e| e.name == delivery.endpoint)
                .ok_or("the endpoint is no longer configured")?;
            (endpoint.url.as_str(), &endpoint.secrets)
        };
        let url = self
            .config
            .addresses
            .check_url(url)
            .map_err(|e| e.to_string())?;
        let record = self
            .engine
            .store()
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
        let id = message_id(&delivery.session, delivery.kind);
        let timestamp = unix_secs(self.engine.now());
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
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

/// After an attempt finishes, how long the worker waits for others before its next step
/// (it records them together, and claims for all their slots at once).
const GATHER: Duration = Duration::from_millis(50);

/// How often the worker forgets what is past the retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows of each kind forgotten per step.
const PRUNE_BATCH: u32 = 1000;

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

/// A delivery's two slots: one of all in flight, one of its origin's.
type Slots = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// The origin (scheme, host, port) of `url`: attempts in flight are bounded per origin.
fn origin(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| url.to_owned())
}

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
