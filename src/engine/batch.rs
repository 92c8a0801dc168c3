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

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, ArrayD, Axis, Slice};

use super::EngineError;
use super::feature_cache::{FeatureCache, FeatureKey};
use super::generate::{Completion, Event, Flow, GenerationParams, Prompt, Run, Timings, float_value};
use super::kv_cache::{KvCache, KvLayout};
use super::model::Model;
use super::sampler::Sampler;
use crate::family::{NamedTensor, ProcessedImages, TensorData};

/// What the owner of a sequence hears about it: its tokens, through the callback it passed
/// to [`Batch::step`] with its tag, and its end.
pub type Finished<T> = (T, Result<Completion, EngineError>);

/// A sequence's output state and clock, from admission to its last token.
struct Sequence {
    run: Run,
    timings: Timings,
    admitted: Instant,
    /// Set at the first token.
    decoding_since: Option<Instant>,
    /// Position of the next token fed to the decoder.
    position: i64,
}

/// Images on their way through the vision encoder.
struct VisionWork {
    images: ProcessedImages,
    key: Option<FeatureKey>,
    /// Tiles encoded so far, and their feature rows.
    done: usize,
    rows: Vec<Array2<f32>>,
}

/// A vision-encoder call running on its own thread.
struct VisionCall {
    handle: std::thread::JoinHandle<Result<Array2<f32>, EngineError>>,
    /// `(pending id, tiles)` it encodes, in input order.
    parts: Vec<(u64, Range<usize>)>,
    started: Instant,
}

/// A sequence whose prompt is not entirely in its cache yet.
struct Pending<T> {
    id: u64,
    tag: T,
    seq: Sequence,
    input_ids: Vec<u32>,
    positions: ArrayD<i64>,
    /// `Some` until every tile is encoded.
    vision: Option<VisionWork>,
    features: Option<Arc<Array2<f32>>>,
    /// `[1, prompt, hidden]`, built at the first prompt chunk.
    embeds: Option<ArrayD<f32>>,
    done: usize,
    cache: KvCache,
    /// Withdrawn while its tiles were in the encoder: no more tiles start, and it goes when they
    /// come back.
    leaving: bool,
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
    /// holds its own activations (a 17-tile SmolVLM-256M image peaked at 2.9 GB four at a
    /// time, 1.9 GB one at a time, with the same time to first token within noise).
    pub const ALONE: Limits = Limits { prefill_tokens: usize::MAX, vision_tiles: 1 };
}

/// A sequence in the decode batch: row `i` of the batch's cache.
struct Row<T> {
    tag: T,
    seq: Sequence,
    /// Logits for its next token.
    logits: Vec<f32>,
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
    pending: VecDeque<Pending<T>>,
    rows: Vec<Row<T>>,
    cache: KvCache,
    limits: Limits,
    vision_call: Option<VisionCall>,
    next_id: u64,
}

impl<T> Batch<T> {
    /// An empty batch for a decoder with this cache layout.
    pub fn new(layout: &KvLayout, limits: Limits) -> Self {
        let limits = Limits { prefill_tokens: limits.prefill_tokens.max(1), vision_tiles: limits.vision_tiles.max(1) };
        Self {
            pending: VecDeque::new(),
            rows: Vec::new(),
            cache: KvCache::none(layout),
            limits,
            vision_call: None,
            next_id: 0,
        }
    }

    /// Sequences admitted and not finished.
    pub fn len(&self) -> usize {
        self.pending.len() + self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tags of every sequence, pending or decoding.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.pending.iter().map(|p| &p.tag).chain(self.rows.iter().map(|r| &r.tag))
    }

    /// Drop every sequence (after a panic left the batch in an unknown state) and return their
    /// tags, so their owners can be told.
    pub fn abandon(&mut self) -> Vec<T> {
        self.cache.clear();
        self.vision_call = None; // the encoder thread finishes on its own
        let pending = self.pending.drain(..).map(|p| p.tag);
        pending.chain(self.rows.drain(..).map(|r| r.tag)).collect()
    }

    /// Drop the pending sequences (not decoding yet) that `gone` picks, such as clients that left
    /// before their first token, so their remaining tiles and prompt are never computed; returns
    /// their tags. One whose tiles are in the encoder now starts no more tiles and goes at the
    /// first call after they come back.
    pub fn withdraw(&mut self, gone: impl Fn(&T) -> bool) -> Vec<T> {
        let encoding: Vec<u64> = self.vision_call.iter().flat_map(|c| c.parts.iter().map(|(id, _)| *id)).collect();
        let mut out = Vec::new();
        for pending in std::mem::take(&mut self.pending) {
            if !gone(&pending.tag) {
                self.pending.push_back(pending);
            } else if encoding.contains(&pending.id) {
                self.pending.push_back(Pending { leaving: true, ..pending });
            } else {
                out.push(pending.tag);
            }
        }
        out
    }

    /// Cache bytes held now, padding included.
    pub fn kv_bytes(&self, layout: &KvLayout) -> usize {
        self.cache.bytes(layout) + self.pending.iter().map(|p| p.cache.bytes(layout)).sum::<usize>()
    }

    /// Add a sequence; it is prefilled by the next steps. A prompt that cannot be generated
    /// from is handed back with the reason.
    pub fn admit(
        &mut self,
        model: &Model,
        tag: T,
        prompt: Prompt,
        params: &GenerationParams,
    ) -> Result<(), (T, EngineError)> {
        let cache = match model.check_prompt(&prompt, params).and_then(|()| KvCache::empty(&model.decoder.layout)) {
            Ok(cache) => cache,
            Err(e) => return Err((tag, e)),
        };
        let seq = Sequence {
            run: Run::new(&prompt.input_ids, model.stop_rules(params), Sampler::new(params.sampling.clone())),
            timings: Timings { preprocess_s: prompt.preprocess_time.as_secs_f64(), ..Timings::default() },
            admitted: Instant::now(),
            decoding_since: None,
            position: prompt.positions.next,
        };
        let Prompt { input_ids, images, positions, .. } = prompt;
        let vision = images.map(|images| VisionWork {
            key: model.feature_cache.as_ref().map(|_| FeatureCache::key(&images.inputs)),
            images,
            done: 0,
            rows: Vec::new(),
        });
        self.next_id += 1;
        let pending = Pending {
            id: self.next_id,
            tag,
            seq,
            input_ids,
            positions: positions.prompt,
            vision,
            features: None,
            embeds: None,
            done: 0,
            cache,
            leaving: false,
        };
        self.pending.push_back(pending);
        Ok(())
    }

    /// One step: prefill up to `prefill_chunk` prompt tokens, give every decoding row its next
    /// token (through `on_token` with the row's tag), drop the rows that finished, and run one
    /// decoder call for the others.
    pub fn step(&mut self, model: &mut Model, on_token: &mut dyn FnMut(&mut T, Event) -> Flow) -> Step<T> {
        let mut finished = Vec::new();
        let start = Instant::now();
        self.encode_images(model, &mut finished);
        self.prefill(model, &mut finished);
        let prefill_s = start.elapsed().as_secs_f64();
        self.sample(model, on_token, &mut finished);
        let start = Instant::now();
        let decode_rows = self.rows.len();
        if decode_rows > 0
            && let Err(e) = self.decode(model)
        {
            self.fail_rows(&e, &mut finished);
        }
        Step { finished, decode_rows, prefill_s, decode_s: start.elapsed().as_secs_f64() }
    }

    /// Keep the vision encoder busy on its own thread, beside prefill and decode: collect a
    /// finished call's features, and start the next call on up to `vision_tiles` tiles of the
    /// pending sequences (admission order, several sequences' tiles in one call where the
    /// family allows it). Waits for the encoder only when nothing else can run.
    fn encode_images(&mut self, model: &Model, finished: &mut Vec<Finished<T>>) {
        loop {
            let idle = self.rows.is_empty() && self.pending.iter().all(|p| p.vision.is_some());
            match &self.vision_call {
                Some(call) if idle || call.handle.is_finished() => {
                    let call = self.vision_call.take().expect("checked");
                    let result = call
                        .handle
                        .join()
                        .unwrap_or_else(|_| Err(EngineError::BatchFailed("the vision encoder panicked".into())));
                    self.deliver(model, &call.parts, call.started, result, finished);
                }
                Some(_) => return,
                None => {
                    if !self.start_vision(model, finished) || !idle {
                        return;
                    }
                }
            }
        }
    }

    /// Start one vision-encoder call; false when no pending sequence needs one.
    fn start_vision(&mut self, model: &Model, finished: &mut Vec<Finished<T>>) -> bool {
        let mut budget = self.limits.vision_tiles;
        let mut parts: Vec<(u64, Range<usize>)> = Vec::new();
        for pending in self.pending.iter_mut() {
            if budget == 0 || pending.leaving || from_cache(model, pending) {
                continue;
            }
            let Some(work) = &pending.vision else { continue };
            let tiles = work.images.tiles();
            if work.images.tile_tokens.is_none() {
                // A set the family cannot split goes alone, whatever its size.
                if parts.is_empty() {
                    parts.push((pending.id, 0..tiles));
                }
                break;
            }
            let take = budget.min(tiles - work.done);
            budget -= take;
            parts.push((pending.id, work.done..work.done + take));
        }
        if parts.is_empty() {
            return false;
        }
        let inputs = {
            let sets: Vec<(&ProcessedImages, Range<usize>)> = parts
                .iter()
                .map(|(id, range)| (&self.get(*id).vision.as_ref().expect("has images").images, range.clone()))
                .collect();
            vision_inputs(&sets)
        };
        let encoder = model.vision.clone();
        let spawned = inputs.and_then(|inputs| {
            std::thread::Builder::new()
                .name("vision-encoder".into())
                .spawn(move || encoder.lock().unwrap_or_else(|e| e.into_inner()).encode(inputs))
                .map_err(|e| EngineError::BatchFailed(format!("could not start the vision encoder: {e}")))
        });
        match spawned {
            Ok(handle) => self.vision_call = Some(VisionCall { handle, parts, started: Instant::now() }),
            Err(e) => self.fail_pending(&parts, &e, finished),
        }
        true
    }

    fn get(&self, id: u64) -> &Pending<T> {
        self.pending.iter().find(|p| p.id == id).expect("a sequence with images in flight stays pending")
    }

    fn find(&mut self, id: u64) -> &mut Pending<T> {
        self.pending.iter_mut().find(|p| p.id == id).expect("a sequence with images in flight stays pending")
    }

    /// Hand a vision call's feature rows to the sequences whose tiles it encoded.
    fn deliver(
        &mut self,
        model: &Model,
        parts: &[(u64, Range<usize>)],
        started: Instant,
        result: Result<Array2<f32>, EngineError>,
        finished: &mut Vec<Finished<T>>,
    ) {
        let seconds = started.elapsed().as_secs_f64();
        let features = match result {
            Ok(features) => features,
            Err(e) => return self.fail_pending(parts, &e, finished),
        };
        let expected: usize = parts
            .iter()
            .map(|(id, range)| {
                let work = self.get(*id).vision.as_ref().expect("has images");
                work.images.tile_tokens.map_or(features.nrows(), |per_tile| range.len() * per_tile)
            })
            .sum();
        if expected != features.nrows() {
            let e = EngineError::GraphMismatch(format!(
                "the vision encoder returned {} feature rows for {expected} image tokens",
                features.nrows()
            ));
            return self.fail_pending(parts, &e, finished);
        }
        let mut row = 0;
        for (id, range) in parts {
            let pending = self.find(*id);
            let work = pending.vision.as_mut().expect("has images");
            let rows = work.images.tile_tokens.map_or(features.nrows(), |per_tile| range.len() * per_tile);
            work.rows.push(features.slice(ndarray::s![row..row + rows, ..]).to_owned());
            row += rows;
            work.done = range.end;
            pending.seq.timings.vision_s += seconds;
            if work.done == work.images.tiles() {
                let work = pending.vision.take().expect("has images");
                let views: Vec<_> = work.rows.iter().map(|r| r.view()).collect();
                let all = Arc::new(ndarray::concatenate(Axis(0), &views).expect("rows of one width"));
                if let (Some(cache), Some(key)) = (&model.feature_cache, work.key) {
                    cache.insert(key, all.clone());
                }
                pending.features = Some(all);
            }
        }
    }

    /// The pending sequences of a failed vision call fail with it.
    fn fail_pending(&mut self, parts: &[(u64, Range<usize>)], error: &EngineError, finished: &mut Vec<Finished<T>>) {
        for (id, _) in parts {
            if let Some(index) = self.pending.iter().position(|p| p.id == *id) {
                let pending = self.pending.remove(index).expect("found");
                finished.push((pending.tag, Err(EngineError::BatchFailed(error.to_string()))));
            }
        }
    }

    /// Prefill up to `prefill_tokens` prompt tokens of the pending sequences whose images are
    /// encoded, in admission order; those done join the decode batch.
    fn prefill(&mut self, model: &mut Model, finished: &mut Vec<Finished<T>>) {
        let mut budget = self.limits.prefill_tokens;
        let mut i = 0;
        while budget > 0 && i < self.pending.len() {
            if self.pending[i].vision.is_some() || self.pending[i].leaving {
                i += 1;
                continue;
            }
            match prefill_chunk(model, &mut self.pending[i], budget) {
                Err(e) => {
                    let pending = self.pending.remove(i).expect("index in range");
                    finished.push((pending.tag, Err(e)));
                }
                Ok((used, None)) => {
                    budget -= used;
                    i += 1;
                }
                Ok((used, Some(logits))) => {
                    budget -= used;
                    let pending = self.pending.remove(i).expect("index in range");
                    if let Err(e) = self.cache.join(pending.cache, model.decoder.cache_allocator()) {
                        finished.push((pending.tag, Err(e)));
                        continue;
                    }
                    self.rows.push(Row { tag: pending.tag, seq: pending.seq, logits });
                }
            }
        }
    }

    /// Sample every row's next token; finished rows leave the batch.
    fn sample(
        &mut self,
        model: &Model,
        on_token: &mut dyn FnMut(&mut T, Event) -> Flow,
        finished: &mut Vec<Finished<T>>,
    ) {
        let mut keep = Vec::with_capacity(self.rows.len());
        for mut row in std::mem::take(&mut self.rows) {
            let Row { tag, seq, logits } = &mut row;
            let token = seq.run.sample(logits);
            if seq.decoding_since.is_none() {
                seq.timings.time_to_first_token_s = seq.admitted.elapsed().as_secs_f64();
                seq.decoding_since = Some(Instant::now());
            }
            let outcome = seq.run.accept(model, token, &mut |event| on_token(tag, event));
            keep.push(matches!(outcome, Ok(None)));
            match outcome {
                Ok(None) => self.rows.push(row),
                Ok(Some(reason)) => {
                    let Row { mut tag, seq, .. } = row;
                    let mut timings = seq.timings;
                    timings.decode_s = seq.decoding_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let completion = seq.run.finish(model, reason, timings, &mut |event| on_token(&mut tag, event));
                    finished.push((tag, completion));
                }
                Err(e) => finished.push((row.tag, Err(e))),
            }
        }
        if let Err(e) = self.cache.retain(&keep, model.decoder.cache_allocator()) {
            self.fail_rows(&e, finished);
        }
    }

    /// One decoder call: every row's last token in, every row's next logits out.
    fn decode(&mut self, model: &mut Model) -> Result<(), EngineError> {
        let ids: Vec<u32> = self.rows.iter().map(|r| *r.seq.run.token_ids().last().expect("sampled")).collect();
        let start = Instant::now();
        let embeds = model.embedder.embed(&ids, ids.len())?;
        let in_embed = start.elapsed();
        let positions: Vec<ArrayD<i64>> =
            self.rows.iter().map(|r| model.family.step_positions(r.seq.position)).collect();
        let positions = stack_rows(&positions)?;
        let (logits, in_decoder) = model.decoder.forward(embeds, positions, &mut self.cache)?;
        let in_runtime = (in_embed + in_decoder).as_secs_f64();
        for (row, logits) in self.rows.iter_mut().zip(logits) {
            row.logits = logits;
            row.seq.position += 1;
            row.seq.timings.decode_steps += 1;
            row.seq.timings.decode_in_runtime_s += in_runtime;
        }
        Ok(())
    }

    /// A decoder call failed: every row fails with it.
    fn fail_rows(&mut self, error: &EngineError, finished: &mut Vec<Finished<T>>) {
        let message = error.to_string();
        self.cache.clear();
        finished.extend(self.rows.drain(..).map(|row| (row.tag, Err(EngineError::BatchFailed(message.clone())))));
    }
}

impl Model {
    /// Generate from `prompt`, calling `on_token` for every token; it may stop generation.
    /// A batch of one: the same steps as concurrent sequences take, with the whole prompt
    /// prefilled in one decoder call. Takes the prompt (its pixels move into the batch).
    pub fn generate(
        &mut self,
        prompt: Prompt,
        params: &GenerationParams,
        on_token: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<Completion, EngineError> {
        let mut batch = Batch::new(&self.decoder.layout, Limits::ALONE);
        batch.admit(self, (), prompt, params).map_err(|(_, e)| e)?;
        loop {
            if let Some((_, result)) = batch.step(self, &mut |_, event| on_token(event)).finished.pop() {
                return result;
            }
        }
    }
}

/// One step's position ids for the batch from each row's: `[1, 1]` rows become `[rows, 1]`,
/// M-RoPE's `[3, 1, 1]` become `[3, rows, 1]` (the batch axis is second to last).
fn stack_rows(positions: &[ArrayD<i64>]) -> Result<ArrayD<i64>, EngineError> {
    let views: Vec<_> = positions.iter().map(|p| p.view()).collect();
    let batch_axis = Axis(positions[0].ndim().saturating_sub(2));
    ndarray::concatenate(batch_axis, &views).map_err(|e| EngineError::GraphMismatch(format!("position ids: {e}")))
}

/// Take a pending sequence's image features from the feature cache, if there; says whether
/// it did.
fn from_cache<T>(model: &Model, pending: &mut Pending<T>) -> bool {
    let Some(work) = &pending.vision else { return false };
    let (Some(cache), Some(key), 0) = (&model.feature_cache, &work.key, work.done) else { return false };
    let Some(features) = cache.get(key) else { return false };
    pending.vision = None;
    pending.features = Some(features);
    pending.seq.timings.vision_cache_hit = true;
    true
}

/// The vision-encoder inputs for tiles `range` of each image set, joined along axis 0.
fn vision_inputs(parts: &[(&ProcessedImages, Range<usize>)]) -> Result<Vec<NamedTensor>, EngineError> {
    let first = parts[0].0;
    if parts.len() == 1 && parts[0].1 == (0..first.tiles()) {
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

/// Prefill up to `budget` more prompt tokens of `pending` (its images are encoded). Returns
/// the tokens used and, once the whole prompt is in, the logits of its last position.
fn prefill_chunk<T>(
    model: &mut Model,
    pending: &mut Pending<T>,
    budget: usize,
) -> Result<(usize, Option<Vec<f32>>), EngineError> {
    let seq = &mut pending.seq;
    let start = Instant::now();
    let embeds = match &pending.embeds {
        Some(embeds) => embeds,
        None => pending.embeds.insert(model.prompt_embeddings(&pending.input_ids, pending.features.take())?),
    };
    let total = pending.input_ids.len();
    let chunk = budget.min(total - pending.done);
    let range = Slice::from(pending.done..pending.done + chunk);
    let inputs = float_value(embeds.slice_axis(Axis(1), range).to_owned(), model.decoder.embeds_type())?;
    let positions = &pending.positions;
    let positions = positions.slice_axis(Axis(positions.ndim() - 1), range).to_owned();
    let (mut logits, _) = model.decoder.forward(inputs, positions, &mut pending.cache)?;
    pending.done += chunk;
    seq.timings.prefill_s += start.elapsed().as_secs_f64();
    Ok((chunk, (pending.done == total).then(|| logits.remove(0))))
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
