//! Rescale and normalize RGB8 pixels into CHW `f32`, with transformers' PIL-backend rounding.
//!
//! transformers' `rescale` multiplies the uint8 value by the factor in `float64` and casts the
//! product to `float32`; `normalize` then computes `(x - mean) / std` in `float32` with mean and
//! std cast to `float32`. The two steps are separate (not fused into one multiply-add), so we
//! do the same, once per possible byte value and channel.

use image::RgbImage;
use ndarray::{ArrayViewMut3, s};

/// How pixel bytes become model inputs, as set by a processor config.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    /// `rescale_factor` when `do_rescale`, else `None`.
    pub rescale_factor: Option<f64>,
    /// `(image_mean, image_std)` when `do_normalize`, else `None`.
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl Normalization {
    /// The value of byte `value` in channel `channel`.
    pub fn value(&self, channel: usize, value: u8) -> f32 {
        let x = match self.rescale_factor {
            Some(factor) => (f64::from(value) * factor) as f32,
            None => f32::from(value),
        };
        match self.mean_std {
            Some((mean, std)) => (x - mean[channel]) / std[channel],
            None => x,
        }
    }

    /// Per channel, the value of every byte, so that writing an image costs one lookup per sample.
    fn table(&self) -> [[f32; 256]; 3] {
        std::array::from_fn(|c| std::array::from_fn(|v| self.value(c, v as u8)))
    }

    /// Write `image` into the top-left corner of `out` (`[3, height, width]`, at least the
    /// image's size), leaving the rest of `out` untouched (the caller's zero padding).
    pub fn write_chw(&self, image: &RgbImage, mut out: ArrayViewMut3<f32>) {
        let table = self.table();
        let (width, height) = (image.width() as usize, image.height() as usize);
        for (c, lookup) in table.iter().enumerate() {
            let mut plane = out.slice_mut(s![c, ..height, ..width]);
            for (mut row, pixels) in plane.rows_mut().into_iter().zip(image.as_raw().chunks_exact(width * 3)) {
                for (dst, pixel) in row.iter_mut().zip(pixels.chunks_exact(3)) {
                    *dst = lookup[usize::from(pixel[c])];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn smolvlm() -> Normalization {
        Normalization { rescale_factor: Some(1.0 / 255.0), mean_std: Some(([0.5; 3], [0.5; 3])) }
    }

    #[test]
    fn values_match_numpy() {
        // numpy: ((np.float64(v) * (1/255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
        let n = smolvlm();
        assert_eq!(n.value(0, 0), -1.0);
        assert_eq!(n.value(0, 255), 1.0);
        assert_eq!(n.value(1, 128), 0.003921628_f32);
        assert_eq!(n.value(2, 1), -0.99215686_f32);
    }

    #[test]
    fn flags_off_pass_bytes_through() {
        let n = Normalization { rescale_factor: None, mean_std: None };
        assert_eq!(n.value(0, 200), 200.0);
    }

    #[test]
    fn writes_planes_and_leaves_padding() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb([x as u8 * 255, 0, 255]));
        let mut out = Array3::from_elem((3, 2, 3), 7.0f32);
        smolvlm().write_chw(&image, out.view_mut());
        assert_eq!(out[[0, 0, 0]], -1.0);
        assert_eq!(out[[0, 0, 1]], 1.0);
        assert_eq!(out[[1, 0, 1]], -1.0);
        assert_eq!(out[[2, 0, 0]], 1.0);
        assert_eq!(out[[0, 1, 0]], 7.0);
        assert_eq!(out[[0, 0, 2]], 7.0);
    }
}
