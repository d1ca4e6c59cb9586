//! The pipelines, one file each, over the shared denoising loop in `denoise`; `generate` is
//! the one entry point that picks a pipeline for a request.

pub mod batch;
pub mod controlnet;
pub mod denoise;
pub mod generate;
pub mod image_to_image;
pub mod inpaint;
pub mod mask_prompt;
pub mod text_to_image;

pub use denoise::{GeneratedImage, Progress};
pub use generate::Inputs;
pub use inpaint::InpaintRoute;
