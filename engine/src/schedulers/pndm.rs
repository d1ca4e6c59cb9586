//! diffusers' `PNDMScheduler` (Liu et al. 2022): pseudo linear multi-step (PLMS) steps, which
//! combine the last four noise predictions Adams–Bashforth style, after either three
//! pseudo Runge–Kutta (PRK) steps of four evaluations each or, with `skip_prk_steps`, a
//! second-order warm-up that evaluates the model twice at the second timestep.

use tch::Tensor;

use super::config::{unsupported, TrainSchedule};
use super::ddim::{spaced_timesteps, timestep_out_of_range};
use super::numeric::torch_sqrt;
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};

const NAME: &str = "PNDMScheduler";

/// PRK warm-up: three Runge–Kutta steps of four model evaluations each.
const PRK_STEPS: usize = 12;

pub struct Pndm {
    schedule: TrainSchedule,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    /// The loop's timesteps: the PRK ones (if any), then the PLMS ones.
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    prk_steps: usize,
    /// `num_train_timesteps / num_inference_steps` (integer).
    step_ratio: i64,
    /// How many steps have been taken (diffusers' `counter`).
    counter: usize,
    /// The loop index of the first step taken (non-zero in image-to-image).
    first_step: Option<usize>,
    /// The recent noise predictions (diffusers' `ets`), oldest first.
    ets: Vec<Tensor>,
    /// PRK: the weighted sum of the current step's evaluations so far.
    cur_model_output: Option<Tensor>,
    /// The sample a multi-evaluation step started from.
    cur_sample: Option<Tensor>,
}

impl Pndm {
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
            .unwrap_or(TimestepSpacing::Leading);
        // PNDMScheduler has no rescale_betas_zero_snr.
        let schedule = TrainSchedule::new(NAME, config, false)?;
        let num_train_timesteps = schedule.len();
        let n = num_inference_steps;
        // diffusers' `_timesteps`, ascending.
        let mut ascending = spaced_timesteps(
            NAME,
            &spacing,
            num_train_timesteps,
            n,
            config.steps_offset.unwrap_or(0),
        )?;
        ascending.reverse();
        let len = ascending.len();

        let skip_prk_steps = config.skip_prk_steps.unwrap_or(false);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk_steps {
            // The second-to-last timestep twice: the warm-up evaluates the model there again.
            let mut plms = ascending[..len - 1].to_vec();
            if len >= 2 {
                plms.push(ascending[len - 2]);
            }
            plms.push(ascending[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(SchedulerError::InvalidConfig {
                    scheduler: NAME,
                    message: format!(
                        "the PRK warm-up (skip_prk_steps = false) needs at least 4 inference \
                         steps, got {n}"
                    ),
                });
            }
            // Each of the last four timesteps t with its midpoint t + h, then every point
            // but the very last doubled (RK4 evaluates the midpoint twice), descending.
            let half = (num_train_timesteps / n / 2) as i64;
            let points: Vec<i64> = ascending[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let doubled: Vec<i64> = points[..points.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            debug_assert_eq!(prk.len(), PRK_STEPS);
            let plms = ascending[..len - 3].iter().rev().copied().collect();
            (prk, plms)
        };

        let timesteps: Vec<i64> = prk.iter().chain(&plms).copied().collect();
        let pndm = Pndm {
            final_alpha_cumprod: if config.set_alpha_to_one.unwrap_or(false) {
                1.0
            } else {
                schedule.alphas_cumprod[0]
            },
            schedule,
            prediction,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            prk_steps: prk.len(),
            step_ratio: (num_train_timesteps / n) as i64,
            counter: 0,
            first_step: None,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        };
        // Every ᾱ lookup the loop will make must exist (diffusers fails with an IndexError).
        for counter in 0..pndm.timesteps.len() {
            let (t, prev_t) = pndm.timestep_pair(counter, counter);
            if pndm.schedule.alpha_bar(t).is_none() {
                return Err(timestep_out_of_range(NAME, t, num_train_timesteps));
            }
            if prev_t >= 0 && pndm.schedule.alpha_bar(prev_t).is_none() {
                return Err(timestep_out_of_range(NAME, prev_t, num_train_timesteps));
            }
        }
        Ok(pndm)
    }

    fn is_prk(&self, counter: usize) -> bool {
        counter < self.prk_steps
    }

    /// The timestep the `counter`-th step taken (at loop index `step`) goes from and the one
    /// it goes to.
    fn timestep_pair(&self, counter: usize, step: usize) -> (i64, i64) {
        let t = self.timesteps[step];
        if self.is_prk(counter) {
            // Each RK step starts from its first timestep; its first two evaluations go half
            // way (to the midpoint where the next evaluation happens), the last two all the way.
            let half = self.step_ratio / 2;
            let prev_t = if counter % 2 == 1 { t } else { t - half };
            (self.timesteps[counter / 4 * 4], prev_t)
        } else if counter == 1 {
            // The warm-up's second evaluation redoes the first step, from its timestep.
            (t + self.step_ratio, t)
        } else {
            (t, t - self.step_ratio)
        }
    }

    fn step_prk(&mut self, model_output: &Tensor, sample: &Tensor) -> (Tensor, Tensor) {
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(model_output * (1.0 / 6.0));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            1 | 2 => {
                let sum = self
                    .cur_model_output
                    .take()
                    .expect("set by the first evaluation");
                self.cur_model_output = Some(sum + model_output * (1.0 / 3.0));
                model_output.shallow_clone()
            }
            _ => {
                let sum = self
                    .cur_model_output
                    .take()
                    .expect("set by the first evaluation");
                sum + model_output * (1.0 / 6.0)
            }
        };
        let cur_sample = match &self.cur_sample {
            Some(cur_sample) => cur_sample.shallow_clone(),
            None => sample.shallow_clone(),
        };
        (model_output, cur_sample)
    }

    fn step_plms(&mut self, model_output: &Tensor, sample: &Tensor) -> (Tensor, Tensor) {
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        }
        let e = |back: usize| &self.ets[self.ets.len() - back];
        let mut sample = sample.shallow_clone();
        let model_output = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            (1, 1) => {
                let averaged = (model_output + e(1)) / 2.0;
                sample = self.cur_sample.take().expect("set by the first step");
                averaged
            }
            (2, _) => (e(1) * 3.0 - e(2)) / 2.0,
            (3, _) => (e(1) * 23.0 - e(2) * 16.0 + e(3) * 5.0) / 12.0,
            _ => (e(1) * 55.0 - e(2) * 59.0 + e(3) * 37.0 - e(4) * 9.0) * (1.0 / 24.0),
        };
        (model_output, sample)
    }

    /// diffusers' `_get_prev_sample`: PNDM's transfer from `t` to `prev_t` (eq. 9 of the
    /// paper) given the noise estimate.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> Tensor {
        let alpha_prod_t = self.schedule.alpha_bar(t).expect("validated timestep");
        let alpha_prod_t_prev = match prev_t {
            0.. => self.schedule.alpha_bar(prev_t).expect("validated timestep"),
            _ => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.prediction {
            PredictionType::VPrediction => {
                model_output * f64::from(torch_sqrt(alpha_prod_t))
                    + sample * f64::from(torch_sqrt(beta_prod_t))
            }
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = torch_sqrt(alpha_prod_t_prev / alpha_prod_t);
        let model_output_denom_coeff = alpha_prod_t * torch_sqrt(beta_prod_t_prev)
            + torch_sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
        sample * f64::from(sample_coeff)
            - model_output * f64::from(alpha_prod_t_prev - alpha_prod_t)
                / f64::from(model_output_denom_coeff)
    }
}

impl Scheduler for Pndm {
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
        // Image-to-image starts at a later loop index; the multistep history still starts
        // empty there (diffusers' counter counts steps taken, the timestep comes from the
        // loop). So do the Runge-Kutta warm-up steps: as in diffusers, the first
        // `prk_steps` steps taken are RK steps, each going from the schedule's RK timestep
        // for that counter to a target derived from the loop's timestep.
        let first_step = *self.first_step.get_or_insert(step);
        assert_eq!(
            step,
            first_step + self.counter,
            "PNDM steps must be taken in order"
        );
        let (t, prev_t) = self.timestep_pair(self.counter, step);
        let (model_output, from_sample) = if self.is_prk(self.counter) {
            self.step_prk(model_output, sample)
        } else {
            self.step_plms(model_output, sample)
        };
        let prev_sample = self.prev_sample(&from_sample, t, prev_t, &model_output);
        self.counter += 1;
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
