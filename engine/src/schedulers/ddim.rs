//! diffusers' `DDIMScheduler` (Song et al. 2020) with eta = 0: the deterministic sampler
//! `x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev) ε̂`.

use tch::{Kind, Tensor};

use super::config::{unsupported, TrainSchedule};
use super::numeric::{arange, linspace, round, torch_sqrt};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};

const NAME: &str = "DDIMScheduler";

pub struct Ddim {
    schedule: TrainSchedule,
    /// ᾱ used past the last step (1, or ᾱ_0 when `set_alpha_to_one` is false).
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    /// How far back each step goes: `num_train_timesteps / num_inference_steps` (integer).
    step_ratio: i64,
    prediction: PredictionType,
    thresholding: Option<Thresholding>,
    clip_sample_range: Option<f64>,
}

impl Ddim {
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
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
        let spacing = config
            .timestep_spacing
            .clone()
            .unwrap_or(TimestepSpacing::Leading);
        let schedule =
            TrainSchedule::new(NAME, config, config.rescale_betas_zero_snr.unwrap_or(false))?;
        let num_train_timesteps = schedule.len();
        let timesteps = spaced_timesteps(
            NAME,
            &spacing,
            num_train_timesteps,
            num_inference_steps,
            config.steps_offset.unwrap_or(0),
        )?;
        if let Some(&t) = timesteps.iter().find(|&&t| schedule.alpha_bar(t).is_none()) {
            return Err(timestep_out_of_range(NAME, t, num_train_timesteps));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip_sample_range = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Ddim {
            final_alpha_cumprod,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            step_ratio: (num_train_timesteps / num_inference_steps) as i64,
            prediction,
            thresholding: Thresholding::from_config(config),
            clip_sample_range,
            schedule,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let t = self.timesteps[step];
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.schedule.alpha_bar(t).expect("validated timestep");
        let alpha_prod_t_prev = match prev_t {
            0.. => self
                .schedule
                .alpha_bar(prev_t)
                .expect("below a valid timestep"),
            _ => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let sqrt_alpha = f64::from(torch_sqrt(alpha_prod_t));
        let sqrt_beta = f64::from(torch_sqrt(beta_prod_t));

        // The predicted clean sample x̂_0 and noise ε̂.
        let (pred_original_sample, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => (
                (sample - model_output * sqrt_beta) / sqrt_alpha,
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => (
                model_output.shallow_clone(),
                (sample - model_output * sqrt_alpha) / sqrt_beta,
            ),
            PredictionType::VPrediction => (
                sample * sqrt_alpha - model_output * sqrt_beta,
                model_output * sqrt_alpha + sample * sqrt_beta,
            ),
            PredictionType::Other(_) => unreachable!("rejected in new"),
        };
        let pred_original_sample = match (&self.thresholding, self.clip_sample_range) {
            (Some(thresholding), _) => thresholding.apply(&pred_original_sample),
            (None, Some(range)) => pred_original_sample.clamp(-range, range),
            (None, None) => pred_original_sample,
        };

        // eta = 0: no noise, and the direction to x_t takes all of 1 - ᾱ_prev.
        let direction_coeff = torch_sqrt(1.0 - alpha_prod_t_prev);
        let prev_sample = pred_original_sample * f64::from(torch_sqrt(alpha_prod_t_prev))
            + pred_epsilon * f64::from(direction_coeff);
        prev_sample.to_kind(sample.kind())
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        let alpha_bar = self
            .schedule
            .alpha_bar(self.timesteps[step])
            .expect("timesteps are validated against the schedule");
        super::add_noise_alpha_bar(original, noise, alpha_bar)
    }
}

/// The integer timesteps of DDIM and PNDM, in descending order:
/// `linspace`: `round(linspace(0, T - 1, n))`; `leading`: `i * (T / n) + steps_offset`;
/// `trailing`: `round(arange(T, 0, -T / n)) - 1` (all as numpy computes them).
pub(super) fn spaced_timesteps(
    scheduler: &'static str,
    spacing: &TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>, SchedulerError> {
    let (train, n) = (num_train_timesteps, num_inference_steps);
    Ok(match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let step_ratio = (train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * step_ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| round(t) as i64 - 1)
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

pub(super) fn timestep_out_of_range(
    scheduler: &'static str,
    t: i64,
    num_train_timesteps: usize,
) -> SchedulerError {
    SchedulerError::InvalidConfig {
        scheduler,
        message: format!(
            "the schedule reaches timestep {t}, past the {num_train_timesteps} training \
             timesteps (diffusers fails on it); lower steps_offset or the number of steps"
        ),
    }
}

/// diffusers' dynamic thresholding (Saharia et al. 2022): clamps each sample of x̂_0 to the
/// `ratio` quantile `s` of its absolute values (`s` kept within `1..=max`) and divides by `s`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Thresholding {
    ratio: f64,
    max: f64,
}

impl Thresholding {
    pub fn from_config(config: &SchedulerConfig) -> Option<Self> {
        config.thresholding.unwrap_or(false).then(|| Thresholding {
            ratio: config.dynamic_thresholding_ratio.unwrap_or(0.995),
            max: config.sample_max_value.unwrap_or(1.0),
        })
    }

    pub fn apply(&self, sample: &Tensor) -> Tensor {
        let kind = sample.kind();
        let shape = sample.size();
        let sample = match kind {
            Kind::Float | Kind::Double => sample.shallow_clone(),
            _ => sample.to_kind(Kind::Float), // quantile needs float
        };
        let flat = sample.reshape([shape[0], -1]);
        let s = flat
            .abs()
            .quantile_scalar(self.ratio, 1, false, "linear")
            .clamp(1.0, self.max)
            .unsqueeze(1);
        let clamped = flat.clamp_tensor(Some(&-&s), Some(&s)) / &s;
        clamped.reshape(shape.as_slice()).to_kind(kind)
    }
}
