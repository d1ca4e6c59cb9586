//! Several text-to-image requests in one UNet batch: what a server does with compatible
//! queued requests (same size, steps, scheduler, guidance, clip skip and LoRAs; prompts,
//! negative prompts, seeds, counts and styles may differ). Each image keeps the noise of
//! its own seed, so it is the image the request would get alone, up to the floating-point
//! differences of a larger batch.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use imagegen_crds::{GenerationParams, Mode};
use tch::Tensor;

use crate::engine::StableDiffusion;
use crate::error::{catch_torch, Error, Result};
use crate::generate::{apply_style, resolve_mode, Inputs};
use crate::lora::Lora;
use crate::noise::{DrawPlan, ImageNoise};
use crate::pipeline::{
    draw_noises, stack_noise, step_draws, to_rgb, GeneratedImage, Progress, Resolved,
};
use crate::safety::GenerationOutcome;
use crate::schedulers::{self, Scheduler};
use crate::styles::StyleBook;
use crate::text_to_image::apply_guidance;

/// What must be equal for requests to share a batch.
fn batch_shape(r: &Resolved) -> (u32, u32, usize, String, u64, usize) {
    (
        r.width,
        r.height,
        r.steps,
        r.scheduler.to_string(),
        r.guidance.to_bits(),
        r.clip_skip,
    )
}

impl StableDiffusion {
    /// Text-to-image for every request in one denoising loop, with `loras` fused for all;
    /// one outcome per request, in order. Requests that cannot share a batch are refused
    /// (field `batch`); `progress` reports the shared loop.
    pub fn generate_batch(
        &self,
        requests: &[GenerationParams],
        loras: &[(Rc<Lora>, f64)],
        styles: &StyleBook,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GenerationOutcome>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut styled = Vec::with_capacity(requests.len());
        let mut resolved = Vec::with_capacity(requests.len());
        for params in requests {
            let (params, style) = apply_style(params, styles)?;
            if resolve_mode(&params, &Inputs::default())? != Mode::TextToImage {
                return Err(Error::invalid("batch", "only text-to-image requests batch"));
            }
            resolved.push(Resolved::new(&params, self)?);
            styled.push(style);
        }
        let shape = batch_shape(&resolved[0]);
        if resolved.iter().any(|r| batch_shape(r) != shape) {
            return Err(Error::invalid(
                "batch",
                "requests of one batch need the same size, steps, scheduler, guidance and clip skip",
            ));
        }
        self.require_plain_unet("text-to-image")?;
        // Restores the base weights when dropped: on return, error or panic.
        let _fused = if loras.is_empty() {
            None
        } else {
            Some(self.fuse_loras(loras)?)
        };
        let images = catch_torch(|| tch::no_grad(|| self.run_batch(&resolved, progress, cancel)))?;
        Ok(images
            .into_iter()
            .zip(styled)
            .map(|(mut images, style)| {
                if let Some(style) = style {
                    for image in &mut images {
                        style.postprocess(&mut image.image);
                    }
                }
                self.safety.apply(images)
            })
            .collect())
    }

    fn run_batch(
        &self,
        resolved: &[Resolved],
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<Vec<GeneratedImage>>> {
        let first = &resolved[0];
        let guided = first.guided();
        // Context rows in the order of the latents: every request's images, then (guided)
        // the same again with the negative prompts first, as the single pipeline does.
        let mut conds = Vec::new();
        let mut unconds = Vec::new();
        for r in resolved {
            let (cond, uncond) = self.encode_prompts(r, guided)?;
            conds.push(cond);
            unconds.extend(uncond);
        }
        let cond = Tensor::cat(&conds, 0);
        let context = if guided {
            Tensor::cat(&[Tensor::cat(&unconds, 0), cond], 0)
        } else {
            cond
        };
        let mut scheduler =
            schedulers::build(first.scheduler, &self.scheduler_config, first.steps)?;
        let shape = first.latent_shape(self, self.vae.model.config.latent_channels);
        let plan = DrawPlan {
            shape: &shape,
            kind: self.dtype,
            vae_sample: None,
            steps: step_draws(scheduler.as_ref(), 0),
        };
        let noises: Vec<ImageNoise> = resolved
            .iter()
            .flat_map(|r| draw_noises(r, &plan))
            .collect();
        let latents =
            stack_noise(&noises, self.device, |n| &n.initial) * scheduler.init_noise_sigma();
        let unet = &self.unet.model;
        let latents = self.denoise(
            scheduler.as_mut(),
            latents,
            0,
            &noises,
            &|scheduler: &dyn Scheduler, latents: &Tensor, i, t| {
                let model_input = scheduler.scale_model_input(&first.guidance_batch(latents), i);
                apply_guidance(first, unet.forward(&model_input, t, &context))
            },
            progress,
            cancel,
        )?;
        let pixels = self.decode(&latents);
        let mut offset = 0;
        let mut out = Vec::with_capacity(resolved.len());
        for r in resolved {
            let images = (0..r.count)
                .map(|i| {
                    Ok(GeneratedImage {
                        image: to_rgb(&pixels.get((offset + i) as i64))?,
                        metadata: r.metadata(self, i),
                        index: i,
                        flagged: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            offset += r.count;
            out.push(images);
        }
        Ok(out)
    }
}
