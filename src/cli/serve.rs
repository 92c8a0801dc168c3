//! `vlmserve serve`: the OpenAI-compatible HTTP server. Flags override the configuration.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::CliError;
use crate::config::Settings;
use crate::server;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (server.host).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one (server.port).
    #[arg(long)]
    pub port: Option<u16>,
    /// HTTP worker threads, 0 = one per core (server.http_workers).
    #[arg(long)]
    pub http_workers: Option<usize>,
}

impl ServeArgs {
    fn apply(&self, settings: &mut Settings) {
        if let Some(host) = &self.host {
            settings.server.host = host.clone();
        }
        if let Some(port) = self.port {
            settings.server.port = port;
        }
        if let Some(workers) = self.http_workers {
            settings.server.http_workers = workers;
        }
    }
}

pub fn run(
    mut settings: Settings,
    config: Option<PathBuf>,
    ort_lib: Option<PathBuf>,
    args: &ServeArgs,
) -> Result<(), CliError> {
    args.apply(&mut settings);
    if settings.models.is_empty() {
        return Err(crate::config::ConfigError::Invalid("no [[models]] configured; nothing to serve".into()).into());
    }
    // A reload re-reads the same layers (defaults, file, environment) and flags.
    let reload: server::ReloadSettings = Arc::new(move || {
        let mut settings = Settings::load(config.as_deref())?;
        if let Some(lib) = &ort_lib {
            settings.runtime.onnxruntime_library = Some(lib.clone());
        }
        Ok(settings)
    });
    server::run(settings, reload)?;
    Ok(())
}
