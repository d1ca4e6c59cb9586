//! ImageGeneration: behind the images finalizer, the submission to one runtime pod (chosen
//! by load and LoRA warmth), the polls of that pod, the resubmission of a job its pod lost,
//! and the TTL.

use super::*;

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
    let created = generation.metadata.creation_timestamp.as_ref();
    let waited = created.map_or(Duration::ZERO, |t| crate::time_between(t, &(ctx.now)()));
    if waited < ctx.config.unready_grace {
        let policy = autoscaler::Policy::of(model.spec.replicas.as_ref());
        let count = model.spec.replicas.and_then(|r| r.count);
        let expected = policy.heading_for(queue_length(ctx, &model), count);
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
