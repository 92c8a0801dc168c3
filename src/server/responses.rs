//! `POST /v1/responses`, OpenAI's Responses API, stateless: `input` (a string, or messages
//! whose parts are `input_text`, `input_image` and, for earlier turns, `output_text`),
//! `instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format`, `stream` with
//! its typed events. Nothing is stored: `store` is reported false and `previous_response_id`
//! is refused.

use std::time::Instant;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::errors::ApiError;
use super::openai::parse_messages;
use super::request::{self, PrepareInput, RequestConstraint, Running, Started, parse_param};
use crate::engine::{Completion, Constraint, FinishReason, GenerationParams, SamplingParams};
use crate::preprocess::chat_template::ChatMessage;
use crate::scheduler::{JobEvent, SchedulerError};

/// The request fields we read; unknown fields are ignored, as for chat completions.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    model: Option<String>,
    /// Keeps the user on one version of a model with versions (see `request::session_key`).
    #[serde(default)]
    user: Option<String>,
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

/// `text`: only its `format` is read.
#[derive(Debug, Deserialize)]
struct TextOptions {
    #[serde(default)]
    format: Option<TextFormat>,
}

/// `text.format`: the JSON schema sits beside `type`, not under it as in chat completions.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TextFormat {
    Text,
    JsonObject,
    JsonSchema { schema: Value },
}

impl ResponsesRequest {
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.previous_response_id.is_some() {
            return Err(ApiError::invalid_param(
                "previous_response_id",
                "responses are not stored: send the whole conversation in input",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid_param("tools", "tools are not supported"));
        }
        Ok(())
    }

    fn params(&self, default_temperature: f32) -> Result<(GenerationParams, bool), ApiError> {
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_p: self.top_p.unwrap_or(1.0),
            ..SamplingParams::default()
        };
        sampling.validate().map_err(ApiError::from)?;
        let requested = request::requested_max_tokens(self.max_output_tokens)?;
        let max_new_tokens = requested.unwrap_or(1);
        Ok((GenerationParams { sampling, max_new_tokens, ..GenerationParams::default() }, requested.is_none()))
    }

    fn constraint(&mut self) -> Result<Option<RequestConstraint>, ApiError> {
        let Some(text) = self.text.take() else { return Ok(None) };
        let options: TextOptions = parse_param(text, "text")?;
        let constraint = match options.format {
            None | Some(TextFormat::Text) => return Ok(None),
            Some(TextFormat::JsonObject) => Constraint::JsonObject,
            Some(TextFormat::JsonSchema { schema }) => Constraint::JsonSchema(schema),
        };
        Ok(Some(RequestConstraint { constraint, param: "text.format" }))
    }

    /// `input` as messages: a string is one user message.
    fn input_messages(&mut self) -> Vec<Value> {
        match self.input.take() {
            Value::String(text) => vec![json!({"role": "user", "content": text})],
            Value::Array(items) => items,
            other => vec![other],
        }
    }
}

pub async fn responses(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let mut request: ResponsesRequest = request::read_json(&req, payload, &state.body_limits).await?;
    request.check_supported()?;
    let (params, use_default) = request.params(state.default_temperature)?;
    let constraint = request.constraint()?;
    let (mut messages, images) =
        parse_messages(request.input_messages(), "input", state.max_images, state.remote_images.as_deref())?;
    if let Some(instructions) = request.instructions.take() {
        messages.insert(0, ChatMessage::text("system", instructions));
    }
    let default_max_tokens = use_default.then_some(state.default_max_tokens);
    let input = PrepareInput { messages, images, tools: Vec::new(), params, default_max_tokens, constraint };
    let session = request::session_key(&req, &state, request.user.as_deref());
    let Started { model, running, answered_by, .. } =
        request::start(&state, request.model.as_deref(), session, input, arrived).await?;
    let reply = Reply {
        id: format!("resp_{:032x}", rand::random::<u128>()),
        item_id: format!("msg_{:032x}", rand::random::<u128>()),
        created_at: request::unix_now(),
        model,
        temperature: request.temperature.unwrap_or(state.default_temperature),
        top_p: request.top_p.unwrap_or(1.0),
        max_output_tokens: request.max_output_tokens,
        expose_cache_hits: state.expose_cache_hits,
    };
    if request.stream.unwrap_or(false) {
        let running = running.first_event().await?;
        let stream = ResponseStream { running, reply, sequence: 0, text: String::new(), done: false };
        return Ok(request::ok(&answered_by)
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(stream.into_stream()));
    }
    let completion = request::collect(running).await?;
    Ok(request::ok(&answered_by).json(reply.response(Some(&completion))))
}

/// What every event and the final object repeat about the response.
struct Reply {
    id: String,
    item_id: String,
    created_at: u64,
    model: String,
    temperature: f32,
    top_p: f32,
    max_output_tokens: Option<u64>,
    expose_cache_hits: bool,
}

impl Reply {
    /// The response object: in progress (no completion yet), completed, or incomplete (cut by
    /// `max_output_tokens`).
    fn response(&self, completion: Option<&Completion>) -> Value {
        let (status, incomplete, output, usage) = match completion {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some(completion) => {
                let cut = matches!(completion.finish_reason, FinishReason::Length);
                let usage = completion.usage(self.expose_cache_hits);
                let usage = json!({
                    "input_tokens": usage.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
                    "output_tokens": usage.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage.total_tokens,
                });
                let (status, incomplete) = if cut {
                    ("incomplete", json!({"reason": "max_output_tokens"}))
                } else {
                    ("completed", Value::Null)
                };
                (status, incomplete, json!([self.item(&completion.text, "completed")]), usage)
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": null,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": false,
            "previous_response_id": null,
            "store": false,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        })
    }

    fn part(text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": []})
    }

    fn item(&self, text: &str, status: &str) -> Value {
        let content = if status == "in_progress" { json!([]) } else { json!([Self::part(text)]) };
        json!({"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content})
    }
}

/// The typed server-sent events of one streamed response: created, in progress, the output
/// item and its part added, a delta per token, then the text, part and item done and the
/// response completed (or incomplete). A failure is an `error` event. Owns the job's receiver:
/// a client that leaves cancels the generation.
struct ResponseStream {
    running: Running,
    reply: Reply,
    sequence: u64,
    text: String,
    done: bool,
}

impl ResponseStream {
    fn event(&mut self, kind: &str, mut fields: Value) -> String {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        format!("event: {kind}\ndata: {fields}\n\n")
    }

    fn opening(&mut self) -> String {
        let response = self.reply.response(None);
        let item = self.reply.item("", "in_progress");
        let location = json!({"item_id": self.reply.item_id, "output_index": 0, "content_index": 0});
        [
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
            self.event("response.output_item.added", json!({"output_index": 0, "item": item})),
            self.event("response.content_part.added", merge(&location, json!({"part": Reply::part("")}))),
        ]
        .concat()
    }

    fn closing(&mut self, completion: &Completion) -> String {
        let location = json!({"item_id": self.reply.item_id, "output_index": 0, "content_index": 0});
        let text = std::mem::take(&mut self.text);
        let response = self.reply.response(Some(completion));
        let last = if response["status"] == "completed" { "response.completed" } else { "response.incomplete" };
        let item = self.reply.item(&text, "completed");
        [
            self.event("response.output_text.done", merge(&location, json!({"text": text, "logprobs": []}))),
            self.event("response.content_part.done", merge(&location, json!({"part": Reply::part(&text)}))),
            self.event("response.output_item.done", json!({"output_index": 0, "item": item})),
            self.event(last, json!({"response": response})),
        ]
        .concat()
    }

    /// The next bytes to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if self.sequence == 0 {
            return Some(Bytes::from(self.opening()));
        }
        let out = match self.running.recv().await {
            Some(JobEvent::Token { text, .. }) if text.is_empty() => String::new(),
            Some(JobEvent::Token { text, .. }) => {
                self.text.push_str(&text);
                let fields = json!({
                    "item_id": self.reply.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": text,
                    "logprobs": [],
                });
                return Some(Bytes::from(self.event("response.output_text.delta", fields)));
            }
            Some(JobEvent::Done(completion)) => {
                self.done = true;
                self.closing(&completion)
            }
            Some(JobEvent::Failed(e)) => {
                self.done = true;
                self.error(ApiError::from(e))
            }
            None => {
                self.done = true;
                self.error(ApiError::from(SchedulerError::WorkerGone))
            }
        };
        Some(Bytes::from(out))
    }

    fn error(&mut self, error: ApiError) -> String {
        let body = error.body();
        self.event("error", body["error"].clone())
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
        futures_util::stream::unfold(self, |mut stream| async move {
            let bytes = stream.next().await?;
            Some((Ok(bytes), stream))
        })
    }
}

/// `base` with `extra`'s fields added.
fn merge(base: &Value, extra: Value) -> Value {
    let mut merged = base.clone();
    if let (Some(merged), Value::Object(extra)) = (merged.as_object_mut(), extra) {
        merged.extend(extra);
    }
    merged
}
