//! DreamBooth with LoRA: the math of diffusers' `train_dreambooth_lora.py` on our models.
//!
//! Each step: VAE posterior samples of the cached instance (and class) latents × the VAE's
//! scaling factor, noise, timesteps uniform in `[0, num_train_timesteps)`, the DDPM forward
//! process (`add_noise`) from the scheduler config's betas, the UNet's prediction against
//! the noise (or the velocity for v-prediction models), MSE (optionally Min-SNR-γ weighted),
//! plus `prior_weight ×` the MSE on the class half of the batch. Only the LoRA's A/B
//! tensors are trained (AdamW, warmup, gradient clipping, accumulation); the base weights
//! stay frozen and the adapters run unfused.
//!
//! Randomness is drawn per (step, micro-batch) from torch's generator seeded with a value
//! derived from the training seed, so a run resumed from a checkpoint draws exactly what
//! the uninterrupted run would have.

mod checkpoint;
mod config;
pub mod data;
pub mod lora_params;
pub mod optim;
mod steps;

use std::path::Path;

use crate::error::{catch_torch, Error, Result};
use crate::stable_diffusion::StableDiffusion;
use checkpoint::{check_resume, latest_checkpoint, read_checkpoint_state};
use config::io_error;
use lora_params::TrainableLora;
use steps::run;

pub use checkpoint::{checkpoint_step, CheckpointState, RESUME_LATEST};
pub use config::{
    MixedPrecision, TrainConfig, TrainOutcome, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE,
    CLASS_IMAGES_DIR,
};
/// What the trainer reports, one event at a time: the API crate's type, which the operator
/// parses from `imagegen train`'s stdout.
pub use imagegen_crds::api::TrainerEvent;

/// Trains a LoRA on `model` (loaded in `config.mixed_precision`'s dtype on its device) and
/// writes it to `config.out`. Events go to `emit` as they happen (a failure is returned,
/// not emitted: the caller reports it).
pub fn train(
    model: &StableDiffusion,
    config: &TrainConfig,
    emit: &mut dyn FnMut(TrainerEvent),
) -> Result<TrainOutcome> {
    config.validate(model.device)?;
    if model.family() != crate::family::Family::StableDiffusion {
        return Err(Error::invalid(
            "model",
            format!(
                "LoRA training runs SD 1.x/2.x models; {} is {}",
                model.name,
                model.family()
            ),
        ));
    }
    let files = data::collect_images(&config.images, "images")?;
    let resume_dir = match config.resume.as_deref() {
        Some(dir) if dir == Path::new(RESUME_LATEST) => {
            let latest = latest_checkpoint(&config.out);
            if latest.is_none() {
                tracing::info!(out = %config.out.display(), "no checkpoint to resume from yet");
            }
            latest
        }
        other => other.map(Path::to_path_buf),
    };
    let resume = match &resume_dir {
        Some(dir) => {
            let state = read_checkpoint_state(dir)?;
            check_resume(&state, config)?;
            Some((state, dir.as_path()))
        }
        None => None,
    };
    std::fs::create_dir_all(&config.out).map_err(io_error(&config.out))?;
    let result = catch_torch(|| {
        run(
            model,
            config,
            &files,
            resume.as_ref().map(|(s, d)| (s, *d)),
            emit,
        )
    });
    TrainableLora::detach(model);
    result
}
