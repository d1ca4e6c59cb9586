//! The operator's client of the runtime's HTTP API (`imagegen serve`): submit a generation as
//! an asynchronous job, follow it, cancel it, and delete what it stored.
//!
//! The controllers use it through the [`RuntimeApi`] trait so that tests can put a fake
//! runtime in its place.

use std::time::Duration;

use async_trait::async_trait;
use imagegen_crds::api::{ErrorBody, GenerationRequest, Job, LoraInfo, RuntimeLoad};
use reqwest::StatusCode;

/// A model's runtime: the base URL of its Service and the operator's token for the tenant.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// E.g. `http://sd15.team-a.svc:80`.
    pub base_url: String,
    /// Bearer token of the namespace's tenant.
    pub token: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// What went wrong calling the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// 404: no such job, image or LoRA (for a job we submitted: the runtime lost it).
    #[error("not found (404)")]
    NotFound,
    /// Nothing answered (connection refused, reset or timed out): the pod is gone or not
    /// ready.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// Any other error answer.
    #[error("{status}: {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code of the body, or `http_<status>`.
        code: String,
        /// The error message of the body.
        message: String,
    },
    /// A success answer whose body is not what the API says.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl RuntimeError {
    /// Whether the runtime does not serve the operation at all (405, 501).
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            RuntimeError::Api {
                status: 405 | 501,
                ..
            }
        )
    }

    /// Whether the runtime refused the request itself (400, 404, 413, 415, 422): sending it
    /// again cannot succeed.
    pub fn is_rejection(&self) -> bool {
        match self {
            RuntimeError::NotFound => true,
            RuntimeError::Api { status, .. } => matches!(status, 400 | 413 | 415 | 422),
            _ => false,
        }
    }

    /// Whether the error means the runtime no longer holds a job we submitted.
    pub fn job_lost(&self) -> bool {
        matches!(self, RuntimeError::NotFound | RuntimeError::Unreachable(_))
    }
}

/// The runtime's HTTP API as the controllers need it.
#[async_trait]
pub trait RuntimeApi: Send + Sync {
    /// `POST /v1/generations` with `Prefer: respond-async`: the accepted (or, for a `jobId`
    /// the runtime already holds, the existing) job.
    async fn submit(
        &self,
        target: &Target,
        request: &GenerationRequest,
    ) -> Result<Job, RuntimeError>;
    /// `GET /v1/jobs/{id}`.
    async fn job(&self, target: &Target, id: &str) -> Result<Job, RuntimeError>;
    /// `DELETE /v1/jobs/{id}`: cancel.
    async fn cancel(&self, target: &Target, id: &str) -> Result<(), RuntimeError>;
    /// `DELETE /v1/images/{id}`.
    async fn delete_image(&self, target: &Target, id: &str) -> Result<(), RuntimeError>;
    /// `DELETE /v1/loras/{name}`.
    async fn delete_lora(&self, target: &Target, name: &str) -> Result<(), RuntimeError>;
    /// `GET /v1/loras`: the tenant's LoRAs.
    async fn loras(&self, target: &Target) -> Result<Vec<LoraInfo>, RuntimeError>;
    /// `GET /v1/load`: how busy the runtime is, and which of the tenant's LoRAs are warm.
    async fn load(&self, target: &Target) -> Result<RuntimeLoad, RuntimeError>;
}

/// [`RuntimeApi`] over HTTP with reqwest.
#[derive(Debug, Clone)]
pub struct HttpRuntime {
    client: reqwest::Client,
}

impl HttpRuntime {
    /// A client with connect and request timeouts that suit in-cluster calls.
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("imagegen-operator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpRuntime { client })
    }

    fn url(target: &Target, path: &str) -> String {
        format!("{}{path}", target.base_url.trim_end_matches('/'))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RuntimeError> {
        let response = request.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() || e.is_request() {
                RuntimeError::Unreachable(e.to_string())
            } else {
                RuntimeError::Decode(e.to_string())
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::NOT_FOUND {
            return Err(RuntimeError::NotFound);
        }
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => RuntimeError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => RuntimeError::Api {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message: text.chars().take(200).collect(),
            },
        })
    }

    async fn job_body(response: reqwest::Response) -> Result<Job, RuntimeError> {
        response
            .json::<Job>()
            .await
            .map_err(|e| RuntimeError::Decode(e.to_string()))
    }

    async fn delete(&self, target: &Target, path: &str) -> Result<(), RuntimeError> {
        match self
            .send(
                self.client
                    .delete(Self::url(target, path))
                    .bearer_auth(&target.token),
            )
            .await
        {
            // Already gone is what a delete wants.
            Ok(_) | Err(RuntimeError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl RuntimeApi for HttpRuntime {
    async fn submit(
        &self,
        target: &Target,
        request: &GenerationRequest,
    ) -> Result<Job, RuntimeError> {
        let response = self
            .send(
                self.client
                    .post(Self::url(target, "/v1/generations"))
                    .bearer_auth(&target.token)
                    .header("Prefer", "respond-async")
                    .json(request),
            )
            .await?;
        Self::job_body(response).await
    }

    async fn job(&self, target: &Target, id: &str) -> Result<Job, RuntimeError> {
        let path = format!("/v1/jobs/{}", segment(id));
        let response = self
            .send(
                self.client
                    .get(Self::url(target, &path))
                    .bearer_auth(&target.token),
            )
            .await?;
        Self::job_body(response).await
    }

    async fn cancel(&self, target: &Target, id: &str) -> Result<(), RuntimeError> {
        self.delete(target, &format!("/v1/jobs/{}", segment(id)))
            .await
    }

    async fn delete_image(&self, target: &Target, id: &str) -> Result<(), RuntimeError> {
        self.delete(target, &format!("/v1/images/{}", segment(id)))
            .await
    }

    async fn delete_lora(&self, target: &Target, name: &str) -> Result<(), RuntimeError> {
        self.delete(target, &format!("/v1/loras/{}", segment(name)))
            .await
    }

    async fn loras(&self, target: &Target) -> Result<Vec<LoraInfo>, RuntimeError> {
        let response = self
            .send(
                self.client
                    .get(Self::url(target, "/v1/loras"))
                    .bearer_auth(&target.token),
            )
            .await?;
        response
            .json::<Vec<LoraInfo>>()
            .await
            .map_err(|e| RuntimeError::Decode(e.to_string()))
    }

    async fn load(&self, target: &Target) -> Result<RuntimeLoad, RuntimeError> {
        // Asked before every submission: a pod that is slow to say how busy it is counts as
        // unknown rather than holding the submission up.
        let response = self
            .send(
                self.client
                    .get(Self::url(target, "/v1/load"))
                    .bearer_auth(&target.token)
                    .timeout(LOAD_TIMEOUT),
            )
            .await?;
        response
            .json::<RuntimeLoad>()
            .await
            .map_err(|e| RuntimeError::Decode(e.to_string()))
    }
}

/// How long a pod may take to answer `GET /v1/load`.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The image id in a runtime image URL (`…/v1/images/{id}[.png]`), for deleting it.
pub fn image_id_from_url(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let (_, rest) = path.rsplit_once("/v1/images/")?;
    let id = rest.split('/').next()?;
    let id = id.rsplit_once('.').map_or(id, |(stem, _)| stem);
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagegen_crds::api::{JobKind, JobState};
    use imagegen_crds::{GenerationParams, Progress};
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use warp::http::{HeaderMap, Method};
    use warp::Filter;

    /// One request as the fake runtime saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// A runtime on loopback that records every request and answers `status` with `reply`.
    async fn fake_runtime(status: u16, reply: serde_json::Value) -> (Target, Log) {
        let seen: Log = Arc::default();
        let log = seen.clone();
        let route = warp::any()
            .and(warp::method())
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(
                move |method, path: warp::path::FullPath, headers, body: bytes::Bytes| {
                    log.lock().unwrap().push(Seen {
                        method,
                        path: path.as_str().to_string(),
                        headers,
                        body: body.to_vec(),
                    });
                    warp::reply::with_status(
                        warp::reply::json(&reply),
                        warp::http::StatusCode::from_u16(status).unwrap(),
                    )
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let target = Target {
            base_url: format!("http://{addr}/"),
            token: "tok-1".into(),
        };
        (target, seen)
    }

    fn request() -> GenerationRequest {
        GenerationRequest {
            params: GenerationParams {
                prompt: "a cat".into(),
                steps: Some(20),
                ..GenerationParams::default()
            },
            job_id: Some("ig-1".into()),
            ..GenerationRequest::default()
        }
    }

    fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
        seen.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn job(state: JobState) -> Job {
        Job {
            id: "ig-1".into(),
            kind: JobKind::Generation,
            state,
            queue_position: Some(0),
            progress: Progress::new(0, 20),
            created_at: "2026-11-27T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            result: None,
            training: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn submit_posts_the_request_asynchronously_with_the_token() {
        let (target, seen) =
            fake_runtime(202, serde_json::to_value(job(JobState::Queued)).unwrap()).await;
        let runtime = HttpRuntime::new().unwrap();
        let accepted = runtime.submit(&target, &request()).await.unwrap();
        assert_eq!(accepted, job(JobState::Queued));
        // A resubmission sends the very same body: the same jobId.
        runtime.submit(&target, &request()).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        let first = &seen[0];
        assert_eq!(first.method, Method::POST);
        assert_eq!(first.path, "/v1/generations");
        assert_eq!(header(first, "authorization"), Some("Bearer tok-1"));
        assert_eq!(header(first, "prefer"), Some("respond-async"));
        assert_eq!(header(first, "content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"prompt": "a cat", "steps": 20, "jobId": "ig-1"})
        );
        assert_eq!(seen[1].body, first.body);
    }

    #[tokio::test]
    async fn get_and_cancel_address_the_job() {
        let (target, seen) =
            fake_runtime(200, serde_json::to_value(job(JobState::Running)).unwrap()).await;
        let runtime = HttpRuntime::new().unwrap();
        assert_eq!(
            runtime.job(&target, "ig-1").await.unwrap().state,
            JobState::Running
        );
        runtime.cancel(&target, "ig-1").await.unwrap();
        runtime.delete_image(&target, "img 7").await.unwrap();
        runtime.delete_lora(&target, "alice").await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let calls: Vec<(Method, &str)> = seen
            .iter()
            .map(|s| (s.method.clone(), s.path.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                (Method::GET, "/v1/jobs/ig-1"),
                (Method::DELETE, "/v1/jobs/ig-1"),
                (Method::DELETE, "/v1/images/img%207"),
                (Method::DELETE, "/v1/loras/alice"),
            ]
        );
        assert!(seen
            .iter()
            .all(|s| header(s, "authorization") == Some("Bearer tok-1")));
    }

    #[tokio::test]
    async fn errors_are_classified() {
        let runtime = HttpRuntime::new().unwrap();
        let not_found =
            serde_json::json!({"error": {"code": "not_found", "message": "no such job"}});
        let (target, _) = fake_runtime(404, not_found).await;
        let err = runtime.job(&target, "ig-1").await.unwrap_err();
        assert_eq!(err, RuntimeError::NotFound);
        assert!(err.job_lost());
        // Deleting what is already gone succeeds.
        runtime.delete_lora(&target, "alice").await.unwrap();
        runtime.delete_image(&target, "i").await.unwrap();

        let full = serde_json::json!({"error": {"code": "queue_full", "message": "try later", "retryable": true}});
        let (target, _) = fake_runtime(429, full).await;
        let err = runtime.submit(&target, &request()).await.unwrap_err();
        assert_eq!(
            err,
            RuntimeError::Api {
                status: 429,
                code: "queue_full".into(),
                message: "try later".into()
            }
        );
        assert!(!err.job_lost());
        assert!(!err.is_rejection());

        let invalid = serde_json::json!({"error": {"code": "invalid_field", "message": "width", "field": "width"}});
        let (target, _) = fake_runtime(400, invalid).await;
        let err = runtime.submit(&target, &request()).await.unwrap_err();
        assert!(err.is_rejection() && !err.job_lost(), "{err:?}");

        let (target, _) = fake_runtime(200, serde_json::json!({"not": "a job"})).await;
        assert!(matches!(
            runtime.job(&target, "x").await,
            Err(RuntimeError::Decode(_))
        ));

        // Nothing listens: connection refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let gone = Target {
            base_url: format!("http://{addr}"),
            token: "t".into(),
        };
        let err = runtime.job(&gone, "ig-1").await.unwrap_err();
        assert!(matches!(err, RuntimeError::Unreachable(_)), "{err:?}");
        assert!(err.job_lost());
    }

    #[tokio::test]
    async fn loras_are_listed() {
        let list = serde_json::json!([{"name": "alice", "sizeBytes": 10, "sha256": "ab",
            "createdAt": "2026-11-27T00:00:00Z", "source": "training"}]);
        let (target, seen) = fake_runtime(200, list).await;
        let loras = HttpRuntime::new().unwrap().loras(&target).await.unwrap();
        assert_eq!(
            (loras[0].name.as_str(), loras[0].sha256.as_str()),
            ("alice", "ab")
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            (seen[0].method.clone(), seen[0].path.as_str()),
            (Method::GET, "/v1/loras")
        );
        assert_eq!(header(&seen[0], "authorization"), Some("Bearer tok-1"));
    }

    #[tokio::test]
    async fn load_is_read_with_the_token() {
        let load = serde_json::json!({"queued": 3, "queueCapacity": 64, "running": 1,
            "loadedLoras": ["loras/alice/pytorch_lora_weights.safetensors"],
            "trainings": {"running": false, "queued": 0}, "device": "cpu"});
        let (target, seen) = fake_runtime(200, load).await;
        let load = HttpRuntime::new().unwrap().load(&target).await.unwrap();
        assert_eq!((load.queued, load.running, load.queue_capacity), (3, 1, 64));
        assert_eq!(
            load.loaded_loras,
            ["loras/alice/pytorch_lora_weights.safetensors"]
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            (seen[0].method.clone(), seen[0].path.as_str()),
            (Method::GET, "/v1/load")
        );
        assert_eq!(header(&seen[0], "authorization"), Some("Bearer tok-1"));
    }

    #[test]
    fn target_debug_hides_the_token() {
        let t = Target {
            base_url: "http://m".into(),
            token: "secret".into(),
        };
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn image_ids_from_urls() {
        assert_eq!(
            image_id_from_url("http://m/v1/images/abc.png").as_deref(),
            Some("abc")
        );
        assert_eq!(image_id_from_url("/v1/images/abc").as_deref(), Some("abc"));
        assert_eq!(
            image_id_from_url("http://m/v1/images/abc.png?format=webp").as_deref(),
            Some("abc")
        );
        assert_eq!(image_id_from_url("https://cdn/x.png"), None);
        assert_eq!(image_id_from_url("http://m/v1/images/"), None);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("ig-abc_1.x"), "ig-abc_1.x");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
