//! Text-to-image, the same function as diffusers' `StableDiffusionPipeline`: encode the
//! prompt and the negative prompt, denoise seeded latents with classifier-free guidance,
//! decode with the VAE.

use std::sync::atomic::AtomicBool;

use imagegen_crds::GenerationParams;
use tch::Tensor;

use crate::engine::StableDiffusion;
use crate::error::{catch_torch, Result};
use crate::noise::DrawPlan;
use crate::pipeline::{draw_noises, stack_noise};
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
        let (cond, uncond) = self.encode_prompts(r, r.guided())?;
        // diffusers orders the guided batch [unconditional..., conditional...].
        let context = match uncond {
            Some(uncond) => Tensor::cat(&[uncond, cond], 0),
            None => cond,
        };

        let mut scheduler = schedulers::build(r.scheduler, &self.scheduler_config, r.steps)?;
        let shape = r.latent_shape(self, self.vae.model.config.latent_channels);
        let noises = draw_noises(
            r,
            &DrawPlan {
                shape: &shape,
                kind: self.dtype,
                vae_sample: None,
                steps: if scheduler.needs_noise() {
                    scheduler.timesteps().len()
                } else {
                    0
                },
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
                self.guided_prediction(r, scheduler, latents, i, t, &context)
            },
            progress,
            cancel,
        )?;
        self.finish(r, &latents, |i| r.metadata(self, i))
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
        let model_input = if r.guided() {
            Tensor::cat(&[latents, latents], 0)
        } else {
            latents.shallow_clone()
        };
        let model_input = scheduler.scale_model_input(&model_input, i);
        let prediction = self.unet.model.forward(&model_input, t, context);
        if r.guided() {
            let halves = prediction.chunk(2, 0);
            &halves[0] + (&halves[1] - &halves[0]) * r.guidance
        } else {
            prediction
        }
    }
}
