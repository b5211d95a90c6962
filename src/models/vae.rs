//! diffusers' `AutoencoderKL` (the SD VAE), key for key: `Encoder` → `quant_conv` →
//! `DiagonalGaussianDistribution`, and `post_quant_conv` → `Decoder`.
//!
//! Matches diffusers 0.42 `models/autoencoders/{autoencoder_kl,vae}.py`, `DownEncoderBlock2D`,
//! `UpDecoderBlock2D` and `UNetMidBlock2D` (resnet, single-head attention over channels with
//! group norm and residual, resnet), built from the shared `crate::nn` blocks: `ResnetBlock2D`
//! (no time embedding, GroupNorm eps 1e-6), `Downsample2D` (pad (0,1,0,1), conv stride 2),
//! `Upsample2D` (nearest ×2, conv), `Attention`.
//! Old checkpoints name the mid-block attention `query/key/value/proj_attn` (same `[C, C]`
//! shapes): `load` accepts them like diffusers' `_fix_state_dict_keys_on_load`.
use std::collections::HashSet;

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Tensor};

use crate::io::safetensors::{load_strict_aliased, tensor_names};
use crate::io::DiffusersFolder;
use crate::nn::{
    conv2d, group_norm, Activation, Attention, Downsample2D, ResnetBlock2D, ResnetConfig,
    Upsample2D,
};

/// GroupNorm eps of every VAE norm (diffusers hard-codes `resnet_eps=1e-6` / `eps=1e-6`).
const EPS: f64 = 1e-6;

/// `vae/config.json`; missing fields take `AutoencoderKL.__init__`'s defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub latent_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub act_fn: String,
    pub sample_size: i64,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
    /// Per-channel latent statistics (some SDXL-family VAEs): SDXL's pipeline decodes
    /// `latents · std / scaling_factor + mean` when both are set.
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            layers_per_block: 1,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            mid_block_add_attention: true,
            force_upcast: true,
            latents_mean: None,
            latents_std: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

impl VaeConfig {
    /// A 2-level VAE for unit tests (scale factor 2).
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![16, 32],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            norm_num_groups: 8,
            ..Self::default()
        }
    }

    /// A lower bound on the weight count, to compare with the weights file before anything is
    /// allocated: the encoder's and decoder's input and output convolutions (which the image and
    /// latent channels scale) and the second 3×3 convolution of each encoder resnet.
    pub fn min_params(&self) -> u128 {
        use crate::models::params;
        let ch = &self.block_out_channels;
        let (first, last) = (
            ch.first().copied().unwrap_or(0),
            ch.last().copied().unwrap_or(0),
        );
        let l = self.latent_channels;
        let convs = [
            params(&[9, self.in_channels, first]),
            params(&[9, first, self.out_channels]),
            params(&[9, last, 2, l]),
            params(&[9, l, last]),
        ];
        ch.iter()
            .map(|&c| params(&[9, c, c, self.layers_per_block]))
            .chain(convs)
            .fold(0, u128::saturating_add)
    }

    /// Checks the config as [`AutoencoderKL::load`] does (for the fuzzers and mutation tests).
    pub fn check(&self) -> Result<()> {
        self.validate()?;
        self.activation().map(|_| ())
    }

    /// Image pixels per latent pixel: `2^(len(block_out_channels) - 1)`.
    pub fn scale_factor(&self) -> i64 {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The resnet activation; diffusers' `get_activation` knows silu/swish and gelu here.
    fn activation(&self) -> Result<Activation> {
        match Activation::parse(&self.act_fn).map_err(|e| anyhow!("vae/config.json: {e}"))? {
            Activation::QuickGelu => {
                bail!("vae/config.json: act_fn \"quick_gelu\" is not supported (silu, gelu)")
            }
            act => Ok(act),
        }
    }

    fn validate(&self) -> Result<()> {
        use crate::models::{check_positive, check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "vae/config.json";
        let n = self.block_out_channels.len();
        ensure!(n > 0, "vae/config.json: block_out_channels is empty");
        check_range(WHAT, "len(block_out_channels)", n as i64, 1, 16)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_range(WHAT, &format!("block_out_channels[{i}]"), c, 1, MAX_WIDTH)?;
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            check_range(WHAT, key, v, 1, MAX_WIDTH)?;
        }
        check_range(
            WHAT,
            "layers_per_block",
            self.layers_per_block,
            1,
            MAX_DEPTH,
        )?;
        check_range(WHAT, "sample_size", self.sample_size, 1, 1 << 16)?;
        check_positive(WHAT, "scaling_factor", self.scaling_factor)?;
        if let Some(s) = self.shift_factor.filter(|s| !s.is_finite()) {
            bail!("{WHAT}: shift_factor must be a finite number, got {s}");
        }
        for (what, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            ensure!(
                types.len() == n,
                "vae/config.json: {what} has {} entries, block_out_channels has {n}",
                types.len()
            );
            if let Some(t) = types.iter().find(|t| *t != want) {
                bail!("vae/config.json: unsupported {what} entry {t:?} (only {want} is supported)");
            }
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g <= 0 || c % g != 0)
        {
            bail!(
                "vae/config.json: norm_num_groups {g} does not divide block_out_channels entry {c}"
            );
        }
        ensure!(
            self.layers_per_block >= 1,
            "vae/config.json: layers_per_block must be ≥ 1"
        );
        for (what, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = v {
                ensure!(
                    v.len() as i64 == self.latent_channels,
                    "vae/config.json: {what} has {} entries for {} latent channels",
                    v.len(),
                    self.latent_channels
                );
            }
        }
        Ok(())
    }

    /// SDXL's pipeline latents → decoder input: `z · std / scaling_factor + mean` when both
    /// `latents_mean` and `latents_std` are set (as float32 tensors, like diffusers'
    /// `torch.tensor(config.latents_mean)`), else `z / scaling_factor`.
    pub fn unscale_latents_sdxl(&self, z: &Tensor) -> Tensor {
        match (&self.latents_mean, &self.latents_std) {
            (Some(mean), Some(std)) => {
                let c = |v: &Vec<f64>| {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    // [C] → [1, C, 1, 1]
                    Tensor::from_slice(&v)
                        .view([1, -1, 1, 1])
                        .to_device(z.device())
                };
                z * c(std) / self.scaling_factor + c(mean)
            }
            _ => z / self.scaling_factor,
        }
    }
}

/// The mid-block `Attention`: group norm, one head over all channels (diffusers passes
/// `attention_head_dim = channels`), q/k/v with bias, residual connection.
#[derive(Debug)]
struct VaeAttention {
    group_norm: nn::GroupNorm,
    /// `to_q`, `to_k`, `to_v`, `to_out.0` at the same path as `group_norm`.
    attn: Attention,
}

impl VaeAttention {
    fn new(vs: nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: group_norm(&vs / "group_norm", groups, channels, EPS),
            attn: Attention::new(vs, channels, channels, 1, channels, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE activations are [B, C, H, W]");
        // [B, C, H, W] → [B, H·W, C]
        let t = self
            .group_norm
            .forward(x)
            .view([b, c, h * w])
            .transpose(1, 2);
        let t = self.attn.forward(&t, None, [None; 3]);
        // [B, H·W, C] → [B, C, H, W]
        t.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` of the VAE: `resnets.0`, `attentions.0` (unless disabled), `resnets.1`.
#[derive(Debug)]
struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Option<VaeAttention>,
}

impl UNetMidBlock2D {
    fn new(vs: nn::Path, channels: i64, cfg: &VaeConfig, rc: &ResnetConfig) -> Self {
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(&vs / "resnets" / j, channels, channels, rc))
            .collect();
        let attentions = cfg
            .mid_block_add_attention
            .then(|| VaeAttention::new(&vs / "attentions" / 0, channels, rc.groups));
        Self {
            resnets,
            attentions,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attn) = &self.attentions {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then `downsamplers.0` (pad (0,1,0,1), 3×3 stride 2).
#[derive(Debug)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(
        vs: nn::Path,
        cin: i64,
        cout: i64,
        down: bool,
        cfg: &VaeConfig,
        rc: &ResnetConfig,
    ) -> Self {
        let resnets = (0..cfg.layers_per_block)
            .map(|j| {
                ResnetBlock2D::new(
                    &vs / "resnets" / j,
                    if j == 0 { cin } else { cout },
                    cout,
                    rc,
                )
            })
            .collect();
        let downsamplers = down.then(|| Downsample2D::new(&vs / "downsamplers" / 0, cout, 0));
        Self {
            resnets,
            downsamplers,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self
            .resnets
            .iter()
            .fold(x.shallow_clone(), |h, r| r.forward(&h, None));
        match &self.downsamplers {
            Some(d) => d.forward(&h),
            None => h,
        }
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then `upsamplers.0` (nearest ×2, 3×3 conv).
#[derive(Debug)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn new(
        vs: nn::Path,
        cin: i64,
        cout: i64,
        up: bool,
        cfg: &VaeConfig,
        rc: &ResnetConfig,
    ) -> Self {
        let resnets = (0..cfg.layers_per_block + 1)
            .map(|j| {
                ResnetBlock2D::new(
                    &vs / "resnets" / j,
                    if j == 0 { cin } else { cout },
                    cout,
                    rc,
                )
            })
            .collect();
        let upsamplers = up.then(|| Upsample2D::new(&vs / "upsamplers" / 0, cout));
        Self {
            resnets,
            upsamplers,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self
            .resnets
            .iter()
            .fold(x.shallow_clone(), |h, r| r.forward(&h, None));
        match &self.upsamplers {
            Some(u) => u.forward(&h, None),
            None => h,
        }
    }
}

/// diffusers' `Encoder` with `double_z=True`: image → `[B, 2·latent_channels, H/f, W/f]`.
#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &VaeConfig, rc: &ResnetConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let (n, g, last) = (ch.len(), cfg.norm_num_groups, ch[ch.len() - 1]);
        let down_blocks = (0..n)
            .map(|i| {
                let (vs, cin) = (&vs / "down_blocks" / i, ch[i.saturating_sub(1)]);
                DownEncoderBlock2D::new(vs, cin, ch[i], i + 1 < n, cfg, rc)
            })
            .collect();
        Self {
            conv_in: conv2d(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: UNetMidBlock2D::new(&vs / "mid_block", last, cfg, rc),
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, last, EPS),
            conv_out: conv2d(&vs / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for block in &self.down_blocks {
            h = block.forward(&h);
        }
        let h = self.mid_block.forward(&h);
        // conv_act is nn.SiLU() whatever act_fn says.
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `Decoder` (norm_type "group"): latents → image.
#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &VaeConfig, rc: &ResnetConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let (n, g) = (rev.len(), cfg.norm_num_groups);
        let up_blocks = (0..n)
            .map(|i| {
                let (vs, cin) = (&vs / "up_blocks" / i, rev[i.saturating_sub(1)]);
                UpDecoderBlock2D::new(vs, cin, rev[i], i + 1 < n, cfg, rc)
            })
            .collect();
        Self {
            conv_in: conv2d(&vs / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: UNetMidBlock2D::new(&vs / "mid_block", rev[0], cfg, rc),
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, rev[n - 1], EPS),
            conv_out: conv2d(&vs / "conv_out", rev[n - 1], cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        for block in &self.up_blocks {
            h = block.forward(&h);
        }
        // conv_act is nn.SiLU() whatever act_fn says.
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `DiagonalGaussianDistribution` (the encoder's posterior).
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// `[B, latent_channels, h, w]`
    pub mean: Tensor,
    /// Clamped to [-30, 20] like diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// From the `quant_conv` output `[B, 2·C, h, w]` (mean then logvar along channels).
    pub fn new(parameters: &Tensor) -> Self {
        let moments = parameters.chunk(2, 1);
        Self {
            mean: moments[0].shallow_clone(),
            logvar: moments[1].clamp(-30.0, 20.0),
        }
    }

    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }

    /// `mean + std · ε`, ε from the global torch RNG (diffusers' `sample(generator=None)`).
    pub fn sample(&self) -> Tensor {
        let eps = Tensor::randn(self.mean.size(), (self.mean.kind(), self.mean.device()));
        &self.mean + self.std() * eps
    }
}

/// diffusers' `AutoencoderKL` (no tiling/slicing).
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(vs: nn::Path, cfg: &VaeConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        cfg.validate()?;
        let rc = ResnetConfig {
            groups: cfg.norm_num_groups,
            eps: EPS,
            act: cfg.activation()?,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let lc = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(&vs / "encoder", cfg, &rc),
            decoder: Decoder::new(&vs / "decoder", cfg, &rc),
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv2d(&vs / "quant_conv", 2 * lc, 2 * lc, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv2d(&vs / "post_quant_conv", lc, lc, 1, 1, 0)),
            config: cfg.clone(),
        })
    }

    /// Reads `vae/config.json` and `vae/diffusion_pytorch_model.safetensors` strictly into a
    /// frozen CPU f32 store.
    pub fn load(folder: &DiffusersFolder, device: Device) -> Result<(Self, nn::VarStore)> {
        let cfg: VaeConfig = folder.config("vae", "config.json")?;
        let files = folder.weights("vae", "diffusion_pytorch_model")?;
        cfg.validate()?;
        crate::io::safetensors::check_size_budget(&files, cfg.min_params(), "vae/config.json")?;
        let mut vs = nn::VarStore::new(device);
        let vae = {
            let _loading = crate::util::LoadingWeights::begin();
            Self::new(vs.root(), &cfg)?
        };
        let keys: HashSet<String> = tensor_names(&files).into_iter().collect();
        // Deprecated attention names are read under the file's names.
        let aliases = legacy_attention_renames(&vs, &keys).into_iter().collect();
        load_strict_aliased(&mut vs, &files, &[], &aliases)?;
        vs.freeze();
        Ok((vae, vs))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn scale_factor(&self) -> i64 {
        self.config.scale_factor()
    }

    /// `x: [B, in_channels, H, W]` in [-1, 1] → posterior over `[B, latent_channels, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let f = self.scale_factor();
        match x.size()[..] {
            [_, c, h, w] if c == self.config.in_channels && h >= f && w >= f => {}
            ref s => bail!(
                "vae encode: expected images [B, {}, H, W] with H, W ≥ {f}, got {s:?}",
                self.config.in_channels
            ),
        }
        let h = self.encoder.forward(x);
        let h = match &self.quant_conv {
            Some(c) => c.forward(&h),
            None => h,
        };
        Ok(DiagonalGaussian::new(&h))
    }

    /// Raw latents `z: [B, latent_channels, h, w]` (not scaled) → image `[B, out_channels, h·f, w·f]`
    /// in roughly [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match z.size()[..] {
            [_, c, _, _] if c == self.config.latent_channels => {}
            ref s => bail!(
                "vae decode: expected latents [B, {}, h, w], got {s:?}",
                self.config.latent_channels
            ),
        }
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z),
            None => z.shallow_clone(),
        };
        Ok(self.decoder.forward(&z))
    }
}

/// `(current, deprecated)` names of the mid-block attention weights whose deprecated name is
/// in the file (diffusers renames each key on its own: query→to_q, key→to_k, value→to_v,
/// proj_attn→to_out.0).
fn legacy_attention_renames(vs: &nn::VarStore, keys: &HashSet<String>) -> Vec<(String, String)> {
    let vars = vs.variables();
    let mut out = vec![];
    for part in ["encoder", "decoder"] {
        let path = format!("{part}.mid_block.attentions.0");
        for (new, old) in [
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ] {
            for p in ["weight", "bias"] {
                let (new, old) = (format!("{path}.{new}.{p}"), format!("{path}.{old}.{p}"));
                if keys.contains(&old) && vars.contains_key(&new) {
                    out.push((new, old));
                }
            }
        }
    }
    out
}
