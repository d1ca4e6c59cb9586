//! DiffusionModel: validation, the objects that serve a model, and the status derived from
//! them.
//!
//! A model becomes a Deployment of `imagegen serve` replicas, a ClusterIP Service in front of
//! them and, when `spec.cache` is set, a PersistentVolumeClaim that keeps the downloaded
//! weights across restarts. All are named after the model and owned by it.

use std::collections::BTreeMap;

use imagegen_crds::common::condition_types::{DEGRADED, PROGRESSING, READY};
use imagegen_crds::diffusion_model::{
    AutoscalingStatus, Dtype, Family, HubSource, ModelSource, DEFAULT_GPU_RESOURCE,
};
use imagegen_crds::{DiffusionModel, DiffusionModelStatus};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::autoscaler;
use crate::conditions::{condition, set_condition};
pub use crate::valid_model::{
    cache_claim_name, endpoint, ValidModel, CACHE_MOUNT_PATH, SERVICE_PORT,
};
use crate::workload::{self, Found};
use crate::{Error, OperatorConfig};

/// Port the runtime listens on inside the pod.
pub const RUNTIME_PORT: i32 = 8080;
/// Name of the runtime's port, in the pod and the Service (and so in its EndpointSlices).
pub const RUNTIME_PORT_NAME: &str = "http";
/// Name of the runtime container.
pub const CONTAINER_NAME: &str = "runtime";
/// Label naming the DiffusionModel a runtime pod serves.
pub const MODEL_LABEL: &str = "imagegen.dev/model";
/// Longest name a DiffusionModel may have: a Service name is a DNS label.
pub const MAX_MODEL_NAME_CHARS: usize = 63;
/// Most GPUs one replica may ask for.
pub const MAX_GPUS: u32 = 16;
/// Key of the runtime auth Secret that holds the tokens file.
pub const AUTH_SECRET_KEY: &str = "tokens";
/// Where the runtime auth Secret is mounted.
pub const AUTH_MOUNT_PATH: &str = "/etc/imagegen/auth";
const AUTH_VOLUME: &str = "auth";
/// Where the C2PA signing Secret (`tls.crt`, `tls.key`) is mounted, when there is one.
pub const C2PA_MOUNT_PATH: &str = "/etc/imagegen/c2pa";
const C2PA_VOLUME: &str = "c2pa";

/// Whether `model` reports enough ready replicas to serve (its Ready condition is True).
pub fn is_ready(model: &DiffusionModel) -> bool {
    model
        .status
        .as_ref()
        .and_then(|s| crate::conditions::is_true(&s.conditions, READY))
        .unwrap_or(false)
}

/// Why `model` cannot serve yet, in words, or `None` when it is ready.
pub fn not_ready_reason(model: Option<&DiffusionModel>) -> Option<String> {
    match model {
        None => Some("the DiffusionModel does not exist".into()),
        Some(m) if is_ready(m) => None,
        Some(m) => Some(format!("the DiffusionModel {} is not Ready", m.name_any())),
    }
}

/// `model` when a training may use it, otherwise why not: a training runs in its own Job on
/// its own GPU, so a model that serves no replica now (scaled to zero, or starting from
/// zero) is as good as a Ready one.
pub fn trainable(model: Option<DiffusionModel>) -> Result<DiffusionModel, String> {
    let idle = model.as_ref().is_some_and(|m| {
        let reason = m
            .status
            .as_ref()
            .and_then(|s| crate::conditions::find(&s.conditions, READY))
            .map(|c| c.reason.as_str());
        matches!(reason, Some("ScaledToZero" | "ColdStart"))
    });
    match model {
        Some(model) if idle => Ok(model),
        other => ready(other),
    }
}

/// `model` when it is ready to serve, otherwise why not (see [`not_ready_reason`]).
pub fn ready(model: Option<DiffusionModel>) -> Result<DiffusionModel, String> {
    match (not_ready_reason(model.as_ref()), model) {
        (None, Some(model)) => Ok(model),
        (why, _) => Err(why.unwrap_or_default()),
    }
}

/// Name of the Secret holding the runtime's tokens file of the model `name`: one token, for
/// the tenant named like the namespace, which the operator uses to call the runtime.
pub fn auth_secret_name(name: &str) -> String {
    format!("{name}-runtime-auth")
}

/// The runtime auth Secret of `model`: a tokens file (`tenant:token`) granting `token` to the
/// tenant of the model's namespace. The token is made once, when the Secret is created, and
/// read back afterwards (see [`token_from_auth_secret`]).
pub fn build_auth_secret(model: &ValidModel, token: &str) -> Secret {
    Secret {
        metadata: metadata(model, auth_secret_name(&model.name)),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            AUTH_SECRET_KEY.into(),
            format!(
                "# imagegen-operator's token for tenant {ns}\n{ns}:{token}\n",
                ns = model.namespace
            ),
        )])),
        ..Secret::default()
    }
}

/// The token of `tenant` in a runtime auth Secret as the API server returns it (`data`,
/// base64-decoded by the client), or `None` when it has none.
pub fn token_from_auth_secret(secret: &Secret, tenant: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(AUTH_SECRET_KEY)?;
    let text = std::str::from_utf8(&bytes.0).ok()?;
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .find(|(t, token)| *t == tenant && !token.is_empty())
        .map(|(_, token)| token.to_string())
}

/// Checks what the schema cannot (or what a resource that skipped the schema may get wrong)
/// and resolves the defaults. Makes no API calls.
pub fn validate(model: &DiffusionModel) -> Result<ValidModel, Error> {
    const KIND: &str = "DiffusionModel";
    let missing = |field| Error::MissingObjectKey { kind: KIND, field };
    let name = model.metadata.name.clone().ok_or(missing("name"))?;
    let namespace = model.namespace().ok_or(missing("namespace"))?;
    model.metadata.uid.as_ref().ok_or(missing("uid"))?;
    let owner = model.controller_owner_ref(&()).ok_or(missing("uid"))?;
    validate_name(&name)?;

    let spec = &model.spec;
    let (min_replicas, max_replicas) = spec.replicas.map_or((1, 1), |r| (r.min, r.max));
    if min_replicas > max_replicas || max_replicas == 0 {
        return Err(Error::InvalidReplicas {
            min: min_replicas,
            max: max_replicas,
        });
    }

    let model_arg = match &spec.source {
        ModelSource::Hub(hub) => hub_arg(hub)?,
        ModelSource::Path(path) if path.trim().is_empty() => {
            return Err(Error::InvalidSource("path is empty".into()))
        }
        ModelSource::Path(path) => path.clone(),
        ModelSource::Url(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
            return Err(Error::InvalidSource(format!("url {url:?} is not http(s)")))
        }
        ModelSource::Url(url) => url.clone(),
    };

    let controlnet_arg = spec.controlnet.as_ref().map(hub_arg).transpose()?;
    let refiner_arg = spec.refiner.as_ref().map(hub_arg).transpose()?;
    if let (Some(_), Some(family)) = (&refiner_arg, spec.family) {
        if family != Family::Sdxl {
            return Err(Error::InvalidSource(format!(
                "a refiner goes with an SDXL model, not family {}",
                family.as_str()
            )));
        }
    }

    let resources = spec.resources.as_ref();
    let gpus = resources.and_then(|r| r.gpus).unwrap_or(1);
    if !(1..=MAX_GPUS).contains(&gpus) {
        return Err(Error::InvalidResources(format!(
            "gpus must be 1 to {MAX_GPUS}, not {gpus}"
        )));
    }
    let gpu_resource_name = resources
        .and_then(|r| r.gpu_resource_name.clone())
        .unwrap_or_else(|| DEFAULT_GPU_RESOURCE.into());
    if !is_extended_resource_name(&gpu_resource_name) {
        return Err(Error::InvalidResources(format!(
            "gpuResourceName {gpu_resource_name:?} is not an extended resource name (domain/name)"
        )));
    }

    Ok(ValidModel {
        name,
        namespace,
        owner,
        generation: model.metadata.generation,
        model_arg,
        controlnet_arg,
        refiner_arg,
        family: spec.family,
        dtype: spec.dtype.unwrap_or(Dtype::F16),
        min_replicas,
        max_replicas,
        count: spec.replicas.and_then(|r| r.count),
        scaling: autoscaler::Policy::of(spec.replicas.as_ref()),
        gpus,
        gpu_resource_name,
        node_selector: spec.node_selector.clone().unwrap_or_default(),
        tolerations: spec.tolerations.clone().unwrap_or_default(),
        cache: spec.cache.clone(),
    })
}

/// A DNS-1035 label: what a Service name must be.
fn validate_name(name: &str) -> Result<(), Error> {
    let invalid = |reason| {
        Err(Error::InvalidName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_MODEL_NAME_CHARS {
        return invalid("length");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return invalid("must start with a lowercase letter");
    }
    if name.ends_with('-') {
        return invalid("must not end with '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return invalid("only lowercase letters, digits and '-'");
    }
    Ok(())
}

/// `domain/name`, as extended resources such as `nvidia.com/gpu` are, and not in the
/// `kubernetes.io` domain.
fn is_extended_resource_name(name: &str) -> bool {
    match name.split_once('/') {
        Some((domain, resource)) => {
            !domain.is_empty()
                && !resource.is_empty()
                && !resource.contains('/')
                && domain.contains('.')
                && !domain.ends_with("kubernetes.io")
        }
        None => false,
    }
}

/// Labels that select the runtime pods of the model `name`: the Deployment's selector and
/// the Service's.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "imagegen"),
        ("app.kubernetes.io/instance", name),
        ("app.kubernetes.io/component", "runtime"),
        (MODEL_LABEL, name),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Labels of every object built for the model: the selector labels and the manager.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        crate::FIELD_MANAGER.into(),
    );
    labels
}

fn metadata(model: &ValidModel, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(model.namespace.clone()),
        labels: Some(labels(&model.name)),
        owner_references: Some(vec![model.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

fn dtype_arg(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    }
}

/// The signing Secret's volume (its two PEM keys only, readable by the pod's group) and its
/// read-only mount at [`C2PA_MOUNT_PATH`]. The Secret must exist: a runtime pod that should
/// sign never starts without its certificate.
fn c2pa_volume(secret: &str) -> (Volume, VolumeMount) {
    let item = |key: &str| KeyToPath {
        key: key.into(),
        path: key.into(),
        mode: None,
    };
    (
        Volume {
            name: C2PA_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(vec![item("tls.crt"), item("tls.key")]),
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Volume::default()
        },
        read_only_mount(C2PA_VOLUME, C2PA_MOUNT_PATH),
    )
}

/// A Secret's mount: nothing in the pod may change its files.
fn read_only_mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The replica count the model runs now, within `min..=max`: `spec.replicas.count` (the
/// scale subresource) when set; else the existing Deployment's own count (set by hand
/// before the model had a count), or `min` for a new one.
pub fn desired_replicas(model: &ValidModel, existing: Option<&Deployment>) -> u32 {
    let current = model.count.unwrap_or_else(|| match existing {
        None => model.min_replicas,
        // An unset count is Kubernetes' default, 1.
        Some(deployment) => deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as u32,
    });
    model.scaling.bounded(current)
}

/// `owner/name` or `owner/name@revision`: the runtime's spelling of a hub repository.
fn hub_arg(hub: &HubSource) -> Result<String, Error> {
    let parts: Vec<&str> = hub.repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::InvalidSource(format!(
            "hub repo {:?} is not owner/name",
            hub.repo
        )));
    }
    match hub.revision.as_deref() {
        Some("") => Err(Error::InvalidSource("hub revision is empty".into())),
        Some(revision) => Ok(format!("{}@{revision}", hub.repo)),
        None => Ok(hub.repo.clone()),
    }
}

/// The label selector of the model's pods as a string: the scale subresource's
/// `status.selector`, which an HPA reads.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Deployment of `imagegen serve` replicas, `spec.replicas.min` of them (the controller
/// applies [`desired_replicas`] instead once the Deployment exists), shaped by what the
/// controller `found` (the copied Secrets' digest, the store's placement).
pub fn build_deployment(model: &ValidModel, config: &OperatorConfig, found: &Found) -> Deployment {
    let args = [
        "serve",
        "--model",
        &model.model_arg,
        "--listen",
        &format!("0.0.0.0:{RUNTIME_PORT}"),
        "--dtype",
        dtype_arg(model.dtype),
    ]
    .map(String::from)
    .to_vec();
    let mut env = workload::cache_env().to_vec();
    env.push(workload::env(
        "IMAGEGEN_TOKENS_FILE",
        format!("{AUTH_MOUNT_PATH}/{AUTH_SECRET_KEY}"),
    ));
    env.extend(workload::store_env(config));
    env.extend(
        config
            .safety_policy
            .iter()
            .map(|policy| workload::env("IMAGEGEN_SAFETY", policy.clone())),
    );
    env.extend(
        model
            .controlnet_arg
            .iter()
            .map(|controlnet| workload::env("IMAGEGEN_CONTROLNET", controlnet.clone())),
    );
    env.extend(
        model
            .refiner_arg
            .iter()
            .map(|refiner| workload::env("IMAGEGEN_REFINER", refiner.clone())),
    );
    env.extend(
        model
            .family
            .map(|family| workload::env("IMAGEGEN_FAMILY", family.as_str().to_string())),
    );
    env.extend(config.c2pa_secret.iter().flat_map(|_| {
        [
            workload::env("IMAGEGEN_C2PA_CERT", format!("{C2PA_MOUNT_PATH}/tls.crt")),
            workload::env("IMAGEGEN_C2PA_KEY", format!("{C2PA_MOUNT_PATH}/tls.key")),
        ]
    }));
    let store = workload::store_volume(config);
    let c2pa = config
        .c2pa_secret
        .as_ref()
        .map(|_| c2pa_volume(&crate::secret_copies::c2pa_secret_name(&model.name)));
    let (mut volumes, mut mounts) =
        workload::cache_and_tmp(model.cache.as_ref().map(|_| model.cache_claim_name()));
    let auth = Volume {
        name: AUTH_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(auth_secret_name(&model.name)),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let auth = (auth, read_only_mount(AUTH_VOLUME, AUTH_MOUNT_PATH));
    for (volume, mount) in [Some(auth), store, c2pa].into_iter().flatten() {
        volumes.push(volume);
        mounts.push(mount);
    }
    let container = Container {
        ports: Some(vec![ContainerPort {
            name: Some(RUNTIME_PORT_NAME.into()),
            container_port: RUNTIME_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Downloading and loading weights takes minutes: the startup probe holds liveness
        // off for up to 30 minutes.
        startup_probe: Some(http_probe("/healthz", 10, 180)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        ..workload::runtime_container(CONTAINER_NAME, config, model, args, env, mounts)
    };
    let pod = workload::runtime_pod(container, volumes, model, config, found);
    let mut pod_labels = labels(&model.name);
    pod_labels.extend(workload::store_labels(config));
    let pod_annotations = found.secrets_digest.as_ref().map(|digest| {
        BTreeMap::from([(
            workload::SECRETS_DIGEST_ANNOTATION.to_string(),
            digest.clone(),
        )])
    });
    Deployment {
        metadata: metadata(model, model.name.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(model.min_replicas as i32),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&model.name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: pod_annotations,
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The ClusterIP Service: port 80 to the runtime's port 8080.
pub fn build_service(model: &ValidModel) -> Service {
    Service {
        metadata: metadata(model, model.name.clone()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&model.name)),
            ports: Some(vec![ServicePort {
                name: Some(RUNTIME_PORT_NAME.into()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String(RUNTIME_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The weight cache claim when `spec.cache` is set. Replicas share it, so a model that may
/// run more than one replica asks for ReadWriteMany.
pub fn build_cache_claim(model: &ValidModel) -> Option<PersistentVolumeClaim> {
    let cache = model.cache.as_ref()?;
    let access_mode = if model.max_replicas > 1 {
        "ReadWriteMany"
    } else {
        "ReadWriteOnce"
    };
    Some(PersistentVolumeClaim {
        metadata: metadata(model, model.cache_claim_name()),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access_mode.into()]),
            storage_class_name: cache.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), cache.size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// Why an existing cache claim cannot serve `model`, if it cannot: a claim's access modes are
/// immutable, so one made ReadWriteOnce (for one replica) cannot follow `replicas.max` up to
/// several replicas on several nodes.
pub fn cache_claim_unfit(model: &ValidModel, existing: &PersistentVolumeClaim) -> Option<String> {
    let modes = existing
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let shared = modes.iter().any(|m| m == "ReadWriteMany");
    (model.max_replicas > 1 && !shared).then(|| {
        format!(
            "the cache claim {} is {}, which one node mounts at a time, and replicas.max is {}: \
             delete the claim to have it made ReadWriteMany, or set replicas.max to 1",
            model.cache_claim_name(),
            modes.join(", "),
            model.max_replicas
        )
    })
}

/// The status of a model whose spec [`validate`] refused: not Ready, Degraded with reason
/// `InvalidSpec` and the error as message. Nothing is built until the spec is fixed.
pub fn status_invalid(model: &DiffusionModel, error: &Error, now: Time) -> DiffusionModelStatus {
    let generation = model.metadata.generation;
    let old = model.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    let message = error.to_string();
    for (type_, value, reason, message) in [
        (READY, false, "InvalidSpec", message.as_str()),
        (PROGRESSING, false, "InvalidSpec", ""),
        (DEGRADED, true, "InvalidSpec", message.as_str()),
    ] {
        set_condition(
            &mut conditions,
            condition(type_, value, reason, message, generation),
            now.clone(),
        );
    }
    DiffusionModelStatus {
        conditions,
        observed_generation: generation,
        ..old
    }
}

/// The status of `model` given its Deployment as the cluster reports it (`None` when it does
/// not exist yet). Conditions keep their `lastTransitionTime` from `model.status` unless
/// their status changes, in which case it becomes `now`.
///
/// - Ready: at least `spec.replicas.min` replicas are ready.
/// - Progressing: the Deployment has not yet rolled out its latest spec to every replica.
/// - Degraded: the Deployment reports a failure (`ReplicaFailure`, or a rollout past its
///   progress deadline), or a finished rollout has fewer ready replicas than desired.
pub fn status_from(
    model: &DiffusionModel,
    deployment: Option<&Deployment>,
    autoscaling: Option<AutoscalingStatus>,
    now: Time,
) -> DiffusionModelStatus {
    let generation = model.metadata.generation;
    let name = model.name_any();
    let namespace = model.namespace().unwrap_or_default();
    let min = model.spec.replicas.map_or(1, |r| r.min) as i32;
    let mut conditions = model
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut set = |type_, status, reason, message: String| {
        set_condition(
            &mut conditions,
            condition(type_, status, reason, message, generation),
            now.clone(),
        )
    };

    let Some(deployment) = deployment else {
        set(
            READY,
            false,
            "DeploymentMissing",
            "the Deployment does not exist yet".into(),
        );
        set(
            PROGRESSING,
            true,
            "Creating",
            "creating the Deployment".into(),
        );
        set(DEGRADED, false, "AsExpected", String::new());
        return DiffusionModelStatus {
            ready_replicas: Some(0),
            replicas: Some(0),
            endpoint: None,
            conditions,
            observed_generation: generation,
            selector: Some(selector_string(&name)),
            autoscaling,
        };
    };

    let status = deployment.status.clone().unwrap_or_default();
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let observed =
        status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);

    let deployment_conditions = status.conditions.unwrap_or_default();
    let failure = deployment_conditions.iter().find(|c| {
        (c.type_ == "ReplicaFailure" && c.status == "True")
            || (c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
    });
    // Every replica runs the latest spec, and the Deployment saw them become available
    // (it keeps reporting NewReplicaSetAvailable when pods fail afterwards).
    let spec_rolled_out = observed && updated >= desired && replicas <= updated;
    let became_available = available >= desired
        || deployment_conditions.iter().any(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable")
        });
    let rolled_out = spec_rolled_out && became_available;

    // Ready means a generation can run now: at least one replica, even with min 0.
    if ready >= min.max(1) {
        set(
            READY,
            true,
            "ReplicasReady",
            format!("{ready} of {min} replicas ready"),
        );
    } else if desired == 0 {
        set(
            READY,
            false,
            "ScaledToZero",
            "no replica runs (replicas.min is 0): generations wait until one does".into(),
        );
    } else if let Some(began) = autoscaling
        .as_ref()
        .and_then(|a| a.cold_start_time.as_ref())
    {
        set(
            READY,
            false,
            "ColdStart",
            format!(
                "starting from zero since {}: {ready} of {desired} replicas ready",
                began.0
            ),
        );
    } else {
        set(
            READY,
            false,
            "ReplicasNotReady",
            format!("{ready} of {min} replicas ready"),
        );
    }
    if rolled_out {
        set(PROGRESSING, false, "RolloutComplete", String::new());
    } else if failure.is_some() {
        set(
            PROGRESSING,
            false,
            "RolloutFailed",
            "the rollout makes no progress".into(),
        );
    } else {
        set(
            PROGRESSING,
            true,
            "RollingOut",
            format!("{updated} of {desired} replicas updated, {available} available"),
        );
    }
    match failure {
        Some(failure) => set(
            DEGRADED,
            true,
            failure.reason.as_deref().unwrap_or(&failure.type_),
            failure.message.clone().unwrap_or_default(),
        ),
        None if rolled_out && ready < desired => set(
            DEGRADED,
            true,
            "ReplicasUnavailable",
            format!("{ready} of {desired} replicas ready"),
        ),
        None => set(DEGRADED, false, "AsExpected", String::new()),
    }

    DiffusionModelStatus {
        ready_replicas: Some(ready),
        replicas: Some(replicas),
        endpoint: Some(endpoint(&name, &namespace)),
        conditions,
        observed_generation: generation,
        selector: Some(selector_string(&name)),
        autoscaling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::find;
    use imagegen_crds::common::Condition;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn model(spec: serde_json::Value) -> DiffusionModel {
        serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "DiffusionModel",
            "metadata": {"name": "sd15", "namespace": "ml", "uid": "u-1", "generation": 3},
            "spec": spec,
        }))
        .unwrap()
    }

    fn full() -> DiffusionModel {
        model(json!({
            "source": {"hub": {"repo": "owner/sd15", "revision": "v1"}},
            "controlnet": {"repo": "owner/canny"},
            "family": "sd15",
            "dtype": "bf16",
            "replicas": {"min": 2, "max": 4},
            "resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu"},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "cache": {"size": "20Gi", "storageClassName": "fast"}
        }))
    }

    fn minimal() -> DiffusionModel {
        model(json!({"source": {"path": "models/sd15"}, "family": "sd15"}))
    }

    fn pod_spec(deployment: &Deployment) -> &PodSpec {
        deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    // ---- validate ----

    #[test]
    fn validate_resolves_defaults() {
        let valid = validate(&minimal()).unwrap();
        assert_eq!(
            (valid.name.as_str(), valid.namespace.as_str()),
            ("sd15", "ml")
        );
        assert_eq!(
            (valid.min_replicas, valid.max_replicas, valid.gpus),
            (1, 1, 1)
        );
        assert_eq!(valid.gpu_resource_name, "nvidia.com/gpu");
        assert_eq!(valid.dtype, Dtype::F16);
        assert_eq!(valid.model_arg, "models/sd15");
        assert_eq!(valid.generation, Some(3));
        assert!(valid.node_selector.is_empty() && valid.tolerations.is_empty());
    }

    #[test]
    fn validate_reads_the_full_spec() {
        let valid = validate(&full()).unwrap();
        assert_eq!(valid.model_arg, "owner/sd15@v1");
        assert_eq!(valid.controlnet_arg.as_deref(), Some("owner/canny"));
        let bad = model(json!({"source": {"path": "m"}, "family": "sd15",
            "controlnet": {"repo": "owner/canny", "revision": ""}}));
        assert!(matches!(validate(&bad), Err(Error::InvalidSource(_))));
        let env = |valid: &ValidModel| {
            let d = build_deployment(valid, &OperatorConfig::default(), &Found::default());
            pod_spec(&d).containers[0].env.clone().unwrap_or_default()
        };
        let controlnet = |env: Vec<k8s_openapi::api::core::v1::EnvVar>| {
            env.into_iter()
                .find(|e| e.name == "IMAGEGEN_CONTROLNET")
                .and_then(|e| e.value)
        };
        assert_eq!(controlnet(env(&valid)).as_deref(), Some("owner/canny"));
        assert_eq!(controlnet(env(&validate(&minimal()).unwrap())), None);
        assert_eq!(
            (valid.min_replicas, valid.max_replicas, valid.gpus),
            (2, 4, 2)
        );
        assert_eq!(valid.gpu_resource_name, "amd.com/gpu");
        assert_eq!(valid.dtype, Dtype::Bf16);
        assert_eq!(valid.family, Some(Family::Sd15));
        assert_eq!(
            env_value(&env(&valid), "IMAGEGEN_FAMILY").as_deref(),
            Some("sd15")
        );
        assert_eq!(env_value(&env(&valid), "IMAGEGEN_REFINER"), None);
    }

    fn env_value(env: &[k8s_openapi::api::core::v1::EnvVar], name: &str) -> Option<String> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn an_sdxl_model_hands_its_refiner_and_family_to_the_replicas() {
        let sdxl = model(json!({"source": {"hub": {"repo": "owner/sdxl"}},
            "refiner": {"repo": "owner/refiner", "revision": "v2"}}));
        let valid = validate(&sdxl).unwrap();
        assert_eq!(valid.family, None);
        let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        let env = pod_spec(&d).containers[0].env.clone().unwrap_or_default();
        assert_eq!(
            env_value(&env, "IMAGEGEN_REFINER").as_deref(),
            Some("owner/refiner@v2")
        );
        // No family named: the replica reads it from the model, and checks nothing.
        assert_eq!(env_value(&env, "IMAGEGEN_FAMILY"), None);
        let sd15 = model(json!({"source": {"path": "m"}, "family": "sd15",
            "refiner": {"repo": "owner/refiner"}}));
        match validate(&sd15) {
            Err(Error::InvalidSource(message)) => assert!(message.contains("SDXL"), "{message}"),
            other => panic!("an sd15 model with a refiner was not refused: {other:?}"),
        }
    }

    #[test]
    fn validate_refuses_bad_replicas() {
        let mut m = minimal();
        m.spec.replicas = serde_json::from_value(json!({"min": 3, "max": 2})).unwrap();
        assert_eq!(validate(&m), Err(Error::InvalidReplicas { min: 3, max: 2 }));
        m.spec.replicas = serde_json::from_value(json!({"min": 0, "max": 0})).unwrap();
        assert_eq!(validate(&m), Err(Error::InvalidReplicas { min: 0, max: 0 }));
        m.spec.replicas = serde_json::from_value(json!({"min": 0, "max": 1})).unwrap();
        assert!(validate(&m).is_ok());
    }

    #[test]
    fn validate_refuses_bad_sources() {
        for source in [
            json!({"path": " "}),
            json!({"url": "ftp://x/m.tar"}),
            json!({"hub": {"repo": "no-owner"}}),
            json!({"hub": {"repo": "a/b/c"}}),
            json!({"hub": {"repo": "a/b", "revision": ""}}),
        ] {
            let m = model(json!({"source": source, "family": "sd2"}));
            assert!(
                matches!(validate(&m), Err(Error::InvalidSource(_))),
                "{source}"
            );
        }
        let m = model(json!({"source": {"url": "https://x/m.tar"}, "family": "sd2"}));
        assert_eq!(validate(&m).unwrap().model_arg, "https://x/m.tar");
    }

    #[test]
    fn validate_refuses_bad_gpus() {
        for resources in [
            json!({"gpus": 0}),
            json!({"gpus": 17}),
            json!({"gpuResourceName": "gpu"}),
            json!({"gpuResourceName": "kubernetes.io/gpu"}),
        ] {
            let mut m = minimal();
            m.spec.resources = serde_json::from_value(resources.clone()).unwrap();
            assert!(
                matches!(validate(&m), Err(Error::InvalidResources(_))),
                "{resources}"
            );
        }
    }

    #[test]
    fn validate_refuses_bad_metadata() {
        let mut m = minimal();
        m.metadata.uid = None;
        assert_eq!(
            validate(&m),
            Err(Error::MissingObjectKey {
                kind: "DiffusionModel",
                field: "uid"
            })
        );
        let mut m = minimal();
        m.metadata.namespace = None;
        assert!(matches!(
            validate(&m),
            Err(Error::MissingObjectKey {
                field: "namespace",
                ..
            })
        ));
        for name in ["1sd", "sd.15", "Sd15", "sd-", &"s".repeat(64)] {
            let mut m = minimal();
            m.metadata.name = Some(name.into());
            assert!(
                matches!(validate(&m), Err(Error::InvalidName { .. })),
                "{name}"
            );
        }
    }

    // ---- build ----

    #[test]
    fn deployment_runs_imagegen_serve() {
        let config = OperatorConfig {
            runtime_image: "registry/imagegen:1".into(),
            image_pull_policy: "Always".into(),
            image_pull_secrets: vec!["pull".into()],
            service_account_name: Some("runtime".into()),
            ..OperatorConfig::default()
        };
        let d = build_deployment(&validate(&full()).unwrap(), &config, &Found::default());
        assert_eq!(d.metadata.name.as_deref(), Some("sd15"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        let pod = pod_spec(&d);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry/imagegen:1"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(c.command, Some(vec!["imagegen".to_string()]));
        assert_eq!(
            c.args.clone().unwrap(),
            [
                "serve",
                "--model",
                "owner/sd15@v1",
                "--listen",
                "0.0.0.0:8080",
                "--dtype",
                "bf16"
            ]
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
        assert_eq!(pod.service_account_name.as_deref(), Some("runtime"));
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "pull");
    }

    #[test]
    fn deployment_asks_for_the_gpus() {
        let d = build_deployment(
            &validate(&full()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let limits = pod_spec(&d).containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(
            limits,
            BTreeMap::from([("amd.com/gpu".into(), Quantity("2".into()))])
        );

        let d = build_deployment(
            &validate(&minimal()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let limits = pod_spec(&d).containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
    }

    #[test]
    fn deployment_copies_scheduling() {
        let d = build_deployment(
            &validate(&full()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let pod = pod_spec(&d);
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([("gpu".into(), "a100".into())]))
        );
        let tolerations = pod.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].key.as_deref(), Some("gpu"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));

        let d = build_deployment(
            &validate(&minimal()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        assert_eq!(pod_spec(&d).node_selector, None);
        assert_eq!(pod_spec(&d).tolerations, None);
    }

    #[test]
    fn built_objects_are_owned_by_the_model() {
        let valid = validate(&full()).unwrap();
        let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        let s = build_service(&valid);
        let pvc = build_cache_claim(&valid).unwrap();
        for owners in [
            d.metadata.owner_references,
            s.metadata.owner_references,
            pvc.metadata.owner_references,
        ] {
            let owners = owners.unwrap();
            assert_eq!(owners.len(), 1);
            let o = &owners[0];
            assert_eq!(
                (
                    o.api_version.as_str(),
                    o.kind.as_str(),
                    o.name.as_str(),
                    o.uid.as_str()
                ),
                ("imagegen.dev/v1alpha1", "DiffusionModel", "sd15", "u-1")
            );
            assert_eq!(o.controller, Some(true));
        }
    }

    #[test]
    fn deployment_probes() {
        let d = build_deployment(
            &validate(&minimal()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let c = &pod_spec(&d).containers[0];
        let path_port = |p: &Option<Probe>| {
            let get = p.as_ref().unwrap().http_get.clone().unwrap();
            (get.path.unwrap(), get.port)
        };
        let http = IntOrString::String("http".into());
        assert_eq!(
            path_port(&c.readiness_probe),
            ("/readyz".into(), http.clone())
        );
        assert_eq!(
            path_port(&c.liveness_probe),
            ("/healthz".into(), http.clone())
        );
        assert_eq!(path_port(&c.startup_probe), ("/healthz".into(), http));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
    }

    #[test]
    fn deployment_mounts_the_cache_claim() {
        let valid = validate(&full()).unwrap();
        let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        let pod = pod_spec(&d);
        let cache = crate::workload::volume(pod, "cache");
        assert_eq!(
            cache.persistent_volume_claim.as_ref().unwrap().claim_name,
            "sd15-cache"
        );
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "cache")
            .unwrap();
        assert_eq!(mount.mount_path, "/cache");
        let env = c.env.as_ref().unwrap();
        let hf_home = env.iter().find(|e| e.name == "HF_HOME").unwrap();
        assert_eq!(hf_home.value.as_deref(), Some("/cache"));

        let pvc = build_cache_claim(&valid).unwrap();
        assert_eq!(pvc.metadata.name.as_deref(), Some("sd15-cache"));
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".into()]));
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"],
            Quantity("20Gi".into())
        );
    }

    #[test]
    fn without_cache_spec_the_cache_is_an_empty_dir() {
        let valid = validate(&minimal()).unwrap();
        assert!(build_cache_claim(&valid).is_none());
        let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        let volumes = pod_spec(&d).volumes.clone().unwrap();
        let cache = volumes.iter().find(|v| v.name == "cache").unwrap();
        assert!(cache.empty_dir.is_some() && cache.persistent_volume_claim.is_none());

        let mut m = minimal();
        m.spec.cache = serde_json::from_value(json!({"size": "1Gi"})).unwrap();
        let pvc = build_cache_claim(&validate(&m).unwrap()).unwrap();
        assert_eq!(
            pvc.spec.unwrap().access_modes,
            Some(vec!["ReadWriteOnce".into()])
        );
    }

    #[test]
    fn deployment_is_locked_down() {
        let d = build_deployment(
            &validate(&minimal()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let pod = pod_spec(&d);
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_ne!(psc.run_as_user, Some(0));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let tmp = crate::workload::volume(pod, "tmp");
        assert!(tmp.empty_dir.is_some());
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        assert!(mounts
            .iter()
            .any(|m| m.name == "tmp" && m.mount_path == "/tmp"));
    }

    #[test]
    fn deployment_mounts_the_auth_secret_and_the_store() {
        let config = OperatorConfig {
            store_url: Some("file:///store".into()),
            store_secret: Some("store-creds".into()),
            store_claim: Some("imagegen-store".into()),
            safety_policy: Some("blur".into()),
            ..OperatorConfig::default()
        };
        let d = build_deployment(&validate(&minimal()).unwrap(), &config, &Found::default());
        let pod = pod_spec(&d);
        let volumes = pod.volumes.as_ref().unwrap();
        let auth = volumes.iter().find(|v| v.name == "auth").unwrap();
        assert_eq!(
            auth.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("sd15-runtime-auth")
        );
        let store = volumes.iter().find(|v| v.name == "store").unwrap();
        assert_eq!(
            store.persistent_volume_claim.as_ref().unwrap().claim_name,
            "imagegen-store"
        );
        let c = &pod.containers[0];
        let mounts = c.volume_mounts.as_ref().unwrap();
        let mount = |name: &str| mounts.iter().find(|m| m.name == name).unwrap();
        assert_eq!(mount("auth").mount_path, "/etc/imagegen/auth");
        assert_eq!(mount("auth").read_only, Some(true));
        assert_eq!(mount("store").mount_path, "/store");
        let env = c.env.as_ref().unwrap();
        let var = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            var("IMAGEGEN_TOKENS_FILE").as_deref(),
            Some("/etc/imagegen/auth/tokens")
        );
        assert_eq!(var("IMAGEGEN_STORE").as_deref(), Some("file:///store"));
        assert_eq!(var("IMAGEGEN_SAFETY").as_deref(), Some("blur"));
        let from = c.env_from.as_ref().unwrap();
        // The model's copy of the operator's Secret (see secret_copies).
        assert_eq!(
            from[0].secret_ref.as_ref().unwrap().name,
            "sd15-runtime-env"
        );

        // Without store settings: no store volume, no store variables, still the auth.
        let d = build_deployment(
            &validate(&minimal()).unwrap(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let c = &pod_spec(&d).containers[0];
        assert!(c.env_from.is_none());
        let env = c.env.as_ref().unwrap();
        assert!(env
            .iter()
            .all(|e| e.name != "IMAGEGEN_STORE" && e.name != "IMAGEGEN_SAFETY"));
        assert!(env.iter().any(|e| e.name == "IMAGEGEN_TOKENS_FILE"));
        assert!(pod_spec(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.name != "store" && v.name != "c2pa"));
        assert!(env.iter().all(|e| !e.name.starts_with("IMAGEGEN_C2PA")));
    }

    #[test]
    fn deployment_rolls_with_the_copied_secrets_and_follows_a_one_node_store() {
        let config = OperatorConfig {
            store_claim: Some("imagegen-store".into()),
            ..OperatorConfig::default()
        };
        let found = Found {
            secrets_digest: Some("abc".into()),
            store_on_one_node: true,
        };
        let d = build_deployment(&validate(&minimal()).unwrap(), &config, &found);
        let template = d.spec.as_ref().unwrap().template.metadata.clone().unwrap();
        assert_eq!(
            template.annotations.unwrap()[workload::SECRETS_DIGEST_ANNOTATION],
            "abc"
        );
        assert_eq!(
            template.labels.unwrap()[workload::STORE_CLAIM_LABEL],
            "imagegen-store"
        );
        // The selector stays the model's: it is immutable once the Deployment exists.
        let selector = d
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .clone()
            .unwrap();
        assert!(!selector.contains_key(workload::STORE_CLAIM_LABEL));
        assert!(pod_spec(&d).affinity.is_some());
        let d = build_deployment(&validate(&minimal()).unwrap(), &config, &Found::default());
        assert!(pod_spec(&d).affinity.is_none());
        let template = d.spec.unwrap().template.metadata.unwrap();
        assert!(template.annotations.is_none());
    }

    #[test]
    fn deployment_mounts_the_c2pa_secret() {
        let config = OperatorConfig {
            c2pa_secret: Some("content-credentials".into()),
            ..OperatorConfig::default()
        };
        let d = build_deployment(&validate(&minimal()).unwrap(), &config, &Found::default());
        let pod = pod_spec(&d);
        let volume = crate::workload::volume(pod, "c2pa");
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("sd15-c2pa"));
        assert_eq!(secret.optional, Some(false));
        let keys: Vec<&str> = secret
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|i| i.path.as_str())
            .collect();
        assert_eq!(keys, ["tls.crt", "tls.key"]);
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "c2pa")
            .unwrap();
        assert_eq!(mount.mount_path, C2PA_MOUNT_PATH);
        assert_eq!(mount.read_only, Some(true));
        // The runtime reads exactly the mounted files.
        let env = c.env.as_ref().unwrap();
        let var = |name: &str| env.iter().find(|e| e.name == name)?.value.clone();
        assert_eq!(
            var("IMAGEGEN_C2PA_CERT").as_deref(),
            Some("/etc/imagegen/c2pa/tls.crt")
        );
        assert_eq!(
            var("IMAGEGEN_C2PA_KEY").as_deref(),
            Some("/etc/imagegen/c2pa/tls.key")
        );
    }

    #[test]
    fn auth_secret_grants_the_namespace_tenant() {
        let valid = validate(&minimal()).unwrap();
        let secret = build_auth_secret(&valid, "t0k3n");
        assert_eq!(secret.metadata.name.as_deref(), Some("sd15-runtime-auth"));
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        let tokens = secret.string_data.as_ref().unwrap()["tokens"].clone();
        assert!(tokens.lines().any(|l| l == "ml:t0k3n"), "{tokens}");

        // The API server returns it as data; the token is read back for the tenant only.
        let mut stored = secret.clone();
        stored.data = Some(BTreeMap::from([(
            "tokens".to_string(),
            k8s_openapi::ByteString(tokens.into_bytes()),
        )]));
        stored.string_data = None;
        assert_eq!(
            token_from_auth_secret(&stored, "ml").as_deref(),
            Some("t0k3n")
        );
        assert_eq!(token_from_auth_secret(&stored, "other"), None);
        assert_eq!(token_from_auth_secret(&Secret::default(), "ml"), None);
    }

    #[test]
    fn invalid_spec_is_degraded() {
        let mut m = minimal();
        m.spec.replicas = serde_json::from_value(json!({"min": 3, "max": 2})).unwrap();
        let err = validate(&m).unwrap_err();
        let s = status_invalid(&m, &err, at(5));
        assert_eq!(state(&s, READY), pair("False", "InvalidSpec"));
        assert_eq!(state(&s, DEGRADED), pair("True", "InvalidSpec"));
        assert_eq!(state(&s, PROGRESSING), pair("False", "InvalidSpec"));
        assert!(get(&s, DEGRADED).message.contains("min 3"));
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn readiness_follows_the_ready_condition() {
        let mut m = minimal();
        assert!(!is_ready(&m));
        assert!(not_ready_reason(None).is_some());
        let d = deployment(1, 1, 1, 1, vec![]);
        m.status = Some(status_from(&m, Some(&d), None, at(1)));
        assert!(is_ready(&m));
        assert_eq!(not_ready_reason(Some(&m)), None);
        let d = deployment(1, 1, 1, 0, vec![]);
        m.status = Some(status_from(&m, Some(&d), None, at(2)));
        assert!(!is_ready(&m));
        assert!(not_ready_reason(Some(&m)).unwrap().contains("not Ready"));
    }

    #[test]
    fn ready_hands_back_only_a_ready_model() {
        let mut m = minimal();
        assert_eq!(ready(None), Err(not_ready_reason(None).unwrap()));
        assert!(ready(Some(m.clone())).unwrap_err().contains("not Ready"));
        let d = deployment(1, 1, 1, 1, vec![]);
        m.status = Some(status_from(&m, Some(&d), None, at(1)));
        assert_eq!(ready(Some(m.clone())).map(|r| r.status), Ok(m.status));
    }

    #[test]
    fn labels_and_selectors_match() {
        let valid = validate(&full()).unwrap();
        let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        let s = build_service(&valid);
        let spec = d.spec.unwrap();
        let selector = spec.selector.match_labels.unwrap();
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in [
            ("app.kubernetes.io/name", "imagegen"),
            ("app.kubernetes.io/instance", "sd15"),
            ("app.kubernetes.io/component", "runtime"),
            ("imagegen.dev/model", "sd15"),
        ] {
            assert_eq!(pod_labels.get(k).map(String::as_str), Some(v), "{k}");
            assert_eq!(selector.get(k).map(String::as_str), Some(v), "{k}");
        }
        let service_selector = s.spec.as_ref().unwrap().selector.clone().unwrap();
        assert_eq!(service_selector, selector);
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(d.metadata.labels.unwrap()["imagegen.dev/model"], "sd15");
    }

    #[test]
    fn service_maps_80_to_http() {
        let s = build_service(&validate(&minimal()).unwrap());
        assert_eq!(s.metadata.name.as_deref(), Some("sd15"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, 80);
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
    }

    // ---- status ----

    fn deployment(
        desired: i32,
        replicas: i32,
        updated: i32,
        ready: i32,
        conditions: Vec<(&str, &str, &str)>,
    ) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(5),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(desired),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(5),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                conditions: Some(
                    conditions
                        .into_iter()
                        .map(|(type_, status, reason)| DeploymentCondition {
                            type_: type_.into(),
                            status: status.into(),
                            reason: Some(reason.into()),
                            message: Some(format!("{reason} happened")),
                            ..DeploymentCondition::default()
                        })
                        .collect(),
                ),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn get<'a>(status: &'a DiffusionModelStatus, type_: &str) -> &'a Condition {
        find(&status.conditions, type_).unwrap()
    }

    fn state(status: &DiffusionModelStatus, type_: &str) -> (String, String) {
        let c = get(status, type_);
        (c.status.clone(), c.reason.clone())
    }

    fn pair(status: &str, reason: &str) -> (String, String) {
        (status.into(), reason.into())
    }

    #[test]
    fn ready_when_min_replicas_are_ready() {
        let m = full(); // min 2
        let d = deployment(
            2,
            2,
            2,
            2,
            vec![("Available", "True", "MinimumReplicasAvailable")],
        );
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, READY), pair("True", "ReplicasReady"));
        assert_eq!(state(&s, PROGRESSING), pair("False", "RolloutComplete"));
        assert_eq!(state(&s, DEGRADED), pair("False", "AsExpected"));
        assert_eq!((s.ready_replicas, s.replicas), (Some(2), Some(2)));
        assert_eq!(s.endpoint.as_deref(), Some("http://sd15.ml.svc:80"));
        assert_eq!(s.observed_generation, Some(3));
        assert!(s
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3)));
        assert!(s
            .conditions
            .iter()
            .all(|c| c.last_transition_time == at(100)));
    }

    #[test]
    fn a_read_write_once_cache_cannot_follow_max_above_one() {
        let mut m = full();
        m.spec.replicas = serde_json::from_value(json!({"min": 1, "max": 1})).unwrap();
        let one = validate(&m).unwrap();
        let claim = build_cache_claim(&one).unwrap();
        assert_eq!(cache_claim_unfit(&one, &claim), None);
        m.spec.replicas = serde_json::from_value(json!({"min": 1, "max": 3})).unwrap();
        let three = validate(&m).unwrap();
        let why = cache_claim_unfit(&three, &claim).unwrap();
        assert!(
            why.contains("ReadWriteOnce") && why.contains("replicas.max is 3"),
            "{why}"
        );
        assert_eq!(
            cache_claim_unfit(&three, &build_cache_claim(&three).unwrap()),
            None
        );
    }

    #[test]
    fn replicas_set_by_hand_are_kept_within_bounds() {
        let mut m = full();
        m.spec.replicas = serde_json::from_value(json!({"min": 1, "max": 4})).unwrap();
        let valid = validate(&m).unwrap();
        assert_eq!(desired_replicas(&valid, None), 1);
        for (current, kept) in [(Some(3), 3), (Some(0), 1), (Some(7), 4), (None, 1)] {
            let mut d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
            d.spec.as_mut().unwrap().replicas = current;
            assert_eq!(desired_replicas(&valid, Some(&d)), kept, "{current:?}");
        }
        // The scale subresource's count wins over the Deployment's, within bounds.
        for (count, applied) in [(2, 2), (9, 4), (0, 1)] {
            m.spec.replicas =
                serde_json::from_value(json!({"min": 1, "max": 4, "count": count})).unwrap();
            let valid = validate(&m).unwrap();
            let d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
            assert_eq!(desired_replicas(&valid, Some(&d)), applied, "{count}");
        }
    }

    #[test]
    fn a_cold_start_shows_on_ready_and_the_selector_is_reported() {
        let mut m = full();
        m.spec.replicas = serde_json::from_value(json!({"min": 0, "max": 2})).unwrap();
        let valid = validate(&m).unwrap();
        let mut d = build_deployment(&valid, &OperatorConfig::default(), &Found::default());
        d.spec.as_mut().unwrap().replicas = Some(1);
        let scaling = AutoscalingStatus {
            queue: 1,
            desired_replicas: 1,
            cold_start_time: Some(at(90)),
            ..AutoscalingStatus::default()
        };
        let s = status_from(&m, Some(&d), Some(scaling.clone()), at(100));
        let ready = find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ColdStart")
        );
        assert_eq!(s.autoscaling, Some(scaling));
        let selector = s.selector.clone().unwrap();
        assert!(
            selector.contains("app.kubernetes.io/component=runtime"),
            "{selector}"
        );
        assert_eq!(
            selector.split(',').count(),
            selector_labels(&valid.name).len()
        );
        // Serving nothing yet, but a training (its own Job and GPU) may use it.
        let mut starting = m.clone();
        starting.status = Some(s);
        assert!(not_ready_reason(Some(&starting)).is_some());
        assert!(trainable(Some(starting.clone())).is_ok());
        starting.status = None;
        assert!(trainable(Some(starting)).is_err());
        assert!(trainable(None).is_err());
    }

    #[test]
    fn progressing_while_rolling() {
        let m = full();
        // A new ReplicaSet with one updated replica, two old ones still serving.
        let d = deployment(
            2,
            3,
            1,
            2,
            vec![("Progressing", "True", "ReplicaSetUpdated")],
        );
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, READY), pair("True", "ReplicasReady"));
        assert_eq!(state(&s, PROGRESSING), pair("True", "RollingOut"));
        assert_eq!(state(&s, DEGRADED), pair("False", "AsExpected"));

        // Starting up: not ready yet, still progressing, not degraded.
        let d = deployment(
            2,
            2,
            2,
            0,
            vec![("Progressing", "True", "NewReplicaSetCreated")],
        );
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, READY), pair("False", "ReplicasNotReady"));
        assert_eq!(state(&s, PROGRESSING), pair("True", "RollingOut"));
        assert_eq!(state(&s, DEGRADED), pair("False", "AsExpected"));

        // The Deployment controller has not seen the latest spec yet.
        let mut d = deployment(2, 2, 2, 2, vec![]);
        d.metadata.generation = Some(6);
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, PROGRESSING), pair("True", "RollingOut"));
    }

    #[test]
    fn degraded_when_the_deployment_fails() {
        let m = full();
        let d = deployment(
            2,
            2,
            1,
            1,
            vec![("Progressing", "False", "ProgressDeadlineExceeded")],
        );
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(
            state(&s, DEGRADED),
            pair("True", "ProgressDeadlineExceeded")
        );
        assert_eq!(
            get(&s, DEGRADED).message,
            "ProgressDeadlineExceeded happened"
        );
        assert_eq!(state(&s, PROGRESSING), pair("False", "RolloutFailed"));
        assert_eq!(state(&s, READY), pair("False", "ReplicasNotReady"));

        let d = deployment(2, 0, 0, 0, vec![("ReplicaFailure", "True", "FailedCreate")]);
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, DEGRADED), pair("True", "FailedCreate"));

        // Rolled out, then a replica stopped being ready.
        let d = deployment(
            2,
            2,
            2,
            1,
            vec![("Progressing", "True", "NewReplicaSetAvailable")],
        );
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, DEGRADED), pair("True", "ReplicasUnavailable"));
        assert_eq!(state(&s, PROGRESSING), pair("False", "RolloutComplete"));
    }

    #[test]
    fn missing_deployment_is_progressing() {
        let s = status_from(&minimal(), None, None, at(100));
        assert_eq!(state(&s, READY), pair("False", "DeploymentMissing"));
        assert_eq!(state(&s, PROGRESSING), pair("True", "Creating"));
        assert_eq!(state(&s, DEGRADED), pair("False", "AsExpected"));
        assert_eq!(s.endpoint, None);
    }

    /// With replicas.min 0 and no replica the model is not Ready: a generation could not run
    /// (Ready with no pod made every generation fail as lost five times).
    #[test]
    fn scaled_to_zero_is_not_ready() {
        let mut m = minimal();
        m.spec.replicas = serde_json::from_value(json!({"min": 0, "max": 1})).unwrap();
        let d = deployment(0, 0, 0, 0, vec![]);
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, READY), pair("False", "ScaledToZero"));
        assert_eq!(state(&s, DEGRADED), pair("False", "AsExpected"));
        let d = deployment(1, 1, 1, 1, vec![]);
        let s = status_from(&m, Some(&d), None, at(100));
        assert_eq!(state(&s, READY), pair("True", "ReplicasReady"));
    }

    #[test]
    fn transition_times_move_only_with_the_status() {
        let mut m = full();
        let starting = deployment(2, 2, 2, 0, vec![]);
        m.status = Some(status_from(&m, Some(&starting), None, at(100)));

        // Same state later: every time is kept, the message may change.
        let one_ready = deployment(2, 2, 2, 1, vec![]);
        let s = status_from(&m, Some(&one_ready), None, at(200));
        assert!(s
            .conditions
            .iter()
            .all(|c| c.last_transition_time == at(100)));
        assert_eq!(get(&s, READY).message, "1 of 2 replicas ready");
        m.status = Some(s);

        // Ready and rolled out: Ready and Progressing flip, Degraded stays.
        let ready = deployment(2, 2, 2, 2, vec![]);
        let s = status_from(&m, Some(&ready), None, at(300));
        assert_eq!(get(&s, READY).last_transition_time, at(300));
        assert_eq!(get(&s, PROGRESSING).last_transition_time, at(300));
        assert_eq!(get(&s, DEGRADED).last_transition_time, at(100));
        assert_eq!(s.conditions.len(), 3);
    }
}
