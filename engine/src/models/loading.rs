//! Loading each component from its diffusers (or transformers) folder: the config, a
//! VarStore in the asked dtype, and the safetensors weights, frozen.

use std::path::{Path, PathBuf};

use tch::{nn::VarStore, Device, Kind};

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::safety_checker::{SafetyCheckerConfig, StableDiffusionSafetyChecker};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{legacy_name, AutoencoderKL, VaeConfig};
use crate::weights::{load_var_store, weight_files};

/// A component with the VarStore that owns its weights (kept for LoRA and training).
pub struct Loaded<M> {
    pub model: M,
    pub vars: VarStore,
}

fn no_alias(_: &str) -> Option<String> {
    None
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that the
/// checkpoints on the hub (and our module paths) have: accept both.
fn clip_alias(name: &str) -> Option<String> {
    name.strip_prefix("text_model.").map(String::from)
}

/// Weight files of a component: the fp16 variant first when computing in half precision,
/// the full-precision files first otherwise; either is accepted when it is all there is.
fn component_weights(dir: &Path, stem: &str, dtype: Kind) -> Result<Vec<PathBuf>> {
    let order: [Option<&str>; 2] = if matches!(dtype, Kind::Half | Kind::BFloat16) {
        [Some("fp16"), None]
    } else {
        [None, Some("fp16")]
    };
    let mut first_err = None;
    for variant in order {
        match weight_files(dir, stem, variant) {
            Ok(files) => return Ok(files),
            Err(e @ Error::PickleRefused { .. }) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("two attempts were made"))
}

/// A component built on a fresh VarStore in `dtype` on `device`, its weights read from the
/// folder's `stem` files (names mapped through `alias`), then frozen.
fn load_component<M>(
    dir: &Path,
    device: Device,
    dtype: Kind,
    stem: &str,
    alias: fn(&str) -> Option<String>,
    build: impl FnOnce(tch::nn::Path) -> Result<M>,
) -> Result<Loaded<M>> {
    let mut vars = VarStore::new(device);
    vars.set_kind(dtype);
    let model = build(vars.root())?;
    load_var_store(&vars, &component_weights(dir, stem, dtype)?, alias)?;
    vars.freeze();
    Ok(Loaded { model, vars })
}

/// Diffusers' weight files of a model component.
const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";

pub fn load_text_encoder(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<ClipTextModel>> {
    let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
    load_component(dir, device, dtype, "model", clip_alias, |root| {
        Ok(ClipTextModel::new(root, &config))
    })
}

pub fn load_unet(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<UNet2DConditionModel>> {
    let config_path = dir.join("config.json");
    let config = UNetConfig::from_file(&config_path)?;
    load_component(dir, device, dtype, DIFFUSERS_WEIGHTS, no_alias, |root| {
        UNet2DConditionModel::new(root, config, &config_path)
    })
}

/// A ControlNet folder (`config.json` and `diffusion_pytorch_model[.fp16].safetensors`).
pub fn load_controlnet(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<ControlNetModel>> {
    let config_path = dir.join("config.json");
    let config = ControlNetConfig::from_file(&config_path)?;
    load_component(dir, device, dtype, DIFFUSERS_WEIGHTS, no_alias, |root| {
        ControlNetModel::new(root, config, &config_path)
    })
}

pub fn load_vae(dir: &Path, device: Device, dtype: Kind) -> Result<Loaded<AutoencoderKL>> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    load_component(dir, device, dtype, DIFFUSERS_WEIGHTS, legacy_name, |root| {
        Ok(AutoencoderKL::new(root, config))
    })
}

/// transformers 5 saves the safety checker's vision tower as `vision_model.…`, the
/// checkpoints on the hub have `vision_model.vision_model.…`: accept both.
fn safety_checker_alias(name: &str) -> Option<String> {
    name.strip_prefix("vision_model.vision_model.")
        .map(|rest| format!("vision_model.{rest}"))
}

/// A safety checker folder (transformers layout: `config.json` and
/// `model[.fp16].safetensors`), as in a model's `safety_checker/`.
pub fn load_safety_checker(
    dir: &Path,
    device: Device,
    dtype: Kind,
) -> Result<Loaded<StableDiffusionSafetyChecker>> {
    let config = SafetyCheckerConfig::from_file(&dir.join("config.json"))?;
    load_component(dir, device, dtype, "model", safety_checker_alias, |root| {
        Ok(StableDiffusionSafetyChecker::new(root, &config))
    })
}
