//! A loaded Stable Diffusion (1.x, 2.x or SDXL) model: its tokenizers and text encoders,
//! UNet, VAE and the scheduler config, on one device in one dtype.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::family::{Family, PipelineIndex};
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
    /// The options of an SDXL refiner for this model: the same hub, device and dtype, and
    /// no safety check of its own (the model's policy checks the refined images).
    pub fn for_refiner(&self, refiner: impl Into<String>) -> Self {
        LoadOptions {
            model: refiner.into(),
            safety: SafetyPolicy::Off,
            safety_checker: None,
            ..self.clone()
        }
    }

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

/// One text encoder with its tokenizer.
pub struct TextEncoder {
    /// Its folder and LoRA key prefix: `text_encoder` or `text_encoder_2`.
    pub component: &'static str,
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    pub vars: tch::nn::VarStore,
}

/// The folders of the text encoders, each with its tokenizer's.
const TEXT_ENCODERS: [(&str, &str); 2] = [
    ("text_encoder", "tokenizer"),
    ("text_encoder_2", "tokenizer_2"),
];

/// A text-to-image model ready to run.
pub struct StableDiffusion {
    /// What the user named (folder or hub id), recorded in image metadata.
    pub name: String,
    pub dir: PathBuf,
    /// The family and pipeline settings from `model_index.json`.
    pub index: PipelineIndex,
    /// SD 1.x/2.x: `text_encoder`; SDXL: `text_encoder` and `text_encoder_2`; an SDXL
    /// refiner: `text_encoder_2` alone. Never empty.
    pub text_encoders: Vec<TextEncoder>,
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
        let index = PipelineIndex::read(dir)?;
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        let default_scheduler = SchedulerKind::from_class_name(&scheduler_config).unwrap_or_else(|| {
            tracing::warn!(path = %scheduler_path.display(), "unknown scheduler class; using pndm");
            SchedulerKind::Pndm
        });
        let text_encoders = load_text_encoders(dir, index.family, device, dtype)?;
        let unet = load_unet(&dir.join("unet"), device, dtype)?;
        let vae_config = VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
        let vae_dtype = if dtype == Kind::Half && vae_config.force_upcast {
            Kind::Float
        } else {
            dtype
        };
        let vae = load_vae(&dir.join("vae"), device, vae_dtype)?;
        check_conditioning(dir, &index, &text_encoders, &unet.model)?;
        Ok(StableDiffusion {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            index,
            text_encoders,
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

    pub fn family(&self) -> Family {
        self.index.family
    }

    /// The first text encoder (SD's only one; for SDXL `text_encoder`, or a refiner's
    /// `text_encoder_2`).
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text_encoders[0]
    }

    /// The text encoder loaded from `component` (`text_encoder` or `text_encoder_2`).
    pub fn text_encoder_named(&self, component: &str) -> Option<&TextEncoder> {
        self.text_encoders.iter().find(|e| e.component == component)
    }

    /// Refuses SDXL for what runs SD 1.x/2.x only.
    pub fn require_family(&self, family: Family, what: &str) -> Result<()> {
        if self.family() != family {
            return Err(Error::invalid(
                "strategy",
                format!(
                    "{what} runs {family} models; {} is {}",
                    self.name,
                    self.family()
                ),
            ));
        }
        Ok(())
    }

    /// The size the model was trained at (diffusers' default height/width).
    pub fn native_size(&self) -> i64 {
        self.unet.model.config_sample_size() * self.vae.model.config.scale_factor()
    }

    /// SD 1.x/2.x text embeddings `[batch, tokens, dim]` for `texts`, from the first text
    /// encoder.
    pub fn encode_text(&self, texts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let encoder = self.text_encoder();
        let ids = encoder.token_ids(texts, self.device)?;
        Ok(tch::no_grad(|| encoder.model.forward(&ids, clip_skip)))
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

impl TextEncoder {
    /// `texts` tokenized and padded to the encoder's length: `[batch, tokens]` on `device`.
    pub fn token_ids(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t).map(|ids| Tensor::from_slice(&ids)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&ids, 0).to_device(device))
    }
}

/// The family's text encoders with their tokenizers: SD's `text_encoder`, SDXL's
/// `text_encoder` and `text_encoder_2` where present (a refiner has only the second).
fn load_text_encoders(
    dir: &Path,
    family: Family,
    device: Device,
    dtype: Kind,
) -> Result<Vec<TextEncoder>> {
    let wanted = match family {
        Family::StableDiffusion => &TEXT_ENCODERS[..1],
        Family::Sdxl => &TEXT_ENCODERS[..],
    };
    let mut encoders = Vec::new();
    for &(component, tokenizer) in wanted {
        let config_path = dir.join(component).join("config.json");
        if family == Family::Sdxl && !config_path.is_file() {
            continue;
        }
        let config = ClipTextConfig::from_file(&config_path)?;
        let tokenizer = ClipTokenizer::from_dir(
            &dir.join(tokenizer),
            config.max_position_embeddings as usize,
        )?;
        let Loaded { model, vars } = load_text_encoder(&dir.join(component), device, dtype)?;
        encoders.push(TextEncoder {
            component,
            tokenizer,
            model,
            vars,
        });
    }
    if encoders.is_empty() {
        return Err(Error::Unsupported {
            path: dir.to_path_buf(),
            message: "an SDXL model needs text_encoder/ or text_encoder_2/".into(),
        });
    }
    Ok(encoders)
}

/// Checks that the text side fits the UNet: the width of the text it attends to, and for
/// SDXL the pooled output and the number of time ids its added embedding takes.
fn check_conditioning(
    dir: &Path,
    index: &PipelineIndex,
    encoders: &[TextEncoder],
    unet: &UNet2DConditionModel,
) -> Result<()> {
    let unsupported = |message: String| Error::Unsupported {
        path: dir.to_path_buf(),
        message,
    };
    let widths: Vec<i64> = encoders.iter().map(|e| e.model.hidden_size()).collect();
    let text_width = match index.family {
        Family::StableDiffusion => widths[0],
        Family::Sdxl => widths.iter().sum(),
    };
    let unet_context = unet.config.context_dim();
    if unet_context != text_width {
        return Err(unsupported(format!(
            "the UNet attends to {unet_context}-wide text but the text encoders give {text_width}"
        )));
    }
    match (index.family, unet.config.text_time()) {
        (Family::StableDiffusion, None) => Ok(()),
        (Family::StableDiffusion, Some(_)) => Err(unsupported(
            "the UNet takes SDXL's added conditioning but model_index.json names an SD 1.x/2.x \
             pipeline"
                .into(),
        )),
        (Family::Sdxl, None) => Err(unsupported(
            "an SDXL UNet needs `addition_embed_type` \"text_time\"".into(),
        )),
        (Family::Sdxl, Some((time_channels, input))) => {
            let last = encoders.last().expect("never empty");
            let Some(pooled) = last.model.projection_dim() else {
                return Err(unsupported(format!(
                    "SDXL's pooled text comes from a CLIPTextModelWithProjection; {}'s has no \
                     projection",
                    last.component
                )));
            };
            let time_ids = if index.requires_aesthetics_score {
                5
            } else {
                6
            };
            let expected = time_ids * time_channels + pooled;
            if input != expected {
                return Err(unsupported(format!(
                    "the UNet's added embedding takes {input} values, but {time_ids} time ids \
                     ({}) of {time_channels} and a pooled text of {pooled} make {expected}",
                    if index.requires_aesthetics_score {
                        "with an aesthetic score: requires_aesthetics_score is true"
                    } else {
                        "sizes and crop: requires_aesthetics_score is false"
                    }
                )));
            }
            Ok(())
        }
    }
}
