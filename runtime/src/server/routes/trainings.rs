//! `POST /v1/trainings`: a DreamBooth LoRA training on a tenant's uploads, queued for the
//! trainer.

use std::time::{Duration, Instant};

use warp::reply::Response;

use super::generations::{fingerprint, input_bytes};
use crate::server::error::ApiError;
use crate::server::jobs::{random_id, Submission};
use crate::server::limits::{check_job_id, check_webhook_url};
use crate::server::media::{self};
use crate::server::reply::{accepted, Request};
use crate::store::check_name;
use crate::store::lora_path;

pub async fn create(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
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
    let work = crate::server::trainer::TrainingWork {
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
