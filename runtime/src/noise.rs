//! Seeded noise with diffusers' semantics. diffusers draws from a `torch.Generator("cpu")`
//! per image; libtorch exposes only the global CPU generator to us, so every draw happens
//! under one lock: seed, then draw everything that image will need (initial latents, then
//! one tensor per stochastic step) in the order diffusers draws them. Pre-drawing gives the
//! same numbers because nothing else touches that image's generator in between.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

static GENERATOR: Mutex<()> = Mutex::new(());

/// Everything random one image's generation consumes.
pub struct ImageNoise {
    pub initial: Tensor,
    pub per_step: Vec<Tensor>,
}

/// Seeds torch's CPU generator like `torch.Generator("cpu").manual_seed(seed)` and draws
/// standard normals of `shape` in `kind`: one for the initial latents, then `steps` more.
pub fn draw(seed: u64, shape: &[i64], kind: Kind, steps: usize) -> ImageNoise {
    let _guard = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // torch reads the seed as a uint64; the cast keeps its bits.
    tch::manual_seed(seed as i64);
    let initial = Tensor::randn(shape, (kind, Device::Cpu));
    let per_step = (0..steps)
        .map(|_| Tensor::randn(shape, (kind, Device::Cpu)))
        .collect();
    ImageNoise { initial, per_step }
}

/// One standard-normal tensor a generation draws from an image's generator.
#[derive(Debug, Clone)]
pub struct Draw {
    pub shape: Vec<i64>,
    pub kind: Kind,
}

/// Seeds torch's CPU generator like `torch.Generator("cpu").manual_seed(seed)` and makes
/// `plan`'s draws in order, on the CPU: for pipelines whose draws are not only latents and
/// step noise (e.g. a VAE posterior sample before the initial latents).
pub fn draw_plan(seed: u64, plan: &[Draw]) -> Vec<Tensor> {
    let _guard = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed as i64);
    plan.iter()
        .map(|d| Tensor::randn(d.shape.as_slice(), (d.kind, Device::Cpu)))
        .collect()
}

/// Runs `f` with the generator seeded, for draws that are not latents-shaped (e.g. the
/// VAE's posterior sample).
pub fn with_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _guard = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed as i64);
    f()
}
