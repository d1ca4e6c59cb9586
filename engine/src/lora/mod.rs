//! LoRA at inference: low-rank weight deltas read from safetensors files, fused into the
//! UNet's and the text encoder's weights for the duration of a request and removed after.
//!
//! Two layouts are read:
//!
//! * diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (and
//!   `text_encoder.<module>...`), optional `<module>.alpha` tensors, optional adapter
//!   metadata (`lora_adapter_metadata` in the header: `unet.lora_alpha`,
//!   `unet.alpha_pattern`, ...); also diffusers' older names (`...processor.to_q_lora.down`,
//!   `...q_proj.lora_linear_layer.down`, `...to_q.lora.down`);
//! * kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
//!   `lora_te_...` for the text encoder. The flattened names are resolved through our own
//!   module paths (each Linear/Conv path with `.` replaced by `_`), never by guessing where
//!   the dots were.
//!
//! A module's delta is `weight × alpha / rank × (B @ A)` (peft's `scaling`). alpha is, as in
//! diffusers: the file's metadata when it has some (`lora_alpha`, `alpha_pattern`), else
//! the module's `.alpha` tensor, else the most common `.alpha` of that component, else the
//! rank (scale 1). Convolution LoRAs (kohya's LoCon: 4-D down `[r, in, kh, kw]`, up
//! `[out, r, 1, 1]`) are supported: the delta is `up @ down` reshaped to the kernel.
//!
//! Fusing changes the weights in place (the model's layers share the VarStore's storage);
//! [`FusedLoras`] keeps a copy of every tensor it touched and writes it back when dropped,
//! so the base weights come back bit for bit, on success, error or panic alike.

mod cache;
mod file;
mod fuse;
mod sgm;

pub use cache::{var_store_bytes, LoraCache};
pub use file::{
    lora_file, read_lora_header, Component, Lora, LoraHeader, LoraModule, DIFFUSERS_LORA_FILE,
};
pub use fuse::{fuse_loras, FusedLoras};
