//! diffusers' `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in
//! k-diffusion's parameterisation (Karras et al. 2022, algorithm 2 with s_churn = 0):
//! `x_next = x + (x - x̂_0) / sigma * (sigma_next - sigma)`.

use tch::{Kind, Tensor};

use super::config::{reject_flag, unsupported, TrainSchedule};
use super::numeric::{arange, interp, linspace, round, torch_ln, torch_sqrt};
use super::sigmas::{check_first_timestep_unique, karras, log_sigmas, sigma_to_t};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};

const NAME: &str = "EulerDiscreteScheduler";

/// What zero-terminal-SNR schedules set the last ᾱ to, so that its sigma stays finite.
pub(super) const ZERO_SNR_ALPHA_BAR: f32 = 1.0 / (1 << 24) as f32;

pub struct Euler {
    timesteps: Vec<f64>,
    /// One sigma per step and the final one (0, or the smallest training sigma).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl Euler {
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        reject_flag(
            NAME,
            "use_exponential_sigmas",
            config.use_exponential_sigmas,
        )?;
        reject_flag(NAME, "use_beta_sigmas", config.use_beta_sigmas)?;
        let prediction = match config.prediction_type.clone() {
            None => PredictionType::Epsilon,
            Some(PredictionType::Other(value)) => {
                return Err(unsupported(
                    NAME,
                    "prediction_type",
                    value,
                    "\"epsilon\", \"v_prediction\", \"sample\"",
                ))
            }
            Some(prediction) => prediction,
        };
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                return Err(unsupported(NAME, "interpolation_type", other, "\"linear\""))
            }
        }
        let continuous_timesteps = match config.timestep_type.as_deref() {
            None | Some("discrete") => false,
            Some("continuous") => prediction == PredictionType::VPrediction,
            Some(other) => {
                return Err(unsupported(
                    NAME,
                    "timestep_type",
                    other,
                    "\"discrete\", \"continuous\"",
                ))
            }
        };
        let final_sigma_is_zero = final_sigma_is_zero(NAME, config)?;
        let spacing = config
            .timestep_spacing
            .clone()
            .unwrap_or(TimestepSpacing::Linspace);

        let schedule = train_schedule(NAME, config)?;
        let train_sigmas = schedule.sigmas();
        let n = num_inference_steps;
        let mut timesteps = spaced_timesteps(
            NAME,
            &spacing,
            schedule.len(),
            n,
            config.steps_offset.unwrap_or(0),
        )?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(f64::from(t), &train_sigmas))
            .collect();
        if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras(sigma_min, sigma_max, n);
            let log_sigmas = log_sigmas(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&sigma| sigma_to_t(sigma, &log_sigmas) as f32)
                .collect();
        }
        let final_sigma = if final_sigma_is_zero {
            0.0
        } else {
            train_sigmas[0]
        };
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .map(|sigma| sigma as f32)
            .chain([final_sigma])
            .collect();
        if continuous_timesteps {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&sigma| 0.25 * torch_ln(sigma))
                .collect();
        }
        let timesteps: Vec<f64> = timesteps.into_iter().map(f64::from).collect();
        check_first_timestep_unique(NAME, &timesteps)?;
        Ok(Euler {
            init_noise_sigma: init_noise_sigma(&sigmas, &spacing),
            timesteps,
            sigmas,
            prediction,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma.into()
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Tensor {
        scale_model_input(sample, self.sigmas[step])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let out_kind = sample.kind();
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.sigmas[step];
        // s_churn = 0: no noise is added, gamma = 0 and sigma_hat = sigma.
        let sigma_hat = sigma;
        let pred_original_sample = match self.prediction {
            PredictionType::Sample => model_output.shallow_clone(),
            _ => denoised(&self.prediction, model_output, &sample, sigma_hat),
        };
        let derivative = (&sample - pred_original_sample) / f64::from(sigma_hat);
        let dt = self.sigmas[step + 1] - sigma_hat;
        let prev_sample = sample + derivative * f64::from(dt);
        prev_sample.to_kind(out_kind)
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        super::add_noise_sigma(original, noise, self.sigmas[step])
    }
}

/// The training schedule of the Euler schedulers, whose zero-terminal-SNR rescaling keeps the
/// last ᾱ at 2^-24 instead of 0.
pub(super) fn train_schedule(
    scheduler: &'static str,
    config: &SchedulerConfig,
) -> Result<TrainSchedule, SchedulerError> {
    let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
    let mut schedule = TrainSchedule::new(scheduler, config, rescale)?;
    if rescale {
        *schedule.alphas_cumprod.last_mut().expect("non-empty") = ZERO_SNR_ALPHA_BAR;
    }
    Ok(schedule)
}

/// `final_sigmas_type`: "zero" (the default) or "sigma_min".
pub(super) fn final_sigma_is_zero(
    scheduler: &'static str,
    config: &SchedulerConfig,
) -> Result<bool, SchedulerError> {
    match config.final_sigmas_type.as_deref() {
        None | Some("zero") => Ok(true),
        Some("sigma_min") => Ok(false),
        Some(other) => Err(unsupported(
            scheduler,
            "final_sigmas_type",
            other,
            "\"zero\", \"sigma_min\"",
        )),
    }
}

/// The float32 timesteps of the Euler schedulers, in descending order:
/// `linspace`: `linspace(0, T - 1, n)` (not rounded); `leading`: `i * (T / n) + steps_offset`;
/// `trailing`: `round(arange(T, 0, -T / n)) - 1`.
pub(super) fn spaced_timesteps(
    scheduler: &'static str,
    spacing: &TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Result<Vec<f32>, SchedulerError> {
    let (train, n) = (num_train_timesteps, num_inference_steps);
    Ok(match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let step_ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * step_ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| round(t) as f32 - 1.0)
            .collect(),
        TimestepSpacing::Other(value) => {
            return Err(unsupported(
                scheduler,
                "timestep_spacing",
                value,
                "\"leading\", \"trailing\", \"linspace\"",
            ))
        }
    })
}

/// The Euler schedulers' `init_noise_sigma`: the largest sigma, or for `leading` spacing
/// `sqrt(sigma_max² + 1)`.
pub(super) fn init_noise_sigma(sigmas: &[f32], spacing: &TimestepSpacing) -> f32 {
    let sigma_max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => sigma_max,
        _ => torch_sqrt(sigma_max * sigma_max + 1.0),
    }
}

/// k-diffusion's input scaling `x / sqrt(sigma² + 1)`, which brings the sample back to unit
/// variance for the model.
pub(super) fn scale_model_input(sample: &Tensor, sigma: f32) -> Tensor {
    sample / f64::from(torch_sqrt(sigma * sigma + 1.0))
}

/// The denoised estimate x̂_0 from an epsilon or v prediction at noise level `sigma`
/// (`sample` in float32, the model output in its own dtype, as diffusers mixes them).
pub(super) fn denoised(
    prediction: &PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Tensor {
    match prediction {
        PredictionType::Epsilon => sample - model_output * f64::from(sigma),
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            model_output * f64::from(-sigma / torch_sqrt(variance)) + sample / f64::from(variance)
        }
        PredictionType::Sample | PredictionType::Other(_) => {
            unreachable!("handled by the caller")
        }
    }
}
