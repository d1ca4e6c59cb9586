//! Request and response helpers shared by every route family: the request with its body
//! read once, JSON replies, and the HTTP status of an error code.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use imagegen_crds::api::{codes, Job};
use warp::http::{header, HeaderMap, Method, StatusCode};
use warp::reply::Response;

use crate::server::error::{json_response, ApiError};
use crate::server::jobs::error_detail;
use crate::server::media;
use crate::server::Shared;

pub type BodyStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send + 'static>>;

pub struct Request {
    pub method: Method,
    pub query: String,
    pub headers: HeaderMap,
    /// Taken by the first read (a Mutex so that `&Request` may cross await points).
    pub body: std::sync::Mutex<Option<BodyStream>>,
    pub shared: Arc<Shared>,
}

impl Request {
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn tenant(&self) -> Result<String, ApiError> {
        self.shared.auth.tenant(self.header(header::AUTHORIZATION))
    }

    pub async fn body(&mut self) -> Result<Bytes, ApiError> {
        let length = self
            .header(header::CONTENT_LENGTH)
            .and_then(|v| v.parse().ok());
        let body = self
            .body
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| ApiError::internal("the body was already read"))?;
        media::read_body(length, body, self.shared.config.limits.max_body_bytes).await
    }

    pub fn content_type(&self) -> String {
        self.header(header::CONTENT_TYPE)
            .unwrap_or("")
            .to_ascii_lowercase()
    }

    /// The body as JSON of type T (400 when it does not parse, 415 when it is not JSON).
    pub async fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        let content_type = self.content_type();
        if !content_type.is_empty() && !content_type.starts_with("application/json") {
            return Err(ApiError::unsupported_media(format!(
                "expected application/json, got `{content_type}`"
            )));
        }
        let body = self.body().await?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| value.to_string())
        })
    }
}

pub fn json_ok<T: serde::Serialize>(value: &T) -> Response {
    json_with_status(value, StatusCode::OK)
}

pub fn json_with_status<T: serde::Serialize>(value: &T, status: StatusCode) -> Response {
    json_response(status, serde_json::to_vec(value).unwrap_or_default(), None)
}

/// The HTTP status a job's error answers a synchronous request with.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        codes::BAD_REQUEST => StatusCode::BAD_REQUEST,
        codes::INVALID_FIELD => StatusCode::UNPROCESSABLE_ENTITY,
        codes::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        codes::FORBIDDEN => StatusCode::FORBIDDEN,
        codes::NOT_FOUND => StatusCode::NOT_FOUND,
        codes::CONFLICT | codes::CANCELLED => StatusCode::CONFLICT,
        codes::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        codes::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        codes::QUEUE_FULL => StatusCode::TOO_MANY_REQUESTS,
        codes::DEADLINE_EXCEEDED => StatusCode::GATEWAY_TIMEOUT,
        codes::SHUTTING_DOWN => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error a job that did not succeed answers with (Retry-After when it may be retried).
pub fn job_error(job: &Job) -> ApiError {
    let detail = job.error.clone().unwrap_or_else(|| {
        error_detail(codes::INTERNAL, format!("job ended {:?}", job.state), false)
    });
    ApiError {
        status: status_of(&detail.code),
        retry_after: detail.retryable.filter(|r| *r).map(|_| 1),
        detail,
    }
}

/// 202 with the job and its Location.
pub fn accepted(job: &Job, collection: &str) -> Response {
    let mut response = json_with_status(job, StatusCode::ACCEPTED);
    if let Ok(location) = header::HeaderValue::from_str(&format!("/v1/{collection}/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
