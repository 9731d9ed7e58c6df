//! The outbox worker: fans events out into deliveries (the event stream serves an event
//! from then on), forgets what is past the retention, and, in [`delivery`] (feature
//! `outbound-webhooks`), claims the due deliveries in the store and sends them over HTTPS.

#[cfg(feature = "outbound-webhooks")]
mod delivery;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use session_lifecycle::{DeliveryPolicy, EventKind};
use session_lifecycle_runtime::{Dispatch, Engine, Fanout, SessionEvent, StoreError};
use tokio::sync::Notify;

use super::CALLBACK_ENDPOINT;
use super::address::{self, AddressPolicy};
use crate::tenants::Tenants;

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

/// The outbox worker of one instance: fans events out, prunes, and (with the feature
/// `outbound-webhooks`) delivers.
pub struct Outbound {
    config: OutboundConfig,
    engine: Engine,
    tenants: Tenants,
    #[cfg(feature = "outbound-webhooks")]
    delivering: delivery::Delivering,
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
    #[cfg(feature = "outbound-webhooks")]
    #[error("cannot build the webhook client: {0}")]
    Client(#[from] reqwest::Error),
    /// A tenant has webhook endpoints or callback secrets, and this build cannot send.
    #[cfg(not(feature = "outbound-webhooks"))]
    #[error(
        "tenant {0:?} has webhook endpoints or callback secrets, and this build has no \
         outbound webhooks (feature outbound-webhooks)"
    )]
    CannotDeliver(String),
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
            #[cfg(not(feature = "outbound-webhooks"))]
            if !tenant.webhooks.is_empty() || tenant.callback.is_some() {
                return Err(OutboundError::CannotDeliver(tenant.name.clone()));
            }
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
        Ok(Arc::new(Outbound {
            #[cfg(feature = "outbound-webhooks")]
            delivering: delivery::Delivering::new(&config)?,
            config,
            engine,
            tenants,
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

    /// Runs until `stop` turns true: fans out new events (the event stream serves them from
    /// then on), forgets what is past the retention, and delivers due ones. In-flight
    /// attempts finish (within the attempt timeout) before it returns.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
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
        #[cfg(feature = "outbound-webhooks")]
        let mut in_flight = delivery::InFlight::new();
        let mut pruned_at: Option<tokio::time::Instant> = None;
        while !*stop.borrow() {
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                pruned_at = Some(tokio::time::Instant::now());
                self.prune().await;
            }
            if let Err(e) = self.dispatch().await {
                tracing::warn!(error = %e, "fanning out session events failed; retrying");
            }
            #[cfg(feature = "outbound-webhooks")]
            self.deliver_due(&mut in_flight).await;
            tokio::select! {
                biased;
                _ = stop.changed() => {}
                _ = self.wake.notified() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
        watcher.abort();
        #[cfg(feature = "outbound-webhooks")]
        self.finish(in_flight).await;
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
        // A session's own callback hears of its lifecycle; usage goes to billing endpoints.
        let lifecycle = !matches!(event.kind, EventKind::UsageRecorded(_));
        if let (Some(url), Some(_), true) = (&event.callback_url, &tenant.callback, lifecycle) {
            to.push(fanout(CALLBACK_ENDPOINT, url));
        }
        to
    }
}

/// After an attempt finishes, how long the worker waits for others before its next step
/// (it records them together, and claims for all their slots at once).
const GATHER: Duration = Duration::from_millis(50);

/// How often the worker forgets what is past the retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows of each kind forgotten per step.
const PRUNE_BATCH: u32 = 1000;

/// The origin (scheme, host, port) of `url`: attempts in flight are bounded per origin.
fn origin(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| url.to_owned())
}
