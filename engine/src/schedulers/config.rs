//! diffusers' scheduler_config.json, and the training noise schedule (betas, alphas) it defines.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use tch::{Device, Kind, Tensor};

use super::numeric::torch_sqrt_all;
use super::SchedulerError;

/// What the model predicts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PredictionType {
    /// The noise (`"epsilon"`).
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (`"v_prediction"`).
    VPrediction,
    /// The denoised sample itself (`"sample"`).
    Sample,
    /// Any other value; the schedulers reject it.
    Other(String),
}

impl From<String> for PredictionType {
    fn from(value: String) -> Self {
        match value.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            _ => PredictionType::Other(value),
        }
    }
}

impl<'de> Deserialize<'de> for PredictionType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// How the inference timesteps are spread over the training timesteps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TimestepSpacing {
    /// Evenly from 0 up, by `num_train_timesteps / n` (integer), plus `steps_offset`.
    Leading,
    /// Evenly from the last training timestep down.
    Trailing,
    /// `linspace(0, num_train_timesteps - 1, n)`.
    Linspace,
    /// Any other value; the schedulers reject it.
    Other(String),
}

impl From<String> for TimestepSpacing {
    fn from(value: String) -> Self {
        match value.as_str() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            _ => TimestepSpacing::Other(value),
        }
    }
}

impl<'de> Deserialize<'de> for TimestepSpacing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// diffusers' scheduler_config.json. Every key is optional: each scheduler applies its own
/// diffusers default to the keys a config leaves out (or sets to null). Unknown keys are
/// ignored, as are keys the chosen scheduler class does not have.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(deserialize_with = "float")]
    pub beta_start: Option<f64>,
    #[serde(deserialize_with = "float")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM / PNDM
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub clip_sample_range: Option<f64>,
    pub skip_prk_steps: Option<bool>,
    // DDIM / DPM-Solver dynamic thresholding
    pub thresholding: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub dynamic_thresholding_ratio: Option<f64>,
    #[serde(deserialize_with = "float")]
    pub sample_max_value: Option<f64>,
    // Euler / DPM-Solver sigmas
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub sigma_min: Option<f64>,
    #[serde(deserialize_with = "float")]
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    // DPM-Solver
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub use_dynamic_shifting: Option<bool>,
}

impl SchedulerConfig {
    /// Reads a scheduler_config.json.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses a scheduler_config.json. Python's `json` writes non-finite floats as bare
    /// `Infinity`, `-Infinity` and `NaN` (diffusers' DPM-Solver configs hold
    /// `"lambda_min_clipped": -Infinity`); those are accepted too.
    pub fn from_json_str(json: &str) -> Result<Self, SchedulerError> {
        Ok(serde_json::from_str(&quote_non_finite_floats(json))?)
    }
}

/// Rewrites the bare tokens `Infinity`, `-Infinity` and `NaN` outside string literals as
/// strings, which [`float`] then reads back as numbers.
fn quote_non_finite_floats(json: &str) -> std::borrow::Cow<'_, str> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !TOKENS.iter().any(|token| json.contains(token)) {
        return json.into();
    }
    let mut out = String::with_capacity(json.len() + 16);
    let mut rest = json;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = TOKENS.iter().find(|token| rest.starts_with(**token)) {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        match c {
            '"' => in_string = !in_string,
            '\\' if in_string => {
                // Copy the escaped character along with the backslash.
                let escaped_len = rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..1 + escaped_len]);
                rest = &rest[1 + escaped_len..];
                continue;
            }
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// An optional float given as a JSON number or as one of the strings `quote_non_finite_floats`
/// writes.
fn float<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f64),
        Text(String),
    }
    match Option::<Float>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Float::Number(x)) => Ok(Some(x)),
        Some(Float::Text(text)) => match text.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got the string {text:?}"
            ))),
        },
    }
}

/// The error for a config value a scheduler does not implement.
pub(super) fn unsupported(
    scheduler: &'static str,
    key: &'static str,
    value: impl std::fmt::Debug,
    supported: &'static str,
) -> SchedulerError {
    SchedulerError::Unsupported {
        scheduler,
        key,
        value: format!("{value:?}"),
        supported,
    }
}

/// Rejects a boolean option the scheduler does not implement when it is switched on.
pub(super) fn reject_flag(
    scheduler: &'static str,
    key: &'static str,
    value: Option<bool>,
) -> Result<(), SchedulerError> {
    match value {
        Some(true) => Err(unsupported(scheduler, key, true, "false")),
        _ => Ok(()),
    }
}

/// The training noise schedule: `alphas_cumprod[t]` (alpha-bar) for every training timestep,
/// in float32 as diffusers holds it.
#[derive(Clone, Debug)]
pub(super) struct TrainSchedule {
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// diffusers' `betas` → `alphas` → `alphas_cumprod` for the config's `beta_schedule` (or
    /// `trained_betas`), with the betas rescaled to zero terminal SNR if asked. The class
    /// defaults are the same for all schedulers here: 1000 timesteps of linear betas from
    /// 0.0001 to 0.02.
    pub fn new(
        scheduler: &'static str,
        config: &SchedulerConfig,
        rescale_betas_zero_snr: bool,
    ) -> Result<Self, SchedulerError> {
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        let beta_start = config.beta_start.unwrap_or(0.0001);
        let beta_end = config.beta_end.unwrap_or(0.02);
        let betas: Vec<f32> = if let Some(trained) = &config.trained_betas {
            if trained.len() != num_train_timesteps {
                return Err(SchedulerError::InvalidConfig {
                    scheduler,
                    message: format!(
                        "trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                        trained.len()
                    ),
                });
            }
            trained.iter().map(|&beta| beta as f32).collect()
        } else {
            match config.beta_schedule.as_deref().unwrap_or("linear") {
                "linear" => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
                "scaled_linear" => torch_linspace_f32(
                    beta_start.powf(0.5),
                    beta_end.powf(0.5),
                    num_train_timesteps,
                )
                .into_iter()
                .map(|root| root * root)
                .collect(),
                "squaredcos_cap_v2" => betas_for_cosine_alpha_bar(num_train_timesteps),
                other => {
                    return Err(unsupported(
                        scheduler,
                        "beta_schedule",
                        other,
                        "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\" or trained_betas",
                    ))
                }
            }
        };
        let betas = if rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
        Ok(TrainSchedule {
            alphas_cumprod: torch_cumprod_f32(&alphas),
        })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `alphas_cumprod[t]` with Python's indexing: negative `t` counts from the end (diffusers
    /// indexes with timestep -1 when trailing spacing yields one). `None` when out of range.
    pub fn alpha_bar(&self, t: i64) -> Option<f32> {
        let len = self.len() as i64;
        let index = if t < 0 { t + len } else { t };
        (0..len)
            .contains(&index)
            .then(|| self.alphas_cumprod[index as usize])
    }

    /// The noise-to-signal ratios `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`, in
    /// float32, ascending in t.
    pub fn sigmas(&self) -> Vec<f32> {
        let ratios: Vec<f32> = self
            .alphas_cumprod
            .iter()
            .map(|&alpha_bar| (1.0 - alpha_bar) / alpha_bar)
            .collect();
        torch_sqrt_all(&ratios)
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)`: libtorch's own kernel, which
/// fills the two halves from either end.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let values = Tensor::linspace(start, end, steps as i64, (Kind::Float, Device::Cpu));
    Vec::<f32>::try_from(&values).expect("a float32 vector")
}

/// `torch.cumprod` of a float32 vector (libtorch accumulates in float64 on the CPU).
fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let products = Tensor::from_slice(values).cumprod(0, Kind::Float);
    Vec::<f32>::try_from(&products).expect("a float32 vector")
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha-bar of Nichol & Dhariwal, capped at
/// 0.999, computed in float64 and stored as float32.
fn betas_for_cosine_alpha_bar(num_diffusion_timesteps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1): shifts and scales
/// sqrt(alpha-bar) so that the last timestep has zero signal, keeping the first one.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
    let alphas_bar_sqrt = torch_sqrt_all(&torch_cumprod_f32(&alphas));
    let first = alphas_bar_sqrt[0];
    let last = *alphas_bar_sqrt.last().expect("at least one timestep");
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = alphas_bar_sqrt
        .iter()
        .map(|s| {
            let rescaled = (s - last) * scale;
            rescaled * rescaled
        })
        .collect();
    std::iter::once(alphas_bar[0])
        .chain(alphas_bar.windows(2).map(|pair| pair[1] / pair[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}
