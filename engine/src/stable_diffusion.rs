//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and the scheduler
//! config, on one device in one dtype.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{nn::VarStore, Device, Kind};

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::safety_checker::{SafetyCheckerConfig, StableDiffusionSafetyChecker};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{legacy_name, AutoencoderKL, VaeConfig};
use crate::safety::{Safety, SafetyChecker, SafetyPolicy};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::source::{self, Hub};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{load_var_store, weight_files};

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    /// A local diffusers folder or a hub id (`owner/name[@revision]`).
    pub model: String,
    pub device: Device,
    pub dtype: Kind,
    /// What to do with images the safety checker flags [default: block].
    pub safety: SafetyPolicy,
    /// A safety checker folder or hub id, for models without a `safety_checker/` folder
    /// (or to use another one). Unused with [`SafetyPolicy::Off`].
    pub safety_checker: Option<String>,
    /// Where hub ids are fetched from; without one, `model` and `safety_checker` must be
    /// local folders.
    pub hub: Option<Arc<dyn Hub>>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("model", &self.model)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("safety", &self.safety)
            .field("safety_checker", &self.safety_checker)
            .field("hub", &self.hub.is_some())
            .finish()
    }
}

impl LoadOptions {
    /// CPU, float32, safety policy [`SafetyPolicy::Block`] with the model's own checker, and
    /// no hub.
    pub fn new(model: impl Into<String>) -> Self {
        LoadOptions {
            model: model.into(),
            device: Device::Cpu,
            dtype: Kind::Float,
            safety: SafetyPolicy::default(),
            safety_checker: None,
            hub: None,
        }
    }
}

/// A device by name: `cpu`, `cuda`, `cuda:N` or `auto` (also what none means: CUDA when this
/// machine has it, else the CPU). `setting` names where the text came from in the error
/// (`--device` on the command line).
pub fn parse_device(text: Option<&str>, setting: &str) -> std::result::Result<Device, String> {
    match text {
        None | Some("auto") => Ok(Device::cuda_if_available()),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Ok(Device::Cuda(0)),
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Ok(Device::Cuda(index)),
            _ => Err(format!(
                "invalid {setting} `{other}` (expected cpu, cuda, cuda:N or auto)"
            )),
        },
    }
}

/// A dtype by name (`f32`, `f16`, `bf16`); none means f16 on CUDA and f32 on the CPU.
pub fn parse_dtype(
    text: Option<&str>,
    device: Device,
    setting: &str,
) -> std::result::Result<Kind, String> {
    match text {
        None if device.is_cuda() => Ok(Kind::Half),
        None => Ok(Kind::Float),
        Some("f32" | "fp32" | "float32") => Ok(Kind::Float),
        Some("f16" | "fp16" | "float16") => Ok(Kind::Half),
        Some("bf16" | "bfloat16") => Ok(Kind::BFloat16),
        Some(other) => Err(format!(
            "invalid {setting} `{other}` (expected f32, f16 or bf16)"
        )),
    }
}

/// An error unless the device is the CPU or a CUDA device this machine has (checked before
/// a slow model load that would fail late).
pub fn check_device(device: Device, setting: &str) -> std::result::Result<(), String> {
    if let Device::Cuda(index) = device {
        if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
            return Err(format!(
                "{setting} cuda:{index} is not available on this machine"
            ));
        }
    }
    Ok(())
}

/// A component with the VarStore that owns its weights (kept for LoRA and training).
pub struct Loaded<M> {
    pub model: M,
    pub vars: VarStore,
}

fn no_alias(_: &str) -> Option<String> {
    None
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that the
/// checkpoints on the hub (and our module paths) have: accept both.
fn clip_alias(name: &str) -> Option<String> {
    name.strip_prefix("text_model.").map(String::from)
}

/// Weight files of a component: the fp16 variant first when computing in half precision,
/// the full-precision files first otherwise; either is accepted when it is all there is.
fn component_weights(dir: &Path, stem: &str, dtype: Kind) -> Result<Vec<PathBuf>> {
    let order: [Option<&str>; 2] = if matches!(dtype, Kind::Half | Kind::BFloat16) {
        [Some("fp16"), None]
    } else {
        [None, Some("fp16")]
    };
    let mut first_err = None;
    for variant in order {
        match weight_files(dir, stem, variant) {
            Ok(files) => return Ok(files),
            Err(e @ Error::PickleRefused { .. }) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("two attempts were made"))
}

fn new_var_store(device: Device, dtype: Kind) -> VarStore {
    let mut vars = VarStore::new(device);
    vars.set_kind(dtype);
    vars
}

fn finish(mut vars: VarStore) -> VarStore {
    vars.freeze();
    vars
}

pub fn load_text_encoder(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<ClipTextModel>> {
    let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let vars = new_var_store(device, dtype);
    let model = ClipTextModel::new(vars.root(), &config);
    load_var_store(&vars, &component_weights(dir, "model", dtype)?, clip_alias)?;
    Ok(Loaded {
        model,
        vars: finish(vars),
    })
}

pub fn load_unet(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<UNet2DConditionModel>> {
    let config_path = dir.join("config.json");
    let config = UNetConfig::from_file(&config_path)?;
    let vars = new_var_store(device, dtype);
    let model = UNet2DConditionModel::new(vars.root(), config, &config_path)?;
    load_var_store(
        &vars,
        &component_weights(dir, "diffusion_pytorch_model", dtype)?,
        no_alias,
    )?;
    Ok(Loaded {
        model,
        vars: finish(vars),
    })
}

/// A ControlNet folder (`config.json` and `diffusion_pytorch_model[.fp16].safetensors`).
pub fn load_controlnet(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<ControlNetModel>> {
    let config_path = dir.join("config.json");
    let config = ControlNetConfig::from_file(&config_path)?;
    let vars = new_var_store(device, dtype);
    let model = ControlNetModel::new(vars.root(), config, &config_path)?;
    load_var_store(
        &vars,
        &component_weights(dir, "diffusion_pytorch_model", dtype)?,
        no_alias,
    )?;
    Ok(Loaded {
        model,
        vars: finish(vars),
    })
}

pub fn load_vae(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<AutoencoderKL>> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let vars = new_var_store(device, dtype);
    let model = AutoencoderKL::new(vars.root(), config);
    load_var_store(
        &vars,
        &component_weights(dir, "diffusion_pytorch_model", dtype)?,
        legacy_name,
    )?;
    Ok(Loaded {
        model,
        vars: finish(vars),
    })
}

/// transformers 5 saves the safety checker's vision tower as `vision_model.…`, the
/// checkpoints on the hub have `vision_model.vision_model.…`: accept both.
fn safety_checker_alias(name: &str) -> Option<String> {
    name.strip_prefix("vision_model.vision_model.")
        .map(|rest| format!("vision_model.{rest}"))
}

/// A safety checker folder (transformers layout: `config.json` and
/// `model[.fp16].safetensors`), as in a model's `safety_checker/`.
pub fn load_safety_checker(
    dir: &Path,
    device: Device,
    dtype: Kind,
) -> Result<Loaded<StableDiffusionSafetyChecker>> {
    let config = SafetyCheckerConfig::from_file(&dir.join("config.json"))?;
    let vars = new_var_store(device, dtype);
    let model = StableDiffusionSafetyChecker::new(vars.root(), &config);
    load_var_store(
        &vars,
        &component_weights(dir, "model", dtype)?,
        safety_checker_alias,
    )?;
    Ok(Loaded {
        model,
        vars: finish(vars),
    })
}

/// A text-to-image model ready to run.
pub struct StableDiffusion {
    /// What the user named (folder or hub id), recorded in image metadata.
    pub name: String,
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Loaded<ClipTextModel>,
    pub unet: Loaded<UNet2DConditionModel>,
    pub vae: Loaded<AutoencoderKL>,
    /// The VAE runs in float32 when the config asks for it in half precision
    /// (`force_upcast`, as diffusers does: SD's VAE overflows in fp16).
    pub vae_dtype: Kind,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    pub device: Device,
    pub dtype: Kind,
    /// The safety policy applied to every output of `generate`, with its checker.
    pub safety: Safety,
}

impl StableDiffusion {
    /// Loads the model and the safety checker its policy needs: the one named in the
    /// options, else the model's `safety_checker/` folder. A policy other than `Off`
    /// without a checker is an error, raised before the model's weights are read.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let half = matches!(options.dtype, Kind::Half | Kind::BFloat16);
        let variant = half.then_some("fp16");
        let own_checker = options.safety.needs_checker() && options.safety_checker.is_none();
        let hub = options.hub.as_deref();
        let dir = source::resolve(&options.model, hub, variant, own_checker)?;
        let checker_dir = match (&options.safety_checker, options.safety.needs_checker()) {
            (_, false) => None,
            (Some(spec), true) => Some(source::resolve_component(spec, hub)?),
            (None, true) => {
                Some(dir.join(source::SAFETY_CHECKER)).filter(|d| d.join("config.json").is_file())
            }
        };
        if options.safety.needs_checker() && checker_dir.is_none() {
            return Err(Error::SafetyCheckerMissing {
                policy: options.safety.to_string(),
            });
        }
        let checker = checker_dir
            .map(|d| SafetyChecker::load(&d, options.device, options.dtype))
            .transpose()?;
        let mut model = Self::load_dir(&dir, &options.model, options.device, options.dtype)?;
        model.safety = Safety::new(options.safety, checker)?;
        Ok(model)
    }

    /// Loads a local diffusers folder with the safety check off; [`Self::load`] applies a
    /// policy, or set [`Self::safety`] with [`Safety::new`].
    pub fn load_dir(dir: &Path, name: &str, device: Device, dtype: Kind) -> Result<Self> {
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        let default_scheduler = SchedulerKind::from_class_name(&scheduler_config).unwrap_or_else(|| {
            tracing::warn!(path = %scheduler_path.display(), "unknown scheduler class; using pndm");
            SchedulerKind::Pndm
        });
        let text_config = ClipTextConfig::from_file(&dir.join("text_encoder").join("config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(
            &dir.join("tokenizer"),
            text_config.max_position_embeddings as usize,
        )?;
        let text_encoder = load_text_encoder(&dir.join("text_encoder"), device, dtype)?;
        let unet = load_unet(&dir.join("unet"), device, dtype)?;
        let vae_config = VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
        let vae_dtype = if dtype == Kind::Half && vae_config.force_upcast {
            Kind::Float
        } else {
            dtype
        };
        let vae = load_vae(&dir.join("vae"), device, vae_dtype)?;
        let unet_context = match &unet.model.config.cross_attention_dim {
            crate::models::unet::PerBlock::One(d) => *d,
            crate::models::unet::PerBlock::Each(v) => v.first().copied().unwrap_or_default(),
        };
        if unet_context != text_config.hidden_size {
            return Err(Error::Unsupported {
                path: dir.to_path_buf(),
                message: format!(
                    "the UNet attends to {unet_context}-wide text but the text encoder gives {}",
                    text_config.hidden_size
                ),
            });
        }
        Ok(StableDiffusion {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_dtype,
            scheduler_config,
            default_scheduler,
            device,
            dtype,
            safety: Safety::off(),
        })
    }

    /// The size the model was trained at (diffusers' default height/width).
    pub fn native_size(&self) -> i64 {
        self.unet.model.config_sample_size() * self.vae.model.config.scale_factor()
    }
}
