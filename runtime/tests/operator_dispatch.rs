//! The operator's dispatch against the real runtime: the operator crate's own HTTP client,
//! request builder and status mapping talking to `imagegen serve` on the fixture model
//! tiny-sd1 over loopback, authenticated with the tokens file the operator puts in a
//! DiffusionModel's `<model>-runtime-auth` Secret.

mod serve_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use imagegen_crds::api::{Job, JobState, LoraSource};
use imagegen_crds::{DiffusionModel, ImageGeneration, LoraTraining, Phase};
use imagegen_operator::diffusion_model as dm;
use imagegen_operator::image_generation as ig;
use imagegen_operator::lora_training as lt;
use imagegen_operator::runtime_client::{
    image_id_from_url, HttpRuntime, RuntimeApi, RuntimeError, Target,
};
use k8s_openapi::api::batch::v1::{Job as BatchJob, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use serde_json::json;
use serve_support::*;

const NS: &str = "team-a";
const OTHER_NS: &str = "team-b";
const MODEL: &str = "tiny";
/// Submissions the operator allows before giving a lost job up (its default).
const MAX_SUBMISSIONS: u32 = 3;

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// A token shaped like the operator's random ones (64 hex digits), distinct per namespace.
fn token_for(namespace: &str) -> String {
    hex_sha256(format!("dispatch-test-{namespace}-{}", std::process::id()).as_bytes())
}

fn diffusion_model(namespace: &str) -> DiffusionModel {
    serde_json::from_value(json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "DiffusionModel",
        "metadata": {"name": MODEL, "namespace": namespace, "uid": format!("m-{namespace}"),
                     "generation": 1},
        "spec": {"source": {"path": "models/tiny-sd1"}, "family": "sd15"},
    }))
    .unwrap()
}

/// The auth Secret of the namespace's model as the API server returns it: `stringData`
/// written by the operator comes back as `data`.
fn auth_secret(namespace: &str) -> Secret {
    let model = dm::validate(&diffusion_model(namespace)).unwrap();
    let mut secret = dm::build_auth_secret(&model, &token_for(namespace));
    let written = secret.string_data.take().expect("the Secret's stringData");
    secret.data = Some(
        written
            .into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect::<BTreeMap<_, _>>(),
    );
    secret
}

/// The tokens file of one Secret, as the runtime pod gets it mounted.
fn tokens_file_text(secret: &Secret) -> String {
    let bytes = &secret.data.as_ref().unwrap()[dm::AUTH_SECRET_KEY].0;
    String::from_utf8(bytes.clone()).unwrap()
}

/// The runtime's target as the controller makes it: the model's endpoint and the token the
/// operator reads back from the Secret for the namespace's tenant.
fn runtime_target(server: &Server, namespace: &str) -> Target {
    let token = dm::token_from_auth_secret(&auth_secret(namespace), namespace)
        .expect("the operator finds its token in the Secret");
    Target {
        base_url: server.base.clone(),
        token,
    }
}

/// `imagegen serve` on tiny-sd1 whose tokens file holds the auth Secrets of two namespaces'
/// models (one runtime serving both, so the tenants' separation can be checked).
fn start(name: &str) -> Server {
    let dir = scratch(&format!("dispatch-{name}"));
    let tokens = dir.join("tokens");
    let text = [NS, OTHER_NS]
        .map(|ns| tokens_file_text(&auth_secret(ns)))
        .concat();
    std::fs::write(&tokens, text).unwrap();
    Server::start(
        name,
        Options {
            tokens: false,
            extra: vec!["--tokens-file".into(), tokens.display().to_string()],
            ..Options::default()
        },
    )
}

fn generation(uid: &str, mut spec: serde_json::Value) -> ImageGeneration {
    spec["modelRef"] = json!({"name": MODEL});
    serde_json::from_value(json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGeneration",
        "metadata": {"name": format!("gen-{uid}"), "namespace": NS, "uid": uid, "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

/// Polls the job as the controller does until it is finished.
async fn wait_finished(runtime: &HttpRuntime, target: &Target, id: &str) -> Job {
    let started = Instant::now();
    loop {
        let job = runtime.job(target, id).await.unwrap();
        if job.state.is_finished() {
            return job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job {id} never finished: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_job_running(runtime: &HttpRuntime, target: &Target, id: &str) {
    let started = Instant::now();
    loop {
        let job = runtime.job(target, id).await.unwrap();
        if job.state == JobState::Running && job.progress.step > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "job {id} never started: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[tokio::test]
async fn generation_dispatch_resubmission_and_tenancy() {
    let server = start("dispatch-gen");
    let runtime = HttpRuntime::new().unwrap();
    let target = runtime_target(&server, NS);

    let resource = generation(
        "5f0c7a52-0d3e-4b8e-9a51-3c7c2e1d9f01",
        json!({"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 1234}),
    );
    let valid = ig::validate(&resource).unwrap();
    assert_eq!(valid.job_id, "ig-5f0c7a52-0d3e-4b8e-9a51-3c7c2e1d9f01");
    let request = ig::build_request(&resource, &valid, vec![]);

    let accepted = runtime.submit(&target, &request).await.unwrap();
    assert_eq!(accepted.id, valid.job_id);
    let pending = ig::status_from_job(&resource, &accepted, &target.base_url, now());
    assert!(
        matches!(
            pending.phase,
            Some(Phase::Pending | Phase::Running | Phase::Succeeded)
        ),
        "{pending:?}"
    );

    let job = wait_finished(&runtime, &target, &valid.job_id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let status = ig::status_from_job(&resource, &job, &target.base_url, now());
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.images.len(), 1);
    let image = &status.images[0];
    assert_eq!(image.seed, 1234, "the requested seed");
    assert!(
        image.url.starts_with(&server.base),
        "an absolute URL on the endpoint: {}",
        image.url
    );
    let png = request_bytes(&image.url, &target.token);
    assert_eq!(png.status, 200);
    assert_eq!(image.sha256, hex_sha256(&png.body));

    // The same request again (the operator restarted, or retried): the same job, no second.
    let images_dir = server.store.join("tenants").join(NS).join("images");
    let images_before = files_in(&images_dir);
    assert!(images_before >= 1, "{}", images_dir.display());
    let again = runtime.submit(&target, &request).await.unwrap();
    assert_eq!(again.id, valid.job_id);
    assert_eq!(again.state, JobState::Succeeded, "not run a second time");
    assert_eq!(again.result, job.result);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(files_in(&images_dir), images_before);
    assert_eq!(
        metric(&server, "imagegen_jobs_total{state=\"succeeded\"}"),
        1.0
    );

    // A wrong token: the runtime answers 401, which the operator neither takes for a refusal
    // of the request nor for a lost job (it retries with backoff).
    let wrong = Target {
        token: "not-the-token".into(),
        ..target.clone()
    };
    let err = runtime.job(&wrong, &valid.job_id).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Api { status: 401, code, .. } if code == "unauthorized"),
        "{err:?}"
    );
    assert!(!err.is_rejection() && !err.job_lost(), "{err:?}");
    let err = runtime.submit(&wrong, &request).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Api { status: 401, .. }));

    // Another namespace's tenant does not see the job: 404, a lost job to the operator.
    let other = runtime_target(&server, OTHER_NS);
    let err = runtime.job(&other, &valid.job_id).await.unwrap_err();
    assert_eq!(err, RuntimeError::NotFound);
    assert!(err.job_lost());
    let lost = ig::status_lost(&resource, 1, MAX_SUBMISSIONS, &err.to_string(), now());
    let submitted = lost
        .conditions
        .iter()
        .find(|c| c.type_ == ig::SUBMITTED)
        .unwrap();
    assert_eq!(
        (submitted.status.as_str(), submitted.reason.as_str()),
        ("False", "JobLost")
    );
    // Nor its image.
    let id = image_id_from_url(&image.url).expect("an image id in the URL");
    runtime.delete_image(&other, &id).await.unwrap();
    assert_eq!(request_bytes(&image.url, &target.token).status, 200);

    // Deleting the image (the ImageGeneration's finalizer) removes it; again is fine.
    runtime.delete_image(&target, &id).await.unwrap();
    assert_eq!(request_bytes(&image.url, &target.token).status, 404);
    runtime.delete_image(&target, &id).await.unwrap();
}

fn request_bytes(url: &str, token: &str) -> Reply {
    request("GET", url, Some(token), &[], None)
}

#[tokio::test]
async fn cancellation_and_refusals() {
    let server = start("dispatch-cancel");
    let runtime = HttpRuntime::new().unwrap();
    let target = runtime_target(&server, NS);

    // A long job, cancelled while it runs (the ImageGeneration was deleted).
    let long = generation(
        "0b7d1e4c-9a2f-4c61-8d3e-6f5a4b3c2d10",
        json!({"prompt": "a fox", "steps": 500, "width": 64, "height": 64, "seed": 3}),
    );
    let valid = ig::validate(&long).unwrap();
    let request = ig::build_request(&long, &valid, vec![]);
    runtime.submit(&target, &request).await.unwrap();
    // A second one queued behind it (another step count cannot join its batch).
    let queued = generation(
        "7c2e9f14-3b5a-4d8c-a1e6-2f0d9c8b7a65",
        json!({"prompt": "a hen", "steps": 499, "width": 64, "height": 64, "seed": 4}),
    );
    let queued_valid = ig::validate(&queued).unwrap();
    runtime
        .submit(&target, &ig::build_request(&queued, &queued_valid, vec![]))
        .await
        .unwrap();
    wait_job_running(&runtime, &target, &valid.job_id).await;
    let running = runtime.job(&target, &valid.job_id).await.unwrap();
    let status = ig::status_from_job(&long, &running, &target.base_url, now());
    assert_eq!(status.phase, Some(Phase::Running), "{status:?}");

    for (resource, id) in [(&queued, &queued_valid.job_id), (&long, &valid.job_id)] {
        runtime.cancel(&target, id).await.unwrap();
        let job = wait_finished(&runtime, &target, id).await;
        assert_eq!(job.state, JobState::Cancelled, "{job:?}");
        let status = ig::status_from_job(resource, &job, &target.base_url, now());
        assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "Cancelled")
        );
    }
    let job = runtime.job(&target, &valid.job_id).await.unwrap();
    assert!(job.progress.step < job.progress.total, "{job:?}");

    // Requests the runtime refuses: final for the operator (RejectedByRuntime).
    for (uid, spec) in [
        (
            "a1b2c3d4-0000-4000-8000-000000000001",
            // The schema would refuse it; a resource that skipped the schema reaches the runtime.
            json!({"prompt": "x", "steps": 1, "width": 65, "height": 64}),
        ),
        (
            "a1b2c3d4-0000-4000-8000-000000000002",
            json!({"prompt": "x", "steps": 1, "width": 64, "height": 64, "style": "no-such-style"}),
        ),
    ] {
        let resource = generation(uid, spec);
        let valid = ig::validate(&resource).unwrap();
        let err = runtime
            .submit(&target, &ig::build_request(&resource, &valid, vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RuntimeError::Api { status: 422, code, .. } if code == "invalid_field"),
            "{err:?}"
        );
        assert!(err.is_rejection() && !err.job_lost(), "{err:?}");
        let status = ig::status_blocked(
            &resource,
            &ig::Blocked::Rejected(format!("the runtime refused the request: {err}")),
            now(),
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        assert!(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "RejectedByRuntime"));
        // Nothing was queued under its id.
        assert_eq!(
            runtime.job(&target, &valid.job_id).await.unwrap_err(),
            RuntimeError::NotFound
        );
    }
}

#[tokio::test]
async fn trained_lora_is_used_listed_and_deleted() {
    let server = start("dispatch-lora");
    let runtime = HttpRuntime::new().unwrap();
    let target = runtime_target(&server, NS);

    // What a finished training leaves: the LoRA in the tenant's store, where the trainer of
    // the LoraTraining `alice` writes it, and a Succeeded status with the artifact.
    let mut training: LoraTraining = serde_json::from_value(json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "LoraTraining",
        "metadata": {"name": "alice", "namespace": NS, "uid": "t-1", "generation": 1},
        "spec": {"modelRef": {"name": MODEL}, "images": [{"path": "photos/1.png"}],
                 "instancePrompt": "sks person", "steps": 100},
    }))
    .unwrap();
    let valid_training = lt::validate(&training).unwrap();
    let file = server
        .store
        .join(valid_training.output_dir())
        .join(imagegen_crds::api::LORA_FILE);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let lora = std::fs::read(lora_fixture()).unwrap();
    std::fs::write(&file, &lora).unwrap();
    let complete = BatchJob {
        status: Some(JobStatus {
            succeeded: Some(1),
            conditions: Some(vec![JobCondition {
                type_: "Complete".into(),
                status: "True".into(),
                ..JobCondition::default()
            }]),
            ..JobStatus::default()
        }),
        ..BatchJob::default()
    };
    let mut status = lt::status_from(
        &training,
        Some(&complete),
        None,
        &lt::TrainerReport::default(),
        now(),
    );
    assert_eq!(status.phase, Some(Phase::Succeeded));
    let artifact = status
        .artifact
        .as_mut()
        .expect("a Succeeded training's artifact");

    // The runtime lists it with the SHA-256 the training's status records.
    let listed = runtime.loras(&target).await.unwrap();
    let info = listed
        .iter()
        .find(|l| l.name == training.metadata.name.clone().unwrap())
        .unwrap_or_else(|| panic!("alice not in {listed:?}"));
    assert_eq!(info.sha256, hex_sha256(&lora));
    assert_eq!(info.size_bytes, lora.len() as u64);
    assert_eq!(info.source, LoraSource::Training);
    artifact.sha256 = Some(info.sha256.clone());
    training.status = Some(status);
    // Another tenant does not see it.
    assert!(runtime
        .loras(&runtime_target(&server, OTHER_NS))
        .await
        .unwrap()
        .is_empty());

    // An ImageGeneration using it: the operator passes the artifact's store path.
    let resource = generation(
        "3d4e5f60-7182-4a3b-9c4d-5e6f708192a3",
        json!({"prompt": "sks person", "steps": 2, "width": 64, "height": 64, "seed": 9,
               "loras": [{"name": "alice", "weight": 0.8}]}),
    );
    let valid = ig::validate(&resource).unwrap();
    let loras = ig::resolve_loras(&valid, &[Some(training.clone())]).unwrap();
    assert_eq!(
        loras[0].path.as_deref(),
        Some(lt::artifact_path("alice").as_str())
    );
    let request = ig::build_request(&resource, &valid, loras.clone());
    runtime.submit(&target, &request).await.unwrap();
    let job = wait_finished(&runtime, &target, &valid.job_id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let status = ig::status_from_job(&resource, &job, &target.base_url, now());
    assert_eq!(status.phase, Some(Phase::Succeeded));
    let image = &status.images[0];
    assert_eq!(image.seed, 9);
    assert_eq!(
        image.sha256,
        hex_sha256(&request_bytes(&image.url, &target.token).body)
    );
    assert!(metric(&server, "imagegen_lora_cache_misses_total") >= 1.0);

    // Deleting the LoraTraining deletes the LoRA; a generation that still names it is refused.
    runtime.delete_lora(&target, "alice").await.unwrap();
    assert!(!file.exists());
    assert!(runtime
        .loras(&target)
        .await
        .unwrap()
        .iter()
        .all(|l| l.name != "alice"));
    runtime.delete_lora(&target, "alice").await.unwrap();
    let late = generation(
        "3d4e5f60-7182-4a3b-9c4d-5e6f708192a4",
        json!({"prompt": "sks person", "steps": 2, "width": 64, "height": 64,
               "loras": [{"name": "alice"}]}),
    );
    let late_valid = ig::validate(&late).unwrap();
    let err = runtime
        .submit(&target, &ig::build_request(&late, &late_valid, loras))
        .await
        .unwrap_err();
    assert_eq!(err, RuntimeError::NotFound);
    assert!(err.is_rejection());

    // The image goes with its ImageGeneration.
    let id = image_id_from_url(&image.url).unwrap();
    runtime.delete_image(&target, &id).await.unwrap();
    assert_eq!(request_bytes(&image.url, &target.token).status, 404);
}
