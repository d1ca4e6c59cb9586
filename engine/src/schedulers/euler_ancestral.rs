//! diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then fresh
//! noise of scale `sigma_up`, with `sigma_down² + sigma_up² = sigma_next²` (k-diffusion's
//! `sample_euler_ancestral` with eta = 1).

use tch::{Kind, Tensor};

use super::config::unsupported;
use super::euler::{
    denoised, init_noise_sigma, scale_model_input, spaced_timesteps, train_schedule,
};
use super::numeric::{interp, torch_sqrt};
use super::sigmas::check_first_timestep_unique;
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};

const NAME: &str = "EulerAncestralDiscreteScheduler";

pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// One sigma per step, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let prediction = match config.prediction_type.clone() {
            None => PredictionType::Epsilon,
            Some(prediction @ (PredictionType::Epsilon | PredictionType::VPrediction)) => {
                prediction
            }
            Some(other) => {
                return Err(unsupported(
                    NAME,
                    "prediction_type",
                    other,
                    "\"epsilon\", \"v_prediction\"",
                ))
            }
        };
        let spacing = config
            .timestep_spacing
            .clone()
            .unwrap_or(TimestepSpacing::Linspace);
        let schedule = train_schedule(NAME, config)?;
        let train_sigmas = schedule.sigmas();
        let timesteps = spaced_timesteps(
            NAME,
            &spacing,
            schedule.len(),
            num_inference_steps,
            config.steps_offset.unwrap_or(0),
        )?;
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(f64::from(t), &train_sigmas) as f32)
            .chain([0.0])
            .collect();
        let timesteps: Vec<f64> = timesteps.into_iter().map(f64::from).collect();
        check_first_timestep_unique(NAME, &timesteps)?;
        Ok(EulerAncestral {
            init_noise_sigma: init_noise_sigma(&sigmas, &spacing),
            timesteps,
            sigmas,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
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
        noise: Option<&Tensor>,
    ) -> Tensor {
        let noise = noise.expect("EulerAncestral::step needs a standard-normal noise tensor");
        let out_kind = sample.kind();
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.sigmas[step];
        let pred_original_sample = denoised(&self.prediction, model_output, &sample, sigma);

        let (sigma_from, sigma_to) = (sigma, self.sigmas[step + 1]);
        let sigma_up = torch_sqrt(
            sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                / (sigma_from * sigma_from),
        );
        let sigma_down = torch_sqrt(sigma_to * sigma_to - sigma_up * sigma_up);

        let derivative = (&sample - pred_original_sample) / f64::from(sigma);
        let dt = sigma_down - sigma;
        let prev_sample = sample + derivative * f64::from(dt);
        let noise = noise.to_device(prev_sample.device());
        let prev_sample = prev_sample + noise * f64::from(sigma_up);
        prev_sample.to_kind(out_kind)
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        super::add_noise_sigma(original, noise, self.sigmas[step])
    }
}
