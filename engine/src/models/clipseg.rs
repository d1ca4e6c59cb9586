//! CLIPSeg (transformers' `CLIPSegForImageSegmentation`): a frozen CLIP (vision tower, text
//! tower and projection) and a light decoder that turns the activations of a few vision
//! layers, conditioned on the text embedding by FiLM, into per-pixel logits.
//!
//! VarStore paths equal transformers' state-dict keys (`clip.vision_model...`,
//! `clip.text_model...`, `clip.text_projection.weight`, `decoder...`).

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::clip::{Activation, ClipTextConfig, ClipTextModel};
use super::clip_vision::{ClipVisionConfig, ClipVisionModel, TransformerLayer};
use super::layers::{conv2d, linear};
use crate::error::{read_json, Error, Result};

/// `config.json` of a CLIPSeg folder, with `CLIPSegConfig`'s defaults.
#[derive(Debug, Clone)]
pub struct ClipSegConfig {
    pub text: ClipTextConfig,
    /// The text tower's `eos_token_id`: 2 (old configs) means "pool at the largest id".
    pub eos_token_id: i64,
    pub vision: ClipVisionConfig,
    pub projection_dim: i64,
    pub extract_layers: Vec<usize>,
    pub reduce_dim: i64,
    pub decoder_num_attention_heads: i64,
    pub decoder_intermediate_size: i64,
    pub conditional_layer: usize,
    pub use_complex_transposed_convolution: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    text_config: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    text_config_dict: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    vision_config: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    vision_config_dict: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default = "raw_defaults::projection_dim")]
    projection_dim: i64,
    #[serde(default = "raw_defaults::extract_layers")]
    extract_layers: Vec<usize>,
    #[serde(default = "raw_defaults::reduce_dim")]
    reduce_dim: i64,
    #[serde(default = "raw_defaults::decoder_num_attention_heads")]
    decoder_num_attention_heads: i64,
    #[serde(default = "raw_defaults::decoder_intermediate_size")]
    decoder_intermediate_size: i64,
    #[serde(default)]
    conditional_layer: usize,
    #[serde(default)]
    use_complex_transposed_convolution: bool,
}

mod raw_defaults {
    pub fn projection_dim() -> i64 {
        512
    }
    pub fn extract_layers() -> Vec<usize> {
        vec![3, 6, 9]
    }
    pub fn reduce_dim() -> i64 {
        64
    }
    pub fn decoder_num_attention_heads() -> i64 {
        4
    }
    pub fn decoder_intermediate_size() -> i64 {
        2048
    }
}

/// `text_config` updated with `text_config_dict` (older checkpoints carry both), as
/// `CLIPSegConfig` merges them.
fn merged(
    base: Option<serde_json::Map<String, serde_json::Value>>,
    update: Option<serde_json::Map<String, serde_json::Value>>,
) -> serde_json::Value {
    let mut map = base.unwrap_or_default();
    map.extend(update.unwrap_or_default());
    serde_json::Value::Object(map)
}

impl ClipSegConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = read_json(path)?;
        let bad = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let text_json = merged(raw.text_config, raw.text_config_dict);
        let eos_token_id = text_json
            .get("eos_token_id")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(49407);
        let text: ClipTextConfig =
            serde_json::from_value(text_json).map_err(|e| bad(format!("text_config: {e}")))?;
        let vision: ClipVisionConfig =
            serde_json::from_value(merged(raw.vision_config, raw.vision_config_dict))
                .map_err(|e| bad(format!("vision_config: {e}")))?;
        if text.hidden_size % text.num_attention_heads != 0
            || vision.hidden_size % vision.num_attention_heads != 0
            || raw.reduce_dim % raw.decoder_num_attention_heads != 0
        {
            return Err(bad(
                "a hidden size is not a multiple of its head count".into()
            ));
        }
        if raw.extract_layers.is_empty()
            || raw
                .extract_layers
                .iter()
                .any(|&l| l >= vision.num_hidden_layers as usize)
        {
            return Err(bad(format!(
                "extract_layers {:?} must name layers of the {}-layer vision tower",
                raw.extract_layers, vision.num_hidden_layers
            )));
        }
        if raw.use_complex_transposed_convolution && vision.patch_size % 4 != 0 {
            return Err(bad(
                "the complex transposed convolution needs patch_size % 4 == 0".into(),
            ));
        }
        Ok(ClipSegConfig {
            text,
            eos_token_id,
            vision,
            projection_dim: raw.projection_dim,
            extract_layers: raw.extract_layers,
            reduce_dim: raw.reduce_dim,
            decoder_num_attention_heads: raw.decoder_num_attention_heads,
            decoder_intermediate_size: raw.decoder_intermediate_size,
            conditional_layer: raw.conditional_layer,
            use_complex_transposed_convolution: raw.use_complex_transposed_convolution,
        })
    }
}

fn conv_transpose(p: nn::Path, cin: i64, cout: i64, k: i64) -> nn::ConvTranspose2D {
    let config = nn::ConvTransposeConfig {
        stride: k,
        ws_init: nn::Init::Const(0.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv_transpose2d(p, cin, cout, k, config)
}

/// The upsampling head: one transposed convolution by the patch size, or (the "refined"
/// checkpoints) a 3×3 convolution and two transposed convolutions by patch_size / 4.
#[derive(Debug)]
enum Upsample {
    Simple(nn::ConvTranspose2D),
    Complex(Box<ComplexUpsample>),
}

#[derive(Debug)]
struct ComplexUpsample {
    conv: nn::Conv2D,
    up1: nn::ConvTranspose2D,
    up2: nn::ConvTranspose2D,
}

impl Upsample {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Upsample::Simple(up) => up.forward(x),
            Upsample::Complex(c) => c
                .up2
                .forward(&c.up1.forward(&c.conv.forward(x).relu()).relu()),
        }
    }
}

/// `CLIPSegDecoder`.
#[derive(Debug)]
struct Decoder {
    film_mul: nn::Linear,
    film_add: nn::Linear,
    reduces: Vec<nn::Linear>,
    layers: Vec<TransformerLayer>,
    upsample: Upsample,
    conditional_layer: usize,
}

impl Decoder {
    fn new(p: nn::Path, c: &ClipSegConfig) -> Self {
        let r = c.reduce_dim;
        let depth = c.extract_layers.len() as i64;
        let tc = &p / "transposed_convolution";
        let upsample = if c.use_complex_transposed_convolution {
            let k = c.vision.patch_size / 4;
            Upsample::Complex(Box::new(ComplexUpsample {
                conv: conv2d(&tc / 0, r, r, 3, 1, 1),
                up1: conv_transpose(&tc / 2, r, r / 2, k),
                up2: conv_transpose(&tc / 4, r / 2, 1, k),
            }))
        } else {
            Upsample::Simple(conv_transpose(tc, r, 1, c.vision.patch_size))
        };
        Decoder {
            film_mul: linear(&p / "film_mul", c.projection_dim, r, true),
            film_add: linear(&p / "film_add", c.projection_dim, r, true),
            reduces: (0..depth)
                .map(|i| linear(&p / "reduces" / i, c.vision.hidden_size, r, true))
                .collect(),
            layers: (0..depth)
                .map(|i| {
                    TransformerLayer::new(
                        &p / "layers" / i,
                        r,
                        c.decoder_intermediate_size,
                        c.decoder_num_attention_heads,
                        c.vision.layer_norm_eps,
                        Activation::Relu,
                    )
                })
                .collect(),
            upsample,
            conditional_layer: c.conditional_layer,
        }
    }

    /// `activations` in extract_layers order; `conditional`: `[batch, projection_dim]`.
    fn forward(&self, activations: &[Tensor], conditional: &Tensor) -> Tensor {
        let mut output: Option<Tensor> = None;
        let steps = activations
            .iter()
            .rev()
            .zip(&self.layers)
            .zip(&self.reduces);
        for (i, ((activation, layer), reduce)) in steps.enumerate() {
            let reduced = reduce.forward(activation);
            let mut x = match output {
                Some(previous) => reduced + previous,
                None => reduced,
            };
            if i == self.conditional_layer {
                x = self.film_mul.forward(conditional).unsqueeze(1) * x
                    + self.film_add.forward(conditional).unsqueeze(1);
            }
            output = Some(layer.forward_post_norm(&x));
        }
        let output = output.expect("at least one extract layer");
        // Drop the class token: [batch, reduce_dim, tokens] on a square grid.
        let (batch, tokens, channels) = output.size3().expect("decoder output is 3-d");
        let side = ((tokens - 1) as f64).sqrt() as i64;
        let grid = output
            .narrow(1, 1, tokens - 1)
            .transpose(1, 2)
            .reshape([batch, channels, side, side]);
        self.upsample.forward(&grid).squeeze_dim(1)
    }
}

/// `CLIPSegForImageSegmentation` for text prompts.
#[derive(Debug)]
pub struct ClipSegModel {
    vision: ClipVisionModel,
    text: ClipTextModel,
    text_projection: nn::Linear,
    visual_projection: nn::Linear,
    /// CLIP's contrastive temperature: loaded with the checkpoint, unused for masks.
    pub logit_scale: Tensor,
    decoder: Decoder,
    extract_layers: Vec<usize>,
    eos_token_id: i64,
    image_size: i64,
}

impl ClipSegModel {
    /// `p` is the VarStore root.
    pub fn new(p: nn::Path, c: &ClipSegConfig) -> Self {
        ClipSegModel {
            vision: ClipVisionModel::new(&p / "clip", &c.vision),
            text: ClipTextModel::new(&p / "clip", &c.text),
            text_projection: linear(
                &p / "clip" / "text_projection",
                c.text.hidden_size,
                c.projection_dim,
                false,
            ),
            visual_projection: linear(
                &p / "clip" / "visual_projection",
                c.vision.hidden_size,
                c.projection_dim,
                false,
            ),
            logit_scale: (&p / "clip").var("logit_scale", &[], nn::Init::Const(0.0)),
            decoder: Decoder::new(&p / "decoder", c),
            extract_layers: c.extract_layers.clone(),
            eos_token_id: c.eos_token_id,
            image_size: c.vision.image_size,
        }
    }

    /// The vision config's image size (352 for the CIDAS checkpoints).
    pub fn image_size(&self) -> i64 {
        self.image_size
    }

    /// `get_text_features`: the final-layer-normed state at the end-of-text token, projected.
    /// `input_ids`: `[batch, tokens]` int64 → `[batch, projection_dim]`.
    pub fn text_embeddings(&self, input_ids: &Tensor) -> Tensor {
        let hidden = self.text.forward(input_ids, 0);
        let ids = input_ids.to_device(hidden.device());
        let position = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let batch = hidden.size()[0];
        let index = position
            .view([batch, 1, 1])
            .expand([batch, 1, hidden.size()[2]], false);
        let pooled = hidden.gather(1, &index, false).squeeze_dim(1);
        self.text_projection.forward(&pooled)
    }

    /// `get_image_features`: the pooled class token, projected (`[batch, projection_dim]`);
    /// what a visual prompt would condition the decoder on.
    pub fn image_embeddings(&self, pixel_values: &Tensor) -> Tensor {
        self.visual_projection
            .forward(&self.vision.pooled(pixel_values))
    }

    /// Segmentation logits `[batch, height, width]` for `pixel_values` `[batch, 3, h, w]`
    /// (square, a multiple of the patch size) and prompts `input_ids` `[batch, tokens]`.
    pub fn logits(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Tensor {
        let deepest = self.extract_layers.iter().max().copied().unwrap_or(0) + 1;
        let states = self.vision.hidden_states(pixel_values, deepest);
        let activations: Vec<Tensor> = self
            .extract_layers
            .iter()
            .map(|&l| states[l + 1].shallow_clone())
            .collect();
        let conditional = self.text_embeddings(input_ids);
        self.decoder.forward(&activations, &conditional)
    }
}

/// transformers 5 may save the model without the `clip.` prefix on the CLIP part: accept both.
pub fn clipseg_alias(name: &str) -> Option<String> {
    name.strip_prefix("clip.").map(String::from)
}
