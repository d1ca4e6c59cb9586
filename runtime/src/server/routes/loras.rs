//! A tenant's LoRAs: listed with what they were trained from, uploaded (checked against
//! the served model), deleted.

use bytes::Bytes;
use imagegen_crds::api::{LoraInfo, LoraSource};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::server::error::ApiError;
use crate::server::jobs::random_id;
use crate::server::media::{self};
use crate::server::reply::{json_ok, json_with_status, Request};
use crate::server::Shared;
use crate::store::{check_name, Store, StoreError};
use crate::store::{hex_sha256, info_path, lora_path};
use imagegen_engine::lora::DIFFUSERS_LORA_FILE;

pub async fn list(shared: &Shared, tenant: &str) -> Result<Response, ApiError> {
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

pub async fn create(request: &mut Request, tenant: &str) -> Result<Response, ApiError> {
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
    shared
        .jobs
        .control(crate::server::jobs::Control::ValidateLora {
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
        created_at: crate::server::jobs::now_rfc3339(),
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

pub async fn delete(shared: &Shared, tenant: &str, name: &str) -> Result<Response, ApiError> {
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
