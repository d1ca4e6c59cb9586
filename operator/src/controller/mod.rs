//! The API layer: one `reconcile_*` per kind, run by kube's `Controller`. Each reads what the
//! resource refers to, calls the pure validate/build/status functions of the kind's module,
//! server-side applies the built objects, patches the status subresource when it changed, and
//! publishes an event for every phase or readiness transition.
//!
//! Deletion: LoraTraining and ImageGeneration carry a finalizer so that what they stored in
//! the runtime's store goes with them (the LoRA, the images). The operator deletes those
//! through the runtime's own API (`DELETE /v1/loras/{name}`, `DELETE /v1/images/{id}`),
//! so the runtime stays the only owner of the store's layout and credentials. When the model
//! (and so the runtime) no longer exists, nothing can be deleted that way: the finalizer is
//! released with a Warning event instead of blocking the deletion forever.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagegen_crds::{DiffusionModel, ImageGeneration, ImageGenerationStatus, LoraTraining, Phase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use crate::api::image_generation::RuntimePod;
use crate::autoscaler;
use crate::conditions::{condition, find, HasConditions};
use crate::dispatch::{self, DispatchState};
use crate::image_generation::{self as ig, AfterLoss, Blocked as GenerationBlocked};
use crate::lora_training::{self as lt, Blocked as TrainingBlocked, TrainerReport};
use crate::metrics::Metrics;
use crate::pod_choice::{self, Choice};
use crate::runtime_client::{image_id_from_url, RuntimeApi, RuntimeError, Target};
use crate::runtime_pods;
use crate::secret_copies;
use crate::workload::{self, Found};
use crate::{diffusion_model as dm, OperatorConfig, FIELD_MANAGER};

/// Finalizer of LoraTrainings: deletes the trained LoRA.
pub const LORA_FINALIZER: &str = "imagegen.dev/lora-artifact";
/// Finalizer of ImageGenerations: cancels the job and deletes the stored images.
pub const IMAGES_FINALIZER: &str = "imagegen.dev/images";
/// How often a model is looked at again without a change (its children's changes wake it).
pub const MODEL_RESYNC: Duration = Duration::from_secs(300);
/// How often a waiting resource checks its references again.
pub const WAIT_RECHECK: Duration = Duration::from_secs(15);
/// How long a runtime pod takes to start, until a model's cold start has measured it.
pub const DEFAULT_POD_START: Duration = Duration::from_secs(30);
/// How often a running generation's job is polled.
pub const GENERATION_POLL: Duration = Duration::from_secs(3);
/// How often a running training is looked at (its Job's changes wake it too).
pub const TRAINING_POLL: Duration = Duration::from_secs(30);
/// When a training whose status changed under the reconciler is looked at again (its watch
/// event usually comes first).
pub const STALE_RETRY: Duration = Duration::from_secs(1);
/// First retry delay after an error; it doubles per consecutive error of the same object.
pub const ERROR_BASE_DELAY: Duration = Duration::from_secs(5);
/// Longest retry delay after errors.
pub const ERROR_MAX_DELAY: Duration = Duration::from_secs(300);
/// How long a deleted resource waits for the runtime to delete what it stored: after that,
/// a runtime that keeps failing no longer holds the deletion up (the finalizer is released
/// with a Warning event naming what stays in the store).
pub const CLEANUP_GRACE: Duration = Duration::from_secs(120);

/// Whether `obj` was deleted longer than [`CLEANUP_GRACE`] ago.
fn cleanup_grace_over<K: Resource>(obj: &K, now: &Time) -> bool {
    obj.meta()
        .deletion_timestamp
        .as_ref()
        .is_some_and(|deleted| {
            deleted
                .0
                .saturating_add(CLEANUP_GRACE)
                .is_ok_and(|until| until <= now.0)
        })
}

/// A clean-up's runtime error, once the grace is over: released with a Warning event instead
/// of retried. `what` says what stays in the store.
async fn give_up_cleanup<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    result: Result<Action, Error>,
    reason: &str,
    what: &str,
) -> Result<Action, Error> {
    match result {
        Err(Error::Runtime(e)) if cleanup_grace_over(obj, &(ctx.now)()) => {
            ctx.event(
                obj,
                EventType::Warning,
                reason,
                format!(
                    "the runtime kept failing for {}s ({e}), so {what} stays in the store",
                    CLEANUP_GRACE.as_secs()
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        other => other,
    }
}

/// Why a reconciliation failed (it is retried with backoff by [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A call to the runtime failed in a way a retry may fix.
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    /// The runtime auth Secret has no token for the namespace's tenant.
    #[error("the Secret {0} has no runtime token for this namespace")]
    MissingToken(String),
    /// Adding or removing a finalizer, or the clean-up behind it, failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// What exists cannot serve the spec, and the operator cannot change it by itself.
    #[error("{0}")]
    Unservable(String),
    /// An object the operator would make exists already and belongs to someone else: it is
    /// never taken over (its Secret's token or its Job's command would be another's).
    #[error("the {kind} {name} exists and is not controlled by {owner}: delete or rename it")]
    NotOwned {
        kind: String,
        name: String,
        owner: String,
    },
}

impl Error {
    /// A short label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Runtime(_) => "runtime",
            Error::MissingToken(_) => "missing_token",
            Error::Finalizer(_) => "finalizer",
            Error::NotOwned { .. } => "not_owned",
            Error::Unservable(_) => "unservable",
        }
    }
}

/// Consecutive failures per object, for exponential backoff.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records one more failure of `key` and returns how long to wait: 5 s, 10 s, 20 s, …,
    /// at most 5 minutes.
    pub fn fail(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        crate::doubling_delay(*n, ERROR_BASE_DELAY, ERROR_MAX_DELAY)
    }

    /// Forgets the failures of `key` after a success.
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// How long a model's runtime token, once read from its auth Secret, is used without
/// reading it again.
pub const RUNTIME_TOKEN_TTL: Duration = Duration::from_secs(60);

/// The models' runtime tokens as read from their auth Secrets. A running generation is
/// polled every few seconds, and the token, created once per model and never re-applied,
/// does not change under it. A model made anew (another uid) reads it again at once; a
/// Secret replaced by hand is read again after [`RUNTIME_TOKEN_TTL`] (its runtime pods, which
/// read their tokens at start, need a restart for it anyway).
#[derive(Debug, Default)]
pub struct RuntimeTokens {
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
}

#[derive(Debug)]
struct CachedToken {
    model_uid: Option<String>,
    token: String,
    read_at: Instant,
}

impl RuntimeTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), CachedToken>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token of `model`, when one was read for this very model within the TTL.
    fn get(&self, model: &DiffusionModel) -> Option<String> {
        self.lock()
            .get(&model_key(model))
            .filter(|c| c.model_uid == model.metadata.uid)
            .filter(|c| c.read_at.elapsed() < RUNTIME_TOKEN_TTL)
            .map(|c| c.token.clone())
    }

    fn put(&self, model: &DiffusionModel, token: &str) {
        let cached = CachedToken {
            model_uid: model.metadata.uid.clone(),
            token: token.to_string(),
            read_at: Instant::now(),
        };
        let mut tokens = self.lock();
        tokens.retain(|_, c| c.read_at.elapsed() < RUNTIME_TOKEN_TTL);
        tokens.insert(model_key(model), cached);
    }
}

fn model_key(model: &DiffusionModel) -> (String, String) {
    (model.namespace().unwrap_or_default(), model.name_any())
}

/// What every reconciliation shares.
pub struct Context {
    /// The API server.
    pub client: Client,
    /// The operator's settings.
    pub config: OperatorConfig,
    /// The runtime's HTTP API.
    pub runtime: Arc<dyn RuntimeApi>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// Error backoff per object.
    pub backoff: Backoff,
    /// Runtime tokens already read.
    pub runtime_tokens: RuntimeTokens,
    /// The EndpointSlices of the models' Services (a watch's cache): which pods a model has.
    pub endpoint_slices: Store<EndpointSlice>,
    /// The ImageGenerations (a watch's cache): each model's queue, for the autoscaler.
    pub generations: Store<ImageGeneration>,
    /// Locks and not-ready clocks of the dispatch to pods.
    pub dispatch: DispatchState,
    /// The clock (fixed in tests).
    pub now: fn() -> Time,
}

impl Context {
    /// A context with the real clock.
    pub fn new(
        client: Client,
        config: OperatorConfig,
        runtime: Arc<dyn RuntimeApi>,
        metrics: Metrics,
        recorder: Recorder,
        endpoint_slices: Store<EndpointSlice>,
        generations: Store<ImageGeneration>,
    ) -> Self {
        Context {
            client,
            config,
            runtime,
            metrics,
            recorder,
            backoff: Backoff::default(),
            runtime_tokens: RuntimeTokens::default(),
            endpoint_slices,
            generations,
            dispatch: DispatchState::default(),
            now: || Time(Timestamp::now()),
        }
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(event_note(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An event that cannot be published is not worth failing the reconciliation.
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// The API server refuses an event whose note is longer than 1024 bytes (an API server's
/// error message easily is): cut at a character boundary, marked with an ellipsis.
fn event_note(mut note: String) -> String {
    const MAX: usize = 1024;
    if note.len() > MAX {
        let mut end = MAX - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// Publishes a phase change of `obj` from `old` to `new` (nothing when it stayed): a Warning
/// `failed_reason` when it failed, otherwise a Normal event named after the new phase; the
/// note is the status `message`.
async fn phase_event<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    old: Option<Phase>,
    new: Option<Phase>,
    message: Option<&str>,
    failed_reason: &str,
) {
    if old == new {
        return;
    }
    let message = message.unwrap_or_default().to_string();
    match new {
        Some(Phase::Failed) => {
            ctx.event(obj, EventType::Warning, failed_reason, message)
                .await
        }
        Some(phase) => {
            ctx.event(obj, EventType::Normal, &format!("{phase:?}"), message)
                .await
        }
        None => {}
    }
}

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// The condition that shows a failed reconciliation on the object itself: False with the
/// error while reconciling fails, True again after the next success. Written by its own field
/// manager, so the kinds' status applies (which never name it) leave it alone.
pub const RECONCILED: &str = "Reconciled";
const ERRORS_FIELD_MANAGER: &str = "imagegen-operator-errors";

/// The three kinds as the error reporting below needs them: namespaced, with conditions in
/// a status that a server-side apply can write.
pub trait ReconciledKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + HasConditions
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
{
}

impl<K> ReconciledKind for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + HasConditions
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug
{
}

/// Retry after an error with exponential backoff per object, and say so on the object: a
/// Warning event and the [`RECONCILED`] condition False (both written in the background).
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: ReconciledKind + Send + Sync + 'static,
{
    let kind = K::kind(&());
    ctx.metrics.error(&kind, error.metric_label());
    let delay = ctx.backoff.fail(&key(obj.as_ref()));
    warn!(%kind, name = %obj.name_any(), namespace = ?obj.namespace(), %error, retry_in = ?delay, "reconcile failed");
    let message = error.to_string();
    tokio::spawn(async move {
        ctx.event(
            &*obj,
            EventType::Warning,
            "ReconcileFailed",
            message.clone(),
        )
        .await;
        // Written only when it says something new: every status write wakes the controller,
        // and a condition rewritten on each failure would make the retries a busy loop.
        if reconciled_condition(&*obj) == Some((false, message.as_str())) {
            return;
        }
        let reconciled = condition(RECONCILED, false, "ReconcileError", message, None);
        if let Err(e) = apply_reconciled(&ctx, &*obj, reconciled).await {
            warn!(%kind, name = %obj.name_any(), error = %e, "cannot show the error on the object");
        }
    });
    Action::requeue(delay)
}

/// After a success: the [`RECONCILED`] condition True again, if an error had set it False.
async fn clear_reconcile_error<K: ReconciledKind>(ctx: &Context, obj: &K) -> Result<(), Error> {
    if matches!(reconciled_condition(obj), Some((false, _))) {
        let reconciled = condition(RECONCILED, true, "Reconciled", String::new(), None);
        apply_reconciled(ctx, obj, reconciled).await?;
    }
    Ok(())
}

/// The [`RECONCILED`] condition of `obj`: whether it is True, and its message.
fn reconciled_condition(obj: &impl HasConditions) -> Option<(bool, &str)> {
    find(obj.conditions(), RECONCILED).map(|c| (c.status == "True", c.message.as_str()))
}

async fn apply_reconciled<K: ReconciledKind>(
    ctx: &Context,
    obj: &K,
    mut reconciled: Condition,
) -> Result<(), Error> {
    reconciled.last_transition_time = (ctx.now)();
    reconciled.observed_generation = obj.meta().generation;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let status = json!({"conditions": [reconciled]});
    apply_status_at(&api, obj, &status, ERRORS_FIELD_MANAGER, None).await?;
    Ok(())
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// Server-side applies `status` to `obj`'s status subresource, as the operator.
async fn apply_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    apply_status_at(api, obj, status, FIELD_MANAGER, None).await
}

/// [`apply_status`] with the `resourceVersion` that `obj` was read at as a precondition:
/// whether it was written. Someone else wrote the object since (a trainer's progress
/// report): the API server refuses (409), and what was built from the old read, older
/// progress or a cleared error, is dropped instead of overwriting the newer.
async fn apply_status_if_unchanged<K, S>(
    api: &Api<K>,
    obj: &K,
    status: &S,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let read_at = obj.meta().resource_version.as_deref();
    match apply_status_at(api, obj, status, FIELD_MANAGER, read_at).await {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Server-side applies `status` to `obj`'s status subresource as `manager`, with
/// `resource_version` as a precondition when given.
async fn apply_status_at<K, S>(
    api: &Api<K>,
    obj: &K,
    status: &S,
    manager: &str,
    resource_version: Option<&str>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let mut patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(resource_version) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": resource_version });
    }
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The operator's token for the tenant of `model`'s namespace.
async fn runtime_token(ctx: &Context, model: &DiffusionModel) -> Result<String, Error> {
    if let Some(token) = ctx.runtime_tokens.get(model) {
        return Ok(token);
    }
    let namespace = model.namespace().unwrap_or_default();
    let secret_name = dm::auth_secret_name(&model.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = model.metadata.uid.clone().unwrap_or_default();
    let secret = controlled_by(
        secrets.get(&secret_name).await?,
        ("DiffusionModel", &model.name_any(), &uid),
    )?;
    let token =
        dm::token_from_auth_secret(&secret, &namespace).ok_or(Error::MissingToken(secret_name))?;
    ctx.runtime_tokens.put(model, &token);
    Ok(token)
}

/// The pods of `model`, ready or not, from its Service's EndpointSlices.
fn model_pods(ctx: &Context, model: &DiffusionModel) -> Vec<runtime_pods::PodEndpoint> {
    let slices = ctx.endpoint_slices.state();
    runtime_pods::model_pods(
        slices.iter().map(|s| s.as_ref()),
        &model.namespace().unwrap_or_default(),
        &model.name_any(),
    )
}

/// The runtime of `model` at `pod`.
async fn pod_target(
    ctx: &Context,
    model: &DiffusionModel,
    pod: &RuntimePod,
) -> Result<Target, Error> {
    Ok(Target {
        base_url: runtime_pods::base_url(pod),
        token: runtime_token(ctx, model).await?,
    })
}

/// A ready pod of `model` for work that any replica can do (the store is shared): the
/// target, or `None` when the model has no ready pod.
async fn any_ready_target(
    ctx: &Context,
    model: &DiffusionModel,
    key: &str,
) -> Result<Option<Target>, Error> {
    let pods = model_pods(ctx, model);
    match runtime_pods::choose(&pods, key) {
        Some(pod) => Ok(Some(pod_target(ctx, model, pod).await?)),
        None => Ok(None),
    }
}

fn finalizer_error(e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::Finalizer(other.to_string()),
    }
}

/// `obj` if the object `owner` (kind, name, uid) controls it, or [`Error::NotOwned`].
fn controlled_by<K: Resource<DynamicType = ()>>(
    obj: K,
    owner: (&str, &str, &str),
) -> Result<K, Error> {
    let (kind, name, uid) = owner;
    let controlled = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true));
    if controlled {
        Ok(obj)
    } else {
        Err(Error::NotOwned {
            kind: K::kind(&()).into(),
            name: obj.name_any(),
            owner: format!("{kind} {name}"),
        })
    }
}

/// Creates `obj` unless it exists; an object created meanwhile by someone else is fine
/// here, and refused by the ownership check of the next reconciliation.
async fn create_once<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// A ready pod of the model `model` in `namespace`, for work that any replica can do:
/// `None` when the model is gone or has no ready pod.
async fn model_target(
    ctx: &Context,
    namespace: &str,
    model: &str,
    key: &str,
) -> Result<Option<Target>, Error> {
    let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), namespace);
    match models.get_opt(model).await? {
        Some(model) => any_ready_target(ctx, &model, key).await,
        None => Ok(None),
    }
}

/// Whether the pods in `namespace` that mount the store claim must share one node (the
/// claim is not ReadWriteMany). A claim missing from the namespace, or one no two pods can
/// share, makes the resource unservable.
async fn store_on_one_node(ctx: &Context, namespace: &str) -> Result<bool, Error> {
    let Some(name) = &ctx.config.store_claim else {
        return Ok(false);
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(claim) = claims.get_opt(name).await? else {
        return Err(Error::Unservable(format!(
            "the store claim {name} does not exist in namespace {namespace}: a claim belongs \
             to one namespace, so models outside {} need a claim of that name bound to the \
             same shared (ReadWriteMany) storage, or an S3 store",
            ctx.config.namespace
        )));
    };
    if let Some(why) = workload::claim_unshareable(&claim) {
        return Err(Error::Unservable(why));
    }
    Ok(!workload::claim_spans_nodes(&claim))
}

mod generation;
mod model;
mod training;

pub use generation::reconcile_generation;
pub use model::reconcile_model;
pub use training::reconcile_training;

// ---------------------------------------------------------------------------------------
// Wake-ups: what to reconcile again when something a resource refers to changes
// ---------------------------------------------------------------------------------------

fn unfinished_in<'a, K>(
    items: &'a [Arc<K>],
    namespace: &'a Option<String>,
    phase: impl Fn(&K) -> Option<Phase> + 'a,
) -> impl Iterator<Item = &'a Arc<K>> + 'a
where
    K: Resource<DynamicType = ()>,
{
    items.iter().filter(move |item| {
        &item.namespace() == namespace && !phase(item).is_some_and(Phase::is_finished)
    })
}

/// The unfinished ImageGenerations of `model`'s namespace that run on it: its queue.
fn queued_on<'a>(
    generations: &'a [Arc<ImageGeneration>],
    model: &'a DiffusionModel,
) -> impl Iterator<Item = &'a Arc<ImageGeneration>> + 'a {
    let name = model.name_any();
    unfinished_in(generations, &model.metadata.namespace, |g| {
        g.status.as_ref()?.phase
    })
    .filter(move |g| g.spec.model_ref.name == name)
}

/// The unfinished ImageGenerations of `model`'s namespace that run on it.
pub fn generations_using_model(
    generations: &[Arc<ImageGeneration>],
    model: &DiffusionModel,
) -> Vec<ObjectRef<ImageGeneration>> {
    queued_on(generations, model)
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

/// How many generations `model` has pending or running, from the operator's cache.
fn queue_length(ctx: &Context, model: &DiffusionModel) -> u32 {
    queued_on(&ctx.generations.state(), model).count() as u32
}

/// The model whose queue a change of `generation` may change: when it arrives (no phase
/// yet, or Pending) and when it finishes. Progress while it runs changes no queue.
pub fn model_of_queued_generation(
    generation: ImageGeneration,
) -> Option<ObjectRef<DiffusionModel>> {
    let phase = generation.status.as_ref().and_then(|s| s.phase);
    if phase == Some(Phase::Running) {
        return None;
    }
    let namespace = generation.namespace()?;
    Some(ObjectRef::new(&generation.spec.model_ref.name).within(&namespace))
}

/// The unfinished LoraTrainings of `model`'s namespace that train on it.
pub fn trainings_using_model(
    trainings: &[Arc<LoraTraining>],
    model: &DiffusionModel,
) -> Vec<ObjectRef<LoraTraining>> {
    let namespace = model.namespace();
    unfinished_in(trainings, &namespace, |t| t.status.as_ref()?.phase)
        .filter(|t| t.spec.model_ref.name == model.name_any())
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The unfinished ImageGenerations of `training`'s namespace that apply its LoRA.
pub fn generations_using_lora(
    generations: &[Arc<ImageGeneration>],
    training: &LoraTraining,
) -> Vec<ObjectRef<ImageGeneration>> {
    let namespace = training.namespace();
    let name = training.name_any();
    unfinished_in(generations, &namespace, |g| g.status.as_ref()?.phase)
        .filter(|g| g.spec.loras.iter().any(|l| l.name == name))
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_the_api_servers_limit() {
        assert_eq!(event_note("short".into()), "short");
        for filler in ["x", "é", "東"] {
            let note = event_note(filler.repeat(3000));
            assert!(note.len() <= 1024, "{}", note.len());
            assert!(note.ends_with('…') && note.len() > 1000, "{filler}");
        }
    }

    fn generation(
        namespace: &str,
        model: &str,
        loras: &[&str],
        phase: Option<&str>,
    ) -> Arc<ImageGeneration> {
        let mut value = json!({
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGeneration",
            "metadata": {"name": format!("g-{namespace}-{model}-{}", loras.join("-")), "namespace": namespace},
            "spec": {"modelRef": {"name": model}, "prompt": "p",
                     "loras": loras.iter().map(|l| json!({"name": l})).collect::<Vec<_>>()}
        });
        if let Some(phase) = phase {
            value["status"] = json!({"phase": phase});
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn changes_wake_the_unfinished_dependents_of_the_namespace() {
        let generations = vec![
            generation("a", "sd15", &["alice"], None),
            generation("a", "sd15", &[], Some("Running")),
            generation("a", "sd15", &["alice"], Some("Succeeded")),
            generation("a", "sd21", &["bob"], None),
            generation("b", "sd15", &["alice"], None),
        ];
        let model: DiffusionModel = serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "DiffusionModel",
            "metadata": {"name": "sd15", "namespace": "a"},
            "spec": {"source": {"path": "m"}, "family": "sd15"}
        }))
        .unwrap();
        let names = |refs: Vec<ObjectRef<ImageGeneration>>| {
            refs.into_iter().map(|r| r.name).collect::<Vec<_>>()
        };
        assert_eq!(
            names(generations_using_model(&generations, &model)),
            ["g-a-sd15-alice", "g-a-sd15-"]
        );
        let training: LoraTraining = serde_json::from_value(json!({
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "LoraTraining",
            "metadata": {"name": "alice", "namespace": "a"},
            "spec": {"modelRef": {"name": "sd15"}, "images": [{"path": "x"}], "instancePrompt": "p"}
        }))
        .unwrap();
        assert_eq!(
            names(generations_using_lora(&generations, &training)),
            ["g-a-sd15-alice"]
        );
        let trainings = vec![
            Arc::new(training.clone()),
            Arc::new({
                let mut t = training.clone();
                t.metadata.namespace = Some("b".into());
                t
            }),
        ];
        let woken = trainings_using_model(&trainings, &model);
        assert_eq!(woken.len(), 1);
        assert_eq!(woken[0].namespace.as_deref(), Some("a"));
    }

    #[test]
    fn backoff_doubles_per_failure_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.fail("a"), Duration::from_secs(5));
        assert_eq!(b.fail("a"), Duration::from_secs(10));
        assert_eq!(b.fail("a"), Duration::from_secs(20));
        assert_eq!(b.fail("b"), Duration::from_secs(5));
        for _ in 0..20 {
            b.fail("a");
        }
        assert_eq!(b.fail("a"), ERROR_MAX_DELAY);
        b.reset("a");
        assert_eq!(b.fail("a"), Duration::from_secs(5));
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
    }
}
