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

// ---------------------------------------------------------------------------------------
// DiffusionModel
// ---------------------------------------------------------------------------------------

/// DiffusionModel: ensure the runtime auth Secret, apply the cache claim, Deployment and
/// Service, and write the status derived from the Deployment.
pub async fn reconcile_model(
    model: Arc<DiffusionModel>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("DiffusionModel");
    // Going away: its children follow by owner reference; re-applying them now would only
    // race the garbage collector.
    if model.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = model.namespace().unwrap_or_default();
    let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = (ctx.now)();

    let valid = match dm::validate(&model) {
        Ok(valid) => valid,
        Err(error) => {
            let status = dm::status_invalid(&model, &error, now);
            if model.status.as_ref() != Some(&status) {
                apply_status(&models, &model, &status).await?;
                ctx.event(
                    &*model,
                    EventType::Warning,
                    "InvalidSpec",
                    error.to_string(),
                )
                .await;
            }
            return Ok(Action::await_change());
        }
    };

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let auth_name = dm::auth_secret_name(&valid.name);
    let owner = (
        "DiffusionModel",
        valid.name.as_str(),
        valid.owner.uid.as_str(),
    );
    if let Some(secret) = secrets.get_opt(&auth_name).await? {
        controlled_by(secret, owner)?;
    } else {
        // Created once and never re-applied: re-applying would rotate the token under
        // running replicas.
        create_once(&secrets, &dm::build_auth_secret(&valid, &random_token())).await?;
        info!(secret = %auth_name, %namespace, "created the runtime auth Secret");
    }
    let copies = copy_secrets(&ctx, &valid, &secrets).await?;
    let found = Found {
        secrets_digest: (!copies.is_empty()).then(|| secret_copies::digest(&copies)),
        store_on_one_node: store_on_one_node(&ctx, &namespace).await?,
    };
    let store_claim = ctx.config.store_claim.as_deref().unwrap_or_default();
    let unfit = workload::store_unfit_for_replicas(
        store_claim,
        found.store_on_one_node,
        valid.max_replicas,
    );
    if let Some(why) = unfit {
        return Err(Error::Unservable(why));
    }
    if let Some(claim) = dm::build_cache_claim(&valid) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
        // Made once: a claim's access modes are immutable, so re-applying one built for
        // another replicas.max would be refused (422) on every later reconciliation.
        match claims.get_opt(&valid.cache_claim_name()).await? {
            Some(existing) => {
                let existing = controlled_by(existing, owner)?;
                if let Some(why) = dm::cache_claim_unfit(&valid, &existing) {
                    return Err(Error::Unservable(why));
                }
            }
            None => drop(apply(&claims, &claim).await?),
        }
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    // A model without a count keeps the Deployment's (scaled by hand before): read, not
    // cached, so that a scale just made is never reverted.
    let existing = match deployments.get_opt(&valid.name).await? {
        Some(deployment) => Some(controlled_by(deployment, owner)?),
        None => None,
    };
    let replicas = autoscale(&ctx, &model, &valid, existing.as_ref(), &now).await?;
    let mut desired = dm::build_deployment(&valid, &ctx.config, &found);
    if let Some(spec) = desired.spec.as_mut() {
        spec.replicas = Some(replicas.count as i32);
    }
    let deployment = apply(&deployments, &desired).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    apply(&services, &dm::build_service(&valid)).await?;

    let status = dm::status_from(&model, Some(&deployment), Some(replicas.status), now);
    if model.status.as_ref() != Some(&status) {
        apply_status(&models, &model, &status).await?;
        let was_ready = dm::is_ready(&model);
        let mut updated = (*model).clone();
        updated.status = Some(status);
        match (was_ready, dm::is_ready(&updated)) {
            (false, true) => {
                ctx.event(
                    &*model,
                    EventType::Normal,
                    "Ready",
                    "enough replicas serve the model".into(),
                )
                .await
            }
            (true, false) => {
                ctx.event(
                    &*model,
                    EventType::Warning,
                    "NotReady",
                    "too few replicas are ready".into(),
                )
                .await
            }
            _ => {}
        }
    }
    ctx.backoff.reset(&key(model.as_ref()));
    clear_reconcile_error(&ctx, model.as_ref()).await?;
    Ok(Action::requeue(
        replicas
            .recheck
            .map_or(MODEL_RESYNC, |r| r.min(MODEL_RESYNC)),
    ))
}

/// The replica count a model runs, after the queue autoscaler's decision.
struct Scaled {
    count: u32,
    status: imagegen_crds::diffusion_model::AutoscalingStatus,
    /// When the autoscaler wants to look again (its quiet window ends).
    recheck: Option<Duration>,
}

/// Runs the queue autoscaler on `model`: writes a new count through the model's scale
/// subresource (as `kubectl scale` and an HPA do) and publishes its events.
async fn autoscale(
    ctx: &Context,
    model: &DiffusionModel,
    valid: &dm::ValidModel,
    existing: Option<&Deployment>,
    now: &Time,
) -> Result<Scaled, Error> {
    let current = dm::desired_replicas(valid, existing);
    let ready = existing
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let queue = generations_using_model(&ctx.generations.state(), model).len() as u32;
    let old = model.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let decision = autoscaler::decide(&valid.scaling, queue, current, ready, old, now);
    let mut count = current;
    if let Some(to) = decision.scale_to {
        let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), &valid.namespace);
        let patch = json!({"spec": {"replicas": to}});
        models
            .patch_scale(&valid.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        ctx.metrics.scaled(decision.direction.unwrap_or("up"));
        info!(model = %valid.name, namespace = %valid.namespace, queue, from = current, to, "scaled");
        count = to;
    }
    for note in &decision.notes {
        ctx.event(model, EventType::Normal, note.reason, note.message.clone())
            .await;
    }
    Ok(Scaled {
        count,
        recheck: autoscaler::recheck_after(&valid.scaling, &decision, now),
        status: decision.status,
    })
}

/// Copies the operator's Secrets (runtime environment, signing key) into the model's
/// namespace, creating each copy or updating it when its source changed; the copies as
/// they now are. A missing source makes the model unservable: its pods could not start.
async fn copy_secrets(
    ctx: &Context,
    valid: &dm::ValidModel,
    secrets: &Api<Secret>,
) -> Result<Vec<Secret>, Error> {
    let sources: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let owner = (
        "DiffusionModel",
        valid.name.as_str(),
        valid.owner.uid.as_str(),
    );
    let mut copies = Vec::new();
    for plan in secret_copies::plans(&ctx.config, &valid.name) {
        let Some(source) = sources.get_opt(&plan.source).await? else {
            return Err(Error::Unservable(format!(
                "the Secret {} in namespace {} does not exist, and runtime pods get a copy of it",
                plan.source, ctx.config.namespace
            )));
        };
        if plan.is_source(&valid.namespace, &ctx.config.namespace) {
            copies.push(source);
            continue;
        }
        let copy = secret_copies::build_copy(
            &source,
            &plan.copy,
            &valid.namespace,
            &valid.owner,
            dm::labels(&valid.name),
        );
        let current = match secrets.get_opt(&plan.copy).await? {
            Some(existing) => secret_copies::up_to_date(&controlled_by(existing, owner)?, &copy),
            None => false,
        };
        if !current {
            apply(secrets, &copy).await?;
            info!(secret = %plan.copy, namespace = %valid.namespace, from = %plan.source, "copied the Secret");
        }
        copies.push(copy);
    }
    Ok(copies)
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

// ---------------------------------------------------------------------------------------
// LoraTraining
// ---------------------------------------------------------------------------------------

/// LoraTraining: behind the artifact finalizer, create the training Job once the model is
/// Ready and follow it into the status.
pub async fn reconcile_training(
    training: Arc<LoraTraining>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("LoraTraining");
    let namespace = training.namespace().unwrap_or_default();
    let trainings: Api<LoraTraining> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(
        &trainings,
        LORA_FINALIZER,
        training.clone(),
        |event| async {
            match event {
                Finalizer::Apply(training) => apply_training(&training, &ctx).await,
                Finalizer::Cleanup(training) => cleanup_training(&training, &ctx).await,
            }
        },
    )
    .await
    .map_err(finalizer_error)?;
    ctx.backoff.reset(&key(training.as_ref()));
    clear_reconcile_error(&ctx, training.as_ref()).await?;
    Ok(action)
}

async fn apply_training(training: &LoraTraining, ctx: &Context) -> Result<Action, Error> {
    if training
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(Phase::is_finished)
    {
        return Ok(Action::await_change());
    }
    let namespace = training.namespace().unwrap_or_default();
    let now = (ctx.now)();
    let report = TrainerReport::from_status(training.status.as_ref());
    let trainings: Api<LoraTraining> = Api::namespaced(ctx.client.clone(), &namespace);

    let (job, blocked) = match lt::validate(training) {
        Err(error) => (None, Some(TrainingBlocked::Invalid(error.to_string()))),
        Ok(valid) => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            let owner = (
                "LoraTraining",
                valid.name.as_str(),
                valid.owner.uid.as_str(),
            );
            match jobs.get_opt(&valid.job_name()).await? {
                Some(job) => (Some(controlled_by(job, owner)?), None),
                None => start_training(ctx, &valid, &jobs).await?,
            }
        }
    };
    let mut status = lt::status_from(training, job.as_ref(), blocked.as_ref(), &report, now);
    if let Some(artifact) = status.artifact.as_mut().filter(|a| a.sha256.is_none()) {
        artifact.sha256 = lora_sha256(ctx, training).await;
    }
    if training.status.as_ref() != Some(&status) {
        if !apply_status_if_unchanged(&trainings, training, &status).await? {
            // The newer version's watch event brings the training back at once.
            return Ok(Action::requeue(STALE_RETRY));
        }
        phase_event(
            ctx,
            training,
            training.status.as_ref().and_then(|s| s.phase),
            status.phase,
            status.message.as_deref(),
            "TrainingFailed",
        )
        .await;
    }
    Ok(match status.phase {
        Some(phase) if phase.is_finished() => Action::await_change(),
        Some(Phase::Running) => Action::requeue(TRAINING_POLL),
        _ => Action::requeue(WAIT_RECHECK),
    })
}

/// The SHA-256 of the trained LoRA as the model's runtime lists it, when it can tell (the
/// status is final once Succeeded, so this is asked once; a failure leaves it unset).
async fn lora_sha256(ctx: &Context, training: &LoraTraining) -> Option<String> {
    let namespace = training.namespace().unwrap_or_default();
    let name = training.name_any();
    let looked_up = async {
        let Some(target) =
            model_target(ctx, &namespace, &training.spec.model_ref.name, &name).await?
        else {
            return Ok(None);
        };
        let loras = ctx.runtime.loras(&target).await?;
        Ok::<_, Error>(loras.into_iter().find(|l| l.name == name).map(|l| l.sha256))
    };
    match looked_up.await {
        Ok(sha256) => sha256,
        Err(e) => {
            warn!(%namespace, %name, error = %e, "cannot read the LoRA's SHA-256");
            None
        }
    }
}

/// Creates the token Secret and the Job once the model is Ready (or idle at zero replicas);
/// otherwise says why not.
async fn start_training(
    ctx: &Context,
    valid: &lt::ValidTraining,
    jobs: &Api<Job>,
) -> Result<(Option<Job>, Option<TrainingBlocked>), Error> {
    let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    let model = match dm::trainable(models.get_opt(&valid.model_name).await?) {
        Ok(model) => model,
        Err(why) => return Ok((None, Some(TrainingBlocked::WaitingForModel(why)))),
    };
    let valid_model = match dm::validate(&model) {
        Ok(v) => v,
        Err(e) => {
            return Ok((
                None,
                Some(TrainingBlocked::WaitingForModel(format!(
                    "the DiffusionModel is invalid: {e}"
                ))),
            ))
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    let owner = (
        "LoraTraining",
        valid.name.as_str(),
        valid.owner.uid.as_str(),
    );
    match secrets.get_opt(&valid.token_secret_name()).await? {
        Some(secret) => drop(controlled_by(secret, owner)?),
        None => create_once(&secrets, &lt::build_token_secret(valid, &random_token())).await?,
    }
    let found = Found {
        store_on_one_node: store_on_one_node(ctx, &valid.namespace).await?,
        ..Found::default()
    };
    let job = apply(
        jobs,
        &lt::build_job(valid, &valid_model, &ctx.config, &found),
    )
    .await?;
    info!(job = %valid.job_name(), namespace = %valid.namespace, "created the training Job");
    Ok((Some(job), None))
}

async fn cleanup_training(training: &LoraTraining, ctx: &Context) -> Result<Action, Error> {
    let result = delete_trained_lora(training, ctx).await;
    give_up_cleanup(ctx, training, result, "ArtifactKept", "the LoRA").await
}

async fn delete_trained_lora(training: &LoraTraining, ctx: &Context) -> Result<Action, Error> {
    let has_artifact = training
        .status
        .as_ref()
        .is_some_and(|s| s.artifact.is_some());
    if !has_artifact {
        return Ok(Action::await_change());
    }
    let namespace = training.namespace().unwrap_or_default();
    let Some(target) = model_target(
        ctx,
        &namespace,
        &training.spec.model_ref.name,
        &training.name_any(),
    )
    .await?
    else {
        ctx.event(
            training,
            EventType::Warning,
            "ArtifactKept",
            "the model's runtime is gone, so the LoRA stays in the store".into(),
        )
        .await;
        return Ok(Action::await_change());
    };
    ctx.runtime
        .delete_lora(&target, &training.name_any())
        .await?;
    ctx.event(
        training,
        EventType::Normal,
        "ArtifactDeleted",
        "the LoRA was deleted from the store".into(),
    )
    .await;
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------
// ImageGeneration
// ---------------------------------------------------------------------------------------

/// ImageGeneration: behind the images finalizer, submit the request once its model and
/// LoRAs are ready, follow the job, resubmit when the runtime lost it, and delete the
/// resource `ttlSecondsAfterFinished` after it finished.
pub async fn reconcile_generation(
    generation: Arc<ImageGeneration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("ImageGeneration");
    let namespace = generation.namespace().unwrap_or_default();
    let generations: Api<ImageGeneration> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(
        &generations,
        IMAGES_FINALIZER,
        generation.clone(),
        |event| async {
            match event {
                Finalizer::Apply(generation) => apply_generation(&generation, &ctx).await,
                Finalizer::Cleanup(generation) => cleanup_generation(&generation, &ctx).await,
            }
        },
    )
    .await
    .map_err(finalizer_error)?;
    ctx.backoff.reset(&key(generation.as_ref()));
    clear_reconcile_error(&ctx, generation.as_ref()).await?;
    Ok(action)
}

/// A submission ready to go: the request, the pod chosen for it, and that pod's runtime.
struct Submission {
    target: Target,
    choice: Choice,
    request: imagegen_crds::api::GenerationRequest,
}

/// What stands between a generation and its submission, or the submission.
async fn prepare_submission(
    ctx: &Context,
    generation: &ImageGeneration,
    valid: &ig::ValidGeneration,
) -> Result<Result<Submission, GenerationBlocked>, Error> {
    let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    let model = match dm::ready(models.get_opt(&valid.model_name).await?) {
        Ok(model) => model,
        Err(why) => return Ok(Err(GenerationBlocked::WaitingForModel(why))),
    };
    let trainings_api: Api<LoraTraining> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    let mut trainings = Vec::with_capacity(valid.loras.len());
    for lora in &valid.loras {
        trainings.push(trainings_api.get_opt(&lora.name).await?);
    }
    let loras = match ig::resolve_loras(valid, &trainings) {
        Ok(loras) => loras,
        Err(blocked) => return Ok(Err(blocked)),
    };
    let pods = model_pods(ctx, &model);
    let token = runtime_token(ctx, &model).await?;
    let loads = dispatch::loads(ctx.runtime.as_ref(), &token, &pods).await;
    let lora_paths: Vec<String> = loras.iter().filter_map(|l| l.path.clone()).collect();
    // A resubmission goes elsewhere than the pod that lost the job, when it can.
    let lost_by = generation
        .status
        .as_ref()
        .and_then(|s| s.runtime_pod.as_ref())
        .map(|pod| pod.name.as_str());
    let request = pod_choice::Request {
        job_id: &valid.job_id,
        loras: &lora_paths,
        avoid: lost_by,
    };
    let choice = pod_choice::choose(
        &pods,
        |pod| loads.get(pod),
        request,
        ctx.config.lora_affinity_slack,
    );
    let Some(choice) = choice else {
        return Ok(Err(GenerationBlocked::WaitingForModel(format!(
            "no runtime pod of DiffusionModel {} is ready",
            valid.model_name
        ))));
    };
    // While the model scales up, a job waits for a fresh pod rather than queue behind busy
    // ones (when that queue would take longer than a pod takes to start), but never longer
    // than `unready_grace` from its creation.
    let waited =
        generation
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Duration::ZERO, |created| {
                created
                    .0
                    .duration_until((ctx.now)().0)
                    .try_into()
                    .unwrap_or(Duration::ZERO)
            });
    if waited < ctx.config.unready_grace {
        let policy = autoscaler::Policy::of(model.spec.replicas.as_ref());
        let queue = generations_using_model(&ctx.generations.state(), &model).len() as u32;
        let count = model.spec.replicas.and_then(|r| r.count).unwrap_or(0);
        let expected = if policy.queue_driven {
            policy.needed(queue).max(policy.bounded(count))
        } else {
            policy.bounded(count)
        };
        let ready = pods.iter().filter(|p| p.ready).count() as u32;
        let pod_start = model
            .status
            .as_ref()
            .and_then(|s| s.autoscaling.as_ref())
            .and_then(|a| a.last_cold_start_seconds)
            .map_or(DEFAULT_POD_START, |s| Duration::from_secs(u64::from(s)));
        let starting = expected.saturating_sub(ready);
        let wait = pod_choice::wait_for_starting_pod(
            &choice,
            starting,
            policy.queue_per_replica,
            pod_start,
        );
        if let Some(why) = wait {
            return Ok(Err(GenerationBlocked::WaitingForModel(why)));
        }
    }
    Ok(Ok(Submission {
        target: Target {
            base_url: runtime_pods::base_url(&choice.pod),
            token,
        },
        choice,
        request: ig::build_request(generation, valid, loras),
    }))
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

/// Where a submitted job is, as far as the model's EndpointSlices tell.
enum JobPod {
    /// In the pod recorded in the generation's status, which is ready, or has not been
    /// ready for this long.
    Listed {
        target: Target,
        pod: RuntimePod,
        unready_for: Option<Duration>,
    },
    /// Nowhere any more: why.
    Lost(String),
}

/// The runtime that holds a submitted job: the pod recorded in the generation's status while
/// the model's Service still lists it, or why the job is lost.
async fn job_target(
    ctx: &Context,
    generation: &ImageGeneration,
    namespace: &str,
    model_name: &str,
) -> Result<JobPod, Error> {
    let models: Api<DiffusionModel> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(model) = models.get_opt(model_name).await? else {
        return Ok(JobPod::Lost("the DiffusionModel is gone".into()));
    };
    let pods = model_pods(ctx, &model);
    let recorded = generation
        .status
        .as_ref()
        .and_then(|s| s.runtime_pod.as_ref());
    let Some(recorded) = recorded else {
        // Submitted before pods were recorded (through the Service): any ready pod may hold
        // it; one that does not answers 404, and the job is submitted again.
        let job_id = ig::job_id(generation.metadata.uid.as_deref().unwrap_or_default());
        return match runtime_pods::choose(&pods, &job_id) {
            Some(pod) => Ok(JobPod::Listed {
                target: pod_target(ctx, &model, pod).await?,
                pod: pod.clone(),
                unready_for: None,
            }),
            None => Ok(JobPod::Lost("no runtime pod of the model is ready".into())),
        };
    };
    match runtime_pods::still_listed(&pods, recorded) {
        Some(endpoint) => Ok(JobPod::Listed {
            target: pod_target(ctx, &model, &endpoint.pod).await?,
            pod: endpoint.pod.clone(),
            unready_for: ctx
                .dispatch
                .unready_for(namespace, &endpoint.pod, endpoint.ready),
        }),
        None => Ok(JobPod::Lost(format!(
            "runtime pod {} ({}) is gone",
            recorded.name, recorded.address
        ))),
    }
}

/// Records one more submission in the annotation, before submitting: a crash in between
/// costs one count, never a second job (the jobId is the same).
async fn count_submission(
    generations: &Api<ImageGeneration>,
    generation: &ImageGeneration,
    count: u32,
) -> Result<(), Error> {
    let patch =
        json!({"metadata": {"annotations": {ig::SUBMISSIONS_ANNOTATION: count.to_string()}}});
    generations
        .patch(
            &generation.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn submit(
    ctx: &Context,
    generations: &Api<ImageGeneration>,
    generation: &ImageGeneration,
    count: u32,
    submission: &Submission,
    now: Time,
) -> Result<ImageGenerationStatus, Error> {
    count_submission(generations, generation, count).await?;
    let namespace = generation.namespace().unwrap_or_default();
    // Images are served by every replica from the shared store: their URLs name the Service.
    let service_url = dm::endpoint(&generation.spec.model_ref.name, &namespace);
    match ctx
        .runtime
        .submit(&submission.target, &submission.request)
        .await
    {
        Ok(job) => {
            let choice = &submission.choice;
            ctx.metrics.dispatched(choice.reason.label());
            let loras = submission.request.loras.len();
            let status = ig::status_dispatched(generation, &job, &service_url, choice, loras, now);
            Ok(status)
        }
        Err(e) if e.is_rejection() => Ok(ig::status_blocked(
            generation,
            &GenerationBlocked::Rejected(format!("the runtime refused the request: {e}")),
            now,
        )),
        Err(e) if e.job_lost() => Ok(ig::status_lost(
            generation,
            count,
            ctx.config.max_submissions,
            &e.to_string(),
            now,
        )),
        Err(e) => Err(e.into()),
    }
}

/// What polling a submitted generation's job leads to.
enum Polled {
    /// Write this status, and look again after `wait` (the phase's own delay when `None`).
    Write {
        status: Box<ImageGenerationStatus>,
        wait: Option<Duration>,
    },
    /// Leave the status as it is and look again after this long.
    Requeue(Duration),
}

/// One reconciliation of a valid generation: what submitting and polling it share.
struct GenerationStep<'a> {
    ctx: &'a Context,
    generations: &'a Api<ImageGeneration>,
    generation: &'a ImageGeneration,
    valid: &'a ig::ValidGeneration,
    now: &'a Time,
}

impl GenerationStep<'_> {
    /// Submits the generation as submission `count` once its model and LoRAs are ready: the
    /// status that follows, or what stands in the way.
    async fn submit_next(
        &self,
        count: u32,
    ) -> Result<Result<ImageGenerationStatus, GenerationBlocked>, Error> {
        // One submission to a model at a time: each reads the loads the ones before it
        // made, so a burst spreads instead of landing on whichever pod looked idle.
        let model_lock =
            (self.ctx.dispatch).model_lock(&self.valid.namespace, &self.valid.model_name);
        let _placing = model_lock.lock().await;
        let submission = match prepare_submission(self.ctx, self.generation, self.valid).await? {
            Ok(prepared) => prepared,
            Err(blocked) => return Ok(Err(blocked)),
        };
        let status = submit(
            self.ctx,
            self.generations,
            self.generation,
            count,
            &submission,
            self.now.clone(),
        );
        Ok(Ok(status.await?))
    }

    /// Polls the job of the generation, submitted `submitted` times. A job the runtime lost
    /// is recorded first, then submitted again after the backoff, until the submissions are
    /// used up.
    async fn poll(&self, submitted: u32) -> Result<Polled, Error> {
        let (ctx, generation, now) = (self.ctx, self.generation, self.now);
        let target = job_target(
            ctx,
            generation,
            &self.valid.namespace,
            &self.valid.model_name,
        )
        .await?;
        let grace = ctx.config.unready_grace;
        let polled = match &target {
            JobPod::Listed {
                target,
                pod,
                unready_for,
            } => match (
                ctx.runtime.job(target, &self.valid.job_id).await,
                unready_for,
            ) {
                // Not ready for too long, and the job not done: cancelled there, so that it
                // never runs twice, and submitted elsewhere.
                (Ok(job), Some(unready)) if !job.state.is_finished() && *unready >= grace => {
                    self.give_up_on(target, pod, *unready).await
                }
                (Err(e), Some(unready)) if *unready >= grace => {
                    Err(RuntimeError::Unreachable(format!(
                        "runtime pod {} not ready for {}s: {e}",
                        pod.name,
                        unready.as_secs()
                    )))
                }
                (polled, _) => polled,
            },
            JobPod::Lost(why) => Err(RuntimeError::Unreachable(why.clone())),
        };
        let lost = match polled {
            Ok(job) => {
                let service_url = dm::endpoint(&self.valid.model_name, &self.valid.namespace);
                let status = ig::status_from_job(generation, &job, &service_url, now.clone());
                return Ok(Polled::Write {
                    status: Box::new(status),
                    wait: None,
                });
            }
            Err(e) if e.job_lost() => e,
            Err(e) => return Err(e.into()),
        };
        let max = ctx.config.max_submissions;
        let lost_status =
            || ig::status_lost(generation, submitted, max, &lost.to_string(), now.clone());
        let Some(lost_at) = ig::lost_at(generation) else {
            // Just noticed: record when, then back off.
            return Ok(Polled::Write {
                status: Box::new(lost_status()),
                wait: Some(ig::resubmit_delay(submitted)),
            });
        };
        let status = match ig::after_loss(submitted, max, &lost_at, now) {
            AfterLoss::GiveUp => lost_status(),
            AfterLoss::Wait(left) => return Ok(Polled::Requeue(left)),
            AfterLoss::Resubmit => match self.submit_next(submitted + 1).await? {
                Ok(status) => status,
                // The model is down: wait for it, still counting.
                Err(GenerationBlocked::WaitingForModel(_)) => {
                    return Ok(Polled::Requeue(WAIT_RECHECK))
                }
                Err(blocked) => ig::status_blocked(generation, &blocked, now.clone()),
            },
        };
        Ok(Polled::Write {
            status: Box::new(status),
            wait: None,
        })
    }
}

impl GenerationStep<'_> {
    /// Cancels the job in `pod`, not ready for `unready`: the error that makes the job
    /// lost, so that it is submitted to another pod. A cancel that fails leaves the job to
    /// the pod (it may come back), unless the pod cannot be reached at all.
    async fn give_up_on(
        &self,
        target: &Target,
        pod: &RuntimePod,
        unready: Duration,
    ) -> Result<imagegen_crds::api::Job, RuntimeError> {
        match self.ctx.runtime.cancel(target, &self.valid.job_id).await {
            Ok(()) => {}
            Err(e) if e.job_lost() => {}
            Err(e) => return Err(e),
        }
        Err(RuntimeError::Unreachable(format!(
            "runtime pod {} was not ready for {}s: its job was cancelled there",
            pod.name,
            unready.as_secs()
        )))
    }
}

/// The events of a generation's status change from `old` to `new`: the phase change, and the
/// job lost or submitted again.
async fn generation_events(
    ctx: &Context,
    generation: &ImageGeneration,
    old: Option<&ImageGenerationStatus>,
    new: &ImageGenerationStatus,
) {
    phase_event(
        ctx,
        generation,
        old.and_then(|s| s.phase),
        new.phase,
        new.message.as_deref(),
        "GenerationFailed",
    )
    .await;
    let submitted = |s: Option<&ImageGenerationStatus>| {
        s.and_then(|s| crate::conditions::is_true(&s.conditions, ig::SUBMITTED))
    };
    match (submitted(old), submitted(Some(new))) {
        (Some(true), Some(false)) => {
            ctx.event(
                generation,
                EventType::Warning,
                "JobLost",
                new.message.clone().unwrap_or_default(),
            )
            .await
        }
        (Some(false), Some(true)) => {
            ctx.event(
                generation,
                EventType::Normal,
                "Resubmitted",
                format!("submission {}", ig::submissions(generation) + 1),
            )
            .await
        }
        _ => {}
    }
}

async fn apply_generation(generation: &ImageGeneration, ctx: &Context) -> Result<Action, Error> {
    let namespace = generation.namespace().unwrap_or_default();
    let generations: Api<ImageGeneration> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = (ctx.now)();
    let old = generation.status.as_ref();
    if old.and_then(|s| s.phase).is_some_and(Phase::is_finished) {
        return match ig::ttl_remaining(generation, &now) {
            Some(left) if left.is_zero() => {
                generations
                    .delete(&generation.name_any(), &DeleteParams::default())
                    .await?;
                info!(name = %generation.name_any(), %namespace, "deleted after its TTL");
                Ok(Action::await_change())
            }
            Some(left) => Ok(Action::requeue(left)),
            None => Ok(Action::await_change()),
        };
    }

    let (status, wait) = match ig::validate(generation) {
        Err(error) => (
            ig::status_blocked(
                generation,
                &GenerationBlocked::Invalid(error.to_string()),
                now.clone(),
            ),
            None,
        ),
        Ok(valid) => {
            let step = GenerationStep {
                ctx,
                generations: &generations,
                generation,
                valid: &valid,
                now: &now,
            };
            match ig::submissions(generation) {
                0 => {
                    let status = step.submit_next(1).await?.unwrap_or_else(|blocked| {
                        ig::status_blocked(generation, &blocked, now.clone())
                    });
                    (status, None)
                }
                submitted => match step.poll(submitted).await? {
                    Polled::Write { status, wait } => (*status, wait),
                    Polled::Requeue(after) => return Ok(Action::requeue(after)),
                },
            }
        }
    };

    if old != Some(&status) {
        apply_status(&generations, generation, &status).await?;
        generation_events(ctx, generation, old, &status).await;
    }
    Ok(match status.phase {
        Some(phase) if phase.is_finished() => {
            let mut finished = generation.clone();
            finished.status = Some(status);
            ig::ttl_remaining(&finished, &now).map_or(Action::await_change(), Action::requeue)
        }
        Some(Phase::Running) => Action::requeue(wait.unwrap_or(GENERATION_POLL)),
        _ => Action::requeue(wait.unwrap_or(WAIT_RECHECK).min(WAIT_RECHECK)),
    })
}

async fn cleanup_generation(generation: &ImageGeneration, ctx: &Context) -> Result<Action, Error> {
    let result = cancel_and_delete_images(generation, ctx).await;
    give_up_cleanup(ctx, generation, result, "ImagesKept", "what it made").await
}

async fn cancel_and_delete_images(
    generation: &ImageGeneration,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = generation.namespace().unwrap_or_default();
    let status = generation.status.clone().unwrap_or_default();
    let running = ig::submissions(generation) > 0 && !status.phase.is_some_and(Phase::is_finished);
    if !running && status.images.is_empty() {
        return Ok(Action::await_change());
    }
    let model_name = &generation.spec.model_ref.name;
    let uid = generation.metadata.uid.clone().unwrap_or_default();
    if running {
        // The job is in the pod that took it; a pod that is gone took the job with it.
        if let JobPod::Listed { target, .. } =
            job_target(ctx, generation, &namespace, model_name).await?
        {
            match ctx.runtime.cancel(&target, &ig::job_id(&uid)).await {
                Ok(()) => {}
                Err(e) if e.job_lost() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if status.images.is_empty() {
        return Ok(Action::await_change());
    }
    let Some(target) = model_target(ctx, &namespace, model_name, &uid).await? else {
        ctx.event(
            generation,
            EventType::Warning,
            "ImagesKept",
            "the model's runtime is gone, so its images stay in the store".into(),
        )
        .await;
        return Ok(Action::await_change());
    };
    for image in &status.images {
        let Some(id) = image_id_from_url(&image.url) else {
            continue;
        };
        match ctx.runtime.delete_image(&target, &id).await {
            Ok(()) => {}
            // A runtime without image deletion must not block the resource's deletion.
            Err(e) if e.is_unsupported() => {
                ctx.event(
                    generation,
                    EventType::Warning,
                    "ImagesKept",
                    format!("the runtime cannot delete images ({e}), so they stay in the store"),
                )
                .await;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

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

/// The unfinished ImageGenerations of `model`'s namespace that run on it.
pub fn generations_using_model(
    generations: &[Arc<ImageGeneration>],
    model: &DiffusionModel,
) -> Vec<ObjectRef<ImageGeneration>> {
    let namespace = model.namespace();
    unfinished_in(generations, &namespace, |g| g.status.as_ref()?.phase)
        .filter(|g| g.spec.model_ref.name == model.name_any())
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
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
