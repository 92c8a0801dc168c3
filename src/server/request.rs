//! What the generating endpoints share: reading a bounded body (within its size, its time and
//! the server's budget of bodies being read), typed parameters whose errors name their path,
//! images from data URLs or bytes, preparing the prompt off the async threads (within the image
//! decode budget), and running the job (and its shadow copies).

use std::sync::Arc;
use std::time::Instant;

use actix_web::HttpRequest;
use actix_web::http::header;
use actix_web::web::{self, Bytes, BytesMut};
use base64::Engine as _;
use futures_util::StreamExt;

use super::AppState;
use super::errors::ApiError;
use super::response_cache::{Answer, Recording, ResponseCache};
use crate::engine::{Completion, Constraint, EngineError, GenerationParams, Prompt};
use crate::family::ImageBudget;
use crate::preprocess::chat_template::ChatMessage;
use crate::preprocess::tools::Tool;
use crate::preprocess::{
    ImageLimits, MemoryBudget, PreprocessError, Reservation, Shortfall, decode_image, read_header,
};
use crate::scheduler::{Admission, CancelOnDrop, CancelToken, JobEvent, Outcome, Revision, SchedulerError, Stage};

/// How much of a body the server reads, for how long, and how many bytes of bodies all
/// requests together may hold while they are read and parsed.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: std::time::Duration,
    pub in_flight: Arc<MemoryBudget>,
}

/// Memory reserved up front for a body: what it declares, up to this (a declared size is a
/// claim, not bytes sent).
const BODY_RESERVED: usize = 1 << 20;

/// The request body, refused with 413 once over the limit (from `Content-Length` before
/// reading), with 429 when the bodies being read already hold the server's budget for them
/// (before reading; a body without a length counts at the limit), and with 408 when it has not
/// all arrived within the timeout. The bytes count against that budget while the reservation
/// lives: keep it until the body is parsed.
pub async fn read_body<'a>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limits: &'a BodyLimits,
) -> Result<(Bytes, Reservation<'a>), ApiError> {
    let limit = limits.max_bytes;
    let too_large =
        || ApiError::too_large("body_too_large", format!("request body is over the limit of {limit} bytes"));
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let reservation =
        limits.in_flight.reserve(declared.unwrap_or(limit as u64), std::time::Duration::ZERO).map_err(|shortfall| {
            let (Shortfall::Never { budget, .. } | Shortfall::NotNow { budget, .. }) = shortfall;
            ApiError::overloaded(format!("the server is reading {budget} bytes of other request bodies; retry"))
        })?;
    let mut body = BytesMut::with_capacity(declared.map_or(0, |n| (n as usize).min(BODY_RESERVED)));
    let read = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the request body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(limits.timeout, read).await.map_err(|_| {
        ApiError::body_timeout(format!("the request body did not arrive within {:.0} s", limits.timeout.as_secs_f64()))
    })??;
    Ok((body.freeze(), reservation))
}

/// The body of a JSON request (`Content-Type: application/json`, so that a web page cannot
/// send one cross-origin without asking), read within `limits` and parsed; the bytes are
/// dropped once parsed.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limits: &BodyLimits,
) -> Result<T, ApiError> {
    if !content_type_is(req, "application/json") {
        return Err(ApiError::unsupported_media_type("send the request as JSON with Content-Type: application/json"));
    }
    let (body, _reservation) = read_body(req, payload, limits).await?;
    parse_json(&body)
}

/// Whether the request's `Content-Type` is `media_type` (parameters such as `charset` aside).
pub fn content_type_is(req: &HttpRequest, media_type: &str) -> bool {
    let value = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(media_type))
}

/// The most values (objects, arrays and their elements) a JSON body may hold. Each is a small
/// allocation or a few when parsed, and the allocator keeps such memory resident after a
/// request of millions of them (docs/reliability.md); a real request holds a few hundred.
const MAX_JSON_VALUES: usize = 131_072;

/// Parse JSON, with serde's message (it names the field and position) as a 400.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("the request body is empty; expected JSON"));
    }
    if json_values(body) > MAX_JSON_VALUES {
        return Err(ApiError::too_large(
            "too_many_json_values",
            format!("the body holds more than {MAX_JSON_VALUES} JSON values"),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")).with_code("invalid_json"))
}

/// Typed from a JSON value, an error naming the path inside `param` (`response_format.type`).
pub fn parse_param<T: serde::de::DeserializeOwned>(value: serde_json::Value, param: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { param.to_string() } else { format!("{param}.{path}") };
        ApiError::invalid_param(&at, format!("{at}: {}", e.into_inner()))
    })
}

/// About how many values JSON text holds: objects and arrays opened and the commas between
/// elements (outside strings), counted before parsing in one pass over the bytes.
fn json_values(body: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (0, false, false);
    for &byte in body {
        match (in_string, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[' | b',') => count += 1,
            _ => {}
        }
    }
    count
}

/// One image of a request: where it comes from, and what the client lets it cost.
#[derive(Debug, Clone)]
pub struct RequestImage {
    pub source: ImageSource,
    pub budget: ImageBudget,
}

/// An image as a request gives it: bytes, or a remote URL fetched while preparing.
#[derive(Clone)]
pub enum ImageSource {
    Bytes(Vec<u8>),
    /// Decoded while preparing, off the async threads.
    Base64 {
        data: String,
        param: String,
    },
    Remote {
        url: String,
        param: String,
    },
}

/// Never prints image bytes.
impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
            ImageSource::Base64 { param, data } => write!(f, "Base64({param}, {} characters)", data.len()),
            ImageSource::Remote { param, .. } => write!(f, "Remote({param})"),
        }
    }
}

/// Fetching remote images from allowed hosts (`server.remote_image_hosts`).
pub struct RemoteImages {
    agent: ureq::Agent,
    hosts: Vec<String>,
    max_bytes: usize,
}

impl RemoteImages {
    /// `None` when no host is allowed.
    pub fn new(hosts: &[String], timeout: std::time::Duration, max_bytes: usize) -> Option<Self> {
        if hosts.is_empty() {
            return None;
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .proxy(None)
            .http_status_as_error(false)
            .user_agent(concat!("vlmserve/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Some(Self { agent, hosts: hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(), max_bytes })
    }

    fn allows(&self, host: &str) -> bool {
        super::hosts::matches_host(&self.hosts, host)
    }

    /// Blocking: the image's bytes, or 400 (`image_fetch_failed`) / 413 (`image_too_large`).
    fn fetch(&self, url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
        let failed = |why: String| {
            ApiError::invalid_param(param, format!("{param}: could not fetch the image: {why}"))
                .with_code("image_fetch_failed")
        };
        let start = Instant::now();
        let mut response = self.agent.get(url).call().map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("the server answered {}", response.status())));
        }
        let bytes =
            response.body_mut().with_config().limit(self.max_bytes as u64).read_to_vec().map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(limit) => ApiError::too_large(
                    "image_too_large",
                    format!("{param}: the image is over the limit of {limit} bytes"),
                )
                .with_param(param),
                e => failed(e.to_string()),
            })?;
        tracing::debug!(bytes = bytes.len(), seconds = start.elapsed().as_secs_f64(), "fetched a remote image");
        Ok(bytes)
    }
}

/// An image from a `data:` URL (`data:image/png;base64,...`), or an allowed remote URL.
pub fn image_from_url(url: String, param: &str, remote: Option<&RemoteImages>) -> Result<ImageSource, ApiError> {
    let trimmed = url.trim();
    let scheme = trimmed.get(..8).unwrap_or(trimmed).to_ascii_lowercase();
    if !(scheme.starts_with("http://") || scheme.starts_with("https://")) {
        return data_url(url, param);
    }
    let Some(remote) = remote else {
        return Err(ApiError::invalid_param(
            param,
            "remote image URLs are not enabled on this server; send the image as a data: URL",
        )
        .with_code("remote_images_disabled"));
    };
    let host = trimmed.parse::<actix_web::http::Uri>().ok().and_then(|u| u.host().map(str::to_string));
    let Some(host) = host else {
        return Err(ApiError::invalid_param(param, format!("{param}: not a valid URL")).with_code("invalid_image_url"));
    };
    if !remote.allows(&host) {
        return Err(ApiError::invalid_param(param, format!("{param}: images from {host:?} are not allowed"))
            .with_code("image_host_not_allowed"));
    }
    Ok(ImageSource::Remote { url: trimmed.to_string(), param: param.to_string() })
}

/// The image of a `data:` URL: its base64 payload, kept in the URL's own string (an image can
/// be tens of megabytes; it is decoded while preparing).
pub fn data_url(mut url: String, param: &str) -> Result<ImageSource, ApiError> {
    url.truncate(url.trim_end().len());
    let lead = url.len() - url.trim_start().len();
    let payload = lead + payload_start(&url[lead..], param)?;
    url.drain(..payload);
    Ok(ImageSource::Base64 { data: url, param: param.to_string() })
}

/// Where a `data:` URL's base64 payload starts.
fn payload_start(url: &str, param: &str) -> Result<usize, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid_param(param, "image URL must be a data: URL (data:image/png;base64,...)")
            .with_code("invalid_image_url"));
    };
    let Some((meta, _)) = rest.split_once(',') else {
        return Err(
            ApiError::invalid_param(param, "data: URL has no ',' before its data").with_code("invalid_image_url")
        );
    };
    let media_type = meta.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !(media_type.is_empty() || media_type.starts_with("image/") || media_type == "application/octet-stream") {
        return Err(ApiError::invalid_param(param, format!("data: URL of type {media_type:?}, not an image"))
            .with_code("invalid_image_url"));
    }
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid_param(param, "data: URL must be base64-encoded (;base64,)")
            .with_code("invalid_image_url"));
    }
    Ok("data:".len() + meta.len() + 1)
}

/// Standard base64 (padding optional, whitespace ignored), size-checked before decoding.
pub fn decode_base64(data: &str, param: &str, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    let data: String = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        data.chars().filter(|c| !c.is_ascii_whitespace()).collect()
    } else {
        data.to_string()
    };
    let decoded_len = data.len() / 4 * 3;
    if decoded_len > limits.max_bytes + 3 {
        return Err(ApiError::too_large(
            "image_too_large",
            format!("{param}: image data is about {decoded_len} bytes, over the limit of {}", limits.max_bytes),
        )
        .with_param(param));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(data.as_bytes()).map_err(|e| {
        ApiError::invalid_param(param, format!("{param}: invalid base64: {e}")).with_code("invalid_base64")
    })
}

/// The server's memory for decoding images, and how long a request waits for its share.
#[derive(Debug, Clone)]
pub struct Decoding {
    pub budget: Arc<MemoryBudget>,
    pub wait: std::time::Duration,
}

/// Everything needed to prepare a prompt off the async threads.
#[derive(Clone)]
pub struct PrepareInput {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<RequestImage>,
    /// Offered to the model in the prompt.
    pub tools: Vec<Tool>,
    pub params: GenerationParams,
    /// `max_new_tokens` was not given: use `default_max_tokens`, cut to what the context leaves.
    pub default_max_tokens: Option<usize>,
    pub constraint: Option<RequestConstraint>,
}

/// An output constraint and the request parameter that asked for it (named by its errors).
#[derive(Debug, Clone)]
pub struct RequestConstraint {
    pub constraint: Constraint,
    pub param: &'static str,
}

pub struct Prepared {
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub image_decode_s: f64,
}

/// Check image sizes (from headers) and the token budget, decode, render and tokenize, and
/// check the prompt against the context. Blocking: run it in `web::block`.
fn prepare_blocking(
    revision: &Revision,
    input: PrepareInput,
    limits: &ImageLimits,
    decoding: &Decoding,
    remote: Option<&RemoteImages>,
) -> Result<Prepared, ApiError> {
    let PrepareInput { messages, images, tools, mut params, default_max_tokens, constraint } = input;
    let codec = &revision.codec;
    // Compiled first: a refused schema costs no image decoding.
    if let Some(RequestConstraint { constraint, param }) = constraint {
        let guide = codec.guide(&constraint).map_err(|e| ApiError::from(e).with_param(param))?;
        params.guide = Some(guide);
    }
    let budgets: Vec<ImageBudget> = images.iter().map(|image| image.budget).collect();
    let images = images
        .into_iter()
        .map(|image| match (image.source, remote) {
            (ImageSource::Bytes(bytes), _) => Ok(bytes),
            (ImageSource::Base64 { data, param }, _) => decode_base64(&data, &param, limits),
            (ImageSource::Remote { url, param }, Some(remote)) => remote.fetch(&url, &param),
            (ImageSource::Remote { param, .. }, None) => {
                Err(ApiError::invalid_param(&param, "remote image URLs are not enabled")
                    .with_code("remote_images_disabled"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let context = codec.info.context_length;
    // Image tokens and decoding memory are known from the headers: refuse over-budget requests
    // before any pixel work.
    let mut image_tokens = 0usize;
    let mut decode_bytes = 0u64;
    for (bytes, budget) in images.iter().zip(&budgets) {
        if let Some(header) = read_header(bytes, limits) {
            // An image refused here is refused with its reason when it is processed.
            let tokens = codec.family.image_layout(header.width, header.height, *budget).map_or(0, |l| l.tokens);
            image_tokens = image_tokens.saturating_add(tokens);
            decode_bytes = decode_bytes.saturating_add(header.decode_bytes);
        }
    }
    let min_new = if default_max_tokens.is_some() { 1 } else { params.max_new_tokens };
    if image_tokens.saturating_add(min_new) > context {
        return Err(EngineError::PromptTooLong { prompt_tokens: image_tokens, max_new_tokens: min_new, context }.into());
    }
    // Held until the prompt is prepared, the decoded images dropped.
    let _reservation = decoding.budget.reserve(decode_bytes, decoding.wait).map_err(PreprocessError::from)?;
    let start = Instant::now();
    let decoded = images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            decode_image(bytes, limits).map_err(|e| {
                let mut err = ApiError::from(e);
                err.message = format!("image {}: {}", i + 1, err.message);
                err
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let image_decode_s = start.elapsed().as_secs_f64();
    let prompt = codec.prepare_cached(&messages, &decoded, &budgets, &tools, revision.feature_cache.as_deref())?;
    if let Some(default) = default_max_tokens {
        params.max_new_tokens = default.min(context.saturating_sub(prompt.input_ids.len())).max(1);
    }
    codec.check_prompt(&prompt, &params)?;
    Ok(Prepared { prompt, params, image_decode_s })
}

/// A generation under way, as the endpoints answer from it.
pub struct Started {
    pub model: String,
    pub image_decode_s: f64,
    pub running: Running,
    pub answered_by: AnsweredBy,
}

/// What a response says about who answered it, in its headers.
#[derive(Debug, Clone)]
pub struct AnsweredBy {
    /// The model's version, when it has versions.
    pub version: Option<String>,
    /// What the response cache did, when it is on and the request's answer is reproducible.
    pub cache: Option<CacheLookup>,
}

/// The response cache's part in an answer, for the `x-vlmserve-cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLookup {
    Hit,
    Miss,
}

impl CacheLookup {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheLookup::Hit => "hit",
            CacheLookup::Miss => "miss",
        }
    }
}

/// A 200 response, with the `x-vlmserve-model-version` header when the model has versions
/// and `x-vlmserve-cache` when the response cache took part.
pub fn ok(answered_by: &AnsweredBy) -> actix_web::HttpResponseBuilder {
    let mut response = actix_web::HttpResponse::Ok();
    if let Some(version) = &answered_by.version {
        response.insert_header(("x-vlmserve-model-version", version.as_str()));
    }
    if let Some(lookup) = answered_by.cache {
        response.insert_header(("x-vlmserve-cache", lookup.as_str()));
    }
    response
}

/// The key that keeps a user on one version of a model: the session header
/// (`server.session_header`) when the request has it, else the body's `user` field.
pub fn session_key<'a>(req: &'a HttpRequest, state: &AppState, user: Option<&'a str>) -> Option<&'a str> {
    let header = state.session_header.as_deref().and_then(|name| req.headers().get(name)?.to_str().ok());
    header.or(user).filter(|key| !key.is_empty())
}

/// Every generating endpoint's way in: resolve the model, take a place in its queue (429 when
/// full), prepare on the blocking pool, then answer from the response cache or submit. A model
/// with versions answers with the one `session` keeps to (see [`session_key`]).
pub async fn start(
    state: &web::Data<AppState>,
    requested_model: Option<&str>,
    session: Option<&str>,
    input: PrepareInput,
    arrived: Instant,
) -> Result<Started, ApiError> {
    let model = model_name(state, requested_model)?;
    let admission = state.scheduler.admit(&model, session)?;
    let version = admission.version.clone();
    let shadows: Vec<(Admission, PrepareInput)> =
        state.scheduler.shadows(&model, admission.model()).into_iter().map(|s| (s, input.clone())).collect();
    let constraint = input.constraint.as_ref().map(|c| c.constraint.clone());
    let prepared = prepare(state, &admission, input).await?;
    let image_decode_s = prepared.image_decode_s;
    let cached = state.response_cache.as_ref().and_then(|cache| {
        // The model's version by its own name: two versions' answers are their own.
        let key = ResponseCache::key(
            admission.model(),
            admission.revision.number,
            &prepared.prompt,
            &prepared.params,
            constraint.as_ref(),
        )?;
        Some((cache, key))
    });
    let (mut running, cache) = match cached {
        None => (submit(state, admission, prepared, arrived, None), None),
        Some((cache, key)) => {
            let answer = cache.get(&key);
            let lookup = if answer.is_some() { CacheLookup::Hit } else { CacheLookup::Miss };
            state.metrics.response_cache_lookups.with_label_values(&[admission.model(), lookup.as_str()]).inc();
            let running = match answer {
                Some(answer) => Running::replay(answer, admission),
                None => {
                    let recording = Recording::new(cache.clone(), key, prepared.params.samples);
                    submit(state, admission, prepared, arrived, Some(recording))
                }
            };
            (running, Some(lookup))
        }
    };
    if !shadows.is_empty() {
        let (watch, primary) = tokio::sync::watch::channel(None);
        running.watch = Some(watch);
        for (shadow, input) in shadows {
            spawn_shadow(state.clone(), shadow, input, primary.clone());
        }
    }
    Ok(Started { model, image_decode_s, running, answered_by: AnsweredBy { version, cache } })
}

/// Prepare on the blocking pool.
async fn prepare(state: &AppState, admission: &Admission, input: PrepareInput) -> Result<Prepared, ApiError> {
    let revision = admission.revision.clone();
    let limits = state.image_limits;
    let decoding = state.decoding.clone();
    let remote = state.remote_images.clone();
    let prepared = web::block(move || prepare_blocking(&revision, input, &limits, &decoding, remote.as_deref()))
        .await
        .map_err(|e| ApiError::internal(format!("preprocessing was interrupted: {e}")))??;
    state.metrics.stage(admission.model(), Stage::ImageDecode, prepared.image_decode_s);
    Ok(prepared)
}

/// A generation's events, and what must live as long as the client waits (dropping it, e.g.
/// when actix drops the request of a client that disconnected, cancels the generation).
pub struct Running {
    events: Events,
    /// An event [`Running::first_event`] took, given out again by the next `recv`.
    first: Option<JobEvent>,
    /// Told the first sample's text when it is done (shadows compare their own with it).
    watch: Option<tokio::sync::watch::Sender<Option<String>>>,
    _admission: Admission,
    _cancel: CancelOnDrop,
}

enum Events {
    /// From the model's worker, kept for the response cache when `recording` is set.
    Live { events: tokio::sync::mpsc::UnboundedReceiver<JobEvent>, recording: Option<Recording> },
    /// A stored answer's, from `next` on.
    Replay { answer: Answer, next: usize },
}

impl Running {
    fn replay(answer: Answer, admission: Admission) -> Self {
        let events = Events::Replay { answer, next: 0 };
        Self { events, first: None, watch: None, _admission: admission, _cancel: CancelOnDrop(CancelToken::default()) }
    }

    /// Wait for the first event, for streaming responses: a request that fails before its
    /// first token (queued when the server began shutting down, past its deadline, refused by
    /// the engine) is answered with its own status, not a 200 stream that ends in an error, so
    /// a proxy in front can retry it on another replica.
    pub async fn first_event(mut self) -> Result<Self, ApiError> {
        match self.recv().await {
            Some(JobEvent::Failed(e)) => Err(e.into()),
            event => {
                self.first = event;
                Ok(self)
            }
        }
    }

    /// The next event; `None` once the last sample's sequence is gone.
    pub async fn recv(&mut self) -> Option<JobEvent> {
        if let Some(event) = self.first.take() {
            return Some(event);
        }
        let event = match &mut self.events {
            Events::Replay { answer, next } => {
                let event = answer.get(*next)?.clone();
                *next += 1;
                event.into()
            }
            Events::Live { events, recording } => {
                let event = events.recv().await?;
                if let Some(kept) = recording
                    && !kept.record(&event)
                {
                    *recording = None;
                }
                event
            }
        };
        if let JobEvent::Done(completion) = &event
            && completion.sample == 0
            && let Some(watch) = self.watch.take()
        {
            let _ = watch.send(Some(completion.text.clone()));
        }
        Some(event)
    }
}

fn submit(
    state: &AppState,
    admission: Admission,
    prepared: Prepared,
    arrived: Instant,
    recording: Option<Recording>,
) -> Running {
    let cancel = CancelToken::default();
    let deadline = state.request_timeout.map(|t| (arrived + t, t));
    let events = admission.submit(prepared.prompt, prepared.params, deadline, cancel.clone());
    Running {
        events: Events::Live { events, recording },
        first: None,
        watch: None,
        _admission: admission,
        _cancel: CancelOnDrop(cancel),
    }
}

/// Run a shadow copy of `input` on the version `admission` holds (see `Scheduler::shadows`),
/// beside the primary whose first sample's text `primary` brings. The client never waits for
/// the copy; its answer is compared with the client's (greedy answers must have the same text),
/// counted in the shadow's rollout window and metrics, and discarded.
fn spawn_shadow(
    state: web::Data<AppState>,
    admission: Admission,
    input: PrepareInput,
    mut primary: tokio::sync::watch::Receiver<Option<String>>,
) {
    let greedy = input.params.sampling.temperature == 0.0 && input.params.samples == 1;
    actix_web::rt::spawn(async move {
        let name = admission.model().to_string();
        let recorder = admission.recorder();
        // The copy starts once the primary has answered: it never competes with the primary's
        // own preparing and prefill, and a primary that ended without an answer costs nothing more.
        let primary = match primary.wait_for(Option::is_some).await {
            Ok(text) => text.clone(),
            Err(_) => None,
        };
        let result = match primary {
            None => "uncompared",
            Some(primary) => {
                let answer = match prepare(&state, &admission, input).await {
                    Ok(prepared) => collect(submit(&state, admission, prepared, Instant::now(), None)).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Err(e) => {
                        tracing::debug!(model = %name, "shadow copy failed: {}", e.message);
                        "failed"
                    }
                    Ok(shadow) if greedy => {
                        let agreed = shadow.text == primary;
                        recorder.record(Outcome::Compared { agreed: Some(agreed) });
                        if agreed { "agreed" } else { "disagreed" }
                    }
                    Ok(_) => {
                        recorder.record(Outcome::Compared { agreed: None });
                        "uncompared"
                    }
                }
            }
        };
        state.metrics.shadow_requests.with_label_values(&[&name, result]).inc();
    });
}

/// Wait for every sample's whole completion (non-streaming responses), in sample order; at
/// least one. The events end when the last sample's sequence is gone.
pub async fn collect_samples(mut running: Running) -> Result<Vec<Completion>, ApiError> {
    let mut completions = Vec::new();
    while let Some(event) = running.recv().await {
        match event {
            JobEvent::Token { .. } => {}
            JobEvent::Done(completion) => completions.push(completion),
            JobEvent::Failed(e) => return Err(e.into()),
        }
    }
    if completions.is_empty() {
        return Err(SchedulerError::WorkerGone.into());
    }
    completions.sort_by_key(|c| c.sample);
    Ok(completions)
}

/// Wait for the whole completion of a one-sample request.
pub async fn collect(running: Running) -> Result<Completion, ApiError> {
    let first = collect_samples(running).await?.into_iter().next();
    first.ok_or_else(|| SchedulerError::WorkerGone.into())
}

/// The model a request names, or the first configured one.
fn model_name(state: &AppState, requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => state.scheduler.default_model().ok_or_else(|| ApiError::not_found("no models are configured")),
    }
}

/// `max_tokens` as every endpoint takes it: at least 1; `None` when absent, where the server's
/// default applies (see [`PrepareInput::default_max_tokens`]).
pub fn requested_max_tokens(requested: Option<u64>) -> Result<Option<usize>, ApiError> {
    match requested {
        Some(0) => Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1")),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_outside_strings() {
        assert_eq!(json_values(br#"{"a": [1, "{[\",]", {}], "b\\": "[,"}"#), 6);
        let many = format!("[{}]", vec!["1"; MAX_JSON_VALUES + 1].join(","));
        let error = parse_json::<serde_json::Value>(many.as_bytes()).unwrap_err();
        assert_eq!((error.status.as_u16(), error.code), (413, Some("too_many_json_values")));
        assert!(parse_json::<serde_json::Value>(b"[[1], {\"x\": \"{{{{\"}]").is_ok());
    }
}
