//! The job table and the bounded queue in front of the one engine worker.
//!
//! Everything lives under one mutex: the jobs by (tenant, id), the queue, and whether the
//! service is shutting down. The worker thread blocks on a condition variable; the async
//! side never waits on the lock for long (no engine work happens under it). Each job has a
//! broadcast channel of its [`JobEvent`]s for Server-Sent Events and synchronous waiters.

mod lifecycle;
mod queue;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use image::{DynamicImage, GrayImage};
use imagegen_crds::api::{
    codes, ErrorDetail, GenerationResult, Job, JobEvent, JobKind, JobState, RunningJob,
    TrainingResult,
};
use imagegen_crds::GenerationParams;
use tokio::sync::{broadcast, oneshot};

use super::archive::Archive;
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

    /// [`Self::take_batch`], then, while the batch has room, every compatible job submitted
    /// before `until` (the batching window). Stops waiting early on shutdown or a check.
    pub fn take_batch_until(&self, key: &str, mut room: u32, until: Instant) -> Vec<Running> {
        let mut taken = Vec::new();
        loop {
            let more = self.take_batch(key, room);
            room -= more.iter().map(|r| r.work.images).sum::<u32>();
            taken.extend(more);
            let now = Instant::now();
            if room == 0 || now >= until {
                return taken;
            }
            let state = self.lock();
            if state.shutting_down || !state.control.is_empty() {
                return taken;
            }
            // One may have arrived since take_batch let go of the lock.
            let waiting = state.queue.iter().any(|queued| {
                queued.work.batch_key.as_deref() == Some(key) && queued.work.images <= room
            });
            if !waiting {
                drop(
                    self.wake
                        .wait_timeout(state, until - now)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
        }
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
