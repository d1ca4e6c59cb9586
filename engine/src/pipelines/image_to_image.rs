//! Image-to-image, two ways:
//!
//! - **sdedit**, the same function as diffusers' `StableDiffusionImg2ImgPipeline`: the input
//!   image is encoded with the VAE (a posterior sample), noised to the level of the step that
//!   `strength` selects, and denoised from there with the text guidance of text-to-image.
//! - **instruct**, the same function as diffusers' `StableDiffusionInstructPix2PixPipeline`:
//!   an InstructPix2Pix UNet (8 input channels) denoises fresh latents next to the input
//!   image's latents (the posterior mean), guided by the instruction and by the image.
//!
//! The input is resized to the output size with Pillow's Lanczos filter (see
//! [`crate::resize`]), as diffusers' image processor does; the output size defaults to the
//! input's, rounded down to a multiple of 8.

use std::borrow::Cow;
use std::sync::atomic::AtomicBool;

use crate::pipelines::{denoise, text_to_image};
use image::RgbImage;
use imagegen_crds::{GenerationParams, Strategy};
use tch::Tensor;

use crate::error::{catch_torch, Error, Result};
use crate::family::Family;
use crate::image::fit::round_down_to_side_multiple;
use crate::image::processor::resize_rgb;
use crate::models::unet::Conditioning;
use crate::noise::DrawPlan;
use crate::pipelines::conditioning;
use crate::pipelines::denoise::{
    draw_noises, from_rgb, stack_noise, step_draws, GeneratedImage, Progress, Resolved,
};
use crate::schedulers::{self, Scheduler};
use crate::stable_diffusion::StableDiffusion;

/// sdedit's default strength.
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// instruct's default image guidance scale.
pub const DEFAULT_IMAGE_GUIDANCE: f64 = 1.5;

/// The output size when the request gives none: the input's size rounded down to a multiple
/// of 8 (diffusers' `get_default_height_width`).
pub fn default_size(image: &RgbImage) -> (u32, u32) {
    let down = round_down_to_side_multiple;
    (down(image.width()), down(image.height()))
}

/// The loop index sdedit starts at for `steps` steps and `strength` (diffusers'
/// `get_timesteps`): the last `int(steps × strength)` steps of the schedule run.
pub fn start_step(steps: usize, strength: f64) -> usize {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    steps - init_timestep
}

fn resolve(
    params: &GenerationParams,
    model: &StableDiffusion,
    init: &RgbImage,
) -> Result<Resolved> {
    if init.width() == 0 || init.height() == 0 {
        return Err(Error::invalid("image", "the input image is empty"));
    }
    Resolved::with_default_size(params, model, default_size(init))
}

/// Image-to-image with the strategy `params.strategy` asks for (default sdedit).
pub fn image_to_image(
    model: &StableDiffusion,
    params: &GenerationParams,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    match params.strategy.unwrap_or(Strategy::Sdedit) {
        Strategy::Sdedit => sdedit(model, params, init_image, progress, cancel),
        Strategy::Instruct => instruct(model, params, init_image, progress, cancel),
        Strategy::Canny => Err(Error::invalid(
            "strategy",
            "canny is not supported by this engine yet",
        )),
    }
}

/// SDEdit: repaints `strength` (default 0.75, in [0, 1]) of `init_image` guided by the
/// prompt; diffusers' `StableDiffusionImg2ImgPipeline`. Only the last
/// `int(steps × strength)` steps of the schedule run. A strength that runs no step at all
/// is refused (diffusers fails on it too), except that PNDM's schedule is one step
/// longer than `steps` and so still runs its last step, as in diffusers.
pub fn sdedit(
    model: &StableDiffusion,
    params: &GenerationParams,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let r = resolve(params, model, init_image)?;
    let strength = params.strength.unwrap_or(DEFAULT_STRENGTH);
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(
            "strength",
            format!("{strength} must be between 0 and 1"),
        ));
    }
    model.require_plain_unet("sdedit")?;
    let scheduler = schedulers::build(r.scheduler, &model.scheduler_config, r.steps)?;
    let start = start_step(r.steps, strength);
    if start >= scheduler.timesteps().len() {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} with {} steps runs no denoising step (steps × strength must \
                 be at least 1)",
                r.steps
            ),
        ));
    }
    catch_torch(|| {
        tch::no_grad(|| {
            run_sdedit(
                model, &r, strength, scheduler, start, init_image, progress, cancel,
            )
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn run_sdedit(
    model: &StableDiffusion,
    r: &Resolved,
    strength: f64,
    mut scheduler: Box<dyn Scheduler>,
    start: usize,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let (cond, uncond) = denoise::encode_prompts(model, r, r.guided())?;
    let context = conditioning::guidance_pair(cond, uncond);

    let posterior = model.vae.model.encode(&vae_input(model, init_image, r));
    let shape = posterior.mean.size();
    // Per image: the posterior sample, then the noise added at the start step, then one
    // tensor per stochastic step taken.
    let noises = draw_noises(
        r,
        &DrawPlan {
            shape: &shape,
            kind: model.dtype,
            vae_sample: Some(model.vae_dtype),
            steps: step_draws(scheduler.as_ref(), start),
        },
    );
    let samples: Vec<Tensor> = noises
        .iter()
        .map(|n| posterior.sample(n.vae_sample.as_ref().expect("the plan draws a VAE sample")))
        .collect();
    let init_latents =
        (Tensor::cat(&samples, 0) * model.vae.model.config.scaling_factor).to_kind(model.dtype);
    let noise = stack_noise(&noises, model.device, |n| &n.initial);
    let latents = scheduler.add_noise(&init_latents, &noise, start);

    let latents = denoise::denoise(
        model,
        scheduler.as_mut(),
        latents,
        start,
        &noises,
        &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
            text_to_image::guided_prediction(model, r, scheduler, latents, i, t, &context)
        },
        progress,
        cancel,
    )?;
    denoise::to_images(model, r, &latents, |i| {
        let mut metadata = r.metadata(model, i);
        metadata.strength = Some(strength);
        metadata
    })
}

/// InstructPix2Pix: edits `init_image` as the prompt instructs; diffusers'
/// `StableDiffusionInstructPix2PixPipeline`. Needs a UNet with 8 input channels.
/// `image_guidance_scale` (default 1.5) pulls towards the input image; guidance is on
/// when `guidance_scale` > 1 and `image_guidance_scale` >= 1. Clip skip applies to the
/// prompt as in text-to-image (diffusers' pipeline has no clip skip).
pub fn instruct(
    model: &StableDiffusion,
    params: &GenerationParams,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    model.require_family(Family::StableDiffusion, "instruct")?;
    let r = resolve(params, model, init_image)?;
    let image_guidance = params
        .image_guidance_scale
        .unwrap_or(DEFAULT_IMAGE_GUIDANCE);
    if !image_guidance.is_finite() || !(0.0..=100.0).contains(&image_guidance) {
        return Err(Error::invalid(
            "image_guidance_scale",
            format!("{image_guidance} must be between 0 and 100"),
        ));
    }
    let unet = model.unet.model.config.in_channels;
    let latents = model.vae.model.config.latent_channels;
    if unet != 2 * latents {
        return Err(Error::invalid(
            "strategy",
            format!(
                "instruct needs an InstructPix2Pix model (a UNet with {} input channels: \
                 latents and image latents); {}'s UNet takes {unet}",
                2 * latents,
                model.name
            ),
        ));
    }
    catch_torch(|| {
        tch::no_grad(|| run_instruct(model, &r, image_guidance, init_image, progress, cancel))
    })
}

fn run_instruct(
    model: &StableDiffusion,
    r: &Resolved,
    image_guidance: f64,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let guided = r.guided() && image_guidance >= 1.0;
    let (cond, uncond) = denoise::encode_prompts(model, r, guided)?;
    // diffusers' three-way batch: [prompt + image, image only, neither].
    let context = match uncond {
        Some(uncond) => Conditioning::cat(&[&cond, &uncond, &uncond]),
        None => cond,
    };

    let mut scheduler = schedulers::build(r.scheduler, &model.scheduler_config, r.steps)?;
    // The posterior mode (its mean), not scaled by the VAE's scaling factor.
    let image_latents = model
        .vae
        .model
        .encode(&vae_input(model, init_image, r))
        .mean
        .to_kind(model.dtype)
        .repeat([r.count as i64, 1, 1, 1]);
    let image_latents = if guided {
        let none = image_latents.zeros_like();
        Tensor::cat(&[&image_latents, &image_latents, &none], 0)
    } else {
        image_latents
    };

    let shape = r.latent_shape(model, model.vae.model.config.latent_channels);
    let noises = draw_noises(
        r,
        &DrawPlan {
            shape: &shape,
            kind: model.dtype,
            vae_sample: None,
            steps: step_draws(scheduler.as_ref(), 0),
        },
    );
    let latents = stack_noise(&noises, model.device, |n| &n.initial) * scheduler.init_noise_sigma();
    let predict = |scheduler: &dyn Scheduler, latents: &Tensor, i: usize, t: f64| {
        let model_input = if guided {
            Tensor::cat(&[latents, latents, latents], 0)
        } else {
            latents.shallow_clone()
        };
        let model_input = scheduler.scale_model_input(&model_input, i);
        let model_input = Tensor::cat(&[&model_input, &image_latents], 1);
        let prediction = model.unet.model.forward(&model_input, t, &context);
        if guided {
            let parts = prediction.chunk(3, 0);
            let (text, image, none) = (&parts[0], &parts[1], &parts[2]);
            none + (text - image) * r.guidance + (image - none) * image_guidance
        } else {
            prediction
        }
    };
    let latents = denoise::denoise(
        model,
        scheduler.as_mut(),
        latents,
        0,
        &noises,
        &predict,
        progress,
        cancel,
    )?;
    denoise::to_images(model, r, &latents, |i| {
        let mut metadata = r.metadata(model, i);
        metadata.image_guidance_scale = Some(image_guidance);
        metadata
    })
}

/// `image` resized to the request's size (Pillow's Lanczos) as the VAE's input: `[1, 3,
/// h, w]` in [-1, 1], on the model's device in the VAE's dtype.
fn vae_input(model: &StableDiffusion, image: &RgbImage, r: &Resolved) -> Tensor {
    let sized = if (image.width(), image.height()) == (r.width, r.height) {
        Cow::Borrowed(image)
    } else {
        Cow::Owned(resize_rgb(image, r.width, r.height))
    };
    from_rgb(&sized)
        .to_device(model.device)
        .to_kind(model.vae_dtype)
}
