//! The CLIP vision tower (transformers' `CLIPVisionTransformer`, and CLIPSeg's copy of it):
//! a patch-embedding convolution, a class token, position embeddings (bicubically
//! interpolated for other image sizes), `pre_layrnorm`, pre-norm transformer layers and
//! `post_layernorm` on the class token. Self-contained so that every model that needs a CLIP
//! image encoder (CLIPSeg, a safety checker) can build one from its `vision_config`.
//!
//! VarStore paths equal the state-dict keys below the path given to [`ClipVisionModel::new`]
//! (`vision_model.embeddings.patch_embedding.weight`, ...).

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::attention::sdpa;
use super::clip::Activation;
use super::layers::{embedding, layer_norm, linear};

/// `vision_config`, with transformers' `CLIPVisionConfig` defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: i64,
    #[serde(default = "defaults::image_size")]
    pub image_size: i64,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: i64,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

mod defaults {
    use super::Activation;
    pub fn hidden_size() -> i64 {
        768
    }
    pub fn intermediate_size() -> i64 {
        3072
    }
    pub fn num_hidden_layers() -> i64 {
        12
    }
    pub fn num_attention_heads() -> i64 {
        12
    }
    pub fn num_channels() -> i64 {
        3
    }
    pub fn image_size() -> i64 {
        224
    }
    pub fn patch_size() -> i64 {
        32
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl ClipVisionConfig {
    /// Patches per side of the (square) input.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// A description of what is wrong with the config, if anything.
    pub fn check(&self) -> Option<String> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Some("vision hidden_size is not a multiple of num_attention_heads".into());
        }
        if self.patch_size <= 0 || self.image_size < self.patch_size {
            return Some("vision image_size is smaller than patch_size".into());
        }
        None
    }
}

/// What the vision tower returns.
#[derive(Debug)]
pub struct ClipVisionOutput {
    /// `[batch, 1 + patches, hidden]`.
    pub last_hidden_state: Tensor,
    /// The class token after `post_layernorm`: `[batch, hidden]`.
    pub pooled: Tensor,
}

/// One transformer layer of CLIP's shape: self-attention and an MLP, each with a residual.
/// CLIP's encoder normalises before each (pre-norm); CLIPSeg's decoder after (post-norm).
#[derive(Debug)]
pub struct TransformerLayer {
    layer_norm1: nn::LayerNorm,
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    activation: Activation,
}

impl TransformerLayer {
    /// `p` is the layer's path (`...layers.3`): `self_attn.*`, `mlp.fc1/fc2`, `layer_norm1/2`.
    pub fn new(
        p: nn::Path,
        dim: i64,
        intermediate: i64,
        heads: i64,
        eps: f64,
        activation: Activation,
    ) -> Self {
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        TransformerLayer {
            layer_norm1: layer_norm(&p / "layer_norm1", dim, eps),
            q_proj: linear(&attn / "q_proj", dim, dim, true),
            k_proj: linear(&attn / "k_proj", dim, dim, true),
            v_proj: linear(&attn / "v_proj", dim, dim, true),
            out_proj: linear(&attn / "out_proj", dim, dim, true),
            layer_norm2: layer_norm(&p / "layer_norm2", dim, eps),
            fc1: linear(&mlp / "fc1", dim, intermediate, true),
            fc2: linear(&mlp / "fc2", intermediate, dim, true),
            heads,
            activation,
        }
    }

    fn attend(&self, x: &Tensor) -> Tensor {
        let attended = sdpa(
            &self.q_proj.forward(x),
            &self.k_proj.forward(x),
            &self.v_proj.forward(x),
            self.heads,
            false,
        );
        self.out_proj.forward(&attended)
    }

    fn mlp(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.apply(&self.fc1.forward(x)))
    }

    /// Pre-norm (CLIP's encoder layers), no attention mask.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attend(&self.layer_norm1.forward(x));
        &x + self.mlp(&self.layer_norm2.forward(&x))
    }

    /// Post-norm (CLIPSeg's decoder layers), no attention mask.
    pub fn forward_post_norm(&self, x: &Tensor) -> Tensor {
        let x = self.layer_norm1.forward(&(x + self.attend(x)));
        self.layer_norm2.forward(&(&x + self.mlp(&x)))
    }
}

/// `CLIPVisionTransformer` (the module at `vision_model`).
#[derive(Debug)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<TransformerLayer>,
    post_layernorm: nn::LayerNorm,
    patch_size: i64,
    /// Patches per side of the grid the position embeddings were trained on.
    grid: i64,
}

impl ClipVisionModel {
    /// `p` is the path that holds `vision_model` (the VarStore root for `CLIPVisionModel`,
    /// `clip` for CLIPSeg).
    pub fn new(p: nn::Path, c: &ClipVisionConfig) -> Self {
        let p = &p / "vision_model";
        let emb = &p / "embeddings";
        let d = c.hidden_size;
        let grid = c.image_size / c.patch_size;
        let conv = nn::ConvConfig {
            stride: c.patch_size,
            bias: false,
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        ClipVisionModel {
            class_embedding: emb.var("class_embedding", &[d], nn::Init::Const(0.0)),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                c.num_channels,
                d,
                c.patch_size,
                conv,
            ),
            position_embedding: embedding(&emb / "position_embedding", grid * grid + 1, d),
            pre_layrnorm: layer_norm(&p / "pre_layrnorm", d, c.layer_norm_eps),
            layers: (0..c.num_hidden_layers)
                .map(|i| {
                    TransformerLayer::new(
                        &p / "encoder" / "layers" / i,
                        d,
                        c.intermediate_size,
                        c.num_attention_heads,
                        c.layer_norm_eps,
                        c.hidden_act,
                    )
                })
                .collect(),
            post_layernorm: layer_norm(&p / "post_layernorm", d, c.layer_norm_eps),
            patch_size: c.patch_size,
            grid,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Position embeddings for a `height`×`width` input: the stored ones when the patch grid
    /// is the trained one, else the patch part resized bicubically (align_corners=False), as
    /// transformers' `interpolate_pos_encoding` does.
    fn position_embeddings(&self, height: i64, width: i64) -> Tensor {
        let table = &self.position_embedding.ws;
        let (rows, cols) = (height / self.patch_size, width / self.patch_size);
        if rows * cols == self.grid * self.grid && height == width {
            return table.unsqueeze(0);
        }
        let dim = table.size()[1];
        let patches = table
            .narrow(0, 1, self.grid * self.grid)
            .reshape([1, self.grid, self.grid, dim])
            .permute([0, 3, 1, 2]);
        // Bicubic interpolation in fp32 (half-precision bicubic is not available everywhere).
        let resized = patches
            .to_kind(Kind::Float)
            .upsample_bicubic2d([rows, cols], false, None, None)
            .to_kind(table.kind())
            .permute([0, 2, 3, 1])
            .reshape([1, rows * cols, dim]);
        Tensor::cat(&[table.narrow(0, 0, 1).unsqueeze(0), resized], 1)
    }

    /// The input of the first layer: class token and patch embeddings plus positions,
    /// through `pre_layrnorm`. `pixel_values`: `[batch, channels, height, width]`.
    pub fn embed(&self, pixel_values: &Tensor) -> Tensor {
        let (batch, _, height, width) = pixel_values.size4().expect("pixel values are 4-d");
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(self.class_embedding.kind()))
            .flatten(2, -1)
            .transpose(1, 2);
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, -1], false);
        let x = Tensor::cat(&[class, patches], 1) + self.position_embeddings(height, width);
        self.pre_layrnorm.forward(&x)
    }

    /// Hidden states as transformers numbers them: `[0]` is [`Self::embed`]'s output and
    /// `[i + 1]` the output of layer `i`, for the first `layers` layers only (the rest is not
    /// computed).
    pub fn hidden_states(&self, pixel_values: &Tensor, layers: usize) -> Vec<Tensor> {
        let mut states = vec![self.embed(pixel_values)];
        for layer in &self.layers[..layers.min(self.layers.len())] {
            let next = layer.forward(states.last().expect("starts non-empty"));
            states.push(next);
        }
        states
    }

    /// The side of the square input the position embeddings were trained on.
    pub fn image_size(&self) -> i64 {
        self.grid * self.patch_size
    }

    /// `CLIPVisionModel`'s outputs: the last hidden state and the pooled class token.
    pub fn forward(&self, pixel_values: &Tensor) -> ClipVisionOutput {
        let last_hidden_state = self
            .hidden_states(pixel_values, self.layers.len())
            .pop()
            .expect("at least the embeddings");
        let pooled = self.post_layernorm.forward(&last_hidden_state.select(1, 0));
        ClipVisionOutput {
            last_hidden_state,
            pooled,
        }
    }

    /// `pooler_output`: `post_layernorm` of the last layer's class token, `[batch, hidden]`.
    pub fn pooled(&self, pixel_values: &Tensor) -> Tensor {
        let last = self
            .hidden_states(pixel_values, self.layers.len())
            .pop()
            .expect("at least the embeddings");
        self.post_layernorm.forward(&last.select(1, 0))
    }
}
