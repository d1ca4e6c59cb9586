//! Every error the service answers with: a status, and `{error:{code,message,field}}`.

use imagegen_crds::api::{codes, ErrorBody, ErrorDetail};
use warp::http::{header, StatusCode};
use warp::reply::Response;

use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
                field: None,
                retryable: None,
            },
            retry_after: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    pub fn retryable(mut self, retry_after: Option<u64>) -> Self {
        self.detail.retryable = Some(true);
        self.retry_after = retry_after;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message)
    }

    /// 422 naming the request field at fault.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::INVALID_FIELD,
            message,
        )
        .with_field(field)
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, what)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::CONFLICT, message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            message,
        )
    }

    pub fn queue_full(retry_after: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            codes::QUEUE_FULL,
            "the queue is full; retry later",
        )
        .retryable(Some(retry_after))
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::SHUTTING_DOWN,
            "the service is shutting down; retry on another replica",
        )
        .retryable(Some(1))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, codes::INTERNAL, message).retryable(Some(5))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, message)
    }

    /// An engine error of a request: invalid input is the client's (422), the rest ours.
    pub fn from_engine(error: &imagegen_engine::Error) -> Self {
        match error {
            imagegen_engine::Error::InvalidRequest { field, message } => {
                Self::invalid(camel_case(field), message.clone())
            }
            imagegen_engine::Error::Lora { .. } => Self::invalid("loras", error.to_string()),
            imagegen_engine::Error::Cancelled => Self::new(
                StatusCode::CONFLICT,
                codes::CANCELLED,
                "the job was cancelled",
            ),
            other => Self::internal(other.to_string()),
        }
    }

    pub fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody { error: self.detail }).unwrap_or_default();
        json_response(self.status, body, self.retry_after)
    }
}

pub fn json_response(status: StatusCode, body: Vec<u8>, retry_after: Option<u64>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

/// `mask_grow` → `maskGrow`: engine fields in the API's spelling.
pub fn camel_case(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A store failure as the API reports it.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("not found"),
            StoreError::Other(message) => ApiError::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_camel_case() {
        assert_eq!(camel_case("mask_grow"), "maskGrow");
        assert_eq!(camel_case("steps"), "steps");
    }

    #[test]
    fn queue_full_carries_retry_after() {
        let response = ApiError::queue_full(3).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
}
