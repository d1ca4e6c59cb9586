//! The job table and the bounded queue in front of the one engine worker.
//!
//! Everything lives under one mutex: the jobs by (tenant, id), the queue, and whether the
//! service is shutting down. The worker thread blocks on a condition variable; the async
//! side never waits on the lock for long (no engine work happens under it). Each job has a
//! broadcast channel of its [`JobEvent`]s for Server-Sent Events and synchronous waiters.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use image::{DynamicImage, GrayImage};
use imagegen_crds::api::{
    codes, ErrorDetail, GenerationResult, Job, JobEvent, JobKind, JobState, JobTimings, RunningJob,
    TrainingResult,
};
use imagegen_crds::{GenerationParams, Progress};
use tokio::sync::{broadcast, oneshot};

use super::archive::{Archive, Record};
use super::error::ApiError;
use super::webhook::Notifier;

pub type JobKey = (String, String);

/// A job as submitted: its snapshot, a receiver of its later events, and whether this
/// submission created it (false: an earlier one with the same id).
pub type Submitted = (Job, broadcast::Receiver<JobEvent>, bool);

/// What the worker needs to run a generation: inputs decoded and LoRAs resolved to files.
pub struct Work {
    pub params: GenerationParams,
    pub image: Option<DynamicImage>,
    pub mask: Option<GrayImage>,
    pub mask_prompt: Option<String>,
    pub loras: Vec<JobLora>,
    /// Return each PNG in base64 too.
    pub b64: bool,
    /// For the latency histogram: text-to-image, image-to-image, inpaint, outpaint...
    pub mode: &'static str,
    /// Jobs with the same key may share one UNet batch (None: this one runs alone).
    pub batch_key: Option<String>,
    /// Images the job makes.
    pub images: u32,
}

/// A LoRA of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLora {
    /// The local file the engine loads.
    pub file: PathBuf,
    /// Where it lives in the store, relative to the tenant's root: the request's
    /// `loras[].path`, or the file of a LoRA named by `name` (`GET /v1/load` reports it).
    pub store_path: String,
    pub weight: f64,
}

pub struct Submission<W = Work> {
    pub tenant: String,
    pub id: String,
    /// Identifies the request for idempotent re-submission (same id, same body).
    pub fingerprint: String,
    pub deadline: Instant,
    pub webhook: Option<String>,
    pub work: W,
}

/// A job handed to the worker.
pub struct Running<W = Work> {
    pub key: JobKey,
    pub work: W,
    pub cancel: Arc<AtomicBool>,
    pub deadline: Instant,
    pub created: Instant,
}

/// What a worker finds waiting: a check to run (taken off the queue), or a queued job (left
/// queued until the worker holds the device and takes it with [`Jobs::try_next`]).
pub enum Pending {
    Control(Control),
    Queued,
}

/// The generation side of `GET /v1/load`, read under one lock.
#[derive(Debug, Default)]
pub struct QueueLoad {
    pub queued: usize,
    pub running: usize,
    /// The running jobs of the tenant asked about.
    pub running_jobs: Vec<RunningJob>,
    /// The LoRAs of that tenant's queued jobs, as store paths, each once.
    pub queued_loras: Vec<String>,
    /// Recent seconds per job (start to end, a moving average).
    pub seconds_per_job: f64,
}

/// Work for the worker that is not a job: checks that need the loaded model.
pub enum Control {
    /// Does the file load as a LoRA of the served model?
    ValidateLora {
        file: PathBuf,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

struct Entry {
    job: Job,
    fingerprint: String,
    cancel: Arc<AtomicBool>,
    /// Why `cancel` was set: the error a cancelled run ends with (None = the client asked).
    cancel_reason: Option<ErrorDetail>,
    events: broadcast::Sender<JobEvent>,
    created: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    webhook: Option<String>,
}

struct Queued<W> {
    key: JobKey,
    work: W,
    deadline: Instant,
}

struct State<W> {
    entries: HashMap<JobKey, Entry>,
    queue: VecDeque<Queued<W>>,
    /// The jobs running now: counted without a scan of every finished job.
    running: HashSet<JobKey>,
    control: VecDeque<Control>,
    shutting_down: bool,
    /// Seconds the recent jobs took on the worker, for Retry-After.
    recent_seconds: f64,
}

/// The job table and queue of one kind of job (generations for the engine worker,
/// trainings for the trainer).
pub struct Jobs<W = Work> {
    state: Mutex<State<W>>,
    wake: Condvar,
    capacity: usize,
    kind: JobKind,
    /// Every way a job ends goes through [`Jobs::finish`], which hands the job to its
    /// webhook here.
    webhooks: Option<Notifier>,
    /// Where [`Jobs::finish`] keeps finished jobs beyond this process, and
    /// [`Jobs::recall`] finds them again.
    archive: Option<Archive>,
}

/// What a job produced.
pub enum Output {
    Generation(GenerationResult),
    Training(TrainingResult),
}

/// RFC 3339, UTC, now.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn error_detail(code: &str, message: impl Into<String>, retryable: bool) -> ErrorDetail {
    ErrorDetail {
        code: code.to_string(),
        message: message.into(),
        field: None,
        retryable: retryable.then_some(true),
    }
}

/// A random id: 32 lowercase hex digits.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and a counter (still unique per process).
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&(t as u64).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Jobs<Work> {
    pub fn new(capacity: usize) -> Self {
        Self::of_kind(capacity, JobKind::Generation)
    }

    /// Queued jobs that may join a batch with key `key`, in queue order, while their
    /// images fit in `room`; they are running from now on.
    pub fn take_batch(&self, key: &str, mut room: u32) -> Vec<Running> {
        let mut state = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(state.queue.len());
        while let Some(queued) = state.queue.pop_front() {
            let fits = queued.work.batch_key.as_deref() == Some(key) && queued.work.images <= room;
            if fits {
                room -= queued.work.images;
                taken.push(queued);
            } else {
                kept.push_back(queued);
            }
        }
        state.queue = kept;
        let running = taken
            .into_iter()
            .filter_map(|queued| start(&mut state, queued))
            .collect();
        announce_positions(&state);
        running
    }

    /// What `GET /v1/load` reports of the generations: counts of every tenant's, the running
    /// jobs and queued LoRAs of `tenant`'s.
    pub fn load(&self, tenant: &str) -> QueueLoad {
        let state = self.lock();
        let mut running_jobs: Vec<RunningJob> = state
            .running
            .iter()
            .filter(|key| key.0 == tenant)
            .filter_map(|key| state.entries.get(key))
            .map(|entry| RunningJob {
                id: entry.job.id.clone(),
                progress: entry.job.progress,
            })
            .collect();
        running_jobs.sort_by(|a, b| a.id.cmp(&b.id));
        let mut queued_loras: Vec<String> = Vec::new();
        for queued in state.queue.iter().filter(|q| q.key.0 == tenant) {
            for lora in &queued.work.loras {
                if !queued_loras.contains(&lora.store_path) {
                    queued_loras.push(lora.store_path.clone());
                }
            }
        }
        QueueLoad {
            queued: state.queue.len(),
            running: state.running.len(),
            running_jobs,
            queued_loras,
            seconds_per_job: state.recent_seconds,
        }
    }
}

impl<W> Jobs<W> {
    pub fn of_kind(capacity: usize, kind: JobKind) -> Self {
        Jobs {
            state: Mutex::new(State {
                entries: HashMap::new(),
                queue: VecDeque::new(),
                running: HashSet::new(),
                control: VecDeque::new(),
                shutting_down: false,
                recent_seconds: 1.0,
            }),
            wake: Condvar::new(),
            capacity,
            kind,
            webhooks: None,
            archive: None,
        }
    }

    /// Keeps finished jobs in `archive`, and recalls them from it.
    pub fn with_archive(mut self, archive: Archive) -> Self {
        self.archive = Some(archive);
        self
    }

    /// Brings `tenant`'s job `id` back from the archive when this process does not know it
    /// (it finished before a restart, or on another replica of the store), so that every
    /// lookup, cancel and resubmission sees it as a finished job of this process.
    pub async fn recall(&self, tenant: &str, id: &str) {
        let Some(archive) = &self.archive else { return };
        // Only a job id can name a record (a path segment of the store, never `..`).
        if !imagegen_crds::api::is_job_id(id) {
            return;
        }
        let key = (tenant.to_string(), id.to_string());
        if self.lock().entries.contains_key(&key) {
            return;
        }
        let Some((record, age)) = archive.load(tenant, id).await else {
            return;
        };
        if !record.job.state.is_finished() || record.job.id != id {
            return;
        }
        let now = Instant::now();
        // The TTL counts from when the job finished, not from its recall.
        let finished = now.checked_sub(age).unwrap_or(now);
        self.lock().entries.entry(key).or_insert_with(|| Entry {
            job: record.job,
            fingerprint: record.fingerprint,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_reason: None,
            events: broadcast::channel(1).0,
            created: finished,
            started: None,
            finished: Some(finished),
            webhook: None,
        });
    }

    /// Sends each finished job that names a webhook to it.
    pub fn with_webhooks(mut self, webhooks: Notifier) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State<W>> {
        // A panic elsewhere must not take the whole service down with a poisoned lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn depth(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// Queues a job, or returns the existing one of the same id and body. The receiver
    /// gets every event after the returned snapshot.
    pub fn submit(&self, sub: Submission<W>) -> Result<Submitted, ApiError> {
        let mut state = self.lock();
        let key = (sub.tenant.clone(), sub.id.clone());
        if let Some(existing) = existing(&state, &key, &sub.fingerprint) {
            return existing;
        }
        if state.shutting_down {
            return Err(ApiError::shutting_down());
        }
        if state.queue.len() >= self.capacity {
            let wait = (state.queue.len() as f64 * state.recent_seconds).ceil() as u64;
            return Err(ApiError::queue_full(wait.clamp(1, 3600)));
        }
        let (events, rx) = broadcast::channel(256);
        let position = state.queue.len() as u32;
        let job = Job {
            id: sub.id.clone(),
            kind: self.kind,
            state: JobState::Queued,
            queue_position: Some(position),
            progress: Progress::new(0, 0),
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            result: None,
            training: None,
            error: None,
        };
        state.entries.insert(
            key.clone(),
            Entry {
                job: job.clone(),
                fingerprint: sub.fingerprint,
                cancel: Arc::new(AtomicBool::new(false)),
                cancel_reason: None,
                events: events.clone(),
                created: Instant::now(),
                started: None,
                finished: None,
                webhook: sub.webhook,
            },
        );
        state.queue.push_back(Queued {
            key,
            work: sub.work,
            deadline: sub.deadline,
        });
        let _ = events.send(JobEvent::Queued { position });
        drop(state);
        self.wake.notify_all();
        Ok((job, rx, true))
    }

    /// The job of this id, when there is one: itself for the same request, else 409.
    pub fn resubmit(
        &self,
        tenant: &str,
        id: &str,
        fingerprint: &str,
    ) -> Option<Result<Submitted, ApiError>> {
        existing(
            &self.lock(),
            &(tenant.to_string(), id.to_string()),
            fingerprint,
        )
    }

    /// Asks the worker to run a check with the loaded model.
    pub fn control(&self, control: Control) -> Result<(), ApiError> {
        let mut state = self.lock();
        if state.shutting_down {
            return Err(ApiError::shutting_down());
        }
        state.control.push_back(control);
        drop(state);
        self.wake.notify_all();
        Ok(())
    }

    /// The next task, taken at once; None once shutting down with nothing left. (The worker
    /// waits for the device between [`Self::wait_pending`] and [`Self::try_next`]; the
    /// queue's own tests take tasks in one call.)
    #[cfg(test)]
    pub fn next(&self) -> Option<Result<Running<W>, Control>> {
        loop {
            match self.wait_pending()? {
                Pending::Control(control) => return Some(Err(control)),
                Pending::Queued => {
                    if let Some(running) = self.try_next() {
                        return Some(Ok(running));
                    }
                }
            }
        }
    }

    /// Waits until there is something to do: a check (taken), or a queued job (left in the
    /// queue, so that it stays `queued` while its worker waits for the device). None once
    /// shutting down with nothing queued.
    pub fn wait_pending(&self) -> Option<Pending> {
        let mut state = self.lock();
        loop {
            if let Some(control) = state.control.pop_front() {
                return Some(Pending::Control(control));
            }
            if !state.queue.is_empty() {
                return Some(Pending::Queued);
            }
            if state.shutting_down {
                return None;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether a check waits for the worker.
    pub fn has_control(&self) -> bool {
        !self.lock().control.is_empty()
    }

    /// The first queued job, now running; None when the queue is empty (its jobs were
    /// cancelled or expired while the worker waited for the device).
    pub fn try_next(&self) -> Option<Running<W>> {
        let mut state = self.lock();
        while let Some(queued) = state.queue.pop_front() {
            let running = start(&mut state, queued);
            announce_positions(&state);
            if running.is_some() {
                return running;
            }
        }
        None
    }

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

    pub fn get(&self, tenant: &str, id: &str) -> Option<Job> {
        snapshot(&self.lock(), &(tenant.to_string(), id.to_string()))
    }

    /// The job now and a receiver of everything after.
    pub fn subscribe(
        &self,
        tenant: &str,
        id: &str,
    ) -> Option<(Job, broadcast::Receiver<JobEvent>)> {
        let state = self.lock();
        let key = (tenant.to_string(), id.to_string());
        let rx = state.entries.get(&key)?.events.subscribe();
        Some((snapshot(&state, &key)?, rx))
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

pub fn deadline_error() -> ErrorDetail {
    error_detail(
        codes::DEADLINE_EXCEEDED,
        "the job did not finish before its deadline",
        true,
    )
}

/// Marks a job taken off the queue as running.
fn start<W>(state: &mut State<W>, queued: Queued<W>) -> Option<Running<W>> {
    let Queued {
        key,
        work,
        deadline,
    } = queued;
    let entry = state.entries.get_mut(&key)?;
    state.running.insert(key.clone());
    entry.job.state = JobState::Running;
    entry.job.queue_position = None;
    entry.job.started_at = Some(now_rfc3339());
    entry.started = Some(Instant::now());
    Some(Running {
        key,
        work,
        cancel: entry.cancel.clone(),
        deadline,
        created: entry.created,
    })
}

fn existing<W>(
    state: &State<W>,
    key: &JobKey,
    fingerprint: &str,
) -> Option<Result<Submitted, ApiError>> {
    let entry = state.entries.get(key)?;
    if entry.fingerprint != fingerprint {
        return Some(Err(ApiError::conflict(format!(
            "job `{}` exists with a different request",
            key.1
        ))
        .with_field("jobId")));
    }
    let rx = entry.events.subscribe();
    Some(Ok((snapshot(state, key)?, rx, false)))
}

fn snapshot<W>(state: &State<W>, key: &JobKey) -> Option<Job> {
    let entry = state.entries.get(key)?;
    let mut job = entry.job.clone();
    if job.state == JobState::Queued {
        job.queue_position = state
            .queue
            .iter()
            .position(|q| &q.key == key)
            .map(|p| p as u32);
    }
    Some(job)
}

/// Tells every queued job its new place.
fn announce_positions<W>(state: &State<W>) {
    for (position, queued) in state.queue.iter().enumerate() {
        if let Some(entry) = state.entries.get(&queued.key) {
            let _ = entry.events.send(JobEvent::Queued {
                position: position as u32,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(tenant: &str, id: &str, prompt: &str) -> Submission {
        Submission {
            tenant: tenant.into(),
            id: id.into(),
            fingerprint: prompt.into(),
            deadline: Instant::now() + Duration::from_secs(60),
            webhook: None,
            work: Work {
                params: GenerationParams {
                    prompt: prompt.into(),
                    ..Default::default()
                },
                image: None,
                mask: None,
                mask_prompt: None,
                loras: vec![],
                b64: false,
                mode: "text-to-image",
                batch_key: Some("k".into()),
                images: 1,
            },
        }
    }

    #[test]
    fn queue_is_bounded_idempotent_and_per_tenant() {
        let jobs = Jobs::new(2);
        let (job, _, new) = jobs.submit(submission("a", "j1", "x")).unwrap();
        assert!(new && job.queue_position == Some(0));
        let (_, _, new) = jobs.submit(submission("a", "j1", "x")).unwrap();
        assert!(!new, "same id and body: the same job");
        assert_eq!(
            jobs.submit(submission("a", "j1", "y")).unwrap_err().status,
            warp::http::StatusCode::CONFLICT
        );
        jobs.submit(submission("b", "j1", "x")).unwrap();
        let full = jobs.submit(submission("a", "j3", "x")).unwrap_err();
        assert_eq!(full.status, warp::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(full.retry_after.is_some());
        assert!(jobs.get("c", "j1").is_none());
        assert_eq!(jobs.get("b", "j1").unwrap().queue_position, Some(1));
    }

    #[test]
    fn cancel_and_shutdown_finish_queued_jobs() {
        let jobs = Jobs::new(4);
        jobs.submit(submission("a", "1", "x")).unwrap();
        jobs.submit(submission("a", "2", "x")).unwrap();
        jobs.submit(submission("a", "3", "x")).unwrap();
        let job = jobs.cancel("a", "1", None).unwrap();
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(jobs.get("a", "2").unwrap().queue_position, Some(0));
        let Some(Ok(running)) = jobs.next() else {
            panic!("a job to run")
        };
        assert_eq!(running.key.1, "2");
        jobs.cancel("a", "2", None).unwrap();
        assert!(running.cancel.load(Ordering::SeqCst));
        let failed = jobs.shut_down();
        assert_eq!(failed.len(), 1);
        let error = failed[0].error.clone().unwrap();
        assert_eq!(
            (error.code.as_str(), error.retryable),
            (codes::SHUTTING_DOWN, Some(true))
        );
        assert!(jobs.next().is_none());
        assert!(jobs.submit(submission("a", "4", "x")).is_err());
    }

    /// Every way a job ends reaches its webhook: finished by the worker, cancelled while
    /// queued, expired in the queue, failed at shutdown; and it ends once.
    #[test]
    fn every_end_of_a_job_reaches_its_webhook() {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let receiver = std::thread::spawn(move || {
            let mut received = Vec::new();
            for _ in 0..4 {
                let (conn, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(conn);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let job: Job = serde_json::from_slice(&body).unwrap();
                received.push((job.id, job.state));
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            }
            received.sort_by(|a, b| a.0.cmp(&b.0));
            received
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let jobs = Jobs::new(8).with_webhooks(Notifier::new(None, runtime.handle().clone()));
        let hooked = |id: &str| Submission {
            webhook: Some(url.clone()),
            ..submission("a", id, "x")
        };
        jobs.submit(hooked("1-finished")).unwrap();
        jobs.submit(hooked("2-cancelled")).unwrap();
        jobs.submit(Submission {
            deadline: Instant::now(),
            ..hooked("3-expired")
        })
        .unwrap();
        jobs.submit(hooked("4-shut-down")).unwrap();
        jobs.submit(submission("a", "5-no-webhook", "x")).unwrap();
        let Some(Ok(running)) = jobs.next() else {
            panic!("a job to run")
        };
        assert!(jobs.finish(&running.key, Err(deadline_error())).is_some());
        assert!(
            jobs.finish(&running.key, Err(deadline_error())).is_none(),
            "a job ends once"
        );
        jobs.cancel("a", "2-cancelled", None).unwrap();
        assert_eq!(jobs.expire_queued().len(), 1);
        assert_eq!(jobs.shut_down().len(), 2);
        let received = receiver.join().unwrap();
        assert_eq!(
            received,
            [
                ("1-finished".to_string(), JobState::Failed),
                ("2-cancelled".to_string(), JobState::Cancelled),
                ("3-expired".to_string(), JobState::Failed),
                ("4-shut-down".to_string(), JobState::Failed),
            ]
        );
        runtime.shutdown_timeout(Duration::from_secs(10));
    }

    #[test]
    fn load_counts_every_tenant_and_lists_the_callers_own() {
        let jobs = Jobs::new(8);
        let lora = |path: &str| JobLora {
            file: PathBuf::from(format!("/store/{path}")),
            store_path: path.into(),
            weight: 1.0,
        };
        let with_loras = |tenant: &str, id: &str, paths: &[&str]| {
            let mut sub = submission(tenant, id, "x");
            sub.work.loras = paths.iter().map(|p| lora(p)).collect();
            sub
        };
        jobs.submit(with_loras("a", "run", &["loras/r"])).unwrap();
        jobs.submit(with_loras("a", "q1", &["loras/x", "loras/y"]))
            .unwrap();
        jobs.submit(with_loras("a", "q2", &["loras/y"])).unwrap();
        jobs.submit(with_loras("b", "q3", &["loras/z"])).unwrap();
        // Left queued by the wait, started by the take.
        assert!(matches!(jobs.wait_pending(), Some(Pending::Queued)));
        assert_eq!(jobs.depth(), 4);
        let running = jobs.try_next().unwrap();
        assert_eq!(running.key.1, "run");
        jobs.progress(&running.key, 2, 5);
        let a = jobs.load("a");
        assert_eq!((a.queued, a.running), (3, 1));
        assert_eq!(a.running_jobs.len(), 1);
        assert_eq!(
            (
                a.running_jobs[0].id.as_str(),
                a.running_jobs[0].progress.step
            ),
            ("run", 2)
        );
        assert_eq!(a.queued_loras, ["loras/x", "loras/y"]);
        let b = jobs.load("b");
        assert_eq!((b.queued, b.running), (3, 1));
        assert!(b.running_jobs.is_empty());
        assert_eq!(b.queued_loras, ["loras/z"]);
        jobs.finish(&running.key, Err(deadline_error()));
        jobs.cancel("a", "q1", None).unwrap();
        let a = jobs.load("a");
        assert_eq!(
            (a.queued, a.running, a.queued_loras),
            (2, 0, vec!["loras/y".into()])
        );
    }

    #[test]
    fn compatible_jobs_are_taken_together() {
        let jobs = Jobs::new(8);
        for id in ["1", "2", "3", "4"] {
            jobs.submit(submission("a", id, "x")).unwrap();
        }
        let mut other = submission("a", "5", "x");
        other.work.batch_key = Some("other".into());
        jobs.submit(other).unwrap();
        let Some(Ok(first)) = jobs.next() else {
            panic!("a job")
        };
        let more = jobs.take_batch("k", 2);
        let ids: Vec<&str> = more.iter().map(|r| r.key.1.as_str()).collect();
        assert_eq!((first.key.1.as_str(), ids), ("1", vec!["2", "3"]));
        assert_eq!(jobs.get("a", "2").unwrap().state, JobState::Running);
        assert_eq!(jobs.get("a", "4").unwrap().queue_position, Some(0));
        assert_eq!(jobs.get("a", "5").unwrap().queue_position, Some(1));
    }
}
