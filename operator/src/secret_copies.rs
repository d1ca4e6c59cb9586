//! Copies of the operator's Secrets in the namespaces of the models.
//!
//! The platform team puts the runtime environment (the store's credentials, extra tokens)
//! and the C2PA signing key in one Secret each, in the operator's namespace. Pods can only
//! use Secrets of their own namespace, so each DiffusionModel gets its own copy, owned by it
//! (garbage-collected with it) and refreshed at each reconciliation of the model. Anyone who
//! may read Secrets in a model's namespace can read the copies: the pods there run with
//! their values anyway.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

/// Annotation of a copy: `<namespace>/<name>` of the Secret it copies.
pub const COPIED_FROM_ANNOTATION: &str = "imagegen.dev/copied-from";

/// A Secret to copy: its name in the operator's namespace and the copy's name in the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// Name of the Secret in the operator's namespace.
    pub source: String,
    /// Name of the copy in the model's namespace.
    pub copy: String,
}

impl CopyPlan {
    /// Whether the copy would be the source itself (a model in the operator's namespace
    /// whose copy's name is the source's): the pods then use the source as it is.
    pub fn is_source(&self, model_namespace: &str, operator_namespace: &str) -> bool {
        model_namespace == operator_namespace && self.copy == self.source
    }
}

/// The copies the model `model` needs under `config`: the runtime environment, the signing
/// key.
pub fn plans(config: &crate::OperatorConfig, model: &str) -> Vec<CopyPlan> {
    let env = config.store_secret.iter().map(|source| CopyPlan {
        source: source.clone(),
        copy: crate::workload::runtime_env_secret_name(model),
    });
    let c2pa = config.c2pa_secret.iter().map(|source| CopyPlan {
        source: source.clone(),
        copy: c2pa_secret_name(model),
    });
    env.chain(c2pa).collect()
}

/// The name of the copy of the C2PA signing Secret in the namespace of `model`.
pub fn c2pa_secret_name(model: &str) -> String {
    format!("{model}-c2pa")
}

/// The copy of `source` named `name` in `namespace`, owned by `owner`: the same type and
/// data, labelled as the operator's.
pub fn build_copy(
    source: &Secret,
    name: &str,
    namespace: &str,
    owner: &OwnerReference,
    labels: BTreeMap<String, String>,
) -> Secret {
    let from = format!(
        "{}/{}",
        source.metadata.namespace.as_deref().unwrap_or_default(),
        source.metadata.name.as_deref().unwrap_or_default()
    );
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(COPIED_FROM_ANNOTATION.into(), from)])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        // The API server returns `data` only (`stringData` is write-only).
        data: Some(source.data.clone().unwrap_or_default()),
        ..Secret::default()
    }
}

/// Whether `existing` already holds what `copy` would write (type and data).
pub fn up_to_date(existing: &Secret, copy: &Secret) -> bool {
    let data = |s: &Secret| s.data.clone().unwrap_or_default();
    existing.type_ == copy.type_ && data(existing) == data(copy)
}

/// SHA-256 (hex) of the copies' names, types and data, in the order given.
pub fn digest(copies: &[Secret]) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for copy in copies {
        field(copy.metadata.name.as_deref().unwrap_or_default().as_bytes());
        field(copy.type_.as_deref().unwrap_or_default().as_bytes());
        // A BTreeMap iterates in key order, so equal contents give equal digests.
        for (key, ByteString(value)) in copy.data.iter().flatten() {
            field(key.as_bytes());
            field(value);
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OperatorConfig;

    fn source(data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("imagegen-runtime-env".into()),
                namespace: Some("imagegen-system".into()),
                resource_version: Some("7".into()),
                uid: Some("source-uid".into()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "imagegen.dev/v1alpha1".into(),
            kind: "DiffusionModel".into(),
            name: "sd15".into(),
            uid: "model-uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn plans_follow_the_configured_secrets() {
        assert!(plans(&OperatorConfig::default(), "sd15").is_empty());
        let config = OperatorConfig {
            store_secret: Some("env".into()),
            c2pa_secret: Some("signing".into()),
            ..OperatorConfig::default()
        };
        let names: Vec<_> = plans(&config, "sd15")
            .into_iter()
            .map(|p| (p.source, p.copy))
            .collect();
        assert_eq!(
            names,
            [
                ("env".to_string(), "sd15-runtime-env".to_string()),
                ("signing".to_string(), "sd15-c2pa".to_string())
            ]
        );
    }

    #[test]
    fn a_copy_named_like_its_source_beside_it_is_the_source() {
        let plan = CopyPlan {
            source: "imagegen-runtime-env".into(),
            copy: crate::workload::runtime_env_secret_name("imagegen"),
        };
        assert!(plan.is_source("imagegen-system", "imagegen-system"));
        assert!(!plan.is_source("team-a", "imagegen-system"));
    }

    #[test]
    fn a_copy_has_the_data_and_the_owner_but_not_the_identity_of_its_source() {
        let src = source(&[("IMAGEGEN_TOKENS", "web:secret-token-0123")]);
        let copy = build_copy(
            &src,
            "sd15-runtime-env",
            "team-a",
            &owner(),
            BTreeMap::new(),
        );
        assert_eq!(copy.metadata.namespace.as_deref(), Some("team-a"));
        assert_eq!(copy.metadata.name.as_deref(), Some("sd15-runtime-env"));
        assert_eq!(copy.metadata.resource_version, None);
        assert_eq!(copy.metadata.uid, None);
        assert_eq!(copy.metadata.owner_references, Some(vec![owner()]));
        assert_eq!(
            copy.metadata.annotations.as_ref().unwrap()[COPIED_FROM_ANNOTATION],
            "imagegen-system/imagegen-runtime-env"
        );
        assert_eq!(copy.data, src.data);
        assert!(up_to_date(&copy, &copy));
    }

    #[test]
    fn the_digest_changes_with_any_value_and_only_then() {
        let copy =
            |data: &[(&str, &str)]| build_copy(&source(data), "c", "ns", &owner(), BTreeMap::new());
        let a = copy(&[("A", "1"), ("B", "2")]);
        assert_eq!(
            digest(std::slice::from_ref(&a)),
            digest(&[copy(&[("B", "2"), ("A", "1")])])
        );
        assert_ne!(
            digest(std::slice::from_ref(&a)),
            digest(&[copy(&[("A", "1"), ("B", "3")])])
        );
        // Keys and values do not run into each other.
        assert_ne!(
            digest(&[copy(&[("AB", "")])]),
            digest(&[copy(&[("A", "B")])])
        );
        assert!(!up_to_date(&a, &copy(&[("A", "1")])));
    }
}
