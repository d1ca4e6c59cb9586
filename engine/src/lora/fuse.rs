//! Fusing LoRAs into the weights for one request, and writing the saved weights back.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::stable_diffusion::StableDiffusion;

use super::file::{Component, Lora, LoraModule};

/// The active LoRAs of a model, fused into its weights; dropping it (or [`Self::unfuse`])
/// writes the saved base tensors back.
#[must_use = "the LoRAs are removed when this is dropped"]
pub struct FusedLoras<'m> {
    saved: Vec<(Tensor, Tensor)>,
    _model: PhantomData<&'m StableDiffusion>,
}

impl FusedLoras<'_> {
    /// How many weight tensors are changed.
    pub fn touched(&self) -> usize {
        self.saved.len()
    }

    /// Restores the base weights now (as dropping does).
    pub fn unfuse(self) {}
}

impl Drop for FusedLoras<'_> {
    fn drop(&mut self) {
        tch::no_grad(|| {
            for (var, base) in self.saved.iter_mut().rev() {
                if let Err(e) = var.f_copy_(base) {
                    tracing::error!(error = %e, "restoring a weight after LoRA failed");
                }
            }
        });
    }
}

/// Adds `weight × scale × (B @ A)` of every module of every LoRA to the model's weights
/// until the returned guard is dropped. An error part way restores what was changed.
pub fn fuse_loras<'m>(
    model: &'m StableDiffusion,
    loras: &[(Rc<Lora>, f64)],
) -> Result<FusedLoras<'m>> {
    let mut fused = FusedLoras {
        saved: Vec::new(),
        _model: PhantomData,
    };
    let mut deltas: BTreeMap<(Component, &str), Vec<(&LoraModule, f64)>> = BTreeMap::new();
    for (lora, weight) in loras {
        for module in &lora.modules {
            deltas
                .entry((module.component, module.target.as_str()))
                .or_default()
                .push((module, *weight));
        }
    }
    let unet_vars = model.unet.vars.variables();
    let text_vars = |component: Component| {
        model
            .text_encoder_named(component.prefix())
            .map(|e| e.vars.variables())
            .unwrap_or_default()
    };
    let text_vars = [
        text_vars(Component::TextEncoder),
        text_vars(Component::TextEncoder2),
    ];
    tch::no_grad(|| -> Result<()> {
        for ((component, target), parts) in deltas {
            let vars = match component {
                Component::Unet => &unet_vars,
                Component::TextEncoder => &text_vars[0],
                Component::TextEncoder2 => &text_vars[1],
            };
            let mut var = vars.get(target).map(Tensor::shallow_clone).ok_or_else(|| {
                Error::invalid(
                    "loras",
                    format!("the model has no {} weight `{target}`", component.prefix()),
                )
            })?;
            let shape = var.size();
            let mut sum = var.f_to_kind(Kind::Float)?;
            for (module, weight) in parts {
                sum = sum.f_add(&(module.delta(&shape)?.f_to_device(var.device())? * weight))?;
            }
            let new = sum.f_to_kind(var.kind())?;
            fused.saved.push((var.shallow_clone(), var.copy()));
            var.f_copy_(&new)?;
        }
        Ok(())
    })?;
    Ok(fused)
}
