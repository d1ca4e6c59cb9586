//! The operator's HTTP endpoints (warp): health, readiness, Prometheus metrics, and the
//! progress reports of training pods.
//!
//! `POST /v1/trainings/{namespace}/{name}/progress` takes one [`TrainerEvent`] as JSON, with
//! `Authorization: Bearer <token>` where the token is the one in the training's own progress
//! Secret (so a pod can only report for its own training). Any replica, leader or standby,
//! serves it: the report is written straight into the LoraTraining's status (step, total,
//! loss, seed), where the leader's reconciler finds it. Writes are throttled per training.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use imagegen_crds::api::{codes, ErrorBody, ErrorDetail, TrainerEvent};
use imagegen_crds::{LoraTraining, Progress};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::lora_training::{self as lt, TrainerReport};
use crate::metrics::Metrics;

/// Largest progress report accepted, in bytes.
pub const MAX_REPORT_BYTES: u64 = 16 * 1024;
/// Least time between two status writes of `step` reports of one training.
pub const STEP_WRITE_INTERVAL: Duration = Duration::from_secs(5);
/// Field manager of the progress writes (distinct from the reconciler's).
pub const PROGRESS_FIELD_MANAGER: &str = "imagegen-operator-progress";

/// Where training progress goes, and where the per-training tokens come from.
#[async_trait]
pub trait ProgressSink: Send + Sync {
    /// The progress token of `namespace/name`, `None` when the training (or its Secret)
    /// does not exist.
    async fn token(&self, namespace: &str, name: &str) -> Result<Option<String>, String>;
    /// Whether `presented` is the progress token of `namespace/name`. A sink may answer from
    /// a token it read before; this one reads it every time.
    async fn verify(&self, namespace: &str, name: &str, presented: &str) -> Result<bool, String> {
        Ok(self
            .token(namespace, name)
            .await?
            .is_some_and(|expected| same_token(presented, &expected)))
    }
    /// Records one event of the training's trainer.
    async fn record(&self, namespace: &str, name: &str, event: &TrainerEvent)
        -> Result<(), String>;
}

/// Leadership and API health, for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    leader: AtomicBool,
    last_lease_check: Mutex<Option<Instant>>,
}

impl Health {
    /// Records a successful round-trip to the lease, and whether this replica leads.
    pub fn lease_checked(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        *self
            .last_lease_check
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Ready when the last lease round-trip succeeded within `max_age`: a leader that
    /// reconciles, or a healthy standby that serves progress reports and can take over.
    pub fn is_ready(&self, max_age: Duration) -> bool {
        self.last_lease_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() <= max_age)
    }
}

/// What the endpoints need.
#[derive(Clone)]
pub struct ServerState {
    /// Rendered at `/metrics`.
    pub metrics: Metrics,
    /// Consulted at `/readyz`.
    pub health: Arc<Health>,
    /// How old the last lease check may be for `/readyz`.
    pub ready_max_age: Duration,
    /// Receives progress reports.
    pub progress: Arc<dyn ProgressSink>,
}

fn error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
            field: None,
            retryable: None,
        },
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn progress(
    namespace: String,
    name: String,
    authorization: Option<String>,
    body: bytes::Bytes,
    sink: Arc<dyn ProgressSink>,
) -> Result<warp::reply::Response, Rejection> {
    let Some(token) = authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            codes::UNAUTHORIZED,
            "a bearer token is required",
        ));
    };
    match sink.verify(&namespace, &name, token).await {
        Ok(true) => {}
        // A missing training answers as a wrong token does: a caller learns nothing about
        // what exists.
        Ok(false) => {
            return Ok(error(
                StatusCode::UNAUTHORIZED,
                codes::UNAUTHORIZED,
                "the token is not valid for this training",
            ))
        }
        Err(e) => {
            tracing::warn!(%namespace, %name, error = %e, "cannot read the progress token");
            return Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::INTERNAL,
                "cannot check the token now",
            ));
        }
    }
    let event: TrainerEvent = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                &format!("not a trainer event: {e}"),
            ))
        }
    };
    match sink.record(&namespace, &name, &event).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) => {
            tracing::warn!(%namespace, %name, error = %e, "cannot record progress");
            Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::INTERNAL,
                "cannot record the progress now",
            ))
        }
    }
}

/// Every endpoint, with JSON errors for what none of them takes.
pub fn app(
    state: ServerState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    routes(state).recover(recover).unify()
}

/// Every endpoint.
pub fn routes(
    state: ServerState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::with_status("ok", StatusCode::OK).into_response());
    let ready_state = state.clone();
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let health = &ready_state.health;
        if health.is_ready(ready_state.ready_max_age) {
            let role = if health.is_leader() {
                "leader"
            } else {
                "standby"
            };
            warp::reply::with_status(role, StatusCode::OK).into_response()
        } else {
            warp::reply::with_status(
                "the lease has not been checked recently",
                StatusCode::SERVICE_UNAVAILABLE,
            )
            .into_response()
        }
    });
    let metrics = state.metrics.clone();
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4",
        )
        .into_response()
    });
    let sink = state.progress.clone();
    let progress = warp::path!("v1" / "trainings" / String / String / "progress")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(MAX_REPORT_BYTES))
        .and(warp::body::bytes())
        .and(warp::any().map(move || sink.clone()))
        .and_then(progress);
    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(progress)
        .unify()
}

/// Turns unmatched routes and refused bodies into the API's JSON errors.
pub async fn recover(
    rejection: Rejection,
) -> Result<warp::reply::Response, std::convert::Infallible> {
    if rejection.is_not_found() {
        Ok(error(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "no such endpoint",
        ))
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        Ok(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            "the report is too large",
        ))
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            codes::BAD_REQUEST,
            "method not allowed",
        ))
    } else {
        Ok(error(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            "bad request",
        ))
    }
}

/// [`ProgressSink`] on the API server: tokens from the progress Secrets, reports into the
/// LoraTrainings' status.
pub struct KubeProgress {
    client: Client,
    reports: Mutex<HashMap<TrainingKey, (TrainerReport, Option<Instant>)>>,
    /// Tokens already read. A trainer reports every step, several times a second on a GPU;
    /// the token is created once per training and never rotates, so one Secret read per
    /// training serves them all. A token that does not match is read again (the training
    /// may have been deleted and created anew), and a finished training's is dropped.
    tokens: Mutex<HashMap<TrainingKey, String>>,
}

/// Namespace and name of a training.
type TrainingKey = (String, String);

impl KubeProgress {
    /// A sink using `client`.
    pub fn new(client: Client) -> Self {
        KubeProgress {
            client,
            reports: Mutex::default(),
            tokens: Mutex::default(),
        }
    }
}

/// Whether a report of `event` must be written now, given when the last write was.
pub fn must_write(event: &TrainerEvent, last_write: Option<Instant>, now: Instant) -> bool {
    match event {
        TrainerEvent::Started { .. } | TrainerEvent::Done { .. } | TrainerEvent::Failed { .. } => {
            true
        }
        TrainerEvent::Checkpoint { .. } => false,
        TrainerEvent::Step { .. } => {
            last_write.is_none_or(|t| now.duration_since(t) >= STEP_WRITE_INTERVAL)
        }
    }
}

/// The status fields a report sets.
pub fn status_patch(report: &TrainerReport, event: &TrainerEvent) -> serde_json::Value {
    let mut status = serde_json::Map::new();
    if report.total > 0 {
        status.insert(
            "progress".into(),
            json!(Progress::new(report.step, report.total)),
        );
    }
    if let Some(loss) = report.loss {
        status.insert("loss".into(), json!(loss));
    }
    if let Some(seed) = report.seed {
        status.insert("seed".into(), json!(seed));
    }
    // The reconciler owns `message`; it words it from `trainerError` when the Job fails or
    // retries. Any other report means a pod is at work again, and a merge patch's null
    // removes the field (also when a reconcile that read the status earlier put it back).
    let error = match event {
        TrainerEvent::Failed { message } => json!(message),
        _ => serde_json::Value::Null,
    };
    status.insert("trainerError".into(), error);
    json!({ "status": status })
}

#[async_trait]
impl ProgressSink for KubeProgress {
    async fn token(&self, namespace: &str, name: &str) -> Result<Option<String>, String> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = secrets
            .get_opt(&lt::token_secret_name(name))
            .await
            .map_err(|e| e.to_string())?;
        // A Secret that another object owns is not a training's token.
        Ok(secret
            .filter(|s| {
                s.metadata.owner_references.iter().flatten().any(|o| {
                    o.kind == "LoraTraining" && o.name == name && o.controller == Some(true)
                })
            })
            .and_then(|s| lt::token_from_secret(&s)))
    }

    async fn verify(&self, namespace: &str, name: &str, presented: &str) -> Result<bool, String> {
        let key = (namespace.to_string(), name.to_string());
        let known = |tokens: &HashMap<TrainingKey, String>| {
            tokens
                .get(&key)
                .is_some_and(|expected| same_token(presented, expected))
        };
        if known(&self.tokens.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(true);
        }
        let read = self.token(namespace, name).await?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match read {
            Some(expected) => {
                tokens.insert(key.clone(), expected);
            }
            None => {
                tokens.remove(&key);
            }
        }
        Ok(known(&tokens))
    }

    async fn record(
        &self,
        namespace: &str,
        name: &str,
        event: &TrainerEvent,
    ) -> Result<(), String> {
        let trainings: Api<LoraTraining> = Api::namespaced(self.client.clone(), namespace);
        let key = (namespace.to_string(), name.to_string());
        let known = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let (mut report, last_write) = match known {
            Some(known) => known,
            None => {
                let training = trainings.get(name).await.map_err(|e| e.to_string())?;
                (TrainerReport::from_status(training.status.as_ref()), None)
            }
        };
        report.apply(event);
        let now = Instant::now();
        let write = must_write(event, last_write, now);
        if write {
            trainings
                .patch_status(
                    name,
                    &PatchParams {
                        field_manager: Some(PROGRESS_FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(status_patch(&report, event)),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(
            event,
            TrainerEvent::Done { .. } | TrainerEvent::Failed { .. }
        ) {
            reports.remove(&key);
            // A retried pod's first report reads the token again.
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        } else {
            reports.insert(key, (report, if write { Some(now) } else { last_write }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeSink {
        recorded: Mutex<Vec<(String, String, TrainerEvent)>>,
    }

    #[async_trait]
    impl ProgressSink for FakeSink {
        async fn token(&self, namespace: &str, name: &str) -> Result<Option<String>, String> {
            Ok(match (namespace, name) {
                ("team-a", "alice") => Some("alice-token".into()),
                ("team-b", "bob") => Some("bob-token".into()),
                ("team-a", "broken") => return Err("API down".into()),
                _ => None,
            })
        }

        async fn record(
            &self,
            namespace: &str,
            name: &str,
            event: &TrainerEvent,
        ) -> Result<(), String> {
            self.recorded
                .lock()
                .unwrap()
                .push((namespace.into(), name.into(), event.clone()));
            Ok(())
        }
    }

    fn state(sink: Arc<FakeSink>, health: Arc<Health>) -> ServerState {
        ServerState {
            metrics: Metrics::new().unwrap(),
            health,
            ready_max_age: Duration::from_secs(30),
            progress: sink,
        }
    }

    fn step() -> serde_json::Value {
        json!({"event": "step", "step": 10, "total": 800, "loss": 0.12, "lr": 0.0001, "elapsed": 12.5, "eta": 987.5})
    }

    async fn post(
        filter: &(impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
              + Clone
              + 'static),
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let mut request = warp::test::request().method("POST").path(path).body(body);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.reply(filter).await;
        let json = serde_json::from_slice(response.body()).unwrap_or(serde_json::Value::Null);
        (response.status(), json)
    }

    #[tokio::test]
    async fn progress_needs_the_trainings_own_token() {
        let sink = Arc::new(FakeSink::default());
        let filter = app(state(sink.clone(), Arc::default()));
        let body = serde_json::to_vec(&step()).unwrap();
        let url = "/v1/trainings/team-a/alice/progress";

        let (status, json) = post(&filter, url, Some("alice-token"), &body).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
        let recorded = sink.recorded.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1);
        assert_eq!(
            (recorded[0].0.as_str(), recorded[0].1.as_str()),
            ("team-a", "alice")
        );
        assert!(matches!(
            recorded[0].2,
            TrainerEvent::Step {
                step: 10,
                total: 800,
                ..
            }
        ));

        for (token, path) in [
            (None, url),
            (Some("wrong"), url),
            (Some("alice-toke"), url),
            // Another training's valid token does not open this one.
            (Some("bob-token"), url),
            (Some("alice-token"), "/v1/trainings/team-b/bob/progress"),
            (Some("alice-token"), "/v1/trainings/team-a/ghost/progress"),
        ] {
            let (status, json) = post(&filter, path, token, &body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?} {path}");
            assert_eq!(json["error"]["code"], "unauthorized");
        }
        assert_eq!(sink.recorded.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn progress_refuses_bad_bodies_with_json_errors() {
        let sink = Arc::new(FakeSink::default());
        let filter = app(state(sink.clone(), Arc::default()));
        let url = "/v1/trainings/team-a/alice/progress";
        let (status, json) = post(&filter, url, Some("alice-token"), b"{\"event\":\"warp\"}").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"]["code"], "bad_request");
        let big = vec![b' '; MAX_REPORT_BYTES as usize + 1];
        let (status, json) = post(&filter, url, Some("alice-token"), &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json["error"]["code"], "payload_too_large");
        let (status, _) = post(
            &filter,
            "/v1/trainings/team-a/broken/progress",
            Some("x"),
            b"{}",
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, json) = post(&filter, "/v1/elsewhere", Some("x"), b"{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["error"]["code"], "not_found");
        assert!(sink.recorded.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let health = Arc::new(Health::default());
        let st = state(Arc::default(), health.clone());
        drop(st.metrics.reconcile("LoraTraining"));
        let filter = app(st);
        let get = |path: &'static str| {
            let filter = filter.clone();
            async move {
                let r = warp::test::request().path(path).reply(&filter).await;
                (r.status(), String::from_utf8_lossy(r.body()).to_string())
            }
        };
        assert_eq!(get("/healthz").await.0, StatusCode::OK);
        // Not ready before the first lease check.
        assert_eq!(get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        health.lease_checked(false);
        assert_eq!(get("/readyz").await, (StatusCode::OK, "standby".into()));
        health.lease_checked(true);
        assert_eq!(get("/readyz").await, (StatusCode::OK, "leader".into()));
        assert!(!health.is_ready(Duration::ZERO) || health.is_ready(Duration::from_secs(1)));
        let (status, body) = get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#"imagegen_operator_reconciles_total{kind="LoraTraining"} 1"#));
    }

    #[test]
    fn step_writes_are_throttled() {
        let start = Instant::now();
        let s = serde_json::from_value::<TrainerEvent>(step()).unwrap();
        assert!(must_write(&s, None, start));
        assert!(!must_write(&s, Some(start), start + Duration::from_secs(1)));
        assert!(must_write(&s, Some(start), start + STEP_WRITE_INTERVAL));
        let done = TrainerEvent::Done {
            step: 1,
            total: 1,
            output: "o".into(),
            loss: None,
        };
        assert!(must_write(&done, Some(start), start));
        let checkpoint = TrainerEvent::Checkpoint {
            step: 1,
            path: "p".into(),
        };
        assert!(!must_write(&checkpoint, None, start));
    }

    #[test]
    fn patches_carry_the_report() {
        let mut report = TrainerReport::default();
        let started = TrainerEvent::Started {
            total: 800,
            seed: 3,
        };
        report.apply(&started);
        assert_eq!(
            status_patch(&report, &started),
            json!({"status": {
                "progress": {"step": 0, "total": 800, "percent": 0},
                "seed": 3,
                "trainerError": null,
            }})
        );
        let s = serde_json::from_value::<TrainerEvent>(step()).unwrap();
        report.apply(&s);
        assert_eq!(status_patch(&report, &s)["status"]["loss"], 0.12);
        assert_eq!(
            status_patch(&report, &s)["status"]["trainerError"],
            serde_json::Value::Null
        );
        let failed = TrainerEvent::Failed {
            message: "oom".into(),
        };
        let patch = status_patch(&report, &failed);
        assert_eq!(patch["status"]["trainerError"], "oom");
        assert!(
            patch["status"].get("message").is_none(),
            "the reconciler owns it"
        );
        assert!(same_token("abc", "abc") && !same_token("abc", "abd") && !same_token("abc", "ab"));
    }
}
