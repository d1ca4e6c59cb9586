//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and the scheduler
//! config, on one device in one dtype.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::loading::{load_text_encoder, load_unet, load_vae, Loaded};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::safety::{Safety, SafetyChecker, SafetyPolicy};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::source::{self, Hub};
use crate::tokenizer::ClipTokenizer;

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

    /// Text embeddings `[batch, tokens, dim]` for `texts`.
    pub fn encode_text(&self, texts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t).map(|ids| Tensor::from_slice(&ids)))
            .collect::<Result<Vec<_>>>()?;
        let ids = Tensor::stack(&ids, 0).to_device(self.device);
        Ok(tch::no_grad(|| {
            self.text_encoder.model.forward(&ids, clip_skip)
        }))
    }

    /// Refuses a UNet that takes more than the latents (inpainting or InstructPix2Pix
    /// models) for a pipeline that feeds it latents only.
    pub fn require_plain_unet(&self, what: &str) -> Result<()> {
        let unet = self.unet.model.config.in_channels;
        let latents = self.vae.model.config.latent_channels;
        if unet != latents {
            return Err(Error::invalid(
                "strategy",
                format!(
                    "{what} needs a UNet that takes the {latents} latent channels; {}'s takes {unet}",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Latents to pixel values in [0, 1] (`[batch, 3, h, w]`, float32 on the CPU).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let scaled = (latents / self.vae.model.config.scaling_factor).to_kind(self.vae_dtype);
        let image = self.vae.model.decode(&scaled);
        (image / 2.0 + 0.5)
            .clamp(0.0, 1.0)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
    }
}
