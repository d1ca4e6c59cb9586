//! Text-to-image, the same function as diffusers' `StableDiffusionPipeline`: encode the
//! prompt and the negative prompt, denoise seeded latents with classifier-free guidance,
//! decode with the VAE.

use std::sync::atomic::AtomicBool;

use crate::pipelines::denoise;
use imagegen_crds::GenerationParams;
use tch::Tensor;

use crate::error::{catch_torch, Result};
use crate::models::unet::Conditioning;
use crate::noise::{DrawPlan, ImageNoise};
use crate::pipelines::denoise::{draw_noises, generated_images, stack_noise, step_draws};
pub use crate::pipelines::denoise::{
    to_rgb, GeneratedImage, Progress, Resolved, DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_COUNT,
    MAX_SIDE, MAX_STEPS,
};
use crate::schedulers::{self, Scheduler};
use crate::stable_diffusion::StableDiffusion;

/// Generates `params.count` images. `progress` is called after every step; setting
/// `cancel` stops the run between steps with [`crate::Error::Cancelled`].
pub fn text_to_image(
    model: &StableDiffusion,
    params: &GenerationParams,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    let request = Resolved::new(params, model)?;
    model.require_plain_unet("text-to-image")?;
    catch_torch(|| tch::no_grad(|| run(model, std::slice::from_ref(&request), progress, cancel)))
        .map(only_request)
}

/// Text-to-image for `requests` in one denoising loop; each request's images, in order.
/// The requests must agree on what [`run_with`] takes from the first.
pub(crate) fn run(
    model: &StableDiffusion,
    requests: &[Resolved],
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<Vec<GeneratedImage>>> {
    let unet = &model.unet.model;
    run_with(
        model,
        requests,
        &|input, t, cond| unet.forward(input, t, cond),
        progress,
        cancel,
    )
}

/// The text-to-image loop for the images of every request (a batch when several share
/// it: the size, steps, scheduler, guidance and clip skip are the first request's), with
/// the raw noise prediction supplied by the caller: `predict(model_input, timestep,
/// context)` gets the scaled latents (doubled for classifier-free guidance,
/// unconditional half first) and returns the UNet's output for them (the ControlNet
/// pipeline adds its residuals there). Each image keeps the noise of its own seed.
/// `cond` is the conditioning of those rows.
pub(crate) fn run_with(
    model: &StableDiffusion,
    requests: &[Resolved],
    predict: &dyn Fn(&Tensor, f64, &Conditioning) -> Tensor,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<Vec<GeneratedImage>>> {
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    let context = batch_text_context(model, requests)?;

    let mut scheduler = schedulers::build(first.scheduler, &model.scheduler_config, first.steps)?;
    let shape = first.latent_shape(model, model.vae.model.config.latent_channels);
    let plan = DrawPlan {
        shape: &shape,
        kind: model.dtype,
        vae_sample: None,
        steps: step_draws(scheduler.as_ref(), 0),
    };
    let noises: Vec<ImageNoise> = requests
        .iter()
        .flat_map(|r| draw_noises(r, &plan))
        .collect();
    let latents = stack_noise(&noises, model.device, |n| &n.initial) * scheduler.init_noise_sigma();
    let latents = denoise::denoise(
        model,
        scheduler.as_mut(),
        latents,
        0,
        &noises,
        &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
            let model_input = scheduler.scale_model_input(&first.guidance_batch(latents), i);
            apply_guidance(first, predict(&model_input, t, &context))
        },
        progress,
        cancel,
    )?;
    let pixels = model.decode(&latents);
    let mut offset = 0;
    requests
        .iter()
        .map(|r| {
            let images = generated_images(&pixels, offset, r, |i| r.metadata(model, i));
            offset += r.count;
            images
        })
        .collect()
}

/// The UNet's conditioning for `r.count` images: `[uncond..., cond...]` when guided
/// (diffusers' order).
pub(crate) fn text_context(model: &StableDiffusion, r: &Resolved) -> Result<Conditioning> {
    batch_text_context(model, std::slice::from_ref(r))
}

/// The text context for the images of every request, in the order of their latents:
/// every request's conditional rows, preceded when guided by all their unconditional
/// rows in the same order (as one request's context is laid out).
fn batch_text_context(model: &StableDiffusion, requests: &[Resolved]) -> Result<Conditioning> {
    let guided = requests.first().is_some_and(Resolved::guided);
    let mut conds = Vec::with_capacity(requests.len());
    let mut unconds = Vec::with_capacity(requests.len());
    for r in requests {
        let (cond, uncond) = denoise::encode_prompts(model, r, guided)?;
        conds.push(cond);
        unconds.extend(uncond);
    }
    let all = |parts: &[Conditioning]| Conditioning::cat(&parts.iter().collect::<Vec<_>>());
    let cond = all(&conds);
    Ok(if guided {
        Conditioning::cat(&[&all(&unconds), &cond])
    } else {
        cond
    })
}

/// The UNet's noise prediction for `latents` at loop index `i`, with classifier-free
/// guidance when the request is guided (`context` is then [unconditional, conditional]).
pub(crate) fn guided_prediction(
    model: &StableDiffusion,
    r: &Resolved,
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    i: usize,
    t: f64,
    cond: &Conditioning,
) -> Tensor {
    let model_input = scheduler.scale_model_input(&r.guidance_batch(latents), i);
    guided_unet(model, r, &model_input, t, cond)
}

/// The UNet's prediction for an already scaled (and, when guided, doubled) model input,
/// combined with classifier-free guidance.
pub(crate) fn guided_unet(
    model: &StableDiffusion,
    r: &Resolved,
    model_input: &Tensor,
    t: f64,
    cond: &Conditioning,
) -> Tensor {
    apply_guidance(r, model.unet.model.forward(model_input, t, cond))
}

/// The images of a run of one request.
pub(crate) fn only_request(per_request: Vec<Vec<GeneratedImage>>) -> Vec<GeneratedImage> {
    per_request.into_iter().flatten().collect()
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
