//! The queue's side of the job table: submissions in, jobs out to the worker in order,
//! and the worker's control messages.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use imagegen_crds::api::{Job, JobEvent, JobState};
use imagegen_crds::Progress;
use tokio::sync::broadcast;

use crate::server::error::ApiError;

use super::{
    announce_positions, existing, now_rfc3339, start, Control, Entry, Jobs, Pending, Queued,
    Running, Submission, Submitted,
};

impl<W> Jobs<W> {
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
}
