//! Verifying a delivery before anything in it is parsed: LiveKit's HS256 JWT (whose
//! `sha256` claim is the body's digest) and Daily's HMAC-SHA256 of `"{timestamp}.{body}"`.
//! Pure functions of the secrets, the headers, the body and the time.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use session_lifecycle::Timestamp;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::webhooks::secrets::{DailySecret, LivekitKey};

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No secret is configured for this provider.
    #[error("no secret configured for this provider")]
    NotConfigured,
    /// A signature header is missing or malformed.
    #[error("missing or malformed signature")]
    Malformed,
    /// The signature does not match any configured secret.
    #[error("signature does not match")]
    BadSignature,
    /// The signed time is outside the tolerance window.
    #[error("stale or future timestamp")]
    Stale,
    /// The body is not the one that was signed.
    #[error("body does not match its signed digest")]
    BodyMismatch,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(Deserialize)]
struct LivekitClaims {
    iss: Option<String>,
    sha256: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// Verifies a LiveKit delivery; returns the tenant of the key that signed it.
pub fn verify_livekit<'k>(
    keys: &'k [LivekitKey],
    authorization: Option<&str>,
    body: &[u8],
    now: Timestamp,
    tolerance: Duration,
) -> Result<Option<&'k str>, VerifyError> {
    if keys.is_empty() {
        return Err(VerifyError::NotConfigured);
    }
    let token = authorization.ok_or(VerifyError::Malformed)?.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| VerifyError::Malformed)
    };
    let header: JwtHeader =
        serde_json::from_slice(&decode(header)?).map_err(|_| VerifyError::Malformed)?;
    if header.alg != "HS256" {
        return Err(VerifyError::Malformed);
    }
    let claims_json = decode(claims)?;
    let parsed: LivekitClaims =
        serde_json::from_slice(&claims_json).map_err(|_| VerifyError::Malformed)?;
    let signature = decode(signature)?;
    let signed = &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
    let iss = parsed.iss.as_deref().ok_or(VerifyError::Malformed)?;
    let key = keys
        .iter()
        .find(|k| bool::from(k.api_key.as_bytes().ct_eq(iss.as_bytes())))
        .ok_or(VerifyError::BadSignature)?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.api_secret.as_bytes())
        .map_err(|_| VerifyError::NotConfigured)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| VerifyError::BadSignature)?;
    let leeway = tolerance.as_secs();
    let now_secs = now.as_secs();
    if parsed
        .exp
        .is_some_and(|exp| now_secs > exp.saturating_add(leeway))
        || parsed
            .nbf
            .is_some_and(|nbf| now_secs.saturating_add(leeway) < nbf)
    {
        return Err(VerifyError::Stale);
    }
    let digest = STANDARD.encode(Sha256::digest(body));
    let claimed = parsed.sha256.ok_or(VerifyError::BodyMismatch)?;
    if !bool::from(digest.as_bytes().ct_eq(claimed.as_bytes())) {
        return Err(VerifyError::BodyMismatch);
    }
    Ok(key.tenant.as_deref())
}

/// Verifies a Daily delivery; returns the tenant of the secret that signed it.
pub fn verify_daily<'s>(
    secrets: &'s [DailySecret],
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: Timestamp,
    tolerance: Duration,
) -> Result<Option<&'s str>, VerifyError> {
    if secrets.is_empty() {
        return Err(VerifyError::NotConfigured);
    }
    let signature = STANDARD
        .decode(signature.ok_or(VerifyError::Malformed)?.trim())
        .map_err(|_| VerifyError::Malformed)?;
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?.trim();
    let ts: u64 = timestamp.parse().map_err(|_| VerifyError::Malformed)?;
    // Seconds; milliseconds are accepted too.
    let ts_secs = if ts > 100_000_000_000 { ts / 1000 } else { ts };
    let mut matched = None;
    for candidate in secrets {
        let key = STANDARD
            .decode(candidate.secret.trim())
            .unwrap_or_else(|_| candidate.secret.as_bytes().to_vec());
        let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(&key) else {
            continue;
        };
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&signature).is_ok() {
            matched = Some(candidate);
        }
    }
    let secret = matched.ok_or(VerifyError::BadSignature)?;
    if now.as_secs().abs_diff(ts_secs) > tolerance.as_secs() {
        return Err(VerifyError::Stale);
    }
    Ok(secret.tenant.as_deref())
}
