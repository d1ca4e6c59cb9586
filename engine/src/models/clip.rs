//! The CLIP text encoder (transformers' `CLIPTextModel`): token and position embeddings,
//! a stack of pre-norm transformer layers with a causal mask, a final layer norm; with
//! `CLIPTextModelWithProjection` (SDXL's second encoder), the projected pooled output too.
//! VarStore paths equal the state-dict keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`).

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use super::adapter::AdaptableLinear;
use super::attention::sdpa;
use super::layers::{embedding, layer_norm, linear};
use crate::error::{read_json, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
        }
    }
}

/// `text_encoder/config.json`, with transformers' defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The width of `text_projection` (`CLIPTextModelWithProjection` only).
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: i64,
    /// Where the pooled output is taken: the first end token, or with the legacy value 2
    /// (the configs OpenAI's and SDXL's checkpoints ship), the highest token id.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: i64,
    /// `["CLIPTextModelWithProjection"]` adds the projection.
    #[serde(default)]
    pub architectures: Vec<String>,
}

mod defaults {
    use super::Activation;
    pub fn vocab_size() -> i64 {
        49408
    }
    pub fn hidden_size() -> i64 {
        512
    }
    pub fn intermediate_size() -> i64 {
        2048
    }
    pub fn num_hidden_layers() -> i64 {
        12
    }
    pub fn num_attention_heads() -> i64 {
        8
    }
    pub fn max_position_embeddings() -> i64 {
        77
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn projection_dim() -> i64 {
        512
    }
    pub fn eos_token_id() -> i64 {
        2
    }
}

impl ClipTextConfig {
    /// SD 1.x: OpenAI CLIP ViT-L/14's text tower.
    pub fn vit_l14() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            eos_token_id: 2,
            architectures: vec!["CLIPTextModel".into()],
        }
    }

    /// SD 2.x: OpenCLIP ViT-H/14's text tower (23 layers as diffusers ships it).
    pub fn open_clip_vit_h14() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: 1024,
            eos_token_id: 2,
            architectures: vec!["CLIPTextModel".into()],
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: "hidden_size is not a multiple of num_attention_heads".into(),
            });
        }
        Ok(config)
    }

    /// Whether the checkpoint is a `CLIPTextModelWithProjection`.
    pub fn with_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    out_proj: AdaptableLinear,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    activation: Activation,
}

impl EncoderLayer {
    fn new(p: nn::Path, c: &ClipTextConfig) -> Self {
        let d = c.hidden_size;
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        EncoderLayer {
            layer_norm1: layer_norm(&p / "layer_norm1", d, c.layer_norm_eps),
            q_proj: AdaptableLinear::new(&attn / "q_proj", d, d, true),
            k_proj: AdaptableLinear::new(&attn / "k_proj", d, d, true),
            v_proj: AdaptableLinear::new(&attn / "v_proj", d, d, true),
            out_proj: AdaptableLinear::new(&attn / "out_proj", d, d, true),
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
            true,
        );
        let x = x + self.out_proj.forward(&attended);
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        x + self.fc2.forward(&self.activation.apply(&h))
    }
}

/// `CLIPTextModel`, and `CLIPTextModelWithProjection` when the config names it.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    text_projection: Option<nn::Linear>,
    max_positions: i64,
    eos_token_id: i64,
    hidden_size: i64,
    projection_dim: i64,
}

/// What SDXL takes from a text encoder: one layer's hidden states (not normed) and, from
/// an encoder with a projection, the projected pooled output (`text_embeds`).
#[derive(Debug)]
pub struct EncoderOutput {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// `p` is the VarStore root: paths start with `text_model.`.
    pub fn new(p: nn::Path, c: &ClipTextConfig) -> Self {
        let text_projection = c.with_projection().then(|| {
            linear(
                &p / "text_projection",
                c.hidden_size,
                c.projection_dim,
                false,
            )
        });
        let p = &p / "text_model";
        let emb = &p / "embeddings";
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(&p / "encoder" / "layers" / i, c))
            .collect();
        ClipTextModel {
            token_embedding: embedding(&emb / "token_embedding", c.vocab_size, c.hidden_size),
            position_embedding: embedding(
                &emb / "position_embedding",
                c.max_position_embeddings,
                c.hidden_size,
            ),
            layers,
            final_layer_norm: layer_norm(&p / "final_layer_norm", c.hidden_size, c.layer_norm_eps),
            text_projection,
            max_positions: c.max_position_embeddings,
            eos_token_id: c.eos_token_id,
            hidden_size: c.hidden_size,
            projection_dim: c.projection_dim,
        }
    }

    /// The width of the hidden states.
    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    /// The width of the projected pooled output, for a `CLIPTextModelWithProjection`.
    pub fn projection_dim(&self) -> Option<i64> {
        self.text_projection.as_ref().map(|_| self.projection_dim)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Hidden states for `input_ids` (`[batch, tokens]`, int64). `clip_skip` = 0 gives
    /// `last_hidden_state`; `clip_skip` = n stops n layers early and applies the final layer
    /// norm there, which is what diffusers' pipelines do with `clip_skip=n`.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Tensor {
        let used = self.layers.len().saturating_sub(clip_skip);
        self.final_layer_norm
            .forward(&self.run_layers(input_ids, used, |_, _| {}))
    }

    /// SDXL's use of an encoder (diffusers' `hidden_states[-(clip_skip + 2)]`): the hidden
    /// states `clip_skip + 1` layers before the end, as they are (no final layer norm),
    /// and with a projection the pooled output, taken from the last layer.
    pub fn encode_hidden(&self, input_ids: &Tensor, clip_skip: usize) -> EncoderOutput {
        let wanted = self.layers.len().saturating_sub(clip_skip + 1);
        let mut hidden = None;
        let keep = |done: usize, x: &Tensor| {
            if done == wanted {
                hidden = Some(x.shallow_clone());
            }
        };
        let Some(projection) = &self.text_projection else {
            let x = self.run_layers(input_ids, wanted, keep);
            return EncoderOutput {
                hidden: hidden.unwrap_or(x),
                pooled: None,
            };
        };
        let last =
            self.final_layer_norm
                .forward(&self.run_layers(input_ids, self.layers.len(), keep));
        let positions = if self.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.eos_token_id)
                .to_kind(tch::Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(last.size()[0], (tch::Kind::Int64, last.device()));
        let pooled = last.index(&[Some(rows), Some(positions)]);
        EncoderOutput {
            hidden: hidden.expect("the wanted layer is within the stack"),
            pooled: Some(projection.forward(&pooled)),
        }
    }

    /// The embeddings through the first `layers` layers; `seen(n, x)` gets the hidden
    /// states after `n` layers (`n` = 0: the embeddings).
    fn run_layers(
        &self,
        input_ids: &Tensor,
        layers: usize,
        mut seen: impl FnMut(usize, &Tensor),
    ) -> Tensor {
        let tokens = input_ids.size()[1];
        assert!(
            tokens <= self.max_positions,
            "more tokens than position embeddings"
        );
        let positions = Tensor::arange(tokens, (tch::Kind::Int64, input_ids.device())).unsqueeze(0);
        let mut x =
            self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions);
        seen(0, &x);
        for (n, layer) in self.layers[..layers].iter().enumerate() {
            x = layer.forward(&x);
            seen(n + 1, &x);
        }
        x
    }

    /// The self-attention projections (q, k, v, out) of every layer, in module order: what
    /// a text-encoder LoRA trains.
    pub fn attention_projections(&self) -> Vec<&AdaptableLinear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj])
            .collect()
    }
}
