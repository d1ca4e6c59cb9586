//! Pieces every pod the operator builds shares: the `imagegen` container on the model's GPUs,
//! its cache and scratch volumes, the pod's placement, the store settings, the security
//! contexts and store-path checks. Runtime replicas and training Jobs run the same image on
//! the same nodes and read and write the same store, so both get them the same way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    LocalObjectReference, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, PodAffinity,
    PodAffinityTerm, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecretEnvSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::valid_model::{ValidModel, CACHE_MOUNT_PATH};
use crate::{Error, OperatorConfig, STORE_MOUNT_PATH};

/// Name of the store volume in pod specs.
pub const STORE_VOLUME: &str = "store";
/// Label of every pod that mounts the store claim, valued with the claim's name: what a pod
/// placed beside the others that mount it looks for.
pub const STORE_CLAIM_LABEL: &str = "imagegen.dev/store-claim";
/// Pod template annotation holding [`Found::secrets_digest`].
pub const SECRETS_DIGEST_ANNOTATION: &str = "imagegen.dev/secrets-sha256";

/// What the controller read from the cluster that shapes the pods it builds. Builders stay
/// pure: the controller reads, they take the reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// SHA-256 of the Secrets copied into the model's namespace. It is a pod template
    /// annotation of the Deployment, so that rotating one of them rolls the replicas
    /// (environment variables are read once, at container start).
    pub secrets_digest: Option<String>,
    /// The store claim in the pods' namespace can be attached to one node at a time: every
    /// pod that mounts it must run on the node of the others.
    pub store_on_one_node: bool,
}

/// Whether pods on several nodes can mount `claim` at once. A claim not bound yet counts its
/// requested modes; bound, the volume's (the `status`), which may grant more.
pub fn claim_spans_nodes(claim: &PersistentVolumeClaim) -> bool {
    let modes = claim
        .status
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .filter(|modes| !modes.is_empty())
        .or_else(|| claim.spec.as_ref().and_then(|s| s.access_modes.clone()))
        .unwrap_or_default();
    modes.iter().any(|m| m == "ReadWriteMany")
}

/// Why pods cannot share `claim` at all, if they cannot: ReadWriteOncePod lets one pod
/// mount it, and every runtime replica and training pod mounts the store.
pub fn claim_unshareable(claim: &PersistentVolumeClaim) -> Option<String> {
    let modes = claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    (modes.len() == 1 && modes[0] == "ReadWriteOncePod").then(|| {
        format!(
            "the store claim {} is ReadWriteOncePod, so only one pod may mount it, but every \
             runtime replica and training pod mounts the store: use ReadWriteMany \
             (or ReadWriteOnce on a single node), or an S3 store",
            claim.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// Why a model that may run `max_replicas` cannot use the store claim `claim`, which one
/// node mounts at a time (`on_one_node`), if it cannot: its replicas would all have to share
/// that node, so scaling out would add no GPU node. Several replicas need a store they
/// can all reach: S3, or a ReadWriteMany claim.
pub fn store_unfit_for_replicas(
    claim: &str,
    on_one_node: bool,
    max_replicas: u32,
) -> Option<String> {
    (on_one_node && max_replicas > 1).then(|| {
        format!(
            "replicas.max is {max_replicas}, but the store claim {claim} is not ReadWriteMany, \
             so its pods could not spread over nodes: several replicas need an S3 store or a \
             ReadWriteMany claim; set replicas.max to 1 to serve from this claim"
        )
    })
}

/// The name of the copy of the runtime environment Secret in the namespace of `model`.
pub fn runtime_env_secret_name(model: &str) -> String {
    format!("{model}-runtime-env")
}

/// The labels pods add to their own so that the store's placement can find them.
pub fn store_labels(config: &OperatorConfig) -> BTreeMap<String, String> {
    config
        .store_claim
        .iter()
        .map(|claim| (STORE_CLAIM_LABEL.to_string(), claim.clone()))
        .collect()
}

/// With a store that attaches to one node at a time, a pod goes where the others that mount
/// it run. The first of them goes anywhere: the scheduler places a pod whose own labels
/// match its affinity term when no other pod does.
fn store_affinity(config: &OperatorConfig, found: &Found) -> Option<Affinity> {
    if !found.store_on_one_node {
        return None;
    }
    let labels = store_labels(config);
    (!labels.is_empty()).then(|| Affinity {
        pod_affinity: Some(PodAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(labels),
                    ..LabelSelector::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            }]),
            ..PodAffinity::default()
        }),
        ..Affinity::default()
    })
}

/// A plain environment variable.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `IMAGEGEN_STORE` when the operator was given a store URL.
pub fn store_env(config: &OperatorConfig) -> Vec<EnvVar> {
    config
        .store_url
        .iter()
        .map(|url| env("IMAGEGEN_STORE", url.clone()))
        .collect()
}

/// Every key of the runtime environment Secret as an environment variable (the store's
/// credentials, extra tokens), from its copy in the namespace of `model`.
pub fn store_env_from(config: &OperatorConfig, model: &str) -> Option<Vec<EnvFromSource>> {
    config.store_secret.as_ref().map(|_| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: runtime_env_secret_name(model),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]
    })
}

/// The store claim's volume and its mount at [`STORE_MOUNT_PATH`], when there is a claim.
pub fn store_volume(config: &OperatorConfig) -> Option<(Volume, VolumeMount)> {
    let claim = config.store_claim.as_ref()?;
    Some((
        Volume {
            name: STORE_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: STORE_VOLUME.into(),
            mount_path: STORE_MOUNT_PATH.into(),
            ..VolumeMount::default()
        },
    ))
}

/// Non-root, with the runtime default seccomp profile.
pub fn pod_security_context(config: &OperatorConfig) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(config.run_as_user),
        run_as_group: Some(config.run_as_user),
        fs_group: Some(config.run_as_user),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// No privilege escalation, no capabilities, a read-only root file system.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// `HF_HOME` on the cache volume, and `HOME` on the scratch volume (the root file system
/// is read-only).
pub fn cache_env() -> [EnvVar; 2] {
    [env("HF_HOME", CACHE_MOUNT_PATH), env("HOME", "/tmp")]
}

/// The cache volume (the claim `cache_claim`, or an emptyDir without one) and the `/tmp`
/// scratch emptyDir, and their mounts.
pub fn cache_and_tmp(cache_claim: Option<String>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let cache = match cache_claim {
        Some(claim_name) => Volume {
            name: "cache".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name,
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        },
        None => empty_dir("cache"),
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    };
    (
        vec![cache, empty_dir("tmp")],
        vec![mount("cache", CACHE_MOUNT_PATH), mount("tmp", "/tmp")],
    )
}

/// The container `name` running `imagegen <args>` from the runtime image on `model`'s GPUs,
/// with the store's credentials and the locked-down security context.
pub fn runtime_container(
    name: &str,
    config: &OperatorConfig,
    model: &ValidModel,
    args: Vec<String>,
    env: Vec<EnvVar>,
    mounts: Vec<VolumeMount>,
) -> Container {
    Container {
        name: name.into(),
        image: Some(config.runtime_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["imagegen".into()]),
        args: Some(args),
        env: Some(env),
        env_from: store_env_from(config, &model.name),
        resources: Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                model.gpu_resource_name.clone(),
                Quantity(model.gpus.to_string()),
            )])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(container_security_context()),
        ..Container::default()
    }
}

/// The pod of `container` on the nodes `model` runs on (its node selector and tolerations,
/// beside the other pods of a store that attaches to one node), with the operator's service
/// account and image pull Secrets, non-root.
pub fn runtime_pod(
    container: Container,
    volumes: Vec<Volume>,
    model: &ValidModel,
    config: &OperatorConfig,
    found: &Found,
) -> PodSpec {
    PodSpec {
        affinity: store_affinity(config, found),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: (!model.node_selector.is_empty()).then(|| model.node_selector.clone()),
        tolerations: (!model.tolerations.is_empty()).then(|| model.tolerations.clone()),
        service_account_name: config.service_account_name.clone(),
        image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
            config
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        security_context: Some(pod_security_context(config)),
        ..PodSpec::default()
    }
}

/// Checks a store path relative to the tenant's root with the runtime's own rule
/// ([`imagegen_crds::api::check_store_path`]), so that a resource never reaches another
/// tenant's files and never names a path the runtime would refuse.
pub fn check_store_path(field: &str, path: &str) -> Result<(), Error> {
    imagegen_crds::api::check_store_path(path).map_err(|reason| Error::InvalidStorePath {
        field: field.into(),
        path: path.into(),
        reason,
    })
}

/// Checks an upload id with the runtime's rule for names ([`imagegen_crds::api::check_name`]):
/// one path segment, so that it names a file of the tenant's `uploads/`.
pub fn check_upload_id(field: &str, id: &str) -> Result<(), Error> {
    imagegen_crds::api::check_name(id).map_err(|reason| Error::UnsupportedInput {
        field: field.into(),
        reason: format!("upload id: {reason}"),
    })
}

/// The volume `name` of `pod` (tests of the workloads that use these builders).
#[cfg(test)]
pub(crate) fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_stay_in_the_tenant() {
        for ok in ["a.png", "photos/2026/a.jpg", "uploads/x"] {
            assert!(check_store_path("images[0]", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " ",
            "/etc/passwd",
            "../other/a.png",
            "a/../../b",
            "a\\..\\b",
            "s3://bucket/x",
        ] {
            let err = check_store_path("image", bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidStorePath { field, .. } if field == "image"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn store_settings_only_when_configured() {
        let config = OperatorConfig::default();
        assert!(store_env(&config).is_empty());
        assert!(store_env_from(&config, "sd15").is_none());
        assert!(store_volume(&config).is_none());

        let config = OperatorConfig {
            store_url: Some("file:///store".into()),
            store_secret: Some("s3-creds".into()),
            store_claim: Some("imagegen-store".into()),
            ..OperatorConfig::default()
        };
        let env = store_env(&config);
        assert_eq!(env.len(), 1);
        assert_eq!(
            (env[0].name.as_str(), env[0].value.as_deref()),
            ("IMAGEGEN_STORE", Some("file:///store"))
        );
        // The copy in the model's namespace, not the operator's own Secret.
        let from = store_env_from(&config, "sd15").unwrap();
        assert_eq!(
            from[0].secret_ref.as_ref().unwrap().name,
            "sd15-runtime-env"
        );
        let (volume, mount) = store_volume(&config).unwrap();
        assert_eq!(
            volume.persistent_volume_claim.unwrap().claim_name,
            "imagegen-store"
        );
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            ("store", "/store")
        );
    }

    fn claim(spec: &[&str], bound: Option<&[&str]>) -> PersistentVolumeClaim {
        let modes = |m: &[&str]| Some(m.iter().map(|m| m.to_string()).collect());
        PersistentVolumeClaim {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("store".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
                access_modes: modes(spec),
                ..Default::default()
            }),
            status: bound.map(
                |b| k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
                    access_modes: modes(b),
                    ..Default::default()
                },
            ),
        }
    }

    #[test]
    fn only_read_write_many_spans_nodes() {
        assert!(!claim_spans_nodes(&claim(&["ReadWriteOnce"], None)));
        assert!(claim_spans_nodes(&claim(&["ReadWriteMany"], None)));
        // Bound to a volume that grants more than was asked.
        assert!(claim_spans_nodes(&claim(
            &["ReadWriteOnce"],
            Some(&["ReadWriteOnce", "ReadWriteMany"])
        )));
        assert!(!claim_spans_nodes(&claim(&["ReadOnlyMany"], None)));
        assert!(claim_unshareable(&claim(&["ReadWriteOncePod"], None))
            .is_some_and(|why| why.contains("ReadWriteOncePod")));
        assert!(claim_unshareable(&claim(&["ReadWriteOnce"], None)).is_none());
    }

    #[test]
    fn several_replicas_need_a_store_that_spans_nodes() {
        let why = store_unfit_for_replicas("imagegen-store", true, 3).unwrap();
        assert!(why.contains("replicas.max is 3") && why.contains("imagegen-store"));
        assert!(why.contains("S3") && why.contains("ReadWriteMany"), "{why}");
        assert_eq!(store_unfit_for_replicas("imagegen-store", true, 1), None);
        assert_eq!(store_unfit_for_replicas("imagegen-store", false, 3), None);
    }

    #[test]
    fn a_one_node_store_places_pods_beside_each_other() {
        let config = OperatorConfig {
            store_claim: Some("imagegen-store".into()),
            ..OperatorConfig::default()
        };
        assert_eq!(
            store_labels(&config)
                .get(STORE_CLAIM_LABEL)
                .map(String::as_str),
            Some("imagegen-store")
        );
        assert!(store_affinity(&config, &Found::default()).is_none());
        let found = Found {
            store_on_one_node: true,
            ..Found::default()
        };
        let affinity = store_affinity(&config, &found).unwrap();
        let terms = affinity
            .pod_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(
            terms[0].label_selector.as_ref().unwrap().match_labels,
            Some(store_labels(&config))
        );
        // No claim (an S3 store): nothing to place.
        assert!(store_affinity(&OperatorConfig::default(), &found).is_none());
    }
}
