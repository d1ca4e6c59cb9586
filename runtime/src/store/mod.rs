//! Images, uploads and LoRAs through `object_store`: a local folder (`file:///dir`) or an
//! S3-compatible bucket (`s3://bucket/prefix`, credentials from the `AWS_*` variables).
//! Every path a request names is relative to its tenant's root, `tenants/<tenant>/`.

pub mod training;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStore, PutPayload};

use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The folder of a `file://` store: LoRA files are read from it in place.
    local_root: Option<PathBuf>,
    /// Where LoRAs of a remote store are downloaded for the engine.
    cache_dir: PathBuf,
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("store: {0}")]
    Other(String),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound,
            other => StoreError::Other(other.to_string()),
        }
    }
}

pub use imagegen_crds::api::{check_name, check_store_path};

/// The S3 client of `bucket`, configured by `builder` (the `AWS_*` environment). An endpoint
/// that is not a URL (a stray word or line in `AWS_ENDPOINT`) passes object_store's build
/// but panics on the first request, so it is refused here.
fn s3_store(
    builder: object_store::aws::AmazonS3Builder,
    bucket: &str,
) -> Result<object_store::aws::AmazonS3, String> {
    use object_store::aws::AmazonS3ConfigKey;
    if let Some(endpoint) = builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        let uri: Result<warp::http::Uri, _> = endpoint.parse();
        let usable = uri.is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        if !usable {
            return Err(format!(
                "the endpoint {endpoint:?} (AWS_ENDPOINT) is not an http(s) URL"
            ));
        }
    }
    builder
        .with_bucket_name(bucket)
        .build()
        .map_err(|e| e.to_string())
}

impl Store {
    pub fn open(url: &str) -> Result<Store, String> {
        let cache_dir = std::env::temp_dir().join(format!("imagegen-serve-{}", std::process::id()));
        if let Some(dir) = url.strip_prefix("file://") {
            let root = PathBuf::from(dir);
            if !root.is_absolute() {
                return Err(format!(
                    "store `{url}`: a file:// store needs an absolute path"
                ));
            }
            std::fs::create_dir_all(&root).map_err(|e| format!("store {}: {e}", root.display()))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
                .map_err(|e| format!("store {url}: {e}"))?;
            return Ok(Store {
                inner: Arc::new(fs),
                local_root: Some(root),
                cache_dir,
                url: url.to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("store `{url}`: no bucket"));
            }
            let s3 = s3_store(object_store::aws::AmazonS3Builder::from_env(), bucket)
                .map_err(|e| format!("store {url}: {e}"))?;
            let inner: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            };
            return Ok(Store {
                inner,
                local_root: None,
                cache_dir,
                url: url.to_string(),
            });
        }
        Err(format!(
            "store `{url}` is neither file:///dir nor s3://bucket/prefix"
        ))
    }

    /// `tenants/<tenant>/<relative>`; `relative` must pass [`check_store_path`].
    pub fn tenant_path(tenant: &str, relative: &str) -> StorePath {
        StorePath::from(format!(
            "{}/{relative}",
            imagegen_crds::api::tenant_root(tenant)
        ))
    }

    pub async fn put(&self, path: &StorePath, bytes: Bytes) -> Result<(), StoreError> {
        self.inner.put(path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Reads an object, refusing (before reading) one larger than `max_bytes`.
    pub async fn get(&self, path: &StorePath, max_bytes: u64) -> Result<Bytes, StoreError> {
        let result = self.inner.get(path).await?;
        if result.meta.size > max_bytes {
            return Err(StoreError::Other(format!(
                "{path} is larger than {max_bytes} bytes"
            )));
        }
        Ok(result.bytes().await?)
    }

    pub async fn head(&self, path: &StorePath) -> Result<ObjectMeta, StoreError> {
        Ok(self.inner.head(path).await?)
    }

    pub async fn delete(&self, path: &StorePath) -> Result<(), StoreError> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list(&self, prefix: &StorePath) -> Result<Vec<ObjectMeta>, StoreError> {
        Ok(self.inner.list(Some(prefix)).try_collect().await?)
    }

    /// A local file holding the object, for the engine (which reads LoRAs from files): the
    /// file itself in a `file://` store, else a download cached by the object's e-tag.
    pub async fn local_file(&self, path: &StorePath) -> Result<PathBuf, StoreError> {
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            return if file.is_file() {
                Ok(file)
            } else {
                Err(StoreError::NotFound)
            };
        }
        let meta = self.head(path).await?;
        let tag = meta
            .e_tag
            .clone()
            .unwrap_or_else(|| meta.last_modified.timestamp().to_string());
        let safe_tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let file = self
            .cache_dir
            .join(path.as_ref())
            .with_extension(format!("{safe_tag}.safetensors"));
        if !file.is_file() {
            let bytes = self.inner.get(path).await?.bytes().await?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Other(e.to_string()))?;
            }
            let partial = file.with_extension("partial");
            std::fs::write(&partial, &bytes).map_err(|e| StoreError::Other(e.to_string()))?;
            std::fs::rename(&partial, &file).map_err(|e| StoreError::Other(e.to_string()))?;
        }
        Ok(file)
    }
}

/// The store path of a tenant's LoRA by name.
pub fn lora_path(tenant: &str, name: &str) -> StorePath {
    Store::tenant_path(tenant, &imagegen_crds::api::lora_file(name))
}

/// The store path of the description of a tenant's LoRA.
pub fn info_path(tenant: &str, name: &str) -> StorePath {
    Store::tenant_path(
        tenant,
        &format!("{}/info.json", imagegen_crds::api::lora_folder(name)),
    )
}

/// The store path of a generated image (always kept as PNG).
pub fn image_path(tenant: &str, id: &str) -> StorePath {
    Store::tenant_path(tenant, &format!("images/{id}.png"))
}

/// The lowercase hex SHA-256 of `bytes`: what results and LoRA listings report of a file.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside_the_tenant() {
        assert!(check_store_path("photos/a.png").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../b/x",
            "a/../../x",
            "a//b",
            "./a",
            "s3://x/y",
            "a\\b",
        ] {
            assert!(check_store_path(bad).is_err(), "{bad}");
        }
        assert!(check_name("alice-v2.1").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", ".."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stores_open_by_url() {
        assert!(Store::open("file://relative/dir").is_err());
        assert!(Store::open("ftp://x").is_err());
        let with_endpoint = |e: &str| {
            s3_store(
                object_store::aws::AmazonS3Builder::new()
                    .with_region("us-east-1")
                    .with_endpoint(e),
                "b",
            )
        };
        assert!(with_endpoint("http://127.0.0.1:9000").is_ok());
        assert!(with_endpoint("https://s3.example.com").is_ok());
        for bad in [
            "Starting a server\nhttp://127.0.0.1:9000",
            "127.0.0.1:9000",
            "ftp://x",
        ] {
            let err = with_endpoint(bad).unwrap_err();
            assert!(err.contains("AWS_ENDPOINT"), "{bad}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("imagegen-store-{}", std::process::id()));
        let store = Store::open(&format!("file://{}", dir.display())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let path = Store::tenant_path("a", "uploads/x");
            store.put(&path, Bytes::from_static(b"hi")).await.unwrap();
            assert_eq!(store.get(&path, 10).await.unwrap().as_ref(), b"hi");
            assert!(store.get(&path, 1).await.is_err());
            assert!(matches!(
                store.get(&Store::tenant_path("b", "uploads/x"), 10).await,
                Err(StoreError::NotFound)
            ));
            assert!(store.local_file(&path).await.unwrap().is_file());
            store.delete(&path).await.unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
