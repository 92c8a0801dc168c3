//! `POST /v1/chat/completions` (OpenAI's schema, streaming and not) and `GET /v1/models`.

use std::time::Instant;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use std::num::NonZeroU64;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::{Value, json};

use super::AppState;
use super::errors::ApiError;
use super::request::{
    self, PrepareInput, RemoteImages, RequestConstraint, RequestImage, Running, Started, parse_param,
};
use super::tools::{self, HeldText, RequestTools};
use crate::engine::{Completion, Constraint, GenerationParams, Logprobs, SamplingParams, TokenLogprob, Usage};
use crate::family::{Detail, ImageBudget};
use crate::preprocess::chat_template::{ChatMessage, ContentPart};
use crate::preprocess::tools::ToolCall;
use crate::scheduler::{JobEvent, SchedulerError};

/// The request fields we read; unknown fields are ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    /// Keeps the user on one version of a model with versions (see `request::session_key`).
    #[serde(default)]
    user: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// 0 or -1 disables it.
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past end-of-sequence tokens.
    #[serde(default)]
    ignore_eos: Option<bool>,
    /// vLLM's extension: add `token_ids` to each choice.
    #[serde(default)]
    return_token_ids: Option<bool>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    logprobs: Option<bool>,
    /// 0 to 20, with `logprobs`.
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<Value>,
    /// vLLM's older constraint fields, one at most (or `structured_outputs`, or a JSON
    /// `response_format`).
    #[serde(default)]
    guided_json: Option<Value>,
    #[serde(default)]
    guided_regex: Option<String>,
    #[serde(default)]
    guided_choice: Option<Vec<String>>,
    #[serde(default)]
    guided_grammar: Option<String>,
    /// vLLM's current spelling: `{"json": ...}`, `{"regex": ...}`, `{"choice": [...]}`,
    /// `{"grammar": ...}` or `{"json_object": true}`.
    #[serde(default)]
    structured_outputs: Option<Value>,
}

/// `response_format` as OpenAI defines it.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// Its `name`, `description` and `strict` are not read: every schema is enforced.
#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    schema: Value,
}

/// vLLM's `structured_outputs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StructuredOutputs {
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    choice: Option<Vec<String>>,
    #[serde(default)]
    grammar: Option<String>,
    #[serde(default)]
    json_object: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

const MAX_STOP_STRINGS: usize = 16;
/// OpenAI's bound.
const MAX_TOP_LOGPROBS: u64 = 20;
/// Each token checks every prefix of every stop string (streaming holds back a possible start),
/// so their length bounds the work per token.
const MAX_STOP_BYTES: usize = 256;

impl ChatRequest {
    /// Reject what we do not support, with the parameter named.
    fn check_supported(&self) -> Result<(), ApiError> {
        for (name, value) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid_param(name, format!("{name} is not supported (use repetition_penalty)")));
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "messages must not be empty"));
        }
        Ok(())
    }

    /// The generation parameters, and whether `max_tokens` was left to the server's default.
    /// At most `max_samples` samples (`n`).
    fn params(&self, default_temperature: f32, max_samples: usize) -> Result<(GenerationParams, bool), ApiError> {
        let samples = match self.n {
            None => 1,
            Some(n) if n >= 1 && n <= max_samples as u64 => n as usize,
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("n must be 1 to {max_samples} (the server's max_batch_size), not {n}"),
                ));
            }
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid_param("top_k", format!("top_k must be -1, 0 or positive, not {k}")));
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param("stop", format!("at most {MAX_STOP_STRINGS} stop strings")));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param("stop", "stop strings must not be empty"));
        }
        if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid_param(
                "stop",
                format!("stop strings must be at most {MAX_STOP_BYTES} bytes"),
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.map(|s| s as u64),
        };
        sampling.validate().map_err(ApiError::from)?;
        let requested = request::requested_max_tokens(self.max_completion_tokens.or(self.max_tokens))?;
        // Without a request's own, PrepareInput::default_max_tokens sets it.
        let max_new_tokens = requested.unwrap_or(1);
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), Some(top)) if top > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, not {top}"),
                ));
            }
            (Some(true), top) => Some(top.unwrap_or(0) as usize),
            (_, Some(_)) => {
                return Err(ApiError::invalid_param("top_logprobs", "top_logprobs requires logprobs: true"));
            }
            (_, None) => None,
        };
        let ignore_eos = self.ignore_eos.unwrap_or(false);
        let params = GenerationParams { sampling, max_new_tokens, stop, ignore_eos, guide: None, logprobs, samples };
        Ok((params, requested.is_none()))
    }
}

/// A JSON schema given as an object or as a string of JSON (vLLM takes both).
fn schema_value(value: Value, param: &'static str) -> Result<Value, ApiError> {
    match value {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::invalid_param(param, format!("{param} is not valid JSON: {e}"))),
        other => Ok(other),
    }
}

impl ChatRequest {
    /// The output constraint the request asks for, if any: at most one of a forced tool
    /// choice, `response_format` (JSON kinds), `structured_outputs` and the `guided_*` fields.
    fn constraint(&mut self, tools: &RequestTools) -> Result<Option<RequestConstraint>, ApiError> {
        let mut found: Vec<RequestConstraint> = tools.constraint().into_iter().collect();
        let mut add = |constraint, param| found.push(RequestConstraint { constraint, param });
        if let Some(format) = self.response_format.take() {
            match parse_param::<ResponseFormat>(format, "response_format")? {
                ResponseFormat::Text => {}
                ResponseFormat::JsonObject => add(Constraint::JsonObject, "response_format"),
                ResponseFormat::JsonSchema { json_schema } => {
                    add(Constraint::JsonSchema(json_schema.schema), "response_format")
                }
            }
        }
        if let Some(schema) = self.guided_json.take() {
            add(Constraint::JsonSchema(schema_value(schema, "guided_json")?), "guided_json");
        }
        if let Some(regex) = self.guided_regex.take() {
            add(Constraint::Regex(regex), "guided_regex");
        }
        if let Some(choice) = self.guided_choice.take() {
            add(choice_constraint(choice, "guided_choice")?, "guided_choice");
        }
        if let Some(grammar) = self.guided_grammar.take() {
            add(Constraint::Lark(grammar), "guided_grammar");
        }
        if let Some(outputs) = self.structured_outputs.take() {
            let StructuredOutputs { json, regex, choice, grammar, json_object } =
                parse_param(outputs, "structured_outputs")?;
            if let Some(schema) = json {
                add(Constraint::JsonSchema(schema_value(schema, "structured_outputs")?), "structured_outputs");
            }
            if let Some(regex) = regex {
                add(Constraint::Regex(regex), "structured_outputs");
            }
            if let Some(choice) = choice {
                add(choice_constraint(choice, "structured_outputs")?, "structured_outputs");
            }
            if let Some(grammar) = grammar {
                add(Constraint::Lark(grammar), "structured_outputs");
            }
            if json_object == Some(true) {
                add(Constraint::JsonObject, "structured_outputs");
            }
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|c| c.param).collect();
            return Err(ApiError::invalid_param(
                found[1].param,
                format!("one output constraint at most; this request gives {}", names.join(", ")),
            ));
        }
        Ok(found.pop())
    }
}

/// The most strings `guided_choice` may offer.
const MAX_CHOICES: usize = 1024;

fn choice_constraint(choice: Vec<String>, param: &'static str) -> Result<Constraint, ApiError> {
    if choice.is_empty() || choice.len() > MAX_CHOICES {
        return Err(ApiError::invalid_param(param, format!("the choice must offer 1 to {MAX_CHOICES} strings")));
    }
    if choice.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(param, "the choice's strings must not be empty"));
    }
    Ok(Constraint::Choice(choice))
}

/// One message as OpenAI sends it.
#[derive(Debug, Deserialize)]
struct WireMessage {
    role: Role,
    #[serde(default)]
    content: Content,
    /// An assistant message's calls, sent back with the conversation.
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
    /// A `tool` message's call.
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    /// OpenAI's newer name for `system`.
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn template_role(&self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    function: WireCalled,
}

#[derive(Debug, Deserialize)]
struct WireCalled {
    name: String,
    /// A string of JSON, as OpenAI sends it.
    arguments: String,
}

impl From<WireToolCall> for ToolCall {
    fn from(call: WireToolCall) -> Self {
        let WireCalled { name, arguments } = call.function;
        let arguments = serde_json::from_str(&arguments).unwrap_or(Value::String(arguments));
        ToolCall { name, arguments }
    }
}

/// A message's content: a string, a list of parts, or nothing.
#[derive(Debug, Default)]
struct Content(Vec<Part>);

/// A content part, of chat completions or of the Responses API. A plain struct rather than an
/// enum tagged by `type`, so that an error inside it still names its field (`...image_url.detail`).
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: PartKind,
    #[serde(default)]
    text: Option<String>,
    /// `{url, detail, max_pixels}` in chat completions, the URL alone in the Responses API.
    #[serde(default)]
    image_url: Option<ImageUrl>,
    /// The Responses API's `input_image` puts `detail` beside the URL.
    #[serde(default, deserialize_with = "detail")]
    detail: Option<Detail>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PartKind {
    /// `input_text` and `output_text` are the Responses API's names.
    #[serde(alias = "input_text", alias = "output_text")]
    Text,
    #[serde(alias = "input_image")]
    ImageUrl,
}

/// `image_url`: the URL alone, or `{url, detail, max_pixels}`. `detail` is OpenAI's (`auto`,
/// `low`, `high`); `max_pixels` ours, a cap under the model's own budget.
#[derive(Debug)]
struct ImageUrl {
    url: String,
    detail: Option<Detail>,
    max_pixels: Option<NonZeroU64>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content::default())
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Content, E> {
                let text = Some(text.to_string());
                Ok(Content(vec![Part { kind: PartKind::Text, text, image_url: None, detail: None }]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content(parts))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(remote = "ImageUrl")]
        struct Fields {
            url: String,
            #[serde(default, deserialize_with = "detail")]
            detail: Option<Detail>,
            #[serde(default)]
            max_pixels: Option<NonZeroU64>,
        }
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL or {url, detail, max_pixels}")
            }
            fn visit_str<E: de::Error>(self, url: &str) -> Result<ImageUrl, E> {
                Ok(ImageUrl { url: url.to_string(), detail: None, max_pixels: None })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<ImageUrl, A::Error> {
                Fields::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn detail<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Detail>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|d| d.parse().map_err(|_| de::Error::custom("must be \"auto\", \"low\" or \"high\"")))
        .transpose()
}

/// OpenAI messages as chat-template messages, plus the images in order. Each message is read
/// into the types above; an error names the field it is about (`messages[0].content[1].type`).
pub(super) fn parse_messages(
    messages: Vec<Value>,
    root: &str,
    max_images: usize,
    remote: Option<&RemoteImages>,
) -> Result<(Vec<ChatMessage>, Vec<RequestImage>), ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    let mut images = Vec::new();
    // By value: image data moves from the body's JSON into the request, never copied.
    for (i, message) in messages.into_iter().enumerate() {
        let at = format!("{root}[{i}]");
        let message: WireMessage = parse_param(message, &at)?;
        if matches!(message.role, Role::Tool) && message.tool_call_id.is_none() {
            let param = format!("{at}.tool_call_id");
            return Err(ApiError::invalid_param(&param, format!("{param} is missing: a tool message answers a call")));
        }
        let mut content = Vec::with_capacity(message.content.0.len());
        for (j, part) in message.content.0.into_iter().enumerate() {
            let missing = |field: &str| {
                let param = format!("{at}.content[{j}].{field}");
                ApiError::invalid_param(&param, format!("{param} is missing"))
            };
            match part.kind {
                PartKind::Text => content.push(ContentPart::Text { text: part.text.ok_or_else(|| missing("text"))? }),
                PartKind::ImageUrl => {
                    let image_url = part.image_url.ok_or_else(|| missing("image_url"))?;
                    let param = format!("{at}.content[{j}].image_url");
                    if images.len() == max_images {
                        return Err(ApiError::too_large(
                            "too_many_images",
                            format!("more than {max_images} images in one request"),
                        )
                        .with_param(&param));
                    }
                    let source = request::image_from_url(image_url.url, &param, remote)?;
                    let budget = ImageBudget {
                        detail: part.detail.or(image_url.detail).unwrap_or_default(),
                        max_pixels: image_url.max_pixels.map(NonZeroU64::get),
                    };
                    images.push(RequestImage { source, budget });
                    content.push(ContentPart::Image);
                }
            }
        }
        out.push(ChatMessage {
            role: message.role.template_role().to_string(),
            content,
            tool_calls: message.tool_calls.into_iter().map(ToolCall::from).collect(),
            tool_call_id: message.tool_call_id,
        });
    }
    Ok((out, images))
}

pub async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let mut request: ChatRequest = request::read_json(&req, payload, &state.body_limits).await?;
    request.check_supported()?;
    let (params, use_default) = request.params(state.default_temperature, state.scheduler.max_samples())?;
    let samples = params.samples;
    let tools = RequestTools::read(
        request.tools.take().unwrap_or_default(),
        request.tool_choice.take(),
        request.parallel_tool_calls,
    )?;
    let constraint = request.constraint(&tools)?;
    let reads_calls = tools.reads_calls();
    let (messages, images) = parse_messages(
        std::mem::take(&mut request.messages),
        "messages",
        state.max_images,
        state.remote_images.as_deref(),
    )?;
    let default_max_tokens = use_default.then_some(state.default_max_tokens);
    let input = PrepareInput { messages, images, tools: tools.offered, params, default_max_tokens, constraint };
    let session = request::session_key(&req, &state, request.user.as_deref());
    let Started { model, image_decode_s, running, answered_by } =
        request::start(&state, request.model.as_deref(), session, input, arrived).await?;
    let id = format!("chatcmpl-{:032x}", rand::random::<u128>());
    let created = request::unix_now();
    let return_ids = request.return_token_ids.unwrap_or(false);
    let shape = Shape { return_ids, expose_cache_hits: state.expose_cache_hits, reads_calls, image_decode_s };
    if request.stream.unwrap_or(false) {
        let include_usage = request.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let stream = ChatStream {
            running: running.first_event().await?,
            id,
            created,
            model,
            version: answered_by.version.clone(),
            include_usage,
            shape,
            samples,
            finished: Vec::new(),
            held: reads_calls.then(|| (0..samples).map(|_| HeldText::default()).collect()),
            phase: Phase::Start,
        };
        return Ok(request::ok(&answered_by)
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(stream.into_stream()));
    }
    let completions = request::collect_samples(running).await?;
    let body = completion_body(&id, created, &model, answered_by.version.as_deref(), &completions, shape);
    Ok(request::ok(&answered_by).json(body))
}

/// What a response, whole or streamed, shows besides the text.
#[derive(Debug, Clone, Copy)]
struct Shape {
    return_ids: bool,
    expose_cache_hits: bool,
    /// Tool calls are read out of the text.
    reads_calls: bool,
    /// Decoding the request's images, part of every sample's `timings`.
    image_decode_s: f64,
}

impl Shape {
    fn timings(&self, completion: &Completion) -> Value {
        json!(completion.timings_report(self.image_decode_s, self.expose_cache_hits))
    }
}

/// A whole response: one choice per sample.
/// `version`: the model's version that answered, as `system_fingerprint`.
fn completion_body(
    id: &str,
    created: u64,
    model: &str,
    version: Option<&str>,
    completions: &[Completion],
    shape: Shape,
) -> Value {
    let choice = |completion: &Completion| {
        let logprobs = completion.logprobs.as_ref().map(|all| logprobs_json(all.iter()));
        let (message, finish_reason) =
            tools::message(&completion.text, completion.finish_reason.as_str(), shape.reads_calls);
        let mut choice = json!({
            "index": completion.sample,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "timings": shape.timings(completion),
        });
        if shape.return_ids {
            choice["token_ids"] = json!(completion.token_ids);
        }
        choice
    };
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": completions.iter().map(choice).collect::<Vec<_>>(),
        "usage": Usage::of_samples(completions, shape.expose_cache_hits),
        "system_fingerprint": version,
    })
}

/// OpenAI's `logprobs` object: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}`.
fn logprobs_json<'a>(tokens: impl Iterator<Item = &'a Logprobs>) -> Value {
    // JSON has no -infinity: OpenAI reports impossible tokens at -9999.
    let entry =
        |t: &TokenLogprob| json!({"token": t.text, "logprob": t.logprob.max(-9999.0), "bytes": t.text.as_bytes()});
    let content: Vec<Value> = tokens
        .map(|l| {
            let mut token = entry(&l.token);
            token["top_logprobs"] = l.top.iter().map(entry).collect();
            token
        })
        .collect();
    json!({"content": content, "refusal": null})
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Start,
    Tokens,
    Finished,
}

/// Server-sent events of one streaming completion. Owns the job's receiver and admission:
/// when the client goes away actix drops the stream, which cancels the generation.
struct ChatStream {
    running: Running,
    id: String,
    created: u64,
    model: String,
    /// The model's version that answers, as `system_fingerprint`.
    version: Option<String>,
    include_usage: bool,
    /// What the chunks show besides the text; `held` is there exactly when it reads calls.
    shape: Shape,
    /// The request's `n`, and the completions of those that finished.
    samples: usize,
    finished: Vec<Completion>,
    /// Per sample, its text while tool calls may come; `None` when the request offers no tools.
    held: Option<Vec<HeldText>>,
    phase: Phase,
}

impl ChatStream {
    fn chunk(&self, sample: usize, delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>) -> Value {
        self.chunk_with(sample, delta, finish, extra, Value::Null)
    }

    fn chunk_with(
        &self,
        sample: usize,
        delta: Value,
        finish: Option<&str>,
        extra: Option<(&str, Value)>,
        logprobs: Value,
    ) -> Value {
        let mut choice = json!({"index": sample, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
        if let Some((key, value)) = extra {
            choice[key] = value;
        }
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "system_fingerprint": self.version,
        })
    }

    fn event(value: &Value) -> String {
        format!("data: {value}\n\n")
    }

    /// The next bytes to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Finished => return None,
            Phase::Start => {
                self.phase = Phase::Tokens;
                let role =
                    |sample| Self::event(&self.chunk(sample, json!({"role": "assistant", "content": ""}), None, None));
                return Some(Bytes::from((0..self.samples).map(role).collect::<String>()));
            }
            Phase::Tokens => {}
        }
        let mut out = String::new();
        loop {
            match self.running.recv().await {
                Some(JobEvent::Token { sample, token_id, text, logprobs }) => {
                    let content = match self.held.as_mut().and_then(|held| held.get_mut(sample)) {
                        Some(held) => held.push(&text).to_string(),
                        None => text,
                    };
                    // Text held back for a possible call is sent at the sample's end.
                    if content.is_empty() && logprobs.is_none() && !self.shape.return_ids {
                        continue;
                    }
                    let ids = self.shape.return_ids.then(|| ("token_ids", json!([token_id])));
                    let logprobs = logprobs.as_ref().map_or(Value::Null, |l| logprobs_json(std::iter::once(l)));
                    let chunk = self.chunk_with(sample, json!({"content": content}), None, ids, logprobs);
                    out.push_str(&Self::event(&chunk));
                    return Some(Bytes::from(out));
                }
                Some(JobEvent::Done(completion)) => {
                    let sample = completion.sample;
                    let mut finish = completion.finish_reason.as_str();
                    if let Some(held) = self.held.as_ref().and_then(|held| held.get(sample)) {
                        let (rest, calls) = held.finish();
                        if !rest.is_empty() {
                            out.push_str(&Self::event(&self.chunk(sample, json!({"content": rest}), None, None)));
                        }
                        if let Some(calls) = calls {
                            let delta = json!({"tool_calls": tools::calls_json(&calls, true)});
                            out.push_str(&Self::event(&self.chunk(sample, delta, None, None)));
                            finish = tools::calls_finish(finish);
                        }
                    }
                    // The server's own timings: a client cannot time tokens that reach it together.
                    let timings = Some(("timings", self.shape.timings(&completion)));
                    out.push_str(&Self::event(&self.chunk(sample, json!({}), Some(finish), timings)));
                    self.finished.push(completion);
                    if self.finished.len() < self.samples {
                        return Some(Bytes::from(out));
                    }
                    if self.include_usage {
                        let mut usage_chunk = self.chunk(0, json!({}), None, None);
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] = json!(Usage::of_samples(&self.finished, self.shape.expose_cache_hits));
                        out.push_str(&Self::event(&usage_chunk));
                    }
                }
                Some(JobEvent::Failed(e)) => out.push_str(&Self::event(&ApiError::from(e).body())),
                None => out.push_str(&Self::event(&ApiError::from(SchedulerError::WorkerGone).body())),
            }
            break;
        }
        out.push_str("data: [DONE]\n\n");
        self.phase = Phase::Finished;
        Some(Bytes::from(out))
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
        futures_util::stream::unfold(self, |mut stream| async move {
            let bytes = stream.next().await?;
            Some((Ok(bytes), stream))
        })
    }
}

/// `GET /v1/models`: every configured model with its state, precision and providers.
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    let models = state.scheduler.models();
    // Each name once, where it first appears: a version added at run time comes last.
    let mut seen = std::collections::HashSet::new();
    let names: Vec<&str> = models.iter().map(|m| m.model.as_str()).filter(|name| seen.insert(*name)).collect();
    let counts = state.metrics.model_counts();
    let data: Vec<Value> = names.into_iter().map(|name| served_json(name, &models, &counts)).collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{name}`: a model, or one version of one (`name@version`).
pub async fn get_model(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    state.scheduler.check_model(&name)?;
    let models = state.scheduler.models();
    if let Some(version) = models.iter().find(|m| m.name == name && m.version.is_some()) {
        return Ok(HttpResponse::Ok().json(model_json(version, &state.metrics.model_counts())));
    }
    Ok(HttpResponse::Ok().json(served_json(&name, &models, &state.metrics.model_counts())))
}

/// A name as clients use it: the model itself, or, for one with versions, its versions with
/// their weights and counters (each answers to `name@version` too).
pub(super) fn served_json(
    name: &str,
    models: &[crate::scheduler::ModelStatus],
    counts: &crate::scheduler::ModelCounts,
) -> Value {
    let versions: Vec<&crate::scheduler::ModelStatus> = models.iter().filter(|m| m.model == name).collect();
    match versions.as_slice() {
        [only] if only.version.is_none() => model_json(only, counts),
        _ => {
            let ready = versions.iter().any(|v| v.weight > 0 && v.state == crate::scheduler::ModelState::Ready);
            json!({
                "id": name,
                "object": "model",
                "owned_by": "vlmserve",
                "created": versions.iter().map(|v| created(v)).max().unwrap_or(0),
                "state": if ready { "ready" } else { "not_ready" },
                "versions": versions.iter().map(|v| model_json(v, counts)).collect::<Vec<_>>(),
                "card": versions.iter().find_map(|v| card_json(v)),
            })
        }
    }
}

/// The package's card with each example's picture as its URL on this server.
fn card_json(model: &crate::scheduler::ModelStatus) -> Option<Value> {
    let card = model.card.as_ref()?;
    let examples: Vec<Value> = card
        .examples
        .iter()
        .map(|e| json!({"image": format!("/v1/models/{}/examples/{}", model.name, e.image), "question": e.question}))
        .collect();
    Some(json!({"about": card.about, "examples": examples}))
}

/// `GET /v1/models/{name}/examples/{image}`: one of the card's example pictures.
pub async fn model_example(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (name, image) = path.into_inner();
    state.scheduler.check_model(&name)?;
    let file = state
        .scheduler
        .models()
        .into_iter()
        .filter(|m| m.name == name || m.model == name)
        .find_map(|m| m.card.as_ref().and_then(|card| card.example_path(std::path::Path::new(&m.root), &image)))
        .ok_or_else(|| ApiError::not_found(format!("model {name:?} has no example {image:?}")))?;
    let content_type = match file.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "application/octet-stream",
    };
    let bytes = web::block(move || std::fs::read(file))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::not_found(format!("example {image:?}: {e}")))?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CONTENT_TYPE, content_type))
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .body(bytes))
}

fn created(model: &crate::scheduler::ModelStatus) -> u64 {
    model.loaded_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs())
}

fn model_json(model: &crate::scheduler::ModelStatus, counts: &crate::scheduler::ModelCounts) -> Value {
    let created = created(model);
    let graphs: Vec<Value> = model
        .graphs
        .iter()
        .map(|(graph, precision, providers)| json!({"graph": graph, "precision": precision, "providers": providers}))
        .collect();
    let mut providers: Vec<&str> = model.graphs.iter().flat_map(|g| g.2.iter().copied()).collect();
    providers.dedup();
    let mut json = json!({
        "id": model.name,
        "object": "model",
        "root": model.root,
        "created": created,
        "owned_by": "vlmserve",
        "state": model.state.as_str(),
        "revision": model.revision,
        "family": model.family,
        "context_length": model.context_length,
        "precision": model.precision,
        "providers": providers,
        "graphs": graphs,
        "last_error": model.last_error,
        "model": model.model,
        "version": model.version,
        "weight": model.version.as_ref().map(|_| model.weight),
        "requests": counts.finished(&model.name),
    });
    if let Some(card) = card_json(model) {
        json["card"] = card;
    }
    if model.version.is_some() {
        json["shadow"] = json!({"percent": model.shadow, "results": counts.shadow(&model.name)});
        json["window"] = json!(model.window);
        json["rollback"] = json!(model.rollback);
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::request::ImageSource;

    #[test]
    fn messages_with_text_and_images() {
        let png = "data:image/png;base64,iVBORw0KGgo=";
        let messages = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "What?"}]}),
        ];
        let (out, images) = parse_messages(messages, "messages", 4, None).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].content[0], ContentPart::Image);
        assert_eq!(images.len(), 1);
        // Base64 is decoded while preparing, off the async threads.
        assert!(matches!(&images[0].source, ImageSource::Base64 { data, .. } if data == "iVBORw0KGgo="));
        assert_eq!(images[0].budget, ImageBudget::default());
    }

    #[test]
    fn image_detail_and_max_pixels_become_the_budget() {
        let part =
            |image_url: Value| json!({"role": "user", "content": [{"type": "image_url", "image_url": image_url}]});
        let png = "data:image/png;base64,iVBORw0KGgo=";
        let parse = |image_url| parse_messages(vec![part(image_url)], "messages", 4, None);
        let (_, images) = parse(json!({"url": png, "detail": "low", "max_pixels": 50000})).unwrap();
        assert_eq!(images[0].budget, ImageBudget { detail: Detail::Low, max_pixels: Some(50000) });
        for bad in [
            json!({"url": png, "detail": "medium"}),
            json!({"url": png, "max_pixels": 0}),
            json!({"url": png, "max_pixels": "big"}),
        ] {
            let err = parse(bad.clone()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{bad}");
            assert!(
                err.param.as_deref().is_some_and(|p| p.ends_with(".detail") || p.ends_with(".max_pixels")),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_messages_are_400_or_413() {
        let error = |m: Value, max: usize| parse_messages(vec![m], "messages", max, None).unwrap_err();
        let status = |m: Value, max: usize| error(m, max).status.as_u16();
        assert_eq!(status(json!({"role": "tool", "content": "x"}), 4), 400);
        assert_eq!(status(json!({"role": "user", "content": 3}), 4), 400);
        let audio = json!({"role": "user", "content": ["x", {"type": "input_audio"}]});
        assert_eq!(error(audio, 4).param.as_deref(), Some("messages[0].content[0]"));
        let no_text = json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]});
        assert_eq!(error(no_text, 4).param.as_deref(), Some("messages[0].content[1].text"));
        let no_url = json!({"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]});
        assert_eq!(error(no_url, 4).param.as_deref(), Some("messages[0].content[0].image_url"));
        let remote = json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]});
        assert_eq!(status(remote, 4), 400);
        let one = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
        assert_eq!(status(json!({"role": "user", "content": [one.clone(), one]}), 1), 413);
    }

    #[test]
    fn unsupported_parameters_are_400() {
        let request = |v: Value| serde_json::from_value::<ChatRequest>(v).unwrap();
        let n = |n: u64| request(json!({"messages": [{"role": "user", "content": "x"}], "n": n}));
        assert_eq!(n(3).params(1.0, 3).unwrap().0.samples, 3);
        for bad in [0, 4] {
            assert_eq!(n(bad).params(1.0, 3).unwrap_err().param.as_deref(), Some("n"));
        }
        let temp = request(json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}));
        assert_eq!(temp.params(1.0, 1).unwrap_err().status.as_u16(), 400);
        let zero = request(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}));
        assert_eq!(zero.params(1.0, 1).unwrap_err().status.as_u16(), 400);
        let long_stop =
            request(json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b".repeat(257)]}));
        assert_eq!(long_stop.params(1.0, 1).unwrap_err().param.as_deref(), Some("stop"));
        let ok =
            request(json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5, "stop": "a"}));
        let (params, default) = ok.params(0.0, 1).unwrap();
        assert_eq!((params.max_new_tokens, default, params.stop.len()), (5, false, 1));
    }
}
