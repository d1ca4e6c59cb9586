//! DiffusionModel: a Stable Diffusion model served by a set of GPU replicas.

// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, MAX_LOCATION_CHARS, MAX_NAME_CHARS};

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
pub struct DiffusionModelSpec {
    /// Where the weights come from (diffusers layout, safetensors only).
    pub source: ModelSource,
    /// Model family: sd15 (Stable Diffusion 1.x) or sd2 (2.x).
    pub family: Family,
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

/// Bounds of the replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.min <= self.max",
    "message": "min must not exceed max"
}]))]
pub struct Replicas {
    /// Fewest replicas kept running (0 lets the model scale to zero).
    #[schemars(range(max = 1000))]
    pub min: u32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max: u32,
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
}
