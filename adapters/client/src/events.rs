//! The event stream (`GET /v1/events`, Server-Sent Events) as typed events.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use reqwest::{Response, Url};
use session_lifecycle_api::events::EventEnvelope;

use crate::error::Error;

/// The most a single message may hold before the stream counts as broken.
const MAX_MESSAGE: usize = 1 << 20;

/// Where an event stream starts and whose events it carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsQuery {
    /// Start after this event id (the last one received before a reconnect); absent:
    /// from the first event the service keeps.
    pub after: Option<u64>,
    /// Only this session's events.
    pub session_id: Option<String>,
    /// The session's client token instead of the API key (with `session_id`).
    pub token: Option<String>,
}

impl EventsQuery {
    pub(crate) fn apply(&self, url: &mut Url) {
        let mut pairs = url.query_pairs_mut();
        if let Some(after) = self.after {
            pairs.append_pair("after", &after.to_string());
        }
        if let Some(session) = &self.session_id {
            pairs.append_pair("session_id", session);
        }
        if let Some(token) = &self.token {
            pairs.append_pair("token", token);
        }
    }
}

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// Its place in the event log: resume after it with [`EventsQuery::after`].
    pub id: u64,
    /// Its type (`session.started`, `session.ready`, `session.ended`, `session.released`).
    pub event: String,
    /// What it says: the same envelope a webhook carries.
    pub envelope: EventEnvelope,
}

type Body = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send>>;

/// An open event stream. [`next`](Self::next) waits for the next event; `None` when the
/// service closed the stream (it shuts down): reconnect after
/// [`last_event_id`](Self::last_event_id) to miss nothing.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = session_lifecycle_client::test_server::TestServer::start()?;
/// use session_lifecycle_client::{Client, CreateRequest, EventType, EventsQuery};
///
/// let client = Client::new(server.url(), server.api_key())?;
/// let mut events = client.events(&EventsQuery::default()).await?;
/// let created = client.create_session(&CreateRequest::default()).await?;
/// let first = events.next().await.expect("open")?;
/// assert_eq!(first.envelope.kind, EventType::Started);
/// assert_eq!(first.envelope.data.session_id, created.session.session_id);
/// assert_eq!(events.last_event_id(), first.id);
/// # Ok(())
/// # }
/// ```
pub struct EventStream {
    body: Body,
    buffer: Vec<u8>,
    last_id: u64,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    pub(crate) fn new(response: Response, after: u64) -> EventStream {
        EventStream {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            last_id: after,
        }
    }

    /// The id of the last event received (or the one the stream started after).
    pub fn last_event_id(&self) -> u64 {
        self.last_id
    }

    /// The next event; `None` once the service closed the stream.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, Error>> {
        loop {
            while let Some(end) = message_end(&self.buffer) {
                let message: Vec<u8> = self.buffer.drain(..end.1).take(end.0).collect();
                match parse(&message) {
                    Ok(Some(message)) => {
                        // Past it even if it cannot be decoded (a newer service's event):
                        // a resume must not stop on it for ever.
                        self.last_id = message.id;
                        return Some(
                            serde_json::from_str(&message.data)
                                .map(|envelope| StreamEvent {
                                    id: message.id,
                                    event: message.event,
                                    envelope,
                                })
                                .map_err(|e| {
                                    Error::InvalidStream(format!("event {}: {e}", message.id))
                                }),
                        );
                    }
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            if self.buffer.len() > MAX_MESSAGE {
                return Some(Err(Error::InvalidStream("a message over 1 MiB".to_owned())));
            }
            match self.body.next().await? {
                Ok(chunk) => self.buffer.extend_from_slice(&chunk),
                Err(e) => return Some(Err(Error::Transport(e))),
            }
        }
    }
}

/// Where the first message of `buffer` ends: its length, and the length with the blank
/// line after it.
fn message_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buffer.len() {
        for end in [&b"\n\n"[..], b"\r\n\r\n", b"\r\r"] {
            if buffer[i..].starts_with(end) {
                return Some((i, i + end.len()));
            }
        }
        i += 1;
    }
    None
}

/// The message of one block; `None` for one without data (a comment, a keep-alive).
fn parse(message: &[u8]) -> Result<Option<Message>, Error> {
    let text = std::str::from_utf8(message)
        .map_err(|_| Error::InvalidStream("a message is not UTF-8".to_owned()))?;
    let (mut id, mut event, mut data) = (None, String::from("message"), None::<String>);
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => event = value.to_owned(),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    let Some(data) = data else { return Ok(None) };
    let id = id
        .as_deref()
        .and_then(|i| i.parse::<u64>().ok())
        .ok_or_else(|| Error::InvalidStream(format!("an event without a numeric id: {id:?}")))?;
    Ok(Some(Message { id, event, data }))
}

/// One message with data, not decoded yet.
struct Message {
    id: u64,
    event: String,
    data: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_on_blank_lines_and_comments_carry_nothing() {
        assert_eq!(message_end(b": keep-alive\n\nid: 1\n"), Some((12, 14)));
        assert_eq!(message_end(b"id: 1\r\n\r\nx"), Some((5, 9)));
        assert_eq!(message_end(b"id: 1\n"), None);
        assert!(matches!(parse(b": keep-alive"), Ok(None)));
        assert!(matches!(
            parse(b"id: x\ndata: {}"),
            Err(Error::InvalidStream(_))
        ));
        let message = parse(b"id: 3\nevent: session.ended\ndata: {}")
            .unwrap()
            .unwrap();
        assert_eq!((message.id, message.event.as_str()), (3, "session.ended"));
    }
}
