//! The CLIP vision tower (transformers' `CLIPVisionModel`): a strided convolution cuts the
//! image into patches, a class token is prepended, position embeddings are added, then a
//! pre-norm, a stack of (non-causal) pre-norm transformer layers, and a layer norm of the
//! class token as the pooled output.
//!
//! VarStore paths are the keys of the checkpoints on the hub
//! (`vision_model.embeddings.patch_embedding.weight`, ... under the path given to
//! [`ClipVisionModel::new`]).

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::attention::sdpa;
use super::clip::Activation;
use super::layers::{embedding, layer_norm, linear};

/// `vision_config` of a CLIP config, with transformers' defaults for absent keys.
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

#[derive(Debug)]
struct VisionLayer {
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

impl VisionLayer {
    fn new(p: nn::Path, c: &ClipVisionConfig) -> Self {
        let d = c.hidden_size;
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        VisionLayer {
            layer_norm1: layer_norm(&p / "layer_norm1", d, c.layer_norm_eps),
            q_proj: linear(&attn / "q_proj", d, d, true),
            k_proj: linear(&attn / "k_proj", d, d, true),
            v_proj: linear(&attn / "v_proj", d, d, true),
            out_proj: linear(&attn / "out_proj", d, d, true),
            layer_norm2: layer_norm(&p / "layer_norm2", d, c.layer_norm_eps),
            fc1: linear(&mlp / "fc1", d, c.intermediate_size, true),
            fc2: linear(&mlp / "fc2", c.intermediate_size, d, true),
            heads: c.num_attention_heads,
            activation: c.hidden_act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layer_norm1.forward(x);
        let attended = sdpa(
            &self.q_proj.forward(&h),
            &self.k_proj.forward(&h),
            &self.v_proj.forward(&h),
            self.heads,
            false,
        );
        let x = x + self.out_proj.forward(&attended);
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = match self.activation {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        x + self.fc2.forward(&h)
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

/// `CLIPVisionModel` (without position-embedding interpolation: inputs are
/// `image_size` square, as CLIP's image processor makes them).
#[derive(Debug)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<VisionLayer>,
    post_layernorm: nn::LayerNorm,
    image_size: i64,
}

impl ClipVisionModel {
    /// `p` is where the `CLIPVisionModel` sits: its paths continue with `vision_model.`.
    pub fn new(p: nn::Path, c: &ClipVisionConfig) -> Self {
        let p = &p / "vision_model";
        let emb = &p / "embeddings";
        let d = c.hidden_size;
        let patch_config = nn::ConvConfig {
            stride: c.patch_size,
            bias: false,
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| VisionLayer::new(&p / "encoder" / "layers" / i, c))
            .collect();
        ClipVisionModel {
            class_embedding: emb.var("class_embedding", &[d], nn::Init::Const(0.0)),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                c.num_channels,
                d,
                c.patch_size,
                patch_config,
            ),
            position_embedding: embedding(&emb / "position_embedding", c.grid() * c.grid() + 1, d),
            pre_layrnorm: layer_norm(&p / "pre_layrnorm", d, c.layer_norm_eps),
            layers,
            post_layernorm: layer_norm(&p / "post_layernorm", d, c.layer_norm_eps),
            image_size: c.image_size,
        }
    }

    /// The side of the square input the model takes.
    pub fn image_size(&self) -> i64 {
        self.image_size
    }

    /// `pixel_values`: `[batch, channels, image_size, image_size]`, normalized as CLIP's
    /// image processor does; converted to the weights' dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> ClipVisionOutput {
        let (batch, _, height, width) = pixel_values.size4().expect("pixel_values is 4-d");
        assert!(
            height == self.image_size && width == self.image_size,
            "the vision tower takes {0}x{0} inputs, got {width}x{height}",
            self.image_size
        );
        let kind = self.class_embedding.kind();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(kind))
            .flatten(2, -1)
            .transpose(1, 2);
        let hidden = self.class_embedding.size()[0];
        let class = self.class_embedding.expand([batch, 1, hidden], false);
        let tokens = patches.size()[1] + 1;
        let positions = Tensor::arange(tokens, (Kind::Int64, pixel_values.device())).unsqueeze(0);
        let mut x = Tensor::cat(&[class, patches], 1) + self.position_embedding.forward(&positions);
        x = self.pre_layrnorm.forward(&x);
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        let pooled = self.post_layernorm.forward(&x.select(1, 0));
        ClipVisionOutput {
            last_hidden_state: x,
            pooled,
        }
    }
}
