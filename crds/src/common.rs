//! Pieces the custom resources share: references to models and input images, the phase of a
//! job, its progress, and the standard condition type.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// API group of every imagegen custom resource.
pub const GROUP: &str = "imagegen.dev";
/// The one version served so far.
pub const VERSION: &str = "v1alpha1";

/// Longest object name a reference may carry (a DNS subdomain).
pub const MAX_NAME_CHARS: u32 = 253;
/// Longest URL or store path accepted in a reference.
pub const MAX_LOCATION_CHARS: u32 = 2048;

/// A DiffusionModel in the same namespace, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRef {
    /// Name of the DiffusionModel.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub name: String,
}

/// Where an input image is: exactly one of `path`, `uploadId` or `url`. Image bytes are never
/// put inline in a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.path), has(self.uploadId), has(self.url)].filter(x, x).size() == 1",
    "message": "exactly one of path, uploadId or url",
}]))]
pub enum ImageRef {
    /// A path in the object store that imagegen's deployment serves from.
    Path(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
    /// The id the HTTP service returned for an upload.
    UploadId(#[schemars(length(min = 1, max = MAX_NAME_CHARS))] String),
    /// An http(s) URL to fetch the image from.
    Url(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, waiting for a model replica or a GPU.
    #[default]
    Pending,
    /// Generating or training.
    Running,
    /// Done; the results are in the status.
    Succeeded,
    /// Given up; `message` says why.
    Failed,
}

impl Phase {
    /// Succeeded or Failed: nothing more will happen.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// How far a job has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Steps done (denoising steps over all images, or training steps).
    pub step: u32,
    /// Steps in all.
    pub total: u32,
    /// `step` over `total`, 0 to 100, rounded down.
    #[schemars(range(max = 100))]
    pub percent: u32,
}

impl Progress {
    /// `step` of `total`, with the percentage filled in (100 when `total` is 0).
    pub fn new(step: u32, total: u32) -> Self {
        let percent = if total == 0 {
            100
        } else {
            (u64::from(step.min(total)) * 100 / u64::from(total)) as u32
        };
        Progress {
            step,
            total,
            percent,
        }
    }
}

/// Condition types the controllers set.
pub mod condition_types {
    /// DiffusionModel: enough replicas serve the model.
    pub const READY: &str = "Ready";
    /// DiffusionModel: a rollout or scale change is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// DiffusionModel: fewer replicas than asked for are ready.
    pub const DEGRADED: &str = "Degraded";
    /// Jobs: the work finished, successfully or not (`status` says which).
    pub const COMPLETE: &str = "Complete";
    /// Jobs: the work failed.
    pub const FAILED: &str = "Failed";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_percent() {
        assert_eq!(Progress::new(0, 25).percent, 0);
        assert_eq!(Progress::new(1, 3).percent, 33);
        assert_eq!(Progress::new(25, 25).percent, 100);
        assert_eq!(Progress::new(30, 25).percent, 100);
        assert_eq!(Progress::new(0, 0).percent, 100);
    }

    #[test]
    fn phases() {
        assert!(!Phase::default().is_finished());
        assert!(!Phase::Running.is_finished());
        assert!(Phase::Succeeded.is_finished() && Phase::Failed.is_finished());
        assert_eq!(
            serde_json::to_string(&Phase::Succeeded).unwrap(),
            r#""Succeeded""#
        );
    }

    #[test]
    fn image_refs_are_one_key_objects() {
        for (image, json) in [
            (ImageRef::Path("a/b.png".into()), r#"{"path":"a/b.png"}"#),
            (ImageRef::UploadId("u".into()), r#"{"uploadId":"u"}"#),
            (
                ImageRef::Url("https://x/y".into()),
                r#"{"url":"https://x/y"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&image).unwrap(), json);
            assert_eq!(serde_json::from_str::<ImageRef>(json).unwrap(), image);
        }
        for bad in [r#"{}"#, r#"{"path":"a","url":"b"}"#, r#"{"data":"AAAA"}"#] {
            assert!(serde_json::from_str::<ImageRef>(bad).is_err(), "{bad}");
        }
    }
}
