//! `UNet2DConditionModel`'s config.json (diffusers `models/unets/unet_2d_condition.py`) for the
//! SD1.x/SD2.x family and SDXL (`addition_embed_type: "text_time"`, per-level
//! `transformer_layers_per_block`), with presets. Options outside these families are rejected by
//! [`UNetConfig::validate`] with a line naming the option.
//!
//! Quirk (SPEC §5): in SD1.x configs `attention_head_dim` is the **number of heads**
//! (`num_attention_heads = num_attention_heads or attention_head_dim`).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::lora::{BlockLoc, LoraSite, Proj, TransformerSite};
use crate::nn::Activation;

/// A value that configs give either once for all blocks or per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The per-block values for `n` blocks.
    pub fn expand(&self, name: &str, n: usize) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Each(v) if v.len() == n => Ok(v.clone()),
            Self::Each(v) => bail!("unet config: {name} has {} entries for {n} blocks", v.len()),
        }
    }
}

fn d_sample_size() -> i64 {
    64
}
fn d_channels() -> i64 {
    4
}
fn d_true() -> bool {
    true
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_one_i() -> i64 {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> Option<i64> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_tlayers() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_false_pb() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> i64 {
    3
}

/// diffusers' `UNet2DConditionModel` config (field names and defaults as in diffusers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: i64,
    #[serde(default = "d_channels")]
    pub in_channels: i64,
    #[serde(default = "d_channels")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_pb")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_one_i")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<i64>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: i64,
    // Options of other UNet families; any non-null value is rejected by `validate`.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `"text_time"` (SDXL: pooled text embeds + time ids, see [`AddedEmbedding`]) or null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: width of each sinusoidal time-id embedding (256 in the hub model).
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// SDXL: input width of `add_embedding` = pooled text width + 6 · addition_time_embed_dim.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_type: Option<String>,
}

/// The resolved, per-block view of a config that the model is built from.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub heads: Vec<i64>,
    pub layers: Vec<i64>,
    pub cross_dims: Vec<i64>,
    pub transformer_layers: Vec<i64>,
    pub groups: i64,
    pub act: Activation,
    /// SDXL's added conditioning (`addition_embed_type: "text_time"`), if any.
    pub added: Option<AddedEmbedding>,
}

/// SDXL's "text_time" added conditioning: `add_embedding(cat[pooled, Timesteps(time_dim)(ids)])`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddedEmbedding {
    /// `addition_time_embed_dim`.
    pub time_dim: i64,
    /// Number of time ids (6: original size, crop top-left, target size).
    pub num_time_ids: i64,
    /// `projection_class_embeddings_input_dim`.
    pub in_dim: i64,
}

impl AddedEmbedding {
    /// Width of the pooled text embedding the UNet expects (`in_dim − num_time_ids · time_dim`).
    pub fn pooled_dim(&self) -> i64 {
        self.in_dim - self.num_time_ids * self.time_dim
    }
}

impl UNetConfig {
    /// Stable Diffusion 1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5).
    pub fn sd15() -> Self {
        Self {
            sample_size: 64,
            cross_attention_dim: PerBlock::One(768),
            ..Self::base()
        }
    }

    /// Stable Diffusion 2.1's UNet (stabilityai/stable-diffusion-2-1): per-block head dims
    /// (5,10,20,20), linear projections, 1024-wide text states.
    pub fn sd21() -> Self {
        Self {
            sample_size: 96,
            cross_attention_dim: PerBlock::One(1024),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::base()
        }
    }

    /// Stable Diffusion XL 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`):
    /// three levels (no attention at the first), 1/2/10 transformer layers, 5/10/20 heads,
    /// 2048-wide text states, "text_time" added conditioning (256-wide time ids, 2816 inputs).
    pub fn sdxl() -> Self {
        Self {
            sample_size: 128,
            block_out_channels: vec![320, 640, 1280],
            down_block_types: vec![
                "DownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
            ],
            up_block_types: vec![
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "UpBlock2D".into(),
            ],
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            cross_attention_dim: PerBlock::One(2048),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::base()
        }
    }

    /// A tiny SDXL-shaped UNet for tests (diffusers' SDXL pipeline test dummy components).
    pub fn tiny_sdxl() -> Self {
        Self {
            sample_size: 32,
            block_out_channels: vec![32, 64],
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            transformer_layers_per_block: PerBlock::Each(vec![1, 2]),
            attention_head_dim: PerBlock::Each(vec![2, 4]),
            cross_attention_dim: PerBlock::One(64),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(8),
            projection_class_embeddings_input_dim: Some(80),
            norm_num_groups: Some(16),
            ..Self::base()
        }
    }

    /// A tiny SD1.x-shaped UNet for tests: channels (32, 64), one cross-attention level.
    pub fn tiny() -> Self {
        Self {
            sample_size: 8,
            block_out_channels: vec![32, 64],
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            layers_per_block: PerBlock::One(1),
            cross_attention_dim: PerBlock::One(32),
            attention_head_dim: PerBlock::One(2),
            norm_num_groups: Some(16),
            ..Self::base()
        }
    }

    /// diffusers' defaults, i.e. what an empty config.json means.
    fn base() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }

    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        let cfg: Self =
            serde_json::from_value(value).map_err(|e| anyhow::anyhow!("unet/config.json: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configs outside the SD1.x/SD2.x UNet family, naming the option.
    pub fn validate(&self) -> Result<UNetLayout> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("unet config: block_out_channels is empty");
        }
        self.check_sizes()?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "unet config: {} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("unet config: unsupported down block type {t:?}");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("unet config: unsupported up block type {t:?}");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => bail!("unet config: unsupported mid_block_type {other:?}"),
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            (
                "addition_embed_type",
                self.addition_embed_type
                    .as_deref()
                    .is_some_and(|t| t != "text_time"),
            ),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
            ("center_input_sample", self.center_input_sample),
            (
                "attention_type",
                self.attention_type
                    .as_deref()
                    .is_some_and(|t| t != "default"),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
            ("conv_in_kernel", self.conv_in_kernel != 3),
            ("conv_out_kernel", self.conv_out_kernel != 3),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            bail!("unet config: {name} is not supported (SD1.x/SD2.x/SDXL UNets only)");
        }
        if self
            .only_cross_attention
            .expand("only_cross_attention", n)?
            .contains(&true)
        {
            bail!("unet config: only_cross_attention is not supported");
        }
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand("attention_head_dim", n)?;
        let layout = UNetLayout {
            layers: self.layers_per_block.expand("layers_per_block", n)?,
            cross_dims: self.cross_attention_dim.expand("cross_attention_dim", n)?,
            transformer_layers: self
                .transformer_layers_per_block
                .expand("transformer_layers_per_block", n)?,
            groups: self.norm_num_groups.unwrap_or(32),
            act: Activation::parse(&self.act_fn)?,
            heads,
            added: self.added_embedding()?,
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % layout.groups != 0 {
                bail!(
                    "unet config: block_out_channels[{i}] = {c} is not divisible by norm_num_groups {}",
                    layout.groups
                );
            }
            if layout.heads[i] <= 0 || c % layout.heads[i] != 0 {
                bail!(
                    "unet config: block_out_channels[{i}] = {c} is not divisible by {} heads",
                    layout.heads[i]
                );
            }
        }
        if layout.layers.iter().any(|&l| l < 1) || layout.transformer_layers.iter().any(|&l| l < 1)
        {
            bail!("unet config: layers_per_block and transformer_layers_per_block must be ≥ 1");
        }
        Ok(layout)
    }

    /// Every LoRA site (attn2 to_q/to_k/to_v) of the UNet this config builds, in module order
    /// (down blocks, mid, up blocks), without building it: the real SDXL config counts its
    /// sites and LoRA sizes with no weights allocated. [`super::UNet2DConditionModel`] builds the
    /// same list from its modules.
    pub fn lora_sites(&self) -> Result<Vec<LoraSite>> {
        let layout = self.validate()?;
        let ch = &self.block_out_channels;
        let n = ch.len();
        let mut sites = Vec::new();
        let mut push = |loc: BlockLoc, attentions: i64, level: usize| {
            let (dim, cross) = (ch[level], layout.cross_dims[level]);
            for attention in 0..attentions as usize {
                for block in 0..layout.transformer_layers[level] as usize {
                    for proj in Proj::ALL {
                        sites.push(LoraSite {
                            transformer: TransformerSite {
                                loc,
                                attention,
                                block,
                            },
                            proj,
                            in_features: if proj == Proj::Q { dim } else { cross } as usize,
                            out_features: dim as usize,
                        });
                    }
                }
            }
        };
        for (i, kind) in self.down_block_types.iter().enumerate() {
            if kind == "CrossAttnDownBlock2D" {
                push(BlockLoc::Down(i), layout.layers[i], i);
            }
        }
        push(BlockLoc::Mid, 1, n - 1);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let r = n - 1 - i;
            if kind == "CrossAttnUpBlock2D" {
                push(BlockLoc::Up(i), layout.layers[r] + 1, r);
            }
        }
        Ok(sites)
    }

    /// SDXL's added conditioning, checked: both sizes present and leaving a pooled width ≥ 1.
    fn added_embedding(&self) -> Result<Option<AddedEmbedding>> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        let (Some(time_dim), Some(in_dim)) = (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) else {
            bail!("unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim");
        };
        if time_dim < 2 {
            bail!("unet config: addition_time_embed_dim must be ≥ 2, got {time_dim}");
        }
        let added = AddedEmbedding {
            time_dim,
            num_time_ids: 6,
            in_dim,
        };
        if added.pooled_dim() < 1 {
            bail!(
                "unet config: projection_class_embeddings_input_dim {in_dim} leaves no room for the pooled text embedding (6 time ids × addition_time_embed_dim {time_dim} = {})",
                6 * time_dim
            );
        }
        Ok(Some(added))
    }
}

const WHAT: &str = "unet config";

impl UNetConfig {
    /// Every scalar size and list length of the config, each named by its key (the per-block
    /// values are checked on the [`UNetLayout`]).
    fn check_sizes(&self) -> Result<()> {
        use crate::models::{check_positive, check_range, MAX_DEPTH, MAX_WIDTH};
        let n = self.block_out_channels.len() as i64;
        // Each level halves the latent: 2^(n-1) must stay a sane factor.
        check_range(WHAT, "len(block_out_channels)", n, 1, 16)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_range(WHAT, &format!("block_out_channels[{i}]"), c, 1, MAX_WIDTH)?;
        }
        check_range(WHAT, "sample_size", self.sample_size, 1, 1 << 14)?;
        check_range(WHAT, "in_channels", self.in_channels, 1, MAX_WIDTH)?;
        check_range(WHAT, "out_channels", self.out_channels, 1, MAX_WIDTH)?;
        // 0 (pad (0,1,0,1) first, as diffusers) and 1 halve the size; other paddings give
        // feature maps that no longer match the up path's skip connections.
        check_range(WHAT, "downsample_padding", self.downsample_padding, 0, 1)?;
        if let Some(g) = self.norm_num_groups {
            check_range(WHAT, "norm_num_groups", g, 1, MAX_WIDTH)?;
        }
        check_positive(WHAT, "norm_eps", self.norm_eps)?;
        for (key, v) in [
            ("freq_shift", self.freq_shift),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
        ] {
            if !v.is_finite() {
                bail!("{WHAT}: {key} must be a finite number, got {v}");
            }
        }
        check_per_block("layers_per_block", &self.layers_per_block, 1, MAX_DEPTH)?;
        check_per_block(
            "cross_attention_dim",
            &self.cross_attention_dim,
            1,
            MAX_WIDTH,
        )?;
        check_per_block(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            1,
            MAX_DEPTH,
        )?;
        match &self.num_attention_heads {
            Some(h) => check_per_block("num_attention_heads", h, 1, MAX_WIDTH)?,
            None => check_per_block("attention_head_dim", &self.attention_head_dim, 1, MAX_WIDTH)?,
        }
        Ok(())
    }

    /// A lower bound on the UNet's weight count, to compare with the weights file before
    /// anything is allocated: `conv_in`/`conv_out`, the second 3×3 convolution of each down-block
    /// resnet, and the cross-attention key/value projections of the down, mid and up blocks
    /// (each term a config value scales, so no value can make the model large and the bound small).
    pub fn min_params(&self, layout: &UNetLayout) -> u128 {
        use crate::models::params;
        let ch = &self.block_out_channels;
        let n = ch.len();
        let attn =
            |i: usize| params(&[2, layout.cross_dims[i], ch[i], layout.transformer_layers[i]]);
        let mut total = params(&[9, self.in_channels, ch[0]])
            .saturating_add(params(&[9, ch[0], self.out_channels]))
            .saturating_add(attn(n - 1));
        for (i, &c) in ch.iter().enumerate() {
            total = total.saturating_add(params(&[9, c, c, layout.layers[i]]));
            if self.down_block_types[i] == "CrossAttnDownBlock2D" {
                total = total.saturating_add(attn(i).saturating_mul(layout.layers[i] as u128));
            }
            // Up blocks read per-block values in reverse, with one more layer.
            if self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D" {
                let layers = layout.layers[i] as u128 + 1;
                total = total.saturating_add(attn(i).saturating_mul(layers));
            }
        }
        total
    }
}

/// A per-block size in range: `key` for one value, `key[i]` for a list entry.
fn check_per_block(key: &str, v: &PerBlock<i64>, min: i64, max: i64) -> Result<()> {
    match v {
        PerBlock::One(x) => crate::models::check_range(WHAT, key, *x, min, max),
        PerBlock::Each(xs) => xs.iter().enumerate().try_for_each(|(i, &x)| {
            crate::models::check_range(WHAT, &format!("{key}[{i}]"), x, min, max)
        }),
    }
}
