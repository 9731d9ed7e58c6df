//! Tenants: who may call (API keys, stored hashed and compared in constant time), their
//! plans, and the room webhook secrets the tenants file gives each.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use session_lifecycle_runtime::Plan;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::{RateLimit, RateLimits};
use crate::outbound::endpoints::{
    CALLBACK_ENDPOINT, CallbackSettings, UsageExport, UsageFormat, WebhookEndpoint,
};

/// The Stripe meter event name of exported usage, unless a tenant names its own.
pub const DEFAULT_USAGE_EVENT_NAME: &str = "session_milliseconds";
use crate::outbound::sign::SigningSecret;
use crate::webhooks::secrets::{DailySecret, LivekitKey};
use session_lifecycle::EventKind;
use session_lifecycle::usage::{BillingRule, MeterStart, Rounding};

/// A tenant: who owns sessions, with its key (hashed) and plan.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Its name, which scopes its sessions.
    pub name: String,
    key_sha256: [u8; 32],
    /// Its plan limits.
    pub plan: Plan,
    revoked: bool,
    /// Its LiveKit API key and secret, if its rooms send webhooks.
    pub livekit: Option<(String, String)>,
    /// Its Daily webhook secret, if its rooms send webhooks.
    pub daily_secret: Option<String>,
    /// Where its session events go.
    pub webhooks: Vec<WebhookEndpoint>,
    /// Whether (and where) its sessions may name their own callback URL.
    pub callback: Option<CallbackSettings>,
    /// How long its avatar servers may take to report ready before their session ends
    /// `start_failed` (`None`: the service's default).
    pub avatar_ready_timeout: Option<Duration>,
    /// Its request rate limit (`None`: the service's default, if any).
    pub rate_limit: Option<RateLimit>,
    /// What its exported usage names.
    pub usage_export: UsageExport,
}

/// Why a tenants file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid tenants file: {0}")]
    Parse(String),
    /// A field is invalid.
    #[error("tenant {tenant:?}: {problem}")]
    Invalid {
        /// The tenant concerned.
        tenant: String,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    /// Hex SHA-256 of the operator keys: they see every tenant on the live page.
    #[serde(default)]
    operator_keys_sha256: Vec<String>,
    tenants: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    api_key_sha256: String,
    max_concurrent_sessions: u32,
    max_session_secs: u64,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    livekit_api_key: Option<String>,
    #[serde(default)]
    livekit_api_secret: Option<String>,
    #[serde(default)]
    daily_webhook_secret: Option<String>,
    /// The longest timeouts its sessions may set for themselves (default: the longest
    /// session).
    #[serde(default)]
    max_participant_left_timeout_ms: Option<u64>,
    #[serde(default)]
    max_participant_absent_timeout_ms: Option<u64>,
    #[serde(default)]
    max_websocket_grace_ms: Option<u64>,
    /// Its webhook endpoints (`[[tenants.webhooks]]`).
    #[serde(default)]
    webhooks: Vec<WebhookEntry>,
    /// Secrets (`whsec_...`) that sign its sessions' own callbacks; without any, a create
    /// naming a `callback_url` is refused.
    #[serde(default)]
    callback_secrets: Vec<String>,
    /// The hosts its sessions' callback URLs may name (default: any allowed address).
    #[serde(default)]
    callback_hosts: Option<Vec<String>>,
    /// How long its avatar servers may take to report ready (`READY=1`), ms.
    #[serde(default)]
    avatar_ready_timeout_ms: Option<u64>,
    /// Its request rate limit for the whole cluster, per second (and its burst, default
    /// the same).
    #[serde(default)]
    requests_per_second: Option<u32>,
    #[serde(default)]
    request_burst: Option<u32>,
    /// How its usage is billed (`[tenants.billing]`; default: meter from `ready`, exact).
    #[serde(default)]
    billing: Option<BillingEntry>,
}

/// A tenant's billing rule as written: `meter = "ready" | "started"`,
/// `rounding = "second" | "minute"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BillingEntry {
    #[serde(default)]
    meter: Option<String>,
    #[serde(default)]
    rounding: Option<String>,
    /// Its customer id at the billing system (default: the tenant's name).
    #[serde(default)]
    customer: Option<String>,
    /// The Stripe meter's event name (default `session_milliseconds`).
    #[serde(default)]
    event_name: Option<String>,
}

impl BillingEntry {
    fn rule(&self) -> Result<BillingRule, String> {
        let mut rule = BillingRule::default();
        if let Some(meter) = &self.meter {
            rule.meter = MeterStart::from_name(meter).ok_or_else(|| {
                format!("billing.meter must be \"ready\" or \"started\", not {meter:?}")
            })?;
        }
        if let Some(rounding) = &self.rounding {
            rule.rounding = Rounding::from_name(rounding).ok_or_else(|| {
                format!("billing.rounding must be \"second\" or \"minute\", not {rounding:?}")
            })?;
        }
        Ok(rule)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookEntry {
    name: String,
    url: String,
    /// Its `whsec_...` secret (or `secrets`, for a rotation).
    #[serde(default)]
    secret: Option<String>,
    /// Several `whsec_...` secrets; each signs every message (a rotation lists both).
    #[serde(default)]
    secrets: Vec<String>,
    /// Session event types wanted (default: all).
    #[serde(default)]
    events: Option<Vec<String>>,
    /// Export usage to it: `usage.recorded` events as `stripe` meter events or as
    /// `cloudevents` (default: none).
    #[serde(default)]
    usage: Option<String>,
}

fn secrets(list: &[String]) -> Result<Vec<SigningSecret>, String> {
    list.iter()
        .map(|s| SigningSecret::parse(s).map_err(|e| e.to_string()))
        .collect()
}

fn webhook_endpoints(entries: Vec<WebhookEntry>) -> Result<Vec<WebhookEndpoint>, String> {
    let mut out: Vec<WebhookEndpoint> = Vec::with_capacity(entries.len());
    for e in entries {
        if e.name.is_empty() || e.name.len() > 64 || e.name == CALLBACK_ENDPOINT {
            return Err(format!(
                "webhook name {:?}: 1 to 64 characters, not {CALLBACK_ENDPOINT:?}",
                e.name
            ));
        }
        if out.iter().any(|o| o.name == e.name) {
            return Err(format!("webhook {:?} listed twice", e.name));
        }
        if url::Url::parse(&e.url).is_err() {
            return Err(format!("webhook {:?}: url is not a URL", e.name));
        }
        let listed: Vec<String> = e.secret.into_iter().chain(e.secrets).collect();
        if listed.is_empty() {
            return Err(format!("webhook {:?}: a secret (or secrets)", e.name));
        }
        let signing = secrets(&listed).map_err(|p| format!("webhook {:?}: {p}", e.name))?;
        let events = match e.events {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        EventKind::from_name(n).ok_or_else(|| {
                            format!("webhook {:?}: unknown event type {n:?}", e.name)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let usage = match e.usage.as_deref() {
            None => None,
            Some(name) => Some(UsageFormat::from_name(name).ok_or_else(|| {
                format!(
                    "webhook {:?}: usage must be \"stripe\" or \"cloudevents\", not {name:?}",
                    e.name
                )
            })?),
        };
        out.push(WebhookEndpoint {
            name: e.name,
            url: e.url,
            secrets: signing,
            events,
            usage,
        });
    }
    Ok(out)
}

/// Every tenant the service knows, and this instance's share of their rate limits.
#[derive(Debug, Clone)]
pub struct Tenants {
    tenants: Vec<Arc<Tenant>>,
    /// SHA-256 of the operator keys.
    operators: Vec<[u8; 32]>,
    limits: Arc<RateLimits>,
    /// The limit of tenants without their own.
    default_rate: Option<RateLimit>,
}

/// The hex SHA-256 of an API key, as the tenants file stores it.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    // Digits only: `from_str_radix` alone would take a sign ("+7").
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

impl Tenants {
    /// Reads a tenants file (TOML, a `[[tenants]]` table per tenant).
    pub fn from_file(path: &Path) -> Result<Tenants, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Tenants::from_toml(&text)
    }

    /// Parses a tenants file's text.
    pub fn from_toml(text: &str) -> Result<Tenants, ConfigError> {
        let file: TenantsFile =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut tenants = Vec::with_capacity(file.tenants.len());
        for entry in file.tenants {
            let invalid = |problem: &str| ConfigError::Invalid {
                tenant: entry.name.clone(),
                problem: problem.to_owned(),
            };
            if entry.name.is_empty() || entry.name.len() > 64 {
                return Err(invalid("name must have 1 to 64 characters"));
            }
            if tenants.iter().any(|t: &Arc<Tenant>| t.name == entry.name) {
                return Err(invalid("listed twice"));
            }
            let key = parse_hex32(&entry.api_key_sha256.to_ascii_lowercase())
                .ok_or_else(|| invalid("api_key_sha256 must be 64 hex digits"))?;
            if entry.max_session_secs == 0 {
                return Err(invalid("max_session_secs must be positive"));
            }
            let livekit = match (entry.livekit_api_key, entry.livekit_api_secret) {
                (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Some((k, s)),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "livekit_api_key and livekit_api_secret go together",
                    ));
                }
            };
            if entry.daily_webhook_secret.as_deref() == Some("") {
                return Err(invalid("daily_webhook_secret is empty"));
            }
            let mut plan = Plan::new(
                Some(entry.max_concurrent_sessions),
                Duration::from_secs(entry.max_session_secs),
            );
            let limit =
                |ms: Option<u64>, default: Duration| ms.map_or(default, Duration::from_millis);
            plan.max_participant_left = limit(
                entry.max_participant_left_timeout_ms,
                plan.max_participant_left,
            );
            plan.max_participant_absent = limit(
                entry.max_participant_absent_timeout_ms,
                plan.max_participant_absent,
            );
            plan.max_websocket_grace =
                limit(entry.max_websocket_grace_ms, plan.max_websocket_grace);
            if let Some(billing) = &entry.billing {
                plan.billing = billing.rule().map_err(|p| invalid(&p))?;
            }
            let billing = entry.billing.as_ref();
            let usage_export = UsageExport {
                customer: billing
                    .and_then(|b| b.customer.clone())
                    .unwrap_or_else(|| entry.name.clone()),
                event_name: billing
                    .and_then(|b| b.event_name.clone())
                    .unwrap_or_else(|| DEFAULT_USAGE_EVENT_NAME.to_owned()),
            };
            if usage_export.customer.is_empty() || usage_export.event_name.is_empty() {
                return Err(invalid(
                    "billing.customer and billing.event_name must not be empty",
                ));
            }
            let webhooks = webhook_endpoints(entry.webhooks).map_err(|p| invalid(&p))?;
            let callback = if entry.callback_secrets.is_empty() {
                if entry.callback_hosts.is_some() {
                    return Err(invalid("callback_hosts needs callback_secrets"));
                }
                None
            } else {
                Some(CallbackSettings {
                    secrets: secrets(&entry.callback_secrets)
                        .map_err(|p| invalid(&format!("callback_secrets: {p}")))?,
                    hosts: entry
                        .callback_hosts
                        .map(|h| h.into_iter().map(|h| h.to_ascii_lowercase()).collect()),
                })
            };
            if entry.avatar_ready_timeout_ms == Some(0) {
                return Err(invalid("avatar_ready_timeout_ms must be positive"));
            }
            let rate_limit = match (entry.requests_per_second, entry.request_burst) {
                (None, None) => None,
                (Some(0), _) | (_, Some(0)) => {
                    return Err(invalid(
                        "requests_per_second and request_burst must be positive",
                    ));
                }
                (Some(per_second), burst) => Some(RateLimit {
                    per_second,
                    burst: burst.unwrap_or(per_second),
                }),
                (None, Some(_)) => return Err(invalid("request_burst needs requests_per_second")),
            };
            tenants.push(Arc::new(Tenant {
                rate_limit,
                usage_export,
                webhooks,
                callback,
                avatar_ready_timeout: entry.avatar_ready_timeout_ms.map(Duration::from_millis),
                name: entry.name,
                key_sha256: key,
                plan,
                revoked: entry.revoked,
                livekit,
                daily_secret: entry.daily_webhook_secret,
            }));
        }
        if tenants.is_empty() {
            return Err(ConfigError::Parse("no tenants listed".to_owned()));
        }
        let operators = file
            .operator_keys_sha256
            .iter()
            .map(|h| {
                parse_hex32(&h.to_ascii_lowercase()).ok_or_else(|| {
                    ConfigError::Parse(
                        "operator_keys_sha256: each must be 64 hex digits".to_owned(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A key is one or the other: a tenant's key must not see every tenant.
        if let Some(t) = tenants
            .iter()
            .find(|t| operators.iter().any(|op| *op == t.key_sha256))
        {
            return Err(ConfigError::Invalid {
                tenant: t.name.clone(),
                problem: "its api_key_sha256 is also an operator key".to_owned(),
            });
        }
        Ok(Tenants {
            tenants,
            operators,
            limits: Arc::new(RateLimits::new()),
            default_rate: None,
        })
    }

    /// One tenant whose key is also the operator key: the development shortcut, where
    /// whoever runs the service is its only tenant.
    pub fn single_operator(name: &str, key: &str, plan: Plan) -> Tenants {
        let mut tenants = Tenants::single(name, key, plan);
        tenants
            .operators
            .push(Sha256::digest(key.as_bytes()).into());
        tenants
    }

    /// One tenant with one key (the `--api-key` shortcut and the generated key).
    pub fn single(name: &str, key: &str, plan: Plan) -> Tenants {
        Tenants {
            tenants: vec![Arc::new(Tenant {
                name: name.to_owned(),
                key_sha256: Sha256::digest(key.as_bytes()).into(),
                plan,
                revoked: false,
                livekit: None,
                daily_secret: None,
                webhooks: Vec::new(),
                callback: None,
                avatar_ready_timeout: None,
                rate_limit: None,
                usage_export: UsageExport {
                    customer: name.to_owned(),
                    event_name: DEFAULT_USAGE_EVENT_NAME.to_owned(),
                },
            })],
            operators: Vec::new(),
            limits: Arc::new(RateLimits::new()),
            default_rate: None,
        }
    }

    /// The webhook secrets the tenants file gives, each scoped to its tenant.
    pub fn webhook_secrets(&self) -> (Vec<LivekitKey>, Vec<DailySecret>) {
        let mut livekit = Vec::new();
        let mut daily = Vec::new();
        for t in self.tenants.iter().filter(|t| !t.revoked) {
            if let Some((api_key, api_secret)) = &t.livekit {
                livekit.push(LivekitKey {
                    tenant: Some(t.name.clone()),
                    api_key: api_key.clone(),
                    api_secret: api_secret.clone(),
                });
            }
            if let Some(secret) = &t.daily_secret {
                daily.push(DailySecret {
                    tenant: Some(t.name.clone()),
                    secret: secret.clone(),
                });
            }
        }
        (livekit, daily)
    }

    /// The tenant whose key is `key`. Compares the key's hash with every tenant's in
    /// constant time; a missing, unknown or revoked key gets `None` alike.
    pub fn authenticate(&self, key: Option<&str>) -> Option<&Arc<Tenant>> {
        let digest: [u8; 32] = Sha256::digest(key.unwrap_or("").as_bytes()).into();
        let mut found = None;
        for tenant in &self.tenants {
            if bool::from(tenant.key_sha256.ct_eq(&digest)) {
                found = Some(tenant);
            }
        }
        match (key, found) {
            (Some(k), Some(t)) if !k.is_empty() && !t.revoked => Some(t),
            _ => None,
        }
    }

    /// These tenants, and `key` as an operator key too. Refused where `key` is a tenant's
    /// own key: a tenant's key must not see every tenant (as in the tenants file).
    pub fn with_operator_key(mut self, key: &str) -> Result<Tenants, ConfigError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(t) = self.tenants.iter().find(|t| t.key_sha256 == digest) {
            return Err(ConfigError::Invalid {
                tenant: t.name.clone(),
                problem: "its key is also the operator key".to_owned(),
            });
        }
        self.operators.push(digest);
        Ok(self)
    }

    /// Whether `key` is an operator key (compared by hash, in constant time, with each).
    pub fn is_operator(&self, key: Option<&str>) -> bool {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.operators
            .iter()
            .fold(false, |found, op| found | bool::from(op.ct_eq(&digest)))
    }

    /// These tenants, with `limit` for those without a rate limit of their own.
    pub fn with_default_rate(mut self, limit: Option<RateLimit>) -> Tenants {
        self.default_rate = limit;
        self
    }

    /// This instance's share of the rate limits (set the live node count on it).
    pub fn rate_limits(&self) -> &Arc<RateLimits> {
        &self.limits
    }

    /// Admits one request of `tenant` under its rate limit, or says how long to wait.
    pub fn admit(&self, tenant: &Tenant) -> Result<(), Duration> {
        match tenant.rate_limit.or(self.default_rate) {
            Some(limit) => self.limits.admit(&tenant.name, limit),
            None => Ok(()),
        }
    }

    /// Every tenant, revoked ones included.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.iter()
    }

    /// The tenant named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_single_tenant_shortcut_authenticates_its_key() {
        let plan = Plan::new(Some(2), Duration::from_secs(60));
        let tenants = Tenants::single("default", "sk_test", plan);
        assert_eq!(tenants.authenticate(Some("sk_test")).unwrap().plan, plan);
        assert!(tenants.authenticate(Some("sk_tes")).is_none());
    }

    #[test]
    fn keys_are_matched_by_hash_and_revocation_is_honoured() {
        let text = format!(
            "[[tenants]]\nname = \"a\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 2\nmax_session_secs = 60\n\n[[tenants]]\nname = \"b\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 1\nmax_session_secs = 30\nrevoked = true\n",
            hash_key("key-a"),
            hash_key("key-b")
        );
        let tenants = Tenants::from_toml(&text).unwrap();
        assert_eq!(tenants.authenticate(Some("key-a")).unwrap().name, "a");
        assert!(tenants.authenticate(Some("key-b")).is_none(), "revoked");
        assert!(tenants.authenticate(Some("nope")).is_none());
        assert!(tenants.authenticate(Some("")).is_none());
        assert!(tenants.authenticate(None).is_none());
    }

    #[test]
    fn webhook_endpoints_are_read_and_checked() {
        let tenant = |hooks: &str| {
            format!(
                "[[tenants]]\nname = \"a\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 1\nmax_session_secs = 60\n{hooks}",
                hash_key("k")
            )
        };
        let secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let one = Tenants::from_toml(&tenant(&format!(
            "[[tenants.webhooks]]\nname = \"b\"\nurl = \"https://x.example/h\"\nsecret = \"{secret}\"\nevents = [\"session.ended\"]\n"
        )))
        .unwrap();
        let hooks = &one.by_name("a").unwrap().webhooks;
        assert_eq!(hooks.len(), 1);
        assert!(hooks[0].wants(EventKind::Ended) && !hooks[0].wants(EventKind::Started));
        for bad in [
            "[[tenants.webhooks]]\nname = \"b\"\nurl = \"https://x.example/h\"\n".to_owned(),
            "[[tenants.webhooks]]\nname = \"b\"\nurl = \"https://x.example/h\"\nsecret = \"nope\"\n"
                .to_owned(),
            format!(
                "[[tenants.webhooks]]\nname = \"b\"\nurl = \"not a url\"\nsecret = \"{secret}\"\n"
            ),
            format!(
                "[[tenants.webhooks]]\nname = \"callback\"\nurl = \"https://x.example/h\"\nsecret = \"{secret}\"\n"
            ),
            format!(
                "[[tenants.webhooks]]\nname = \"b\"\nurl = \"https://x.example/h\"\nsecret = \"{secret}\"\nevents = [\"session.paused\"]\n"
            ),
            "callback_hosts = [\"x.example\"]\n".to_owned(),
        ] {
            assert!(Tenants::from_toml(&tenant(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn operator_keys_are_read_by_hash() {
        let text = format!(
            "operator_keys_sha256 = [\"{}\"]\n[[tenants]]\nname = \"a\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 2\nmax_session_secs = 60\n",
            hash_key("op-key"),
            hash_key("key-a")
        );
        let tenants = Tenants::from_toml(&text).unwrap();
        assert!(tenants.is_operator(Some("op-key")));
        assert!(!tenants.is_operator(Some("key-a")));
        assert!(!tenants.is_operator(Some("")) && !tenants.is_operator(None));
        assert!(
            tenants.authenticate(Some("op-key")).is_none(),
            "not a tenant key"
        );
        let bad = text.replace(&hash_key("op-key"), "abc");
        assert!(Tenants::from_toml(&bad).is_err());
        let shared = text.replace(&hash_key("op-key"), &hash_key("key-a"));
        assert!(
            Tenants::from_toml(&shared).is_err(),
            "a tenant key is no operator key"
        );
        let plan = Plan::new(Some(1), Duration::from_secs(9));
        let single = Tenants::single_operator("d", "k", plan);
        assert!(single.is_operator(Some("k")) && single.authenticate(Some("k")).is_some());
        assert!(
            Tenants::from_toml(&text)
                .unwrap()
                .with_operator_key("key-a")
                .is_err(),
            "a tenant's key given as the operator key is refused"
        );
        let with_flag = Tenants::single("d", "k", plan)
            .with_operator_key("op")
            .unwrap();
        assert!(with_flag.is_operator(Some("op")) && !with_flag.is_operator(Some("k")));
        // A sign is no hex digit, though `from_str_radix` takes one.
        let signed = text.replace(&hash_key("op-key"), &format!("+7{}", &"0".repeat(62)));
        assert!(Tenants::from_toml(&signed).is_err());
    }

    #[test]
    fn bad_tenants_files_are_refused() {
        for bad in [
            "",
            "[[tenants]]\nname = \"a\"\n",
            "[[tenants]]\nname = \"a\"\napi_key_sha256 = \"xyz\"\nmax_concurrent_sessions = 1\nmax_session_secs = 1\n",
            "[[tenants]]\nname = \"a\"\napi_key_sha256 = \"00\"\nmax_concurrent_sessions = 1\nmax_session_secs = 1\nextra = 1\n",
        ] {
            assert!(Tenants::from_toml(bad).is_err(), "{bad:?}");
        }
    }
}
