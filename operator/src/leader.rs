//! Leader election on a coordination.k8s.io Lease, so that of several replicas exactly one
//! reconciles. The holder renews the Lease every few seconds; another replica takes it over
//! only once it has not been renewed for its whole duration. Every write carries the
//! `resourceVersion` that was read, so of two replicas racing for the Lease the API server
//! lets one win and answers the other 409 Conflict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a standby checks).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// What to do with the Lease as it was read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nobody holds it yet: create it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Its holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds it.
    Standby {
        /// The holder.
        holder: String,
    },
}

/// Decides from the Lease as read at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
            let renewed = spec.renew_time.or(spec.acquire_time).map(|t| t.0);
            let expired = renewed.is_none_or(|renewed| renewed + duration < now);
            if expired {
                Decision::TakeOver
            } else {
                Decision::Standby {
                    holder: holder.to_string(),
                }
            }
        }
    }
}

/// The Lease of `name` after `decision` by `identity` at `now`, from the one read.
pub fn next_lease(
    read: Option<&Lease>,
    name: &str,
    namespace: &str,
    identity: &str,
    decision: &Decision,
    now: Timestamp,
) -> Lease {
    let mut lease = read.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_else(LeaseSpec::default);
    spec.holder_identity = Some(identity.into());
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(MicroTime(now));
    match decision {
        Decision::Create => {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(0);
        }
        Decision::TakeOver => {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        Decision::Renew | Decision::Standby { .. } => {}
    }
    lease.spec = Some(spec);
    lease
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
}

impl LeaderElector {
    /// Competes for the Lease `name` in `namespace` as `identity`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Reads the Lease and acquires or renews it when it may: whether this replica leads
    /// now. A lost race (409) is an answer, not an error.
    pub async fn try_lead(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let read = self.api.get_opt(&self.name).await?;
        let decision = decide(read.as_ref(), &self.identity, now);
        if let Decision::Standby { .. } = decision {
            return Ok(false);
        }
        let lease = next_lease(
            read.as_ref(),
            &self.name,
            &self.namespace,
            &self.identity,
            &decision,
            now,
        );
        let written = match decision {
            Decision::Create => self.api.create(&PostParams::default(), &lease).await,
            _ => {
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up when this replica holds it, so that a standby takes over at its
    /// next check instead of after the Lease expires. Whether it was released.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Competes for the Lease forever, every [`RENEW_INTERVAL`], publishing on `leading` whether
/// this replica leads and recording each successful round-trip in `health`. A leader that
/// cannot renew for as long as the Lease lasts steps down: another replica may hold it by
/// then.
pub async fn campaign(
    elector: std::sync::Arc<LeaderElector>,
    health: std::sync::Arc<crate::server::Health>,
    leading: tokio::sync::watch::Sender<bool>,
) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        match elector.try_lead(Timestamp::now()).await {
            Ok(leads) => {
                health.lease_checked(leads);
                if leads {
                    last_renewal = Some(tokio::time::Instant::now());
                }
                if leads != *leading.borrow() {
                    tracing::info!(identity = elector.identity(), leads, "leadership changed");
                }
                leading.send_replace(leads);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read or write the leader Lease");
                let expired =
                    last_renewal.is_none_or(|t| t.elapsed() + RENEW_INTERVAL >= LEASE_DURATION);
                if *leading.borrow() && expired {
                    tracing::warn!(identity = elector.identity(), "stepping down");
                    leading.send_replace(false);
                }
            }
        }
        tokio::time::sleep(RENEW_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_api::{self, answer, api_error, Handle};
    use http::{Method, Response};
    use kube::client::Body;
    use serde_json::Value;

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("imagegen-operator".into()),
                namespace: Some("imagegen-system".into()),
                resource_version: Some("41".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(t(renewed))),
                acquire_time: Some(MicroTime(t(0))),
                lease_transitions: Some(2),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", t(100)), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 90)), "a", t(100)),
            Decision::Renew
        );
        // Renewed 10 s ago, lasts 15 s: b waits.
        assert_eq!(
            decide(Some(&lease(Some("a"), 90)), "b", t(100)),
            Decision::Standby { holder: "a".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("a"), 85)), "b", t(100)),
            Decision::Standby { holder: "a".into() }
        );
        // Not renewed for longer than its duration: b takes over.
        assert_eq!(
            decide(Some(&lease(Some("a"), 84)), "b", t(100)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, 99)), "b", t(100)),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(Some(""), 99)), "b", t(100)),
            Decision::TakeOver
        );
    }

    #[test]
    fn written_leases() {
        let read = lease(Some("a"), 84);
        let taken = next_lease(
            Some(&read),
            "imagegen-operator",
            "ns",
            "b",
            &Decision::TakeOver,
            t(100),
        );
        let spec = taken.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(t(100))));
        assert_eq!(spec.renew_time, Some(MicroTime(t(100))));
        // The read resourceVersion goes back: the write is conditional on it.
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("41"));

        let renewed = next_lease(
            Some(&lease(Some("b"), 95)),
            "x",
            "ns",
            "b",
            &Decision::Renew,
            t(100),
        );
        let spec = renewed.spec.unwrap();
        assert_eq!(
            (spec.lease_transitions, spec.acquire_time),
            (Some(2), Some(MicroTime(t(0))))
        );

        let created = next_lease(
            None,
            "imagegen-operator",
            "ns",
            "a",
            &Decision::Create,
            t(100),
        );
        assert_eq!(created.metadata.name.as_deref(), Some("imagegen-operator"));
        assert_eq!(created.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(created.spec.unwrap().lease_transitions, Some(0));
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/imagegen-system/leases";

    fn elector(identity: &str) -> (LeaderElector, Handle) {
        let (client, handle) = mock_api::client("default");
        (
            LeaderElector::new(client, "imagegen-system", "imagegen-operator", identity),
            handle,
        )
    }

    fn status(code: u16, reason: &str) -> Value {
        api_error(code, reason, reason)
    }

    /// Answers a Lease lookup that finds none, then its creation by `holder`; returns the
    /// Lease the elector sent.
    async fn lease_created(handle: &mut Handle, holder: &str) -> Value {
        answer(
            handle,
            &Method::GET,
            &format!("{PATH}/imagegen-operator"),
            404,
            &status(404, "NotFound"),
        )
        .await;
        let reply = serde_json::to_value(lease(Some(holder), 100)).unwrap();
        answer(handle, &Method::POST, PATH, 201, &reply).await.body
    }

    #[tokio::test]
    async fn first_replica_creates_the_lease() {
        let (elector, mut handle) = elector("pod-a");
        let server = tokio::spawn(async move { lease_created(&mut handle, "pod-a").await });
        assert!(elector.try_lead(t(100)).await.unwrap());
        let created = server.await.unwrap();
        assert_eq!(created["spec"]["holderIdentity"], "pod-a");
        assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn a_live_holder_keeps_the_other_replica_standing_by() {
        let (elector, mut handle) = elector("pod-b");
        let server = tokio::spawn(async move {
            answer(
                &mut handle,
                &Method::GET,
                &format!("{PATH}/imagegen-operator"),
                200,
                &serde_json::to_value(lease(Some("pod-a"), 95)).unwrap(),
            )
            .await;
            // No write may follow.
            assert!(handle.next_request().await.is_none());
        });
        assert!(!elector.try_lead(t(100)).await.unwrap());
        drop(elector);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_unless_someone_was_faster() {
        for (code, leads) in [(200, true), (409, false)] {
            let (elector, mut handle) = elector("pod-b");
            let server = tokio::spawn(async move {
                answer(
                    &mut handle,
                    &Method::GET,
                    &format!("{PATH}/imagegen-operator"),
                    200,
                    &serde_json::to_value(lease(Some("pod-a"), 50)).unwrap(),
                )
                .await;
                let reply = if code == 200 {
                    serde_json::to_value(lease(Some("pod-b"), 100)).unwrap()
                } else {
                    status(409, "Conflict")
                };
                answer(
                    &mut handle,
                    &Method::PUT,
                    &format!("{PATH}/imagegen-operator"),
                    code,
                    &reply,
                )
                .await
                .body
            });
            assert_eq!(elector.try_lead(t(100)).await.unwrap(), leads);
            let written = server.await.unwrap();
            assert_eq!(written["spec"]["holderIdentity"], "pod-b");
            assert_eq!(written["spec"]["leaseTransitions"], 3);
            assert_eq!(written["metadata"]["resourceVersion"], "41");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down() {
        let (elector, mut handle) = elector("pod-a");
        let health = std::sync::Arc::new(crate::server::Health::default());
        let (tx, mut leading) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(campaign(std::sync::Arc::new(elector), health.clone(), tx));
        let get = format!("{PATH}/imagegen-operator");
        lease_created(&mut handle, "pod-a").await;
        leading.wait_for(|l| *l).await.unwrap();
        assert!(health.is_leader());
        // The API server stops answering. Within the Lease's duration it still leads (the
        // next call comes only after the error was handled)...
        answer(
            &mut handle,
            &Method::GET,
            &get,
            500,
            &status(500, "InternalError"),
        )
        .await;
        let (request, respond) = handle.next_request().await.expect("a call");
        assert_eq!(request.uri().path(), get);
        assert!(*leading.borrow());
        // ...then it steps down.
        respond.send_response(
            Response::builder()
                .status(500)
                .body(Body::from(
                    serde_json::to_vec(&status(500, "InternalError")).unwrap(),
                ))
                .unwrap(),
        );
        leading.wait_for(|l| !*l).await.unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn a_holder_releases_its_lease_and_only_its_own() {
        let (elector, mut handle) = elector("pod-a");
        let get = format!("{PATH}/imagegen-operator");
        let server = tokio::spawn(async move {
            answer(
                &mut handle,
                &Method::GET,
                &get,
                200,
                &serde_json::to_value(lease(Some("pod-a"), 95)).unwrap(),
            )
            .await;
            let written = answer(
                &mut handle,
                &Method::PUT,
                &get,
                200,
                &serde_json::to_value(lease(None, 95)).unwrap(),
            )
            .await
            .body;
            // Someone else's: nothing is written.
            answer(
                &mut handle,
                &Method::GET,
                &get,
                200,
                &serde_json::to_value(lease(Some("pod-b"), 95)).unwrap(),
            )
            .await;
            written
        });
        assert!(elector.release().await.unwrap());
        assert!(!elector.release().await.unwrap());
        let written = server.await.unwrap();
        assert!(written["spec"].get("holderIdentity").is_none(), "{written}");
        assert_eq!(written["metadata"]["resourceVersion"], "41");
    }

    #[tokio::test]
    async fn api_errors_are_errors() {
        let (elector, mut handle) = elector("pod-a");
        let server = tokio::spawn(async move {
            answer(
                &mut handle,
                &Method::GET,
                &format!("{PATH}/imagegen-operator"),
                403,
                &status(403, "Forbidden"),
            )
            .await;
        });
        assert!(elector.try_lead(t(100)).await.is_err());
        server.await.unwrap();
    }
}
