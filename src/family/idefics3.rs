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
use serde_json::Value;

use super::{Family, FamilyError, ImageLayout, NamedTensor, ProcessedImages, TensorData};
use crate::preprocess::normalize::Normalization;
use crate::preprocess::{Filter, resize};

/// transformers' `MAX_IMAGE_SIZE`: no resized edge exceeds 4k.
const MAX_IMAGE_SIZE: u32 = 4096;

const CONFIG: &str = "config.json";
const PROCESSOR: &str = "preprocessor_config.json";

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
        let settings = Settings(processor);
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
            None => image_seq_len_from_config(config)?,
        };
        Ok(Self {
            image_token_id: image_token_id(config)?,
            image_seq_len,
            longest_edge,
            tile,
            split: settings.flag("do_image_splitting")?,
            filter,
            normalization: settings.normalization()?,
            tokens: PromptTokens {
                image: settings.token("image_token")?.unwrap_or("<image>").to_string(),
                fake: settings.token("fake_image_token")?.unwrap_or("<fake_token_around_image>").to_string(),
                global: settings.token("global_image_tag")?.unwrap_or("<global-img>").to_string(),
            },
        })
    }

    /// Where an image of this size ends up, without touching pixels.
    fn plan(&self, width: u32, height: u32) -> Plan {
        let resized = match self.longest_edge {
            Some(edge) => longest_edge_size(width, height, edge),
            None => (width, height),
        };
        if !self.split {
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

    /// Unsplit images are one frame; split ones are their tiles plus the global image.
    fn layout(&self, plan: &Plan) -> ImageLayout {
        let frames = (plan.rows * plan.cols) as usize + 1;
        ImageLayout { grid: [1, plan.rows as usize, plan.cols as usize], tokens: frames * self.image_seq_len }
    }

    /// The frames of one image, in the order the vision encoder takes them.
    fn frames(&self, image: &RgbImage) -> (Vec<RgbImage>, Plan) {
        let plan = self.plan(image.width(), image.height());
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

    fn process_images(&self, images: &[RgbImage]) -> Result<ProcessedImages, FamilyError> {
        let mut frames = Vec::new();
        let mut layouts = Vec::with_capacity(images.len());
        for image in images {
            let (image_frames, plan) = self.frames(image);
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

    fn image_tokens_for_size(&self, width: u32, height: u32) -> usize {
        self.layout(&self.plan(width, height)).tokens
    }

    fn expand_prompt(&self, prompt: &str, layouts: &[ImageLayout]) -> Result<String, FamilyError> {
        let placeholder = self.tokens.image.as_str();
        let placeholders = prompt.matches(placeholder).count();
        if placeholders != layouts.len() {
            return Err(FamilyError::ImageCountMismatch { placeholders, images: layouts.len() });
        }
        let mut pieces = prompt.split(placeholder);
        let mut expanded = pieces.next().unwrap_or_default().to_string();
        for (piece, layout) in pieces.zip(layouts) {
            expanded.push_str(&self.image_text(layout));
            expanded.push_str(piece);
        }
        Ok(expanded)
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

/// transformers' formula: `(image_size // patch_size) ** 2 / scale_factor ** 2`, truncated.
fn image_seq_len_from_config(config: &Value) -> Result<usize, FamilyError> {
    let vision = &config["vision_config"];
    let image_size = config_int(&vision["image_size"], "vision_config.image_size")?.unwrap_or(224);
    let patch_size = config_int(&vision["patch_size"], "vision_config.patch_size")?.unwrap_or(32);
    let scale = config_int(&config["scale_factor"], "scale_factor")?.unwrap_or(2);
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

fn image_token_id(config: &Value) -> Result<u32, FamilyError> {
    let id = config_int(&config["image_token_id"], "image_token_id")?.unwrap_or(128_257);
    u32::try_from(id).map_err(|_| invalid(CONFIG, format!("image_token_id {id} is out of range")))
}

fn config_int(value: &Value, key: &str) -> Result<Option<u64>, FamilyError> {
    match value {
        Value::Null => Ok(None),
        v => v.as_u64().map(Some).ok_or_else(|| invalid(CONFIG, format!("{key} must be a non-negative integer"))),
    }
}

/// A positive count from the processor settings.
fn positive(n: i64, key: &str) -> Result<usize, FamilyError> {
    usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| invalid(PROCESSOR, format!("{key} must be positive")))
}

fn invalid(file: &'static str, message: String) -> FamilyError {
    FamilyError::InvalidConfig { file, message }
}

/// Image-processor settings, in either of the shapes packages store them.
struct Settings<'a>(&'a Value);

impl<'a> Settings<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        let found = |v: &'a Value| v.get(key).filter(|v| !v.is_null());
        found(self.0).or_else(|| self.0.get("image_processor").and_then(found))
    }

    /// A boolean switch; every switch Idefics3 reads defaults to true.
    fn flag(&self, key: &str) -> Result<bool, FamilyError> {
        match self.get(key) {
            None => Ok(true),
            Some(v) => v.as_bool().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be true or false"))),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, FamilyError> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be an integer"))))
            .transpose()
    }

    /// A token string, stored plain or as a serialized `AddedToken` (`{"content": ...}`).
    fn token(&self, key: &str) -> Result<Option<&'a str>, FamilyError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .or_else(|| v["content"].as_str())
                    .ok_or_else(|| invalid(PROCESSOR, format!("{key} must be a token string")))
            })
            .transpose()
    }

    /// `{"longest_edge": n}` settings (`size`, `max_image_size`).
    fn longest_edge(&self, key: &str) -> Result<Option<u32>, FamilyError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let edge = value["longest_edge"].as_u64().and_then(|n| u32::try_from(n).ok()).filter(|&n| n > 0);
        edge.map(Some)
            .ok_or_else(|| invalid(PROCESSOR, format!("{key} must be {{\"longest_edge\": <positive integer>}}")))
    }

    fn normalization(&self) -> Result<Normalization, FamilyError> {
        let rescale_factor = match self.flag("do_rescale")? {
            true => Some(self.number("rescale_factor")?.unwrap_or(1.0 / 255.0)),
            false => None,
        };
        let mean_std = match self.flag("do_normalize")? {
            // IMAGENET_STANDARD_MEAN / _STD.
            true => Some((
                self.per_channel("image_mean")?.unwrap_or([0.5; 3]),
                self.per_channel("image_std")?.unwrap_or([0.5; 3]),
            )),
            false => None,
        };
        Ok(Normalization { rescale_factor, mean_std })
    }

    fn number(&self, key: &str) -> Result<Option<f64>, FamilyError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be a number"))))
            .transpose()
    }

    /// A number or a list of three, cast to `f32` as numpy casts mean and std.
    fn per_channel(&self, key: &str) -> Result<Option<[f32; 3]>, FamilyError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let bad = || invalid(PROCESSOR, format!("{key} must be a number or a list of 3 numbers"));
        if let Some(x) = value.as_f64() {
            return Ok(Some([x as f32; 3]));
        }
        let list = value.as_array().filter(|l| l.len() == 3).ok_or_else(bad)?;
        let mut out = [0.0; 3];
        for (dst, v) in out.iter_mut().zip(list) {
            *dst = v.as_f64().ok_or_else(bad)? as f32;
        }
        Ok(Some(out))
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
        assert_eq!(family.plan(512, 512), Plan { resized: (2048, 2048), tiled: (2048, 2048), rows: 4, cols: 4 });
        assert_eq!(family.image_tokens_for_size(512, 512), 1088);
        assert_eq!(smolvlm(false).image_tokens_for_size(512, 512), 64);
    }

    #[test]
    fn wide_and_tiny_images() {
        let family = smolvlm(true);
        // 190x70: 2048 x int(2048 / (190/70)) = 754 -> even 754; to tiles 2048 x 1024.
        assert_eq!(family.plan(190, 70), Plan { resized: (2048, 754), tiled: (2048, 1024), rows: 2, cols: 4 });
        assert_eq!(family.image_tokens_for_size(190, 70), 9 * 64);
        // 1x1 upscales to 2048x2048.
        assert_eq!(family.plan(1, 1).rows, 4);
        // Extreme aspect: height truncates to 0, min 1, then a whole tile.
        assert_eq!(family.plan(10_000, 1), Plan { resized: (2048, 1), tiled: (2048, 512), rows: 1, cols: 4 });
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
        let layout = family.layout(&family.plan(30, 20));
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
        let processed = family.process_images(&[image]).unwrap();
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
    }
}
