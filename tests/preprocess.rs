//! Image preprocessing against Pillow and transformers: Pillow-exact resizing, PIL-equivalent
//! decoding (cases from `vlmexport.fixtures.make_resize_cases`), the Idefics3 and Qwen2-VL processors'
//! pixel values, grids and positions for every fixture case, and rejection of bad input.

mod common;

use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::ArrayD;
use serde::Deserialize;
use vlmserve::family::{Family, Idefics3, TensorData};
use vlmserve::preprocess::{Filter, ImageLimits, PreprocessError, decode_image, resize};

fn resize_dir() -> PathBuf {
    common::root().join("tests/fixtures/resize")
}

#[derive(Deserialize)]
struct Cases {
    pillow: String,
    resize: Vec<ResizeCase>,
    decode: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct ResizeCase {
    input: String,
    output: String,
    filter: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct DecodeCase {
    file: String,
    expected: String,
    exact: bool,
}

fn cases() -> Cases {
    let text =
        std::fs::read_to_string(resize_dir().join("cases.json")).expect("run vlmexport.fixtures.make_resize_cases");
    serde_json::from_str(&text).unwrap()
}

/// A PNG written by PIL in RGB mode, read without our decoder in the way.
fn read_rgb_png(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_rgb8()
}

fn filter(name: &str) -> Filter {
    match name {
        "NEAREST" => Filter::Nearest,
        "BOX" => Filter::Box,
        "BILINEAR" => Filter::Bilinear,
        "HAMMING" => Filter::Hamming,
        "BICUBIC" => Filter::Bicubic,
        "LANCZOS" => Filter::Lanczos,
        other => panic!("unknown filter {other}"),
    }
}

#[test]
fn resize_is_bit_exact_with_pillow() {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases.resize {
        let input = read_rgb_png(&resize_dir().join(&case.input));
        let expected = read_rgb_png(&resize_dir().join(&case.output));
        let ours = resize(&input, case.width, case.height, filter(&case.filter));
        assert_eq!(ours.dimensions(), expected.dimensions(), "{}", case.output);
        let differing = ours.as_raw().iter().zip(expected.as_raw()).filter(|(a, b)| a != b).count();
        if differing > 0 {
            failures.push(format!("{}: {differing} samples differ", case.output));
        }
    }
    assert!(failures.is_empty(), "resize differs from Pillow {}:\n{}", cases.pillow, failures.join("\n"));
}

/// Lossy codecs (JPEG, lossy WebP) are decoded by different libraries than PIL's libjpeg-turbo
/// and libwebp, so they may differ slightly; everything else must match PIL exactly.
const LOSSY_TOLERANCE: u8 = 8;

#[test]
fn decoding_matches_pil_convert_to_rgb() {
    let mut failures = Vec::new();
    for case in &cases().decode {
        let bytes = std::fs::read(resize_dir().join(&case.file)).unwrap();
        let expected = read_rgb_png(&resize_dir().join(&case.expected));
        let ours = match decode_image(&bytes, &ImageLimits::default()) {
            Ok(image) => image,
            Err(e) => {
                failures.push(format!("{}: {e}", case.file));
                continue;
            }
        };
        if ours.dimensions() != expected.dimensions() {
            failures.push(format!("{}: size {:?}, PIL {:?}", case.file, ours.dimensions(), expected.dimensions()));
            continue;
        }
        let diffs: Vec<u8> = ours.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let identical = diffs.iter().filter(|&&d| d == 0).count() as f64 / diffs.len() as f64;
        println!("{}: max difference {max}, {:.2}% identical", case.file, identical * 100.0);
        if (case.exact && max > 0) || max > LOSSY_TOLERANCE {
            failures.push(format!("{}: max difference {max}", case.file));
        }
    }
    assert!(failures.is_empty(), "decoding differs from PIL:\n{}", failures.join("\n"));
}

/// How far our pixel values may be from the processor's: one uint8 step after normalizing with
/// std 0.5 (2/255), plus float rounding.
const PIXEL_TOLERANCE: f32 = 2.0 / 255.0 + 1e-5;
const IDENTICAL: f32 = 1e-6;

#[test]
fn idefics3_pixels_and_prompts_match_the_processor() {
    for reference in common::references().into_iter().filter(|r| r.family == "idefics3") {
        let package = reference.package_dir();
        let family = idefics3_for(&package);
        for case in &reference.cases {
            let images = case.decoded_images(&reference.dir);
            let processed = family.process_images(&images, &[]).unwrap();
            let expanded = family.expand_prompt(&case.prompt, &processed.layouts).unwrap();
            assert_eq!(expanded, case.expanded_prompt, "{}: expanded prompt", case.name);
            let (Some(pixels), Some(mask)) = (&case.pixel_values, &case.pixel_attention_mask) else {
                continue;
            };
            let TensorData::F32(ours) = &processed.inputs[0].data else { panic!("pixel_values is f32") };
            let theirs = common::unbatch(common::read_array::<f32>(&reference.dir, pixels));
            compare_pixels(&case.name, ours, &theirs);
            let TensorData::Bool(our_mask) = &processed.inputs[1].data else { panic!("mask is bool") };
            let their_mask = common::unbatch(common::read_array::<bool>(&reference.dir, mask));
            assert_eq!(our_mask, &their_mask, "{}: pixel_attention_mask", case.name);
        }
    }
}

fn idefics3_for(package: &Path) -> Idefics3 {
    let (config, processor) = package_settings(package);
    Idefics3::from_configs(&config, &processor).unwrap()
}

/// `config.json` and the image-processor settings of a package.
fn package_settings(package: &Path) -> (serde_json::Value, serde_json::Value) {
    let read = |name: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(package.join(name)).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}")))
    };
    let config = read("config.json").expect("config.json");
    // Prefer preprocessor_config.json; otherwise processor_config.json's nested shape.
    let processor =
        read("preprocessor_config.json").or_else(|| read("processor_config.json")).expect("processor settings");
    (config, processor)
}

/// Every family's layouts from an image's size alone equal those its processing gives, at
/// every budget: prompts whose features are cached are expanded from them.
#[test]
fn layouts_from_sizes_equal_the_processed_layouts() {
    use vlmserve::family::{Detail, ImageBudget};
    for reference in common::references() {
        let (config, processor) = package_settings(&reference.package_dir());
        let family = vlmserve::family::for_model_type(&config, &processor).unwrap();
        for (width, height) in [(512, 512), (190, 70), (640, 480), (33, 900), (1000, 300)] {
            let image = RgbImage::from_pixel(width, height, image::Rgb([10, 200, 30]));
            for detail in [Detail::Auto, Detail::Low, Detail::High] {
                for max_pixels in [None, Some(200_000)] {
                    let budget = ImageBudget { detail, max_pixels };
                    let processed = family.process_images(std::slice::from_ref(&image), &[budget]).unwrap();
                    let from_size = family.image_layout(width, height, budget).unwrap();
                    assert_eq!(processed.layouts, [from_size], "{} {width}x{height} {budget:?}", reference.family);
                }
            }
        }
    }
}

/// Qwen2-VL normalizes with the CLIP std (~0.27): transformers' float32 arithmetic, which we
/// repeat, leaves nothing but rounding.
const QWEN_PIXEL_TOLERANCE: f32 = 1e-4;

#[test]
fn qwen2_vl_pixels_grids_and_positions_match_the_processor() {
    let references: Vec<_> = common::references().into_iter().filter(|r| r.family == "qwen2_vl").collect();
    assert_eq!(references.len(), 2, "Qwen2-VL and Qwen2.5-VL fixtures");
    for reference in references {
        let (config, processor) = package_settings(&reference.package_dir());
        let family = vlmserve::family::for_model_type(&config, &processor).unwrap();
        for case in &reference.cases {
            let name = format!("{} {}", config["model_type"], case.name);
            let images = case.decoded_images(&reference.dir);
            let processed = family.process_images(&images, &[]).unwrap();
            let expanded = family.expand_prompt(&case.prompt, &processed.layouts).unwrap();
            assert_eq!(expanded, case.expanded_prompt, "{name}: expanded prompt");
            let positions = family.prompt_positions(&case.input_ids, &processed.layouts);
            let theirs = common::read_array::<i64>(&reference.dir, &case.array("position_ids").unwrap());
            assert_eq!(positions.prompt, theirs, "{name}: position ids");
            assert_eq!(positions.next, theirs.iter().max().unwrap() + 1, "{name}: first decode position");
            if images.is_empty() {
                continue;
            }
            let grids = common::read_array::<i64>(&reference.dir, &case.array("image_grid_thw").unwrap());
            let ours: Vec<i64> = processed.layouts.iter().flat_map(|l| l.grid.map(|g| g as i64)).collect();
            assert_eq!(ours, grids.iter().copied().collect::<Vec<_>>(), "{name}: image_grid_thw");
            for input in &processed.inputs {
                let recorded = case.array(&input.name).unwrap_or_else(|| panic!("{name}: {} not recorded", input.name));
                match &input.data {
                    TensorData::F32(ours) => {
                        let theirs = common::read_array::<f32>(&reference.dir, &recorded);
                        assert_eq!(ours.shape(), theirs.shape(), "{name}: {} shape", input.name);
                        let largest = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                        assert!(largest <= QWEN_PIXEL_TOLERANCE, "{name}: {} differs by {largest}", input.name);
                    }
                    TensorData::I64(ours) => {
                        assert_eq!(
                            ours,
                            &common::read_array::<i64>(&reference.dir, &recorded),
                            "{name}: {}",
                            input.name
                        );
                    }
                    TensorData::Bool(_) => panic!("{name}: Qwen2-VL has no boolean inputs"),
                }
            }
        }
    }
}

#[test]
fn qwen2_vl_image_budgets_bound_the_tokens() {
    use vlmserve::family::{Detail, ImageBudget};
    let reference = common::references().into_iter().find(|r| r.family == "qwen2_vl").unwrap();
    let (config, mut processor) = package_settings(&reference.package_dir());
    processor["image_processor"]["low_detail_max_pixels"] = serde_json::json!(8 * 28 * 28);
    let family = vlmserve::family::for_model_type(&config, &processor).unwrap();
    let image = RgbImage::from_pixel(640, 480, image::Rgb([10, 200, 30]));
    let tokens = |budget: ImageBudget| {
        let processed = family.process_images(std::slice::from_ref(&image), &[budget]).unwrap();
        assert_eq!(
            processed.total_tokens(),
            family.image_layout(640, 480, budget).unwrap().tokens,
            "estimate = actual"
        );
        processed.total_tokens()
    };
    let high = tokens(ImageBudget { detail: Detail::High, max_pixels: None });
    let low = tokens(ImageBudget { detail: Detail::Low, max_pixels: None });
    let capped = tokens(ImageBudget { detail: Detail::Auto, max_pixels: Some(12 * 28 * 28) });
    // transformers' smart_resize of 480x640 within 32, 8 and 12 tokens' worth of pixels:
    // 112x168 (24 tokens), 56x84 (6), 84x112 (12).
    assert_eq!((high, low, capped), (24, 6, 12));
    // A budget above the server's cap changes nothing.
    assert_eq!(tokens(ImageBudget { detail: Detail::High, max_pixels: Some(1 << 30) }), high);
}

fn compare_pixels(name: &str, ours: &ArrayD<f32>, theirs: &ArrayD<f32>) {
    assert_eq!(ours.shape(), theirs.shape(), "{name}: pixel_values shape");
    let mut largest = 0.0f32;
    let mut identical = 0usize;
    for (a, b) in ours.iter().zip(theirs) {
        let d = (a - b).abs();
        largest = largest.max(d);
        identical += usize::from(d <= IDENTICAL);
    }
    let fraction = identical as f64 / ours.len() as f64;
    println!("{name}: largest pixel difference {largest:.6}, {:.4}% identical", fraction * 100.0);
    assert!(largest <= PIXEL_TOLERANCE, "{name}: largest difference {largest}");
    assert!(fraction >= 0.99, "{name}: only {:.4}% identical", fraction * 100.0);
}

// --- bad input -------------------------------------------------------------------------------

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    chunk
}

/// CRC-32 (ISO-HDLC) as PNG chunks use it, bit by bit: tests only need a few bytes.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG signature and IHDR (8-bit RGB) claiming `width` x `height`, followed by `rest`.
fn png_with_header(width: u32, height: u32, rest: &[u8]) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend_from_slice(rest);
    png
}

fn decode(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    decode_image(bytes, &ImageLimits::default())
}

#[test]
fn crc_matches_known_value() {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}

#[test]
fn huge_header_is_rejected_before_decoding() {
    let mut rest = png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    rest.extend(png_chunk(b"IEND", &[]));
    let err = decode(&png_with_header(100_000, 100_000, &rest)).unwrap_err();
    assert!(matches!(err, PreprocessError::TooLarge { width: 100_000, height: 100_000, .. }), "{err}");
}

#[test]
fn truncated_png_is_reported_as_truncated() {
    let full = std::fs::read(resize_dir().join("in_d.png")).unwrap();
    for cut in [full.len() / 2, full.len() - 20, 40] {
        let err = decode(&full[..cut]).unwrap_err();
        assert!(matches!(err, PreprocessError::Truncated(_)), "cut at {cut}: {err:?}");
    }
}

/// PIL refuses a cut-off JPEG ("image file is truncated"); the image crate's decoder would fill
/// the rest with gray.
#[test]
fn truncated_jpeg_is_reported_as_truncated() {
    for file in ["color420.jpg", "gray.jpg"] {
        let full = std::fs::read(resize_dir().join("decode").join(file)).unwrap();
        assert!(decode(&full).is_ok());
        for cut in [full.len() / 2, full.len() - 2] {
            let err = decode(&full[..cut]).unwrap_err();
            assert!(matches!(err, PreprocessError::Truncated(_)), "{file} cut at {cut}: {err:?}");
        }
        // Bytes after the end marker are ignored, as PIL ignores them.
        let mut padded = full.clone();
        padded.extend_from_slice(b"trailing");
        assert!(decode(&padded).is_ok(), "{file} with trailing bytes");
    }
}

#[test]
fn corrupt_data_is_a_decode_error() {
    // A valid header with image data that is not zlib.
    let mut rest = png_chunk(b"IDAT", b"this is not a zlib stream at all");
    rest.extend(png_chunk(b"IEND", &[]));
    let err = decode(&png_with_header(4, 4, &rest)).unwrap_err();
    assert!(matches!(err, PreprocessError::Decode(_)), "{err:?}");
    // A JPEG start marker followed by garbage.
    let err = decode(b"\xff\xd8\xff\xe0 garbage garbage garbage garbage garbage").unwrap_err();
    assert!(matches!(err, PreprocessError::Decode(_) | PreprocessError::Truncated(_)), "{err:?}");
}

#[test]
fn empty_unknown_and_oversized_inputs() {
    assert!(matches!(decode(b""), Err(PreprocessError::Empty)));
    let err = decode(b"Hello, this is plain text and not an image.").unwrap_err();
    assert!(matches!(err, PreprocessError::UnsupportedFormat(_)), "{err:?}");
    let limits = ImageLimits { max_bytes: 10, ..ImageLimits::default() };
    let err = decode_image(&[0u8; 11], &limits).unwrap_err();
    assert!(matches!(err, PreprocessError::TooManyBytes { bytes: 11, limit: 10 }), "{err:?}");
}

#[test]
fn garbage_never_panics() {
    let full = std::fs::read(resize_dir().join("in_a.png")).unwrap();
    let mut state = 0x1234_5678u32;
    for _ in 0..200 {
        let mut bytes = full.clone();
        for _ in 0..8 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let i = state as usize % bytes.len();
            bytes[i] ^= (state >> 24) as u8;
        }
        let _ = decode(&bytes);
    }
}
