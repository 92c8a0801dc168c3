//! Scheduling generations on models whose sessions run one call at a time.
//!
//! Each configured model has a [`ModelSlot`]: admission counters (a bounded number of requests
//! in flight, refused at once beyond it) and the current [`Version`] of the model. A version owns
//! worker threads (one per `scheduler.concurrency`), each with its own loaded [`Model`], and a
//! queue of [`Job`]s. Hot swap loads a new version beside the old one and replaces the pointer:
//! requests already admitted keep their `Arc<Version>` and finish on the old sessions (their
//! prompts were prepared by the old processor), new ones get the new version, and the old
//! workers exit once their queue is empty and the last handle is gone.
//!
//! A [`Job`] is one sequence: a prepared prompt, its parameters, its deadline, a cancellation
//! flag and an event sink. Each worker decodes its jobs as one continuous batch (see
//! `worker`): up to `max_batch_size` sequences within `max_kv_bytes` of KV cache; admission
//! allows `concurrency x max_batch_size + queue_size` requests in flight.
//!
//! Nothing here knows HTTP: the server turns [`SchedulerError`] into statuses.

mod metrics;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub use metrics::{Metrics, Stage};

use crate::config::{ModelSettings, SchedulerSettings};
use crate::engine::{
    Codec, Completion, EngineError, FeatureCache, GenerationParams, Limits, Logprobs, ModelOptions, PrefixCache, Prompt,
};
use queue::Queue;

/// Why the scheduler could not run a request.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("model {name:?} does not exist; available: {known}")]
    UnknownModel { name: String, known: String },
    #[error("model {0:?} is not ready yet")]
    NotReady(String),
    #[error("model {model:?} is at capacity ({limit} requests in flight); retry later")]
    Overloaded { model: String, limit: usize, retry_after_s: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request exceeded its deadline of {0:.1} s")]
    DeadlineExceeded(f64),
    #[error("loading model {name:?} failed: {error}")]
    Load { name: String, error: EngineError },
    #[error("a reload of model {0:?} is already in progress")]
    ReloadInProgress(String),
    #[error("the model worker stopped unexpectedly")]
    WorkerGone,
    #[error("could not start a model worker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("model {0:?} has no workers configured")]
    NoWorkers(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What a model is doing, for `/v1/models` and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Reloading,
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Reloading => "reloading",
            ModelState::Failed => "failed",
        }
    }
}

/// A model's description for listings.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub name: String,
    /// The package folder: models that share it are precisions of one model.
    pub root: String,
    pub state: ModelState,
    /// Increases by one with every successful load.
    pub version: u64,
    pub loaded_at: Option<std::time::SystemTime>,
    pub family: Option<&'static str>,
    pub context_length: Option<usize>,
    /// `(graph, precision, providers)`.
    pub graphs: Vec<(String, String, Vec<&'static str>)>,
    pub precision: String,
    pub last_error: Option<String>,
}

/// One sequence to generate.
pub struct Job {
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub deadline: Option<Instant>,
    /// Admission time, for the reported deadline.
    pub timeout: Option<Duration>,
    pub cancel: CancelToken,
    pub events: tokio::sync::mpsc::UnboundedSender<JobEvent>,
    pub enqueued: Instant,
}

/// What a job reports: for each of its samples, tokens then one `Done`, unless a `Failed`
/// ends the job (the channel closes after the last).
#[derive(Debug)]
pub enum JobEvent {
    /// A token's newly visible text (empty while held back), with its log-probabilities when
    /// they were asked for.
    Token {
        /// Which of the job's samples it belongs to.
        sample: usize,
        token_id: u32,
        text: String,
        logprobs: Option<Logprobs>,
    },
    Done(Completion),
    Failed(SchedulerError),
}

/// Set when whoever waits for a job is gone; the worker stops within one decode step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Cancels its token when dropped: hold it where the client's interest lives (the response
/// future or the response stream).
#[derive(Debug)]
pub struct CancelOnDrop(pub CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// One loaded generation of a model: its processor and the queue its workers serve.
pub struct Version {
    pub number: u64,
    pub codec: Arc<Codec>,
    /// Its workers' image-feature cache, which preparing a prompt consults too.
    pub feature_cache: Option<Arc<FeatureCache>>,
    pub settings: ModelSettings,
    pub loaded_at: std::time::SystemTime,
    queue: Arc<Queue>,
}

impl Drop for Version {
    fn drop(&mut self) {
        // Workers finish what is queued, then exit.
        self.queue.close();
    }
}

/// A configured model: what it serves, behind one lock so that a listing never sees half a
/// reload, and its admission counters.
pub struct ModelSlot {
    pub name: String,
    serving: RwLock<Serving>,
    in_flight: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
}

/// A slot's versions and state, changed together.
struct Serving {
    current: Option<Arc<Version>>,
    state: ModelState,
    last_error: Option<String>,
    /// The settings of the current version, or of the first load until one succeeds.
    settings: ModelSettings,
    /// Versions loaded so far.
    versions: u64,
    reloading: bool,
}

impl ModelSlot {
    /// A poisoned lock still holds a consistent `Serving`: every write replaces whole fields.
    fn read(&self) -> RwLockReadGuard<'_, Serving> {
        self.serving.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Serving> {
        self.serving.write().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Version>> {
        self.read().current.clone()
    }
}

/// Every model the server runs.
pub struct Scheduler {
    /// In configuration order.
    slots: Vec<Arc<ModelSlot>>,
    config: SchedulerSettings,
    pub metrics: Arc<Metrics>,
    /// Not ready any more (a drain began), though still admitting.
    draining: AtomicBool,
    /// Admitting no more requests.
    shutting_down: AtomicBool,
    /// Set when running requests must end now; every worker sees it.
    ending: Arc<AtomicBool>,
}

/// An admitted request: a place in the model's budget and the version it will run on.
/// Dropping it frees the place.
pub struct Admission {
    pub version: Arc<Version>,
    permit: Permit,
}

struct Permit {
    in_flight: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    model: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.metrics.update_queue(&self.model, &self.in_flight, &self.running);
    }
}

impl Admission {
    pub fn codec(&self) -> &Arc<Codec> {
        &self.version.codec
    }

    pub fn model(&self) -> &str {
        &self.permit.model
    }

    /// Queue `prompt` for generation. Events arrive on the returned receiver; dropping it (or
    /// cancelling `cancel`) stops the generation within one decode step. The admission stays
    /// with the caller, who drops it when the response is finished.
    pub fn submit(
        &self,
        prompt: Prompt,
        params: GenerationParams,
        deadline: Option<(Instant, Duration)>,
        cancel: CancelToken,
    ) -> tokio::sync::mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            prompt,
            params,
            deadline: deadline.map(|d| d.0),
            timeout: deadline.map(|d| d.1),
            cancel,
            events: tx,
            enqueued: Instant::now(),
        };
        self.version.queue.push(job);
        rx
    }
}

impl Scheduler {
    /// Slots for `models`, not loaded yet (see [`Scheduler::load_all`]).
    pub fn new(models: &[ModelSettings], config: SchedulerSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let slots = models
            .iter()
            .map(|m| {
                let serving = Serving {
                    current: None,
                    state: ModelState::Loading,
                    last_error: None,
                    settings: m.clone(),
                    versions: 0,
                    reloading: false,
                };
                let slot = ModelSlot {
                    name: m.name.clone(),
                    serving: RwLock::new(serving),
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    running: Arc::new(AtomicUsize::new(0)),
                };
                // The queue gauges exist from the start: an autoscaler reads an idle replica's 0.
                metrics.update_queue(&slot.name, &slot.in_flight, &slot.running);
                Arc::new(slot)
            })
            .collect();
        Arc::new(Self {
            slots,
            config,
            metrics,
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            ending: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Load every model (blocking); failed ones are marked `failed` and the first failure is
    /// returned after all were tried.
    pub fn load_all(&self, options: impl Fn(&ModelSettings) -> ModelOptions) -> Result<(), SchedulerError> {
        let mut first_error = None;
        for slot in &self.slots {
            let settings = slot.read().settings.clone();
            match self.load_version(slot, &settings, &options(&settings)) {
                Ok(version) => self.install(slot, version),
                Err(e) => {
                    tracing::error!("{e}");
                    let mut serving = slot.write();
                    serving.state = ModelState::Failed;
                    serving.last_error = Some(e.to_string());
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Load `settings` beside the current version and swap it in atomically. On failure the
    /// current version keeps serving.
    pub fn reload(
        &self,
        name: &str,
        settings: ModelSettings,
        options: &ModelOptions,
    ) -> Result<ModelStatus, SchedulerError> {
        let slot = self.slot(name)?;
        let previous = {
            let mut serving = slot.write();
            if serving.reloading {
                return Err(SchedulerError::ReloadInProgress(name.into()));
            }
            serving.reloading = true;
            std::mem::replace(&mut serving.state, ModelState::Reloading)
        };
        match self.load_version(slot, &settings, options) {
            Ok(version) => {
                self.install(slot, version);
                self.metrics.reloads.with_label_values(&[name, "ok"]).inc();
                Ok(self.status(slot))
            }
            Err(e) => {
                let mut serving = slot.write();
                serving.state = if serving.current.is_some() { ModelState::Ready } else { previous };
                serving.last_error = Some(e.to_string());
                serving.reloading = false;
                self.metrics.reloads.with_label_values(&[name, "failed"]).inc();
                Err(e)
            }
        }
    }

    /// Serve `version` from now on: one write, so a listing sees the old version or the new.
    fn install(&self, slot: &ModelSlot, version: Arc<Version>) {
        tracing::info!(model = %slot.name, version = version.number, dir = %version.codec.info.dir.display(), "model ready");
        let mut serving = slot.write();
        serving.versions = version.number;
        serving.settings = version.settings.clone();
        serving.current = Some(version);
        serving.state = ModelState::Ready;
        serving.last_error = None;
        serving.reloading = false;
    }

    fn load_version(
        &self,
        slot: &ModelSlot,
        settings: &ModelSettings,
        options: &ModelOptions,
    ) -> Result<Arc<Version>, SchedulerError> {
        let number = slot.read().versions + 1;
        let queue = Arc::new(Queue::default());
        let feature_cache = FeatureCache::new(self.config.image_feature_cache_mb << 20).map(Arc::new);
        let codec = worker::spawn_workers(worker::WorkerSpec {
            model: slot.name.clone(),
            dir: settings.path.clone(),
            options: options.clone(),
            count: self.config.concurrency,
            warmup: self.config.warmup,
            queue: queue.clone(),
            running: slot.running.clone(),
            in_flight: slot.in_flight.clone(),
            ending: self.ending.clone(),
            metrics: self.metrics.clone(),
            feature_cache: feature_cache.clone(),
            prefix_cache: PrefixCache::new(self.config.prefix_cache_mb << 20).map(Arc::new),
            max_batch_size: self.config.max_batch_size,
            max_kv_bytes: kv_budget(self.config.max_kv_bytes),
            limits: Limits {
                prefill_tokens: self.config.prefill_chunk_tokens,
                vision_tiles: self.config.vision_tiles_per_step,
            },
        })?;
        Ok(Arc::new(Version {
            number,
            codec,
            feature_cache,
            settings: settings.clone(),
            loaded_at: std::time::SystemTime::now(),
            queue,
        }))
    }

    fn slot(&self, name: &str) -> Result<&Arc<ModelSlot>, SchedulerError> {
        self.slots.iter().find(|s| s.name == name).ok_or_else(|| SchedulerError::UnknownModel {
            name: name.into(),
            known: self.slots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The first configured model's name (the default where a request names none).
    pub fn default_model(&self) -> Option<&str> {
        self.slots.first().map(|s| s.name.as_str())
    }

    /// `Ok` when `name` is configured, else the 404-worthy error listing what is.
    pub fn check_model(&self, name: &str) -> Result<(), SchedulerError> {
        self.slot(name).map(|_| ())
    }

    /// Take a place in `name`'s budget, or refuse at once.
    pub fn admit(&self, name: &str) -> Result<Admission, SchedulerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SchedulerError::ShuttingDown);
        }
        let slot = self.slot(name)?;
        let version = slot.current().ok_or_else(|| SchedulerError::NotReady(name.into()))?;
        let limit = self.config.concurrency * self.config.max_batch_size + self.config.queue_size;
        let admitted =
            slot.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).is_ok();
        if !admitted {
            self.metrics.rejected.with_label_values(&[name, "queue_full"]).inc();
            return Err(SchedulerError::Overloaded {
                model: name.into(),
                limit,
                retry_after_s: self.config.retry_after_s,
            });
        }
        self.metrics.update_queue(name, &slot.in_flight, &slot.running);
        let permit = Permit {
            in_flight: slot.in_flight.clone(),
            running: slot.running.clone(),
            metrics: self.metrics.clone(),
            model: name.into(),
        };
        Ok(Admission { version, permit })
    }

    /// The most samples one request may ask for: they decode as rows of one worker's batch.
    pub fn max_samples(&self) -> usize {
        self.config.max_batch_size
    }

    /// Every model has a version that loaded and warmed up, and no drain has begun.
    pub fn ready(&self) -> bool {
        !self.is_shutting_down() && self.slots.iter().all(|s| s.current().is_some())
    }

    /// Say not ready from now on, still admitting requests (a load balancer's time to notice).
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Refuse new requests from now on, and the queued ones at once (503: another replica can
    /// answer them sooner than this one's running requests end); running requests continue.
    pub fn begin_shutdown(&self) {
        self.begin_draining();
        self.shutting_down.store(true, Ordering::SeqCst);
        for version in self.slots.iter().filter_map(|s| s.current()) {
            version.queue.refuse_waiting(|| SchedulerError::ShuttingDown);
        }
    }

    /// End every running request now with 503 (`shutting_down`); workers stop within a step.
    pub fn end_running(&self) {
        self.begin_shutdown();
        self.ending.store(true, Ordering::SeqCst);
    }

    /// Draining or shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sequences admitted to a batch and not finished, over all models.
    pub fn running(&self) -> usize {
        self.slots.iter().map(|s| s.running.load(Ordering::SeqCst)).sum()
    }

    /// Requests admitted and not finished, over all models.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().map(|s| s.in_flight.load(Ordering::SeqCst)).sum()
    }

    pub fn models(&self) -> Vec<ModelStatus> {
        self.slots.iter().map(|s| self.status(s)).collect()
    }

    fn status(&self, slot: &ModelSlot) -> ModelStatus {
        let serving = slot.read();
        let current = &serving.current;
        let graphs = current
            .as_ref()
            .map(|v| {
                v.codec
                    .info
                    .graphs
                    .iter()
                    .map(|(graph, precision, _, providers)| {
                        (graph.to_string(), precision.to_string(), providers.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        ModelStatus {
            name: slot.name.clone(),
            root: serving.settings.path.display().to_string(),
            state: serving.state,
            version: current.as_ref().map_or(0, |v| v.number),
            loaded_at: current.as_ref().map(|v| v.loaded_at),
            family: current.as_ref().map(|v| v.codec.info.family),
            context_length: current.as_ref().map(|v| v.codec.info.context_length),
            graphs,
            precision: serving.settings.precision.to_string(),
            last_error: serving.last_error.clone(),
        }
    }
}

/// `scheduler.max_kv_bytes`, where 0 means a quarter of the machine's memory (4 GiB when it
/// cannot be read).
fn kv_budget(configured: u64) -> usize {
    if configured > 0 {
        return configured as usize;
    }
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    total_kib.map_or(4 << 30, |kib| kib * 1024 / 4)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn scheduler(concurrency: usize, queue_size: usize) -> Arc<Scheduler> {
        let config = SchedulerSettings {
            concurrency,
            queue_size,
            retry_after_s: 7,
            warmup: false,
            image_feature_cache_mb: 0,
            ..Default::default()
        };
        Scheduler::new(&[ModelSettings::for_path(Path::new("/nonexistent/m"))], config, Metrics::new())
    }

    #[test]
    fn unknown_and_unloaded_models_are_refused() {
        let s = scheduler(1, 1);
        assert!(matches!(s.admit("nope"), Err(SchedulerError::UnknownModel { .. })));
        assert!(matches!(s.admit("m"), Err(SchedulerError::NotReady(_))));
        assert!(!s.ready());
        assert_eq!(s.default_model(), Some("m"));
        assert!(s.check_model("m").is_ok() && s.check_model("x").is_err());
    }

    #[test]
    fn a_failed_load_leaves_the_model_failed() {
        let s = scheduler(1, 1);
        let err = s.load_all(|_| ModelOptions::default()).unwrap_err();
        assert!(matches!(err, SchedulerError::Load { .. }), "{err}");
        assert_eq!(s.models()[0].state, ModelState::Failed);
        assert!(s.models()[0].last_error.is_some());
    }

    #[test]
    fn cancel_on_drop_cancels() {
        let token = CancelToken::default();
        drop(CancelOnDrop(token.clone()));
        assert!(token.is_cancelled());
    }

    #[test]
    fn queue_serves_in_order_and_drains_after_close() {
        let queue = queue::Queue::default();
        let job = |n: usize| {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let prompt = Prompt {
                input_ids: vec![n as u32],
                images: None,
                positions: crate::family::Positions {
                    prompt: ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 1])),
                    next: 1,
                },
                image_ids: Vec::new(),
                preprocess_time: Duration::ZERO,
            };
            Job {
                prompt,
                params: GenerationParams::default(),
                deadline: None,
                timeout: None,
                cancel: CancelToken::default(),
                events: tx,
                enqueued: Instant::now(),
            }
        };
        queue.push(job(1));
        queue.push(job(2));
        queue.close();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        queue.push(Job { events: tx, ..job(3) });
        assert!(matches!(rx.try_recv(), Ok(JobEvent::Failed(SchedulerError::WorkerGone))));
        assert_eq!(queue.pop().unwrap().prompt.input_ids, [1]);
        assert_eq!(queue.pop().unwrap().prompt.input_ids, [2]);
        assert!(queue.pop().is_none());
    }
}
