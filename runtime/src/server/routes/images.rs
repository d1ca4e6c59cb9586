//! Uploads, and the generated images: served by extension or `Accept`, deleted, and
//! fetched through URLs this service signed.

use bytes::Bytes;
use imagegen_crds::api::{self, codes, Upload};
use warp::http::{header, StatusCode};
use warp::reply::Response;

use crate::server::error::ApiError;
use crate::server::jobs::random_id;
use crate::server::media::{self, Format};
use crate::server::reply::{json_with_status, Request};
use crate::server::Shared;
use crate::store::image_path;
use crate::store::{check_name, Store, StoreError};

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

pub async fn upload(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
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

pub async fn get(request: &Request, tenant: &str, name: &str) -> Result<Response, ApiError> {
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

pub async fn delete(shared: &Shared, tenant: &str, name: &str) -> Result<Response, ApiError> {
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

/// The tenant of a URL this service signed for image `name` (the OpenAI endpoints hand such
/// URLs out); `None` when the request carries no signature, an error when it is invalid or
/// expired.
pub fn signed_url_tenant(request: &Request, name: &str) -> Result<Option<String>, ApiError> {
    let Some(given) = request.query_param("signature") else {
        return Ok(None);
    };
    let id = name.split('.').next().unwrap_or(name);
    crate::server::webhook::verify_image_query(
        &request.shared.config.url_signing_key,
        id,
        &request.query_param("tenant").unwrap_or_default(),
        &request.query_param("expires").unwrap_or_default(),
        &given,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .map(Some)
    .ok_or_else(|| ApiError::unauthorized("the image URL's signature is invalid or expired"))
}
