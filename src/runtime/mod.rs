//! ONNX Runtime: finding and loading its library, execution providers, session options.
//!
//! Nothing here knows about models or tokens; [`open_session`] turns a graph file and
//! [`GraphOptions`] into a ready `ort` session.

mod library;
mod providers;

use std::path::Path;
use std::sync::{Mutex, OnceLock};

pub use library::{ORT_VERSION, locate_library, setup_dir};
pub use providers::{CpuOptions, CudaOptions, Provider, TensorRtOptions};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use serde::Deserialize;

/// Errors from loading ONNX Runtime or building sessions.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime {ORT_VERSION} was not found; tried: {tried}. Install it with \
         `bash scripts/setup-ort.sh` (or `pip install onnxruntime=={ORT_VERSION}` and point \
         `--ort-lib` / ORT_DYLIB_PATH at its libonnxruntime.so)"
    )]
    LibraryNotFound { tried: String },
    #[error("could not load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: String, message: String },
    #[error("ONNX Runtime was already initialised from {0}; restart to use another library")]
    AlreadyInitialised(String),
    #[error(
        "execution provider {provider} is not available: {message} (GPU providers need \
         `pip install onnxruntime-gpu=={ORT_VERSION}` with CUDA 13 and cuDNN 9, or \
         `fallback_to_cpu = true`)"
    )]
    ProviderUnavailable { provider: &'static str, message: String },
    #[error("could not load graph {path}: {message}")]
    Session { path: String, message: String },
}

/// How one graph is run: on which providers (in order of preference) and with which options.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GraphOptions {
    /// Execution providers in order of preference; CPU is always the last resort.
    pub providers: Vec<Provider>,
    /// Fall back to CPU (with a warning) when a requested provider cannot be used.
    pub fallback_to_cpu: bool,
    /// ONNX Runtime graph optimization level: 0 (off), 1 (basic), 2 (extended), 3 (all).
    pub optimization_level: u8,
}

impl Default for GraphOptions {
    fn default() -> Self {
        Self { providers: vec![Provider::Cpu(CpuOptions::default())], fallback_to_cpu: false, optimization_level: 3 }
    }
}

static ENVIRONMENT: OnceLock<(Environment, String)> = OnceLock::new();
/// ONNX Runtime allows one environment per process: concurrent first loads must not race.
static INIT: Mutex<()> = Mutex::new(());

/// Load ONNX Runtime once per process from the first library that `locate_library` finds.
/// `explicit` is the `--ort-lib` flag or `runtime.onnxruntime_library` setting.
pub fn init(explicit: Option<&Path>, providers: &[Provider]) -> Result<&'static Environment, RuntimeError> {
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((env, path)) = ENVIRONMENT.get() {
        return match explicit {
            Some(p) if p.to_string_lossy() != path.as_str() => Err(RuntimeError::AlreadyInitialised(path.clone())),
            _ => Ok(env),
        };
    }
    let needs_gpu = providers.iter().any(Provider::is_gpu);
    let path = locate_library(explicit, needs_gpu)?;
    if needs_gpu {
        providers::preload_cuda_libraries(&path);
    }
    let load_err = |message: String| RuntimeError::LibraryLoad { path: path.display().to_string(), message };
    let builder = ort::init_from(&path).map_err(|e| load_err(e.to_string()))?;
    let env = builder.with_name("vlmserve").build().map_err(|e| load_err(e.to_string()))?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    let (env, _) = ENVIRONMENT.get_or_init(|| (env, path.display().to_string()));
    Ok(env)
}

/// Open `path` as a session. A provider that cannot be registered is an error, unless
/// `fallback_to_cpu` is set, in which case the graph runs on CPU with a warning. `spinning`:
/// idle intra-op threads spin (lowest latency for a session that runs call after call, like the
/// decoder) instead of sleeping (for one that runs beside others, like the vision encoder, whose
/// spinning threads would take their cores).
pub fn open_session(
    env: &Environment,
    path: &Path,
    options: &GraphOptions,
    spinning: bool,
) -> Result<Session, RuntimeError> {
    if !path.is_file() {
        return Err(RuntimeError::Session { path: path.display().to_string(), message: "file not found".into() });
    }
    match build_session(env, path, options, &options.providers, spinning) {
        Err(RuntimeError::ProviderUnavailable { provider, message }) if options.fallback_to_cpu => {
            tracing::warn!(provider, %message, graph = %path.display(), "provider unavailable, falling back to CPU");
            let cpu: Vec<Provider> = options.providers.iter().filter(|p| !p.is_gpu()).cloned().collect();
            build_session(env, path, options, &cpu, spinning)
        }
        other => other,
    }
}

fn build_session(
    env: &Environment,
    path: &Path,
    options: &GraphOptions,
    providers: &[Provider],
    spinning: bool,
) -> Result<Session, RuntimeError> {
    let err = |message: String| RuntimeError::Session { path: path.display().to_string(), message };
    let level = match options.optimization_level {
        0 => GraphOptimizationLevel::Disable,
        1 => GraphOptimizationLevel::Level1,
        2 => GraphOptimizationLevel::Level2,
        _ => GraphOptimizationLevel::All,
    };
    let mut builder = Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(level)
        .map_err(|e| err(e.to_string()))?
        .with_intra_op_spinning(spinning)
        .map_err(|e| err(e.to_string()))?;
    let threads = providers.iter().find_map(|p| match p {
        Provider::Cpu(cpu) => cpu.threads,
        _ => None,
    });
    if let Some(threads) = threads {
        builder = builder.with_intra_threads(threads).map_err(|e| err(e.to_string()))?;
    }
    for provider in providers.iter().filter(|p| p.is_gpu()) {
        builder = builder
            .with_execution_providers([provider.dispatch()?])
            .map_err(|e| RuntimeError::ProviderUnavailable { provider: provider.name(), message: e.to_string() })?;
    }
    builder.commit_from_file(path).map_err(|e| err(e.to_string()))
}

impl GraphOptions {
    /// Names of the providers, for display.
    pub fn provider_names(&self) -> Vec<&'static str> {
        self.providers.iter().map(Provider::name).collect()
    }
}
