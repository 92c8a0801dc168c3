//! A loaded model: the package's three graphs in ONNX Runtime, its tokenizer, chat template
//! and family, checked against each other at load time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::EngineError;
use super::feature_cache::FeatureCache;
use super::grammar::{Constraint, Grammars, Guide};
use super::graphs::{Decoder, Embedder, VisionEncoder};
use super::kv_cache::KvLayout;
use super::prefix_cache::PrefixCache;
use super::vision::VisionWorker;
use crate::family::{self, Family};
use crate::package::{Graph, ModelPackage, Precision};
use crate::preprocess::chat_template::ChatTemplate;
use crate::runtime::{self, GraphOptions};

/// Which variant of a graph to load and how to run it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphChoice {
    pub precision: Option<Precision>,
    pub options: GraphOptions,
}

/// How to load a model: per graph precision and providers, and the ONNX Runtime library.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    /// Precision for graphs that do not name their own.
    pub precision: Precision,
    pub vision_encoder: GraphChoice,
    pub embed_tokens: GraphChoice,
    pub decoder: GraphChoice,
    /// `--ort-lib` / `runtime.onnxruntime_library`.
    pub onnxruntime_library: Option<PathBuf>,
    /// Image-processor settings set over the package's (`do_image_splitting = false`, ...).
    pub processor_overrides: Vec<(String, serde_json::Value)>,
    /// Runs behind other models (a shadow version): idle ONNX Runtime threads sleep instead of
    /// spinning, so they leave the cores to the models clients wait for.
    pub background: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            vision_encoder: GraphChoice::default(),
            embed_tokens: GraphChoice::default(),
            decoder: GraphChoice::default(),
            onnxruntime_library: None,
            processor_overrides: Vec::new(),
            background: false,
        }
    }
}

impl ModelOptions {
    pub fn graph(&self, graph: Graph) -> &GraphChoice {
        match graph {
            Graph::VisionEncoder => &self.vision_encoder,
            Graph::EmbedTokens => &self.embed_tokens,
            Graph::Decoder => &self.decoder,
        }
    }

    pub fn precision_of(&self, graph: Graph) -> Precision {
        self.graph(graph).precision.unwrap_or(self.precision)
    }
}

/// What a loaded model is, for `inspect`, logs and `/v1/models`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub family: &'static str,
    pub model_type: String,
    pub dir: PathBuf,
    /// `(graph, precision, file, providers)` per graph.
    pub graphs: Vec<(Graph, Precision, PathBuf, Vec<&'static str>)>,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
}

/// A model's codec, everything about it but its sessions: what turns messages and images into
/// a [`super::Prompt`] and tokens back into text. Shared (`Arc`) so that request handlers can
/// prepare prompts while the sessions generate for someone else.
#[derive(Debug)]
pub struct Codec {
    pub info: ModelInfo,
    pub package: ModelPackage,
    pub family: Box<dyn Family>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The most bytes of text one token can stand for (4 per character of the longest
    /// vocabulary entry): a prompt longer than the context times this is refused untokenized.
    pub(super) max_token_bytes: usize,
    /// A hash of the family and its processor settings: part of every image's identity in
    /// the prefix cache (see `Codec::image_id`).
    pub(super) image_settings: [u8; 32],
    grammars: Grammars,
}

/// A loaded model: its [`Codec`] and the three ONNX Runtime sessions.
#[derive(Debug)]
pub struct Model {
    pub codec: Arc<Codec>,
    /// The vision encoder's own thread, beside prefill and decode.
    pub(super) vision: VisionWorker,
    /// The vision graph's inputs and outputs, read before its session moved to that thread.
    vision_io: GraphIo,
    pub(super) embedder: Embedder,
    pub(super) decoder: Decoder,
    /// Shared with the other workers of the same model version; `None` when off.
    pub(super) feature_cache: Option<Arc<FeatureCache>>,
    /// Shared like the feature cache; `None` when off.
    pub(super) prefix_cache: Option<Arc<PrefixCache>>,
}

/// A graph's inputs and outputs as `name: type`.
type GraphIo = (Vec<String>, Vec<String>);

fn describe(session: &ort::session::Session) -> GraphIo {
    let names =
        |outlets: &[ort::value::Outlet]| outlets.iter().map(|o| format!("{}: {}", o.name(), o.dtype())).collect();
    (names(session.inputs()), names(session.outputs()))
}

/// Fallback context when `config.json` does not say.
const DEFAULT_CONTEXT: usize = 2048;

impl Model {
    /// Load the package in `dir` with `options`.
    pub fn load(dir: &Path, options: &ModelOptions) -> Result<Self, EngineError> {
        let mut package = ModelPackage::open(dir)?;
        if let Some(settings) = package.processor.as_object_mut() {
            settings.extend(options.processor_overrides.iter().cloned());
        }
        let family = family::for_model_type(&package.config, &package.processor)?;
        let tokenizer = Tokenizer::from_file(package.tokenizer_path())
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", package.tokenizer_path().display())))?;
        let template = ChatTemplate::new(&package.chat_template, &package.tokenizer_config)?;
        let mut graphs = Vec::new();
        for graph in Graph::ALL {
            let precision = options.precision_of(graph);
            let path = package.graph_path(graph, precision)?;
            graphs.push((graph, precision, path, options.graph(graph).options.provider_names()));
        }
        let all_providers: Vec<_> =
            Graph::ALL.iter().flat_map(|g| options.graph(*g).options.providers.clone()).collect();
        let env = runtime::init(options.onnxruntime_library.as_deref(), &all_providers)?;
        let vision = VisionEncoder::open(env, &graphs[0].2, &options.vision_encoder.options)?;
        let spinning = !options.background;
        let embedder = Embedder::open(env, &graphs[1].2, &options.embed_tokens.options, spinning)?;
        let decoder = Decoder::open(env, &graphs[2].2, &options.decoder.options, spinning)?;
        let info = ModelInfo {
            family: family.name(),
            model_type: package.model_type().to_string(),
            dir: dir.to_path_buf(),
            graphs,
            context_length: package.context_length().unwrap_or(DEFAULT_CONTEXT),
            eos_token_ids: package.eos_token_ids(),
        };
        let max_token_bytes = tokenizer.get_vocab(true).keys().map(|t| 4 * t.chars().count()).max().unwrap_or(4);
        let grammars = Grammars::default();
        let image_settings =
            Sha256::new().chain_update(family.name()).chain_update(package.processor.to_string()).finalize().into();
        let codec = Codec { info, package, family, tokenizer, template, max_token_bytes, image_settings, grammars };
        codec.check_consistency(&decoder.layout)?;
        let vision_io = describe(vision.session());
        let vision = VisionWorker::start(vision)?;
        Ok(Self {
            codec: Arc::new(codec),
            vision,
            vision_io,
            embedder,
            decoder,
            feature_cache: None,
            prefix_cache: None,
        })
    }

    /// Reuse the vision encoder's output for inputs `cache` has seen.
    pub fn with_feature_cache(mut self, cache: Option<Arc<FeatureCache>>) -> Self {
        self.feature_cache = cache;
        self
    }

    /// Reuse the KV cache of prompt beginnings `cache` holds. Only where the KV cache lives in
    /// host memory: on a device, filling the cache would copy every finished row to the host.
    pub fn with_prefix_cache(mut self, cache: Option<Arc<PrefixCache>>) -> Self {
        if cache.is_some() && !self.decoder.cache_on_host() {
            tracing::info!("prefix cache off: the decoder's KV cache lives in device memory");
        }
        self.prefix_cache = cache.filter(|_| self.decoder.cache_on_host());
        self
    }

    pub fn kv_layout(&self) -> &KvLayout {
        &self.decoder.layout
    }

    /// Input and output names with element types and shapes, per graph, for `inspect`.
    pub fn describe_graphs(&self) -> Vec<(Graph, Vec<String>, Vec<String>)> {
        let io = [self.vision_io.clone(), describe(self.embedder.session()), describe(self.decoder.session())];
        Graph::ALL.into_iter().zip(io).map(|(g, (inputs, outputs))| (g, inputs, outputs)).collect()
    }
}

impl Codec {
    /// A guide that keeps generation to `constraint`, compiled for this tokenizer (the first
    /// constrained request also builds llguidance's view of the vocabulary). Refused
    /// constraints are [`EngineError::InvalidConstraint`], before any graph runs.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, EngineError> {
        self.grammars.guide(constraint, &self.package.tokenizer_path(), &self.info.eos_token_ids)
    }

    /// A package whose graphs disagree with its config fails here, not mid-generation.
    fn check_consistency(&self, layout: &KvLayout) -> Result<(), EngineError> {
        let text = self.package.config.get("text_config").unwrap_or(&self.package.config);
        let expect = |key: &str, actual: usize| -> Result<(), EngineError> {
            match text[key].as_u64() {
                Some(n) if n as usize != actual => Err(EngineError::GraphMismatch(format!(
                    "config.json says {key} = {n}, the decoder graph has {actual}"
                ))),
                _ => Ok(()),
            }
        };
        expect("num_hidden_layers", layout.layers)?;
        expect("num_key_value_heads", layout.kv_heads)?;
        // Image requests would otherwise fail one by one, each with a 500.
        let (image_token, placeholder) = (self.family.image_token_id(), self.family.image_placeholder());
        let found = self.tokenizer.token_to_id(placeholder);
        if found != Some(image_token) {
            let found = found.map_or("has no such token".to_string(), |id| format!("gives it id {id}"));
            return Err(EngineError::Inconsistent(format!(
                "config.json's image token id is {image_token}, but the tokenizer's {placeholder:?} {found}"
            )));
        }
        let vocab = self.tokenizer.get_vocab_size(true);
        if let Some(n) = text["vocab_size"].as_u64().filter(|&n| (n as usize) < vocab) {
            return Err(EngineError::GraphMismatch(format!(
                "tokenizer has {vocab} tokens but the model's vocab_size is {n}"
            )));
        }
        Ok(())
    }
}
