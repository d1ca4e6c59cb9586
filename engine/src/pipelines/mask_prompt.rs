//! Inpainting masks found from text: CLIPSeg scores every pixel of the image against each
//! prompt; the probabilities above a threshold make the mask (white = repaint), several
//! prompts are united, a negative prompt's area is removed, then the mask is grown and
//! blurred like a drawn one.
//!
//! A model folder is transformers' layout (`config.json` with `text_config` and
//! `vision_config`, `model.safetensors`, the tokenizer as `tokenizer.json` or `vocab.json` +
//! `merges.txt`, the image processor in `processor_config.json` or
//! `preprocessor_config.json`); a hub id (e.g. [`DEFAULT_MASK_MODEL`]) is downloaded.

use std::path::Path;

use image::{imageops::FilterType, GrayImage, RgbImage};
use serde::Deserialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::error::{catch_torch, Error, Result};
use crate::image::mask;
use crate::models::clipseg::{clipseg_alias, ClipSegConfig, ClipSegModel};
use crate::source::{self, Hub};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{load_var_store, weight_files};

/// The CLIPSeg checkpoint used when none is named.
pub const DEFAULT_MASK_MODEL: &str = "CIDAS/clipseg-rd64-refined";
pub const DEFAULT_THRESHOLD: f32 = 0.4;
pub const DEFAULT_GROW: u32 = 8;

/// Files besides config and weights that a CLIPSeg folder needs (or may have).
const EXTRA_FILES: [&str; 7] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// How probabilities become a mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskOptions {
    /// A pixel belongs to a prompt when its probability is above this.
    pub threshold: f32,
    /// Dilation radius in image pixels, after thresholding.
    pub grow: u32,
    /// Gaussian sigma in image pixels, after growing (0: a hard-edged mask).
    pub blur: f32,
}

impl Default for MaskOptions {
    fn default() -> Self {
        MaskOptions {
            threshold: DEFAULT_THRESHOLD,
            grow: DEFAULT_GROW,
            blur: 0.0,
        }
    }
}

/// What transformers' `ViTImageProcessor` does to an image before CLIPSeg, from the
/// folder's processor settings (see [`ImageProcessorConfig::from_dir`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub width: u32,
    pub height: u32,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Square(u32),
    Sides { height: u32, width: u32 },
    Shortest { shortest_edge: u32 },
}

#[derive(Deserialize)]
struct RawProcessor {
    size: Option<RawSize>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

/// `processor_config.json`: a processor's settings, the image processor's nested in it.
#[derive(Deserialize)]
struct RawProcessorConfig {
    image_processor: Option<RawProcessor>,
}

impl RawProcessor {
    /// The image processor's settings of `dir`, in transformers' order of precedence.
    fn find(dir: &Path) -> Result<Option<RawProcessor>> {
        let nested = dir.join("processor_config.json");
        if nested.is_file() {
            let config: RawProcessorConfig = crate::error::read_json(&nested)?;
            if let Some(raw) = config.image_processor {
                return Ok(Some(raw));
            }
        }
        let flat = dir.join("preprocessor_config.json");
        if flat.is_file() {
            return crate::error::read_json(&flat).map(Some);
        }
        Ok(None)
    }
}

impl ImageProcessorConfig {
    /// `ViTImageProcessor`'s defaults (ImageNet-standard mean and std of 0.5) at `image_size`.
    pub fn defaults(image_size: u32) -> Self {
        ImageProcessorConfig {
            width: image_size,
            height: image_size,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// The image processor's settings as transformers finds them: the `image_processor` object
    /// of `processor_config.json` (transformers 5.25 and later save a processor that way, and
    /// no `preprocessor_config.json`), else `preprocessor_config.json`. Only when neither
    /// holds them are `ViTImageProcessor`'s defaults at `image_size` taken, with a warning:
    /// those are not CLIP's mean and std, so the masks would differ from transformers'.
    pub fn from_dir(dir: &Path, image_size: u32) -> Result<Self> {
        let base = Self::defaults(image_size);
        let Some(raw) = RawProcessor::find(dir)? else {
            tracing::warn!(
                dir = %dir.display(),
                "neither processor_config.json (with `image_processor`) nor \
                 preprocessor_config.json is there: using ViTImageProcessor's defaults \
                 (mean and std 0.5)"
            );
            return Ok(base);
        };
        let (width, height) = match raw.size {
            Some(RawSize::Square(s)) => (s, s),
            Some(RawSize::Sides { height, width }) => (width, height),
            Some(RawSize::Shortest { shortest_edge }) => (shortest_edge, shortest_edge),
            None => (base.width, base.height),
        };
        Ok(ImageProcessorConfig {
            width,
            height,
            do_resize: raw.do_resize.unwrap_or(base.do_resize),
            do_rescale: raw.do_rescale.unwrap_or(base.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(base.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(base.do_normalize),
            mean: raw.image_mean.unwrap_or(base.mean),
            std: raw.image_std.unwrap_or(base.std),
        })
    }

    /// `pixel_values` `[1, 3, height, width]` (fp32, CPU). The resize is the `image` crate's
    /// triangle (bilinear) filter, which like PIL's bilinear widens its support when
    /// downscaling; it is close to, not bit-identical with, PIL or torchvision.
    pub fn preprocess(&self, image: &RgbImage) -> Tensor {
        let resized;
        let image = if self.do_resize
            && (image.width(), image.height()) != (self.width, self.height)
        {
            resized = image::imageops::resize(image, self.width, self.height, FilterType::Triangle);
            &resized
        } else {
            image
        };
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut planes = vec![0f32; 3 * w * h];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = f32::from(pixel[c]);
                if self.do_rescale {
                    v *= self.rescale_factor;
                }
                if self.do_normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                planes[c * w * h + i] = v;
            }
        }
        Tensor::from_slice(&planes).view([1, 3, h as i64, w as i64])
    }
}

/// The mask at the probabilities' resolution: white where some prompt's probability is above
/// `threshold` (their union) and the negative prompt's is not.
pub fn threshold_mask(
    positive: &[Vec<f32>],
    negative: Option<&[f32]>,
    width: u32,
    height: u32,
    threshold: f32,
) -> GrayImage {
    let len = (width * height) as usize;
    let mut out = GrayImage::new(width, height);
    for (i, value) in out.as_mut().iter_mut().enumerate().take(len) {
        let union = positive
            .iter()
            .map(|p| p[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let removed = negative.is_some_and(|n| n[i] > threshold);
        *value = if union > threshold && !removed {
            255
        } else {
            0
        };
    }
    out
}

/// Grow then blur, as for a drawn mask.
pub fn finish_mask(mask: &GrayImage, options: &MaskOptions) -> GrayImage {
    mask::blur(&mask::grow(mask, options.grow), options.blur)
}

/// A CLIPSeg model with its tokenizer and image processor.
pub struct MaskFinder {
    pub model: ClipSegModel,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessorConfig,
    pub vars: VarStore,
    device: Device,
    dtype: Kind,
}

impl MaskFinder {
    /// Per-prompt probabilities (sigmoid of the logits) resized to the image's size
    /// (bilinear), each `width * height` values in row-major order.
    pub fn probabilities(&self, image: &RgbImage, prompts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let (w, h) = (image.width() as i64, image.height() as i64);
        catch_torch(|| {
            let n = prompts.len() as i64;
            let pixels = self
                .processor
                .preprocess(image)
                .to_device(self.device)
                .to_kind(self.dtype)
                .expand([n, -1, -1, -1], false);
            let input_ids = Tensor::from_slice(&ids.concat())
                .view([n, -1])
                .to_device(self.device);
            let probs = tch::no_grad(|| {
                self.model
                    .logits(&pixels, &input_ids)
                    .to_kind(Kind::Float)
                    .sigmoid()
                    .unsqueeze(1)
                    .upsample_bilinear2d([h, w], false, None, None)
                    .squeeze_dim(1)
                    .to_device(Device::Cpu)
                    .contiguous()
            });
            (0..n)
                .map(|i| {
                    Vec::<f32>::try_from(probs.get(i).flatten(0, -1))
                        .map_err(|e| Error::Torch(e.to_string()))
                })
                .collect()
        })
    }

    /// The inpainting mask of `image` (same size; white = repaint) for the union of
    /// `prompts`, minus where `negative` is found.
    pub fn find(
        &self,
        image: &RgbImage,
        prompts: &[String],
        negative: Option<&str>,
        options: &MaskOptions,
    ) -> Result<GrayImage> {
        if prompts.is_empty() {
            return Err(Error::invalid("mask_prompt", "give at least one prompt"));
        }
        if !(0.0..1.0).contains(&options.threshold) {
            return Err(Error::invalid(
                "threshold",
                "the threshold is a probability in [0, 1)",
            ));
        }
        let mut texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        if let Some(negative) = negative {
            texts.push(negative);
        }
        let mut probs = self.probabilities(image, &texts)?;
        let negative_probs = negative.map(|_| probs.pop().expect("pushed above"));
        let found = threshold_mask(
            &probs,
            negative_probs.as_deref(),
            image.width(),
            image.height(),
            options.threshold,
        );
        Ok(finish_mask(&found, options))
    }
}

/// Loads a CLIPSeg folder, or a hub id through `hub` (config, safetensors weights, tokenizer
/// and preprocessor files are downloaded).
pub fn load_clipseg(
    spec: &str,
    hub: Option<&dyn Hub>,
    device: Device,
    dtype: Kind,
) -> Result<MaskFinder> {
    let dir = source::resolve_component_with(spec, hub, &EXTRA_FILES)?;
    load_clipseg_dir(&dir, device, dtype)
}

pub fn load_clipseg_dir(dir: &Path, device: Device, dtype: Kind) -> Result<MaskFinder> {
    let config = ClipSegConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = ClipTokenizer::from_dir(dir, config.text.max_position_embeddings as usize)?;
    let processor = ImageProcessorConfig::from_dir(dir, config.vision.image_size as u32)?;
    let mut vars = VarStore::new(device);
    vars.set_kind(dtype);
    let model = ClipSegModel::new(vars.root(), &config);
    load_var_store(&vars, &weight_files(dir, "model", None)?, clipseg_alias)?;
    vars.freeze();
    Ok(MaskFinder {
        model,
        tokenizer,
        processor,
        vars,
        device,
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }

    #[test]
    fn threshold_is_strict() {
        let m = threshold_mask(&[plane(&[0.39, 0.4, 0.41, 0.9])], None, 4, 1, 0.4);
        assert_eq!(m.as_raw(), &[0, 0, 255, 255]);
    }

    #[test]
    fn prompts_are_united() {
        let a = plane(&[0.9, 0.1, 0.1, 0.1]);
        let b = plane(&[0.1, 0.8, 0.1, 0.5]);
        let m = threshold_mask(&[a, b], None, 2, 2, 0.4);
        assert_eq!(m.as_raw(), &[255, 255, 0, 255]);
    }

    #[test]
    fn negative_prompt_is_subtracted() {
        let a = plane(&[0.9, 0.9, 0.9, 0.1]);
        let neg = plane(&[0.1, 0.5, 0.4, 0.9]);
        let m = threshold_mask(&[a], Some(&neg), 4, 1, 0.4);
        assert_eq!(m.as_raw(), &[255, 0, 255, 0]);
    }

    #[test]
    fn grow_widens_the_found_area() {
        let mut probs = vec![0.0f32; 11 * 11];
        probs[5 * 11 + 5] = 1.0;
        let hard = threshold_mask(&[probs], None, 11, 11, 0.4);
        let options = MaskOptions {
            threshold: 0.4,
            grow: 2,
            blur: 0.0,
        };
        let grown = finish_mask(&hard, &options);
        let white = grown.pixels().filter(|p| p[0] == 255).count();
        // A disk of radius 2: 13 pixels.
        assert_eq!(white, 13);
        assert_eq!(grown.get_pixel(5, 3)[0], 255);
        assert_eq!(grown.get_pixel(5, 2)[0], 0);
        assert_eq!(grown.get_pixel(4, 4)[0], 255);
    }

    #[test]
    fn preprocessing_rescales_and_normalizes() {
        let config = ImageProcessorConfig {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            ..ImageProcessorConfig::defaults(4)
        };
        let image = RgbImage::from_pixel(8, 6, image::Rgb([255, 0, 51]));
        let t = config.preprocess(&image);
        assert_eq!(t.size(), [1, 3, 4, 4]);
        let v = |c: i64| t.double_value(&[0, c, 1, 2]) as f32;
        assert!((v(0) - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((v(1) - (0.0 - 0.456) / 0.224).abs() < 1e-5);
        assert!((v(2) - (0.2 - 0.406) / 0.225).abs() < 1e-5);
    }

    /// A fresh folder under the system's temp dir holding `files` (name, JSON text).
    fn folder_with(tag: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("imagegen-processor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    const CLIP_FLAT: &str = r#"{"size": {"height": 352, "width": 352},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.25, 0.125, 0.5]}"#;
    const CLIP_NESTED: &str = r#"{"processor_class": "CLIPSegProcessor", "image_processor": {
        "image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}}"#;

    #[test]
    fn processor_settings_come_from_either_file_nested_first() {
        let flat = folder_with("flat", &[("preprocessor_config.json", CLIP_FLAT)]);
        let config = ImageProcessorConfig::from_dir(&flat, 64).unwrap();
        assert_eq!((config.width, config.height), (352, 352));
        assert_eq!(config.std, [0.25, 0.125, 0.5]);

        let nested = folder_with("nested", &[("processor_config.json", CLIP_NESTED)]);
        let config = ImageProcessorConfig::from_dir(&nested, 64).unwrap();
        assert_eq!((config.width, config.height), (224, 224));
        assert_eq!(config.mean, [0.485, 0.456, 0.406]);

        // transformers reads the nested settings first when both files are there.
        let both = folder_with(
            "both",
            &[
                ("processor_config.json", CLIP_NESTED),
                ("preprocessor_config.json", CLIP_FLAT),
            ],
        );
        let config = ImageProcessorConfig::from_dir(&both, 64).unwrap();
        assert_eq!(config.mean, [0.485, 0.456, 0.406]);

        // An older processor_config.json names the processor only: the flat file counts.
        let legacy = folder_with(
            "legacy",
            &[
                (
                    "processor_config.json",
                    r#"{"processor_class": "CLIPSegProcessor"}"#,
                ),
                ("preprocessor_config.json", CLIP_FLAT),
            ],
        );
        let config = ImageProcessorConfig::from_dir(&legacy, 64).unwrap();
        assert_eq!(config.width, 352);

        let neither = folder_with("neither", &[]);
        assert_eq!(
            ImageProcessorConfig::from_dir(&neither, 64).unwrap(),
            ImageProcessorConfig::defaults(64)
        );
        for dir in [flat, nested, both, legacy, neither] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
