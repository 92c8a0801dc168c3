//! Worker threads: each owns one loaded [`Model`] (its sessions need exclusive access) and runs
//! the jobs of its version's queue as one continuous batch: jobs join between decode steps
//! while the batch has room (`max_batch_size`) and KV budget (`max_kv_bytes`), and leave when
//! they finish.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use super::metrics::{Metrics, Stage};
use super::queue::Queue;
use super::rollout::{Outcome, Window};
use super::{CancelToken, Job, JobEvent, SchedulerError};
use crate::engine::{
    Batch, Codec, Completion, EngineError, Event, FeatureCache, FinishReason, Flow, Fork, ImageFeatures, KvLayout,
    Limits, Model, ModelOptions, PrefixCache, Step,
};
use prometheus::Histogram;

pub struct WorkerSpec {
    pub model: String,
    pub dir: PathBuf,
    pub options: ModelOptions,
    pub count: usize,
    pub warmup: bool,
    /// Run at the lowest CPU priority (a shadow's workers, with the threads they start).
    pub low_priority: bool,
    pub queue: Arc<Queue>,
    pub running: Arc<AtomicUsize>,
    pub in_flight: Arc<AtomicUsize>,
    /// The version's outcomes, for the rollout gates.
    pub window: Arc<Window>,
    /// Set when the server ends every running request (the end of a drain).
    pub ending: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// One for all of this version's workers; `None` when off.
    pub feature_cache: Option<Arc<FeatureCache>>,
    /// One for all of this version's workers, within each one's `max_kv_bytes`; `None` when off.
    pub prefix_cache: Option<Arc<PrefixCache>>,
    pub max_batch_size: usize,
    /// KV-cache bytes this worker's batch may reserve.
    pub max_kv_bytes: usize,
    pub limits: Limits,
}

/// Start `spec.count` workers, each loading (and warming up) its own copy of the model.
/// Returns once all are serving, or the first load error (the others then exit).
pub fn spawn_workers(spec: WorkerSpec) -> Result<Arc<Codec>, SchedulerError> {
    let spec = Arc::new(spec);
    let (tx, rx) = mpsc::channel::<Result<Arc<Codec>, EngineError>>();
    for index in 0..spec.count {
        let worker_spec = spec.clone();
        let tx = tx.clone();
        let spawned = std::thread::Builder::new().name(format!("vlm-{}-{index}", spec.model)).spawn(move || {
            let spec = worker_spec;
            let model = match load(&spec) {
                Ok(model) => {
                    let _ = tx.send(Ok(model.codec.clone()));
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
            return Err(SchedulerError::Thread(e));
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
                return Err(SchedulerError::WorkerGone);
            }
        }
    }
    first.ok_or_else(|| SchedulerError::NoWorkers(spec.model.clone()))
}

fn load(spec: &WorkerSpec) -> Result<Model, EngineError> {
    let start = Instant::now();
    if spec.low_priority {
        lower_priority(&spec.model);
    }
    let mut model = Model::load(&spec.dir, &spec.options)?
        .with_feature_cache(spec.feature_cache.clone())
        .with_prefix_cache(spec.prefix_cache.clone());
    if spec.warmup {
        model.warm_up()?;
    }
    tracing::debug!(model = %spec.model, seconds = start.elapsed().as_secs_f64(), "worker loaded");
    Ok(model)
}

/// The lowest CPU priority for this thread and the threads it starts from now on (ONNX
/// Runtime's pools, created with the sessions), which inherit it.
fn lower_priority(model: &str) {
    // On Linux a thread id names that thread alone.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::warn!(model, "could not lower the shadow worker's priority: {e}");
    }
}

fn serve(mut model: Model, spec: &WorkerSpec) {
    let layout = model.kv_layout().clone();
    let mut batch: Batch<Active> = Batch::new(&layout, spec.limits);
    // The warm-up generation filled them.
    record_cache_bytes(spec);
    loop {
        if batch.is_empty() {
            // Idle: wait for work.
            let Some(job) = spec.queue.pop() else { break };
            start_job(&mut batch, &model, job, spec);
        }
        loop {
            let held: Vec<usize> = batch.rows().map(|a| a.reserved).collect();
            let fits = |job: &Job| {
                let needed = kv_needed(&held, reservation(job, &layout), job.params.samples);
                held.len() + job.params.samples <= spec.max_batch_size
                    && (held.is_empty()
                        || spec
                            .prefix_cache
                            .as_ref()
                            .map_or(needed <= spec.max_kv_bytes, |cache| cache.make_room(needed, spec.max_kv_bytes)))
            };
            let Some(job) = spec.queue.pop_if(fits) else { break };
            start_job(&mut batch, &model, job, spec);
        }
        if spec.ending.load(Ordering::SeqCst) {
            for active in batch.abandon() {
                spec.metrics.finished.with_label_values(&[&spec.model, "shutdown"]).inc();
                let _ = active.events.send(JobEvent::Failed(SchedulerError::ShuttingDown));
            }
            continue;
        }
        // A client that leaves while its images are encoded or its prompt prefilled stops costing
        // compute at once, not at its first token.
        for _ in batch.withdraw(|active| active.cancel.is_cancelled() || active.events.is_closed()) {
            spec.metrics.finished.with_label_values(&[&spec.model, FinishReason::Cancelled.as_str()]).inc();
        }
        if batch.is_empty() {
            continue;
        }
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
            batch.step(&mut model, &mut |active, event| on_token(active, event))
        }));
        match step {
            Ok(step) => {
                record_step(spec, &step, batch.kv_bytes(&layout));
                for (active, result) in step.finished {
                    report(active, result, spec);
                }
            }
            Err(_) => {
                tracing::error!(model = %spec.model, "generation panicked");
                for active in batch.abandon() {
                    spec.metrics.finished.with_label_values(&[&spec.model, "error"]).inc();
                    spec.window.record(Outcome::Failed);
                    let _ = active.events.send(JobEvent::Failed(SchedulerError::WorkerGone));
                }
            }
        }
    }
    tracing::debug!(model = %spec.model, "worker exits");
}

/// Cache bytes one sample of a job may come to hold: its prompt plus every token it may
/// generate.
fn reservation(job: &Job, layout: &KvLayout) -> usize {
    job.prompt.input_ids.len().saturating_add(job.params.max_new_tokens).saturating_mul(layout.bytes_per_token())
}

/// The KV bytes a batch of rows holding `held` may come to with `samples` more rows
/// reserving `new` bytes each: the batch's cache is padded to its longest row, so it can grow
/// to rows x the largest reservation. A worker with nothing to do takes any job (one sequence
/// is bounded by the context anyway); the prefix cache gives way to a job that needs its
/// bytes (see [`PrefixCache::make_room`]).
fn kv_needed(held: &[usize], new: usize, samples: usize) -> usize {
    let widest = held.iter().copied().max().unwrap_or(0).max(new);
    (held.len() + samples).saturating_mul(widest)
}

fn record_step(spec: &WorkerSpec, step: &Step<Active>, kv_bytes: usize) {
    let name = spec.model.as_str();
    let metrics = &spec.metrics;
    if step.decode_rows > 0 {
        metrics.batch_size.with_label_values(&[name]).observe(step.decode_rows as f64);
        metrics.step_duration.with_label_values(&[name, "decode"]).observe(step.decode_s);
    }
    if step.prefill_s > 0.0 {
        metrics.step_duration.with_label_values(&[name, "prefill"]).observe(step.prefill_s);
    }
    metrics.kv_cache_bytes.with_label_values(&[name]).set(kv_bytes as i64);
}

/// Marks a job running for as long as it lives, so the gauges stay right even on panic.
struct RunningGuard<'a>(&'a WorkerSpec);

impl<'a> RunningGuard<'a> {
    fn start(spec: &'a WorkerSpec) -> Self {
        spec.running.fetch_add(1, Ordering::SeqCst);
        spec.metrics.update_queue(&spec.model, &spec.in_flight, &spec.running);
        Self(spec)
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.update_queue(&self.0.model, &self.0.in_flight, &self.0.running);
    }
}

/// A job in a worker's batch: where its events go and the clocks its metrics need.
struct Active<'a> {
    events: tokio::sync::mpsc::UnboundedSender<JobEvent>,
    cancel: CancelToken,
    deadline: Option<Instant>,
    timeout_s: f64,
    enqueued: Instant,
    started: Instant,
    last_token: Option<Instant>,
    deadline_hit: bool,
    /// KV bytes counted against the worker's budget.
    reserved: usize,
    ttft: Histogram,
    itl: Histogram,
    _running: RunningGuard<'a>,
}

/// Each further sample of a job is a sequence of its own: its own clocks, counted running.
impl Fork for Active<'_> {
    fn fork(&self) -> Self {
        Active {
            events: self.events.clone(),
            cancel: self.cancel.clone(),
            deadline: self.deadline,
            timeout_s: self.timeout_s,
            enqueued: self.enqueued,
            started: self.started,
            last_token: None,
            deadline_hit: false,
            reserved: self.reserved,
            ttft: self.ttft.clone(),
            itl: self.itl.clone(),
            _running: RunningGuard::start(self._running.0),
        }
    }
}

/// Move a queued job into the batch, unless its client left or its deadline passed.
fn start_job<'a>(batch: &mut Batch<Active<'a>>, model: &Model, job: Job, spec: &'a WorkerSpec) {
    let name = spec.model.as_str();
    let metrics = &spec.metrics;
    let finished = |reason: &str| metrics.finished.with_label_values(&[name, reason]).inc();
    let started = Instant::now();
    metrics.queue_duration.with_label_values(&[name]).observe((started - job.enqueued).as_secs_f64());
    if job.cancel.is_cancelled() || job.events.is_closed() {
        finished(FinishReason::Cancelled.as_str());
        return;
    }
    let timeout_s = job.timeout.map_or(0.0, |t| t.as_secs_f64());
    if job.deadline.is_some_and(|d| started >= d) {
        finished("deadline");
        let _ = job.events.send(JobEvent::Failed(SchedulerError::DeadlineExceeded(timeout_s)));
        return;
    }
    let active = Active {
        reserved: reservation(&job, model.kv_layout()),
        events: job.events,
        cancel: job.cancel,
        deadline: job.deadline,
        timeout_s,
        enqueued: job.enqueued,
        started,
        last_token: None,
        deadline_hit: false,
        ttft: metrics.time_to_first_token.with_label_values(&[name]),
        itl: metrics.inter_token_latency.with_label_values(&[name]),
        _running: RunningGuard::start(spec),
    };
    if let Err((active, e)) = batch.add(model, active, job.prompt, &job.params) {
        report(active, Err(e), spec);
    }
}

/// Stream one token to its client; stop the sequence if the client left or time is up.
fn on_token(active: &mut Active, event: Event) -> Flow {
    let now = Instant::now();
    match active.last_token {
        None => active.ttft.observe((now - active.started).as_secs_f64()),
        Some(last) => active.itl.observe((now - last).as_secs_f64()),
    }
    active.last_token = Some(now);
    if active.cancel.is_cancelled() || active.events.is_closed() {
        return Flow::Stop;
    }
    if active.deadline.is_some_and(|d| now >= d) {
        active.deadline_hit = true;
        return Flow::Stop;
    }
    // A token whose text is held back is sent only for its log-probabilities.
    if !event.text.is_empty() || event.logprobs.is_some() {
        let token = JobEvent::Token {
            sample: event.sample,
            token_id: event.token_id,
            text: event.text.to_string(),
            logprobs: event.logprobs.cloned(),
        };
        if active.events.send(token).is_err() {
            return Flow::Stop;
        }
    }
    Flow::Continue
}

/// What the model's feature and prefix caches hold now.
fn record_cache_bytes(spec: &WorkerSpec) {
    let name = spec.model.as_str();
    if let Some(cache) = &spec.prefix_cache {
        spec.metrics.prefix_cache_bytes.with_label_values(&[name]).set(cache.bytes() as i64);
    }
    if let Some(cache) = &spec.feature_cache {
        spec.metrics.feature_cache_bytes.with_label_values(&[name]).set(cache.bytes() as i64);
    }
}

/// Tell the client how its sequence ended and count it.
fn report(active: Active, result: Result<Completion, EngineError>, spec: &WorkerSpec) {
    let metrics = &spec.metrics;
    let name = spec.model.as_str();
    let finished = |reason: &str| metrics.finished.with_label_values(&[name, reason]).inc();
    match result {
        Ok(completion) => {
            let t = &completion.timings;
            metrics.stage(name, Stage::Preprocess, t.preprocess_s);
            metrics.stage(name, Stage::VisionEncoder, t.vision_s);
            metrics.stage(name, Stage::Prefill, t.prefill_s);
            metrics.stage(name, Stage::Decode, t.decode_s);
            metrics.generation_tokens.with_label_values(&[name]).inc_by(completion.token_ids.len() as u64);
            if spec.prefix_cache.is_some() {
                let result = if t.prefix_cached_tokens > 0 { "hit" } else { "miss" };
                metrics.prefix_cache_lookups.with_label_values(&[name, result]).inc();
                metrics.prefix_cache_hit_tokens.with_label_values(&[name]).inc_by(t.prefix_cached_tokens as u64);
            }
            // A prompt whose images the prefix cache covered looked nothing up.
            let lookup = match t.image_features {
                ImageFeatures::Encoded => Some("miss"),
                ImageFeatures::FeatureCache => Some("hit"),
                ImageFeatures::NoImages | ImageFeatures::PrefixCache => None,
            };
            if let (Some(result), Some(_)) = (lookup, &spec.feature_cache) {
                metrics.feature_cache_lookups.with_label_values(&[name, result]).inc();
            }
            record_cache_bytes(spec);
            metrics.prompt_tokens.with_label_values(&[name]).inc_by(completion.prompt_tokens as u64);
            match completion.finish_reason {
                FinishReason::Cancelled if active.deadline_hit => {
                    finished("deadline");
                    let _ = active.events.send(JobEvent::Failed(SchedulerError::DeadlineExceeded(active.timeout_s)));
                }
                FinishReason::Cancelled => {
                    tracing::debug!(model = name, tokens = completion.token_ids.len(), "generation cancelled");
                    finished(FinishReason::Cancelled.as_str());
                }
                reason => {
                    finished(reason.as_str());
                    spec.window.record(Outcome::Answered { ttft_s: t.time_to_first_token_s });
                    // Counts and times only: never prompt text or images at info level.
                    tracing::info!(
                        model = name,
                        prompt_tokens = completion.prompt_tokens,
                        completion_tokens = completion.token_ids.len(),
                        finish = reason.as_str(),
                        queued_s = (active.started - active.enqueued).as_secs_f64(),
                        ttft_s = t.time_to_first_token_s,
                        total_s = active.started.elapsed().as_secs_f64(),
                        "generation finished"
                    );
                    let _ = active.events.send(JobEvent::Done(completion));
                }
            }
        }
        Err(e) => {
            tracing::warn!(model = name, "generation failed: {e}");
            finished("error");
            spec.window.record(Outcome::Failed);
            let _ = active.events.send(JobEvent::Failed(SchedulerError::Engine(e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kv_needed;

    #[test]
    fn every_sample_of_a_job_counts_against_the_kv_budget() {
        assert_eq!(kv_needed(&[], 1000, 8), 8000);
        assert_eq!(kv_needed(&[100], 100, 3), 400);
        // The batch is padded to its widest row: a wide newcomer widens every row.
        assert_eq!(kv_needed(&[100, 100], 200, 1), 600);
    }
}
