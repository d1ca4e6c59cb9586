//! Several text-to-image requests in one UNet batch: what a server does with compatible
//! queued requests (same size, steps, scheduler, guidance, clip skip and LoRAs; prompts,
//! negative prompts, seeds, counts and styles may differ). Each image keeps the noise of
//! its own seed, so it is the image the request would get alone, up to the floating-point
//! differences of a larger batch.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use crate::error::{catch_torch, Error, Result};
use crate::lora;
use crate::lora::Lora;
use crate::outcome::GenerationOutcome;
use crate::pipelines::denoise::{Progress, Resolved};
use crate::pipelines::generate::{apply_style, resolve_mode, Inputs};
use crate::pipelines::text_to_image;
use crate::stable_diffusion::StableDiffusion;
use crate::styles::StyleBook;
use imagegen_crds::{GenerationParams, Mode};

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

/// Text-to-image for every request in one denoising loop, with `loras` fused for all;
/// one outcome per request, in order. Requests that cannot share a batch are refused
/// (field `batch`); `progress` reports the shared loop.
pub fn generate_batch(
    model: &StableDiffusion,
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
        resolved.push(Resolved::new(&params, model)?);
        styled.push(style);
    }
    let shape = batch_shape(&resolved[0]);
    if resolved.iter().any(|r| batch_shape(r) != shape) {
        return Err(Error::invalid(
            "batch",
            "requests of one batch need the same size, steps, scheduler, guidance and clip skip",
        ));
    }
    model.require_plain_unet("text-to-image")?;
    // Restores the base weights when dropped: on return, error or panic.
    let _fused = if loras.is_empty() {
        None
    } else {
        Some(lora::fuse_loras(model, loras)?)
    };
    let images =
        catch_torch(|| tch::no_grad(|| text_to_image::run(model, &resolved, progress, cancel)))?;
    Ok(images
        .into_iter()
        .zip(styled)
        .map(|(mut images, style)| {
            if let Some(style) = style {
                for image in &mut images {
                    style.postprocess(&mut image.image);
                }
            }
            model.safety.apply(images)
        })
        .collect())
}
