//! The bytes of end answers of ended sessions, so that a repeated end is answered from
//! memory, byte for byte the first answer.
//!
//! Per instance, and safe so: an ended session's end answer never changes (release
//! progress is on `GET`, not in end answers), so whichever instance answers first, every
//! instance that caches it caches the same bytes; a miss costs one store read.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;
use session_lifecycle::SessionId;

/// End answers of ended sessions, by session id (and tenant, checked on every hit).
/// Bounded: when full it starts over.
#[derive(Debug)]
pub struct EndedAnswers {
    answers: Mutex<HashMap<SessionId, (String, Bytes)>>,
    capacity: usize,
}

impl EndedAnswers {
    /// Room for `capacity` answers.
    pub fn new(capacity: usize) -> EndedAnswers {
        EndedAnswers {
            answers: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The answer kept for `id`, if `tenant` owns it.
    pub fn get(&self, id: SessionId, tenant: &str) -> Option<Bytes> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        match answers.get(&id) {
            Some((owner, body)) if owner == tenant => Some(body.clone()),
            _ => None,
        }
    }

    /// Keeps `body` as the end answer of `tenant`'s session `id`.
    pub fn put(&self, id: SessionId, tenant: &str, body: Bytes) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= self.capacity {
            answers.clear();
        }
        answers.insert(id, (tenant.to_owned(), body));
    }
}

#[cfg(test)]
mod tests {
    use session_lifecycle::Timestamp;

    use super::*;

    #[test]
    fn answers_are_per_tenant_and_bounded() {
        let t0 = Timestamp::from_millis(0);
        let ids: Vec<SessionId> = (0..3).map(|n| SessionId::from_ulid_parts(t0, n)).collect();
        let answers = EndedAnswers::new(2);
        answers.put(ids[0], "a", Bytes::from_static(b"0"));
        assert_eq!(answers.get(ids[0], "a").as_deref(), Some(&b"0"[..]));
        assert_eq!(answers.get(ids[0], "b"), None, "another tenant's");
        answers.put(ids[1], "a", Bytes::from_static(b"1"));
        answers.put(ids[2], "a", Bytes::from_static(b"2"));
        assert_eq!(answers.get(ids[0], "a"), None, "started over when full");
        assert_eq!(answers.get(ids[2], "a").as_deref(), Some(&b"2"[..]));
    }
}
