//! What happens to generated images that the safety checker flags.
//!
//! Every output of [`generate`](crate::pipelines::generate()) goes
//! through the model's [`Safety`] after decoding (and after a style's correction):
//!
//! * [`SafetyPolicy::Block`] (the default) withholds flagged images: the outcome lists
//!   each one in [`GenerationOutcome::withheld`] with its index, seed and reason;
//! * [`SafetyPolicy::Blur`] delivers a flagged image blurred beyond recognition, with its
//!   verdict in [`GeneratedImage::flagged`];
//! * [`SafetyPolicy::Off`] delivers everything unchecked.
//!
//! The checker is diffusers' `StableDiffusionSafetyChecker`, fed as diffusers' pipelines
//! feed it: the 8-bit images through CLIP's image processor (shortest side resized to
//! 224 bicubic, center crop 224, scaled to [0, 1], normalized with CLIP's mean and std).

use std::path::Path;
use std::str::FromStr;

use image::imageops::{self, FilterType};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::models::loading::{load_safety_checker, Loaded};
use crate::models::safety_checker::{SafetyVerdict, StableDiffusionSafetyChecker};
use crate::outcome::{GeneratedImage, GenerationOutcome, Withheld};

/// CLIP's normalization (OpenAI CLIP mean and std, per RGB channel).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// What to do with flagged images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SafetyPolicy {
    /// Withhold flagged images (report them instead).
    #[default]
    Block,
    /// Deliver flagged images blurred beyond recognition, marked as flagged.
    Blur,
    /// Do not check.
    Off,
}

impl SafetyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SafetyPolicy::Block => "block",
            SafetyPolicy::Blur => "blur",
            SafetyPolicy::Off => "off",
        }
    }

    /// Whether the policy runs the checker.
    pub fn needs_checker(self) -> bool {
        self != SafetyPolicy::Off
    }
}

impl FromStr for SafetyPolicy {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "block" => Ok(SafetyPolicy::Block),
            "blur" => Ok(SafetyPolicy::Blur),
            "off" => Ok(SafetyPolicy::Off),
            other => Err(Error::invalid(
                "safety",
                format!("`{other}` is not a policy (block, blur or off)"),
            )),
        }
    }
}

impl std::fmt::Display for SafetyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "flagged as unsafe (concept 3, score 0.012)", naming the highest-scoring concept.
pub fn reason(verdict: &SafetyVerdict) -> String {
    let special = if verdict.special_care.is_empty() {
        String::new()
    } else {
        format!(", special care {:?}", verdict.special_care)
    };
    match verdict.top_concept() {
        Some((concept, score)) => {
            format!("flagged as unsafe (concept {concept}, score {score:.3}{special})")
        }
        None => "flagged as unsafe".to_string(),
    }
}

/// A loaded safety checker on the device and in the dtype it computes in.
pub struct SafetyChecker {
    pub checker: Loaded<StableDiffusionSafetyChecker>,
    pub device: Device,
    pub dtype: Kind,
}

impl SafetyChecker {
    /// A checker folder (transformers layout: `config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        Ok(SafetyChecker {
            checker: load_safety_checker(dir, device, dtype)?,
            device,
            dtype,
        })
    }

    /// Judges each image.
    pub fn check(&self, images: &[&RgbImage]) -> Vec<SafetyVerdict> {
        if images.is_empty() {
            return Vec::new();
        }
        let size = self.checker.model.image_size() as u32;
        let pixels = clip_pixel_values(images, size)
            .to_device(self.device)
            .to_kind(self.dtype);
        self.checker.model.check(&pixels)
    }
}

/// CLIP's image processor: shortest side resized to `size` (bicubic: Catmull-Rom with
/// antialiasing when shrinking, close to but not bit-equal with PIL's), center crop
/// `size`, scaled to [0, 1], normalized. `[n, 3, size, size]` float32 on the CPU.
pub fn clip_pixel_values(images: &[&RgbImage], size: u32) -> Tensor {
    let per_image: Vec<Tensor> = images
        .iter()
        .map(|image| {
            let (width, height) = image.dimensions();
            let (short, long) = (width.min(height).max(1), width.max(height));
            let new_long = (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
            let (w, h) = if width <= height {
                (size, new_long)
            } else {
                (new_long, size)
            };
            let resized = imageops::resize(*image, w, h, FilterType::CatmullRom);
            let cropped =
                imageops::crop_imm(&resized, (w - size) / 2, (h - size) / 2, size, size).to_image();
            let hwc = Tensor::from_slice(cropped.as_raw())
                .view([size as i64, size as i64, 3])
                .to_kind(Kind::Float)
                / 255.0;
            let mean = Tensor::from_slice(&CLIP_MEAN);
            let std = Tensor::from_slice(&CLIP_STD);
            ((hwc - mean) / std).permute([2, 0, 1])
        })
        .collect();
    Tensor::stack(&per_image, 0)
}

/// A strong blur: the image shrunk to at most 8 pixels on its longer side, then scaled
/// back up smoothly. Nothing of the content but its rough colours survives.
pub fn obscure(image: &RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    let long = width.max(height).max(1);
    let w = (width * 8).div_ceil(long).max(1);
    let h = (height * 8).div_ceil(long).max(1);
    let small = imageops::resize(image, w, h, FilterType::Triangle);
    imageops::resize(&small, width, height, FilterType::Gaussian)
}

/// A model's safety policy and, when the policy runs one, its checker.
pub struct Safety {
    policy: SafetyPolicy,
    checker: Option<SafetyChecker>,
}

impl Safety {
    /// No check.
    pub fn off() -> Self {
        Safety {
            policy: SafetyPolicy::Off,
            checker: None,
        }
    }

    /// `policy` with `checker`: an error when the policy needs a checker and there is none.
    pub fn new(policy: SafetyPolicy, checker: Option<SafetyChecker>) -> Result<Self> {
        if policy.needs_checker() && checker.is_none() {
            return Err(Error::SafetyCheckerMissing {
                policy: policy.as_str().to_string(),
            });
        }
        Ok(Safety {
            policy,
            checker: checker.filter(|_| policy.needs_checker()),
        })
    }

    pub fn policy(&self) -> SafetyPolicy {
        self.policy
    }

    pub fn checker(&self) -> Option<&SafetyChecker> {
        self.checker.as_ref()
    }

    /// Checks `images` and applies the policy.
    pub fn apply(&self, images: Vec<GeneratedImage>) -> GenerationOutcome {
        let Some(checker) = self
            .checker
            .as_ref()
            .filter(|_| self.policy.needs_checker())
        else {
            return GenerationOutcome {
                images,
                withheld: Vec::new(),
            };
        };
        let verdicts = checker.check(&images.iter().map(|g| &g.image).collect::<Vec<_>>());
        let mut outcome = GenerationOutcome {
            images: Vec::with_capacity(images.len()),
            withheld: Vec::new(),
        };
        for (mut image, verdict) in images.into_iter().zip(verdicts) {
            if !verdict.has_nsfw_concept {
                outcome.images.push(image);
                continue;
            }
            tracing::info!(index = image.index, seed = image.metadata.seed, policy = %self.policy, "image flagged by the safety checker");
            match self.policy {
                SafetyPolicy::Block => outcome.withheld.push(Withheld {
                    index: image.index,
                    seed: image.metadata.seed,
                    reason: reason(&verdict),
                    verdict,
                }),
                SafetyPolicy::Blur => {
                    image.image = obscure(&image.image);
                    image.flagged = Some(verdict);
                    outcome.images.push(image);
                }
                SafetyPolicy::Off => unreachable!("no checker runs with the policy off"),
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for policy in [SafetyPolicy::Block, SafetyPolicy::Blur, SafetyPolicy::Off] {
            assert_eq!(policy.as_str().parse::<SafetyPolicy>().unwrap(), policy);
        }
        assert!("maybe".parse::<SafetyPolicy>().is_err());
        assert_eq!(SafetyPolicy::default(), SafetyPolicy::Block);
    }

    #[test]
    fn a_policy_that_checks_needs_a_checker() {
        let err = Safety::new(SafetyPolicy::Block, None).err().unwrap();
        assert!(err.to_string().contains("safety checker"), "{err}");
        assert!(Safety::new(SafetyPolicy::Off, None).is_ok());
    }

    #[test]
    fn preprocessing_shape_and_range() {
        let image = RgbImage::from_pixel(320, 256, image::Rgb([255, 0, 128]));
        let pixels = clip_pixel_values(&[&image, &image], 224);
        assert_eq!(pixels.size(), vec![2, 3, 224, 224]);
        let red = pixels.double_value(&[0, 0, 100, 100]);
        let expected = f64::from((1.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert!((red - expected).abs() < 1e-5, "{red} vs {expected}");
    }

    #[test]
    fn obscuring_keeps_size_and_removes_detail() {
        let mut image = RgbImage::new(64, 48);
        for (x, y, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb([if (x + y) % 2 == 0 { 255 } else { 0 }; 3]);
        }
        let blurred = obscure(&image);
        assert_eq!(blurred.dimensions(), (64, 48));
        let max_step = (1..64)
            .flat_map(|x| (0..48).map(move |y| (x, y)))
            .map(|(x, y)| blurred.get_pixel(x, y)[0].abs_diff(blurred.get_pixel(x - 1, y)[0]))
            .max()
            .unwrap();
        assert!(max_step < 64, "neighbouring pixels differ by {max_step}");
    }
}
