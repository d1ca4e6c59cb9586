//! imagegen engine (in progress): models, loading and schedulers.

pub mod engine;
pub mod error;
pub mod models;
pub mod noise;
pub mod schedulers;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use engine::{LoadOptions, StableDiffusion};
pub use error::{Error, Result};
