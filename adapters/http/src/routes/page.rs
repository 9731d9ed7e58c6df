//! The live page (`GET /ui`, feature `live-page`): an HTML page over
//! [`GET /v1/overview`](super::overview::get_overview), its files compiled into the router.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};

/// The page's files, embedded: no build step, no CDN, works offline.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/app.css"),
    ),
];

/// Only the page's own files, scripts and connections; no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::REFERRER_POLICY, "no-referrer"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError::new(ErrorCode::NotFound, "no such file of the live page").into_response(),
    }
}

/// The live page. It asks for a key (or takes one from the URL fragment, `#key=...`,
/// which never reaches a server) and keeps it for the browser tab only.
pub async fn page() -> Response {
    asset("")
}

/// `/ui/` sends the browser to the page (relative, so that a path prefix of a proxy in
/// front is kept; the URL fragment with a key survives the redirect; 303, so that no
/// browser keeps it for good).
pub async fn page_with_slash() -> Response {
    axum::response::Redirect::to("../ui").into_response()
}

/// The live page's script and style.
pub async fn page_asset(Path(name): Path<String>) -> Response {
    asset(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_and_the_page_loads_only_its_own() {
        for (name, _, body) in ASSETS {
            assert!(!body.is_empty(), "{name}");
            // The SVG namespace is a name, not a place anything is loaded from.
            let text = body.replace("http://www.w3.org/2000/svg", "");
            for outside in ["http://", "https://", "//cdn", "@import"] {
                assert!(
                    !text.contains(outside),
                    "{name} must not load anything from elsewhere ({outside})"
                );
            }
        }
    }
}
