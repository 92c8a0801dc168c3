//! `POST /v1/vqa`: one image and one question, as multipart (`image` file, `question` field) or
//! JSON (`image` base64 or data URL, `question`); answers `{answer, model, usage, timings}`.
//! Optional fields in either form: `model`, `max_tokens`, `temperature`, `seed`.

use std::time::Instant;

use actix_multipart::Multipart;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::errors::ApiError;
use super::request::{self, ImageSource, PrepareInput, RequestImage, Started};
use crate::engine::{GenerationParams, SamplingParams};
use crate::family::ImageBudget;
use crate::preprocess::chat_template::ChatMessage;

#[derive(Debug, Default, Deserialize)]
struct VqaRequest {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    question: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
}

pub async fn vqa(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let multipart = request::content_type_is(&req, "multipart/form-data");
    if !multipart && !request::content_type_is(&req, "application/json") {
        return Err(ApiError::unsupported_media_type("send multipart/form-data or application/json"));
    }
    let (body, reservation) = request::read_body(&req, payload, &state.body_limits).await?;
    let (fields, image) = if multipart {
        let (fields, bytes) = from_multipart(&req, body).await?;
        (fields, ImageSource::Bytes(bytes))
    } else {
        let mut fields: VqaRequest = request::parse_json(&body)?;
        let image = match fields.image.take() {
            Some(data) if data.trim_start().starts_with("data:") => request::data_url(data, "image")?,
            Some(data) => ImageSource::Base64 { data, param: "image".into() },
            None => return Err(ApiError::invalid_param("image", "image is required")),
        };
        (fields, image)
    };
    // Parsed: the body's bytes are gone.
    drop(reservation);
    let question = fields.question.as_deref().map(str::trim).unwrap_or_default();
    if question.is_empty() {
        return Err(ApiError::invalid_param("question", "question is required"));
    }
    let sampling = SamplingParams {
        temperature: fields.temperature.unwrap_or(state.default_temperature),
        seed: fields.seed.map(|s| s as u64),
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let requested = request::requested_max_tokens(fields.max_tokens)?;
    // Without a request's own, PrepareInput::default_max_tokens sets it.
    let params = GenerationParams { sampling, max_new_tokens: requested.unwrap_or(1), ..GenerationParams::default() };
    let input = PrepareInput {
        messages: vec![ChatMessage::user(1, question)],
        images: vec![RequestImage { source: image, budget: ImageBudget::default() }],
        tools: Vec::new(),
        params,
        default_max_tokens: requested.is_none().then_some(state.default_max_tokens),
        constraint: None,
    };
    let session = request::session_key(&req, &state, None);
    let Started { model, image_decode_s, running, answered_by } =
        request::start(&state, fields.model.as_deref(), session, input, arrived).await?;
    let completion = request::collect(running).await?;
    Ok(request::ok(&answered_by).json(json!({
        "answer": completion.text,
        "model": model,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage(state.expose_cache_hits),
        "timings": completion.timings_report(image_decode_s, state.expose_cache_hits),
    })))
}

/// Fields of a multipart body that was already read under the body limit.
async fn from_multipart(req: &HttpRequest, body: Bytes) -> Result<(VqaRequest, Vec<u8>), ApiError> {
    // The parser waits for more data after a body cut off before its closing boundary, though
    // the body is complete: such a body is refused before parsing.
    if !ends_with_closing_boundary(req, &body) {
        return Err(ApiError::invalid("invalid multipart body: it does not end with its closing boundary")
            .with_code("invalid_multipart"));
    }
    let stream = futures_util::stream::once(async move { Ok::<_, actix_web::error::PayloadError>(body) });
    let mut multipart = Multipart::new(req.headers(), stream);
    let mut fields = VqaRequest::default();
    let mut image = None;
    let bad = |e: actix_multipart::MultipartError| {
        ApiError::invalid(format!("invalid multipart body: {e}")).with_code("invalid_multipart")
    };
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(bad)?;
        let name = field.name().unwrap_or_default().to_string();
        let mut data = Vec::new();
        while let Some(chunk) = field.next().await {
            data.extend_from_slice(&chunk.map_err(bad)?);
        }
        let text = || {
            String::from_utf8(data.clone())
                .map_err(|_| ApiError::invalid_param(&name, format!("{name} must be UTF-8 text")))
        };
        let number = |s: String| {
            s.trim().parse::<f64>().map_err(|_| ApiError::invalid_param(&name, format!("{name} must be a number")))
        };
        match name.as_str() {
            "image" => image = Some(data),
            "question" => fields.question = Some(text()?),
            "model" => fields.model = Some(text()?),
            "max_tokens" => {
                let n = number(text()?)?;
                if n < 0.0 || n.fract() != 0.0 {
                    return Err(ApiError::invalid_param("max_tokens", "max_tokens must be a whole number"));
                }
                fields.max_tokens = Some(n as u64);
            }
            "temperature" => fields.temperature = Some(number(text()?)? as f32),
            "seed" => fields.seed = Some(number(text()?)? as i64),
            _ => {}
        }
    }
    let image =
        image.ok_or_else(|| ApiError::invalid_param("image", "image is required (a file field named \"image\")"))?;
    Ok((fields, image))
}

/// Whether `body` ends with `--BOUNDARY--` (then at most white space), the boundary taken from
/// the `Content-Type`.
fn ends_with_closing_boundary(req: &HttpRequest, body: &[u8]) -> bool {
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary =
        content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary=")).map(|b| b.trim_matches('"'));
    let Some(boundary) = boundary.filter(|b| !b.is_empty()) else { return false };
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    body[..end].ends_with(format!("--{boundary}--").as_bytes())
}
