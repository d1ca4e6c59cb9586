//! The pipelines, one file each, over the shared denoising loop in `denoise`; `generate` is
//! the one entry point that picks a pipeline for a request.

pub mod batch;
pub mod conditioning;
pub mod controlnet;
pub mod denoise;
pub mod generate;
pub mod image_to_image;
pub mod inpaint;
pub mod mask_prompt;
pub mod refiner;
pub mod text_to_image;

pub use batch::generate_batch;
pub use controlnet::{canny_to_image, controlnet};
pub use denoise::{GeneratedImage, Progress};
pub use generate::generate;
pub use generate::Inputs;
pub use image_to_image::{image_to_image, instruct, sdedit};
pub use inpaint::InpaintRoute;
pub use inpaint::{inpaint, inpaint_route};
pub use refiner::text_to_image_refined;
pub use text_to_image::text_to_image;
