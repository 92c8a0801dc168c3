//! Worker threads: each owns one loaded [`Model`] (its sessions need exclusive access) and runs
//! the jobs of its version's queue, one sequence at a time.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use super::metrics::{Metrics, Stage};
use super::queue::Queue;
use super::{Job, JobEvent, SchedulerError};
use crate::engine::{EngineError, FeatureCache, FinishReason, Flow, GenerationParams, Model, ModelOptions, Processor};
use crate::preprocess::chat_template::ChatMessage;

pub struct WorkerSpec {
    pub model: String,
    pub dir: PathBuf,
    pub options: ModelOptions,
    pub count: usize,
    pub warmup: bool,
    pub queue: Arc<Queue>,
    pub running: Arc<AtomicUsize>,
    pub in_flight: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    /// One for all of this version's workers; `None` when off.
    pub feature_cache: Option<Arc<FeatureCache>>,
}

/// Start `spec.count` workers, each loading (and warming up) its own copy of the model.
/// Returns once all are serving, or the first load error (the others then exit).
pub fn spawn_workers(spec: WorkerSpec) -> Result<Arc<Processor>, SchedulerError> {
    let spec = Arc::new(spec);
    let (tx, rx) = mpsc::channel::<Result<Arc<Processor>, EngineError>>();
    for index in 0..spec.count {
        let worker_spec = spec.clone();
        let tx = tx.clone();
        let spawned = std::thread::Builder::new().name(format!("vlm-{}-{index}", spec.model)).spawn(move || {
            let spec = worker_spec;
            let model = match load(&spec) {
                Ok(model) => {
                    let _ = tx.send(Ok(model.processor.clone()));
                    model
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            drop(tx);
            serve(model, &spec);
        });
        if let Err(e) = spawned {
            spec.queue.close();
            return Err(SchedulerError::Worker(format!("could not start a worker thread: {e}")));
        }
    }
    drop(tx);
    let mut first = None;
    for _ in 0..spec.count {
        match rx.recv() {
            Ok(Ok(processor)) => first = first.or(Some(processor)),
            Ok(Err(error)) => {
                spec.queue.close();
                return Err(SchedulerError::Load { name: spec.model.clone(), error });
            }
            Err(_) => {
                spec.queue.close();
                return Err(SchedulerError::Worker("a model worker stopped while loading".into()));
            }
        }
    }
    first.ok_or_else(|| SchedulerError::Worker("no model workers configured".into()))
}

fn load(spec: &WorkerSpec) -> Result<Model, EngineError> {
    let start = Instant::now();
    let mut model = Model::load(&spec.dir, &spec.options)?.with_feature_cache(spec.feature_cache.clone());
    if spec.warmup {
        let prompt = model.prepare(&[ChatMessage::user(0, "Hello")], &[])?;
        let params = GenerationParams { max_new_tokens: 1, ..GenerationParams::default() };
        model.generate(&prompt, &params, &mut |_| Flow::Continue)?;
    }
    tracing::debug!(model = %spec.model, seconds = start.elapsed().as_secs_f64(), "worker loaded");
    Ok(model)
}

fn serve(mut model: Model, spec: &WorkerSpec) {
    while let Some(job) = spec.queue.pop() {
        let events = job.events.clone();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(&mut model, job, spec)));
        if outcome.is_err() {
            tracing::error!(model = %spec.model, "generation panicked");
            spec.metrics.finished.with_label_values(&[&spec.model, "error"]).inc();
            let _ = events.send(JobEvent::Failed(SchedulerError::WorkerGone));
        }
    }
    tracing::debug!(model = %spec.model, "worker exits");
}

/// Marks a job running for as long as it lives, so the gauges stay right even on panic.
struct Running<'a>(&'a WorkerSpec);

impl<'a> Running<'a> {
    fn start(spec: &'a WorkerSpec) -> Self {
        spec.running.fetch_add(1, Ordering::SeqCst);
        spec.metrics.update_queue(&spec.model, &spec.in_flight, &spec.running);
        Self(spec)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.update_queue(&self.0.model, &self.0.in_flight, &self.0.running);
    }
}

fn run(model: &mut Model, job: Job, spec: &WorkerSpec) {
    let metrics = &spec.metrics;
    let name = spec.model.as_str();
    let finished = |reason: &str| metrics.finished.with_label_values(&[name, reason]).inc();
    let started = Instant::now();
    metrics.queue_duration.with_label_values(&[name]).observe((started - job.enqueued).as_secs_f64());
    if job.cancel.is_cancelled() || job.events.is_closed() {
        finished("cancelled");
        return;
    }
    let past_deadline = |now: Instant| job.deadline.is_some_and(|d| now >= d);
    let timeout_s = job.timeout.map_or(0.0, |t| t.as_secs_f64());
    if past_deadline(started) {
        finished("deadline");
        let _ = job.events.send(JobEvent::Failed(SchedulerError::DeadlineExceeded(timeout_s)));
        return;
    }
    let _running = Running::start(spec);
    metrics.batch_size.with_label_values(&[name]).observe(1.0);
    let mut last_token: Option<Instant> = None;
    let mut deadline_hit = false;
    let ttft = metrics.time_to_first_token.with_label_values(&[name]);
    let itl = metrics.inter_token_latency.with_label_values(&[name]);
    let result = model.generate(&job.prompt, &job.params, &mut |event| {
        let now = Instant::now();
        match last_token {
            None => ttft.observe((now - started).as_secs_f64()),
            Some(last) => itl.observe((now - last).as_secs_f64()),
        }
        last_token = Some(now);
        if job.cancel.is_cancelled() || job.events.is_closed() {
            return Flow::Stop;
        }
        if past_deadline(now) {
            deadline_hit = true;
            return Flow::Stop;
        }
        if !event.text.is_empty() {
            let token = JobEvent::Token { token_id: event.token_id, text: event.text.to_string() };
            if job.events.send(token).is_err() {
                return Flow::Stop;
            }
        }
        Flow::Continue
    });
    match result {
        Ok(completion) => {
            let t = &completion.timings;
            metrics.stage(name, Stage::Preprocess, t.preprocess_s);
            metrics.stage(name, Stage::VisionEncoder, t.vision_s);
            metrics.stage(name, Stage::Prefill, t.prefill_s);
            metrics.stage(name, Stage::Decode, t.decode_s);
            metrics.generation_tokens.with_label_values(&[name]).inc_by(completion.token_ids.len() as u64);
            if let (Some(cache), Some(_)) = (&spec.feature_cache, &job.prompt.images) {
                let result = if t.vision_cache_hit { "hit" } else { "miss" };
                metrics.feature_cache_lookups.with_label_values(&[name, result]).inc();
                metrics.feature_cache_bytes.with_label_values(&[name]).set(cache.bytes() as i64);
            }
            metrics.prompt_tokens.with_label_values(&[name]).inc_by(completion.prompt_tokens as u64);
            match completion.finish_reason {
                FinishReason::Cancelled if deadline_hit => {
                    finished("deadline");
                    let _ = job.events.send(JobEvent::Failed(SchedulerError::DeadlineExceeded(timeout_s)));
                }
                FinishReason::Cancelled => {
                    tracing::debug!(model = name, tokens = completion.token_ids.len(), "generation cancelled");
                    finished("cancelled");
                }
                reason => {
                    let reason = if reason == FinishReason::Stop { "stop" } else { "length" };
                    finished(reason);
                    // Counts and times only: never prompt text or images at info level.
                    tracing::info!(
                        model = name,
                        prompt_tokens = completion.prompt_tokens,
                        completion_tokens = completion.token_ids.len(),
                        finish = reason,
                        queued_s = (started - job.enqueued).as_secs_f64(),
                        ttft_s = t.time_to_first_token_s,
                        total_s = started.elapsed().as_secs_f64(),
                        "generation finished"
                    );
                    let _ = job.events.send(JobEvent::Done(completion));
                }
            }
        }
        Err(e) => {
            tracing::warn!(model = name, "generation failed: {e}");
            finished("error");
            let _ = job.events.send(JobEvent::Failed(SchedulerError::Engine(e)));
        }
    }
}
