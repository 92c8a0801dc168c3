//! `POST /admin/models/{name}/reload`: re-read the configuration and the model's files and swap
//! the new version in atomically. Needs `Authorization: Bearer <server.admin_token>`; the route
//! exists only when a token is configured.

use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;

use super::AppState;
use super::errors::ApiError;

pub async fn reload(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let name = path.into_inner();
    state.scheduler.check_model(&name)?;
    let reload_settings = state.reload_settings.clone();
    let scheduler = state.scheduler.clone();
    tracing::info!(model = %name, "reload requested");
    let status = web::block(move || {
        let settings =
            reload_settings().map_err(|e| ApiError::invalid(e.to_string()).with_code("invalid_configuration"))?;
        let Some(model) = settings.models.iter().find(|m| m.name == name).cloned() else {
            return Err(ApiError::not_found(format!("model {name:?} is no longer in the configuration"))
                .with_code("model_not_found"));
        };
        let options = settings.model_options(&model);
        scheduler.reload(&name, model, &options).map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::internal(format!("reload was interrupted: {e}")))?
    .inspect_err(|e| tracing::warn!("reload failed: {}", e.message))?;
    Ok(HttpResponse::Ok().json(json!({
        "model": status.name,
        "state": status.state.as_str(),
        "version": status.version,
        "precision": status.precision,
    })))
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::not_found("admin routes are disabled"));
    };
    // The scheme is case-insensitive (RFC 9110), the token is not.
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token));
    match given {
        Some(token) if constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("invalid admin token")),
        None => Err(ApiError::unauthorized("missing Authorization: Bearer token")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
