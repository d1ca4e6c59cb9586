//! Checkpoints and outputs: a checkpoint's state and optimizer moments, what a resumed
//! run must agree on, and the metadata written into the LoRA files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::{io_error, TrainConfig, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE};
use super::lora_params::{read_tensors, restore_tensor, write_tensors, TrainableLora};
use super::optim::AdamW;
use crate::error::{Error, Result};
use crate::lora::DIFFUSERS_LORA_FILE;

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

pub(super) fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState> {
    crate::error::read_json(&dir.join(CHECKPOINT_STATE))
}

pub(super) fn check_resume(state: &CheckpointState, config: &TrainConfig) -> Result<()> {
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

/// Our own header entries (both formats carry them).
pub(super) fn training_metadata(c: &TrainConfig, loss: f64) -> HashMap<String, String> {
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

pub(super) fn diffusers_metadata(
    lora: &TrainableLora,
    c: &TrainConfig,
    loss: f64,
) -> HashMap<String, String> {
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
pub(super) fn write_diffusers(
    path: &Path,
    lora: &TrainableLora,
    tensors: &[(String, Tensor)],
    c: &TrainConfig,
    loss: f64,
) -> Result<()> {
    write_tensors(path, tensors, diffusers_metadata(lora, c, loss))
}

/// kohya's `ss_*` training keys, as A1111 and ComfyUI show them.
pub(super) fn kohya_metadata(
    lora: &TrainableLora,
    c: &TrainConfig,
    loss: f64,
) -> HashMap<String, String> {
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

pub(super) fn save_checkpoint(
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

pub(super) fn load_optimizer(
    optimizer: &mut AdamW,
    lora: &TrainableLora,
    path: &Path,
) -> Result<()> {
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
