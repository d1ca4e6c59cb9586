//! Multi-head attention as diffusers' `Attention` with `AttnProcessor2_0` computes it:
//! projections, then `scaled_dot_product_attention` over heads.

use tch::{nn, nn::Module, Tensor};

use super::adapter::AdaptableLinear;

/// Splits `[batch, tokens, heads*dim]` into `[batch, heads, tokens, dim]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let (batch, tokens, inner) = x
        .size3()
        .expect("attention input is [batch, tokens, channels]");
    x.view([batch, tokens, heads, inner / heads])
        .transpose(1, 2)
}

/// The inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (batch, heads, tokens, dim) = x.size4().expect("attention output is 4-d");
    x.transpose(1, 2).reshape([batch, tokens, heads * dim])
}

/// `softmax(q kᵀ / sqrt(d)) v` per head, through libtorch's fused kernel.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, causal: bool) -> Tensor {
    let out = Tensor::scaled_dot_product_attention(
        &split_heads(q, heads),
        &split_heads(k, heads),
        &split_heads(v, heads),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    );
    merge_heads(&out)
}

/// diffusers' `Attention` as used by the UNet's transformer blocks (self- and
/// cross-attention) and by the VAE's mid block.
#[derive(Debug)]
pub struct Attention {
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
    heads: i64,
}

impl Attention {
    /// `context_dim` is the dimension of what is attended to (the query's own for
    /// self-attention); `qkv_bias` is false in the UNet, true in the VAE.
    pub fn new(
        p: nn::Path,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * head_dim;
        Attention {
            to_q: AdaptableLinear::new(&p / "to_q", query_dim, inner, qkv_bias),
            to_k: AdaptableLinear::new(&p / "to_k", context_dim, inner, qkv_bias),
            to_v: AdaptableLinear::new(&p / "to_v", context_dim, inner, qkv_bias),
            to_out: AdaptableLinear::new(&p / "to_out" / 0, inner, query_dim, true),
            heads,
        }
    }

    /// `x`: `[batch, tokens, query_dim]`; `context`: what to attend to (None = self).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context);
        let v = self.to_v.forward(context);
        self.to_out.forward(&sdpa(&q, &k, &v, self.heads, false))
    }

    /// The projections a LoRA trains: to_q, to_k, to_v, to_out.0.
    pub fn projections(&self) -> [&AdaptableLinear; 4] {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }
}
