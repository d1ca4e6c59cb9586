//! The one entry point every front end calls: applies the style preset, picks the mode from
//! the request and its inputs, runs the matching pipeline, then the style's correction.
//!
//! The pipelines it calls are each the same function as their diffusers counterpart. What
//! this layer adds is product behaviour on top: mask grow and blur, generating only the
//! masked region at full resolution, outpainting's canvas, object removal's prompts, and
//! pasting inpainted pixels back so that everything outside the (blurred) mask keeps the
//! input's exact pixels rather than the VAE's approximation of them.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use crate::lora;
use crate::pipelines::{controlnet, image_to_image, inpaint, refiner, text_to_image};
use image::{DynamicImage, GrayImage, RgbImage};
use imagegen_crds::{GenerationParams, Mode, Strategy};

use crate::error::{Error, Result};
use crate::image::canvas::{self, Rect};
use crate::image::mask;
use crate::lora::Lora;
use crate::models::controlnet::ControlNetModel;
use crate::outcome::GenerationOutcome;
use crate::pipelines::mask_prompt::{MaskFinder, MaskOptions};
use crate::pipelines::text_to_image::{GeneratedImage, Progress};
use crate::stable_diffusion::StableDiffusion;
use crate::styles::{Style, StyleBook};

/// Gaussian blur (sigma, pixels) of the mask's edge when pasting inpainted pixels back.
pub const DEFAULT_MASK_BLUR: u32 = 4;
pub const MAX_MASK_BLUR: u32 = 64;
pub const MAX_MASK_GROW: u32 = 256;
/// Context kept around the mask when generating only the masked region.
pub const DEFAULT_ONLY_MASKED_PADDING: u32 = 32;
/// Object removal asks for what is behind the object...
pub const REMOVE_OBJECT_PROMPT: &str = "background";
/// ...and away from things that look like one.
pub const REMOVE_OBJECT_NEGATIVE: &str = "object, person, animal, text, watermark";

/// Images that come with a request (decoded by the caller: files for the CLI, uploads for
/// the HTTP service), and the ControlNet for the canny strategy.
#[derive(Default)]
pub struct Inputs<'a> {
    /// The image to transform, inpaint or outpaint.
    pub image: Option<DynamicImage>,
    /// The inpainting mask: white = repaint, black = keep.
    pub mask: Option<GrayImage>,
    pub controlnet: Option<&'a ControlNetModel>,
    /// An SDXL refiner: text-to-image hands over to it at `high_noise_fraction`.
    pub refiner: Option<&'a StableDiffusion>,
    /// LoRAs (loaded for this model) and their weights, fused into the UNet and the text
    /// encoder for the duration of the call and removed after, whatever its outcome.
    pub loras: Vec<(Rc<Lora>, f64)>,
    /// A mask to find from text when `mask` is absent: it is found on the input image
    /// first, then the request runs as with a drawn mask.
    pub mask_prompt: Option<MaskPrompt<'a>>,
}

/// What to mask, described in words, and the model that finds it.
pub struct MaskPrompt<'a> {
    pub finder: &'a MaskFinder,
    /// The mask is the union of what each prompt finds.
    pub prompts: Vec<String>,
    /// What to leave out of the mask even where a prompt finds it.
    pub negative: Option<String>,
    pub options: MaskOptions,
}

/// The mode a request asks for: explicit, or implied by what it carries.
pub fn resolve_mode(params: &GenerationParams, inputs: &Inputs) -> Result<Mode> {
    let has_mask = inputs.mask.is_some() || inputs.mask_prompt.is_some();
    let mode = params.mode.unwrap_or(if params.outpaint.is_some() {
        Mode::Outpaint
    } else if has_mask {
        Mode::Inpaint
    } else if inputs.image.is_some() {
        Mode::ImageToImage
    } else {
        Mode::TextToImage
    });
    let needs_image = !matches!(mode, Mode::TextToImage);
    if needs_image && inputs.image.is_none() {
        return Err(Error::invalid(
            "image",
            format!("{mode:?} needs an input image"),
        ));
    }
    if matches!(mode, Mode::Inpaint | Mode::RemoveObject) && !has_mask {
        return Err(Error::invalid("mask", format!("{mode:?} needs a mask")));
    }
    if mode == Mode::TextToImage && (inputs.image.is_some() || has_mask) {
        return Err(Error::invalid(
            "mode",
            "TextToImage takes no input image or mask",
        ));
    }
    if mode == Mode::Outpaint && params.outpaint.unwrap_or_default() == Default::default() {
        return Err(Error::invalid(
            "outpaint",
            "give at least one margin to extend",
        ));
    }
    Ok(mode)
}

/// The request with the style's prompt and negative prompt in place of the user's.
pub fn apply_style<'a>(
    params: &GenerationParams,
    styles: &'a StyleBook,
) -> Result<(GenerationParams, Option<&'a Style>)> {
    let Some(id) = params.style.as_deref() else {
        return Ok((params.clone(), None));
    };
    let style = styles.get(id)?;
    let (prompt, negative_prompt) = style.apply(&params.prompt, params.negative_prompt.as_deref());
    Ok((
        GenerationParams {
            prompt,
            negative_prompt,
            ..params.clone()
        },
        Some(style),
    ))
}

/// Object removal: an empty prompt asks for the background, and the negative prompt steers
/// away from objects unless the user gave one.
pub fn remove_object_params(params: &GenerationParams) -> GenerationParams {
    let prompt = if params.prompt.trim().is_empty() {
        REMOVE_OBJECT_PROMPT.to_string()
    } else {
        params.prompt.clone()
    };
    GenerationParams {
        prompt,
        negative_prompt: Some(
            params
                .negative_prompt
                .clone()
                .unwrap_or_else(|| REMOVE_OBJECT_NEGATIVE.to_string()),
        ),
        ..params.clone()
    }
}

/// The mask after `mask_grow`, and the blur to paste back with, both checked.
fn prepared_mask(params: &GenerationParams, mask: &GrayImage) -> Result<(GrayImage, u32)> {
    let grow = params.mask_grow.unwrap_or(0);
    if grow > MAX_MASK_GROW {
        return Err(Error::invalid(
            "mask_grow",
            format!("{grow} must be at most {MAX_MASK_GROW} pixels"),
        ));
    }
    let blur = params.mask_blur.unwrap_or(DEFAULT_MASK_BLUR);
    if blur > MAX_MASK_BLUR {
        return Err(Error::invalid(
            "mask_blur",
            format!("{blur} must be at most {MAX_MASK_BLUR} pixels"),
        ));
    }
    let grown = if grow > 0 {
        mask::grow(mask, grow)
    } else {
        mask.clone()
    };
    Ok((grown, blur))
}

/// The refiner a text-to-image request hands over to: the one given, unless the request
/// sets `high_noise_fraction` to 1 (the base alone). A fraction below 1 without a refiner
/// is an error.
fn refiner_for<'a>(
    params: &GenerationParams,
    inputs: &Inputs<'a>,
) -> Result<Option<&'a StableDiffusion>> {
    match (inputs.refiner, params.high_noise_fraction) {
        (_, Some(1.0)) => Ok(None),
        (Some(refiner), _) => Ok(Some(refiner)),
        (None, Some(_)) => Err(Error::invalid(
            "high_noise_fraction",
            "this model has no refiner to hand over to",
        )),
        (None, None) => Ok(None),
    }
}

/// Generates what `params` asks for. `progress` is called after every denoising step;
/// setting `cancel` stops between steps with [`Error::Cancelled`]. The images then go
/// through the model's safety policy ([`crate::safety`]): with `Block`, flagged images
/// are left out of the outcome's images and listed in its `withheld`.
pub fn generate(
    model: &StableDiffusion,
    params: &GenerationParams,
    inputs: &Inputs,
    styles: &StyleBook,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<GenerationOutcome> {
    if let (None, Some(wanted), Some(image)) = (&inputs.mask, &inputs.mask_prompt, &inputs.image) {
        resolve_mode(params, inputs)?;
        let found = wanted.finder.find(
            &image.to_rgb8(),
            &wanted.prompts,
            wanted.negative.as_deref(),
            &wanted.options,
        )?;
        if found.pixels().all(|p| p[0] == 0) {
            return Err(Error::invalid(
                "mask_prompt",
                format!(
                    "nothing in the image matched {:?} above the threshold {}",
                    wanted.prompts, wanted.options.threshold
                ),
            ));
        }
        let with_mask = Inputs {
            image: inputs.image.clone(),
            mask: Some(found),
            controlnet: inputs.controlnet,
            refiner: inputs.refiner,
            loras: inputs.loras.clone(),
            mask_prompt: None,
        };
        return generate(model, params, &with_mask, styles, progress, cancel);
    }
    let (params, style) = apply_style(params, styles)?;
    let mode = resolve_mode(&params, inputs)?;
    if mode != Mode::TextToImage && params.high_noise_fraction.is_some_and(|f| f < 1.0) {
        return Err(Error::invalid(
            "high_noise_fraction",
            "the refiner hand-off is for text-to-image",
        ));
    }
    // Restores the base weights when dropped: on return, error or panic.
    let _fused = if inputs.loras.is_empty() {
        None
    } else {
        Some(lora::fuse_loras(model, &inputs.loras)?)
    };
    let image = || {
        inputs
            .image
            .as_ref()
            .map(DynamicImage::to_rgb8)
            .expect("checked by resolve_mode")
    };
    let mask = || inputs.mask.as_ref().expect("checked by resolve_mode");
    let mut images = match mode {
        Mode::TextToImage => match refiner_for(&params, inputs)? {
            Some(refiner) => {
                refiner::text_to_image_refined(model, refiner, &params, progress, cancel)?
            }
            None => text_to_image::text_to_image(model, &params, progress, cancel)?,
        },
        Mode::ImageToImage => match params.strategy.unwrap_or(Strategy::Sdedit) {
            Strategy::Sdedit => image_to_image::sdedit(model, &params, &image(), progress, cancel)?,
            Strategy::Instruct => {
                image_to_image::instruct(model, &params, &image(), progress, cancel)?
            }
            Strategy::Canny => {
                let controlnet = inputs.controlnet.ok_or_else(|| {
                    Error::invalid("controlnet", "the canny strategy needs a ControlNet model")
                })?;
                controlnet::canny_to_image(model, &params, controlnet, &image(), progress, cancel)?
            }
        },
        Mode::Inpaint => inpaint_and_paste(model, &params, &image(), mask(), progress, cancel)?,
        Mode::RemoveObject => inpaint_and_paste(
            model,
            &remove_object_params(&params),
            &image(),
            mask(),
            progress,
            cancel,
        )?,
        Mode::Outpaint => {
            let margins = params.outpaint.unwrap_or_default();
            let (canvas, new_area) = canvas::extend_canvas(
                &image(),
                margins.left,
                margins.right,
                margins.top,
                margins.bottom,
            )?;
            // The canvas sets the size; only the new area is generated.
            let sized = GenerationParams {
                width: None,
                height: None,
                only_masked: None,
                ..params.clone()
            };
            inpaint_and_paste(model, &sized, &canvas, &new_area, progress, cancel)?
        }
    };
    if let Some(style) = style {
        for image in &mut images {
            style.postprocess(&mut image.image);
        }
    }
    Ok(model.safety.apply(images))
}

/// Inpaints `original` where `mask` is white and pastes the result back with the
/// blurred mask. With `only_masked`, only a crop around the mask is generated (at the
/// requested size, default the model's native square), which gives small areas (a face
/// in an avatar) the model's full resolution.
fn inpaint_and_paste(
    model: &StableDiffusion,
    params: &GenerationParams,
    original: &RgbImage,
    mask: &GrayImage,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Vec<GeneratedImage>> {
    mask::check_same_size(original, mask)?;
    let (mask, blur) = prepared_mask(params, mask)?;
    let (region, generated) = if params.only_masked.unwrap_or(false) {
        let native = u32::try_from(model.native_size()).unwrap_or(512);
        let width = params.width.unwrap_or(native);
        let height = params.height.unwrap_or(native);
        let padding = params
            .only_masked_padding
            .unwrap_or(DEFAULT_ONLY_MASKED_PADDING);
        let region = canvas::crop_region(&mask, width, height, padding);
        let crop = |img: &RgbImage| {
            image::imageops::crop_imm(img, region.x, region.y, region.width, region.height)
                .to_image()
        };
        let crop_mask =
            image::imageops::crop_imm(&mask, region.x, region.y, region.width, region.height)
                .to_image();
        let sized = GenerationParams {
            width: Some(width),
            height: Some(height),
            ..params.clone()
        };
        (
            region,
            inpaint::inpaint(model, &sized, &crop(original), &crop_mask, progress, cancel)?,
        )
    } else {
        let whole = Rect {
            x: 0,
            y: 0,
            width: original.width(),
            height: original.height(),
        };
        (
            whole,
            inpaint::inpaint(model, params, original, &mask, progress, cancel)?,
        )
    };
    generated
        .into_iter()
        .map(|mut g| {
            g.image = canvas::paste_back(original, &g.image, region, &mask, blur)?;
            g.metadata.width = original.width();
            g.metadata.height = original.height();
            Ok(g)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a cat".into(),
            ..Default::default()
        }
    }

    fn image() -> Option<DynamicImage> {
        Some(DynamicImage::new_rgb8(8, 8))
    }

    #[test]
    fn mode_follows_the_inputs() {
        let mask = || Some(GrayImage::new(8, 8));
        assert_eq!(
            resolve_mode(&params(), &Inputs::default()).unwrap(),
            Mode::TextToImage
        );
        let with_image = Inputs {
            image: image(),
            ..Default::default()
        };
        assert_eq!(
            resolve_mode(&params(), &with_image).unwrap(),
            Mode::ImageToImage
        );
        let with_mask = Inputs {
            image: image(),
            mask: mask(),
            ..Default::default()
        };
        assert_eq!(resolve_mode(&params(), &with_mask).unwrap(), Mode::Inpaint);
        let outpaint = GenerationParams {
            outpaint: Some(imagegen_crds::Outpaint {
                left: 8,
                ..Default::default()
            }),
            ..params()
        };
        assert_eq!(
            resolve_mode(&outpaint, &with_image).unwrap(),
            Mode::Outpaint
        );
    }

    #[test]
    fn missing_inputs_name_the_field() {
        let inpaint = GenerationParams {
            mode: Some(Mode::Inpaint),
            ..params()
        };
        let err = resolve_mode(&inpaint, &Inputs::default()).unwrap_err();
        assert!(err.to_string().contains("image"), "{err}");
        let err = resolve_mode(
            &inpaint,
            &Inputs {
                image: image(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("mask"), "{err}");
        let empty_outpaint = GenerationParams {
            outpaint: Some(Default::default()),
            ..params()
        };
        let err = resolve_mode(
            &empty_outpaint,
            &Inputs {
                image: image(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("outpaint"), "{err}");
    }

    #[test]
    fn style_replaces_prompt_and_negative() {
        let book = StyleBook::builtin();
        let styled = GenerationParams {
            style: Some("black-and-white".into()),
            negative_prompt: Some("blurry".into()),
            ..params()
        };
        let (applied, style) = apply_style(&styled, &book).unwrap();
        assert!(style.is_some());
        assert!(
            applied.prompt.contains("a cat") && applied.prompt != "a cat",
            "{}",
            applied.prompt
        );
        assert!(applied.negative_prompt.unwrap().starts_with("blurry"));
        let unknown = GenerationParams {
            style: Some("nope".into()),
            ..params()
        };
        let err = apply_style(&unknown, &book).unwrap_err();
        assert!(
            err.to_string().contains("black-and-white"),
            "lists valid ids: {err}"
        );
    }

    #[test]
    fn object_removal_prompts() {
        let empty = GenerationParams {
            prompt: "  ".into(),
            ..Default::default()
        };
        let removal = remove_object_params(&empty);
        assert_eq!(removal.prompt, REMOVE_OBJECT_PROMPT);
        assert_eq!(
            removal.negative_prompt.as_deref(),
            Some(REMOVE_OBJECT_NEGATIVE)
        );
        let own = GenerationParams {
            prompt: "grass".into(),
            negative_prompt: Some("dog".into()),
            ..Default::default()
        };
        let removal = remove_object_params(&own);
        assert_eq!(
            (removal.prompt.as_str(), removal.negative_prompt.as_deref()),
            ("grass", Some("dog"))
        );
    }

    #[test]
    fn mask_limits() {
        let mask = GrayImage::new(8, 8);
        let grow = GenerationParams {
            mask_grow: Some(MAX_MASK_GROW + 1),
            ..params()
        };
        assert!(prepared_mask(&grow, &mask)
            .unwrap_err()
            .to_string()
            .contains("mask_grow"));
        let blur = GenerationParams {
            mask_blur: Some(MAX_MASK_BLUR + 1),
            ..params()
        };
        assert!(prepared_mask(&blur, &mask)
            .unwrap_err()
            .to_string()
            .contains("mask_blur"));
    }
}
