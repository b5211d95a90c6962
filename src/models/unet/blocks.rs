//! The UNet's down, mid and up blocks (diffusers `models/unets/unet_2d_blocks.py`):
//! `DownBlock2D`/`CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`/`CrossAttnUpBlock2D`.
//! A block without attentions is the cross-attention block with an empty `attentions` list.
use tch::{nn, Tensor};

use super::transformer::{CrossCond, Transformer2DModel, TransformerConfig};
use crate::lora::{BlockLoc, LoraBatch, TransformerSite};
use crate::nn::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

fn site(loc: BlockLoc, attention: usize) -> impl Fn(usize) -> TransformerSite {
    move |block| TransformerSite {
        loc,
        attention,
        block,
    }
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Shape of one down/up block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub index: usize,
    pub cin: i64,
    pub cout: i64,
    pub layers: i64,
    pub cross_attention: bool,
    /// Down: add a downsampler. Up: add an upsampler.
    pub resample: bool,
}

impl DownBlock {
    pub fn new(
        vs: nn::Path,
        spec: &BlockSpec,
        resnet: &ResnetConfig,
        transformer: &TransformerConfig,
        downsample_padding: i64,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..spec.layers as usize {
            let cin = if j == 0 { spec.cin } else { spec.cout };
            resnets.push(ResnetBlock2D::new(
                &vs / "resnets" / j,
                cin,
                spec.cout,
                resnet,
            ));
            if spec.cross_attention {
                attentions.push(Transformer2DModel::new(
                    &vs / "attentions" / j,
                    spec.cout,
                    transformer,
                    site(BlockLoc::Down(spec.index), j),
                ));
            }
        }
        let downsampler = spec
            .resample
            .then(|| Downsample2D::new(&vs / "downsamplers" / 0, spec.cout, downsample_padding));
        Self {
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Returns the block output and the skip connections it adds (one per resnet, + downsampler).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &CrossCond<'_>,
        lora: Option<&LoraBatch>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut x = x.shallow_clone();
        let mut skips = Vec::new();
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(&x, ctx, lora);
            }
            skips.push(x.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x);
            skips.push(x.shallow_clone());
        }
        (x, skips)
    }

    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }
}

/// `UNetMidBlock2DCrossAttn` with one attention: resnet → (attention → resnet).
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(
        vs: nn::Path,
        channels: i64,
        resnet: &ResnetConfig,
        transformer: &TransformerConfig,
    ) -> Self {
        Self {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::new(&vs / "resnets" / j, channels, channels, resnet))
                .collect(),
            attentions: vec![Transformer2DModel::new(
                &vs / "attentions" / 0,
                channels,
                transformer,
                site(BlockLoc::Mid, 0),
            )],
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &CrossCond<'_>,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, ctx, lora);
            x = resnet.forward(&x, Some(temb));
        }
        x
    }

    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev` = channels coming from the block below; `spec.cin` = channels of the skip
    /// connection of the last resnet (diffusers' `in_channels`).
    pub fn new(
        vs: nn::Path,
        spec: &BlockSpec,
        prev: i64,
        resnet: &ResnetConfig,
        transformer: &TransformerConfig,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        let n = spec.layers as usize;
        for j in 0..n {
            let skip = if j == n - 1 { spec.cin } else { spec.cout };
            let cin = if j == 0 { prev } else { spec.cout };
            resnets.push(ResnetBlock2D::new(
                &vs / "resnets" / j,
                cin + skip,
                spec.cout,
                resnet,
            ));
            if spec.cross_attention {
                attentions.push(Transformer2DModel::new(
                    &vs / "attentions" / j,
                    spec.cout,
                    transformer,
                    site(BlockLoc::Up(spec.index), j),
                ));
            }
        }
        let upsampler = spec
            .resample
            .then(|| Upsample2D::new(&vs / "upsamplers" / 0, spec.cout));
        Self {
            resnets,
            attentions,
            upsampler,
        }
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the back, one per resnet.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &CrossCond<'_>,
        lora: Option<&LoraBatch>,
        upsample_size: Option<(i64, i64)>,
    ) -> Tensor {
        let mut x = x.shallow_clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet passes one skip per resnet");
            // [B, C, H, W] ++ [B, Cskip, H, W] → [B, C + Cskip, H, W]
            x = resnet.forward(&Tensor::cat(&[&x, &skip], 1), Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(&x, ctx, lora);
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => x,
        }
    }

    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }
}
