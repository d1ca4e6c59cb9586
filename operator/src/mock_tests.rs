//! Reconcile tests against a mock API server (tower-test): each test lists the exact API
//! calls a reconciliation must make, in order, with canned answers, and fails on a missing,
//! different or extra call. The runtime is a scripted fake.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::Method;
use imagegen_crds::api::{GenerationRequest, Job as RuntimeJob, JobKind, JobState};
use imagegen_crds::{DiffusionModel, ImageGeneration, LoraTraining, Phase, Progress};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::controller::{self, Context, Error};
use crate::metrics::Metrics;
use crate::mock_api::{self, api_error, Handle, Sent};
use crate::runtime_client::{RuntimeApi, RuntimeError, Target};
use crate::{diffusion_model as dm, image_generation as ig, OperatorConfig};

const NOW: i64 = 1_000_000;
const NS: &str = "team-a";

fn now() -> Time {
    Time(Timestamp::from_second(NOW).unwrap())
}

fn at(second: i64) -> Time {
    Time(Timestamp::from_second(second).unwrap())
}

// ---- the mock API server ----

/// One call the reconciliation must make, and the answer it gets.
struct Call {
    method: Method,
    path: String,
    status: u16,
    reply: Value,
}

fn call(method: Method, path: &str, status: u16, reply: Value) -> Call {
    Call {
        method,
        path: path.into(),
        status,
        reply,
    }
}

fn to_json(obj: impl Serialize) -> Value {
    serde_json::to_value(obj).unwrap()
}

/// A GET of `path` answered with `reply`.
fn get(path: &str, reply: impl Serialize) -> Call {
    call(Method::GET, path, 200, to_json(reply))
}

/// A GET of `path` that finds nothing.
fn get_missing(path: &str) -> Call {
    call(Method::GET, path, 404, not_found())
}

/// A PATCH of `path` (server-side apply, merge or JSON patch) answered with `reply`.
fn patch(path: &str, reply: impl Serialize) -> Call {
    call(Method::PATCH, path, 200, to_json(reply))
}

/// A POST to `path` that creates `reply`.
fn create(path: &str, reply: impl Serialize) -> Call {
    call(Method::POST, path, 201, to_json(reply))
}

/// The POST that publishes one event.
fn event() -> Call {
    create(&events(), json!({}))
}

/// The calls of `parts`, one part after the other.
fn calls<const N: usize>(parts: [Vec<Call>; N]) -> Vec<Call> {
    parts.into_iter().flatten().collect()
}

fn not_found() -> Value {
    api_error(404, "NotFound", "not found")
}

/// Serves `calls` in order and returns what each one sent. Panics on a different call, and
/// on any call after the last one (the client is dropped when the reconciliation is done).
async fn serve(mut handle: Handle, calls: Vec<Call>) -> Vec<Sent> {
    let mut sent = Vec::new();
    for c in calls {
        sent.push(mock_api::answer(&mut handle, &c.method, &c.path, c.status, &c.reply).await);
    }
    if let Some((request, _)) = handle.next_request().await {
        panic!(
            "unexpected extra call {} {}",
            request.method(),
            request.uri().path()
        );
    }
    sent
}

/// A client on the mock API serving `calls`, and the server's task.
fn serving(calls: Vec<Call>) -> (Client, JoinHandle<Vec<Sent>>) {
    let (client, handle) = mock_api::client(NS);
    (client, tokio::spawn(serve(handle, calls)))
}

/// What each call sent, once every client of the server is dropped.
async fn sent(server: JoinHandle<Vec<Sent>>) -> Vec<Sent> {
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the mock API server timed out")
        .expect("the mock API server saw a wrong call")
}

// ---- the fake runtime ----

#[derive(Debug, Clone, PartialEq)]
enum RuntimeCall {
    Submit(String, Box<GenerationRequest>),
    Job(String, String),
    Cancel(String),
    DeleteImage(String),
    DeleteLora(String),
    Loras,
}

#[derive(Default)]
struct FakeRuntime {
    answers: Mutex<VecDeque<Result<RuntimeJob, RuntimeError>>>,
    calls: Mutex<Vec<RuntimeCall>>,
    /// What `delete_image` answers.
    delete_image: Option<RuntimeError>,
    /// What `loras` answers.
    loras: Vec<imagegen_crds::api::LoraInfo>,
}

impl FakeRuntime {
    fn answering(answers: Vec<Result<RuntimeJob, RuntimeError>>) -> Arc<Self> {
        Arc::new(FakeRuntime {
            answers: Mutex::new(answers.into()),
            calls: Mutex::default(),
            delete_image: None,
            loras: Vec::new(),
        })
    }

    fn next(&self) -> Result<RuntimeJob, RuntimeError> {
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .expect("an unexpected runtime call")
    }

    fn calls(&self) -> Vec<RuntimeCall> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl RuntimeApi for FakeRuntime {
    async fn submit(
        &self,
        target: &Target,
        request: &GenerationRequest,
    ) -> Result<RuntimeJob, RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Submit(
            target.token.clone(),
            Box::new(request.clone()),
        ));
        self.next()
    }
    async fn job(&self, target: &Target, id: &str) -> Result<RuntimeJob, RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::Job(target.base_url.clone(), id.into()));
        self.next()
    }
    async fn cancel(&self, _: &Target, id: &str) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::Cancel(id.into()));
        Ok(())
    }
    async fn delete_image(&self, _: &Target, id: &str) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::DeleteImage(id.into()));
        self.delete_image.clone().map_or(Ok(()), Err)
    }
    async fn loras(&self, _: &Target) -> Result<Vec<imagegen_crds::api::LoraInfo>, RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Loras);
        Ok(self.loras.clone())
    }
    async fn delete_lora(&self, _: &Target, name: &str) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::DeleteLora(name.into()));
        Ok(())
    }
    /// Idle, and not a recorded call: the pod choice asks it before every submission.
    async fn load(&self, _: &Target) -> Result<imagegen_crds::api::RuntimeLoad, RuntimeError> {
        Ok(imagegen_crds::api::RuntimeLoad {
            queue_capacity: 64,
            device: "cpu".into(),
            ..Default::default()
        })
    }
}

/// A context on `client` with the fake `runtime` and the fixed clock.
fn context(client: Client, runtime: Arc<FakeRuntime>) -> Context {
    context_with_queue(client, runtime, Vec::new())
}

/// As [`context`], with `queued` in the operator's cache of ImageGenerations.
fn context_with_queue(
    client: Client,
    runtime: Arc<FakeRuntime>,
    queued: Vec<ImageGeneration>,
) -> Context {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "imagegen-operator".into(),
            instance: Some("test".into()),
        },
    );
    let (endpoint_slices, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(model_slice()));
    let (generations, mut queue) = kube::runtime::reflector::store();
    for generation in queued {
        queue.apply_watcher_event(&kube::runtime::watcher::Event::Apply(generation));
    }
    let mut ctx = Context::new(
        client,
        OperatorConfig::default(),
        runtime,
        Metrics::new().unwrap(),
        recorder,
        endpoint_slices,
        generations,
    );
    ctx.now = now;
    ctx
}

/// The model's pod as its Service's EndpointSlice lists it, ready.
const POD_URL: &str = "http://10.0.0.1:8080";

fn model_slice() -> k8s_openapi::api::discovery::v1::EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "name": "sd15-x7k2p",
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": "sd15",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": "sd15-0", "namespace": NS}
        }]
    }))
    .unwrap()
}

/// Runs `reconcile` against the mock API serving `calls`; returns its result and what each
/// call sent.
async fn run<K, F, Fut>(
    obj: K,
    runtime: Arc<FakeRuntime>,
    calls: Vec<Call>,
    reconcile: F,
) -> (Result<Action, Error>, Vec<Sent>)
where
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>>,
{
    let (client, server) = serving(calls);
    let result = reconcile(Arc::new(obj), Arc::new(context(client, runtime))).await;
    (result, sent(server).await)
}

fn path(kind_path: &str, name: &str) -> String {
    format!("/{kind_path}/namespaces/{NS}/{name}")
}

fn cr(plural: &str, name: &str) -> String {
    path("apis/imagegen.dev/v1alpha1", &format!("{plural}/{name}"))
}

fn events() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
}

fn is_server_side_apply(sent: &Sent) -> bool {
    sent.query.contains("fieldManager=imagegen-operator") && sent.query.contains("force=true")
}

// ---- objects ----

fn model(status: Option<Value>) -> DiffusionModel {
    let mut value = json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "DiffusionModel",
        "metadata": {"name": "sd15", "namespace": NS, "uid": "m-1", "generation": 1},
        "spec": {"source": {"path": "models/sd15"}, "family": "sd15"},
    });
    if let Some(status) = status {
        value["status"] = status;
    }
    serde_json::from_value(value).unwrap()
}

fn deployment(ready: i32) -> Deployment {
    let mut d = dm::build_deployment(
        &dm::validate(&model(None)).unwrap(),
        &OperatorConfig::default(),
        &crate::workload::Found::default(),
    );
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(1),
        updated_replicas: Some(1),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        ..DeploymentStatus::default()
    });
    d
}

fn ready_model() -> DiffusionModel {
    let m = model(None);
    // As the queue autoscaler reports an idle one-replica model.
    let idle = imagegen_crds::diffusion_model::AutoscalingStatus {
        queue: 0,
        desired_replicas: 1,
        ..Default::default()
    };
    let status = dm::status_from(&m, Some(&deployment(1)), Some(idle), at(10));
    model(Some(to_json(status)))
}

fn auth_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sd15-runtime-auth", "namespace": NS, "ownerReferences": [{
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "DiffusionModel", "name": "sd15",
            "uid": "m-1", "controller": true
        }]},
        // "# c\nteam-a:tok\n" in base64
        "data": {"tokens": "IyBjCnRlYW0tYTp0b2sK"}
    })
}

/// `obj` with a deletion timestamp: being deleted.
fn deleting<K: Serialize + DeserializeOwned>(obj: K) -> K {
    let mut value = to_json(obj);
    value["metadata"]["deletionTimestamp"] = json!("1970-01-12T13:46:40Z");
    serde_json::from_value(value).unwrap()
}

fn model_path() -> String {
    cr("diffusionmodels", "sd15")
}

fn auth_secret_path() -> String {
    path("api/v1", "secrets/sd15-runtime-auth")
}

/// Looking up the model's runtime: the Ready model, then its auth Secret.
fn model_target() -> Vec<Call> {
    vec![
        get(&model_path(), ready_model()),
        get(&auth_secret_path(), auth_secret()),
    ]
}

/// Applying the model's Deployment (answered with `d`) and its Service.
fn deployment_and_service(d: Deployment) -> Vec<Call> {
    vec![
        get(&path("apis/apps/v1", "deployments/sd15"), d.clone()),
        patch(&path("apis/apps/v1", "deployments/sd15"), d),
        patch(
            &path("api/v1", "services/sd15"),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sd15"}}),
        ),
    ]
}

/// The children of a model whose auth Secret exists: the Secret, the Deployment (answered
/// with `d`) and the Service.
fn model_children(d: Deployment) -> Vec<Call> {
    calls([
        vec![get(&auth_secret_path(), auth_secret())],
        deployment_and_service(d),
    ])
}

/// The patch of the model's status.
fn model_status() -> Call {
    patch(&cr("diffusionmodels", "sd15/status"), model(None))
}

// ---- DiffusionModel ----

#[tokio::test]
async fn model_create_makes_the_secret_deployment_service_and_status() {
    let (result, sent) = run(
        model(None),
        FakeRuntime::answering(vec![]),
        calls([
            vec![
                get_missing(&auth_secret_path()),
                create(&path("api/v1", "secrets"), auth_secret()),
                get_missing(&path("apis/apps/v1", "deployments/sd15")),
            ],
            deployment_and_service(deployment(0)).split_off(1),
            vec![model_status()],
        ]),
        controller::reconcile_model,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::MODEL_RESYNC));
    let tokens = sent[1].body["stringData"]["tokens"]
        .as_str()
        .unwrap()
        .to_string();
    let token_line = tokens.lines().find(|l| l.starts_with("team-a:")).unwrap();
    assert_eq!(token_line.len(), "team-a:".len() + 64);
    assert_eq!(sent[1].body["metadata"]["ownerReferences"][0]["uid"], "m-1");
    for s in &sent[3..] {
        assert!(is_server_side_apply(s), "{:?}", s.query);
    }
    assert_eq!(sent[3].body["kind"], "Deployment");
    assert_eq!(
        sent[3].body["metadata"]["ownerReferences"][0]["kind"],
        "DiffusionModel"
    );
    // A new Deployment starts at replicas.min.
    assert_eq!(sent[3].body["spec"]["replicas"], 1);
    assert_eq!(sent[4].body["kind"], "Service");
    let status = &sent[5].body["status"];
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(sent[5].body["kind"], "DiffusionModel");
}

/// A runtime-auth Secret or a Deployment of the model's name that the model does not control
/// is never taken over: the reconciliation fails (and error_policy says so on the model).
#[tokio::test]
async fn model_refuses_children_it_does_not_control() {
    let mut foreign_secret = auth_secret();
    foreign_secret["metadata"]["ownerReferences"] = json!([]);
    let (result, sent) = run(
        model(None),
        FakeRuntime::answering(vec![]),
        vec![get(&auth_secret_path(), foreign_secret)],
        controller::reconcile_model,
    )
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::NotOwned { .. }), "{err}");
    assert!(
        err.to_string().contains("Secret sd15-runtime-auth"),
        "{err}"
    );
    assert_eq!(sent.len(), 1);

    let mut foreign_deployment = deployment(1);
    foreign_deployment.metadata.owner_references = None;
    let (result, sent) = run(
        model(None),
        FakeRuntime::answering(vec![]),
        vec![
            get(&auth_secret_path(), auth_secret()),
            get(
                &path("apis/apps/v1", "deployments/sd15"),
                foreign_deployment,
            ),
        ],
        controller::reconcile_model,
    )
    .await;
    assert!(matches!(result, Err(Error::NotOwned { .. })), "{result:?}");
    assert_eq!(sent.len(), 2, "nothing applied");
}

#[tokio::test]
async fn model_becoming_ready_patches_status_and_publishes_an_event() {
    let m = model(Some(to_json(dm::status_from(
        &model(None),
        Some(&deployment(0)),
        None,
        at(5),
    ))));
    let (result, sent) = run(
        m,
        FakeRuntime::answering(vec![]),
        calls([model_children(deployment(1)), vec![model_status(), event()]]),
        controller::reconcile_model,
    )
    .await;
    result.unwrap();
    let ready = sent[4].body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "True");
    assert_eq!(sent[5].body["reason"], "Ready");
    assert_eq!(sent[5].body["regarding"]["name"], "sd15");
    assert_eq!(sent[5].body["type"], "Normal");
}

#[tokio::test]
async fn model_unchanged_makes_no_status_patch() {
    let m = ready_model();
    let (result, _) = run(
        m,
        FakeRuntime::answering(vec![]),
        model_children(deployment(1)),
        controller::reconcile_model,
    )
    .await;
    result.unwrap();
}

#[tokio::test]
async fn a_model_at_zero_scales_up_through_its_scale_subresource_for_its_queue() {
    let mut m = model(None);
    m.spec.replicas = serde_json::from_value(json!({"min": 0, "max": 3})).unwrap();
    let mut at_zero = deployment(0);
    at_zero.spec.as_mut().unwrap().replicas = Some(0);
    let mut scaled = at_zero.clone();
    scaled.spec.as_mut().unwrap().replicas = Some(3);
    let queued: Vec<ImageGeneration> = (0..5)
        .map(|i| {
            let mut g = generation(None, None);
            g.metadata.name = Some(format!("avatar-{i}"));
            g.metadata.uid = Some(format!("uid-{i}"));
            g
        })
        .collect();
    let (client, server) = serving(calls([
        vec![get(&auth_secret_path(), auth_secret())],
        vec![get(
            &path("apis/apps/v1", "deployments/sd15"),
            at_zero.clone(),
        )],
        vec![patch(&cr("diffusionmodels", "sd15/scale"), json!({}))],
        vec![event()],
        deployment_and_service(scaled).split_off(1),
        vec![model_status()],
    ]));
    let ctx = context_with_queue(client, FakeRuntime::answering(vec![]), queued);
    let result = controller::reconcile_model(Arc::new(m), Arc::new(ctx)).await;
    let sent = sent(server).await;
    result.unwrap();
    // Five generations at two per replica need three: written as the scale's count.
    assert_eq!(sent[2].body, json!({"spec": {"replicas": 3}}));
    assert_eq!(sent[3].body["reason"], "ScaledFromZero");
    assert_eq!(sent[4].body["spec"]["replicas"], 3);
    let autoscaling = &sent[6].body["status"]["autoscaling"];
    assert_eq!(
        (
            autoscaling["queue"].clone(),
            autoscaling["desiredReplicas"].clone()
        ),
        (json!(5), json!(3))
    );
    assert!(autoscaling["coldStartTime"].is_string(), "{autoscaling}");
    let ready = conditions(&sent[6])["Ready"].clone();
    assert_eq!(ready, ("False".into(), "ColdStart".into()));
}

#[tokio::test]
async fn model_invalid_spec_is_reported_without_children() {
    let mut m = model(None);
    m.spec.replicas = serde_json::from_value(json!({"min": 3, "max": 1})).unwrap();
    let (result, sent) = run(
        m,
        FakeRuntime::answering(vec![]),
        vec![model_status(), event()],
        controller::reconcile_model,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    let degraded = sent[0].body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("InvalidSpec"))
    );
    assert_eq!(sent[1].body["type"], "Warning");
}

#[tokio::test]
async fn model_api_failure_is_an_error_with_backoff() {
    let (result, _) = run(
        model(None),
        FakeRuntime::answering(vec![]),
        vec![call(
            Method::GET,
            &auth_secret_path(),
            500,
            api_error(500, "InternalError", "etcd"),
        )],
        controller::reconcile_model,
    )
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Kube(_)), "{err}");
    // error_policy backs off exponentially per object.
    let (client, _handle) = mock_api::client(NS);
    let ctx = Arc::new(context(client, FakeRuntime::answering(vec![])));
    let m = Arc::new(model(None));
    assert_eq!(
        controller::error_policy(m.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        controller::error_policy(m, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert!(ctx.metrics.render().contains(
        r#"imagegen_operator_reconcile_errors_total{error="kube",kind="DiffusionModel"} 2"#
    ));
}

// ---- LoraTraining ----

fn training(finalized: bool, status: Option<Value>) -> LoraTraining {
    let mut value = json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "LoraTraining",
        "metadata": {"name": "alice", "namespace": NS, "uid": "t-1", "generation": 1},
        "spec": {"modelRef": {"name": "sd15"}, "images": [{"path": "photos/1.jpg"}], "instancePrompt": "sks", "steps": 100},
    });
    if finalized {
        value["metadata"]["finalizers"] = json!([controller::LORA_FINALIZER]);
    }
    if let Some(status) = status {
        value["status"] = status;
    }
    serde_json::from_value(value).unwrap()
}

fn training_job(active: i32, complete: bool) -> Value {
    let mut job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "alice-train", "namespace": NS, "ownerReferences": [{
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "LoraTraining", "name": "alice",
            "uid": "t-1", "controller": true
        }]},
        "status": {"active": active, "startTime": "1970-01-12T13:46:00Z"}
    });
    if complete {
        job["status"]["conditions"] =
            json!([{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]);
        job["status"]["completionTime"] = json!("1970-01-12T13:46:40Z");
    }
    job
}

fn training_job_path() -> String {
    path("apis/batch/v1", "jobs/alice-train")
}

/// The patch of the training's status.
fn training_status() -> Call {
    patch(&cr("loratrainings", "alice/status"), training(true, None))
}

/// The patch that removes the training's finalizer.
fn training_released() -> Call {
    patch(&cr("loratrainings", "alice"), training(false, None))
}

/// A Succeeded training whose LoRA is stored.
fn trained(finalized: bool) -> LoraTraining {
    training(
        finalized,
        Some(json!({
            "phase": "Succeeded",
            "artifact": {"path": "loras/alice/pytorch_lora_weights.safetensors"}
        })),
    )
}

#[tokio::test]
async fn training_first_sight_adds_the_finalizer() {
    let (result, sent) = run(
        training(false, None),
        FakeRuntime::answering(vec![]),
        vec![patch(&cr("loratrainings", "alice"), training(true, None))],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    let patch = sent[0].body.to_string();
    assert!(patch.contains(controller::LORA_FINALIZER), "{patch}");
}

#[tokio::test]
async fn training_waits_for_its_model() {
    let (result, sent) = run(
        training(true, None),
        FakeRuntime::answering(vec![]),
        vec![
            get_missing(&training_job_path()),
            get_missing(&model_path()),
            training_status(),
            event(),
        ],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::WAIT_RECHECK));
    let status = &sent[2].body["status"];
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["conditions"][0]["reason"], "WaitingForModel");
    assert!(is_server_side_apply(&sent[2]));
    assert_eq!(sent[3].body["reason"], "Pending");
}

#[tokio::test]
async fn training_status_built_from_a_stale_read_is_dropped() {
    // The trainer reported step 80 after the reconciler read the training at step 40: the
    // status apply carries the resourceVersion it read, the API server refuses it (409), and
    // the reconciler looks again instead of putting step 40 back.
    let mut read = training(
        true,
        Some(json!({"phase": "Running", "progress": {"step": 40, "total": 100, "percent": 40}})),
    );
    read.metadata.resource_version = Some("41".into());
    let conflict = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
        "reason": "Conflict", "message": "the object has been modified"
    });
    let (result, sent) = run(
        read,
        FakeRuntime::answering(vec![]),
        vec![
            get(&training_job_path(), training_job(1, false)),
            call(
                Method::PATCH,
                &cr("loratrainings", "alice/status"),
                409,
                conflict,
            ),
        ],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::STALE_RETRY));
    assert_eq!(sent.len(), 2, "no event after a dropped status");
    assert!(is_server_side_apply(&sent[1]));
    assert_eq!(sent[1].body["metadata"]["resourceVersion"], "41");
}

#[tokio::test]
async fn training_creates_the_token_secret_and_the_job() {
    let (result, sent) = run(
        training(true, None),
        FakeRuntime::answering(vec![]),
        vec![
            get_missing(&training_job_path()),
            get(&model_path(), ready_model()),
            get_missing(&path("api/v1", "secrets/alice-progress")),
            create(
                &path("api/v1", "secrets"),
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "alice-progress"}}),
            ),
            patch(&training_job_path(), training_job(0, false)),
            training_status(),
            event(),
        ],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::WAIT_RECHECK));
    assert_eq!(sent[3].body["metadata"]["name"], "alice-progress");
    assert_eq!(
        sent[3].body["stringData"]["token"].as_str().unwrap().len(),
        64
    );
    assert!(is_server_side_apply(&sent[4]));
    assert_eq!(sent[4].body["kind"], "Job");
    assert_eq!(
        sent[4].body["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "train"
    );
    assert_eq!(sent[4].body["metadata"]["ownerReferences"][0]["uid"], "t-1");
    assert_eq!(sent[5].body["status"]["phase"], "Pending");
    assert_eq!(
        sent[5].body["status"]["conditions"][0]["reason"],
        "JobCreated"
    );
}

#[tokio::test]
async fn training_follows_its_job_to_success() {
    let running = training(
        true,
        Some(
            json!({"phase": "Running", "progress": {"step": 50, "total": 100, "percent": 50}, "loss": 0.2}),
        ),
    );
    let runtime = Arc::new(FakeRuntime {
        loras: vec![imagegen_crds::api::LoraInfo {
            name: "alice".into(),
            size_bytes: 1,
            sha256: "5ha".into(),
            created_at: "1970-01-01T00:00:00Z".into(),
            source: imagegen_crds::api::LoraSource::Training,
        }],
        ..FakeRuntime::default()
    });
    let (result, sent) = run(
        running,
        runtime.clone(),
        calls([
            vec![get(&training_job_path(), training_job(0, true))],
            // The LoRA's checksum, from the model's runtime.
            model_target(),
            vec![training_status(), event()],
        ]),
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(runtime.calls(), vec![RuntimeCall::Loras]);
    let status = &sent[3].body["status"];
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(
        status["artifact"]["path"],
        "loras/alice/pytorch_lora_weights.safetensors"
    );
    assert_eq!(status["artifact"]["sha256"], "5ha");
    assert_eq!(status["progress"]["step"], 100);
    assert_eq!(status["loss"], 0.2);
    assert_eq!(sent[4].body["reason"], "Succeeded");
}

#[tokio::test]
async fn training_success_without_the_runtime_still_succeeds() {
    let running = training(true, Some(json!({"phase": "Running"})));
    let (result, sent) = run(
        running,
        FakeRuntime::answering(vec![]),
        vec![
            get(&training_job_path(), training_job(0, true)),
            get_missing(&model_path()),
            training_status(),
            event(),
        ],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(sent[2].body["status"]["phase"], "Succeeded");
    assert!(sent[2].body["status"]["artifact"].get("sha256").is_none());
}

#[tokio::test]
async fn training_finished_makes_no_calls() {
    let done = training(true, Some(json!({"phase": "Succeeded"})));
    let (result, _) = run(
        done,
        FakeRuntime::answering(vec![]),
        vec![],
        controller::reconcile_training,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn training_job_read_failure_is_an_error() {
    let (result, _) = run(
        training(true, None),
        FakeRuntime::answering(vec![]),
        vec![call(
            Method::GET,
            &training_job_path(),
            403,
            api_error(403, "Forbidden", "forbidden"),
        )],
        controller::reconcile_training,
    )
    .await;
    assert!(matches!(result, Err(Error::Kube(_))));
}

#[tokio::test]
async fn training_deletion_deletes_the_lora_then_the_finalizer() {
    let runtime = FakeRuntime::answering(vec![]);
    let (result, sent) = run(
        deleting(trained(true)),
        runtime.clone(),
        calls([model_target(), vec![event(), training_released()]]),
        controller::reconcile_training,
    )
    .await;
    result.unwrap();
    assert_eq!(
        runtime.calls(),
        vec![RuntimeCall::DeleteLora("alice".into())]
    );
    assert_eq!(sent[2].body["reason"], "ArtifactDeleted");
    let patch = sent[3].body.to_string();
    assert!(
        patch.contains("remove") && patch.contains("/metadata/finalizers/0"),
        "{patch}"
    );
}

#[tokio::test]
async fn training_deletion_without_the_model_keeps_the_lora_and_releases() {
    let runtime = FakeRuntime::answering(vec![]);
    let (result, sent) = run(
        deleting(trained(true)),
        runtime.clone(),
        vec![get_missing(&model_path()), event(), training_released()],
        controller::reconcile_training,
    )
    .await;
    result.unwrap();
    assert!(runtime.calls().is_empty());
    assert_eq!(sent[1].body["type"], "Warning");
    assert_eq!(sent[1].body["reason"], "ArtifactKept");
}

// ---- ImageGeneration ----

const UID: &str = "0a1b2c3d-0000-4000-8000-000000000001";

fn generation(submissions: Option<u32>, status: Option<Value>) -> ImageGeneration {
    let mut value = json!({
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGeneration",
        "metadata": {"name": "avatar", "namespace": NS, "uid": UID, "generation": 1,
                     "finalizers": [controller::IMAGES_FINALIZER]},
        "spec": {"modelRef": {"name": "sd15"}, "prompt": "sks person", "steps": 20,
                 "loras": [{"name": "alice", "weight": 0.7}], "ttlSecondsAfterFinished": 60},
    });
    if let Some(n) = submissions {
        value["metadata"]["annotations"] = json!({(ig::SUBMISSIONS_ANNOTATION): n.to_string()});
    }
    if let Some(status) = status {
        value["status"] = status;
    }
    serde_json::from_value(value).unwrap()
}

fn runtime_job(state: JobState) -> RuntimeJob {
    RuntimeJob {
        id: ig::job_id(UID),
        kind: JobKind::Generation,
        state,
        queue_position: None,
        progress: Progress::new(5, 20),
        created_at: "1970-01-12T13:46:00Z".into(),
        started_at: None,
        finished_at: None,
        result: None,
        training: None,
        error: None,
    }
}

fn generation_path() -> String {
    cr("imagegenerations", "avatar")
}

/// The patch of the generation's status (answered with `submissions` counted).
fn generation_status(submissions: Option<u32>) -> Call {
    patch(
        &cr("imagegenerations", "avatar/status"),
        generation(submissions, None),
    )
}

/// The calls of a submission: its references, the runtime's token, the count.
fn submission_calls(annotate_to: u32) -> Vec<Call> {
    vec![
        get(&model_path(), ready_model()),
        get(&cr("loratrainings", "alice"), trained(true)),
        get(&auth_secret_path(), auth_secret()),
        patch(&generation_path(), generation(Some(annotate_to), None)),
    ]
}

/// A submission answered by the runtime, and the status and event it leads to.
fn submitted_calls() -> Vec<Call> {
    calls([
        submission_calls(1),
        vec![generation_status(Some(1)), event()],
    ])
}

/// The model's runtime looked up, the job polled, the status written with an event.
fn polled_with_status_calls(submissions: u32) -> Vec<Call> {
    calls([
        model_target(),
        vec![generation_status(Some(submissions)), event()],
    ])
}

fn conditions(sent: &Sent) -> BTreeMap<String, (String, String)> {
    sent.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    c["reason"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn generation_submits_once_references_are_ready() {
    let runtime = FakeRuntime::answering(vec![Ok(runtime_job(JobState::Queued))]);
    let (result, sent) = run(
        generation(None, None),
        runtime.clone(),
        submitted_calls(),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::WAIT_RECHECK));
    assert_eq!(
        sent[3].body["metadata"]["annotations"][ig::SUBMISSIONS_ANNOTATION],
        "1"
    );
    let RuntimeCall::Submit(token, request) = &runtime.calls()[0] else {
        panic!("{:?}", runtime.calls());
    };
    assert_eq!(token, "tok");
    assert_eq!(request.job_id.as_deref(), Some(ig::job_id(UID).as_str()));
    assert_eq!(request.params.prompt, "sks person");
    assert_eq!(
        request.loras[0].path.as_deref(),
        Some("loras/alice/pytorch_lora_weights.safetensors")
    );
    assert_eq!(request.loras[0].weight, Some(0.7));
    assert_eq!(sent[4].body["status"]["phase"], "Pending");
    assert_eq!(
        conditions(&sent[4])["Submitted"],
        ("True".into(), "Accepted".into())
    );
}

#[tokio::test]
async fn generation_waits_for_an_unfinished_lora() {
    let (result, sent) = run(
        generation(None, None),
        FakeRuntime::answering(vec![]),
        vec![
            get(&model_path(), ready_model()),
            get(
                &cr("loratrainings", "alice"),
                training(true, Some(json!({"phase": "Running"}))),
            ),
            generation_status(None),
            event(),
        ],
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(controller::WAIT_RECHECK));
    assert_eq!(
        conditions(&sent[2])["Complete"],
        ("False".into(), "WaitingForLora".into())
    );
}

/// `status` with the Submitted condition's transition `seconds_ago`.
fn submitted_changed_at(mut status: Value, seconds_ago: i64) -> Value {
    for c in status["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Submitted" {
            c["lastTransitionTime"] = json!(to_json(at(NOW - seconds_ago)));
        }
    }
    status
}

#[tokio::test]
async fn a_job_on_a_pod_not_ready_too_long_is_cancelled_there_and_lost() {
    // Polled once: running on the ready pod, which records it.
    let runtime = FakeRuntime::answering(vec![Ok(runtime_job(JobState::Running))]);
    let (_, first) = run(
        generation(Some(1), None),
        runtime,
        polled_with_status_calls(1),
        controller::reconcile_generation,
    )
    .await;
    let mut running = first[2].body["status"].clone();
    running["runtimePod"] = json!({"name": "sd15-0", "address": "10.0.0.1:8080"});
    // The pod stays listed but not ready past the grace (zero here): the running job is
    // cancelled there and counted lost, to be submitted to another pod.
    let mut unready = model_slice();
    unready.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
    let (slices, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(unready));
    let runtime = FakeRuntime::answering(vec![Ok(runtime_job(JobState::Running))]);
    let (client, server) = serving(polled_with_status_calls(1));
    let mut ctx = context(client, runtime.clone());
    ctx.config.unready_grace = Duration::ZERO;
    ctx.endpoint_slices = slices;
    let result = controller::reconcile_generation(
        Arc::new(generation(Some(1), Some(running))),
        Arc::new(ctx),
    )
    .await;
    let sent = sent(server).await;
    assert_eq!(result.unwrap(), Action::requeue(ig::resubmit_delay(1)));
    assert_eq!(
        runtime.calls(),
        vec![
            RuntimeCall::Job(POD_URL.into(), ig::job_id(UID)),
            RuntimeCall::Cancel(ig::job_id(UID)),
        ]
    );
    assert_eq!(
        conditions(&sent[2])["Submitted"],
        ("False".into(), "JobLost".into())
    );
    let message = sent[2].body["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("not ready"), "{message}");
}

#[tokio::test]
async fn generation_follows_the_job_and_resubmits_when_lost() {
    // Polled: running.
    let runtime = FakeRuntime::answering(vec![Ok(runtime_job(JobState::Running))]);
    let (result, sent) = run(
        generation(Some(1), None),
        runtime.clone(),
        polled_with_status_calls(1),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(
        result.unwrap(),
        Action::requeue(controller::GENERATION_POLL)
    );
    assert_eq!(sent[2].body["status"]["phase"], "Running");
    assert_eq!(sent[2].body["status"]["progress"]["step"], 5);
    assert_eq!(
        runtime.calls(),
        vec![RuntimeCall::Job(POD_URL.into(), ig::job_id(UID))]
    );
    let running_status = sent[2].body["status"].clone();

    // Polled again with nothing new: no status patch, no event.
    let runtime = FakeRuntime::answering(vec![Ok(runtime_job(JobState::Running))]);
    let (result, _) = run(
        generation(Some(1), Some(running_status.clone())),
        runtime,
        model_target(),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(
        result.unwrap(),
        Action::requeue(controller::GENERATION_POLL)
    );

    // The pod died: 404. The loss is recorded with a Warning event, the phase kept.
    let runtime = FakeRuntime::answering(vec![Err(RuntimeError::NotFound)]);
    let (result, sent) = run(
        generation(Some(1), Some(running_status.clone())),
        runtime,
        polled_with_status_calls(1),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(ig::resubmit_delay(1)));
    assert_eq!(sent[2].body["status"]["phase"], "Running");
    assert_eq!(
        conditions(&sent[2])["Submitted"],
        ("False".into(), "JobLost".into())
    );
    assert_eq!(sent[3].body["type"], "Warning");
    assert_eq!(sent[3].body["reason"], "JobLost");
    let lost_status = sent[2].body["status"].clone();

    // Before the backoff elapsed: nothing but the poll.
    let runtime = FakeRuntime::answering(vec![Err(RuntimeError::Unreachable("refused".into()))]);
    let (result, _) = run(
        generation(Some(1), Some(submitted_changed_at(lost_status.clone(), 2))),
        runtime,
        model_target(),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));

    // After it: the same request (same jobId) is submitted again, counted as the second.
    let runtime = FakeRuntime::answering(vec![
        Err(RuntimeError::NotFound),
        Ok(runtime_job(JobState::Queued)),
    ]);
    let (result, sent) = run(
        generation(Some(1), Some(submitted_changed_at(lost_status, 60))),
        runtime.clone(),
        calls([
            model_target(),
            // The token read for the poll serves the submission: no second Secret read.
            submission_calls(2)
                .into_iter()
                .filter(|c| c.path != auth_secret_path())
                .collect(),
            // Running → Pending (queued again), then Resubmitted.
            vec![generation_status(Some(2)), event(), event()],
        ]),
        controller::reconcile_generation,
    )
    .await;
    result.unwrap();
    assert_eq!(
        sent[4].body["metadata"]["annotations"][ig::SUBMISSIONS_ANNOTATION],
        "2"
    );
    let calls = runtime.calls();
    let RuntimeCall::Submit(_, request) = &calls[1] else {
        panic!("{calls:?}")
    };
    assert_eq!(request.job_id.as_deref(), Some(ig::job_id(UID).as_str()));
    assert_eq!(
        conditions(&sent[5])["Submitted"],
        ("True".into(), "Accepted".into())
    );
    assert_eq!(sent[5].body["status"]["phase"], "Pending");
    assert_eq!(sent[6].body["reason"], "Pending");
    assert_eq!(sent[7].body["reason"], "Resubmitted");
}

/// A running generation is polled every few seconds: its model's runtime token is read from
/// the auth Secret once, not on every poll, and read again for a model made anew.
#[tokio::test]
async fn polls_read_the_runtime_token_once_per_model() {
    let mut remade = ready_model();
    remade.metadata.uid = Some("m-2".into());
    let (client, server) = serving(calls([
        model_target(),
        vec![get(&model_path(), ready_model())],
        vec![get(&model_path(), ready_model())],
        // The same name, another uid: the token is read again (from the new model's Secret).
        vec![get(&model_path(), remade)],
        vec![get(&auth_secret_path(), {
            let mut secret = auth_secret();
            secret["metadata"]["ownerReferences"][0]["uid"] = json!("m-2");
            secret
        })],
    ]));
    let runtime =
        FakeRuntime::answering((0..4).map(|_| Ok(runtime_job(JobState::Running))).collect());
    // Already Running with this progress: the polls change nothing, so they write nothing.
    let status = ig::status_from_job(
        &generation(Some(1), None),
        &runtime_job(JobState::Running),
        "http://sd15.team-a.svc:80",
        now(),
    );
    let running = Arc::new(generation(Some(1), Some(to_json(status))));
    let ctx = Arc::new(context(client, runtime.clone()));
    for _ in 0..4 {
        let action = controller::reconcile_generation(running.clone(), ctx.clone()).await;
        assert_eq!(
            action.unwrap(),
            Action::requeue(controller::GENERATION_POLL)
        );
    }
    drop(ctx);
    // Six reads for four polls; the mock fails on any call it was not given.
    assert_eq!(sent(server).await.len(), 6);
    assert_eq!(runtime.calls().len(), 4, "every poll reached the runtime");
}

#[tokio::test]
async fn generation_fails_when_resubmissions_are_used_up() {
    let mut status = json!({"phase": "Running", "conditions": [{
        "type": "Submitted", "status": "False", "reason": "JobLost", "message": "404",
        "lastTransitionTime": to_json(at(NOW - 3600))
    }]});
    status["observedGeneration"] = json!(1);
    let runtime = FakeRuntime::answering(vec![Err(RuntimeError::NotFound)]);
    let (result, sent) = run(
        generation(Some(5), Some(status)),
        runtime,
        polled_with_status_calls(5),
        controller::reconcile_generation,
    )
    .await;
    // Finished with a 60 s TTL from now.
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    assert_eq!(sent[2].body["status"]["phase"], "Failed");
    assert_eq!(
        conditions(&sent[2])["Failed"],
        ("True".into(), "RuntimeLostJob".into())
    );
    assert_eq!(sent[3].body["type"], "Warning");
}

fn finished_status(completed_at: i64) -> Value {
    json!({
        "phase": "Succeeded",
        "images": [{"url": "http://sd15.team-a.svc:80/v1/images/img-1.png", "seed": 1, "sha256": "aa"}],
        "timings": {"completionTime": to_json(at(completed_at))}
    })
}

/// The patch that removes the generation's finalizer.
fn generation_released() -> Call {
    patch(&generation_path(), generation(Some(1), None))
}

#[tokio::test]
async fn generation_is_deleted_after_its_ttl() {
    let (result, sent) = run(
        generation(Some(1), Some(finished_status(NOW - 61))),
        FakeRuntime::answering(vec![]),
        vec![call(
            Method::DELETE,
            &generation_path(),
            200,
            to_json(generation(Some(1), None)),
        )],
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(sent.len(), 1);

    // Not yet: no calls, a wake-up when it is due.
    let (result, _) = run(
        generation(Some(1), Some(finished_status(NOW - 20))),
        FakeRuntime::answering(vec![]),
        vec![],
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(40)));
}

#[tokio::test]
async fn generation_deletion_removes_its_images() {
    let runtime = FakeRuntime::answering(vec![]);
    let (result, sent) = run(
        deleting(generation(Some(1), Some(finished_status(NOW - 5)))),
        runtime.clone(),
        calls([model_target(), vec![generation_released()]]),
        controller::reconcile_generation,
    )
    .await;
    result.unwrap();
    assert_eq!(
        runtime.calls(),
        vec![RuntimeCall::DeleteImage("img-1".into())]
    );
    assert!(sent[2].body.to_string().contains("remove"));
}

#[tokio::test]
async fn generation_deletion_while_running_cancels_the_job() {
    let runtime = FakeRuntime::answering(vec![]);
    let (result, _) = run(
        deleting(generation(Some(1), Some(json!({"phase": "Running"})))),
        runtime.clone(),
        calls([model_target(), vec![generation_released()]]),
        controller::reconcile_generation,
    )
    .await;
    result.unwrap();
    assert_eq!(runtime.calls(), vec![RuntimeCall::Cancel(ig::job_id(UID))]);
}

#[tokio::test]
async fn generation_runtime_error_is_retried() {
    let runtime = FakeRuntime::answering(vec![Err(RuntimeError::Api {
        status: 401,
        code: "unauthorized".into(),
        message: "bad token".into(),
    })]);
    let (result, _) = run(
        generation(Some(1), None),
        runtime,
        model_target(),
        controller::reconcile_generation,
    )
    .await;
    assert!(matches!(
        result,
        Err(Error::Runtime(RuntimeError::Api { status: 401, .. }))
    ));
}

#[test]
fn phases_used_in_tests_are_the_api_spelling() {
    assert_eq!(serde_json::to_value(Phase::Running).unwrap(), "Running");
}

// ---- progress reports ----

mod progress {
    use super::*;
    use crate::server::{KubeProgress, ProgressSink};
    use imagegen_crds::api::TrainerEvent;

    /// Runs `body` with a KubeProgress on the mock API serving `calls`.
    async fn with_sink<F, Fut, T>(calls: Vec<Call>, body: F) -> (T, Vec<Sent>)
    where
        F: FnOnce(KubeProgress) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (client, server) = serving(calls);
        let out = body(KubeProgress::new(client)).await;
        (out, sent(server).await)
    }

    fn token_secret(owner: Option<&str>) -> Value {
        let mut secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "alice-progress", "namespace": NS},
            "data": {"token": "czNjcmV0"}  // "s3cret"
        });
        if let Some(owner) = owner {
            secret["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "imagegen.dev/v1alpha1", "kind": "LoraTraining",
                "name": owner, "uid": "t-1", "controller": true
            }]);
        }
        secret
    }

    #[tokio::test]
    async fn tokens_come_from_the_trainings_own_secret() {
        let secret = path("api/v1", "secrets/alice-progress");
        let (tokens, _) = with_sink(
            vec![
                get(&secret, token_secret(Some("alice"))),
                get(&secret, token_secret(None)),
                get(&secret, token_secret(Some("mallory"))),
                get_missing(&secret),
            ],
            |sink| async move {
                let mut tokens = Vec::new();
                for _ in 0..4 {
                    tokens.push(sink.token(NS, "alice").await.unwrap());
                }
                tokens
            },
        )
        .await;
        assert_eq!(tokens, [Some("s3cret".to_string()), None, None, None]);
    }

    #[tokio::test]
    async fn a_matching_token_is_read_once_per_training() {
        let secret = path("api/v1", "secrets/alice-progress");
        let done = TrainerEvent::Done {
            step: 1,
            total: 1,
            output: "o".into(),
            loss: None,
        };
        let (verdicts, sent) = with_sink(
            vec![
                get(&secret, token_secret(Some("alice"))),
                // A wrong token reads the Secret again: it may have been made anew.
                get(&secret, token_secret(Some("alice"))),
                // Done drops the token, so the next report reads it again.
                get(&cr("loratrainings", "alice"), training(true, None)),
                training_status(),
                get(&secret, token_secret(Some("alice"))),
            ],
            |sink| async move {
                let mut verdicts = Vec::new();
                for presented in ["s3cret", "s3cret", "s3cret", "wrong", "s3cret"] {
                    verdicts.push(sink.verify(NS, "alice", presented).await.unwrap());
                }
                sink.record(NS, "alice", &done).await.unwrap();
                verdicts.push(sink.verify(NS, "alice", "s3cret").await.unwrap());
                verdicts
            },
        )
        .await;
        assert_eq!(verdicts, [true, true, true, false, true, true]);
        // Three Secret reads for six checks; the mock fails on any call it was not given.
        assert_eq!(sent.len(), 5);
    }

    #[tokio::test]
    async fn reports_are_written_into_the_status_throttled() {
        let (_, sent) = with_sink(
            vec![
                get(&cr("loratrainings", "alice"), training(true, None)),
                training_status(),
                // The step right after is throttled; done is always written.
                training_status(),
            ],
            |sink| async move {
                sink.record(
                    NS,
                    "alice",
                    &TrainerEvent::Started {
                        total: 800,
                        seed: 42,
                    },
                )
                .await
                .unwrap();
                sink.record(
                    NS,
                    "alice",
                    &TrainerEvent::Step {
                        step: 10,
                        total: 800,
                        loss: 0.5,
                        lr: 1e-4,
                        elapsed: 1.0,
                        eta: 79.0,
                    },
                )
                .await
                .unwrap();
                sink.record(
                    NS,
                    "alice",
                    &TrainerEvent::Done {
                        step: 800,
                        total: 800,
                        output: "o".into(),
                        loss: Some(0.1),
                    },
                )
                .await
                .unwrap();
            },
        )
        .await;
        assert_eq!(sent[1].body["status"]["progress"]["total"], 800);
        assert_eq!(sent[1].body["status"]["seed"], 42);
        assert!(sent[1]
            .query
            .contains("fieldManager=imagegen-operator-progress"));
        assert_eq!(sent[2].body["status"]["progress"]["step"], 800);
        assert_eq!(sent[2].body["status"]["loss"], 0.1);
    }
}

#[tokio::test]
async fn model_with_a_cache_applies_its_claim_first() {
    let mut m = model(None);
    m.spec.cache = serde_json::from_value(json!({"size": "20Gi"})).unwrap();
    let (result, sent) = run(
        m,
        FakeRuntime::answering(vec![]),
        calls([
            vec![
                get(&auth_secret_path(), auth_secret()),
                get_missing(&path("api/v1", "persistentvolumeclaims/sd15-cache")),
                patch(
                    &path("api/v1", "persistentvolumeclaims/sd15-cache"),
                    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "sd15-cache"}}),
                ),
            ],
            deployment_and_service(deployment(0)),
            vec![model_status()],
        ]),
        controller::reconcile_model,
    )
    .await;
    result.unwrap();
    assert!(is_server_side_apply(&sent[2]));
    assert_eq!(
        sent[2].body["spec"]["resources"]["requests"]["storage"],
        "20Gi"
    );
    let volumes = sent[4].body["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("sd15-cache"), "{volumes}");
}

/// `kubectl scale` (or an HPA) within replicas.min..max is kept; a count outside is brought
/// back within.
#[tokio::test]
async fn model_keeps_a_replica_count_set_by_hand_within_its_bounds() {
    for (scaled, applied) in [(3, 3), (9, 4)] {
        let mut m = model(None);
        m.spec.replicas = serde_json::from_value(json!({"min": 1, "max": 4})).unwrap();
        let mut existing = deployment(1);
        existing.spec.as_mut().unwrap().replicas = Some(scaled);
        let (result, sent) = run(
            m,
            FakeRuntime::answering(vec![]),
            calls([
                vec![get(&auth_secret_path(), auth_secret())],
                vec![get(
                    &path("apis/apps/v1", "deployments/sd15"),
                    existing.clone(),
                )],
                deployment_and_service(existing).split_off(1),
                vec![model_status(), event()],
            ]),
            controller::reconcile_model,
        )
        .await;
        result.unwrap();
        assert_eq!(
            sent[2].body["spec"]["replicas"], applied,
            "scaled to {scaled}"
        );
    }
}

#[tokio::test]
async fn generation_refused_by_the_runtime_fails() {
    let runtime = FakeRuntime::answering(vec![Err(RuntimeError::Api {
        status: 400,
        code: "invalid_field".into(),
        message: "width must be a multiple of 8".into(),
    })]);
    let (result, sent) = run(
        generation(None, None),
        runtime,
        submitted_calls(),
        controller::reconcile_generation,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    assert_eq!(sent[4].body["status"]["phase"], "Failed");
    assert_eq!(
        conditions(&sent[4])["Failed"],
        ("True".into(), "RejectedByRuntime".into())
    );
    assert!(sent[4].body["status"]["message"]
        .as_str()
        .unwrap()
        .contains("multiple of 8"));
}

#[tokio::test]
async fn generation_deletion_is_not_blocked_by_a_runtime_without_image_deletion() {
    let mut g = generation(Some(1), Some(finished_status(NOW - 5)));
    let status = g.status.as_mut().unwrap();
    status.images.push(status.images[0].clone());
    let runtime = Arc::new(FakeRuntime {
        delete_image: Some(RuntimeError::Api {
            status: 405,
            code: "bad_request".into(),
            message: "method not allowed".into(),
        }),
        ..FakeRuntime::default()
    });
    let (result, sent) = run(
        deleting(g),
        runtime.clone(),
        calls([model_target(), vec![event(), generation_released()]]),
        controller::reconcile_generation,
    )
    .await;
    result.unwrap();
    // One try, then the finalizer is released with a warning.
    assert_eq!(runtime.calls().len(), 1);
    assert_eq!(sent[2].body["reason"], "ImagesKept");
    assert!(sent[3].body.to_string().contains("remove"));
}

/// A runtime that keeps failing holds a deletion up for CLEANUP_GRACE, then no longer: the
/// finalizer is released with a Warning event.
#[tokio::test]
async fn generation_deletion_gives_up_on_a_failing_runtime_after_the_grace() {
    let failing = || {
        Arc::new(FakeRuntime {
            delete_image: Some(RuntimeError::Api {
                status: 503,
                code: "unavailable".into(),
                message: "the store is down".into(),
            }),
            ..FakeRuntime::default()
        })
    };
    let deleted_at = |second: i64| {
        let mut value = to_json(generation(Some(1), Some(finished_status(NOW - 500))));
        value["metadata"]["deletionTimestamp"] = to_json(at(second));
        serde_json::from_value::<ImageGeneration>(value).unwrap()
    };
    // Within the grace: an error, retried with backoff; the finalizer stays.
    let (result, sent) = run(
        deleted_at(NOW - 10),
        failing(),
        model_target(),
        controller::reconcile_generation,
    )
    .await;
    assert!(matches!(result, Err(Error::Runtime(_))), "{result:?}");
    assert_eq!(sent.len(), 2);
    // After it: released, and the event says why the images stay.
    let (result, sent) = run(
        deleted_at(NOW - controller::CLEANUP_GRACE.as_secs() as i64 - 1),
        failing(),
        calls([model_target(), vec![event(), generation_released()]]),
        controller::reconcile_generation,
    )
    .await;
    result.unwrap();
    assert_eq!(sent[2].body["reason"], "ImagesKept");
    assert!(sent[2].body["note"]
        .to_string()
        .contains("the store is down"));
    assert!(sent[3].body.to_string().contains("remove"));
}

#[tokio::test]
async fn model_being_deleted_makes_no_calls() {
    let (result, sent) = run(
        deleting(ready_model()),
        FakeRuntime::answering(vec![]),
        vec![],
        controller::reconcile_model,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(sent.is_empty());
}
