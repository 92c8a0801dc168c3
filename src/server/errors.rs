//! The one place errors become HTTP statuses and OpenAI error bodies
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Bad input is 400 (413 when over a size limit, 415 of a type the route does not read, 408
//! when its body is not sent in time); 403 a `Host` not allowed; 404 an unknown model or route; 429 admission
//! refused (with `Retry-After`); 503 not ready or shutting down; 504 a request past its
//! deadline; 500 only for failures of the server itself.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::engine::EngineError;
use crate::family::FamilyError;
use crate::preprocess::PreprocessError;
use crate::scheduler::SchedulerError;

/// An error as a client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: Some(code), retry_after_s: None }
    }

    /// 400: the request is malformed or asks for something unsupported.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
    }

    /// 400 naming the offending parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// 413: over a configured size limit.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key", message)
    }

    /// 403: the request may not be made here (a host not allowed).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    /// 429: a server-wide budget is in use; retry in a second.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after_s: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded", message)
        }
    }

    /// 408: the client did not send its body in time.
    pub fn body_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "body_timeout", message)
    }

    /// 415: a body of a type the route does not read.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", "unsupported_media_type", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(status = self.status.as_u16(), "{}", self.message);
        } else {
            tracing::debug!(status = self.status.as_u16(), "{}", self.message);
        }
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after_s {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(seconds)));
        }
        response.json(self.body())
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        let message = e.to_string();
        match e {
            PreprocessError::TooManyBytes { .. }
            | PreprocessError::TooLarge { .. }
            | PreprocessError::DecodeTooLarge { .. }
            | PreprocessError::DecoderLimit(_) => Self::too_large("image_too_large", message),
            PreprocessError::DecodeBusy { .. } => Self::overloaded(message),
            PreprocessError::Template(_) => Self::invalid_param("messages", message).with_code("invalid_messages"),
            PreprocessError::Empty
            | PreprocessError::UnsupportedFormat(_)
            | PreprocessError::Truncated(_)
            | PreprocessError::Decode(_) => Self::invalid(message).with_code("invalid_image"),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Preprocess(p) => p.into(),
            EngineError::Family(FamilyError::Preprocess(p)) => p.into(),
            EngineError::Family(FamilyError::ImageCountMismatch { .. }) => Self::invalid_param("messages", message),
            EngineError::Family(FamilyError::UnsupportedImage(_)) => Self::invalid(message).with_code("invalid_image"),
            EngineError::EmptyPrompt => Self::invalid_param("messages", message),
            EngineError::PromptTooLong { .. } | EngineError::PromptTooManyBytes { .. } => {
                Self::invalid_param("messages", message).with_code("context_length_exceeded")
            }
            EngineError::InvalidParameter(_) => Self::invalid(message).with_code("invalid_parameter"),
            EngineError::Encode(_) => Self::invalid_param("messages", message).with_code("tokenization_failed"),
            EngineError::InvalidConstraint(_) => {
                Self::invalid_param("response_format", message).with_code("invalid_constraint")
            }
            EngineError::Constraint(_) => Self::invalid(message).with_code("constraint_failed"),
            EngineError::Family(_)
            | EngineError::Tokenizer(_)
            | EngineError::Package(_)
            | EngineError::Runtime(_)
            | EngineError::Ort(_)
            | EngineError::GraphMismatch(_)
            | EngineError::Inconsistent(_)
            | EngineError::BatchFailed(_)
            | EngineError::VisionEncoderStopped
            | EngineError::Thread(_) => Self::internal(message),
        }
    }
}

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> Self {
        let message = e.to_string();
        match e {
            SchedulerError::UnknownModel { .. } => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", message)
                    .with_param("model")
            }
            SchedulerError::UnknownVersion { .. } => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", "version_not_found", message)
                    .with_param("model")
            }
            SchedulerError::InvalidWeights(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_weights", message)
            }
            SchedulerError::VersionExists(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", "version_exists", message)
            }
            SchedulerError::Unversioned(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", "model_has_no_versions", message)
            }
            SchedulerError::Unloaded(..) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "model_unloaded", message)
            }
            SchedulerError::NotReady(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "model_not_ready", message)
            }
            SchedulerError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "shutting_down", message)
            }
            SchedulerError::Overloaded { retry_after_s, .. } => Self {
                retry_after_s: Some(retry_after_s),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded", message)
            },
            SchedulerError::DeadlineExceeded(_) => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", "deadline_exceeded", message)
            }
            SchedulerError::Load { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", "model_load_failed", message)
            }
            SchedulerError::ReloadInProgress(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", "reload_in_progress", message)
            }
            SchedulerError::Engine(e) => e.into(),
            SchedulerError::WorkerGone | SchedulerError::Thread(_) | SchedulerError::NoWorkers(_) => {
                Self::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let e: ApiError = SchedulerError::Overloaded { model: "m".into(), limit: 2, retry_after_s: 3 }.into();
        assert_eq!((e.status.as_u16(), e.retry_after_s), (429, Some(3)));
        let r = e.error_response();
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "3");
        let e: ApiError = EngineError::PromptTooLong { prompt_tokens: 10, max_new_tokens: 5, context: 12 }.into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["code"], "context_length_exceeded");
        let e: ApiError = PreprocessError::TooLarge { width: 9, height: 9, max_side: 4, max_pixels: 16 }.into();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let e: ApiError = PreprocessError::Decode("x".into()).into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        // The image decode budget: over all of it never fits; in use, retry.
        let e: ApiError = PreprocessError::DecodeTooLarge { bytes: 9, budget: 8 }.into();
        assert_eq!((e.status.as_u16(), e.code), (413, Some("image_too_large")));
        let e: ApiError = PreprocessError::DecodeBusy { bytes: 9, budget: 16 }.into();
        assert_eq!((e.status.as_u16(), e.code, e.retry_after_s), (429, Some("overloaded"), Some(1)));
        let e: ApiError = PreprocessError::Truncated("Jpeg".into()).into();
        assert_eq!((e.status.as_u16(), e.code), (400, Some("invalid_image")));
        let e: ApiError = SchedulerError::UnknownModel { name: "x".into(), known: "m".into() }.into();
        assert_eq!((e.status.as_u16(), e.body()["error"]["param"].as_str()), (404, Some("model")));
        // The caller's text failing to tokenize is their error; our tokenizer failing is ours.
        let e: ApiError = EngineError::Encode("x".into()).into();
        assert_eq!((e.status.as_u16(), e.body()["error"]["code"].as_str()), (400, Some("tokenization_failed")));
        let e: ApiError = EngineError::Tokenizer("x".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
