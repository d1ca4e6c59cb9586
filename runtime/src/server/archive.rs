//! Finished jobs kept in the store, so that they outlive the process: after a restart (or on
//! another replica of the same store) `GET /v1/jobs/{id}` still answers, and a client or the
//! operator that submits the same `jobId` and body again gets the finished job instead of a
//! second run. A job is kept at `tenants/<tenant>/<folder>/<id>.json` until the results' TTL.
//!
//! Kept: succeeded and cancelled jobs, and failures that are not retryable. A retryable
//! failure (the service shut down, the job failed unexpectedly) is not kept: its client was
//! told to submit it again, and that submission must run.

use bytes::Bytes;
use imagegen_crds::api::{Job, JobState};
use object_store::path::Path as StorePath;
use serde::{Deserialize, Serialize};

use crate::store::Store;

/// The store folder of finished generations, in each tenant's folder.
pub const JOBS_FOLDER: &str = "jobs";
/// The store folder of finished trainings.
pub const TRAININGS_FOLDER: &str = "trainings";

/// Largest record read back (inline images are never kept, so records are small).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What is kept of a finished job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub job: Job,
    /// The request's fingerprint: the same `jobId` with another body is a conflict.
    pub fingerprint: String,
}

/// The store folder of one kind of job, and the runtime that writes to it.
#[derive(Clone)]
pub struct Archive {
    store: Store,
    runtime: tokio::runtime::Handle,
    folder: &'static str,
    /// The results' TTL: an older record is not recalled, even before the sweeper deletes it.
    ttl: std::time::Duration,
}

impl Archive {
    pub fn new(
        store: Store,
        runtime: tokio::runtime::Handle,
        folder: &'static str,
        ttl: std::time::Duration,
    ) -> Self {
        Archive {
            store,
            runtime,
            folder,
            ttl,
        }
    }

    fn path(&self, tenant: &str, id: &str) -> StorePath {
        Store::tenant_path(tenant, &format!("{}/{id}.json", self.folder))
    }

    /// Whether a job that ended this way is kept (see the module's comment).
    pub fn keeps(job: &Job) -> bool {
        match job.state {
            JobState::Succeeded | JobState::Cancelled => true,
            JobState::Failed => job.error.as_ref().is_none_or(|e| e.retryable != Some(true)),
            JobState::Queued | JobState::Running => false,
        }
    }

    /// Writes the record in the background; a failure is logged and costs only the record.
    pub fn keep(&self, tenant: &str, mut record: Record) {
        // Inline images are the bulk of a job; the kept job points at the stored files.
        if let Some(result) = &mut record.job.result {
            for image in &mut result.images {
                image.b64_json = None;
            }
        }
        let Ok(json) = serde_json::to_vec(&record) else {
            return;
        };
        let (store, path) = (self.store.clone(), self.path(tenant, &record.job.id));
        let runtime = self.runtime.clone();
        // On the blocking pool, which a shutdown waits for (async tasks it would drop): the
        // job that finishes during a shutdown is kept too.
        self.runtime.spawn_blocking(move || {
            if let Err(e) = runtime.block_on(store.put(&path, Bytes::from(json))) {
                tracing::warn!(path = %path, error = %e, "cannot keep a finished job");
            }
        });
    }

    /// The kept record of `tenant`'s job `id`, if any and within the TTL, and how long ago
    /// the job finished.
    pub async fn load(&self, tenant: &str, id: &str) -> Option<(Record, std::time::Duration)> {
        let bytes = self
            .store
            .get(&self.path(tenant, id), MAX_RECORD_BYTES)
            .await
            .ok()?;
        let record: Record = serde_json::from_slice(&bytes).ok()?;
        let finished = time::OffsetDateTime::parse(
            record.job.finished_at.as_deref()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let age = std::time::Duration::try_from(time::OffsetDateTime::now_utc() - finished)
            .unwrap_or_default();
        (age < self.ttl).then_some((record, age))
    }
}
