//! The command line: argument parsing and the commands that run the engine from a terminal.
//! Each command is an edge like the HTTP server: it builds engine inputs and prints results.

mod ask;
mod bench;
mod eval;
mod inspect;
pub mod serve;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, ModelSettings, Settings};
use crate::engine::{EngineError, Model};
use crate::family::{Detail, ImageBudget};
use crate::package::Precision;
use crate::preprocess::{ImageLimits, PreprocessError, decode_image};
use image::RgbImage;

/// Errors a command reports to the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    // The cause is the error's source: `main` prints it after the path (not twice).
    #[error("{}", path.display())]
    Image { path: PathBuf, source: PreprocessError },
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("could not write output: {0}")]
    Output(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
}

#[derive(Debug, Parser)]
#[command(name = "vlmserve", version, about = "Serve vision-language models exported to ONNX")]
pub struct Cli {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(long, global = true, env = "VLMSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// ONNX Runtime library (libonnxruntime.so.1.31.1) or its folder.
    #[arg(long, global = true)]
    pub ort_lib: Option<PathBuf>,
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask one question, with images, and print the answer.
    Ask(ask::AskArgs),
    /// Describe a model package: family, graphs, precisions, tensors, KV layout.
    Inspect(inspect::InspectArgs),
    /// Time one question: time to first token by stage, decode tokens/s, peak memory.
    Bench(bench::BenchArgs),
    /// Score a model on a JSONL set of image questions: VQA accuracy, caption BLEU-4, tokens/s.
    Eval(eval::EvalArgs),
    /// Serve the configured models over HTTP (OpenAI-compatible API, VQA, metrics).
    Serve(serve::ServeArgs),
}

/// Which model and how to load it; shared by the commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Package folder, or the name of a model in the configuration.
    #[arg(long)]
    pub model: String,
    /// Precision of every graph (fp32, fp16, int8, ...); overrides the configuration.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Set an image-processor setting over the package's, as KEY=JSON (repeatable), e.g.
    /// `--processor do_image_splitting=false`.
    #[arg(long = "processor", value_name = "KEY=JSON", value_parser = parse_setting)]
    pub processor: Vec<(String, serde_json::Value)>,
}

/// How much of each image the model sees: the API's per-image budget from the command line.
#[derive(Debug, Clone, Args)]
pub struct ImageBudgetArgs {
    /// As the API's `image_url.detail`: `auto` or `high` (the processor's full budget) or `low`
    /// (the family's cheap rendering).
    #[arg(long, default_value = "auto")]
    pub detail: Detail,
    /// Largest area, in pixels, each image is resized to (the processor settings still cap it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pixels: Option<u64>,
}

impl ImageBudgetArgs {
    /// The same budget for each of `images` images.
    pub fn per_image(&self, images: usize) -> Vec<ImageBudget> {
        vec![ImageBudget { detail: self.detail, max_pixels: self.max_pixels }; images]
    }
}

/// An image file's bytes.
fn read_file(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Io { path: path.to_path_buf(), source })
}

/// An image file's pixels, as a request's would be decoded (default limits).
fn decode_file(path: &Path, bytes: &[u8]) -> Result<RgbImage, CliError> {
    decode_image(bytes, &ImageLimits::default()).map_err(|source| CliError::Image { path: path.to_path_buf(), source })
}

fn read_image(path: &Path) -> Result<RgbImage, CliError> {
    decode_file(path, &read_file(path)?)
}

/// `KEY=JSON`; a value that is not JSON is taken as a string.
fn parse_setting(text: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

impl ModelArgs {
    fn settings(&self, settings: &Settings) -> Result<ModelSettings, CliError> {
        let mut model = settings.model(&self.model)?;
        if let Some(precision) = self.precision {
            model.precision = precision;
            let g = &mut model.graphs;
            for graph in [&mut g.vision_encoder, &mut g.embed_tokens, &mut g.decoder].into_iter().flatten() {
                graph.precision = None;
            }
        }
        Ok(model)
    }

    fn load(&self, settings: &Settings) -> Result<Model, CliError> {
        let model = self.settings(settings)?;
        let mut options = settings.model_options(&model);
        options.processor_overrides.extend(self.processor.iter().cloned());
        Ok(Model::load(&model.path, &options)?)
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(lib) = &cli.ort_lib {
        settings.runtime.onnxruntime_library = Some(lib.clone());
    }
    match cli.command {
        Command::Ask(args) => ask::run(&settings, &args),
        Command::Inspect(args) => inspect::run(&settings, &args),
        Command::Bench(args) => bench::run(&settings, &args),
        Command::Eval(args) => eval::run(&settings, &args),
        Command::Serve(args) => serve::run(settings, cli.config, cli.ort_lib, &args),
    }
}
