//! The engine's error type. Every message names what the user can act on: the file, the
//! tensor, the field.

use std::path::PathBuf;

use crate::schedulers::SchedulerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model `{0}` is neither a local folder nor a hub id (owner/name)")]
    ModelNotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: pickle checkpoints are never loaded (they can run code); convert the model to \
         safetensors (e.g. diffusers' `save_pretrained(..., safe_serialization=True)`)"
    )]
    PickleRefused { path: PathBuf },
    #[error("{dir}: no safetensors weights found for {component}")]
    NoWeights { dir: PathBuf, component: String },
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        file: String,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{file}: {message}")]
    Safetensors { file: String, message: String },
    #[error("{path}: unsupported model configuration: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error(
        "safety policy `{policy}` needs a safety checker and none is available: the model has \
         no safety_checker/ folder; name one (--safety-checker DIR|HUB_ID, e.g. \
         CompVis/stable-diffusion-safety-checker) or turn the check off (--safety off)"
    )]
    SafetyCheckerMissing { policy: String },
    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    StyleFile { path: PathBuf, message: String },
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("downloading `{repo}` from the hub: {message}")]
    Download { repo: String, message: String },
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("writing {path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field,
            message: message.into(),
        }
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e.to_string())
    }
}

/// Reads and parses a JSON file, with errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs libtorch work and turns a panic from tch (which panics on C++ exceptions in its
/// non-`f_` methods, e.g. out of memory) into an error instead of aborting the caller.
pub fn catch_torch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            // libtorch messages carry a long C++ backtrace: keep the first line.
            let first_line = message.lines().next().unwrap_or(message);
            Err(Error::Torch(first_line.to_string()))
        }
    }
}
