//! The engine: a loaded model (its three ONNX sessions, tokenizer, template and family), the
//! image-feature cache, the KV cache and its prefix cache, sampling, stop rules, incremental detokenization and the generation loop.
//!
//! It knows tensors and tokens; it does not know HTTP, files beyond the package, or time
//! budgets. `prepare` (template, images, tokens) takes `&self` so it can run off the
//! generation thread; `generate` takes `&mut self` because ONNX Runtime sessions must not run
//! concurrently.

mod batch;
mod detokenize;
mod feature_cache;
mod generate;
mod grammar;
mod graphs;
mod kv_cache;
mod model;
mod prefix_cache;
mod sampler;
mod stop;
mod tensors;
mod vision;

pub use batch::{Batch, Finished, Fork, Limits, Step};
pub use detokenize::Detokenizer;
pub use feature_cache::FeatureCache;
pub use generate::{
    Completion, Event, Flow, GenerationParams, ImageFeatures, Logprobs, Prompt, PromptImages, Timings, TimingsReport,
    TokenLogprob, Usage,
};
pub use grammar::{Constraint, Guide, compact_schema};
pub use kv_cache::{CacheWrites, KvCache, KvLayout};
pub use model::{Codec, GraphChoice, Model, ModelInfo, ModelOptions};
pub use prefix_cache::{BLOCK_TOKENS, PrefixCache};
pub use sampler::{Sampler, SamplingParams};
pub use stop::{FinishReason, StopRules, StopStrings};

use crate::family::FamilyError;
use crate::package::PackageError;
use crate::preprocess::PreprocessError;
use crate::runtime::RuntimeError;

/// Everything that can go wrong between a request and its tokens.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Family(#[from] FamilyError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// The package's tokenizer failed to load or to decode generated ids (our fault).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The request's prompt could not be tokenized (the caller's text).
    #[error("the prompt could not be tokenized: {0}")]
    Encode(String),
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error("the graphs do not match the package: {0}")]
    GraphMismatch(String),
    /// The package's own files contradict each other (config.json against the tokenizer).
    #[error("the package's files disagree: {0}")]
    Inconsistent(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} it exceeds the context of {context} tokens"
    )]
    PromptTooLong { prompt_tokens: usize, max_new_tokens: usize, context: usize },
    /// A failure shared by every sequence of a vision or decoder call.
    #[error("the prompt is {bytes} bytes, more than a context of {context} tokens can hold ({most} bytes at most)")]
    PromptTooManyBytes { bytes: usize, most: usize, context: usize },
    #[error("the batch this request was decoded in failed: {0}")]
    BatchFailed(#[source] std::sync::Arc<EngineError>),
    #[error("the vision encoder's thread stopped")]
    VisionEncoderStopped,
    #[error("could not start a thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("invalid generation parameter: {0}")]
    InvalidParameter(String),
    /// The request's output constraint (schema, regex, grammar) was refused by its compiler.
    #[error("the output constraint is invalid: {0}")]
    InvalidConstraint(String),
    /// Following the constraint failed during generation (a limit of the grammar engine).
    #[error("the output constraint could not be followed: {0}")]
    Constraint(String),
}
