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
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub rollout: RolloutSettings,
}

/// `[rollout]`: the gates that take a candidate version's traffic away automatically, judged
/// over a sliding window against the model's stable version (its largest weight).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSettings {
    /// Off: versions keep their weights whatever they do.
    pub enabled: bool,
    /// The sliding window, in seconds.
    pub window_s: f64,
    /// Ended requests (or compared shadow answers) a version's window needs before a gate judges it.
    pub min_requests: usize,
    /// A candidate fails above this multiple of the stable version's error rate...
    pub max_error_ratio: f64,
    /// ...and above this error rate (so that one error against none is no verdict).
    pub min_error_rate: f64,
    /// A candidate fails above this multiple of the stable version's time-to-first-token p99...
    pub max_ttft_p99_ratio: f64,
    /// ...when that is also this many seconds more (milliseconds of scheduling noise are no
    /// verdict).
    pub min_ttft_p99_increase_s: f64,
    /// A shadow version fails when fewer of its greedy answers than this equal the primary's.
    pub min_shadow_agreement: f64,
    /// How often the gates are checked, in seconds.
    pub check_interval_s: f64,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 300.0,
            min_requests: 20,
            max_error_ratio: 2.0,
            min_error_rate: 0.05,
            max_ttft_p99_ratio: 1.5,
            min_ttft_p99_increase_s: 0.1,
            min_shadow_agreement: 0.9,
            check_interval_s: 1.0,
        }
    }
}

/// `[server]`: the HTTP listener, request limits and the admin API (`vlmserve serve`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// HTTP worker threads; 0 = one per CPU core.
    pub http_workers: usize,
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_image_side: u32,
    /// Memory all requests together may use to decode images, in MiB (from their headers,
    /// before decoding).
    pub image_decode_budget_mb: u64,
    /// How long a request waits for its share of that memory, in seconds (then 429).
    pub image_decode_wait_s: f64,
    /// `max_tokens` when a request gives none (cut to what the context leaves).
    pub default_max_tokens: usize,
    /// `temperature` when a request gives none (OpenAI's default is 1.0).
    pub default_temperature: f32,
    /// Per-request deadline, queueing included; 0 = none.
    pub request_timeout_s: f64,
    /// On SIGTERM: how long `/ready` answers 503 while requests are still accepted, so that a
    /// load balancer stops sending before the listener closes (not on SIGINT).
    pub shutdown_delay_s: f64,
    /// Then: how long running requests may take to finish; those still running end with 503.
    pub shutdown_timeout_s: u64,
    /// Bearer token for `/admin/*`; admin routes are off when unset or empty.
    pub admin_token: Option<String>,
    /// Hosts remote `http(s)` image URLs may name (`example.com`, or `*.example.com` for its
    /// subdomains); empty: remote image URLs are refused.
    pub remote_image_hosts: Vec<String>,
    /// Time limit for fetching one remote image, in seconds.
    pub remote_image_timeout_s: f64,
    /// A model that fails to load at start stops the server (true), or stays `failed` while
    /// the others serve and `/ready` says 503 until a reload fixes it (false).
    pub exit_on_load_failure: bool,
    /// Bytes of request bodies all requests together may hold while they are read and parsed,
    /// in MiB (then 429).
    pub body_bytes_in_flight_mb: u64,
    /// How long a client may take to send its request body, in seconds (then 408).
    pub body_read_timeout_s: f64,
    /// `Host` names the server answers to (`"vlm.example.com"`, `"*.example.com"`, `"*"` for
    /// any); empty: loopback names when bound to a loopback address, else any.
    pub allowed_hosts: Vec<String>,
    /// Say in `/v1/vqa`'s timings whether the image's features came from the shared
    /// image-feature cache: off, since it tells a client whether anyone sent that image before.
    pub expose_cache_hits: bool,
    /// Answers to deterministic requests (greedy, or with a `seed`) kept for identical
    /// requests, in MiB; 0 turns the cache off. Shared by all clients.
    pub response_cache_mb: usize,
    /// How long a kept answer may be replayed, in seconds.
    pub response_cache_ttl_s: f64,
    /// Request header whose value keeps a user on one version of a model with versions (and,
    /// behind a hashing proxy, on one replica); without it, the body's `user` field. Empty: the
    /// `user` field only.
    pub session_header: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            http_workers: 0,
            max_body_bytes: 64 << 20,
            max_images_per_request: 8,
            max_image_bytes: 20 << 20,
            max_image_pixels: 33_554_432,
            max_image_side: 8192,
            image_decode_budget_mb: 1024,
            image_decode_wait_s: 10.0,
            default_max_tokens: 256,
            default_temperature: 0.0,
            request_timeout_s: 300.0,
            shutdown_delay_s: 5.0,
            shutdown_timeout_s: 20,
            admin_token: None,
            remote_image_hosts: Vec::new(),
            remote_image_timeout_s: 10.0,
            exit_on_load_failure: true,
            expose_cache_hits: false,
            response_cache_mb: 0,
            response_cache_ttl_s: 600.0,
            session_header: "x-session-id".into(),
            body_read_timeout_s: 30.0,
            body_bytes_in_flight_mb: 256,
            allowed_hosts: Vec::new(),
        }
    }
}

/// `[scheduler]`: admission control per model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    /// Copies of each model (worker threads with their own sessions), each decoding a batch.
    pub concurrency: usize,
    /// Most sequences one worker decodes together (one decoder call per step for all).
    pub max_batch_size: usize,
    /// KV-cache bytes one worker may hold for its batch (each sequence counted at prompt plus
    /// max_tokens, padded to the longest); requests beyond it wait in the queue. 0 = a quarter
    /// of the machine's memory.
    pub max_kv_bytes: u64,
    /// Most prompt tokens prefilled per step, so that running streams wait at most one chunk.
    pub prefill_chunk_tokens: usize,
    /// Most image tiles through the vision encoder per step, several requests' tiles in one
    /// call; bounds both the pause a large image causes and the encoder's memory.
    pub vision_tiles_per_step: usize,
    /// Requests admitted beyond `concurrency` that wait (while their images are prepared and
    /// in the queue); more are refused with 429.
    pub queue_size: usize,
    /// Seconds sent in `Retry-After` with a 429.
    pub retry_after_s: u64,
    /// Run one short generation per model before reporting ready.
    pub warmup: bool,
    /// Image features kept per model for repeated images, in MiB; 0 turns the cache off.
    pub image_feature_cache_mb: usize,
    /// Keys and values of prompt beginnings kept per model for later prompts that start the
    /// same way (a conversation's next turn, a shared system prompt), in MiB; 0 turns the cache
    /// off. Counted in each worker's `max_kv_bytes`: it gives way to running requests.
    pub prefix_cache_mb: usize,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            concurrency: 1,
            max_batch_size: 8,
            max_kv_bytes: 0,
            prefill_chunk_tokens: 512,
            vision_tiles_per_step: 1,
            queue_size: 32,
            retry_after_s: 1,
            warmup: true,
            image_feature_cache_mb: 256,
            prefix_cache_mb: 512,
        }
    }
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
    /// A version label: entries that share `name` with different versions are one model whose
    /// requests are split between them by `weight`; `model: "name@version"` names one.
    #[serde(default)]
    pub version: Option<String>,
    /// This version's share of its name's requests, relative to the other versions' weights;
    /// 0 = only requests that name it.
    #[serde(default = "full_weight")]
    pub weight: u32,
    /// Percent of the requests its model's other versions answer that this version also runs,
    /// as a shadow: its answer is compared with theirs and discarded. Its workers run at the
    /// lowest CPU priority, so that shadow work never slows the answers clients wait for.
    #[serde(default)]
    pub shadow: u8,
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
    /// Image-processor settings over the package's (`[models.processor]`, e.g.
    /// `do_image_splitting = false` for one tile per image).
    #[serde(default)]
    pub processor: std::collections::BTreeMap<String, serde_json::Value>,
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

fn full_weight() -> u32 {
    100
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
        let bad = |i: usize, why: String| Err(ConfigError::Invalid(format!("models[{i}].{why}")));
        for (i, model) in self.models.iter().enumerate() {
            if let Err(why) = model.check() {
                return bad(i, why);
            }
            let same_name: Vec<&ModelSettings> = self.models.iter().filter(|m| m.name == model.name).collect();
            if same_name.len() > 1 && model.version.is_none() {
                return bad(i, format!("name {:?} is used twice: give each entry a version", model.name));
            }
            if self.models[..i].iter().any(|m| m.id() == model.id()) {
                return bad(i, format!("{:?} is configured twice", model.id()));
            }
            if same_name.iter().all(|m| m.weight == 0) {
                return bad(i, format!("weight: some version of {:?} must have a weight above 0", model.name));
            }
        }
        self.validate_server()
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key} {why}")));
        if server.host.trim().is_empty() {
            return bad("server.host", "is empty");
        }
        if server.max_body_bytes == 0 {
            return bad("server.max_body_bytes", "must be at least 1");
        }
        if (server.body_bytes_in_flight_mb << 20) < server.max_body_bytes as u64 {
            return bad("server.body_bytes_in_flight_mb", "must hold at least one body of max_body_bytes");
        }
        if server.max_image_bytes == 0 || server.max_image_pixels == 0 || server.max_image_side == 0 {
            return bad("server.max_image_bytes/max_image_pixels/max_image_side", "must be at least 1");
        }
        if server.default_max_tokens == 0 {
            return bad("server.default_max_tokens", "must be at least 1");
        }
        if !server.default_temperature.is_finite() || server.default_temperature < 0.0 {
            return bad("server.default_temperature", "must be a finite number >= 0");
        }
        if !server.request_timeout_s.is_finite() || server.request_timeout_s < 0.0 {
            return bad("server.request_timeout_s", "must be a finite number >= 0");
        }
        for (key, seconds) in [
            ("server.remote_image_timeout_s", server.remote_image_timeout_s),
            ("server.body_read_timeout_s", server.body_read_timeout_s),
            ("server.image_decode_wait_s", server.image_decode_wait_s),
        ] {
            if !seconds.is_finite() || seconds <= 0.0 {
                return bad(key, "must be a finite number > 0");
            }
        }
        if !server.shutdown_delay_s.is_finite() || server.shutdown_delay_s < 0.0 {
            return bad("server.shutdown_delay_s", "must be a finite number >= 0");
        }
        for (key, hosts) in
            [("server.remote_image_hosts", &server.remote_image_hosts), ("server.allowed_hosts", &server.allowed_hosts)]
        {
            if hosts.iter().any(|h| h.trim().is_empty() || h.contains('/')) {
                return bad(key, "entries must be host names like \"example.com\" or \"*.example.com\"");
            }
        }
        let rollout = &self.rollout;
        for (key, value) in [
            ("rollout.window_s", rollout.window_s),
            ("rollout.check_interval_s", rollout.check_interval_s),
            ("rollout.max_error_ratio", rollout.max_error_ratio),
            ("rollout.max_ttft_p99_ratio", rollout.max_ttft_p99_ratio),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return bad(key, "must be a finite number > 0");
            }
        }
        for (key, value) in [
            ("rollout.min_error_rate", rollout.min_error_rate),
            ("rollout.min_shadow_agreement", rollout.min_shadow_agreement),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(key, "must be a fraction from 0 to 1");
            }
        }
        if !rollout.min_ttft_p99_increase_s.is_finite() || rollout.min_ttft_p99_increase_s < 0.0 {
            return bad("rollout.min_ttft_p99_increase_s", "must be a finite number >= 0");
        }
        if self.scheduler.concurrency == 0 {
            return bad("scheduler.concurrency", "must be at least 1");
        }
        if self.scheduler.max_batch_size == 0 {
            return bad("scheduler.max_batch_size", "must be at least 1");
        }
        if self.scheduler.prefill_chunk_tokens == 0 {
            return bad("scheduler.prefill_chunk_tokens", "must be at least 1");
        }
        if self.scheduler.vision_tiles_per_step == 0 {
            return bad("scheduler.vision_tiles_per_step", "must be at least 1");
        }
        Ok(())
    }

    /// A configured model by name, or a package folder with the first model's settings
    /// (or the defaults) applied to it.
    pub fn model(&self, name_or_path: &str) -> Result<ModelSettings, ConfigError> {
        let by_id = self.models.iter().find(|m| m.id() == name_or_path);
        if let Some(model) = by_id.or_else(|| self.models.iter().find(|m| m.name == name_or_path)) {
            return Ok(model.clone());
        }
        let path = Path::new(name_or_path);
        if path.is_dir() {
            return Ok(ModelSettings::for_path(path));
        }
        let known: Vec<String> = self.models.iter().map(ModelSettings::id).collect();
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
            processor_overrides: model.processor.clone().into_iter().collect(),
            background: model.shadow > 0,
        }
    }
}

impl ModelSettings {
    /// What one entry must be on its own, whatever the others are: the reason, naming the key.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.name.contains('@') {
            return Err(format!("name {:?} must be non-empty and without '@'", self.name));
        }
        if let Some(version) = &self.version
            && (version.trim().is_empty() || version.contains(['@', '/']))
        {
            return Err(format!("version {version:?} must be non-empty and without '@' or '/'"));
        }
        if self.shadow > 100 || (self.shadow > 0 && self.version.is_none()) {
            return Err("shadow: a percentage from 0 to 100, for a model's version".into());
        }
        if self.providers.is_empty() {
            return Err("providers is empty".into());
        }
        Ok(())
    }

    /// What names this entry alone: `name@version`, or the name of an unversioned model.
    pub fn id(&self) -> String {
        match &self.version {
            Some(version) => format!("{}@{version}", self.name),
            None => self.name.clone(),
        }
    }

    /// Defaults for a package folder given on the command line.
    pub fn for_path(path: &Path) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Self {
            name,
            version: None,
            weight: full_weight(),
            shadow: 0,
            path: path.to_path_buf(),
            precision: fp32(),
            providers: cpu_only(),
            fallback_to_cpu: false,
            optimization_level: full_optimization(),
            graphs: GraphOverrides::default(),
            processor: Default::default(),
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

    /// deploy/k8s mounts these files as the server's configuration.
    #[test]
    fn the_deployment_configurations_load() {
        for file in ["base", "overlays/cpu", "overlays/gpu"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s").join(file).join("config.toml");
            let settings = Settings::load(Some(&path)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!((settings.server.host.as_str(), settings.server.port), ("0.0.0.0", 8080), "{file}");
            assert!(!settings.models.is_empty(), "{file}");
        }
    }

    #[test]
    fn defaults_parse_and_name_the_embedded_model_at_each_precision() {
        let settings = parse(DEFAULT_TOML).unwrap();
        let models: Vec<_> = settings.models.iter().map(|m| (m.name.as_str(), m.precision)).collect();
        assert_eq!(
            models,
            [
                ("shapes-vlm", Precision::Fp32),
                ("shapes-vlm-fp16", Precision::Fp16),
                ("shapes-vlm-int8", Precision::Int8)
            ]
        );
        for model in &settings.models {
            assert_eq!(model.path, Path::new("models/shapes-vlm/package"));
            assert_eq!(model.providers, cpu_only());
        }
        assert_eq!(settings.scheduler.image_feature_cache_mb, 256);
        assert_eq!((settings.scheduler.max_batch_size, settings.scheduler.prefill_chunk_tokens), (8, 512));
    }

    #[test]
    fn a_models_processor_table_becomes_processor_overrides() {
        let settings =
            parse("[[models]]\nname = \"m\"\npath = \"p\"\n[models.processor]\ndo_image_splitting = false\n").unwrap();
        let options = settings.model_options(&settings.models[0]);
        assert_eq!(options.processor_overrides, [("do_image_splitting".to_string(), serde_json::Value::Bool(false))]);
        let zero = parse("[scheduler]\nmax_batch_size = 0\n").unwrap();
        assert!(zero.validate().unwrap_err().to_string().contains("scheduler.max_batch_size"));
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
    fn server_and_scheduler_defaults_and_checks() {
        let settings = parse(DEFAULT_TOML).unwrap();
        assert_eq!((settings.server.host.as_str(), settings.server.port), ("127.0.0.1", 8080));
        assert!(settings.server.admin_token.is_none());
        assert_eq!(settings.scheduler.concurrency, 1);
        settings.validate().unwrap();
        let zero = parse("[scheduler]\nconcurrency = 0\n").unwrap();
        assert!(zero.validate().unwrap_err().to_string().contains("scheduler.concurrency"));
        let unknown = parse("[server]\nprot = 1\n").unwrap_err();
        assert!(unknown.contains("prot"), "{unknown}");
    }

    #[test]
    fn versions_of_a_model_are_checked_together() {
        let entry = |version: &str, extra: &str| format!("[[models]]\nname = \"m\"\npath = \"x\"\n{version}{extra}\n");
        let two =
            parse(&(entry("version = \"a\"\n", "weight = 90") + &entry("version = \"b\"\n", "shadow = 20"))).unwrap();
        two.validate().unwrap();
        assert_eq!(two.models.iter().map(ModelSettings::id).collect::<Vec<_>>(), ["m@a", "m@b"]);
        assert_eq!((two.models[0].weight, two.models[1].weight, two.models[1].shadow), (90, 100, 20));
        assert_eq!(two.model("m@b").unwrap().version.as_deref(), Some("b"));
        let invalid = |toml: String| parse(&toml).unwrap().validate().unwrap_err().to_string();
        assert!(invalid(entry("", "") + &entry("version = \"b\"\n", "")).contains("give each entry a version"));
        assert!(invalid(entry("version = \"a\"\n", "") + &entry("version = \"a\"\n", "")).contains("twice"));
        let zero = entry("version = \"a\"\n", "weight = 0") + &entry("version = \"b\"\n", "weight = 0");
        assert!(invalid(zero).contains("weight above 0"));
        assert!(invalid(entry("version = \"a@b\"\n", "")).contains("without '@'"));
        assert!(invalid(entry("version = \"a\"\n", "shadow = 101")).contains("shadow"));
        assert!(invalid(entry("", "shadow = 10")).contains("shadow"));
        let gate = parse("[rollout]\nmin_shadow_agreement = 1.5\n").unwrap();
        assert!(gate.validate().unwrap_err().to_string().contains("rollout.min_shadow_agreement"));
        assert_eq!(parse(DEFAULT_TOML).unwrap().rollout.max_error_ratio, 2.0);
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
