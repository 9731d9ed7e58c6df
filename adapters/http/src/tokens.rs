//! Client tokens: session-scoped credentials a browser uses to open the session's
//! WebSocket, so that API keys never reach browsers.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use session_lifecycle::{SessionId, Timestamp};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks client tokens: session-scoped credentials a browser uses to open the
/// session's WebSocket, so that API keys never reach browsers.
///
/// A token is `v1.<session id>.<expiry, unix seconds>.<base64url HMAC-SHA256>`.
#[derive(Clone)]
pub struct TokenSigner {
    key: [u8; 32],
}

/// Why a client token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this shape.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// For another session.
    #[error("token is for another session")]
    WrongSession,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
}

impl TokenSigner {
    /// A signer with `key`.
    pub fn new(key: [u8; 32]) -> TokenSigner {
        TokenSigner { key }
    }

    /// A signer with a key derived from `secret` (shared by instances behind one load
    /// balancer).
    pub fn from_secret(secret: &str) -> TokenSigner {
        TokenSigner {
            key: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `session`, valid until `expires_at`.
    pub fn sign(&self, session: SessionId, expires_at: Timestamp) -> String {
        let payload = format!("v1.{session}.{}", expires_at.as_secs());
        let tag = self.mac(&payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks `token` for `session` at `now`.
    pub fn verify(
        &self,
        token: &str,
        session: SessionId,
        now: Timestamp,
    ) -> Result<(), TokenError> {
        let (payload, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(payload)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(id), Some(exp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if SessionId::parse(id).map_err(|_| TokenError::Malformed)? != session {
            return Err(TokenError::WrongSession);
        }
        let exp: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
        if now.as_secs() > exp {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use session_lifecycle::{SessionId, Timestamp};

    use super::*;

    #[test]
    fn tokens_are_session_scoped_signed_and_expire() {
        let signer = TokenSigner::new([7; 32]);
        let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
        let id = SessionId::from_ulid_parts(t0, 1);
        let other = SessionId::from_ulid_parts(t0, 2);
        let exp = t0.saturating_add(Duration::from_secs(60));
        let token = signer.sign(id, exp);
        assert_eq!(signer.verify(&token, id, t0), Ok(()));
        assert_eq!(
            signer.verify(&token, other, t0),
            Err(TokenError::WrongSession)
        );
        assert_eq!(
            signer.verify(&token, id, exp.saturating_add(Duration::from_secs(1))),
            Err(TokenError::Expired)
        );
        assert_eq!(
            TokenSigner::new([8; 32]).verify(&token, id, t0),
            Err(TokenError::BadSignature)
        );
        let tampered = token.replacen(&id.to_string(), &other.to_string(), 1);
        assert_eq!(
            signer.verify(&tampered, other, t0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(signer.verify("garbage", id, t0), Err(TokenError::Malformed));
    }
}
