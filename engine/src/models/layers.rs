//! Thin constructors over `tch::nn` layers. Parameters are created zero-filled: every one
//! of them is overwritten by the weights loader, so random initialisation would only cost
//! time (hundreds of milliseconds on a full UNet).

use tch::nn::{self, Init};

const LOADED: Init = Init::Const(0.0);

pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: LOADED,
        bs_init: bias.then_some(LOADED),
        bias,
    };
    nn::linear(p, in_dim, out_dim, config)
}

pub fn conv2d(
    p: nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        ws_init: LOADED,
        bs_init: LOADED,
        ..Default::default()
    };
    nn::conv2d(p, in_channels, out_channels, kernel, config)
}

pub fn group_norm(p: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        eps,
        ws_init: LOADED,
        bs_init: LOADED,
        ..Default::default()
    };
    nn::group_norm(p, groups, channels, config)
}

pub fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps,
        ws_init: LOADED,
        bs_init: LOADED,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], config)
}

pub fn embedding(p: nn::Path, count: i64, dim: i64) -> nn::Embedding {
    let config = nn::EmbeddingConfig {
        ws_init: LOADED,
        ..Default::default()
    };
    nn::embedding(p, count, dim, config)
}
