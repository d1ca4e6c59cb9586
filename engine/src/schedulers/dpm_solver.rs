//! diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (Lu et al. 2022): a
//! second-order multistep solver of the data-prediction ODE in `lambda = log(alpha / sigma)`,
//! with a first-order (DDIM) step first and, by default, last.

use tch::{Kind, Tensor};

use super::config::{reject_flag, unsupported};
use super::ddim::Thresholding;
use super::euler::{final_sigma_is_zero, train_schedule};
use super::numeric::{arange, interp, linspace, round, torch_exp, torch_ln};
use super::sigmas::{alpha_sigma, check_first_timestep_unique, karras, log_sigmas, sigma_to_t};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};

const NAME: &str = "DPMSolverMultistepScheduler";

/// How the second-order step uses the difference of the last two predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub struct DpmSolverPp2m {
    timesteps: Vec<f64>,
    /// One sigma per step and the final one (0, or the smallest training sigma).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_is_zero: bool,
    thresholding: Option<Thresholding>,
    /// The previous step's data prediction x̂_0 (diffusers' `model_outputs[-2]`).
    previous_output: Option<Tensor>,
    /// How many steps have run, capped at the solver order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

impl DpmSolverPp2m {
    /// `karras_sigmas`: use Karras sigmas (whatever the config says about `use_karras_sigmas`).
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        karras_sigmas: bool,
    ) -> Result<Self, SchedulerError> {
        // algorithm_type and solver_order are overridden (dpmsolver++, 2).
        reject_flag(
            NAME,
            "use_exponential_sigmas",
            config.use_exponential_sigmas,
        )?;
        reject_flag(NAME, "use_beta_sigmas", config.use_beta_sigmas)?;
        reject_flag(NAME, "use_lu_lambdas", config.use_lu_lambdas)?;
        reject_flag(NAME, "use_flow_sigmas", config.use_flow_sigmas)?;
        if let Some(variance_type @ ("learned" | "learned_range")) = config.variance_type.as_deref()
        {
            return Err(unsupported(NAME, "variance_type", variance_type, "null"));
        }
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
        let solver_type = match config.solver_type.as_deref() {
            // diffusers maps the other solvers' names to midpoint.
            None | Some("midpoint" | "logrho" | "bh1" | "bh2") => SolverType::Midpoint,
            Some("heun") => SolverType::Heun,
            Some(other) => {
                return Err(unsupported(
                    NAME,
                    "solver_type",
                    other,
                    "\"midpoint\", \"heun\"",
                ))
            }
        };
        let final_sigma_is_zero = final_sigma_is_zero(NAME, config)?;
        let spacing = config
            .timestep_spacing
            .clone()
            .unwrap_or(TimestepSpacing::Linspace);

        let schedule = train_schedule(NAME, config)?;
        let num_train_timesteps = schedule.len();
        let train_sigmas = schedule.sigmas();
        let n = num_inference_steps;

        // Timesteps whose lambda is below lambda_min_clipped are left out at the noisy end.
        let last_timestep = num_train_timesteps
            - clipped_timesteps(
                &schedule.alphas_cumprod,
                config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            );
        if last_timestep == 0 {
            return Err(SchedulerError::InvalidConfig {
                scheduler: NAME,
                message: format!(
                    "lambda_min_clipped = {} leaves no timestep to sample",
                    config.lambda_min_clipped.unwrap_or_default()
                ),
            });
        }
        let steps_offset = config.steps_offset.unwrap_or(0);
        let mut timesteps: Vec<i64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut points = linspace(0.0, (last_timestep - 1) as f64, n + 1);
                points.remove(0);
                points.into_iter().rev().map(|t| round(t) as i64).collect()
            }
            TimestepSpacing::Leading => {
                let step_ratio = (last_timestep / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * step_ratio + steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let step_ratio = num_train_timesteps as f64 / n as f64;
                arange(last_timestep as f64, 0.0, -step_ratio)
                    .into_iter()
                    .map(|t| round(t) as i64 - 1)
                    .collect()
            }
            TimestepSpacing::Other(value) => {
                return Err(unsupported(
                    NAME,
                    "timestep_spacing",
                    value,
                    "\"leading\", \"trailing\", \"linspace\"",
                ))
            }
        };

        let sigmas: Vec<f64> = if karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0].into());
            let sigma_max = config
                .sigma_max
                .unwrap_or(train_sigmas[num_train_timesteps - 1].into());
            let sigmas = karras(sigma_min, sigma_max, n);
            let log_sigmas = log_sigmas(&train_sigmas);
            // Rounded to the nearest training timestep, except for the cosine schedule, whose
            // timesteps diffusers truncates.
            let rounded = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            timesteps = sigmas
                .iter()
                .map(|&sigma| {
                    let t = sigma_to_t(sigma, &log_sigmas);
                    (if rounded { round(t) } else { t }) as i64
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| interp(t as f64, &train_sigmas))
                .collect()
        };
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
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| t as f64).collect();
        check_first_timestep_unique(NAME, &timesteps)?;

        Ok(DpmSolverPp2m {
            timesteps,
            sigmas,
            prediction,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_is_zero,
            thresholding: Thresholding::from_config(config),
            previous_output: None,
            lower_order_nums: 0,
        })
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the data prediction x̂_0.
    fn convert_model_output(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        let x0_pred = match self.prediction {
            PredictionType::Epsilon => {
                (sample - model_output * f64::from(sigma_t)) / f64::from(alpha_t)
            }
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                sample * f64::from(alpha_t) - model_output * f64::from(sigma_t)
            }
            PredictionType::Other(_) => unreachable!("rejected in new"),
        };
        match &self.thresholding {
            Some(thresholding) => thresholding.apply(&x0_pred),
            None => x0_pred,
        }
    }

    /// `(alpha, sigma, lambda)` at sigma index `index`, all float32 as diffusers' 0-d tensors.
    fn alpha_sigma_lambda(&self, index: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        (alpha, sigma, torch_ln(alpha) - torch_ln(sigma))
    }

    /// DPM-Solver++ first-order update (DDIM): `x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) x̂_0`.
    fn first_order_update(&self, x0_pred: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step + 1);
        let (_, sigma_s, lambda_s) = self.alpha_sigma_lambda(step);
        let h = lambda_t - lambda_s;
        sample * f64::from(sigma_t / sigma_s) - x0_pred * f64::from(alpha_t * (torch_exp(-h) - 1.0))
    }

    /// DPM-Solver++(2M) update from the current and previous data predictions `m0`, `m1`.
    fn second_order_update(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        step: usize,
        sample: &Tensor,
    ) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step + 1);
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(step);
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(step - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = (m0 - m1) * f64::from(1.0 / r0);
        let exp_neg_h_minus_1 = torch_exp(-h) - 1.0;
        let x_t =
            sample * f64::from(sigma_t / sigma_s0) - d0 * f64::from(alpha_t * exp_neg_h_minus_1);
        match self.solver_type {
            SolverType::Midpoint => x_t - d1 * f64::from(0.5 * (alpha_t * exp_neg_h_minus_1)),
            SolverType::Heun => x_t + d1 * f64::from(alpha_t * (exp_neg_h_minus_1 / h + 1.0)),
        }
    }
}

impl Scheduler for DpmSolverPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Tensor {
        let is_last = step == self.timesteps.len() - 1;
        let lower_order_final = is_last
            && (self.euler_at_final
                || (self.lower_order_final && self.timesteps.len() < 15)
                || self.final_sigma_is_zero);
        let x0_pred = self.convert_model_output(model_output, step, sample);
        let previous = self.previous_output.replace(x0_pred.shallow_clone());

        let sample32 = sample.to_kind(Kind::Float);
        let prev_sample = match previous {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                self.second_order_update(&x0_pred, &m1, step, &sample32)
            }
            _ => self.first_order_update(&x0_pred, step, &sample32),
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        prev_sample.to_kind(sample.kind())
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        super::add_noise_vp_sigma(original, noise, self.sigmas[step])
    }
}

/// How many of the noisiest training timesteps have `lambda = log(alpha / sigma)` below
/// `lambda_min_clipped` (diffusers' `searchsorted` over the flipped lambdas, computed with
/// libtorch's float32 log as diffusers does).
fn clipped_timesteps(alphas_cumprod: &[f32], lambda_min_clipped: f64) -> usize {
    if lambda_min_clipped == f64::NEG_INFINITY {
        return 0;
    }
    let alphas_cumprod = Tensor::from_slice(alphas_cumprod);
    let lambdas = alphas_cumprod.sqrt().log() - (1f64 - &alphas_cumprod).sqrt().log();
    let ascending = Vec::<f32>::try_from(lambdas.flip([0])).expect("a float32 vector");
    ascending
        .iter()
        .position(|&lambda| f64::from(lambda) >= lambda_min_clipped)
        .unwrap_or(ascending.len())
}
