//! LoraTraining: validation, the Job that runs `imagegen train`, its progress-token Secret,
//! and the status derived from the Job and the trainer's reports.
//!
//! The trainer reads its photos from and writes the LoRA to the runtime's store, under the
//! namespace's tenant root (`tenants/<namespace>/`). Paths passed to it are relative to the
//! store root, and the trainer resolves them in the store that `IMAGEGEN_STORE` names (the
//! claim mounted at [`STORE_MOUNT_PATH`], or S3), downloading the photos and uploading the LoRA.

use std::collections::BTreeMap;

use imagegen_crds::api::TrainerEvent;
use imagegen_crds::diffusion_model::{Dtype, DEFAULT_GPU_RESOURCE};
use imagegen_crds::lora_training::Artifact;
use imagegen_crds::{ImageRef, LoraTraining, LoraTrainingStatus, Phase, Progress, TrainingParams};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, Secret, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};

use crate::conditions::set_outcome;
use crate::diffusion_model::ValidModel;
use crate::workload::{self, Found};
use crate::{Error, OperatorConfig, STORE_MOUNT_PATH};

/// Label naming the LoraTraining a Job or Secret belongs to.
pub const TRAINING_LABEL: &str = "imagegen.dev/training";
/// Name of the trainer container.
pub const CONTAINER_NAME: &str = "trainer";
/// Key of the progress Secret holding the token.
pub const TOKEN_KEY: &str = "token";
/// Steps between the trainer's checkpoints: a retried pod resumes from the newest one.
pub const CHECKPOINT_EVERY: u32 = 100;
/// Longest LoraTraining name: its Job, `<name>-train`, names pods and labels them.
pub const MAX_TRAINING_NAME_CHARS: usize = 57;

/// A LoraTraining that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTraining {
    /// Name of the training, and of the LoRA it makes.
    pub name: String,
    /// Namespace, and tenant.
    pub namespace: String,
    /// Owner reference (controller) of the Job and the Secret.
    pub owner: OwnerReference,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The DiffusionModel trained on.
    pub model_name: String,
    /// The photos, as store paths relative to the store root.
    pub images: Vec<String>,
    /// The hyper-parameters.
    pub params: TrainingParams,
}

impl ValidTraining {
    /// Name of the training Job.
    pub fn job_name(&self) -> String {
        job_name(&self.name)
    }

    /// Name of the progress-token Secret.
    pub fn token_secret_name(&self) -> String {
        token_secret_name(&self.name)
    }

    /// Folder the trainer writes the LoRA to, relative to the store root.
    pub fn output_dir(&self) -> String {
        format!(
            "{}/{}",
            tenant_root(&self.namespace),
            imagegen_crds::api::lora_folder(&self.name)
        )
    }
}

/// Name of the Job of the training `name`.
pub fn job_name(name: &str) -> String {
    format!("{name}-train")
}

/// Name of the progress-token Secret of the training `name`.
pub fn token_secret_name(name: &str) -> String {
    format!("{name}-progress")
}

/// The tenant's folder in the store (the runtime's layout).
pub use imagegen_crds::api::tenant_root;

/// Where the LoRA of the training `name` is once trained, relative to the tenant's root: the
/// path an ImageGeneration passes to the runtime and the status reports.
pub fn artifact_path(name: &str) -> String {
    imagegen_crds::api::lora_file(name)
}

/// The URL the trainer of `namespace/name` posts its progress to.
pub fn progress_url(operator_url: &str, namespace: &str, name: &str) -> String {
    format!(
        "{}/v1/trainings/{namespace}/{name}/progress",
        operator_url.trim_end_matches('/')
    )
}

/// Checks the spec and resolves image references to store paths. Makes no API calls.
pub fn validate(training: &LoraTraining) -> Result<ValidTraining, Error> {
    const KIND: &str = "LoraTraining";
    let missing = |field| Error::MissingObjectKey { kind: KIND, field };
    let name = training.metadata.name.clone().ok_or(missing("name"))?;
    let namespace = training.namespace().ok_or(missing("namespace"))?;
    training.metadata.uid.as_ref().ok_or(missing("uid"))?;
    let owner = training.controller_owner_ref(&()).ok_or(missing("uid"))?;
    if name.len() > MAX_TRAINING_NAME_CHARS || name.contains('.') {
        return Err(Error::InvalidName {
            name,
            reason: "a LoraTraining name must be a DNS label of at most 57 characters",
        });
    }
    let spec = &training.spec;
    if spec.images.is_empty() {
        return Err(Error::UnsupportedInput {
            field: "images".into(),
            reason: "at least one image is needed".into(),
        });
    }
    let root = tenant_root(&namespace);
    let images = spec
        .images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let field = format!("images[{i}]");
            match image {
                ImageRef::Path(path) => {
                    workload::check_store_path(&field, path)?;
                    Ok(format!("{root}/{}", path.trim_start_matches("./")))
                }
                ImageRef::UploadId(id) => {
                    workload::check_upload_id(&field, id)?;
                    Ok(format!("{root}/{}", imagegen_crds::api::upload_file(id)))
                }
                ImageRef::Url(_) => Err(Error::UnsupportedInput {
                    field,
                    reason: "training images must be in the store: give a path or an uploadId"
                        .into(),
                }),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if spec.params.instance_prompt.trim().is_empty() {
        return Err(Error::UnsupportedInput {
            field: "instancePrompt".into(),
            reason: "must not be empty".into(),
        });
    }
    if spec.params.prior_preservation.is_some() && spec.params.class_prompt.is_none() {
        return Err(Error::UnsupportedInput {
            field: "priorPreservation".into(),
            reason: "needs a classPrompt".into(),
        });
    }
    Ok(ValidTraining {
        name,
        namespace,
        owner,
        generation: training.metadata.generation,
        model_name: spec.model_ref.name.clone(),
        images,
        params: spec.params.clone(),
    })
}

fn labels(name: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "imagegen"),
        ("app.kubernetes.io/component", "trainer"),
        ("app.kubernetes.io/managed-by", crate::FIELD_MANAGER),
        (TRAINING_LABEL, name),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn metadata(training: &ValidTraining, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(training.namespace.clone()),
        labels: Some(labels(&training.name)),
        owner_references: Some(vec![training.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The Secret holding the token the trainer authenticates its progress reports with. The
/// token is made once, when the Secret is created.
pub fn build_token_secret(training: &ValidTraining, token: &str) -> Secret {
    Secret {
        metadata: metadata(training, training.token_secret_name()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.into(), token.into())])),
        ..Secret::default()
    }
}

/// The token in a progress Secret as the API server returns it.
pub fn token_from_secret(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = std::str::from_utf8(&bytes.0).ok()?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// The arguments of `imagegen train` for `training` on `model`.
pub fn train_args(
    training: &ValidTraining,
    model: &ValidModel,
    config: &OperatorConfig,
) -> Vec<String> {
    let p = &training.params;
    let mut args: Vec<String> = vec!["train".into(), "--model".into(), model.model_arg.clone()];
    for image in &training.images {
        args.extend(["--images".into(), image.clone()]);
    }
    args.extend(["--instance-prompt".into(), p.instance_prompt.clone()]);
    let mut opt = |flag: &str, value: Option<String>| {
        if let Some(value) = value {
            args.extend([flag.to_string(), value]);
        }
    };
    opt("--class-prompt", p.class_prompt.clone());
    if let Some(prior) = &p.prior_preservation {
        opt("--class-images", prior.class_images.map(|n| n.to_string()));
        opt("--prior-weight", prior.weight.map(|w| w.to_string()));
    }
    opt("--steps", p.steps.map(|n| n.to_string()));
    opt("--rank", p.rank.map(|n| n.to_string()));
    opt("--alpha", p.alpha.map(|a| a.to_string()));
    opt("--lr", p.learning_rate.map(|lr| lr.to_string()));
    opt("--resolution", p.resolution.map(|n| n.to_string()));
    opt("--seed", p.seed.map(|n| n.to_string()));
    if p.train_text_encoder == Some(true) {
        args.push("--train-text-encoder".into());
    }
    // The model's dtype as the trainer's mixed precision: fp16 autocast needs CUDA, so it
    // is asked for only on NVIDIA GPUs (other devices train in float32).
    let precision = match model.dtype {
        Dtype::Bf16 => Some("bf16"),
        Dtype::F16 if model.gpu_resource_name == DEFAULT_GPU_RESOURCE => Some("fp16"),
        Dtype::F16 | Dtype::F32 => None,
    };
    if let Some(precision) = precision {
        args.extend(["--mixed-precision".into(), precision.into()]);
    }
    // A pod the Job retries continues from the last checkpoint instead of step 0.
    args.extend([
        "--checkpoint-every".into(),
        CHECKPOINT_EVERY.to_string(),
        "--resume".into(),
        "latest".into(),
        "--out".into(),
        training.output_dir(),
        "--progress-url".into(),
        progress_url(&config.operator_url, &training.namespace, &training.name),
    ]);
    args
}

/// The Job that trains the LoRA: one pod of `imagegen train` on the model's GPUs, retried
/// `backoffLimit` times, stopped after `activeDeadlineSeconds`.
pub fn build_job(
    training: &ValidTraining,
    model: &ValidModel,
    config: &OperatorConfig,
    found: &Found,
) -> Job {
    let mut env = vec![EnvVar {
        name: imagegen_crds::api::PROGRESS_TOKEN_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: training.token_secret_name(),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    env.extend(workload::cache_env());
    env.extend(workload::store_env(config));
    let store = workload::store_volume(config);
    // Replicas of a model that may scale share its cache claim (ReadWriteMany), so the
    // trainer can too; a ReadWriteOnce claim stays the Deployment's.
    let shared_cache = model
        .cache
        .as_ref()
        .filter(|_| model.max_replicas > 1)
        .map(|_| model.cache_claim_name());
    let (mut volumes, mut mounts) = workload::cache_and_tmp(shared_cache);
    let working_dir = store.as_ref().map(|_| STORE_MOUNT_PATH.to_string());
    if let Some((volume, mount)) = store {
        volumes.push(volume);
        mounts.push(mount);
    }
    let args = train_args(training, model, config);
    let container = Container {
        working_dir,
        ..workload::runtime_container(CONTAINER_NAME, config, model, args, env, mounts)
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        ..workload::runtime_pod(container, volumes, model, config, found)
    };
    let mut pod_labels = labels(&training.name);
    pod_labels.extend(workload::store_labels(config));
    Job {
        metadata: metadata(training, training.job_name()),
        spec: Some(JobSpec {
            backoff_limit: Some(config.training_backoff_limit),
            active_deadline_seconds: Some(config.training_deadline_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// What the trainer last reported, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainerReport {
    /// Steps done.
    pub step: u32,
    /// Steps in all.
    pub total: u32,
    /// Loss at the last step.
    pub loss: Option<f64>,
    /// The run's seed.
    pub seed: Option<u64>,
    /// The trainer's own failure message.
    pub failure: Option<String>,
}

impl TrainerReport {
    /// The report from a LoraTraining's status (what earlier reports left there).
    pub fn from_status(status: Option<&LoraTrainingStatus>) -> Self {
        let Some(status) = status else {
            return TrainerReport::default();
        };
        let progress = status.progress.unwrap_or_default();
        TrainerReport {
            step: progress.step,
            total: progress.total,
            loss: status.loss,
            seed: status.seed,
            failure: status.trainer_error.clone(),
        }
    }

    /// Folds one more event in. Steps never go back: a late report of an earlier step is
    /// ignored (a retried pod starts again from its last checkpoint and reports `started`).
    pub fn apply(&mut self, event: &TrainerEvent) {
        match event {
            TrainerEvent::Started { total, seed } => {
                self.total = *total;
                self.seed = Some(*seed);
                self.step = 0;
                // A new attempt: an earlier pod's failure no longer describes the training.
                self.failure = None;
            }
            TrainerEvent::Step {
                step, total, loss, ..
            } if *step >= self.step => {
                self.step = *step;
                self.total = *total;
                self.loss = Some(*loss);
            }
            TrainerEvent::Step { .. } | TrainerEvent::Checkpoint { .. } => {}
            TrainerEvent::Done {
                step, total, loss, ..
            } => {
                self.step = *step;
                self.total = *total;
                if loss.is_some() {
                    self.loss = *loss;
                }
            }
            TrainerEvent::Failed { message } => self.failure = Some(message.clone()),
        }
    }
}

/// Why a training waits or failed before it had a Job.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocked {
    /// Its model is missing or not Ready; the Job is created once it is.
    WaitingForModel(String),
    /// The spec cannot be trained.
    Invalid(String),
}

fn job_condition<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// The status of `training` from its Job (`None` before it exists), what blocks it (before
/// the Job exists) and the trainer's latest report. A finished training keeps its status.
///
/// - Pending: waiting for the model (`Complete` False, reason `WaitingForModel`), or the
///   Job exists and its pod has not started.
/// - Running: the Job has an active pod; progress and loss come from the report.
/// - Succeeded: the Job completed; the artifact is the LoRA in the tenant's store.
/// - Failed: invalid spec, or the Job failed (backoff limit, deadline); the message is the
///   trainer's own when it reported one.
pub fn status_from(
    training: &LoraTraining,
    job: Option<&Job>,
    blocked: Option<&Blocked>,
    report: &TrainerReport,
    now: Time,
) -> LoraTrainingStatus {
    let old = training.status.clone().unwrap_or_default();
    if old.phase.is_some_and(Phase::is_finished) {
        return old;
    }
    let generation = training.metadata.generation;
    let mut status = LoraTrainingStatus {
        conditions: old.conditions.clone(),
        observed_generation: generation,
        start_time: old.start_time.clone(),
        seed: report.seed.or(old.seed),
        loss: report.loss.or(old.loss),
        trainer_error: report.failure.clone(),
        progress: (report.total > 0).then(|| Progress::new(report.step, report.total)),
        ..LoraTrainingStatus::default()
    };
    let (phase, reason, message) = match (job, blocked) {
        (None, Some(Blocked::Invalid(message))) => (Phase::Failed, "InvalidSpec", message.clone()),
        (None, Some(Blocked::WaitingForModel(message))) => {
            (Phase::Pending, "WaitingForModel", message.clone())
        }
        (None, None) => (
            Phase::Pending,
            "CreatingJob",
            "creating the training Job".into(),
        ),
        (Some(job), _) => {
            let job_status = job.status.clone().unwrap_or_default();
            if job_condition(job, "Complete").is_some() {
                (
                    Phase::Succeeded,
                    "TrainingSucceeded",
                    "the LoRA is trained".into(),
                )
            } else if let Some(failed) = job_condition(job, "Failed") {
                let why = report.failure.clone().unwrap_or_else(|| {
                    failed
                        .message
                        .clone()
                        .unwrap_or_else(|| failed.reason.clone().unwrap_or_default())
                });
                let reason = match failed.reason.as_deref() {
                    Some("DeadlineExceeded") => "DeadlineExceeded",
                    Some("BackoffLimitExceeded") => "BackoffLimitExceeded",
                    _ => "JobFailed",
                };
                (Phase::Failed, reason, why)
            } else if job_status
                // A pod counts as active while it waits for a node; `ready` (Kubernetes
                // 1.24+) says it runs. Without it, active is the best there is.
                .ready
                .or(job_status.active)
                .unwrap_or(0)
                > 0
                || report.total > 0
            {
                let message = match (&report.failure, status.progress) {
                    // Until the Job retries or gives up.
                    (Some(failure), _) => format!("the trainer failed: {failure}"),
                    (None, Some(p)) => format!("step {} of {}", p.step, p.total),
                    (None, None) => "the trainer is starting".into(),
                };
                (Phase::Running, "Training", message)
            } else {
                (
                    Phase::Pending,
                    "JobCreated",
                    "waiting for the training pod".into(),
                )
            }
        }
    };

    set_outcome(
        &mut status.conditions,
        phase,
        reason,
        &message,
        generation,
        now.clone(),
    );
    if phase == Phase::Succeeded {
        // A retry succeeded: an earlier attempt's failure no longer describes the training.
        status.trainer_error = None;
        status.artifact = Some(Artifact {
            path: artifact_path(&training.name_any()),
            url: None,
            sha256: None,
        });
        if let Some(p) = status.progress {
            status.progress = Some(Progress::new(p.total, p.total));
        }
    }
    if let Some(job) = job {
        let job_status = job.status.clone().unwrap_or_default();
        status.start_time = status.start_time.or(job_status.start_time);
        if phase.is_finished() {
            status.completion_time = Some(job_status.completion_time.unwrap_or(now));
        }
    } else if phase.is_finished() {
        status.completion_time = Some(now);
    }
    status.phase = Some(phase);
    status.message = Some(message);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::find;
    use crate::diffusion_model;
    use imagegen_crds::common::condition_types::{COMPLETE, FAILED};
    use imagegen_crds::DiffusionModel;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn training(spec: serde_json::Value) -> LoraTraining {
        serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "LoraTraining",
            "metadata": {"name": "alice", "namespace": "team-a", "uid": "t-1", "generation": 1},
            "spec": spec,
        }))
        .unwrap()
    }

    fn full() -> LoraTraining {
        training(json!({
            "modelRef": {"name": "sd15"},
            "images": [{"path": "photos/1.jpg"}, {"uploadId": "up7"}],
            "instancePrompt": "a photo of sks person",
            "classPrompt": "a photo of a person",
            "priorPreservation": {"classImages": 50, "weight": 0.5},
            "steps": 400,
            "rank": 8,
            "alpha": 4.0,
            "learningRate": 0.0002,
            "resolution": 512,
            "trainTextEncoder": true,
            "seed": 42
        }))
    }

    fn minimal() -> LoraTraining {
        training(json!({
            "modelRef": {"name": "sd15"},
            "images": [{"path": "a.png"}],
            "instancePrompt": "sks"
        }))
    }

    fn model(spec: serde_json::Value) -> ValidModel {
        let m: DiffusionModel = serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "DiffusionModel",
            "metadata": {"name": "sd15", "namespace": "team-a", "uid": "m-1"},
            "spec": spec,
        }))
        .unwrap();
        diffusion_model::validate(&m).unwrap()
    }

    fn gpu_model() -> ValidModel {
        model(json!({
            "source": {"hub": {"repo": "owner/sd15"}},
            "family": "sd15",
            "replicas": {"min": 1, "max": 3},
            "resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu"},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "cache": {"size": "20Gi"}
        }))
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn pod(job: &Job) -> &PodSpec {
        job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    // ---- validate ----

    #[test]
    fn validate_resolves_images_into_the_tenant() {
        let valid = validate(&full()).unwrap();
        assert_eq!(
            valid.images,
            ["tenants/team-a/photos/1.jpg", "tenants/team-a/uploads/up7"]
        );
        assert_eq!(valid.model_name, "sd15");
        assert_eq!(valid.output_dir(), "tenants/team-a/loras/alice");
        assert_eq!(valid.job_name(), "alice-train");
        assert_eq!(valid.token_secret_name(), "alice-progress");
    }

    #[test]
    fn validate_refuses_what_leaves_the_tenant_or_the_store() {
        for (images, field) in [
            (json!([{"path": "../team-b/a.png"}]), "images[0]"),
            (
                json!([{"path": "a.png"}, {"path": "/etc/shadow"}]),
                "images[1]",
            ),
        ] {
            let t = training(json!({
                "modelRef": {"name": "sd15"}, "images": images, "instancePrompt": "p"
            }));
            let err = validate(&t).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidStorePath { field: f, .. } if f == field),
                "{err}"
            );
        }
        // An upload id is one name, as the runtime requires: never a path.
        for images in [
            json!([{"url": "https://x/a.png"}]),
            json!([{"uploadId": "../x"}]),
            json!([{"uploadId": "a/b"}]),
        ] {
            let t = training(json!({
                "modelRef": {"name": "sd15"}, "images": images, "instancePrompt": "p"
            }));
            assert!(matches!(
                validate(&t),
                Err(Error::UnsupportedInput { field, .. }) if field == "images[0]"
            ));
        }
        let mut t = minimal();
        t.spec.images.clear();
        assert!(matches!(validate(&t), Err(Error::UnsupportedInput { .. })));
        let mut t = minimal();
        t.spec.params.instance_prompt = "  ".into();
        assert!(matches!(validate(&t), Err(Error::UnsupportedInput { .. })));
        let mut t = minimal();
        t.metadata.name = Some("a".repeat(58));
        assert!(matches!(validate(&t), Err(Error::InvalidName { .. })));
        let mut t = minimal();
        t.metadata.uid = None;
        assert!(matches!(validate(&t), Err(Error::MissingObjectKey { .. })));
    }

    // ---- build ----

    #[test]
    fn job_runs_imagegen_train_with_every_parameter() {
        let config = OperatorConfig {
            operator_url: "http://op.sys.svc:8080/".into(),
            ..OperatorConfig::default()
        };
        let job = build_job(
            &validate(&full()).unwrap(),
            &gpu_model(),
            &config,
            &Found::default(),
        );
        let c = &pod(&job).containers[0];
        assert_eq!(c.command, Some(vec!["imagegen".to_string()]));
        let args = c.args.clone().unwrap();
        let expected: Vec<String> = [
            "train",
            "--model",
            "owner/sd15",
            "--images",
            "tenants/team-a/photos/1.jpg",
            "--images",
            "tenants/team-a/uploads/up7",
            "--instance-prompt",
            "a photo of sks person",
            "--class-prompt",
            "a photo of a person",
            "--class-images",
            "50",
            "--prior-weight",
            "0.5",
            "--steps",
            "400",
            "--rank",
            "8",
            "--alpha",
            "4",
            "--lr",
            "0.0002",
            "--resolution",
            "512",
            "--seed",
            "42",
            "--train-text-encoder",
            "--checkpoint-every",
            "100",
            "--resume",
            "latest",
            "--out",
            "tenants/team-a/loras/alice",
            "--progress-url",
            "http://op.sys.svc:8080/v1/trainings/team-a/alice/progress",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(args, expected);

        let args = train_args(&validate(&minimal()).unwrap(), &gpu_model(), &config);
        for flag in [
            "--class-prompt",
            "--steps",
            "--rank",
            "--seed",
            "--train-text-encoder",
        ] {
            assert!(!args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
    }

    #[test]
    fn mixed_precision_follows_the_model_dtype_and_device() {
        let training = validate(&minimal()).unwrap();
        let config = OperatorConfig::default();
        let precision = |spec: serde_json::Value| {
            let args = train_args(&training, &model(spec), &config);
            args.iter()
                .position(|a| a == "--mixed-precision")
                .map(|i| args[i + 1].clone())
        };
        let base = |extra: serde_json::Value| {
            let mut spec = json!({"source": {"path": "m"}, "family": "sd15"});
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            spec
        };
        assert_eq!(precision(base(json!({}))).as_deref(), Some("fp16"));
        assert_eq!(
            precision(base(json!({"dtype": "bf16"}))).as_deref(),
            Some("bf16")
        );
        assert_eq!(precision(base(json!({"dtype": "f32"}))), None);
        assert_eq!(
            precision(base(
                json!({"resources": {"gpuResourceName": "amd.com/gpu"}})
            )),
            None
        );
    }

    #[test]
    fn job_gets_the_models_gpus_and_scheduling() {
        let job = build_job(
            &validate(&full()).unwrap(),
            &gpu_model(),
            &OperatorConfig::default(),
            &crate::workload::Found::default(),
        );
        let spec = pod(&job);
        let limits = spec.containers[0]
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
        assert_eq!(
            spec.node_selector,
            Some(BTreeMap::from([("gpu".into(), "a100".into())]))
        );
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("gpu")
        );
        // The model may scale, so its cache claim is ReadWriteMany and shared.
        let cache = crate::workload::volume(spec, "cache");
        assert_eq!(
            cache.persistent_volume_claim.as_ref().unwrap().claim_name,
            "sd15-cache"
        );
        // A one-replica model keeps its claim; the trainer downloads into an emptyDir.
        let single =
            model(json!({"source": {"path": "m"}, "family": "sd15", "cache": {"size": "1Gi"}}));
        let job = build_job(
            &validate(&minimal()).unwrap(),
            &single,
            &OperatorConfig::default(),
            &crate::workload::Found::default(),
        );
        let cache = crate::workload::volume(pod(&job), "cache");
        assert!(cache.empty_dir.is_some());
    }

    #[test]
    fn job_limits_retries_and_time_and_runs_unprivileged() {
        let config = OperatorConfig {
            training_backoff_limit: 3,
            training_deadline_seconds: 600,
            ..OperatorConfig::default()
        };
        let job = build_job(
            &validate(&minimal()).unwrap(),
            &gpu_model(),
            &config,
            &Found::default(),
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(3));
        assert_eq!(spec.active_deadline_seconds, Some(600));
        let pod = pod(&job);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_ne!(psc.run_as_user, Some(0));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }

    #[test]
    fn job_is_owned_and_gets_the_token_and_the_store() {
        let config = OperatorConfig {
            store_url: Some("file:///store".into()),
            store_secret: Some("creds".into()),
            store_claim: Some("store-claim".into()),
            ..OperatorConfig::default()
        };
        let valid = validate(&minimal()).unwrap();
        let job = build_job(&valid, &gpu_model(), &config, &Found::default());
        assert_eq!(job.metadata.name.as_deref(), Some("alice-train"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            ("LoraTraining", "alice", "t-1", Some(true))
        );
        let c = &pod(&job).containers[0];
        let env = c.env.as_ref().unwrap();
        let token = env
            .iter()
            .find(|e| e.name == "IMAGEGEN_PROGRESS_TOKEN")
            .unwrap();
        let key = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("alice-progress", "token")
        );
        assert!(token.value.is_none());
        let store = env.iter().find(|e| e.name == "IMAGEGEN_STORE").unwrap();
        assert_eq!(store.value.as_deref(), Some("file:///store"));
        assert_eq!(
            c.env_from.as_ref().unwrap()[0]
                .secret_ref
                .as_ref()
                .unwrap()
                .name,
            "sd15-runtime-env",
            "the model's copy of the operator's Secret"
        );
        assert_eq!(c.working_dir.as_deref(), Some("/store"));
        assert!(c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/store"));

        let secret = build_token_secret(&valid, "s3cret");
        assert_eq!(secret.metadata.name.as_deref(), Some("alice-progress"));
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].uid,
            "t-1"
        );
        assert_eq!(secret.string_data.as_ref().unwrap()["token"], "s3cret");
        let mut stored = secret.clone();
        stored.data = Some(BTreeMap::from([(
            "token".to_string(),
            k8s_openapi::ByteString(b"s3cret".to_vec()),
        )]));
        assert_eq!(token_from_secret(&stored).as_deref(), Some("s3cret"));
        assert_eq!(token_from_secret(&Secret::default()), None);

        // Without a claim the Job has no store volume and keeps the image's working dir.
        let job = build_job(
            &valid,
            &gpu_model(),
            &OperatorConfig::default(),
            &Found::default(),
        );
        let c = &pod(&job).containers[0];
        assert_eq!(c.working_dir, None);
        assert!(c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.name != "IMAGEGEN_STORE"));
    }

    // ---- progress reports ----

    #[test]
    fn reports_fold_the_trainer_events() {
        let mut report = TrainerReport::default();
        report.apply(&TrainerEvent::Started {
            total: 800,
            seed: 9,
        });
        assert_eq!((report.total, report.seed), (800, Some(9)));
        let step = |step, loss| TrainerEvent::Step {
            step,
            total: 800,
            loss,
            lr: 1e-4,
            elapsed: 1.0,
            eta: 2.0,
        };
        report.apply(&step(20, 0.3));
        report.apply(&step(10, 0.9)); // late, out of order
        assert_eq!((report.step, report.loss), (20, Some(0.3)));
        report.apply(&TrainerEvent::Checkpoint {
            step: 20,
            path: "c".into(),
        });
        assert_eq!(report.step, 20);
        report.apply(&TrainerEvent::Done {
            step: 800,
            total: 800,
            output: "o".into(),
            loss: Some(0.1),
        });
        assert_eq!((report.step, report.loss), (800, Some(0.1)));
        report.apply(&TrainerEvent::Failed {
            message: "oom".into(),
        });
        assert_eq!(report.failure.as_deref(), Some("oom"));
    }

    // ---- status ----

    fn job(active: i32, condition: Option<(&str, &str)>) -> Job {
        Job {
            status: Some(JobStatus {
                active: Some(active),
                ready: Some(active),
                start_time: Some(at(50)),
                completion_time: condition.filter(|(t, _)| *t == "Complete").map(|_| at(90)),
                conditions: condition.map(|(type_, reason)| {
                    vec![JobCondition {
                        type_: type_.into(),
                        status: "True".into(),
                        reason: Some(reason.into()),
                        message: Some(format!("{reason} happened")),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    fn state(status: &LoraTrainingStatus, type_: &str) -> (String, String) {
        let c = find(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn pair(status: &str, reason: &str) -> (String, String) {
        (status.into(), reason.into())
    }

    #[test]
    fn pending_while_the_model_is_not_ready() {
        let t = minimal();
        let blocked = Blocked::WaitingForModel("the DiffusionModel does not exist".into());
        let s = status_from(&t, None, Some(&blocked), &TrainerReport::default(), at(10));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(state(&s, COMPLETE), pair("False", "WaitingForModel"));
        assert_eq!(state(&s, FAILED), pair("False", "WaitingForModel"));
        assert_eq!(
            s.message.as_deref(),
            Some("the DiffusionModel does not exist")
        );
        assert!(s
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(1)));
    }

    #[test]
    fn invalid_spec_fails_without_a_job() {
        let blocked = Blocked::Invalid("images[0]: bad".into());
        let s = status_from(
            &minimal(),
            None,
            Some(&blocked),
            &TrainerReport::default(),
            at(10),
        );
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(state(&s, FAILED), pair("True", "InvalidSpec"));
        assert_eq!(state(&s, COMPLETE), pair("True", "InvalidSpec"));
        assert_eq!(s.completion_time, Some(at(10)));
    }

    #[test]
    fn pending_then_running_then_succeeded() {
        let mut t = minimal();
        let none = TrainerReport::default();
        let s = status_from(&t, Some(&job(0, None)), None, &none, at(10));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(state(&s, COMPLETE), pair("False", "JobCreated"));
        t.status = Some(s);

        // Active but not ready: the pod waits for a node.
        let mut scheduling = job(1, None);
        scheduling.status.as_mut().unwrap().ready = Some(0);
        let s = status_from(&t, Some(&scheduling), None, &none, at(15));
        assert_eq!(s.phase, Some(Phase::Pending));

        let s = status_from(&t, Some(&job(1, None)), None, &none, at(20));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.start_time, Some(at(50)));
        assert_eq!(s.progress, None);
        t.status = Some(s);

        let mut report = TrainerReport::default();
        report.apply(&TrainerEvent::Started {
            total: 400,
            seed: 5,
        });
        report.apply(&TrainerEvent::Step {
            step: 100,
            total: 400,
            loss: 0.25,
            lr: 1e-4,
            elapsed: 10.0,
            eta: 30.0,
        });
        let s = status_from(&t, Some(&job(1, None)), None, &report, at(30));
        assert_eq!(s.progress, Some(Progress::new(100, 400)));
        assert_eq!((s.loss, s.seed), (Some(0.25), Some(5)));
        assert_eq!(s.message.as_deref(), Some("step 100 of 400"));
        // Running → Running keeps the transition time.
        assert_eq!(
            find(&s.conditions, COMPLETE).unwrap().last_transition_time,
            at(10)
        );
        t.status = Some(s);

        let s = status_from(
            &t,
            Some(&job(0, Some(("Complete", "CompletionsReached")))),
            None,
            &report,
            at(40),
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(state(&s, COMPLETE), pair("True", "TrainingSucceeded"));
        assert_eq!(state(&s, FAILED), pair("False", "TrainingSucceeded"));
        assert_eq!(
            find(&s.conditions, COMPLETE).unwrap().last_transition_time,
            at(40)
        );
        assert_eq!(
            s.artifact.as_ref().unwrap().path,
            "loras/alice/pytorch_lora_weights.safetensors"
        );
        assert_eq!(s.progress, Some(Progress::new(400, 400)));
        assert_eq!(s.completion_time, Some(at(90)));
        t.status = Some(s.clone());

        // Finished is final: the Job going away changes nothing.
        assert_eq!(status_from(&t, None, None, &none, at(99)), s);
    }

    #[test]
    fn failed_jobs_fail_the_training() {
        let t = minimal();
        let none = TrainerReport::default();
        for (reason, expected) in [
            ("BackoffLimitExceeded", "BackoffLimitExceeded"),
            ("DeadlineExceeded", "DeadlineExceeded"),
            ("PodFailurePolicy", "JobFailed"),
        ] {
            let s = status_from(
                &t,
                Some(&job(0, Some(("Failed", reason)))),
                None,
                &none,
                at(10),
            );
            assert_eq!(s.phase, Some(Phase::Failed));
            assert_eq!(state(&s, FAILED), pair("True", expected));
            assert_eq!(s.message, Some(format!("{reason} happened")));
            assert_eq!(s.artifact, None);
        }
        // The trainer's own message wins over the Job's.
        let mut report = TrainerReport::default();
        report.apply(&TrainerEvent::Failed {
            message: "CUDA out of memory".into(),
        });
        let s = status_from(
            &t,
            Some(&job(0, Some(("Failed", "BackoffLimitExceeded")))),
            None,
            &report,
            at(10),
        );
        assert_eq!(s.message.as_deref(), Some("CUDA out of memory"));
    }

    /// The trainer's failure reaches the final status through the status itself: the sink
    /// writes `trainerError`, and the reconciler, which reads its report from the status,
    /// names it when the Job fails. A retried pod's `started` clears it.
    #[test]
    fn the_trainers_failure_survives_into_the_failed_status() {
        let mut t = minimal();
        let mut report = TrainerReport::default();
        report.apply(&TrainerEvent::Started {
            total: 400,
            seed: 1,
        });
        report.apply(&TrainerEvent::Failed {
            message: "CUDA out of memory".into(),
        });
        // The pod has died; the Job has not yet decided.
        let s = status_from(&t, Some(&job(0, None)), None, &report, at(10));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.trainer_error.as_deref(), Some("CUDA out of memory"));
        assert_eq!(
            s.message.as_deref(),
            Some("the trainer failed: CUDA out of memory")
        );
        t.status = Some(s);

        // The next reconcile knows only the status.
        let from_status = TrainerReport::from_status(t.status.as_ref());
        assert_eq!(from_status.failure.as_deref(), Some("CUDA out of memory"));
        let s = status_from(
            &t,
            Some(&job(0, Some(("Failed", "BackoffLimitExceeded")))),
            None,
            &from_status,
            at(20),
        );
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.message.as_deref(), Some("CUDA out of memory"));
        assert_eq!(state(&s, FAILED), pair("True", "BackoffLimitExceeded"));

        // A retry that starts again clears it.
        let mut retried = from_status;
        retried.apply(&TrainerEvent::Started {
            total: 400,
            seed: 1,
        });
        assert_eq!(retried.failure, None);
        let s = status_from(&minimal(), Some(&job(1, None)), None, &retried, at(30));
        assert_eq!(s.trainer_error, None);
        assert_eq!(s.message.as_deref(), Some("step 0 of 400"));

        // Had a stale read put the failure back, success still clears it.
        let s = status_from(
            &minimal(),
            Some(&job(0, Some(("Complete", "Completed")))),
            None,
            &report,
            at(40),
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(s.trainer_error, None);
    }
}
