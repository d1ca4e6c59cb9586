//! DiffusionModel: the runtime auth Secret, the copied Secrets, the cache claim, the
//! Deployment (its replica count from the queue autoscaler) and the Service, and the status.

use super::*;

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
    let queue = queue_length(ctx, model);
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
