//! The Qwen2-VL family: Qwen2-VL and Qwen2.5-VL.
//!
//! Images keep their aspect ratio: transformers' `smart_resize` picks a size in multiples of
//! `patch_size * merge_size` whose area lies in `[min_pixels, max_pixels]`, so each image costs
//! its own number of tokens. Pixels are resized, rescaled and normalized as
//! `Qwen2VLImageProcessorPil` (5.23) does, then cut into patches, each repeated over the
//! temporal patch and flattened in the processor's order (merge blocks of 2x2 patches kept
//! together). The vision encoder also takes what transformers derives from `image_grid_thw`
//! in Python (`transformers.vision_utils`): each patch's row and column, the frame it attends
//! within, and for Qwen2.5-VL the window order and windows. Prompt positions are the
//! three-axis (time, row, column) positions of `get_rope_index`; decoding continues after the
//! largest one.

use image::RgbImage;
use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn};
use serde::Deserialize;
use serde_json::Value;

use super::settings::{CONFIG, ImageProcessorSettings, PROCESSOR, invalid, positive, read_config};
use super::{
    Detail, Family, FamilyError, ImageBudget, ImageLayout, NamedTensor, Positions, ProcessedImages, TensorData,
    expand_placeholders,
};
use crate::preprocess::normalize::Normalization;
use crate::preprocess::{Filter, resize};

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`, the image processor's defaults.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `smart_resize` refuses images longer than this many times their width (or the reverse).
const MAX_ASPECT_RATIO: f64 = 200.0;

/// What `detail: low` allows an image by default: 256 image tokens.
const LOW_DETAIL_TOKENS: u64 = 256;

/// Settings of one Qwen2-VL-style model; pure, shared by all requests.
#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    name: &'static str,
    image_token_id: u32,
    patch: usize,
    merge: usize,
    temporal: usize,
    min_pixels: u64,
    max_pixels: u64,
    /// The cap `detail: low` puts on `max_pixels`.
    low_detail_max_pixels: u64,
    resize: bool,
    filter: Filter,
    normalization: Normalization,
    /// Qwen2.5-VL: merged tokens per side of an attention window.
    window: Option<usize>,
}

/// What this family reads from `config.json`; absent or null keys take transformers' defaults.
#[derive(Debug, Deserialize)]
struct Config {
    model_type: Option<String>,
    image_token_id: Option<u32>,
    vision_config: Option<VisionConfig>,
}

#[derive(Debug, Deserialize)]
struct VisionConfig {
    window_size: Option<u64>,
}

impl Qwen2Vl {
    /// Read settings from `config.json` and the image-processor settings (either shape, see
    /// [`ImageProcessorSettings`]). Besides transformers' keys, `low_detail_max_pixels` (ours) sets what
    /// `detail: low` allows.
    pub fn from_configs(config: &Value, processor: &Value) -> Result<Self, FamilyError> {
        let config: Config = read_config(config)?;
        let settings = ImageProcessorSettings(processor);
        let count = |key: &str, default: i64| -> Result<usize, FamilyError> {
            positive(settings.int(key)?.unwrap_or(default), key)
        };
        let (patch, merge, temporal) =
            (count("patch_size", 14)?, count("merge_size", 2)?, count("temporal_patch_size", 2)?);
        let size = settings.get("size");
        // As the processor's constructor: `min_pixels` / `max_pixels` win over `size`, whose
        // keys older packages name like them.
        let pixels = |size_key: &str, key: &str, default: i64| -> Result<u64, FamilyError> {
            let in_size = |k: &str| size.and_then(|s| s.get(k)).and_then(Value::as_i64);
            let value = settings.int(key)?.or_else(|| in_size(size_key)).or_else(|| in_size(key));
            Ok(positive(value.unwrap_or(default), key)? as u64)
        };
        let factor = (patch * merge) as u64;
        let resample = settings.int("resample")?.unwrap_or(3);
        let window =
            match config.model_type.as_deref() {
                Some("qwen2_5_vl") => {
                    let size = config.vision_config.and_then(|v| v.window_size).unwrap_or(112);
                    Some(usize::try_from(size / factor).ok().filter(|&w| w > 0).ok_or_else(|| {
                        invalid(CONFIG, format!("window_size {size} is smaller than one merged patch"))
                    })?)
                }
                _ => None,
            };
        Ok(Self {
            name: if window.is_some() { "qwen2_5_vl" } else { "qwen2_vl" },
            image_token_id: config.image_token_id.unwrap_or(151_655),
            patch,
            merge,
            temporal,
            min_pixels: pixels("shortest_edge", "min_pixels", 56 * 56)?,
            max_pixels: pixels("longest_edge", "max_pixels", 28 * 28 * 1280)?,
            low_detail_max_pixels: settings
                .int("low_detail_max_pixels")?
                .map_or(Ok(LOW_DETAIL_TOKENS * factor * factor), |n| {
                    positive(n, "low_detail_max_pixels").map(|n| n as u64)
                })?,
            resize: settings.flag("do_resize")?,
            filter: Filter::from_pil(resample)
                .ok_or_else(|| invalid(PROCESSOR, format!("unsupported resample filter {resample}")))?,
            normalization: settings.normalization((CLIP_MEAN, CLIP_STD))?,
            window,
        })
    }

    fn factor(&self) -> usize {
        self.patch * self.merge
    }

    /// The largest area an image may be resized to under `budget`.
    fn max_pixels(&self, budget: ImageBudget) -> u64 {
        let mut max = self.max_pixels;
        if budget.detail == Detail::Low {
            max = max.min(self.low_detail_max_pixels);
        }
        budget.max_pixels.map_or(max, |cap| max.min(cap))
    }

    /// (width, height) the processor resizes an image to, or why it refuses it.
    fn target_size(&self, width: u32, height: u32, budget: ImageBudget) -> Result<(usize, usize), FamilyError> {
        if !self.resize {
            let fits = |side: u32| (side as usize).is_multiple_of(self.factor());
            return match fits(width) && fits(height) {
                true => Ok((width as usize, height as usize)),
                false => Err(FamilyError::UnsupportedImage(format!(
                    "{width}x{height} is not a multiple of {} and resizing is off",
                    self.factor()
                ))),
            };
        }
        let (h, w) =
            smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels(budget)).ok_or_else(|| {
                FamilyError::UnsupportedImage(format!(
                    "{width}x{height} is more than {MAX_ASPECT_RATIO} times longer than wide (or the reverse)"
                ))
            })?;
        Ok((w, h))
    }

    /// The patch grid of one image.
    fn layout(&self, width: usize, height: usize) -> ImageLayout {
        let (rows, cols) = (height / self.patch, width / self.patch);
        ImageLayout { grid: [1, rows, cols], tokens: rows * cols / (self.merge * self.merge) }
    }

    /// Normalized `[3, h, w]` pixels of one image at its target size.
    fn pixels(&self, image: &RgbImage, (width, height): (usize, usize)) -> ndarray::Array3<f32> {
        let resized;
        let image = if (image.width() as usize, image.height() as usize) == (width, height) {
            image
        } else {
            resized = resize(image, width as u32, height as u32, self.filter);
            &resized
        };
        let mut chw = ndarray::Array3::<f32>::zeros((3, height, width));
        self.normalization.write_chw(image, chw.view_mut());
        chw
    }

    /// Rows `[patches, 3 * temporal * patch * patch]` in the processor's order: merge blocks
    /// row-major, patches row-major within a block, each patch channel, time, y, x.
    fn write_patches(&self, chw: &ndarray::Array3<f32>, layout: &ImageLayout, out: &mut Vec<f32>) {
        let p = self.patch;
        for (row, col) in self.patch_order(layout) {
            for channel in 0..3 {
                let patch = chw.slice(ndarray::s![channel, row * p..(row + 1) * p, col * p..(col + 1) * p]);
                for _ in 0..self.temporal {
                    out.extend(patch.iter());
                }
            }
        }
    }

    /// (row, column) of each patch of one frame, in the encoder's order.
    fn patch_order(&self, layout: &ImageLayout) -> impl Iterator<Item = (usize, usize)> + '_ {
        let [_, rows, cols] = layout.grid;
        let m = self.merge;
        (0..rows / m).flat_map(move |br| {
            (0..cols / m).flat_map(move |bc| (0..m).flat_map(move |r| (0..m).map(move |c| (br * m + r, bc * m + c))))
        })
    }

    /// `vision_position_ids`, `attention_segments` and, with windows, `window_patch_index` and
    /// `window_segments` for these images.
    fn encoder_positions(&self, layouts: &[ImageLayout]) -> Vec<NamedTensor> {
        let mut positions = Vec::new();
        let mut segments = Vec::new();
        let mut frame = 0i64;
        for layout in layouts {
            for _ in 0..layout.grid[0] {
                for (row, col) in self.patch_order(layout) {
                    positions.push([row as i64, col as i64]);
                    segments.push(frame);
                }
                frame += 1;
            }
        }
        let mut inputs = vec![
            named("vision_position_ids", Array2::from(positions).into_dyn()),
            named("attention_segments", Array1::from(segments).into_dyn()),
        ];
        if let Some(window) = self.window {
            let (index, windows) = self.windows(layouts, window);
            inputs.push(named("window_patch_index", Array1::from(index).into_dyn()));
            inputs.push(named("window_segments", Array1::from(windows).into_dyn()));
        }
        inputs
    }

    /// `get_vision_window_index` per patch: the patch order of window attention and the window
    /// of each patch in that order. Windows are `window` x `window` merged tokens, the last
    /// row and column of windows cut short at the image's edge.
    fn windows(&self, layouts: &[ImageLayout], window: usize) -> (Vec<i64>, Vec<i64>) {
        let unit = self.merge * self.merge;
        let (mut index, mut segments) = (Vec::new(), Vec::new());
        let (mut offset, mut segment) = (0usize, 0i64);
        for layout in layouts {
            let [frames, rows, cols] = layout.grid;
            let (rows, cols) = (rows / self.merge, cols / self.merge);
            for t in 0..frames {
                for wr in (0..rows).step_by(window) {
                    for wc in (0..cols).step_by(window) {
                        for r in wr..(wr + window).min(rows) {
                            for c in wc..(wc + window).min(cols) {
                                let merged = offset + (t * rows + r) * cols + c;
                                index.extend((0..unit).map(|k| (merged * unit + k) as i64));
                                segments.extend(std::iter::repeat_n(segment, unit));
                            }
                        }
                        segment += 1;
                    }
                }
            }
            offset += frames * rows * cols;
        }
        (index, segments)
    }
}

fn named(name: &str, data: ArrayD<i64>) -> NamedTensor {
    NamedTensor { name: name.into(), data: TensorData::I64(data) }
}

/// transformers' `smart_resize`: (height, width) in multiples of `factor`, close to the
/// original aspect ratio, with an area in `[min_pixels, max_pixels]`; `None` beyond an aspect
/// ratio of 200. Python's float arithmetic, `round` (half to even) included. Sides stay at
/// least `factor`, where transformers would fail on a zero-sized image.
fn smart_resize(height: u32, width: u32, factor: usize, min_pixels: u64, max_pixels: u64) -> Option<(usize, usize)> {
    let (h, w, f) = (f64::from(height.max(1)), f64::from(width.max(1)), factor as f64);
    if h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return None;
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Some(((h_bar as usize).max(factor), (w_bar as usize).max(factor)))
}

impl Family for Qwen2Vl {
    fn name(&self) -> &'static str {
        self.name
    }

    fn image_placeholder(&self) -> &str {
        "<|image_pad|>"
    }

    fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    fn process_images(&self, images: &[RgbImage], budgets: &[ImageBudget]) -> Result<ProcessedImages, FamilyError> {
        let mut rows = Vec::new();
        let mut layouts = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let size = self.target_size(image.width(), image.height(), ImageBudget::of(budgets, i))?;
            let layout = self.layout(size.0, size.1);
            self.write_patches(&self.pixels(image, size), &layout, &mut rows);
            layouts.push(layout);
        }
        let width = 3 * self.temporal * self.patch * self.patch;
        let pixels = Array2::from_shape_vec((rows.len() / width, width), rows)?.into_dyn();
        let mut inputs = vec![NamedTensor { name: "pixel_values".into(), data: TensorData::F32(pixels) }];
        inputs.extend(self.encoder_positions(&layouts));
        Ok(ProcessedImages { inputs, layouts, tile_tokens: None })
    }

    fn image_layout(&self, width: u32, height: u32, budget: ImageBudget) -> Result<ImageLayout, FamilyError> {
        self.target_size(width, height, budget).map(|(w, h)| self.layout(w, h))
    }

    fn expand_prompt(&self, prompt: &str, layouts: &[ImageLayout]) -> Result<String, FamilyError> {
        let placeholder = self.image_placeholder();
        expand_placeholders(prompt, placeholder, layouts, |layout| placeholder.repeat(layout.tokens))
    }

    /// `get_rope_index`: text tokens count on from the last position; an image's tokens take
    /// (time, row, column) of its merged grid, offset by the position it starts at, after which
    /// counting resumes at that offset plus the grid's longer side.
    fn prompt_positions(&self, input_ids: &[u32], layouts: &[ImageLayout]) -> Positions {
        let mut axes: [Vec<i64>; 3] = Default::default();
        let mut images = layouts.iter();
        let (mut position, mut i) = (0i64, 0usize);
        while i < input_ids.len() {
            let image = (input_ids[i] == self.image_token_id).then(|| images.next()).flatten();
            let Some(layout) = image else {
                axes.iter_mut().for_each(|axis| axis.push(position));
                position += 1;
                i += 1;
                continue;
            };
            let [frames, rows, cols] = layout.grid;
            let (rows, cols) = (rows / self.merge, cols / self.merge);
            for t in 0..frames {
                for r in 0..rows {
                    for c in 0..cols {
                        axes[0].push(position + t as i64);
                        axes[1].push(position + r as i64);
                        axes[2].push(position + c as i64);
                    }
                }
            }
            position += rows.max(cols) as i64;
            i += frames * rows * cols;
        }
        let len = axes[0].len();
        let next = axes.iter().flatten().max().map_or(0, |max| max + 1);
        // The three axes grow together, one entry per token each.
        let prompt = Array2::from_shape_fn((3, len), |(axis, i)| axes[axis][i]).insert_axis(Axis(1)).into_dyn();
        Positions { prompt, next }
    }

    fn step_positions(&self, position: i64) -> ArrayD<i64> {
        ArrayD::from_elem(IxDyn(&[3, 1, 1]), position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen(model_type: &str) -> Qwen2Vl {
        let config = json!({"model_type": model_type, "image_token_id": 9, "vision_config": {"window_size": 56}});
        let processor = json!({"size": {"shortest_edge": 3136, "longest_edge": 50176}});
        Qwen2Vl::from_configs(&config, &processor).unwrap()
    }

    #[test]
    fn smart_resize_matches_transformers_values() {
        // Values from transformers' smart_resize (factor 28, min 56*56, max 28*28*1280).
        let max = 28 * 28 * 1280;
        assert_eq!(smart_resize(72, 96, 28, 3136, max), Some((84, 84)));
        assert_eq!(smart_resize(1080, 1920, 28, 3136, max), Some((728, 1316)));
        assert_eq!(smart_resize(3, 5, 28, 3136, max), Some((56, 84)));
        // Round half to even: 42 / 28 = 1.5 rounds to 2, 70 / 28 = 2.5 rounds to 2.
        assert_eq!(smart_resize(42, 70, 28, 1, max), Some((56, 56)));
        assert_eq!(smart_resize(1, 201, 28, 3136, max), None);
    }

    #[test]
    fn detail_low_and_max_pixels_lower_the_token_count() {
        let family = Qwen2Vl { low_detail_max_pixels: 16 * 28 * 28, ..qwen("qwen2_vl") };
        let high = family.image_layout(1000, 800, ImageBudget::default()).unwrap().tokens;
        let low = family.image_layout(1000, 800, ImageBudget { detail: Detail::Low, max_pixels: None }).unwrap().tokens;
        let capped = family
            .image_layout(1000, 800, ImageBudget { detail: Detail::High, max_pixels: Some(8 * 784) })
            .unwrap()
            .tokens;
        // transformers: 196x224 (56 tokens), 84x112 (12), 56x84 (6).
        assert_eq!((high, low, capped), (56, 12, 6));
    }

    #[test]
    fn pixel_bounds_come_from_size_or_the_keys_that_override_it() {
        let config = json!({"model_type": "qwen2_vl"});
        let saved = json!({"image_processor": {"size": {"shortest_edge": 3136, "longest_edge": 50176}}});
        let family = Qwen2Vl::from_configs(&config, &saved).unwrap();
        assert_eq!((family.min_pixels, family.max_pixels), (3136, 50176));
        // `[models.processor] max_pixels = ...` lands at the top level and wins, as in transformers.
        let mut overridden = saved.clone();
        overridden["max_pixels"] = json!(12_544);
        assert_eq!(Qwen2Vl::from_configs(&config, &overridden).unwrap().max_pixels, 12_544);
        // Older packages name the size keys like the top-level ones.
        let older = json!({"size": {"min_pixels": 784, "max_pixels": 1_003_520}});
        let family = Qwen2Vl::from_configs(&config, &older).unwrap();
        assert_eq!((family.min_pixels, family.max_pixels), (784, 1_003_520));
        let err = Qwen2Vl::from_configs(&config, &json!({"max_pixels": 0})).unwrap_err();
        assert!(matches!(&err, FamilyError::InvalidConfig { file: PROCESSOR, .. }), "{err}");
        assert!(err.to_string().contains("max_pixels must be positive"), "{err}");
    }

    #[test]
    fn positions_follow_get_rope_index() {
        let family = qwen("qwen2_vl");
        // text, text, a 2x3 merged grid (4x6 patches), text.
        let layout = ImageLayout { grid: [1, 4, 6], tokens: 6 };
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let positions = family.prompt_positions(&ids, &[layout]);
        let rows: Vec<Vec<i64>> = positions.prompt.outer_iter().map(|a| a.iter().copied().collect()).collect();
        assert_eq!(rows[0], [0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(rows[1], [0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(rows[2], [0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(positions.next, 6);
    }

    #[test]
    fn windows_cover_every_patch_once_in_window_order() {
        let family = qwen("qwen2_5_vl");
        assert_eq!(family.window, Some(2));
        // A 3x3 merged grid: windows of 2x2, 2x1, 1x2 and 1x1 merged tokens.
        let layout = ImageLayout { grid: [1, 6, 6], tokens: 9 };
        let (index, segments) = family.windows(&[layout], 2);
        let merged: Vec<i64> = index.chunks(4).map(|c| c[0] / 4).collect();
        assert_eq!(merged, [0, 1, 3, 4, 2, 5, 6, 7, 8]);
        let per_window: Vec<i64> = segments.chunks(4).map(|c| c[0]).collect();
        assert_eq!(per_window, [0, 0, 0, 0, 1, 1, 2, 2, 3]);
        let mut sorted = index.clone();
        sorted.sort();
        assert_eq!(sorted, (0..36).collect::<Vec<i64>>());
    }
}
