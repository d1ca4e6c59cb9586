//! The training loop: seeded draws per (step, micro-batch), the loss, and the optimizer
//! steps, with checkpoints on the way.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::checkpoint::{
    kohya_metadata, load_optimizer, save_checkpoint, write_diffusers, CheckpointState,
};
use super::config::{
    MixedPrecision, TrainConfig, TrainOutcome, CHECKPOINT_OPTIMIZER, CLASS_IMAGES_DIR,
};
use super::data;
use super::lora_params::{write_tensors, TrainableLora};
use super::optim;
use super::optim::{AdamW, AdamWConfig, LossScaler};
use crate::error::{Error, Result};
use crate::lora::DIFFUSERS_LORA_FILE;
use crate::models::unet::Conditioning;
use crate::schedulers::{training_alphas_cumprod, PredictionType};
use crate::stable_diffusion::StableDiffusion;
use crate::train::TrainerEvent;

/// splitmix64: independent-looking seeds for each (step, micro-batch) from one seed.
pub(super) fn derive_seed(seed: u64, step: u32, micro: u32) -> u64 {
    let mut z = seed.wrapping_add(
        0x9E37_79B9_7F4A_7C15u64
            .wrapping_mul((u64::from(step) << 20 | u64::from(micro)).wrapping_add(1)),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

/// The random draws of one micro-batch, made on the CPU from the seeded generator.
pub(super) struct Draws {
    flips: Tensor,
    posterior: Tensor,
    noise: Tensor,
    timesteps: Tensor,
}

pub(super) fn draw(seed: u64, batch: i64, latent: &[i64], num_train_timesteps: i64) -> Draws {
    let shape = [batch, latent[0], latent[1], latent[2]];
    crate::noise::with_seed(seed, || Draws {
        flips: Tensor::randint(2, [batch], (Kind::Int64, Device::Cpu)),
        posterior: Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        noise: Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        timesteps: Tensor::randint(num_train_timesteps, [batch], (Kind::Int64, Device::Cpu)),
    })
}

/// diffusers' `compute_snr`: `alpha_bar / (1 - alpha_bar)` at each timestep, given both.
pub(super) fn snr(alpha_bar: &Tensor, one_minus_alpha_bar: &Tensor) -> Tensor {
    alpha_bar / one_minus_alpha_bar
}

/// Mean squared error per sample, `[batch]`.
pub(super) fn mse_per_sample(pred: &Tensor, target: &Tensor) -> Tensor {
    (pred - target)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float)
}

/// Everything fixed for the run that a step needs.
pub(super) struct Setup<'a> {
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

pub(super) enum TextInput {
    Ids(Tensor),
    Embedding(Tensor),
}

impl TextInput {
    fn context(&self, model: &StableDiffusion) -> Tensor {
        match self {
            TextInput::Ids(ids) => model.text_encoder().model.forward(ids, 0),
            TextInput::Embedding(e) => e.shallow_clone(),
        }
    }

    fn is_fixed(&self) -> bool {
        matches!(self, TextInput::Embedding(_))
    }
}

/// The UNet's context for one micro-batch, in the model's dtype: the instance prompt's
/// `batch` rows, then (prior preservation) the class prompt's.
pub(super) fn unet_context(
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
            .forward_timesteps(
                &noisy.to_kind(model.dtype),
                &timesteps,
                &Conditioning::text(context),
            )
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

pub(super) fn seeded_order(n: usize, seed: u64) -> Vec<usize> {
    let perm = crate::noise::with_seed(derive_seed(seed, u32::MAX, u32::MAX), || {
        Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu))
    });
    match Vec::<i64>::try_from(perm) {
        Ok(order) if order.len() == n => order.into_iter().map(|i| i as usize).collect(),
        _ => (0..n).collect(),
    }
}

pub(super) fn text_input(
    model: &StableDiffusion,
    prompt: &str,
    trained: bool,
) -> Result<TextInput> {
    if trained {
        let ids = model.text_encoder().tokenizer.encode(prompt)?;
        Ok(TextInput::Ids(
            Tensor::from_slice(&ids)
                .unsqueeze(0)
                .to_device(model.device),
        ))
    } else {
        Ok(TextInput::Embedding(model.encode_text(&[prompt], 0)?))
    }
}

pub(super) fn run(
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
