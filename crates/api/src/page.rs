//! `GET /`: one small static page (no build step) that shows a tenant's recent events, a live
//! tail and charts, using the same API and token as any other client. The token is typed in
//! (or passed in the URL fragment, which browsers never send to the server) and kept in the
//! tab's `sessionStorage`; the live tail is read with `fetch`, not `EventSource`, so the token
//! travels in the `Authorization` header and never in a URL.

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;

const PAGE: &str = include_str!("../static/index.html");

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/", get(page))
}

async fn page() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
            // Only this page's own script and the API on the same origin.
            (
                CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
}
