//! DiffusionModel: a Stable Diffusion model served by a set of GPU replicas.

// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Time, MAX_LOCATION_CHARS, MAX_NAME_CHARS};

/// The extended resource name of NVIDIA GPUs, the default `resources.gpuResourceName`.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Serve a Stable Diffusion model.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "imagegen.dev",
    version = "v1alpha1",
    kind = "DiffusionModel",
    namespaced,
    status = "DiffusionModelStatus",
    shortname = "dmodel",
    category = "imagegen",
    derive = "PartialEq",
    doc = "A Stable Diffusion model served by GPU replicas.",
    scale(
        spec_replicas_path = ".spec.replicas.count",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Family", type_ = "string", json_path = ".spec.family"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
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
    "rule": "!has(self.refiner) || !has(self.family) || self.family == 'sdxl'",
    "message": "a refiner goes with an SDXL model: family sdxl, or family left out",
    "fieldPath": ".refiner"
}]))]
pub struct DiffusionModelSpec {
    /// Where the weights come from (diffusers layout, safetensors only).
    pub source: ModelSource,
    /// Model family: sd15 (Stable Diffusion 1.x), sd2 (2.x) or sdxl. Default: read from the
    /// model's model_index.json when a replica loads it; when given, a replica refuses to
    /// serve a model of another family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Weights and activations type. Default f16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// How many replicas serve the model. Default 1 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Replicas>,
    /// GPUs of each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<GpuResources>,
    /// Node labels a replica's pod must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints a replica's pod tolerates (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// The volume the weights are downloaded to and loaded from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ModelCache>,
    /// A Canny ControlNet from the hub, for generations with `strategy: canny`; each
    /// replica fetches and loads it on the first such request. Without one, those
    /// generations are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<HubSource>,
    /// An SDXL refiner from the hub, loaded by each replica at start: text-to-image
    /// generations hand over to it at their `highNoiseFraction` (default 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner: Option<HubSource>,
}

/// Where a model's weights are: exactly one of `hub`, `path` or `url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.hub), has(self.path), has(self.url)].filter(x, x).size() == 1",
    "message": "exactly one of hub, path or url",
}]))]
pub enum ModelSource {
    /// A Hugging Face hub repository.
    Hub(HubSource),
    /// A diffusers folder in the object store.
    Path(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
    /// An http(s) URL of a tar archive of a diffusers folder.
    Url(#[schemars(length(min = 1, max = MAX_LOCATION_CHARS))] String),
}

/// A Hugging Face hub repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubSource {
    /// `owner/name`.
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[\w.-]+/[\w.-]+$"))]
    pub repo: String,
    /// Branch, tag or commit. Default: main.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub revision: Option<String>,
}

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 1.x.
    Sd15,
    /// Stable Diffusion 2.x.
    Sd2,
    /// Stable Diffusion XL (base, refiner or inpainting).
    Sdxl,
}

impl Family {
    /// The name in the API (`sd15`, `sd2`, `sdxl`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
        }
    }
}

/// Weights and activations type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (half precision).
    F16,
    /// bfloat16.
    Bf16,
}

/// How many replicas serve the model, and what scales them.
///
/// `count` is the model's scale subresource: `kubectl scale dmodel`, a
/// HorizontalPodAutoscaler and the operator's queue autoscaler all write it, and the
/// Deployment follows it, brought within `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.min <= self.max",
    "message": "min must not exceed max",
    "fieldPath": ".min"
}]))]
pub struct Replicas {
    /// Fewest replicas kept running (0 lets the model scale to zero). Default 1.
    #[serde(default = "one")]
    #[schemars(range(max = 1000))]
    pub min: u32,
    /// Most replicas. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: u32,
    /// Replicas wanted now (the scale subresource); `min` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub count: Option<u32>,
    /// What sets `count` besides `kubectl scale`: `Queue` (default), the operator, from the
    /// model's queue; `External`, nothing else (an HPA, or scaling by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<Autoscaler>,
    /// Queued and running generations per replica that the queue autoscaler aims for.
    /// Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub queue_per_replica: Option<u32>,
    /// Seconds the queue must need fewer replicas than run before the queue autoscaler
    /// removes any (to `min`, possibly zero). Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub scale_down_after_seconds: Option<u32>,
}

fn one() -> u32 {
    1
}

/// What sets a model's replica count besides `kubectl scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Autoscaler {
    /// The operator, from the model's queue (pending and running generations).
    Queue,
    /// Something outside the operator: a HorizontalPodAutoscaler, or `kubectl scale` alone.
    External,
}

/// GPUs of each replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuResources {
    /// GPUs per replica. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub gpus: Option<u32>,
    /// Extended resource name of the GPU. Default `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub gpu_resource_name: Option<String>,
}

/// The PersistentVolumeClaim that caches the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelCache {
    /// Size of the claim, e.g. `20Gi`.
    pub size: Quantity,
    /// Storage class of the claim. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// What the controller reports about a DiffusionModel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiffusionModelStatus {
    /// Replicas that serve requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Replicas that exist, ready or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// In-cluster URL of the model's HTTP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The label selector of the model's pods, for the scale subresource (an HPA reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// What the queue autoscaler saw and decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the queue autoscaler saw and decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Pending and running generations of the model.
    pub queue: u32,
    /// Replicas the queue needs, within `min..=max`.
    pub desired_replicas: u32,
    /// Since when the queue has needed fewer replicas than run, without a break: scaling
    /// down waits `scaleDownAfterSeconds` from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewer_needed_since: Option<Time>,
    /// When the model was scaled up from zero, while its first replica is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_time: Option<Time>,
    /// Seconds from the last scale-up from zero to the first ready replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cold_start_seconds: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_round_trips_in_camel_case() {
        let value = json!({
            "source": {"hub": {"repo": "owner/model", "revision": "v1"}},
            "family": "sd2",
            "dtype": "bf16",
            "replicas": {"min": 0, "max": 2},
            "resources": {"gpus": 1, "gpuResourceName": "amd.com/gpu"},
            "nodeSelector": {"gpu": "yes"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "cache": {"size": "20Gi", "storageClassName": "fast"}
        });
        let spec: DiffusionModelSpec = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(
            spec.source,
            ModelSource::Hub(HubSource {
                repo: "owner/model".into(),
                revision: Some("v1".into())
            })
        );
        assert_eq!(
            (spec.family, spec.dtype),
            (Some(Family::Sd2), Some(Dtype::Bf16))
        );
        assert_eq!(spec.cache.as_ref().unwrap().size, Quantity("20Gi".into()));
        assert_eq!(serde_json::to_value(&spec).unwrap(), value);
    }

    #[test]
    fn family_is_optional_and_sdxl_may_name_a_refiner() {
        let spec: DiffusionModelSpec = serde_json::from_value(json!({
            "source": {"hub": {"repo": "owner/sdxl"}},
            "refiner": {"repo": "owner/refiner"}
        }))
        .unwrap();
        assert_eq!(spec.family, None);
        assert_eq!(
            spec.refiner.map(|r| r.repo).as_deref(),
            Some("owner/refiner")
        );
        let sdxl: DiffusionModelSpec =
            serde_json::from_value(json!({"source": {"path": "m"}, "family": "sdxl"})).unwrap();
        assert_eq!(sdxl.family.map(Family::as_str), Some("sdxl"));
    }

    #[test]
    fn sources_are_exactly_one_of() {
        let spec = |source| json!({"source": source, "family": "sd15"});
        for ok in [
            json!({"path": "models/sd15"}),
            json!({"url": "https://x/sd15.tar"}),
            json!({"hub": {"repo": "a/b"}}),
        ] {
            serde_json::from_value::<DiffusionModelSpec>(spec(ok)).unwrap();
        }
        for bad in [
            json!({}),
            json!({"path": "a", "url": "b"}),
            json!({"hub": {"repo": "a/b", "branch": "x"}}),
            json!({"s3": "bucket"}),
        ] {
            assert!(
                serde_json::from_value::<DiffusionModelSpec>(spec(bad.clone())).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = DiffusionModelStatus {
            ready_replicas: Some(1),
            replicas: Some(2),
            endpoint: Some("http://sd15.ns.svc:8080".into()),
            conditions: vec![Condition {
                type_: crate::common::condition_types::READY.into(),
                status: "True".into(),
                reason: "ReplicasReady".into(),
                message: String::new(),
                last_transition_time: crate::common::Time(Default::default()),
                observed_generation: Some(1),
            }],
            observed_generation: Some(1),
            ..Default::default()
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["readyReplicas"], 1);
        assert_eq!(value["conditions"][0]["type"], "Ready");
        assert_eq!(value["conditions"][0]["observedGeneration"], 1);
        assert!(value["conditions"][0]["lastTransitionTime"].is_string());
        assert_eq!(
            serde_json::from_value::<DiffusionModelStatus>(value).unwrap(),
            status
        );
    }
}
