//! `GET /health` (the process is up), `GET /ready` (every model loaded and warmed up, not
//! shutting down) and `GET /metrics` (Prometheus text format).

use actix_web::HttpResponse;
use actix_web::web;
use serde_json::json;

use super::AppState;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let models: serde_json::Map<String, serde_json::Value> =
        state.scheduler.models().into_iter().map(|m| (m.name, m.state.as_str().into())).collect();
    if state.scheduler.ready() {
        HttpResponse::Ok().json(json!({"status": "ready", "models": models}))
    } else {
        let status = if state.scheduler.is_shutting_down() { "shutting_down" } else { "not_ready" };
        HttpResponse::ServiceUnavailable().json(json!({"status": status, "models": models}))
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Some(cache) = &state.response_cache {
        state.metrics.response_cache_bytes.set(cache.bytes() as i64);
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.metrics.render())
}
