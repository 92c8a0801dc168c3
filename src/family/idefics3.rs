//! The Idefics3 family: Idefics3, SmolVLM and SmolVLM2.
//!
//! Images are processed as transformers' `Idefics3ImageProcessorPil` does (5.23): resize so the
//! longest edge is `size.longest_edge` (even short edge), resize up to multiples of the tile size
//! `max_image_size.longest_edge`, cut into tiles row-major and append the whole image squashed to
//! one tile (the "global" image); without splitting, each image is squashed to one tile. Then
//! rescale, normalize, pad to the largest frame. Prompts are expanded as `Idefics3Processor`'s
//! `replace_image_token`.

use image::RgbImage;
use ndarray::{Array3, Array4, s};
use serde::Deserialize;
use serde_json::Value;

use super::settings::{CONFIG, ImageProcessorSettings, PROCESSOR, invalid, positive, read_config};
use super::{
    Detail, Family, FamilyError, ImageBudget, ImageLayout, NamedTensor, ProcessedImages, TensorData,
    expand_placeholders,
};
use crate::preprocess::normalize::Normalization;
use crate::preprocess::{Filter, resize};

/// transformers' `MAX_IMAGE_SIZE`: no resized edge exceeds 4k.
const MAX_IMAGE_SIZE: u32 = 4096;

/// Settings of one Idefics3-style model; pure, shared by all requests.
#[derive(Debug, Clone)]
pub struct Idefics3 {
    image_token_id: u32,
    /// Image tokens (feature rows) per frame.
    image_seq_len: usize,
    /// `size.longest_edge` when `do_resize`.
    longest_edge: Option<u32>,
    /// `max_image_size.longest_edge`: the tile the vision encoder takes.
    tile: u32,
    split: bool,
    filter: Filter,
    normalization: Normalization,
    tokens: PromptTokens,
}

/// The strings `Idefics3Processor` writes into prompts.
#[derive(Debug, Clone)]
struct PromptTokens {
    image: String,
    fake: String,
    global: String,
}

/// The sizes one image goes through, computable from its size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// (width, height) after the longest-edge resize.
    resized: (u32, u32),
    /// (width, height) handed to tiling: whole tiles when splitting, else one tile.
    tiled: (u32, u32),
    /// Tile grid; 0 x 0 when the image is not split.
    rows: u32,
    cols: u32,
}

impl Idefics3 {
    /// Read settings from `config.json` and the image-processor settings (either
    /// `preprocessor_config.json`, or `processor_config.json`'s `image_processor` merged with its
    /// top-level keys; keys are looked up at the top level, then under `image_processor`).
    /// Absent keys take transformers' defaults.
    pub fn from_configs(config: &Value, processor: &Value) -> Result<Self, FamilyError> {
        let config: Config = read_config(config)?;
        let settings = ImageProcessorSettings(processor);
        let tile = settings.longest_edge("max_image_size")?.unwrap_or(364);
        let longest_edge = match settings.flag("do_resize")? {
            true => Some(settings.longest_edge("size")?.unwrap_or(4 * 364)),
            false => None,
        };
        let resample = settings.int("resample")?.unwrap_or(1);
        let filter = Filter::from_pil(resample)
            .ok_or_else(|| invalid(PROCESSOR, format!("unsupported resample filter {resample}")))?;
        let image_seq_len = match settings.int("image_seq_len")? {
            Some(n) => positive(n, "image_seq_len")?,
            None => config.image_seq_len()?,
        };
        Ok(Self {
            image_token_id: config.image_token_id.unwrap_or(128_257),
            image_seq_len,
            longest_edge,
            tile,
            split: settings.flag("do_image_splitting")?,
            filter,
            // IMAGENET_STANDARD_MEAN / _STD.
            normalization: settings.normalization(([0.5; 3], [0.5; 3]))?,
            tokens: PromptTokens {
                image: settings.token("image_token")?.unwrap_or("<image>").to_string(),
                fake: settings.token("fake_image_token")?.unwrap_or("<fake_token_around_image>").to_string(),
                global: settings.token("global_image_tag")?.unwrap_or("<global-img>").to_string(),
            },
        })
    }

    /// Where an image of this size ends up under `budget`, without touching pixels.
    /// `detail: low` turns splitting off (one tile); `max_pixels` lowers the longest edge until
    /// the resized image's area fits, which means fewer tiles.
    fn plan(&self, width: u32, height: u32, budget: ImageBudget) -> Plan {
        let resized = match self.longest_edge(width, height, budget) {
            Some(edge) => longest_edge_size(width, height, edge),
            None => (width, height),
        };
        if !self.split || budget.detail == Detail::Low {
            return Plan { resized, tiled: (self.tile, self.tile), rows: 0, cols: 0 };
        }
        let tiled = whole_tiles_size(resized.0, resized.1, self.tile);
        // `split_images` only splits what exceeds one tile.
        let (rows, cols) = if tiled.0 > self.tile || tiled.1 > self.tile {
            (tiled.1 / self.tile, tiled.0 / self.tile)
        } else {
            (0, 0)
        };
        Plan { resized, tiled, rows, cols }
    }

    /// `size.longest_edge`, lowered so that the resized area stays within `budget.max_pixels`.
    fn longest_edge(&self, width: u32, height: u32, budget: ImageBudget) -> Option<u32> {
        let edge = self.longest_edge?;
        let Some(cap) = budget.max_pixels else { return Some(edge) };
        let aspect = f64::from(width.max(height)) / f64::from(width.min(height).max(1));
        let fitting = (cap as f64 * aspect).sqrt().floor() as u32;
        Some(edge.min(fitting.max(1)))
    }

    /// Unsplit images are one frame; split ones are their tiles plus the global image.
    fn layout(&self, plan: &Plan) -> ImageLayout {
        let frames = (plan.rows * plan.cols) as usize + 1;
        ImageLayout { grid: [1, plan.rows as usize, plan.cols as usize], tokens: frames * self.image_seq_len }
    }

    /// The frames of one image, in the order the vision encoder takes them.
    fn frames(&self, image: &RgbImage, budget: ImageBudget) -> (Vec<RgbImage>, Plan) {
        let plan = self.plan(image.width(), image.height(), budget);
        let resized = resize(image, plan.resized.0, plan.resized.1, self.filter);
        let tiled = resize(&resized, plan.tiled.0, plan.tiled.1, self.filter);
        if plan.rows == 0 && plan.cols == 0 {
            return (vec![tiled], plan);
        }
        let mut frames = Vec::with_capacity((plan.rows * plan.cols) as usize + 1);
        for r in 0..plan.rows {
            for c in 0..plan.cols {
                let tile = image::imageops::crop_imm(&tiled, c * self.tile, r * self.tile, self.tile, self.tile);
                frames.push(tile.to_image());
            }
        }
        frames.push(resize(&tiled, self.tile, self.tile, self.filter));
        (frames, plan)
    }

    /// The text that replaces one image placeholder.
    fn image_text(&self, layout: &ImageLayout) -> String {
        let t = &self.tokens;
        let image_tokens = t.image.repeat(self.image_seq_len);
        let global = format!("{}{}{image_tokens}{}", t.fake, t.global, t.fake);
        let [_, rows, cols] = layout.grid;
        if rows == 0 && cols == 0 {
            return global;
        }
        let mut text = String::new();
        for r in 1..=rows {
            for c in 1..=cols {
                text.push_str(&format!("{}<row_{r}_col_{c}>{image_tokens}", t.fake));
            }
            text.push('\n');
        }
        text.push('\n');
        text.push_str(&global);
        text
    }
}

impl Family for Idefics3 {
    fn name(&self) -> &'static str {
        "idefics3"
    }

    fn image_placeholder(&self) -> &str {
        &self.tokens.image
    }

    fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    fn process_images(&self, images: &[RgbImage], budgets: &[ImageBudget]) -> Result<ProcessedImages, FamilyError> {
        let mut frames = Vec::new();
        let mut layouts = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let (image_frames, plan) = self.frames(image, ImageBudget::of(budgets, i));
            frames.extend(image_frames);
            layouts.push(self.layout(&plan));
        }
        let (pixel_values, mask) = self.batch(&frames);
        Ok(ProcessedImages {
            inputs: vec![
                NamedTensor { name: "pixel_values".into(), data: TensorData::F32(pixel_values.into_dyn()) },
                NamedTensor { name: "pixel_attention_mask".into(), data: TensorData::Bool(mask.into_dyn()) },
            ],
            layouts,
            tile_tokens: Some(self.image_seq_len),
        })
    }

    fn image_layout(&self, width: u32, height: u32, budget: ImageBudget) -> Result<ImageLayout, FamilyError> {
        Ok(self.layout(&self.plan(width, height, budget)))
    }

    fn expand_prompt(&self, prompt: &str, layouts: &[ImageLayout]) -> Result<String, FamilyError> {
        expand_placeholders(prompt, &self.tokens.image, layouts, |layout| self.image_text(layout))
    }
}

impl Idefics3 {
    /// Normalize every frame into one zero-padded `[n, 3, H, W]` batch (H, W the largest frame)
    /// with its `[n, H, W]` validity mask, as the processor's `do_pad`. We always pad: a batch
    /// tensor needs one size, and same-size frames (the usual case) are unchanged by it.
    fn batch(&self, frames: &[RgbImage]) -> (Array4<f32>, Array3<bool>) {
        let height = frames.iter().map(|f| f.height()).max().unwrap_or(self.tile) as usize;
        let width = frames.iter().map(|f| f.width()).max().unwrap_or(self.tile) as usize;
        let mut pixels = Array4::<f32>::zeros((frames.len(), 3, height, width));
        let mut mask = Array3::from_elem((frames.len(), height, width), false);
        for (i, frame) in frames.iter().enumerate() {
            self.normalization.write_chw(frame, pixels.slice_mut(s![i, .., .., ..]));
            mask.slice_mut(s![i, ..frame.height() as usize, ..frame.width() as usize]).fill(true);
        }
        (pixels, mask)
    }
}

/// `get_resize_output_image_size`: the longest edge becomes `edge`, the other keeps the aspect
/// ratio (truncated, then rounded up to even), then both are capped at 4096.
fn longest_edge_size(width: u32, height: u32, edge: u32) -> (u32, u32) {
    let (width, height) = rescale_to_max_len(width, height, edge);
    scale_below_upper_bound(width, height, MAX_IMAGE_SIZE)
}

/// `_resize_output_size_rescale_to_max_len` with `min_len` 1; the float arithmetic is Python's.
fn rescale_to_max_len(width: u32, height: u32, max_len: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (mut width, mut height) = (width, height);
    if width >= height {
        width = max_len;
        height = (f64::from(width) / aspect) as u32;
        height += height % 2;
    } else {
        height = max_len;
        width = (f64::from(height) * aspect) as u32;
        width += width % 2;
    }
    (width.max(1), height.max(1))
}

/// `_resize_output_size_scale_below_upper_bound`.
fn scale_below_upper_bound(width: u32, height: u32, max_len: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (mut width, mut height) = (width, height);
    if width >= height && width > max_len {
        width = max_len;
        height = (f64::from(width) / aspect) as u32;
    } else if height > width && height > max_len {
        height = max_len;
        width = (f64::from(height) * aspect) as u32;
    }
    (width.max(1), height.max(1))
}

/// `resize_for_vision_encoder`: the longer side rounds up to whole tiles, the other follows the
/// aspect ratio and then rounds up to whole tiles too.
fn whole_tiles_size(width: u32, height: u32, tile: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let round_up = |n: u32| n.div_ceil(tile) * tile;
    if width >= height {
        let width = round_up(width);
        // max(1): a truncation to 0 would make an empty image, which Python would reject.
        let height = ((f64::from(width) / aspect) as u32).max(1);
        (width, round_up(height))
    } else {
        let height = round_up(height);
        let width = ((f64::from(height) * aspect) as u32).max(1);
        (round_up(width), height)
    }
}

/// What this family reads from `config.json`; absent or null keys take transformers' defaults.
#[derive(Debug, Deserialize)]
struct Config {
    image_token_id: Option<u32>,
    vision_config: Option<VisionConfig>,
    scale_factor: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct VisionConfig {
    image_size: Option<u64>,
    patch_size: Option<u64>,
}

impl Config {
    /// transformers' formula: `(image_size // patch_size) ** 2 / scale_factor ** 2`, truncated.
    fn image_seq_len(&self) -> Result<usize, FamilyError> {
        let vision = self.vision_config.as_ref();
        let image_size = vision.and_then(|v| v.image_size).unwrap_or(224);
        let patch_size = vision.and_then(|v| v.patch_size).unwrap_or(32);
        let scale = self.scale_factor.unwrap_or(2);
        // Checked and saturating: a zero or absurd setting must not panic.
        let tokens = image_size
            .checked_div(patch_size)
            .map(|side| side.saturating_pow(2) / scale.saturating_pow(2).max(1))
            .unwrap_or(0);
        match usize::try_from(tokens) {
            Ok(n) if n > 0 && scale > 0 => Ok(n),
            _ => Err(invalid(CONFIG, format!("vision_config and scale_factor give {tokens} image tokens per tile"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// SmolVLM-256M-Instruct's settings (ANCHORS.md).
    fn smolvlm(split: bool) -> Idefics3 {
        let config = json!({
            "model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4,
            "vision_config": {"image_size": 512, "patch_size": 16},
        });
        let processor = json!({
            "do_image_splitting": split, "size": {"longest_edge": 2048},
            "max_image_size": {"longest_edge": 512}, "resample": 1,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        });
        Idefics3::from_configs(&config, &processor).unwrap()
    }

    #[test]
    fn smolvlm_square_image_is_sixteen_tiles_and_a_global() {
        let family = smolvlm(true);
        assert_eq!(family.image_seq_len, 64);
        assert_eq!(family.image_token_id(), 49190);
        assert_eq!(
            family.plan(512, 512, ImageBudget::default()),
            Plan { resized: (2048, 2048), tiled: (2048, 2048), rows: 4, cols: 4 }
        );
        assert_eq!(family.image_layout(512, 512, ImageBudget::default()).unwrap().tokens, 1088);
        assert_eq!(smolvlm(false).image_layout(512, 512, ImageBudget::default()).unwrap().tokens, 64);
    }

    #[test]
    fn budgets_cost_fewer_tiles() {
        let family = smolvlm(true);
        let low = ImageBudget { detail: Detail::Low, max_pixels: None };
        assert_eq!(family.image_layout(512, 512, low).unwrap().tokens, 64);
        // At most 1024x1024 pixels: a 1024 longest edge is 2x2 tiles and the global image.
        let capped = ImageBudget { detail: Detail::High, max_pixels: Some(1024 * 1024) };
        assert_eq!(family.plan(512, 512, capped).rows, 2);
        assert_eq!(family.image_layout(512, 512, capped).unwrap().tokens, 5 * 64);
    }

    #[test]
    fn wide_and_tiny_images() {
        let family = smolvlm(true);
        // 190x70: 2048 x int(2048 / (190/70)) = 754 -> even 754; to tiles 2048 x 1024.
        assert_eq!(
            family.plan(190, 70, ImageBudget::default()),
            Plan { resized: (2048, 754), tiled: (2048, 1024), rows: 2, cols: 4 }
        );
        assert_eq!(family.image_layout(190, 70, ImageBudget::default()).unwrap().tokens, 9 * 64);
        // 1x1 upscales to 2048x2048.
        assert_eq!(family.plan(1, 1, ImageBudget::default()).rows, 4);
        // Extreme aspect: height truncates to 0, min 1, then a whole tile.
        assert_eq!(
            family.plan(10_000, 1, ImageBudget::default()),
            Plan { resized: (2048, 1), tiled: (2048, 512), rows: 1, cols: 4 }
        );
    }

    #[test]
    fn odd_short_edge_rounds_up_to_even() {
        // 2048 / (300/101) = 689.5 -> 689 -> 690.
        assert_eq!(rescale_to_max_len(300, 101, 2048), (2048, 690));
        assert_eq!(rescale_to_max_len(101, 300, 2048), (690, 2048));
        assert_eq!(longest_edge_size(100, 50, 8192), (4096, 2048));
    }

    #[test]
    fn unsplit_prompt_is_one_global_block() {
        let family = smolvlm(false);
        let layout = family.layout(&family.plan(30, 20, ImageBudget::default()));
        assert_eq!(layout, ImageLayout { grid: [1, 0, 0], tokens: 64 });
        let text = family.expand_prompt("A<image>B", &[layout]).unwrap();
        let expected =
            format!("A<fake_token_around_image><global-img>{}<fake_token_around_image>B", "<image>".repeat(64));
        assert_eq!(text, expected);
    }

    #[test]
    fn split_prompt_has_rows_columns_and_global() {
        let mut family = smolvlm(true);
        family.image_seq_len = 1;
        let layout = ImageLayout { grid: [1, 2, 2], tokens: 5 };
        let text = family.expand_prompt("<image>?", &[layout]).unwrap();
        let f = "<fake_token_around_image>";
        let expected = format!(
            "{f}<row_1_col_1><image>{f}<row_1_col_2><image>\n{f}<row_2_col_1><image>{f}<row_2_col_2><image>\n\n{f}<global-img><image>{f}?"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn placeholder_count_must_match() {
        let family = smolvlm(false);
        let layout = ImageLayout { grid: [1, 0, 0], tokens: 64 };
        let err = family.expand_prompt("<image><image>", &[layout]).unwrap_err();
        assert!(matches!(err, FamilyError::ImageCountMismatch { placeholders: 2, images: 1 }));
    }

    #[test]
    fn processed_frames_match_layout() {
        let family = smolvlm(true);
        let image = RgbImage::from_pixel(40, 20, image::Rgb([255, 0, 128]));
        let processed = family.process_images(&[image], &[]).unwrap();
        assert_eq!(processed.layouts, vec![ImageLayout { grid: [1, 2, 4], tokens: 9 * 64 }]);
        let TensorData::F32(pixels) = &processed.inputs[0].data else { panic!("pixel_values is f32") };
        assert_eq!(pixels.shape(), &[9, 3, 512, 512]);
        assert_eq!(pixels[[8, 0, 100, 100]], 1.0);
        let TensorData::Bool(mask) = &processed.inputs[1].data else { panic!("mask is bool") };
        assert!(mask.iter().all(|&v| v));
    }

    #[test]
    fn reads_processor_config_shape_and_defaults() {
        let processor = json!({"image_seq_len": 64, "image_processor": {"max_image_size": {"longest_edge": 512}}});
        let family = Idefics3::from_configs(&json!({}), &processor).unwrap();
        assert_eq!((family.tile, family.longest_edge, family.image_seq_len), (512, Some(1456), 64));
        assert_eq!(family.image_token_id(), 128_257);
        let bad = Idefics3::from_configs(&json!({}), &json!({"resample": 7}));
        assert!(matches!(bad, Err(FamilyError::InvalidConfig { .. })));
        let typo = Idefics3::from_configs(&json!({"vision_config": {"patch_size": "16"}}), &json!({}));
        assert!(
            matches!(&typo, Err(FamilyError::InvalidConfig { file: "config.json", message }) if message.starts_with("vision_config.patch_size:")),
            "{typo:?}"
        );
    }
}
