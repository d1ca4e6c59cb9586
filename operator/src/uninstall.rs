//! `imagegen-operator release-finalizers`: what the chart's pre-delete hook runs before Helm
//! deletes the operator.
//!
//! ImageGenerations and LoraTrainings carry finalizers that only a running operator removes.
//! Helm keeps the CRDs, so the objects outlive the release; without an operator, deleting one
//! (or its namespace) would hang forever. So before the operator goes:
//!
//! 1. The leader Lease is taken over under [`UNINSTALL_HOLDER`], whoever holds it, for
//!    [`UNINSTALL_LEASE`]. The leading replica sees that at its next renewal and exits; a
//!    replica that cannot reach the API server stops leading when its own Lease runs out. So
//!    after [`STEP_DOWN_WAIT`] no replica reconciles, and none adds a finalizer back.
//! 2. The operator's finalizers are removed from every object (only its own; others stay),
//!    each with the `resourceVersion` it was read at, with an event on the object.
//!
//! The objects stay, with their status. What they stored (images, LoRAs) stays in the store:
//! the runtime that would delete it goes with the release. A reinstalled operator adds the
//! finalizers back when it reconciles, once the uninstall's Lease has run out.

use std::time::Duration;

use imagegen_crds::{ImageGeneration, LoraTraining};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::controller::{IMAGES_FINALIZER, LORA_FINALIZER};
use crate::leader::{next_lease, Decision, LEASE_DURATION, RENEW_INTERVAL};

/// Holder identity of the Lease while the release is uninstalled.
pub const UNINSTALL_HOLDER: &str = "imagegen-uninstall";
/// How long the uninstall holds the Lease: Helm deletes the operator's Deployment right after
/// the hook, and its pods stop within their grace period (30 s), well inside this. A release
/// installed again sooner waits for the rest of it before it reconciles.
pub const UNINSTALL_LEASE: Duration = Duration::from_secs(120);
/// How long after taking the Lease over every replica has stopped reconciling: a leader
/// notices at its next renewal, one that cannot renew steps down when its Lease expires.
pub const STEP_DOWN_WAIT: Duration = LEASE_DURATION.saturating_add(RENEW_INTERVAL);

/// What a run released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    /// `namespace/name` of each ImageGeneration released.
    pub generations: Vec<String>,
    /// `namespace/name` of each LoraTraining released.
    pub trainings: Vec<String>,
}

/// `finalizers` without `ours`, or `None` when it is not there.
pub fn without(finalizers: &[String], ours: &str) -> Option<Vec<String>> {
    finalizers
        .iter()
        .any(|f| f == ours)
        .then(|| finalizers.iter().filter(|f| *f != ours).cloned().collect())
}

/// The Lease `read` (if any) taken over for the uninstall at `now`.
pub fn uninstall_lease(read: Option<&Lease>, name: &str, namespace: &str, now: Timestamp) -> Lease {
    let mut lease = next_lease(
        read,
        name,
        namespace,
        UNINSTALL_HOLDER,
        &if read.is_some() {
            Decision::TakeOver
        } else {
            Decision::Create
        },
        now,
    );
    if let Some(spec) = lease.spec.as_mut() {
        spec.lease_duration_seconds = Some(UNINSTALL_LEASE.as_secs() as i32);
    }
    lease
}

/// Takes the Lease `name` in `namespace` over for the uninstall, whoever holds it.
pub async fn hold_lease(client: &Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    loop {
        let read = leases.get_opt(name).await?;
        let lease = uninstall_lease(read.as_ref(), name, namespace, Timestamp::now());
        let written = match read {
            None => leases.create(&PostParams::default(), &lease).await,
            Some(_) => leases.replace(name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(_) => return Ok(()),
            // A replica renewed (or made) it meanwhile: read it again.
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes `finalizer` from every `K` in `namespace` (all when `None`): the
/// `namespace/name` of each object released.
async fn release_all<K>(
    client: &Client,
    recorder: &Recorder,
    namespace: Option<&str>,
    finalizer: &str,
) -> Result<Vec<String>, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let all: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut released = Vec::new();
    for listed in all.list(&ListParams::default()).await? {
        let ns = listed.namespace().unwrap_or_default();
        let api: Api<K> = Api::namespaced(client.clone(), &ns);
        let mut obj = listed;
        while let Some(remaining) = without(obj.finalizers(), finalizer) {
            // The resourceVersion read: a finalizer another controller added meanwhile is
            // never dropped by this write (409, read again).
            let patch = json!({"metadata": {
                "resourceVersion": obj.resource_version(),
                "finalizers": remaining,
            }});
            match api
                .patch(
                    &obj.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    released.push(format!("{ns}/{}", obj.name_any()));
                    let note = "the operator is being uninstalled: its finalizer was removed, \
                                so deleting this object no longer deletes what it stored";
                    // An event is a courtesy: the release stands without it.
                    let _ = recorder
                        .publish(
                            &Event {
                                type_: EventType::Warning,
                                reason: "FinalizerReleased".into(),
                                note: Some(note.into()),
                                action: "Uninstall".into(),
                                secondary: None,
                            },
                            &obj.object_ref(&()),
                        )
                        .await;
                    break;
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    match api.get_opt(&obj.name_any()).await? {
                        Some(again) => obj = again,
                        None => break,
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(released)
}

/// Step 2: the finalizers of every ImageGeneration and LoraTraining in `namespace` (all when
/// `None`).
pub async fn release_finalizers(
    client: &Client,
    recorder: &Recorder,
    namespace: Option<&str>,
) -> Result<Released, kube::Error> {
    Ok(Released {
        generations: release_all::<ImageGeneration>(client, recorder, namespace, IMAGES_FINALIZER)
            .await?,
        trainings: release_all::<LoraTraining>(client, recorder, namespace, LORA_FINALIZER).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_finalizer_goes() {
        let f = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            without(&f(&["other.io/keep", IMAGES_FINALIZER]), IMAGES_FINALIZER),
            Some(f(&["other.io/keep"]))
        );
        assert_eq!(without(&f(&["other.io/keep"]), IMAGES_FINALIZER), None);
        assert_eq!(without(&[], LORA_FINALIZER), None);
    }

    #[test]
    fn the_uninstall_takes_a_held_lease_for_longer() {
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let held = next_lease(None, "op", "sys", "replica-a", &Decision::Create, now);
        let lease = uninstall_lease(Some(&held), "op", "sys", now);
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(UNINSTALL_HOLDER));
        assert_eq!(spec.lease_duration_seconds, Some(120));
        assert_eq!(spec.lease_transitions, Some(1));
        // A replica reading it now stands by, and still does a lease duration later.
        let later = now + LEASE_DURATION;
        let read = uninstall_lease(Some(&held), "op", "sys", now);
        assert!(matches!(
            crate::leader::decide(Some(&read), "replica-a", later),
            Decision::Standby { .. }
        ));
        assert!(STEP_DOWN_WAIT > LEASE_DURATION);
    }
}
