//! The question page at `GET /`: static files compiled into the binary (no external scripts or
//! fonts), talking to the server only through the public API.

use actix_web::http::header;
use actix_web::{HttpResponse, web};

use super::errors::ApiError;

/// `(name under /page/, content type, bytes)`.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("page/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("page/style.css")),
];

/// `GET /`.
pub async fn index() -> HttpResponse {
    page_response("text/html; charset=utf-8", include_str!("page/index.html"))
}

/// `GET /page/{file}`.
pub async fn asset(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(asset, _, _)| *asset == name)
        .ok_or_else(|| ApiError::not_found(format!("no page file {name:?}")))?;
    Ok(page_response(content_type, body))
}

fn page_response(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        // The files change with the binary: revalidate rather than keep a stale page.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}
