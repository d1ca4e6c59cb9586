//! SDXL's base and refiner as one text-to-image request ("ensemble of expert
//! denoisers"): the base denoises the high-noise part of the schedule and hands its
//! latents over, the refiner denoises the rest and decodes. The same as diffusers'
//! `StableDiffusionXLPipeline(denoising_end=f, output_type="latent")` followed by
//! `StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f)`, with each image's
//! generator going on from one pipeline to the next.

use std::sync::atomic::AtomicBool;

use imagegen_crds::GenerationParams;
use tch::Tensor;

use crate::error::{catch_torch, Error, Result};
use crate::family::Family;
use crate::noise::{DrawPlan, ImageNoise};
use crate::pipelines::conditioning;
use crate::pipelines::denoise::{self, draw_noises, stack_noise, step_draws};
use crate::pipelines::text_to_image::{self, GeneratedImage, Progress, Resolved};
use crate::schedulers::{self, Scheduler};
use crate::stable_diffusion::StableDiffusion;

/// The share of the schedule the base denoises when the request names none (diffusers'
/// documented 0.8).
pub const DEFAULT_HIGH_NOISE_FRACTION: f64 = 0.8;

/// Text-to-image with `base` for the first `params.high_noise_fraction` of the noise and
/// `refiner` for the rest. The refiner runs without clip skip (diffusers' refiner call
/// takes none) and with its own scheduler config, of the request's scheduler kind.
pub fn text_to_image_refined(
    base: &StableDiffusion,
    refiner: &StableDiffusion,
    params: &GenerationParams,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let fraction = params
        .high_noise_fraction
        .unwrap_or(DEFAULT_HIGH_NOISE_FRACTION);
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::invalid(
            "high_noise_fraction",
            format!("{fraction} must be between 0 and 1 (exclusive)"),
        ));
    }
    base.require_family(Family::Sdxl, "the refiner hand-off")?;
    refiner.require_family(Family::Sdxl, "a refiner")?;
    base.require_plain_unet("text-to-image")?;
    refiner.require_plain_unet("the refiner")?;
    let r = Resolved::new(params, base)?;
    let (base_vae, refiner_vae) = (&base.vae.model.config, &refiner.vae.model.config);
    if (base_vae.latent_channels, base_vae.scale_factor())
        != (refiner_vae.latent_channels, refiner_vae.scale_factor())
    {
        return Err(Error::invalid(
            "refiner",
            format!("{}'s latents do not fit {}'s VAE", base.name, refiner.name),
        ));
    }
    catch_torch(|| tch::no_grad(|| run(base, refiner, &r, fraction, progress, cancel)))
}

/// diffusers' cut-off timestep at `fraction` of the noise: the base runs the timesteps at
/// or above it (`denoising_end`), the refiner those below it (`denoising_start`).
fn cutoff(model: &StableDiffusion, fraction: f64) -> f64 {
    let train = model.scheduler_config.num_train_timesteps.unwrap_or(1000) as f64;
    (train - fraction * train).round()
}

fn run(
    base: &StableDiffusion,
    refiner: &StableDiffusion,
    r: &Resolved,
    fraction: f64,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let mut base_scheduler = schedulers::build(r.scheduler, &base.scheduler_config, r.steps)?;
    let mut refiner_scheduler = schedulers::build(r.scheduler, &refiner.scheduler_config, r.steps)?;
    let base_cutoff = cutoff(base, fraction);
    let base_steps = (base_scheduler.timesteps().iter())
        .filter(|&&t| t >= base_cutoff)
        .count();
    let refiner_cutoff = cutoff(refiner, fraction);
    let refiner_steps = (refiner_scheduler.timesteps().iter())
        .filter(|&&t| t < refiner_cutoff)
        .count();
    let refiner_start = refiner_scheduler.timesteps().len() - refiner_steps;

    // One generator per image for both pipelines: the initial latents, the base's step
    // noise, then the refiner's (the refiner adds no noise to the latents it is handed).
    let base_draws = step_draws(base_scheduler.as_ref(), 0).min(base_steps);
    let refiner_draws = step_draws(refiner_scheduler.as_ref(), refiner_start);
    let shape = r.latent_shape(base, base.vae.model.config.latent_channels);
    let noises = draw_noises(
        r,
        &DrawPlan {
            shape: &shape,
            kind: base.dtype,
            vae_sample: None,
            steps: base_draws + refiner_draws,
        },
    );
    let refiner_noises: Vec<ImageNoise> = noises
        .iter()
        .map(|n| ImageNoise {
            vae_sample: None,
            initial: n.initial.shallow_clone(),
            per_step: n.per_step[base_draws..]
                .iter()
                .map(Tensor::shallow_clone)
                .collect(),
        })
        .collect();
    let total = base_steps + refiner_steps;

    let guided = r.guided();
    let (cond, uncond) = denoise::encode_prompts(base, r, guided)?;
    let base_cond = conditioning::guidance_pair(cond, uncond);
    let latents =
        stack_noise(&noises, base.device, |n| &n.initial) * base_scheduler.init_noise_sigma();
    let latents = denoise::denoise_range(
        base,
        base_scheduler.as_mut(),
        latents,
        0..base_steps,
        &noises,
        &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
            text_to_image::guided_prediction(base, r, scheduler, latents, i, t, &base_cond)
        },
        &mut |p| {
            progress(Progress {
                step: p.step,
                total,
            })
        },
        cancel,
    )?;

    let refiner_request = Resolved {
        clip_skip: 0,
        ..r.clone()
    };
    let (cond, uncond) = denoise::encode_prompts(refiner, &refiner_request, guided)?;
    let refiner_cond = conditioning::guidance_pair(cond, uncond);
    let latents = denoise::denoise(
        refiner,
        refiner_scheduler.as_mut(),
        latents.to_kind(refiner.dtype),
        refiner_start,
        &refiner_noises,
        &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
            text_to_image::guided_prediction(
                refiner,
                &refiner_request,
                scheduler,
                latents,
                i,
                t,
                &refiner_cond,
            )
        },
        &mut |p| {
            progress(Progress {
                step: base_steps + p.step,
                total,
            })
        },
        cancel,
    )?;
    denoise::to_images(refiner, r, &latents, |i| r.metadata(base, i))
}
