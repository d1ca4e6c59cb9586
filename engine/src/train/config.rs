//! What a training takes and what it produces.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Where generated class images are kept (and reused) inside the output folder.
pub const CLASS_IMAGES_DIR: &str = "class_images";
/// A checkpoint's state file.
pub const CHECKPOINT_STATE: &str = "state.json";
/// A checkpoint's optimizer moments.
pub const CHECKPOINT_OPTIMIZER: &str = "optimizer.safetensors";

/// Mixed precision: the frozen base model in half precision, the LoRA weights, their
/// gradients and the optimizer in float32. fp16 (with dynamic loss scaling) needs CUDA;
/// bf16 also runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    /// The dtype the base model is loaded in.
    pub fn model_dtype(self) -> Kind {
        match self {
            MixedPrecision::No => Kind::Float,
            MixedPrecision::Fp16 => Kind::Half,
            MixedPrecision::Bf16 => Kind::BFloat16,
        }
    }
}

/// Everything `imagegen train` takes.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// What the user named as the base model (recorded in the output's metadata).
    pub model: String,
    /// Instance image folders and/or files.
    pub images: Vec<PathBuf>,
    pub instance_prompt: String,
    /// Prior preservation is on when set.
    pub class_prompt: Option<String>,
    pub class_images: usize,
    pub prior_weight: f64,
    pub steps: u32,
    pub rank: i64,
    pub alpha: f64,
    pub lr: f64,
    pub resolution: u32,
    pub train_text_encoder: bool,
    pub seed: u64,
    pub checkpoint_every: Option<u32>,
    pub resume: Option<PathBuf>,
    pub out: PathBuf,
    pub batch_size: u32,
    pub grad_accum: u32,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub snr_gamma: Option<f64>,
    pub mixed_precision: MixedPrecision,
    /// Also write `<out>/<name>_kohya.safetensors`.
    pub kohya: bool,
}

impl TrainConfig {
    /// The defaults: 800 steps, rank 4, alpha 4, lr 1e-4, 512 px, batch 1, no
    /// accumulation or warmup, weight decay 1e-2, grad norm 1, 100 class images of weight 1.
    pub fn new(
        model: impl Into<String>,
        images: Vec<PathBuf>,
        instance_prompt: impl Into<String>,
        out: impl Into<PathBuf>,
    ) -> Self {
        TrainConfig {
            model: model.into(),
            images,
            instance_prompt: instance_prompt.into(),
            class_prompt: None,
            class_images: 100,
            prior_weight: 1.0,
            steps: 800,
            rank: 4,
            alpha: 4.0,
            lr: 1e-4,
            resolution: 512,
            train_text_encoder: false,
            seed: 0,
            checkpoint_every: None,
            resume: None,
            out: out.into(),
            batch_size: 1,
            grad_accum: 1,
            warmup_steps: 0,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            snr_gamma: None,
            mixed_precision: MixedPrecision::No,
            kohya: false,
        }
    }

    /// Refuses values training cannot run with, naming the option.
    pub fn validate(&self, device: Device) -> Result<()> {
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    field,
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        if self.instance_prompt.trim().is_empty() {
            return Err(Error::invalid("instance-prompt", "must not be empty"));
        }
        if !(1..=1024).contains(&self.rank) {
            return Err(Error::invalid(
                "rank",
                format!("must be between 1 and 1024, got {}", self.rank),
            ));
        }
        positive("alpha", self.alpha)?;
        positive("lr", self.lr)?;
        positive("max-grad-norm", self.max_grad_norm)?;
        if let Some(gamma) = self.snr_gamma {
            positive("snr-gamma", gamma)?;
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid("weight-decay", "must be 0 or more"));
        }
        if !(self.prior_weight.is_finite() && self.prior_weight >= 0.0) {
            return Err(Error::invalid("prior-weight", "must be 0 or more"));
        }
        if self.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::invalid(
                "batch-size",
                "batch size and gradient accumulation must be at least 1",
            ));
        }
        if self.resolution < 8 || self.resolution > 2048 || !self.resolution.is_multiple_of(8) {
            return Err(Error::invalid(
                "resolution",
                format!(
                    "must be a multiple of 8 between 8 and 2048, got {}",
                    self.resolution
                ),
            ));
        }
        if self.checkpoint_every == Some(0) {
            return Err(Error::invalid("checkpoint-every", "must be at least 1"));
        }
        if self.class_prompt.is_some() && self.class_images == 0 {
            return Err(Error::invalid(
                "class-images",
                "prior preservation needs at least 1 class image",
            ));
        }
        // float16 needs CUDA (loss scaling, and libtorch's CPU half kernels are slow or
        // missing); bfloat16 runs on the CPU as well, as accelerate allows.
        if self.mixed_precision == MixedPrecision::Fp16 && !device.is_cuda() {
            return Err(Error::invalid(
                "mixed-precision",
                "fp16 training needs a CUDA device; use bf16 or no on the CPU",
            ));
        }
        Ok(())
    }
}

/// What a finished training produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// `<out>/pytorch_lora_weights.safetensors`.
    pub output: PathBuf,
    pub kohya_output: Option<PathBuf>,
    /// The loss of every step this run took, in order (index 0 = the first step run).
    pub losses: Vec<f64>,
}

pub(super) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
