//! Standard Webhooks signatures (specification 1.0): `webhook-signature` is
//! `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret, space-separated, so
//! that receivers holding either the old or the new secret verify during a rotation.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing secret: the bytes a `whsec_<base64>` secret stands for.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// It does not start with `whsec_`.
    #[error("a webhook secret starts with whsec_")]
    Prefix,
    /// What follows the prefix is not base64.
    #[error("a webhook secret is whsec_ and base64")]
    Base64,
    /// It decodes to fewer than 24 bytes (the specification asks for 24 to 64).
    #[error("a webhook secret has 24 to 64 bytes (found {0})")]
    Length(usize),
}

impl SigningSecret {
    /// The secret `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<SigningSecret, SecretError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(SecretError::Length(bytes.len()));
        }
        Ok(SigningSecret(bytes))
    }

    /// The signature of one message, `v1,<base64>`.
    fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header of message `id` sent at `timestamp` (seconds since the
/// epoch) with `body`: one signature per secret, space-separated.
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_specifications_example() {
        // The value the reference library (`standardwebhooks` on PyPI) gives for this input.
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343485","type":"contact"}}"#;
        assert_eq!(
            signature_header(
                &[secret],
                "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                1674087231,
                body
            ),
            "v1,YCe3BuIUxksPVfqITYD2oHferCByLp7Cx5XKkD3efOA="
        );
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert_eq!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        );
        assert_eq!(SigningSecret::parse("whsec_!!!"), Err(SecretError::Base64));
        assert_eq!(
            SigningSecret::parse("whsec_AAAA"),
            Err(SecretError::Length(3))
        );
    }
}
