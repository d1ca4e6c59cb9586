//! Text-to-image, the same function as diffusers' `StableDiffusionPipeline`: encode the
//! prompt and the negative prompt, denoise seeded latents with classifier-free guidance,
//! decode with the VAE.

use std::sync::atomic::{AtomicBool, Ordering};

use image::RgbImage;
use imagegen_crds::GenerationParams;
use tch::{Device, Kind, Tensor};

use crate::engine::StableDiffusion;
use crate::error::{catch_torch, Error, Result};
use crate::noise;
use crate::output::ImageMetadata;
use crate::schedulers::{self, SchedulerKind};

pub const DEFAULT_STEPS: u32 = 25;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const MAX_SIDE: u32 = 2048;
pub const MAX_COUNT: u32 = 16;
pub const MAX_STEPS: u32 = 500;

/// Where a generation is, reported after every denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
}

/// One output image with what produced it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub metadata: ImageMetadata,
}

/// A request with every default filled in and every value checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    pub count: usize,
    pub clip_skip: usize,
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in the time keeps two calls apart.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

impl Resolved {
    pub fn new(params: &GenerationParams, model: &StableDiffusion) -> Result<Self> {
        let native = u32::try_from(model.native_size()).unwrap_or(512);
        let multiple = 8;
        let side = |field: &'static str, value: Option<u32>| -> Result<u32> {
            let v = value.unwrap_or(native);
            if v == 0 || !v.is_multiple_of(multiple) || v > MAX_SIDE {
                return Err(Error::invalid(
                    field,
                    format!("{v} must be a positive multiple of {multiple} up to {MAX_SIDE}"),
                ));
            }
            Ok(v)
        };
        let width = side("width", params.width)?;
        let height = side("height", params.height)?;
        let steps = params.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 || steps > MAX_STEPS {
            return Err(Error::invalid(
                "steps",
                format!("{steps} must be between 1 and {MAX_STEPS}"),
            ));
        }
        let guidance = params.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(Error::invalid(
                "guidance",
                format!("{guidance} must be between 0 and 100"),
            ));
        }
        let count = params.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            return Err(Error::invalid(
                "count",
                format!("{count} must be between 1 and {MAX_COUNT}"),
            ));
        }
        let scheduler = match &params.scheduler {
            Some(name) => name.parse::<SchedulerKind>()?,
            None => model.default_scheduler,
        };
        let clip_skip = params.clip_skip.unwrap_or(0) as usize;
        if clip_skip >= model.text_encoder.model.num_layers() {
            return Err(Error::invalid(
                "clip_skip",
                format!(
                    "{clip_skip} must be less than the text encoder's {} layers",
                    model.text_encoder.model.num_layers()
                ),
            ));
        }
        Ok(Resolved {
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            width,
            height,
            steps: steps as usize,
            guidance,
            scheduler,
            seed: params.seed.unwrap_or_else(random_seed),
            count: count as usize,
            clip_skip,
        })
    }

    /// diffusers guides only when the scale is above 1.
    pub fn guided(&self) -> bool {
        self.guidance > 1.0
    }
}

impl StableDiffusion {
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

    /// Generates `params.count` images. `progress` is called after every step; setting
    /// `cancel` stops the run between steps with [`Error::Cancelled`].
    pub fn text_to_image(
        &self,
        params: &GenerationParams,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let request = Resolved::new(params, self)?;
        let unet = &self.unet.model;
        catch_torch(|| {
            tch::no_grad(|| {
                self.denoise(
                    &request,
                    &|input, t, context| unet.forward(input, t, context),
                    progress,
                    cancel,
                )
            })
        })
    }

    /// The text-to-image loop with the noise prediction supplied by the caller:
    /// `predict(model_input, timestep, context)` gets the scaled latents (doubled for
    /// classifier-free guidance, unconditional half first) and returns the UNet's output
    /// for them. Encodes the prompts, draws the seeded noise, denoises, decodes.
    pub(crate) fn denoise(
        &self,
        r: &Resolved,
        predict: &dyn Fn(&Tensor, f64, &Tensor) -> Tensor,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let context = self.text_context(r)?;
        let mut scheduler = schedulers::build(r.scheduler, &self.scheduler_config, r.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let scale = self.vae.model.config.scale_factor();
        let latent_channels = self.unet.model.config.in_channels;
        let shape = [
            1,
            latent_channels,
            r.height as i64 / scale,
            r.width as i64 / scale,
        ];
        let stochastic_steps = if scheduler.needs_noise() {
            timesteps.len()
        } else {
            0
        };
        let noises: Vec<noise::ImageNoise> = (0..r.count)
            .map(|i| {
                noise::draw(
                    r.seed.wrapping_add(i as u64),
                    &shape,
                    self.dtype,
                    stochastic_steps,
                )
            })
            .collect();
        let stack = |f: &dyn Fn(&noise::ImageNoise) -> &Tensor| {
            Tensor::cat(&noises.iter().map(f).collect::<Vec<_>>(), 0).to_device(self.device)
        };
        let mut latents = stack(&|n| &n.initial) * scheduler.init_noise_sigma();

        for (i, &t) in timesteps.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let model_input = if r.guided() {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, i);
            let prediction = apply_guidance(r, predict(&model_input, t, &context));
            let step_noise = scheduler.needs_noise().then(|| stack(&|n| &n.per_step[i]));
            latents = scheduler.step(&prediction, i, &latents, step_noise.as_ref());
            progress(Progress {
                step: i + 1,
                total: timesteps.len(),
            });
        }

        self.finish(r, &latents)
    }

    /// The UNet's text context for `r.count` images: `[uncond..., cond...]` when guided.
    pub(crate) fn text_context(&self, r: &Resolved) -> Result<Tensor> {
        let count = r.count as i64;
        let negative = r.negative_prompt.as_deref().unwrap_or("");
        let cond = self
            .encode_text(&[&r.prompt], r.clip_skip)?
            .repeat([count, 1, 1]);
        // diffusers orders the guided batch [unconditional..., conditional...], and applies
        // clip skip to the prompt only: the negative side always uses the last layer.
        Ok(if r.guided() {
            let uncond = self.encode_text(&[negative], 0)?.repeat([count, 1, 1]);
            Tensor::cat(&[uncond, cond], 0)
        } else {
            cond
        })
    }

    /// The UNet's prediction for the (scaled, doubled when guided) `model_input` at `t`,
    /// combined with classifier-free guidance.
    pub(crate) fn guided_prediction(
        &self,
        r: &Resolved,
        model_input: &Tensor,
        t: f64,
        context: &Tensor,
    ) -> Tensor {
        apply_guidance(r, self.unet.model.forward(model_input, t, context))
    }

    /// Decodes the final latents into 8-bit images with their metadata.
    pub(crate) fn finish(&self, r: &Resolved, latents: &Tensor) -> Result<Vec<GeneratedImage>> {
        let negative = r.negative_prompt.as_deref().unwrap_or("");
        let pixels = self.decode(latents);
        (0..r.count)
            .map(|i| {
                Ok(GeneratedImage {
                    image: to_rgb(&pixels.get(i as i64))?,
                    metadata: ImageMetadata {
                        prompt: r.prompt.clone(),
                        negative_prompt: negative.to_string(),
                        seed: r.seed.wrapping_add(i as u64),
                        steps: r.steps,
                        scheduler: r.scheduler.to_string(),
                        guidance_scale: r.guidance,
                        width: r.width,
                        height: r.height,
                        model: self.name.clone(),
                        clip_skip: r.clip_skip,
                    },
                })
            })
            .collect()
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

/// Classifier-free guidance on a prediction for the doubled batch (unconditional half
/// first): `uncond + scale · (cond − uncond)`; unguided predictions pass through.
pub(crate) fn apply_guidance(r: &Resolved, prediction: Tensor) -> Tensor {
    if r.guided() {
        let halves = prediction.chunk(2, 0);
        &halves[0] + (&halves[1] - &halves[0]) * r.guidance
    } else {
        prediction
    }
}

/// `[3, h, w]` in [0, 1] to 8-bit RGB, rounding as diffusers' `numpy_to_pil` does.
pub fn to_rgb(pixels: &Tensor) -> Result<RgbImage> {
    let (_, h, w) = pixels.size3().map_err(Error::from)?;
    let bytes = (pixels.permute([1, 2, 0]) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous();
    let len = (h * w * 3) as usize;
    let mut buffer = vec![0u8; len];
    bytes.f_copy_data_u8(&mut buffer, len)?;
    RgbImage::from_raw(w as u32, h as u32, buffer)
        .ok_or_else(|| Error::Torch("decoded image has the wrong size".into()))
}
