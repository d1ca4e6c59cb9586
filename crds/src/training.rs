//! What one LoRA training asks for: the same parameters whether it comes as a LoraTraining
//! resource or as the body of the HTTP service's `POST /v1/trainings`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::generation::{MAX_PROMPT_CHARS, MAX_SIDE, SIDE_MULTIPLE};

/// Most training images.
pub const MAX_TRAINING_IMAGES: u32 = 200;
/// Most training steps.
pub const MAX_TRAINING_STEPS: u32 = 100_000;
/// Largest LoRA rank.
pub const MAX_RANK: u32 = 1024;

/// DreamBooth-LoRA hyper-parameters. Every field but the instance prompt is optional and
/// takes the trainer's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingParams {
    /// Prompt naming the subject with a rare token, e.g. "a photo of sks person".
    #[schemars(length(min = 1, max = MAX_PROMPT_CHARS))]
    pub instance_prompt: String,
    /// Prompt of the subject's class, e.g. "a photo of a person"; needed by prior preservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PROMPT_CHARS))]
    pub class_prompt: Option<String>,
    /// Keep the class's look: train on generated class images too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_preservation: Option<PriorPreservation>,
    /// Training steps. Default 800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TRAINING_STEPS))]
    pub steps: Option<u32>,
    /// Rank of the LoRA matrices. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_RANK))]
    pub rank: Option<u32>,
    /// LoRA alpha; the update is scaled by alpha / rank. Default: the rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub alpha: Option<f64>,
    /// Optimizer learning rate. Default 1e-4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: Option<f64>,
    /// Side of the square training crops, in pixels. Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = SIDE_MULTIPLE, max = MAX_SIDE), extend("multipleOf" = SIDE_MULTIPLE))]
    pub resolution: Option<u32>,
    /// Train LoRA layers in the text encoder too. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_text_encoder: Option<bool>,
    /// Seed of the training run's randomness. Default: random, reported back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Prior preservation: generate class images with the base model and train on them too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorPreservation {
    /// How many class images to generate. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub class_images: Option<u32>,
    /// Weight of the prior loss. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub weight: Option<f64>,
}
