//! Noise schedulers, each the same function as the diffusers (0.42) class of the same name.
//!
//! diffusers computes its noise schedules in float32 torch tensors and float64 numpy arrays and
//! then runs the per-step arithmetic in the sample's dtype with float32 0-d tensors as scalars.
//! The implementations here keep those precision choices: schedule constants are `f32` values
//! derived as diffusers derives them (numpy's float64 steps in the same order, libtorch's own
//! kernels where diffusers calls torch), per-step coefficients are `f32` computed in the same
//! order of operations (with libtorch's `sqrt`, `log` and `exp`, which are not always correctly
//! rounded), and the tensor arithmetic follows diffusers operation for operation. On the CPU
//! the results are bit-identical to diffusers'.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod numeric;
mod pndm;
mod sigmas;

use std::fmt;
use std::str::FromStr;

use tch::Tensor;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};

/// The denoising schedulers the runtime offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers' `DDIMScheduler` (eta = 0).
    Ddim,
    /// diffusers' `PNDMScheduler` (PLMS; PRK warm-up steps unless `skip_prk_steps`).
    Pndm,
    /// diffusers' `EulerDiscreteScheduler` (s_churn = 0).
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers' `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2.
    DpmPp2m,
    /// diffusers' `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2, Karras sigmas.
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The name users pick the scheduler by.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The kind a model's scheduler_config.json names by its `_class_name`; `None` when the
    /// class is missing or not one of ours. A `DPMSolverMultistepScheduler` config maps to
    /// [`SchedulerKind::DpmPp2mKarras`] when it sets `use_karras_sigmas`.
    pub fn from_class_name(config: &SchedulerConfig) -> Option<SchedulerKind> {
        match config.class_name.as_deref()? {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "PNDMScheduler" => Some(SchedulerKind::Pndm),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" if config.use_karras_sigmas == Some(true) => {
                Some(SchedulerKind::DpmPp2mKarras)
            }
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            _ => None,
        }
    }

    /// The diffusers class this kind is.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| SchedulerError::UnknownKind(s.to_owned()))
    }
}

fn valid_names() -> String {
    SchedulerKind::ALL.map(SchedulerKind::name).join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("unknown scheduler `{0}`; valid schedulers: {names}", names = valid_names())]
    UnknownKind(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid scheduler config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{scheduler}: unsupported {key} = {value} (supported: {supported})")]
    Unsupported {
        scheduler: &'static str,
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{scheduler}: invalid config: {message}")]
    InvalidConfig {
        scheduler: &'static str,
        message: String,
    },
    #[error("{scheduler}: num_inference_steps must be between 1 and num_train_timesteps ({max}), got {steps}")]
    InvalidSteps {
        scheduler: &'static str,
        steps: usize,
        max: usize,
    },
}

/// A denoising schedule for a fixed number of inference steps, driven by the pipeline's loop:
/// for `step` in `0..timesteps().len()`, `scale_model_input`, run the model at
/// `timesteps()[step]`, then `step`.
pub trait Scheduler: Send {
    /// The timesteps of the denoising loop in order, as the UNet receives them.
    fn timesteps(&self) -> &[f64];
    /// What the pipeline multiplies the initial noise by (diffusers' `init_noise_sigma`):
    /// 1 unless the scheduler works in sigma space.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scale_model_input` for loop index `step`: the identity unless the
    /// scheduler works in sigma space.
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// One denoising step for loop index `step`, returning the previous (less noisy) sample in
    /// the sample's dtype and device. `noise` is a standard-normal tensor of the sample's shape,
    /// `Some` exactly when [`Scheduler::needs_noise`]. Stateful schedulers (PNDM, DPM-Solver)
    /// expect `step = 0, 1, 2, ...` in order.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Tensor;
    /// Whether every step consumes a standard-normal draw (diffusers calls `randn_tensor` in it).
    fn needs_noise(&self) -> bool;
    /// diffusers' `add_noise`: `original` noised to the level of loop index `step` with
    /// `noise`. Image-to-image noises its start latents at its first step (diffusers'
    /// `set_begin_index`); inpainting with a regular model re-noises the kept area to the
    /// level of the next step after each step. Computed in `original`'s dtype, as diffusers
    /// casts its schedule to it.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor;
}

/// A schedule constant as the 0-d tensor diffusers would index out of its table, already
/// cast to the sample's dtype and device.
fn schedule_scalar(value: f32, like: &Tensor) -> Tensor {
    Tensor::from(value)
        .to_kind(like.kind())
        .to_device(like.device())
}

/// The DDPM forward process at `alpha_bar`: `sqrt(ᾱ)·x + sqrt(1 − ᾱ)·ε`.
pub(crate) fn add_noise_alpha_bar(original: &Tensor, noise: &Tensor, alpha_bar: f32) -> Tensor {
    let alpha_bar = schedule_scalar(alpha_bar, original);
    let signal = alpha_bar.sqrt();
    let noise_scale = (alpha_bar.neg() + 1.0).sqrt();
    signal * original + noise_scale * noise
}

/// Noise in sigma space (Euler): `x + ε·σ`.
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Tensor {
    original + noise * schedule_scalar(sigma, original)
}

/// Noise in sigma space for DPM-Solver, which works on the variance-preserving sample:
/// `α_t·x + σ_t·ε` with `α_t = 1/sqrt(σ² + 1)`, `σ_t = σ·α_t`.
pub(crate) fn add_noise_vp_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Tensor {
    let sigma = schedule_scalar(sigma, original);
    let alpha_t = (sigma.square() + 1.0).sqrt().reciprocal();
    let sigma_t = &sigma * &alpha_t;
    alpha_t * original + sigma_t * noise
}

/// The training noise schedule of a model's scheduler config (`alphas_cumprod[t]` for every
/// training timestep, float32): what a DDPMScheduler built from it noises with, and what
/// DreamBooth training uses.
pub fn training_alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>, SchedulerError> {
    let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
    Ok(config::TrainSchedule::new("DDPMScheduler", config, rescale)?.alphas_cumprod)
}

/// Builds the scheduler `kind` for `num_inference_steps` from a model's scheduler config: what
/// diffusers' `Cls.from_config(config, **overrides).set_timesteps(num_inference_steps)` does,
/// each class applying its own defaults to absent keys. The DPM++ 2M kinds override
/// `algorithm_type = "dpmsolver++"`, `solver_order = 2` and `use_karras_sigmas` (false for
/// `DpmPp2m`, true for `DpmPp2mKarras`).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let scheduler = kind.diffusers_class();
    let max = config.num_train_timesteps.unwrap_or(1000);
    if num_inference_steps == 0 || num_inference_steps > max {
        return Err(SchedulerError::InvalidSteps {
            scheduler,
            steps: num_inference_steps,
            max,
        });
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverPp2m::new(
            config,
            num_inference_steps,
            false,
        )?),
        SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolverPp2m::new(
            config,
            num_inference_steps,
            true,
        )?),
    })
}
