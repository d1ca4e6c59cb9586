//! Seeded noise with diffusers' semantics. diffusers draws from a `torch.Generator("cpu")`
//! per image; libtorch exposes only the global CPU generator to us, so every draw happens
//! under one lock: seed, then draw everything that image will need in the order diffusers
//! draws them (a [`DrawPlan`]). Pre-drawing gives the same numbers because nothing else
//! touches that image's generator in between.
//!
//! Every draw from torch's generator, in this crate and in its tests, goes through here: one
//! draw made outside the lock, on any thread, shifts the sequence of a seeded run beside it.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

static GENERATOR: Mutex<()> = Mutex::new(());

/// Everything random one image's generation consumes.
pub struct ImageNoise {
    /// The VAE posterior sample's noise (image-to-image only), drawn first.
    pub vae_sample: Option<Tensor>,
    /// The initial latents (text-to-image) or the noise added to the encoded image
    /// (image-to-image).
    pub initial: Tensor,
    /// One tensor per stochastic step, in loop order.
    pub per_step: Vec<Tensor>,
}

/// What one image's generator draws, in order: the VAE sample's noise in `vae_sample`'s
/// kind (when set), then `shape` in `kind` once for the latents and once per step for
/// `steps` steps.
#[derive(Debug, Clone, Copy)]
pub struct DrawPlan<'a> {
    pub shape: &'a [i64],
    pub kind: Kind,
    /// diffusers' `latent_dist.sample(generator)` draws a latents-shaped tensor in the VAE's
    /// dtype before the pipeline draws its noise.
    pub vae_sample: Option<Kind>,
    pub steps: usize,
}

/// Seeds torch's CPU generator like `torch.Generator("cpu").manual_seed(seed)` and draws
/// standard normals as `plan` says.
pub fn draw_plan(seed: u64, plan: &DrawPlan) -> ImageNoise {
    let draw = |kind| Draw {
        shape: plan.shape.to_vec(),
        kind,
    };
    let mut draws: Vec<Draw> = plan.vae_sample.map(draw).into_iter().collect();
    draws.extend((0..=plan.steps).map(|_| draw(plan.kind)));
    let mut drawn = draw_sequence(seed, &draws).into_iter();
    let vae_sample = plan.vae_sample.and_then(|_| drawn.next());
    let initial = drawn.next().expect("the initial latents are always drawn");
    ImageNoise {
        vae_sample,
        initial,
        per_step: drawn.collect(),
    }
}

/// [`draw_plan`] for text-to-image: standard normals of `shape` in `kind`, one for the
/// initial latents, then `steps` more.
pub fn draw(seed: u64, shape: &[i64], kind: Kind, steps: usize) -> ImageNoise {
    draw_plan(
        seed,
        &DrawPlan {
            shape,
            kind,
            vae_sample: None,
            steps,
        },
    )
}

/// One standard-normal tensor a generation draws from an image's generator.
#[derive(Debug, Clone)]
pub struct Draw {
    pub shape: Vec<i64>,
    pub kind: Kind,
}

/// Seeds torch's CPU generator like `torch.Generator("cpu").manual_seed(seed)` and makes
/// `draws` in order, on the CPU: for pipelines whose draws do not fit a [`DrawPlan`]
/// (inpainting draws a second VAE sample after the initial latents).
pub fn draw_sequence(seed: u64, draws: &[Draw]) -> Vec<Tensor> {
    let _guard = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed as i64);
    draws
        .iter()
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
