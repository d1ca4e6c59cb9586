//! diffusers' `ControlNetModel` for Stable Diffusion 1.x/2.x, built from its `config.json`:
//! a copy of the UNet's down half (time embedding, `conv_in`, down blocks, mid block) whose
//! input also receives an embedding of the control image, and one zero-initialised 1×1
//! convolution per skip connection and for the mid block. Their outputs, scaled, are the
//! residuals that the UNet adds to its own skips and mid block.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::embeddings::TimeEmbedding;
use super::layers::conv2d;
use super::unet::{DownPath, UNetConfig};
use crate::error::{read_json, Error, Result};

pub use super::unet::ControlResiduals;

/// `controlnet/config.json`: the UNet keys that the ControlNet shares (its down half; keys
/// only the UNet has, such as `up_block_types`, are not used) and the ControlNet's own.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// Channels of the control image.
    #[serde(default = "three")]
    pub conditioning_channels: i64,
    #[serde(default = "conditioning_embedding_out_channels")]
    pub conditioning_embedding_out_channels: Vec<i64>,
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default)]
    pub global_pool_conditions: bool,
}

fn three() -> i64 {
    3
}

fn conditioning_embedding_out_channels() -> Vec<i64> {
    vec![16, 32, 96, 256]
}

fn rgb() -> String {
    "rgb".into()
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        if let Some(class) = &self.class_name {
            if class != "ControlNetModel" {
                return Err(unsupported(format!(
                    "`_class_name` is {class:?}, not \"ControlNetModel\""
                )));
            }
        }
        if self.controlnet_conditioning_channel_order != "rgb" {
            return Err(unsupported(format!(
                "`controlnet_conditioning_channel_order` = {:?} (only \"rgb\" is supported; \
                 bgr ControlNets are not)",
                self.controlnet_conditioning_channel_order
            )));
        }
        if self.global_pool_conditions {
            return Err(unsupported(
                "`global_pool_conditions` (shuffle-style ControlNets) is not supported".into(),
            ));
        }
        if self.conditioning_channels <= 0 || self.conditioning_embedding_out_channels.is_empty() {
            return Err(unsupported(
                "`conditioning_channels` and `conditioning_embedding_out_channels` must be non-empty"
                    .into(),
            ));
        }
        self.unet.resolve(path)?;
        Ok(())
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: the control image (in pixels) down to the
/// latents' size and the first block's channels. A 3×3 convolution, then per stage a 3×3
/// convolution and a stride-2 3×3 convolution to the next stage's channels, each followed
/// by SiLU; then the zero-initialised `conv_out`.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: nn::Conv2D,
    blocks: Vec<nn::Conv2D>,
    conv_out: nn::Conv2D,
}

impl ConditioningEmbedding {
    fn new(p: nn::Path, in_channels: i64, stages: &[i64], out_channels: i64) -> Self {
        let blocks = stages
            .windows(2)
            .enumerate()
            .flat_map(|(i, pair)| {
                let (from, to) = (pair[0], pair[1]);
                [
                    conv2d(&p / "blocks" / (2 * i), from, from, 3, 1, 1),
                    conv2d(&p / "blocks" / (2 * i + 1), from, to, 3, 2, 1),
                ]
            })
            .collect();
        ConditioningEmbedding {
            conv_in: conv2d(&p / "conv_in", in_channels, stages[0], 3, 1, 1),
            blocks,
            conv_out: conv2d(
                &p / "conv_out",
                stages[stages.len() - 1],
                out_channels,
                3,
                1,
                1,
            ),
        }
    }

    fn forward(&self, condition: &Tensor) -> Tensor {
        let mut x = self.conv_in.forward(condition).silu();
        for block in &self.blocks {
            x = block.forward(&x).silu();
        }
        self.conv_out.forward(&x)
    }
}

#[derive(Debug)]
pub struct ControlNetModel {
    pub config: ControlNetConfig,
    conv_in: nn::Conv2D,
    time_embedding: TimeEmbedding,
    cond_embedding: ConditioningEmbedding,
    down_path: DownPath,
    /// `controlnet_down_blocks`: one 1×1 convolution per skip connection.
    down_convs: Vec<nn::Conv2D>,
    /// `controlnet_mid_block`.
    mid_conv: nn::Conv2D,
}

impl ControlNetModel {
    /// `p` is the VarStore root; `path` names the config in errors.
    pub fn new(p: nn::Path, config: ControlNetConfig, path: &Path) -> Result<Self> {
        config.check(path)?;
        let c = &config.unet;
        let r = c.resolve(path)?;
        let ch = &c.block_out_channels;
        let time_embedding = TimeEmbedding::new(&p, c);
        let down_path = DownPath::new(&p, c, &r, time_embedding.dim());

        // One convolution for conv_in's output, then one per layer and per downsampler,
        // at the channels of the block that produced the skip.
        let mut skip_channels = vec![ch[0]];
        for (i, &block_ch) in ch.iter().enumerate() {
            let downsamplers = usize::from(i + 1 < r.blocks);
            skip_channels.extend(std::iter::repeat_n(
                block_ch,
                r.layers[i] as usize + downsamplers,
            ));
        }
        let down_convs = skip_channels
            .iter()
            .enumerate()
            .map(|(i, &channels)| {
                conv2d(
                    &p / "controlnet_down_blocks" / i,
                    channels,
                    channels,
                    1,
                    1,
                    0,
                )
            })
            .collect();
        let last = ch[r.blocks - 1];

        Ok(ControlNetModel {
            // diffusers' ControlNet always uses a 3×3 conv_in.
            conv_in: conv2d(&p / "conv_in", c.in_channels, ch[0], 3, 1, 1),
            time_embedding,
            cond_embedding: ConditioningEmbedding::new(
                &p / "controlnet_cond_embedding",
                config.conditioning_channels,
                &config.conditioning_embedding_out_channels,
                ch[0],
            ),
            down_path,
            down_convs,
            mid_conv: conv2d(&p / "controlnet_mid_block", last, last, 1, 1, 0),
            config,
        })
    }

    /// How many times the conditioning embedding shrinks the control image (8 for SD's
    /// latents): one halving per stage after the first.
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.config.conditioning_embedding_out_channels.len() - 1)
    }

    /// How many down residuals the ControlNet gives (the UNet's skip connections).
    pub fn skip_count(&self) -> usize {
        self.down_convs.len()
    }

    /// The dtype and device the weights were loaded in.
    pub fn kind(&self) -> Kind {
        self.conv_in.ws.kind()
    }

    pub fn device(&self) -> Device {
        self.conv_in.ws.device()
    }

    /// The residuals for the UNet, multiplied by `conditioning_scale`. `sample` and
    /// `context` are the UNet's inputs at `timestep`; `condition` is the control image,
    /// `[batch, conditioning_channels, h * f, w * f]` in [0, 1] with `f` the
    /// [`downscale_factor`](Self::downscale_factor).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        condition: &Tensor,
        conditioning_scale: f64,
    ) -> ControlResiduals {
        let temb =
            self.time_embedding
                .forward(timestep, sample.size()[0], sample.kind(), sample.device());
        let x = self.conv_in.forward(sample) + self.cond_embedding.forward(condition);
        let (x, skips) = self.down_path.down(&x, &temb, context);
        let x = self.down_path.mid(&x, &temb, context);
        let down = skips
            .iter()
            .zip(&self.down_convs)
            .map(|(skip, conv)| conv.forward(skip) * conditioning_scale)
            .collect();
        ControlResiduals {
            down,
            mid: self.mid_conv.forward(&x) * conditioning_scale,
        }
    }
}
