//! diffusers' `AutoencoderKL`: an encoder to a diagonal Gaussian over latents and a decoder
//! back to pixels. Accepts both namings of the mid-block attention (see `legacy_name`).

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use super::attention::sdpa;
use super::layers::{conv2d, group_norm, linear};
use super::resnet::{Downsample, ResnetBlock, Upsample};
use crate::error::{read_json, Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d::three")]
    pub in_channels: i64,
    #[serde(default = "d::three")]
    pub out_channels: i64,
    #[serde(default = "d::block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d::two")]
    pub layers_per_block: i64,
    #[serde(default = "d::four")]
    pub latent_channels: i64,
    #[serde(default = "d::thirty_two")]
    pub norm_num_groups: i64,
    #[serde(default = "d::scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "d::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d::yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d::yes")]
    pub force_upcast: bool,
    #[serde(default = "d::silu")]
    pub act_fn: String,
}

mod d {
    pub fn two() -> i64 {
        2
    }
    pub fn three() -> i64 {
        3
    }
    pub fn four() -> i64 {
        4
    }
    pub fn thirty_two() -> i64 {
        32
    }
    pub fn yes() -> bool {
        true
    }
    pub fn block_out_channels() -> Vec<i64> {
        vec![64]
    }
    pub fn scaling_factor() -> f64 {
        0.18215
    }
    pub fn silu() -> String {
        "silu".into()
    }
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        if config.block_out_channels.is_empty() {
            return Err(unsupported("empty block_out_channels".into()));
        }
        if config.act_fn != "silu" {
            return Err(unsupported(format!("act_fn {:?}", config.act_fn)));
        }
        let blocks = config.block_out_channels.len();
        let types_ok = |types: &[String], expected: &str| {
            types.is_empty() || (types.len() == blocks && types.iter().all(|t| t == expected))
        };
        if !types_ok(&config.down_block_types, "DownEncoderBlock2D")
            || !types_ok(&config.up_block_types, "UpDecoderBlock2D")
        {
            return Err(unsupported(
                "block types other than DownEncoderBlock2D/UpDecoderBlock2D".into(),
            ));
        }
        if let Some(c) = config
            .block_out_channels
            .iter()
            .find(|c| *c % config.norm_num_groups != 0)
        {
            return Err(unsupported(format!(
                "{c} channels do not split into {} groups",
                config.norm_num_groups
            )));
        }
        Ok(config)
    }

    /// Stable Diffusion 1.x/2.x's VAE.
    pub fn sd() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        }))
        .expect("valid SD VAE config")
    }

    /// How many pixels one latent covers along a side (8 for SD).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The mid block's single-head self-attention over all pixels, with a residual.
#[derive(Debug)]
struct SpatialAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialAttention {
    fn new(p: nn::Path, channels: i64, groups: i64) -> Self {
        SpatialAttention {
            group_norm: group_norm(&p / "group_norm", groups, channels, 1e-6),
            to_q: linear(&p / "to_q", channels, channels, true),
            to_k: linear(&p / "to_k", channels, channels, true),
            to_v: linear(&p / "to_v", channels, channels, true),
            to_out: linear(&p / "to_out" / 0, channels, channels, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input is NCHW");
        let tokens = self
            .group_norm
            .forward(x)
            .view([b, c, h * w])
            .transpose(1, 2);
        let attended = sdpa(
            &self.to_q.forward(&tokens),
            &self.to_k.forward(&tokens),
            &self.to_v.forward(&tokens),
            1,
            false,
        );
        let out = self
            .to_out
            .forward(&attended)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        out + x
    }
}

#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(p: nn::Path, channels: i64, groups: i64, attention: bool) -> Self {
        MidBlock {
            resnet_in: ResnetBlock::new(&p / "resnets" / 0, channels, channels, None, groups, 1e-6),
            attention: attention
                .then(|| SpatialAttention::new(&p / "attentions" / 0, channels, groups)),
            resnet_out: ResnetBlock::new(
                &p / "resnets" / 1,
                channels,
                channels,
                None,
                groups,
                1e-6,
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.resnet_in.forward(x, None);
        if let Some(attention) = &self.attention {
            x = attention.forward(&x);
        }
        self.resnet_out.forward(&x, None)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Downsample>,
}

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Upsample>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    blocks: Vec<EncoderBlock>,
    mid: MidBlock,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: nn::Path, c: &VaeConfig) -> Self {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut out_ch = ch[0];
        let blocks = (0..ch.len())
            .map(|i| {
                let p = &p / "down_blocks" / i;
                let in_ch = out_ch;
                out_ch = ch[i];
                EncoderBlock {
                    resnets: (0..c.layers_per_block)
                        .map(|j| {
                            ResnetBlock::new(
                                &p / "resnets" / j,
                                if j == 0 { in_ch } else { out_ch },
                                out_ch,
                                None,
                                g,
                                1e-6,
                            )
                        })
                        .collect(),
                    downsampler: (i + 1 < ch.len())
                        .then(|| Downsample::new(&p / "downsamplers" / 0, out_ch, 0)),
                }
            })
            .collect();
        let last = ch[ch.len() - 1];
        Encoder {
            conv_in: conv2d(&p / "conv_in", c.in_channels, ch[0], 3, 1, 1),
            blocks,
            mid: MidBlock::new(&p / "mid_block", last, g, c.mid_block_add_attention),
            norm_out: group_norm(&p / "conv_norm_out", g, last, 1e-6),
            conv_out: conv2d(&p / "conv_out", last, 2 * c.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.conv_in.forward(x);
        for block in &self.blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, None);
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x);
            }
        }
        let x = self.mid.forward(&x);
        self.conv_out.forward(&self.norm_out.forward(&x).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid: MidBlock,
    blocks: Vec<DecoderBlock>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: nn::Path, c: &VaeConfig) -> Self {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let mut out_ch = rev[0];
        let blocks = (0..rev.len())
            .map(|i| {
                let p = &p / "up_blocks" / i;
                let in_ch = out_ch;
                out_ch = rev[i];
                DecoderBlock {
                    resnets: (0..c.layers_per_block + 1)
                        .map(|j| {
                            ResnetBlock::new(
                                &p / "resnets" / j,
                                if j == 0 { in_ch } else { out_ch },
                                out_ch,
                                None,
                                g,
                                1e-6,
                            )
                        })
                        .collect(),
                    upsampler: (i + 1 < rev.len())
                        .then(|| Upsample::new(&p / "upsamplers" / 0, out_ch)),
                }
            })
            .collect();
        let first = c.block_out_channels[0];
        Decoder {
            conv_in: conv2d(&p / "conv_in", c.latent_channels, rev[0], 3, 1, 1),
            mid: MidBlock::new(&p / "mid_block", rev[0], g, c.mid_block_add_attention),
            blocks,
            norm_out: group_norm(&p / "conv_norm_out", g, first, 1e-6),
            conv_out: conv2d(&p / "conv_out", first, c.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut x = self.mid.forward(&self.conv_in.forward(z));
        for block in &self.blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, None);
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, None);
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x).silu())
    }
}

/// The encoder's output distribution over latents.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    fn from_moments(moments: &Tensor) -> Self {
        let halves = moments.chunk(2, 1);
        let logvar = halves[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        DiagonalGaussian {
            mean: halves[0].shallow_clone(),
            logvar,
            std,
        }
    }

    /// `mean + std * noise`, with `noise` drawn by the caller from the seeded generator.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean
            + &self.std
                * noise
                    .to_device(self.mean.device())
                    .to_kind(self.mean.kind())
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    pub fn new(p: nn::Path, config: VaeConfig) -> Self {
        let lc = config.latent_channels;
        AutoencoderKL {
            encoder: Encoder::new(&p / "encoder", &config),
            decoder: Decoder::new(&p / "decoder", &config),
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(&p / "quant_conv", 2 * lc, 2 * lc, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(&p / "post_quant_conv", lc, lc, 1, 1, 0)),
            config,
        }
    }

    /// Pixels in [-1, 1] (`[batch, 3, h, w]`) to the latent distribution.
    pub fn encode(&self, image: &Tensor) -> DiagonalGaussian {
        let h = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&h),
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents to pixels in (roughly) [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}

/// diffusers' old attention naming in VAE checkpoints (`query`, `key`, `value`,
/// `proj_attn`) for a tensor the model names with the new one (`to_q`, ..., `to_out.0`).
pub fn legacy_name(name: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    RENAMES
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replacen(new, old, 1))
}
