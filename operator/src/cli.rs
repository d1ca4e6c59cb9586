//! The flags of the `imagegen-operator` binary, each with its environment variable.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

use crate::OperatorConfig;

/// Kubernetes operator for imagegen: DiffusionModel, ImageGeneration and LoraTraining.
#[derive(Debug, Clone, Parser)]
#[command(name = "imagegen-operator", version)]
pub struct Args {
    /// Address of the health, metrics and progress endpoints.
    #[arg(long, env = "IMAGEGEN_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Image of imagegen's runtime, run by model replicas and training Jobs.
    #[arg(long, env = "IMAGEGEN_RUNTIME_IMAGE")]
    pub runtime_image: Option<String>,
    /// imagePullPolicy of runtime containers.
    #[arg(long, env = "IMAGEGEN_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: String,
    /// Secrets to pull the runtime image with (comma-separated).
    #[arg(long, env = "IMAGEGEN_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub image_pull_secrets: Vec<String>,
    /// Service account of runtime pods and training Jobs.
    #[arg(long, env = "IMAGEGEN_RUNTIME_SERVICE_ACCOUNT")]
    pub runtime_service_account: Option<String>,
    /// The runtime's store URL (file:///store or s3://bucket/prefix).
    #[arg(long, env = "IMAGEGEN_STORE_URL")]
    pub store_url: Option<String>,
    /// A Secret (in the operator's namespace) whose keys become environment variables of
    /// runtime pods and training Jobs; each model's namespace gets a copy.
    #[arg(long, env = "IMAGEGEN_STORE_SECRET")]
    pub store_secret: Option<String>,
    /// A PersistentVolumeClaim mounted at /store in runtime pods and training Jobs.
    #[arg(long, env = "IMAGEGEN_STORE_CLAIM")]
    pub store_claim: Option<String>,
    /// Base URL training pods report progress to (the operator's Service).
    #[arg(long, env = "IMAGEGEN_OPERATOR_URL")]
    pub operator_url: Option<String>,
    /// Safety policy of runtime pods.
    #[arg(long, env = "IMAGEGEN_SAFETY", value_parser = ["block", "blur", "off"])]
    pub safety_policy: Option<String>,
    /// A Secret (in the operator's namespace) with `tls.crt` and `tls.key` (PEM) that runtime
    /// pods sign images with (C2PA); each model's namespace gets a copy.
    #[arg(long, env = "IMAGEGEN_C2PA_SECRET")]
    pub c2pa_secret: Option<String>,
    /// Seconds the pod holding a job may stay not ready before the job is cancelled there
    /// and submitted to another pod.
    #[arg(long, env = "IMAGEGEN_UNREADY_GRACE_SECONDS", default_value_t = 60)]
    pub unready_grace_seconds: u64,
    /// Jobs more than the least-loaded pod that a pod with a request's LoRAs loaded may have
    /// and still get the request.
    #[arg(long, env = "IMAGEGEN_LORA_AFFINITY_SLACK", default_value_t = 2)]
    pub lora_affinity_slack: u64,
    /// Namespace to watch; empty: all namespaces.
    #[arg(long, env = "IMAGEGEN_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Name of the leader election Lease (in the namespace of POD_NAMESPACE).
    #[arg(long, env = "IMAGEGEN_LEASE_NAME", default_value = "imagegen-operator")]
    pub lease_name: String,
    /// Log format.
    #[arg(long, env = "IMAGEGEN_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
    /// Without a command: run the operator.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-shot commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Before the operator is uninstalled (the chart's pre-delete hook): stop every replica
    /// from reconciling, then remove the operator's finalizers from every ImageGeneration and
    /// LoraTraining, so that deleting them or their namespace never hangs. The objects stay.
    ReleaseFinalizers,
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
}

impl Args {
    /// The operator's settings; empty values (as a chart may set) count as unset.
    pub fn config(&self) -> OperatorConfig {
        let defaults = OperatorConfig::default();
        OperatorConfig {
            runtime_image: non_empty(&self.runtime_image).unwrap_or(defaults.runtime_image),
            image_pull_policy: self.image_pull_policy.clone(),
            image_pull_secrets: self
                .image_pull_secrets
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            service_account_name: non_empty(&self.runtime_service_account),
            store_url: non_empty(&self.store_url),
            store_secret: non_empty(&self.store_secret),
            store_claim: non_empty(&self.store_claim),
            operator_url: non_empty(&self.operator_url).unwrap_or(defaults.operator_url),
            safety_policy: non_empty(&self.safety_policy),
            c2pa_secret: non_empty(&self.c2pa_secret),
            unready_grace: std::time::Duration::from_secs(self.unready_grace_seconds),
            lora_affinity_slack: self.lora_affinity_slack,
            ..defaults
        }
    }

    /// The namespace to watch, `None` for all.
    pub fn watch_namespace(&self) -> Option<&str> {
        Some(self.watch_namespace.trim()).filter(|ns| !ns.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["imagegen-operator"]).unwrap();
        assert_eq!(args.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(args.lease_name, "imagegen-operator");
        assert_eq!(args.watch_namespace(), None);
        assert_eq!(args.config(), OperatorConfig::default());
    }

    #[test]
    fn flags_become_the_config() {
        let args = Args::try_parse_from([
            "imagegen-operator",
            "--listen",
            "127.0.0.1:9000",
            "--runtime-image",
            "reg/imagegen:2",
            "--image-pull-policy",
            "Always",
            "--image-pull-secrets",
            "a, b,",
            "--runtime-service-account",
            "runtime",
            "--store-url",
            "file:///store",
            "--store-secret",
            "",
            "--store-claim",
            "store",
            "--operator-url",
            "http://op:8080",
            "--safety-policy",
            "blur",
            "--c2pa-secret",
            "signing",
            "--watch-namespace",
            "team-a",
            "--unready-grace-seconds",
            "15",
            "--lora-affinity-slack",
            "0",
        ])
        .unwrap();
        let config = args.config();
        assert_eq!(config.runtime_image, "reg/imagegen:2");
        assert_eq!(config.image_pull_policy, "Always");
        assert_eq!(config.image_pull_secrets, ["a", "b"]);
        assert_eq!(config.service_account_name.as_deref(), Some("runtime"));
        assert_eq!(config.store_url.as_deref(), Some("file:///store"));
        assert_eq!(config.store_secret, None);
        assert_eq!(config.store_claim.as_deref(), Some("store"));
        assert_eq!(config.operator_url, "http://op:8080");
        assert_eq!(config.safety_policy.as_deref(), Some("blur"));
        assert_eq!(config.c2pa_secret.as_deref(), Some("signing"));
        assert_eq!(args.watch_namespace(), Some("team-a"));
        assert_eq!(config.unready_grace, std::time::Duration::from_secs(15));
        assert_eq!(config.lora_affinity_slack, 0);
        assert_eq!(args.listen.port(), 9000);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            ["imagegen-operator", "--safety-policy", "maybe"],
            ["imagegen-operator", "--image-pull-policy", "Sometimes"],
            ["imagegen-operator", "--listen", "nowhere"],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
