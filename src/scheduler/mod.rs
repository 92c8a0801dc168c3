//! Scheduling generations on models whose sessions run one call at a time.
//!
//! Each configured model has a [`ModelSlot`]: admission counters (a bounded number of requests
//! in flight, refused at once beyond it) and the current [`Revision`] of the model. A revision owns
//! worker threads (one per `scheduler.concurrency`), each with its own loaded [`Model`], and a
//! queue of [`Job`]s. Hot swap loads a new revision beside the old one and replaces the pointer:
//! requests already admitted keep their `Arc<Revision>` and finish on the old sessions (their
//! prompts were prepared by the old processor), new ones get the new revision, and the old
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
mod rollout;
mod router;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub use metrics::{Metrics, ModelCounts, Stage};
pub use rollout::{Outcome, Summary};

use crate::config::{ModelSettings, RolloutSettings, SchedulerSettings};
use crate::engine::{
    Codec, Completion, EngineError, FeatureCache, GenerationParams, Limits, Logprobs, ModelOptions, PrefixCache, Prompt,
};
use queue::Queue;

/// Why the scheduler could not run a request.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("model {name:?} does not exist; available: {known}")]
    UnknownModel { name: String, known: String },
    #[error("model {model:?} has no version {version:?}; its versions: {known}")]
    UnknownVersion { model: String, version: String, known: String },
    #[error("model {0:?} already has this version")]
    VersionExists(String),
    #[error("model {0:?} has no versions: give its configured entry a `version` to add others beside it")]
    Unversioned(String),
    #[error("model {0:?} was unloaded ({1}); reload it to serve it again")]
    Unloaded(String, String),
    #[error("weights: {0}")]
    InvalidWeights(String),
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
    /// Rolled back: no revision, no traffic, until a reload.
    Unloaded,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Reloading => "reloading",
            ModelState::Failed => "failed",
            ModelState::Unloaded => "unloaded",
        }
    }
}

/// A model's description for listings.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// What names it alone: `model@version`, or the model's name when it has no versions.
    pub name: String,
    /// The name requests use for it and its other versions.
    pub model: String,
    pub version: Option<String>,
    /// Its share of the model's requests, relative to the other versions'.
    pub weight: u32,
    /// Percent of the other versions' requests it runs as a shadow.
    pub shadow: u8,
    /// Why it lost its traffic, when a gate or an administrator took it away.
    pub rollback: Option<Rollback>,
    /// Its outcomes over the rollout window.
    pub window: Summary,
    /// The package folder: models that share it are precisions of one model.
    pub root: String,
    pub state: ModelState,
    /// Increases by one with every successful load.
    pub revision: u64,
    pub loaded_at: Option<std::time::SystemTime>,
    pub family: Option<&'static str>,
    pub context_length: Option<usize>,
    /// `(graph, precision, providers)`.
    pub graphs: Vec<(String, String, Vec<&'static str>)>,
    pub precision: String,
    pub last_error: Option<String>,
    /// The loaded package's card.
    pub card: Option<Arc<crate::package::ModelCard>>,
}

/// Why a version lost its traffic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rollback {
    /// The gate that failed (`errors`, `ttft`, `shadow_agreement`), or `admin`.
    pub gate: &'static str,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl Rollback {
    fn now(gate: &'static str, reason: String) -> Self {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { gate, reason, at }
    }
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
pub struct Revision {
    pub number: u64,
    pub codec: Arc<Codec>,
    /// Its workers' image-feature cache, which preparing a prompt consults too.
    pub feature_cache: Option<Arc<FeatureCache>>,
    pub settings: ModelSettings,
    pub loaded_at: std::time::SystemTime,
    queue: Arc<Queue>,
}

impl Drop for Revision {
    fn drop(&mut self) {
        // Workers finish what is queued, then exit.
        self.queue.close();
    }
}

/// A configured model (or one version of one): what it serves, behind one lock so that a
/// listing never sees half a reload, and its admission counters.
pub struct ModelSlot {
    /// `model@version`, or the model's name when it has no versions.
    pub name: String,
    model: String,
    version: Option<String>,
    weight: AtomicU32,
    shadow: AtomicU8,
    serving: RwLock<Serving>,
    in_flight: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    /// Recent outcomes, for the rollout gates.
    window: Arc<rollout::Window>,
}

/// A slot's revisions and state, changed together.
struct Serving {
    current: Option<Arc<Revision>>,
    state: ModelState,
    last_error: Option<String>,
    /// The settings of the current revision, or of the first load until one succeeds.
    settings: ModelSettings,
    /// Versions loaded so far.
    revisions: u64,
    reloading: bool,
    rollback: Option<Rollback>,
}

impl ModelSlot {
    /// A poisoned lock still holds a consistent `Serving`: every write replaces whole fields.
    fn read(&self) -> RwLockReadGuard<'_, Serving> {
        self.serving.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Serving> {
        self.serving.write().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Revision>> {
        self.read().current.clone()
    }

    /// The versions' share of requests: weight, or 0 for an unversioned model.
    fn weight(&self) -> u32 {
        self.weight.load(Ordering::SeqCst)
    }

    fn is_version_of(&self, model: &str) -> bool {
        self.model == model && self.version.is_some()
    }
}

/// Every model the server runs.
pub struct Scheduler {
    /// In configuration order, then versions added at run time.
    slots: RwLock<Vec<Arc<ModelSlot>>>,
    config: SchedulerSettings,
    rollout: RolloutSettings,
    pub metrics: Arc<Metrics>,
    /// Not ready any more (a drain began), though still admitting.
    draining: AtomicBool,
    /// Admitting no more requests.
    shutting_down: AtomicBool,
    /// Set when running requests must end now; every worker sees it.
    ending: Arc<AtomicBool>,
    /// Held while weights or the set of versions change, so that two changes never interleave.
    reweighting: Mutex<()>,
}

/// An admitted request: a place in the model's budget and the revision it will run on.
/// Dropping it frees the place.
pub struct Admission {
    pub revision: Arc<Revision>,
    /// The version that answers, when the model has versions.
    pub version: Option<String>,
    window: Arc<rollout::Window>,
    permit: Permit,
}

/// Counts outcomes in a version's rollout window.
pub struct Recorder(Arc<rollout::Window>);

impl Recorder {
    pub fn record(&self, outcome: Outcome) {
        self.0.record(outcome);
    }
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
        &self.revision.codec
    }

    pub fn model(&self) -> &str {
        &self.permit.model
    }

    /// Where outcomes the workers cannot see (a shadow's comparison) are counted for the gates.
    pub fn recorder(&self) -> Recorder {
        Recorder(self.window.clone())
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
        self.revision.queue.push(job);
        rx
    }
}

impl Scheduler {
    /// Slots for `models`, not loaded yet (see [`Scheduler::load_all`]), and a thread that
    /// checks the rollout gates while the scheduler lives.
    pub fn new(
        models: &[ModelSettings],
        config: SchedulerSettings,
        rollout: RolloutSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut scheduler = Self {
            slots: RwLock::new(Vec::new()),
            config,
            rollout,
            metrics,
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            ending: Arc::new(AtomicBool::new(false)),
            reweighting: Mutex::new(()),
        };
        let slots = models.iter().map(|m| scheduler.new_slot(m, m.weight, m.shadow)).collect();
        scheduler.slots = RwLock::new(slots);
        let scheduler = Arc::new(scheduler);
        if scheduler.rollout.enabled {
            let watched = Arc::downgrade(&scheduler);
            let interval = Duration::from_secs_f64(scheduler.rollout.check_interval_s);
            let spawned = std::thread::Builder::new().name("vlm-rollout-gates".into()).spawn(move || {
                while let Some(scheduler) = watched.upgrade() {
                    scheduler.check_gates();
                    drop(scheduler);
                    std::thread::sleep(interval);
                }
            });
            if let Err(e) = spawned {
                tracing::error!("could not start the rollout gates' thread; versions will not be rolled back: {e}");
            }
        }
        scheduler
    }

    /// A slot for `m`, loading, with the weight and shadow share it starts with.
    fn new_slot(&self, m: &ModelSettings, weight: u32, shadow: u8) -> Arc<ModelSlot> {
        let serving = Serving {
            current: None,
            state: ModelState::Loading,
            last_error: None,
            settings: m.clone(),
            revisions: 0,
            reloading: false,
            rollback: None,
        };
        let slot = ModelSlot {
            name: m.id(),
            model: m.name.clone(),
            version: m.version.clone(),
            weight: AtomicU32::new(weight),
            shadow: AtomicU8::new(shadow),
            serving: RwLock::new(serving),
            in_flight: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            window: Arc::new(rollout::Window::new(Duration::from_secs_f64(self.rollout.window_s))),
        };
        self.report_weight(&slot);
        // The queue gauges exist from the start: an autoscaler reads an idle replica's 0.
        self.metrics.update_queue(&slot.name, &slot.in_flight, &slot.running);
        Arc::new(slot)
    }

    fn report_weight(&self, slot: &ModelSlot) {
        if let Some(version) = &slot.version {
            let labels = [slot.model.as_str(), version.as_str()];
            self.metrics.weight.with_label_values(&labels).set(slot.weight().into());
            self.metrics.shadow_percent.with_label_values(&labels).set(slot.shadow.load(Ordering::SeqCst).into());
        }
    }

    /// Every slot now (a snapshot: versions may come and go meanwhile).
    fn slots(&self) -> Vec<Arc<ModelSlot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Load every model (blocking); failed ones are marked `failed` and the first failure is
    /// returned after all were tried.
    pub fn load_all(&self, options: impl Fn(&ModelSettings) -> ModelOptions) -> Result<(), SchedulerError> {
        let mut first_error = None;
        for slot in self.slots() {
            let settings = slot.read().settings.clone();
            match self.load_version(&slot, &settings, &options(&settings)) {
                Ok(revision) => self.install(&slot, revision),
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

    /// Load `settings` beside the current revision and swap it in atomically. On failure the
    /// current revision keeps serving.
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
        match self.load_version(&slot, &settings, options) {
            Ok(revision) => {
                self.install(&slot, revision);
                self.metrics.reloads.with_label_values(&[name, "ok"]).inc();
                Ok(self.status(&slot))
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

    /// Serve `revision` from now on: one write, so a listing sees the old revision or the new.
    /// New files start a new record for the gates.
    fn install(&self, slot: &ModelSlot, revision: Arc<Revision>) {
        tracing::info!(model = %slot.name, revision = revision.number, dir = %revision.codec.info.dir.display(), "model ready");
        slot.window.clear();
        let mut serving = slot.write();
        serving.revisions = revision.number;
        serving.settings = revision.settings.clone();
        serving.current = Some(revision);
        serving.state = ModelState::Ready;
        serving.last_error = None;
        serving.reloading = false;
    }

    fn load_version(
        &self,
        slot: &ModelSlot,
        settings: &ModelSettings,
        options: &ModelOptions,
    ) -> Result<Arc<Revision>, SchedulerError> {
        let number = slot.read().revisions + 1;
        let queue = Arc::new(Queue::default());
        let feature_cache = FeatureCache::new(self.config.image_feature_cache_mb << 20).map(Arc::new);
        let codec = worker::spawn_workers(worker::WorkerSpec {
            model: slot.name.clone(),
            dir: settings.path.clone(),
            low_priority: options.background,
            options: options.clone(),
            count: self.config.concurrency,
            warmup: self.config.warmup,
            queue: queue.clone(),
            running: slot.running.clone(),
            in_flight: slot.in_flight.clone(),
            window: slot.window.clone(),
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
        Ok(Arc::new(Revision {
            number,
            codec,
            feature_cache,
            settings: settings.clone(),
            loaded_at: std::time::SystemTime::now(),
            queue,
        }))
    }

    fn slot(&self, name: &str) -> Result<Arc<ModelSlot>, SchedulerError> {
        let slots = self.slots();
        let found = slots.iter().find(|s| s.name == name).cloned();
        found.ok_or_else(|| SchedulerError::UnknownModel {
            name: name.into(),
            known: slots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// `model`'s versions, or why it has none (unknown, or configured without versions).
    fn versions(&self, model: &str) -> Result<Vec<Arc<ModelSlot>>, SchedulerError> {
        let versions: Vec<Arc<ModelSlot>> = self.slots().into_iter().filter(|s| s.is_version_of(model)).collect();
        if versions.is_empty() {
            self.check_model(model)?;
            return Err(SchedulerError::Unversioned(model.into()));
        }
        Ok(versions)
    }

    /// The version `version` of `model`, among `versions`.
    fn version<'a>(
        model: &str,
        versions: &'a [Arc<ModelSlot>],
        version: &str,
    ) -> Result<&'a Arc<ModelSlot>, SchedulerError> {
        versions.iter().find(|s| s.version.as_deref() == Some(version)).ok_or_else(|| SchedulerError::UnknownVersion {
            model: model.into(),
            version: version.into(),
            known: versions.iter().filter_map(|s| s.version.as_deref()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The first configured model's name (the default where a request names none).
    pub fn default_model(&self) -> Option<String> {
        self.slots().first().map(|s| s.model.clone())
    }

    /// `Ok` when `name` is a configured model or `model@version`, else the 404-worthy error
    /// listing what is.
    pub fn check_model(&self, name: &str) -> Result<(), SchedulerError> {
        if self.slots().iter().any(|s| s.model == name) {
            return Ok(());
        }
        self.slot(name).map(|_| ())
    }

    /// The slot that answers a request for `name`, with the revision it will run on:
    /// `model@version` or an unversioned model itself; for a model with versions, one of those
    /// serving, by weight, sticky for `key`.
    fn route(&self, name: &str, key: Option<&str>) -> Result<(Arc<ModelSlot>, Arc<Revision>), SchedulerError> {
        let versions: Vec<Arc<ModelSlot>> = self.slots().into_iter().filter(|s| s.is_version_of(name)).collect();
        if versions.is_empty() {
            let slot = self.slot(name)?;
            let serving = slot.read();
            let revision = match (&serving.current, serving.state) {
                (Some(revision), _) => revision.clone(),
                (None, ModelState::Unloaded) => {
                    let why = serving.rollback.as_ref().map_or_else(|| "rolled back".into(), |r| r.reason.clone());
                    return Err(SchedulerError::Unloaded(name.into(), why));
                }
                (None, _) => return Err(SchedulerError::NotReady(name.into())),
            };
            drop(serving);
            return Ok((slot, revision));
        }
        // The revision is taken with the choice: a version rolled back meanwhile still answers
        // the requests routed to it.
        let serving: Vec<(Arc<ModelSlot>, Arc<Revision>)> =
            versions.into_iter().filter_map(|s| s.current().map(|revision| (s, revision))).collect();
        let candidates: Vec<(&str, u32)> =
            serving.iter().map(|(s, _)| (s.version.as_deref().unwrap_or(""), s.weight())).collect();
        let chosen = router::choose(key, &candidates).ok_or_else(|| SchedulerError::NotReady(name.into()))?;
        Ok(serving[chosen].clone())
    }

    /// Take a place in the budget of the model or version that answers `name` (see `route`),
    /// or refuse at once.
    pub fn admit(&self, name: &str, key: Option<&str>) -> Result<Admission, SchedulerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SchedulerError::ShuttingDown);
        }
        let (slot, revision) = self.route(name, key)?;
        let limit = self.config.concurrency * self.config.max_batch_size + self.config.queue_size;
        self.admit_to(&slot, revision, limit).ok_or_else(|| {
            self.metrics.rejected.with_label_values(&[&slot.name, "queue_full"]).inc();
            SchedulerError::Overloaded { model: slot.name.clone(), limit, retry_after_s: self.config.retry_after_s }
        })
    }

    /// A place among `slot`'s `limit` requests in flight, if one is free.
    fn admit_to(&self, slot: &ModelSlot, revision: Arc<Revision>, limit: usize) -> Option<Admission> {
        slot.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).ok()?;
        self.metrics.update_queue(&slot.name, &slot.in_flight, &slot.running);
        let permit = Permit {
            in_flight: slot.in_flight.clone(),
            running: slot.running.clone(),
            metrics: self.metrics.clone(),
            model: slot.name.clone(),
        };
        Some(Admission { revision, version: slot.version.clone(), window: slot.window.clone(), permit })
    }

    /// Shadow copies of a request `primary` (a version of `model`) answers: a place with each
    /// version that shadows it at the drawn percentage, if it has a free worker row. Never
    /// queued: a busy shadow drops the copy.
    pub fn shadows(&self, model: &str, primary: &str) -> Vec<Admission> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let capacity = self.config.concurrency * self.config.max_batch_size;
        let versions = self.slots().into_iter().filter(|s| s.is_version_of(model) && s.name != primary);
        versions
            .filter(|slot| rand::random_range(0..100) < slot.shadow.load(Ordering::SeqCst))
            .filter_map(|slot| {
                let admission = self.admit_to(&slot, slot.current()?, capacity);
                if admission.is_none() {
                    self.metrics.shadow_requests.with_label_values(&[&slot.name, "dropped"]).inc();
                }
                admission
            })
            .collect()
    }

    /// Load a new version of `model` from `settings` (warmed up like any model) and only then
    /// give it its weight and shadow share. Refused when its files do not load: it is gone
    /// again and nothing changed.
    pub fn add_version(&self, settings: ModelSettings, options: &ModelOptions) -> Result<ModelStatus, SchedulerError> {
        let model = settings.name.clone();
        let slot = {
            let _one_at_a_time = self.one_at_a_time();
            self.versions(&model)?;
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            if slots.iter().any(|s| s.name == settings.id()) {
                return Err(SchedulerError::VersionExists(settings.id()));
            }
            let slot = self.new_slot(&settings, 0, 0);
            slots.push(slot.clone());
            slot
        };
        tracing::info!(model = %slot.name, dir = %settings.path.display(), "adding a version");
        match self.load_version(&slot, &settings, options) {
            Ok(revision) => {
                self.install(&slot, revision);
                let _one_at_a_time = self.one_at_a_time();
                slot.weight.store(settings.weight, Ordering::SeqCst);
                slot.shadow.store(settings.shadow, Ordering::SeqCst);
                self.report_weight(&slot);
                tracing::info!(model = %slot.name, weight = settings.weight, shadow = settings.shadow, "version added");
                Ok(self.status(&slot))
            }
            Err(e) => {
                tracing::warn!(model = %slot.name, "the new version was refused: {e}");
                self.forget(&slot);
                Err(e)
            }
        }
    }

    /// Take `slot` out of the listing and the metrics; requests it admitted finish on its
    /// revision, whose workers exit after them.
    fn forget(&self, slot: &Arc<ModelSlot>) {
        self.slots.write().unwrap_or_else(|e| e.into_inner()).retain(|s| !Arc::ptr_eq(s, slot));
        if let Some(version) = &slot.version {
            let labels = [slot.model.as_str(), version.as_str()];
            let _ = self.metrics.weight.remove_label_values(&labels);
            let _ = self.metrics.shadow_percent.remove_label_values(&labels);
        }
    }

    /// Held while weights or the set of versions change.
    fn one_at_a_time(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reweighting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` when a version other than `slot` among `versions` takes requests.
    fn another_takes_requests(versions: &[Arc<ModelSlot>], slot: &Arc<ModelSlot>) -> Result<(), SchedulerError> {
        if versions.iter().any(|s| !Arc::ptr_eq(s, slot) && s.weight() > 0) {
            return Ok(());
        }
        Err(SchedulerError::InvalidWeights(format!(
            "{:?} is the last version of {:?} taking requests; promote another first",
            slot.name, slot.model
        )))
    }

    /// Remove `version` of `model`: refused if it is the last version taking requests.
    pub fn remove_version(&self, model: &str, version: &str) -> Result<(), SchedulerError> {
        let _one_at_a_time = self.one_at_a_time();
        let versions = self.versions(model)?;
        let slot = Self::version(model, &versions, version)?;
        Self::another_takes_requests(&versions, slot)?;
        self.forget(slot);
        tracing::info!(model = %slot.name, "version removed");
        Ok(())
    }

    /// Send every request for `model` to `version` (its weight, at least 100) and remove the
    /// other versions.
    pub fn promote(&self, model: &str, version: &str) -> Result<(), SchedulerError> {
        let _one_at_a_time = self.one_at_a_time();
        let versions = self.versions(model)?;
        let chosen = Self::version(model, &versions, version)?;
        if chosen.current().is_none() {
            return Err(SchedulerError::NotReady(chosen.name.clone()));
        }
        chosen.weight.fetch_max(100, Ordering::SeqCst);
        chosen.shadow.store(0, Ordering::SeqCst);
        chosen.write().rollback = None;
        self.report_weight(chosen);
        for other in versions.iter().filter(|s| !Arc::ptr_eq(s, chosen)) {
            self.forget(other);
        }
        tracing::info!(model, version, "promoted: the other versions are removed");
        Ok(())
    }

    /// Take `version`'s traffic away (weight and shadow 0) and unload it: listed as
    /// `unloaded` with the reason, until a reload. Refused if no other version takes requests.
    pub fn rollback(&self, model: &str, version: &str) -> Result<(), SchedulerError> {
        let _one_at_a_time = self.one_at_a_time();
        let versions = self.versions(model)?;
        let slot = Self::version(model, &versions, version)?;
        Self::another_takes_requests(&versions, slot)?;
        self.take_traffic(slot, Rollback::now("admin", "rolled back by an administrator".into()));
        let mut serving = slot.write();
        serving.current = None;
        serving.state = ModelState::Unloaded;
        tracing::info!(model = %slot.name, "rolled back and unloaded");
        Ok(())
    }

    /// Weight and shadow share to 0, for `why`. Call with `reweighting` held.
    fn take_traffic(&self, slot: &ModelSlot, why: Rollback) {
        slot.weight.store(0, Ordering::SeqCst);
        slot.shadow.store(0, Ordering::SeqCst);
        self.report_weight(slot);
        self.metrics.rollbacks.with_label_values(&[&slot.name, why.gate]).inc();
        slot.write().rollback = Some(why);
    }

    /// Judge every candidate version against its model's stable one (see `rollout`); take the
    /// traffic of those that fail a gate.
    pub fn check_gates(&self) {
        let _one_at_a_time = self.one_at_a_time();
        let slots = self.slots();
        let models: std::collections::BTreeSet<&str> =
            slots.iter().filter(|s| s.version.is_some()).map(|s| s.model.as_str()).collect();
        for model in models {
            let serving: Vec<&Arc<ModelSlot>> =
                slots.iter().filter(|s| s.is_version_of(model) && s.current().is_some()).collect();
            // The stable version: the largest weight, the first configured among equals.
            let Some(stable) = serving.iter().copied().rev().max_by_key(|s| s.weight()) else { continue };
            if stable.weight() == 0 {
                continue;
            }
            let baseline = stable.window.summary();
            for candidate in serving.iter().filter(|s| !Arc::ptr_eq(s, stable)) {
                let (weight, shadow) = (candidate.weight(), candidate.shadow.load(Ordering::SeqCst));
                if weight == 0 && shadow == 0 {
                    continue;
                }
                let summary = candidate.window.summary();
                if let Some(verdict) = rollout::verdict(&summary, &baseline, &self.rollout, weight > 0) {
                    tracing::warn!(model = %candidate.name, gate = verdict.gate, reason = %verdict.reason, "rolled back");
                    self.take_traffic(candidate, Rollback::now(verdict.gate, verdict.reason));
                }
            }
        }
    }

    /// Set the weights of `model`'s versions named in `weights` (the others keep theirs), all
    /// or none: refused when a version is unknown or unloaded, or no weight would stay above 0.
    /// A version given traffic again after a rollback starts a new record for the gates.
    pub fn set_weights(&self, model: &str, weights: &BTreeMap<String, u32>) -> Result<(), SchedulerError> {
        let _one_at_a_time = self.one_at_a_time();
        let versions = self.versions(model)?;
        for (version, weight) in weights {
            let slot = Self::version(model, &versions, version)?;
            if *weight > 0 && slot.current().is_none() {
                return Err(SchedulerError::NotReady(slot.name.clone()));
            }
        }
        let weight_of = |s: &ModelSlot| s.version.as_ref().and_then(|v| weights.get(v).copied()).unwrap_or(s.weight());
        if versions.iter().all(|s| weight_of(s) == 0) {
            return Err(SchedulerError::InvalidWeights(format!(
                "some version of {model:?} must keep a weight above 0"
            )));
        }
        for slot in &versions {
            let weight = weight_of(slot);
            if weight > 0 && slot.weight() == 0 {
                slot.window.clear();
                slot.write().rollback = None;
            }
            slot.weight.store(weight, Ordering::SeqCst);
            self.report_weight(slot);
        }
        tracing::info!(model, ?weights, "weights changed");
        Ok(())
    }

    /// Set the shadow percentages of `model`'s versions named in `shares` (0 to 100).
    pub fn set_shadow(&self, model: &str, shares: &BTreeMap<String, u8>) -> Result<(), SchedulerError> {
        let _one_at_a_time = self.one_at_a_time();
        let versions = self.versions(model)?;
        for (version, percent) in shares {
            let slot = Self::version(model, &versions, version)?;
            if *percent > 100 {
                return Err(SchedulerError::InvalidWeights(format!("shadow share {percent} is over 100 percent")));
            }
            if *percent > 0 && slot.current().is_none() {
                return Err(SchedulerError::NotReady(slot.name.clone()));
            }
        }
        for (version, percent) in shares {
            let slot = Self::version(model, &versions, version)?;
            slot.shadow.store(*percent, Ordering::SeqCst);
            self.report_weight(slot);
        }
        tracing::info!(model, ?shares, "shadow shares changed");
        Ok(())
    }

    /// The most samples one request may ask for: they decode as rows of one worker's batch.
    pub fn max_samples(&self) -> usize {
        self.config.max_batch_size
    }

    /// Every model has a revision that loaded and warmed up (versions rolled back aside), and
    /// no drain has begun.
    pub fn ready(&self) -> bool {
        !self.is_shutting_down()
            && self.slots().iter().all(|s| {
                let serving = s.read();
                serving.current.is_some() || serving.state == ModelState::Unloaded
            })
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
        for revision in self.slots().iter().filter_map(|s| s.current()) {
            revision.queue.refuse_waiting(|| SchedulerError::ShuttingDown);
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
        self.slots().iter().map(|s| s.running.load(Ordering::SeqCst)).sum()
    }

    /// Requests admitted and not finished, over all models.
    pub fn in_flight(&self) -> usize {
        self.slots().iter().map(|s| s.in_flight.load(Ordering::SeqCst)).sum()
    }

    pub fn models(&self) -> Vec<ModelStatus> {
        self.slots().iter().map(|s| self.status(s)).collect()
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
            model: slot.model.clone(),
            version: slot.version.clone(),
            weight: slot.weight(),
            shadow: slot.shadow.load(Ordering::SeqCst),
            rollback: serving.rollback.clone(),
            window: slot.window.summary(),
            root: serving.settings.path.display().to_string(),
            state: serving.state,
            revision: current.as_ref().map_or(0, |v| v.number),
            loaded_at: current.as_ref().map(|v| v.loaded_at),
            family: current.as_ref().map(|v| v.codec.info.family),
            context_length: current.as_ref().map(|v| v.codec.info.context_length),
            graphs,
            precision: serving.settings.precision.to_string(),
            last_error: serving.last_error.clone(),
            card: current.as_ref().and_then(|v| v.codec.package.card.clone()),
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
        Scheduler::new(
            &[ModelSettings::for_path(Path::new("/nonexistent/m"))],
            config,
            RolloutSettings::default(),
            Metrics::new(),
        )
    }

    #[test]
    fn unknown_and_unloaded_models_are_refused() {
        let s = scheduler(1, 1);
        assert!(matches!(s.admit("nope", None), Err(SchedulerError::UnknownModel { .. })));
        assert!(matches!(s.admit("m", None), Err(SchedulerError::NotReady(_))));
        assert!(!s.ready());
        assert_eq!(s.default_model().as_deref(), Some("m"));
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
