//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s: the spatial transformer
//! that lets the UNet attend to itself and to the text.

use tch::{nn, nn::Module, Tensor};

use super::adapter::AdaptableLinear;
use super::attention::Attention;
use super::layers::{conv2d, group_norm, layer_norm, linear};

/// Feed-forward with a GEGLU gate: `net.0.proj` doubles the width, half gates the other.
#[derive(Debug)]
struct FeedForward {
    proj_in: nn::Linear,
    proj_out: nn::Linear,
}

impl FeedForward {
    fn new(p: nn::Path, dim: i64) -> Self {
        let inner = dim * 4;
        FeedForward {
            proj_in: linear(&p / "net" / 0 / "proj", dim, inner * 2, true),
            proj_out: linear(&p / "net" / 2, inner, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let projected = self.proj_in.forward(x);
        let halves = projected.chunk(2, -1);
        self.proj_out
            .forward(&(&halves[0] * halves[1].gelu("none")))
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(p: nn::Path, dim: i64, heads: i64, context_dim: i64) -> Self {
        let head_dim = dim / heads;
        BasicTransformerBlock {
            norm1: layer_norm(&p / "norm1", dim, 1e-5),
            attn1: Attention::new(&p / "attn1", dim, dim, heads, head_dim, false),
            norm2: layer_norm(&p / "norm2", dim, 1e-5),
            attn2: Attention::new(&p / "attn2", dim, context_dim, heads, head_dim, false),
            norm3: layer_norm(&p / "norm3", dim, 1e-5),
            ff: FeedForward::new(&p / "ff", dim),
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }

    fn projections(&self) -> impl Iterator<Item = &AdaptableLinear> {
        self.attn1
            .projections()
            .into_iter()
            .chain(self.attn2.projections())
    }
}

#[derive(Debug)]
enum Projection {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

/// What the UNet's cross-attention blocks call `attentions.N`.
#[derive(Debug)]
pub struct Transformer2D {
    norm: nn::GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct Transformer2DConfig {
    pub channels: i64,
    pub heads: i64,
    pub context_dim: i64,
    pub layers: i64,
    pub groups: i64,
    /// SD 2.x projects with linear layers, SD 1.x with 1×1 convolutions.
    pub use_linear_projection: bool,
}

impl Transformer2D {
    pub fn new(p: nn::Path, c: &Transformer2DConfig) -> Self {
        let ch = c.channels;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(linear(&p / "proj_in", ch, ch, true)),
                Projection::Linear(linear(&p / "proj_out", ch, ch, true)),
            )
        } else {
            (
                Projection::Conv(conv2d(&p / "proj_in", ch, ch, 1, 1, 0)),
                Projection::Conv(conv2d(&p / "proj_out", ch, ch, 1, 1, 0)),
            )
        };
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &p / "transformer_blocks" / i,
                    ch,
                    c.heads,
                    c.context_dim,
                )
            })
            .collect();
        Transformer2D {
            norm: group_norm(&p / "norm", c.groups, ch, 1e-6),
            proj_in,
            blocks,
            proj_out,
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("transformer input is NCHW");
        let normed = self.norm.forward(x);
        let to_tokens = |t: &Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, -1]);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)),
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context);
        }
        let to_image = |t: &Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens).contiguous()),
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)),
        };
        out + x
    }

    /// The attention projections of every block, in module order.
    pub fn projections(&self) -> impl Iterator<Item = &AdaptableLinear> {
        self.blocks
            .iter()
            .flat_map(BasicTransformerBlock::projections)
    }
}
