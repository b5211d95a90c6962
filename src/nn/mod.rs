//! Building blocks shared by the models: the one Linear (and LoRA seam), attention, norms.
mod attention;
mod linear;
mod resnet;

pub use attention::{Attention, ImageBranch};
pub use linear::Linear;
pub use resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

use tch::{nn, Tensor};

/// `nn.Conv2d` with diffusers' key names (`weight`, `bias`).
pub fn conv2d(vs: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let d = nn::ConvConfig::default();
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ws_init: crate::util::init(d.ws_init),
        bs_init: crate::util::init(d.bs_init),
        ..d
    };
    nn::conv2d(vs, cin, cout, k, cfg)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps,
        ..Default::default()
    };
    nn::group_norm(vs, groups, channels, cfg)
}

/// `nn.LayerNorm(dim, eps)`.
pub fn layer_norm(vs: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(vs, vec![dim], cfg)
}

/// Activation functions named by configs (`act_fn`, `hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    Gelu,
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "quick_gelu" => Self::QuickGelu,
            other => anyhow::bail!("unsupported activation {other:?} (silu, gelu, quick_gelu)"),
        })
    }
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu("none"),
            // transformers' QuickGELUActivation: x * sigmoid(1.702 x)
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
        }
    }
}
