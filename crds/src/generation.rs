//! What one text-to-image request asks for. Every field but the prompt is optional: an
//! absent one takes the served model's default (its native size, its scheduler).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest prompt or negative prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: u32 = 2000;
/// Largest width or height, in pixels (the runtime's limit).
pub const MAX_SIDE: u32 = 2048;
/// Width and height must be multiples of this (the VAE's downscale factor).
pub const SIDE_MULTIPLE: u32 = 8;
/// Most denoising steps per image (the runtime's limit).
pub const MAX_STEPS: u32 = 500;
/// Most images per request (the runtime's limit).
pub const MAX_COUNT: u32 = 16;
/// Widest mask edge blur, in pixels (the runtime's limit).
pub const MAX_MASK_BLUR: u32 = 64;
/// Most pixels a mask may be grown by (the runtime's limit).
pub const MAX_MASK_GROW: u32 = 256;
/// The scheduler names the runtime accepts.
pub const SCHEDULERS: [&str; 6] = [
    "ddim",
    "pndm",
    "euler",
    "euler-a",
    "dpmpp-2m",
    "dpmpp-2m-karras",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationParams {
    /// What to draw.
    #[schemars(length(max = MAX_PROMPT_CHARS))]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PROMPT_CHARS))]
    pub negative_prompt: Option<String>,
    /// Output width in pixels, a multiple of 8. Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = SIDE_MULTIPLE, max = MAX_SIDE), extend("multipleOf" = SIDE_MULTIPLE))]
    pub width: Option<u32>,
    /// Output height in pixels, a multiple of 8. Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = SIDE_MULTIPLE, max = MAX_SIDE), extend("multipleOf" = SIDE_MULTIPLE))]
    pub height: Option<u32>,
    /// Denoising steps. Default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_STEPS))]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; 1 or less turns guidance off. Default 7.5 (SDXL: 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub guidance_scale: Option<f64>,
    /// ddim, pndm, euler, euler-a, dpmpp-2m or dpmpp-2m-karras. Default: the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = SCHEDULERS))]
    pub scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i. Default: a random seed, reported back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many images. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub count: Option<u32>,
    /// Skip this many final text-encoder layers ("clip skip"). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// What to do; default: TextToImage without an input image, ImageToImage with one,
    /// Inpaint with a mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// A style preset's id (`imagegen styles` lists them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// How image-to-image uses the input image. Default: sdedit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// sdedit and inpainting: how much of the input to repaint, 0 (nothing) to 1 (all).
    /// Default 0.75 for sdedit, 1.0 for inpainting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub strength: Option<f64>,
    /// instruct: how closely to follow the input image. Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_guidance_scale: Option<f64>,
    /// canny: the ControlNet's conditioning scale. Default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_scale: Option<f64>,
    /// canny: hysteresis thresholds of the edge detector (0-255). Default 100 and 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 255.0))]
    pub canny_low: Option<f32>,
    /// canny: the upper hysteresis threshold (0-255). Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 255.0))]
    pub canny_high: Option<f32>,
    /// Inpainting: Gaussian blur of the mask edge, in pixels. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_MASK_BLUR))]
    pub mask_blur: Option<u32>,
    /// Inpainting: grow the mask by this many pixels before blurring. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_MASK_GROW))]
    pub mask_grow: Option<u32>,
    /// Inpainting: generate only a crop around the mask at full resolution and paste it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_masked: Option<bool>,
    /// Inpainting with only_masked: context kept around the mask, in pixels. Default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_masked_padding: Option<u32>,
    /// Outpainting: pixels added on each side of the input image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outpaint: Option<Outpaint>,
    /// SDXL text-to-image where the model has a refiner: the share of the noise schedule
    /// the base model denoises before the refiner takes over. 1 leaves the refiner out.
    /// Default 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub high_noise_fraction: Option<f64>,
}

/// The kind of generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    TextToImage,
    ImageToImage,
    /// Repaint the masked area (mask: white = repaint, black = keep).
    Inpaint,
    /// Extend the canvas (see `outpaint`) and fill the new area.
    Outpaint,
    /// Inpaint the masked area with the background: the prompt describes what should be
    /// there instead (default "background").
    RemoveObject,
}

/// How image-to-image uses its input image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Noise the input to `strength` and denoise it (SDEdit; diffusers' img2img).
    Sdedit,
    /// Follow an edit instruction (InstructPix2Pix; needs an 8-channel UNet).
    Instruct,
    /// Keep the input's canny edges with a ControlNet.
    Canny,
}

/// Pixels to add on each side when outpainting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Outpaint {
    #[serde(default)]
    pub left: u32,
    #[serde(default)]
    pub right: u32,
    #[serde(default)]
    pub top: u32,
    #[serde(default)]
    pub bottom: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_round_trip() {
        let json =
            r#"{"prompt":"a cat","negativePrompt":"blurry","guidanceScale":5.0,"clipSkip":1}"#;
        let params: GenerationParams = serde_json::from_str(json).unwrap();
        assert_eq!(params.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(params.guidance_scale, Some(5.0));
        assert_eq!(serde_json::to_string(&params).unwrap(), json);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err =
            serde_json::from_str::<GenerationParams>(r#"{"prompt":"x","stepz":3}"#).unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
    }

    #[test]
    fn modes_and_strategies_serialize_as_the_api_spells_them() {
        let json = r#"{"prompt":"x","mode":"Inpaint","strategy":"canny","outpaint":{"left":64}}"#;
        let params: GenerationParams = serde_json::from_str(json).unwrap();
        assert_eq!(params.mode, Some(Mode::Inpaint));
        assert_eq!(params.strategy, Some(Strategy::Canny));
        assert_eq!(
            params.outpaint,
            Some(Outpaint {
                left: 64,
                ..Default::default()
            })
        );
        assert!(
            serde_json::from_str::<GenerationParams>(r#"{"prompt":"x","mode":"inpaint"}"#).is_err()
        );
    }

    #[test]
    fn prompt_is_required() {
        assert!(serde_json::from_str::<GenerationParams>(r#"{"steps":3}"#).is_err());
    }
}
