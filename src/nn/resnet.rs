//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (models/resnet.py,
//! models/downsampling.py, models/upsampling.py), shared by the UNet (with a time embedding)
//! and the VAE (without).
use tch::{nn, nn::Module, Tensor};

use super::{conv2d, group_norm, Activation, Linear};

/// `norm1 → act → conv1 (+ time_emb_proj(act(temb))) → norm2 → act → conv2`, plus the
/// (1×1 `conv_shortcut`) residual, divided by `output_scale_factor`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    act: Activation,
    output_scale_factor: f64,
}

/// The hyper-parameters a `ResnetBlock2D` takes from its block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: i64,
    pub eps: f64,
    pub act: Activation,
    /// `None` in the VAE.
    pub temb_channels: Option<i64>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, cin: i64, cout: i64, cfg: &ResnetConfig) -> Self {
        Self {
            norm1: group_norm(&vs / "norm1", cfg.groups, cin, cfg.eps),
            conv1: conv2d(&vs / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: cfg
                .temb_channels
                .map(|t| Linear::new(&vs / "time_emb_proj", t, cout, true)),
            norm2: group_norm(&vs / "norm2", cfg.groups, cout, cfg.eps),
            conv2: conv2d(&vs / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout).then(|| conv2d(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
            act: cfg.act,
            output_scale_factor: cfg.output_scale_factor,
        }
    }

    /// `x: [B, Cin, H, W]`, `temb: [B, T]` → `[B, Cout, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.act.apply(&self.norm1.forward(x)));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            // [B, Cout] → [B, Cout, 1, 1]
            h += proj
                .forward(&self.act.apply(temb))
                .unsqueeze(-1)
                .unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.act.apply(&self.norm2.forward(&h)));
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = x + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Strided 3×3 `conv`; with `padding == 0` the input is first padded (0,1,0,1) as diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_first: bool,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Self {
            conv: conv2d(&vs / "conv", channels, channels, 3, 2, padding),
            pad_first: padding == 0,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_first {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest ×2 (or to an explicit size) followed by a 3×3 `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Self {
            conv: conv2d(&vs / "conv", channels, channels, 3, 1, 1),
        }
    }
    /// `x: [B, C, H, W]` → `[B, C, 2H, 2W]`, or `[B, C, size.0, size.1]` when given.
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        let up = match size {
            None => x.upsample_nearest2d([2 * h, 2 * w], Some(2.0), Some(2.0)),
            Some((oh, ow)) => x.upsample_nearest2d([oh, ow], None, None),
        };
        self.conv.forward(&up)
    }
}
