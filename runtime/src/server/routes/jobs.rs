//! A job's or a training's state, cancellation and Server-Sent Events.

use imagegen_crds::api::{codes, Job, JobEvent, JobState};
use tokio::sync::broadcast;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::server::error::ApiError;
use crate::server::jobs::error_detail;
use crate::server::reply::{json_ok, json_with_status};

fn sse_event(event: &JobEvent) -> warp::sse::Event {
    warp::sse::Event::default()
        .event(event.name())
        .data(serde_json::to_string(event).unwrap_or_default())
}

fn snapshot_event(job: &Job) -> JobEvent {
    match job.state {
        JobState::Queued => JobEvent::Queued {
            position: job.queue_position.unwrap_or(0),
        },
        JobState::Running => JobEvent::Progress {
            step: job.progress.step,
            total: job.progress.total,
            loss: None,
        },
        JobState::Succeeded => JobEvent::Succeeded {
            job: Box::new(job.clone()),
        },
        JobState::Failed => JobEvent::Failed {
            error: job
                .error
                .clone()
                .unwrap_or_else(|| error_detail(codes::INTERNAL, "failed", false)),
        },
        JobState::Cancelled => JobEvent::Cancelled {},
    }
}

/// `GET` of a job or training (one this process ran, or one kept in the store); `what`
/// names its kind in the 404.
pub async fn get<W>(
    jobs: &crate::server::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
    what: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let job = jobs
        .get(tenant, id)
        .ok_or_else(|| ApiError::not_found(format!("no {what} `{id}`")))?;
    Ok(json_ok(&job))
}

/// `DELETE` of a job or training: 200 when it has ended, 202 while it is stopping.
pub async fn cancel<W>(
    jobs: &crate::server::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let job = jobs.cancel(tenant, id, None)?;
    let status = if job.state.is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_with_status(&job, status))
}

pub async fn events<W>(
    jobs: &crate::server::jobs::Jobs<W>,
    tenant: &str,
    id: &str,
) -> Result<Response, ApiError> {
    jobs.recall(tenant, id).await;
    let (job, rx) = jobs
        .subscribe(tenant, id)
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    let first = snapshot_event(&job);
    let done = job.state.is_finished();
    // The snapshot, then every event until the job ends.
    let stream = futures_util::stream::unfold(
        (Some(first), rx, done),
        |(pending, mut rx, done)| async move {
            if let Some(event) = pending {
                let finished = event.is_final();
                return Some((
                    Ok::<_, std::convert::Infallible>(sse_event(&event)),
                    (None, rx, done || finished),
                ));
            }
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        let finished = event.is_final();
                        return Some((Ok(sse_event(&event)), (None, rx, finished)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response())
}
