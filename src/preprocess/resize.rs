//! A bit-exact port of Pillow's 8-bit resampling (`Image.resize`, libImaging/Resample.c and,
//! for NEAREST, the affine scale in Geometry.c), for RGB images.
//!
//! Processors of HF models resize with PIL, and small differences there move every normalized
//! pixel, so we reproduce Pillow's arithmetic rather than use another resampler: filter weights
//! in `f64`, normalized per output pixel, rounded to fixed point with 22 fractional bits; a
//! horizontal and a vertical pass in Pillow's order, each rounded and clipped to 0..=255. Verified against Pillow 13.0.0 by
//! `tests/preprocess.rs` on cases written by `vlmexport.fixtures.make_resize_cases`.

use std::f64::consts::PI;

use image::RgbImage;

/// Resampling filters, numbered as PIL's `Image.Resampling` (the `resample` setting of
/// processor configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// The filter for a PIL `Image.Resampling` code, if we implement it.
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// The kernel, written term for term as Resample.c so that rounding matches.
    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => hamming(x.abs()),
            Self::Bicubic => bicubic(x.abs()),
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn hamming(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * PI;
    // Pillow writes the constants as C floats (0.54f, 0.46f), widened to double.
    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

/// Fractional bits of the fixed-point weights: 32 bits less 8 for the value and 2 for
/// overshoot of negative lobes (Pillow's PRECISION_BITS).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Added before the final shift so that it rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize `src` to `width` x `height` exactly as PIL's `Image.resize((width, height), filter)`
/// does for an RGB image (no `box`, no `reducing_gap`). Same size returns a copy; a zero
/// dimension returns an empty image.
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    if src.dimensions() == (width, height) {
        return src.clone();
    }
    if width == 0 || height == 0 || src.width() == 0 || src.height() == 0 {
        return RgbImage::new(width, height);
    }
    match filter {
        Filter::Nearest => nearest(src, width, height),
        _ => resample(src, width, height, filter),
    }
}

/// Per output pixel: the first source pixel read and the fixed-point weights of the source
/// pixels from there on.
struct Coefficients {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Coefficients {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole source.
    fn new(in_size: u32, out_size: u32, filter: Filter) -> Self {
        // Pillow takes the box as C floats and subtracts them in float before widening.
        let scale = f64::from(in_size as f32 - 0.0f32) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let inv_filterscale = 1.0 / filterscale;
        let in_size = in_size as i32;
        let mut starts = Vec::with_capacity(out_size as usize);
        let mut weights = Vec::with_capacity(out_size as usize);
        for xx in 0..out_size {
            let center = (f64::from(xx) + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i32).max(0);
            let xmax = ((center + support + 0.5) as i32).min(in_size);
            let raw: Vec<f64> =
                (xmin..xmax).map(|x| filter.weight((f64::from(x) - center + 0.5) * inv_filterscale)).collect();
            let total: f64 = raw.iter().sum();
            let normalized = raw.iter().map(|&w| if total != 0.0 { w / total } else { w });
            starts.push(xmin as usize);
            weights.push(normalized.map(to_fixed).collect());
        }
        Self { starts, weights }
    }

    /// Source rows `[first, last)` that any output row reads.
    fn span(&self) -> (usize, usize) {
        match (self.starts.first(), self.starts.last(), self.weights.last()) {
            (Some(&first), Some(&last), Some(weights)) => (first, last + weights.len()),
            _ => (0, 0),
        }
    }
}

/// Round half away from zero into fixed point, as `normalize_coeffs_8bpc`.
fn to_fixed(weight: f64) -> i32 {
    let scaled = weight * f64::from(1u32 << PRECISION_BITS);
    if weight < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `ImagingResampleInner`: each pass only when that axis changes size, horizontal first unless
/// the height loses more than twice as many pixels as the width (Pillow 13 then runs the
/// vertical pass first; the order changes the rounding of the intermediate image).
fn resample(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let src_stride = src.width() as usize * 3;
    let out_stride = width as usize * 3;
    let horizontal = || Coefficients::new(src.width(), width, filter);
    let vertical = || Coefficients::new(src.height(), height, filter);
    let mut out = RgbImage::new(width, height);
    if height == src.height() {
        horizontal_pass(src.as_raw(), src_stride, &horizontal(), &mut out);
    } else if width == src.width() {
        vertical_pass(src.as_raw(), src_stride, &vertical(), 0, &mut out);
    } else if vertical_first(src.dimensions(), (width, height)) {
        let mut shrunk = vec![0; src_stride * height as usize];
        vertical_pass(src.as_raw(), src_stride, &vertical(), 0, &mut shrunk);
        horizontal_pass(&shrunk, src_stride, &horizontal(), &mut out);
    } else {
        // Only the source rows the vertical pass reads go through the horizontal pass.
        let vertical = vertical();
        let (first, last) = vertical.span();
        let rows = &src.as_raw()[first * src_stride..last * src_stride];
        let mut narrowed = vec![0; (last - first) * out_stride];
        horizontal_pass(rows, src_stride, &horizontal(), &mut narrowed);
        vertical_pass(&narrowed, out_stride, &vertical, first, &mut out);
    }
    out
}

/// Pillow 13's choice of pass order. Not in its docs: found by comparing `Image.resize` with
/// both orders built from one-axis resizes; `vlmexport.fixtures.make_resize_cases` re-checks it.
fn vertical_first((in_width, in_height): (u32, u32), (width, height): (u32, u32)) -> bool {
    let lost_rows = i64::from(in_height) - i64::from(height);
    let lost_columns = i64::from(in_width) - i64::from(width);
    lost_rows > 0 && lost_rows > 2 * lost_columns
}

/// Resample every row of `rows` (RGB, `stride` bytes each) horizontally into `out`.
fn horizontal_pass(rows: &[u8], stride: usize, coeffs: &Coefficients, out: &mut [u8]) {
    let out_stride = coeffs.starts.len() * 3;
    for (row, out_row) in rows.chunks_exact(stride).zip(out.chunks_exact_mut(out_stride)) {
        let outputs = coeffs.starts.iter().zip(&coeffs.weights).zip(out_row.chunks_exact_mut(3));
        for ((&start, weights), out_pixel) in outputs {
            let pixels = row[start * 3..(start + weights.len()) * 3].chunks_exact(3);
            let mut sums = [HALF; 3];
            for (pixel, &w) in pixels.zip(weights) {
                sums[0] += i32::from(pixel[0]) * w;
                sums[1] += i32::from(pixel[1]) * w;
                sums[2] += i32::from(pixel[2]) * w;
            }
            out_pixel.copy_from_slice(&sums.map(clip8));
        }
    }
}

/// Resample `rows` vertically; `offset` is the source row that `rows` starts at.
///
/// Accumulates whole rows rather than one pixel at a time as Pillow does: the sums are the same
/// integers (i32 addition is exact here), and rows stream through the cache.
fn vertical_pass(rows: &[u8], stride: usize, coeffs: &Coefficients, offset: usize, out: &mut [u8]) {
    let mut sums = vec![0i32; stride];
    for ((&start, weights), out_row) in coeffs.starts.iter().zip(&coeffs.weights).zip(out.chunks_exact_mut(stride)) {
        sums.fill(HALF);
        let first = (start - offset) * stride;
        let source = rows[first..first + weights.len() * stride].chunks_exact(stride);
        for (line, &w) in source.zip(weights) {
            for (sum, &value) in sums.iter_mut().zip(line) {
                *sum += i32::from(value) * w;
            }
        }
        for (value, &sum) in out_row.iter_mut().zip(&sums) {
            *value = clip8(sum);
        }
    }
}

/// NEAREST as Pillow does it (`ImagingScaleAffine`): source positions advance by a `f64` step
/// from the first pixel centre and are truncated; pixels that map outside stay black.
fn nearest(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let step_x = f64::from(src.width() as f32) / f64::from(width);
    let step_y = f64::from(src.height() as f32) / f64::from(height);
    let columns = positions(step_x, width, src.width());
    let rows = positions(step_y, height, src.height());
    let src_stride = src.width() as usize * 3;
    let mut out = RgbImage::new(width, height);
    for (out_row, y) in out.chunks_exact_mut(width as usize * 3).zip(rows) {
        let Some(y) = y else { continue };
        let line = &src.as_raw()[y * src_stride..(y + 1) * src_stride];
        for (pixel, x) in out_row.chunks_exact_mut(3).zip(&columns) {
            if let Some(x) = x {
                pixel.copy_from_slice(&line[x * 3..x * 3 + 3]);
            }
        }
    }
    out
}

/// Source index for each of `count` outputs, accumulating the position as Pillow does.
fn positions(step: f64, count: u32, in_size: u32) -> Vec<Option<usize>> {
    let mut position = step * 0.5;
    (0..count)
        .map(|_| {
            // Pillow's COORD: negative positions are out of range, others truncate.
            let index = if position < 0.0 { None } else { Some(position as usize) };
            position += step;
            index.filter(|&i| i < in_size as usize)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray_ramp(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = ((x * 7 + y * 13) % 256) as u8;
            image::Rgb([v, v / 2, 255 - v])
        })
    }

    #[test]
    fn pil_codes_map_to_filters() {
        assert_eq!(Filter::from_pil(1), Some(Filter::Lanczos));
        assert_eq!(Filter::from_pil(3), Some(Filter::Bicubic));
        assert_eq!(Filter::from_pil(6), None);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Box, Filter::Bilinear, Filter::Hamming, Filter::Bicubic, Filter::Lanczos] {
            for (inn, out) in [(10, 3), (3, 10), (512, 2048), (2048, 512)] {
                let c = Coefficients::new(inn, out, filter);
                for w in &c.weights {
                    let sum: i32 = w.iter().sum();
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= w.len() as i32, "{filter:?} {sum}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = RgbImage::from_pixel(13, 9, image::Rgb([200, 17, 90]));
        for filter in
            [Filter::Nearest, Filter::Box, Filter::Bilinear, Filter::Hamming, Filter::Bicubic, Filter::Lanczos]
        {
            let out = resize(&src, 31, 4, filter);
            assert!(out.pixels().all(|p| p.0 == [200, 17, 90]), "{filter:?}");
        }
    }

    #[test]
    fn same_size_is_a_copy_and_zero_size_is_empty() {
        let src = gray_ramp(5, 4);
        assert_eq!(resize(&src, 5, 4, Filter::Lanczos), src);
        assert_eq!(resize(&src, 0, 4, Filter::Lanczos).dimensions(), (0, 4));
    }

    #[test]
    fn nearest_picks_centres() {
        // 4 -> 2 picks source columns 1 and 3 (centres at 1.0 and 3.0).
        let src = gray_ramp(4, 1);
        let out = resize(&src, 2, 1, Filter::Nearest);
        assert_eq!(out.get_pixel(0, 0), src.get_pixel(1, 0));
        assert_eq!(out.get_pixel(1, 0), src.get_pixel(3, 0));
    }
}
