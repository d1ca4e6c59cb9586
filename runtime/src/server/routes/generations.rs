//! `POST /v1/generations`: validation against the limits, input images resolved from
//! uploads, store paths or base64, the job queued, and a synchronous wait when asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::DynamicImage;
use imagegen_crds::api::{
    self, codes, GenerationRequest, ImageInput, Job, JobEvent, JobState, ResponseFormat,
};
use object_store::path::Path as StorePath;
use tokio::sync::broadcast;
use warp::http::header;
use warp::reply::Response;

use crate::server::error::ApiError;
use crate::server::jobs::{error_detail, random_id, JobLora, Submission, Work};
use crate::server::limits::check_limits;
use crate::server::media::{self};
use crate::server::reply::{accepted, job_error, json_ok, Request};
use crate::server::Shared;
use crate::store::{check_name, check_store_path, Store, StoreError};
use crate::store::{hex_sha256, image_path, lora_path};
use imagegen_crds::api::lora_file;

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

pub async fn create(mut request: Request, tenant: String) -> Result<Response, ApiError> {
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

/// The served model's names: what the config gave, and its last path segment.
pub fn serves_model(shared: &Shared, name: &str) -> bool {
    let served = shared.config.model.trim_end_matches('/');
    let short = served.rsplit('/').next().unwrap_or(served);
    name == served || name == short
}

/// A digest of a request, which a re-submission of its job id must match; only a request
/// that names its job id is ever compared, so the others (which may carry megabytes of
/// base64) are not serialized and hashed for nothing.
pub(super) fn fingerprint<T: serde::Serialize>(body: &T, has_job_id: bool) -> String {
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
    if body.params.strategy == Some(imagegen_crds::Strategy::Canny)
        && shared.config.controlnet.is_none()
    {
        return Err(ApiError::invalid(
            "strategy",
            "canny needs a ControlNet, and this service has none (start it with --controlnet)",
        ));
    }
    if body.params.high_noise_fraction.is_some_and(|f| f < 1.0) && shared.config.refiner.is_none() {
        return Err(ApiError::invalid(
            "highNoiseFraction",
            "the refiner hand-off needs a refiner, and this service has none (start it with --refiner)",
        ));
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
pub(super) async fn input_bytes(
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
            if !crate::server::webhook::allowed(url, &shared.config.url_hosts) {
                return Err(ApiError::invalid(
                    field,
                    "the URL's host is not on the deployment's allow-list",
                ));
            }
            let url = url.clone();
            let bytes =
                tokio::task::spawn_blocking(move || crate::server::webhook::fetch(&url, limit))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_image_urls_are_recognised() {
        assert_eq!(own_image_name("/v1/images/ab.png"), Some("ab.png"));
        assert_eq!(own_image_name("http://h:1/v1/images/ab"), Some("ab"));
        assert_eq!(own_image_name("http://h/other"), None);
    }
}
