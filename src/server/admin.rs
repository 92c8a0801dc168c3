//! Admin routes, with `Authorization: Bearer <server.admin_token>`; they exist only when a
//! token is configured. `POST /admin/models/{name}/reload` re-reads the configuration and the
//! model's (or version's, `name@version`) files and swaps the new revision in atomically.
//! For a model with versions: `PUT .../weights` and `PUT .../shadow` set their shares,
//! `POST .../versions` adds one from files, `DELETE .../versions/{version}` removes one,
//! `POST .../promote` makes one the only version and `POST .../rollback` unloads one.
//! Changes last until a restart; the configuration file is the state at start.

use std::collections::BTreeMap;

use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::errors::ApiError;
use super::{AppState, openai, request};
use crate::config::ModelSettings;
use crate::scheduler::{Scheduler, SchedulerError};

/// `PUT /admin/models/{name}/weights` with `{"stable": 90, "candidate": 10}`: versions not
/// named keep their weights; all change at once or none. Answers the model as `/v1/models`.
pub async fn weights(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change(req, path, payload, state, |scheduler, name, weights: BTreeMap<String, u32>| {
        scheduler.set_weights(name, &weights)
    })
    .await
}

/// `PUT /admin/models/{name}/shadow` with `{"candidate": 50}`: percentages of the other
/// versions' requests each named version runs as a shadow.
pub async fn shadow(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change(req, path, payload, state, |scheduler, name, shares: BTreeMap<String, u8>| {
        scheduler.set_shadow(name, &shares)
    })
    .await
}

/// The version a promotion or a rollback names: `{"version": "candidate"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionChoice {
    version: String,
}

/// `POST /admin/models/{name}/promote`: the version takes every request (its weight stays, or
/// becomes 100 if it was less) and the other versions are removed.
pub async fn promote(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change(req, path, payload, state, |scheduler, name, choice: VersionChoice| {
        tracing::info!(model = %name, version = %choice.version, "promotion");
        scheduler.promote(name, &choice.version)
    })
    .await
}

/// `POST /admin/models/{name}/rollback`: the version takes no more requests and is unloaded
/// (listed as `unloaded` until a reload); refused if it was the only one taking any.
pub async fn rollback(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change(req, path, payload, state, |scheduler, name, choice: VersionChoice| {
        tracing::info!(model = %name, version = %choice.version, "rollback");
        scheduler.rollback(name, &choice.version)
    })
    .await
}

/// An admin change to one model: authorized, its JSON body read as `B` and applied, then the
/// model as `/v1/models` lists it.
async fn change<B: serde::de::DeserializeOwned>(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
    apply: impl FnOnce(&Scheduler, &str, B) -> Result<(), SchedulerError>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let body: B = request::read_json(&req, payload, &state.body_limits).await?;
    let name = path.into_inner();
    apply(&state.scheduler, &name, body)?;
    listing(&name, &state)
}

/// `POST /admin/models/{name}/versions` with a model entry as the configuration writes one,
/// less its name: `{"version": "candidate", "path": "...", "precision": "fp16", "weight": 10}`.
/// Answers once the version is loaded and warmed up (it takes traffic only then): 201 with the
/// model as `/v1/models` lists it, or 422 when its files do not load (nothing changed).
pub async fn add_version(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let mut entry: serde_json::Value = request::read_json(&req, payload, &state.body_limits).await?;
    let name = path.into_inner();
    let Some(fields) = entry.as_object_mut() else {
        return Err(ApiError::invalid("the body must be a JSON object: a model entry without its name"));
    };
    fields.insert("name".into(), name.clone().into());
    let settings: ModelSettings = request::parse_param(entry, "body")?;
    if settings.version.is_none() {
        return Err(ApiError::invalid_param("version", "a new version needs a `version`"));
    }
    settings.check().map_err(ApiError::invalid)?;
    let reload_settings = state.reload_settings.clone();
    let scheduler = state.scheduler.clone();
    let status = web::block(move || {
        let config =
            reload_settings().map_err(|e| ApiError::invalid(e.to_string()).with_code("invalid_configuration"))?;
        let options = config.model_options(&settings);
        scheduler.add_version(settings, &options).map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::internal(format!("adding the version was interrupted: {e}")))??;
    tracing::info!(model = %status.name, "version added by an administrator");
    let models = state.scheduler.models();
    Ok(HttpResponse::Created().json(openai::served_json(&name, &models, &state.metrics.model_counts())))
}

/// `DELETE /admin/models/{name}/versions/{version}`: refused if it is the last version taking
/// requests; its running requests finish.
pub async fn remove_version(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let (name, version) = path.into_inner();
    state.scheduler.remove_version(&name, &version)?;
    listing(&name, &state)
}

fn listing(name: &str, state: &AppState) -> Result<HttpResponse, ApiError> {
    let models = state.scheduler.models();
    Ok(HttpResponse::Ok().json(openai::served_json(name, &models, &state.metrics.model_counts())))
}

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
        let Some(model) = settings.models.iter().find(|m| m.id() == name).cloned() else {
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
        "revision": status.revision,
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
