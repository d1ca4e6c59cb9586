//! A linear layer with an optional low-rank adapter slot, for LoRA applied unfused (the
//! trainer). Inference fuses LoRAs into the weights instead (`crate::lora`), so the slot is
//! empty there and the forward pass is the plain linear plus one empty-slot check.

use std::cell::RefCell;

use tch::{nn, nn::Module, Tensor};

use super::layers::linear;

/// `scale × B(A(x))` added to a linear's output. `down` (A) is `[rank, in]`, `up` (B)
/// `[out, rank]`; they are usually trainable leaves shared with an optimizer.
#[derive(Debug)]
pub struct LinearAdapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// A linear layer that remembers its module path (diffusers' state-dict key without
/// `.weight`) and can carry one [`LinearAdapter`].
#[derive(Debug)]
pub struct AdaptableLinear {
    linear: nn::Linear,
    path: String,
    adapter: RefCell<Option<LinearAdapter>>,
}

impl AdaptableLinear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let path = p.components().collect::<Vec<_>>().join(".");
        AdaptableLinear {
            linear: linear(p, in_dim, out_dim, bias),
            path,
            adapter: RefCell::new(None),
        }
    }

    /// The module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `[out, in]`.
    pub fn weight_size(&self) -> (i64, i64) {
        let size = self.linear.ws.size();
        (size[0], size[1])
    }

    /// Sets (or with `None` removes) the adapter.
    pub fn set_adapter(&self, adapter: Option<LinearAdapter>) {
        *self.adapter.borrow_mut() = adapter;
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let out = self.linear.forward(x);
        match &*self.adapter.borrow() {
            None => out,
            Some(a) => {
                // The adapter computes in its own dtype (float32 under mixed precision), as
                // peft casts the input to lora_A's dtype.
                let low = x.to_kind(a.down.kind()).linear::<Tensor>(&a.down, None);
                let delta = low.linear::<Tensor>(&a.up, None) * a.scale;
                out + delta.to_kind(x.kind())
            }
        }
    }
}
