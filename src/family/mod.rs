//! Model families: everything that differs between VLM architectures and nothing else.
//!
//! A family knows how images become vision-encoder inputs, how many tokens each image costs,
//! how a rendered prompt's image placeholders expand into those tokens, and how position ids
//! are laid out. The engine only talks to the [`Family`] trait; adding a family means adding
//! one file here and one line in [`for_model_type`].

mod idefics3;
mod qwen2_vl;
mod settings;

pub use idefics3::Idefics3;
pub use qwen2_vl::Qwen2Vl;

use image::RgbImage;
use ndarray::ArrayD;

/// Errors raised while turning images and prompts into model inputs.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    #[error("unsupported model type {0:?}; supported families: {SUPPORTED}")]
    UnsupportedModelType(String),
    #[error("invalid {file} for this family: {message}")]
    InvalidConfig { file: &'static str, message: String },
    #[error("the prompt has {placeholders} image placeholder(s) but {images} image(s) were given")]
    ImageCountMismatch { placeholders: usize, images: usize },
    #[error("image preprocessing failed: {0}")]
    Preprocess(#[from] crate::preprocess::PreprocessError),
    /// An image the family's processor cannot take (e.g. too extreme an aspect ratio).
    #[error("unsupported image: {0}")]
    UnsupportedImage(String),
    /// Image tensors whose shape did not come out as the family computed it (our fault).
    #[error("image tensor shape: {0}")]
    Shape(#[from] ndarray::ShapeError),
}

/// Model types (`config.json` `model_type`) we can run, for error messages.
pub const SUPPORTED: &str =
    "idefics3, smolvlm (SmolVLM, SmolVLM2, Idefics3); qwen2_vl, qwen2_5_vl (Qwen2-VL, Qwen2.5-VL)";

/// OpenAI's `detail` of an image: how much of the image a client wants the model to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Detail {
    /// The model's full budget (as `High`).
    #[default]
    Auto,
    /// A small, cheap rendering: the family decides what that means (fewer pixels, one tile).
    Low,
    High,
}

impl std::str::FromStr for Detail {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Detail::Auto),
            "low" => Ok(Detail::Low),
            "high" => Ok(Detail::High),
            _ => Err(format!("{s:?} is not \"auto\", \"low\" or \"high\"")),
        }
    }
}

/// What a client lets one image cost. The server's processor settings cap it from above;
/// `max_pixels` (our extension) bounds the area the image is resized to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageBudget {
    pub detail: Detail,
    pub max_pixels: Option<u64>,
}

impl ImageBudget {
    /// The budget of image `index`; images without one get the default.
    pub fn of(budgets: &[ImageBudget], index: usize) -> ImageBudget {
        budgets.get(index).copied().unwrap_or_default()
    }
}

/// A tensor handed to a graph, typed by what ONNX expects.
#[derive(Debug, Clone)]
pub enum TensorData {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

/// A named graph input.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub data: TensorData,
}

/// How one image was laid out: its grid (`[frames, rows, cols]` of tiles or patches, family
/// defined) and how many image tokens (feature rows) it yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    pub grid: [usize; 3],
    pub tokens: usize,
}

/// All images of one request, ready for the vision encoder.
#[derive(Debug, Clone)]
pub struct ProcessedImages {
    /// Vision-encoder inputs by graph input name, images concatenated in prompt order.
    pub inputs: Vec<NamedTensor>,
    /// One entry per image, in prompt order; their token counts sum to the feature rows.
    pub layouts: Vec<ImageLayout>,
    /// `Some(n)` when axis 0 of every input indexes tiles that the encoder treats
    /// independently, each giving `n` feature rows: the engine may then encode a request's
    /// tiles in chunks, and tiles of several requests in one call.
    pub tile_tokens: Option<usize>,
}

impl ProcessedImages {
    pub fn total_tokens(&self) -> usize {
        self.layouts.iter().map(|l| l.tokens).sum()
    }

    /// Units the encoder can take apart: tiles, or the whole set when it cannot be split.
    pub fn tiles(&self) -> usize {
        match (self.tile_tokens, self.inputs.first()) {
            (Some(_), Some(input)) => input.data.len_of_first_axis(),
            _ => 1,
        }
    }
}

impl TensorData {
    pub fn len_of_first_axis(&self) -> usize {
        match self {
            TensorData::F32(a) => a.len_of(ndarray::Axis(0)),
            TensorData::I64(a) => a.len_of(ndarray::Axis(0)),
            TensorData::Bool(a) => a.len_of(ndarray::Axis(0)),
        }
    }

    /// Entries `range` along axis 0.
    pub fn slice_first_axis(&self, range: std::ops::Range<usize>) -> Self {
        let slice = ndarray::Slice::from(range);
        match self {
            TensorData::F32(a) => TensorData::F32(a.slice_axis(ndarray::Axis(0), slice).to_owned()),
            TensorData::I64(a) => TensorData::I64(a.slice_axis(ndarray::Axis(0), slice).to_owned()),
            TensorData::Bool(a) => TensorData::Bool(a.slice_axis(ndarray::Axis(0), slice).to_owned()),
        }
    }

    /// `parts` joined along axis 0; `None` when their kinds or other axes differ.
    pub fn concat_first_axis(parts: &[&TensorData]) -> Option<Self> {
        fn join<T: Clone>(arrays: Vec<&ArrayD<T>>) -> Option<ArrayD<T>> {
            let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).ok()
        }
        macro_rules! all {
            ($variant:ident) => {
                parts
                    .iter()
                    .map(|p| if let TensorData::$variant(a) = p { Some(a) } else { None })
                    .collect::<Option<Vec<_>>>()
            };
        }
        match parts.first()? {
            TensorData::F32(_) => join(all!(F32)?).map(TensorData::F32),
            TensorData::I64(_) => join(all!(I64)?).map(TensorData::I64),
            TensorData::Bool(_) => join(all!(Bool)?).map(TensorData::Bool),
        }
    }
}

/// Position ids for the prompt and where decoding continues.
#[derive(Debug, Clone)]
pub struct Positions {
    /// `[batch=1, seq]` for 1-D rotary families, `[3, 1, seq]` for M-RoPE.
    pub prompt: ArrayD<i64>,
    /// Position of the first generated token.
    pub next: i64,
}

/// What a model family must provide. Implementations are pure functions of their settings,
/// so one instance serves every request concurrently.
pub trait Family: Send + Sync + std::fmt::Debug {
    /// The family's name as shown to users.
    fn name(&self) -> &'static str;

    /// The text a chat template emits for one image before expansion (e.g. `<image>`).
    fn image_placeholder(&self) -> &str;

    /// Token id whose positions receive the vision encoder's feature rows.
    fn image_token_id(&self) -> u32;

    /// Turn decoded RGB images into vision-encoder inputs and per-image layouts; `budgets[i]`
    /// bounds image `i` (see [`ImageBudget::of`]).
    fn process_images(&self, images: &[RgbImage], budgets: &[ImageBudget]) -> Result<ProcessedImages, FamilyError>;

    /// The layout an image of this size gets under `budget`, as [`Family::process_images`]
    /// gives it, without any pixel work (admission before decoding; prompts whose features
    /// are cached skip processing).
    fn image_layout(&self, width: u32, height: u32, budget: ImageBudget) -> Result<ImageLayout, FamilyError>;

    /// Replace each image placeholder of a rendered prompt with that image's tokens.
    fn expand_prompt(&self, prompt: &str, layouts: &[ImageLayout]) -> Result<String, FamilyError>;

    /// Position ids of the prompt. The default is the 1-D `0..len` of most decoders.
    fn prompt_positions(&self, input_ids: &[u32], _layouts: &[ImageLayout]) -> Positions {
        let len = input_ids.len();
        let ids = ndarray::Array::from_iter(0..len as i64).insert_axis(ndarray::Axis(0)).into_dyn();
        Positions { prompt: ids, next: len as i64 }
    }

    /// Position ids for one decode step at `position` (`[1, 1]`, or `[3, 1, 1]` for M-RoPE).
    fn step_positions(&self, position: i64) -> ArrayD<i64> {
        ArrayD::from_elem(ndarray::IxDyn(&[1, 1]), position)
    }
}

/// `prompt` with its `index`-th occurrence of `placeholder` replaced by `image_text(layouts[index])`;
/// every image needs exactly one placeholder.
fn expand_placeholders(
    prompt: &str,
    placeholder: &str,
    layouts: &[ImageLayout],
    image_text: impl Fn(&ImageLayout) -> String,
) -> Result<String, FamilyError> {
    let placeholders = prompt.matches(placeholder).count();
    if placeholders != layouts.len() {
        return Err(FamilyError::ImageCountMismatch { placeholders, images: layouts.len() });
    }
    let mut pieces = prompt.split(placeholder);
    let mut expanded = pieces.next().unwrap_or_default().to_string();
    for (piece, layout) in pieces.zip(layouts) {
        expanded.push_str(&image_text(layout));
        expanded.push_str(piece);
    }
    Ok(expanded)
}

/// Build the family for a package from its `config.json` and image-processor settings.
pub fn for_model_type(
    config: &serde_json::Value,
    processor: &serde_json::Value,
) -> Result<Box<dyn Family>, FamilyError> {
    let model_type = config["model_type"].as_str().unwrap_or_default();
    match model_type {
        "idefics3" | "smolvlm" => Ok(Box::new(Idefics3::from_configs(config, processor)?)),
        "qwen2_vl" | "qwen2_5_vl" => Ok(Box::new(Qwen2Vl::from_configs(config, processor)?)),
        other => Err(FamilyError::UnsupportedModelType(other.to_string())),
    }
}
