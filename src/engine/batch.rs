//! Continuous batching: the sequences of a [`Batch`] share each decoder call.
//!
//! A sequence is admitted with its prompt. Its images go through the vision encoder a few tiles
//! per step, tiles of several sequences in one call (bounded by [`Limits::vision_tiles`]); its
//! prompt is then prefilled in chunks (bounded by [`Limits::prefill_tokens`]), so running
//! sequences never wait for a large image or a long prompt as a whole. It then joins the decode
//! batch: one decoder call per step advances every row by one token, each with its own
//! positions and attention mask (see [`KvCache`] for the left-padded layout). Rows leave as
//! soon as they finish. The same code serves a single request ([`Model::generate`] is a batch
//! of one), so batched and single-stream generation cannot drift apart.
//!
//! A sequence is one [`Sequence`] whose [`Phase`] holds what that phase needs and nothing
//! more; each change of phase is one function that takes the sequence by value.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, ArrayD, Axis, Slice};

use super::EngineError;
use super::feature_cache::{FeatureCache, FeatureKey};
use super::generate::{
    Completion, Event, Flow, GenerationParams, ImageFeatures, Prompt, PromptImages, Run, Timings, float_value,
};
use super::grammar::Guide;
use super::kv_cache::{KvCache, KvLayout};
use super::model::Model;
use super::prefix_cache::{BLOCK_TOKENS, Block, PrefixCache, TokenIdentity};
use super::sampler::Sampler;
use super::stop::FinishReason;
use super::vision::VisionReply;
use crate::family::{NamedTensor, ProcessedImages, TensorData};

/// What the owner of a sequence hears about it: its tokens, through the callback it passed
/// to [`Batch::step`] with its tag, and its end.
pub type Finished<T> = (T, Result<Completion, EngineError>);

/// A tag that can stand for one more sample of its request: when a prompt asked for several
/// samples is prefilled, each further sample gets its tag from the first's.
pub trait Fork {
    fn fork(&self) -> Self;
}

impl Fork for () {
    fn fork(&self) -> Self {}
}

/// One sequence from admission to its last token.
struct Sequence<T> {
    id: u64,
    tag: T,
    run: Run,
    timings: Timings,
    admitted: Instant,
    /// Samples still to be made from it when its prefill is done (the request's `samples`
    /// less one), each a copy of its cache row with a run of its own.
    siblings: usize,
    /// How its tokens are keyed in the prefix cache; `None` when the model has none.
    identity: Option<TokenIdentity>,
    phase: Phase,
}

/// Where a sequence is on its way to its last token.
enum Phase {
    /// Its images wait for the vision encoder, or some of their tiles are in it.
    Encoding(Encoding),
    /// Withdrawn while tiles of it were in the encoder: no more start, and it goes once they
    /// are back.
    Leaving,
    /// Its images are encoded (or it has none): its embeddings are made at its first chunk.
    Ready { prompt: PromptInput, features: Option<Arc<Array2<f32>>> },
    /// Its prompt goes through the decoder chunk by chunk, into a cache of its own.
    Prefilling(Prefill),
    /// A row of the batch's cache.
    Decoding(Decoding),
}

/// The prompt as prefill takes it, with the cache it fills.
struct PromptInput {
    input_ids: Vec<u32>,
    positions: ArrayD<i64>,
    /// Position of the first generated token.
    next_position: i64,
    cache: KvCache,
    /// The prefix cache's blocks for its first positions, copied into `cache` at its first
    /// chunk (held until then, so they are not evicted).
    reused: Vec<Arc<Block>>,
}

/// Images on their way through the vision encoder.
struct Encoding {
    prompt: PromptInput,
    images: ProcessedImages,
    key: Option<FeatureKey>,
    /// Tiles encoded so far, and their feature rows.
    done: usize,
    rows: Vec<Array2<f32>>,
}

impl PromptInput {
    /// Image tokens past the reused blocks: those whose features prefill needs.
    fn image_tokens_to_prefill(&self, image_token: u32) -> usize {
        self.input_ids[self.reused.len() * BLOCK_TOKENS..].iter().filter(|&&id| id == image_token).count()
    }
}

struct Prefill {
    prompt: PromptInput,
    /// `[1, prompt, hidden]` of the prompt's tokens from `start`.
    embeds: ArrayD<f32>,
    /// Prompt tokens the prefix cache had.
    start: usize,
    /// Prompt tokens in the cache so far.
    done: usize,
}

struct Decoding {
    /// Scores of its next token.
    logits: Vec<f32>,
    /// Position of the next token fed to the decoder.
    position: i64,
    /// When its first token was sampled.
    since: Option<Instant>,
}

/// What one prefill chunk did to a sequence.
enum Chunk<T> {
    /// Part of its prompt is in its cache.
    Partial(Sequence<T>, usize),
    /// Its whole prompt is in the cache it hands over; it is decoding.
    Done(Sequence<T>, usize, KvCache),
    Failed(T, EngineError),
}

/// Tiles of one sequence in a vision call.
struct Part {
    id: u64,
    tiles: Range<usize>,
    /// Feature rows they make; `None` for an image set the family cannot split, which fills
    /// its call alone.
    rows: Option<usize>,
}

/// A call on the model's vision thread.
struct VisionCall {
    reply: VisionReply,
    /// The tiles it encodes, in input order.
    parts: Vec<Part>,
    started: Instant,
}

/// How much prefill work one step may do besides decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Prompt tokens through the decoder.
    pub prefill_tokens: usize,
    /// Image tiles through the vision encoder (an image set the family cannot split counts
    /// as one).
    pub vision_tiles: usize,
}

impl Limits {
    /// A lone request: its prompt in one decoder call (fastest when nobody waits), its tiles
    /// one at a time: on a CPU a tile costs the same alone or batched, and each tile in a call
    /// holds its own activations (docs/benchmarks.md has the peak memory either way).
    pub const ALONE: Limits = Limits { prefill_tokens: usize::MAX, vision_tiles: 1 };
}

/// What one [`Batch::step`] did.
pub struct Step<T> {
    pub finished: Vec<Finished<T>>,
    /// Rows in this step's decoder call (0 when none ran).
    pub decode_rows: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Sequences being prefilled and decoded together on one model.
pub struct Batch<T> {
    /// Every sequence. Those not decoding are in admission order; the decoding ones are in the
    /// order of the cache's rows, since a sequence moves to the back as it starts decoding.
    seqs: Vec<Sequence<T>>,
    cache: KvCache,
    limits: Limits,
    vision_call: Option<VisionCall>,
    next_id: u64,
}

impl<T> Batch<T> {
    /// An empty batch for a decoder with this cache layout.
    pub fn new(layout: &KvLayout, limits: Limits) -> Self {
        let limits = Limits { prefill_tokens: limits.prefill_tokens.max(1), vision_tiles: limits.vision_tiles.max(1) };
        Self { seqs: Vec::new(), cache: KvCache::none(layout), limits, vision_call: None, next_id: 0 }
    }

    /// Sequences admitted and not finished.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Rows the sequences hold or will hold once prefilled (a prompt with several samples
    /// makes as many rows), each with its sequence's tag.
    pub fn rows(&self) -> impl Iterator<Item = &T> {
        self.seqs.iter().flat_map(|s| std::iter::repeat_n(&s.tag, 1 + s.siblings))
    }

    /// Drop every sequence (after a panic left the batch in an unknown state) and return their
    /// tags, so their owners can be told.
    pub fn abandon(&mut self) -> Vec<T> {
        self.cache.clear();
        self.vision_call = None; // the vision thread finishes the call; nobody reads it
        self.seqs.drain(..).map(|s| s.tag).collect()
    }

    /// Drop the sequences not decoding yet that `gone` picks, such as clients that left before
    /// their first token, so their remaining tiles and prompt are never computed; returns
    /// their tags. One whose tiles are in the encoder now starts no more tiles and goes at the
    /// first call after they come back.
    pub fn withdraw(&mut self, gone: impl Fn(&T) -> bool) -> Vec<T> {
        let in_flight: Vec<u64> = self.vision_call.iter().flat_map(|c| c.parts.iter().map(|p| p.id)).collect();
        let mut out = Vec::new();
        for mut seq in std::mem::take(&mut self.seqs) {
            let leaving = match seq.phase {
                Phase::Decoding(_) => false,
                Phase::Leaving => true,
                _ => gone(&seq.tag),
            };
            if !leaving {
                self.seqs.push(seq);
            } else if in_flight.contains(&seq.id) {
                seq.phase = Phase::Leaving;
                self.seqs.push(seq);
            } else {
                out.push(seq.tag);
            }
        }
        out
    }

    /// Cache bytes held now, padding included.
    pub fn kv_bytes(&self, layout: &KvLayout) -> usize {
        let own = |seq: &Sequence<T>| match &seq.phase {
            Phase::Encoding(Encoding { prompt, .. })
            | Phase::Ready { prompt, .. }
            | Phase::Prefilling(Prefill { prompt, .. }) => prompt.cache.bytes(layout),
            Phase::Leaving | Phase::Decoding(_) => 0,
        };
        self.cache.bytes(layout) + self.seqs.iter().map(own).sum::<usize>()
    }

    /// Add a sequence; it is prefilled by the next steps. A prompt that cannot be generated
    /// from is handed back with the reason.
    pub fn add(
        &mut self,
        model: &Model,
        tag: T,
        prompt: Prompt,
        params: &GenerationParams,
    ) -> Result<(), (T, EngineError)> {
        let cache = match model.codec.check_prompt(&prompt, params).and_then(|()| KvCache::empty(&model.decoder.layout))
        {
            Ok(cache) => cache,
            Err(e) => return Err((tag, e)),
        };
        let sampler = Sampler::new(params.sampling.clone());
        let run = Run::new(&prompt, model.codec.stop_rules(params), sampler, params);
        let identity = model.prefix_cache.as_ref().map(|_| model.codec.token_identity(&prompt));
        let reused = match (&model.prefix_cache, &identity) {
            (Some(cache), Some(identity)) => cache_hit(cache, identity, &prompt.input_ids),
            _ => Vec::new(),
        };
        let start = reused.len() * BLOCK_TOKENS;
        let mut timings = Timings {
            preprocess_s: prompt.preprocess_time.as_secs_f64(),
            constraint_compile_s: params.guide.as_ref().map_or(0.0, |guide| guide.compile_s),
            prefix_cached_tokens: start,
            ..Timings::default()
        };
        let Prompt { input_ids, images, positions, image_ids, .. } = prompt;
        // Images whose tokens are all in the reused blocks need no features.
        let image_token = model.codec.family.image_token_id();
        let needed = input_ids[start..].contains(&image_token);
        timings.image_features = match (&images, needed) {
            (None, _) => ImageFeatures::NoImages,
            (Some(_), false) => ImageFeatures::PrefixCache,
            (Some(PromptImages::Features { .. }), true) => ImageFeatures::FeatureCache,
            (Some(PromptImages::Pixels(_)), true) => ImageFeatures::Encoded,
        };
        let prompt =
            PromptInput { input_ids, positions: positions.prompt, next_position: positions.next, cache, reused };
        let phase = match images.filter(|_| needed) {
            Some(PromptImages::Pixels(images)) => Phase::Encoding(Encoding {
                prompt,
                key: model.feature_cache.as_ref().map(|_| FeatureCache::key(&image_ids)),
                images,
                done: 0,
                rows: Vec::new(),
            }),
            Some(PromptImages::Features { features, .. }) => {
                timings.feature_cached_tokens = prompt.image_tokens_to_prefill(image_token);
                Phase::Ready { prompt, features: Some(features) }
            }
            None => Phase::Ready { prompt, features: None },
        };
        self.next_id += 1;
        let siblings = params.samples.saturating_sub(1);
        let admitted = Instant::now();
        self.seqs.push(Sequence { id: self.next_id, tag, run, timings, admitted, siblings, identity, phase });
        Ok(())
    }

    /// Keep the vision encoder busy on its thread, beside prefill and decode: collect a
    /// finished call's features, and start the next call on up to `vision_tiles` tiles of the
    /// sequences waiting for it (admission order, several sequences' tiles in one call where
    /// the family allows it). Waits for the encoder only when nothing else can run.
    fn encode_images(&mut self, model: &Model, finished: &mut Vec<Finished<T>>) {
        loop {
            let idle = self.seqs.iter().all(|s| matches!(s.phase, Phase::Encoding(_) | Phase::Leaving));
            match self.vision_call.take() {
                Some(call) => match call.reply.poll(idle) {
                    Some(result) => self.deliver(model, &call.parts, call.started, result, finished),
                    None => {
                        self.vision_call = Some(call);
                        return;
                    }
                },
                None => {
                    if !self.start_vision(model, finished) || !idle {
                        return;
                    }
                }
            }
        }
    }

    /// Start one vision-encoder call; false when no sequence needs one. Sequences whose
    /// features are in the feature cache skip the encoder.
    fn start_vision(&mut self, model: &Model, finished: &mut Vec<Finished<T>>) -> bool {
        let untouched = |s: &Sequence<T>| matches!(&s.phase, Phase::Encoding(work) if work.done == 0);
        if model.feature_cache.is_some() && self.seqs.iter().any(untouched) {
            self.seqs = std::mem::take(&mut self.seqs).into_iter().map(|seq| seq.with_cached_features(model)).collect();
        }
        let mut budget = self.limits.vision_tiles;
        let mut parts = Vec::new();
        let mut sets = Vec::new();
        for seq in &self.seqs {
            let Phase::Encoding(work) = &seq.phase else { continue };
            if budget == 0 {
                break;
            }
            let tiles = work.images.tiles();
            let Some(per_tile) = work.images.tile_tokens else {
                // A set the family cannot split goes alone, whatever its size.
                if parts.is_empty() {
                    parts.push(Part { id: seq.id, tiles: 0..tiles, rows: None });
                    sets.push((&work.images, 0..tiles));
                }
                break;
            };
            let take = budget.min(tiles - work.done);
            budget -= take;
            let range = work.done..work.done + take;
            parts.push(Part { id: seq.id, tiles: range.clone(), rows: Some(take * per_tile) });
            sets.push((&work.images, range));
        }
        if parts.is_empty() {
            return false;
        }
        match vision_inputs(&sets).and_then(|inputs| model.vision.encode(inputs)) {
            Ok(reply) => self.vision_call = Some(VisionCall { reply, parts, started: Instant::now() }),
            Err(e) => self.fail_parts(&parts, e, finished),
        }
        true
    }

    /// Hand a vision call's feature rows to the sequences whose tiles it encoded.
    fn deliver(
        &mut self,
        model: &Model,
        parts: &[Part],
        started: Instant,
        result: Result<Array2<f32>, EngineError>,
        finished: &mut Vec<Finished<T>>,
    ) {
        let seconds = started.elapsed().as_secs_f64();
        let features = match result {
            Ok(features) => features,
            Err(e) => return self.fail_parts(parts, e, finished),
        };
        let expected: usize = parts.iter().map(|p| p.rows.unwrap_or(features.nrows())).sum();
        if expected != features.nrows() {
            let e = EngineError::GraphMismatch(format!(
                "the vision encoder returned {} feature rows for {expected} image tokens",
                features.nrows()
            ));
            return self.fail_parts(parts, e, finished);
        }
        let mut start = 0;
        let mut rows = Vec::with_capacity(parts.len());
        for part in parts {
            let end = start + part.rows.unwrap_or(features.nrows());
            rows.push((part.id, part.tiles.end, features.slice(ndarray::s![start..end, ..]).to_owned()));
            start = end;
        }
        for seq in std::mem::take(&mut self.seqs) {
            let Some(k) = rows.iter().position(|(id, ..)| *id == seq.id) else {
                self.seqs.push(seq);
                continue;
            };
            let (_, tiles_done, features) = rows.swap_remove(k);
            match seq.encoded(model, tiles_done, features, seconds) {
                Ok(seq) => self.seqs.push(seq),
                Err((tag, e)) => finished.push((tag, Err(e))),
            }
        }
    }

    /// The sequences of a failed vision call fail with it.
    fn fail_parts(&mut self, parts: &[Part], error: EngineError, finished: &mut Vec<Finished<T>>) {
        let error = Arc::new(error);
        for seq in self.seqs.extract_if(.., |s| parts.iter().any(|p| p.id == s.id)) {
            finished.push((seq.tag, Err(EngineError::BatchFailed(error.clone()))));
        }
    }

    /// Sample every decoding sequence's next token; finished ones leave the batch. Returns the
    /// tokens of those that stay, in the order of the cache's rows.
    fn sample(
        &mut self,
        model: &Model,
        on_token: &mut dyn FnMut(&mut T, Event) -> Flow,
        finished: &mut Vec<Finished<T>>,
    ) -> Vec<u32> {
        let mut keep = Vec::new();
        let mut tokens = Vec::new();
        for mut seq in std::mem::take(&mut self.seqs) {
            let Phase::Decoding(decoding) = &mut seq.phase else {
                self.seqs.push(seq);
                continue;
            };
            let token = match seq.run.sample(&mut decoding.logits) {
                Ok(token) => token,
                Err(e) => {
                    keep.push(false);
                    finished.push((seq.tag, Err(e)));
                    continue;
                }
            };
            let since = *decoding.since.get_or_insert_with(|| {
                seq.timings.time_to_first_token_s = seq.admitted.elapsed().as_secs_f64();
                Instant::now()
            });
            let outcome = seq.run.accept(model, token, &mut |event| on_token(&mut seq.tag, event));
            keep.push(matches!(outcome, Ok(None)));
            match outcome {
                Ok(None) => {
                    tokens.push(token);
                    self.seqs.push(seq);
                }
                Ok(Some(reason)) => {
                    seq.keep_prefix(model, &self.cache, keep.len() - 1);
                    finished.push(seq.finish(model, reason, since, on_token));
                }
                Err(e) => finished.push((seq.tag, Err(e))),
            }
        }
        if let Err(e) = self.cache.retain(&keep, model.decoder.cache_allocator()) {
            self.fail_decoding(e, finished);
            tokens.clear();
        }
        tokens
    }

    /// One decoder call: every decoding sequence's last token in, its next logits out.
    fn decode(&mut self, model: &mut Model, tokens: &[u32]) -> Result<(), EngineError> {
        let (embeds, mut cost) = model.embedder.embed(tokens, tokens.len())?;
        let positions: Vec<ArrayD<i64>> = self
            .seqs
            .iter()
            .filter_map(|seq| match &seq.phase {
                Phase::Decoding(decoding) => Some(model.codec.family.step_positions(decoding.position)),
                _ => None,
            })
            .collect();
        let positions = stack_rows(&positions)?;
        // The constrained rows' next masks are computed while the decoder runs.
        let guides: Vec<&mut Guide> = self
            .seqs
            .iter_mut()
            .filter(|seq| matches!(seq.phase, Phase::Decoding(_)))
            .filter_map(|seq| seq.run.guide.as_mut())
            .collect();
        let (forward, masks) = std::thread::scope(|scope| {
            let masks = (!guides.is_empty())
                .then(|| scope.spawn(move || guides.into_iter().try_for_each(|guide| guide.prepare())));
            let forward = model.decoder.forward(embeds, positions, &mut self.cache);
            (forward, masks.map(|thread| thread.join()))
        });
        let (logits, in_decoder) = forward?;
        // A mask that failed is computed again, and fails, where its sequence samples.
        if let Some(Err(_)) = masks {
            tracing::warn!("computing constraint masks panicked; each sequence computes its own again");
        }
        cost += in_decoder;
        let decoding = self.seqs.iter_mut().filter_map(|seq| match &mut seq.phase {
            Phase::Decoding(decoding) => Some((decoding, &mut seq.timings)),
            _ => None,
        });
        for ((decoding, timings), logits) in decoding.zip(logits) {
            decoding.logits = logits;
            decoding.position += 1;
            timings.decode_steps += 1;
            timings.decode_in_runtime_s += cost.in_runtime.as_secs_f64();
            timings.decode_transferred_bytes += cost.transferred;
        }
        Ok(())
    }

    /// A decoder call failed: every decoding sequence fails with it.
    fn fail_decoding(&mut self, error: EngineError, finished: &mut Vec<Finished<T>>) {
        let error = Arc::new(error);
        self.cache.clear();
        for seq in self.seqs.extract_if(.., |s| matches!(s.phase, Phase::Decoding(_))) {
            finished.push((seq.tag, Err(EngineError::BatchFailed(error.clone()))));
        }
    }
}

/// What makes new rows: a step, and the prefill that forks a prompt's samples.
impl<T: Fork> Batch<T> {
    /// One step: prefill up to `prefill_chunk` prompt tokens, give every decoding row its next
    /// token (through `on_token` with the row's tag), drop the rows that finished, and run one
    /// decoder call for the others.
    pub fn step(&mut self, model: &mut Model, on_token: &mut dyn FnMut(&mut T, Event) -> Flow) -> Step<T> {
        let mut finished = Vec::new();
        let start = Instant::now();
        self.encode_images(model, &mut finished);
        self.prefill(model, &mut finished);
        let prefill_s = start.elapsed().as_secs_f64();
        let tokens = self.sample(model, on_token, &mut finished);
        let start = Instant::now();
        if !tokens.is_empty()
            && let Err(e) = self.decode(model, &tokens)
        {
            self.fail_decoding(e, &mut finished);
        }
        Step { finished, decode_rows: tokens.len(), prefill_s, decode_s: start.elapsed().as_secs_f64() }
    }

    /// Prefill up to `prefill_tokens` prompt tokens of the sequences whose images are
    /// encoded, in admission order; those done join the decode batch.
    fn prefill(&mut self, model: &mut Model, finished: &mut Vec<Finished<T>>) {
        let mut budget = self.limits.prefill_tokens;
        let mut i = 0;
        while budget > 0 && i < self.seqs.len() {
            if !matches!(self.seqs[i].phase, Phase::Ready { .. } | Phase::Prefilling(_)) {
                i += 1;
                continue;
            }
            match self.seqs.remove(i).prefill_chunk(model, budget) {
                Chunk::Partial(seq, used) => {
                    budget -= used;
                    self.seqs.insert(i, seq);
                    i += 1;
                }
                Chunk::Done(seq, used, cache) => {
                    budget -= used;
                    seq.keep_prefix(model, &cache, 0);
                    match self.cache.join(cache, 1 + seq.siblings, model.decoder.cache_allocator()) {
                        // In the order of the rows just joined.
                        Ok(()) => self.seqs.extend(seq.into_samples(&mut self.next_id)),
                        Err(e) => finished.push((seq.tag, Err(e))),
                    }
                }
                Chunk::Failed(tag, e) => finished.push((tag, Err(e))),
            }
        }
    }
}

impl<T: Fork> Sequence<T> {
    /// A sequence just prefilled and its siblings, one per sample: the same first logits and
    /// position, each with a run of its own. One not decoding yet has nothing to share.
    fn into_samples(mut self, next_id: &mut u64) -> Vec<Self> {
        let siblings = std::mem::take(&mut self.siblings);
        let Phase::Decoding(first) = &self.phase else { return vec![self] };
        let mut samples = Vec::with_capacity(1 + siblings);
        for sample in 1..=siblings {
            *next_id += 1;
            samples.push(Sequence {
                id: *next_id,
                tag: self.tag.fork(),
                run: self.run.fork(sample),
                timings: self.timings.clone(),
                admitted: self.admitted,
                siblings: 0,
                identity: self.identity.clone(),
                phase: Phase::Decoding(Decoding {
                    logits: first.logits.clone(),
                    position: first.position,
                    since: None,
                }),
            });
        }
        samples.insert(0, self);
        samples
    }
}

impl<T> Sequence<T> {
    /// Keep the full blocks of row `row` of `cache` (its positions so far: the prompt, and
    /// the tokens fed back after it) in the model's prefix cache. A block that cannot be read
    /// is left out with a warning: the cache is an optimisation, the answer is not at stake.
    fn keep_prefix(&self, model: &Model, cache: &KvCache, row: usize) {
        let (Some(pool), Some(identity)) = (&model.prefix_cache, &self.identity) else { return };
        let tokens = self.run.history();
        let keys = identity.keys(&tokens[..cache.row_len(row).min(tokens.len())]);
        if let Err(e) = pool.insert(&keys, |b| cache.block(row, b * BLOCK_TOKENS)) {
            tracing::warn!(error = %e, "a finished sequence's blocks were not kept in the prefix cache");
        }
    }

    /// Encoding -> Ready when the feature cache has its images' features.
    fn with_cached_features(mut self, model: &Model) -> Self {
        let Phase::Encoding(work) = &self.phase else { return self };
        let (Some(cache), Some(key), 0) = (&model.feature_cache, &work.key, work.done) else { return self };
        let Some(features) = cache.get(key) else { return self };
        self.timings.image_features = ImageFeatures::FeatureCache;
        self.timings.feature_cached_tokens = work.prompt.image_tokens_to_prefill(model.codec.family.image_token_id());
        self.phase = match self.phase {
            Phase::Encoding(work) => Phase::Ready { prompt: work.prompt, features: Some(features) },
            other => other,
        };
        self
    }

    /// Take the feature rows of its tiles up to `tiles_done`; Encoding -> Ready after the last.
    fn encoded(
        mut self,
        model: &Model,
        tiles_done: usize,
        rows: Array2<f32>,
        seconds: f64,
    ) -> Result<Self, (T, EngineError)> {
        let Phase::Encoding(work) = &mut self.phase else { return Ok(self) };
        work.rows.push(rows);
        work.done = tiles_done;
        self.timings.vision_s += seconds;
        if work.done < work.images.tiles() {
            return Ok(self);
        }
        let views: Vec<_> = work.rows.iter().map(|r| r.view()).collect();
        let features = match ndarray::concatenate(Axis(0), &views) {
            Ok(features) => Arc::new(features),
            Err(e) => return Err((self.tag, EngineError::GraphMismatch(format!("image feature rows: {e}")))),
        };
        if let (Some(cache), Some(key)) = (&model.feature_cache, work.key) {
            cache.insert(key, features.clone());
        }
        self.phase = match self.phase {
            Phase::Encoding(work) => Phase::Ready { prompt: work.prompt, features: Some(features) },
            other => other,
        };
        Ok(self)
    }

    /// Up to `budget` more prompt tokens into its cache (Ready -> Prefilling first, making its
    /// embeddings); Prefilling -> Decoding after the last, with the logits of its last position.
    fn prefill_chunk(mut self, model: &mut Model, budget: usize) -> Chunk<T> {
        let start = Instant::now();
        let mut prefill = match self.phase {
            Phase::Ready { prompt, features } => match Prefill::start(model, prompt, features) {
                Ok(prefill) => prefill,
                Err(e) => return Chunk::Failed(self.tag, e),
            },
            Phase::Prefilling(prefill) => prefill,
            other => {
                self.phase = other;
                return Chunk::Partial(self, 0);
            }
        };
        let total = prefill.prompt.input_ids.len();
        let chunk = budget.min(total - prefill.done);
        let logits = match prefill.forward(model, chunk) {
            Ok(logits) => logits,
            Err(e) => return Chunk::Failed(self.tag, e),
        };
        self.timings.prefill_s += start.elapsed().as_secs_f64();
        if prefill.done < total {
            self.phase = Phase::Prefilling(prefill);
            return Chunk::Partial(self, chunk);
        }
        let Some(logits) = logits.into_iter().next() else {
            return Chunk::Failed(self.tag, EngineError::GraphMismatch("the decoder returned no logits".into()));
        };
        let PromptInput { next_position, cache, .. } = prefill.prompt;
        self.phase = Phase::Decoding(Decoding { logits, position: next_position, since: None });
        Chunk::Done(self, chunk, cache)
    }

    /// Its completion, once a stop rule ended it.
    fn finish(
        self,
        model: &Model,
        reason: FinishReason,
        since: Instant,
        on_token: &mut dyn FnMut(&mut T, Event) -> Flow,
    ) -> Finished<T> {
        let Sequence { mut tag, run, mut timings, .. } = self;
        timings.decode_s = since.elapsed().as_secs_f64();
        let completion = run.finish(model, reason, timings, &mut |event| on_token(&mut tag, event));
        (tag, completion)
    }
}

impl Prefill {
    /// The embeddings of the prompt's tokens past the reused blocks, whose positions go into
    /// its cache first.
    fn start(
        model: &mut Model,
        mut prompt: PromptInput,
        features: Option<Arc<Array2<f32>>>,
    ) -> Result<Self, EngineError> {
        let start = prompt.reused.len() * BLOCK_TOKENS;
        if start > 0 {
            let reused = std::mem::take(&mut prompt.reused);
            prompt.cache = KvCache::from_blocks(&model.decoder.layout, &reused, model.decoder.cache_allocator())?;
        }
        let image_token = model.codec.family.image_token_id();
        let skip_rows = prompt.input_ids[..start].iter().filter(|&&id| id == image_token).count();
        let embeds = model.prompt_embeddings(&prompt.input_ids[start..], features, skip_rows)?;
        Ok(Prefill { prompt, embeds, start, done: start })
    }

    /// The next `chunk` prompt tokens through the decoder; the logits of the chunk's last
    /// position.
    fn forward(&mut self, model: &mut Model, chunk: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let range = Slice::from(self.done..self.done + chunk);
        let own = Slice::from(self.done - self.start..self.done - self.start + chunk);
        let inputs = float_value(self.embeds.slice_axis(Axis(1), own).to_owned(), model.decoder.embeds_type())?;
        let positions = &self.prompt.positions;
        let positions = positions.slice_axis(Axis(positions.ndim() - 1), range).to_owned();
        let (logits, _) = model.decoder.forward(inputs, positions, &mut self.prompt.cache)?;
        self.done += chunk;
        Ok(logits)
    }
}

impl Model {
    /// One short generation about a small picture, through every graph: a package whose
    /// graphs run but do not fit together (image features of another width than the
    /// embeddings, a vision encoder of another family) fails here, at load, rather than on
    /// every image request.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        let picture = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
        let message = crate::preprocess::chat_template::ChatMessage::user(1, "Hello");
        let prompt = self.codec.prepare(&[message], &[picture], &[], &[])?;
        let params = GenerationParams { max_new_tokens: 1, ..GenerationParams::default() };
        self.generate(prompt, &params, &mut |_| Flow::Continue).map(|_| ())
    }

    /// Generate one sample from `prompt`, calling `on_token` for every token; it may stop
    /// generation. A batch of one: the same steps as concurrent sequences take, with the whole prompt
    /// prefilled in one decoder call. Takes the prompt (its pixels move into the batch).
    pub fn generate(
        &mut self,
        prompt: Prompt,
        params: &GenerationParams,
        on_token: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<Completion, EngineError> {
        if params.samples != 1 {
            return Err(EngineError::InvalidParameter("generate makes one sample; a Batch makes several".into()));
        }
        let mut batch = Batch::new(&self.decoder.layout, Limits::ALONE);
        batch.add(self, (), prompt, params).map_err(|(_, e)| e)?;
        loop {
            if let Some((_, result)) = batch.step(self, &mut |_, event| on_token(event)).finished.pop() {
                return result;
            }
        }
    }
}

/// The prefix cache's blocks for the beginning of `input_ids`, leaving at least its last
/// token to prefill (its logits give the first generated token).
fn cache_hit(cache: &PrefixCache, identity: &TokenIdentity, input_ids: &[u32]) -> Vec<Arc<Block>> {
    let keys = identity.keys(&input_ids[..input_ids.len().saturating_sub(1)]);
    cache.lookup(&keys)
}

/// One step's position ids for the batch from each row's: `[1, 1]` rows become `[rows, 1]`,
/// M-RoPE's `[3, 1, 1]` become `[3, rows, 1]` (the batch axis is second to last).
fn stack_rows(positions: &[ArrayD<i64>]) -> Result<ArrayD<i64>, EngineError> {
    let views: Vec<_> = positions.iter().map(|p| p.view()).collect();
    let batch_axis = Axis(positions.first().map_or(0, |p| p.ndim().saturating_sub(2)));
    ndarray::concatenate(batch_axis, &views).map_err(|e| EngineError::GraphMismatch(format!("position ids: {e}")))
}

/// The vision-encoder inputs for tiles `range` of each image set, joined along axis 0.
fn vision_inputs(parts: &[(&ProcessedImages, Range<usize>)]) -> Result<Vec<NamedTensor>, EngineError> {
    let Some((first, range)) = parts.first() else { return Ok(Vec::new()) };
    if parts.len() == 1 && *range == (0..first.tiles()) {
        return Ok(first.inputs.clone());
    }
    first
        .inputs
        .iter()
        .enumerate()
        .map(|(n, input)| {
            let slices: Vec<TensorData> = parts
                .iter()
                .map(|(images, range)| match images.inputs.get(n) {
                    Some(other) if other.name == input.name => Ok(other.data.slice_first_axis(range.clone())),
                    _ => Err(EngineError::GraphMismatch("image sets with different vision inputs".into())),
                })
                .collect::<Result<_, _>>()?;
            let refs: Vec<&TensorData> = slices.iter().collect();
            let data = TensorData::concat_first_axis(&refs)
                .ok_or_else(|| EngineError::GraphMismatch(format!("tiles of different shapes in {}", input.name)))?;
            Ok(NamedTensor { name: input.name.clone(), data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::stack_rows;

    #[test]
    fn step_positions_stack_on_the_batch_axis_for_1d_and_mrope_layouts() {
        let one = |p: i64| ArrayD::from_elem(IxDyn(&[1, 1]), p);
        let stacked = stack_rows(&[one(5), one(9)]).unwrap();
        assert_eq!(stacked.shape(), [2, 1]);
        assert_eq!(stacked.iter().copied().collect::<Vec<_>>(), [5, 9]);

        let mrope = |p: i64| ArrayD::from_shape_vec(IxDyn(&[3, 1, 1]), vec![p, p + 100, p + 200]).unwrap();
        let stacked = stack_rows(&[mrope(5), mrope(9)]).unwrap();
        assert_eq!(stacked.shape(), [3, 2, 1]);
        // Each of the three sections (temporal, height, width) lists the rows in order.
        assert_eq!(stacked.iter().copied().collect::<Vec<_>>(), [5, 9, 105, 109, 205, 209]);
    }
}
