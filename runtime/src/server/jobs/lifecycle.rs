//! A job after it starts: progress, its end (succeeded, failed, cancelled or expired),
//! shutdown, and the sweep of ended jobs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use imagegen_crds::api::{codes, ErrorDetail, Job, JobEvent, JobState, JobTimings};
use imagegen_crds::Progress;

use crate::server::archive::{Archive, Record};
use crate::server::error::ApiError;

use super::{
    announce_positions, deadline_error, error_detail, now_rfc3339, snapshot, JobKey, Jobs, Output,
};

impl<W> Jobs<W> {
    pub fn progress(&self, key: &JobKey, step: u32, total: u32) {
        self.progress_with_loss(key, step, total, None)
    }

    /// Progress of a training, with its loss.
    pub fn progress_with_loss(&self, key: &JobKey, step: u32, total: u32, loss: Option<f64>) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(key) {
            entry.job.progress = Progress::new(step, total);
            let _ = entry.events.send(JobEvent::Progress { step, total, loss });
        }
    }

    /// Sets the cancel flag of a running job with the error it should end with.
    pub fn stop(&self, key: &JobKey, reason: ErrorDetail) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(key) {
            if entry.cancel_reason.is_none() {
                entry.cancel_reason = Some(reason);
            }
            entry.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Records a job's end, tells its subscribers and its webhook; returns the job (`None`
    /// when it is unknown or had already ended).
    pub fn finish(&self, key: &JobKey, outcome: Result<Output, ErrorDetail>) -> Option<Job> {
        let mut state = self.lock();
        state.running.remove(key);
        let entry = state.entries.get_mut(key)?;
        if entry.job.state.is_finished() {
            return None; // a job ends once
        }
        let now = Instant::now();
        let started = entry.started.unwrap_or(now);
        entry.finished = Some(now);
        entry.job.finished_at = Some(now_rfc3339());
        entry.job.queue_position = None;
        let timings = JobTimings {
            queued_seconds: Some((started - entry.created).as_secs_f64()),
            inference_seconds: Some((now - started).as_secs_f64()),
            total_seconds: Some((now - entry.created).as_secs_f64()),
        };
        let event = match outcome {
            Ok(output) => {
                entry.job.state = JobState::Succeeded;
                match output {
                    Output::Generation(mut result) => {
                        result.timings = timings;
                        entry.job.result = Some(result);
                    }
                    Output::Training(result) => entry.job.training = Some(result),
                }
                JobEvent::Succeeded {
                    job: Box::new(entry.job.clone()),
                }
            }
            Err(error) if error.code == codes::CANCELLED => {
                entry.job.state = JobState::Cancelled;
                entry.job.error = Some(error);
                JobEvent::Cancelled {}
            }
            Err(error) => {
                entry.job.state = JobState::Failed;
                entry.job.error = Some(error.clone());
                JobEvent::Failed { error }
            }
        };
        let _ = entry.events.send(event);
        let (job, webhook) = (entry.job.clone(), entry.webhook.clone());
        let fingerprint = entry.fingerprint.clone();
        let seconds = (now - started).as_secs_f64();
        state.recent_seconds = 0.8 * state.recent_seconds + 0.2 * seconds;
        drop(state);
        if let Some(archive) = self.archive.as_ref().filter(|_| Archive::keeps(&job)) {
            let record = Record {
                job: job.clone(),
                fingerprint,
            };
            archive.keep(&key.0, record);
        }
        if let (Some(webhooks), Some(url)) = (&self.webhooks, webhook) {
            webhooks.send(job.clone(), url);
        }
        Some(job)
    }

    /// The error a cancelled run ends with: the recorded reason, else a client cancel.
    pub fn cancel_reason(&self, key: &JobKey) -> ErrorDetail {
        self.lock()
            .entries
            .get(key)
            .and_then(|e| e.cancel_reason.clone())
            .unwrap_or_else(|| error_detail(codes::CANCELLED, "cancelled by the client", false))
    }

    /// Cancels a job: a queued one at once, a running one between two denoising steps.
    /// `reason` None means the client asked.
    pub fn cancel(
        &self,
        tenant: &str,
        id: &str,
        reason: Option<ErrorDetail>,
    ) -> Result<Job, ApiError> {
        let key = (tenant.to_string(), id.to_string());
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(&key) else {
            return Err(ApiError::not_found(format!("no job `{id}`")));
        };
        if entry.job.state.is_finished() {
            return Err(ApiError::conflict(format!(
                "job `{id}` has already finished ({:?})",
                entry.job.state
            )));
        }
        let reason = reason
            .unwrap_or_else(|| error_detail(codes::CANCELLED, "cancelled by the client", false));
        if entry.job.state == JobState::Running {
            if entry.cancel_reason.is_none() {
                entry.cancel_reason = Some(reason);
            }
            entry.cancel.store(true, Ordering::SeqCst);
            let job = snapshot(&state, &key).expect("entry exists");
            return Ok(job);
        }
        state.queue.retain(|q| q.key != key);
        announce_positions(&state);
        drop(state);
        self.finish(&key, Err(reason));
        Ok(self.get(tenant, id).expect("entry exists"))
    }

    /// Stops taking jobs; every queued job fails as retryable (its client may send it to
    /// another replica). Returns them. The running job carries on.
    pub fn shut_down(&self) -> Vec<Job> {
        let drained: Vec<JobKey> = {
            let mut state = self.lock();
            state.shutting_down = true;
            state.queue.drain(..).map(|q| q.key).collect()
        };
        self.wake.notify_all();
        drained
            .iter()
            .filter_map(|key| {
                self.finish(
                    key,
                    Err(error_detail(
                        codes::SHUTTING_DOWN,
                        "the service shut down before the job ran; submit it again",
                        true,
                    )),
                )
            })
            .collect()
    }

    /// Inline images (`b64Json`) of a finished job are dropped after this long (its URLs
    /// stay until the TTL): they are the bulk of a job's memory.
    pub const INLINE_KEPT: Duration = Duration::from_secs(600);
    /// At most this many finished jobs are remembered (the oldest go first).
    pub const MAX_FINISHED: usize = 10_000;

    /// Forgets finished jobs older than `ttl` (and the oldest past [`Self::MAX_FINISHED`]).
    pub fn sweep(&self, ttl: Duration) {
        let mut state = self.lock();
        state
            .entries
            .retain(|_, e| e.finished.is_none_or(|t| t.elapsed() < ttl));
        let mut finished: Vec<(Instant, JobKey)> = Vec::new();
        for (key, entry) in state.entries.iter_mut() {
            let Some(at) = entry.finished else { continue };
            finished.push((at, key.clone()));
            if at.elapsed() >= Self::INLINE_KEPT {
                if let Some(result) = &mut entry.job.result {
                    for image in &mut result.images {
                        image.b64_json = None;
                    }
                }
            }
        }
        if finished.len() > Self::MAX_FINISHED {
            finished.sort();
            let excess = finished.len() - Self::MAX_FINISHED;
            for (_, key) in finished.into_iter().take(excess) {
                state.entries.remove(&key);
            }
        }
    }

    /// Jobs queued past their deadline fail without running; returns them.
    pub fn expire_queued(&self) -> Vec<Job> {
        let now = Instant::now();
        let expired: Vec<JobKey> = {
            let mut state = self.lock();
            let keys: Vec<JobKey> = state
                .queue
                .iter()
                .filter(|q| q.deadline <= now)
                .map(|q| q.key.clone())
                .collect();
            if !keys.is_empty() {
                state.queue.retain(|q| q.deadline > now);
                announce_positions(&state);
            }
            keys
        };
        expired
            .iter()
            .filter_map(|key| self.finish(key, Err(deadline_error())))
            .collect()
    }
}
