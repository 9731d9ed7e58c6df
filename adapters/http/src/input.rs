//! What a client sends, parsed and checked: the session id of a path, the create body,
//! the listing query. Each limit here is also stated in the OpenAPI document (a test in
//! `doc.rs` holds them equal).

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::Deserialize;
use session_lifecycle::{SessionId, Status};
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorCode};
use crate::views::{CreateRequest, StatusView, json_object};

/// Most header fields a request may have (answered `431 headers_too_large` past it).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header names and values a request may have (`431 headers_too_large`).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Longest metadata document accepted, serialized.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest room name accepted, in characters.
pub const MAX_ROOM_NAME: usize = 128;
/// Longest session a client may ask for, in seconds (a week; the plan's limit caps it).
pub const MAX_DURATION_SECS: u64 = 604_800;
/// Most GPU memory a session may ask for, in MiB (1 TiB).
pub const MAX_GPU_MEMORY_MIB: u64 = 1 << 20;
/// Highest GPU index a session may ask for.
pub const MAX_GPU_DEVICE: u32 = 1023;
/// Longest timeout a session may set for itself, in milliseconds (a week; the plan's
/// limits are tighter).
pub const MAX_TIMEOUT_MS: u64 = 604_800_000;
/// Default page of a listing.
pub const DEFAULT_PAGE: u32 = 20;
/// Largest page of a listing.
pub const MAX_PAGE: u32 = 100;

/// Parses a path's session id: `sess_` + 1 to 64 Crockford base32 characters.
pub fn session_id(text: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(text).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidSessionId,
            format!("invalid session id: {e}"),
        )
    })
}

/// The error for a body that could not be read: 413 past the limit, else 400.
pub fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body too large")
    } else {
        ApiError::invalid(format!("cannot read the request body: {e}"))
    }
}

/// Whether a body holds nothing but JSON whitespace (RFC 8259: space, tab, LF, CR), so
/// that it stands for "no body". Form feed and the rest of ASCII whitespace are not JSON
/// and make the body invalid.
pub fn is_blank(body: &[u8]) -> bool {
    body.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Parses and checks a create body: absent, blank or `null` means every default.
pub fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    if is_blank(body) {
        return Ok(CreateRequest::default());
    }
    let invalid = |e: serde_json::Error| ApiError::invalid(format!("invalid JSON body: {e}"));
    let mut json = serde_json::Deserializer::from_slice(body);
    let request: Option<CreateRequest> = json_object(&mut json).map_err(invalid)?;
    json.end().map_err(invalid)?;
    let request = request.unwrap_or_default();
    if request
        .duration_secs
        .is_some_and(|d| d == 0 || d > MAX_DURATION_SECS)
    {
        return Err(ApiError::invalid(format!(
            "duration_secs must be between 1 and {MAX_DURATION_SECS}"
        )));
    }
    if let Some(room) = &request.room {
        let chars = room.name.chars().count();
        if chars == 0 || chars > MAX_ROOM_NAME {
            return Err(ApiError::invalid(format!(
                "room.name must have 1 to {MAX_ROOM_NAME} characters"
            )));
        }
        if room.name.chars().any(|c| c.is_ascii_control()) {
            return Err(ApiError::invalid(
                "room.name must not contain control characters",
            ));
        }
    }
    if request
        .gpu_memory_mib
        .is_some_and(|m| m == 0 || m > MAX_GPU_MEMORY_MIB)
    {
        return Err(ApiError::invalid(format!(
            "gpu_memory_mib must be between 1 and {MAX_GPU_MEMORY_MIB}"
        )));
    }
    if request.gpu_device.is_some_and(|d| d > MAX_GPU_DEVICE) {
        return Err(ApiError::invalid(format!(
            "gpu_device must be between 0 and {MAX_GPU_DEVICE}"
        )));
    }
    if let Some(t) = &request.timeouts {
        for (name, value) in [
            ("participant_left_timeout_ms", t.participant_left_timeout_ms),
            (
                "participant_absent_timeout_ms",
                t.participant_absent_timeout_ms,
            ),
            ("websocket_grace_ms", t.websocket_grace_ms),
        ] {
            if value.is_some_and(|v| v > MAX_TIMEOUT_MS) {
                return Err(ApiError::invalid(format!(
                    "timeouts.{name} must be between 0 and {MAX_TIMEOUT_MS}"
                )));
            }
        }
    }
    if let Some(m) = &request.metadata {
        let size = serde_json::to_vec(m).map_or(usize::MAX, |v| v.len());
        if size > MAX_METADATA_BYTES {
            return Err(ApiError::invalid(format!(
                "metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"
            )));
        }
    }
    Ok(request)
}

/// A page size as a query string gives it: digits only (`+5` is not an integer in the
/// document's sense), 1 to `max`; `default` when absent.
pub fn page_limit(text: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) && (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "limit must be an integer from 1 to {max}"
            ))),
        },
    }
}

/// Listing parameters, as the query string gives them (checked by [`ListParams::check`]).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only sessions with this status.
    #[param(value_type = Option<StatusView>)]
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^sess_[0-9A-HJKMNP-TV-Z]{1,64}$")]
    pub cursor: Option<String>,
}

/// A checked listing query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    /// Only sessions with this status.
    pub status: Option<Status>,
    /// Page size.
    pub limit: u32,
    /// Sessions older than this one.
    pub before: Option<SessionId>,
}

impl ListParams {
    /// Checks the parameters.
    pub fn check(&self) -> Result<ListQuery, ApiError> {
        let status = match self.status.as_deref() {
            None => None,
            Some("started") => Some(Status::Started),
            Some("ended") => Some(Status::Ended),
            Some(_) => return Err(ApiError::invalid("status must be started or ended")),
        };
        let limit = page_limit(self.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
        let before = match self.cursor.as_deref() {
            None => None,
            Some(c) => Some(SessionId::parse(c).map_err(|_| ApiError::invalid("invalid cursor"))?),
        };
        Ok(ListQuery {
            status,
            limit,
            before,
        })
    }
}

/// The answer to a request with more than [`MAX_HEADERS`] header fields, or more than
/// [`MAX_HEADER_BYTES`] of names and values: `431 headers_too_large` with the JSON error
/// body, before anything reads it (`observe` asks first). `None`: the headers pass.
pub fn headers_too_large(headers: &axum::http::HeaderMap) -> Option<ApiError> {
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES).then(|| {
        ApiError::new(
            ErrorCode::HeadersTooLarge,
            format!(
                "request headers too large: {} fields, {bytes} bytes (at most {MAX_HEADERS} fields, {MAX_HEADER_BYTES} bytes)",
                headers.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_within_the_limits_pass_and_others_do_not() {
        for ok in [
            "",
            "  ",
            " \t\r\n",
            "null",
            "{}",
            "{\"duration_secs\": 604800, \"gpu_device\": 1023, \"gpu_memory_mib\": 1048576}",
            "{\"room\": {\"provider\": \"daily\", \"name\": \"é\"}, \"metadata\": {\"a\": [1]}}",
            "{\"room\": null, \"metadata\": null}",
            "{\"gpu_memory_mib\": 1041.0, \"duration_secs\": 1e3, \"gpu_device\": null}",
            "{\"timeouts\": {\"websocket_grace_ms\": 1000}}",
            "{\"timeouts\": null}",
        ] {
            assert!(parse_create(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            // Form feed and vertical tab are ASCII whitespace but not JSON's.
            "\x0c",
            " \x0b ",
            "\x0cnull",
            "[]",
            // Arrays are not objects, though serde would fill a struct from one.
            "[60]",
            "{\"timeouts\": [null, null]}",
            "{\"timeouts\": [1000]}",
            "{\"room\": [\"daily\", \"a\"]}",
            "{} {}",
            "{\"timeouts\": {\"websocket_grace_ms\": 1, \"extra\": 1}}",
            // A key given twice is refused, at every level.
            "{\"duration_secs\": 1, \"duration_secs\": 2}",
            "{\"room\": {\"provider\": \"daily\", \"provider\": \"livekit\", \"name\": \"a\"}}",
            "{\"timeouts\": {\"websocket_grace_ms\": 1, \"websocket_grace_ms\": 2}}",
            "{\"duration_secs\": 604801}",
            "{\"room\": {\"provider\": \"daily\", \"name\": \"a\\u0000b\"}}",
            "{\"room\": {\"provider\": \"daily\", \"name\": \"\"}}",
            "{\"gpu_device\": -1}",
            "{\"gpu_device\": 1.5}",
            "{\"duration_secs\": -0.0}",
            "{\"gpu_device\": 4294967296}",
            "{\"duration_secs\": \"60\"}",
        ] {
            let e = parse_create(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidRequest, "{bad}");
        }
        // The error says where.
        let e = parse_create(b"{\"timeouts\": {\"websocket_grace_ms\": \"1\"}}").unwrap_err();
        assert!(e.message().contains("column"), "{e}");
        let long = format!(
            "{{\"room\": {{\"provider\": \"livekit\", \"name\": \"{}\"}}}}",
            "é".repeat(MAX_ROOM_NAME)
        );
        assert!(
            parse_create(long.as_bytes()).is_ok(),
            "characters, not bytes"
        );
    }

    #[test]
    fn list_queries_are_checked() {
        let q = |status: Option<&str>, limit: Option<&str>, cursor: Option<&str>| {
            ListParams {
                status: status.map(str::to_owned),
                limit: limit.map(str::to_owned),
                cursor: cursor.map(str::to_owned),
            }
            .check()
        };
        assert_eq!(q(None, None, None).unwrap().limit, DEFAULT_PAGE);
        assert_eq!(q(Some("ended"), Some("100"), None).unwrap().limit, 100);
        for (status, limit, cursor) in [
            (Some("gone"), None, None),
            (None, Some("0"), None),
            (None, Some("101"), None),
            (None, Some("+5"), None),
            (None, Some(""), None),
            (None, None, Some("sess_")),
        ] {
            assert!(
                q(status, limit, cursor).is_err(),
                "{status:?} {limit:?} {cursor:?}"
            );
        }
    }
}
