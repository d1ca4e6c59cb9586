//! `imagegen serve` configuration: flags, then environment variables, then a YAML file, in
//! that order of precedence (clap reads a flag or its variable; the file fills what neither
//! gave; built-in defaults last).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use imagegen_crds::generation::{MAX_COUNT, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS};
use serde::Deserialize;

use imagegen_engine::safety::SafetyPolicy;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_QUEUE_SIZE: usize = 16;
pub const DEFAULT_BATCH_LIMIT: u32 = 4;
/// The longest batching window: beyond it, waiting costs more than batching gains.
const MAX_BATCH_WINDOW_MS: u32 = 1000;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
pub const DEFAULT_RESULT_TTL_SECONDS: u64 = 24 * 3600;
pub const DEFAULT_LORA_CACHE_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_DEADLINE_SECONDS: u32 = 600;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// A local diffusers folder or a hub id (owner/name[@revision]).
    #[arg(long, env = "IMAGEGEN_MODEL")]
    pub model: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "IMAGEGEN_LISTEN")]
    pub listen: Option<String>,
    /// A YAML file with any of the settings (camelCase keys); flags and environment
    /// variables take precedence over it.
    #[arg(long, env = "IMAGEGEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Serve a non-loopback address without bearer tokens.
    #[arg(long)]
    pub insecure: bool,
    /// f32, f16 or bf16 [default: f16 on cuda, f32 on cpu].
    #[arg(long, env = "IMAGEGEN_DTYPE")]
    pub dtype: Option<String>,
    /// cpu, cuda, cuda:N or auto [default: auto].
    #[arg(long, env = "IMAGEGEN_DEVICE")]
    pub device: Option<String>,
    /// file:///abs/dir or s3://bucket/prefix [default: file://$PWD/imagegen-store].
    #[arg(long, env = "IMAGEGEN_STORE")]
    pub store: Option<String>,
    /// One `tenant:token` per line; `#` comments.
    #[arg(long, env = "IMAGEGEN_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// `tenant:token,tenant2:token2`.
    #[arg(long, env = "IMAGEGEN_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,
    /// block, blur or off [default: block].
    #[arg(long, env = "IMAGEGEN_SAFETY")]
    pub safety: Option<String>,
    /// A safety checker folder or hub id, for models without one.
    #[arg(long, env = "IMAGEGEN_SAFETY_CHECKER")]
    pub safety_checker: Option<String>,
    /// Most jobs waiting for the worker; more get 429 [default: 16].
    #[arg(long, env = "IMAGEGEN_QUEUE_SIZE")]
    pub queue_size: Option<usize>,
    /// Most images in one UNet batch: compatible queued text-to-image requests (same size,
    /// steps, scheduler, guidance, clip skip and LoRAs) run together [default: 4; 1 = off].
    #[arg(long, env = "IMAGEGEN_BATCH_LIMIT")]
    pub batch_limit: Option<u32>,
    /// Milliseconds the worker waits for compatible requests to fill a batch that has
    /// room, before it starts (at most 1000) [default: 0, start at once].
    #[arg(long, env = "IMAGEGEN_BATCH_WINDOW_MS")]
    pub batch_window_ms: Option<u32>,
    /// Seconds a result (image, upload, finished job) is kept [default: 86400].
    #[arg(long, env = "IMAGEGEN_RESULT_TTL")]
    pub result_ttl: Option<u64>,
    /// A deployment's own style presets, added to the built-in ones.
    #[arg(long, env = "IMAGEGEN_STYLES")]
    pub styles_file: Option<PathBuf>,
    /// Secret that signs webhook bodies (HMAC-SHA256).
    #[arg(long, env = "IMAGEGEN_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Hosts (host or host:port) webhooks may be sent to, comma separated.
    #[arg(long, env = "IMAGEGEN_WEBHOOK_HOSTS", value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,
    /// Hosts input images may be fetched from by URL, comma separated.
    #[arg(long, env = "IMAGEGEN_URL_HOSTS", value_delimiter = ',')]
    pub url_hosts: Vec<String>,
    /// PEM certificate chain for C2PA manifests.
    #[arg(long, env = "IMAGEGEN_C2PA_CERT")]
    pub c2pa_cert: Option<PathBuf>,
    /// PEM private key for C2PA manifests.
    #[arg(long, env = "IMAGEGEN_C2PA_KEY")]
    pub c2pa_key: Option<PathBuf>,
    /// Key that signs the image URLs of the OpenAI-compatible endpoints (fetchable without
    /// a token until the result expires); replicas behind one Service need the same key
    /// [default: random per process].
    #[arg(long, env = "IMAGEGEN_URL_SIGNING_KEY", hide_env_values = true)]
    pub url_signing_key: Option<String>,
    /// The CLIPSeg folder or hub id that finds masks from `maskPrompt`.
    #[arg(long, env = "IMAGEGEN_MASK_MODEL")]
    pub mask_model: Option<String>,
    /// A Canny ControlNet folder or hub id for `strategy: canny`, loaded on the first such
    /// request; without one, those requests are refused.
    #[arg(long, env = "IMAGEGEN_CONTROLNET")]
    pub controlnet: Option<String>,
    /// An SDXL refiner folder or hub id, loaded at start: text-to-image requests hand over
    /// to it at their `highNoiseFraction` (default 0.8).
    #[arg(long, env = "IMAGEGEN_REFINER")]
    pub refiner: Option<String>,
    /// The family the model must be (sd15, sd2 or sdxl): the service refuses to start
    /// with a model of another. Default: whatever model_index.json says.
    #[arg(long, env = "IMAGEGEN_FAMILY")]
    pub family: Option<String>,
    /// Largest request body in bytes [default: 32 MiB].
    #[arg(long, env = "IMAGEGEN_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
}

/// The YAML file: every setting, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub model: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub insecure: Option<bool>,
    pub queue_size: Option<usize>,
    pub batch_limit: Option<u32>,
    pub batch_window_ms: Option<u32>,
    #[serde(default)]
    pub limits: FileLimits,
    /// tenant → token.
    #[serde(default)]
    pub tokens: BTreeMap<String, String>,
    pub tokens_file: Option<PathBuf>,
    pub store: Option<String>,
    pub result_ttl_seconds: Option<u64>,
    pub safety: Option<String>,
    pub safety_checker: Option<String>,
    pub styles_file: Option<PathBuf>,
    pub c2pa_cert: Option<PathBuf>,
    pub c2pa_key: Option<PathBuf>,
    pub webhook_secret: Option<String>,
    #[serde(default)]
    pub webhook_hosts: Vec<String>,
    #[serde(default)]
    pub url_hosts: Vec<String>,
    pub lora_cache_bytes: Option<u64>,
    pub default_deadline_seconds: Option<u32>,
    pub mask_model: Option<String>,
    pub controlnet: Option<String>,
    pub refiner: Option<String>,
    pub family: Option<String>,
    pub url_signing_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileLimits {
    pub max_body_bytes: Option<u64>,
    pub max_pixels: Option<u64>,
    pub max_prompt_chars: Option<u32>,
    pub max_steps: Option<u32>,
    pub max_count: Option<u32>,
    pub max_side: Option<u32>,
}

/// Request limits; each is at most the engine's own.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_pixels: u64,
    pub max_prompt_chars: u32,
    pub max_steps: u32,
    pub max_count: u32,
    pub max_side: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_pixels: imagegen_engine::image::input::ImageLimits::default().max_pixels,
            max_prompt_chars: MAX_PROMPT_CHARS,
            max_steps: MAX_STEPS,
            max_count: MAX_COUNT,
            max_side: MAX_SIDE,
        }
    }
}

impl Limits {
    pub fn image_limits(&self) -> imagegen_engine::image::input::ImageLimits {
        imagegen_engine::image::input::ImageLimits {
            max_bytes: self.max_body_bytes,
            max_pixels: self.max_pixels,
        }
    }
}

/// Everything the service runs with, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub model: String,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub insecure: bool,
    pub queue_size: usize,
    /// Most images per UNet batch (1: no batching).
    pub batch_limit: u32,
    /// How long a batch with room waits for compatible requests.
    pub batch_window: std::time::Duration,
    pub limits: Limits,
    /// Token → tenant: a tenant may have several tokens (its clients', the operator's).
    pub tokens: BTreeMap<String, String>,
    pub store: String,
    pub result_ttl_seconds: u64,
    pub safety: SafetyPolicy,
    pub safety_checker: Option<String>,
    pub styles_file: Option<PathBuf>,
    pub c2pa: Option<(PathBuf, PathBuf)>,
    pub webhook_secret: Option<String>,
    pub webhook_hosts: Vec<String>,
    pub url_hosts: Vec<String>,
    pub lora_cache_bytes: u64,
    pub default_deadline_seconds: u32,
    pub mask_model: String,
    /// The ControlNet of `strategy: canny`, when the service has one.
    pub controlnet: Option<String>,
    /// The SDXL refiner text-to-image hands over to, when the service has one.
    pub refiner: Option<String>,
    /// The family the model must be, when the service was told one.
    pub family: Option<imagegen_engine::Family>,
    pub url_signing_key: String,
}

/// Parses `tenant:token` lines (a tokens file) or comma-separated pairs (the env variable)
/// into `tokens` (token → tenant). A tenant may appear several times; one token given to two
/// tenants is an error, since a request could not be told apart.
pub fn parse_tokens(
    tokens: &mut BTreeMap<String, String>,
    text: &str,
    separator: char,
    origin: &str,
) -> Result<(), String> {
    for (number, entry) in text.split(separator).enumerate() {
        let entry = entry.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let Some((tenant, token)) = entry.split_once(':') else {
            return Err(format!(
                "{origin}: entry {} is not tenant:token",
                number + 1
            ));
        };
        let (tenant, token) = (tenant.trim(), token.trim());
        check_tenant(tenant).map_err(|e| format!("{origin}: {e}"))?;
        if token.len() < 8 {
            return Err(format!(
                "{origin}: the token of tenant `{tenant}` is shorter than 8 characters"
            ));
        }
        match tokens.get(token) {
            Some(other) if other != tenant => {
                return Err(format!(
                    "{origin}: one token is given to both tenant `{other}` and `{tenant}`"
                ))
            }
            _ => {
                tokens.insert(token.to_string(), tenant.to_string());
            }
        }
    }
    Ok(())
}

/// Tenants name store folders: a DNS label's characters only.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let valid = !tenant.is_empty()
        && tenant.len() <= 63
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "tenant `{tenant}` must be 1-63 characters of a-z, 0-9, - and _"
        ))
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_tokens_file(tokens: &mut BTreeMap<String, String>, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_tokens(tokens, &text, '\n', &path.display().to_string())
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Config {
    /// Merges flags/env with the YAML file and checks the result; errors are one line.
    pub fn resolve(args: &ServeArgs) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let listen_text = args
            .listen
            .clone()
            .or(file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| format!("invalid listen address `{listen_text}` (expected IP:PORT)"))?;
        let model = args.model.clone().or(file.model.clone()).ok_or(
            "no model: give --model, IMAGEGEN_MODEL or `model` in the config file".to_string(),
        )?;
        // Tokens: the flag/env pair list and the tokens file both count (in a cluster the
        // operator's token comes in the file, clients' in the env); the YAML's map and file
        // are used when neither flag nor env gave any.
        let mut tokens = BTreeMap::new();
        let tokens_file = args.tokens_file.clone().or(file.tokens_file.clone());
        if let Some(path) = &tokens_file {
            read_tokens_file(&mut tokens, path)?;
        }
        if let Some(list) = &args.tokens {
            // Commas, or lines as in a tokens file.
            parse_tokens(
                &mut tokens,
                &list.replace('\n', ","),
                ',',
                "IMAGEGEN_TOKENS",
            )?;
        }
        if args.tokens.is_none() && args.tokens_file.is_none() {
            for (tenant, token) in &file.tokens {
                parse_tokens(
                    &mut tokens,
                    &format!("{tenant}:{token}"),
                    ',',
                    "config tokens",
                )?;
            }
        }
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        if tokens.is_empty() && !is_loopback(&listen) && !insecure {
            return Err(format!(
                "refusing to serve {listen} without bearer tokens: give --tokens-file, \
                 IMAGEGEN_TOKENS or `tokens` in the config, or --insecure"
            ));
        }
        let safety = match args.safety.clone().or(file.safety.clone()) {
            Some(text) => text
                .parse()
                .map_err(|e: imagegen_engine::Error| e.to_string())?,
            None => SafetyPolicy::Block,
        };
        let store = match args.store.clone().or(file.store.clone()) {
            Some(url) => url,
            None => {
                let cwd = std::env::current_dir().map_err(|e| format!("current dir: {e}"))?;
                format!("file://{}", cwd.join("imagegen-store").display())
            }
        };
        let c2pa = match (
            args.c2pa_cert.clone().or(file.c2pa_cert.clone()),
            args.c2pa_key.clone().or(file.c2pa_key.clone()),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("C2PA signing needs both a certificate and a key".to_string()),
        };
        let fl = &file.limits;
        let defaults = Limits::default();
        let limits = Limits {
            max_body_bytes: args
                .max_body_bytes
                .or(fl.max_body_bytes)
                .unwrap_or(defaults.max_body_bytes),
            max_pixels: fl.max_pixels.unwrap_or(defaults.max_pixels),
            max_prompt_chars: fl
                .max_prompt_chars
                .unwrap_or(defaults.max_prompt_chars)
                .min(MAX_PROMPT_CHARS),
            max_steps: fl.max_steps.unwrap_or(defaults.max_steps).min(MAX_STEPS),
            max_count: fl.max_count.unwrap_or(defaults.max_count).min(MAX_COUNT),
            max_side: fl.max_side.unwrap_or(defaults.max_side).min(MAX_SIDE),
        };
        let queue_size = args
            .queue_size
            .or(file.queue_size)
            .unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_size == 0 {
            return Err("queue size must be at least 1".to_string());
        }
        let pick = |flag: &Vec<String>, file: &Vec<String>| {
            let list = if flag.is_empty() { file } else { flag };
            list.iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect::<Vec<_>>()
        };
        Ok(Config {
            listen,
            model,
            device: args.device.clone().or(file.device.clone()),
            dtype: args.dtype.clone().or(file.dtype.clone()),
            insecure,
            queue_size,
            batch_limit: args
                .batch_limit
                .or(file.batch_limit)
                .unwrap_or(DEFAULT_BATCH_LIMIT)
                .clamp(1, 64),
            batch_window: match args.batch_window_ms.or(file.batch_window_ms).unwrap_or(0) {
                ms if ms <= MAX_BATCH_WINDOW_MS => std::time::Duration::from_millis(ms.into()),
                ms => {
                    return Err(format!(
                        "batch window: {ms} ms is more than {MAX_BATCH_WINDOW_MS}"
                    ))
                }
            },
            limits,
            tokens,
            store,
            result_ttl_seconds: args
                .result_ttl
                .or(file.result_ttl_seconds)
                .unwrap_or(DEFAULT_RESULT_TTL_SECONDS),
            safety,
            safety_checker: args.safety_checker.clone().or(file.safety_checker.clone()),
            styles_file: args.styles_file.clone().or(file.styles_file.clone()),
            c2pa,
            webhook_secret: args.webhook_secret.clone().or(file.webhook_secret.clone()),
            webhook_hosts: pick(&args.webhook_hosts, &file.webhook_hosts),
            url_hosts: pick(&args.url_hosts, &file.url_hosts),
            lora_cache_bytes: file.lora_cache_bytes.unwrap_or(DEFAULT_LORA_CACHE_BYTES),
            default_deadline_seconds: file
                .default_deadline_seconds
                .unwrap_or(DEFAULT_DEADLINE_SECONDS),
            mask_model: args
                .mask_model
                .clone()
                .or(file.mask_model.clone())
                .unwrap_or_else(|| {
                    imagegen_engine::pipelines::mask_prompt::DEFAULT_MASK_MODEL.to_string()
                }),
            controlnet: args.controlnet.clone().or(file.controlnet.clone()),
            refiner: args.refiner.clone().or(file.refiner.clone()),
            family: args
                .family
                .clone()
                .or(file.family.clone())
                .map(|f| parse_family(&f))
                .transpose()?,
            url_signing_key: args
                .url_signing_key
                .clone()
                .or(file.url_signing_key.clone())
                .unwrap_or_else(super::jobs::random_id),
        })
    }
}

/// `sd15`, `sd2` (both load as SD) or `sdxl`, as a DiffusionModel names them.
fn parse_family(name: &str) -> Result<imagegen_engine::Family, String> {
    match name {
        "sd15" | "sd2" => Ok(imagegen_engine::Family::StableDiffusion),
        "sdxl" => Ok(imagegen_engine::Family::Sdxl),
        other => Err(format!("family: {other:?} is not one of sd15, sd2, sdxl")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(model: &str) -> ServeArgs {
        ServeArgs {
            model: Some(model.into()),
            ..Default::default()
        }
    }

    #[test]
    fn tokens_parse_with_comments_and_blank_lines() {
        let mut tokens = BTreeMap::new();
        parse_tokens(
            &mut tokens,
            "# team\n\nalice:secret-one\n bob : secret-two \nalice:secret-three\n",
            '\n',
            "f",
        )
        .unwrap();
        assert_eq!(tokens["secret-one"], "alice");
        assert_eq!(tokens["secret-two"], "bob");
        assert_eq!(
            tokens["secret-three"], "alice",
            "a tenant may have several tokens"
        );
        let mut fresh = BTreeMap::new();
        assert!(parse_tokens(&mut fresh, "alice", '\n', "f").is_err());
        assert!(parse_tokens(&mut fresh, "Alice:secret-one", '\n', "f").is_err());
        assert!(parse_tokens(&mut fresh, "alice:short", '\n', "f").is_err());
        let shared = parse_tokens(&mut tokens, "carol:secret-two", '\n', "f").unwrap_err();
        assert!(shared.contains("both tenant `bob` and `carol`"), "{shared}");
    }

    #[test]
    fn non_loopback_needs_tokens_or_insecure() {
        let mut a = args("m");
        a.listen = Some("0.0.0.0:8080".into());
        assert!(Config::resolve(&a)
            .unwrap_err()
            .contains("without bearer tokens"));
        a.insecure = true;
        assert!(Config::resolve(&a).is_ok());
        a.insecure = false;
        a.tokens = Some("a:12345678".into());
        assert!(Config::resolve(&a).is_ok());
        assert!(Config::resolve(&args("m")).is_ok(), "loopback runs open");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("imagegen-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            "model: from-file\nqueueSize: 3\nlisten: 127.0.0.1:9\nlimits:\n  maxSteps: 10\ntokens:\n  t1: abcdefgh\n",
        )
        .unwrap();
        let mut a = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = Config::resolve(&a).unwrap();
        assert_eq!(c.model, "from-file");
        assert_eq!(c.queue_size, 3);
        assert_eq!(c.limits.max_steps, 10);
        assert_eq!(c.tokens["abcdefgh"], "t1");
        a.model = Some("from-flag".into());
        a.queue_size = Some(5);
        let c = Config::resolve(&a).unwrap();
        assert_eq!((c.model.as_str(), c.queue_size), ("from-flag", 5));
        std::fs::write(&path, "modle: x\n").unwrap();
        assert!(Config::resolve(&a).unwrap_err().contains("modle"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
