//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, shared by the UNet and the VAE.

use tch::{nn, nn::Module, Tensor};

use super::layers::{conv2d, group_norm, linear};

#[derive(Debug)]
pub struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    /// `temb_channels`: the time embedding's width in the UNet, None in the VAE.
    pub fn new(
        p: nn::Path,
        in_ch: i64,
        out_ch: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
    ) -> Self {
        ResnetBlock {
            norm1: group_norm(&p / "norm1", groups, in_ch, eps),
            conv1: conv2d(&p / "conv1", in_ch, out_ch, 3, 1, 1),
            time_emb_proj: temb_channels.map(|t| linear(&p / "time_emb_proj", t, out_ch, true)),
            norm2: group_norm(&p / "norm2", groups, out_ch, eps),
            conv2: conv2d(&p / "conv2", out_ch, out_ch, 3, 1, 1),
            conv_shortcut: (in_ch != out_ch)
                .then(|| conv2d(&p / "conv_shortcut", in_ch, out_ch, 1, 1, 0)),
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x) + h,
            None => x + h,
        }
    }
}

/// A stride-2 3×3 convolution. The UNet pads by 1 on every side; the VAE's encoder pads
/// by 0 and adds one row and column on the bottom/right first (diffusers' `padding=0`).
#[derive(Debug)]
pub struct Downsample {
    conv: nn::Conv2D,
    asymmetric_pad: bool,
}

impl Downsample {
    pub fn new(p: nn::Path, channels: i64, padding: i64) -> Self {
        Downsample {
            conv: conv2d(&p / "conv", channels, channels, 3, 2, padding),
            asymmetric_pad: padding == 0,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample {
    conv: nn::Conv2D,
}

impl Upsample {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Upsample {
            conv: conv2d(&p / "conv", channels, channels, 3, 1, 1),
        }
    }

    /// `size`: the spatial size to reach (the matching skip connection's), or twice the input.
    pub fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let (_, _, h, w) = x.size4().expect("upsample input is NCHW");
        let size = size.unwrap_or([h * 2, w * 2]);
        // libtorch's nearest kernel has no half-precision path on every device; diffusers
        // upsamples bf16 in float32 for the same reason.
        let up = if x.kind() == tch::Kind::BFloat16 {
            x.to_kind(tch::Kind::Float)
                .upsample_nearest2d(size, None, None)
                .to_kind(x.kind())
        } else {
            x.upsample_nearest2d(size, None, None)
        };
        self.conv.forward(&up)
    }
}
