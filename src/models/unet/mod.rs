//! `UNet2DConditionModel` for the SD1.x/SD2.x family (diffusers
//! `models/unets/unet_2d_condition.py`), with per-sample timesteps and per-sample LoRA on the
//! cross-attention projections (the paper's LoRA sites, SPEC §2).
//!
//! ε = UNet(x_t, t, c): `time_proj → time_embedding`, `conv_in`, down blocks (collecting
//! skips), mid block, up blocks (consuming skips), `conv_norm_out → act → conv_out`.
mod blocks;
mod config;
mod transformer;

pub use config::{PerBlock, UNetConfig, UNetLayout};

use anyhow::{bail, Result};
use tch::{nn, nn::Module, Kind, Tensor};

use crate::io::DiffusersFolder;
use crate::lora::{LoraBatch, LoraSite};
use crate::nn::{conv2d, group_norm, Activation, Linear, ResnetConfig};
use blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use transformer::{Transformer2DModel, TransformerConfig};

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: nn::Conv2D,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    act: Activation,
    sites: Vec<LoraSite>,
}

impl UNet2DConditionModel {
    pub fn new(vs: nn::Path, config: &UNetConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        let layout = config.validate()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet = ResnetConfig {
            groups: layout.groups,
            eps: config.norm_eps,
            act: layout.act,
            temb_channels: Some(temb_dim),
            output_scale_factor: 1.0,
        };
        let transformer = |i: usize| TransformerConfig {
            heads: layout.heads[i],
            cross_dim: layout.cross_dims[i],
            layers: layout.transformer_layers[i],
            groups: layout.groups,
            linear_projection: config.use_linear_projection,
        };

        let mut down_blocks = Vec::new();
        let mut cout = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = ch[i];
            let spec = BlockSpec {
                index: i,
                cin,
                cout,
                layers: layout.layers[i],
                cross_attention: kind == "CrossAttnDownBlock2D",
                resample: i + 1 < n,
            };
            down_blocks.push(DownBlock::new(
                &vs / "down_blocks" / i,
                &spec,
                &resnet,
                &transformer(i),
                config.downsample_padding,
            ));
        }
        let mid_resnet = ResnetConfig {
            output_scale_factor: config.mid_block_scale_factor,
            ..resnet
        };
        let mid_block = MidBlock::new(
            &vs / "mid_block",
            ch[n - 1],
            &mid_resnet,
            &transformer(n - 1),
        );

        // Up blocks mirror the down blocks: per-block values are read in reverse.
        let mut up_blocks = Vec::new();
        let mut cout = ch[n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let r = n - 1 - i;
            let prev = cout;
            cout = ch[r];
            let spec = BlockSpec {
                index: i,
                cin: ch[r.saturating_sub(1)],
                cout,
                layers: layout.layers[r] + 1,
                cross_attention: kind == "CrossAttnUpBlock2D",
                resample: i + 1 < n,
            };
            up_blocks.push(UpBlock::new(
                &vs / "up_blocks" / i,
                &spec,
                prev,
                &resnet,
                &transformer(r),
            ));
        }

        let mut unet = Self {
            config: config.clone(),
            conv_in: conv2d(&vs / "conv_in", config.in_channels, ch[0], 3, 1, 1),
            time_linear_1: Linear::new(&vs / "time_embedding" / "linear_1", ch[0], temb_dim, true),
            time_linear_2: Linear::new(
                &vs / "time_embedding" / "linear_2",
                temb_dim,
                temb_dim,
                true,
            ),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", layout.groups, ch[0], config.norm_eps),
            conv_out: conv2d(&vs / "conv_out", ch[0], config.out_channels, 3, 1, 1),
            act: layout.act,
            sites: Vec::new(),
        };
        unet.sites = unet
            .transformers()
            .flat_map(|t| t.blocks().iter().flat_map(|b| *b.lora_sites()))
            .collect();
        Ok(unet)
    }

    /// Loads `unet/config.json` and `unet/diffusion_pytorch_model.safetensors` strictly.
    pub fn load(folder: &DiffusersFolder, device: tch::Device) -> Result<(Self, nn::VarStore)> {
        let config = UNetConfig::from_json(folder.config("unet", "config.json")?)?;
        let files = folder.weights("unet", "diffusion_pytorch_model")?;
        let layout = config.validate()?;
        crate::io::safetensors::check_size_budget(
            &files,
            config.min_params(&layout),
            "unet/config.json",
        )?;
        let mut vs = nn::VarStore::new(device);
        let unet = Self::new(vs.root(), &config)?;
        crate::io::safetensors::load_strict(&mut vs, &files, &[])?;
        vs.freeze();
        Ok((unet, vs))
    }

    fn transformers(&self) -> impl Iterator<Item = &Transformer2DModel> {
        let down = self.down_blocks.iter().flat_map(|b| b.attentions());
        let up = self.up_blocks.iter().flat_map(|b| b.attentions());
        down.chain(self.mid_block.attentions()).chain(up)
    }

    /// Every LoRA site (attn2 to_q/to_k/to_v), in module order: down blocks, mid, up blocks.
    pub fn lora_sites(&self) -> &[LoraSite] {
        &self.sites
    }

    /// Identifies the weights a LoRA for this UNet was made for: a 64-bit hash of every LoRA
    /// site and the f16-rounded frozen attn2 q/k/v weights under it (so the same model stored
    /// f16 or f32 gives the same value). A hypernetwork records it and refuses another base.
    pub fn lora_fingerprint(&self) -> String {
        let mut h = 0x0010_CA57_u64;
        let mut eat = |x: u64| h = crate::data::rng::mix64(h ^ x);
        for block in self.transformers().flat_map(|t| t.blocks()) {
            for (site, w) in block.lora_sites().iter().zip(block.lora_site_weights()) {
                eat(site.in_features as u64);
                eat(site.out_features as u64);
                for b in site.module_path().bytes() {
                    eat(b as u64);
                }
                let w = w
                    .to_kind(tch::Kind::Half)
                    .to_kind(tch::Kind::Float)
                    .flatten(0, -1);
                let v: Vec<f32> = Vec::try_from(&w).unwrap_or_default();
                // Four values per word keeps this fast on SD1.5 (~6M weights).
                for c in v.chunks(4) {
                    let mut word = 0u64;
                    for x in c {
                        word = word.rotate_left(16) ^ (x.to_bits() as u64);
                    }
                    eat(word);
                }
            }
        }
        format!("{h:016x}")
    }

    /// How many times the spatial size is halved (the input must be divisible by `2^this`
    /// for the up path to match without explicit upsample sizes).
    fn num_upsamplers(&self) -> u32 {
        (self.config.block_out_channels.len() - 1) as u32
    }

    /// ε (or v) prediction. `x: [B, in_channels, H, W]`, `t: [B]` or a scalar (any float or
    /// integer kind; per-sample values allowed), `ctx: [B, M, cross_attention_dim]`,
    /// `lora`: per-sample deltas for the attn2 sites.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 || size[1] != self.config.in_channels {
            bail!(
                "UNet input must be [B, {}, H, W], got {size:?}",
                self.config.in_channels
            );
        }
        let b = size[0];
        let cs = ctx.size();
        if cs.len() != 3 || cs[0] != b || self.cross_dim_k().is_some_and(|d| cs[2] != d) {
            bail!("UNet context must be [{b}, M, cross_attention_dim], got {cs:?}");
        }
        let t = match t.dim() {
            0 => t.expand([b], false),
            1 if t.size()[0] == b => t.shallow_clone(),
            _ => bail!("timesteps must be a scalar or [{b}], got {:?}", t.size()),
        };
        if let Some(lora) = lora {
            lora.validate(&self.sites, b)?;
        }

        // 1. Time embedding.
        let temb = self.time_proj(&t);
        let temb = self
            .time_linear_2
            .forward(&self.act.apply(&self.time_linear_1.forward(&temb)));

        // 2. Down path, collecting skips.
        let mut h = self.conv_in.forward(x);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h, &temb, ctx, lora);
            h = out;
            skips.extend(s);
        }

        // 3. Mid block.
        h = self.mid_block.forward(&h, &temb, ctx, lora);

        // 4. Up path: each block consumes one skip per resnet. When the input size is not a
        // multiple of 2^num_upsamplers, upsample to the size of the matching skip.
        let factor = 2i64.pow(self.num_upsamplers());
        let forward_upsample_size = size[2] % factor != 0 || size[3] % factor != 0;
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len() - block.num_resnets();
            let upsample_size = (forward_upsample_size && i + 1 < n_up).then(|| {
                let s = skips[remaining - 1].size();
                (s[2], s[3])
            });
            h = block.forward(&h, &mut skips, &temb, ctx, lora, upsample_size);
        }

        // 5. Output.
        let h = self.act.apply(&self.conv_norm_out.forward(&h));
        Ok(self.conv_out.forward(&h))
    }

    /// The cross-attention (text) width the K/V projections expect.
    fn cross_dim_k(&self) -> Option<i64> {
        self.sites
            .iter()
            .find(|s| s.proj != crate::lora::Proj::Q)
            .map(|s| s.in_features as i64)
    }

    /// diffusers' `get_timestep_embedding` with the config's flip/shift: `[B]` → `[B, C0]`.
    fn time_proj(&self, t: &Tensor) -> Tensor {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let opts = (Kind::Float, t.device());
        let exponent = Tensor::arange(half, opts) * (-(10000f64).ln());
        let exponent = exponent / (half as f64 - self.config.freq_shift);
        // [B, 1] * [1, half] → [B, half]
        let emb = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
        let emb = Tensor::cat(&[emb.sin(), emb.cos()], -1);
        let emb = if self.config.flip_sin_to_cos {
            Tensor::cat(&[emb.narrow(1, half, half), emb.narrow(1, 0, half)], -1)
        } else {
            emb
        };
        if dim % 2 == 1 {
            emb.constant_pad_nd([0, 1, 0, 0])
        } else {
            emb
        }
    }
}
