//! What the handlers share, and the HTTP settings.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle_runtime::Engine;

use crate::answers::EndedAnswers;
use crate::extract::TenantDirectory;
use crate::metrics::HttpMetrics;
use crate::outbound::Outbound;
use crate::outbound::address::AddressPolicy;
use crate::tenants::Tenants;
use crate::tokens::TokenSigner;
use crate::webhooks::secrets::WebhookConfig;

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest API request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest room webhook body accepted (413 beyond): provider events carry room and
    /// participant metadata, well beyond an API body.
    pub webhook_max_body_bytes: usize,
    /// Longest a request may take (503 `request_timeout` beyond).
    pub request_timeout: Duration,
    /// Most requests served at once; more are refused with 503 `overloaded`, never queued.
    pub max_in_flight: usize,
    /// Interval between WebSocket pings.
    pub ws_ping_interval: Duration,
    /// Silence after which a WebSocket counts as lost.
    pub ws_pong_timeout: Duration,
    /// Where webhooks may go: checked on a create's `callback_url`.
    pub webhook_addresses: AddressPolicy,
    /// Most event streams (`/v1/events`) open at once; more get 503 `overloaded`.
    pub max_event_streams: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 16 * 1024,
            webhook_max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            max_in_flight: 1024,
            ws_ping_interval: Duration::from_secs(5),
            ws_pong_timeout: Duration::from_secs(15),
            webhook_addresses: AddressPolicy::default(),
            max_event_streams: 1024,
        }
    }
}

/// What the handlers share.
pub struct AppState {
    /// The session engine.
    pub engine: Engine,
    /// Who may call, and their plans.
    pub tenants: Tenants,
    /// Signs client tokens.
    pub tokens: TokenSigner,
    /// HTTP settings.
    pub config: HttpConfig,
    /// Request metrics.
    pub http_metrics: HttpMetrics,
    /// Answers of repeated ends.
    pub ended_answers: EndedAnswers,
    /// Room webhook secrets and settings.
    pub webhooks: WebhookConfig,
    /// Flips to `true` when the service shuts down: WebSockets close.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// The outbound webhook worker, once started.
    pub outbound: std::sync::OnceLock<Arc<Outbound>>,
    /// Slots for open event streams.
    pub event_streams: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State over `engine`, with no room webhook secrets (those endpoints refuse all).
    pub fn new(
        engine: Engine,
        tenants: Tenants,
        tokens: TokenSigner,
        config: HttpConfig,
    ) -> Arc<AppState> {
        AppState::with_webhooks(engine, tenants, tokens, config, WebhookConfig::default())
    }

    /// State over `engine`, with room webhooks configured.
    pub fn with_webhooks(
        engine: Engine,
        tenants: Tenants,
        tokens: TokenSigner,
        config: HttpConfig,
        webhooks: WebhookConfig,
    ) -> Arc<AppState> {
        let event_streams = Arc::new(tokio::sync::Semaphore::new(config.max_event_streams.max(1)));
        Arc::new(AppState {
            webhooks,
            engine,
            tenants,
            tokens,
            config,
            http_metrics: HttpMetrics::default(),
            ended_answers: EndedAnswers::new(65_536),
            shutdown: tokio::sync::watch::channel(false).0,
            outbound: std::sync::OnceLock::new(),
            event_streams,
        })
    }
}

impl TenantDirectory for AppState {
    fn tenants(&self) -> &Tenants {
        &self.tenants
    }
}
