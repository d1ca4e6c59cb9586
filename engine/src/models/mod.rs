//! The networks of Stable Diffusion, one file per part. VarStore paths equal diffusers'
//! (and transformers') state-dict keys, so weights load without a renaming layer.

pub mod adapter;
pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod clipseg;
pub mod controlnet;
pub mod embeddings;
pub mod layers;
pub mod loading;
pub mod resnet;
pub mod safety_checker;
pub mod transformer;
pub mod unet;
pub mod vae;
