//! `imagegen train --store URL`: training whose photos, checkpoints and LoRA live in the
//! runtime's store (`file:///dir` or `s3://bucket/prefix`, through the same `object_store`
//! code as `imagegen serve`).
//!
//! With a store, relative `--images`, `--out` and `--resume` paths are store paths (from the
//! store root, e.g. `tenants/<tenant>/uploads/<id>`); absolute paths stay local files. Store
//! images are downloaded into a local staging folder first (a single object is one image; a
//! prefix is every object under it with an image extension). The trainer writes into a local
//! staging folder; each checkpoint folder is uploaded to `<out>/checkpoint-<step>/` as it is
//! written (its `state.json` last, so a half-uploaded checkpoint is never taken as complete),
//! and the final LoRA file (and the kohya file) to `<out>/`. `--resume latest` downloads the
//! store's newest complete checkpoint of `<out>` before training, so a restarted pod carries
//! on where the last one stopped. Class images stay in the staging folder (a restart makes
//! them again).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use object_store::path::Path as StorePath;

use imagegen_engine::lora::DIFFUSERS_LORA_FILE;
use imagegen_engine::train::data::is_image_extension;
use imagegen_engine::train::{checkpoint_step, TrainConfig, CHECKPOINT_STATE, RESUME_LATEST};

use super::{check_store_path, Store, StoreError};

/// Largest training photo downloaded from the store.
const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Largest checkpoint file downloaded from the store (rank-1024 LoRAs with their optimizer
/// moments are a few GB).
const MAX_CHECKPOINT_FILE_BYTES: u64 = 16 << 30;

#[derive(Debug, thiserror::Error)]
pub enum TrainStoreError {
    #[error("--{flag} `{path}`: {message}")]
    Path {
        flag: &'static str,
        path: String,
        message: String,
    },
    #[error("--store: {0}")]
    Open(String),
    #[error("store {url}: {path}: {source}")]
    Store {
        url: String,
        path: String,
        source: StoreError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, TrainStoreError>;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainStoreError + '_ {
    move |source| TrainStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The store path of a relative `path` (trailing slashes dropped), `None` for an absolute
/// (local) one; `..`, `.`, empty segments and non-UTF-8 names are refused.
pub fn store_path(flag: &'static str, path: &Path) -> Result<Option<String>> {
    if path.is_absolute() {
        return Ok(None);
    }
    let refuse = |message: String| TrainStoreError::Path {
        flag,
        path: path.display().to_string(),
        message,
    };
    let text = path
        .to_str()
        .ok_or_else(|| refuse("a store path must be UTF-8".into()))?;
    let trimmed = text.trim_end_matches('/');
    check_store_path(trimmed).map_err(|_| {
        refuse(
            "a store path must be relative to the store root, without `..`, `.` or empty segments"
                .into(),
        )
    })?;
    Ok(Some(trimmed.to_string()))
}

/// A training run's link to the store: where its output goes there, and the local staging
/// folder it is mirrored from. The staging folder is removed when this is dropped.
pub struct TrainStore {
    store: Store,
    runtime: tokio::runtime::Runtime,
    staging: PathBuf,
    /// `--out` as a store path; `None` when the output is a local folder.
    out: Option<String>,
    /// The local folder the trainer writes for `out`.
    local_out: PathBuf,
}

impl TrainStore {
    /// Opens the store and rewrites `config`'s store paths to local ones: downloads the
    /// images (and the checkpoint to resume from) and points `out` at a staging folder.
    pub fn prepare(url: &str, config: &mut TrainConfig) -> Result<TrainStore> {
        // Every path is checked before anything is created or downloaded.
        let out = store_path("out", &config.out)?;
        let image_paths = config
            .images
            .iter()
            .map(|input| store_path("images", input))
            .collect::<Result<Vec<_>>>()?;
        // `latest` is resolved against `--out` below, not fetched as a folder of its own.
        let resume_path = match config.resume.as_deref() {
            Some(resume) if resume != Path::new(RESUME_LATEST) => store_path("resume", resume)?,
            _ => None,
        };
        let store = Store::open(url).map_err(TrainStoreError::Open)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_error(Path::new("tokio runtime")))?;
        let staging = std::env::temp_dir().join(format!("imagegen-train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io_error(&staging))?;
        let mut this = TrainStore {
            store,
            runtime,
            staging: staging.clone(),
            out,
            local_out: config.out.clone(),
        };

        let mut images = Vec::with_capacity(config.images.len());
        for (index, (input, path)) in config.images.iter().zip(image_paths).enumerate() {
            match path {
                Some(path) => images.push(this.fetch_images(&path, index)?),
                None => images.push(input.clone()),
            }
        }
        config.images = images;

        if let Some(out) = this.out.clone() {
            // Named as in the store: the kohya file is named after the output folder.
            let name = out.rsplit('/').next().unwrap_or("out");
            this.local_out = staging.join("out").join(name);
            config.out = this.local_out.clone();
            if config.resume.as_deref() == Some(Path::new(RESUME_LATEST)) {
                config.resume = this.fetch_latest_checkpoint(&out)?;
                if config.resume.is_none() {
                    tracing::info!(out = %out, "no checkpoint in the store to resume from yet");
                }
            }
        }
        if let Some(path) = resume_path {
            let local = staging.join("resume");
            this.download_folder(&path, &local)?;
            config.resume = Some(local);
        }
        Ok(this)
    }

    /// The store path of `--out`, when it is in the store.
    pub fn out(&self) -> Option<&str> {
        self.out.as_deref()
    }

    fn store_error(&self, path: &str, source: StoreError) -> TrainStoreError {
        TrainStoreError::Store {
            url: self.store.url.clone(),
            path: path.to_string(),
            source,
        }
    }

    /// Downloads the images at `path` (one object, or the image objects under a prefix) into
    /// their own staging folder; returns the local file or folder to train on.
    fn fetch_images(&self, path: &str, index: usize) -> Result<PathBuf> {
        let dir = self.staging.join("images").join(index.to_string());
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let location = StorePath::from(path);
        match self.runtime.block_on(self.store.head(&location)) {
            Ok(meta) => {
                let file = dir.join(meta.location.filename().unwrap_or("image"));
                self.download(&meta.location, &file, MAX_IMAGE_BYTES)?;
                return Ok(file);
            }
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(self.store_error(path, e)),
        }
        let mut objects = self
            .runtime
            .block_on(self.store.list(&location))
            .map_err(|e| self.store_error(path, e))?;
        objects.retain(|meta| meta.location.extension().is_some_and(is_image_extension));
        if objects.is_empty() {
            return Err(TrainStoreError::Path {
                flag: "images",
                path: path.to_string(),
                message: format!(
                    "no image (png, jpg, jpeg or webp) is at this path in the store {}",
                    self.store.url
                ),
            });
        }
        // Numbered in the store's order, so that names from subfolders cannot collide.
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        for (n, meta) in objects.iter().enumerate() {
            let name = meta.location.filename().unwrap_or("image");
            self.download(
                &meta.location,
                &dir.join(format!("{n:05}-{name}")),
                MAX_IMAGE_BYTES,
            )?;
        }
        Ok(dir)
    }

    fn download(&self, location: &StorePath, file: &Path, max_bytes: u64) -> Result<()> {
        let bytes = self
            .runtime
            .block_on(self.store.get(location, max_bytes))
            .map_err(|e| self.store_error(location.as_ref(), e))?;
        std::fs::write(file, &bytes).map_err(io_error(file))
    }

    /// Every object under the store folder `path` into the local folder `local`.
    fn download_folder(&self, path: &str, local: &Path) -> Result<()> {
        let prefix = StorePath::from(path);
        let objects = self
            .runtime
            .block_on(self.store.list(&prefix))
            .map_err(|e| self.store_error(path, e))?;
        if objects.is_empty() {
            return Err(self.store_error(path, StoreError::NotFound));
        }
        for meta in objects {
            let relative: Vec<String> = meta
                .location
                .prefix_match(&prefix)
                .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
                .unwrap_or_default();
            if relative.is_empty() {
                continue;
            }
            let file = relative.iter().fold(local.to_path_buf(), |p, s| p.join(s));
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            self.download(&meta.location, &file, MAX_CHECKPOINT_FILE_BYTES)?;
        }
        Ok(())
    }

    /// Downloads `<out>/checkpoint-<step>/` with the highest step that has a state file into
    /// the staging output folder; `None` when the store has none.
    fn fetch_latest_checkpoint(&self, out: &str) -> Result<Option<PathBuf>> {
        let objects = self
            .runtime
            .block_on(self.store.list(&StorePath::from(out)))
            .map_err(|e| self.store_error(out, e))?;
        let prefix = format!("{out}/");
        let latest = objects
            .iter()
            .filter_map(|meta| {
                let rest = meta.location.as_ref().strip_prefix(&prefix)?;
                let (folder, file) = rest.split_once('/')?;
                let step = checkpoint_step(folder)?;
                (file == CHECKPOINT_STATE).then_some((step, folder.to_string()))
            })
            .max_by_key(|(step, _)| *step);
        let Some((step, folder)) = latest else {
            return Ok(None);
        };
        tracing::info!(step, "downloading the store's newest checkpoint");
        let local = self.local_out.join(&folder);
        self.download_folder(&format!("{out}/{folder}"), &local)?;
        Ok(Some(local))
    }

    fn upload(&self, file: &Path, path: &str) -> Result<()> {
        let bytes = std::fs::read(file).map_err(io_error(file))?;
        self.runtime
            .block_on(self.store.put(&StorePath::from(path), Bytes::from(bytes)))
            .map_err(|e| self.store_error(path, e))
    }

    /// Uploads the local checkpoint folder `dir` to `<out>/<its name>/` (the state file last)
    /// and returns that store path; `None` when the output is local.
    pub fn upload_checkpoint(&self, dir: &Path) -> Result<Option<String>> {
        let Some(out) = &self.out else {
            return Ok(None);
        };
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io_error(dir)(std::io::ErrorKind::InvalidInput.into()))?;
        let target = format!("{out}/{name}");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort_by_key(|p| (p.file_name() == Some(CHECKPOINT_STATE.as_ref()), p.clone()));
        for file in &files {
            let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            self.upload(file, &format!("{target}/{file_name}"))?;
        }
        Ok(Some(target))
    }

    /// Uploads the finished LoRA (and the kohya file) to `<out>/`; returns the LoRA's store
    /// path, `None` when the output is local.
    pub fn upload_output(&self, output: &Path, kohya: Option<&Path>) -> Result<Option<String>> {
        let Some(out) = &self.out else {
            return Ok(None);
        };
        if let Some(kohya) = kohya {
            let name = kohya
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("lora_kohya.safetensors");
            self.upload(kohya, &format!("{out}/{name}"))?;
        }
        let path = format!("{out}/{DIFFUSERS_LORA_FILE}");
        self.upload(output, &path)?;
        Ok(Some(path))
    }
}

impl Drop for TrainStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_relative_without_dot_dot() {
        assert_eq!(
            store_path("out", Path::new("tenants/t/loras/x/")).unwrap(),
            Some("tenants/t/loras/x".to_string())
        );
        assert_eq!(store_path("out", Path::new("/abs/out")).unwrap(), None);
        for bad in ["../x", "tenants/../../x", "./x", "a//b", ""] {
            let error = store_path("images", Path::new(bad))
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("--images"), "{error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }
}
