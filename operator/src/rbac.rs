//! What the operator does through the Kubernetes API, as RBAC grants: the one list the
//! Helm chart's ClusterRole and Role must equal (`operator/tests/chart.rs` checks it). Each
//! entry names the code that needs it; a new API call in the controllers needs a line here.

/// A grant: API group, resources, verbs.
pub type Rule = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

/// Cluster-wide (the custom resources and their children live in every tenant namespace).
pub const CLUSTER_RULES: &[Rule] = &[
    // Controllers watch the three kinds; finalizers are added and removed by patches.
    (
        "imagegen.dev",
        &["imagegenerations", "loratrainings", "diffusionmodels"],
        &["get", "list", "watch", "patch"],
    ),
    // ttlSecondsAfterFinished deletes finished ImageGenerations.
    ("imagegen.dev", &["imagegenerations"], &["delete"]),
    // Status is written through the status subresource only.
    (
        "imagegen.dev",
        &[
            "imagegenerations/status",
            "loratrainings/status",
            "diffusionmodels/status",
        ],
        &["get", "patch"],
    ),
    // The queue autoscaler sets a model's replica count through its scale subresource, as
    // `kubectl scale` and an HPA do.
    ("imagegen.dev", &["diffusionmodels/scale"], &["patch"]),
    // Children carry owner references with blockOwnerDeletion, which the API server allows
    // only to who may update the owner's finalizers.
    (
        "imagegen.dev",
        &[
            "imagegenerations/finalizers",
            "loratrainings/finalizers",
            "diffusionmodels/finalizers",
        ],
        &["update"],
    ),
    // A model's Deployment and Service are owned (watched) and server-side applied, as is
    // its cache claim; applying an absent object creates it. Garbage collection deletes them.
    (
        "apps",
        &["deployments"],
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "",
        &["services"],
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", &["persistentvolumeclaims"], &["get", "create", "patch"]),
    // A training's Job, owned and applied.
    (
        "batch",
        &["jobs"],
        &["get", "list", "watch", "create", "patch"],
    ),
    // The EndpointSlices of the models' Services, watched: which runtime pod a generation
    // goes to (runtime_pods.rs).
    ("discovery.k8s.io", &["endpointslices"], &["list", "watch"]),
    // The runtime-auth and progress-token Secrets: created once, read back by name. The
    // runtime environment and signing Secrets: read by name in the operator's namespace,
    // their copies in the models' namespaces applied (secret_copies.rs). Never listed or
    // watched: the operator cannot enumerate a namespace's secrets.
    ("", &["secrets"], &["get", "create", "patch"]),
    // One event per transition (kube's Recorder).
    ("events.k8s.io", &["events"], &["create", "patch"]),
];

/// In the operator's own namespace: the leader-election Lease (read, created, renewed by
/// replacing it).
pub const LEASE_RULE: Rule = (
    "coordination.k8s.io",
    &["leases"],
    &["get", "create", "update"],
);
