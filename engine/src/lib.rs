//! imagegen's engine: Stable Diffusion on libtorch (through `tch`), as a library that the
//! command line, the HTTP service, the trainer and the benchmarks all call. It knows no
//! transport: models come from local folders, or through a [`source::Hub`] the caller gives.

pub mod device;
pub mod error;
pub mod family;
pub mod image;
pub mod lora;
pub mod models;
pub mod noise;
pub mod outcome;
pub mod pipelines;
pub mod safety;
pub mod schedulers;
pub mod source;
pub mod stable_diffusion;
pub mod styles;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use family::Family;
pub use imagegen_crds::{GenerationParams, Strategy};
pub use lora::{FusedLoras, Lora, LoraCache};
pub use outcome::{GeneratedImage, GenerationOutcome, Progress, Withheld};
pub use pipelines::{InpaintRoute, Inputs};
pub use safety::SafetyPolicy;
pub use stable_diffusion::{LoadOptions, StableDiffusion};
