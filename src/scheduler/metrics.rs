//! Prometheus metrics of serving: requests by route and status, queue depth, requests running,
//! latency histograms, tokens, where generation time goes, and the caches. The server renders them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Stages of a request whose durations are measured separately.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    ImageDecode,
    Preprocess,
    VisionEncoder,
    Prefill,
    Decode,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::ImageDecode => "image_decode",
            Stage::Preprocess => "preprocess",
            Stage::VisionEncoder => "vision_encoder",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
        }
    }
}

/// Per model (`name` or `name@version`): generations by how they ended, and shadow copies by
/// result.
#[derive(Debug, Default)]
pub struct ModelCounts {
    pub finished: BTreeMap<String, BTreeMap<String, u64>>,
    pub shadow: BTreeMap<String, BTreeMap<String, u64>>,
}

impl ModelCounts {
    pub fn finished(&self, model: &str) -> BTreeMap<String, u64> {
        self.finished.get(model).cloned().unwrap_or_default()
    }

    pub fn shadow(&self, model: &str) -> BTreeMap<String, u64> {
        self.shadow.get(model).cloned().unwrap_or_default()
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub waiting: IntGaugeVec,
    /// Each version's share of its model's requests.
    pub weight: IntGaugeVec,
    pub shadow_percent: IntGaugeVec,
    pub shadow_requests: IntCounterVec,
    pub rollbacks: IntCounterVec,
    pub running: IntGaugeVec,
    pub queue_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub generation_tokens: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub stage_duration: HistogramVec,
    pub finished: IntCounterVec,
    pub rejected: IntCounterVec,
    pub reloads: IntCounterVec,
    pub batch_size: HistogramVec,
    pub step_duration: HistogramVec,
    pub kv_cache_bytes: IntGaugeVec,
    pub feature_cache_lookups: IntCounterVec,
    pub feature_cache_bytes: IntGaugeVec,
    pub prefix_cache_lookups: IntCounterVec,
    pub prefix_cache_hit_tokens: IntCounterVec,
    pub prefix_cache_bytes: IntGaugeVec,
    pub response_cache_lookups: IntCounterVec,
    pub response_cache_bytes: IntGauge,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new_custom(Some("vlmserve".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        Arc::new(Self {
            http_requests: counter("http_requests_total", "HTTP requests by route and status", &["route", "status"]),
            waiting: gauge(
                "num_requests_waiting",
                "Requests admitted and not yet generating (preparing or queued)",
                &["model"],
            ),
            running: gauge("num_requests_running", "Requests generating", &["model"]),
            weight: gauge(
                "model_version_weight",
                "Weight of each version of a model (its share of the model's requests)",
                &["model", "version"],
            ),
            shadow_percent: gauge(
                "model_version_shadow_percent",
                "Percent of the other versions' requests each version runs as a shadow",
                &["model", "version"],
            ),
            shadow_requests: counter(
                "shadow_requests_total",
                "Shadow copies by result: agreed or disagreed (greedy answers, same text or not), \
                 uncompared (sampled, or the primary did not finish), failed, dropped (the shadow was busy)",
                &["model", "result"],
            ),
            rollbacks: counter(
                "rollbacks_total",
                "Versions whose traffic was taken away, by gate (errors, ttft, shadow_agreement, admin)",
                &["model", "gate"],
            ),
            queue_duration: histogram(
                "request_queue_duration_seconds",
                "Time from queueing to the start of generation",
                &["model"],
                LATENCY_BUCKETS,
            ),
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "From the start of generation to the first token",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inter_token_latency: histogram(
                "inter_token_latency_seconds",
                "Time between consecutive tokens",
                &["model"],
                LATENCY_BUCKETS,
            ),
            generation_tokens: counter("generation_tokens_total", "Tokens generated", &["model"]),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens processed", &["model"]),
            stage_duration: histogram(
                "stage_duration_seconds",
                "Duration of image_decode, preprocess, vision_encoder, prefill and decode per request",
                &["model", "stage"],
                LATENCY_BUCKETS,
            ),
            finished: counter(
                "requests_finished_total",
                "Generations by how they ended (stop, length, cancelled, deadline, error)",
                &["model", "reason"],
            ),
            rejected: counter("requests_rejected_total", "Requests refused by admission control", &["model", "reason"]),
            reloads: counter("model_reloads_total", "Model reloads by result", &["model", "result"]),
            batch_size: histogram(
                "batch_size",
                "Sequences per decode step",
                &["model"],
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            ),
            step_duration: histogram(
                "batch_step_duration_seconds",
                "Time of one batch step's prefill (vision encoder and prompt chunks) and decode (one decoder call)",
                &["model", "phase"],
                LATENCY_BUCKETS,
            ),
            kv_cache_bytes: gauge("kv_cache_bytes", "KV-cache bytes held by the model's batches", &["model"]),
            feature_cache_lookups: counter(
                "image_feature_cache_lookups_total",
                "Requests with images by image-feature cache result (hit, miss)",
                &["model", "result"],
            ),
            feature_cache_bytes: gauge("image_feature_cache_bytes", "Bytes of image features cached", &["model"]),
            prefix_cache_lookups: counter(
                "prefix_cache_lookups_total",
                "Requests by prefix cache result (hit: some prompt tokens' keys and values were reused; miss)",
                &["model", "result"],
            ),
            prefix_cache_hit_tokens: counter(
                "prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values came from the prefix cache",
                &["model"],
            ),
            prefix_cache_bytes: gauge("prefix_cache_bytes", "Bytes of keys and values in the prefix cache", &["model"]),
            response_cache_lookups: counter(
                "response_cache_lookups_total",
                "Reproducible requests by response cache result (hit: answered from a stored answer; miss)",
                &["model", "result"],
            ),
            response_cache_bytes: {
                let gauge = IntGauge::new("response_cache_bytes", "Bytes of answers in the response cache")
                    .expect("valid metric");
                registry.register(Box::new(gauge.clone())).expect("unique metric");
                gauge
            },
            registry,
        })
    }

    pub fn stage(&self, model: &str, stage: Stage, seconds: f64) {
        self.stage_duration.with_label_values(&[model, stage.label()]).observe(seconds);
    }

    pub(super) fn update_queue(&self, model: &str, in_flight: &AtomicUsize, running: &AtomicUsize) {
        let running = running.load(Ordering::SeqCst);
        let waiting = in_flight.load(Ordering::SeqCst).saturating_sub(running);
        self.waiting.with_label_values(&[model]).set(waiting as i64);
        self.running.with_label_values(&[model]).set(running as i64);
    }

    /// The counters `/v1/models` shows, by model, from one gathering of the registry.
    pub fn model_counts(&self) -> ModelCounts {
        let families = self.registry.gather();
        let by = |family: &str, label: &str| {
            let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            let metrics = families.iter().filter(|f| f.name() == family).flat_map(|f| f.get_metric());
            for metric in metrics {
                let value = |name: &str| metric.get_label().iter().find(|l| l.name() == name).map(|l| l.value());
                if let (Some(model), Some(key)) = (value("model"), value(label)) {
                    let count = metric.get_counter().get_value() as u64;
                    counts.entry(model.to_string()).or_default().insert(key.to_string(), count);
                }
            }
            counts
        };
        ModelCounts {
            finished: by("vlmserve_requests_finished_total", "reason"),
            shadow: by("vlmserve_shadow_requests_total", "result"),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        out
    }
}
