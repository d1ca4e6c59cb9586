//! A DiffusionModel as the builders use it, once validated: what the model's own objects and
//! every pod of it (replicas, training Jobs) are built from. A leaf: the builders of every
//! kind import it, and it imports none of them.

use std::collections::BTreeMap;

use imagegen_crds::diffusion_model::{Dtype, Family, ModelCache};
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::autoscaler;

/// Port of the model's Service.
pub const SERVICE_PORT: i32 = 80;
/// Where the model cache volume is mounted; `HF_HOME` points there.
pub const CACHE_MOUNT_PATH: &str = "/cache";

/// A DiffusionModel that passed [`validate`](crate::diffusion_model::validate), with every
/// default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidModel {
    /// Name of the model, and of its Deployment and Service.
    pub name: String,
    /// Namespace of the model and of every object built for it.
    pub namespace: String,
    /// Owner reference (controller) that makes the built objects the model's.
    pub owner: OwnerReference,
    /// `metadata.generation` of the model.
    pub generation: Option<i64>,
    /// The `--model` argument of `imagegen serve`.
    pub model_arg: String,
    /// The Canny ControlNet (`owner/name[@revision]`) of `imagegen serve`, if any.
    pub controlnet_arg: Option<String>,
    /// The SDXL refiner (`owner/name[@revision]`) of `imagegen serve`, if any.
    pub refiner_arg: Option<String>,
    /// Model family, when the spec names one (the replicas check it at load).
    pub family: Option<Family>,
    /// Weights and activations type (default f16).
    pub dtype: Dtype,
    /// Fewest replicas.
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// `spec.replicas.count`: the scale subresource's count, if set.
    pub count: Option<u32>,
    /// How the model scales.
    pub scaling: autoscaler::Policy,
    /// GPUs per replica (default 1).
    pub gpus: u32,
    /// Extended resource name of the GPUs (default `nvidia.com/gpu`).
    pub gpu_resource_name: String,
    /// Node selector of the pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods.
    pub tolerations: Vec<Toleration>,
    /// The weight cache claim, if any (otherwise the cache is an emptyDir).
    pub cache: Option<ModelCache>,
}

impl ValidModel {
    /// Name of the cache PersistentVolumeClaim.
    pub fn cache_claim_name(&self) -> String {
        cache_claim_name(&self.name)
    }

    /// In-cluster URL of the model's Service.
    pub fn endpoint(&self) -> String {
        endpoint(&self.name, &self.namespace)
    }
}

/// Name of the cache PersistentVolumeClaim of the model `name`.
pub fn cache_claim_name(name: &str) -> String {
    format!("{name}-cache")
}

/// In-cluster URL of the Service of the model `name` in `namespace`.
pub fn endpoint(name: &str, namespace: &str) -> String {
    format!("http://{name}.{namespace}.svc:{SERVICE_PORT}")
}
