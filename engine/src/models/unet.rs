//! diffusers' `UNet2DConditionModel` for the Stable Diffusion 1.x/2.x and SDXL families,
//! built from `unet/config.json`: a time embedding (for SDXL plus the `text_time` added
//! embedding of the pooled text and the size/crop time ids), down blocks that keep skip
//! connections, a cross-attention mid block, and up blocks that consume the skips in
//! reverse.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use super::adapter::AdaptableLinear;
use super::embeddings::{AddEmbedding, TimeEmbedding};
pub use super::embeddings::{AddedConditioning, Conditioning};
use super::layers::{conv2d, group_norm};
use super::resnet::{Downsample, ResnetBlock, Upsample};
use super::transformer::{Transformer2D, Transformer2DConfig};
use crate::error::{read_json, Error, Result};

/// A config value that diffusers allows either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value, or the first block's (what diffusers reads where it wants one number).
    pub fn first(&self) -> Option<T> {
        match self {
            PerBlock::One(v) => Some(*v),
            PerBlock::Each(v) => v.first().copied(),
        }
    }
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, blocks: usize, key: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: format!("`{key}` has {} entries for {blocks} blocks", v.len()),
            }),
        }
    }
}

/// `unet/config.json`. Keys that select architectures beyond SD 1.x/2.x are read so that
/// they can be refused with a clear message instead of silently ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d::four")]
    pub in_channels: i64,
    #[serde(default = "d::four")]
    pub out_channels: i64,
    #[serde(default = "d::block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "d::layers_per_block")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d::cross_attention_dim")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d::attention_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default = "d::one")]
    pub transformer_layers_per_block: PerBlock<i64>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d::norm_num_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d::downsample_padding")]
    pub downsample_padding: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d::silu")]
    pub act_fn: String,
    #[serde(default)]
    pub only_cross_attention: PerBlockFlag,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default = "d::default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d::positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default = "d::three")]
    pub conv_in_kernel: i64,
    #[serde(default = "d::three")]
    pub conv_out_kernel: i64,
    #[serde(default = "d::one_f")]
    pub mid_block_scale_factor: f64,
    /// Latent side the model was trained at (64 for SD 1.5's 512 pixels).
    #[serde(default)]
    pub sample_size: Option<PerBlock<i64>>,
}

/// `only_cross_attention` is a bool or a per-block list; any true value is unsupported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum PerBlockFlag {
    #[default]
    Off,
    One(bool),
    Each(Vec<bool>),
}

mod d {
    use super::PerBlock;
    pub fn four() -> i64 {
        4
    }
    pub fn three() -> i64 {
        3
    }
    pub fn one() -> PerBlock<i64> {
        PerBlock::One(1)
    }
    pub fn one_f() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn block_out_channels() -> Vec<i64> {
        vec![320, 640, 1280, 1280]
    }
    pub fn down_block_types() -> Vec<String> {
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn up_block_types() -> Vec<String> {
        [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn layers_per_block() -> PerBlock<i64> {
        PerBlock::One(2)
    }
    pub fn cross_attention_dim() -> PerBlock<i64> {
        PerBlock::One(1280)
    }
    pub fn attention_head_dim() -> PerBlock<i64> {
        PerBlock::One(8)
    }
    pub fn norm_num_groups() -> i64 {
        32
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn downsample_padding() -> i64 {
        1
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn default_shift() -> String {
        "default".into()
    }
    pub fn positional() -> String {
        "positional".into()
    }
}

/// The down half of the config (what the UNet and a ControlNet share) with per-block
/// values expanded and everything checked.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) blocks: usize,
    pub(crate) cross_attn_down: Vec<bool>,
    pub(crate) layers: Vec<i64>,
    pub(crate) heads: Vec<i64>,
    pub(crate) transformer_layers: Vec<i64>,
    pub(crate) cross_attention_dim: i64,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.resolve(path)?;
        config.resolve_up_blocks(path)?;
        Ok(config)
    }

    /// Checks and expands everything but the up blocks: the time embedding, the down
    /// blocks and the mid block.
    pub(crate) fn resolve(&self, path: &Path) -> Result<Resolved> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let refuse_some = |key: &str, set: bool| -> Result<()> {
            if set {
                Err(unsupported(format!(
                    "`{key}` is not supported by this UNet (SD 1.x/2.x, SDXL)"
                )))
            } else {
                Ok(())
            }
        };
        refuse_some("class_embed_type", self.class_embed_type.is_some())?;
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if self.text_time().is_none() => {
                return Err(unsupported(
                    "`addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and \
                     `projection_class_embeddings_input_dim`"
                        .into(),
                ));
            }
            Some("text_time") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "`addition_embed_type` {other:?} (only \"text_time\", SDXL's, is supported)"
                )))
            }
        }
        refuse_some("num_class_embeds", self.num_class_embeds.is_some())?;
        refuse_some("time_cond_proj_dim", self.time_cond_proj_dim.is_some())?;
        refuse_some("encoder_hid_dim", self.encoder_hid_dim.is_some())?;
        refuse_some("time_embedding_dim", self.time_embedding_dim.is_some())?;
        refuse_some("dual_cross_attention", self.dual_cross_attention)?;
        let only_cross = match &self.only_cross_attention {
            PerBlockFlag::Off => false,
            PerBlockFlag::One(b) => *b,
            PerBlockFlag::Each(v) => v.iter().any(|b| *b),
        };
        refuse_some("only_cross_attention", only_cross)?;
        for (key, value, expected) in [
            ("act_fn", &self.act_fn, "silu"),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
        ] {
            if value != expected {
                return Err(unsupported(format!(
                    "`{key}` = {value:?} (only {expected:?} is supported)"
                )));
            }
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                return Err(unsupported(format!("mid_block_type {mid:?}")));
            }
        }
        if self.mid_block_scale_factor != 1.0 {
            return Err(unsupported("mid_block_scale_factor other than 1".into()));
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return Err(unsupported("even conv_in/conv_out kernels".into()));
        }
        let blocks = self.block_out_channels.len();
        if blocks == 0 || self.down_block_types.len() != blocks {
            return Err(unsupported(
                "block_out_channels and down_block_types must have the same, non-zero length"
                    .into(),
            ));
        }
        let cross_attn_down = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(unsupported(format!("down block type {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let cross_dims = self
            .cross_attention_dim
            .expand(blocks, "cross_attention_dim", path)?;
        if cross_dims.iter().any(|d| *d != cross_dims[0]) {
            return Err(unsupported("per-block cross_attention_dim".into()));
        }
        // diffusers' naming quirk: without `num_attention_heads`, `attention_head_dim`
        // holds the number of heads.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(blocks, "num_attention_heads", path)?,
            None => self
                .attention_head_dim
                .expand(blocks, "attention_head_dim", path)?,
        };
        for (ch, h) in self.block_out_channels.iter().zip(&heads) {
            if *h <= 0 || ch % h != 0 {
                return Err(unsupported(format!(
                    "{ch} channels do not split into {h} heads"
                )));
            }
            if ch % self.norm_num_groups != 0 {
                return Err(unsupported(format!(
                    "{ch} channels do not split into {} groups",
                    self.norm_num_groups
                )));
            }
        }
        Ok(Resolved {
            blocks,
            cross_attn_down,
            layers: self
                .layers_per_block
                .expand(blocks, "layers_per_block", path)?,
            heads,
            transformer_layers: self.transformer_layers_per_block.expand(
                blocks,
                "transformer_layers_per_block",
                path,
            )?,
            cross_attention_dim: cross_dims[0],
        })
    }

    /// Whether each up block has cross-attention.
    fn resolve_up_blocks(&self, path: &Path) -> Result<Vec<bool>> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(unsupported(
                "up_block_types and block_out_channels must have the same length".into(),
            ));
        }
        self.up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(unsupported(format!("up block type {other:?}"))),
            })
            .collect()
    }

    /// SDXL's added conditioning: (the width of one time id's sinusoids, the width of the
    /// projection's input: every time id's sinusoids and the pooled text embedding).
    pub fn text_time(&self) -> Option<(i64, i64)> {
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(time), Some(input)) if time > 0 && input > 0 => {
                Some((time, input))
            }
            _ => None,
        }
    }

    /// The width of the text the model attends to (checked to be one value for all
    /// blocks when the config is resolved).
    pub fn context_dim(&self) -> i64 {
        self.cross_attention_dim.first().unwrap_or_default()
    }

    /// Stable Diffusion 1.5's UNet.
    pub fn v1_5() -> Self {
        serde_json::from_str("{}").expect("all keys have defaults")
    }

    /// Stable Diffusion 2.x's UNet (768-v): linear projections, per-block heads.
    pub fn v2_1() -> Self {
        serde_json::from_value(serde_json::json!({
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": true,
            "upcast_attention": true,
        }))
        .expect("valid SD 2.1 config")
    }
}

/// One resnet (and, in cross-attention blocks, one transformer) of a down or up block.
#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock,
    attention: Option<Transformer2D>,
}

impl Layer {
    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let x = self.resnet.forward(x, Some(temb));
        match &self.attention {
            Some(attention) => attention.forward(&x, context),
            None => x,
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Downsample>,
}

#[derive(Debug)]
struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Upsample>,
}

#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

/// Builds the transformer of a block from the resolved config.
fn transformer(
    p: nn::Path,
    config: &UNetConfig,
    r: &Resolved,
    channels: i64,
    block: usize,
) -> Transformer2D {
    Transformer2D::new(
        p,
        &Transformer2DConfig {
            channels,
            heads: r.heads[block],
            context_dim: r.cross_attention_dim,
            layers: r.transformer_layers[block],
            groups: config.norm_num_groups,
            use_linear_projection: config.use_linear_projection,
        },
    )
}

/// The down blocks and the mid block: the half of the UNet that a ControlNet copies.
#[derive(Debug)]
pub(crate) struct DownPath {
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
}

impl DownPath {
    /// `p` is the model's root: the weights live under `down_blocks` and `mid_block`.
    pub(crate) fn new(p: &nn::Path, config: &UNetConfig, r: &Resolved, time_dim: i64) -> Self {
        let c = config;
        let ch = &c.block_out_channels;
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);

        let mut down_blocks = Vec::with_capacity(r.blocks);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let p = p / "down_blocks" / i;
            let in_ch = out_ch;
            out_ch = block_ch;
            let layers = (0..r.layers[i])
                .map(|j| Layer {
                    resnet: ResnetBlock::new(
                        &p / "resnets" / j,
                        if j == 0 { in_ch } else { out_ch },
                        out_ch,
                        Some(time_dim),
                        groups,
                        eps,
                    ),
                    attention: r.cross_attn_down[i]
                        .then(|| transformer(&p / "attentions" / j, c, r, out_ch, i)),
                })
                .collect();
            let is_final = i + 1 == r.blocks;
            down_blocks.push(DownBlock {
                layers,
                downsampler: (!is_final).then(|| {
                    Downsample::new(&p / "downsamplers" / 0, out_ch, c.downsample_padding)
                }),
            });
        }

        let last = r.blocks - 1;
        let mid = p / "mid_block";
        let mid_resnet = |j: i64| {
            ResnetBlock::new(
                &mid / "resnets" / j,
                ch[last],
                ch[last],
                Some(time_dim),
                groups,
                eps,
            )
        };
        let mid_block = MidBlock {
            resnet_in: mid_resnet(0),
            attention: transformer(&mid / "attentions" / 0, c, r, ch[last], last),
            resnet_out: mid_resnet(1),
        };
        DownPath {
            down_blocks,
            mid_block,
        }
    }

    /// Runs the down blocks on `x` (the output of `conv_in`). Returns their output and the
    /// skip connections in diffusers' order (`down_block_res_samples`): `x` itself, then
    /// every layer's and every downsampler's output.
    pub(crate) fn down(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let mut x = x.shallow_clone();
        let mut skips = vec![x.shallow_clone()];
        for block in &self.down_blocks {
            for layer in &block.layers {
                x = layer.forward(&x, temb, context);
                skips.push(x.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x);
                skips.push(x.shallow_clone());
            }
        }
        (x, skips)
    }

    pub(crate) fn mid(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let m = &self.mid_block;
        let x = m.resnet_in.forward(x, Some(temb));
        let x = m.attention.forward(&x, context);
        m.resnet_out.forward(&x, Some(temb))
    }

    /// How many skip connections `down` returns.
    pub(crate) fn skip_count(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(|b| b.layers.len() + usize::from(b.downsampler.is_some()))
            .sum::<usize>()
    }
}

/// What a ControlNet adds to the UNet: one residual per skip connection (diffusers'
/// `down_block_additional_residuals`) and one for the mid block's output
/// (`mid_block_additional_residual`), already multiplied by the conditioning scale.
#[derive(Debug)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: nn::Conv2D,
    time_embedding: TimeEmbedding,
    add_embedding: Option<AddEmbedding>,
    down_path: DownPath,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet2DConditionModel {
    /// The trained latent size (the first value when the config gives height and width).
    pub fn config_sample_size(&self) -> i64 {
        self.config
            .sample_size
            .as_ref()
            .and_then(PerBlock::first)
            .unwrap_or(64)
    }

    /// `p` is the VarStore root; `path` names the config in errors.
    pub fn new(p: nn::Path, config: UNetConfig, path: &Path) -> Result<Self> {
        let r = config.resolve(path)?;
        let cross_attn_up = config.resolve_up_blocks(path)?;
        let c = &config;
        let ch = &c.block_out_channels;
        let time_embedding = TimeEmbedding::new(&p, c);
        let time_dim = time_embedding.dim();
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let down_path = DownPath::new(&p, c, &r, time_dim);

        let rev_ch: Vec<i64> = ch.iter().rev().copied().collect();
        let rev_layers: Vec<i64> = r.layers.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(r.blocks);
        let mut out_ch = rev_ch[0];
        for i in 0..r.blocks {
            let p = &p / "up_blocks" / i;
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(r.blocks - 1)];
            let count = rev_layers[i] + 1;
            // The heads of up block i mirror those of down block (blocks - 1 - i).
            let mirrored = r.blocks - 1 - i;
            let layers = (0..count)
                .map(|j| {
                    let skip_ch = if j == count - 1 { in_ch } else { out_ch };
                    let resnet_in = if j == 0 { prev_out } else { out_ch };
                    Layer {
                        resnet: ResnetBlock::new(
                            &p / "resnets" / j,
                            resnet_in + skip_ch,
                            out_ch,
                            Some(time_dim),
                            groups,
                            eps,
                        ),
                        attention: cross_attn_up[i]
                            .then(|| transformer(&p / "attentions" / j, c, &r, out_ch, mirrored)),
                    }
                })
                .collect();
            let is_final = i + 1 == r.blocks;
            up_blocks.push(UpBlock {
                layers,
                upsampler: (!is_final).then(|| Upsample::new(&p / "upsamplers" / 0, out_ch)),
            });
        }

        let pad_in = (c.conv_in_kernel - 1) / 2;
        let pad_out = (c.conv_out_kernel - 1) / 2;
        Ok(UNet2DConditionModel {
            conv_in: conv2d(
                &p / "conv_in",
                c.in_channels,
                ch[0],
                c.conv_in_kernel,
                1,
                pad_in,
            ),
            add_embedding: AddEmbedding::new(&p, c, time_dim),
            time_embedding,
            down_path,
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", groups, ch[0], eps),
            conv_out: conv2d(
                &p / "conv_out",
                ch[0],
                c.out_channels,
                c.conv_out_kernel,
                1,
                pad_out,
            ),
            config,
        })
    }

    /// How many down residuals a ControlNet must provide (one per skip connection).
    pub fn skip_count(&self) -> usize {
        self.down_path.skip_count()
    }

    /// Predicts the noise (or v) in `sample` (`[batch, in_channels, h, w]`) at `timestep`,
    /// conditioned on `cond` (its context: `[batch, tokens, cross_attention_dim]`).
    pub fn forward(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Tensor {
        self.forward_with_control(sample, timestep, cond, None)
    }

    /// [`forward`](Self::forward) with a ControlNet's residuals added as diffusers adds
    /// them: each down residual to its skip connection once the down blocks have run (the
    /// down path itself is unchanged), the mid residual to the mid block's output.
    pub fn forward_with_control(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        control: Option<&ControlResiduals>,
    ) -> Tensor {
        let temb =
            self.time_embedding
                .forward(timestep, sample.size()[0], sample.kind(), sample.device());
        self.forward_embedded(sample, &temb, cond, control)
    }

    /// [`forward`](Self::forward) with one timestep per sample (`timesteps`: `[batch]`), as
    /// training draws them.
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
    ) -> Tensor {
        let temb = self.time_embedding.forward_each(timesteps, sample.kind());
        self.forward_embedded(sample, &temb, cond, None)
    }

    /// Whether the model takes SDXL's added conditioning (and needs it).
    pub fn takes_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The attention projections (to_q, to_k, to_v, to_out.0) of every transformer block,
    /// in module order: what a UNet LoRA trains.
    pub fn attention_projections(&self) -> Vec<&AdaptableLinear> {
        let down = self.down_path.down_blocks.iter().flat_map(|b| &b.layers);
        let up = self.up_blocks.iter().flat_map(|b| &b.layers);
        let mid = std::iter::once(&self.down_path.mid_block.attention);
        down.filter_map(|l| l.attention.as_ref())
            .chain(mid)
            .chain(up.filter_map(|l| l.attention.as_ref()))
            .flat_map(Transformer2D::projections)
            .collect()
    }

    fn forward_embedded(
        &self,
        sample: &Tensor,
        temb: &Tensor,
        cond: &Conditioning,
        control: Option<&ControlResiduals>,
    ) -> Tensor {
        let context = &cond.context;
        let temb = match (&self.add_embedding, &cond.added) {
            (Some(embedding), Some(added)) => temb + embedding.forward(added, temb.kind()),
            (None, _) => temb.shallow_clone(),
            (Some(_), None) => {
                panic!("an SDXL UNet needs the added conditioning (pooled text and time ids)")
            }
        };
        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let x = self.conv_in.forward(&sample);
        let (x, mut skips) = self.down_path.down(&x, &temb, context);
        if let Some(control) = control {
            assert_eq!(
                control.down.len(),
                skips.len(),
                "one ControlNet residual per skip connection"
            );
            for (skip, residual) in skips.iter_mut().zip(&control.down) {
                *skip = &*skip + residual;
            }
        }
        let mut x = self.down_path.mid(&x, &temb, context);
        if let Some(control) = control {
            x += &control.mid;
        }

        for block in &self.up_blocks {
            for layer in &block.layers {
                let skip = skips.pop().expect("one skip per up-block layer");
                x = layer.forward(&Tensor::cat(&[&x, &skip], 1), &temb, context);
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size, so that latents whose sides are not
                // multiples of 2^(blocks-1) still line up (diffusers' `upsample_size`).
                let size = skips.last().map(|s| {
                    let s = s.size();
                    [s[2], s[3]]
                });
                x = up.forward(&x, size);
            }
        }

        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}
