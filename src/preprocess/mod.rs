//! Turning request inputs into model-ready values, independent of any model family:
//! image decoding under limits ([`decode_image`]) and a shared memory budget ([`MemoryBudget`]), Pillow-exact resampling ([`resize()`]),
//! rescale/normalize into CHW floats ([`normalize`]), chat-template rendering
//! ([`chat_template`]) with the tools a request offers ([`tools`], which also reads tool calls
//! back out of generated text in the format it writes them). Families combine these into their
//! own processors.

mod budget;
pub mod chat_template;
mod image;
pub mod normalize;
pub mod resize;
pub mod tools;

pub use self::image::{ImageHeader, ImageLimits, decode_image, read_header};
pub use budget::{MemoryBudget, Reservation, Shortfall};
pub use resize::{Filter, resize};

/// Errors from decoding and preparing images and prompts.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("no image data")]
    Empty,
    #[error("image data is {bytes} bytes, over the limit of {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error(
        "image is {width}x{height}, over the limits of {max_side} pixels per side \
         and {max_pixels} pixels in all"
    )]
    TooLarge { width: u32, height: u32, max_side: u32, max_pixels: u64 },
    #[error("image data ends early: {0}")]
    Truncated(String),
    /// Corrupt or otherwise undecodable data.
    #[error("could not decode image: {0}")]
    Decode(String),
    /// The decoder needed more memory than the limits allow although the header was in bounds.
    #[error("decoding the image would exceed the memory limit: {0}")]
    DecoderLimit(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("decoding the images needs {bytes} bytes, over the server's decode budget of {budget}")]
    DecodeTooLarge { bytes: u64, budget: u64 },
    #[error("the server's image decode budget ({budget} bytes) is in use; {bytes} bytes were not free in time")]
    DecodeBusy { bytes: u64, budget: u64 },
}
