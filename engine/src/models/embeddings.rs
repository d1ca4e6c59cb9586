//! diffusers' `embeddings.py` as the UNet uses it: the sinusoidal timestep projection
//! (`Timesteps`), the time embedding (`TimestepEmbedding`), SDXL's added embedding of the
//! pooled text and time ids (`add_time_proj` + `add_embedding`), and what a UNet is
//! conditioned on besides the timestep.

use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::layers::linear;
use super::unet::UNetConfig;

/// `time_proj` (sinusoidal, no weights) and `time_embedding` (two linears with SiLU).
#[derive(Debug)]
pub(crate) struct TimeEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
    channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl TimeEmbedding {
    /// `p` is the model's root: the weights live under `time_embedding`.
    pub(crate) fn new(p: &nn::Path, config: &UNetConfig) -> Self {
        let channels = config.block_out_channels[0];
        let time_dim = channels * 4;
        let p = p / "time_embedding";
        TimeEmbedding {
            linear_1: linear(&p / "linear_1", channels, time_dim, true),
            linear_2: linear(&p / "linear_2", time_dim, time_dim, true),
            channels,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
        }
    }

    /// The width of the embedding (four times the first block's channels).
    pub(crate) fn dim(&self) -> i64 {
        self.channels * 4
    }

    /// The embedding of `timestep` for each of `batch` samples, in `kind` on `device`.
    /// The sinusoids are computed in float32 (diffusers' `get_timestep_embedding`) and
    /// cast to the model's dtype before the linears.
    pub(crate) fn forward(&self, timestep: f64, batch: i64, kind: Kind, device: Device) -> Tensor {
        self.forward_each(
            &Tensor::full([batch], timestep, (Kind::Float, device)),
            kind,
        )
    }

    /// The embedding of one timestep per sample (`timesteps`: `[batch]`, any numeric kind).
    pub(crate) fn forward_each(&self, timesteps: &Tensor, kind: Kind) -> Tensor {
        let sinusoids = sinusoids(
            timesteps,
            self.channels,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        self.linear_2
            .forward(&self.linear_1.forward(&sinusoids.to_kind(kind)).silu())
    }
}

/// diffusers' `get_timestep_embedding` (`Timesteps`): `channels` sinusoids per value of
/// `values` (`[n]`), in float32.
fn sinusoids(values: &Tensor, channels: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let device = values.device();
    let values = values.to_kind(Kind::Float);
    let half = channels / 2;
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()))
        / (half as f64 - freq_shift);
    let args = values.unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    }
}

/// SDXL's added conditioning for each sample: the pooled, projected text embedding
/// (`text_embeds`, `[batch, pooled]`) and the time ids (`[batch, n]`: the original size,
/// the crop's top-left corner, and the target size or the aesthetic score).
#[derive(Debug)]
pub struct AddedConditioning {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// What the UNet is conditioned on besides the timestep: the text it attends to
/// (`[batch, tokens, dim]`) and, for SDXL, the added conditioning.
#[derive(Debug)]
pub struct Conditioning {
    pub context: Tensor,
    pub added: Option<AddedConditioning>,
}

impl Conditioning {
    /// Text only (SD 1.x/2.x).
    pub fn text(context: Tensor) -> Self {
        Conditioning {
            context,
            added: None,
        }
    }

    /// `parts` one after the other along the batch; all with added conditioning or none.
    pub fn cat(parts: &[&Conditioning]) -> Self {
        let context = Tensor::cat(&parts.iter().map(|p| &p.context).collect::<Vec<_>>(), 0);
        let added: Option<Vec<&AddedConditioning>> =
            parts.iter().map(|p| p.added.as_ref()).collect();
        Conditioning {
            context,
            added: added.filter(|a| !a.is_empty()).map(|a| AddedConditioning {
                text_embeds: Tensor::cat(&a.iter().map(|a| &a.text_embeds).collect::<Vec<_>>(), 0),
                time_ids: Tensor::cat(&a.iter().map(|a| &a.time_ids).collect::<Vec<_>>(), 0),
            }),
        }
    }

    /// Every sample `times` times over (`[a, b]` → `[a, b, a, b]`), as `Tensor::repeat`.
    pub fn repeat(&self, times: i64) -> Self {
        Conditioning {
            context: self.context.repeat([times, 1, 1]),
            added: self.added.as_ref().map(|a| AddedConditioning {
                text_embeds: a.text_embeds.repeat([times, 1]),
                time_ids: a.time_ids.repeat([times, 1]),
            }),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        Conditioning {
            context: self.context.shallow_clone(),
            added: self.added.as_ref().map(|a| AddedConditioning {
                text_embeds: a.text_embeds.shallow_clone(),
                time_ids: a.time_ids.shallow_clone(),
            }),
        }
    }
}

/// `add_time_proj` and `add_embedding`: SDXL's added conditioning, embedded to the width of
/// the time embedding it is added to.
#[derive(Debug)]
pub(crate) struct AddEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
    time_id_channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl AddEmbedding {
    pub(crate) fn new(p: &nn::Path, config: &UNetConfig, time_dim: i64) -> Option<Self> {
        let (time_id_channels, input) = config.text_time()?;
        let p = p / "add_embedding";
        Some(AddEmbedding {
            linear_1: linear(&p / "linear_1", input, time_dim, true),
            linear_2: linear(&p / "linear_2", time_dim, time_dim, true),
            time_id_channels,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
        })
    }

    pub(crate) fn forward(&self, added: &AddedConditioning, kind: Kind) -> Tensor {
        let batch = added.text_embeds.size()[0];
        let time_embeds = sinusoids(
            &added.time_ids.flatten(0, -1),
            self.time_id_channels,
            self.flip_sin_to_cos,
            self.freq_shift,
        )
        .reshape([batch, -1]);
        let input =
            Tensor::cat(&[added.text_embeds.to_kind(Kind::Float), time_embeds], -1).to_kind(kind);
        self.linear_2.forward(&self.linear_1.forward(&input).silu())
    }
}
