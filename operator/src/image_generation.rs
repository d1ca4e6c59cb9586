//! ImageGeneration: validation, the runtime request it becomes, and the status derived from
//! the runtime's job.
//!
//! A generation is submitted to its model's Service as an asynchronous job whose id is
//! derived from the resource's uid ([`job_id`]): the runtime answers a second submission of
//! the same id with the existing job, so an operator restart or a retry never makes a second
//! one. When the runtime lost the job (its pod died: `GET /v1/jobs/{id}` answers 404, or
//! nothing answers), the same request is submitted again after an exponential backoff, up to
//! [`OperatorConfig::max_submissions`](crate::OperatorConfig) submissions in all.

use std::time::Duration;

use imagegen_crds::api::{
    GenerationRequest, ImageInput, Job as RuntimeJob, JobState, LoraInput, ResponseFormat,
};
use imagegen_crds::common::condition_types::COMPLETE;
use imagegen_crds::image_generation::{GeneratedImage, LoraRef, Timings};
use imagegen_crds::{ImageGeneration, ImageGenerationStatus, ImageRef, LoraTraining, Mode, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::conditions::{condition, find, set_condition, set_outcome};
use crate::pod_choice::Choice;
use crate::{workload, Error};

/// Condition type: the runtime holds the job (True), or lost it (False, reason `JobLost`;
/// its `lastTransitionTime` is when).
pub const SUBMITTED: &str = "Submitted";
/// Annotation counting the submissions made so far (the first one and the resubmissions).
pub const SUBMISSIONS_ANNOTATION: &str = "imagegen.dev/submissions";
/// Delay before the first resubmission; it doubles with each one.
pub const RESUBMIT_BASE_DELAY: Duration = Duration::from_secs(5);
/// Longest delay between resubmissions.
pub const RESUBMIT_MAX_DELAY: Duration = Duration::from_secs(300);

/// An ImageGeneration that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    /// Name of the resource.
    pub name: String,
    /// Namespace, and tenant.
    pub namespace: String,
    /// The runtime job id.
    pub job_id: String,
    /// The DiffusionModel that runs it.
    pub model_name: String,
    /// LoRAs by LoraTraining name.
    pub loras: Vec<LoraRef>,
}

/// The runtime job id of the resource with `uid`: `ig-` and the uid, in the runtime's
/// alphabet (`[a-z0-9-]`, at most 64).
pub fn job_id(uid: &str) -> String {
    let clean: String = uid
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    let mut id = format!("ig-{clean}");
    id.truncate(imagegen_crds::api::MAX_JOB_ID_CHARS);
    id
}

/// Checks the spec: store paths stay in the tenant, and the object has its keys. Makes no
/// API calls.
pub fn validate(generation: &ImageGeneration) -> Result<ValidGeneration, Error> {
    const KIND: &str = "ImageGeneration";
    let missing = |field| Error::MissingObjectKey { kind: KIND, field };
    let name = generation.metadata.name.clone().ok_or(missing("name"))?;
    let namespace = generation.namespace().ok_or(missing("namespace"))?;
    let uid = generation.metadata.uid.clone().ok_or(missing("uid"))?;
    let spec = &generation.spec;
    for (field, image) in [("image", &spec.image), ("mask", &spec.mask)] {
        match image {
            Some(ImageRef::Path(path)) => workload::check_store_path(field, path)?,
            Some(ImageRef::UploadId(id)) => workload::check_upload_id(field, id)?,
            Some(ImageRef::Url(url))
                if !(url.starts_with("https://") || url.starts_with("http://")) =>
            {
                return Err(Error::UnsupportedInput {
                    field: field.into(),
                    reason: format!("url {url:?} is not http(s)"),
                })
            }
            _ => {}
        }
    }
    // RemoveObject alone may leave the prompt empty (the runtime fills in "background").
    if spec.params.prompt.trim().is_empty() && spec.params.mode != Some(Mode::RemoveObject) {
        return Err(Error::UnsupportedInput {
            field: "prompt".into(),
            reason: "must not be empty".into(),
        });
    }
    Ok(ValidGeneration {
        name,
        namespace,
        job_id: job_id(&uid),
        model_name: spec.model_ref.name.clone(),
        loras: spec.loras.clone(),
    })
}

/// Why a generation cannot be submitted (yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Blocked {
    /// The spec cannot run (final).
    Invalid(String),
    /// The model is missing or not Ready.
    WaitingForModel(String),
    /// A LoRA's training is missing or has not succeeded yet.
    WaitingForLora(String),
    /// A LoRA's training failed (final).
    LoraFailed(String),
    /// The runtime refused the request (final).
    Rejected(String),
}

impl Blocked {
    fn describe(&self) -> (Phase, &'static str, &str) {
        match self {
            Blocked::Invalid(m) => (Phase::Failed, "InvalidSpec", m),
            Blocked::WaitingForModel(m) => (Phase::Pending, "WaitingForModel", m),
            Blocked::WaitingForLora(m) => (Phase::Pending, "WaitingForLora", m),
            Blocked::LoraFailed(m) => (Phase::Failed, "LoraFailed", m),
            Blocked::Rejected(m) => (Phase::Failed, "RejectedByRuntime", m),
        }
    }
}

/// The LoRAs of `valid` as runtime inputs, from the LoraTrainings of the same namespace
/// (`trainings[i]` is the one named by `valid.loras[i]`, `None` when it does not exist).
/// Each must have Succeeded; its artifact path is passed so the runtime loads exactly it.
pub fn resolve_loras(
    valid: &ValidGeneration,
    trainings: &[Option<LoraTraining>],
) -> Result<Vec<LoraInput>, Blocked> {
    valid
        .loras
        .iter()
        .zip(trainings)
        .map(|(lora, training)| {
            let Some(training) = training else {
                return Err(Blocked::WaitingForLora(format!(
                    "the LoraTraining {} does not exist",
                    lora.name
                )));
            };
            if training.namespace().as_deref() != Some(valid.namespace.as_str()) {
                return Err(Blocked::Invalid(format!(
                    "the LoRA {} is not in namespace {}",
                    lora.name, valid.namespace
                )));
            }
            let status = training.status.clone().unwrap_or_default();
            match (status.phase, status.artifact) {
                (Some(Phase::Succeeded), Some(artifact)) => Ok(LoraInput {
                    name: lora.name.clone(),
                    weight: lora.weight,
                    path: Some(artifact.path),
                }),
                (Some(Phase::Failed), _) => Err(Blocked::LoraFailed(format!(
                    "the LoraTraining {} failed",
                    lora.name
                ))),
                _ => Err(Blocked::WaitingForLora(format!(
                    "the LoraTraining {} has not succeeded yet",
                    lora.name
                ))),
            }
        })
        .collect()
}

/// The body of `POST /v1/generations` for `generation`, with the resolved LoRAs.
pub fn build_request(
    generation: &ImageGeneration,
    valid: &ValidGeneration,
    loras: Vec<LoraInput>,
) -> GenerationRequest {
    let spec = &generation.spec;
    GenerationRequest {
        params: spec.params.clone(),
        model: None,
        loras,
        image: spec.image.clone().map(ImageInput::from),
        mask: spec.mask.clone().map(ImageInput::from),
        mask_prompt: spec.mask_prompt.clone(),
        job_id: Some(valid.job_id.clone()),
        webhook_url: None,
        deadline_seconds: None,
        response_format: Some(ResponseFormat::Url),
    }
}

/// Submissions made so far, from the annotation.
pub fn submissions(generation: &ImageGeneration) -> u32 {
    generation
        .annotations()
        .get(SUBMISSIONS_ANNOTATION)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Delay before resubmitting after `submissions` submissions: 5 s, 10 s, 20 s, … up to 5 min.
pub fn resubmit_delay(submissions: u32) -> Duration {
    crate::doubling_delay(submissions, RESUBMIT_BASE_DELAY, RESUBMIT_MAX_DELAY)
}

/// What to do once the runtime lost the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLoss {
    /// Submit again now.
    Resubmit,
    /// Wait this long first.
    Wait(Duration),
    /// The submissions are used up.
    GiveUp,
}

/// The next step after the runtime lost the job at `lost_at`, `submissions` made so far.
pub fn after_loss(submissions: u32, max: u32, lost_at: &Time, now: &Time) -> AfterLoss {
    if submissions >= max {
        return AfterLoss::GiveUp;
    }
    let elapsed = now.0.duration_since(lost_at.0);
    let delay = resubmit_delay(submissions);
    match elapsed.try_into() {
        Ok(elapsed) if elapsed >= delay => AfterLoss::Resubmit,
        Ok(elapsed) => AfterLoss::Wait(delay - elapsed),
        // Negative: clocks disagree; wait the whole delay.
        Err(_) => AfterLoss::Wait(delay),
    }
}

/// When the runtime lost the job: the `lastTransitionTime` of a False Submitted condition.
pub fn lost_at(generation: &ImageGeneration) -> Option<Time> {
    let status = generation.status.as_ref()?;
    find(&status.conditions, SUBMITTED)
        .filter(|c| c.status == "False" && c.reason == "JobLost")
        .map(|c| c.last_transition_time.clone())
}

/// How long until a finished generation with `ttlSecondsAfterFinished` must be deleted
/// (zero: now), or `None` when it is not finished or has no TTL.
pub fn ttl_remaining(generation: &ImageGeneration, now: &Time) -> Option<Duration> {
    let ttl = generation.spec.ttl_seconds_after_finished?;
    let status = generation.status.as_ref()?;
    if !status.phase.is_some_and(Phase::is_finished) {
        return None;
    }
    let finished = status
        .timings
        .as_ref()
        .and_then(|t| t.completion_time.clone())
        .or_else(|| find(&status.conditions, COMPLETE).map(|c| c.last_transition_time.clone()))?;
    let deadline = Time(finished.0 + Duration::from_secs(u64::from(ttl)));
    Some(crate::time_between(now, &deadline))
}

struct StatusBuilder<'a> {
    generation: &'a ImageGeneration,
    status: ImageGenerationStatus,
    now: Time,
}

impl<'a> StatusBuilder<'a> {
    fn new(generation: &'a ImageGeneration, now: Time) -> Self {
        let old = generation.status.clone().unwrap_or_default();
        StatusBuilder {
            generation,
            status: ImageGenerationStatus {
                conditions: old.conditions,
                progress: old.progress,
                timings: old.timings,
                observed_generation: generation.metadata.generation,
                runtime_pod: old.runtime_pod,
                ..ImageGenerationStatus::default()
            },
            now,
        }
    }

    fn set(&mut self, type_: &str, value: bool, reason: &str, message: &str) {
        set_condition(
            &mut self.status.conditions,
            condition(
                type_,
                value,
                reason,
                message,
                self.generation.metadata.generation,
            ),
            self.now.clone(),
        );
    }

    fn finish(mut self, phase: Phase, reason: &str, message: String) -> ImageGenerationStatus {
        set_outcome(
            &mut self.status.conditions,
            phase,
            reason,
            &message,
            self.generation.metadata.generation,
            self.now.clone(),
        );
        if phase.is_finished() {
            let timings = self.status.timings.get_or_insert_with(Timings::default);
            if timings.completion_time.is_none() {
                timings.completion_time = Some(self.now.clone());
            }
        }
        self.status.phase = Some(phase);
        self.status.message = Some(message);
        self.status
    }
}

fn parse_time(rfc3339: Option<&String>) -> Option<Time> {
    rfc3339?.parse().ok().map(Time)
}

/// A runtime image URL as clients outside the pod can use it: relative URLs are resolved
/// against the model's endpoint.
fn absolute_url(url: &str, endpoint: &str) -> String {
    if url.starts_with('/') {
        format!("{}{url}", endpoint.trim_end_matches('/'))
    } else {
        url.to_string()
    }
}

/// The status of a generation that is blocked before submission.
pub fn status_blocked(
    generation: &ImageGeneration,
    blocked: &Blocked,
    now: Time,
) -> ImageGenerationStatus {
    if let Some(done) = finished(generation) {
        return done;
    }
    let (phase, reason, message) = blocked.describe();
    StatusBuilder::new(generation, now).finish(phase, reason, message.to_string())
}

fn finished(generation: &ImageGeneration) -> Option<ImageGenerationStatus> {
    generation
        .status
        .clone()
        .filter(|s| s.phase.is_some_and(Phase::is_finished))
}

/// The status of a generation from the runtime's job. `endpoint` is the model's Service URL
/// (image URLs the runtime gives relative are made absolute with it).
///
/// - queued → Pending (message: position in the queue)
/// - running → Running, with progress
/// - succeeded → Succeeded, with the images (URL, seed, sha256) and timings
/// - failed, cancelled → Failed, with the runtime's error message
pub fn status_from_job(
    generation: &ImageGeneration,
    job: &RuntimeJob,
    endpoint: &str,
    now: Time,
) -> ImageGenerationStatus {
    if let Some(done) = finished(generation) {
        return done;
    }
    let mut b = StatusBuilder::new(generation, now);
    // Polls keep the message of the submission (which pod, and why it was chosen).
    let accepted = generation
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, SUBMITTED))
        .filter(|c| c.status == "True" && c.reason == "Accepted")
        .map(|c| c.message.clone());
    b.set(
        SUBMITTED,
        true,
        "Accepted",
        &accepted.unwrap_or_else(|| format!("runtime job {}", job.id)),
    );
    b.status.progress = Some(job.progress);
    let timings = b.status.timings.get_or_insert_with(Timings::default);
    timings.start_time = parse_time(job.started_at.as_ref()).or(timings.start_time.take());
    if job.state.is_finished() {
        timings.completion_time = parse_time(job.finished_at.as_ref());
    }
    let error = job
        .error
        .as_ref()
        .map(|e| format!("{}: {}", e.code, e.message));
    match job.state {
        JobState::Queued => {
            let message = match job.queue_position {
                Some(position) => format!("queued, {position} jobs ahead"),
                None => "queued".into(),
            };
            b.finish(Phase::Pending, "Queued", message)
        }
        JobState::Running => {
            let p = job.progress;
            b.finish(
                Phase::Running,
                "Generating",
                format!("step {} of {}", p.step, p.total),
            )
        }
        JobState::Succeeded => {
            let result = job.result.clone().unwrap_or_default();
            b.status.images = result
                .images
                .iter()
                .map(|image| GeneratedImage {
                    url: absolute_url(&image.url, endpoint),
                    seed: image.seed,
                    sha256: image.sha256.clone(),
                })
                .collect();
            let timings = b.status.timings.get_or_insert_with(Timings::default);
            timings.queued_seconds = result.timings.queued_seconds;
            timings.inference_seconds = result.timings.inference_seconds;
            timings.total_seconds = result.timings.total_seconds;
            let mut message = format!("{} images", result.images.len());
            if !result.withheld.is_empty() {
                message.push_str(&format!(
                    ", {} withheld by the safety policy",
                    result.withheld.len()
                ));
            }
            b.finish(Phase::Succeeded, "Succeeded", message)
        }
        JobState::Failed => b.finish(
            Phase::Failed,
            "GenerationFailed",
            error.unwrap_or_else(|| "the runtime reports a failure".into()),
        ),
        JobState::Cancelled => b.finish(
            Phase::Failed,
            "Cancelled",
            error.unwrap_or_else(|| "the job was cancelled".into()),
        ),
    }
}

/// The status of a job just accepted by the pod that `choice` chose, for a request with
/// `loras` LoRAs: the pod recorded, and the Submitted condition saying why it was chosen
/// (polls keep that message).
pub fn status_dispatched(
    generation: &ImageGeneration,
    job: &RuntimeJob,
    endpoint: &str,
    choice: &Choice,
    loras: usize,
    now: Time,
) -> ImageGenerationStatus {
    let mut status = status_from_job(generation, job, endpoint, now.clone());
    status.runtime_pod = Some(choice.pod.clone());
    let ahead = choice
        .load
        .map_or("unknown".into(), |jobs| jobs.to_string());
    let message = format!(
        "runtime job {} on pod {} ({}: {ahead} jobs ahead, {} of {loras} LoRAs warm)",
        job.id,
        choice.pod.name,
        choice.reason.label(),
        choice.warm_loras
    );
    set_condition(
        &mut status.conditions,
        condition(
            SUBMITTED,
            true,
            "Accepted",
            &message,
            generation.metadata.generation,
        ),
        now,
    );
    status
}

/// The status once the runtime lost the job (`why`: what the runtime answered), after
/// `submissions` submissions: the phase is kept while resubmissions remain, and becomes
/// Failed when they are used up.
pub fn status_lost(
    generation: &ImageGeneration,
    submissions: u32,
    max: u32,
    why: &str,
    now: Time,
) -> ImageGenerationStatus {
    if let Some(done) = finished(generation) {
        return done;
    }
    let mut b = StatusBuilder::new(generation, now);
    b.set(SUBMITTED, false, "JobLost", why);
    if submissions >= max {
        return b.finish(
            Phase::Failed,
            "RuntimeLostJob",
            format!("the runtime lost the job {submissions} times; last: {why}"),
        );
    }
    let phase = generation
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(Phase::Pending);
    let delay = resubmit_delay(submissions);
    b.finish(
        phase,
        "Resubmitting",
        format!(
            "the runtime lost the job ({why}); submission {} of {max} in {}s",
            submissions + 1,
            delay.as_secs()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagegen_crds::api::{
        ErrorDetail, GenerationResult, ImageResult, JobKind, JobTimings, WithheldImage,
    };
    use imagegen_crds::common::condition_types::FAILED;
    use imagegen_crds::Progress;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    const UID: &str = "6A1B2C3D-0000-4000-8000-00000000abcd";

    fn generation(spec: serde_json::Value) -> ImageGeneration {
        serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "ImageGeneration",
            "metadata": {"name": "avatar", "namespace": "team-a", "uid": UID, "generation": 2},
            "spec": spec,
        }))
        .unwrap()
    }

    fn inpaint() -> ImageGeneration {
        generation(json!({
            "modelRef": {"name": "sd15"},
            "prompt": "sks person as an astronaut",
            "mode": "Inpaint",
            "steps": 20,
            "seed": 7,
            "count": 2,
            "loras": [{"name": "alice", "weight": 0.8}, {"name": "style"}],
            "image": {"uploadId": "up1"},
            "maskPrompt": "the background",
            "ttlSecondsAfterFinished": 60
        }))
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn training(name: &str, namespace: &str, phase: Option<Phase>) -> LoraTraining {
        let mut t: LoraTraining = serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "LoraTraining",
            "metadata": {"name": name, "namespace": namespace, "uid": "t"},
            "spec": {"modelRef": {"name": "sd15"}, "images": [{"path": "a"}], "instancePrompt": "p"},
        }))
        .unwrap();
        t.status = phase.map(|phase| imagegen_crds::LoraTrainingStatus {
            phase: Some(phase),
            artifact: (phase == Phase::Succeeded).then(|| imagegen_crds::lora_training::Artifact {
                path: crate::lora_training::artifact_path(name),
                url: None,
                sha256: None,
            }),
            ..Default::default()
        });
        t
    }

    fn runtime_job(state: JobState) -> RuntimeJob {
        RuntimeJob {
            id: job_id(UID),
            kind: JobKind::Generation,
            state,
            queue_position: (state == JobState::Queued).then_some(3),
            progress: match state {
                JobState::Queued => Progress::new(0, 40),
                JobState::Running => Progress::new(10, 40),
                _ => Progress::new(40, 40),
            },
            created_at: "1970-01-01T00:01:40Z".into(),
            started_at: (state != JobState::Queued).then(|| "1970-01-01T00:01:50Z".into()),
            finished_at: state.is_finished().then(|| "1970-01-01T00:02:30Z".into()),
            result: (state == JobState::Succeeded).then(|| GenerationResult {
                images: vec![
                    ImageResult {
                        id: "i0".into(),
                        url: "/v1/images/i0.png".into(),
                        seed: 7,
                        sha256: "aa".into(),
                        width: 512,
                        height: 512,
                        b64_json: None,
                    },
                    ImageResult {
                        id: "i1".into(),
                        url: "https://cdn/x/i1.png".into(),
                        seed: 8,
                        sha256: "bb".into(),
                        width: 512,
                        height: 512,
                        b64_json: None,
                    },
                ],
                withheld: vec![WithheldImage {
                    index: 2,
                    seed: 9,
                    reason: "nsfw".into(),
                }],
                timings: JobTimings {
                    queued_seconds: Some(10.0),
                    inference_seconds: Some(40.0),
                    total_seconds: Some(50.0),
                },
            }),
            training: None,
            error: matches!(state, JobState::Failed | JobState::Cancelled).then(|| ErrorDetail {
                code: "internal".into(),
                message: "CUDA error".into(),
                field: None,
                retryable: None,
            }),
        }
    }

    fn cond(status: &ImageGenerationStatus, type_: &str) -> (String, String) {
        let c = find(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn pair(status: &str, reason: &str) -> (String, String) {
        (status.into(), reason.into())
    }

    // ---- validate and build ----

    #[test]
    fn job_id_is_derived_from_the_uid() {
        let id = job_id(UID);
        assert_eq!(id, format!("ig-{}", UID.to_ascii_lowercase()));
        assert!(id.len() <= 64);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_eq!(job_id(UID), job_id(UID));
        assert_ne!(job_id(UID), job_id("other"));
        assert_eq!(job_id(&"x".repeat(100)).len(), 64);
        assert_eq!(job_id("a_b.c"), "ig-abc");
    }

    #[test]
    fn validate_refuses_paths_outside_the_tenant() {
        let v = validate(&inpaint()).unwrap();
        assert_eq!(v.job_id, job_id(UID));
        assert_eq!(
            (v.name.as_str(), v.namespace.as_str(), v.model_name.as_str()),
            ("avatar", "team-a", "sd15")
        );
        for (field, image) in [
            ("image", json!({"path": "../team-b/secret.png"})),
            ("mask", json!({"path": "/abs.png"})),
        ] {
            let mut g = inpaint();
            let r: ImageRef = serde_json::from_value(image).unwrap();
            if field == "image" {
                g.spec.image = Some(r);
            } else {
                g.spec.mask = Some(r);
                g.spec.mask_prompt = None;
            }
            assert!(
                matches!(validate(&g), Err(Error::InvalidStorePath { field: f, .. }) if f == field),
                "{field}"
            );
        }
        let mut g = inpaint();
        g.spec.image = Some(ImageRef::Url("file:///etc/passwd".into()));
        assert!(matches!(validate(&g), Err(Error::UnsupportedInput { .. })));
        // An upload id is one name, as the runtime requires: never a path.
        for bad in ["a/b", "../x", ".hidden", ""] {
            let mut g = inpaint();
            g.spec.image = Some(ImageRef::UploadId(bad.into()));
            assert!(
                matches!(validate(&g), Err(Error::UnsupportedInput { field, .. }) if field == "image"),
                "{bad}"
            );
        }
        let mut g = inpaint();
        g.spec.image = Some(ImageRef::UploadId("up-1.png".into()));
        assert!(validate(&g).is_ok());
        let mut g = inpaint();
        g.spec.params.prompt = " ".into();
        assert!(
            matches!(validate(&g), Err(Error::UnsupportedInput { field, .. }) if field == "prompt")
        );
        g.spec.params.mode = Some(Mode::RemoveObject);
        assert!(validate(&g).is_ok());
        let mut g = inpaint();
        g.metadata.uid = None;
        assert!(matches!(
            validate(&g),
            Err(Error::MissingObjectKey { field: "uid", .. })
        ));
    }

    #[test]
    fn loras_resolve_to_succeeded_trainings_of_the_namespace() {
        let g = inpaint();
        let v = validate(&g).unwrap();
        let ok = [
            Some(training("alice", "team-a", Some(Phase::Succeeded))),
            Some(training("style", "team-a", Some(Phase::Succeeded))),
        ];
        let loras = resolve_loras(&v, &ok).unwrap();
        assert_eq!(
            loras,
            vec![
                LoraInput {
                    name: "alice".into(),
                    weight: Some(0.8),
                    path: Some("loras/alice/pytorch_lora_weights.safetensors".into())
                },
                LoraInput {
                    name: "style".into(),
                    weight: None,
                    path: Some("loras/style/pytorch_lora_weights.safetensors".into())
                },
            ]
        );
        let check =
            |trainings: [Option<LoraTraining>; 2]| resolve_loras(&v, &trainings).unwrap_err();
        assert!(matches!(
            check([ok[0].clone(), None]),
            Blocked::WaitingForLora(m) if m.contains("style")
        ));
        assert!(matches!(
            check([
                ok[0].clone(),
                Some(training("style", "team-a", Some(Phase::Running)))
            ]),
            Blocked::WaitingForLora(_)
        ));
        assert!(matches!(
            check([Some(training("alice", "team-a", Some(Phase::Failed))), ok[1].clone()]),
            Blocked::LoraFailed(m) if m.contains("alice")
        ));
        assert!(matches!(
            check([
                Some(training("alice", "team-b", Some(Phase::Succeeded))),
                ok[1].clone()
            ]),
            Blocked::Invalid(_)
        ));
    }

    #[test]
    fn request_is_the_spec_with_references_resolved() {
        let g = inpaint();
        let v = validate(&g).unwrap();
        let loras = vec![LoraInput {
            name: "alice".into(),
            weight: Some(0.8),
            path: Some("loras/alice/pytorch_lora_weights.safetensors".into()),
        }];
        let request = build_request(&g, &v, loras.clone());
        assert_eq!(request.params, g.spec.params);
        assert_eq!(request.loras, loras);
        assert_eq!(request.image, Some(ImageInput::UploadId("up1".into())));
        assert_eq!(request.mask, None);
        assert_eq!(request.mask_prompt.as_deref(), Some("the background"));
        assert_eq!(request.job_id, Some(job_id(UID)));
        assert_eq!(request.model, None);
        let body = serde_json::to_value(&request).unwrap();
        assert_eq!(body["prompt"], "sks person as an astronaut");
        assert_eq!(body["jobId"], job_id(UID));
        assert!(body.get("modelRef").is_none() && body.get("ttlSecondsAfterFinished").is_none());
        // The same resource always makes the same request: resubmission is idempotent.
        assert_eq!(build_request(&g, &v, loras.clone()), request);
    }

    // ---- resubmission ----

    #[test]
    fn resubmission_backs_off_exponentially_up_to_the_limit() {
        assert_eq!(resubmit_delay(1), Duration::from_secs(5));
        assert_eq!(resubmit_delay(2), Duration::from_secs(10));
        assert_eq!(resubmit_delay(3), Duration::from_secs(20));
        assert_eq!(resubmit_delay(30), RESUBMIT_MAX_DELAY);
        assert_eq!(
            after_loss(1, 5, &at(100), &at(100)),
            AfterLoss::Wait(Duration::from_secs(5))
        );
        assert_eq!(
            after_loss(1, 5, &at(100), &at(103)),
            AfterLoss::Wait(Duration::from_secs(2))
        );
        assert_eq!(after_loss(1, 5, &at(100), &at(105)), AfterLoss::Resubmit);
        assert_eq!(
            after_loss(3, 5, &at(100), &at(110)),
            AfterLoss::Wait(Duration::from_secs(10))
        );
        assert_eq!(after_loss(5, 5, &at(100), &at(1000)), AfterLoss::GiveUp);
        assert_eq!(
            after_loss(1, 5, &at(100), &at(90)),
            AfterLoss::Wait(Duration::from_secs(5))
        );
        let mut g = inpaint();
        assert_eq!(submissions(&g), 0);
        g.metadata.annotations =
            Some([(SUBMISSIONS_ANNOTATION.to_string(), "3".to_string())].into());
        assert_eq!(submissions(&g), 3);
    }

    #[test]
    fn lost_job_keeps_the_phase_then_fails() {
        let mut g = inpaint();
        g.status = Some(status_from_job(
            &g,
            &runtime_job(JobState::Running),
            "http://m",
            at(100),
        ));
        let s = status_lost(&g, 1, 3, "404 not_found", at(110));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(cond(&s, SUBMITTED), pair("False", "JobLost"));
        assert_eq!(cond(&s, COMPLETE), pair("False", "Resubmitting"));
        assert!(
            s.message.as_deref().unwrap().contains("submission 2 of 3"),
            "{:?}",
            s.message
        );
        g.status = Some(s);
        assert_eq!(lost_at(&g), Some(at(110)));

        // Resubmitted: Submitted flips back.
        let s = status_from_job(&g, &runtime_job(JobState::Queued), "http://m", at(120));
        assert_eq!(cond(&s, SUBMITTED), pair("True", "Accepted"));
        assert_eq!(s.phase, Some(Phase::Pending));
        g.status = Some(s);
        assert_eq!(lost_at(&g), None);

        let s = status_lost(&g, 3, 3, "connection refused", at(130));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, FAILED), pair("True", "RuntimeLostJob"));
        assert_eq!(cond(&s, COMPLETE), pair("True", "RuntimeLostJob"));
        assert!(s.message.unwrap().contains("connection refused"));
    }

    // ---- status ----

    #[test]
    fn blocked_states() {
        let g = inpaint();
        for (blocked, phase, reason) in [
            (
                Blocked::WaitingForModel("m".into()),
                Phase::Pending,
                "WaitingForModel",
            ),
            (
                Blocked::WaitingForLora("l".into()),
                Phase::Pending,
                "WaitingForLora",
            ),
            (Blocked::LoraFailed("f".into()), Phase::Failed, "LoraFailed"),
            (Blocked::Invalid("i".into()), Phase::Failed, "InvalidSpec"),
            (
                Blocked::Rejected("r".into()),
                Phase::Failed,
                "RejectedByRuntime",
            ),
        ] {
            let s = status_blocked(&g, &blocked, at(10));
            assert_eq!(s.phase, Some(phase), "{reason}");
            let finished = phase.is_finished();
            assert_eq!(
                cond(&s, COMPLETE),
                pair(if finished { "True" } else { "False" }, reason)
            );
            assert_eq!(cond(&s, FAILED).0, if finished { "True" } else { "False" });
            assert_eq!(s.observed_generation, Some(2));
            assert!(s
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(2)));
            assert_eq!(
                s.timings.is_some_and(|t| t.completion_time == Some(at(10))),
                finished
            );
        }
    }

    #[test]
    fn queued_running_succeeded() {
        let mut g = inpaint();
        let s = status_from_job(
            &g,
            &runtime_job(JobState::Queued),
            "http://sd15.team-a.svc:80",
            at(100),
        );
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(cond(&s, COMPLETE), pair("False", "Queued"));
        assert_eq!(s.message.as_deref(), Some("queued, 3 jobs ahead"));
        g.status = Some(s);

        let s = status_from_job(
            &g,
            &runtime_job(JobState::Running),
            "http://sd15.team-a.svc:80",
            at(110),
        );
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.progress, Some(Progress::new(10, 40)));
        assert_eq!(s.timings.as_ref().unwrap().start_time, Some(at(110)));
        assert_eq!(
            find(&s.conditions, COMPLETE).unwrap().last_transition_time,
            at(100)
        );
        g.status = Some(s);

        let s = status_from_job(
            &g,
            &runtime_job(JobState::Succeeded),
            "http://sd15.team-a.svc:80",
            at(160),
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(cond(&s, COMPLETE), pair("True", "Succeeded"));
        assert_eq!(cond(&s, FAILED), pair("False", "Succeeded"));
        assert_eq!(
            find(&s.conditions, COMPLETE).unwrap().last_transition_time,
            at(160)
        );
        assert_eq!(
            s.images,
            vec![
                GeneratedImage {
                    url: "http://sd15.team-a.svc:80/v1/images/i0.png".into(),
                    seed: 7,
                    sha256: "aa".into()
                },
                GeneratedImage {
                    url: "https://cdn/x/i1.png".into(),
                    seed: 8,
                    sha256: "bb".into()
                },
            ]
        );
        let t = s.timings.clone().unwrap();
        assert_eq!(
            (t.queued_seconds, t.inference_seconds, t.total_seconds),
            (Some(10.0), Some(40.0), Some(50.0))
        );
        assert_eq!(
            (t.start_time, t.completion_time),
            (Some(at(110)), Some(at(150)))
        );
        assert!(s.message.as_deref().unwrap().contains("1 withheld"));
        g.status = Some(s.clone());
        // Finished is final.
        assert_eq!(
            status_from_job(&g, &runtime_job(JobState::Failed), "http://x", at(200)),
            s
        );
        assert_eq!(status_lost(&g, 1, 5, "404", at(200)), s);
    }

    #[test]
    fn failed_and_cancelled_jobs_fail() {
        let g = inpaint();
        let s = status_from_job(&g, &runtime_job(JobState::Failed), "http://m", at(100));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, FAILED), pair("True", "GenerationFailed"));
        assert_eq!(s.message.as_deref(), Some("internal: CUDA error"));
        let s = status_from_job(&g, &runtime_job(JobState::Cancelled), "http://m", at(100));
        assert_eq!(cond(&s, FAILED), pair("True", "Cancelled"));
        assert!(s.images.is_empty());
    }

    #[test]
    fn ttl_counts_from_completion() {
        let mut g = inpaint(); // ttl 60
        assert_eq!(ttl_remaining(&g, &at(0)), None);
        g.status = Some(status_from_job(
            &g,
            &runtime_job(JobState::Running),
            "http://m",
            at(100),
        ));
        assert_eq!(ttl_remaining(&g, &at(1000)), None);
        g.status = Some(status_from_job(
            &g,
            &runtime_job(JobState::Succeeded),
            "http://m",
            at(160),
        ));
        // finishedAt 150 + 60 = 210
        assert_eq!(ttl_remaining(&g, &at(200)), Some(Duration::from_secs(10)));
        assert_eq!(ttl_remaining(&g, &at(210)), Some(Duration::ZERO));
        assert_eq!(ttl_remaining(&g, &at(500)), Some(Duration::ZERO));
        g.spec.ttl_seconds_after_finished = None;
        assert_eq!(ttl_remaining(&g, &at(500)), None);
    }
}
