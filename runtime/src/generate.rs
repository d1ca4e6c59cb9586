//! The one entry point every front end calls: applies the style preset, picks the mode from
//! the request and its inputs, runs the matching pipeline, then the style's correction.

use std::sync::atomic::AtomicBool;

use image::{DynamicImage, GrayImage};
use imagegen_crds::{GenerationParams, Mode};

use crate::engine::StableDiffusion;
use crate::error::{Error, Result};
use crate::styles::{Style, StyleBook};
use crate::text_to_image::{GeneratedImage, Progress};

/// Images that come with a request (decoded by the caller: files for the CLI, uploads for
/// the HTTP service).
#[derive(Default)]
pub struct Inputs {
    /// The image to transform, inpaint or outpaint.
    pub image: Option<DynamicImage>,
    /// The inpainting mask: white = repaint, black = keep.
    pub mask: Option<GrayImage>,
}

/// The mode a request asks for: explicit, or implied by what it carries.
pub fn resolve_mode(params: &GenerationParams, inputs: &Inputs) -> Result<Mode> {
    let mode = params.mode.unwrap_or(if params.outpaint.is_some() {
        Mode::Outpaint
    } else if inputs.mask.is_some() {
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
    if matches!(mode, Mode::Inpaint | Mode::RemoveObject) && inputs.mask.is_none() {
        return Err(Error::invalid("mask", format!("{mode:?} needs a mask")));
    }
    if mode == Mode::TextToImage && (inputs.image.is_some() || inputs.mask.is_some()) {
        return Err(Error::invalid(
            "mode",
            "TextToImage takes no input image or mask",
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

impl StableDiffusion {
    /// Generates what `params` asks for. `progress` is called after every denoising step;
    /// setting `cancel` stops between steps with [`Error::Cancelled`].
    pub fn generate(
        &self,
        params: &GenerationParams,
        inputs: &Inputs,
        styles: &StyleBook,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<GeneratedImage>> {
        let (params, style) = apply_style(params, styles)?;
        let mode = resolve_mode(&params, inputs)?;
        let mut images = match mode {
            Mode::TextToImage => self.text_to_image(&params, progress, cancel)?,
            other => {
                return Err(Error::invalid(
                    "mode",
                    format!("{other:?} is not available in this build"),
                ))
            }
        };
        if let Some(style) = style {
            for image in &mut images {
                style.postprocess(&mut image.image);
            }
        }
        Ok(images)
    }
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

    #[test]
    fn mode_follows_the_inputs() {
        let image = || Some(DynamicImage::new_rgb8(8, 8));
        let mask = || Some(GrayImage::new(8, 8));
        assert_eq!(
            resolve_mode(&params(), &Inputs::default()).unwrap(),
            Mode::TextToImage
        );
        let with_image = Inputs {
            image: image(),
            mask: None,
        };
        assert_eq!(
            resolve_mode(&params(), &with_image).unwrap(),
            Mode::ImageToImage
        );
        let with_mask = Inputs {
            image: image(),
            mask: mask(),
        };
        assert_eq!(resolve_mode(&params(), &with_mask).unwrap(), Mode::Inpaint);
        let outpaint = GenerationParams {
            outpaint: Some(Default::default()),
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
                image: Some(DynamicImage::new_rgb8(8, 8)),
                mask: None,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("mask"), "{err}");
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
}
