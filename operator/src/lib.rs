//! The Kubernetes operator for imagegen's custom resources, built on the API types of
//! `imagegen-crds`.
//!
//! Each controller reconciles one resource as a pipeline of steps:
//!
//! ```text
//! dereference → validate → build → apply → update_status
//! ```
//!
//! - **dereference** reads what the resource refers to (for an ImageGeneration, its
//!   DiffusionModel) from the API server.
//! - **validate** checks what the schema cannot and resolves every default, giving a
//!   `Valid*` value, or an [`Error`] that says what to fix. No API calls.
//! - **build** turns the validated value into the Kubernetes objects it needs (Deployment,
//!   Service, PersistentVolumeClaim, …), each owned by the resource. Builders cannot fail and
//!   make no API calls, so both steps are tested here as plain functions.
//! - **apply** server-side applies the built objects.
//! - **update_status** derives the resource's status from what the cluster reports (see
//!   [`diffusion_model::status_from`]) and patches the status subresource.
//!
//! [`controller`] holds the three controllers' reconcile loops over these steps,
//! [`runtime_client`] the runtime's HTTP API and [`runtime_pods`] which pod of a model a
//! generation talks to.

pub mod autoscaler;
pub mod cli;
pub mod conditions;
pub mod controller;
pub mod diffusion_model;
pub mod dispatch;
pub mod image_generation;
pub mod leader;
pub mod lora_training;
pub mod metrics;
pub mod pod_choice;
pub mod rbac;
pub mod runtime_client;
pub mod runtime_pods;
pub mod secret_copies;
pub mod server;
pub mod uninstall;
pub mod valid_model;
pub mod workload;

use std::time::Duration;

pub use imagegen_crds as api;

/// Where the store claim is mounted in runtime pods and training Jobs.
pub const STORE_MOUNT_PATH: &str = "/store";

/// The field manager of every server-side apply made by the operator.
pub const FIELD_MANAGER: &str = "imagegen-operator";

/// The delay after the `n`th try of something retried with exponential backoff: `base` after
/// the first, doubling with each one after, never more than `max`.
pub fn doubling_delay(n: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(max)
}

/// The time from `from` to `to`; zero when `to` is not later.
pub fn time_between(
    from: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    to: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Duration {
    from.0
        .duration_until(to.0)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

/// Settings of the operator itself, the same for every resource it manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorConfig {
    /// The runtime's store (`IMAGEGEN_STORE` of runtime pods and training Jobs), e.g.
    /// `file:///store` or `s3://bucket/prefix`; the runtime's default when `None`.
    pub store_url: Option<String>,
    /// Namespace of the operator, and of the Secrets named in `store_secret` and
    /// `c2pa_secret` (each model's namespace gets copies of them).
    pub namespace: String,
    /// A Secret whose keys become environment variables of runtime pods and training Jobs
    /// (the store's credentials, e.g. `AWS_ACCESS_KEY_ID`).
    pub store_secret: Option<String>,
    /// A PersistentVolumeClaim mounted at [`STORE_MOUNT_PATH`] in runtime pods and training
    /// Jobs (for a `file:///store` store).
    pub store_claim: Option<String>,
    /// Base URL training pods report their progress to: the operator's Service.
    pub operator_url: String,
    /// `IMAGEGEN_SAFETY` of runtime pods (block, blur or off); the runtime's default when
    /// `None`.
    pub safety_policy: Option<String>,
    /// A Secret with `tls.crt` (PEM certificate chain) and `tls.key` (PEM private key) that
    /// runtime pods sign every image with (C2PA manifests); unsigned when `None`.
    pub c2pa_secret: Option<String>,
    /// `backoffLimit` of training Jobs: pod failures retried before the training fails.
    pub training_backoff_limit: i32,
    /// `activeDeadlineSeconds` of training Jobs.
    pub training_deadline_seconds: i64,
    /// Submissions of one ImageGeneration to the runtime (the first one and the
    /// resubmissions after the runtime lost the job) before it fails.
    pub max_submissions: u32,
    /// Image of imagegen's runtime (the `imagegen` binary), run by model replicas.
    pub runtime_image: String,
    /// `imagePullPolicy` of the runtime containers.
    pub image_pull_policy: String,
    /// Secrets to pull the runtime image with.
    pub image_pull_secrets: Vec<String>,
    /// Service account of the runtime pods; the namespace's default one when `None`.
    pub service_account_name: Option<String>,
    /// User and group id the runtime runs as (never root).
    pub run_as_user: i64,
    /// How long the pod holding a job may stay not ready before the job is cancelled there
    /// and submitted to another pod.
    pub unready_grace: std::time::Duration,
    /// How many jobs more than the least-loaded pod a pod with the request's LoRAs warm may
    /// have and still be preferred (see [`pod_choice`]).
    pub lora_affinity_slack: u64,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            runtime_image: format!("ghcr.io/imagegen/imagegen:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: Vec::new(),
            service_account_name: None,
            run_as_user: 65532,
            store_url: None,
            namespace: "imagegen-system".into(),
            store_secret: None,
            store_claim: None,
            operator_url: "http://imagegen-operator.imagegen-system.svc:8080".into(),
            safety_policy: None,
            c2pa_secret: None,
            training_backoff_limit: 2,
            training_deadline_seconds: 6 * 3600,
            max_submissions: 5,
            unready_grace: std::time::Duration::from_secs(60),
            lora_affinity_slack: 2,
        }
    }
}

/// Why a resource cannot be reconciled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The object lacks a field the API server always sets (name, namespace, uid).
    #[error("{kind} has no {field}")]
    MissingObjectKey {
        /// Kind of the object.
        kind: &'static str,
        /// The missing field of `metadata`.
        field: &'static str,
    },
    /// The name is too long or not a DNS label, so no Service can carry it.
    #[error("name {name:?} must be a DNS label of at most 63 characters: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `spec.replicas.min` exceeds `spec.replicas.max`, or `max` is 0.
    #[error("replicas: min {min} and max {max} must satisfy min <= max and max >= 1")]
    InvalidReplicas {
        /// The smallest count asked for.
        min: u32,
        /// The largest count asked for.
        max: u32,
    },
    /// `spec.source` names nothing usable.
    #[error("source: {0}")]
    InvalidSource(String),
    /// `spec.resources` asks for an impossible GPU setup.
    #[error("resources: {0}")]
    InvalidResources(String),
    /// A store path that would leave the tenant's root.
    #[error("{field}: store path {path:?} {reason}")]
    InvalidStorePath {
        /// The spec field, e.g. `images[2]`.
        field: String,
        /// The path given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An input the component cannot take, e.g. a URL among training images.
    #[error("{field}: {reason}")]
    UnsupportedInput {
        /// The spec field.
        field: String,
        /// Why it cannot be used.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn doubling_delay_doubles_up_to_its_maximum() {
        let s = Duration::from_secs;
        let delays: Vec<_> = (0..8)
            .map(|n| super::doubling_delay(n, s(5), s(100)))
            .collect();
        assert_eq!(delays, [5, 5, 10, 20, 40, 80, 100, 100].map(s));
        assert_eq!(super::doubling_delay(u32::MAX, s(5), s(100)), s(100));
    }
}

#[cfg(test)]
mod mock_api;
#[cfg(test)]
mod mock_tests;
