//! Settings in layers: `config/default.toml` (compiled in), the user's file, environment
//! variables `VLMSERVE__SECTION__KEY`, then command-line flags; and their validation.
//! Settings become engine options here, so nothing below knows about files or flags.

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

use crate::engine::{GraphChoice, ModelOptions};
use crate::package::{Graph, Precision};
use crate::runtime::{CpuOptions, GraphOptions, Provider};

/// The defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A configuration problem, naming the key where possible.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("configuration: no model named {name:?}; configured: {known}")]
    UnknownModel { name: String, known: String },
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub runtime: RuntimeSettings,
    #[serde(default)]
    pub models: Vec<ModelSettings>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    pub onnxruntime_library: Option<PathBuf>,
}

/// One model as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "fp32")]
    pub precision: Precision,
    #[serde(default = "cpu_only")]
    pub providers: Vec<Provider>,
    #[serde(default)]
    pub fallback_to_cpu: bool,
    #[serde(default = "full_optimization")]
    pub optimization_level: u8,
    #[serde(default)]
    pub graphs: GraphOverrides,
}

/// Per-graph settings that replace the model-wide ones.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GraphOverrides {
    pub vision_encoder: Option<GraphSettings>,
    pub embed_tokens: Option<GraphSettings>,
    pub decoder: Option<GraphSettings>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    pub precision: Option<Precision>,
    pub providers: Option<Vec<Provider>>,
    pub fallback_to_cpu: Option<bool>,
    pub optimization_level: Option<u8>,
}

fn fp32() -> Precision {
    Precision::Fp32
}

fn cpu_only() -> Vec<Provider> {
    vec![Provider::Cpu(CpuOptions::default())]
}

fn full_optimization() -> u8 {
    3
}

impl Settings {
    /// Defaults, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid(format!("file {} not found", file.display())));
            }
            builder = builder.add_source(File::from(file).required(true));
        }
        let env = Environment::with_prefix("VLMSERVE").prefix_separator("__").separator("__").try_parsing(true);
        let settings: Settings = builder
            .add_source(env)
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, model) in self.models.iter().enumerate() {
            if model.name.trim().is_empty() {
                return Err(ConfigError::Invalid(format!("models[{i}].name is empty")));
            }
            if self.models[..i].iter().any(|m| m.name == model.name) {
                return Err(ConfigError::Invalid(format!("models[{i}].name {:?} is used twice", model.name)));
            }
            if model.providers.is_empty() {
                return Err(ConfigError::Invalid(format!("models[{i}].providers is empty")));
            }
        }
        Ok(())
    }

    /// A configured model by name, or a package folder with the first model's settings
    /// (or the defaults) applied to it.
    pub fn model(&self, name_or_path: &str) -> Result<ModelSettings, ConfigError> {
        if let Some(model) = self.models.iter().find(|m| m.name == name_or_path) {
            return Ok(model.clone());
        }
        let path = Path::new(name_or_path);
        if path.is_dir() {
            return Ok(ModelSettings::for_path(path));
        }
        let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        Err(ConfigError::UnknownModel { name: name_or_path.into(), known: known.join(", ") })
    }

    /// Engine options for `model`, with the runtime settings folded in.
    pub fn model_options(&self, model: &ModelSettings) -> ModelOptions {
        let choice = |graph: Graph| model.graph_choice(graph);
        ModelOptions {
            precision: model.precision,
            vision_encoder: choice(Graph::VisionEncoder),
            embed_tokens: choice(Graph::EmbedTokens),
            decoder: choice(Graph::Decoder),
            onnxruntime_library: self.runtime.onnxruntime_library.clone(),
        }
    }
}

impl ModelSettings {
    /// Defaults for a package folder given on the command line.
    pub fn for_path(path: &Path) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Self {
            name,
            path: path.to_path_buf(),
            precision: fp32(),
            providers: cpu_only(),
            fallback_to_cpu: false,
            optimization_level: full_optimization(),
            graphs: GraphOverrides::default(),
        }
    }

    fn graph_choice(&self, graph: Graph) -> GraphChoice {
        let own = match graph {
            Graph::VisionEncoder => &self.graphs.vision_encoder,
            Graph::EmbedTokens => &self.graphs.embed_tokens,
            Graph::Decoder => &self.graphs.decoder,
        };
        let own = own.clone().unwrap_or_default();
        GraphChoice {
            precision: own.precision,
            options: GraphOptions {
                providers: own.providers.unwrap_or_else(|| self.providers.clone()),
                fallback_to_cpu: own.fallback_to_cpu.unwrap_or(self.fallback_to_cpu),
                optimization_level: own.optimization_level.unwrap_or(self.optimization_level),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Settings, String> {
        Config::builder()
            .add_source(File::from_str(toml, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize::<Settings>)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_parse_and_name_a_model() {
        let settings = parse(DEFAULT_TOML).unwrap();
        assert_eq!(settings.models.len(), 1);
        assert_eq!(settings.models[0].precision, Precision::Fp32);
        assert_eq!(settings.models[0].providers, cpu_only());
    }

    #[test]
    fn per_graph_overrides_replace_model_settings() {
        let settings = parse(
            r#"
            [[models]]
            name = "m"
            path = "x"
            precision = "int8"
            providers = [{ kind = "cuda", device_id = 0 }]
            [models.graphs.vision_encoder]
            precision = "fp16"
            providers = [{ kind = "cuda", device_id = 1 }]
            "#,
        )
        .unwrap();
        let options = settings.model_options(&settings.models[0]);
        assert_eq!(options.precision_of(Graph::VisionEncoder), Precision::Fp16);
        assert_eq!(options.precision_of(Graph::Decoder), Precision::Int8);
        let device = |g: Graph| match &options.graph(g).options.providers[0] {
            Provider::Cuda(c) => c.device_id,
            other => panic!("{other:?}"),
        };
        assert_eq!((device(Graph::VisionEncoder), device(Graph::Decoder)), (1, 0));
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = parse("[[models]]\nname = \"m\"\npath = \"x\"\nprecison = \"fp16\"\n").unwrap_err();
        assert!(unknown.contains("precison"), "{unknown}");
        let bad = parse("[[models]]\nname = \"m\"\npath = \"x\"\nprecision = \"int3\"\n").unwrap_err();
        assert!(bad.contains("int3"), "{bad}");
        let provider = parse("[[models]]\nname = \"m\"\npath = \"x\"\nproviders = [{ kind = \"tpu\" }]\n").unwrap_err();
        assert!(provider.contains("tpu"), "{provider}");
    }
}
