//! `UNet2DConditionModel` for the SD1.x/SD2.x family and SDXL (diffusers
//! `models/unets/unet_2d_condition.py`), with per-sample timesteps and per-sample LoRA on the
//! cross-attention projections (the paper's LoRA sites, SPEC §2).
//!
//! ε = UNet(x_t, t, c): `time_proj → time_embedding` (+ SDXL's `get_aug_embed`:
//! `add_embedding(cat[text_embeds, add_time_proj(time_ids)])`), `conv_in`, down blocks
//! (collecting skips), mid block, up blocks (consuming skips), `conv_norm_out → act → conv_out`.
mod blocks;
mod config;
mod transformer;

pub use config::{AddedEmbedding, PerBlock, UNetConfig, UNetLayout};
pub use transformer::{ImageTokens, IpWeights};

use anyhow::{bail, Result};
use tch::{nn, nn::Module, Kind, Tensor};

use crate::io::DiffusersFolder;
use crate::lora::{LoraBatch, LoraSite};
use crate::nn::{conv2d, group_norm, Activation, Linear, ResnetConfig};
use blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use transformer::{CrossCond, Transformer2DModel, TransformerConfig};

/// What the UNet is conditioned on besides `x_t` and `t`, one row per sample.
#[derive(Debug, Clone, Copy)]
pub struct UNetCond<'a> {
    /// Cross-attention states `[B, M, cross_attention_dim]` (CLIP hidden states).
    pub text: &'a Tensor,
    /// SDXL's added conditioning (`added_cond_kwargs`), for UNets with `addition_embed_type`.
    pub added: Option<AddedCond<'a>>,
    /// IP-Adapter image tokens for attn2 (decoupled cross-attention).
    pub image: Option<&'a ImageTokens>,
}

/// diffusers' `added_cond_kwargs = {"text_embeds", "time_ids"}`.
#[derive(Debug, Clone, Copy)]
pub struct AddedCond<'a> {
    /// Pooled, projected text embedding `[B, P]` (text_encoder_2's `text_embeds`).
    pub text_embeds: &'a Tensor,
    /// `[B, 6]`: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: &'a Tensor,
}

impl<'a> UNetCond<'a> {
    /// Text states only (SD1.x/SD2.x).
    pub fn text(text: &'a Tensor) -> Self {
        Self {
            text,
            added: None,
            image: None,
        }
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: nn::Conv2D,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL: `add_embedding.linear_1/linear_2` (a `TimestepEmbedding`, SiLU) and its layout.
    add_embedding: Option<(Linear, Linear, AddedEmbedding)>,
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
            add_embedding: layout.added.map(|a| {
                let p = &vs / "add_embedding";
                (
                    Linear::new(&p / "linear_1", a.in_dim, temb_dim, true),
                    Linear::new(&p / "linear_2", temb_dim, temb_dim, true),
                    a,
                )
            }),
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
        let unet = {
            let _loading = crate::util::LoadingWeights::begin();
            Self::new(vs.root(), &config)?
        };
        crate::io::safetensors::load_strict(&mut vs, &files, &[])?;
        vs.freeze();
        Ok((unet, vs))
    }

    fn transformers(&self) -> impl Iterator<Item = &Transformer2DModel> {
        let down = self.down_blocks.iter().flat_map(|b| b.attentions());
        let up = self.up_blocks.iter().flat_map(|b| b.attentions());
        down.chain(self.mid_block.attentions()).chain(up)
    }

    /// Every attn2's frozen `(to_k, to_v)` weights `[inner, cross]`, by transformer block
    /// (IP-Adapter's training initialises `to_k_ip`/`to_v_ip` from them).
    pub fn attn2_kv(
        &self,
    ) -> std::collections::BTreeMap<crate::lora::TransformerSite, (Tensor, Tensor)> {
        self.transformers()
            .flat_map(|t| t.blocks())
            .map(|b| {
                let [_, k, v] = b.lora_site_weights();
                (
                    b.lora_sites()[0].transformer,
                    (k.shallow_clone(), v.shallow_clone()),
                )
            })
            .collect()
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

    /// SDXL's added conditioning, if this UNet takes it.
    pub fn added_embedding(&self) -> Option<AddedEmbedding> {
        self.add_embedding.as_ref().map(|(_, _, a)| *a)
    }

    /// [`Self::forward_cond`] with text states only (SD1.x/SD2.x UNets).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        self.forward_cond(x, t, &UNetCond::text(ctx), lora)
    }

    /// ε (or v) prediction. `x: [B, in_channels, H, W]`, `t: [B]` or a scalar (any float or
    /// integer kind; per-sample values allowed), `cond.text: [B, M, cross_attention_dim]`,
    /// `cond.added`: SDXL's per-row pooled text embeds and time ids, `lora`: per-sample deltas
    /// for the attn2 sites.
    pub fn forward_cond(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &UNetCond<'_>,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let ctx = cond.text;
        let cross = CrossCond {
            text: ctx,
            image: cond.image,
        };
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
        if let Some(img) = cond.image {
            let (ts, ss) = (img.tokens.size(), img.scale.size());
            let cross = self.cross_dim_k();
            if ts.len() != 3 || ts[0] != b || cross.is_some_and(|d| ts[2] != d) || ss != [b] {
                bail!("UNet image tokens must be [{b}, T, cross_attention_dim] with scales [{b}], got {ts:?} and {ss:?}");
            }
        }

        // 1. Time embedding (+ SDXL's added conditioning).
        let c0 = self.config.block_out_channels[0];
        // diffusers: `t_emb.to(dtype=sample.dtype)` (float32 sinusoids, model-dtype MLP).
        let temb = self.time_proj(&t, c0).to_kind(x.kind());
        let temb = self
            .time_linear_2
            .forward(&self.act.apply(&self.time_linear_1.forward(&temb)));
        let temb = match (&self.add_embedding, cond.added) {
            (None, None) => temb,
            (Some((l1, l2, a)), Some(added)) => {
                let (pooled, ids) = (added.text_embeds, added.time_ids);
                if pooled.size() != [b, a.pooled_dim()] || ids.size() != [b, a.num_time_ids] {
                    bail!(
                        "UNet added conditioning must be text_embeds [{b}, {}] and time_ids [{b}, {}], got {:?} and {:?}",
                        a.pooled_dim(),
                        a.num_time_ids,
                        pooled.size(),
                        ids.size()
                    );
                }
                // [B, 6] → [B·6] → [B·6, time_dim] → [B, 6·time_dim]
                let te = self
                    .time_proj(&ids.flatten(0, -1), a.time_dim)
                    .reshape([b, a.num_time_ids * a.time_dim]);
                // pooled first: [B, P] ++ [B, 6·time_dim] → [B, in_dim]
                let add = Tensor::cat(&[pooled.to_kind(te.kind()), te], -1).to_kind(temb.kind());
                let aug = l2.forward(&l1.forward(&add).silu());
                temb + aug
            }
            (Some(_), None) => bail!(
                "this UNet (addition_embed_type \"text_time\", SDXL) needs added conditioning: pooled text embeds and time ids"
            ),
            (None, Some(_)) => {
                bail!("this UNet takes no added conditioning (it has no addition_embed_type)")
            }
        };

        // 2. Down path, collecting skips.
        let mut h = self.conv_in.forward(x);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h, &temb, &cross, lora);
            h = out;
            skips.extend(s);
        }

        // 3. Mid block.
        h = self.mid_block.forward(&h, &temb, &cross, lora);

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
            h = block.forward(&h, &mut skips, &temb, &cross, lora, upsample_size);
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

    /// diffusers' `get_timestep_embedding` (float32) with the config's flip/shift:
    /// `[N]` → `[N, dim]`.
    fn time_proj(&self, t: &Tensor, dim: i64) -> Tensor {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn lora_weights(sites: &[LoraSite], rank: usize) -> usize {
        sites
            .iter()
            .map(|s| rank * (s.in_features + s.out_features))
            .sum()
    }

    #[test]
    fn config_sites_are_the_module_sites() {
        for cfg in [UNetConfig::tiny(), UNetConfig::tiny_sdxl()] {
            let vs = nn::VarStore::new(Device::Cpu);
            let unet = UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
            assert_eq!(cfg.lora_sites().unwrap(), unet.lora_sites());
        }
    }

    #[test]
    fn real_configs_count_the_papers_lora_sizes() {
        // SPEC §2 / seed paper: rank 3 on SD1.5's 16 attn2 = 223,488; rank 2 on SDXL's 70 attn2
        // = 1,239,040 (sdxl-ipadapter-facts §4, measured with diffusers on the meta device).
        let sd15 = UNetConfig::sd15().lora_sites().unwrap();
        assert_eq!((sd15.len() / 3, lora_weights(&sd15, 3)), (16, 223_488));
        let sdxl = UNetConfig::sdxl().lora_sites().unwrap();
        assert_eq!((sdxl.len() / 3, lora_weights(&sdxl, 2)), (70, 1_239_040));
    }

    #[test]
    fn sdxl_unet_takes_added_conditioning() {
        let cfg = UNetConfig::tiny_sdxl();
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
        let a = unet.added_embedding().unwrap();
        assert_eq!((a.time_dim, a.pooled_dim()), (8, 32));
        assert!(vs.variables().contains_key("add_embedding.linear_1.weight"));
        let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 500]);
        let ctx = Tensor::randn([2, 7, 64], (Kind::Float, Device::Cpu));
        let pooled = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.]).repeat([2, 1]);
        let added = AddedCond {
            text_embeds: &pooled,
            time_ids: &ids,
        };
        let cond = UNetCond {
            text: &ctx,
            added: Some(added),
            image: None,
        };
        let eps = tch::no_grad(|| unet.forward_cond(&x, &t, &cond, None)).unwrap();
        assert_eq!(eps.size(), [2, 4, 8, 8]);
        // The time ids change ε (they reach every resnet through the time embedding).
        let ids2 = Tensor::from_slice(&[32f32, 64., 0., 0., 64., 64.]).repeat([2, 1]);
        let cond2 = UNetCond {
            added: Some(AddedCond {
                time_ids: &ids2,
                ..added
            }),
            ..cond
        };
        let eps2 = tch::no_grad(|| unet.forward_cond(&x, &t, &cond2, None)).unwrap();
        assert!((eps - eps2).abs().max().double_value(&[]) > 0.0);
        // Missing or mis-shaped added conditioning is an error, not a crash.
        let e = unet.forward(&x, &t, &ctx, None).unwrap_err().to_string();
        assert!(e.contains("added conditioning"), "{e}");
        let bad = Tensor::randn([2, 31], (Kind::Float, Device::Cpu));
        let cond3 = UNetCond {
            added: Some(AddedCond {
                text_embeds: &bad,
                ..added
            }),
            ..cond
        };
        assert!(unet.forward_cond(&x, &t, &cond3, None).is_err());
    }
}
