//! The HTTP server (actix-web): the only room that knows HTTP.
//!
//! It owns routing, request parsing and limits, the OpenAI schema ([`openai`]) and its Responses
//! API ([`responses`]), the VQA form
//! ([`vqa`]), admin reloads ([`admin`]), health, readiness and metrics ([`health`]), the question page ([`page`]), and the
//! mapping of every error to a status and an OpenAI error body ([`errors`]). Generation goes
//! through the [`crate::scheduler`], which owns the models.

mod admin;
mod app;
pub mod errors;
mod health;
mod hosts;
mod openai;
mod page;
mod request;
mod response_cache;
mod responses;
mod tools;
mod vqa;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, Settings};
use crate::preprocess::ImageLimits;
use crate::scheduler::{Metrics, Scheduler, SchedulerError};

pub use app::run;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
}

/// Re-reads the configuration for a reload (the same layers and flags as at start).
pub type ReloadSettings = Arc<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// What handlers share.
pub struct AppState {
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    pub image_limits: ImageLimits,
    pub decoding: request::Decoding,
    pub max_images: usize,
    pub body_limits: request::BodyLimits,
    pub hosts: hosts::AllowedHosts,
    /// `server.session_header`, when set.
    pub session_header: Option<String>,
    pub default_max_tokens: usize,
    pub default_temperature: f32,
    /// `server.expose_cache_hits`.
    pub expose_cache_hits: bool,
    /// `server.response_cache_mb`, when on.
    pub response_cache: Option<Arc<response_cache::ResponseCache>>,
    pub request_timeout: Option<Duration>,
    pub admin_token: Option<String>,
    pub reload_settings: ReloadSettings,
    /// Set when `server.remote_image_hosts` allows some.
    pub remote_images: Option<Arc<request::RemoteImages>>,
}
