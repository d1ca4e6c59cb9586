//! What the UNet is conditioned on, from the request's prompts: SD's text embeddings, or
//! SDXL's two encoders' hidden states with the pooled text and the time ids
//! (diffusers' `encode_prompt` and `_get_add_time_ids`).

use tch::Tensor;

use crate::error::Result;
use crate::family::Family;
use crate::models::unet::{AddedConditioning, Conditioning};
use crate::pipelines::denoise::Resolved;
use crate::stable_diffusion::StableDiffusion;

/// diffusers' defaults for a refiner's aesthetic-score time id.
pub const AESTHETIC_SCORE: f64 = 6.0;
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

/// The prompt's conditioning and, when `negative` is set, the negative prompt's, each
/// repeated for every image. diffusers applies clip skip to the prompt only: the
/// negative side always uses the default layer.
pub fn encode_prompts(
    model: &StableDiffusion,
    r: &Resolved,
    negative: bool,
) -> Result<(Conditioning, Option<Conditioning>)> {
    let count = r.count as i64;
    let (cond, uncond) = match model.family() {
        Family::StableDiffusion => {
            let cond = Conditioning::text(model.encode_text(&[&r.prompt], r.clip_skip)?);
            let uncond = negative
                .then(|| {
                    model
                        .encode_text(&[r.negative()], 0)
                        .map(Conditioning::text)
                })
                .transpose()?;
            (cond, uncond)
        }
        Family::Sdxl => {
            let (context, pooled) = sdxl_text(model, &r.prompt, r.clip_skip)?;
            let zeros = r.negative_prompt.is_none() && model.index.force_zeros_for_empty_prompt;
            let uncond = match (negative, zeros) {
                (false, _) => None,
                (true, true) => Some((context.zeros_like(), pooled.zeros_like())),
                (true, false) => Some(sdxl_text(model, r.negative(), 0)?),
            };
            let cond = sdxl_conditioning(model, r, context, pooled, AESTHETIC_SCORE);
            let uncond = uncond.map(|(context, pooled)| {
                sdxl_conditioning(model, r, context, pooled, NEGATIVE_AESTHETIC_SCORE)
            });
            (cond, uncond)
        }
    };
    Ok((cond.repeat(count), uncond.map(|u| u.repeat(count))))
}

/// SDXL's text for one prompt: every encoder's hidden states `clip_skip + 1` layers before
/// the end, side by side (`[1, tokens, sum of widths]`), and the last encoder's pooled,
/// projected output (`[1, pooled]`).
fn sdxl_text(model: &StableDiffusion, text: &str, clip_skip: usize) -> Result<(Tensor, Tensor)> {
    let mut hidden = Vec::with_capacity(model.text_encoders.len());
    let mut pooled = None;
    for encoder in &model.text_encoders {
        let ids = encoder.token_ids(&[text], model.device)?;
        let out = tch::no_grad(|| encoder.model.encode_hidden(&ids, clip_skip));
        hidden.push(out.hidden);
        pooled = out.pooled.or(pooled);
    }
    let pooled = pooled.expect("the last SDXL text encoder has a projection (checked at load)");
    Ok((
        Tensor::cat(&hidden, -1).to_kind(model.dtype),
        pooled.to_kind(model.dtype),
    ))
}

/// One prompt's SDXL conditioning with its time ids: the original size, the crop's
/// top-left corner (0, 0), then the target size, or for a refiner the aesthetic score.
fn sdxl_conditioning(
    model: &StableDiffusion,
    r: &Resolved,
    context: Tensor,
    pooled: Tensor,
    aesthetic_score: f64,
) -> Conditioning {
    let (h, w) = (f64::from(r.height), f64::from(r.width));
    let ids: Vec<f64> = if model.index.requires_aesthetics_score {
        vec![h, w, 0.0, 0.0, aesthetic_score]
    } else {
        vec![h, w, 0.0, 0.0, h, w]
    };
    let time_ids = Tensor::from_slice(&ids)
        .to_kind(model.dtype)
        .unsqueeze(0)
        .to_device(model.device);
    Conditioning {
        context,
        added: Some(AddedConditioning {
            text_embeds: pooled,
            time_ids,
        }),
    }
}

/// `[unconditional, conditional]` when guided (diffusers' order), else the conditional.
pub fn guidance_pair(cond: Conditioning, uncond: Option<Conditioning>) -> Conditioning {
    match uncond {
        Some(uncond) => Conditioning::cat(&[&uncond, &cond]),
        None => cond,
    }
}
