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

pub mod data;
pub mod lora_params;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{catch_torch, Error, Result};
use crate::lora::DIFFUSERS_LORA_FILE;
use crate::schedulers::{training_alphas_cumprod, PredictionType};
use crate::stable_diffusion::StableDiffusion;
/// What the trainer reports, one event at a time: the API crate's type, which the operator
/// parses from `imagegen train`'s stdout.
pub use imagegen_crds::api::TrainerEvent;
use lora_params::{read_tensors, restore_tensor, write_tensors, TrainableLora};
use optim::{AdamW, AdamWConfig, LossScaler};

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

/// A checkpoint's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: u32,
    pub total_steps: u32,
    pub seed: u64,
    pub rank: i64,
    pub alpha: f64,
    pub train_text_encoder: bool,
    pub base_model: String,
    pub loss: f64,
    /// AdamW's step count (bias correction).
    pub adam_step: u64,
    /// The float16 loss scale, when training in float16.
    pub loss_scale: Option<f64>,
}

/// splitmix64: independent-looking seeds for each (step, micro-batch) from one seed.
fn derive_seed(seed: u64, step: u32, micro: u32) -> u64 {
    let mut z = seed.wrapping_add(
        0x9E37_79B9_7F4A_7C15u64
            .wrapping_mul((u64::from(step) << 20 | u64::from(micro)).wrapping_add(1)),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

/// The random draws of one micro-batch, made on the CPU from the seeded generator.
struct Draws {
    flips: Tensor,
    posterior: Tensor,
    noise: Tensor,
    timesteps: Tensor,
}

fn draw(seed: u64, batch: i64, latent: &[i64], num_train_timesteps: i64) -> Draws {
    let shape = [batch, latent[0], latent[1], latent[2]];
    crate::noise::with_seed(seed, || Draws {
        flips: Tensor::randint(2, [batch], (Kind::Int64, Device::Cpu)),
        posterior: Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        noise: Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        timesteps: Tensor::randint(num_train_timesteps, [batch], (Kind::Int64, Device::Cpu)),
    })
}

/// diffusers' `compute_snr`: `alpha_bar / (1 - alpha_bar)` at each timestep, given both.
fn snr(alpha_bar: &Tensor, one_minus_alpha_bar: &Tensor) -> Tensor {
    alpha_bar / one_minus_alpha_bar
}

/// Mean squared error per sample, `[batch]`.
fn mse_per_sample(pred: &Tensor, target: &Tensor) -> Tensor {
    (pred - target)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float)
}

/// Everything fixed for the run that a step needs.
struct Setup<'a> {
    model: &'a StableDiffusion,
    config: &'a TrainConfig,
    alphas_cumprod: Tensor,
    prediction: PredictionType,
    instance: Vec<data::CachedLatents>,
    class: Vec<data::CachedLatents>,
    /// Token ids (with the text encoder trained) or embeddings, `[1, ...]`.
    instance_text: TextInput,
    class_text: Option<TextInput>,
    /// The UNet's context when the text encoder is frozen: the same for every micro-batch,
    /// so built once.
    fixed_context: Option<Tensor>,
    order: Vec<usize>,
}

enum TextInput {
    Ids(Tensor),
    Embedding(Tensor),
}

impl TextInput {
    fn context(&self, model: &StableDiffusion) -> Tensor {
        match self {
            TextInput::Ids(ids) => model.text_encoder.model.forward(ids, 0),
            TextInput::Embedding(e) => e.shallow_clone(),
        }
    }

    fn is_fixed(&self) -> bool {
        matches!(self, TextInput::Embedding(_))
    }
}

/// The UNet's context for one micro-batch, in the model's dtype: the instance prompt's
/// `batch` rows, then (prior preservation) the class prompt's.
fn unet_context(
    model: &StableDiffusion,
    batch: i64,
    instance: &TextInput,
    class: Option<&TextInput>,
) -> Tensor {
    let instance_context = instance.context(model).repeat([batch, 1, 1]);
    let context = match class {
        Some(class) => Tensor::cat(
            &[instance_context, class.context(model).repeat([batch, 1, 1])],
            0,
        ),
        None => instance_context,
    };
    context.to_kind(model.dtype)
}

impl Setup<'_> {
    /// The loss of micro-batch `micro` of optimizer step `step` (0-based), with graph.
    fn loss(&self, step: u32, micro: u32) -> Tensor {
        let c = self.config;
        let model = self.model;
        let bs = c.batch_size as i64;
        let prior = self.class_text.is_some();
        let total = if prior { 2 * bs } else { bs };
        let latent_shape = &self.instance[0].mean[0].size()[1..];
        let num_t = self.alphas_cumprod.size()[0];
        let d = draw(derive_seed(c.seed, step, micro), total, latent_shape, num_t);
        let first = (u64::from(step) * u64::from(c.grad_accum) + u64::from(micro)) * bs as u64;
        let pick = |set: &[data::CachedLatents], k: usize, j: i64| {
            let flip = d.flips.int64_value(&[j]) as usize;
            let item = &set[k % set.len()];
            (
                item.mean[flip].shallow_clone(),
                item.std[flip].shallow_clone(),
            )
        };
        let mut means = Vec::new();
        let mut stds = Vec::new();
        for i in 0..bs {
            let k = self.order[((first + i as u64) % self.order.len() as u64) as usize];
            let (m, s) = pick(&self.instance, k, i);
            means.push(m);
            stds.push(s);
        }
        if prior {
            for i in 0..bs {
                let (m, s) = pick(&self.class, (first + i as u64) as usize, bs + i);
                means.push(m);
                stds.push(s);
            }
        }
        let device = model.device;
        let mean = Tensor::cat(&means, 0);
        let std = Tensor::cat(&stds, 0);
        let latents =
            (mean + std * d.posterior.to_device(device)) * model.vae.model.config.scaling_factor;
        let noise = d.noise.to_device(device);
        let timesteps = d.timesteps.to_device(device);
        let alpha_bar = self
            .alphas_cumprod
            .index_select(0, &timesteps)
            .view([-1, 1, 1, 1]);
        let signal = alpha_bar.sqrt();
        let one_minus_alpha_bar = alpha_bar.ones_like() - &alpha_bar;
        let sigma = one_minus_alpha_bar.sqrt();
        let noisy = &signal * &latents + &sigma * &noise;
        let target = match self.prediction {
            PredictionType::VPrediction => &signal * &noise - &sigma * &latents,
            _ => noise,
        };

        // With the text encoder trained, its LoRA changes the context every step.
        let context = match &self.fixed_context {
            Some(context) => context.shallow_clone(),
            None => unet_context(model, bs, &self.instance_text, self.class_text.as_ref()),
        };
        let pred = model
            .unet
            .model
            .forward_timesteps(&noisy.to_kind(model.dtype), &timesteps, &context)
            .to_kind(Kind::Float);

        let (pred, pred_prior, target, target_prior) = if prior {
            let p = pred.chunk(2, 0);
            let t = target.chunk(2, 0);
            (
                p[0].shallow_clone(),
                Some(p[1].shallow_clone()),
                t[0].shallow_clone(),
                Some(t[1].shallow_clone()),
            )
        } else {
            (pred, None, target, None)
        };
        let per_sample = mse_per_sample(&pred, &target);
        let loss = match c.snr_gamma {
            None => per_sample.mean(Kind::Float),
            Some(gamma) => {
                // Min-SNR-γ (diffusers' train_text_to_image_lora.py): min(snr, γ) / snr for
                // noise prediction, min(snr, γ) / (snr + 1) for v-prediction.
                let ab = alpha_bar.view([-1]).narrow(0, 0, bs);
                let snr = snr(&ab, &one_minus_alpha_bar.view([-1]).narrow(0, 0, bs));
                let clipped = snr.clamp_max(gamma);
                let weights = match self.prediction {
                    PredictionType::VPrediction => clipped / (snr + 1.0),
                    _ => clipped / snr,
                };
                (per_sample * weights).mean(Kind::Float)
            }
        };
        match (pred_prior, target_prior) {
            (Some(p), Some(t)) => loss + mse_per_sample(&p, &t).mean(Kind::Float) * c.prior_weight,
            _ => loss,
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn seeded_order(n: usize, seed: u64) -> Vec<usize> {
    let perm = crate::noise::with_seed(derive_seed(seed, u32::MAX, u32::MAX), || {
        Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu))
    });
    match Vec::<i64>::try_from(perm) {
        Ok(order) if order.len() == n => order.into_iter().map(|i| i as usize).collect(),
        _ => (0..n).collect(),
    }
}

/// Trains a LoRA on `model` (loaded in `config.mixed_precision`'s dtype on its device) and
/// writes it to `config.out`. Events go to `emit` as they happen (a failure is returned,
/// not emitted: the caller reports it).
pub fn train(
    model: &StableDiffusion,
    config: &TrainConfig,
    emit: &mut dyn FnMut(TrainerEvent),
) -> Result<TrainOutcome> {
    config.validate(model.device)?;
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

/// `--resume latest`: the highest-numbered complete checkpoint in the output folder, or a
/// fresh start when there is none (what a restarted training job wants).
pub const RESUME_LATEST: &str = "latest";

/// The step of a `checkpoint-<step>` folder name; `None` for any other name.
pub fn checkpoint_step(name: &str) -> Option<u32> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// The `checkpoint-<step>` folder of `out` with the highest step that has a state file.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = checkpoint_step(p.file_name()?.to_str()?)?;
            p.join(CHECKPOINT_STATE).is_file().then_some((step, p))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
}

fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState> {
    crate::error::read_json(&dir.join(CHECKPOINT_STATE))
}

fn check_resume(state: &CheckpointState, config: &TrainConfig) -> Result<()> {
    let mismatch = |what: &str, theirs: String, ours: String| {
        Err(Error::invalid(
            "resume",
            format!("the checkpoint was trained with {what} {theirs}, this run asks for {ours}"),
        ))
    };
    if state.rank != config.rank {
        return mismatch("rank", state.rank.to_string(), config.rank.to_string());
    }
    if state.alpha != config.alpha {
        return mismatch("alpha", state.alpha.to_string(), config.alpha.to_string());
    }
    if state.train_text_encoder != config.train_text_encoder {
        return mismatch(
            "--train-text-encoder",
            state.train_text_encoder.to_string(),
            config.train_text_encoder.to_string(),
        );
    }
    if state.seed != config.seed {
        tracing::warn!(
            checkpoint = state.seed,
            run = config.seed,
            "resuming with another seed than the checkpoint's: the draws will differ"
        );
    }
    Ok(())
}

fn text_input(model: &StableDiffusion, prompt: &str, trained: bool) -> Result<TextInput> {
    if trained {
        let ids = model.tokenizer.encode(prompt)?;
        Ok(TextInput::Ids(
            Tensor::from_slice(&ids)
                .unsqueeze(0)
                .to_device(model.device),
        ))
    } else {
        Ok(TextInput::Embedding(model.encode_text(&[prompt], 0)?))
    }
}

fn run(
    model: &StableDiffusion,
    config: &TrainConfig,
    files: &[PathBuf],
    resume: Option<(&CheckpointState, &Path)>,
    emit: &mut dyn FnMut(TrainerEvent),
) -> Result<TrainOutcome> {
    let c = config;
    let alphas_cumprod = Tensor::from_slice(&training_alphas_cumprod(&model.scheduler_config)?)
        .to_device(model.device);
    let prediction = model
        .scheduler_config
        .prediction_type
        .clone()
        .unwrap_or(PredictionType::Epsilon);
    if !matches!(
        prediction,
        PredictionType::Epsilon | PredictionType::VPrediction
    ) {
        return Err(Error::Unsupported {
            path: model.dir.clone(),
            message: format!("training a {prediction:?} model (epsilon and v_prediction only)"),
        });
    }
    if model.unet.model.config.in_channels != model.vae.model.config.latent_channels {
        return Err(Error::Unsupported {
            path: model.dir.clone(),
            message: "training needs a text-to-image UNet (this one takes extra input channels)"
                .into(),
        });
    }

    let instance = data::encode_images(model, files, c.resolution)?;
    let (class, class_text) = match &c.class_prompt {
        Some(prompt) => {
            let class_files = data::ensure_class_images(
                model,
                &c.out.join(CLASS_IMAGES_DIR),
                prompt,
                c.class_images,
                c.resolution,
                c.seed,
            )?;
            (
                data::encode_images(model, &class_files, c.resolution)?,
                Some(text_input(model, prompt, c.train_text_encoder)?),
            )
        }
        None => (Vec::new(), None),
    };
    let instance_text = text_input(model, &c.instance_prompt, c.train_text_encoder)?;
    // A frozen text encoder gives the same UNet context every step.
    let frozen_text =
        instance_text.is_fixed() && class_text.as_ref().is_none_or(TextInput::is_fixed);
    let fixed_context = frozen_text.then(|| {
        unet_context(
            model,
            c.batch_size as i64,
            &instance_text,
            class_text.as_ref(),
        )
    });
    let setup = Setup {
        model,
        config: c,
        alphas_cumprod,
        prediction,
        order: seeded_order(instance.len(), c.seed),
        instance,
        class,
        instance_text,
        class_text,
        fixed_context,
    };

    let lora = TrainableLora::new(model, c.rank, c.alpha, c.train_text_encoder, c.seed);
    let params = lora.params();
    let mut optimizer = AdamW::new(
        AdamWConfig {
            lr: c.lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: c.weight_decay,
        },
        &params,
    );
    let mut scaler = (c.mixed_precision == MixedPrecision::Fp16).then(LossScaler::default);
    let mut start = 0;
    let mut last_loss = f64::NAN;
    if let Some((state, dir)) = resume {
        lora.load_values(&dir.join(DIFFUSERS_LORA_FILE))?;
        load_optimizer(&mut optimizer, &lora, &dir.join(CHECKPOINT_OPTIMIZER))?;
        optimizer.step = state.adam_step;
        if let (Some(scaler), Some(scale)) = (scaler.as_mut(), state.loss_scale) {
            scaler.scale = scale;
        }
        start = state.step.min(c.steps);
        last_loss = state.loss;
        tracing::info!(step = start, "resuming from checkpoint");
    }
    lora.attach(model);

    emit(TrainerEvent::Started {
        total: c.steps,
        seed: c.seed,
    });
    let began = Instant::now();
    let mut losses = Vec::new();
    for step in start..c.steps {
        let lr = optim::warmup_lr(c.lr, c.warmup_steps, step);
        let mut loss_sum = 0.0;
        for micro in 0..c.grad_accum {
            let loss = setup.loss(step, micro);
            loss_sum += loss.double_value(&[]);
            let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            (loss * (scale / f64::from(c.grad_accum))).backward();
        }
        let loss = loss_sum / f64::from(c.grad_accum);
        if !loss.is_finite() {
            return Err(Error::invalid(
                "lr",
                format!(
                    "the loss became {loss} at step {} (learning rate too high?)",
                    step + 1
                ),
            ));
        }
        let apply = scaler.as_mut().is_none_or(|s| s.unscale(&params));
        if apply {
            optim::clip_grad_norm(&params, c.max_grad_norm);
            optimizer.step(&params, lr);
        }
        optim::zero_grad(&params);
        losses.push(loss);
        last_loss = loss;

        let done = step + 1;
        let elapsed = began.elapsed().as_secs_f64();
        let per_step = elapsed / f64::from(done - start);
        emit(TrainerEvent::Step {
            step: done,
            total: c.steps,
            loss,
            lr,
            elapsed,
            eta: per_step * f64::from(c.steps - done),
        });
        if let Some(every) = c.checkpoint_every {
            if done.is_multiple_of(every) && done < c.steps {
                let dir = c.out.join(format!("checkpoint-{done}"));
                let state = CheckpointState {
                    step: done,
                    total_steps: c.steps,
                    seed: c.seed,
                    rank: c.rank,
                    alpha: c.alpha,
                    train_text_encoder: c.train_text_encoder,
                    base_model: c.model.clone(),
                    loss,
                    adam_step: optimizer.step,
                    loss_scale: scaler.as_ref().map(|s| s.scale),
                };
                save_checkpoint(&dir, &lora, &optimizer, &state, c)?;
                emit(TrainerEvent::Checkpoint {
                    step: done,
                    path: dir.display().to_string(),
                });
            }
        }
    }

    let output = c.out.join(DIFFUSERS_LORA_FILE);
    write_diffusers(&output, &lora, &lora.diffusers_tensors(), c, last_loss)?;
    let kohya_output = if c.kohya {
        let name = c
            .out
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("lora");
        let path = c.out.join(format!("{name}_kohya.safetensors"));
        write_tensors(
            &path,
            &lora.kohya_tensors(),
            kohya_metadata(&lora, c, last_loss),
        )?;
        Some(path)
    } else {
        None
    };
    emit(TrainerEvent::Done {
        step: c.steps,
        total: c.steps,
        output: output.display().to_string(),
        loss: last_loss.is_finite().then_some(last_loss),
    });
    Ok(TrainOutcome {
        output,
        kohya_output,
        losses,
    })
}

/// Our own header entries (both formats carry them).
fn training_metadata(c: &TrainConfig, loss: f64) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("imagegen.{k}"), v);
    };
    put("base_model", c.model.clone());
    put("instance_prompt", c.instance_prompt.clone());
    if let Some(class) = &c.class_prompt {
        put("class_prompt", class.clone());
        put("class_images", c.class_images.to_string());
        put("prior_weight", c.prior_weight.to_string());
    }
    put("steps", c.steps.to_string());
    put("rank", c.rank.to_string());
    put("alpha", c.alpha.to_string());
    put("seed", c.seed.to_string());
    put("learning_rate", c.lr.to_string());
    put("resolution", c.resolution.to_string());
    put("batch_size", c.batch_size.to_string());
    put("train_text_encoder", c.train_text_encoder.to_string());
    put("loss", loss.to_string());
    m
}

fn diffusers_metadata(lora: &TrainableLora, c: &TrainConfig, loss: f64) -> HashMap<String, String> {
    let mut m = training_metadata(c, loss);
    m.insert("format".into(), "pt".into());
    m.insert(
        "lora_adapter_metadata".into(),
        serde_json::to_string_pretty(&lora.adapter_metadata()).expect("JSON value"),
    );
    m
}

/// Writes `tensors` (the LoRA's [`TrainableLora::diffusers_tensors`]) with diffusers'
/// metadata.
fn write_diffusers(
    path: &Path,
    lora: &TrainableLora,
    tensors: &[(String, Tensor)],
    c: &TrainConfig,
    loss: f64,
) -> Result<()> {
    write_tensors(path, tensors, diffusers_metadata(lora, c, loss))
}

/// kohya's `ss_*` training keys, as A1111 and ComfyUI show them.
fn kohya_metadata(lora: &TrainableLora, c: &TrainConfig, loss: f64) -> HashMap<String, String> {
    let mut m = training_metadata(c, loss);
    m.insert("ss_network_module".into(), "networks.lora".into());
    m.insert("ss_network_dim".into(), lora.rank.to_string());
    m.insert("ss_network_alpha".into(), lora.alpha.to_string());
    m.insert("ss_sd_model_name".into(), c.model.clone());
    m.insert("ss_max_train_steps".into(), c.steps.to_string());
    m.insert("ss_seed".into(), c.seed.to_string());
    m.insert("ss_learning_rate".into(), c.lr.to_string());
    m.insert(
        "ss_resolution".into(),
        format!("({}, {})", c.resolution, c.resolution),
    );
    m.insert(
        "ss_network_args".into(),
        serde_json::json!({ "train_text_encoder": c.train_text_encoder }).to_string(),
    );
    m
}

fn save_checkpoint(
    dir: &Path,
    lora: &TrainableLora,
    optimizer: &AdamW,
    state: &CheckpointState,
    c: &TrainConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    // A complete LoRA file, so that a checkpoint folder also works as `--lora`.
    let tensors = lora.diffusers_tensors();
    write_diffusers(
        &dir.join(DIFFUSERS_LORA_FILE),
        lora,
        &tensors,
        c,
        state.loss,
    )?;
    let moments: Vec<(String, Tensor)> = tensors
        .iter()
        .zip(optimizer.exp_avg.iter().zip(&optimizer.exp_avg_sq))
        .flat_map(|((key, _), (m, v))| {
            [
                (format!("{key}.exp_avg"), m.shallow_clone()),
                (format!("{key}.exp_avg_sq"), v.shallow_clone()),
            ]
        })
        .collect();
    write_tensors(&dir.join(CHECKPOINT_OPTIMIZER), &moments, HashMap::new())?;
    let path = dir.join(CHECKPOINT_STATE);
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    std::fs::write(&path, json).map_err(io_error(&path))
}

fn load_optimizer(optimizer: &mut AdamW, lora: &TrainableLora, path: &Path) -> Result<()> {
    let stored = read_tensors(path)?;
    let keys = lora.diffusers_tensors();
    for (i, (key, _)) in keys.iter().enumerate() {
        for (suffix, target) in [
            ("exp_avg", &mut optimizer.exp_avg[i]),
            ("exp_avg_sq", &mut optimizer.exp_avg_sq[i]),
        ] {
            restore_tensor(&stored, path, &format!("{key}.{suffix}"), target)?;
        }
    }
    Ok(())
}
