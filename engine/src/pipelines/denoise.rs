//! What the generation pipelines share: request validation, prompt encoding, seeded noise,
//! the denoising loop, and decoding to 8-bit images with their metadata.

use std::sync::atomic::{AtomicBool, Ordering};

use image::RgbImage;
use imagegen_crds::GenerationParams;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::family::Family;
use crate::image::fit::SIDE_MULTIPLE;
use crate::image::output::ImageMetadata;
use crate::noise::{self, DrawPlan, ImageNoise};
pub use crate::outcome::{GeneratedImage, Progress};
pub use crate::pipelines::conditioning::encode_prompts;
use crate::schedulers::{Scheduler, SchedulerKind};
use crate::stable_diffusion::StableDiffusion;

pub const DEFAULT_STEPS: u32 = 25;
/// SD 1.x/2.x's default guidance scale (diffusers'); SDXL's is [`DEFAULT_SDXL_GUIDANCE`].
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_SDXL_GUIDANCE: f64 = 5.0;
pub const MAX_SIDE: u32 = 2048;
pub const MAX_COUNT: u32 = 16;
pub const MAX_STEPS: u32 = 500;

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
    /// Checks `params`; an absent width or height is the model's native size.
    pub fn new(params: &GenerationParams, model: &StableDiffusion) -> Result<Self> {
        let native = u32::try_from(model.native_size()).unwrap_or(512);
        Self::with_default_size(params, model, (native, native))
    }

    /// Checks `params`; an absent width or height is taken from `default` (width, height).
    pub fn with_default_size(
        params: &GenerationParams,
        model: &StableDiffusion,
        default: (u32, u32),
    ) -> Result<Self> {
        let side = |field: &'static str, value: Option<u32>, default: u32| -> Result<u32> {
            let v = value.unwrap_or(default);
            if v == 0 || !v.is_multiple_of(SIDE_MULTIPLE) || v > MAX_SIDE {
                return Err(Error::invalid(
                    field,
                    format!("{v} must be a positive multiple of {SIDE_MULTIPLE} up to {MAX_SIDE}"),
                ));
            }
            Ok(v)
        };
        let width = side("width", params.width, default.0)?;
        let height = side("height", params.height, default.1)?;
        let steps = params.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 || steps > MAX_STEPS {
            return Err(Error::invalid(
                "steps",
                format!("{steps} must be between 1 and {MAX_STEPS}"),
            ));
        }
        let guidance = params.guidance_scale.unwrap_or(match model.family() {
            Family::StableDiffusion => DEFAULT_GUIDANCE,
            Family::Sdxl => DEFAULT_SDXL_GUIDANCE,
        });
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
        let layers = model
            .text_encoders
            .iter()
            .map(|e| e.model.num_layers())
            .min()
            .unwrap_or_default();
        if clip_skip >= layers {
            return Err(Error::invalid(
                "clip_skip",
                format!("{clip_skip} must be less than the text encoder's {layers} layers"),
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

    /// `t` for the UNet's batch: twice (unconditional half, conditional half) when guided.
    pub fn guidance_batch(&self, t: &Tensor) -> Tensor {
        if self.guided() {
            Tensor::cat(&[t, t], 0)
        } else {
            t.shallow_clone()
        }
    }

    /// The negative prompt, empty when none was given (as diffusers encodes it).
    pub fn negative(&self) -> &str {
        self.negative_prompt.as_deref().unwrap_or("")
    }

    /// The shape of one image's latents with `channels` channels.
    pub fn latent_shape(&self, model: &StableDiffusion, channels: i64) -> [i64; 4] {
        let scale = model.vae.model.config.scale_factor();
        [
            1,
            channels,
            self.height as i64 / scale,
            self.width as i64 / scale,
        ]
    }

    /// The metadata of image `i`, before the strategy-specific fields.
    pub fn metadata(&self, model: &StableDiffusion, i: usize) -> ImageMetadata {
        ImageMetadata {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative().to_string(),
            seed: self.image_seed(i),
            steps: self.steps,
            scheduler: self.scheduler.to_string(),
            guidance_scale: self.guidance,
            width: self.width,
            height: self.height,
            model: model.name.clone(),
            clip_skip: self.clip_skip,
            strength: None,
            image_guidance_scale: None,
        }
    }

    /// Image `i` has its own generator, seeded `seed + i`.
    pub fn image_seed(&self, i: usize) -> u64 {
        self.seed.wrapping_add(i as u64)
    }
}

/// How many step noises a denoising loop that begins at loop index `start` draws per
/// image: one per step taken for a stochastic scheduler, none otherwise.
pub fn step_draws(scheduler: &dyn Scheduler, start: usize) -> usize {
    if scheduler.needs_noise() {
        scheduler.timesteps().len() - start
    } else {
        0
    }
}

/// Draws every image's noise as `plan` says, image `i` from seed `seed + i`.
pub fn draw_noises(r: &Resolved, plan: &DrawPlan) -> Vec<ImageNoise> {
    (0..r.count)
        .map(|i| noise::draw_plan(r.image_seed(i), plan))
        .collect()
}

/// One tensor per image, concatenated along the batch and moved to `device`.
pub fn stack_noise(
    noises: &[ImageNoise],
    device: Device,
    part: impl Fn(&ImageNoise) -> &Tensor,
) -> Tensor {
    Tensor::cat(&noises.iter().map(part).collect::<Vec<_>>(), 0).to_device(device)
}

/// Predicts the (guided) model output for `latents` at loop index `step`, timestep `t`.
pub type Predict<'a> = dyn Fn(&dyn Scheduler, &Tensor, usize, f64) -> Tensor + 'a;

/// The denoising loop from loop index `start` to the end of `scheduler`'s timesteps:
/// `predict`, then a scheduler step with that step's noise from `noises`
/// (`per_step[0]` is the first step taken). Reports progress after every step and stops
/// between steps when `cancel` is set.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    model: &StableDiffusion,
    scheduler: &mut dyn Scheduler,
    latents: Tensor,
    start: usize,
    noises: &[ImageNoise],
    predict: &Predict,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Tensor> {
    let end = scheduler.timesteps().len();
    denoise_range(
        model,
        scheduler,
        latents,
        start..end,
        noises,
        predict,
        progress,
        cancel,
    )
}

/// [`denoise`] over the loop indices `steps` only (SDXL's base stops early and hands its
/// latents to the refiner: diffusers' `denoising_end`).
#[allow(clippy::too_many_arguments)]
pub fn denoise_range(
    model: &StableDiffusion,
    scheduler: &mut dyn Scheduler,
    mut latents: Tensor,
    steps: std::ops::Range<usize>,
    noises: &[ImageNoise],
    predict: &Predict,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let end = steps.end.min(timesteps.len());
    let start = steps.start.min(end);
    let total = end - start;
    for (taken, (i, &t)) in timesteps[..end].iter().enumerate().skip(start).enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let prediction = predict(&*scheduler, &latents, i, t);
        let step_noise = scheduler
            .needs_noise()
            .then(|| stack_noise(noises, model.device, |n| &n.per_step[taken]));
        latents = scheduler.step(&prediction, i, &latents, step_noise.as_ref());
        progress(Progress {
            step: taken + 1,
            total,
        });
    }
    Ok(latents)
}

/// Decodes the final latents into one image per request image, with metadata.
pub fn to_images(
    model: &StableDiffusion,
    r: &Resolved,
    latents: &Tensor,
    metadata: impl Fn(usize) -> ImageMetadata,
) -> Result<Vec<GeneratedImage>> {
    generated_images(&model.decode(latents), 0, r, metadata)
}

/// `r`'s images from decoded `pixels` (`[batch, 3, h, w]`), whose rows `first..first +
/// r.count` are `r`'s; `metadata(i)` describes image `i` of `r`.
pub(crate) fn generated_images(
    pixels: &Tensor,
    first: usize,
    r: &Resolved,
    metadata: impl Fn(usize) -> ImageMetadata,
) -> Result<Vec<GeneratedImage>> {
    (0..r.count)
        .map(|i| {
            Ok(GeneratedImage {
                image: to_rgb(&pixels.get((first + i) as i64))?,
                metadata: metadata(i),
                index: i,
                flagged: None,
            })
        })
        .collect()
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

/// 8-bit RGB to the VAE's input, `[1, 3, h, w]` float32 in [-1, 1], computed as diffusers'
/// `VaeImageProcessor` does (`x / 255` in float32, then `2x - 1`).
pub fn from_rgb(image: &RgbImage) -> Tensor {
    let (w, h) = (image.width() as i64, image.height() as i64);
    let values: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| 2.0f32 * (f32::from(v) / 255.0f32) - 1.0f32)
        .collect();
    Tensor::from_slice(&values)
        .view([h, w, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .contiguous()
}
