//! What one text-to-image request asks for. Every field but the prompt is optional: an
//! absent one takes the served model's default (its native size, its scheduler).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationParams {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Output width in pixels, a multiple of 8. Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Output height in pixels, a multiple of 8. Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Denoising steps. Default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; 1 or less turns guidance off. Default 7.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// ddim, pndm, euler, euler-a, dpmpp-2m or dpmpp-2m-karras. Default: the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i. Default: a random seed, reported back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many images. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Skip this many final text-encoder layers ("clip skip"). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
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
    fn prompt_is_required() {
        assert!(serde_json::from_str::<GenerationParams>(r#"{"steps":3}"#).is_err());
    }
}
