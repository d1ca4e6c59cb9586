//! Which family a diffusers pipeline folder holds, and the pipeline-level settings that
//! change how it runs, from its `model_index.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// A model family: what the text side and the UNet's conditioning look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last (or clip-skipped)
    /// normed hidden states.
    StableDiffusion,
    /// SDXL: two text encoders' penultimate hidden states side by side, the second's pooled
    /// output, and size (or aesthetic-score) time ids.
    Sdxl,
}

impl Family {
    /// The name the API uses (`sd` covers 1.x and 2.x, which load alike).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::StableDiffusion => "sd",
            Family::Sdxl => "sdxl",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// diffusers' pipeline classes this engine runs, by family.
const SD_PIPELINES: [&str; 6] = [
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionPipelineSafe",
];
const SDXL_PIPELINES: [&str; 3] = [
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

#[derive(Debug, Deserialize)]
struct RawIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    force_zeros_for_empty_prompt: Option<bool>,
    requires_aesthetics_score: Option<bool>,
}

/// What `model_index.json` says about running the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineIndex {
    pub class_name: String,
    pub family: Family,
    /// SDXL: an absent negative prompt is zeros rather than the encoded empty text
    /// (diffusers' default for SDXL pipelines: true).
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL refiner: the time ids end with an aesthetic score instead of the target size.
    pub requires_aesthetics_score: bool,
}

impl PipelineIndex {
    /// Reads `dir/model_index.json`. A folder without one is taken as SD 1.x/2.x when it
    /// has no `text_encoder_2/`, as SDXL otherwise; a pipeline class this engine does not
    /// run is an error naming the ones it does.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let raw: RawIndex = if path.is_file() {
            read_json(&path)?
        } else {
            let sdxl = dir.join("text_encoder_2").is_dir();
            RawIndex {
                class_name: Some(
                    if sdxl {
                        SDXL_PIPELINES[0]
                    } else {
                        SD_PIPELINES[0]
                    }
                    .to_string(),
                ),
                force_zeros_for_empty_prompt: None,
                requires_aesthetics_score: None,
            }
        };
        let class_name = raw
            .class_name
            .unwrap_or_else(|| SD_PIPELINES[0].to_string());
        let family = if SD_PIPELINES.contains(&class_name.as_str()) {
            Family::StableDiffusion
        } else if SDXL_PIPELINES.contains(&class_name.as_str()) {
            Family::Sdxl
        } else {
            return Err(Error::Unsupported {
                path,
                message: format!(
                    "the pipeline class {class_name:?} is not one this engine runs ({})",
                    SD_PIPELINES
                        .iter()
                        .chain(&SDXL_PIPELINES)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        Ok(PipelineIndex {
            family,
            force_zeros_for_empty_prompt: family == Family::Sdxl
                && raw.force_zeros_for_empty_prompt.unwrap_or(true),
            requires_aesthetics_score: family == Family::Sdxl
                && raw.requires_aesthetics_score.unwrap_or(false),
            class_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(json: &str) -> Result<PipelineIndex> {
        let dir = std::env::temp_dir().join(format!(
            "imagegen-family-{}-{}",
            std::process::id(),
            json.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model_index.json"), json).unwrap();
        let read = PipelineIndex::read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        read
    }

    #[test]
    fn families_come_from_the_pipeline_class() {
        let sd = index(r#"{"_class_name": "StableDiffusionPipeline"}"#).unwrap();
        assert_eq!(sd.family, Family::StableDiffusion);
        assert!(!sd.force_zeros_for_empty_prompt);
        let base = index(r#"{"_class_name": "StableDiffusionXLPipeline"}"#).unwrap();
        assert_eq!(base.family, Family::Sdxl);
        assert!(base.force_zeros_for_empty_prompt && !base.requires_aesthetics_score);
        let refiner = index(
            r#"{"_class_name": "StableDiffusionXLImg2ImgPipeline",
                "force_zeros_for_empty_prompt": false, "requires_aesthetics_score": true}"#,
        )
        .unwrap();
        assert_eq!(refiner.family, Family::Sdxl);
        assert!(!refiner.force_zeros_for_empty_prompt && refiner.requires_aesthetics_score);
    }

    #[test]
    fn an_unknown_pipeline_class_is_refused_by_name() {
        let err = index(r#"{"_class_name": "StableDiffusion3Pipeline"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("StableDiffusion3Pipeline"), "{err}");
        assert!(err.contains("StableDiffusionXLPipeline"), "{err}");
    }
}
