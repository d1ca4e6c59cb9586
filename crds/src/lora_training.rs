//! LoraTraining: fine-tune a LoRA for a DiffusionModel from a few photos (DreamBooth-style,
//! with optional prior preservation).

// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, ImageRef, ModelRef, Phase, Progress, Time};
use crate::training::{TrainingParams, MAX_TRAINING_IMAGES};

/// Train a LoRA on a few images of one subject or style.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "imagegen.dev",
    version = "v1alpha1",
    kind = "LoraTraining",
    namespaced,
    status = "LoraTrainingStatus",
    shortname = "loratrain",
    category = "imagegen",
    derive = "PartialEq",
    doc = "A LoRA fine-tuning job for a DiffusionModel.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent of the training steps done"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelRef.name"),
    printcolumn(
        name = "Loss",
        type_ = "number",
        json_path = ".status.loss",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.priorPreservation) || has(self.classPrompt)",
    "message": "priorPreservation needs a classPrompt",
    "fieldPath": ".classPrompt",
    "reason": "FieldValueRequired"
}]))]
pub struct LoraTrainingSpec {
    /// The DiffusionModel to train on (and whose family the LoRA fits).
    pub model_ref: ModelRef,
    /// Photos of the subject.
    #[schemars(length(min = 1, max = MAX_TRAINING_IMAGES))]
    pub images: Vec<ImageRef>,
    /// The hyper-parameters: the same fields as the HTTP service's training body.
    #[serde(flatten)]
    pub params: TrainingParams,
}

/// What the controller reports about a LoraTraining.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraTrainingStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Training steps done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Training loss at the last reported step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The seed the run used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Where the trained LoRA is, once Succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// When training started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Complete and Failed conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// A human-readable word on the current phase (the error, when Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failure the trainer itself last reported, in its words. Kept while the Job retries
    /// (a new attempt that starts clears it) so that a Failed training's message names it
    /// rather than the Job's generic reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_error: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A trained LoRA's safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Path in the object store.
    pub path: String,
    /// Where to download it, when the store serves it over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// SHA-256 of the file, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_round_trips_in_camel_case() {
        let value = json!({
            "modelRef": {"name": "sd15"},
            "images": [{"path": "a.jpg"}, {"url": "https://x/b.png"}],
            "instancePrompt": "a photo of sks dog",
            "classPrompt": "a photo of a dog",
            "priorPreservation": {"classImages": 100, "weight": 1.0},
            "steps": 400,
            "rank": 8,
            "alpha": 4.0,
            "learningRate": 0.0001,
            "resolution": 512,
            "trainTextEncoder": true,
            "seed": 3
        });
        let spec: LoraTrainingSpec = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(spec.images[1], ImageRef::Url("https://x/b.png".into()));
        assert_eq!(spec.params.rank, Some(8));
        assert_eq!(serde_json::to_value(&spec).unwrap(), value);
    }

    #[test]
    fn required_and_unknown_fields() {
        let base =
            json!({"modelRef": {"name": "m"}, "images": [{"path": "a"}], "instancePrompt": "p"});
        serde_json::from_value::<LoraTrainingSpec>(base.clone()).unwrap();
        for field in ["modelRef", "images", "instancePrompt"] {
            let mut bad = base.clone();
            bad.as_object_mut().unwrap().remove(field);
            assert!(
                serde_json::from_value::<LoraTrainingSpec>(bad).is_err(),
                "{field}"
            );
        }
        let mut bad = base.clone();
        bad["learningrate"] = json!(1e-4);
        assert!(serde_json::from_value::<LoraTrainingSpec>(bad).is_err());
        let mut bad = base;
        bad["priorPreservation"] = json!({"classImages": 1, "classPrompt": "x"});
        assert!(serde_json::from_value::<LoraTrainingSpec>(bad).is_err());
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = LoraTrainingStatus {
            phase: Some(Phase::Succeeded),
            progress: Some(Progress::new(800, 800)),
            loss: Some(0.125),
            artifact: Some(Artifact {
                path: "loras/alice.safetensors".into(),
                url: None,
                sha256: Some("cd".into()),
            }),
            ..Default::default()
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(
            value,
            json!({
                "phase": "Succeeded",
                "progress": {"step": 800, "total": 800, "percent": 100},
                "loss": 0.125,
                "artifact": {"path": "loras/alice.safetensors", "sha256": "cd"}
            })
        );
        assert_eq!(
            serde_json::from_value::<LoraTrainingStatus>(value).unwrap(),
            status
        );
    }
}
