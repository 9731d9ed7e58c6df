//! A typed client of `sessiond`, the HTTP API of session-lifecycle: one call per route,
//! answers as the API's own view types ([`session_lifecycle_api`]), every error code of
//! the API as [`ErrorCode`], and the event stream as [`EventStream`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = session_lifecycle_client::test_server::TestServer::start()?;
//! # let (base_url, api_key) = (server.url(), server.api_key());
//! use session_lifecycle_client::{Client, CreateRequest, EndReasonView, ErrorCode, StatusView};
//!
//! let client = Client::new(base_url, api_key)?;
//! let created = client.create_session(&CreateRequest::default()).await?;
//! let id = created.session.session_id;
//! assert_eq!(created.session.status, StatusView::Started);
//!
//! let ended = client.end_session(&id).await?;
//! assert_eq!(ended.end_reason, Some(EndReasonView::Requested));
//! // Ending again answers the same end; a heartbeat of an ended session is refused.
//! assert_eq!(client.end_session(&id).await?.ended_at, ended.ended_at);
//! let refused = client.heartbeat(&id).await.unwrap_err();
//! assert_eq!(refused.code(), Some(ErrorCode::SessionEnded));
//! # Ok(())
//! # }
//! ```
//!
//! Errors: [`Error::Api`] carries the API's code (one of [`ErrorCode`], each with its one
//! HTTP status), message, request id and `Retry-After`; [`Error::is_retryable`] says
//! whether the same call may succeed later.

mod error;
mod events;
#[doc(hidden)]
pub mod test_server;

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, Response, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use crate::error::Error;
pub use crate::events::{EventStream, EventsQuery, StreamEvent};
pub use session_lifecycle_api::errors::ErrorCode;
pub use session_lifecycle_api::events::{
    DeliveriesResponse, DeliveryResponse, DeliveryStatusView, DeliveryView, EventEnvelope,
    EventType,
};
pub use session_lifecycle_api::overview::OverviewResponse;
pub use session_lifecycle_api::views::{
    CreateRequest, CreatedResponse, EndReasonView, HealthResponse, HealthStatus, ListResponse,
    ProviderView, RoomView, SessionResponse, SessionView, StatusView, TimeoutsRequest,
    WebhookResponse,
};

/// The header carrying the API key.
const API_KEY: &str = "x-api-key";

/// A session just created.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The session, `started`.
    pub session: SessionView,
    /// The token its browser opens the session's WebSocket and event stream with.
    pub client_token: String,
    /// Whether this answers an earlier request with the same idempotency key (nothing new
    /// was started).
    pub replayed: bool,
}

/// Which sessions to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListSessions {
    /// Only those with this status.
    pub status: Option<StatusView>,
    /// Page size, 1 to 100 (the service's default: 20).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Which webhook deliveries to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListDeliveries {
    /// Only those of this session.
    pub session_id: Option<String>,
    /// Only those with this status.
    pub status: Option<DeliveryStatusView>,
    /// At most this many, 1 to 100 (the service's default: 50).
    pub limit: Option<u32>,
}

/// The error body as sent; the code is read as text so that an unknown one is reported,
/// not mistaken for a broken answer.
#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorAnswerDetail,
}

#[derive(Deserialize)]
struct ErrorAnswerDetail {
    code: String,
    message: String,
    #[serde(default)]
    request_id: String,
}

/// A client of one `sessiond` (or a load balancer in front of several). Cloning is cheap
/// and clones share connections.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key: HeaderValue,
}

impl Client {
    /// A client of the service at `base_url` (`http://127.0.0.1:8080`, or a prefix it is
    /// mounted under) calling with `api_key`.
    pub fn new(base_url: &str, api_key: &str) -> Result<Client, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Client::with_http(http, base_url, api_key)
    }

    /// The same, over an HTTP client of the caller's (its timeouts, TLS roots, proxies).
    pub fn with_http(
        http: reqwest::Client,
        base_url: &str,
        api_key: &str,
    ) -> Result<Client, Error> {
        let invalid = || Error::InvalidBaseUrl(base_url.to_owned());
        let mut base = Url::parse(base_url).map_err(|_| invalid())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid());
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        let mut key = HeaderValue::from_str(api_key).map_err(|_| Error::InvalidApiKey)?;
        key.set_sensitive(true);
        Ok(Client { http, base, key })
    }

    /// The URL of the session `id`'s route `rest` (`""`, `"end"`, ...), the id escaped.
    fn session_url(&self, id: &str, rest: &[&str]) -> Result<Url, Error> {
        // The URL standard drops `.` and `..` segments: they would reach another route.
        if id.is_empty() || id == "." || id == ".." {
            return Err(Error::InvalidArgument {
                what: "session id",
                value: id.to_owned(),
            });
        }
        let segments: Vec<&str> = std::iter::once(id).chain(rest.iter().copied()).collect();
        Ok(self.url("v1/sessions", &segments))
    }

    /// The URL of `path` (relative, `/`-separated) with `segments` appended, each escaped.
    fn url(&self, path: &str, segments: &[&str]) -> Url {
        let mut url = self.base.join(path).unwrap_or_else(|_| self.base.clone());
        if !segments.is_empty()
            && let Ok(mut parts) = url.path_segments_mut()
        {
            parts.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header(API_KEY, self.key.clone())
    }

    /// Sends `request` and reads the success body as `T`, or the error.
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        let response = request.send().await?;
        read(response).await
    }

    /// Starts a session.
    pub async fn create_session(&self, request: &CreateRequest) -> Result<Created, Error> {
        self.create(request, None).await
    }

    /// Starts a session, safe to retry: a repeat with the same `idempotency_key` and
    /// request within 24 h answers the session the first one started
    /// ([`Created::replayed`]); the same key with another request is refused
    /// ([`ErrorCode::IdempotencyKeyReused`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = session_lifecycle_client::test_server::TestServer::start()?;
    /// use session_lifecycle_client::{Client, CreateRequest};
    ///
    /// let client = Client::new(server.url(), server.api_key())?;
    /// let request = CreateRequest { duration_secs: Some(600), ..Default::default() };
    /// let first = client.create_session_idempotent(&request, "order-4711").await?;
    /// let again = client.create_session_idempotent(&request, "order-4711").await?;
    /// assert_eq!(first.session.session_id, again.session.session_id);
    /// assert!(!first.replayed && again.replayed);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_session_idempotent(
        &self,
        request: &CreateRequest,
        idempotency_key: &str,
    ) -> Result<Created, Error> {
        self.create(request, Some(idempotency_key)).await
    }

    async fn create(&self, request: &CreateRequest, key: Option<&str>) -> Result<Created, Error> {
        let mut builder = self
            .request(Method::POST, self.url("v1/sessions", &[]))
            .json(request);
        if let Some(key) = key {
            builder = builder.header("idempotency-key", key);
        }
        let response = builder.send().await?;
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let created: CreatedResponse = read(response).await?;
        Ok(Created {
            session: created.session,
            client_token: created.client_token,
            replayed,
        })
    }

    /// The session `id`.
    pub async fn get_session(&self, id: &str) -> Result<SessionView, Error> {
        let url = self.session_url(id, &[])?;
        let answer: SessionResponse = self.call(self.request(Method::GET, url)).await?;
        Ok(answer.session)
    }

    /// A page of sessions, newest first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = session_lifecycle_client::test_server::TestServer::start()?;
    /// use session_lifecycle_client::{Client, CreateRequest, ListSessions, StatusView};
    ///
    /// let client = Client::new(server.url(), server.api_key())?;
    /// for _ in 0..3 {
    ///     client.create_session(&CreateRequest::default()).await?;
    /// }
    /// let mut query = ListSessions { status: Some(StatusView::Started), limit: Some(2), ..Default::default() };
    /// let mut seen = 0;
    /// loop {
    ///     let page = client.list_sessions(&query).await?;
    ///     seen += page.sessions.len();
    ///     match page.next_cursor {
    ///         Some(cursor) => query.cursor = Some(cursor),
    ///         None => break,
    ///     }
    /// }
    /// assert_eq!(seen, 3);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_sessions(&self, query: &ListSessions) -> Result<ListResponse, Error> {
        let mut url = self.url("v1/sessions", &[]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(status) = query.status {
                pairs.append_pair("status", &wire_name(status));
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = &query.cursor {
                pairs.append_pair("cursor", cursor);
            }
        }
        strip_empty_query(&mut url);
        self.call(self.request(Method::GET, url)).await
    }

    /// Ends the session `id` (idempotent: a repeat answers the same end).
    pub async fn end_session(&self, id: &str) -> Result<SessionView, Error> {
        let url = self.session_url(id, &["end"])?;
        let answer: SessionResponse = self.call(self.request(Method::POST, url)).await?;
        Ok(answer.session)
    }

    /// Records that the session `id` is alive (refused with
    /// [`ErrorCode::SessionEnded`] once it ended).
    pub async fn heartbeat(&self, id: &str) -> Result<SessionView, Error> {
        let url = self.session_url(id, &["heartbeat"])?;
        let answer: SessionResponse = self.call(self.request(Method::POST, url)).await?;
        Ok(answer.session)
    }

    /// The URL a browser opens the session's WebSocket at (`ws://` or `wss://`), with the
    /// session's client token: open it with any WebSocket client; the session lives while
    /// one is open.
    pub fn websocket_url(&self, id: &str, client_token: &str) -> String {
        let mut url = self.url("v1/sessions", &[id, "ws"]);
        url.query_pairs_mut().append_pair("token", client_token);
        let ws = if url.scheme() == "https" { "wss" } else { "ws" };
        // Both schemes are special in the URL standard, so the change is allowed.
        let _ = url.set_scheme(ws);
        url.to_string()
    }

    /// Forwards a LiveKit webhook (its body and `Authorization` header, as LiveKit sent
    /// them), for a service that receives LiveKit's webhooks itself.
    pub async fn livekit_webhook(
        &self,
        body: &str,
        authorization: &str,
    ) -> Result<WebhookResponse, Error> {
        let request = self
            .http
            .post(self.url("v1/webhooks/livekit", &[]))
            .header("content-type", "application/webhook+json")
            .header("authorization", authorization)
            .body(body.to_owned());
        self.call(request).await
    }

    /// Forwards a Daily webhook (its body and `X-Webhook-Signature` and
    /// `X-Webhook-Timestamp` headers, as Daily sent them).
    pub async fn daily_webhook(
        &self,
        body: &str,
        signature: &str,
        timestamp: &str,
    ) -> Result<WebhookResponse, Error> {
        let request = self
            .http
            .post(self.url("v1/webhooks/daily", &[]))
            .header("content-type", "application/json")
            .header("x-webhook-signature", signature)
            .header("x-webhook-timestamp", timestamp)
            .body(body.to_owned());
        self.call(request).await
    }

    /// Opens the event stream: each session event of the tenant (of every tenant, with an
    /// operator key) as it is recorded, in order. See [`EventStream`].
    pub async fn events(&self, query: &EventsQuery) -> Result<EventStream, Error> {
        let mut url = self.url("v1/events", &[]);
        query.apply(&mut url);
        strip_empty_query(&mut url);
        let mut request = self.http.get(url).header("accept", "text/event-stream");
        if query.token.is_none() {
            request = request.header(API_KEY, self.key.clone());
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            return Err(error_of(response).await);
        }
        Ok(EventStream::new(response, query.after.unwrap_or(0)))
    }

    /// The tenant's webhook deliveries, newest first.
    pub async fn deliveries(&self, query: &ListDeliveries) -> Result<Vec<DeliveryView>, Error> {
        let mut url = self.url("v1/webhook-deliveries", &[]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(session) = &query.session_id {
                pairs.append_pair("session_id", session);
            }
            if let Some(status) = query.status {
                pairs.append_pair("status", &wire_name(status));
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
        }
        strip_empty_query(&mut url);
        let answer: DeliveriesResponse = self.call(self.request(Method::GET, url)).await?;
        Ok(answer.deliveries)
    }

    /// Tries the delivery `id` again now.
    pub async fn retry_delivery(&self, id: u64) -> Result<DeliveryView, Error> {
        let url = self.url("v1/webhook-deliveries", &[&id.to_string(), "retry"]);
        let answer: DeliveryResponse = self.call(self.request(Method::POST, url)).await?;
        Ok(answer.delivery)
    }

    /// What the live page shows: started sessions, recent ends by reason, releases owed,
    /// and (with an operator key) the nodes and their GPUs.
    pub async fn overview(&self) -> Result<OverviewResponse, Error> {
        let url = self.url("v1/overview", &[]);
        self.call(self.request(Method::GET, url)).await
    }

    /// Whether the process is up.
    pub async fn healthz(&self) -> Result<HealthResponse, Error> {
        self.call(self.http.get(self.url("healthz", &[]))).await
    }

    /// Whether this instance takes sessions now: `ok`, or why not (`draining`,
    /// `no_capacity`, `storage_unavailable`; answered with 503, returned here as the
    /// answer it is).
    pub async fn readyz(&self) -> Result<HealthResponse, Error> {
        let response = self.http.get(self.url("readyz", &[])).send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        match serde_json::from_slice::<HealthResponse>(&bytes) {
            Ok(health) if status == 200 || status == 503 => Ok(health),
            _ => Err(answer_error(status, None, &bytes)),
        }
    }

    /// The Prometheus metrics, as text.
    pub async fn metrics(&self) -> Result<String, Error> {
        let response = self.http.get(self.url("metrics", &[])).send().await?;
        if !response.status().is_success() {
            return Err(error_of(response).await);
        }
        Ok(response.text().await?)
    }

    /// The OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, Error> {
        self.call(self.http.get(self.url("openapi.json", &[])))
            .await
    }
}

/// The name a unit enum of the API has on the wire (its serde name): `started`, `pending`.
fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// `?` with nothing after it reads as an empty query: dropped.
fn strip_empty_query(url: &mut Url) {
    if url.query() == Some("") {
        url.set_query(None);
    }
}

/// The success body of `response` as `T`, or its error.
async fn read<T: DeserializeOwned>(response: Response) -> Result<T, Error> {
    if !response.status().is_success() {
        return Err(error_of(response).await);
    }
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|_| answer_error(status, None, &bytes))
}

/// The error an unsuccessful `response` carries.
async fn error_of(response: Response) -> Error {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    match response.bytes().await {
        Ok(bytes) => answer_error(status, retry_after, &bytes),
        Err(e) => Error::Transport(e),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An API error if `body` is an error body with a known code, else an unexpected answer.
fn answer_error(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Error {
    if let Ok(answer) = serde_json::from_slice::<ErrorAnswer>(body)
        && let Some(code) = ErrorCode::from_name(&answer.error.code)
    {
        return Error::Api {
            status,
            code,
            message: answer.error.message,
            request_id: answer.error.request_id,
            retry_after,
        };
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    Error::UnexpectedAnswer { status, body: text }
}

#[cfg(test)]
mod tests;
