//! ControlNet generation, the same function as diffusers' `StableDiffusionControlNetPipeline`
//! with one ControlNet (guess mode off, control guidance over all steps): text-to-image in
//! which, at every step, the ControlNet sees the latents, the text and the control image,
//! and its scaled residuals are added to the UNet's skip connections and mid block.

use std::sync::atomic::AtomicBool;

use crate::pipelines::text_to_image;
use image::RgbImage;
use imagegen_crds::{GenerationParams, Strategy};
use tch::{Kind, Tensor};

use crate::error::{catch_torch, Error, Result};
use crate::family::Family;
use crate::image::canny::{canny_edges, check_thresholds, DEFAULT_HIGH, DEFAULT_LOW};
use crate::image::fit::round_down_to_side_multiple;
use crate::models::controlnet::ControlNetModel;
use crate::pipelines::text_to_image::{only_request, GeneratedImage, Progress, Resolved};
use crate::stable_diffusion::StableDiffusion;

/// diffusers' default `controlnet_conditioning_scale`.
pub const DEFAULT_CONTROL_SCALE: f64 = 1.0;
pub const MAX_CONTROL_SCALE: f64 = 10.0;

/// The request's width and height, defaulting (as diffusers does) to the control image's
/// size rounded down to a multiple of 8.
fn sized_like(params: &GenerationParams, image: &RgbImage) -> GenerationParams {
    GenerationParams {
        width: params
            .width
            .or(Some(round_down_to_side_multiple(image.width()))),
        height: params
            .height
            .or(Some(round_down_to_side_multiple(image.height()))),
        ..params.clone()
    }
}

fn control_scale(params: &GenerationParams) -> Result<f64> {
    let scale = params.control_scale.unwrap_or(DEFAULT_CONTROL_SCALE);
    if !scale.is_finite() || !(0.0..=MAX_CONTROL_SCALE).contains(&scale) {
        return Err(Error::invalid(
            "control_scale",
            format!("{scale} must be between 0 and {MAX_CONTROL_SCALE}"),
        ));
    }
    Ok(scale)
}

/// `image` resized to `width`×`height` exactly as diffusers' control image processor does
/// (PIL's Lanczos); unchanged when it already has that size.
fn resized(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    crate::image::processor::resize_rgb(image, width, height)
}

/// Generates `params.count` images guided by `control_image` through `controlnet`
/// (loaded on this model's device in its dtype). The control image is used as given
/// (for a canny ControlNet: white edges on black), resized to the output size, in
/// [0, 1] without normalisation. `params.control_scale` (default 1) multiplies the
/// ControlNet's residuals; 0 gives text-to-image's output. Width and height default
/// to the control image's size rounded down to a multiple of 8.
pub fn controlnet(
    model: &StableDiffusion,
    params: &GenerationParams,
    controlnet: &ControlNetModel,
    control_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    model.require_family(Family::StableDiffusion, "a ControlNet")?;
    let request = Resolved::new(&sized_like(params, control_image), model)?;
    let scale = control_scale(params)?;
    check_controlnet(model, controlnet)?;
    let unet = &model.unet.model;
    catch_torch(|| {
        tch::no_grad(|| {
            let image = control_condition(model, control_image, &request, controlnet.kind())?;
            text_to_image::run_with(
                model,
                std::slice::from_ref(&request),
                &|input, t, cond| {
                    let residuals = controlnet.forward(input, t, &cond.context, &image, scale);
                    unet.forward_with_control(input, t, cond, Some(&residuals))
                },
                progress,
                cancel,
            )
            .map(only_request)
        })
    })
}

/// Canny-guided image-to-image: the edges of `init_image` (resized to the output size
/// first, thresholds `params.canny_low`/`canny_high`, default 100 and 200) as the
/// control image of [`controlnet`](controlnet). Width and height default to the
/// input image's size rounded down to a multiple of 8.
pub fn canny_to_image(
    model: &StableDiffusion,
    params: &GenerationParams,
    controlnet: &ControlNetModel,
    init_image: &RgbImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    if let Some(strategy) = params.strategy {
        if strategy != Strategy::Canny {
            return Err(Error::invalid(
                "strategy",
                format!("{strategy:?} is not canny"),
            ));
        }
    }
    let low = params.canny_low.unwrap_or(DEFAULT_LOW);
    let high = params.canny_high.unwrap_or(DEFAULT_HIGH);
    check_thresholds(low, high)?;
    let params = sized_like(params, init_image);
    // Validate the request before the edge detection, whose cost grows with the image.
    Resolved::new(&params, model)?;
    control_scale(&params)?;
    let (width, height) = (params.width.expect("sized"), params.height.expect("sized"));
    let edges = canny_edges(&resized(init_image, width, height), low, high)?;
    self::controlnet(model, &params, controlnet, &edges, progress, cancel)
}

/// Refuses a ControlNet that does not fit this model or lives elsewhere.
fn check_controlnet(model: &StableDiffusion, controlnet: &ControlNetModel) -> Result<()> {
    let mismatch = |message: String| Err(Error::invalid("controlnet", message));
    let (cn, unet) = (&controlnet.config.unet, &model.unet.model.config);
    if cn.block_out_channels != unet.block_out_channels
        || controlnet.skip_count() != model.unet.model.skip_count()
    {
        return mismatch(format!(
            "its blocks ({:?} channels, {} skip connections) do not match the UNet's \
             ({:?}, {})",
            cn.block_out_channels,
            controlnet.skip_count(),
            unet.block_out_channels,
            model.unet.model.skip_count()
        ));
    }
    if cn.in_channels != unet.in_channels {
        return mismatch(format!(
            "it takes {}-channel latents, the UNet {}",
            cn.in_channels, unet.in_channels
        ));
    }
    if cn.context_dim() != unet.context_dim() {
        return mismatch(format!(
            "it attends to {}-wide text, the UNet to {}-wide",
            cn.context_dim(),
            unet.context_dim()
        ));
    }
    let vae_scale = model.vae.model.config.scale_factor();
    if controlnet.downscale_factor() != vae_scale {
        return mismatch(format!(
            "its conditioning embedding shrinks images {}×, the VAE {vae_scale}×",
            controlnet.downscale_factor()
        ));
    }
    if controlnet.kind() != model.dtype || controlnet.device() != model.device {
        return mismatch(format!(
            "loaded as {:?} on {:?}; the model runs as {:?} on {:?}",
            controlnet.kind(),
            controlnet.device(),
            model.dtype,
            model.device
        ));
    }
    Ok(())
}

/// The control image as the ControlNet's input: resized to the output size, RGB in
/// [0, 1], `[batch, 3, h, w]` with one copy per image and per guidance half.
fn control_condition(
    model: &StableDiffusion,
    image: &RgbImage,
    r: &Resolved,
    kind: Kind,
) -> Result<Tensor> {
    let image = resized(image, r.width, r.height);
    let pixels = Tensor::f_from_data_size(
        image.as_raw(),
        &[r.height as i64, r.width as i64, 3],
        Kind::Uint8,
    )?
    .permute([2, 0, 1])
    .to_kind(Kind::Float)
        / 255.0;
    let copies = r.count as i64 * if r.guided() { 2 } else { 1 };
    Ok(pixels
        .unsqueeze(0)
        .repeat([copies, 1, 1, 1])
        .to_kind(kind)
        .to_device(model.device))
}
