//! The bodies of the runtime's HTTP API (`imagegen serve`), shared with the operator that
//! calls it and with the trainer whose progress it reports. JSON is camelCase; every type has
//! a schemars schema, from which the service's OpenAPI document is built.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ImageRef, Progress, MAX_LOCATION_CHARS, MAX_NAME_CHARS};
use crate::generation::{GenerationParams, MAX_PROMPT_CHARS};
use crate::image_generation::MAX_LORAS;
use crate::training::{TrainingParams, MAX_TRAINING_IMAGES};

/// Longest client-chosen job id.
pub const MAX_JOB_ID_CHARS: usize = 64;

/// Whether `id` is a job id: `[a-z0-9-]{1,64}` (what clients may choose, and what the runtime
/// makes up: 32 hex digits).
pub fn is_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_JOB_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The environment variable holding the bearer token `imagegen train --progress-url` sends
/// (the operator fills it from the training's own Secret).
pub const PROGRESS_TOKEN_ENV: &str = "IMAGEGEN_PROGRESS_TOKEN";

/// A tenant's folder in the store, under which every store path of its requests lies (the
/// runtime's layout; in a cluster the tenant is the namespace).
pub fn tenant_root(tenant: &str) -> String {
    format!("tenants/{tenant}")
}

/// Checks a store path as requests and resources give it (relative to the tenant's root):
/// 1 to 1024 characters, not absolute, not a URL, no backslash, and no empty, blank, `.`
/// or `..` segment or control character, so that it can never leave the tenant's folder.
/// The runtime enforces it on every request; the operator on every resource it reads.
pub fn check_store_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1024 {
        return Err("a store path must have 1 to 1024 characters".into());
    }
    if path.starts_with('/') || path.contains('\\') || path.contains("://") {
        return Err(format!("`{path}` must be relative to the tenant's root"));
    }
    for segment in path.split('/') {
        if segment.trim().is_empty() || segment == "." || segment == ".." {
            return Err(format!("`{path}` has an empty, `.` or `..` segment"));
        }
        if segment.chars().any(|c| c.is_control()) {
            return Err(format!("`{path}` has control characters"));
        }
    }
    Ok(())
}

/// Names of uploads, images and LoRAs: 1 to 128 of `[A-Za-z0-9._-]`, not starting with a
/// dot, so that a name is one path segment. The runtime enforces it on every request; the
/// operator on every upload id a resource gives.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1-128 characters of A-Z, a-z, 0-9, ., _ and - (not starting with .)"
        ))
    }
}

/// The file of a LoRA in diffusers' layout, which training writes and the runtime reads.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The folder of the tenant's LoRA `name`, relative to the tenant's root.
pub fn lora_folder(name: &str) -> String {
    format!("loras/{name}")
}

/// The file of the tenant's LoRA `name`, relative to the tenant's root: what a finished
/// training reports and a generation passes as a LoRA's path.
pub fn lora_file(name: &str) -> String {
    format!("{}/{LORA_FILE}", lora_folder(name))
}

/// The file of the upload `id`, relative to the tenant's root.
pub fn upload_file(id: &str) -> String {
    format!("uploads/{id}")
}

/// An input image: exactly one of a store path (relative to the tenant's root), an upload
/// id, a URL (fetched only from the configured store or an allow-listed host), or the
/// image's bytes in base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ImageInput {
    Path(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
    UploadId(#[schemars(length(min = 1, max = MAX_NAME_CHARS))] String),
    Url(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
    /// PNG, JPEG or WebP bytes, standard base64 (a `data:` URL prefix is accepted).
    Base64(String),
}

impl From<ImageRef> for ImageInput {
    fn from(image: ImageRef) -> Self {
        match image {
            ImageRef::Path(path) => ImageInput::Path(path),
            ImageRef::UploadId(id) => ImageInput::UploadId(id),
            ImageRef::Url(url) => ImageInput::Url(url),
        }
    }
}

/// A LoRA applied to a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraInput {
    /// A LoRA of the tenant, as `GET /v1/loras` lists them.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub name: String,
    /// Scale of the LoRA's update. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -4.0, max = 4.0))]
    pub weight: Option<f64>,
    /// Load this store path (relative to the tenant's root) instead of looking the name up:
    /// how the operator passes a LoraTraining's artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LOCATION_CHARS))]
    pub path: Option<String>,
}

/// How images come back in a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ResponseFormat {
    /// A URL of `GET /v1/images/{id}` per image.
    #[default]
    Url,
    /// The URL and the PNG's bytes in base64 (`b64Json`).
    B64Json,
}

/// The body of `POST /v1/generations`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationRequest {
    /// What to generate.
    #[serde(flatten)]
    pub params: GenerationParams,
    /// A model the service serves, or a LoRA of the tenant; default: the served model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub model: Option<String>,
    /// LoRAs to apply, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_LORAS))]
    pub loras: Vec<LoraInput>,
    /// Input image of ImageToImage, Inpaint, Outpaint and RemoveObject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
    /// Inpainting mask (white = repaint, black = keep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<ImageInput>,
    /// Inpainting without a mask image: what to repaint, found by a text-prompted segmenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PROMPT_CHARS))]
    pub mask_prompt: Option<String>,
    /// A client-chosen job id (`[a-z0-9-]`, at most 64): submitting the same id again
    /// returns the existing job instead of starting a second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub job_id: Option<String>,
    /// Called with the finished job (POST, signed with HMAC-SHA256); its host must be on
    /// the deployment's allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_LOCATION_CHARS))]
    pub webhook_url: Option<String>,
    /// Fail the job when it has not finished this many seconds after submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub deadline_seconds: Option<u32>,
    /// Images as URLs (default) or also inline in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// The body of `POST /v1/trainings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingRequest {
    /// Name of the LoRA the training produces (it appears in `GET /v1/loras`).
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub name: String,
    /// Photos of the subject.
    #[schemars(length(min = 1, max = MAX_TRAINING_IMAGES))]
    pub images: Vec<ImageInput>,
    /// The hyper-parameters.
    #[serde(flatten)]
    pub params: TrainingParams,
    /// A client-chosen job id, as in [`GenerationRequest::job_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub job_id: Option<String>,
    /// Called with the finished job, as in [`GenerationRequest::webhook_url`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// Where a job of the HTTP service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Succeeded, Failed or Cancelled: nothing more will happen.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Generation,
    Training,
}

/// A job of the HTTP service: what `GET /v1/jobs/{id}` returns, and the body of a
/// generation's response (finished when synchronous, as accepted when asynchronous).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    /// Jobs ahead of this one in the queue (0 = next), while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Denoising steps over all images, or training steps.
    pub progress: Progress,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// A generation's images, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<GenerationResult>,
    /// A training's LoRA, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingResult>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// What `GET /v1/load` answers: how busy a runtime is, cheap enough to ask before every
/// submission (it reads the job tables and cached figures; it never waits for the device).
/// LoRAs and job ids are the caller's tenant's only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeLoad {
    /// Generation jobs waiting in the queue, every tenant's.
    pub queued: u32,
    /// Most generation jobs the queue holds (a full queue answers 429).
    pub queue_capacity: u32,
    /// Generation jobs running now (a batch runs several), every tenant's.
    pub running: u32,
    /// The running generation jobs of the caller's tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running_jobs: Vec<RunningJob>,
    /// The caller's LoRAs loaded on the device, as store paths relative to the tenant's root
    /// (what a request's `loras[].path` names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded_loras: Vec<String>,
    /// The caller's LoRAs that queued jobs will load, as store paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued_loras: Vec<String>,
    /// Recent seconds a job takes from its start to its end (a moving average; 1 before the
    /// first): with `queued`, how long a new job would wait here.
    #[serde(default)]
    pub seconds_per_job: f64,
    /// Trainings (`POST /v1/trainings`) running and waiting for the device.
    pub trainings: TrainingLoad,
    /// The device the model runs on: `cpu`, `cuda:0`, `mps`.
    pub device: String,
    /// The GPU's memory as of the end of the last job; absent on a CPU or before any job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_memory: Option<DeviceMemory>,
}

/// A running job of `GET /v1/load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunningJob {
    pub id: String,
    pub progress: Progress,
}

/// Trainings of `GET /v1/load`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingLoad {
    /// A training holds the device now (generations wait for it).
    pub running: bool,
    /// Trainings waiting for the device.
    pub queued: u32,
}

/// A GPU's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMemory {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// The images of a finished generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationResult {
    pub images: Vec<ImageResult>,
    /// Images the safety policy withheld (policy `block`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withheld: Vec<WithheldImage>,
    #[serde(default)]
    pub timings: JobTimings,
}

/// One generated image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageResult {
    /// Its id in `GET /v1/images/{id}`.
    pub id: String,
    /// Where to download it.
    pub url: String,
    /// The seed that regenerates exactly this image.
    pub seed: u64,
    /// SHA-256 of the PNG, in hex.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// The PNG in base64, when the request asked for `b64Json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
}

/// An image that was generated but not returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WithheldImage {
    /// Its position in the request's images.
    pub index: u32,
    pub seed: u64,
    pub reason: String,
}

/// Wall-clock times of a job, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTimings {
    /// Waiting in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_seconds: Option<f64>,
    /// Running on the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_seconds: Option<f64>,
    /// From submission to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_seconds: Option<f64>,
}

/// The LoRA a finished training made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingResult {
    /// Its name in `GET /v1/loras`.
    pub lora: String,
    /// Its store path, relative to the tenant's root.
    pub path: String,
    /// SHA-256 of the safetensors file, in hex.
    pub sha256: String,
    pub steps: u32,
    /// Loss at the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

/// A Server-Sent Event of `GET /v1/jobs/{id}/events`: the SSE `event:` field is the type,
/// `data:` this object as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum JobEvent {
    /// Waiting; `position` jobs are ahead.
    Queued {
        position: u32,
    },
    /// A step done.
    Progress {
        step: u32,
        total: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f64>,
    },
    Succeeded {
        job: Box<Job>,
    },
    Failed {
        error: ErrorDetail,
    },
    Cancelled {},
}

impl JobEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Queued { .. } => "queued",
            JobEvent::Progress { .. } => "progress",
            JobEvent::Succeeded { .. } => "succeeded",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Cancelled {} => "cancelled",
        }
    }

    /// Whether this event ends the job (no event follows it).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobEvent::Succeeded { .. } | JobEvent::Failed { .. } | JobEvent::Cancelled {}
        )
    }
}

/// Every error response of the HTTP service (but the OpenAI-compatible endpoints, which
/// answer in OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// One of [`codes`].
    pub code: String,
    /// For people.
    pub message: String,
    /// The request field at fault, in the request's spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Whether the same request may succeed when sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

/// The error codes.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INVALID_FIELD: &str = "invalid_field";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const CONFLICT: &str = "conflict";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    pub const QUEUE_FULL: &str = "queue_full";
    pub const CANCELLED: &str = "cancelled";
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const INTERNAL: &str = "internal";
}

/// The answer to `POST /v1/uploads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upload {
    /// What requests pass as `{"uploadId": ...}`.
    pub id: String,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub size_bytes: u64,
}

/// Where a LoRA of `GET /v1/loras` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoraSource {
    Upload,
    Training,
}

/// One LoRA of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraInfo {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// RFC 3339.
    pub created_at: String,
    pub source: LoraSource,
}

/// One line of `imagegen train`'s standard output (JSON lines), also POSTed to
/// `--progress-url`. Field names are single words, as the trainer prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum TrainerEvent {
    Started {
        total: u32,
        seed: u64,
    },
    Step {
        step: u32,
        total: u32,
        loss: f64,
        lr: f64,
        /// Seconds since training started.
        elapsed: f64,
        /// Seconds left, estimated.
        eta: f64,
    },
    Checkpoint {
        step: u32,
        /// The checkpoint folder: a store path when `--out` is in the store (`--store`).
        path: String,
    },
    Done {
        step: u32,
        total: u32,
        /// The LoRA file written: with `--store` and a relative `--out`, its store path
        /// (`<out>/pytorch_lora_weights.safetensors`, uploaded before this event), else the
        /// local file.
        output: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f64>,
    },
    Failed {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn generation_request_has_the_params_inline() {
        let value = json!({
            "prompt": "a cat",
            "steps": 20,
            "model": "sd15",
            "loras": [{"name": "alice", "weight": 0.7}, {"name": "x", "path": "loras/x/p.safetensors"}],
            "image": {"base64": "AAAA"},
            "mask": {"uploadId": "u1"},
            "jobId": "ig-1234",
            "responseFormat": "b64Json"
        });
        let request: GenerationRequest = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(request.params.prompt, "a cat");
        assert_eq!(request.params.steps, Some(20));
        assert_eq!(
            request.loras[1].path.as_deref(),
            Some("loras/x/p.safetensors")
        );
        assert_eq!(request.image, Some(ImageInput::Base64("AAAA".into())));
        assert_eq!(request.response_format, Some(ResponseFormat::B64Json));
        assert_eq!(serde_json::to_value(&request).unwrap(), value);
    }

    #[test]
    fn unknown_fields_are_refused_at_both_levels() {
        for bad in [
            json!({"prompt": "x", "stepz": 3}),
            json!({"prompt": "x", "loras": [{"name": "a", "wieght": 1}]}),
            json!({"prompt": "x", "image": {"bytes": "AAAA"}}),
        ] {
            assert!(
                serde_json::from_value::<GenerationRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn image_refs_become_inputs() {
        assert_eq!(
            ImageInput::from(ImageRef::UploadId("u".into())),
            ImageInput::UploadId("u".into())
        );
        assert_eq!(
            serde_json::to_value(ImageInput::from(ImageRef::Path("a/b.png".into()))).unwrap(),
            json!({"path": "a/b.png"})
        );
    }

    #[test]
    fn training_request_flattens_the_params() {
        let value = json!({
            "name": "alice",
            "images": [{"uploadId": "u1"}, {"path": "photos/2.jpg"}],
            "instancePrompt": "a photo of sks person",
            "steps": 400,
            "rank": 8,
            "jobId": "t-1"
        });
        let request: TrainingRequest = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(request.params.instance_prompt, "a photo of sks person");
        assert_eq!(request.params.rank, Some(8));
        assert_eq!(serde_json::to_value(&request).unwrap(), value);
        let mut bad = value;
        bad["rnak"] = json!(4);
        assert!(serde_json::from_value::<TrainingRequest>(bad).is_err());
    }

    #[test]
    fn job_and_events_serialize_as_documented() {
        let job = Job {
            id: "j1".into(),
            kind: JobKind::Generation,
            state: JobState::Succeeded,
            queue_position: None,
            progress: Progress::new(4, 4),
            created_at: "2026-11-27T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            result: Some(GenerationResult {
                images: vec![ImageResult {
                    id: "i1".into(),
                    url: "/v1/images/i1.png".into(),
                    seed: 7,
                    sha256: "ab".into(),
                    width: 64,
                    height: 64,
                    b64_json: None,
                }],
                withheld: vec![],
                timings: JobTimings {
                    total_seconds: Some(1.5),
                    ..Default::default()
                },
            }),
            training: None,
            error: None,
        };
        let value = serde_json::to_value(&job).unwrap();
        assert_eq!(value["state"], "succeeded");
        assert_eq!(value["kind"], "generation");
        assert_eq!(value["result"]["images"][0]["seed"], 7);
        assert_eq!(value["result"]["timings"]["totalSeconds"], 1.5);
        assert_eq!(serde_json::from_value::<Job>(value).unwrap(), job);
        assert!(JobState::Cancelled.is_finished() && !JobState::Running.is_finished());

        let event = JobEvent::Progress {
            step: 3,
            total: 10,
            loss: None,
        };
        assert_eq!(event.name(), "progress");
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"type": "progress", "step": 3, "total": 10})
        );
        let done = JobEvent::Succeeded { job: Box::new(job) };
        assert_eq!(serde_json::to_value(&done).unwrap()["type"], "succeeded");
    }

    #[test]
    fn errors_have_code_message_and_field() {
        let body = ErrorBody {
            error: ErrorDetail {
                code: codes::INVALID_FIELD.into(),
                message: "steps must be at most 500".into(),
                field: Some("steps".into()),
                retryable: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"error": {"code": "invalid_field", "message": "steps must be at most 500", "field": "steps"}})
        );
    }

    #[test]
    fn trainer_events_are_the_documented_json_lines() {
        let line = r#"{"event":"step","step":10,"total":800,"loss":0.12,"lr":0.0001,"elapsed":12.5,"eta":987.5}"#;
        let event: TrainerEvent = serde_json::from_str(line).unwrap();
        assert_eq!(
            event,
            TrainerEvent::Step {
                step: 10,
                total: 800,
                loss: 0.12,
                lr: 0.0001,
                elapsed: 12.5,
                eta: 987.5
            }
        );
        assert_eq!(serde_json::to_string(&event).unwrap(), line);
        for line in [
            r#"{"event":"started","total":800,"seed":42}"#,
            r#"{"event":"checkpoint","step":200,"path":"out/checkpoint-200"}"#,
            r#"{"event":"done","step":800,"total":800,"output":"out/pytorch_lora_weights.safetensors","loss":0.1}"#,
            r#"{"event":"failed","message":"no images"}"#,
        ] {
            let event: TrainerEvent = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&event).unwrap(), line);
        }
        assert!(serde_json::from_str::<TrainerEvent>(r#"{"event":"stepp"}"#).is_err());
    }
}
