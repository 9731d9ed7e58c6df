//! Session ids: `sess_` followed by 1 to 64 Crockford base32 characters.

use core::fmt;
use core::hash::{Hash, Hasher};

use crate::time::Timestamp;

/// The prefix every session id starts with.
pub const SESSION_ID_PREFIX: &str = "sess_";
/// The most Crockford characters an id may have after its prefix.
pub const SESSION_ID_MAX_CHARS: usize = 64;
/// The longest well-formed id, prefix included, in bytes.
pub const SESSION_ID_MAX_LEN: usize = SESSION_ID_PREFIX.len() + SESSION_ID_MAX_CHARS;

/// A session's id, `sess_` + Crockford base32 (digits and upper-case letters without
/// I, L, O and U).
///
/// New ids are `sess_` + a 26-character ULID ([`SessionId::from_ulid_parts`]). Any `sess_`
/// followed by 1 to 64 Crockford characters is well-formed, so ids minted elsewhere (the
/// reference's own example, `sess_01H3Z8G9YR3K2N5M6P7Q8W4T`, has 24) can still be looked up.
///
/// ```
/// use session_lifecycle::SessionId;
/// let id: SessionId = "sess_01H3Z8G9YR3K2N5M6P7Q8W4T".parse().unwrap();
/// assert_eq!(id.as_str(), "sess_01H3Z8G9YR3K2N5M6P7Q8W4T");
/// assert!("sess_01h3".parse::<SessionId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionId {
    /// The characters after the prefix; only `chars[..len]` is meaningful, the rest is zero
    /// so that derived equality and ordering are those of the text.
    chars: [u8; SESSION_ID_MAX_CHARS],
    len: u8,
}

/// Why a string is not a well-formed session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionIdError {
    /// It does not start with `sess_`.
    MissingPrefix,
    /// Nothing follows the prefix.
    Empty,
    /// More than 64 characters follow the prefix.
    TooLong,
    /// A character after the prefix is not upper-case Crockford base32.
    InvalidCharacter {
        /// Byte offset of the first offending character in the whole input.
        at: usize,
    },
}

impl core::error::Error for SessionIdError {}

impl fmt::Display for SessionIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionIdError::MissingPrefix => f.write_str("session id must start with \"sess_\""),
            SessionIdError::Empty => f.write_str("session id has nothing after \"sess_\""),
            SessionIdError::TooLong => {
                f.write_str("session id has more than 64 characters after \"sess_\"")
            }
            SessionIdError::InvalidCharacter { at } => write!(
                f,
                "session id has a character at byte {at} that is not upper-case Crockford base32"
            ),
        }
    }
}

/// Whether `c` is an upper-case Crockford base32 digit.
const fn is_crockford(c: u8) -> bool {
    matches!(c, b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z')
}

impl SessionId {
    /// A new id: `sess_` + the ULID of `now` (milliseconds) and 80 bits of `random`.
    ///
    /// The core has no randomness of its own: the caller supplies it (from the OS, or a
    /// seeded generator in tests). Ids minted in the same millisecond sort by `random`.
    pub fn from_ulid_parts(now: Timestamp, random: u128) -> SessionId {
        let ulid = ulid::Ulid::from_parts(now.as_millis(), random);
        let mut text = [0u8; ulid::ULID_LEN];
        ulid.array_to_str(&mut text);
        let mut chars = [0u8; SESSION_ID_MAX_CHARS];
        chars[..ulid::ULID_LEN].copy_from_slice(&text);
        SessionId {
            chars,
            len: ulid::ULID_LEN as u8,
        }
    }

    /// Parses a session id strictly. Total: never panics.
    pub fn parse(text: &str) -> Result<SessionId, SessionIdError> {
        let rest = text
            .strip_prefix(SESSION_ID_PREFIX)
            .ok_or(SessionIdError::MissingPrefix)?
            .as_bytes();
        if rest.is_empty() {
            return Err(SessionIdError::Empty);
        }
        if rest.len() > SESSION_ID_MAX_CHARS {
            return Err(SessionIdError::TooLong);
        }
        let mut chars = [0u8; SESSION_ID_MAX_CHARS];
        for (i, &c) in rest.iter().enumerate() {
            if !is_crockford(c) {
                return Err(SessionIdError::InvalidCharacter {
                    at: SESSION_ID_PREFIX.len() + i,
                });
            }
            chars[i] = c;
        }
        Ok(SessionId {
            chars,
            len: rest.len() as u8,
        })
    }

    /// The characters after `sess_`.
    pub fn suffix(&self) -> &str {
        // Only Crockford ASCII is ever stored.
        core::str::from_utf8(&self.chars[..usize::from(self.len)]).unwrap_or("")
    }

    /// The whole id, written into `buf` without allocating.
    pub fn write_to<'b>(&self, buf: &'b mut [u8; SESSION_ID_MAX_LEN]) -> &'b str {
        let n = SESSION_ID_PREFIX.len() + usize::from(self.len);
        buf[..SESSION_ID_PREFIX.len()].copy_from_slice(SESSION_ID_PREFIX.as_bytes());
        buf[SESSION_ID_PREFIX.len()..n].copy_from_slice(&self.chars[..usize::from(self.len)]);
        core::str::from_utf8(&buf[..n]).unwrap_or("")
    }

    /// The whole id as an owned, stack-allocated string.
    pub fn as_str(&self) -> IdText {
        let mut text = IdText {
            buf: [0; SESSION_ID_MAX_LEN],
            len: 0,
        };
        text.len = self.write_to(&mut text.buf).len() as u8;
        text
    }

    /// A fast 64-bit hash of the characters: word-at-a-time multiply-xor over the
    /// zero-padded buffer, then a final avalanche so that every output bit depends on every
    /// input bit. Not keyed: tables hash ids minted from the driver's own randomness, so no
    /// caller can choose colliding keys.
    pub(crate) fn hash64(&self) -> u64 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut h = u64::from(self.len);
        let words = usize::from(self.len).div_ceil(8);
        for chunk in self.chars.chunks_exact(8).take(words) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^ (h >> 33)
    }

    /// The ULID inside the id, when the suffix is one (26 characters, in range).
    pub fn ulid(&self) -> Option<ulid::Ulid> {
        if usize::from(self.len) != ulid::ULID_LEN {
            return None;
        }
        ulid::Ulid::from_string(self.suffix()).ok()
    }
}

/// A session id's text, held on the stack (see [`SessionId::as_str`]).
#[derive(Clone, Copy)]
pub struct IdText {
    buf: [u8; SESSION_ID_MAX_LEN],
    len: u8,
}

impl core::ops::Deref for IdText {
    type Target = str;
    fn deref(&self) -> &str {
        core::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl PartialEq<&str> for IdText {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl fmt::Debug for IdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Hash for SessionId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // One write of the meaningful bytes: hashers that take words at a time stay fast.
        state.write(&self.chars[..usize::from(self.len)]);
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SESSION_ID_PREFIX)?;
        f.write_str(self.suffix())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl core::str::FromStr for SessionId {
    type Err = SessionIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionId::parse(s)
    }
}

impl serde::Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; SESSION_ID_MAX_LEN];
        serializer.serialize_str(self.write_to(&mut buf))
    }
}

impl<'de> serde::Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SessionId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a session id: \"sess_\" followed by 1 to 64 Crockford base32 characters",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SessionId, E> {
                SessionId::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example_is_well_formed() {
        let id = SessionId::parse("sess_01H3Z8G9YR3K2N5M6P7Q8W4T").unwrap();
        assert_eq!(id.suffix(), "01H3Z8G9YR3K2N5M6P7Q8W4T");
        assert_eq!(id.as_str(), "sess_01H3Z8G9YR3K2N5M6P7Q8W4T");
        // 24 characters: well-formed, but not a ULID.
        assert_eq!(id.ulid(), None);
    }

    #[test]
    fn new_ids_are_ulids_of_the_injected_parts() {
        let now = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
        let id = SessionId::from_ulid_parts(now, 0x1234_5678_9abc_def0_1234);
        assert_eq!(id.suffix().len(), 26);
        assert_eq!(id.as_str().len(), 31);
        let ulid = id.ulid().unwrap();
        assert_eq!(ulid.timestamp_ms(), now.as_millis());
        assert_eq!(ulid.random(), 0x1234_5678_9abc_def0_1234);
        assert_eq!(SessionId::parse(&id.as_str()).unwrap(), id);
        // Later ids sort later.
        let later =
            SessionId::from_ulid_parts(now.saturating_add(core::time::Duration::from_millis(1)), 0);
        assert!(later > id);
    }

    #[test]
    fn lengths() {
        assert!(SessionId::parse("sess_0").is_ok());
        const ALPHABET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let max = std::format!("sess_{ALPHABET}{ALPHABET}");
        assert_eq!(max.len(), 5 + 64);
        assert_eq!(SessionId::parse(&max).unwrap().as_str(), max.as_str());
        let too_long = std::format!("{max}0");
        assert_eq!(SessionId::parse(&too_long), Err(SessionIdError::TooLong));
        assert_eq!(SessionId::parse("sess_"), Err(SessionIdError::Empty));
    }

    #[test]
    fn malformed_ids_are_errors() {
        assert_eq!(SessionId::parse(""), Err(SessionIdError::MissingPrefix));
        assert_eq!(
            SessionId::parse("01H3Z8G9"),
            Err(SessionIdError::MissingPrefix)
        );
        assert_eq!(
            SessionId::parse("SESS_01H3"),
            Err(SessionIdError::MissingPrefix)
        );
        assert_eq!(
            SessionId::parse("session_01H3"),
            Err(SessionIdError::MissingPrefix)
        );
        for (bad, at) in [
            ("sess_01h3", 7),
            ("sess_I", 5),
            ("sess_L", 5),
            ("sess_O", 5),
            ("sess_U", 5),
            ("sess_01-3", 7),
            ("sess_01 ", 7),
            ("sess_0é", 6),
            ("sess_sess_1", 5),
            ("sess_0\0", 6),
        ] {
            assert_eq!(
                SessionId::parse(bad),
                Err(SessionIdError::InvalidCharacter { at }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serde_is_the_string() {
        let id = SessionId::parse("sess_01H3Z8G9YR3K2N5M6P7Q8W4T").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"sess_01H3Z8G9YR3K2N5M6P7Q8W4T\""
        );
        assert_eq!(
            serde_json::from_str::<SessionId>("\"sess_01H3Z8G9YR3K2N5M6P7Q8W4T\"").unwrap(),
            id
        );
        assert!(serde_json::from_str::<SessionId>("\"sess_oops\"").is_err());
        assert!(serde_json::from_str::<SessionId>("42").is_err());
    }
}
