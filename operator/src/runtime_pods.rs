//! The runtime pods of a model, as the EndpointSlices of its Service list them.
//!
//! A job lives in the pod that took it, so the operator talks to one pod per generation,
//! never to the Service (whose ClusterIP would spread a job's polls over every replica).
//! Addresses come only from EndpointSlices that Kubernetes' EndpointSlice controller keeps
//! for the model's own Service: nothing a user writes into a status (such as a
//! DiffusionModel's `status.endpoint`) can send the runtime's bearer token elsewhere.

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::api::image_generation::RuntimePod;
use crate::diffusion_model::RUNTIME_PORT_NAME;

/// The label that names an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label of the slices that Kubernetes' own controller keeps.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// A runtime pod of a model and whether it is ready to take work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEndpoint {
    pub pod: RuntimePod,
    pub ready: bool,
}

/// Every pod of the Service `service` in `namespace` that the slices list, ready or not, in
/// the order of their names. A pod listed by two slices (during a change) counts once, ready
/// if either says so.
pub fn model_pods<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    namespace: &str,
    service: &str,
) -> Vec<PodEndpoint> {
    let mut pods: Vec<PodEndpoint> = Vec::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        if slice.metadata.namespace.as_deref() != Some(namespace)
            || label(SERVICE_NAME_LABEL) != Some(service)
            || label(MANAGED_BY_LABEL) != Some(MANAGED_BY_CONTROLLER)
            || slice.address_type != "IPv4" && slice.address_type != "IPv6"
        {
            continue;
        }
        let port = slice.ports.iter().flatten().find_map(|p| {
            let named = p.name.as_deref() == Some(RUNTIME_PORT_NAME);
            named.then_some(p.port).flatten()
        });
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            let Some(target) = endpoint.target_ref.as_ref() else {
                continue;
            };
            let (Some("Pod"), Some(name)) = (target.kind.as_deref(), target.name.as_ref()) else {
                continue;
            };
            let Some(ip) = endpoint.addresses.first() else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            // Kubernetes: a missing `ready` means ready; a terminating pod is never ready.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false);
            let address = if slice.address_type == "IPv6" {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            };
            match pods.iter_mut().find(|p| p.pod.name == *name) {
                Some(known) => known.ready |= ready,
                None => pods.push(PodEndpoint {
                    pod: RuntimePod {
                        name: name.clone(),
                        address,
                    },
                    ready,
                }),
            }
        }
    }
    pods.sort_by(|a, b| a.pod.name.cmp(&b.pod.name));
    pods
}

/// The ready pod that a new job goes to when no load is known (a job submitted before pods
/// were recorded, images and LoRAs deleted through any pod): the ready pod of highest
/// [`rendezvous_weight`] for `key` (the job id), so that jobs spread evenly and the same
/// key picks the same pod while that pod stays.
pub fn choose<'a>(pods: &'a [PodEndpoint], key: &str) -> Option<&'a RuntimePod> {
    pods.iter()
        .filter(|p| p.ready)
        .max_by_key(|p| rendezvous_weight(key, &p.pod.name))
        .map(|p| &p.pod)
}

/// Rendezvous (highest random weight) hash of `key` on the pod `pod`: FNV-1a, then
/// splitmix64's finalizer to spread every input bit over the word. Stable across processes
/// and releases, unlike std's hasher; a pod leaving moves only the keys it had.
pub fn rendezvous_weight(key: &str, pod: &str) -> u64 {
    let bytes = key.bytes().chain([0]).chain(pod.bytes());
    let mut z = bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `pod` if the model still lists it (ready or not): the pod that holds a job.
pub fn still_listed<'a>(pods: &'a [PodEndpoint], pod: &RuntimePod) -> Option<&'a PodEndpoint> {
    pods.iter()
        .find(|p| p.pod.name == pod.name && p.pod.address == pod.address)
}

/// The base URL of a pod's runtime.
pub fn base_url(pod: &RuntimePod) -> String {
    format!("http://{}", pod.address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(service: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("{service}-abcde"),
                "namespace": "team-a",
                "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY_CONTROLLER}
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn endpoint(pod: &str, ip: &str, ready: bool) -> serde_json::Value {
        json!({
            "addresses": [ip],
            "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "team-a"}
        })
    }

    #[test]
    fn pods_come_from_the_models_own_slices() {
        let ours = slice(
            "sd15",
            json!([
                endpoint("sd15-b", "10.0.0.2", false),
                endpoint("sd15-a", "10.0.0.1", true)
            ]),
        );
        let other_service = slice("sdxl", json!([endpoint("sdxl-a", "10.0.0.9", true)]));
        let mut hand_made = slice("sd15", json!([endpoint("evil", "203.0.113.7", true)]));
        hand_made
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY_LABEL);
        let pods = model_pods([&ours, &other_service, &hand_made], "team-a", "sd15");
        assert_eq!(
            pods,
            [
                PodEndpoint {
                    pod: RuntimePod {
                        name: "sd15-a".into(),
                        address: "10.0.0.1:8080".into()
                    },
                    ready: true
                },
                PodEndpoint {
                    pod: RuntimePod {
                        name: "sd15-b".into(),
                        address: "10.0.0.2:8080".into()
                    },
                    ready: false
                },
            ]
        );
        assert!(model_pods([&ours], "team-b", "sd15").is_empty());
    }

    #[test]
    fn new_jobs_go_to_ready_pods_spread_by_job_id() {
        let pods = model_pods(
            [&slice(
                "sd15",
                json!([
                    endpoint("sd15-a", "10.0.0.1", true),
                    endpoint("sd15-b", "10.0.0.2", true),
                    endpoint("sd15-c", "10.0.0.3", false)
                ]),
            )],
            "team-a",
            "sd15",
        );
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..100 {
            let pod = choose(&pods, &format!("job-{i}")).unwrap();
            *counts.entry(pod.name.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.keys().collect::<Vec<_>>(), ["sd15-a", "sd15-b"]);
        assert!(counts.values().all(|n| *n >= 30), "{counts:?}");
        assert_eq!(choose(&pods, "job-7"), choose(&pods, "job-7"));
        assert_eq!(choose(&pods[2..], "job-7"), None);
    }

    #[test]
    fn a_job_stays_with_its_pod_while_the_pod_is_listed() {
        let pods = model_pods(
            [&slice(
                "sd15",
                json!([endpoint("sd15-a", "10.0.0.1", false)]),
            )],
            "team-a",
            "sd15",
        );
        let held = RuntimePod {
            name: "sd15-a".into(),
            address: "10.0.0.1:8080".into(),
        };
        assert_eq!(still_listed(&pods, &held).map(|p| &p.pod), Some(&held));
        assert!(!still_listed(&pods, &held).unwrap().ready);
        let moved = RuntimePod {
            address: "10.0.0.5:8080".into(),
            ..held.clone()
        };
        assert_eq!(still_listed(&pods, &moved), None);
        assert_eq!(base_url(&held), "http://10.0.0.1:8080");
    }
}
