//! The service's own routes: liveness, readiness, metrics, this API's document, the load
//! the operator dispatches by, and the style presets.

use warp::http::header;
use warp::reply::Response;

use crate::server::error::ApiError;
use crate::server::reply::json_ok;
use crate::server::Shared;

pub fn healthz() -> Response {
    json_ok(&serde_json::json!({"status": "ok"}))
}

pub fn readyz(shared: &Shared) -> Result<Response, ApiError> {
    if shared.jobs.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    if !shared.ready() {
        return Err(ApiError::unavailable("the model is loading"));
    }
    Ok(json_ok(&serde_json::json!({
        "status": "ready",
        "model": shared.model.get().map(|m| m.model_name.clone()),
        "queueDepth": shared.jobs.depth(),
    })))
}

pub fn metrics(shared: &Shared) -> Response {
    let mut response = Response::new(shared.metrics.render().into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

pub fn openapi() -> Response {
    json_ok(&crate::server::openapi::document())
}

pub fn load(shared: &Shared, tenant: &str) -> Result<Response, ApiError> {
    Ok(json_ok(&crate::server::load::runtime_load(shared, tenant)?))
}

pub fn styles(shared: &Shared) -> Response {
    json_ok(&shared.styles.list())
}
