//! Sigma schedules shared by the Euler and DPM-Solver schedulers (k-diffusion's
//! parameterisation: `x_t = x_0 + sigma * noise` up to scale, `sigma = sqrt((1 - ᾱ) / ᾱ)`).

use super::numeric::{linspace, torch_sqrt};
use super::SchedulerError;

/// diffusers' `_convert_to_karras`: Karras et al. (2022) eq. 5 with rho = 7, i.e. `n` sigmas
/// evenly spaced in `sigma^(1/7)` from `sigma_max` down to `sigma_min` (float64).
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// `np.log` of the float32 training sigmas, in float32.
///
/// numpy computes this with its own SIMD float32 logarithm, which is not correctly rounded
/// (and differs between CPUs); this is the correctly rounded value, so it can differ in the
/// last bit. Timesteps derived from it ([`sigma_to_t`]) agree with diffusers' to about one
/// float32 ulp (integer-rounded ones exactly, barring a tie).
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| f64::from(s).ln() as f32).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// linearly in log-sigma between the two training timesteps around it (clamped to the ends).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last training timestep whose log-sigma is at most log_sigma (0 if there is none),
    // keeping one above it.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high = low + 1;
    let (low_log, high_log) = (log_sigmas[low], log_sigmas[high]);
    // (low - high) is a float32 difference in numpy too.
    let w = ((f64::from(low_log) - log_sigma) / f64::from(low_log - high_log)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: the signal and noise scales `alpha_t`,
/// `sigma_t` (with `alpha_t² + sigma_t² = 1`) of the sample at noise-to-signal ratio `sigma`.
pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / torch_sqrt(sigma * sigma + 1.0);
    (alpha_t, sigma * alpha_t)
}

/// The Euler and DPM-Solver schedulers find their position by looking up the timestep they are
/// given (`index_for_timestep`), and when the first timestep occurs twice they start at its
/// second occurrence, then run past the end of their sigmas (an IndexError). Rejects such a
/// schedule up front.
pub fn check_first_timestep_unique(
    scheduler: &'static str,
    timesteps: &[f64],
) -> Result<(), SchedulerError> {
    let first = timesteps[0];
    if timesteps[1..].contains(&first) {
        return Err(SchedulerError::InvalidConfig {
            scheduler,
            message: format!(
                "this schedule of {} steps repeats its first timestep {first}, which diffusers \
                 cannot run (it skips ahead and fails); use fewer steps or another spacing",
                timesteps.len()
            ),
        });
    }
    Ok(())
}
