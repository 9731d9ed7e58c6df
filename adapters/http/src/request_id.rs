//! Request ids: every answer carries `x-request-id`, the caller's own when it sent a
//! reasonable one (printable ASCII, 1 to [`MAX_LEN`] bytes), else one made here (128 bits,
//! 32 hex digits; see [`RequestId::generate`]). The id is in the request's tracing span and
//! in error bodies (`error.request_id`).
//!
//! The id of the request being served is task-local: the middleware that assigns it
//! (the `observe` module, above this one) runs the rest of the request inside [`RequestId::scope`], and
//! [`RequestId::current`] reads it back wherever an answer is built (error bodies). Nothing
//! under the middleware spawns the handling of a request onto another task, so the scope
//! covers every answer.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The header, requests and answers alike.
pub const HEADER: &str = "x-request-id";
/// Longest caller id kept, in bytes.
pub const MAX_LEN: usize = 128;
/// What an answer's `x-request-id` always matches (the OpenAPI document states it).
pub const PATTERN: &str = "^[ -~]{1,128}$";

tokio::task_local! {
    static CURRENT: RequestId;
}

/// A request's id: printable ASCII, 1 to [`MAX_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

impl RequestId {
    /// The caller's id if it is reasonable (printable ASCII, space included, 1 to
    /// [`MAX_LEN`] bytes), else `None`.
    pub fn accept(value: &[u8]) -> Option<RequestId> {
        let printable = value.iter().all(|b| (0x20..=0x7e).contains(b));
        if value.is_empty() || value.len() > MAX_LEN || !printable {
            return None;
        }
        // Printable ASCII is UTF-8.
        std::str::from_utf8(value).ok().map(|s| RequestId(s.into()))
    }

    /// A new id: 32 hex digits (128 bits) that look random and never repeat within the
    /// process: a per-request counter through SipHash keyed once per process from the
    /// operating system's generator (a system call per request would cost more than the
    /// rest of a repeated end's answer).
    pub fn generate() -> RequestId {
        static KEYED: OnceLock<RandomState> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let keyed = KEYED.get_or_init(RandomState::new);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut text = String::with_capacity(32);
        for lane in 0u8..2 {
            let mut h = keyed.build_hasher();
            h.write_u64(n);
            h.write_u8(lane);
            for b in h.finish().to_be_bytes() {
                text.push(char::from(HEX[usize::from(b >> 4)]));
                text.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        RequestId(text.into())
    }

    /// The caller's id when reasonable, else a new one.
    pub fn from_header(value: Option<&[u8]>) -> RequestId {
        value
            .and_then(RequestId::accept)
            .unwrap_or_else(RequestId::generate)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `fut` with `self` as the current request's id.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }

    /// The id of the request being served; a new one outside any request (an answer built
    /// by a router mounted without the middleware).
    pub fn current() -> RequestId {
        CURRENT
            .try_with(RequestId::clone)
            .unwrap_or_else(|_| RequestId::generate())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasonable_caller_ids_are_kept_and_others_replaced() {
        assert_eq!(RequestId::accept(b"abc-123").unwrap().as_str(), "abc-123");
        assert_eq!(RequestId::accept(b"a b").unwrap().as_str(), "a b");
        assert!(RequestId::accept(&[b'x'; MAX_LEN]).is_some());
        for bad in [
            &b""[..],
            &[b'x'; MAX_LEN + 1],
            b"tab\there",
            "é".as_bytes(),
            b"\x7f",
        ] {
            assert!(RequestId::accept(bad).is_none(), "{bad:?}");
        }
        let made = RequestId::from_header(Some(b"\x01"));
        assert_eq!(made.as_str().len(), 32);
        assert!(made.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(RequestId::generate(), RequestId::generate());
    }

    #[tokio::test]
    async fn the_current_id_is_the_scoped_one() {
        let id = RequestId::accept(b"req-1").unwrap();
        let seen = id.clone().scope(async { RequestId::current() }).await;
        assert_eq!(seen, id);
        assert_ne!(RequestId::current(), id);
    }
}
