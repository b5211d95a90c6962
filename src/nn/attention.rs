//! diffusers' `Attention` (AttnProcessor2_0): `to_q`, `to_k`, `to_v`, `to_out.0`,
//! multi-head scaled dot-product attention with scale `dim_head^-0.5`.
//! Used by the UNet's transformer blocks (attn1 self, attn2 cross) and the VAE's mid block.
use tch::{nn, Tensor};

use super::Linear;
use crate::lora::LoraDelta;

/// The image branch of one attn2 call: tokens `[B, T, cross]`, per-row scale `[B]`, and the
/// adapter's bias-free `to_k_ip`/`to_v_ip` weights `[inner, cross]`.
#[derive(Debug, Clone, Copy)]
pub struct ImageBranch<'a> {
    pub tokens: &'a Tensor,
    pub scale: &'a Tensor,
    pub to_k_ip: &'a Tensor,
    pub to_v_ip: &'a Tensor,
}

#[derive(Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: i64,
}

impl Attention {
    /// `query_dim → heads·dim_head`, keys/values from `cross_dim` (= query_dim for self-attention).
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        cross_dim: i64,
        heads: i64,
        dim_head: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * dim_head;
        Self {
            to_q: Linear::new(&vs / "to_q", query_dim, inner, qkv_bias),
            to_k: Linear::new(&vs / "to_k", cross_dim, inner, qkv_bias),
            to_v: Linear::new(&vs / "to_v", cross_dim, inner, qkv_bias),
            to_out: Linear::new(&vs / "to_out" / 0, inner, query_dim, true),
            heads,
        }
    }

    /// `x: [B, N, query_dim]`, `context: [B, M, cross_dim]` (None → self-attention).
    /// `lora` = per-sample deltas for (to_q, to_k, to_v).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        lora: [Option<&LoraDelta>; 3],
    ) -> Tensor {
        self.forward_image(x, context, lora, None)
    }

    /// [`Self::forward`] plus IP-Adapter's image branch.
    pub fn forward_image(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        lora: [Option<&LoraDelta>; 3],
        image: Option<ImageBranch<'_>>,
    ) -> Tensor {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward_lora(x, lora[0]);
        let k = self.to_k.forward_lora(ctx, lora[1]);
        let v = self.to_v.forward_lora(ctx, lora[2]);
        let (b, n, inner) = q.size3().expect("q is [B, N, C]");
        let dh = inner / self.heads;
        // [B, L, H·Dh] → [B, H, L, Dh]
        let split = |t: Tensor| t.view([b, -1, self.heads, dh]).transpose(1, 2);
        let (q, k, v) = (split(q), split(k), split(v));
        let sdpa = |k: &Tensor, v: &Tensor| {
            let o = Tensor::scaled_dot_product_attention(
                &q,
                k,
                v,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            );
            // [B, H, N, Dh] → [B, N, H·Dh]
            o.transpose(1, 2).reshape([b, n, inner])
        };
        let o = sdpa(&k, &v);
        // Out of place: autograd may keep SDPA's output for its backward.
        let o = match image {
            None => o,
            Some(img) => {
                let tokens = img.tokens.to_kind(x.kind());
                // [B, T, cross] @ [cross, inner] → [B, T, inner] → [B, H, T, Dh]
                let k_ip = split(tokens.matmul(&img.to_k_ip.to_kind(x.kind()).tr()));
                let v_ip = split(tokens.matmul(&img.to_v_ip.to_kind(x.kind()).tr()));
                // [B] → [B, 1, 1]
                let scale = img.scale.to_kind(x.kind()).view([b, 1, 1]);
                o + sdpa(&k_ip, &v_ip) * scale
            }
        };
        self.to_out.forward(&o)
    }
}
