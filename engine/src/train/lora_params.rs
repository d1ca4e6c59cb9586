//! The trainable LoRA: one A/B pair per attention projection, attached to the model's
//! [`AdaptableLinear`]s (unfused), and written out in diffusers' and kohya's layouts.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::lora::Component;
use crate::models::adapter::{AdaptableLinear, LinearAdapter};
use crate::stable_diffusion::StableDiffusion;

/// peft's module names for what the UNet and the text encoder LoRAs target.
pub const UNET_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// One adapted projection.
pub struct TrainableModule {
    pub component: Component,
    /// Our module path (= diffusers' state-dict key without `.weight`).
    pub path: String,
    /// A, `[rank, in]`, float32, requires grad.
    pub down: Tensor,
    /// B, `[out, rank]`, float32, requires grad.
    pub up: Tensor,
}

pub struct TrainableLora {
    pub rank: i64,
    pub alpha: f64,
    pub modules: Vec<TrainableModule>,
}

fn targets(model: &StableDiffusion, text_encoder: bool) -> Vec<(Component, &AdaptableLinear)> {
    let unet = model
        .unet
        .model
        .attention_projections()
        .into_iter()
        .map(|l| (Component::Unet, l));
    let text: Vec<_> = if text_encoder {
        model.text_encoder().model.attention_projections()
    } else {
        Vec::new()
    };
    unet.chain(text.into_iter().map(|l| (Component::TextEncoder, l)))
        .collect()
}

impl TrainableLora {
    /// Fresh adapters as peft initialises them: A kaiming-uniform (a = √5, i.e. uniform in
    /// ±1/√in), B zeros, so that the model starts out unchanged. A is drawn from torch's
    /// generator seeded with `seed`.
    pub fn new(
        model: &StableDiffusion,
        rank: i64,
        alpha: f64,
        text_encoder: bool,
        seed: u64,
    ) -> TrainableLora {
        let targets = targets(model, text_encoder);
        let downs: Vec<Tensor> = crate::noise::with_seed(seed, || {
            targets
                .iter()
                .map(|(_, l)| {
                    let (_, fan_in) = l.weight_size();
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    Tensor::empty([rank, fan_in], (Kind::Float, Device::Cpu))
                        .uniform_(-bound, bound)
                })
                .collect()
        });
        let modules = targets
            .iter()
            .zip(downs)
            .map(|((component, l), down)| {
                let (fan_out, _) = l.weight_size();
                TrainableModule {
                    component: *component,
                    path: l.path().to_string(),
                    down: down.to_device(model.device).set_requires_grad(true),
                    up: Tensor::zeros([fan_out, rank], (Kind::Float, model.device))
                        .set_requires_grad(true),
                }
            })
            .collect();
        TrainableLora {
            rank,
            alpha,
            modules,
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The trainable tensors (A then B of each module), sharing storage and gradients
    /// with the adapters.
    pub fn params(&self) -> Vec<Tensor> {
        self.modules
            .iter()
            .flat_map(|m| [m.down.shallow_clone(), m.up.shallow_clone()])
            .collect()
    }

    /// Sets the adapters on the model's projections (replacing any).
    pub fn attach(&self, model: &StableDiffusion) {
        let text_encoder = self
            .modules
            .iter()
            .any(|m| m.component == Component::TextEncoder);
        let by_path: HashMap<(Component, &str), &TrainableModule> = self
            .modules
            .iter()
            .map(|m| ((m.component, m.path.as_str()), m))
            .collect();
        for (component, linear) in targets(model, text_encoder) {
            if let Some(m) = by_path.get(&(component, linear.path())) {
                linear.set_adapter(Some(LinearAdapter {
                    down: m.down.shallow_clone(),
                    up: m.up.shallow_clone(),
                    scale: self.scale(),
                }));
            }
        }
    }

    /// Removes every adapter from the model.
    pub fn detach(model: &StableDiffusion) {
        for (_, linear) in targets(model, true) {
            linear.set_adapter(None);
        }
    }

    /// `unet.<path>.lora_A.weight` and `.lora_B.weight` (diffusers' `save_lora_weights`).
    pub fn diffusers_tensors(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| {
                let p = m.component.prefix();
                [
                    (format!("{p}.{}.lora_A.weight", m.path), m.down.detach()),
                    (format!("{p}.{}.lora_B.weight", m.path), m.up.detach()),
                ]
            })
            .collect()
    }

    /// kohya's layout: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight` and
    /// `.alpha` (`lora_te_` for the text encoder).
    pub fn kohya_tensors(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| {
                let p = m.component.kohya_prefix();
                let name = format!("{p}_{}", m.path.replace('.', "_"));
                [
                    (format!("{name}.lora_down.weight"), m.down.detach()),
                    (format!("{name}.lora_up.weight"), m.up.detach()),
                    (format!("{name}.alpha"), Tensor::from(self.alpha as f32)),
                ]
            })
            .collect()
    }

    /// diffusers' `lora_adapter_metadata`: each component's peft `LoraConfig` arguments,
    /// keyed `<component>.<argument>`, which diffusers' `load_lora_weights` builds the
    /// adapter from (scale = lora_alpha / r).
    pub fn adapter_metadata(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (component, targets) in [
            (Component::Unet, &UNET_TARGETS[..]),
            (Component::TextEncoder, &TEXT_ENCODER_TARGETS[..]),
        ] {
            if !self.modules.iter().any(|m| m.component == component) {
                continue;
            }
            let p = component.prefix();
            map.insert(format!("{p}.r"), self.rank.into());
            map.insert(format!("{p}.lora_alpha"), self.alpha.into());
            map.insert(format!("{p}.target_modules"), targets.into());
        }
        serde_json::Value::Object(map)
    }

    /// Copies A/B values from a file written by [`Self::diffusers_tensors`] (a checkpoint),
    /// which must hold exactly this LoRA's modules and shapes.
    pub fn load_values(&self, path: &Path) -> Result<()> {
        let stored = read_tensors(path)?;
        let expected = self.diffusers_tensors();
        if stored.len() != expected.len() {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{} holds {} LoRA tensors, this training has {} (different rank, model or \
                     --train-text-encoder?)",
                    path.display(),
                    stored.len(),
                    expected.len()
                ),
            ));
        }
        for ((key, _), mut param) in expected.iter().zip(self.params()) {
            restore_tensor(&stored, path, key, &mut param)?;
        }
        Ok(())
    }
}

/// Copies `stored[key]` (read from `path`) into `target` in place, for resuming: a missing
/// key or a shape other than `target`'s is an error naming the file and the key.
pub fn restore_tensor(
    stored: &BTreeMap<String, Tensor>,
    path: &Path,
    key: &str,
    target: &mut Tensor,
) -> Result<()> {
    let value = stored.get(key).ok_or_else(|| {
        Error::invalid(
            "resume",
            format!("{} has no tensor `{key}`", path.display()),
        )
    })?;
    if value.size() != target.size() {
        return Err(Error::invalid(
            "resume",
            format!(
                "{}: `{key}` is {:?}, this training needs {:?}",
                path.display(),
                value.size(),
                target.size()
            ),
        ));
    }
    // A trainable parameter is a leaf that requires grad: copying into it must not record.
    tch::no_grad(|| target.f_copy_(value))?;
    Ok(())
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| Error::Safetensors {
            file: path.display().to_string(),
            message: e.to_string(),
        })?
        .into_iter()
        .collect())
}

/// Writes float32 tensors (moved to the CPU) with string metadata in the header.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let output_error = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let values: Vec<f32> = Vec::try_from(t.flatten(0, -1))
                .map_err(|e| output_error(format!("tensor `{name}`: {e}")))?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let shape = t.size().iter().map(|d| *d as usize).collect();
            Ok((name.clone(), shape, bytes))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| output_error(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    // Write next to the target, then rename: a reader never sees half a file.
    let partial = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, metadata, &partial)
        .map_err(|e| output_error(e.to_string()))?;
    std::fs::rename(&partial, path).map_err(|e| output_error(e.to_string()))
}
