//! OpenAI-compatible image endpoints: `POST /v1/images/generations` and
//! `POST /v1/images/edits`, answering `{created, data:[{b64_json|url}]}` and errors as
//! `{"error":{"message","type","param","code"}}`, so that OpenAI's SDKs work unchanged.

use std::sync::Arc;

use image::{DynamicImage, GrayImage, Luma};
use imagegen_crds::api::{GenerationRequest, Job, JobState, ResponseFormat};
use imagegen_crds::{GenerationParams, Mode};
use serde::Deserialize;
use warp::http::{header, StatusCode};
use warp::reply::Response;

use super::generations::{submit, wait_for};
use crate::server::error::{json_response, ApiError};
use crate::server::media::{self, Format};
use crate::server::reply::{job_error, json_ok, Request};
use crate::server::Shared;

/// Model names OpenAI clients send by default; they all mean the served model.
const OPENAI_MODELS: [&str; 4] = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini"];

#[derive(Debug, Deserialize)]
struct GenerationBody {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    /// png (default), jpeg or webp.
    #[serde(default)]
    output_format: Option<String>,
    /// Accepted (OpenAI's end-user id); not used.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// OpenAI's error shape.
pub fn error_response(error: ApiError) -> Response {
    let kind = match error.status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({
        "error": {
            "message": error.detail.message,
            "type": kind,
            "param": error.detail.field,
            "code": error.detail.code,
        }
    });
    json_response(
        error.status,
        serde_json::to_vec(&body).unwrap_or_default(),
        error.retry_after,
    )
}

/// `WxH` → (W, H); `auto` or nothing → the model's default.
fn parse_size(size: Option<&str>) -> Result<(Option<u32>, Option<u32>), ApiError> {
    match size {
        None | Some("auto") => Ok((None, None)),
        Some(text) => {
            let parsed = text
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
            match parsed {
                Some((w, h)) => Ok((Some(w), Some(h))),
                None => Err(ApiError::invalid(
                    "size",
                    format!("`{text}` is not WIDTHxHEIGHT"),
                )),
            }
        }
    }
}

fn b64_wanted(format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        None | Some("url") => Ok(false),
        Some("b64_json") => Ok(true),
        Some(other) => Err(ApiError::invalid(
            "response_format",
            format!("`{other}` is not url or b64_json"),
        )),
    }
}

fn output_format(format: Option<&str>) -> Result<Format, ApiError> {
    match format {
        None => Ok(Format::Png),
        Some(text) => Format::from_extension(text).ok_or_else(|| {
            ApiError::invalid(
                "output_format",
                format!("`{text}` is not png, jpeg or webp"),
            )
        }),
    }
}

fn model_field(model: Option<String>) -> Option<String> {
    model.filter(|m| !OPENAI_MODELS.contains(&m.as_str()))
}

/// `http(s)://host` of the request, for absolute image URLs.
fn base_url(request: &Request) -> String {
    let host = request.header(header::HOST).unwrap_or("localhost");
    let scheme = request
        .header(header::HeaderName::from_static("x-forwarded-proto"))
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

async fn answer(
    shared: &Shared,
    tenant: &str,
    job: &Job,
    b64: bool,
    format: Format,
    base: &str,
) -> Result<Response, ApiError> {
    if job.state != JobState::Succeeded {
        // OpenAI's error answers carry no Retry-After.
        let mut error = job_error(job);
        error.retry_after = None;
        return Err(error);
    }
    let created = time::OffsetDateTime::now_utc().unix_timestamp();
    // OpenAI's URLs open without credentials: ours are signed until the result expires.
    let expires = created + shared.config.result_ttl_seconds as i64;
    let mut data = Vec::new();
    for image in job.result.iter().flat_map(|r| r.images.iter()) {
        match (&image.b64_json, b64) {
            (Some(png), true) if format == Format::Png => {
                data.push(serde_json::json!({ "b64_json": png }));
            }
            (Some(png), true) => {
                let png = png.clone();
                let credentials = shared.credentials.clone();
                let converted = tokio::task::spawn_blocking(move || {
                    let bytes = media::decode_base64(&png, "b64_json", u64::MAX)
                        .map_err(|e| e.detail.message)?;
                    media::convert(&bytes, format, credentials.as_deref())
                        .map(|b| media::base64_encode(&b))
                })
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(ApiError::internal)?;
                data.push(serde_json::json!({ "b64_json": converted }));
            }
            _ => {
                let query = crate::server::webhook::signed_image_query(
                    &shared.config.url_signing_key,
                    tenant,
                    &image.id,
                    expires,
                );
                let url = format!(
                    "{base}/v1/images/{}.{}?{query}",
                    image.id,
                    format.extension()
                );
                data.push(serde_json::json!({ "url": url }));
            }
        }
    }
    Ok(json_ok(
        &serde_json::json!({ "created": created, "data": data }),
    ))
}

async fn run(
    shared: &Arc<Shared>,
    tenant: &str,
    body: GenerationRequest,
    decoded: Option<(DynamicImage, Option<GrayImage>)>,
    b64: bool,
    format: Format,
    base: &str,
) -> Result<Response, ApiError> {
    let (job, rx, new) = submit(shared, tenant, body, decoded).await?;
    let job = wait_for(shared, tenant, job, rx, new).await?;
    answer(shared, tenant, &job, b64, format, base).await
}

pub async fn generations(mut request: Request, tenant: String) -> Result<Response, ApiError> {
    let body: GenerationBody = request.json().await?;
    let (width, height) = parse_size(body.size.as_deref())?;
    let b64 = b64_wanted(body.response_format.as_deref())?;
    let format = output_format(body.output_format.as_deref())?;
    let generation = GenerationRequest {
        params: GenerationParams {
            prompt: body.prompt,
            width,
            height,
            count: body.n,
            ..Default::default()
        },
        model: model_field(body.model),
        response_format: Some(if b64 {
            ResponseFormat::B64Json
        } else {
            ResponseFormat::Url
        }),
        ..Default::default()
    };
    let base = base_url(&request);
    run(
        &request.shared,
        &tenant,
        generation,
        None,
        b64,
        format,
        &base,
    )
    .await
}

/// The inpainting mask of an OpenAI edit: where the mask (or, without one, the image
/// itself) is fully transparent is what to repaint (white), the rest is kept (black).
pub fn mask_from_alpha(image: &DynamicImage) -> Option<GrayImage> {
    if !image.color().has_alpha() {
        return None;
    }
    let rgba = image.to_rgba8();
    let mask = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        Luma([if rgba.get_pixel(x, y)[3] == 0 { 255 } else { 0 }])
    });
    Some(mask)
}

pub async fn edits(mut request: Request, tenant: String) -> Result<Response, ApiError> {
    let content_type = request.content_type();
    if !content_type.starts_with("multipart/form-data") {
        return Err(ApiError::unsupported_media(
            "send the edit as multipart/form-data",
        ));
    }
    let body = request.body().await?;
    let parts = media::parse_multipart(&content_type, body).await?;
    let text = |name: &str| {
        parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| String::from_utf8_lossy(&p.data).trim().to_string())
    };
    let prompt = text("prompt").ok_or_else(|| ApiError::invalid("prompt", "missing"))?;
    let n = text("n")
        .map(|n| n.parse::<u32>())
        .transpose()
        .map_err(|_| ApiError::invalid("n", "not a number"))?;
    let (width, height) = parse_size(text("size").as_deref())?;
    let b64 = b64_wanted(text("response_format").as_deref())?;
    let format = output_format(text("output_format").as_deref())?;
    let image_part = parts
        .iter()
        .find(|p| p.name == "image" || p.name == "image[]")
        .ok_or_else(|| ApiError::invalid("image", "missing"))?
        .data
        .clone();
    let mask_part = parts
        .iter()
        .find(|p| p.name == "mask")
        .map(|p| p.data.clone());
    let limits = request.shared.config.limits.image_limits();
    let (image, mask) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let image = media::decode(&image_part, "image", &limits)?;
        let mask = match mask_part {
            Some(bytes) => {
                let mask = media::decode(&bytes, "mask", &limits)?;
                mask_from_alpha(&mask).ok_or_else(|| {
                    ApiError::invalid("mask", "the mask must be an image with an alpha channel")
                })?
            }
            None => mask_from_alpha(&image).ok_or_else(|| {
                ApiError::invalid(
                    "mask",
                    "without a mask the image must have transparent pixels to edit",
                )
            })?,
        };
        Ok((DynamicImage::ImageRgb8(image.to_rgb8()), mask))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    if mask.pixels().all(|p| p[0] == 0) {
        return Err(ApiError::invalid(
            "mask",
            "the mask has no fully transparent pixels: nothing to edit",
        ));
    }
    let generation = GenerationRequest {
        params: GenerationParams {
            prompt,
            width,
            height,
            count: n,
            mode: Some(Mode::Inpaint),
            ..Default::default()
        },
        model: model_field(text("model")),
        response_format: Some(if b64 {
            ResponseFormat::B64Json
        } else {
            ResponseFormat::Url
        }),
        ..Default::default()
    };
    let base = base_url(&request);
    run(
        &request.shared,
        &tenant,
        generation,
        Some((image, Some(mask))),
        b64,
        format,
        &base,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_formats_parse() {
        assert_eq!(parse_size(Some("64x32")).unwrap(), (Some(64), Some(32)));
        assert_eq!(parse_size(None).unwrap(), (None, None));
        assert!(parse_size(Some("big")).is_err());
        assert!(b64_wanted(Some("b64_json")).unwrap());
        assert!(b64_wanted(Some("png")).is_err());
        assert_eq!(output_format(Some("webp")).unwrap(), Format::Webp);
        assert!(output_format(Some("gif")).is_err());
        assert_eq!(model_field(Some("dall-e-3".into())), None);
        assert_eq!(model_field(Some("alice".into())).as_deref(), Some("alice"));
    }

    #[test]
    fn transparent_pixels_are_the_edit() {
        let mut rgba = image::RgbaImage::from_pixel(4, 2, image::Rgba([9, 9, 9, 255]));
        rgba.put_pixel(1, 1, image::Rgba([0, 0, 0, 0]));
        let mask = mask_from_alpha(&DynamicImage::ImageRgba8(rgba)).unwrap();
        assert_eq!(mask.get_pixel(1, 1)[0], 255);
        assert_eq!(mask.get_pixel(0, 0)[0], 0);
        assert!(mask_from_alpha(&DynamicImage::ImageRgb8(image::RgbImage::new(2, 2))).is_none());
    }

    #[test]
    fn errors_have_openai_shape() {
        let response = error_response(ApiError::invalid("size", "bad"));
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
