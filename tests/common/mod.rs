//! Shared helpers for integration tests: fixture discovery and reference cases written by
//! `vlmexport.fixtures.make_fixtures` (transformers/PyTorch), and model loading.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{ReadNpyExt, ReadableElement};
use serde::Deserialize;
use vlmserve::engine::{GraphChoice, Model, ModelOptions};
use vlmserve::package::Precision;
use vlmserve::preprocess::chat_template::{ChatMessage, ContentPart};
use vlmserve::preprocess::{ImageLimits, decode_image};
use vlmserve::runtime::GraphOptions;

#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub family: String,
    pub package: String,
    pub max_new_tokens: usize,
    pub cases: Vec<Case>,
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ArrayRef {
    pub file: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub images: Vec<String>,
    pub messages: Vec<serde_json::Value>,
    pub prompt: String,
    pub expanded_prompt: String,
    pub input_ids: Vec<u32>,
    pub pixel_values: Option<ArrayRef>,
    pub pixel_attention_mask: Option<ArrayRef>,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
    /// Every other recorded field; arrays among them are read with [`Case::array`].
    #[serde(flatten)]
    pub other: std::collections::HashMap<String, serde_json::Value>,
}

/// The repository: `VLMSERVE_REPO` where test binaries run away from where they were built
/// (the GPU check carries them to a GPU host), else the crate's folder.
pub fn root() -> PathBuf {
    std::env::var_os("VLMSERVE_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The vlmserve binary cargo built for these tests.
pub fn vlmserve() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_vlmserve"))
}

/// Copy a folder tree (a fixture package to change in a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every graph's execution providers: `VLMSERVE_TEST_PROVIDERS` as JSON
/// (`[{"kind": "cuda"}]`, the GPU check's setting), else the CPU default.
pub fn test_providers() -> GraphOptions {
    match std::env::var("VLMSERVE_TEST_PROVIDERS") {
        Ok(json) => GraphOptions {
            providers: serde_json::from_str(&json).unwrap_or_else(|e| panic!("VLMSERVE_TEST_PROVIDERS: {e}")),
            ..GraphOptions::default()
        },
        Err(_) => GraphOptions::default(),
    }
}

/// Every `tests/fixtures/*/reference.json`.
pub fn references() -> Vec<Reference> {
    let mut out = Vec::new();
    let dir = root().join("tests/fixtures");
    let mut entries: Vec<_> = std::fs::read_dir(&dir).expect("tests/fixtures").flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let file = path.join("reference.json");
        if file.is_file() {
            let text = std::fs::read_to_string(&file).unwrap();
            let mut reference: Reference =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            reference.dir = path;
            out.push(reference);
        }
    }
    assert!(!out.is_empty(), "no fixtures with reference.json under {}", dir.display());
    out
}

impl Reference {
    /// The cases of `conversations.json` (`vlmexport.fixtures.make_conversations`): prompts
    /// that share beginnings, with transformers' greedy answers.
    pub fn conversations(&self) -> Vec<Case> {
        #[derive(Deserialize)]
        struct Conversations {
            cases: Vec<Case>,
        }
        let file = self.dir.join("conversations.json");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        serde_json::from_str::<Conversations>(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display())).cases
    }

    pub fn package_dir(&self) -> PathBuf {
        self.dir.join(&self.package)
    }

    /// This fixture with its decoders (fp32 and fp16) swapped for the ones exported with fused
    /// attention (`fused/`, see `make_fixtures`), in a copy of its package under `dir`; `None`
    /// for a fixture without them.
    pub fn with_fused_decoder(&self, dir: &Path) -> Option<Reference> {
        let fused = self.dir.join("fused");
        let files = ["decoder_model_merged.onnx", "decoder_model_merged_fp16.onnx"];
        if !files.iter().all(|f| fused.join(f).is_file()) {
            return None;
        }
        let package = dir.join(self.dir.file_name().unwrap_or_default());
        copy_dir(&self.package_dir(), &package);
        for file in files {
            std::fs::copy(fused.join(file), package.join("onnx").join(file)).unwrap();
        }
        Some(Reference { package: package.to_string_lossy().into_owned(), ..self.clone() })
    }

    /// Every fixture that has a fused decoder, each as [`Reference::with_fused_decoder`] makes it.
    pub fn all_fused(dir: &Path) -> Vec<Reference> {
        let fused: Vec<Reference> = references().iter().filter_map(|r| r.with_fused_decoder(dir)).collect();
        assert!(fused.len() >= 2, "fixtures with a fused decoder: {} (make_fixtures --only-fused)", fused.len());
        fused
    }

    pub fn load(&self, precision: Precision) -> Model {
        let graph = GraphChoice { precision: None, options: test_providers() };
        let options = ModelOptions {
            precision,
            vision_encoder: graph.clone(),
            embed_tokens: graph.clone(),
            decoder: graph,
            ..ModelOptions::default()
        };
        Model::load(&self.package_dir(), &options).unwrap_or_else(|e| panic!("{}: {e}", self.package_dir().display()))
    }
}

impl Case {
    /// A recorded array by name (`pixel_values`, `image_grid_thw`, `position_ids`, ...).
    pub fn array(&self, name: &str) -> Option<ArrayRef> {
        match name {
            "pixel_values" => self.pixel_values.clone(),
            "pixel_attention_mask" => self.pixel_attention_mask.clone(),
            _ => self.other.get(name).and_then(|v| serde_json::from_value(v.clone()).ok()),
        }
    }

    pub fn decoded_images(&self, dir: &Path) -> Vec<RgbImage> {
        self.images
            .iter()
            .map(|p| {
                let bytes = std::fs::read(dir.join(p)).unwrap();
                decode_image(&bytes, &ImageLimits::default()).unwrap()
            })
            .collect()
    }

    /// The HF messages as our chat messages.
    pub fn chat_messages(&self) -> Vec<ChatMessage> {
        self.messages
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().to_string(),
                content: m["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|part| match part["type"].as_str().unwrap() {
                        "image" => ContentPart::Image,
                        _ => ContentPart::Text { text: part["text"].as_str().unwrap().to_string() },
                    })
                    .collect(),
                ..ChatMessage::default()
            })
            .collect()
    }
}

/// A reference array: an .npy file gzipped (vlmexport.fixtures.save_array), of the recorded shape.
pub fn read_array<T: ReadableElement>(dir: &Path, array: &ArrayRef) -> ArrayD<T> {
    let file = std::fs::File::open(dir.join(&array.file)).unwrap();
    let a = ArrayD::<T>::read_npy(flate2::read::GzDecoder::new(file)).unwrap();
    assert_eq!(a.shape(), array.shape.as_slice(), "{}", array.file);
    a
}

/// Drop the leading batch axis of size 1 that HF processors return.
pub fn unbatch<T: Clone>(a: ArrayD<T>) -> ArrayD<T> {
    assert_eq!(a.shape()[0], 1, "batch of one expected");
    let shape = a.shape()[1..].to_vec();
    a.into_shape_with_order(IxDyn(&shape)).unwrap()
}

/// The least share of PyTorch's FP32 greedy tokens (leading tokens, summed over a fixture's
/// cases) the fp16 variant must reproduce (measured in tests/parity.rs).
pub const FP16_MIN_AGREEMENT: f64 = 0.9;

/// Leading tokens two sequences share.
pub fn agreement(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
