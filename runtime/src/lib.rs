//! imagegen's engine: Stable Diffusion on libtorch (through `tch`), as a library that the
//! CLI, the HTTP service, the trainer and the benchmarks all call.

pub mod batch;
pub mod canny;
pub mod controlnet_pipeline;
pub mod engine;
pub mod error;
pub mod generate;
pub mod image_processor;
pub mod image_to_image;
pub mod inpaint;
pub mod input;
pub mod lora;
pub mod mask;
pub mod mask_prompt;
pub mod models;
pub mod noise;
pub mod output;
pub mod pipeline;
pub mod safety;
pub mod schedulers;
pub mod server;
pub mod source;
pub mod styles;
pub mod text_to_image;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use engine::{LoadOptions, StableDiffusion};
pub use error::{Error, Result};
pub use generate::Inputs;
pub use imagegen_crds::{GenerationParams, Strategy};
pub use inpaint::InpaintRoute;
pub use lora::{FusedLoras, Lora, LoraCache};
pub use pipeline::{GeneratedImage, Progress};
pub use safety::{GenerationOutcome, SafetyPolicy, Withheld};
