//! LoraTraining: behind the artifact finalizer, the training Job once the model may be
//! used, its progress into the status, and the trained LoRA deleted with the resource.

use super::*;

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
