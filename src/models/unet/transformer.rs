//! diffusers' `Transformer2DModel` (continuous input) and `BasicTransformerBlock`
//! (models/transformers/transformer_2d.py, models/attention.py): self-attention, cross-attention
//! to the text states (the LoRA sites, `attn2.to_q/to_k/to_v`) and, with an IP-Adapter, to image
//! tokens (`to_k_ip`/`to_v_ip` of the adapter, keyed by transformer block), GEGLU feed-forward.
use tch::{nn, nn::Module, Tensor};

use crate::lora::{LoraBatch, LoraSite, Proj, TransformerSite};
use crate::nn::{conv2d, group_norm, layer_norm, Attention, ImageBranch, Linear};

/// An IP-Adapter's `(to_k_ip, to_v_ip)` per attn2 transformer block (shared, frozen).
pub type IpWeights = std::rc::Rc<std::collections::BTreeMap<TransformerSite, (Tensor, Tensor)>>;

/// What attn2 attends to: text states `[B, M, cross]` and optional IP-Adapter image tokens.
#[derive(Debug, Clone, Copy)]
pub struct CrossCond<'a> {
    pub text: &'a Tensor,
    pub image: Option<&'a ImageTokens>,
}

/// IP-Adapter image tokens for one UNet call (diffusers' `ip_adapter_image_embeds` through the
/// projection) and the adapter's attn2 weights.
#[derive(Debug)]
pub struct ImageTokens {
    /// `[B, T, cross_attention_dim]`; rows without an image hold zeros and scale 0.
    pub tokens: Tensor,
    /// Per-row adapter scale `[B]` (diffusers' `set_ip_adapter_scale`).
    pub scale: Tensor,
    /// `(to_k_ip, to_v_ip)` `[inner, cross]` of every attn2, by transformer block.
    pub weights: IpWeights,
}

/// `ff.net.0` (GEGLU: `proj` to 2×inner, `h * gelu(gate)`) and `ff.net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vs: nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: Linear::new(&vs / "net" / 0 / "proj", dim, 2 * inner, true),
            out: Linear::new(&vs / "net" / 2, inner, dim, true),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        // [B, N, 2·inner] → 2 × [B, N, inner]
        let h = self.proj.forward(x).chunk(2, -1);
        self.out.forward(&(&h[0] * h[1].gelu("none")))
    }
}

/// One `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
    /// The LoRA sites of attn2's to_q, to_k, to_v.
    sites: [LoraSite; 3],
}

impl BasicTransformerBlock {
    fn new(vs: nn::Path, dim: i64, heads: i64, cross_dim: i64, site: TransformerSite) -> Self {
        let dh = dim / heads;
        let sites = Proj::ALL.map(|proj| LoraSite {
            transformer: site,
            proj,
            in_features: if proj == Proj::Q { dim } else { cross_dim } as usize,
            out_features: dim as usize,
        });
        Self {
            norm1: layer_norm(&vs / "norm1", dim, 1e-5),
            attn1: Attention::new(&vs / "attn1", dim, dim, heads, dh, false),
            norm2: layer_norm(&vs / "norm2", dim, 1e-5),
            attn2: Attention::new(&vs / "attn2", dim, cross_dim, heads, dh, false),
            norm3: layer_norm(&vs / "norm3", dim, 1e-5),
            ff: FeedForward::new(&vs / "ff", dim),
            sites,
        }
    }

    /// `x: [B, N, dim]`, `ctx.text: [B, M, cross_dim]`.
    fn forward(&self, x: &Tensor, ctx: &CrossCond<'_>, lora: Option<&LoraBatch>) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None, [None; 3]) + x;
        let deltas = self.sites.map(|s| lora.and_then(|l| l.get(&s)));
        let image = ctx.image.and_then(|img| {
            let (k, v) = img.weights.get(&self.sites[0].transformer)?;
            Some(ImageBranch {
                tokens: &img.tokens,
                scale: &img.scale,
                to_k_ip: k,
                to_v_ip: v,
            })
        });
        let x = self
            .attn2
            .forward_image(&self.norm2.forward(&x), Some(ctx.text), deltas, image)
            + &x;
        self.ff.forward(&self.norm3.forward(&x)) + &x
    }

    pub fn lora_sites(&self) -> &[LoraSite; 3] {
        &self.sites
    }

    /// The frozen weight `[out, in]` under each LoRA site (to_q, to_k, to_v).
    pub fn lora_site_weights(&self) -> [&Tensor; 3] {
        [
            &self.attn2.to_q.weight,
            &self.attn2.to_k.weight,
            &self.attn2.to_v.weight,
        ]
    }
}

/// `proj_in` is a 1×1 conv (SD1.x) or a Linear (`use_linear_projection`, SD2.x).
#[derive(Debug)]
enum Proj2d {
    Conv(nn::Conv2D),
    Linear(Linear),
}

/// `Transformer2DModel`: GroupNorm → proj_in → blocks → proj_out, plus the residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Proj2d,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj2d,
}

/// What a `Transformer2DModel` needs from its UNet block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: i64,
    pub cross_dim: i64,
    pub layers: i64,
    pub groups: i64,
    pub linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(
        vs: nn::Path,
        channels: i64,
        cfg: &TransformerConfig,
        site: impl Fn(usize) -> TransformerSite,
    ) -> Self {
        let proj = |name: &str| {
            if cfg.linear_projection {
                Proj2d::Linear(Linear::new(&vs / name, channels, channels, true))
            } else {
                Proj2d::Conv(conv2d(&vs / name, channels, channels, 1, 1, 0))
            }
        };
        let blocks = (0..cfg.layers as usize)
            .map(|k| {
                BasicTransformerBlock::new(
                    &vs / "transformer_blocks" / k,
                    channels,
                    cfg.heads,
                    cfg.cross_dim,
                    site(k),
                )
            })
            .collect();
        Self {
            norm: group_norm(&vs / "norm", cfg.groups, channels, 1e-6),
            proj_in: proj("proj_in"),
            blocks,
            proj_out: proj("proj_out"),
        }
    }

    /// `x: [B, C, H, W]`, `ctx.text: [B, M, cross_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, ctx: &CrossCond<'_>, lora: Option<&LoraBatch>) -> Tensor {
        let (b, c, h, w) = x.size4().expect("UNet feature maps are 4-d");
        let residual = x;
        let x = self.norm.forward(x);
        // [B, C, H, W] → [B, H·W, C]
        let to_tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut x = match &self.proj_in {
            Proj2d::Conv(conv) => to_tokens(conv.forward(&x)),
            Proj2d::Linear(lin) => lin.forward(&to_tokens(x)),
        };
        for block in &self.blocks {
            x = block.forward(&x, ctx, lora);
        }
        // [B, H·W, C] → [B, C, H, W]
        let to_map = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous();
        let x = match &self.proj_out {
            Proj2d::Conv(conv) => conv.forward(&to_map(x)),
            Proj2d::Linear(lin) => to_map(lin.forward(&x)),
        };
        x + residual
    }

    pub fn blocks(&self) -> &[BasicTransformerBlock] {
        &self.blocks
    }
}
