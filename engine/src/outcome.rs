//! What a generation reports as it runs and what it delivers: the types every pipeline, the
//! safety check and the callers share, in a module that depends on none of them.

use image::RgbImage;

use crate::image::output::ImageMetadata;
use crate::models::safety_checker::SafetyVerdict;

/// Where a generation is, reported after every denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
}

/// One output image with what produced it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub metadata: ImageMetadata,
    /// Position in the request (the image's seed is the request's seed + index).
    pub index: usize,
    /// Set when the safety checker flagged the image and the policy delivered it
    /// obscured ([`SafetyPolicy::Blur`](crate::safety::SafetyPolicy::Blur)).
    pub flagged: Option<SafetyVerdict>,
}

/// An image that was generated but not delivered.
#[derive(Debug, Clone)]
pub struct Withheld {
    /// Its position in the request (its seed is the request's seed + index).
    pub index: usize,
    pub seed: u64,
    /// One line for people: "flagged as unsafe (concept 3, score 0.012)".
    pub reason: String,
    pub verdict: SafetyVerdict,
}

/// What a generation delivers.
#[derive(Debug, Clone)]
pub struct GenerationOutcome {
    /// Delivered images in request order; [`GeneratedImage::index`] says which.
    pub images: Vec<GeneratedImage>,
    /// Images withheld by [`SafetyPolicy::Block`](crate::safety::SafetyPolicy::Block), in request order.
    pub withheld: Vec<Withheld>,
}
