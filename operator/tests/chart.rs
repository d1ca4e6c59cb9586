//! The Helm chart as `helm template` renders it (scripts/chart-check.sh, one folder per values
//! file of charts/imagegen/ci/): every manifest is a valid typed object with no field its type
//! does not know, the CRDs are the generated ones, the RBAC is exactly what the operator needs
//! and the operator's environment is the one its flags read.
//!
//! The rendered folder comes from `IMAGEGEN_RENDERED_CHART` (scripts/test.sh sets it). Without
//! it the test renders the chart itself when chart-check.sh has already installed helm under
//! `$IMAGEGEN_CACHE/tools`, and fails otherwise: it never passes without having looked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use imagegen_crds::{DiffusionModel, ImageGeneration, LoraTraining};
use imagegen_operator::diffusion_model;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value;

/// The values sets chart-check.sh rendered, by folder name: one per
/// charts/imagegen/ci/*-values.yaml, and `e2e-kind` for tests/e2e/values-kind.yaml. Read from
/// the rendered folder (which the script empties first), so a new values file is tested too.
fn value_sets() -> Vec<String> {
    let dir = rendered_dir();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the rendered chart folder is readable")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let is_dir = entry.file_type().ok()?.is_dir();
            is_dir.then(|| entry.file_name().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    for expected in ["defaults", "e2e-kind"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{} lacks {expected}: run scripts/chart-check.sh",
            dir.display()
        );
    }
    names
}

/// The namespace chart-check.sh renders the release into.
const RELEASE_NAMESPACE: &str = "imagegen-system";

use imagegen_operator::rbac::{CLUSTER_RULES, LEASE_RULE};

/// Every environment variable the operator binary reads (contract, operator section).
const OPERATOR_ENV: &[&str] = &[
    "IMAGEGEN_OPERATOR_LISTEN",
    "IMAGEGEN_RUNTIME_IMAGE",
    "IMAGEGEN_IMAGE_PULL_POLICY",
    "IMAGEGEN_IMAGE_PULL_SECRETS",
    "IMAGEGEN_RUNTIME_SERVICE_ACCOUNT",
    "IMAGEGEN_STORE_URL",
    "IMAGEGEN_STORE_SECRET",
    "IMAGEGEN_STORE_CLAIM",
    "IMAGEGEN_OPERATOR_URL",
    "IMAGEGEN_SAFETY",
    "IMAGEGEN_C2PA_SECRET",
    "IMAGEGEN_UNREADY_GRACE_SECONDS",
    "IMAGEGEN_LORA_AFFINITY_SLACK",
    "IMAGEGEN_WATCH_NAMESPACE",
    "IMAGEGEN_LEASE_NAME",
    "POD_NAMESPACE",
    "POD_NAME",
];

/// Those the chart always sets.
const OPERATOR_ENV_ALWAYS: &[&str] = &[
    "IMAGEGEN_OPERATOR_LISTEN",
    "IMAGEGEN_RUNTIME_IMAGE",
    "IMAGEGEN_IMAGE_PULL_POLICY",
    "IMAGEGEN_STORE_URL",
    "IMAGEGEN_OPERATOR_URL",
    "IMAGEGEN_SAFETY",
    "IMAGEGEN_UNREADY_GRACE_SECONDS",
    "IMAGEGEN_LORA_AFFINITY_SLACK",
    "IMAGEGEN_LEASE_NAME",
    "POD_NAMESPACE",
    "POD_NAME",
];

fn repo_root() -> PathBuf {
    // Read when the test runs, not when it was built: a test binary reused from another
    // checkout carries that checkout's folder.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("the operator crate sits in the workspace")
        .to_path_buf()
}

/// The folder of rendered manifests, rendering it first when the environment names none.
fn rendered_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("IMAGEGEN_RENDERED_CHART") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("defaults").is_dir(),
                "IMAGEGEN_RENDERED_CHART={} holds no rendered chart: run scripts/chart-check.sh",
                dir.display()
            );
            return dir;
        }
        let cache = std::env::var_os("IMAGEGEN_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/imagegen")))
            .expect("neither IMAGEGEN_CACHE nor HOME is set");
        let has_helm = std::fs::read_dir(cache.join("tools"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| entry.path().join("bin/helm").is_file());
        assert!(
            has_helm,
            "no rendered chart: set IMAGEGEN_RENDERED_CHART to the folder scripts/chart-check.sh \
             writes (scripts/test.sh does), or run scripts/chart-check.sh once so that helm is \
             in {}/tools",
            cache.display()
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rendered-chart");
        let status = Command::new(repo_root().join("scripts/chart-check.sh"))
            .env("IMAGEGEN_CACHE", &cache)
            .env("IMAGEGEN_RENDERED_CHART", &dir)
            .status()
            .expect("scripts/chart-check.sh runs");
        assert!(status.success(), "scripts/chart-check.sh failed");
        dir
    })
}

/// One rendered document: the file it came from and its content.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable folder").path());
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn parse_documents(text: &str, file: &str) -> Vec<Doc> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| {
            let yaml = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
            serde_json::to_value(yaml).unwrap_or_else(|e| panic!("{file}: not JSON-like: {e}"))
        })
        .filter(|value| !value.is_null())
        .map(|value| Doc {
            file: file.to_string(),
            value,
        })
        .collect()
}

/// Every document rendered with the values file `values` (folder name).
fn documents(values: &str) -> Vec<Doc> {
    let dir = rendered_dir().join(values);
    assert!(dir.is_dir(), "{} was not rendered", dir.display());
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).expect("a rendered file is readable");
            let file = path
                .strip_prefix(rendered_dir())
                .unwrap_or(path)
                .display()
                .to_string();
            parse_documents(&text, &file)
        })
        .collect()
}

/// Nulls and empty objects or lists say nothing; the typed structs drop some of them.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// Where two values differ (the first few paths).
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                match (x.get(key), y.get(key)) {
                    (Some(v), Some(w)) => differences(v, w, &format!("{path}.{key}"), out),
                    (Some(_), None) => out.push(format!("{path}.{key}: unknown to the type")),
                    (None, Some(_)) => out.push(format!("{path}.{key}: added by the type")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Parses into `T` and checks that nothing was lost: a misspelt field, which the typed
/// structs would silently drop, fails here.
fn typed<T>(doc: &Doc) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let parsed: T = serde_json::from_value(doc.value.clone()).unwrap_or_else(|e| {
        panic!(
            "{}: {} {} does not parse: {e}",
            doc.file,
            doc.kind(),
            doc.name()
        )
    });
    let back = serde_json::to_value(&parsed).expect("a typed object serializes");
    let mut problems = Vec::new();
    differences(
        &normalized(&doc.value),
        &normalized(&back),
        "",
        &mut problems,
    );
    assert!(
        problems.is_empty(),
        "{}: {} {}:\n{}",
        doc.file,
        doc.kind(),
        doc.name(),
        problems.join("\n")
    );
    parsed
}

/// Checks a document against its kind's type; returns the kind.
fn check_typed(doc: &Doc) -> String {
    let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
    match (api_version, doc.kind()) {
        ("apps/v1", "Deployment") => drop(typed::<Deployment>(doc)),
        ("batch/v1", "Job") => drop(typed::<Job>(doc)),
        ("v1", "Service") => drop(typed::<Service>(doc)),
        ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(doc)),
        ("v1", "PersistentVolumeClaim") => drop(typed::<PersistentVolumeClaim>(doc)),
        ("v1", "Pod") => drop(typed::<Pod>(doc)),
        ("v1", "Secret") => drop(typed::<Secret>(doc)),
        ("v1", "ConfigMap") => drop(typed::<ConfigMap>(doc)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(doc)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(typed::<ClusterRoleBinding>(doc))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(doc)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(doc)),
        ("networking.k8s.io/v1", "NetworkPolicy") => drop(typed::<NetworkPolicy>(doc)),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            drop(typed::<CustomResourceDefinition>(doc))
        }
        ("imagegen.dev/v1alpha1", "DiffusionModel") => drop(typed::<DiffusionModel>(doc)),
        // The Prometheus Operator's type is not in k8s-openapi: its few fields are checked
        // by `service_monitor_scrapes_the_operator`.
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {}
        (api_version, kind) => panic!(
            "{}: {api_version} {kind} is not a kind this test knows",
            doc.file
        ),
    }
    doc.kind().to_string()
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn all_of<'a>(docs: &'a [Doc], kind: &'a str) -> impl Iterator<Item = &'a Doc> + 'a {
    docs.iter().filter(move |d| d.kind() == kind)
}

fn operator_deployment(docs: &[Doc]) -> Deployment {
    typed(find(docs, "Deployment", "imagegen-operator"))
}

fn operator_container(deployment: &Deployment) -> Container {
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the operator Deployment has a pod spec");
    assert_eq!(pod.containers.len(), 1, "one operator container");
    pod.containers[0].clone()
}

fn env_of(container: &Container) -> BTreeMap<String, Option<String>> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

#[test]
fn every_document_parses_into_its_type() {
    let mut kinds = BTreeSet::new();
    for values in &value_sets() {
        let docs = documents(values);
        for doc in &docs {
            kinds.insert(check_typed(doc));
            let namespaced = !matches!(
                doc.kind(),
                "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
            );
            assert_eq!(
                namespaced,
                !doc.namespace().is_empty(),
                "{}: {} {} namespace",
                doc.file,
                doc.kind(),
                doc.name()
            );
        }
        let mut seen = BTreeSet::new();
        for doc in &docs {
            let key = (doc.kind(), doc.namespace(), doc.name());
            assert!(seen.insert(key), "{values}: {key:?} rendered twice");
        }
    }
    // The values files between them render every template.
    for kind in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Pod",
        "Secret",
        "ConfigMap",
        "DiffusionModel",
        "CustomResourceDefinition",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "no values file renders a {kind}");
    }
}

#[test]
fn rendered_crds_are_the_generated_ones() {
    let generated: BTreeMap<String, CustomResourceDefinition> = imagegen_crds::crds()
        .into_iter()
        .map(|(_, crd)| (crd.metadata.name.clone().unwrap_or_default(), crd))
        .collect();
    for values in &value_sets() {
        let rendered: BTreeMap<String, CustomResourceDefinition> =
            all_of(&documents(values), "CustomResourceDefinition")
                .map(|doc| (doc.name().to_string(), typed(doc)))
                .collect();
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{values}"
        );
        for (name, crd) in &generated {
            assert!(
                &rendered[name] == crd,
                "{values}: {name} differs from the generated definition: run \
                 `cargo run -p imagegen-crds --bin crdgen -- charts/imagegen/crds`"
            );
        }
    }
}

/// (group, resource, verb) triples a set of rules grants, refusing wildcards.
fn grants(rules: &[PolicyRule], what: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{what}: unexpected rule {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "{what}: wildcard in {rule:?}"
                    );
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn expected_grants(rules: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    rules
        .iter()
        .flat_map(|(group, resources, verbs)| {
            resources.iter().flat_map(move |resource| {
                verbs
                    .iter()
                    .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
            })
        })
        .collect()
}

#[test]
fn rbac_is_exactly_what_the_operator_needs() {
    for values in &value_sets() {
        let docs = documents(values);
        let deployment = operator_deployment(&docs);
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let account = pod
            .service_account_name
            .expect("the operator runs under its own account");
        typed::<ServiceAccount>(find(&docs, "ServiceAccount", &account));

        let cluster_roles: Vec<ClusterRole> = all_of(&docs, "ClusterRole").map(typed).collect();
        assert_eq!(cluster_roles.len(), 1, "{values}: one ClusterRole");
        let granted = grants(
            cluster_roles[0].rules.as_deref().unwrap_or_default(),
            values,
        );
        let expected = expected_grants(CLUSTER_RULES);
        let missing: Vec<_> = expected.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&expected).collect();
        assert!(missing.is_empty(), "{values}: not granted: {missing:?}");
        assert!(extra.is_empty(), "{values}: granted beyond need: {extra:?}");
        let secrets: BTreeSet<&str> = granted
            .iter()
            .filter(|(g, r, _)| g.is_empty() && r == "secrets")
            .map(|(_, _, v)| v.as_str())
            .collect();
        // Read and written by name (the copies are applied): never listed or watched.
        assert_eq!(
            secrets,
            BTreeSet::from(["get", "create", "patch"]),
            "{values}: secrets are read by name, never listed"
        );

        let binding: ClusterRoleBinding = typed(
            all_of(&docs, "ClusterRoleBinding")
                .next()
                .expect("a ClusterRoleBinding"),
        );
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(
            Some(&binding.role_ref.name),
            cluster_roles[0].metadata.name.as_ref()
        );
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{values}");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, account);
        assert_eq!(subjects[0].namespace.as_deref(), Some(RELEASE_NAMESPACE));

        // The leader-election Role, in the operator's namespace; the test hook has its own.
        let roles: Vec<(String, Role)> = all_of(&docs, "Role")
            .filter(|d| d.value["metadata"]["annotations"]["helm.sh/hook"] != "test")
            .map(|d| (d.namespace().to_string(), typed(d)))
            .collect();
        assert_eq!(roles.len(), 1, "{values}: one Role for the operator");
        let (namespace, role) = &roles[0];
        assert_eq!(namespace, RELEASE_NAMESPACE);
        let leases = expected_grants(&[LEASE_RULE]);
        assert_eq!(
            grants(role.rules.as_deref().unwrap_or_default(), values),
            leases
        );
        let role_binding: RoleBinding = typed(
            all_of(&docs, "RoleBinding")
                .find(|d| d.value["metadata"]["annotations"]["helm.sh/hook"] != "test")
                .expect("a RoleBinding for leader election"),
        );
        assert_eq!(role_binding.role_ref.kind, "Role");
        assert_eq!(
            role_binding.role_ref.name,
            role.metadata.name.clone().unwrap()
        );
        let subjects = role_binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].name, account);
    }
}

#[test]
fn operator_environment_is_what_its_flags_read() {
    let known: BTreeSet<&str> = OPERATOR_ENV.iter().copied().collect();
    for values in &value_sets() {
        let docs = documents(values);
        let container = operator_container(&operator_deployment(&docs));
        let env = env_of(&container);
        for name in env.keys() {
            assert!(
                known.contains(name.as_str()),
                "{values}: {name} is no flag of imagegen-operator"
            );
        }
        for name in OPERATOR_ENV_ALWAYS {
            assert!(env.contains_key(*name), "{values}: {name} is not set");
        }
        for (name, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let var = container
                .env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .unwrap();
            let from = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
            assert_eq!(
                from.map(|f| f.field_path.as_str()),
                Some(field),
                "{values}: {name}"
            );
        }
        let value = |name: &str| env.get(name).cloned().flatten().unwrap_or_default();
        assert_eq!(value("IMAGEGEN_OPERATOR_LISTEN"), "0.0.0.0:8080");
        assert!(["block", "blur", "off"].contains(&value("IMAGEGEN_SAFETY").as_str()));

        // Training pods report progress to the operator's Service.
        let service: Service = typed(find(&docs, "Service", "imagegen-operator"));
        let port = service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
        assert_eq!(
            value("IMAGEGEN_OPERATOR_URL"),
            format!("http://imagegen-operator.{RELEASE_NAMESPACE}.svc:{port}")
        );

        // The store: a claim the chart renders for file:///store, a Secret for S3.
        let store = value("IMAGEGEN_STORE_URL");
        if store == "file:///store" {
            let claim = value("IMAGEGEN_STORE_CLAIM");
            if values == "e2e-kind" {
                // store.local.existingClaim: kind.sh creates and seeds it.
                assert_eq!(claim, "imagegen-e2e-store");
                assert!(all_of(&docs, "PersistentVolumeClaim").next().is_none());
            } else {
                typed::<PersistentVolumeClaim>(find(&docs, "PersistentVolumeClaim", &claim));
            }
        } else {
            assert!(store.starts_with("s3://"), "{values}: store {store}");
            assert!(!env.contains_key("IMAGEGEN_STORE_CLAIM"), "{values}");
            assert!(env.contains_key("IMAGEGEN_STORE_SECRET"), "{values}");
        }
        if let Some(Some(secret)) = env.get("IMAGEGEN_STORE_SECRET") {
            let rendered = docs
                .iter()
                .any(|d| d.kind() == "Secret" && d.name() == secret);
            assert!(
                rendered || values.ends_with("existing-secret"),
                "{values}: Secret {secret} is not rendered"
            );
        }
    }
}

#[test]
fn values_reach_the_operator_environment() {
    let env = |values: &str| {
        env_of(&operator_container(&operator_deployment(&documents(
            values,
        ))))
    };
    let get = |env: &BTreeMap<String, Option<String>>, name: &str| env.get(name).cloned().flatten();

    let defaults = env("defaults");
    assert_eq!(
        get(&defaults, "IMAGEGEN_RUNTIME_IMAGE").as_deref(),
        Some("ghcr.io/imagegen/imagegen:0.1.0")
    );
    assert_eq!(get(&defaults, "IMAGEGEN_SAFETY").as_deref(), Some("block"));
    assert!(!defaults.contains_key("IMAGEGEN_WATCH_NAMESPACE"));
    assert!(!defaults.contains_key("IMAGEGEN_STORE_SECRET"));
    assert!(!defaults.contains_key("IMAGEGEN_C2PA_SECRET"));

    let cpu = env("cpu");
    assert_eq!(
        get(&cpu, "IMAGEGEN_RUNTIME_IMAGE").as_deref(),
        Some("ghcr.io/imagegen/imagegen:0.1.0-cpu")
    );
    assert_eq!(get(&cpu, "IMAGEGEN_SAFETY").as_deref(), Some("off"));

    let s3 = env("s3-store");
    assert_eq!(
        get(&s3, "IMAGEGEN_C2PA_SECRET").as_deref(),
        Some("imagegen-c2pa")
    );
    assert_eq!(
        get(&s3, "IMAGEGEN_STORE_URL").as_deref(),
        Some("s3://imagegen/prod")
    );
    assert_eq!(
        get(&s3, "IMAGEGEN_IMAGE_PULL_SECRETS").as_deref(),
        Some("registry-credentials,mirror-credentials")
    );
    let s3_docs = documents("s3-store");
    let secret: Secret = typed(find(&s3_docs, "Secret", "imagegen-runtime-env"));
    let keys: BTreeSet<String> = secret.string_data.unwrap_or_default().into_keys().collect();
    for key in [
        "AWS_ENDPOINT",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(keys.contains(key), "s3-store: the Secret lacks {key}");
    }

    let auth = env("auth");
    assert_eq!(
        get(&auth, "IMAGEGEN_WATCH_NAMESPACE").as_deref(),
        Some("images")
    );
    assert_eq!(
        get(&auth, "IMAGEGEN_RUNTIME_SERVICE_ACCOUNT").as_deref(),
        Some("imagegen-runtime")
    );
    let auth_docs = documents("auth");
    let secret_name = get(&auth, "IMAGEGEN_STORE_SECRET").expect("auth: a runtime Secret");
    let secret: Secret = typed(find(&auth_docs, "Secret", &secret_name));
    let tokens = secret
        .string_data
        .unwrap_or_default()
        .remove("IMAGEGEN_TOKENS")
        .expect("auth: IMAGEGEN_TOKENS in the runtime Secret");
    // `tenant:token,tenant2:token2`, as the runtime reads it.
    let pairs: Vec<(&str, &str)> = tokens
        .split(',')
        .map(|pair| pair.split_once(':').expect("tenant:token"))
        .collect();
    assert_eq!(pairs.len(), 2, "{tokens}");
    assert_eq!(pairs[0].0, "backend");
    assert!(pairs.iter().all(|(t, k)| !t.is_empty() && k.len() >= 16));

    // An existing Secret is passed on as it is, and the chart renders none.
    let existing = env("auth-existing-secret");
    assert_eq!(
        get(&existing, "IMAGEGEN_STORE_SECRET").as_deref(),
        Some("imagegen-client-tokens")
    );
    assert!(all_of(&documents("auth-existing-secret"), "Secret")
        .next()
        .is_none());
}

#[test]
fn operator_pod_is_locked_down_and_probed() {
    for values in &value_sets() {
        let deployment = operator_deployment(&documents(values));
        let spec = deployment.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        let pod_security = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert!(pod_security.run_as_user.is_some_and(|uid| uid != 0));
        assert_eq!(
            pod_security
                .seccomp_profile
                .as_ref()
                .map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let container = operator_container(&deployment);
        let security = container
            .security_context
            .as_ref()
            .expect("securityContext");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        let port = container.ports.as_ref().unwrap()[0].clone();
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        for (probe, path) in [
            (&container.liveness_probe, "/healthz"),
            (&container.startup_probe, "/healthz"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("http".into()));
        }

        // The selector picks the operator's pods and never a runtime pod.
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert!(selector
            .iter()
            .all(|(k, v)| template_labels.get(k) == Some(v)));
        let runtime = diffusion_model::labels("imagegen");
        assert!(
            !selector.iter().all(|(k, v)| runtime.get(k) == Some(v)),
            "{values}: the operator's selector matches runtime pods"
        );
    }
    let replicas = |values| {
        operator_deployment(&documents(values))
            .spec
            .unwrap()
            .replicas
    };
    assert_eq!(replicas("defaults"), Some(1));
    assert_eq!(replicas("s3-store"), Some(2));
}

#[test]
fn network_policy_admits_only_the_operator_and_allowed_namespaces() {
    let docs = documents("network-policy");
    let operator_labels = operator_deployment(&docs)
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap();
    let policies: Vec<NetworkPolicy> = all_of(&docs, "NetworkPolicy").map(typed).collect();
    let namespaces: BTreeSet<String> = policies
        .iter()
        .map(|p| p.metadata.namespace.clone().unwrap())
        .collect();
    // The release's namespace and the model's.
    assert_eq!(
        namespaces,
        BTreeSet::from([RELEASE_NAMESPACE.to_string(), "images".to_string()])
    );
    for policy in &policies {
        let spec = policy.spec.as_ref().unwrap();
        // It selects what the operator labels runtime pods with, whatever the model.
        let selected = spec
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap();
        assert!(!selected.is_empty());
        for model in ["sd15", "another-model"] {
            let runtime = diffusion_model::labels(model);
            assert!(
                selected.iter().all(|(k, v)| runtime.get(k) == Some(v)),
                "{selected:?} does not select the runtime pods of {model}"
            );
        }
        assert!(
            !selected
                .iter()
                .all(|(k, v)| operator_labels.get(k) == Some(v)),
            "the policy selects the operator"
        );
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let ingress = spec.ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 1);
        let ports = ingress[0].ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(
            ports[0].port,
            Some(IntOrString::Int(diffusion_model::RUNTIME_PORT))
        );
        let peers = ingress[0].from.as_ref().unwrap();
        let mut namespaces_admitted = BTreeSet::new();
        let mut operator_admitted = false;
        for peer in peers {
            assert!(peer.ip_block.is_none());
            let namespace = peer
                .namespace_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .and_then(|l| l.get("kubernetes.io/metadata.name"))
                .expect("every peer names its namespace")
                .clone();
            match &peer.pod_selector {
                Some(pods) => {
                    let wanted = pods.match_labels.clone().unwrap_or_default();
                    assert!(!wanted.is_empty());
                    assert!(wanted
                        .iter()
                        .all(|(k, v)| operator_labels.get(k) == Some(v)));
                    assert_eq!(namespace, RELEASE_NAMESPACE);
                    operator_admitted = true;
                }
                None => {
                    namespaces_admitted.insert(namespace);
                }
            }
        }
        assert!(operator_admitted);
        assert_eq!(
            namespaces_admitted,
            BTreeSet::from(["backend".to_string(), "batch-jobs".to_string()])
        );
    }
    assert!(documents("defaults")
        .iter()
        .all(|d| d.kind() != "NetworkPolicy"));
}

/// A model rendered from values, as the operator's validation sees it.
fn validated(doc: &Doc) -> diffusion_model::ValidModel {
    let mut model: DiffusionModel = typed(doc);
    model.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    diffusion_model::validate(&model)
        .unwrap_or_else(|e| panic!("{}: the operator refuses {}: {e}", doc.file, doc.name()))
}

#[test]
fn models_from_values_take_the_chart_defaults() {
    let docs = documents("models");
    let sd15 = validated(find(&docs, "DiffusionModel", "sd15"));
    assert_eq!(sd15.namespace, RELEASE_NAMESPACE);
    assert_eq!(
        (sd15.gpus, sd15.gpu_resource_name.as_str()),
        (2, "nvidia.com/gpu")
    );
    assert_eq!(
        sd15.node_selector
            .get("nvidia.com/gpu.present")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(sd15.tolerations.len(), 1);
    let cache = sd15.cache.expect("the chart's cache default");
    assert_eq!(cache.size.0, "30Gi");
    assert_eq!(cache.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!((sd15.min_replicas, sd15.max_replicas), (1, 4));

    // A spec's own settings win.
    let sd21 = validated(find(&docs, "DiffusionModel", "sd21"));
    assert_eq!(sd21.namespace, "images");
    assert_eq!(
        (sd21.gpus, sd21.gpu_resource_name.as_str()),
        (1, "amd.com/gpu")
    );
    assert_eq!(sd21.node_selector.len(), 1);
    assert!(sd21.tolerations.is_empty());
    assert_eq!(sd21.cache.unwrap().size.0, "40Gi");

    // CPU: the slot resource, no GPU node selector, no cache claim.
    let cpu_docs = documents("cpu");
    let tiny = validated(find(&cpu_docs, "DiffusionModel", "tiny"));
    assert_eq!(tiny.gpu_resource_name, "imagegen.dev/cpu-slot");
    assert!(tiny.node_selector.is_empty() && tiny.tolerations.is_empty());
    assert!(tiny.cache.is_none());
    assert_eq!(tiny.model_arg, "/store/models/tiny-sd1");

    assert!(documents("defaults")
        .iter()
        .all(|d| d.kind() != "DiffusionModel"));
}

#[test]
fn helm_test_hook_generates_with_the_first_model() {
    let docs = documents("models");
    let hook = |kind| {
        all_of(&docs, kind)
            .find(|d| d.value["metadata"]["annotations"]["helm.sh/hook"] == "test")
            .unwrap_or_else(|| panic!("no test hook {kind}"))
    };
    let pod: Pod = typed(hook("Pod"));
    let config: ConfigMap = typed(hook("ConfigMap"));
    let role: Role = typed(hook("Role"));
    let manifest = config
        .data
        .unwrap_or_default()
        .remove("generation.yaml")
        .expect("the ImageGeneration manifest");
    let generation: ImageGeneration =
        serde_yaml::from_str(&manifest).expect("the hook's ImageGeneration parses");
    assert_eq!(generation.spec.model_ref.name, "sd15");
    assert_eq!(
        generation.metadata.namespace.as_deref(),
        role.metadata.namespace.as_deref()
    );
    assert_eq!(generation.spec.params.steps, Some(3));
    // The pod may create and watch ImageGenerations and delete its own, nothing else.
    let name = generation.metadata.name.clone().unwrap();
    let rules = role.rules.unwrap_or_default();
    let (named, open): (Vec<PolicyRule>, Vec<PolicyRule>) =
        rules.into_iter().partition(|r| r.resource_names.is_some());
    let granted = grants(&open, "test hook");
    assert_eq!(
        granted,
        expected_grants(&[(
            "imagegen.dev",
            &["imagegenerations"],
            &["create", "get", "list", "watch"]
        )])
    );
    assert_eq!(named.len(), 1);
    assert_eq!(
        named[0].resource_names.as_deref(),
        Some(&[name.clone()][..])
    );
    assert_eq!(named[0].verbs, ["delete"]);
    assert_eq!(
        named[0].resources.as_deref(),
        Some(&["imagegenerations".to_string()][..])
    );
    let spec = pod.spec.unwrap();
    let wait_args = spec.containers[0].args.clone().unwrap_or_default();
    assert!(wait_args.iter().any(|a| a.ends_with(&format!("/{name}"))));
    assert!(wait_args
        .iter()
        .any(|a| a == "--for=jsonpath={.status.phase}=Succeeded"));

    // No model, no test.
    assert!(documents("defaults")
        .iter()
        .all(|d| d.value["metadata"]["annotations"]["helm.sh/hook"] != "test"));
}

#[test]
fn uninstall_hook_releases_the_finalizers_as_the_operator() {
    let docs = documents("defaults");
    let doc = find(&docs, "Job", "imagegen-operator-uninstall");
    assert_eq!(
        doc.value["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    let job: Job = typed(doc);
    let template = job.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let pod = template.spec.unwrap();
    let deployment = operator_deployment(&docs);
    let operator_pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    // Its RBAC is the operator's: the release's ServiceAccount, still there before deletion.
    assert_eq!(pod.service_account_name, operator_pod.service_account_name);
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_deref(),
        Some(
            &[
                "imagegen-operator".to_string(),
                "release-finalizers".to_string()
            ][..]
        )
    );
    // The same Lease the replicas compete for, in the same namespace.
    let env = env_of(container);
    assert_eq!(
        env["IMAGEGEN_LEASE_NAME"],
        env_of(&operator_container(&deployment))["IMAGEGEN_LEASE_NAME"]
    );
    assert!(container
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "POD_NAMESPACE"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("metadata.namespace")));
    // Not an operator pod: the operator Service never routes progress reports to it.
    let service: Service = typed(find(&docs, "Service", "imagegen-operator"));
    let selector = service.spec.unwrap().selector.unwrap();
    assert!(selector.iter().any(|(k, v)| pod_labels.get(k) != Some(v)));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
}

#[test]
fn service_monitor_scrapes_the_operator() {
    let docs = documents("s3-existing-secret");
    let monitor = all_of(&docs, "ServiceMonitor")
        .next()
        .expect("a ServiceMonitor");
    let service: Service = typed(find(&docs, "Service", "imagegen-operator"));
    let selector = service.spec.unwrap().selector.unwrap();
    let wanted: BTreeMap<String, String> =
        serde_json::from_value(monitor.value["spec"]["selector"]["matchLabels"].clone())
            .expect("matchLabels");
    let service_labels = service.metadata.labels.unwrap();
    assert!(wanted.iter().all(|(k, v)| service_labels.get(k) == Some(v)));
    assert!(selector.iter().all(|(k, v)| wanted.get(k) == Some(v)));
    let endpoint = &monitor.value["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(monitor.value["metadata"]["labels"]["release"], "prometheus");
}

#[test]
fn e2e_manifests_are_valid_resources() {
    let dir = repo_root().join("tests/e2e/manifests");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in parse_documents(&text, &path.display().to_string()) {
            match doc.kind() {
                "ImageGeneration" => drop(typed::<ImageGeneration>(&doc)),
                "LoraTraining" => drop(typed::<LoraTraining>(&doc)),
                "DiffusionModel" => drop(typed::<DiffusionModel>(&doc)),
                other => panic!("{}: unexpected {other}", doc.file),
            }
        }
    }
}
