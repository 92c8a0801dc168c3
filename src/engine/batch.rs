//! Continuous batching: the sequences of a [`Batch`] share each decoder call.
//!
//! A sequence is admitted with its prompt, prefilled in chunks (bounded per step, so running
//! sequences never wait for a long prompt as a whole), then joins the decode batch: one decoder
//! call per step advances every row by one token, each with its own positions and attention
//! mask (see [`KvCache`] for the left-padded layout). Rows leave as soon as they finish. The
//! same code serves a single request ([`Model::generate`] is a batch of one), so batched and
//! single-stream generation cannot drift apart.

use std::collections::VecDeque;
use std::time::Instant;

use ndarray::{ArrayD, Axis, Slice};

use super::EngineError;
use super::generate::{Completion, Event, Flow, GenerationParams, Prompt, Run, Timings, float_value};
use super::kv_cache::{KvCache, KvLayout};
use super::model::Model;
use super::sampler::Sampler;

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

/// A sequence whose prompt is not entirely in its cache yet.
struct Pending<T> {
    tag: T,
    seq: Sequence,
    prompt: Prompt,
    /// `[1, prompt, hidden]`, built (vision encoder included) at the first chunk.
    embeds: Option<ArrayD<f32>>,
    done: usize,
    cache: KvCache,
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
    /// Most prompt tokens prefilled per step.
    prefill_chunk: usize,
}

impl<T> Batch<T> {
    /// An empty batch for a decoder with this cache layout.
    pub fn new(layout: &KvLayout, prefill_chunk: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            rows: Vec::new(),
            cache: KvCache::none(layout),
            prefill_chunk: prefill_chunk.max(1),
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
        let pending = self.pending.drain(..).map(|p| p.tag);
        pending.chain(self.rows.drain(..).map(|r| r.tag)).collect()
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
        self.pending.push_back(Pending { tag, seq, prompt, embeds: None, done: 0, cache });
        Ok(())
    }

    /// One step: prefill up to `prefill_chunk` prompt tokens, give every decoding row its next
    /// token (through `on_token` with the row's tag), drop the rows that finished, and run one
    /// decoder call for the others.
    pub fn step(&mut self, model: &mut Model, on_token: &mut dyn FnMut(&mut T, Event) -> Flow) -> Step<T> {
        let mut finished = Vec::new();
        let start = Instant::now();
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

    fn prefill(&mut self, model: &mut Model, finished: &mut Vec<Finished<T>>) {
        let mut budget = self.prefill_chunk;
        while budget > 0
            && let Some(mut pending) = self.pending.pop_front()
        {
            match prefill_chunk(model, &mut pending, budget) {
                Err(e) => finished.push((pending.tag, Err(e))),
                Ok((used, None)) => {
                    budget -= used;
                    self.pending.push_front(pending);
                }
                Ok((used, Some(logits))) => {
                    budget -= used;
                    if let Err(e) = self.cache.join(pending.cache) {
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
        if let Err(e) = self.cache.retain(&keep) {
            self.fail_rows(&e, finished);
        }
    }

    /// One decoder call: every row's last token in, every row's next logits out.
    fn decode(&mut self, model: &mut Model) -> Result<(), EngineError> {
        let start = Instant::now();
        let ids: Vec<u32> = self.rows.iter().map(|r| *r.seq.run.token_ids().last().expect("sampled")).collect();
        let embeds = model.embedder.embed(&ids, ids.len())?;
        let positions: Vec<ArrayD<i64>> =
            self.rows.iter().map(|r| model.family.step_positions(r.seq.position)).collect();
        let views: Vec<_> = positions.iter().map(|p| p.view()).collect();
        let batch_axis = Axis(positions[0].ndim() - 2);
        let positions = ndarray::concatenate(batch_axis, &views)
            .map_err(|e| EngineError::GraphMismatch(format!("position ids: {e}")))?;
        let in_embed = start.elapsed();
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

/// Prefill up to `budget` more prompt tokens of `pending`. Returns the tokens used and, once
/// the whole prompt is in, the logits of its last position.
fn prefill_chunk<T>(
    model: &mut Model,
    pending: &mut Pending<T>,
    budget: usize,
) -> Result<(usize, Option<Vec<f32>>), EngineError> {
    let seq = &mut pending.seq;
    let embeds = match &pending.embeds {
        Some(embeds) => embeds,
        None => {
            let start = Instant::now();
            let features = match &pending.prompt.images {
                Some(images) => Some(model.image_features(&images.inputs, &mut seq.timings)?),
                None => None,
            };
            seq.timings.vision_s = start.elapsed().as_secs_f64();
            pending.prompt.images = None;
            pending.embeds.insert(model.prompt_embeddings(&pending.prompt.input_ids, features)?)
        }
    };
    let start = Instant::now();
    let total = pending.prompt.input_ids.len();
    let chunk = budget.min(total - pending.done);
    let range = Slice::from(pending.done..pending.done + chunk);
    let inputs = float_value(embeds.slice_axis(Axis(1), range).to_owned(), model.decoder.embeds_type())?;
    let positions = &pending.prompt.positions.prompt;
    let positions = positions.slice_axis(Axis(positions.ndim() - 1), range).to_owned();
    let (mut logits, _) = model.decoder.forward(inputs, positions, &mut pending.cache)?;
    pending.done += chunk;
    seq.timings.prefill_s += start.elapsed().as_secs_f64();
    Ok((chunk, (pending.done == total).then(|| logits.remove(0))))
}
