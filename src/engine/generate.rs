//! From messages and images to a prompt, the settings and results of a generation, and one
//! sequence's output state (`Run`); the steps that run the graphs are in `batch.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array2, ArrayD, Axis};
use ort::value::{DynValue, Tensor, TensorElementType};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::EngineError;
use super::detokenize::Detokenizer;
use super::feature_cache::FeatureCache;
use super::grammar::Guide;
use super::model::{Codec, Model};
use super::prefix_cache::{ImageId, TokenIdentity};
use super::sampler::{RawLogprobs, Sampler, SamplingParams};
use super::stop::{FinishReason, StopRules, StopStrings};
use super::tensors::{host_copy, to_f32_array};
use crate::family::{ImageBudget, ImageLayout, Positions, ProcessedImages};
use crate::preprocess::chat_template::ChatMessage;
use crate::preprocess::tools::Tool;

/// A prompt's images as the graphs will take them.
#[derive(Debug, Clone)]
pub enum PromptImages {
    /// Processed for the vision encoder.
    Pixels(ProcessedImages),
    /// Their features, which the feature cache held when the prompt was prepared: their
    /// pixels were never processed.
    Features { layouts: Vec<ImageLayout>, features: Arc<Array2<f32>> },
}

impl PromptImages {
    pub fn layouts(&self) -> &[ImageLayout] {
        match self {
            PromptImages::Pixels(processed) => &processed.layouts,
            PromptImages::Features { layouts, .. } => layouts,
        }
    }

    pub fn total_tokens(&self) -> usize {
        self.layouts().iter().map(|l| l.tokens).sum()
    }
}

/// A prompt ready for the graphs: token ids, images and position ids.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    pub images: Option<PromptImages>,
    pub positions: Positions,
    /// What each image stands for in the prefix cache's keys, in prompt order.
    pub image_ids: Vec<ImageId>,
    /// Template, image processing and tokenization time.
    pub preprocess_time: Duration,
}

/// Per-request generation settings.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// Generate exactly `max_new_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// What the output must match (see [`super::Codec::guide`]).
    pub guide: Option<Guide>,
    /// Report each sampled token's log-probability with those of this many most probable
    /// tokens (see [`Sampler::logprobs`]); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Samples drawn from the prompt (OpenAI's `n`): they share its image encoding and
    /// prefill, and sample `i` draws with `seed + i`.
    pub samples: usize,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            max_new_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            guide: None,
            logprobs: None,
            samples: 1,
        }
    }
}

/// One generated token and the text it made visible (may be empty while a multi-byte
/// character or a possible stop string is incomplete).
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// Which of the request's samples it belongs to.
    pub sample: usize,
    pub token_id: u32,
    pub text: &'a str,
    /// The token's log-probabilities, when asked for (not on the text flushed at the end).
    pub logprobs: Option<&'a Logprobs>,
}

/// A token as log-probabilities report it: its id, its text alone, its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// One sampled token's log-probability and the most probable tokens at its position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Logprobs {
    pub token: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// Whether the caller wants more tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Where the time of one generation went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub preprocess_s: f64,
    pub vision_s: f64,
    /// Where the image features came from. Reported only through [`TimingsReport`], where the
    /// caller decides (the caches are shared).
    #[serde(skip)]
    pub image_features: ImageFeatures,
    pub prefill_s: f64,
    /// From the start of `generate` to the first token.
    pub time_to_first_token_s: f64,
    pub decode_s: f64,
    pub decode_steps: usize,
    /// Part of `decode_s` spent inside ONNX Runtime's run calls.
    pub decode_in_runtime_s: f64,
    /// Bytes handed between host and device by the decode steps (see `RunCost`); zero on the CPU.
    pub decode_transferred_bytes: usize,
    /// Compiling the output constraint (0 without one, or when it was compiled before).
    pub constraint_compile_s: f64,
    /// Prompt tokens whose keys and values came from the prefix cache. Reported only through
    /// [`Completion::usage`], where the caller decides (the cache is shared).
    #[serde(skip)]
    pub prefix_cached_tokens: usize,
    /// Image tokens past those whose features came from the image-feature cache.
    #[serde(skip)]
    pub feature_cached_tokens: usize,
}

impl Timings {
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.decode_s > 0.0 { self.decode_steps as f64 / self.decode_s } else { 0.0 }
    }
}

/// The result of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Which of the request's samples it is.
    pub sample: usize,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    /// Of `prompt_tokens`, those standing for images.
    pub image_tokens: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// One per token, when asked for.
    pub logprobs: Option<Vec<Logprobs>>,
}

/// Token counts as OpenAI's `usage` names them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens standing for images (ours).
    pub image_tokens: usize,
    /// OpenAI's field: prompt tokens whose work a cache saved. Here the image tokens whose
    /// features came from the image-feature cache.
    pub cached_tokens: usize,
}

/// Where a generation's image features came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFeatures {
    /// The prompt has no image.
    #[default]
    NoImages,
    /// The vision encoder ran (the image-feature cache, if on, did not have them).
    Encoded,
    /// The image-feature cache had them.
    FeatureCache,
    /// The prefix cache held keys and values past every image: no features were needed.
    PrefixCache,
}

impl ImageFeatures {
    /// The vision encoder did not run for images the prompt has.
    pub fn from_cache(self) -> bool {
        matches!(self, Self::FeatureCache | Self::PrefixCache)
    }
}

/// A generation's timings as the server and the CLI report them: the engine's, the image
/// decode before it, and the decode rate.
#[derive(Debug, Clone, Serialize)]
pub struct TimingsReport<'a> {
    #[serde(flatten)]
    pub timings: &'a Timings,
    pub image_decode_s: f64,
    pub decode_tokens_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_cache_hit: Option<bool>,
}

impl Usage {
    /// The counts of several samples of one prompt: the prompt once, every sample's tokens.
    pub fn of_samples(completions: &[Completion], with_cache_hits: bool) -> Option<Usage> {
        let (first, rest) = completions.split_first()?;
        let mut usage = first.usage(with_cache_hits);
        let more: usize = rest.iter().map(|c| c.token_ids.len()).sum();
        usage.completion_tokens += more;
        usage.total_tokens += more;
        Some(usage)
    }
}

impl Completion {
    /// The token counts; cache hits only `with_cache_hits` (the caches are shared between
    /// clients, so a hit tells one that another sent the same image or prompt). Cached are the
    /// prompt tokens from the prefix cache and the later image tokens whose features were cached.
    pub fn usage(&self, with_cache_hits: bool) -> Usage {
        let generated = self.token_ids.len();
        let cached = self.timings.prefix_cached_tokens + self.timings.feature_cached_tokens;
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: generated,
            total_tokens: self.prompt_tokens + generated,
            prompt_tokens_details: PromptTokensDetails {
                image_tokens: self.image_tokens,
                cached_tokens: if with_cache_hits { cached } else { 0 },
            },
        }
    }

    /// `with_cache_hit`: include whether the image-feature cache answered.
    pub fn timings_report(&self, image_decode_s: f64, with_cache_hit: bool) -> TimingsReport<'_> {
        TimingsReport {
            timings: &self.timings,
            image_decode_s,
            decode_tokens_per_second: self.timings.decode_tokens_per_second(),
            vision_cache_hit: with_cache_hit.then_some(self.timings.image_features.from_cache()),
        }
    }
}

impl Codec {
    /// Render the chat template (offering `tools`), process the images (each within its
    /// budget, see [`ImageBudget::of`]) and tokenize the expanded prompt.
    pub fn prepare(
        &self,
        messages: &[ChatMessage],
        images: &[RgbImage],
        budgets: &[ImageBudget],
        tools: &[Tool],
    ) -> Result<Prompt, EngineError> {
        self.prepare_cached(messages, images, budgets, tools, None)
    }

    /// [`Codec::prepare`], taking the images' features from `features` when it holds them
    /// instead of processing their pixels.
    pub fn prepare_cached(
        &self,
        messages: &[ChatMessage],
        images: &[RgbImage],
        budgets: &[ImageBudget],
        tools: &[Tool],
        features: Option<&FeatureCache>,
    ) -> Result<Prompt, EngineError> {
        let start = Instant::now();
        let wanted: usize = messages.iter().map(ChatMessage::image_count).sum();
        if wanted != images.len() {
            return Err(
                crate::family::FamilyError::ImageCountMismatch { placeholders: wanted, images: images.len() }.into()
            );
        }
        if messages.iter().all(|m| m.content.is_empty()) {
            return Err(EngineError::EmptyPrompt);
        }
        let text = self.template.render(messages, tools)?;
        // Tokenizing a huge text costs seconds and gigabytes: refuse what cannot fit first.
        let most = self.info.context_length.saturating_mul(self.max_token_bytes);
        if text.len() > most {
            return Err(EngineError::PromptTooManyBytes { bytes: text.len(), most, context: self.info.context_length });
        }
        let image_ids: Vec<ImageId> =
            images.iter().zip(0..).map(|(image, i)| self.image_id(image, ImageBudget::of(budgets, i))).collect();
        let prompt_images = match images {
            [] => None,
            _ => Some(self.prompt_images(images, budgets, &image_ids, features)?),
        };
        let layouts = prompt_images.as_ref().map(PromptImages::layouts).unwrap_or_default();
        let expanded = self.family.expand_prompt(&text, layouts)?;
        let encoding = self.tokenizer.encode(expanded, true).map_err(|e| EngineError::Encode(e.to_string()))?;
        let mut prompt = self.prompt_with(encoding.get_ids().to_vec(), prompt_images, image_ids);
        prompt.preprocess_time = start.elapsed();
        Ok(prompt)
    }

    /// The images' features when `features` holds them (their layouts follow from their
    /// sizes), else their processed pixels.
    fn prompt_images(
        &self,
        images: &[RgbImage],
        budgets: &[ImageBudget],
        image_ids: &[ImageId],
        features: Option<&FeatureCache>,
    ) -> Result<PromptImages, EngineError> {
        if let Some(features) = features.and_then(|cache| cache.get(&FeatureCache::key(image_ids))) {
            let layouts = images
                .iter()
                .zip(0..)
                .map(|(image, i)| self.family.image_layout(image.width(), image.height(), ImageBudget::of(budgets, i)))
                .collect::<Result<Vec<_>, _>>()?;
            if layouts.iter().map(|l| l.tokens).sum::<usize>() == features.nrows() {
                return Ok(PromptImages::Features { layouts, features });
            }
        }
        Ok(PromptImages::Pixels(self.family.process_images(images, budgets)?))
    }

    /// A prompt from token ids that already contain the expanded image tokens. Its images are
    /// told apart by their processed inputs as a whole.
    pub fn prompt_from_ids(&self, input_ids: Vec<u32>, images: Option<ProcessedImages>) -> Prompt {
        let image_ids = match &images {
            Some(processed) => {
                let set = FeatureCache::inputs_id(&processed.inputs);
                (0..processed.layouts.len() as u64)
                    .map(|i| Sha256::new().chain_update(set).chain_update(i.to_le_bytes()).finalize().into())
                    .collect()
            }
            None => Vec::new(),
        };
        self.prompt_with(input_ids, images.map(PromptImages::Pixels), image_ids)
    }

    fn prompt_with(&self, input_ids: Vec<u32>, images: Option<PromptImages>, image_ids: Vec<ImageId>) -> Prompt {
        let layouts = images.as_ref().map(PromptImages::layouts).unwrap_or_default();
        let positions = self.family.prompt_positions(&input_ids, layouts);
        Prompt { input_ids, images, positions, image_ids, preprocess_time: Duration::ZERO }
    }

    /// An image's identity in prefix-cache keys: its pixels with everything that turns them
    /// into image tokens and features (its budget, the family and its processor settings).
    fn image_id(&self, image: &RgbImage, budget: ImageBudget) -> ImageId {
        let mut hash = Sha256::new();
        hash.update(self.image_settings);
        hash.update(format!("{:?}", budget.detail));
        hash.update(budget.max_pixels.unwrap_or(0).to_le_bytes());
        hash.update(image.width().to_le_bytes());
        hash.update(image.height().to_le_bytes());
        hash.update(image.as_raw());
        hash.finalize().into()
    }

    /// How the prefix cache tells this prompt's tokens apart.
    pub(super) fn token_identity(&self, prompt: &Prompt) -> TokenIdentity {
        let layouts = prompt.images.as_ref().map(PromptImages::layouts).unwrap_or_default();
        TokenIdentity {
            image_token: self.family.image_token_id(),
            images: prompt.image_ids.iter().copied().zip(layouts.iter().map(|l| l.tokens)).collect(),
        }
    }

    /// The stop rules for `params` on this model.
    pub fn stop_rules(&self, params: &GenerationParams) -> StopRules {
        StopRules {
            eos_token_ids: self.info.eos_token_ids.clone(),
            stop_strings: StopStrings::new(&params.stop),
            max_new_tokens: params.max_new_tokens,
            context_length: self.info.context_length,
            ignore_eos: params.ignore_eos,
        }
    }

    /// Reject a prompt that cannot be generated from, before any graph runs.
    pub fn check_prompt(&self, prompt: &Prompt, params: &GenerationParams) -> Result<(), EngineError> {
        params.sampling.validate()?;
        if params.max_new_tokens == 0 {
            return Err(EngineError::InvalidParameter("max_new_tokens must be at least 1".into()));
        }
        if params.samples == 0 {
            return Err(EngineError::InvalidParameter("samples must be at least 1".into()));
        }
        if prompt.input_ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.info.context_length;
        // Saturating: a max_new_tokens near usize::MAX must not wrap past the check.
        if prompt.input_ids.len().saturating_add(params.max_new_tokens) > context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: prompt.input_ids.len(),
                max_new_tokens: params.max_new_tokens,
                context,
            });
        }
        Ok(())
    }
}

impl Model {
    /// Token embeddings `[1, len, hidden]` with the image features written over the
    /// image-token rows; the first `skip_rows` feature rows are for image tokens before `ids`.
    pub(super) fn prompt_embeddings(
        &mut self,
        ids: &[u32],
        features: Option<Arc<Array2<f32>>>,
        skip_rows: usize,
    ) -> Result<ArrayD<f32>, EngineError> {
        let (embeds, _) = self.embedder.embed(ids, 1)?;
        let embeds = host_copy(&embeds)?.unwrap_or(embeds);
        let mut array = to_f32_array(&embeds, "inputs_embeds")?;
        let Some(features) = features else { return Ok(array) };
        let image_token = self.codec.family.image_token_id();
        let rows: Vec<usize> = ids.iter().enumerate().filter(|(_, id)| **id == image_token).map(|(i, _)| i).collect();
        let features = features.slice(ndarray::s![skip_rows.min(features.nrows()).., ..]);
        if rows.len() != features.nrows() {
            return Err(EngineError::GraphMismatch(format!(
                "the prompt has {} image tokens but the vision encoder returned {} feature rows",
                rows.len(),
                features.nrows()
            )));
        }
        if array.ndim() != 3 || array.shape()[2] != features.ncols() {
            return Err(EngineError::GraphMismatch(format!(
                "embeddings {:?} and image features {:?} differ in width",
                array.shape(),
                features.shape()
            )));
        }
        for (feature, &row) in features.rows().into_iter().zip(&rows) {
            array.index_axis_mut(Axis(0), 0).index_axis_mut(Axis(0), row).assign(&feature);
        }
        Ok(array)
    }
}

pub(super) fn float_value(array: ArrayD<f32>, ty: TensorElementType) -> Result<DynValue, EngineError> {
    Ok(match ty {
        TensorElementType::Float16 => Tensor::from_array(array.mapv(half::f16::from_f32))?.into_dyn(),
        _ => Tensor::from_array(array)?.into_dyn(),
    })
}

/// The state of one generation's output: tokens, text, and what has been streamed.
pub(super) struct Run {
    sample: usize,
    stop: StopRules,
    sampler: Sampler,
    history: Vec<u32>,
    token_ids: Vec<u32>,
    detokenizer: Detokenizer,
    text: String,
    emitted: usize,
    /// The text was cut at a stop string: nothing after it may be shown.
    cut: bool,
    pub(super) guide: Option<Guide>,
    /// How many most probable tokens to report with each token's log-probability, and what
    /// was reported so far; `None` when not asked for.
    logprobs: Option<(usize, Vec<Logprobs>)>,
    /// The log-probabilities of the token sampled last, until it is accepted.
    sampled: Option<RawLogprobs>,
    image_tokens: usize,
}

impl Run {
    pub(super) fn new(prompt: &Prompt, stop: StopRules, sampler: Sampler, params: &GenerationParams) -> Self {
        let prompt_ids = &prompt.input_ids;
        Self {
            sample: 0,
            image_tokens: prompt.images.as_ref().map_or(0, PromptImages::total_tokens),
            guide: params.guide.clone(),
            logprobs: params.logprobs.map(|top| (top, Vec::new())),
            sampled: None,
            stop,
            sampler,
            history: prompt_ids.to_vec(),
            token_ids: Vec::new(),
            detokenizer: Detokenizer::new(),
            text: String::new(),
            emitted: 0,
            cut: false,
        }
    }

    /// Sample `sample` of the same prompt, before any token: its own random state, the same
    /// rules and constraint.
    /// The prompt's tokens and those generated so far.
    pub(super) fn history(&self) -> &[u32] {
        &self.history
    }

    pub(super) fn fork(&self, sample: usize) -> Self {
        Self {
            sample,
            stop: self.stop.clone(),
            sampler: self.sampler.fork(sample),
            history: self.history.clone(),
            token_ids: Vec::new(),
            detokenizer: Detokenizer::new(),
            text: String::new(),
            emitted: 0,
            cut: false,
            guide: self.guide.clone(),
            logprobs: self.logprobs.as_ref().map(|(top, _)| (*top, Vec::new())),
            sampled: None,
            image_tokens: self.image_tokens,
        }
    }

    /// Sample the next token from `logits`, among those the constraint allows.
    pub(super) fn sample(&mut self, logits: &mut [f32]) -> Result<u32, EngineError> {
        if let Some(guide) = &mut self.guide {
            guide.apply(logits)?;
        }
        let token = self.sampler.sample(logits, &self.history);
        if let Some((top, _)) = &self.logprobs {
            self.sampled = Some(self.sampler.logprobs(logits, token, *top));
        }
        Ok(token)
    }

    /// Record `token`, stream what is safe to show, and say whether generation is over.
    pub(super) fn accept(
        &mut self,
        model: &Model,
        token: u32,
        on_token: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<Option<FinishReason>, EngineError> {
        self.history.push(token);
        self.token_ids.push(token);
        if let (Some((_, reported)), Some(raw)) = (&mut self.logprobs, self.sampled.take()) {
            reported.push(resolve(&model.codec.tokenizer, raw)?);
        }
        let complete = match &mut self.guide {
            Some(guide) => guide.consume(token)?,
            None => false,
        };
        let before = self.text.len();
        self.text.push_str(&self.detokenizer.push(&model.codec.tokenizer, token)?);
        if let Some(cut) = self.stop.stop_strings.cut_after(&self.text[before..]) {
            self.text.truncate(cut);
            self.cut = true;
            self.emit(token, self.text.len(), true, on_token);
            return Ok(Some(FinishReason::Stop));
        }
        let safe = self.text.len() - self.stop.stop_strings.pending();
        if self.emit(token, safe, true, on_token) == Flow::Stop {
            return Ok(Some(FinishReason::Cancelled));
        }
        let total = self.history.len();
        let stopped = self.stop.after_token(token, self.token_ids.len(), total);
        Ok(stopped.or(complete.then_some(FinishReason::Stop)))
    }

    /// Hand `on_token` the text up to `upto` with `token`, and the token's log-probabilities
    /// (the last reported) if `with_logprobs`.
    fn emit(&mut self, token: u32, upto: usize, with_logprobs: bool, on_token: &mut dyn FnMut(Event) -> Flow) -> Flow {
        let upto = upto.max(self.emitted);
        let logprobs = self.logprobs.as_ref().filter(|_| with_logprobs).and_then(|(_, reported)| reported.last());
        let text = &self.text[self.emitted..upto];
        let flow = on_token(Event { sample: self.sample, token_id: token, text, logprobs });
        self.emitted = upto;
        flow
    }

    /// Flush text held back for a possible stop string or an incomplete character, and
    /// return the completion.
    pub(super) fn finish(
        mut self,
        model: &Model,
        finish_reason: FinishReason,
        timings: Timings,
        on_token: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<Completion, EngineError> {
        if !self.cut {
            self.text.push_str(&self.detokenizer.finish(&model.codec.tokenizer)?);
        }
        if self.emitted < self.text.len() {
            let last = self.token_ids.last().copied().unwrap_or_default();
            self.emit(last, self.text.len(), false, on_token);
        }
        let prompt_tokens = self.history.len() - self.token_ids.len();
        let logprobs = self.logprobs.map(|(_, reported)| reported);
        Ok(Completion {
            sample: self.sample,
            token_ids: self.token_ids,
            text: self.text,
            prompt_tokens,
            image_tokens: self.image_tokens,
            finish_reason,
            timings,
            logprobs,
        })
    }
}

/// Token ids to texts: each token decoded alone (special tokens included).
fn resolve(tokenizer: &tokenizers::Tokenizer, raw: RawLogprobs) -> Result<Logprobs, EngineError> {
    let entry = |(id, logprob): (u32, f32)| -> Result<TokenLogprob, EngineError> {
        let text = tokenizer.decode(&[id], false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(TokenLogprob { id, text, logprob })
    };
    Ok(Logprobs { token: entry(raw.token)?, top: raw.top.into_iter().map(entry).collect::<Result<_, _>>()? })
}
