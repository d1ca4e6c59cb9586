//! Inpainting, the same function as diffusers' `StableDiffusionInpaintPipeline`: repaint
//! the white part of a mask and keep the black part, with either
//!
//! - a dedicated inpainting UNet (9 input channels: the latents, the mask at latent size
//!   and the latents of the masked image, concatenated in that order), or
//! - a regular 4-channel UNet: after every step the kept area is replaced by the image's
//!   latents noised to the next step's level, and the final latents are blended with the
//!   mask.
//!
//! `strength` below 1 starts from the image's latents noised to a later step, as
//! image-to-image does.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::pipelines::{denoise, text_to_image};
use image::{GrayImage, RgbImage};
use imagegen_crds::GenerationParams;
use tch::Tensor;

use crate::error::{catch_torch, Error, Result};
use crate::image::fit::round_down_to_side_multiple;
use crate::image::processor;
use crate::noise::{self, Draw};
use crate::pipelines::denoise::step_draws;
use crate::pipelines::image_to_image::start_step;
use crate::pipelines::text_to_image::{GeneratedImage, Progress, Resolved};
use crate::schedulers;
use crate::stable_diffusion::StableDiffusion;

pub const DEFAULT_STRENGTH: f64 = 1.0;

/// How the UNet takes the mask, from its number of input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InpaintRoute {
    /// A dedicated inpainting UNet: latents, mask and masked-image latents as input.
    Dedicated,
    /// A regular UNet: the kept area is blended back in after every step.
    Blend,
}

/// The route inpainting takes with this model's UNet; an error for a UNet that is
/// neither a regular nor an inpainting one.
pub fn inpaint_route(model: &StableDiffusion) -> Result<InpaintRoute> {
    let latent = model.vae.model.config.latent_channels;
    match model.unet.model.config.in_channels {
        n if n == latent => Ok(InpaintRoute::Blend),
        n if n == 2 * latent + 1 => Ok(InpaintRoute::Dedicated),
        n => Err(Error::Unsupported {
            path: model.dir.join("unet"),
            message: format!(
                "the UNet takes {n} input channels; inpainting needs {latent} (a regular \
                 model) or {} (an inpainting model)",
                2 * latent + 1
            ),
        }),
    }
}

/// Repaints the white part of `mask` (black is kept) in `image`, `params.count` times.
/// `image` and `mask` must have the same size; width and height default to the image's
/// own, rounded down to a multiple of 8, and both are resized to them as diffusers does
/// (PIL's Lanczos filter). `params.strength` (default 1) is how far to noise the image
/// before repainting. `progress` is called after every step; setting `cancel` stops the
/// run between steps with [`Error::Cancelled`].
///
/// The mask is used as diffusers' pipeline uses it: resized, binarized at 0.5. The
/// request's mask shaping (`mask_blur`, `mask_grow`), `only_masked` and `outpaint` are
/// not applied here; a caller prepares the image and mask with them first.
pub fn inpaint(
    model: &StableDiffusion,
    params: &GenerationParams,
    image: &RgbImage,
    mask: &GrayImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    if image.dimensions() != mask.dimensions() {
        return Err(Error::invalid(
            "mask",
            format!(
                "the mask is {}x{} but the image is {}x{}; they must have the same size",
                mask.width(),
                mask.height(),
                image.width(),
                image.height()
            ),
        ));
    }
    let route = inpaint_route(model)?;
    let sized = GenerationParams {
        width: Some(
            params
                .width
                .unwrap_or(round_down_to_side_multiple(image.width())),
        ),
        height: Some(
            params
                .height
                .unwrap_or(round_down_to_side_multiple(image.height())),
        ),
        ..params.clone()
    };
    let request = Resolved::new(&sized, model)?;
    let strength = params.strength.unwrap_or(DEFAULT_STRENGTH);
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(
            "strength",
            format!("{strength} must be between 0 and 1"),
        ));
    }
    let start = start_step(request.steps, strength);
    if start >= request.steps {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} with {} steps leaves no step to run; raise strength or steps",
                request.steps
            ),
        ));
    }
    let job = Job {
        r: &request,
        route,
        strength,
        start,
        image,
        mask,
    };
    catch_torch(|| tch::no_grad(|| run_inpaint(model, &job, progress, cancel)))
}

fn run_inpaint(
    model: &StableDiffusion,
    job: &Job,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let r = job.r;
    let context = text_to_image::text_context(model, r)?;
    let mut scheduler = schedulers::build(r.scheduler, &model.scheduler_config, r.steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    let loop_steps = timesteps.len() - job.start;

    // The image processor's inputs: resized, in [-1, 1]; the mask binarized at image
    // size, and the image with the repainted area set to 0 (gray).
    let image = processor::resize_rgb(job.image, r.width, r.height);
    let mask = processor::resize_gray(job.mask, r.width, r.height);
    let init_image = processor::image_tensor(&image);
    let mask_condition = processor::mask_tensor(&mask);
    let masked_image = &init_image * mask_condition.lt(0.5);

    // Every image has its own generator. diffusers encodes the (single) input image with
    // the first generator only: the image's posterior sample when it needs the image
    // latents (a regular UNet, or strength below 1), then every image's initial noise,
    // then the masked image's posterior sample (drawn on both routes), then step noise.
    let scale = model.vae.model.config.scale_factor();
    let latent_channels = model.vae.model.config.latent_channels;
    let latent_shape = vec![
        1,
        latent_channels,
        i64::from(r.height) / scale,
        i64::from(r.width) / scale,
    ];
    let draw = |kind| Draw {
        shape: latent_shape.clone(),
        kind,
    };
    let strength_max = job.strength == 1.0;
    let needs_image_latents = job.route == InpaintRoute::Blend || !strength_max;
    let step_noises = step_draws(scheduler.as_ref(), job.start);
    let mut image_sample = None;
    let mut masked_sample = None;
    let mut per_image = Vec::with_capacity(r.count);
    for i in 0..r.count {
        let first = i == 0;
        let mut plan = Vec::new();
        if first && needs_image_latents {
            plan.push(draw(model.vae_dtype));
        }
        plan.push(draw(model.dtype));
        if first {
            plan.push(draw(model.vae_dtype));
        }
        plan.extend((0..step_noises).map(|_| draw(model.dtype)));
        let mut drawn = noise::draw_sequence(r.seed.wrapping_add(i as u64), &plan).into_iter();
        if first && needs_image_latents {
            image_sample = drawn.next();
        }
        let initial = drawn.next().expect("planned");
        if first {
            masked_sample = drawn.next();
        }
        per_image.push(noise::ImageNoise {
            vae_sample: None,
            initial,
            per_step: drawn.collect(),
        });
    }
    let masked_sample = masked_sample.expect("planned");
    let stack = |f: &dyn Fn(&noise::ImageNoise) -> &Tensor| {
        Tensor::cat(&per_image.iter().map(f).collect::<Vec<_>>(), 0).to_device(model.device)
    };

    let count = r.count as i64;
    let image_latents = image_sample
        .map(|sample| encode_image(model, &init_image, &sample).repeat([count, 1, 1, 1]));
    let noise = stack(&|n| &n.initial);
    let mut latents = match (&image_latents, strength_max) {
        (Some(image_latents), false) => scheduler.add_noise(image_latents, &noise, job.start),
        _ => &noise * scheduler.init_noise_sigma(),
    };

    // The mask at latent size (nearest neighbour), and the masked image's latents.
    let latent_mask = mask_condition
        .upsample_nearest2d([latent_shape[2], latent_shape[3]], None::<f64>, None::<f64>)
        .to_device(model.device)
        .to_kind(model.dtype)
        .repeat([count, 1, 1, 1]);
    let masked_image_latents =
        encode_image(model, &masked_image, &masked_sample).repeat([count, 1, 1, 1]);
    let unet_mask = r.guidance_batch(&latent_mask);
    let unet_masked_image = r.guidance_batch(&masked_image_latents);
    let keep = latent_mask.neg() + 1.0;

    for (k, &t) in timesteps[job.start..].iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let i = job.start + k;
        let model_input = scheduler.scale_model_input(&r.guidance_batch(&latents), i);
        let model_input = match job.route {
            InpaintRoute::Dedicated => {
                Tensor::cat(&[&model_input, &unet_mask, &unet_masked_image], 1)
            }
            InpaintRoute::Blend => model_input,
        };
        let prediction = text_to_image::guided_unet(model, r, &model_input, t, &context);
        let step_noise = scheduler.needs_noise().then(|| stack(&|n| &n.per_step[k]));
        latents = scheduler.step(&prediction, i, &latents, step_noise.as_ref());
        if let Some(image_latents) = image_latents
            .as_ref()
            .filter(|_| job.route == InpaintRoute::Blend)
        {
            let kept = if i + 1 < timesteps.len() {
                scheduler.add_noise(image_latents, &noise, i + 1)
            } else {
                image_latents.shallow_clone()
            };
            latents = &keep * kept + &latent_mask * &latents;
        }
        progress(Progress {
            step: k + 1,
            total: loop_steps,
        });
    }
    denoise::to_images(model, r, &latents, |i| r.metadata(model, i))
}

/// Scaled latents of `pixels` (`[1, 3, h, w]` in [-1, 1]) from the VAE's posterior with
/// the standard-normal `sample` (diffusers' `latent_dist.sample(generator)`).
fn encode_image(model: &StableDiffusion, pixels: &Tensor, sample: &Tensor) -> Tensor {
    let pixels = pixels
        .to_device(model.device)
        .to_kind(model.dtype)
        .to_kind(model.vae_dtype);
    let posterior = model.vae.model.encode(&pixels);
    let latents = posterior.sample(sample) * model.vae.model.config.scaling_factor;
    latents.to_kind(model.dtype)
}

/// What one inpainting request runs with.
struct Job<'a> {
    r: &'a Resolved,
    route: InpaintRoute,
    strength: f64,
    /// The loop index the denoising starts at.
    start: usize,
    image: &'a RgbImage,
    mask: &'a GrayImage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_cuts_the_schedule_like_diffusers() {
        assert_eq!(start_step(6, 1.0), 0);
        assert_eq!(start_step(6, 0.6), 3); // int(3.6) = 3 steps run
        assert_eq!(start_step(10, 0.75), 3);
        assert_eq!(start_step(4, 0.1), 4); // nothing left to run
        assert_eq!(start_step(25, 0.0), 25);
    }
}
