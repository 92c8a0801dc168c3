//! Decoding untrusted image bytes into RGB, the way transformers' PIL backend sees them.
//!
//! The reference is `PIL.Image.open` followed by transformers' `convert_to_rgb`, which is what
//! `Idefics3ImageProcessorPil` applies to PIL images: anything with an alpha channel or a
//! transparency key is composited onto opaque white (not alpha-dropped), and 16-bit data is
//! reduced the way PIL's unpackers and converters reduce it.

use std::io::Cursor;

use image::error::{ImageError, LimitErrorKind};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::PreprocessError;

/// Bounds on what [`decode_image`] accepts, checked before any pixel memory is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width x height.
    pub max_pixels: u64,
    /// Largest width or height.
    pub max_side: u32,
    /// Largest encoded input.
    pub max_bytes: usize,
}

impl Default for ImageLimits {
    /// 50 megapixels (a 48 MP phone photo fits), 16384 pixels a side, 50 MiB encoded.
    fn default() -> Self {
        Self { max_pixels: 50_000_000, max_side: 16_384, max_bytes: 50 << 20 }
    }
}

/// Bytes per pixel of the widest layout a decoder may produce (RGBA, 16 bits per sample).
const WIDEST_PIXEL: u64 = 8;
/// Room for decoder state beyond the output buffer (palettes, Huffman tables, row buffers).
const DECODER_SLACK: u64 = 64 << 20;

/// Decode PNG, JPEG, WebP, GIF (first frame) or BMP bytes into an RGB image.
///
/// The format is guessed from the content. The header's dimensions are checked against `limits`
/// before decoding, so a tiny file claiming a huge image costs nothing. Never panics on bad input.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::TooManyBytes { bytes: bytes.len(), limit: limits.max_bytes });
    }
    // Guessing fails only on I/O errors, which reading from memory does not have.
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(PreprocessError::UnsupportedFormat("unrecognized data".into()));
    };
    // The JPEG decoder fills a cut-off image with gray; PIL (the reference) refuses it.
    if format == image::ImageFormat::Jpeg && !jpeg_is_whole(bytes) {
        return Err(PreprocessError::Truncated("Jpeg: the data ends before the image's end marker".into()));
    }
    reader.limits(header_limits(limits));
    // Building the decoder parses only the header.
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(e, format))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    decoder.set_limits(decoder_limits(limits)).map_err(|e| decode_error(e, format))?;
    // Turn the picture upright as its EXIF orientation says (phones store them sideways), as
    // transformers' `load_image` does; unreadable metadata is no orientation, not an error.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, format))?;
    image.apply_orientation(orientation);
    Ok(to_rgb_like_pil(image))
}

/// Whether JPEG data ends its last scan with an end-of-image marker (FF D9). Scan data cannot
/// hold one (a data byte FF is followed by 00), and an embedded thumbnail's comes before the
/// main image's scans.
fn jpeg_is_whole(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    matches!((last(0xD9), last(0xDA)), (Some(end), Some(scan)) if end > scan)
}

/// What an image's header claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: u32,
    pub height: u32,
    /// Memory [`decode_image`] takes for it: the decoded pixels in the header's layout, the RGB
    /// copy, and a turned copy where the orientation asks for one.
    pub decode_bytes: u64,
}

/// The header of an image within `limits`: `None` for anything [`decode_image`] would refuse
/// on its header, which then says why.
pub fn read_header(bytes: &[u8], limits: &ImageLimits) -> Option<ImageHeader> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.limits(header_limits(limits));
    let decoder = reader.into_decoder().ok()?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits).ok()?;
    let decoded = u64::from(decoder.color_type().bytes_per_pixel());
    let pixels = u64::from(width) * u64::from(height);
    Some(ImageHeader { width, height, decode_bytes: pixels * (2 * decoded + 3) })
}

/// Limits while reading the header: no dimension limits yet (we want to report the claimed size
/// ourselves), but a memory cap for whatever a header parser buffers.
fn header_limits(limits: &ImageLimits) -> Limits {
    let mut header = Limits::default();
    header.max_alloc = Some(decoder_budget(limits));
    header
}

/// The same bounds, handed to the decoder as a second line of defence.
fn decoder_limits(limits: &ImageLimits) -> Limits {
    let mut strict = Limits::default();
    strict.max_image_width = Some(limits.max_side);
    strict.max_image_height = Some(limits.max_side);
    strict.max_alloc = Some(decoder_budget(limits));
    strict
}

fn decoder_budget(limits: &ImageLimits) -> u64 {
    limits.max_pixels.saturating_mul(WIDEST_PIXEL).saturating_add(DECODER_SLACK)
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), PreprocessError> {
    let too_large =
        width > limits.max_side || height > limits.max_side || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_large {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::Decode(format!("image has no pixels ({width}x{height})")));
    }
    Ok(())
}

fn decode_error(error: ImageError, format: image::ImageFormat) -> PreprocessError {
    let message = format!("{format:?}: {error}");
    match error {
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => PreprocessError::Truncated(message),
        ImageError::Unsupported(_) => PreprocessError::UnsupportedFormat(message),
        ImageError::Limits(e) if matches!(e.kind(), LimitErrorKind::InsufficientMemory) => {
            PreprocessError::DecoderLimit(message)
        }
        _ if looks_truncated(&message) => PreprocessError::Truncated(message),
        _ => PreprocessError::Decode(message),
    }
}

/// Some decoders (PNG, GIF, JPEG) report running out of data as a plain decoding error.
fn looks_truncated(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["unexpected end", "end of file", "not enough bytes", "failed to fill whole buffer", "truncated"]
        .iter()
        .any(|needle| message.contains(needle))
}

/// RGB exactly as PIL's `convert_to_rgb` produces it from the image PIL would have opened.
fn to_rgb_like_pil(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(gray) => map_pixels(width, height, gray.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(la) => map_pixels(width, height, la.as_raw(), 2, |p| over_white([p[0]; 3], p[1])),
        DynamicImage::ImageRgba8(rgba) => {
            map_pixels(width, height, rgba.as_raw(), 4, |p| over_white([p[0], p[1], p[2]], p[3]))
        }
        // PIL opens 16-bit gray as mode I;16 and converts it to RGB by clipping at 255 (not by
        // scaling), so anything above 255 turns white. Matching that is the point here.
        DynamicImage::ImageLuma16(gray) => map_pixels(width, height, gray.as_raw(), 1, |p| [clip_u16(p[0]); 3]),
        // Every other 16-bit layout PIL unpacks by keeping the high byte of each sample.
        DynamicImage::ImageLumaA16(la) => {
            map_pixels(width, height, la.as_raw(), 2, |p| over_white([high(p[0]); 3], high(p[1])))
        }
        DynamicImage::ImageRgb16(rgb) => {
            map_pixels(width, height, rgb.as_raw(), 3, |p| [high(p[0]), high(p[1]), high(p[2])])
        }
        DynamicImage::ImageRgba16(rgba) => map_pixels(width, height, rgba.as_raw(), 4, |p| {
            over_white([high(p[0]), high(p[1]), high(p[2])], high(p[3]))
        }),
        // Float layouts come only from formats we do not enable; keep a sane fallback.
        other => {
            let rgba = other.to_rgba8();
            map_pixels(width, height, rgba.as_raw(), 4, |p| over_white([p[0], p[1], p[2]], p[3]))
        }
    }
}

fn map_pixels<T>(width: u32, height: u32, samples: &[T], channels: usize, pixel: impl Fn(&[T]) -> [u8; 3]) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    for (rgb, p) in out.pixels_mut().zip(samples.chunks_exact(channels)) {
        *rgb = image::Rgb(pixel(p));
    }
    out
}

fn high(sample: u16) -> u8 {
    (sample >> 8) as u8
}

fn clip_u16(sample: u16) -> u8 {
    sample.min(255) as u8
}

/// PIL's `alpha_composite(white, rgba)` for one pixel (libImaging/AlphaComposite.c, integer
/// arithmetic with 7 extra bits of precision and rounded divisions by 255).
fn over_white(rgb: [u8; 3], alpha: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    const WHITE: u32 = 255;
    if alpha == 0 {
        return [255; 3];
    }
    let src_a = u32::from(alpha);
    let blend = WHITE * (255 - src_a);
    let out_a255 = src_a * 255 + blend;
    let coef1 = src_a * 255 * 255 * (1 << PRECISION_BITS) / out_a255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    rgb.map(|c| {
        let tmp = u32::from(c) * coef1 + WHITE * coef2 + (0x80 << PRECISION_BITS);
        (shift_div255(tmp) >> PRECISION_BITS) as u8
    })
}

/// Pillow's SHIFTFORDIV255: a rounded division by 255 without dividing.
fn shift_div255(value: u32) -> u32 {
    ((value >> 8) + value) >> 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_matches_pil_values() {
        // From PIL: alpha_composite(white, (10, 200, 30, a)) for a = 0, 1, 128, 254, 255.
        assert_eq!(over_white([10, 200, 30], 0), [255, 255, 255]);
        assert_eq!(over_white([10, 200, 30], 1), [254, 255, 254]);
        assert_eq!(over_white([10, 200, 30], 128), [132, 227, 142]);
        assert_eq!(over_white([10, 200, 30], 254), [11, 200, 31]);
        assert_eq!(over_white([10, 200, 30], 255), [10, 200, 30]);
    }

    #[test]
    fn sixteen_bit_reduction_matches_pil() {
        assert_eq!([clip_u16(200), clip_u16(255), clip_u16(256), clip_u16(65535)], [200, 255, 255, 255]);
        assert_eq!([high(0x1234), high(0x80ff), high(0x00ff)], [0x12, 0x80, 0]);
    }

    #[test]
    fn header_check_reports_claimed_size() {
        let limits = ImageLimits { max_pixels: 100, max_side: 20, max_bytes: 1000 };
        assert!(check_dimensions(10, 10, &limits).is_ok());
        let wide = check_dimensions(21, 1, &limits).unwrap_err();
        assert!(matches!(wide, PreprocessError::TooLarge { width: 21, height: 1, .. }), "{wide}");
        assert!(matches!(check_dimensions(11, 10, &limits), Err(PreprocessError::TooLarge { .. })));
    }
}
