//! The routes: one warp handler that authenticates, matches the path and answers. Every
//! error is JSON (`{error:{code,message,field}}`), the OpenAI-compatible routes' in OpenAI's
//! shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use image::DynamicImage;
use imagegen_crds::api::{
    self, codes, GenerationRequest, ImageInput, Job, JobEvent, JobState, LoraInfo, LoraSource,
    ResponseFormat, Upload,
};
use object_store::path::Path as StorePath;
use tokio::sync::broadcast;
use warp::http::{header, HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Reply};

use super::error::{json_response, ApiError};
use super::jobs::{error_detail, random_id, JobLora, Submission, Work};
use super::media::{self, Format};
use super::Shared;
use crate::store::{check_name, check_store_path, Store, StoreError};
use imagegen_engine::lora::DIFFUSERS_LORA_FILE;

/// Which error shape a route answers in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Native,
    OpenAi,
}

pub async fn handle<S, B>(
    method: Method,
    path: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
    body: S,
    shared: Arc<Shared>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send,
{
    let path = path.as_str().to_string();
    let dialect =
        if path.starts_with("/v1/images/generations") || path.starts_with("/v1/images/edits") {
            Dialect::OpenAi
        } else {
            Dialect::Native
        };
    let request = Request {
        method,
        query,
        headers,
        body: std::sync::Mutex::new(Some(Box::pin(body.map(|chunk| {
            chunk.map(|mut b| {
                let n = b.remaining();
                b.copy_to_bytes(n)
            })
        })))),
        shared: shared.clone(),
    };
    let response = match route(&path, request).await {
        Ok(response) => response,
        Err(error) => match dialect {
            Dialect::Native => error.into_response(),
            Dialect::OpenAi => super::openai::error_response(error),
        },
    };
    shared
        .metrics
        .http_requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        shared.metrics.rejected_queue_full.inc();
    }
    response
}

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

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::BAD_REQUEST,
        "method not allowed on this path",
    )
}

async fn route(path: &str, mut request: Request) -> Result<Response, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method.clone();
    // Public routes.
    match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => return Ok(json_ok(&serde_json::json!({"status": "ok"}))),
        (["readyz"], &Method::GET) => return readyz(&request.shared),
        (["metrics"], &Method::GET) => {
            let mut response = Response::new(request.shared.metrics.render().into());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return Ok(response);
        }
        (["openapi.json"], &Method::GET) => {
            return Ok(json_ok(&super::openapi::document()));
        }
        (["healthz" | "readyz" | "metrics" | "openapi.json"], _) => {
            return Err(method_not_allowed())
        }
        _ => {}
    }
    // An image URL signed by this service needs no token.
    if let (["v1", "images", name], &Method::GET) = (segments.as_slice(), &method) {
        if let Some(given) = request.query_param("signature") {
            let id = name.split('.').next().unwrap_or(name);
            let tenant = super::webhook::verify_image_query(
                &request.shared.config.url_signing_key,
                id,
                &request.query_param("tenant").unwrap_or_default(),
                &request.query_param("expires").unwrap_or_default(),
                &given,
                time::OffsetDateTime::now_utc().unix_timestamp(),
            )
            .ok_or_else(|| {
                ApiError::unauthorized("the image URL's signature is invalid or expired")
            })?;
            return get_image(&request, &tenant, name).await;
        }
    }
    let tenant = request.tenant()?;
    match (segments.as_slice(), method) {
        (["v1", "generations"], Method::POST) => post_generation(request, tenant).await,
        (["v1", "jobs", id], Method::GET) => {
            get_job(&request.shared.jobs, &tenant, id, "job").await
        }
        (["v1", "jobs", id], Method::DELETE) => cancel_job(&request.shared.jobs, &tenant, id).await,
        (["v1", "jobs", id, "events"], Method::GET) => {
            events(&request.shared.jobs, &tenant, id).await
        }
        (["v1", "trainings"], Method::POST) => post_training(&mut request, &tenant).await,
        (["v1", "trainings", id], Method::GET) => {
            get_job(&request.shared.trainings, &tenant, id, "training").await
        }
        (["v1", "trainings", id], Method::DELETE) => {
            cancel_job(&request.shared.trainings, &tenant, id).await
        }
        (["v1", "trainings", id, "events"], Method::GET) => {
            events(&request.shared.trainings, &tenant, id).await
        }
        (["v1", "uploads"], Method::POST) => post_upload(&mut request, &tenant).await,
        (["v1", "images", "generations"], Method::POST) => {
            super::openai::generations(request, tenant).await
        }
        (["v1", "images", "edits"], Method::POST) => super::openai::edits(request, tenant).await,
        (["v1", "images", name], Method::GET) => get_image(&request, &tenant, name).await,
        (["v1", "images", name], Method::DELETE) => {
            delete_image(&request.shared, &tenant, name).await
        }
        (["v1", "load"], Method::GET) => Ok(json_ok(&super::load::runtime_load(
            &request.shared,
            &tenant,
        )?)),
        (["v1", "styles"], Method::GET) => Ok(json_ok(&request.shared.styles.list())),
        (["v1", "loras"], Method::GET) => list_loras(&request.shared, &tenant).await,
        (["v1", "loras"], Method::POST) => post_lora(&mut request, &tenant).await,
        (["v1", "loras", name], Method::DELETE) => {
            delete_lora(&request.shared, &tenant, name).await
        }
        (
            ["v1", "generations"]
            | ["v1", "jobs", _]
            | ["v1", "jobs", _, "events"]
            | ["v1", "trainings"]
            | ["v1", "trainings", _]
            | ["v1", "trainings", _, "events"]
            | ["v1", "uploads"]
            | ["v1", "images", _]
            | ["v1", "load"]
            | ["v1", "styles"]
            | ["v1", "loras"]
            | ["v1", "loras", _],
            _,
        ) => Err(method_not_allowed()),
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

pub fn json_ok<T: serde::Serialize>(value: &T) -> Response {
    json_with_status(value, StatusCode::OK)
}

pub fn json_with_status<T: serde::Serialize>(value: &T, status: StatusCode) -> Response {
    json_response(status, serde_json::to_vec(value).unwrap_or_default(), None)
}

fn readyz(shared: &Shared) -> Result<Response, ApiError> {
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

// ---------------------------------------------------------------- generations

/// Cancels a synchronous request's job when its client goes away before the answer.
struct CancelOnDrop {
    shared: Arc<Shared>,
    tenant: String,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let reason = error_detail(codes::CANCELLED, "the client disconnected", false);
            // A job that has already ended is left as it is.
            let _ = self
                .shared
                .jobs
                .cancel(&self.tenant, &self.id, Some(reason));
        }
    }
}

async fn post_generation(mut request: Request, tenant: String) -> Result<Response, ApiError> {
    let body: GenerationRequest = request.json().await?;
    let prefer_async = request
        .header(header::HeaderName::from_static("prefer"))
        .is_some_and(|p| p.split(',').any(|v| v.trim() == "respond-async"));
    let shared = request.shared.clone();
    let (job, rx, new) = submit(&shared, &tenant, body, None).await?;
    if prefer_async {
        return Ok(accepted(&job, "jobs"));
    }
    let job = wait_for(&shared, &tenant, job, rx, new).await?;
    match job.state {
        JobState::Succeeded => Ok(json_ok(&job)),
        _ => Err(job_error(&job)),
    }
}

/// Waits for a job's end; a disconnect before it cancels the job (when this request made it).
pub async fn wait_for(
    shared: &Arc<Shared>,
    tenant: &str,
    job: Job,
    mut rx: broadcast::Receiver<JobEvent>,
    new: bool,
) -> Result<Job, ApiError> {
    let mut guard = CancelOnDrop {
        shared: shared.clone(),
        tenant: tenant.to_string(),
        id: job.id.clone(),
        armed: new,
    };
    if !job.state.is_finished() {
        loop {
            match rx.recv().await {
                Ok(event) if event.is_final() => break,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    guard.armed = false;
    shared
        .jobs
        .get(tenant, &job.id)
        .ok_or_else(|| ApiError::internal("the job vanished"))
}

/// Checks a request against the limits before anything is read or queued.
pub fn check_limits(
    limits: &super::config::Limits,
    styles: &imagegen_engine::styles::StyleBook,
    webhook_hosts: &[String],
    body: &GenerationRequest,
) -> Result<(), ApiError> {
    let p = &body.params;
    let chars = |s: &str| s.chars().count() as u32;
    if p.prompt.trim().is_empty() && p.mode != Some(imagegen_crds::Mode::RemoveObject) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if chars(&p.prompt) > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!("longer than {} characters", limits.max_prompt_chars),
        ));
    }
    if p.negative_prompt
        .as_deref()
        .is_some_and(|n| chars(n) > limits.max_prompt_chars)
    {
        return Err(ApiError::invalid(
            "negativePrompt",
            format!("longer than {} characters", limits.max_prompt_chars),
        ));
    }
    if body
        .mask_prompt
        .as_deref()
        .is_some_and(|n| chars(n) > limits.max_prompt_chars || n.trim().is_empty())
    {
        return Err(ApiError::invalid(
            "maskPrompt",
            format!("must have 1 to {} characters", limits.max_prompt_chars),
        ));
    }
    if let Some(steps) = p.steps {
        if steps == 0 || steps > limits.max_steps {
            return Err(ApiError::invalid(
                "steps",
                format!("{steps} is not between 1 and {}", limits.max_steps),
            ));
        }
    }
    if let Some(count) = p.count {
        if count == 0 || count > limits.max_count {
            return Err(ApiError::invalid(
                "count",
                format!("{count} is not between 1 and {}", limits.max_count),
            ));
        }
    }
    for (field, side) in [("width", p.width), ("height", p.height)] {
        if let Some(side) = side {
            if side == 0 || side > limits.max_side || side % 8 != 0 {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "{side} is not a multiple of 8 between 8 and {}",
                        limits.max_side
                    ),
                ));
            }
        }
    }
    if let (Some(w), Some(h)) = (p.width, p.height) {
        if u64::from(w) * u64::from(h) > limits.max_pixels {
            return Err(ApiError::invalid(
                "width",
                format!("{w}x{h} is more than {} pixels", limits.max_pixels),
            ));
        }
    }
    for (field, value, range) in [
        ("guidanceScale", p.guidance_scale, 0.0..=100.0),
        ("strength", p.strength, 0.0..=1.0),
        ("imageGuidanceScale", p.image_guidance_scale, 0.0..=100.0),
        ("controlScale", p.control_scale, 0.0..=10.0),
    ] {
        if let Some(v) = value {
            if !v.is_finite() || !range.contains(&v) {
                return Err(ApiError::invalid(
                    field,
                    format!("{v} is not between {} and {}", range.start(), range.end()),
                ));
            }
        }
    }
    if let Some(scheduler) = &p.scheduler {
        if !imagegen_crds::generation::SCHEDULERS.contains(&scheduler.as_str()) {
            return Err(ApiError::invalid(
                "scheduler",
                format!(
                    "unknown scheduler `{scheduler}`; valid: {}",
                    imagegen_crds::generation::SCHEDULERS.join(", ")
                ),
            ));
        }
    }
    if let Some(style) = &p.style {
        styles
            .get(style)
            .map_err(|e| ApiError::invalid("style", e.to_string()))?;
    }
    if let Some(id) = &body.job_id {
        check_job_id(id)?;
    }
    check_webhook_url(body.webhook_url.as_deref(), webhook_hosts)?;
    if body.deadline_seconds == Some(0) {
        return Err(ApiError::invalid("deadlineSeconds", "must be at least 1"));
    }
    if body.loras.len() > imagegen_crds::image_generation::MAX_LORAS as usize {
        return Err(ApiError::invalid(
            "loras",
            format!(
                "at most {} LoRAs",
                imagegen_crds::image_generation::MAX_LORAS
            ),
        ));
    }
    Ok(())
}

/// A client's job id: `[a-z0-9-]{1,64}`.
fn check_job_id(id: &str) -> Result<(), ApiError> {
    if !api::is_job_id(id) {
        return Err(ApiError::invalid("jobId", "must match [a-z0-9-]{1,64}"));
    }
    Ok(())
}

/// A webhook, when given, must go to a host on the deployment's allow-list.
fn check_webhook_url(url: Option<&str>, webhook_hosts: &[String]) -> Result<(), ApiError> {
    match url {
        Some(url) if !super::webhook::allowed(url, webhook_hosts) => Err(ApiError::invalid(
            "webhookUrl",
            "the webhook's host is not on the deployment's allow-list",
        )),
        _ => Ok(()),
    }
}

/// The served model's names: what the config gave, and its last path segment.
pub fn serves_model(shared: &Shared, name: &str) -> bool {
    let served = shared.config.model.trim_end_matches('/');
    let short = served.rsplit('/').next().unwrap_or(served);
    name == served || name == short
}

pub use crate::store::{hex_sha256, image_path, info_path, lora_path};
pub use imagegen_crds::api::lora_file;

/// A digest of a request, which a re-submission of its job id must match; only a request
/// that names its job id is ever compared, so the others (which may carry megabytes of
/// base64) are not serialized and hashed for nothing.
fn fingerprint<T: serde::Serialize>(body: &T, has_job_id: bool) -> String {
    if has_job_id {
        hex_sha256(&serde_json::to_vec(body).unwrap_or_default())
    } else {
        String::new()
    }
}

/// Validates, resolves inputs and queues a generation.
pub async fn submit(
    shared: &Arc<Shared>,
    tenant: &str,
    mut body: GenerationRequest,
    // Pre-decoded images (the OpenAI edit endpoint's multipart files).
    decoded: Option<(DynamicImage, Option<image::GrayImage>)>,
) -> Result<(Job, broadcast::Receiver<JobEvent>, bool), ApiError> {
    if shared.jobs.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    if !shared.ready() {
        return Err(ApiError::unavailable("the model is loading"));
    }
    check_limits(
        &shared.config.limits,
        &shared.styles,
        &shared.config.webhook_hosts,
        &body,
    )?;
    let fingerprint = fingerprint(&body, body.job_id.is_some());
    // A re-submitted job id answers with the existing job before any input is read.
    if let Some(id) = &body.job_id {
        shared.jobs.recall(tenant, id).await;
        if let Some(existing) = shared.jobs.resubmit(tenant, id, &fingerprint) {
            return existing;
        }
    }
    // `model`: the served model, or a LoRA of the tenant by name.
    if let Some(model) = body.model.clone() {
        if !serves_model(shared, &model) {
            check_name(&model).map_err(|e| ApiError::invalid("model", e))?;
            match shared.store.head(&lora_path(tenant, &model)).await {
                Ok(_) => body.loras.insert(
                    0,
                    imagegen_crds::api::LoraInput {
                        name: model.clone(),
                        weight: None,
                        path: None,
                    },
                ),
                Err(StoreError::NotFound) => {
                    return Err(ApiError::not_found(format!(
                        "model `{model}` is neither the served model nor a LoRA of yours"
                    ))
                    .with_field("model"))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut loras = Vec::new();
    for (i, lora) in body.loras.iter().enumerate() {
        let field = format!("loras[{i}]");
        let weight = lora.weight.unwrap_or(1.0);
        if !weight.is_finite() || !(-4.0..=4.0).contains(&weight) {
            return Err(ApiError::invalid(
                format!("{field}.weight"),
                "must be between -4 and 4",
            ));
        }
        // The tenant-relative path is kept beside the local file: `GET /v1/load` names
        // the LoRAs a job loads as the request named them.
        let store_path = match &lora.path {
            Some(path) => {
                check_store_path(path)
                    .map_err(|e| ApiError::invalid(format!("{field}.path"), e))?;
                path.clone()
            }
            None => {
                check_name(&lora.name)
                    .map_err(|e| ApiError::invalid(format!("{field}.name"), e))?;
                lora_file(&lora.name)
            }
        };
        let path = Store::tenant_path(tenant, &store_path);
        let file = shared.store.local_file(&path).await.map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::not_found(format!("no LoRA `{}`", lora.name)).with_field(field.clone())
            }
            other => other.into(),
        })?;
        loras.push(JobLora {
            file,
            store_path,
            weight,
        });
    }
    let limits = shared.config.limits.image_limits();
    let (image, mask) = match decoded {
        Some((image, mask)) => (Some(image), mask),
        None => {
            let image_bytes = match &body.image {
                Some(input) => Some(input_bytes(shared, tenant, input, "image").await?),
                None => None,
            };
            let mask_bytes = match &body.mask {
                Some(input) => Some(input_bytes(shared, tenant, input, "mask").await?),
                None => None,
            };
            tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
                let image = image_bytes
                    .map(|b| media::decode(&b, "image", &limits))
                    .transpose()?;
                let mask = mask_bytes
                    .map(|b| media::decode(&b, "mask", &limits))
                    .transpose()?
                    .map(|m| imagegen_engine::image::mask::mask_from_image(&m));
                Ok((image, mask))
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??
        }
    };
    if let (Some(image), Some(mask)) = (&image, &mask) {
        imagegen_engine::image::mask::check_same_size(image, mask)
            .map_err(|e| ApiError::invalid("mask", e.to_string()))?;
    }
    if body.mask_prompt.is_some() && image.is_none() {
        return Err(ApiError::invalid(
            "maskPrompt",
            "a mask prompt needs an image",
        ));
    }
    let mode = mode_label(
        &body,
        image.is_some(),
        mask.is_some() || body.mask_prompt.is_some(),
    );
    let deadline_seconds = body
        .deadline_seconds
        .unwrap_or(shared.config.default_deadline_seconds);
    let id = body.job_id.clone().unwrap_or_else(random_id);
    // Text-to-image jobs with the same loop shape and LoRAs may share a UNet batch.
    let images = body.params.count.unwrap_or(1);
    let batch_key = (mode == "text-to-image"
        && image.is_none()
        && body.mask_prompt.is_none()
        && shared.config.batch_limit > 1
        && images <= shared.config.batch_limit)
        .then(|| {
            let p = &body.params;
            serde_json::json!([
                p.width,
                p.height,
                p.steps,
                p.scheduler,
                p.guidance_scale,
                p.clip_skip,
                loras
                    .iter()
                    .map(|l| (l.file.display().to_string(), l.weight))
                    .collect::<Vec<_>>(),
            ])
            .to_string()
        });
    let submission = Submission {
        tenant: tenant.to_string(),
        id,
        fingerprint,
        deadline: Instant::now() + Duration::from_secs(u64::from(deadline_seconds)),
        webhook: body.webhook_url.clone(),
        work: Work {
            params: body.params.clone(),
            image,
            mask,
            mask_prompt: body.mask_prompt.clone(),
            loras,
            b64: body.response_format == Some(ResponseFormat::B64Json),
            mode,
            batch_key,
            images,
        },
    };
    let submitted = shared.jobs.submit(submission)?;
    shared.metrics.queue_depth.set(shared.jobs.depth() as i64);
    Ok(submitted)
}

fn mode_label(body: &GenerationRequest, has_image: bool, has_mask: bool) -> &'static str {
    use imagegen_crds::Mode;
    match body.params.mode {
        Some(Mode::TextToImage) => "text-to-image",
        Some(Mode::ImageToImage) => "image-to-image",
        Some(Mode::Inpaint) => "inpaint",
        Some(Mode::Outpaint) => "outpaint",
        Some(Mode::RemoveObject) => "remove-object",
        None if body.params.outpaint.is_some() => "outpaint",
        None if has_mask => "inpaint",
        None if has_image => "image-to-image",
        None => "text-to-image",
    }
}

/// The bytes of an input image: from the tenant's store, an upload, our own image URL, an
/// allow-listed URL, or base64.
async fn input_bytes(
    shared: &Shared,
    tenant: &str,
    input: &ImageInput,
    field: &str,
) -> Result<Bytes, ApiError> {
    let limit = shared.config.limits.max_body_bytes;
    let from_store = |path: StorePath, what: String| async move {
        shared.store.get(&path, limit).await.map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found(what).with_field(field),
            other => other.into(),
        })
    };
    match input {
        ImageInput::Path(path) => {
            check_store_path(path).map_err(|e| ApiError::invalid(field, e))?;
            from_store(
                Store::tenant_path(tenant, path),
                format!("no file `{path}`"),
            )
            .await
        }
        ImageInput::UploadId(id) => {
            check_name(id).map_err(|e| ApiError::invalid(field, e))?;
            from_store(
                Store::tenant_path(tenant, &api::upload_file(id)),
                format!("no upload `{id}`"),
            )
            .await
        }
        ImageInput::Url(url) => {
            if let Some(name) = own_image_name(url) {
                check_name(name).map_err(|e| ApiError::invalid(field, e))?;
                let id = name.split('.').next().unwrap_or(name);
                return from_store(image_path(tenant, id), format!("no image `{id}`")).await;
            }
            if !super::webhook::allowed(url, &shared.config.url_hosts) {
                return Err(ApiError::invalid(
                    field,
                    "the URL's host is not on the deployment's allow-list",
                ));
            }
            let url = url.clone();
            let bytes = tokio::task::spawn_blocking(move || super::webhook::fetch(&url, limit))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid(field, format!("fetching the image: {e}")))?;
            Ok(Bytes::from(bytes))
        }
        ImageInput::Base64(text) => Ok(Bytes::from(media::decode_base64(text, field, limit)?)),
    }
}

/// `/v1/images/<name>` (or a full URL ending so): one of our own images.
fn own_image_name(url: &str) -> Option<&str> {
    let path = match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            &rest[rest.find('/')?..]
        }
        None => url,
    };
    path.strip_prefix("/v1/images/")
}

// ---------------------------------------------------------------- events

fn sse_event(event: &JobEvent) -> warp::sse::Event {
    warp::sse::Event::default()
        .event(event.name())
        .data(serde_json::to_string(event).unwrap_or_default())
}

fn snapshot_event(job: &Job) -> JobEvent {
    match job.state {
        JobState::Queued => JobEvent::Queued {
            position: job.queue_position.unwrap_or(0),
        },
        JobState::Running => JobEvent::Progress {
            step: job.progress.step,
            total: job.progress.total,
            loss: None,
        },
        JobState::Succeeded => JobEvent::Succeeded {
            job: Box::new(job.clone()),
        },
        JobState::Failed => JobEvent::Failed {
            error: job
                .error
                .clone()
                .unwrap_or_else(|| error_detail(codes::INTERNAL, "failed", false)),
        },
        JobState::Cancelled => JobEvent::Cancelled {},
    }
}

/// `GET` of a job or training (one this process ran, or one kept in the store); `what`
/// names its kind in the 404.
async fn get_job<W>(
    jobs: &super::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
    what: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let job = jobs
        .get(tenant, id)
        .ok_or_else(|| ApiError::not_found(format!("no {what} `{id}`")))?;
    Ok(json_ok(&job))
}

/// `DELETE` of a job or training: 200 when it has ended, 202 while it is stopping.
async fn cancel_job<W>(
    jobs: &super::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let job = jobs.cancel(tenant, id, None)?;
    let status = if job.state.is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_with_status(&job, status))
}

async fn events<W>(
    jobs: &super::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let (job, rx) = jobs
        .subscribe(tenant, id)
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    let first = snapshot_event(&job);
    let done = job.state.is_finished();
    // The snapshot, then every event until the job ends.
    let stream = futures_util::stream::unfold(
        (Some(first), rx, done),
        |(pending, mut rx, done)| async move {
            if let Some(event) = pending {
                let finished = event.is_final();
                return Some((
                    Ok::<_, std::convert::Infallible>(sse_event(&event)),
                    (None, rx, done || finished),
                ));
            }
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        let finished = event.is_final();
                        return Some((Ok(sse_event(&event)), (None, rx, finished)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response())
}

// ---------------------------------------------------------------- uploads and images

/// The image of a raw or multipart body (the part named `file` or `image`, else the first
/// part with a file name).
async fn image_from_body(request: &mut Request) -> Result<Bytes, ApiError> {
    let content_type = request.content_type();
    let body = request.body().await?;
    if content_type.starts_with("multipart/form-data") {
        let parts = media::parse_multipart(&content_type, body).await?;
        let part = parts
            .iter()
            .find(|p| p.name == "file" || p.name == "image")
            .or_else(|| parts.iter().find(|p| p.filename.is_some()))
            .ok_or_else(|| ApiError::invalid("file", "the form has no file part"))?;
        return Ok(part.data.clone());
    }
    if !(content_type.is_empty()
        || content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream"))
    {
        return Err(ApiError::unsupported_media(format!(
            "send the image as image/png, image/jpeg, image/webp or multipart/form-data, not `{content_type}`"
        )));
    }
    Ok(body)
}

async fn post_upload(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
    if request.shared.jobs.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let bytes = image_from_body(request).await?;
    let content_type = media::sniff(&bytes).ok_or_else(|| {
        ApiError::unsupported_media("the upload is not PNG, JPEG or WebP").with_field("file")
    })?;
    let limits = request.shared.config.limits.image_limits();
    let checked = bytes.clone();
    let image = tokio::task::spawn_blocking(move || media::decode(&checked, "file", &limits))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let id = random_id();
    request
        .shared
        .store
        .put(
            &Store::tenant_path(tenant, &api::upload_file(&id)),
            bytes.clone(),
        )
        .await?;
    let upload = Upload {
        id,
        content_type: content_type.to_string(),
        width: image.width(),
        height: image.height(),
        size_bytes: bytes.len() as u64,
    };
    Ok(json_with_status(&upload, StatusCode::CREATED))
}

async fn get_image(request: &Request, tenant: &str, name: &str) -> Result<Response, ApiError> {
    let (id, format) = match name.rsplit_once('.') {
        Some((id, ext)) => (
            id,
            Format::from_extension(ext).ok_or_else(|| {
                ApiError::not_found(format!("no image format `.{ext}` (png, jpg or webp)"))
            })?,
        ),
        None => (
            name,
            Format::from_accept(request.header(header::ACCEPT)).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    codes::BAD_REQUEST,
                    "Accept names none of image/png, image/jpeg, image/webp",
                )
            })?,
        ),
    };
    check_name(id).map_err(|_| ApiError::not_found(format!("no image `{id}`")))?;
    let png = request
        .shared
        .store
        .get(
            &image_path(tenant, id),
            request.shared.config.limits.max_body_bytes.max(256 << 20),
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found(format!("no image `{id}`")),
            other => other.into(),
        })?;
    let credentials = request.shared.credentials.clone();
    let bytes =
        tokio::task::spawn_blocking(move || media::convert(&png, format, credentials.as_deref()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::internal)?;
    let mut response = Response::new(bytes.into());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("private, max-age=3600"),
    );
    headers.insert(header::VARY, header::HeaderValue::from_static("Accept"));
    Ok(response)
}

// ---------------------------------------------------------------- trainings

async fn post_training(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
    use imagegen_crds::training::{MAX_RANK, MAX_TRAINING_IMAGES, MAX_TRAINING_STEPS};
    let body: imagegen_crds::api::TrainingRequest = request.json().await?;
    let shared = request.shared.clone();
    if shared.trainings.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    check_name(&body.name).map_err(|e| ApiError::invalid("name", e))?;
    let p = &body.params;
    let limits = &shared.config.limits;
    if p.instance_prompt.trim().is_empty()
        || p.instance_prompt.chars().count() as u32 > limits.max_prompt_chars
    {
        return Err(ApiError::invalid(
            "instancePrompt",
            format!("must have 1 to {} characters", limits.max_prompt_chars),
        ));
    }
    if body.images.is_empty() || body.images.len() > MAX_TRAINING_IMAGES as usize {
        return Err(ApiError::invalid(
            "images",
            format!("give 1 to {MAX_TRAINING_IMAGES} images"),
        ));
    }
    if p.steps.is_some_and(|s| s == 0 || s > MAX_TRAINING_STEPS) {
        return Err(ApiError::invalid(
            "steps",
            format!("must be between 1 and {MAX_TRAINING_STEPS}"),
        ));
    }
    if p.rank.is_some_and(|r| r == 0 || r > MAX_RANK) {
        return Err(ApiError::invalid(
            "rank",
            format!("must be between 1 and {MAX_RANK}"),
        ));
    }
    if p.resolution
        .is_some_and(|r| r == 0 || r % 8 != 0 || r > limits.max_side)
    {
        return Err(ApiError::invalid(
            "resolution",
            format!("must be a multiple of 8 up to {}", limits.max_side),
        ));
    }
    for (field, value) in [("alpha", p.alpha), ("learningRate", p.learning_rate)] {
        if value.is_some_and(|v| !v.is_finite() || v <= 0.0) {
            return Err(ApiError::invalid(field, "must be a positive number"));
        }
    }
    check_webhook_url(body.webhook_url.as_deref(), &shared.config.webhook_hosts)?;
    let fingerprint = fingerprint(&body, body.job_id.is_some());
    if let Some(id) = &body.job_id {
        check_job_id(id)?;
        shared.trainings.recall(tenant, id).await;
        if let Some(existing) = shared.trainings.resubmit(tenant, id, &fingerprint) {
            let (job, _, _) = existing?;
            return Ok(accepted(&job, "trainings"));
        }
    }
    if shared
        .store
        .head(&lora_path(tenant, &body.name))
        .await
        .is_ok()
    {
        return Err(
            ApiError::conflict(format!("LoRA `{}` exists; delete it first", body.name))
                .with_field("name"),
        );
    }
    // The photos, checked and written where the trainer reads them.
    let dir = std::env::temp_dir().join(format!("imagegen-training-{}", random_id()));
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let work = super::trainer::TrainingWork {
        name: body.name.clone(),
        params: body.params.clone(),
        dir,
    };
    let image_limits = limits.image_limits();
    for (i, input) in body.images.iter().enumerate() {
        let field = format!("images[{i}]");
        let bytes = input_bytes(&shared, tenant, input, &field).await?;
        let checked = bytes.clone();
        let decode_field = field.clone();
        tokio::task::spawn_blocking(move || media::decode(&checked, &decode_field, &image_limits))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        let ext = match media::sniff(&bytes) {
            Some("image/jpeg") => "jpg",
            Some("image/webp") => "webp",
            _ => "png",
        };
        std::fs::write(images_dir.join(format!("{i:03}.{ext}")), &bytes)
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let (job, _, _) = shared.trainings.submit(Submission {
        tenant: tenant.to_string(),
        id: body.job_id.clone().unwrap_or_else(random_id),
        fingerprint,
        // Trainings have no deadline of their own.
        deadline: Instant::now() + Duration::from_secs(365 * 24 * 3600),
        webhook: body.webhook_url.clone(),
        work,
    })?;
    Ok(accepted(&job, "trainings"))
}

/// 202 with the job and its Location.
fn accepted(job: &Job, collection: &str) -> Response {
    let mut response = json_with_status(job, StatusCode::ACCEPTED);
    if let Ok(location) = header::HeaderValue::from_str(&format!("/v1/{collection}/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

async fn delete_image(shared: &Shared, tenant: &str, name: &str) -> Result<Response, ApiError> {
    let id = name.split('.').next().unwrap_or(name);
    check_name(id).map_err(|_| ApiError::not_found(format!("no image `{id}`")))?;
    let path = image_path(tenant, id);
    shared.store.head(&path).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("no image `{id}`")),
        other => other.into(),
    })?;
    shared.store.delete(&path).await?;
    let mut response = Response::new(Vec::new().into());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

// ---------------------------------------------------------------- LoRAs

async fn list_loras(shared: &Shared, tenant: &str) -> Result<Response, ApiError> {
    let objects = shared
        .store
        .list(&Store::tenant_path(tenant, "loras"))
        .await?;
    let mut loras = Vec::new();
    for object in &objects {
        let parts: Vec<String> = object
            .location
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        // tenants/<t>/loras/<name>/pytorch_lora_weights.safetensors
        if parts.len() != 5 || parts[4] != DIFFUSERS_LORA_FILE {
            continue;
        }
        let name = &parts[3];
        let stored = match shared.store.get(&info_path(tenant, name), 1 << 16).await {
            Ok(bytes) => serde_json::from_slice::<StoredLoraInfo>(&bytes).ok(),
            Err(_) => None,
        };
        let info = match stored {
            Some(stored) if stored.describes(object) => stored.info,
            _ => describe_lora_file(shared, tenant, name, object).await?,
        };
        loras.push(info);
    }
    loras.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json_ok(&loras))
}

/// A LoRA's `info.json`. Uploads and the service's own trainings write it with the file;
/// for a file that came into the store another way (a training Job of the operator), the
/// listing describes the file once and keeps that here, with the file's modification time
/// and size, so that the next listing neither downloads nor hashes it again and a file
/// replaced since is described anew.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLoraInfo {
    #[serde(flatten)]
    info: LoraInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    described_file: Option<DescribedFile>,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct DescribedFile {
    modified: String,
    size: u64,
}

impl DescribedFile {
    fn of(object: &object_store::ObjectMeta) -> Self {
        DescribedFile {
            modified: object.last_modified.to_rfc3339(),
            size: object.size,
        }
    }
}

impl StoredLoraInfo {
    /// Whether this still describes `object`: always for an info written with its file,
    /// otherwise while the file is the one described.
    fn describes(&self, object: &object_store::ObjectMeta) -> bool {
        self.described_file
            .as_ref()
            .is_none_or(|file| *file == DescribedFile::of(object))
    }
}

/// Describes a LoRA file that has no valid `info.json`, and keeps the description (a
/// failure to keep it only costs the next listing the same work).
async fn describe_lora_file(
    shared: &Shared,
    tenant: &str,
    name: &str,
    object: &object_store::ObjectMeta,
) -> Result<LoraInfo, ApiError> {
    let bytes = shared.store.get(&object.location, u64::MAX).await?;
    let info = LoraInfo {
        name: name.to_string(),
        size_bytes: object.size,
        sha256: hex_sha256(&bytes),
        created_at: object.last_modified.to_rfc3339(),
        source: LoraSource::Training,
    };
    let stored = StoredLoraInfo {
        info,
        described_file: Some(DescribedFile::of(object)),
    };
    if let Ok(json) = serde_json::to_vec(&stored) {
        if let Err(e) = shared
            .store
            .put(&info_path(tenant, name), Bytes::from(json))
            .await
        {
            tracing::warn!(%tenant, %name, error = %e, "cannot keep a LoRA's description");
        }
    }
    Ok(stored.info)
}

async fn post_lora(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
    if !request.shared.ready() {
        return Err(ApiError::unavailable("the model is loading"));
    }
    let content_type = request.content_type();
    let (name, bytes) = if content_type.starts_with("multipart/form-data") {
        let body = request.body().await?;
        let parts = media::parse_multipart(&content_type, body).await?;
        let name = parts
            .iter()
            .find(|p| p.name == "name")
            .map(|p| String::from_utf8_lossy(&p.data).trim().to_string())
            .ok_or_else(|| ApiError::invalid("name", "the form has no `name` field"))?;
        let file = parts
            .iter()
            .find(|p| p.name == "file")
            .ok_or_else(|| ApiError::invalid("file", "the form has no `file` part"))?;
        (name, file.data.clone())
    } else if content_type.is_empty() || content_type.starts_with("application/octet-stream") {
        let name = request
            .query_param("name")
            .ok_or_else(|| ApiError::invalid("name", "give ?name=<name> or a multipart form"))?;
        (name, request.body().await?)
    } else {
        return Err(ApiError::unsupported_media(
            "send the LoRA as application/octet-stream (?name=) or multipart/form-data",
        ));
    };
    check_name(&name).map_err(|e| ApiError::invalid("name", e))?;
    let shared = request.shared.clone();
    let path = lora_path(tenant, &name);
    if shared.store.head(&path).await.is_ok() {
        return Err(
            ApiError::conflict(format!("LoRA `{name}` exists; delete it first")).with_field("name"),
        );
    }
    // Parsed with the served model before it is stored: a file that is not a LoRA of this
    // model never reaches the store.
    let scratch = std::env::temp_dir().join(format!("imagegen-lora-{}.safetensors", random_id()));
    std::fs::write(&scratch, &bytes).map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared.jobs.control(super::jobs::Control::ValidateLora {
        file: scratch.clone(),
        reply: tx,
    })?;
    let verdict = rx.await;
    let _ = std::fs::remove_file(&scratch);
    match verdict {
        Ok(Ok(())) => {}
        Ok(Err(message)) => {
            return Err(ApiError::invalid(
                "file",
                format!("not a LoRA of the served model: {message}"),
            ))
        }
        Err(_) => return Err(ApiError::shutting_down()),
    }
    let info = LoraInfo {
        name: name.clone(),
        size_bytes: bytes.len() as u64,
        sha256: hex_sha256(&bytes),
        created_at: super::jobs::now_rfc3339(),
        source: LoraSource::Upload,
    };
    shared.store.put(&path, bytes).await?;
    shared
        .store
        .put(
            &info_path(tenant, &name),
            Bytes::from(serde_json::to_vec(&info).unwrap_or_default()),
        )
        .await?;
    Ok(json_with_status(&info, StatusCode::CREATED))
}

async fn delete_lora(shared: &Shared, tenant: &str, name: &str) -> Result<Response, ApiError> {
    check_name(name).map_err(|_| ApiError::not_found(format!("no LoRA `{name}`")))?;
    let path = lora_path(tenant, name);
    shared.store.head(&path).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("no LoRA `{name}`")),
        other => other.into(),
    })?;
    shared.store.delete(&path).await?;
    shared.store.delete(&info_path(tenant, name)).await?;
    let mut response = Response::new(Vec::new().into());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> super::super::config::Limits {
        Default::default()
    }

    #[test]
    fn limits_name_the_field() {
        let styles = imagegen_engine::styles::StyleBook::builtin();
        let check = |json: serde_json::Value| {
            let body: GenerationRequest = serde_json::from_value(json).unwrap();
            check_limits(&limits(), &styles, &[], &body)
                .err()
                .map(|e| e.detail.field)
        };
        assert_eq!(check(serde_json::json!({"prompt": "a"})), None);
        assert_eq!(
            check(serde_json::json!({"prompt": "a", "width": 12})),
            Some(Some("width".into()))
        );
        assert_eq!(
            check(serde_json::json!({"prompt": "a", "strength": 2.0})),
            Some(Some("strength".into()))
        );
    }

    #[test]
    fn own_image_urls_are_recognised() {
        assert_eq!(own_image_name("/v1/images/ab.png"), Some("ab.png"));
        assert_eq!(own_image_name("http://h:1/v1/images/ab"), Some("ab"));
        assert_eq!(own_image_name("http://h/other"), None);
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u32>().prop_map(serde_json::Value::from),
            (-1e9f64..1e9).prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("prompt".to_string()),
                        Just("steps".to_string()),
                        Just("width".to_string()),
                        Just("count".to_string()),
                        Just("loras".to_string()),
                        Just("image".to_string()),
                        Just("base64".to_string()),
                        Just("name".to_string()),
                        Just("weight".to_string()),
                        Just("jobId".to_string()),
                        Just("outpaint".to_string()),
                        "[a-zA-Z]{1,8}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes and arbitrary JSON: parsing and checking never panic.
        #[test]
        fn request_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                     value in json_value(),
                                     prompt in ".{0,50}",
                                     steps in any::<u32>(),
                                     width in any::<u32>(),
                                     count in any::<u32>(),
                                     guidance in -1e6f64..1e6) {
            let styles = imagegen_engine::styles::StyleBook::builtin();
            let _ = serde_json::from_slice::<GenerationRequest>(&bytes);
            if let Ok(body) = serde_json::from_value::<GenerationRequest>(value) {
                let _ = check_limits(&limits(), &styles, &[], &body);
            }
            let structured = serde_json::json!({
                "prompt": prompt, "steps": steps, "width": width, "height": width,
                "count": count, "guidanceScale": guidance,
            });
            let body: GenerationRequest = serde_json::from_value(structured).unwrap();
            let verdict = check_limits(&limits(), &styles, &[], &body);
            // What passes is within the engine's limits.
            if verdict.is_ok() {
                prop_assert!((1..=imagegen_crds::generation::MAX_STEPS).contains(&steps));
                prop_assert!((1..=imagegen_crds::generation::MAX_COUNT).contains(&count));
                prop_assert!(width % 8 == 0 && width <= imagegen_crds::generation::MAX_SIDE);
            }
        }
    }
}
