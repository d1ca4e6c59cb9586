//! Text-to-image, the same function as diffusers' `StableDiffusionPipeline`: encode the
//! prompt and the negative prompt, denoise seeded latents with classifier-free guidance,
//! decode with the VAE.

use std::sync::atomic::AtomicBool;

use imagegen_crds::GenerationParams;
use tch::Tensor;

use crate::engine::StableDiffusion;
use crate::error::{catch_torch, Result};
use crate::noise::DrawPlan;
use crate::pipeline::{draw_noises, stack_noise, step_draws};
pub use crate::pipeline::{
    to_rgb, GeneratedImage, Progress, Resolved, DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_COUNT,
    MAX_SIDE, MAX_STEPS,
};
use crate::schedulers::{self, Scheduler};

impl StableDiffusion {
    /// Generates `params.count` images. `progress` is called after every step; setting
    /// `cancel` stops the run between steps with [`crate::Error::Cancelled`].
    pub fn text_to_image(
        &self,
        params: &GenerationParams,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let request = Resolved::new(params, self)?;
        self.require_plain_unet("text-to-image")?;
        catch_torch(|| tch::no_grad(|| self.run(&request, progress, cancel)))
    }

    fn run(
        &self,
        r: &Resolved,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let unet = &self.unet.model;
        self.run_with(
            r,
            &|input, t, context| unet.forward(input, t, context),
            progress,
            cancel,
        )
    }

    /// The text-to-image loop with the raw noise prediction supplied by the caller:
    /// `predict(model_input, timestep, context)` gets the scaled latents (doubled for
    /// classifier-free guidance, unconditional half first) and returns the UNet's output
    /// for them (the ControlNet pipeline adds its residuals there).
    pub(crate) fn run_with(
        &self,
        r: &Resolved,
        predict: &dyn Fn(&Tensor, f64, &Tensor) -> Tensor,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let context = self.text_context(r)?;

        let mut scheduler = schedulers::build(r.scheduler, &self.scheduler_config, r.steps)?;
        let shape = r.latent_shape(self, self.vae.model.config.latent_channels);
        let noises = draw_noises(
            r,
            &DrawPlan {
                shape: &shape,
                kind: self.dtype,
                vae_sample: None,
                steps: step_draws(scheduler.as_ref(), 0),
            },
        );
        let latents =
            stack_noise(&noises, self.device, |n| &n.initial) * scheduler.init_noise_sigma();
        let latents = self.denoise(
            scheduler.as_mut(),
            latents,
            0,
            &noises,
            &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
                let model_input = scheduler.scale_model_input(&r.guidance_batch(latents), i);
                apply_guidance(r, predict(&model_input, t, &context))
            },
            progress,
            cancel,
        )?;
        self.finish(r, &latents, |i| r.metadata(self, i))
    }

    /// The UNet's text context for `r.count` images: `[uncond..., cond...]` when guided
    /// (diffusers' order).
    pub(crate) fn text_context(&self, r: &Resolved) -> Result<Tensor> {
        let (cond, uncond) = self.encode_prompts(r, r.guided())?;
        Ok(match uncond {
            Some(uncond) => Tensor::cat(&[uncond, cond], 0),
            None => cond,
        })
    }

    /// The UNet's noise prediction for `latents` at loop index `i`, with classifier-free
    /// guidance when the request is guided (`context` is then [unconditional, conditional]).
    pub(crate) fn guided_prediction(
        &self,
        r: &Resolved,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        i: usize,
        t: f64,
        context: &Tensor,
    ) -> Tensor {
        let model_input = scheduler.scale_model_input(&r.guidance_batch(latents), i);
        self.guided_unet(r, &model_input, t, context)
    }

    /// The UNet's prediction for an already scaled (and, when guided, doubled) model input,
    /// combined with classifier-free guidance.
    pub(crate) fn guided_unet(
        &self,
        r: &Resolved,
        model_input: &Tensor,
        t: f64,
        context: &Tensor,
    ) -> Tensor {
        apply_guidance(r, self.unet.model.forward(model_input, t, context))
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
