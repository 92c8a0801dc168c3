//! A model package on disk: configuration, processor settings, tokenizer, chat template and the
//! ONNX graph files with their precision variants. Nothing else: no sessions, no tensors.
//!
//! The layout is the one published ONNX VLMs use (onnx-community, transformers.js):
//! `config.json`, `generation_config.json`, processor and tokenizer files at the top and
//! `onnx/{vision_encoder,embed_tokens,decoder_model_merged}{SUFFIX}.onnx`.

mod precision;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

pub use precision::Precision;

/// Errors reading a package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is not a model package: {message}")]
    NotAPackage { path: PathBuf, message: String },
    #[error("the package has no {graph} graph in precision {requested}; available: {available}")]
    VariantMissing { graph: Graph, requested: Precision, available: String },
    #[error("unknown precision {0:?}; use fp32, fp16, int8, uint8, quantized, q4, q4f16 or bnb4")]
    UnknownPrecision(String),
    #[error(
        "the package has no chat template (looked in chat_template.jinja, chat_template.json, tokenizer_config.json, processor_config.json)"
    )]
    NoChatTemplate,
}

/// The three graphs of a VLM package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Graph {
    VisionEncoder,
    EmbedTokens,
    Decoder,
}

impl Graph {
    pub const ALL: [Graph; 3] = [Graph::VisionEncoder, Graph::EmbedTokens, Graph::Decoder];

    /// File name stem inside `onnx/`.
    pub fn stem(self) -> &'static str {
        match self {
            Graph::VisionEncoder => "vision_encoder",
            Graph::EmbedTokens => "embed_tokens",
            Graph::Decoder => "decoder_model_merged",
        }
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stem())
    }
}

/// Settings from `generation_config.json` that generation needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::Null(()) => Vec::new(),
    })
}

/// A model package read from a folder.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub dir: PathBuf,
    /// `config.json` as written by transformers.
    pub config: Value,
    /// Image-processor settings, merged from `preprocessor_config.json` and
    /// `processor_config.json` (its `image_processor` object and top-level keys).
    pub processor: Value,
    pub generation: GenerationConfig,
    /// `tokenizer_config.json` (special tokens used by chat templates), or `{}`.
    pub tokenizer_config: Value,
    pub chat_template: String,
    /// `card.json`, when the package has one (shared: every model listing carries it).
    pub card: Option<Arc<ModelCard>>,
}

/// What a package says about itself for people trying it (`card.json`): one line on what the
/// model knows and example pictures with a question each, under `examples/`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub about: String,
    #[serde(default)]
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// A file name in the package's `examples/` folder.
    pub image: String,
    pub question: String,
}

impl ModelCard {
    /// The card in `dir`, if any; every example's picture must be a plain file name that
    /// exists in `dir/examples/` (so that serving one can never reach outside that folder).
    fn read(dir: &Path) -> Result<Option<Arc<Self>>, PackageError> {
        let path = dir.join("card.json");
        let Some(value) = read_optional_json(&path)? else { return Ok(None) };
        let card: ModelCard = serde_json::from_value(value).map_err(|e| read_err(&path, e))?;
        for example in &card.examples {
            let plain = Path::new(&example.image).file_name().is_some_and(|name| name == example.image.as_str());
            if !plain || !dir.join("examples").join(&example.image).is_file() {
                return Err(read_err(&path, format!("example {:?} is not a file in examples/", example.image)));
            }
        }
        Ok(Some(Arc::new(card)))
    }

    /// An example picture's path, when `image` is one of the card's.
    pub fn example_path(&self, dir: &Path, image: &str) -> Option<PathBuf> {
        self.examples.iter().any(|e| e.image == image).then(|| dir.join("examples").join(image))
    }
}

impl ModelPackage {
    pub fn open(dir: &Path) -> Result<Self, PackageError> {
        if !dir.join("config.json").is_file() {
            return Err(PackageError::NotAPackage { path: dir.to_path_buf(), message: "config.json not found".into() });
        }
        let config = read_json(&dir.join("config.json"))?;
        let processor = merged_processor_settings(dir)?;
        let generation = match read_optional_json(&dir.join("generation_config.json"))? {
            Some(v) => serde_json::from_value(v).map_err(|e| read_err(&dir.join("generation_config.json"), e))?,
            None => GenerationConfig::default(),
        };
        let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let chat_template = find_chat_template(dir, &tokenizer_config)?;
        let card = ModelCard::read(dir)?;
        Ok(Self { dir: dir.to_path_buf(), config, processor, generation, tokenizer_config, chat_template, card })
    }

    pub fn model_type(&self) -> &str {
        self.config["model_type"].as_str().unwrap_or_default()
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// The decoder's context length (`max_position_embeddings` of the text model).
    pub fn context_length(&self) -> Option<usize> {
        let text = self.config.get("text_config").unwrap_or(&self.config);
        text["max_position_embeddings"].as_u64().map(|n| n as usize)
    }

    /// End-of-sequence ids: generation config first, then the model config.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_id.is_empty() {
            return self.generation.eos_token_id.clone();
        }
        let text = self.config.get("text_config").unwrap_or(&self.config);
        serde_json::from_value::<GenerationConfig>(serde_json::json!({ "eos_token_id": text["eos_token_id"] }))
            .map(|g| g.eos_token_id)
            .unwrap_or_default()
    }

    /// Precisions in which `graph` exists, in a stable order.
    pub fn available(&self, graph: Graph) -> Vec<Precision> {
        Precision::ALL.into_iter().filter(|p| self.graph_file(graph, *p).is_file()).collect()
    }

    fn graph_file(&self, graph: Graph, precision: Precision) -> PathBuf {
        self.dir.join("onnx").join(format!("{}{}.onnx", graph.stem(), precision.suffix()))
    }

    /// Path of `graph` in `precision`, or an error listing the precisions that exist.
    pub fn graph_path(&self, graph: Graph, precision: Precision) -> Result<PathBuf, PackageError> {
        let path = self.graph_file(graph, precision);
        if path.is_file() {
            return Ok(path);
        }
        let available: Vec<String> = self.available(graph).iter().map(|p| p.to_string()).collect();
        let available = if available.is_empty() { "none".to_string() } else { available.join(", ") };
        Err(PackageError::VariantMissing { graph, requested: precision, available })
    }
}

fn read_err(path: &Path, e: impl fmt::Display) -> PackageError {
    PackageError::Read { path: path.to_path_buf(), message: e.to_string() }
}

fn read_json(path: &Path) -> Result<Value, PackageError> {
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| read_err(path, e))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, PackageError> {
    if path.is_file() { read_json(path).map(Some) } else { Ok(None) }
}

/// transformers 5 nests image-processor settings under `processor_config.json`'s
/// `image_processor`; older packages have them flat in `preprocessor_config.json`.
fn merged_processor_settings(dir: &Path) -> Result<Value, PackageError> {
    let mut merged = serde_json::Map::new();
    if let Some(Value::Object(pre)) = read_optional_json(&dir.join("preprocessor_config.json"))? {
        merged.extend(pre);
    }
    if let Some(Value::Object(proc)) = read_optional_json(&dir.join("processor_config.json"))? {
        for (key, value) in proc {
            match (key.as_str(), value) {
                ("image_processor", Value::Object(inner)) => merged.extend(inner),
                ("chat_template", _) => {}
                (_, value) => {
                    merged.insert(key, value);
                }
            }
        }
    }
    Ok(Value::Object(merged))
}

fn find_chat_template(dir: &Path, tokenizer_config: &Value) -> Result<String, PackageError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map_err(|e| read_err(&jinja, e));
    }
    let from_json = |v: &Value| template_value(&v["chat_template"]);
    if let Some(t) = read_optional_json(&dir.join("chat_template.json"))?.as_ref().and_then(from_json) {
        return Ok(t);
    }
    if let Some(t) = from_json(tokenizer_config) {
        return Ok(t);
    }
    read_optional_json(&dir.join("processor_config.json"))?
        .as_ref()
        .and_then(from_json)
        .ok_or(PackageError::NoChatTemplate)
}

/// A template is a string, or a list of `{name, template}` of which we take `default`.
fn template_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or(list.first())
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, value: impl ToString) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, value.to_string()).unwrap();
    }

    fn package(files: &[(&str, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "config.json",
            json!({"model_type": "idefics3", "text_config": {"eos_token_id": 2, "max_position_embeddings": 8192}}),
        );
        for (name, text) in files {
            write(dir.path(), name, text);
        }
        dir
    }

    #[test]
    fn reads_transformers_5_layout() {
        let dir = package(&[
            ("processor_config.json", json!({"image_processor": {"size": {"longest_edge": 2048}}, "image_seq_len": 64, "chat_template": "ignored"}).to_string()),
            ("chat_template.jinja", "{{ messages }}".into()),
            ("generation_config.json", json!({"eos_token_id": [2, 49279]}).to_string()),
        ]);
        let p = ModelPackage::open(dir.path()).unwrap();
        assert_eq!(p.processor, json!({"size": {"longest_edge": 2048}, "image_seq_len": 64}));
        assert_eq!(p.chat_template, "{{ messages }}");
        assert_eq!(p.eos_token_ids(), vec![2, 49279]);
        assert_eq!(p.context_length(), Some(8192));
    }

    #[test]
    fn reads_older_layouts() {
        let dir = package(&[
            ("preprocessor_config.json", json!({"do_image_splitting": true}).to_string()),
            ("chat_template.json", json!({"chat_template": "old"}).to_string()),
        ]);
        let p = ModelPackage::open(dir.path()).unwrap();
        assert_eq!(p.processor, json!({"do_image_splitting": true}));
        assert_eq!(p.chat_template, "old");
        assert_eq!(p.eos_token_ids(), vec![2], "falls back to the text config");

        let list =
            json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        let dir = package(&[("tokenizer_config.json", list.to_string())]);
        assert_eq!(ModelPackage::open(dir.path()).unwrap().chat_template, "d");

        let dir = package(&[]);
        assert!(matches!(ModelPackage::open(dir.path()), Err(PackageError::NoChatTemplate)));
    }

    #[test]
    fn reads_a_card_whose_examples_stay_in_their_folder() {
        let card = json!({"about": "Shapes.", "examples": [{"image": "a.png", "question": "What color?"}]});
        let dir = package(&[
            ("chat_template.jinja", "t".into()),
            ("card.json", card.to_string()),
            ("examples/a.png", "png".into()),
        ]);
        let read = ModelPackage::open(dir.path()).unwrap().card.unwrap();
        assert_eq!(read.about, "Shapes.");
        assert_eq!(read.examples, vec![Example { image: "a.png".into(), question: "What color?".into() }]);
        assert_eq!(read.example_path(dir.path(), "a.png"), Some(dir.path().join("examples/a.png")));
        assert_eq!(read.example_path(dir.path(), "../card.json"), None);
        assert_eq!(ModelPackage::open(package(&[("chat_template.jinja", "t".into())]).path()).unwrap().card, None);

        for (bad, message) in [
            (
                json!({"about": "x", "examples": [{"image": "../config.json", "question": "q"}]}),
                "is not a file in examples/",
            ),
            (
                json!({"about": "x", "examples": [{"image": "missing.png", "question": "q"}]}),
                "is not a file in examples/",
            ),
            (json!({"about": "x", "example": []}), "unknown field `example`"),
            (json!({"examples": []}), "missing field `about`"),
        ] {
            let dir = package(&[("chat_template.jinja", "t".into()), ("card.json", bad.to_string())]);
            let err = ModelPackage::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains("card.json") && err.contains(message), "{bad}: {err}");
        }
    }

    #[test]
    fn lists_variants_by_suffix() {
        let dir = package(&[
            ("chat_template.jinja", "t".into()),
            ("onnx/decoder_model_merged.onnx", String::new()),
            ("onnx/decoder_model_merged_q4f16.onnx", String::new()),
            ("onnx/decoder_model_merged_quantized.onnx", String::new()),
        ]);
        let p = ModelPackage::open(dir.path()).unwrap();
        assert_eq!(p.available(Graph::Decoder), vec![Precision::Fp32, Precision::Quantized, Precision::Q4f16]);
        assert!(
            p.graph_path(Graph::Decoder, Precision::Q4f16).unwrap().ends_with("onnx/decoder_model_merged_q4f16.onnx")
        );
        let err = p.graph_path(Graph::Decoder, Precision::Fp16).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the package has no decoder_model_merged graph in precision fp16; available: fp32, quantized, q4f16"
        );
        assert!(
            matches!(p.graph_path(Graph::VisionEncoder, Precision::Fp32), Err(PackageError::VariantMissing { available, .. }) if available == "none")
        );
    }
}
