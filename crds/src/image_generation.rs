//! ImageGeneration: one generation request run as a Kubernetes job. Its spec is a
//! [`GenerationParams`] (the same body the HTTP service takes) plus what only a resource needs:
//! the model to run on, input images by reference, LoRAs and clean-up.

// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, ImageRef, ModelRef, Phase, Progress, Time, MAX_NAME_CHARS};
use crate::generation::{GenerationParams, MAX_PROMPT_CHARS};

/// Most LoRAs applied to one generation.
pub const MAX_LORAS: u32 = 8;

/// Generate images with a DiffusionModel.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "imagegen.dev",
    version = "v1alpha1",
    kind = "ImageGeneration",
    namespaced,
    status = "ImageGenerationStatus",
    shortname = "imggen",
    category = "imagegen",
    derive = "PartialEq",
    doc = "A request to generate images with a DiffusionModel.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent of the denoising steps done"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelRef.name"),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mode",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.mode) || !(self.mode in ['ImageToImage', 'Inpaint', 'Outpaint', 'RemoveObject']) || has(self.image)",
        "message": "this mode needs an input image",
        "fieldPath": ".image",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.mode) || !(self.mode in ['Inpaint', 'RemoveObject']) || has(self.mask) || has(self.maskPrompt)",
        "message": "this mode needs a mask or a maskPrompt",
        "fieldPath": ".mask",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.mask) || !has(self.maskPrompt)",
        "message": "give either mask or maskPrompt, not both",
        "fieldPath": ".maskPrompt",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!has(self.mode) || self.mode != 'Outpaint' || has(self.outpaint)",
        "message": "Outpaint needs outpaint margins",
        "fieldPath": ".outpaint",
        "reason": "FieldValueRequired"
    }
]))]
pub struct ImageGenerationSpec {
    /// The DiffusionModel that runs the generation.
    pub model_ref: ModelRef,
    /// What to generate: the same parameters as the HTTP service's request body.
    #[serde(flatten)]
    pub params: GenerationParams,
    /// LoRAs to apply, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_LORAS))]
    pub loras: Vec<LoraRef>,
    /// Input image of ImageToImage, Inpaint, Outpaint and RemoveObject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// Inpainting mask (white = repaint, black = keep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<ImageRef>,
    /// Inpainting without a mask image: what to repaint, found by a text-prompted segmenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PROMPT_CHARS))]
    pub mask_prompt: Option<String>,
    /// Delete the resource (and its images' references) this long after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u32>,
}

/// A LoRA applied to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraRef {
    /// Name of a LoraTraining in the same namespace whose artifact is the LoRA.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub name: String,
    /// Scale of the LoRA's update. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -4.0, max = 4.0))]
    pub weight: Option<f64>,
}

/// What the controller reports about an ImageGeneration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageGenerationStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Denoising steps done over all images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The images made so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<GeneratedImage>,
    /// Where the time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// Complete and Failed conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// A human-readable word on the current phase (the error, when Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The runtime pod the job was submitted to: a job lives in one pod, so every poll,
    /// cancel and delete goes to this pod alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_pod: Option<RuntimePod>,
}

/// A runtime pod of the model, as the EndpointSlices of the model's Service list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimePod {
    /// The pod's name.
    pub name: String,
    /// Its address and the runtime's port, `IP:PORT` (`[IPv6]:PORT`).
    pub address: String,
}

/// One generated image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedImage {
    /// Where to download the PNG.
    pub url: String,
    /// The seed that regenerates exactly this image.
    pub seed: u64,
    /// SHA-256 of the PNG, in hex.
    pub sha256: String,
}

/// Wall-clock times of a generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// When a replica started on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Seconds spent waiting for a replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_seconds: Option<f64>,
    /// Seconds spent denoising and decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_seconds: Option<f64>,
    /// Seconds from creation to the last image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_seconds: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Mode;
    use serde_json::json;

    fn spec() -> ImageGenerationSpec {
        ImageGenerationSpec {
            model_ref: ModelRef {
                name: "sd15".into(),
            },
            params: GenerationParams {
                prompt: "a cat".into(),
                steps: Some(20),
                mode: Some(Mode::Inpaint),
                ..Default::default()
            },
            loras: vec![LoraRef {
                name: "alice".into(),
                weight: Some(0.5),
            }],
            image: Some(ImageRef::UploadId("u1".into())),
            mask: Some(ImageRef::Path("masks/m.png".into())),
            mask_prompt: None,
            ttl_seconds_after_finished: Some(60),
        }
    }

    #[test]
    fn spec_round_trips_in_camel_case_with_the_params_inline() {
        let value = serde_json::to_value(spec()).unwrap();
        assert_eq!(
            value,
            json!({
                "modelRef": {"name": "sd15"},
                "prompt": "a cat",
                "steps": 20,
                "mode": "Inpaint",
                "loras": [{"name": "alice", "weight": 0.5}],
                "image": {"uploadId": "u1"},
                "mask": {"path": "masks/m.png"},
                "ttlSecondsAfterFinished": 60
            })
        );
        let back: ImageGenerationSpec = serde_json::from_value(value).unwrap();
        assert_eq!(back, spec());
    }

    #[test]
    fn the_generation_part_is_the_http_body() {
        let value = serde_json::to_value(spec()).unwrap();
        let mut body = value.as_object().unwrap().clone();
        for key in [
            "modelRef",
            "loras",
            "image",
            "mask",
            "ttlSecondsAfterFinished",
        ] {
            body.remove(key);
        }
        let params: GenerationParams = serde_json::from_value(body.into()).unwrap();
        assert_eq!(params, spec().params);
    }

    #[test]
    fn required_and_unknown_fields() {
        let ok = json!({"modelRef": {"name": "m"}, "prompt": "x"});
        serde_json::from_value::<ImageGenerationSpec>(ok).unwrap();
        for bad in [
            json!({"prompt": "x"}),
            json!({"modelRef": {"name": "m"}}),
            json!({"modelRef": {"name": "m"}, "prompt": "x", "stepz": 3}),
            json!({"modelRef": {"name": "m", "namespace": "n"}, "prompt": "x"}),
            json!({"modelRef": {"name": "m"}, "prompt": "x", "image": {"bytes": "AAAA"}}),
            json!({"modelRef": {"name": "m"}, "prompt": "x", "image": {"path": "a", "url": "b"}}),
        ] {
            assert!(
                serde_json::from_value::<ImageGenerationSpec>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = ImageGenerationStatus {
            phase: Some(Phase::Running),
            progress: Some(Progress::new(10, 40)),
            images: vec![GeneratedImage {
                url: "http://x/0.png".into(),
                seed: 7,
                sha256: "ab".into(),
            }],
            timings: Some(Timings {
                queued_seconds: Some(1.5),
                ..Default::default()
            }),
            observed_generation: Some(2),
            ..Default::default()
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(
            value,
            json!({
                "phase": "Running",
                "progress": {"step": 10, "total": 40, "percent": 25},
                "images": [{"url": "http://x/0.png", "seed": 7, "sha256": "ab"}],
                "timings": {"queuedSeconds": 1.5},
                "observedGeneration": 2
            })
        );
        assert_eq!(
            serde_json::from_value::<ImageGenerationStatus>(value).unwrap(),
            status
        );
        assert_eq!(
            serde_json::from_value::<ImageGenerationStatus>(json!({})).unwrap(),
            ImageGenerationStatus::default()
        );
    }

    #[test]
    fn resource_has_group_version_kind() {
        use kube::Resource;
        let resource = ImageGeneration::new("avatar", spec());
        assert_eq!(ImageGeneration::api_version(&()), "imagegen.dev/v1alpha1");
        assert_eq!(ImageGeneration::kind(&()), "ImageGeneration");
        let value = serde_json::to_value(&resource).unwrap();
        assert_eq!(value["apiVersion"], "imagegen.dev/v1alpha1");
        assert_eq!(value["metadata"]["name"], "avatar");
        assert_eq!(value["spec"]["modelRef"]["name"], "sd15");
    }
}
