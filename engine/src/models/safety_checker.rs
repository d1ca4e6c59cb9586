//! diffusers' `StableDiffusionSafetyChecker`: CLIP image embeddings compared (cosine) with
//! 17 concept embeddings and 3 "special care" embeddings, each against its own threshold.
//! An image whose special-care score is above zero gets every later score raised by 0.01;
//! an image with any concept score above zero is flagged.
//!
//! VarStore paths are the checkpoint's keys: `vision_model.vision_model.…`,
//! `visual_projection.weight`, `concept_embeds`, `special_care_embeds`,
//! `concept_embeds_weights`, `special_care_embeds_weights`.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::clip_vision::{ClipVisionConfig, ClipVisionModel};
use super::layers::linear;
use crate::error::{read_json, Error, Result};

/// Concept embeddings in the checkpoint (fixed by diffusers' model).
pub const CONCEPTS: i64 = 17;
/// Special-care embeddings in the checkpoint.
pub const SPECIAL_CARE: i64 = 3;
/// What a fired special-care concept adds to the image's later scores.
pub const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// The checker's `config.json` (a transformers `CLIPConfig`; only the vision side is used).
#[derive(Debug, Clone, Deserialize)]
pub struct SafetyCheckerConfig {
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
}

fn default_projection_dim() -> i64 {
    512
}

impl SafetyCheckerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        if let Some(message) = config.vision_config.check() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message,
            });
        }
        Ok(config)
    }
}

/// The checker's judgement of one image. Scores are `cosine - threshold (+ adjustment)`,
/// in float32 and not rounded; like diffusers, a score counts as positive when it is
/// still above zero after rounding to 3 decimals.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyVerdict {
    pub has_nsfw_concept: bool,
    /// One per concept (17).
    pub concept_scores: Vec<f32>,
    /// One per special-care concept (3).
    pub special_scores: Vec<f32>,
    /// Indices of the concepts whose score is positive.
    pub bad_concepts: Vec<usize>,
    /// Indices of the special-care concepts whose score is positive.
    pub special_care: Vec<usize>,
}

impl SafetyVerdict {
    /// The concept with the highest score and that score.
    pub fn top_concept(&self) -> Option<(usize, f32)> {
        self.concept_scores
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// diffusers' test: `round(score, 3) > 0`.
fn positive(score: f32) -> bool {
    (f64::from(score) * 1000.0).round_ties_even() > 0.0
}

#[derive(Debug)]
pub struct StableDiffusionSafetyChecker {
    vision_model: ClipVisionModel,
    visual_projection: nn::Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_embeds_weights: Tensor,
    special_care_embeds_weights: Tensor,
}

impl StableDiffusionSafetyChecker {
    /// `p` is the VarStore root.
    pub fn new(p: nn::Path, c: &SafetyCheckerConfig) -> Self {
        let zero = nn::Init::Const(0.0);
        let proj = c.projection_dim;
        StableDiffusionSafetyChecker {
            vision_model: ClipVisionModel::new(&p / "vision_model", &c.vision_config),
            visual_projection: linear(
                &p / "visual_projection",
                c.vision_config.hidden_size,
                proj,
                false,
            ),
            concept_embeds: p.var("concept_embeds", &[CONCEPTS, proj], zero),
            special_care_embeds: p.var("special_care_embeds", &[SPECIAL_CARE, proj], zero),
            concept_embeds_weights: p.var("concept_embeds_weights", &[CONCEPTS], zero),
            special_care_embeds_weights: p.var(
                "special_care_embeds_weights",
                &[SPECIAL_CARE],
                zero,
            ),
        }
    }

    /// The side of the square input.
    pub fn image_size(&self) -> i64 {
        self.vision_model.image_size()
    }

    /// `visual_projection(pooled vision output)`: `[batch, projection_dim]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Tensor {
        let pooled = self.vision_model.forward(pixel_values).pooled;
        self.visual_projection.forward(&pooled)
    }

    /// Judges each image of `pixel_values` (`[batch, 3, size, size]`, CLIP-normalized).
    pub fn check(&self, pixel_values: &Tensor) -> Vec<SafetyVerdict> {
        tch::no_grad(|| {
            let embeds = self.image_embeds(pixel_values);
            let cosine = |text: &Tensor| {
                let normalize = |t: &Tensor| {
                    t / t
                        .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
                        .clamp_min(1e-12)
                };
                normalize(&embeds)
                    .matmul(&normalize(text).transpose(0, 1))
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
            };
            let rows = |t: &Tensor| -> Vec<Vec<f32>> {
                let t = t.to_kind(Kind::Float).to_device(tch::Device::Cpu);
                let (n, m) = t.size2().expect("2-d");
                let flat = Vec::<f32>::try_from(t.contiguous().view(-1)).expect("float tensor");
                (0..n as usize)
                    .map(|i| flat[i * m as usize..(i + 1) * m as usize].to_vec())
                    .collect()
            };
            let special_cos = rows(&cosine(&self.special_care_embeds));
            let concept_cos = rows(&cosine(&self.concept_embeds));
            let special_w = rows(&self.special_care_embeds_weights.unsqueeze(0)).remove(0);
            let concept_w = rows(&self.concept_embeds_weights.unsqueeze(0)).remove(0);
            special_cos
                .iter()
                .zip(&concept_cos)
                .map(|(special_cos, concept_cos)| {
                    // As diffusers' loop: the adjustment applies from the first fired
                    // special-care concept on, to later special-care scores too.
                    let mut adjustment = 0.0f32;
                    let mut special_scores = Vec::with_capacity(special_cos.len());
                    let mut special_care = Vec::new();
                    for (k, (cos, w)) in special_cos.iter().zip(&special_w).enumerate() {
                        let score = cos - w + adjustment;
                        special_scores.push(score);
                        if positive(score) {
                            special_care.push(k);
                            adjustment = SPECIAL_CARE_ADJUSTMENT;
                        }
                    }
                    let concept_scores: Vec<f32> = concept_cos
                        .iter()
                        .zip(&concept_w)
                        .map(|(cos, w)| cos - w + adjustment)
                        .collect();
                    let bad_concepts: Vec<usize> = concept_scores
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| positive(**s))
                        .map(|(k, _)| k)
                        .collect();
                    SafetyVerdict {
                        has_nsfw_concept: !bad_concepts.is_empty(),
                        concept_scores,
                        special_scores,
                        bad_concepts,
                        special_care,
                    }
                })
                .collect()
        })
    }
}
